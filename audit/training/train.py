"""Hydra entry point that trains a benchmark classifier: ``python -m audit.training.train``.

Composes ``conf/train.yaml`` (model, module, data, trainer, logger), fits with
Lightning, then measures per-group accuracy and context gaps on a balanced
snow-wolf probe set and logs them to the same MLflow run.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from audit.evidence.behaviour import GroupAccuracy, context_gaps, group_accuracy, predict
from audit.gate.tracking import metric_key
from audit.training import Classifier

__all__ = [
    "TrainResult",
    "train",
    "run_params",
    "instantiate_callbacks",
    "format_accuracies",
    "main",
]


@dataclass
class TrainResult:
    """A trained module, its MLflow run (None without a logger) and its balanced-probe accuracy."""

    module: Classifier
    run_id: str | None
    accuracies: dict[str, GroupAccuracy]
    gaps: dict[str, tuple[GroupAccuracy, GroupAccuracy]]

    @property
    def max_gap(self) -> float:
        return max((b.accuracy - w.accuracy for w, b in self.gaps.values()), default=0.0)

    @property
    def mean_accuracy(self) -> float:
        return sum(a.accuracy for a in self.accuracies.values()) / len(self.accuracies)


def instantiate_callbacks(cfg: DictConfig | None) -> list[pl.Callback]:
    """The callbacks of a ``callbacks`` config group: every entry with a ``_target_``."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def train(
    cfg: DictConfig,
    callbacks: list[pl.Callback] | None = None,
    *,
    overrides: Sequence[str] | None = None,
) -> TrainResult:
    """Fit the configured model and evaluate it on a balanced probe set.

    The Trainer gets the callbacks of ``cfg.callbacks`` followed by ``callbacks``. With
    a logger, the run gets the short parameter set of :func:`run_params` (the overrides
    and a few key values) and the whole resolved config as the artifact ``config.yaml``;
    Lightning's own logging of the module's and data module's hyperparameters is turned
    off, so those are the run's only parameters.

    Args:
        cfg: a composed ``conf/train.yaml``.
        callbacks: more callbacks, after those of ``cfg.callbacks``.
        overrides: the command-line style overrides ``cfg`` was composed with (e.g. those
            given to :func:`audit.training.demo.compose_train`); None takes Hydra's task overrides
            when running inside a Hydra app, else none.
    """
    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, _recursive_=False)
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    run_id = None
    if logger is not None:
        run_id = (
            logger.run_id
        )  # creates the run now, before fit, so the Trainer logs into this one run
        for part in (
            module,
            datamodule,
        ):  # the same hyperparameters, kept; only Lightning's logging of them is off
            part.save_hyperparameters(dict(part.hparams_initial), logger=False)
        logger.log_hyperparams(run_params(cfg, overrides, datamodule))
        logger.experiment.log_text(
            run_id, _redacted(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml"
        )
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        logger=logger if logger is not None else False,
        callbacks=[*instantiate_callbacks(cfg.get("callbacks")), *(callbacks or [])],
    )
    trainer.fit(module, datamodule=datamodule)

    bench = importlib.import_module(
        f"audit.datasets.{cfg.eval_probes.get('benchmark', 'snow_wolf')}"
    )
    probes = bench.probe_set(
        int(cfg.eval_probes.n_per_group), size=int(cfg.data.size), seed=int(cfg.eval_probes.seed)
    )
    accuracies = group_accuracy(probes, predict(module.net, probes.images))
    result = TrainResult(module, run_id, accuracies, context_gaps(accuracies))
    if logger is not None:
        metrics = {metric_key("eval", "acc", g): a.accuracy for g, a in accuracies.items()}
        metrics["eval/context_gap"] = result.max_gap
        metrics["eval/mean_group_acc"] = result.mean_accuracy
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.experiment.set_tag(run_id, "audit.probe_digest", probes.digest)
        logger.finalize("success")
    return result


