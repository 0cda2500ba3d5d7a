"""Hydra entry point that trains a benchmark classifier: ``python -m audit.train``.

Composes ``conf/train.yaml`` (model, module, data, trainer, logger), fits with
Lightning, then measures per-group accuracy and context gaps on a balanced
snow-wolf probe set and logs them to the same MLflow run.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from audit.behaviour import GroupAccuracy, context_gaps, group_accuracy, predict
from audit.tracking import metric_key
from audit.training import Classifier

__all__ = ["TrainResult", "train", "instantiate_callbacks", "format_accuracies", "main"]


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


def train(cfg: DictConfig, callbacks: list[pl.Callback] | None = None) -> TrainResult:
    """Fit the configured model and evaluate it on a balanced probe set.

    The Trainer gets the callbacks of ``cfg.callbacks`` followed by ``callbacks``.
    """
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, _recursive_=False)
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    run_id = None
    if logger is not None:
        run_id = logger.run_id  # creates the run now (and only one; see FACTS.md)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        logger=logger if logger is not None else False,
        callbacks=[*instantiate_callbacks(cfg.get("callbacks")), *(callbacks or [])],
    )
    trainer.fit(module, datamodule=datamodule)

    bench = importlib.import_module(f"audit.datasets.{cfg.eval_probes.get('benchmark', 'snow_wolf')}")
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
