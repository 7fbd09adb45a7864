"""Fault injection on CPU, bounded in time: stop signals, SIGKILL at any moment, a dead or stuck
rank, non-finite losses, damaged checkpoints, stale build locks. The jobs run the real trainer
through tests/fault_job.py, which adds only sleeps, a NaN loss and pid files."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from tests.trainer_utils import (ROOT, TINY, check, job_env, losses, run_dirs, run_job,
                                 wandb_history_keys, wandb_records)
from trainer.config import register_configs
from trainer.engine import checkpoint_problem, init_distributed
from trainer.faults import clear_stale_build_locks
from trainer.model import architecture_config
from trainer.train import check_job

# TINY with two micro-batches per step, 8 steps, no W&B, no HF export.
FAST = [*TINY, "trainer.grad_accum=2", "trainer.max_steps=8", "logging.wandb.mode=disabled",
        "trainer.export_hf=false"]


class Job:
    """A fault-injected trainer job in its own session (so the whole job can be signalled or
    killed at once), its output in a file."""

    def __init__(self, args: list[str], tmp_path: Path, name: str, **env: str):
        self.out = tmp_path / f"{name}.out"
        cmd = [sys.executable, "-m", "tests.fault_job", *args]
        with open(self.out, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(tmp_path, **env), stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.out.read_text()

    def wait_for(self, condition, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"ended early ({self.proc.returncode}):\n" + \
                self.output()[-4000:]
            assert time.monotonic() < deadline, "timed out waiting:\n" + self.output()[-4000:]
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s:\n{self.output()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL every process of the job, as a cluster does."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)


@pytest.fixture
def jobs():
    """``jobs(args, tmp_path, name, ...)`` starts a :class:`Job`; all are killed at the end."""
    started: list[Job] = []

    def start(*args, **kwargs) -> Job:
        started.append(Job(*args, **kwargs))
        return started[-1]

    yield start
    for job in started:
        job.kill()


def steps_done(run: Path, rank: int = 0) -> int:
    return max(losses(run, rank), default=0) if (run / f"train_rank{rank}.log").exists() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(jobs, args: list[str], tmp_path: Path, name: str, **env: str) -> list[Job]:
    """Ranks 0 and 1 started directly, as srun starts them (no launcher in between)."""
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return [jobs(args, tmp_path, f"{name}-rank{r}", RANK=str(r), LOCAL_RANK=str(r), **env)
            for r in (0, 1)]


def _run_fault_job(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.fault_job", *args], cwd=ROOT,
                          env=job_env(tmp_path, **env), capture_output=True, text=True,
                          timeout=300)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_curve(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want), (got, want)
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, got, want)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 1-rank run: its run folder (checkpoints at steps 2, 4, 6, 8) and losses."""
    tmp = tmp_path_factory.mktemp("reference")
    check(run_job([*FAST, "trainer.save_every=2", "trainer.keep_checkpoints=0",
                   f"trainer.output_dir={tmp}/out"], tmp))
    (run,) = run_dirs(tmp / "out")
    return run, losses(run)


# ---------------------------------------------------------------- stop signals


def test_sigterm_saves_the_step_and_the_requeued_job_continues_the_curve(tmp_path, reference,
                                                                         jobs):
    """SIGTERM at a random step: the step finishes, a complete checkpoint of it is saved (a
    second SIGTERM in the middle of that save changes nothing), the W&B run is finished, exit 0.
    Requeued into the same run folder with resume=auto, the job continues the uninterrupted
    loss curve."""
    _, ref = reference
    k = random.randint(2, 5)
    out, run = tmp_path / "out", tmp_path / "out" / "requeued"
    job = jobs([*FAST, f"trainer.output_dir={out}", "logging.wandb.mode=offline"], tmp_path,
               "preempted", PBS_RUN_ID="requeued", FAULT_SLEEP="0.2", FAULT_SAVE_SLEEP="1")
    job.wait_for(lambda: steps_done(run) >= k)
    job.proc.send_signal(signal.SIGTERM)
    job.wait_for(lambda: "FAULT shards written" in job.output())
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(60) == 0, job.output()[-4000:]
    stop = steps_done(run)
    assert k <= stop < 8, (k, stop)
    assert (f"SIGTERM received: stopping at step {stop} of 8, checkpoint step_{stop:08d} saved"
            in (run / "train_rank0.log").read_text())
    assert "SIGTERM received: ignored, already stopping" in job.output()
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step_{stop:08d}"
    assert checkpoint_problem(str(ckpt / f"step_{stop:08d}")) is None
    records = wandb_records(tmp_path)
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]
    assert any(item.key == "stopped_by" and item.value_json == '"SIGTERM"' for r in records
               if r.WhichOneof("record_type") == "summary" for item in r.summary.update)

    check(run_job([*FAST, f"trainer.output_dir={out}", "trainer.resume=auto"], tmp_path,
                  PBS_RUN_ID="requeued"))
    assert (f"resumed from {ckpt}/step_{stop:08d} at step {stop}"
            in (run / "train_rank0.log").read_text())
    _assert_same_curve(losses(run), ref)


