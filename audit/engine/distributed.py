"""The audit job over several processes (``engine.devices``, ``engine.num_nodes``), on Lightning Fabric.

``model-audit engine.devices=N engine.strategy=ddp`` audits one candidate with N
processes per node. Lightning does the process work: :func:`launch` builds a
:class:`lightning.fabric.Fabric` with the DDP strategy and calls ``fabric.launch()``,
which on one machine re-runs the same command line N - 1 times (Lightning's subprocess
launcher; under Hydra it adds ``hydra.run.dir="<this run's dir>"`` so every rank shares
the run folder that ``conf/audit.yaml`` names with a timestamp, ``hydra.output_subdir=null``
so only rank zero writes ``.hydra/``, and ``hydra.job.name=train_ddp_process_<r>``), and
under ``torchrun`` (:class:`~lightning.fabric.plugins.environments.TorchElasticEnvironment`)
or ``srun`` (:class:`~lightning.fabric.plugins.environments.SLURMEnvironment`) takes the
ranks from the environment and launches nothing. The backend is gloo on CPU, NCCL on
CUDA. One process (``devices=1``, ``num_nodes=1``) creates no Fabric and no process group.

**What is sharded.** The per-probe work whose cost grows with the probe count: the
predictions over every probe, and the attribution evidence (maps, mask shares, MoRF and
LeRF curves on the engine's baseline and on ``also_baselines``) of the explained probes.
Both are cut into fixed *blocks* of ``engine.max_batch`` consecutive rows; block ``k``
goes to rank ``k mod world`` (:func:`block_rows`). Each rank computes its blocks, then
one object all-gather (:meth:`Ranks.gather`) brings every rank's ``(status, payload)``
to every rank: its blocks' results, or the one-line error it hit.

**Why blocks.** A float result can depend on which images share a forward pass (batch
kernels, reduction order). With blocks fixed by ``max_batch`` and not by the number of
processes, every probe's numbers come from the same batch whatever the world size, and
the single-process run computes the attribution evidence block by block too
(:class:`audit.evidence.attribution.Evidence.cat` joins them). So ``report.json`` of N processes
equals the one-process report number for number (``seconds`` and the config's
``devices``/``strategy``/``num_nodes`` aside).

**The condition: equal thread counts.** Lightning sets ``torch.set_num_threads(cores //
processes)`` in each process when ``OMP_NUM_THREADS`` is not set. Measured on this
project's SmallCNN (32x32 probes, one block of 16): maps, logits and every curve are
bit-identical with 1 and 2 threads, but the mask shares (``relevance_mass``, a sum over
each map) of Grad-CAM and LRP are not (last-bit differences). Equality therefore holds
when every process runs with the same ``torch.get_num_threads()`` as the one-process
run, e.g. ``OMP_NUM_THREADS=1`` for both; the verdict does not hinge on last bits.

**Measured cost** (this 2-core machine, shared; the toy audit of tests/engine/test_distributed.py:
96 probes of 32 px, 32 explained, ``OMP_NUM_THREADS=1``): 1 process 20 s wall, 2 processes
44 s wall. At this size the second interpreter's start-up and imports, the process group
and rank zero's serial rest dominate; the gain is for probe sets whose predictions and
explanations outweigh them (the throughput bench measures that). A streamed folder's
digest is hashed in one more pass over every probe on rank zero, since its prediction
pass sees only a share.

**Rank zero** then runs the rest on the gathered evidence (behaviour, synthesized
counterfactuals, sanity, TCAV, dissection: bounded probe counts), decides, creates the
MLflow run, writes the reports and the registry. The other ranks write nothing and
exit after the gather.

**Failures.** Every rank reaches the gather, also when it failed before (loading the
probes or the model: :meth:`Ranks.abandon`), so every rank learns of a failure and
nobody waits for a peer that will never come. A failure anywhere ends the job with exit
2 before rank zero creates its run: no run, no tag, no alias. Rank zero prints the
line, naming the first failing rank and its error. The process group has a timeout
(:data:`TIMEOUT`): a peer that never arrives fails the gather after it. A rank killed
outright closes its gloo connections, and the gather fails at once on the others; on
one machine Lightning's child observer also SIGKILLs every process (rank zero
included) within about 5 s of a child exiting non-zero. That is why ranks that
Lightning launched here exit 0 after a failure that rank zero reports (its exit code is
the job's; a child's non-zero code would make the observer kill rank zero while it
reports), while under ``torchrun`` and ``srun`` every rank exits 2, so that the
launcher's own code shows the failure.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from audit.errors import AuditError, first_line

__all__ = [
    "STRATEGIES",
    "TIMEOUT",
    "Ranks",
    "ShardError",
    "GatherError",
    "all_gather",
    "blocks",
    "block_rows",
    "rows_of",
    "launch",
    "world_of",
]

#: ``engine.strategy``: ``auto`` is DDP when there is more than one process, ``ddp`` says so explicitly.
STRATEGIES = ("auto", "ddp")
#: Longest wait at the gather (the process group's timeout): a rank that never arrives fails the job after it.
TIMEOUT = timedelta(minutes=30)
#: Set by a rank zero that launched its peers itself; a peer whose parent it names was launched by Lightning.
_LAUNCHER_ENV = "MODEL_AUDIT_LAUNCHER_PID"


class ShardError(AuditError):
    """A rank failed its share (reported on every rank after the gather).

    Attributes:
        rank: the first failing rank.
        line: its one-line error.
        failed: how many ranks failed.
    """

    def __init__(self, rank: int, world: int, line: str, failed: int = 1) -> None:
        self.rank, self.world, self.line, self.failed = rank, world, line, failed
        more = f" (and {failed - 1} other rank{'s' if failed > 2 else ''})" if failed > 1 else ""
        super().__init__(f"rank {rank} of {world}{more} failed: {line}")


class GatherError(AuditError):
    """The gather itself failed: a peer died or did not arrive within :data:`TIMEOUT`."""


def world_of(engine: Mapping[str, Any]) -> int:
    """The number of processes the config asks for: ``devices * num_nodes``."""
    return int(engine.get("devices", 1)) * int(engine.get("num_nodes", 1))


def blocks(n: int, size: int) -> list[range]:
    """The fixed blocks of ``n`` rows: ``size`` consecutive rows each (the last may be shorter).

    Args:
        n: number of rows.
        size: rows per block (``engine.max_batch``), at least 1.

    Returns:
        ``range(k * size, min(n, (k + 1) * size))`` for ``k = 0, 1, ...``.
    """
    size = max(int(size), 1)
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


def block_rows(n: int, size: int, rank: int, world: int) -> list[range]:
    """The blocks of ``n`` rows that ``rank`` of ``world`` computes: block ``k`` goes to rank ``k mod world``.

    The blocks do not depend on ``world``; only their owner does. Every row is in exactly
    one rank's blocks.

    Raises:
        ValueError: ``rank`` outside ``0 .. world - 1``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in 0..{world - 1}; got {rank}")
    return [b for k, b in enumerate(blocks(n, size)) if k % world == rank]


