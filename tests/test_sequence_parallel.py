"""Sequence parallelism (DeepSpeed Ulysses) on 2 CPU ranks, and the memory switches: the first
step's loss and every parameter's gradient equal the single-rank run's; resume, eval and the
throughput counters under SP; errors for layouts that cannot run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from transformers import AutoConfig

from tests.trainer_utils import ROOT, TINY, check, job_env, losses, run_dirs, run_job
from trainer.config import register_configs
from trainer.parallel import SequenceParallel, check_sequence_parallel

pytestmark = pytest.mark.slow

# TINY with fixed-length passkey rows, a threshold that skips blocks, ZeRO-1 (SP needs ZeRO).
SP_BASE = [*TINY, "data.min_len=null", "attention.threshold=0.7", "deepspeed=zero1",
           "logging.wandb.mode=disabled"]


def _launcher(ranks: int, port: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(port), "--no_local_rank", "--module"]


def _first_step(tmp_path: Path, name: str, overrides: list[str], ranks: int = 1,
                port: int = 29640) -> dict:
    """Loss and full gradients of the first micro-batch (tests/first_step_grads.py)."""
    out = tmp_path / f"{name}.pt"
    cmd = (_launcher(ranks, port) if ranks > 1 else [sys.executable, "-m"]) + [
        "tests.first_step_grads", *SP_BASE, f"trainer.output_dir={tmp_path}/runs", *overrides]
    import subprocess
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(tmp_path, GRADS_OUT=str(out),
                                                     PBS_RUN_ID=name),
                          capture_output=True, text=True, timeout=300)
    check(proc)
    return torch.load(out)


def _assert_same(a: dict, b: dict) -> None:
    torch.testing.assert_close(a["loss"], b["loss"], atol=1e-6, rtol=1e-6)
    assert a["grads"].keys() == b["grads"].keys()
    for name, g in a["grads"].items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(b["grads"][name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case,overrides", [
    ("pbs", ["attention=pbs"]),
    ("sdpa", ["attention=sdpa"]),
    # packed rows (passkey items of 110-256 tokens, several per row): the documents reach every
    # rank whole (global offsets); a dense layer attends densely inside each document
    ("pbs-packed", ["attention=pbs", "data.packing=true", "data.min_len=110",
                    "attention.dense_layers=[1]"]),
    # sp > Hkv: DeepSpeed replicates the one KV head on both ranks. Each rank then permutes its
    # copy by its own query heads' importance (a finer grouping than one rank's), so the exact
    # comparison is without permutation; the block selection is per query head either way.
    ("pbs-kv1", ["attention=pbs", "model.num_kv_heads=1", "attention.permute=false"]),
    ("sdpa-kv1", ["attention=sdpa", "model.num_kv_heads=1"]),
])
def test_sp2_first_step_equals_one_rank(tmp_path, case, overrides):
    one = _first_step(tmp_path, f"{case}-sp1", overrides)
    two = _first_step(tmp_path, f"{case}-sp2", [*overrides, "trainer.sequence_parallel_size=2"],
                      ranks=2, port=29641)
    _assert_same(one, two)


@pytest.mark.parametrize("switch", ["trainer.activation_offload=true", "model.tiled_mlp=true"])
def test_memory_switches_change_nothing(tmp_path, switch):
    base = ["trainer.gradient_checkpointing=true"]
    off = _first_step(tmp_path, "off", base)
    on = _first_step(tmp_path, "on", [*base, switch])
    _assert_same(off, on)
    if "offload" in switch:  # the layer inputs went through DeepSpeed's offload hooks
        assert on["offload_marked"] > 0 and off["offload_marked"] == 0


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sp_job_matches_one_rank_and_resumes(tmp_path):
    """4 steps with eval at SP=2 (2 ranks) give the single-rank run's losses, eval loss and
    retrieval, and count each token once; rolled back to step 2, the SP run resumes on the same
    curve; resuming it with another SP size is refused with a clear error."""
    args = [*SP_BASE, "trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_checkpoints=0",
            "trainer.eval_every=2", "trainer.export_hf=false"]
    check(run_job([*args, f"trainer.output_dir={tmp_path}/one"], tmp_path))
    check(run_job([*args, f"trainer.output_dir={tmp_path}/two", "trainer.sequence_parallel_size=2"],
                  tmp_path, launcher=_launcher(2, 29643), timeout=400))
    (one,), (two,) = run_dirs(tmp_path / "one"), run_dirs(tmp_path / "two")
    ref, got = losses(one), losses(two)
    assert sorted(got) == [1, 2, 3, 4] and losses(two, rank=1) == got
    for step in got:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (got, ref)
    m1, m2 = _metrics(one), _metrics(two)
    for key in ("eval/loss", "eval/retrieval_acc", "train/tokens_seen", "attn/density"):
        v1, v2 = [r[key] for r in m1 if key in r], [r[key] for r in m2 if key in r]
        assert v1 and v2 == pytest.approx(v1, abs=1e-5), key

    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints", resumed / "crashed" / "checkpoints")
    (resumed / "crashed" / "checkpoints" / "latest").write_text("step_00000002")
    resume = [*args, f"trainer.output_dir={resumed}", "trainer.resume=auto",
              "trainer.save_every=0", "trainer.save_final=false"]
    check(run_job([*resume, "trainer.sequence_parallel_size=2"], tmp_path,
                  launcher=_launcher(2, 29644), timeout=400))
    (new,) = [d for d in run_dirs(resumed) if d.name != "crashed"]
    again = losses(new)
    assert sorted(again) == [3, 4]
    for step in again:
        assert again[step] == pytest.approx(got[step], abs=1e-6)
    shutil.rmtree(new)
    bad = run_job([*resume, "trainer.sequence_parallel_size=1"], tmp_path,
                  launcher=_launcher(2, 29645), timeout=400)
    assert bad.returncode != 0
    assert "saved with trainer.sequence_parallel_size=2" in bad.stdout + bad.stderr


def _cfg(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.attention.block_size = cfg.attention.block_size or 64
    return cfg


@pytest.mark.parametrize("overrides,world,heads,message", [
    (["trainer.sequence_parallel_size=4"], 2, (4, 2), "must divide the number of ranks (2)"),
    (["trainer.sequence_parallel_size=2"], 2, (6, 3), "one must divide the other"),
    (["trainer.sequence_parallel_size=4"], 4, (6, 2), "must divide the model's 6 query heads"),
    (["trainer.sequence_parallel_size=2", "deepspeed=zero0"], 2, (4, 2), "needs ZeRO stage"),
    (["trainer.sequence_parallel_size=2", "data.seq_len=4160"], 2, (4, 2),
     "sequence length 4160 must be a multiple of trainer.sequence_parallel_size * "
     "attention.block_size = 128"),
    (["trainer.sequence_parallel_size=2", "attention=sdpa", "data.seq_len=4161"], 2, (4, 2),
     "multiple of trainer.sequence_parallel_size = 2"),
    (["trainer.sequence_parallel_size=2", "data.packing=true", "attention=sdpa"], 2, (4, 2),
     "Ulysses drops the attention mask"),
    (["trainer.sequence_parallel_size=0"], 2, (4, 2), "must be >= 1"),
])
def test_layouts_that_cannot_run_fail_before_any_work(overrides, world, heads, message):
    cfg = _cfg(["deepspeed=zero1", *overrides])
    config = AutoConfig.for_model("llama", hidden_size=16 * heads[0],
                                  num_attention_heads=heads[0], num_key_value_heads=heads[1])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*")):
        check_sequence_parallel(cfg, config, world, [cfg.data.seq_len])


def test_micro_batch_may_not_change():
    sp = SequenceParallel(2, micro_batch_size=2, rank=1, world=2)
    batch = {"input_ids": torch.arange(8).view(2, 4), "length": torch.tensor([4, 3])}
    shard = sp.shard(batch)
    assert torch.equal(shard["input_ids"], torch.tensor([[2, 3], [6, 7]]))
    assert torch.equal(shard["length"], batch["length"])  # per-row fields stay whole (global)
    with pytest.raises(ValueError, match="batch size may not change"):
        sp.shard({"input_ids": torch.zeros(3, 4, dtype=torch.long)})


def test_sp_larger_than_world_fails_at_start(tmp_path):
    bad = run_job([*SP_BASE, "trainer.sequence_parallel_size=2", f"trainer.output_dir={tmp_path}"],
                  tmp_path)
    assert bad.returncode != 0
    assert "must divide the number of ranks (1) (it is larger than the world)" in bad.stderr
    assert not list((tmp_path).glob("*/checkpoints"))


def test_config_shows_the_sp_size():
    cfg = _cfg(["trainer.sequence_parallel_size=2"])
    assert OmegaConf.to_container(cfg)["trainer"]["sequence_parallel_size"] == 2