@pytest.mark.slow
def test_two_ranks_agree_on_a_skipped_step_and_on_stopping_zero3(tmp_path, jobs):
    """2 ranks, ZeRO-3, trainer.nonfinite=skip: a NaN loss on rank 1 only in step 2 skips that
    step on both ranks; later SIGTERM reaches rank 1 only, and both ranks stop after the same
    step and save it (SIGUSR1 to rank 0 in the middle of that save changes nothing), exit 0,
    and the resumed job continues the uninterrupted loss curve (the same NaN injected) with
    the count of skipped steps."""
    args = [*FAST, "deepspeed=zero3", "trainer.nonfinite=skip"]
    nan = dict(FAULT_NAN="1:0", FAULT_NAN_RANK="1")
    ranks = _two_ranks(jobs, [*args, f"trainer.output_dir={tmp_path}/ref"], tmp_path, "ref",
                       PBS_RUN_ID="ref", **nan)
    assert [r.wait(300) for r in ranks] == [0, 0], ranks[0].output()[-4000:]
    ref = losses(tmp_path / "ref" / "ref")
    assert sorted(ref) == [1, 3, 4, 5, 6, 7, 8]  # step 2: NaN, skipped
    k = random.randint(3, 5)
    out, run = tmp_path / "out", tmp_path / "out" / "two"
    ranks = _two_ranks(jobs, [*args, f"trainer.output_dir={out}"], tmp_path, "preempted",
                       PBS_RUN_ID="two", FAULT_SLEEP="0.2", FAULT_SAVE_SLEEP="1", **nan)
    ranks[0].wait_for(lambda: steps_done(run) >= k)
    ranks[1].proc.send_signal(signal.SIGTERM)
    ranks[0].wait_for(lambda: "FAULT shards written" in ranks[0].output())
    ranks[0].proc.send_signal(signal.SIGUSR1)
    assert [r.wait(120) for r in ranks] == [0, 0], ranks[0].output()[-4000:]
    stop = steps_done(run)
    assert k <= stop < 8 and steps_done(run, rank=1) == stop, (k, stop)
    for rank in (0, 1):
        log = (run / f"train_rank{rank}.log").read_text()
        assert f"SIGTERM received: stopping at step {stop} of 8" in log
        assert ("non-finite at step 2: the loss of micro-batch 0 (0-based, of 2) on rank 1: "
                "update skipped") in log
    assert checkpoint_problem(str(run / "checkpoints" / f"step_{stop:08d}")) is None

    ranks = _two_ranks(jobs, [*args, f"trainer.output_dir={out}", "trainer.resume=auto"],
                       tmp_path, "resumed", PBS_RUN_ID="two")
    assert [r.wait(300) for r in ranks] == [0, 0], ranks[0].output()[-4000:]
    _assert_same_curve(losses(run), ref)
    assert losses(run, rank=1) == losses(run)
    assert [r for r in _metrics(run) if "train/loss" in r][-1]["train/nonfinite_steps"] == 1


# ---------------------------------------------------------------- kills and leftovers