def rows_of(parts: Sequence[range]) -> torch.Tensor:
    """The rows of some blocks as one ascending int64 tensor."""
    if not parts:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(b.start, b.stop, dtype=torch.long) for b in parts])


def all_gather(obj: Any, world: int) -> list[Any]:
    """``obj`` of every rank, in rank order: one collective that every rank must call, with a
    process group set up (the engine's :class:`Ranks` and the training callbacks' share);
    ``[obj]`` for one process or without a process group."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass
class Ranks:
    """This process's place in a launched audit, and the one collective the audit needs.

    Attributes:
        rank: global rank (0 decides and writes).
        world: number of processes.
        launched_here: this rank was started by Lightning's launcher in rank zero on this
            machine (its exit code is seen only by Lightning's child observer).
        gathered: :meth:`gather` has run (it runs once per audit).
        delivered: the gather completed on every rank (every rank knows every status).
    """

    rank: int
    world: int
    launched_here: bool = False
    gathered: bool = False
    delivered: bool = False
    backend: str = ""
    fabric: Any = None

    def gather(self, status: str, payload: Any) -> list[Any]:
        """Every rank's ``(status, payload)``; raises on every rank when any rank failed.

        Args:
            status: ``"ok"`` or ``"error"``.
            payload: the shard's results, or the one-line error.

        Returns:
            The payloads, by rank.

        Raises:
            ShardError: some rank sent ``"error"`` (the first such rank is named).
            GatherError: the gather failed (a peer died, or the timeout passed).
        """
        self.gathered = True
        try:
            out = all_gather((status, payload), self.world)
        except Exception as err:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses (DistBackendError ...)
            text = first_line(err) or type(err).__name__
            text = text.split("] ", 1)[-1].split(". ", 1)[0][
                :160
            ]  # gloo: "[file:line] Connection closed by peer ..."
            raise GatherError(
                f"rank {self.rank} of {self.world}: the gather of the shards failed ({type(err).__name__}: {text}): "
                f"another rank died or did not arrive within {int(TIMEOUT.total_seconds())} s"
            ) from None
        self.delivered = True
        bad = [(r, p) for r, (s, p) in enumerate(out) if s != "ok"]
        if bad:
            raise ShardError(bad[0][0], self.world, str(bad[0][1]), failed=len(bad))
        return [p for _, p in out]

    def abandon(self, line: str) -> None:
        """Send ``line`` as this rank's error if it has not gathered yet (so no peer waits for it).

        Never raises: the failure that called it is the one to report.
        """
        if self.gathered:
            return
        try:
            self.gather("error", line)
        except (ShardError, GatherError):
            pass

    def close(self) -> None:
        """Destroy the process group (idempotent)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def launch(engine: Mapping[str, Any], *, hydra_run: bool) -> Ranks | None:
    """Start (or join) the processes of a distributed audit; None for a one-process audit.

    ``devices * num_nodes == 1``: nothing is created (no Fabric, no process group).
    Otherwise a :class:`lightning.fabric.Fabric` with the DDP strategy (timeout
    :data:`TIMEOUT`) is launched: on one machine it re-runs this command line for the
    other local ranks; under ``torchrun`` or ``srun`` the ranks come from the environment.

    Args:
        engine: the checked ``engine`` config (``device``, ``devices``, ``num_nodes``).
        hydra_run: whether this is a Hydra single run (the command line can be re-run).

    Returns:
        This process's :class:`Ranks`, or None.

    Raises:
        ValueError: the launch is refused or fails (one line, naming the fix).
    """
    world = world_of(engine)
    if world == 1:
        return None
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy
    from lightning_utilities.core import rank_zero

    # Lightning's "Initializing distributed ..." and "All distributed processes registered" lines (rank
    # zero's INFO logger, whichever Lightning package named it last): the job prints its own line
    for log in (
        rank_zero.log,
        logging.getLogger("lightning.fabric"),
        logging.getLogger("lightning_fabric"),
    ):
        log.setLevel(logging.WARNING)
    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}[engine["device"]]
    try:
        fabric = Fabric(
            accelerator=accelerator,
            devices=int(engine["devices"]),
            num_nodes=int(engine["num_nodes"]),
            strategy=DDPStrategy(timeout=TIMEOUT),
        )
        env = (
            fabric.strategy.cluster_environment
        )  # which launcher: Lightning's own, torchrun, SLURM
    except Exception as err:  # noqa: BLE001 - Lightning's own config errors, as one line
        raise ValueError(
            f"cannot set up {world} processes with Lightning: {type(err).__name__}: {first_line(err)}"
        ) from None
    external = env.creates_processes_externally
    if not external and not hydra_run:
        raise ValueError(
            f"engine.devices={engine['devices']} engine.num_nodes={engine['num_nodes']}: Lightning launches the other "
            f"processes by re-running the command line, which works for one `model-audit ...` run (not a multirun "
            f"-m, not a call from Python); audit one candidate per command, or start the processes with torchrun or srun"
        )
    if not external:
        os.environ[_LAUNCHER_ENV] = str(os.getpid())
    try:
        fabric.launch()
    except Exception as err:  # noqa: BLE001 - e.g. a world size that does not match torchrun's
        hint = (
            "; under torchrun or srun, engine.devices must equal the processes per node (--nproc-per-node, "
            "--ntasks-per-node) and engine.num_nodes the nodes"
            if external
            else ""
        )
        raise ValueError(
            f"cannot start {world} processes with Lightning: {type(err).__name__}: {first_line(err)}{hint}"
        ) from None
    launched_here = external and os.environ.get(_LAUNCHER_ENV) == str(os.getppid())
    import torch.distributed as dist

    return Ranks(
        rank=int(fabric.global_rank),
        world=int(fabric.world_size),
        launched_here=launched_here,
        backend=str(dist.get_backend()),
        fabric=fabric,
    )