#: The values every training run shows as parameters: (parameter, path in the config). An
#: override of one of these paths sets the same parameter.
KEY_PARAMS = (
    ("data/correlation", "data.correlation"),
    ("max_epochs", "trainer.max_epochs"),
    ("lr", "module.lr"),
    ("batch_size", "data.batch_size"),
    ("seed", "seed"),
)
#: Overrides that change how a run is shown or stored, not the model: in ``config.yaml`` only.
QUIET_OVERRIDES = (
    "name",
    "hydra",
    "paths",
    "logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@")


def run_params(
    cfg: DictConfig, overrides: Sequence[str] = (), datamodule: Any = None
) -> dict[str, str]:
    """The MLflow parameters of a training run: few and short.

    MLflow 3 prints every parameter of a run, as ``key=value, ...``, in the header of each
    image card (Model metrics tab) above the image itself, so a long list hides the
    Grad-CAM grids. The parameters are:

    * ``net`` and ``data``: the network's and the data's short names (the last part of
      ``net._target_``; the module of the data's ``generate`` function, read from the
      ``datamodule``'s hyperparameters or ``cfg.data``, e.g. ``snow_wolf``, else the last
      part of ``data._target_``);
    * the key values of :data:`KEY_PARAMS` present in ``cfg``;
    * one parameter per override (``data.n_train=96`` -> ``data/n_train``, a group choice
      ``net=resnet18_small`` -> ``net``, an override of a :data:`KEY_PARAMS` path -> that
      key), valued as resolved in ``cfg`` (the choice's name for a group, ``(removed)`` for
      ``~key``), except those of :data:`QUIET_OVERRIDES` (and what lies under them).

    Values are strings (lists as JSON) with any password in a URL replaced by ``***``.
    The whole config is the run's ``config.yaml`` artifact (see :func:`train`).
    """
    params: dict[str, str] = {}
    if "net" in cfg and cfg.net.get("_target_"):
        params["net"] = str(cfg.net._target_).rsplit(".", 1)[-1]
    generate = (getattr(datamodule, "hparams", None) or {}).get("generate") or OmegaConf.select(
        cfg, "data.generate"
    )
    if generate and "." in str(generate):
        params["data"] = str(generate).split(".")[-2]  # audit.datasets.stamps.generate -> stamps
    elif OmegaConf.select(cfg, "data._target_"):
        params["data"] = str(cfg.data._target_).rsplit(".", 1)[-1]
    for key, path in KEY_PARAMS:
        value = OmegaConf.select(cfg, path, default=None)
        if value is not None:
            params[key] = _param_text(value)
    names = {path: key for key, path in KEY_PARAMS}
    for o in OverridesParser.create().parse_overrides([str(t) for t in overrides]):
        path = o.key_or_group
        if any(path == q or path.startswith(q + ".") for q in QUIET_OVERRIDES):
            continue
        name = names.get(path, path.replace(".", "/"))
        if o.is_delete():
            params[name] = "(removed)"
            continue
        value = OmegaConf.select(cfg, path, default=None)
        given = (
            o.get_value_element_as_str()
            if value is None or isinstance(value, DictConfig)
            else value
        )
        params[name] = _param_text(given)
    return {k: _redacted(v) for k, v in params.items()}


def _param_text(value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _redacted(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@`` URL replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def format_accuracies(title: str, result: TrainResult) -> str:
    """A small text table: accuracy per group, then the context gap per class."""
    lines = [title]
    for g, a in result.accuracies.items():
        lines.append(f"  {g:<16} {a.accuracy:6.3f}  ({a.correct}/{a.n})")
    for cls, (worst, best) in result.gaps.items():
        gap = best.accuracy - worst.accuracy
        lines.append(f"  context gap {cls:<6} {gap:6.3f}  ({worst.group} vs {best.group})")
    lines.append(f"  mean group accuracy {result.mean_accuracy:.3f}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="pkg://audit.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    result = train(cfg)
    print(format_accuracies(f"{cfg.name}  (MLflow run {result.run_id})", result))


if __name__ == "__main__":
    main()