def test_sigkill_at_any_moment_then_resume_auto_finishes_on_the_curve(tmp_path, reference,
                                                                      jobs):
    """The job SIGKILLed (all its processes, as a cluster does) during start-up, mid-step and
    mid-save, requeued each time into its run folder, with the stale torch-extension build lock
    that a kill during DeepSpeed's JIT build leaves: every next resume=auto run starts, and the
    last one reaches step 8 with the uninterrupted run's losses at every step."""
    _, ref = reference
    out, run = tmp_path / "out", tmp_path / "out" / "job"
    extensions = tmp_path / "torch_extensions"
    args = [*FAST, f"trainer.output_dir={out}", "trainer.resume=auto", "trainer.save_every=2"]
    env = dict(PBS_RUN_ID="job", TORCH_EXTENSIONS_DIR=str(extensions), FAULT_SLEEP="0.2",
               FAULT_SAVE_SLEEP="2")

    startup = jobs(args, tmp_path, "startup", **env)
    time.sleep(random.uniform(1.0, 4.0))
    assert startup.proc.poll() is None
    startup.kill()

    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    mid_step = jobs(args, tmp_path, "mid-step", **env)
    mid_step.wait_for(lambda: steps_done(run) >= 3)
    time.sleep(random.uniform(0.0, 0.3))  # inside step 4 (0.4 s of sleeps), before its save
    mid_step.kill()
    assert f"removed stale torch extension build lock {lock}" in mid_step.output()
    assert not lock.exists()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"

    mid_save = jobs(args, tmp_path, "mid-save", **env)
    mid_save.wait_for(lambda: "FAULT shards written" in mid_save.output())
    mid_save.kill()
    half_saved = run / "checkpoints" / "step_00000004"
    assert half_saved.is_dir() and not (half_saved / "manifest.json").exists()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"

    check(run_job(args, tmp_path, timeout=180, PBS_RUN_ID="job",
                  TORCH_EXTENSIONS_DIR=str(extensions)))
    _assert_same_curve(losses(run), ref)
    for step in (6, 8):  # keep_checkpoints=2; the half-written step 4 was replaced and pruned
        assert checkpoint_problem(str(run / "checkpoints" / f"step_{step:08d}")) is None
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_00000006", "step_00000008"]


def test_damaged_newest_checkpoints_fall_back_under_auto_and_fail_when_named(tmp_path,
                                                                           reference):
    """The newest checkpoint truncated, the one before missing a file: resume=auto warns and
    continues from the one before those (on the uninterrupted curve); naming the damaged one
    explicitly fails with an error that says what is wrong and which one would load."""
    run, ref = reference
    out = tmp_path / "out"
    crashed = out / "crashed" / "checkpoints"
    shutil.copytree(run / "checkpoints", crashed)
    shard = crashed / "step_00000008" / "mp_rank_00_model_states.pt"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 2])
    (crashed / "step_00000006" / "mp_rank_00_model_states.pt").unlink()

    log = check(run_job([*FAST, f"trainer.output_dir={out}", "trainer.resume=auto"], tmp_path))
    assert (f"skipping checkpoint {crashed}/step_00000008: mp_rank_00_model_states.pt has "
            f"{size // 2} bytes, {size} when saved (truncated?)") in log
    assert f"skipping checkpoint {crashed}/step_00000006: mp_rank_00_model_states.pt is missing" \
        in log
    (new,) = [d for d in run_dirs(out) if d.name != "crashed"]
    _assert_same_curve(losses(new), {s: ref[s] for s in (5, 6, 7, 8)})

    bad = run_job([*FAST, f"trainer.output_dir={out}", f"trainer.resume={crashed}"], tmp_path)
    assert bad.returncode != 0
    assert (f"trainer.resume={crashed}: checkpoint step_00000008 cannot be loaded: "
            f"mp_rank_00_model_states.pt has {size // 2} bytes") in bad.stderr
    assert f"trainer.resume={crashed}/step_00000004" in bad.stderr


def test_stale_build_locks_are_removed_and_held_ones_kept(tmp_path, caplog):
    """A lock that torch's extension builder holds (a build in progress) stays; one that no
    process holds (its build was killed) is removed, with a warning naming it."""
    stale, held = tmp_path / "killed_op" / "lock", tmp_path / "building_op" / "lock"
    stale.parent.mkdir()
    held.parent.mkdir()
    stale.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from torch.utils.file_baton import FileBaton; "
         "assert FileBaton(sys.argv[1]).try_acquire(); print('held', flush=True); "
         "time.sleep(120)", str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level(logging.WARNING, logger="trainer"):
            assert clear_stale_build_locks(str(tmp_path)) == [str(stale)]
        assert held.exists() and not stale.exists()
        assert f"removed stale torch extension build lock {stale}" in caplog.text
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- a dead or stuck rank


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_dead_or_stuck_rank_fails_the_survivor_within_the_timeout(tmp_path, jobs, fault):
    """Two ranks started directly (as srun starts them, no launcher to clean up), ZeRO-2; rank 1
    killed, or stopped (alive, silent): rank 0 exits non-zero on its own within
    trainer.collective_timeout_min, with an error that names it and the collective. The stopped
    case waits in ZeRO-2's gradient all-reduce on DeepSpeed's own data-parallel group, which
    gets torch's 30-minute default unless the trainer sets the timeout on every group."""
    timeout_s = 15
    args = [*FAST, "deepspeed=zero2", "trainer.max_steps=1000", f"trainer.output_dir={tmp_path}",
            f"trainer.collective_timeout_min={timeout_s / 60}"]
    ranks = _two_ranks(jobs, args, tmp_path, "job", PBS_RUN_ID="two", FAULT_SLEEP="0.2")
    ranks[0].wait_for(lambda: steps_done(tmp_path / "two") >= 2)
    ranks[1].proc.send_signal(getattr(signal, fault))
    start = time.monotonic()
    assert ranks[0].wait(timeout_s + 60) != 0
    waited = time.monotonic() - start
    log = (tmp_path / "two" / "train_rank0.log").read_text()
    assert "rank 0: collective gloo:" in log and "failed or timed out" in log, log[-3000:]
    if fault == "SIGSTOP":
        assert "Timed out" in log and timeout_s - 1 < waited < timeout_s + 30, waited
    else:
        assert waited < timeout_s, waited


