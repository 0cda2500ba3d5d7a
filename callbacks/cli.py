"""LightningCLI's config saved into the MLflow run of the Trainer's ``MLFlowLogger``.

Lightning's ``SaveConfigCallback`` writes ``config.yaml`` into ``trainer.log_dir``.
With an ``MLFlowLogger`` that directory exists only for a ``file:`` tracking URI; with
a database or server store (``sqlite:///mlflow.db``, ``http://...``) it is None and
``LightningCLI`` stops with a bare ``AssertionError`` in ``SaveConfigCallback.setup``.

:class:`MLflowSaveConfig` uses Lightning's documented extension point instead: it
subclasses ``SaveConfigCallback``, turns the log-dir copy off (``save_to_log_dir=False``)
and overrides ``save_config``, which Lightning calls once, on global rank zero, at the
first ``setup``. It logs the config as the artifact ``config.yaml`` of the logger's run::

    from lightning.pytorch.cli import LightningCLI   # or pytorch_lightning.cli
    from audit.callbacks import MLflowSaveConfig

    LightningCLI(MyModule, MyData, save_config_callback=MLflowSaveConfig)

The one class serves both Lightning packages: it derives from
``pytorch_lightning.cli.SaveConfigCallback`` and, when the unified ``lightning``
package is installed, from ``lightning.pytorch.cli.SaveConfigCallback`` too, so
either package's ``Trainer`` accepts it (as with the audit callbacks, see
``_callback_bases``). LightningCLI needs ``jsonargparse[signatures]``.
"""

from __future__ import annotations

import importlib.util
import posixpath
from typing import Any

from pytorch_lightning.cli import SaveConfigCallback

from audit.callbacks._base import find_mlflow_logger

__all__ = ["MLflowSaveConfig"]


def _save_config_bases() -> tuple[type, ...]:
    """``pytorch_lightning.cli.SaveConfigCallback``, plus ``lightning.pytorch.cli``'s when installed."""
    bases: list[type] = [SaveConfigCallback]
    if importlib.util.find_spec("lightning") is not None:
        try:
            from lightning.pytorch.cli import SaveConfigCallback as LightningSaveConfigCallback
        except ImportError:  # a broken or partial install: the pytorch_lightning base suffices
            LightningSaveConfigCallback = None
        if (
            LightningSaveConfigCallback is not None
            and LightningSaveConfigCallback is not SaveConfigCallback
        ):
            bases.append(LightningSaveConfigCallback)
    return tuple(bases)


class MLflowSaveConfig(*_save_config_bases()):
    """Log the LightningCLI config as an artifact of the ``MLFlowLogger``'s run; no log_dir needed.

    Pass the class (not an instance) as ``LightningCLI(save_config_callback=MLflowSaveConfig)``;
    its arguments come from ``save_config_kwargs``.

    Args:
        parser: the CLI's parser (given by LightningCLI).
        config: the parsed config (given by LightningCLI).
        config_filename: artifact path of the config inside the run.
        overwrite: replace an artifact of that name the run already has (e.g. a run resumed
            with ``MLFlowLogger(run_id=...)``); False stops the fit with a RuntimeError instead.
        multifile: accepted for Lightning's signature; the artifact is always one YAML file.
        save_to_log_dir: also write Lightning's own copy into ``trainer.log_dir`` (which
            exists only for a ``file:`` tracking URI).

    Raises (at ``setup``, on every rank, before anything is logged):
        ValueError: the Trainer has no ``MLFlowLogger``.
        RuntimeError: the run already has ``config_filename`` and ``overwrite`` is False.
    """

    def __init__(
        self,
        parser: Any,
        config: Any,
        config_filename: str = "config.yaml",
        overwrite: bool = False,
        multifile: bool = False,
        save_to_log_dir: bool = False,
    ) -> None:
        super().__init__(
            parser,
            config,
            config_filename=config_filename,
            overwrite=overwrite,
            multifile=multifile,
            save_to_log_dir=save_to_log_dir,
        )

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the logger (every rank) and an existing artifact (rank zero, broadcast), then Lightning's setup."""
        if not self.already_saved:
            logger = find_mlflow_logger(trainer)
            if logger is None:
                raise ValueError(
                    "MLflowSaveConfig logs the config into the run of the Trainer's MLFlowLogger, but the "
                    "Trainer has none; set trainer.logger to an MLFlowLogger (class_path: "
                    "lightning.pytorch.loggers.MLFlowLogger or pytorch_lightning.loggers.MLFlowLogger), "
                    "or use Lightning's own SaveConfigCallback"
                )
            if not self.overwrite:
                exists = self._artifact_exists(logger) if trainer.is_global_zero else False
                if trainer.strategy.broadcast(exists):
                    raise RuntimeError(
                        f"MLflowSaveConfig: MLflow run {logger.run_id} already has the artifact "
                        f"{self.config_filename!r}; not overwriting it. Log into a new run, or set "
                        'LightningCLI(save_config_kwargs={"overwrite": True}) to replace it'
                    )
        super().setup(trainer, pl_module, stage)

    def _artifact_exists(self, logger: Any) -> bool:
        folder = posixpath.dirname(self.config_filename) or None
        listed = logger.experiment.list_artifacts(logger.run_id, folder)
        return any(f.path == self.config_filename and not f.is_dir for f in listed)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Lightning's hook, on global rank zero only: the config as YAML, one artifact of the logger's run."""
        logger = find_mlflow_logger(trainer)
        text = self.parser.dump(
            self.config, skip_none=False
        )  # skip_none=False: what Lightning saves
        logger.experiment.log_text(logger.run_id, text, self.config_filename)
