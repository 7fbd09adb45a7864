"""ZeRO-2 and ZeRO-3 with 2 CPU ranks through the ``deepspeed`` launcher (gloo)."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_utils import TINY, check, losses, run_dirs, run_job

pytestmark = pytest.mark.slow


def _deepspeed(port: int, no_local_rank: bool = True) -> list[str]:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(port)]
    return launcher + (["--no_local_rank"] if no_local_rank else []) + ["--module"]


@pytest.mark.parametrize("stage,no_local_rank,port", [(2, True, 29621), (3, False, 29622)])
def test_zero_two_ranks(tmp_path, stage, no_local_rank, port):
    """One run folder shared by both ranks, a log per rank, same loss on both, W&B only from
    rank 0, checkpoint + HF export (gathered from the ZeRO-3 shards)."""
    out = tmp_path / "out"
    proc = run_job([*TINY, f"deepspeed=zero{stage}", "trainer.max_steps=3",
                    "trainer.save_every=2", f"trainer.output_dir={out}",
                    "logging.wandb.mode=offline", "logging.image_every=0"], tmp_path,
                   launcher=_deepspeed(port, no_local_rank), timeout=400)
    log = check(proc)
    assert "summary" in log
    (run,) = run_dirs(out)
    rank0, rank1 = losses(run, 0), losses(run, 1)
    assert sorted(rank0) == [1, 2, 3] and rank0 == rank1
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"
    shards = list((run / "checkpoints" / "step_00000003").glob("*optim_states.pt"))
    assert len(shards) == 2
    weights = load_file(run / "hf" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape[1] == 64
    if stage == 3:  # gathered from the shards, equal to DeepSpeed's own consolidation
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        full = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"))
        assert set(weights) == {k.removeprefix("lm.") for k in full}
        for k, v in full.items():
            torch.testing.assert_close(weights[k.removeprefix("lm.")], v, atol=0, rtol=0)
