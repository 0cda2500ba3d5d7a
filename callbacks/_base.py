"""What the three audit callbacks share: scheduling, ranks, the MLflow run, faults, state.

A subclass implements three steps of one audit pass:

* ``_compute(trainer, model)``: on every rank, on that rank's share of the work,
  returns a picklable payload (CPU tensors);
* ``_merge(parts)``: joins the payloads of all ranks (rank order) into one result;
* ``_record(trainer, result, step)``: on global rank zero only, the
  :class:`audit.gate.tracking.Record` to log;

and optionally ``_decide(trainer, result)`` (a decision taken on the gathered
result, e.g. stopping; broadcast from rank zero).

Fault tolerance, the documented exception to "never swallow": an exception in
``_compute`` on any rank is turned into a status that every rank gathers before
anything depends on the results, so no rank waits forever; the pass is skipped
with one warning per kind of failure, and the next pass tries again. Logging
failures are spooled by :class:`audit.gate.tracking.EvidenceSink` and retried at the
next pass and at the end of fit. ``strict=True`` raises instead (on every rank).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn

from audit.engine.distributed import all_gather, block_rows, rows_of
from audit.engine.model import logits_problem, model_device, preserved
from audit.gate.tracking import (
    DEFAULT_EXPERIMENT,
    EvidenceSink,
    Record,
    RunTarget,
    active_run,
    client,
    metric_key,
    reachable,
    same_store,
    tracking_uri,
)
from audit.probes import ProbeSet

__all__ = [
    "AuditCallback",
    "AuditWarning",
    "DEFAULT_MAX_OVERHEAD",
    "load_probes",
    "check_outputs",
    "shard",
]

#: An audit pass that takes longer than this (seconds) is announced before it starts.
PROGRESS_AFTER_S = 2.0
#: Default share of the training's own wall time the audit callbacks of one Trainer may take together.
DEFAULT_MAX_OVERHEAD = 0.1
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
        # Importing `lightning` adds a console handler to its umbrella logger
        # ("lightning") unconditionally; `lightning.pytorch` and `lightning.fabric` log
        # through their own handler (root without handlers) or propagate to the root's
        # (root with handlers, e.g. Hydra's), so the umbrella one only prints every line
        # a second time ("INFO: ..."). When this import is what brought `lightning` in,
        # that handler is taken out again: a pytorch_lightning user under Hydra sees
        # each line once, and no message loses its only handler.
        fresh = "lightning" not in sys.modules
        umbrella = logging.getLogger("lightning")
        before = list(umbrella.handlers)
        try:
            from lightning.pytorch import Callback as LightningCallback
        except ImportError:  # a broken or partial install: the pytorch_lightning base suffices
            LightningCallback = None
        if fresh:
            for handler in [h for h in umbrella.handlers if h not in before]:
                umbrella.removeHandler(handler)
        if LightningCallback is not None and LightningCallback is not pl.Callback:
            bases.append(LightningCallback)
    return tuple(bases)


def load_probes(probes: ProbeSet | str | PathLike) -> ProbeSet:
    """A probe set given as a :class:`ProbeSet` or a probe folder path."""
    if isinstance(probes, ProbeSet):
        return probes
    return ProbeSet.load(probes)


def check_probes_arg(probes: object) -> None:
    if isinstance(probes, ProbeSet):
        return
    if isinstance(probes, (str, PathLike)):
        if not Path(probes).is_dir():
            raise ValueError(
                f"probes folder {str(probes)!r} does not exist; pass a ProbeSet or a folder in the "
                "probe folder format (classes.txt + manifest.csv, see docs/probes.md)"
            )
        return
    raise TypeError(f"probes must be a ProbeSet or a folder path; got {type(probes).__name__}")


def _positive_or_none(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None; got {value!r}")
    return value


def find_mlflow_logger(trainer: Any) -> Any | None:
    """The Trainer's first MLflow logger, or None.

    Duck-typed by class name along the logger's MRO, so the ``MLFlowLogger`` of
    ``pytorch_lightning.loggers`` and of ``lightning.pytorch.loggers`` count, and so
    do subclasses of either, without importing a package the user does not use.
    """
    for lg in getattr(trainer, "loggers", None) or []:
        named = any(cls.__name__ == "MLFlowLogger" for cls in type(lg).__mro__)
        if named and hasattr(lg, "run_id") and hasattr(lg, "experiment"):
            return lg
    return None


# Trainer -> the runs its callbacks without an MLflow logger log to, by where they are:
# ("active", run id) for the fluent API's active run, ("own", store, experiment) for an own run.
_RUNS: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], RunTarget]] = (
    weakref.WeakKeyDictionary()
)


def emit_warning(message: str) -> None:
    """Warn with ``message`` and no source line under it.

    ``warnings.warn`` prints the line of code it points at below the message (here a
    line inside Lightning's hook dispatch, which tells a user nothing); a warning
    attributed to the pseudo-file ``model-audit`` prints the message alone:
    ``model-audit:0: AuditWarning: ...``. Filters and ``pytest.warns`` see it as usual.
    """
    warnings.warn_explicit(
        message, AuditWarning, filename="model-audit", lineno=0, module="model-audit"
    )


class _Budget:
    """The time of one Trainer's audit callbacks against the training's own, shared by all of them.

    ``training_seconds`` is the wall time since training started minus the audit passes
    (validation counts as training). Each callback keeps its expected pass cost here,
    so every one can hold back the cost of every callback's final pass.
    """

    def __init__(self) -> None:
        self.start: float | None = None
        self.spent = 0.0  # passes, during training
        self.setup = 0.0  # the callbacks' work at fit start (checks, their MLflow run), before it
        self.by_callback: dict[str, float] = {}
        self.estimates: dict[int, float] = {}
        #: callbacks that the budget made skip their last chance: id -> (passes this fit, cost of a pass)
        self.waiting: dict[int, tuple[int, float]] = {}
        self.finals_done: set[int] = set()  # callbacks whose final pass has run
        self.members: dict[
            int, float
        ] = {}  # the callbacks that audit by this budget: id -> their max_overhead
        self.firsts: dict[int, float] = {}  # seconds of each member's first pass
        self.summarized = False
        self.floor_said = False

    def begin(self) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def add(self, who: str, seconds: float) -> None:
        self.spent += seconds
        self.by_callback[who] = self.by_callback.get(who, 0.0) + seconds

    def training_seconds(self) -> float:
        if self.start is None:
            return 0.0
        return max(0.0, time.perf_counter() - self.start - self.spent)

    @property
    def used(self) -> float:
        """Every second the callbacks took: their passes and their setup."""
        return self.spent + self.setup

    def limit(self) -> float | None:
        """The share the budget's callbacks allow (the largest of their ``max_overhead``); None: none audits by it."""
        return max(self.members.values()) if self.members else None

    def share(self) -> float:
        """Everything the callbacks took as a share of the training's own time."""
        t = self.training_seconds()
        return self.used / t if t > 0 else (0.0 if self.used == 0 else math.inf)


_BUDGETS: weakref.WeakKeyDictionary[Any, _Budget] = weakref.WeakKeyDictionary()


def _budget_of(trainer: Any) -> _Budget:
    budget = _BUDGETS.get(trainer)
    if budget is None:
        budget = _BUDGETS[trainer] = _Budget()
    return budget


class AuditCallback(*_callback_bases()):
    """Base of the audit callbacks (see the module docstring). Not used directly.

    When it audits. By default (no ``every_n_epochs``, no ``every_n_steps``) the audit
    callbacks of one Trainer share a time budget: together they may take
    ``max_overhead`` of the training's own wall time (0.1: training with them takes at
    most about 1.1 times as long). Each measures what its passes cost and, at the end of
    every epoch, audits only when the budget allows it, holding back what every
    callback's final pass will cost. The first epoch and the final weights are always
    audited (the final pass at the end of the last epoch, or at the end of training when
    it stops early); between them, as many epochs as the budget buys, in fair turns (see
    :meth:`_affordable`). A callback whose pass can stop early keeps its first and final
    passes within their share of the budget (:meth:`_pass_allowance`). Each callback says
    once when it skips epochs for the budget. With ``every_n_epochs`` or
    ``every_n_steps`` set it follows that fixed cadence instead and skips nothing. Either
    way the measured shares are logged: ``audit/overhead/<kind>`` with every pass (this
    callback's seconds over the training's), ``audit/overhead/total`` (all callbacks) at the
    end of fit, and a log line says when the first and final audits alone went over
    ``max_overhead``. Those always happen, so they are the floor: a training shorter than
    about their cost over ``max_overhead`` cannot keep the budget, and a line says so
    after the first passes (:meth:`_say_floor`).

    Where it logs: the Trainer's ``MLFlowLogger`` run; without one, the MLflow fluent
    API's active run of the process (``mlflow.start_run()``, ``mlflow.pytorch.autolog()``),
    which it never ends (in a process ``ddp_spawn`` started: the launching process's,
    carried along when the callback is pickled); without that, a run of its own (``tracking_uri``,
    ``experiment_name``), ended at the end of fit. An active run in another store than
    an explicit ``tracking_uri`` is left alone: the callbacks keep their own run where
    they were told to, and say so.

    Args:
        every_n_epochs: a fixed cadence: audit at the end of every N-th training epoch
            (None: by budget, or only by step when ``every_n_steps`` is set).
        every_n_steps: a fixed cadence: audit every N optimizer steps (None: never by
            step). With it set, the MLflow step of every series is the global step;
            otherwise it is the epoch.
        max_overhead: share of training wall time the audit callbacks of the Trainer may
            take together when no fixed cadence is set (each callback decides by its own
            value against what all of them took); None: no budget, audit every epoch.
        module: attribute path of the network inside the LightningModule to audit
            (e.g. ``"net"``); None audits the LightningModule's own ``forward``.
        tracking_uri: MLflow tracking URI of the callback's own run, used only when the
            Trainer has no ``MLFlowLogger`` and no MLflow run is active in this store;
            default :func:`audit.gate.tracking.tracking_uri`. None joins an active run in any
            store; a URI joins it only when it names the run's store.
        experiment_name: experiment of that own run (an active run keeps its own).
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
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        max_overhead: float | None = DEFAULT_MAX_OVERHEAD,
        module: str | None = None,
        tracking_uri: str | None = None,
        experiment_name: str = DEFAULT_EXPERIMENT,
        spool_dir: str | PathLike | None = None,
        strict: bool = False,
        log_in_background: bool = False,
    ) -> None:
        self.every_n_epochs = _positive_or_none("every_n_epochs", every_n_epochs)
        self.every_n_steps = _positive_or_none("every_n_steps", every_n_steps)
        if max_overhead is not None and (
            isinstance(max_overhead, bool)
            or not isinstance(max_overhead, (int, float))
            or not 0 < float(max_overhead) < math.inf
        ):
            raise ValueError(
                f"max_overhead is a share of training time > 0 (e.g. 0.1) or None (no budget); got {max_overhead!r}"
            )
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be an attribute path like 'net' or None; got {module!r}")
        self.max_overhead = None if max_overhead is None else float(max_overhead)
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
        #: (process id, run id, tracking URI) of the MLflow run active where this callback was pickled
        self._launcher_run: tuple[int, str, str] | None = None
        self._last_seconds: float | None = None
        self._rank_zero = True
        self._budget: _Budget = _Budget()
        self._fit_passes = 0  # passes in this fit (the first one is never skipped)
        self._audited_at: int | None = None  # the global step of the weights last audited
        self._skipped: list[int] = []
        self._seen_epoch: int | None = None
        self._final_pass = False  # the pass under way audits the final weights
        #: seconds the pass under way may take (inf: no limit); see _pass_allowance
        self._allowance = math.inf
        self._done_units: int | None = None  # units the pass under way did, when fewer than planned
        #: seconds each audit pass took on the training thread, and its step (not saved in checkpoints)
        self.pass_seconds: list[float] = []
        self.pass_steps: list[int] = []
        self._pass_units: list[int] = []
        self._pass_compute: list[float] = []  # seconds of each pass's _compute

    @property
    def budget_seconds(self) -> float:
        """Seconds the audit callbacks of this callback's Trainer took so far: every pass and their setup."""
        return self._budget.used

    @property
    def budgeted(self) -> bool:
        """True when the callback audits by budget (no fixed cadence set)."""
        return self.every_n_epochs is None and self.every_n_steps is None

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

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._seen_epoch = int(trainer.current_epoch)
        if self.every_n_steps is None or self._should_skip(trainer):
            return
        step = int(trainer.global_step)
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._audit(trainer, pl_module, step, final=self._is_final(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._should_skip(trainer):
            return
        epoch = int(trainer.current_epoch)
        step = int(trainer.global_step) if self._uses_steps() else epoch
        if step == self._last_step:
            return
        final = self._is_final(trainer)
        if self.budgeted:
            go = self._fit_passes == 0 or final or self._affordable(trainer)
            if trainer.world_size > 1:  # every rank must take the same decision (a pass gathers)
                go = bool(trainer.strategy.broadcast(go, src=0))
            if go:
                self._audit(trainer, pl_module, step, final=final)
            else:
                self._skip(trainer, epoch)
        elif self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0:
            self._audit(trainer, pl_module, step, final=final)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """By budget: audit the final weights when no epoch-end pass saw them.

        That happens when something stopped training after this callback's epoch-end
        hook (e.g. ``EarlyStopping`` checking at the epoch's end, or ``max_time``).
        The step is the last epoch that trained.
        """
        if not self.budgeted or self._should_skip(trainer) or self._seen_epoch is None:
            return
        if self._audited_at == int(trainer.global_step) or self._seen_epoch == self._last_step:
            return
        self._audit(trainer, pl_module, self._seen_epoch, final=True)

    def _is_final(self, trainer: Any) -> bool:
        """At an epoch's end: will training stop now? (max_epochs or max_steps reached, or a stop asked for)."""
        if bool(getattr(trainer, "should_stop", False)):
            return True
        max_epochs = getattr(trainer, "max_epochs", None)
        if (
            max_epochs is not None
            and max_epochs >= 0
            and int(trainer.current_epoch) + 1 >= max_epochs
        ):
            return True
        max_steps = getattr(trainer, "max_steps", -1)
        return max_steps is not None and max_steps >= 0 and int(trainer.global_step) >= max_steps

    def _units(self, final: bool) -> int:
        """The work of a pass in units its cost grows with (a subclass: e.g. the probes it explains)."""
        return 1

    def _estimate(self, final: bool = False) -> float | None:
        """Expected seconds of a pass (the final one with ``final``), from the last three.

        The computing part grows with the pass's units (probes explained); the rest
        (gathering, rendering, logging) is taken as fixed.
        """
        recent = list(zip(self.pass_seconds, self._pass_compute, self._pass_units, strict=True))[
            -3:
        ]
        if not recent:
            return None
        rate = sum(c for _, c, _ in recent) / max(1, sum(u for _, _, u in recent))
        fixed = sum(max(0.0, sec - c) for sec, c, _ in recent) / len(recent)
        return rate * self._units(final) + fixed

    def _affordable(self, trainer: Any) -> bool:
        """Does a pass now keep every callback's share within ``max_overhead``, final passes included?

        Turns are fair: a callback that the budget made wait, with no more passes than
        this one, goes first. Its pass is counted as spent before this one's, so a cheap
        callback cannot take every epoch's spare seconds from a dearer one (without
        that, the attribution callback audited only its first and final epochs while
        the cheap ones audited nearly all). A waiting pass that can never fit is not
        held back for.
        """
        if self.max_overhead is None:
            return True
        cost = self._estimate()
        if cost is None:
            return True
        b = self._budget
        now = self.max_overhead * b.training_seconds()
        at_end = math.inf  # the budget of the whole training, projected from its share done
        total, done = trainer.estimated_stepping_batches, int(trainer.global_step)
        if done > 0 and math.isfinite(float(total)) and total > done:
            at_end = self.max_overhead * b.training_seconds() * float(total) / done
        finals = sum(b.estimates.values())  # every callback's final pass, held back
        first = sum(
            c
            for who, (passes, c) in b.waiting.items()
            if who != id(self) and passes <= self._fit_passes and b.used + c + finals <= at_end
        )
        go = b.used + first + cost <= now and b.used + first + cost + finals <= at_end
        if go:
            b.waiting.pop(id(self), None)
        else:
            b.waiting[id(self)] = (self._fit_passes, cost)
        return go

    def _pass_allowance(self, trainer: Any, final: bool) -> float:
        """Seconds a pass that always happens (the first, the final) may take; inf: no limit.

        By budget only, and on one process (under DDP every rank would have to stop at
        the same probe). The budget of the whole training is projected from the share
        of its steps done. The first pass may take a third of it; the final pass what is
        left once the other callbacks' final passes are held back. A callback whose pass
        can stop early (the attribution callback explains its probes a few at a time)
        stops there; the others ignore it.
        """
        if not self.budgeted or self.max_overhead is None or trainer.world_size > 1:
            return math.inf
        if not final and self._fit_passes > 0:
            return math.inf  # a pass between runs only when the budget affords it whole
        b = self._budget
        total, done = trainer.estimated_stepping_batches, int(trainer.global_step)
        if done <= 0 or not math.isfinite(float(total)) or b.start is None:
            return math.inf
        whole = self.max_overhead * b.training_seconds() * max(1.0, float(total) / done)
        if not final:
            return whole / 3
        others = sum(v for k, v in b.estimates.items() if k != id(self) and k not in b.finals_done)
        return max(0.0, whole - b.used - others)

    def _skip(self, trainer: Any, epoch: int) -> None:
        self._skipped.append(epoch)
        if len(self._skipped) == 1 and trainer.is_global_zero:
            b = self._budget
            rank_zero_info(
                f"{type(self).__name__}: epoch {epoch} not audited, to keep the audit callbacks within "
                f"max_overhead={self.max_overhead:g} of training time (they have taken {b.used:.1f} s of "
                f"{b.training_seconds():.0f} s; a pass of this callback costs about {self._estimate():.1f} s). "
                "It audits as often as the budget allows, and always the final weights; set every_n_epochs "
                "for a fixed cadence instead."
            )

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._rank_zero = bool(trainer.is_global_zero)
        if stage != "fit":
            return
        self._setup(trainer, pl_module)

    def _setup(self, trainer: Any, pl_module: Any) -> None:
        """Subclass checks of the environment (probes, names); raise with the fix named."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        t0 = time.perf_counter()
        self._budget = _budget_of(trainer)
        if self.budgeted and self.max_overhead is not None:
            self._budget.members[id(self)] = self.max_overhead
        try:
            self._fit_start(trainer, pl_module)
        finally:  # the checks and the run's creation are part of what the callbacks cost
            self._budget.setup += time.perf_counter() - t0

    def _fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._check_model(self._model(pl_module))
        self._fit_passes, self._skipped, self._seen_epoch, self._audited_at = 0, [], None, None
        if not trainer.is_global_zero or self._should_skip(trainer):
            return
        logger = find_mlflow_logger(trainer)
        self._target = (
            RunTarget.of_logger(logger) if logger is not None else self._run_without_logger(trainer)
        )
        self._sink = EvidenceSink(self._target, self.spool_dir, background=self.log_in_background)
        tags = self._tags()
        if tags:
            self._sink.submit(Record(step=0, tags=tags))

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``ddp_spawn`` sends the callbacks to the processes it starts): the active
        MLflow run goes along, so rank zero in a spawned process logs to the run that the
        launching process has active, as it would without the spawn."""
        state = dict(self.__dict__)
        active = active_run()
        state["_launcher_run"] = (os.getpid(), *active) if active is not None else None
        return state

    def _active_run(self) -> tuple[str, str] | None:
        """This process's active MLflow run, else the one its launching process had (when spawned
        by it, and that run is still running: a callback unpickled long after is not sent to an
        ended run)."""
        active = active_run()
        if active is not None or self._launcher_run is None or self._launcher_run[0] == os.getpid():
            return active
        _, run_id, uri = self._launcher_run
        if not reachable(
            uri
        ):  # a server that went away costs its health check, not MLflow's retries
            return None
        try:
            running = client(uri).get_run(run_id).info.status == "RUNNING"
        except Exception:  # noqa: BLE001 - a run we cannot see is not joined; the own run is the fallback
            running = False
        return (run_id, uri) if running else None

    def _run_without_logger(self, trainer: Any) -> RunTarget:
        """The run of a Trainer without an ``MLFlowLogger``: the active MLflow run, else an own run.

        The active run (``mlflow.start_run()``, ``mlflow.pytorch.autolog()``) is joined
        unless ``tracking_uri`` names another store: then the callbacks keep their own run
        in the store they were given. The callbacks of one Trainer that agree on where
        to log share one target; each new one is said once.
        """
        runs = _RUNS.setdefault(trainer, {})
        active = self._active_run()
        elsewhere = ""
        if active is not None:
            run_id, uri = active
            if self.tracking_uri is None or same_store(self.tracking_uri, uri):
                key: tuple[str, ...] = ("active", run_id)
                if key not in runs:
                    runs[key] = RunTarget(uri, run_id, client(uri))
                    rank_zero_info(
                        f"model-audit: the Trainer has no MLFlowLogger; the audit callbacks log to the "
                        f"active MLflow run {run_id} at {uri}"
                    )
                return runs[key]
            elsewhere = f" and the active MLflow run {run_id} is at {uri}, not at the callbacks' tracking_uri"
        uri = tracking_uri(self.tracking_uri)
        key = ("own", uri, self.experiment_name)
        if key not in runs:
            runs[key] = RunTarget(
                uri, self._restored_run_id, None, experiment_name=self.experiment_name
            )
            rank_zero_info(
                f"model-audit: the Trainer has no MLFlowLogger{elsewhere}; the audit callbacks log to their "
                f"own MLflow run in experiment '{self.experiment_name}' at {uri}"
                + (f" (resuming run {self._restored_run_id})" if self._restored_run_id else "")
                + (". Pass tracking_uri=None to log to the active run instead" if elsewhere else "")
            )
        return runs[key]

    def _tags(self) -> dict[str, str]:
        return {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._budget.begin()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close(trainer, "FINISHED")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close(trainer, "FAILED")

    def _close(self, trainer: Any, status: str) -> None:
        sink, self._sink = self._sink, None
        if sink is None:
            return
        self._summarize_overhead(sink)
        ok = sink.close()
        self._report(sink)
        if not ok:
            self._warn(
                "spool-left",
                f"{type(self).__name__}: {sink.pending()} audit record(s) could not be sent to MLflow "
                f"({sink.target.describe()}); they are kept in {sink.spool_dir}. Send them later with "
                f"audit.gate.tracking.replay_spool({str(sink.spool_dir)!r}).",
            )
        if (
            self._target is not None
            and self._target.own
            and self._target in _RUNS.get(trainer, {}).values()
        ):
            try:
                self._target.finish(status)
            except Exception as err:  # noqa: BLE001 - the documented fault-tolerance path
                self._warn(
                    "finish", f"{type(self).__name__}: could not end the own MLflow run: {err}"
                )

    def _summarize_overhead(self, sink: EvidenceSink) -> None:
        """Once per Trainer (by the first callback to close): log ``audit/overhead/total``, warn when over budget."""
        b = self._budget
        if b.summarized or b.start is None or not self.pass_seconds:
            return
        b.summarized = True
        share, trained = b.share(), b.training_seconds()
        sink.submit(Record(step=self._last_step or 0, metrics={"audit/overhead/total": share}))
        limit = b.limit()  # any callback of the Trainer may close first, one on a fixed cadence too
        if limit is not None and share > limit * 1.05 and self._rank_zero:
            parts = ", ".join(f"{who} {sec:.1f} s" for who, sec in sorted(b.by_callback.items()))
            parts += f", setup {b.setup:.1f} s"
            # said, not warned: nothing is wrong with the model or the training, and the
            # share is in the run as audit/overhead/total
            rank_zero_info(
                f"model-audit: the audit callbacks took {share:.0%} of the training's {trained:.0f} s ({parts}), "
                f"above max_overhead={limit:g}: their setup and their first and final passes alone "
                "cost more than the budget allows for a training this short. Make a pass cheaper (fewer probes "
                "or methods), "
                + (
                    "give the Trainer an MLFlowLogger (without one, the setup creates the callbacks' own run, "
                    "and the first MLflow call of a process opens the store), "
                    if self._target is not None and self._target.own
                    else ""
                )
                + "or raise max_overhead."
            )

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

    def _audit(self, trainer: Any, pl_module: Any, step: int, *, final: bool = False) -> None:
        """One pass at ``step``; ``final``: training stops after it (a subclass may do more then)."""
        self._final_pass = final
        what = "step" if self._uses_steps() else "epoch"
        t0 = time.perf_counter()
        zero = trainer.is_global_zero
        self._allowance, self._done_units = self._pass_allowance(trainer, final), None
        if zero and (self._last_seconds is None or self._last_seconds > PROGRESS_AFTER_S):
            rank_zero_info(
                f"{type(self).__name__}: auditing {what} {step} ({self._describe_pass()}) ..."
            )
        status, payload = None, None
        t_compute = time.perf_counter()
        try:
            payload = self._compute(trainer, self._model(pl_module))
        except Exception as err:  # noqa: BLE001 - gathered below, so every rank knows
            status = f"{type(err).__name__}: {err}"
            if self.strict and trainer.world_size == 1:
                raise
        t_compute = time.perf_counter() - t_compute
        parts = all_gather((status, payload), int(trainer.world_size))
        failed = [(rank, s) for rank, (s, _) in enumerate(parts) if s is not None]
        result = None
        if failed:
            rank, msg = failed[0]
            text = (
                f"{type(self).__name__}: the audit at {what} {step} failed on rank {rank} ({msg})"
            )
            if self.strict:
                raise RuntimeError(text)
            self._warn(
                f"compute:{msg.split(':')[0]}",
                text + "; skipped, retried at the next one; training continues",
            )
        else:
            result = self._merge([p for _, p in parts])
        self._decide(trainer, result, step)
        name = type(self).__name__
        if zero and result is not None and self._sink is not None:
            try:
                record = self._record(trainer, result, step)
                if (
                    self._budget.start is not None
                ):  # this callback's share so far, this pass included
                    so_far = time.perf_counter() - t0
                    own = self._budget.by_callback.get(name, 0.0) + so_far
                    trained = max(1e-9, self._budget.training_seconds() - so_far)
                    record.metrics[metric_key("audit", "overhead", self.kind)] = own / trained
                self._sink.submit(record)
            except Exception as err:  # noqa: BLE001 - the documented fault-tolerance path
                if self.strict:
                    raise
                self._warn(
                    f"record:{type(err).__name__}", f"{name}: logging {what} {step} failed: {err}"
                )
        if zero and self._sink is not None:
            self._report(self._sink)
        self._passes += 1
        self._fit_passes += 1
        self._last_step = step
        self._audited_at = int(trainer.global_step)
        self._last_seconds = time.perf_counter() - t0
        self.pass_seconds.append(self._last_seconds)
        self.pass_steps.append(step)
        self._pass_units.append(
            self._units(final) if self._done_units is None else self._done_units
        )
        self._pass_compute.append(min(t_compute, self._last_seconds))
        self._budget.add(name, self._last_seconds)
        self._budget.estimates[id(self)] = (
            self._estimate(final=True) or 0.0
        )  # what its final pass will cost
        if final:
            self._budget.finals_done.add(id(self))
        if zero:
            share = (
                f", audit callbacks {self._budget.share():.0%} of training so far"
                if self._budget.start
                else ""
            )
            part = (
                f" ({self._done_units} of {self._units(final)} probes: the budget's share for this pass)"
                if self._done_units is not None and self._done_units < self._units(final)
                else ""
            )
            rank_zero_info(
                f"{name}: {what} {step} audited in {self._last_seconds:.1f} s{part}{share}"
            )
        if self._fit_passes == 1:
            self._budget.firsts[id(self)] = self._last_seconds
            if zero and not final:
                self._say_floor(trainer)

    def _say_floor(self, trainer: Any) -> None:
        """Once every budgeted callback made its first pass: say early when the budget cannot hold.

        The floor is what always happens: the setup, every first pass, and every final pass
        at about the cost of its first (the cheapest the final pass gets: the attribution
        callback cuts both to its budget, the others cannot shrink). Against it, the budget
        of the whole training projected from the steps done.
        """
        b = self._budget
        limit = b.limit()
        if b.floor_said or limit is None or not set(b.members).issubset(b.firsts):
            return
        total, done = trainer.estimated_stepping_batches, int(trainer.global_step)
        if b.start is None or done <= 0 or not math.isfinite(float(total)):
            return
        b.floor_said = True
        trained = b.training_seconds() * max(1.0, float(total) / done)
        finals = sum(
            min(b.firsts[k], b.estimates.get(k, math.inf))
            for k in b.members
            if k not in b.finals_done
        )
        floor = b.used + finals
        if floor <= limit * trained:
            return
        rank_zero_info(
            f"model-audit: this training is too short for max_overhead={limit:g}: the audit callbacks' "
            f"setup and first passes took {b.used:.1f} s and their final passes will take about {finals:.1f} s, "
            f"against a budget of {limit * trained:.1f} s for the whole training (about {trained:.0f} s, "
            f"projected from the steps done). Expect them to take about {floor / trained:.0%} of it "
            "(audit/overhead/total at the end), with no pass between the first and the final. Train longer, "
            "make a pass cheaper (fewer probes or methods), or raise max_overhead."
        )

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
        emit_warning(message)

    def _report(self, sink: EvidenceSink) -> None:
        for problem in sink.problems():
            kind = "mlflow" if "MLflow" in problem else "render"
            self._warn(
                f"sink:{kind}",
                f"{type(self).__name__}: {problem}. Warning once; the records wait in the spool and are "
                "re-sent at the next audit and at the end of fit; training continues.",
            )


def check_outputs(model: nn.Module, probes: ProbeSet, who: str) -> None:
    """The model must output one logit per probe class (one forward of one probe, state restored)."""
    with preserved(model, grad=False):
        out = model(probes.images[:1].to(model_device(model)))
    problem = logits_problem(out, probes.class_names)
    if problem:
        raise ValueError(
            f"{who}: {problem} (or pass module=... naming the network inside the LightningModule "
            "if its forward returns something else)"
        )


def shard(n: int, trainer: Any) -> list[int]:
    """This rank's rows of ``range(n)``: every ``world_size``-th row from ``global_rank`` (the engine's
    sharding, :func:`audit.engine.distributed.block_rows`, with blocks of one row)."""
    world = max(1, int(trainer.world_size))
    return rows_of(block_rows(n, 1, int(trainer.global_rank), world)).tolist()
