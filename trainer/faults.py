"""Faults on clusters: stop signals, non-finite steps, failed collectives, stale build locks.

- :class:`StopSignals` turns SIGTERM and SIGUSR1 (what SLURM sends before a preemption or the
  time limit) into a request to stop after the current optimizer step.
- :class:`StepGuard` decides once per optimizer step, with one all-reduce that every rank makes
  at the same point (so no rank waits on another's different decision, also under sequence
  parallelism), whether the step's update is applied and whether the job stops: a stop signal
  on any rank, ``trainer.max_minutes``, a non-finite loss or gradient (``trainer.nonfinite``).
- :func:`collective_errors` names the rank and the collective (from torch's flight recorder)
  when a collective fails or passes ``trainer.collective_timeout_min``.
- :func:`clear_stale_build_locks` removes the ``lock`` files that a killed torch-extension
  build leaves behind (every later load of that op would wait for them forever).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("trainer")

NONFINITE_MODES = ("stop", "skip")


class StopSignals:
    """Context in which SIGTERM and SIGUSR1 only record a stop request (``received``: the first
    signal's name). Later signals, e.g. one arriving while the checkpoint is written, are
    ignored, so nothing is interrupted half-way; after a stop request they stay ignored until
    the process exits (a repeated signal must not turn the clean exit into a kill)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.received is None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def _record(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        what = "ignored, already stopping" if self.received else "stopping after this step"
        self.received = self.received or name
        os.write(2, f"{name} received: {what}\n".encode())  # no logging inside a handler


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient under ``trainer.nonfinite=stop``."""


class CollectiveError(RuntimeError):
    """A collective that failed or timed out, with the rank and the collective named."""


@dataclass
class Verdict:
    """What all ranks agreed on for one optimizer step."""

    apply: bool = True  # False: the update is skipped (non-finite loss or gradients)
    signal: str | None = None  # a stop signal reached a rank: save and exit after this step
    late: bool = False  # trainer.max_minutes has passed: stop training after this step

    @property
    def stop(self) -> bool:
        return self.signal is not None or self.late


class StepGuard:
    """The once-per-step decision (see the module docstring). ``watch`` each micro-batch's loss
    (kept on the device: no sync), ``decide`` after the last backward and before the update,
    run the update under ``applying``, then ``after_step``. ``nonfinite_steps``: steps with a
    non-finite loss or gradient over the whole run (``resumed``: earlier runs'), logged as
    ``train/nonfinite_steps`` at each such step through ``logger``."""

    def __init__(self, nonfinite: str, signals: StopSignals, max_minutes: float,
                 device: torch.device, logger, resumed: int = 0):
        self.nonfinite, self.signals, self.device, self.logger = nonfinite, signals, device, logger
        self.deadline = time.perf_counter() + 60 * max_minutes if max_minutes > 0 else None
        self.nonfinite_steps = resumed
        self._finite: list[torch.Tensor] = []

    def watch(self, loss: torch.Tensor) -> None:
        self._finite.append(torch.isfinite(loss))

    def decide(self, step: int, grad_norm: torch.Tensor | None) -> Verdict:
        """One all-reduce (MAX) of [stop signal, past the deadline, per rank: the first
        non-finite micro-batch + 1 (micro-batches + 1: only the gradient norm)]. Raises
        :class:`NonFiniteError` on every rank under ``trainer.nonfinite=stop``."""
        rank, world = dist.get_rank(), dist.get_world_size()
        finite, self._finite = torch.stack(self._finite), []
        micros = len(finite)
        bad = torch.where(finite.all(), 0, (~finite).int().argmax() + 1)
        if grad_norm is not None:
            bad = torch.where((bad == 0) & ~torch.isfinite(grad_norm), micros + 1, bad)
        flags = torch.zeros(2 + world, dtype=torch.float64, device=self.device)
        flags[0] = signal.Signals[self.signals.received].value if self.signals.received else 0
        flags[1] = float(self.deadline is not None and time.perf_counter() > self.deadline)
        flags[2 + rank] = bad
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        sig, late, *per_rank = (int(x) for x in flags.tolist())
        verdict = Verdict(signal=signal.Signals(sig).name if sig else None, late=bool(late))
        what = [f"the loss of micro-batch {m - 1} (0-based, of {micros}) on rank {r}"
                if m <= micros else f"the gradients on rank {r} (every loss finite)"
                for r, m in enumerate(per_rank) if m]
        if what:
            self._non_finite(step, f"non-finite at step {step}: {', '.join(what)}")
            verdict.apply = False
        return verdict

    @contextlib.contextmanager
    def applying(self, engine, verdict: Verdict) -> Iterator[None]:
        """Run ``engine.step()`` inside: a skipped verdict makes the client optimizer's step a
        no-op for that call, so DeepSpeed (any ZeRO stage) still clears the gradients, writes
        back the unchanged master weights and advances its counters, while the weights and
        optimizer state (moments, step count) stay as they were."""
        if verdict.apply:
            yield
            return
        optimizer = engine.basic_optimizer
        optimizer.step = lambda *args, **kwargs: None
        try:
            yield
        finally:
            del optimizer.step

    def after_step(self, engine, scheduler, verdict: Verdict, step: int) -> None:
        """DeepSpeed skips an update with non-finite gradients by itself (ZeRO, bf16) and then
        leaves the LR schedule behind: count it as a non-finite step and keep the schedule on
        the step count (as the data order is) for skipped steps of either kind."""
        if engine.was_step_applied():
            return
        scheduler.step()
        if verdict.apply:
            verdict.apply = False
            self._non_finite(step, f"non-finite at step {step}: the gradients (DeepSpeed "
                                   "skipped the update)")

    def _non_finite(self, step: int, what: str) -> None:
        self.nonfinite_steps += 1
        self.logger.log({"train/nonfinite_steps": self.nonfinite_steps}, step=step)
        if self.nonfinite == "stop":
            log.error("%s", what)
            raise NonFiniteError(f"{what}. trainer.nonfinite=stop: the update was not applied "
                                 "and nothing new was saved (trainer.nonfinite=skip skips such "
                                 "steps instead)")
        log.warning("%s: update skipped (trainer.nonfinite=skip; %d such steps so far)", what,
                    self.nonfinite_steps)


# ---------------------------------------------------------------- failed collectives


@contextlib.contextmanager
def collective_errors() -> Iterator[None]:
    """Re-raise a collective that failed or timed out as :class:`CollectiveError` naming this
    rank and the collective in flight (gloo's own message names neither)."""
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        text = str(e)
        if not (isinstance(e, dist.DistError) or "gloo" in text) or not dist.is_initialized():
            raise
        message = (f"rank {dist.get_rank()}: collective {in_flight_collective()} failed or "
                   "timed out (a peer rank died or is stuck; trainer.collective_timeout_min "
                   f"bounds the wait): {text}")
        log.error("%s", message)
        raise CollectiveError(message) from e


def in_flight_collective() -> str:
    """The newest collective that torch's flight recorder lists as not completed on this rank,
    e.g. ``gloo:all_reduce #41 on process group 1 (sizes [[1024]])``."""
    from torch._C._distributed_c10d import _dump_fr_trace_json

    entries = json.loads(_dump_fr_trace_json()).get("entries", [])
    pending = [e for e in entries if not e.get("retired", True)] or entries[-1:]
    if not pending:
        return "(unknown: the flight recorder is off, TORCH_FR_BUFFER_SIZE=0)"
    e = pending[-1]
    return (f"{e['profiling_name']} #{e['collective_seq_id']} on process group "
            f"{e['process_group'][0]} (sizes {e['input_sizes']}, timeout "
            f"{e['timeout_ms'] / 1000:g} s)")


# ---------------------------------------------------------------- stale build locks


def extensions_dir() -> str:
    """Where torch JIT-builds extensions, one folder per op (torch.utils.cpp_extension's rule)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                   f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{python}_{accelerator}")


def clear_stale_build_locks(root: str | None = None) -> list[str]:
    """Remove every ``<op>/lock`` under the extensions folder that no process of this machine
    holds open, and return their paths.

    torch's builder creates the lock and holds it open until the build ends; a build killed
    with SIGKILL leaves it, and every later load of that op then waits for it silently and
    forever. Call this on one rank per node after all ranks have joined and before any loads
    an op: no rank of this job is building yet, so a lock that nobody here holds is stale (a
    build of another job on another node sharing the folder is the one case it cannot see).
    """
    locks = glob.glob(os.path.join(root or extensions_dir(), "*", "lock"))
    held = _open_files() if locks else set()
    removed = []
    for lock in locks:
        if os.path.realpath(lock) in held:
            log.info("%s: a build in progress on this machine holds it; waiting as torch does",
                     lock)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
            removed.append(lock)
            log.warning("removed stale torch extension build lock %s (no process holds it: a "
                        "build was killed); that op is rebuilt when it is next loaded", lock)
    return removed


def _open_files() -> set[str]:
    """Paths held open by the processes of this machine that we may inspect (/proc)."""
    paths = set()
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    paths.add(os.readlink(os.path.join(fd_dir, fd)))
    return paths
