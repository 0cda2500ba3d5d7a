"""What the three audit callbacks share: scheduling, ranks, the MLflow run, faults, state.

A subclass implements three steps of one audit pass:

* ``_compute(trainer, model)``: on every rank, on that rank's share of the work,
  returns a picklable payload (CPU tensors);
* ``_merge(parts)``: joins the payloads of all ranks (rank order) into one result;
* ``_record(trainer, result, step)``: on global rank zero only, the
  :class:`audit.tracking.Record` to log;

and optionally ``_decide(trainer, result)`` (a decision taken on the gathered
result, e.g. stopping; broadcast from rank zero).

Fault tolerance, the documented exception to "never swallow": an exception in
``_compute`` on any rank is turned into a status that every rank gathers before
anything depends on the results, so no rank waits forever; the pass is skipped
with one warning per kind of failure, and the next pass tries again. Logging
failures are spooled by :class:`audit.tracking.EvidenceSink` and retried at the
next pass and at the end of fit. ``strict=True`` raises instead (on every rank).
"""

from __future__ import annotations

import importlib.util
import time
import warnings
import weakref
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn

from audit._model import model_device, preserved
from audit.probes import ProbeSet
from audit.tracking import DEFAULT_EXPERIMENT, EvidenceSink, Record, RunTarget, tracking_uri

__all__ = ["AuditCallback", "AuditWarning", "load_probes", "check_outputs", "shard"]

#: An audit pass that takes longer than this (seconds) is announced in the log.
PROGRESS_AFTER_S = 2.0
_STATE_VERSION = 1


class AuditWarning(UserWarning):
    """A training-time audit problem that does not stop training (or a spurious-feature alarm)."""


def _callback_bases() -> tuple[type, ...]:
    """``pytorch_lightning.Callback``, plus ``lightning.pytorch.Callback`` when that package is installed.

    Inheriting from both makes the callbacks pass the ``isinstance`` check of either
    package's ``Trainer``; the hooks only use what both Trainers share.
    """
    bases: list[type] = [pl.Callback]
    if importlib.util.find_spec("lightning") is not None:
        try:
            from lightning.pytorch import Callback as LightningCallback
        except ImportError:  # a broken or partial install: the pytorch_lightning base suffices
            LightningCallback = None
        if LightningCallback is not None and LightningCallback is not pl.Callback:
            bases.append(LightningCallback)
    return tuple(bases)


def load_probes(probes: ProbeSet | str | PathLike) -> ProbeSet:
    """A probe set given as a :class:`ProbeSet` or a probe folder path."""
    if isinstance(probes, ProbeSet):
        return probes
    return ProbeSet.load(probes)


def _check_probes_arg(probes: object) -> None:
    if isinstance(probes, ProbeSet):
        return
    if isinstance(probes, (str, PathLike)):
        if not Path(probes).is_dir():
            raise ValueError(
                f"probes folder {str(probes)!r} does not exist; pass a ProbeSet or a folder in the "
                "probe folder format (classes.txt + manifest.csv, see DESIGN.md)"
            )
        return
    raise TypeError(f"probes must be a ProbeSet or a folder path; got {type(probes).__name__}")


