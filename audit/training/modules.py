"""Training the benchmark models with Lightning: a data module and a classifier module.

``Classifier`` builds its network from a ``_target_`` mapping and saves that mapping
as a hyperparameter, so ``Classifier.load_from_checkpoint(path)`` rebuilds the model
from a checkpoint alone (the audit job loads checkpoints this way). The network is
built by :func:`audit.gate.loading.build_network`, never by Hydra's ``instantiate``: one
``_target_`` with plain arguments; while the audit loader rebuilds a checkpoint, the
model config's ``allowed_targets`` apply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from audit.datasets import snow_wolf
from audit.probes import ProbeSet

__all__ = ["Classifier", "SnowWolfDataModule", "ProbeDataModule", "build_net"]


def build_net(
    net: Mapping[str, Any] | DictConfig, allowed_targets: Sequence[str] | None = None
) -> nn.Module:
    """Build a network from a ``{"_target_": ..., **kwargs}`` mapping with the safe builder.

    Args:
        net: the network config: one ``_target_`` (an ``nn.Module`` class or a function
            returning one) and plain arguments; no nested ``_target_`` or other Hydra keys.
        allowed_targets: globs of the dotted paths allowed; None uses the allow-list of the
            audit loader while it rebuilds a checkpoint, and trusts the config otherwise
            (training from one's own configs).

    Raises:
        audit.gate.loading.ModelLoadError: (a ValueError) the config is refused or does not build.
    """
    from audit.gate.loading import build_network, current_allowed_targets

    if isinstance(net, DictConfig):
        net = OmegaConf.to_container(net, resolve=True)  # the caller's own Hydra config
    if allowed_targets is None:
        allowed_targets = current_allowed_targets()
    return build_network(net, allowed_targets, "net")


class Classifier(pl.LightningModule):
    """Cross-entropy image classifier around a network built from a ``_target_`` mapping.

    Args:
        net: ``{"_target_": "audit.models.SmallCNN", "num_classes": 2, ...}``.
        lr: peak learning rate of AdamW under a one-cycle schedule.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        net: Mapping[str, Any] | DictConfig,
        lr: float = 3e-3,
        weight_decay: float = 5e-4,
    ) -> None:
        super().__init__()
        if isinstance(net, DictConfig):
            net = OmegaConf.to_container(net, resolve=True)
        if lr <= 0:
            raise ValueError(f"lr must be positive; got {lr}")
        self.save_hyperparameters({"net": dict(net), "lr": lr, "weight_decay": weight_decay})
        self.net = build_net(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=max(int(total), 1), pct_start=0.2
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ---------------------------------------------------------------------- any benchmark


class ProbeDataModule(pl.LightningDataModule):
    """Training and validation data from any benchmark's ``generate`` function.

    ``generate(n, correlation, size, seed) -> ProbeSet`` is given as a callable or
    a dotted path (``"audit.datasets.stamps.generate"``), so a Hydra config can
    name it. Both splits share the training correlation (validation is
    in-distribution, from ``seed + 1``); audits use the benchmark's separate
    balanced probe set.

    Args:
        generate: the benchmark's generator, or its dotted import path.
        n_train: training images.
        n_val: validation images.
        correlation: how often the spurious context agrees with the class.
        size: image side in pixels.
        seed: data seed (validation uses ``seed + 1``; also seeds the shuffling).
        batch_size: batch size of both loaders.
    """

    def __init__(
        self,
        generate: str | Callable[..., ProbeSet] = "audit.datasets.snow_wolf.generate",
        n_train: int = 4000,
        n_val: int = 512,
        correlation: float = 0.95,
        size: int = 64,
        seed: int = 0,
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if isinstance(generate, str):
            name = generate
            try:
                generate = get_method(generate)
            except Exception as e:  # hydra wraps import errors in several types
                raise ValueError(
                    f"generate '{name}' cannot be imported; give a dotted path to a function "
                    f"such as 'audit.datasets.stamps.generate' ({e})"
                ) from None
        elif callable(generate):
            name = (
                f"{getattr(generate, '__module__', '?')}.{getattr(generate, '__qualname__', '?')}"
            )
        else:
            raise ValueError(
                f"generate must be a callable or a dotted path; got {type(generate).__name__}"
            )
        self._generate = generate
        # a string in the hyperparameters, so loggers and checkpoints can store it
        self.save_hyperparameters(
            {
                "generate": name,
                "n_train": n_train,
                "n_val": n_val,
                "correlation": correlation,
                "size": size,
                "seed": seed,
                "batch_size": batch_size,
            }
        )
        self.train_set: ProbeSet | None = None
        self.val_set: ProbeSet | None = None

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.train_set is None:
            self.train_set = self._generate(h.n_train, h.correlation, h.size, seed=h.seed)
            self.val_set = self._generate(h.n_val, h.correlation, h.size, seed=h.seed + 1)
            for split, ps in (("train", self.train_set), ("val", self.val_set)):
                if not isinstance(ps, ProbeSet):
                    raise TypeError(
                        f"generate '{h.generate}' returned a {type(ps).__name__} for the {split} "
                        "split; it must return a ProbeSet"
                    )

    def _loader(self, ps: ProbeSet, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(int(self.hparams.seed))
        return DataLoader(
            TensorDataset(ps.images, ps.labels),
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            generator=g if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class SnowWolfDataModule(ProbeDataModule):
    """Training and validation data from :func:`audit.datasets.snow_wolf.generate`.

    Both splits share the training correlation (validation is in-distribution);
    audits use a separate balanced :func:`~audit.datasets.snow_wolf.probe_set`.

    Args:
        n_train: training images.
        n_val: validation images.
        correlation: ``P(snow | wolf) = P(grass | husky)``.
        size: image side in pixels.
        seed: data seed (validation uses ``seed + 1``).
        batch_size: batch size of both loaders.
    """

    def __init__(
        self,
        n_train: int = 4000,
        n_val: int = 512,
        correlation: float = 0.95,
        size: int = 64,
        seed: int = 0,
        batch_size: int = 64,
    ) -> None:
        super().__init__(snow_wolf.generate, n_train, n_val, correlation, size, seed, batch_size)
