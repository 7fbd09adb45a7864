"""Test entry point: the trainer (``trainer.train.main``) with faults injected from the
environment, for tests/test_faults.py. Everything else runs unchanged.

    FAULT_SLEEP=s          sleep s seconds after each micro-batch, so that a test can signal or
                           kill the job at a step it chooses
    FAULT_NAN=step:micro   multiply that micro-batch's loss by NaN before backward (0-based step
                           and micro-batch), on rank FAULT_NAN_RANK (default 0)
    FAULT_SAVE_SLEEP=s     once DeepSpeed has written a checkpoint's files, print
                           "FAULT shards written" and sleep s seconds before the manifest and
                           ``latest`` are written, so that a test can kill the job mid-save

    python -m tests.fault_job [hydra overrides...]
"""

from __future__ import annotations

import functools
import os
import sys
import time

from deepspeed import DeepSpeedEngine

from trainer import train as train_module
from trainer.batching import BatchSampler
from trainer.parallel import SequenceParallel

_current: tuple[int, int] | None = None  # (step, micro-batch) the loop is on


def _wrap(owner, name: str, after) -> None:
    """Replace ``owner.name`` by a call to the original followed by ``after(result, *args)``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return after(original(*args, **kwargs), *args)

    setattr(owner, name, wrapped)


def _record_position(batch, sampler, step: int, micro: int):
    global _current
    _current = (step, micro)
    return batch


def _poison(loss, *args, target: tuple[int, int], rank: int):
    if _current == target and int(os.environ.get("RANK", "0")) == rank:
        print(f"FAULT NaN loss at step {target[0]} micro-batch {target[1]}", flush=True)
        return loss * float("nan")
    return loss


def _sleep(result, *args, seconds: float, marker: str = ""):
    if marker:
        print(marker, file=sys.stderr, flush=True)
    time.sleep(seconds)
    return result


def inject() -> None:
    env = os.environ
    if env.get("FAULT_SLEEP"):
        _wrap(train_module, "forward_backward",
              functools.partial(_sleep, seconds=float(env["FAULT_SLEEP"])))
    if env.get("FAULT_NAN"):
        step, micro = (int(x) for x in env["FAULT_NAN"].split(":"))
        _wrap(BatchSampler, "batch", _record_position)
        _wrap(SequenceParallel, "mean_loss", functools.partial(
            _poison, target=(step, micro), rank=int(env.get("FAULT_NAN_RANK", "0"))))
    if env.get("FAULT_SAVE_SLEEP"):
        _wrap(DeepSpeedEngine, "save_checkpoint", functools.partial(
            _sleep, seconds=float(env["FAULT_SAVE_SLEEP"]), marker="FAULT shards written"))


if __name__ == "__main__":
    inject()
    train_module.main()