def _positive_or_none(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None; got {value!r}")
    return value


def _find_mlflow_logger(trainer: Any) -> Any | None:
    """The Trainer's MLflow logger (duck-typed, so both Lightning packages' loggers count)."""
    for lg in getattr(trainer, "loggers", None) or []:
        if type(lg).__name__ == "MLFlowLogger" and hasattr(lg, "run_id") and hasattr(lg, "experiment"):
            return lg
    return None


# Trainer -> the run that callbacks without an MLflow logger share (one per Trainer).
_OWN_RUNS: weakref.WeakKeyDictionary[Any, RunTarget] = weakref.WeakKeyDictionary()


class AuditCallback(*_callback_bases()):
    """Base of the audit callbacks (see the module docstring). Not used directly.

    Args:
        every_n_epochs: audit at the end of every N-th training epoch (None: never by epoch).
        every_n_steps: also audit every N optimizer steps (None: never by step). With
            it set, the MLflow step of every series is the global step; otherwise
            it is the epoch.
        module: attribute path of the network inside the LightningModule to audit
            (e.g. ``"net"``); None audits the LightningModule's own ``forward``.
        tracking_uri: MLflow tracking URI of the callback's own run, used only when the
            Trainer has no ``MLFlowLogger``; default :func:`audit.tracking.tracking_uri`.
        experiment_name: experiment of that own run.
        spool_dir: where records that could not be sent wait for a retry; default a
            temporary folder, created only when needed.
        strict: raise on audit failures instead of warning (tests, debugging).
        log_in_background: render and send from a background thread, so training goes
            on meanwhile. Off by default: on a machine whose cores the training already
            uses (2 here), the thread competes with the training's OpenMP threads and
            measured slower than logging on the training thread (~0.6 s per epoch).
    """

    #: short name in tags, state keys and messages; set by subclasses
    kind = "audit"

    def __init__(
        self,
        *,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        module: str | None = None,
        tracking_uri: str | None = None,
        experiment_name: str = DEFAULT_EXPERIMENT,
        spool_dir: str | PathLike | None = None,
        strict: bool = False,
        log_in_background: bool = False,
    ) -> None:
        self.every_n_epochs = _positive_or_none("every_n_epochs", every_n_epochs)
        self.every_n_steps = _positive_or_none("every_n_steps", every_n_steps)
        if self.every_n_epochs is None and self.every_n_steps is None:
            raise ValueError("set every_n_epochs or every_n_steps (or both); both are None")
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be an attribute path like 'net' or None; got {module!r}")
        self.module = module
        self.tracking_uri = tracking_uri
        self.experiment_name = str(experiment_name)
        self.spool_dir = spool_dir
        self.strict = bool(strict)
        self.log_in_background = bool(log_in_background)
        self._sink: EvidenceSink | None = None
        self._target: RunTarget | None = None
        self._warned: set[str] = set()
        self._passes = 0
        self._last_step: int | None = None
        self._restored_run_id: str | None = None
        self._last_seconds: float | None = None
        self._rank_zero = True
        #: seconds each audit pass took on the training thread (not saved in checkpoints)
        self.pass_seconds: list[float] = []

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._state_key_fields())

    def _state_key_fields(self) -> dict[str, Any]:
        return {"every_n_epochs": self.every_n_epochs, "every_n_steps": self.every_n_steps}

    # ------------------------------------------------------------------ scheduling
    def _should_skip(self, trainer: Any) -> bool:
        """Skip sanity checking, ``fast_dev_run`` and anything that is not ``fit``."""
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return bool(
            trainer.sanity_checking
            or getattr(trainer, "fast_dev_run", False)
            or str(getattr(fn, "value", fn)) != "fit"
        )

    def _uses_steps(self) -> bool:
        return self.every_n_steps is not None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps is None or self._should_skip(trainer):
            return
        step = int(trainer.global_step)
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._audit(trainer, pl_module, step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.every_n_epochs is None or self._should_skip(trainer):
            return
        epoch = int(trainer.current_epoch)
        if (epoch + 1) % self.every_n_epochs != 0:
            return
        step = int(trainer.global_step) if self._uses_steps() else epoch
        if step != self._last_step:
            self._audit(trainer, pl_module, step)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._rank_zero = bool(trainer.is_global_zero)
        if stage != "fit":
            return
        self._setup(trainer, pl_module)

    def _setup(self, trainer: Any, pl_module: Any) -> None:
        """Subclass checks of the environment (probes, names); raise with the fix named."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._check_model(self._model(pl_module))
        if not trainer.is_global_zero or self._should_skip(trainer):
            return
        logger = _find_mlflow_logger(trainer)
        if logger is not None:
            self._target = RunTarget.of_logger(logger)
        else:
            target = _OWN_RUNS.get(trainer)
            if target is None:
                uri = tracking_uri(self.tracking_uri)
                target = RunTarget(uri, self._restored_run_id, None, experiment_name=self.experiment_name)
                _OWN_RUNS[trainer] = target
                rank_zero_info(
                    f"model-audit: the Trainer has no MLFlowLogger; the audit callbacks log to their "
                    f"own MLflow run in experiment '{self.experiment_name}' at {uri}"
                    + (f" (resuming run {self._restored_run_id})" if self._restored_run_id else "")
                )
            self._target = target
        self._sink = EvidenceSink(self._target, self.spool_dir, background=self.log_in_background)
        tags = self._tags()
        if tags:
            self._sink.submit(Record(step=0, tags=tags))

    def _tags(self) -> dict[str, str]:
        return {}

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close(trainer, "FINISHED")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close(trainer, "FAILED")

    def _close(self, trainer: Any, status: str) -> None:
        sink, self._sink = self._sink, None
        if sink is None:
            return
        ok = sink.close()
        self._report(sink)
        if not ok:
            self._warn(
                "spool-left",
                f"{type(self).__name__}: {sink.pending()} audit record(s) could not be sent to MLflow "
                f"({sink.target.describe()}); they are kept in {sink.spool_dir}. Send them later with "
                f"audit.tracking.replay_spool({str(sink.spool_dir)!r}).",
            )
        if self._target is not None and self._target.own and _OWN_RUNS.get(trainer) is self._target:
            try:
                self._target.finish(status)
            except Exception as err:  # noqa: BLE001 - the documented fault-tolerance path
                self._warn("finish", f"{type(self).__name__}: could not end the own MLflow run: {err}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self._sink is not None:
            self._sink.wait()  # an own run is created by the worker: wait for its id
        run_id = self._target.run_id if self._target is not None and self._target.own else None
        return {
            "version": _STATE_VERSION,
            "passes": self._passes,
            "last_step": self._last_step,
            "own_run_id": run_id or self._restored_run_id,
            "warned": sorted(self._warned),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._passes = int(state_dict.get("passes", 0))
        self._last_step = state_dict.get("last_step")
        self._restored_run_id = state_dict.get("own_run_id")
        self._warned = set(state_dict.get("warned", ()))

    # ------------------------------------------------------------------ one pass
    def _model(self, pl_module: Any) -> nn.Module:
        return pl_module if self.module is None else pl_module.get_submodule(self.module)

    def _check_model(self, model: nn.Module) -> None:
        """Subclass checks that need the model on its device (e.g. its number of outputs)."""

    def _describe_pass(self) -> str:
        return self.kind

    def _audit(self, trainer: Any, pl_module: Any, step: int) -> None:
        what = "step" if self._uses_steps() else "epoch"
        t0 = time.perf_counter()
        zero = trainer.is_global_zero
        if zero and (self._last_seconds is None or self._last_seconds > PROGRESS_AFTER_S):
            rank_zero_info(f"{type(self).__name__}: auditing {what} {step} ({self._describe_pass()}) ...")
        status, payload = None, None
        try:
            payload = self._compute(trainer, self._model(pl_module))
        except Exception as err:  # noqa: BLE001 - gathered below, so every rank knows
            status = f"{type(err).__name__}: {err}"
            if self.strict and trainer.world_size == 1:
                raise
        parts = _gather(trainer, (status, payload))
        failed = [(rank, s) for rank, (s, _) in enumerate(parts) if s is not None]
        result = None
        if failed:
            rank, msg = failed[0]
            text = f"{type(self).__name__}: the audit at {what} {step} failed on rank {rank} ({msg})"
            if self.strict:
                raise RuntimeError(text)
            self._warn(f"compute:{msg.split(':')[0]}", text + "; skipped, retried at the next one; training continues")
        else:
            result = self._merge([p for _, p in parts])
        self._decide(trainer, result, step)
        if zero and result is not None and self._sink is not None:
            try:
                record = self._record(trainer, result, step)
                self._sink.submit(record)
            except Exception as err:  # noqa: BLE001 - the documented fault-tolerance path
                if self.strict:
                    raise
                self._warn(f"record:{type(err).__name__}", f"{type(self).__name__}: logging {what} {step} failed: {err}")
        if zero and self._sink is not None:
            self._report(self._sink)
        self._passes += 1
        self._last_step = step
        self._last_seconds = time.perf_counter() - t0
        self.pass_seconds.append(self._last_seconds)
        if zero and self._last_seconds > PROGRESS_AFTER_S:
            rank_zero_info(f"{type(self).__name__}: {what} {step} audited in {self._last_seconds:.1f} s")

    def _compute(self, trainer: Any, model: nn.Module) -> Any:
        raise NotImplementedError

    def _merge(self, parts: Sequence[Any]) -> Any:
        raise NotImplementedError

    def _record(self, trainer: Any, result: Any, step: int) -> Record:
        raise NotImplementedError

    def _decide(self, trainer: Any, result: Any, step: int) -> None:
        """A decision on the gathered result (every rank calls it with the same result)."""

    # ------------------------------------------------------------------ reporting
    def _warn(self, key: str, message: str) -> None:
        """Warn once per ``key`` (global rank zero decides by calling it there only)."""
        if key in self._warned or not self._rank_zero:
            return
        self._warned.add(key)
        warnings.warn(message, AuditWarning, stacklevel=3)

    def _report(self, sink: EvidenceSink) -> None:
        for problem in sink.problems():
            kind = "mlflow" if "MLflow" in problem else "render"
            self._warn(
                f"sink:{kind}",
                f"{type(self).__name__}: {problem}. Warning once; the records wait in the spool and are "
                "re-sent at the next audit and at the end of fit; training continues.",
            )


def _gather(trainer: Any, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (one collective; every rank must call it)."""
    if trainer.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def check_outputs(model: nn.Module, probes: ProbeSet, who: str) -> None:
    """The model must output one logit per probe class (one forward of one probe, state restored)."""
    with preserved(model, grad=False):
        out = model(probes.images[:1].to(model_device(model)))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{who}: the model must return logits [N, classes]; got {got}. Pass module=... naming "
            "the network inside the LightningModule if its forward returns something else"
        )
    if out.shape[1] != len(probes.class_names):
        raise ValueError(
            f"{who}: the probe set has {len(probes.class_names)} classes {probes.class_names} but the "
            f"model outputs {out.shape[1]} logits; use probes whose classes.txt lists the model's "
            "outputs in order"
        )


def shard(n: int, trainer: Any) -> list[int]:
    """This rank's rows of ``range(n)``: every ``world_size``-th row from ``global_rank``."""
    return list(range(int(trainer.global_rank), n, max(1, int(trainer.world_size))))