# ---------------------------------------------------------------- non-finite losses


def test_nonfinite_stop_exits_naming_the_step_and_saves_nothing(tmp_path):
    """A NaN loss in micro-batch 1 of step 3 under trainer.nonfinite=stop (the default): exit
    non-zero naming the step and the micro-batch, no checkpoint after step 2, the event in the
    metrics."""
    out = tmp_path / "out"
    proc = _run_fault_job([*FAST, "trainer.save_every=1", "trainer.keep_checkpoints=0",
                           f"trainer.output_dir={out}"], tmp_path, FAULT_NAN="2:1")
    assert proc.returncode != 0
    assert ("non-finite at step 3: the loss of micro-batch 1 (0-based, of 2) on rank 0. "
            "trainer.nonfinite=stop: the update was not applied and nothing new was saved"
            in proc.stderr), proc.stderr[-3000:]
    (run,) = run_dirs(out)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (run / "checkpoints" / "step_00000003").exists()
    assert _metrics(run)[-1] == {"step": 3, "train/nonfinite_steps": 1}


def _state_tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's files (weights, optimizer moments and step counts), by
    path, without the RNG states."""
    found = {}

    def walk(x, path: str) -> None:
        if isinstance(x, torch.Tensor):
            found[path] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                if k != "rng":
                    walk(v, f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}/{i}")

    for file in sorted(tag_dir.glob("*.pt")):
        walk(torch.load(file, map_location="cpu", weights_only=False), file.name)
    return found


def test_nonfinite_skip_leaves_weights_and_optimizer_untouched(tmp_path):
    """trainer.nonfinite=skip with a NaN loss in step 3 (ZeRO-0, where DeepSpeed has no
    overflow check of its own): the checkpoint after step 3 equals the one after step 2 bit for
    bit (weights, moments, step counts: the update was not applied), training goes on with
    finite losses, and train/nonfinite_steps reaches W&B."""
    out = tmp_path / "out"
    check(_run_fault_job([*FAST, "trainer.nonfinite=skip",
                          "trainer.max_steps=5", "trainer.save_every=1",
                          "trainer.keep_checkpoints=0", "logging.wandb.mode=offline",
                          f"trainer.output_dir={out}"], tmp_path, FAULT_NAN="2:0"))
    (run,) = run_dirs(out)
    before, skipped, after = (_state_tensors(run / "checkpoints" / f"step_{s:08d}")
                              for s in (2, 3, 4))
    assert before.keys() == skipped.keys() and len(before) > 0
    for name in before:
        assert torch.equal(before[name], skipped[name]), name
    assert any(not torch.equal(skipped[name], after[name]) for name in skipped)
    rows = {r["step"]: r for r in _metrics(run) if "train/loss" in r}
    assert math.isnan(rows[3]["train/loss"]) and rows[3]["train/nonfinite_steps"] == 1
    assert all(math.isfinite(rows[s]["train/loss"]) for s in (1, 2, 4, 5))
    assert rows[5]["train/nonfinite_steps"] == 1
    assert "train/nonfinite_steps" in wandb_history_keys(tmp_path)


# ---------------------------------------------------------------- configuration


def test_fault_keys_are_typed_and_checked():
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer.nonfinite=maybe"])
        with pytest.raises(Exception) as err:
            compose(config_name="config", overrides=["trainer.collective_timeout_min=soon"])
    assert "could not be converted to Float" in str(err.value.__cause__)
    assert cfg.trainer.collective_timeout_min == 30.0
    with open_dict(cfg):
        cfg.attention.block_size = 64
    config = architecture_config(cfg.model, 100, cfg.data.seq_len)
    with pytest.raises(ValueError, match="trainer.nonfinite must be one of stop, skip, got"):
        check_job(cfg, torch.device("cpu"), config, 1, [cfg.data.seq_len])
    with pytest.raises(ValueError, match="trainer.collective_timeout_min must be > 0, got 0"):
        init_distributed("cpu", 0)
