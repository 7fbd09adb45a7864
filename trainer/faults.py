"""Faults on clusters: failed collectives and what a killed run leaves behind.

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
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger("trainer")


# ---------------------------------------------------------------- failed collectives


class CollectiveError(RuntimeError):
    """A collective that failed or timed out, with the rank and the collective named."""


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
