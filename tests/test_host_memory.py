"""ZeRO offload's host memory: estimated from the model and the DeepSpeed config, checked
before DeepSpeed allocates it (an 8B full fine-tuning with optimizer offload needs ~128 GB)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.trainer_utils import TINY, check, compose_config, run_job
from trainer import memory
from trainer.engine import deepspeed_config
from trainer.memory import check_host_memory, offload_host_bytes

OPTIMIZER = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
BOTH = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                              "offload_param": {"device": "cpu"}}}


def lora_like() -> torch.nn.Module:
    """1,000 + 10 parameters, 10 of them trainable (a frozen base and a small adapter)."""
    model = torch.nn.Sequential(torch.nn.Linear(100, 10), torch.nn.Linear(10, 1, bias=False))
    model[0].requires_grad_(False)
    return model


def test_offload_bytes_count_trainable_and_all_parameters_per_node():
    model = lora_like()
    assert offload_host_bytes(model, {"zero_optimization": {"stage": 3}}, 1, 1) == 0
    assert offload_host_bytes(model, OPTIMIZER, 1, 1) == 16 * 10
    assert offload_host_bytes(model, BOTH, 1, 1) == 16 * 10 + 2 * 1020
    # 4 ranks share the state, 2 of them on this node: half of it here
    assert offload_host_bytes(model, BOTH, 4, 2) == (16 * 10 + 2 * 1020) // 2
    # ZeRO-3 partitioned parameters report their full size in ds_numel
    model[1].weight.ds_numel = 1000
    model[1].weight.data = torch.empty(0)
    assert offload_host_bytes(model, OPTIMIZER, 1, 1) == 16 * 1000


def test_partial_offload_keeps_whole_sub_groups_on_the_gpu(monkeypatch):
    """DeepSpeed's partial offload (ZeRO-3, ``ratio``) keeps the first int((1 - ratio) * n) of
    its n sub-groups on the GPU: the host holds the rest."""
    assert memory.offloaded_share(8_030_000_000, 1.0) == 1.0
    assert memory.offloaded_share(8_030_000_000, 0.5) == 5 / 9  # 9 sub-groups, 4 on the GPU
    assert memory.offloaded_share(8_030_000_000, 0.0) == 0.0
    assert memory.offloaded_share(10, 0.5) == 1.0  # one sub-group: int(0.5) = 0 on the GPU
    monkeypatch.setattr(memory, "SUB_GROUP_SIZE", 4)  # the 10 trainable parameters: 3 groups
    partial = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu",
                                                                        "ratio": 0.5}}}
    assert offload_host_bytes(lora_like(), partial, 1, 1) == round(16 * 10 * 2 / 3)


@pytest.mark.parametrize("overrides, error", [
    (["deepspeed=zero3_offload", "optim=cpu_adam", "deepspeed.offload_optimizer_ratio=1.5"],
     r"offload_optimizer_ratio must be in \[0, 1\], got 1.5"),
    (["deepspeed=zero2_offload", "optim=cpu_adam", "deepspeed.offload_optimizer_ratio=0.5"],
     "needs stage 3"),
    (["deepspeed=zero3_offload", "deepspeed.offload_optimizer_ratio=0.5"], "optim=cpu_adam"),
])
def test_partial_offload_config_errors(overrides, error):
    with pytest.raises(ValueError, match=error):
        deepspeed_config(compose_config(overrides), bf16=False)


def test_partial_offload_reaches_deepspeed():
    cfg = compose_config(["deepspeed=zero3_offload", "optim=cpu_adam",
                          "deepspeed.offload_optimizer_ratio=0.3"])
    assert deepspeed_config(cfg, bf16=False)["zero_optimization"]["offload_optimizer"][
        "ratio"] == 0.3
    full = deepspeed_config(compose_config(["deepspeed=zero3_offload", "optim=cpu_adam"]), False)
    assert "ratio" not in full["zero_optimization"]["offload_optimizer"]


def test_too_little_host_memory_fails_before_allocation(monkeypatch):
    model = lora_like()
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=100))
    with pytest.raises(MemoryError, match=r"ZeRO offload needs about .* GB of host memory.*"
                                          r"only 0 GB is available.*peft=lora"):
        check_host_memory(model, OPTIMIZER, 1, 1)
    check_host_memory(model, {"zero_optimization": {"stage": 2}}, 1, 1)  # no offload: no check
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=10**6))
    check_host_memory(model, BOTH, 1, 1)


def test_offload_job_logs_its_host_memory(tmp_path):
    out = check(run_job([*TINY, "deepspeed=zero2_offload", "trainer.max_steps=2",
                         "trainer.eval_every=0", "data.eval_samples=0", "trainer.save_final=false",
                         "trainer.export_hf=false", f"trainer.output_dir={tmp_path}/out"],
                        tmp_path))
    assert "ZeRO offload: about 0.0 GB of host memory on this node" in out
