"""The audit's and the training's Hydra configs (``pkg://audit.conf``).

Importing the package registers :data:`OPEN_MAPPING` in Hydra's ConfigStore as ``open/mapping``:
a config file puts it under a key with ``defaults: [/open/mapping@<key>, _self_]`` and that key
then takes new keys on the command line without Hydra's ``+`` (``model.kwargs.drop_rate=0.1``,
``model.target.num_classes=2``): its keyword arguments are the user's to choose, while every other
key of the config stays closed (a typo there is still an error). Hydra imports this package to
find the YAML files, so the node is registered before any config is composed.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

__all__ = ["OPEN_MAPPING", "register"]


def _open_mapping() -> DictConfig:
    node = OmegaConf.create({})
    OmegaConf.set_struct(
        node, False
    )  # its own flag: Hydra's struct mode on the root does not reach it
    return node


#: an empty mapping that accepts new keys (see the module docstring)
OPEN_MAPPING = _open_mapping()


def register() -> None:
    """Put :data:`OPEN_MAPPING` in Hydra's ConfigStore as ``open/mapping`` (idempotent)."""
    ConfigStore.instance().store(group="open", name="mapping", node=OPEN_MAPPING)


register()
