"""Memory for the longest contexts: DeepSpeed's activation-checkpoint offload and tiled MLP,
the host memory that ZeRO offload needs (checked before it is allocated), and a CUDA memory
snapshot of one step for analysis."""

from __future__ import annotations

import contextlib
import logging
import math
import os

import psutil
import torch

from .model import param_numel

log = logging.getLogger("trainer")


def activation_offload(enabled: bool, gradient_checkpointing: bool,
                       device: torch.device) -> contextlib.AbstractContextManager:
    """Context for forward + backward that moves each checkpointed decoder layer's input to
    pinned CPU memory until the backward needs it (DeepSpeed's
    ``get_checkpoint_hidden_states_offloading_ctx_manager``); without ``enabled``, nothing."""
    if not enabled:
        return contextlib.nullcontext()
    if not gradient_checkpointing:
        raise ValueError("trainer.activation_offload offloads the inputs of checkpointed layers: "
                         "it needs trainer.gradient_checkpointing=true")
    from deepspeed.runtime.activation_checkpointing.offload_activations import (
        get_checkpoint_hidden_states_offloading_ctx_manager)
    cuda = device.type == "cuda"
    if not cuda:
        log.warning("trainer.activation_offload on %s: activations are in host memory already, "
                    "nothing is moved", device.type)
    return get_checkpoint_hidden_states_offloading_ctx_manager(use_pin_memory=cuda,
                                                               use_streams=cuda)


def tile_mlps(model: torch.nn.Module) -> int:
    """Run every decoder MLP (gate/up/down projections) through DeepSpeed's ``TiledMLP``: the
    sequence in shards of ``hidden_size`` tokens, recomputed in backward, so the (N, intermediate)
    activations of one layer never exist at once. The MLP's own forward runs on each shard (Liger's
    SwiGLU where patched in before; LoRA layers inside); its trainable parameters (the weights, or
    the LoRA factors) get their gradient once, after the last shard. Returns the number of MLPs
    tiled."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def tile(mlp):
        body = mlp.forward

        def tiled_forward(x):
            shards = math.ceil(x.shape[-2] / x.shape[-1])  # equal on every rank: same lengths
            params = [p for p in mlp.parameters() if p.requires_grad]
            return TiledMLP.apply(lambda _, shard: body(shard), mlp, x, shards, params)
        mlp.forward = tiled_forward

    mlps = [m for m in model.modules()
            if all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
    if not mlps:
        raise ValueError(f"model.tiled_mlp: {type(model).__name__} has no gate/up/down MLPs")
    for m in mlps:
        tile(m)
    return len(mlps)


# Host bytes per parameter that ZeRO offload keeps on the CPU: fp32 master weight, fp32 gradient
# and Adam's two moments for every trainable parameter (optimizer offload); the 16-bit weight for
# every parameter (parameter offload).
OPTIMIZER_OFFLOAD_BYTES = 16
PARAM_OFFLOAD_BYTES = 2
SUB_GROUP_SIZE = 1_000_000_000  # ZeRO-3's default sub_group_size: partial offload's unit


def offloaded_share(numel: int, ratio: float) -> float:
    """The share of ``numel`` optimizer parameters that ZeRO-3's partial offload keeps on the CPU:
    DeepSpeed keeps the first ``int((1 - ratio) * n)`` of its ``n`` sub-groups on the GPU."""
    if ratio >= 1.0:
        return 1.0
    n = max(1, math.ceil(numel / SUB_GROUP_SIZE))
    return (n - int((1 - ratio) * n)) / n


def offload_host_bytes(model: torch.nn.Module, ds_config: dict, world_size: int,
                       local_world_size: int) -> int:
    """Host memory this node needs for ZeRO's CPU offload: each rank keeps its 1/world share
    of the offloaded state, ``local_world_size`` ranks share the node. 0 without offload.
    A lower bound: pinned staging buffers and the process itself come on top."""
    zero = ds_config.get("zero_optimization", {})
    per_param = 0
    numel = [(param_numel(p), p.requires_grad) for p in model.parameters()]
    if "offload_optimizer" in zero:
        trained = sum(n for n, train in numel if train)
        ratio = zero["offload_optimizer"].get("ratio", 1.0)
        per_param += round(OPTIMIZER_OFFLOAD_BYTES * trained
                           * offloaded_share(trained // world_size, ratio))
    if "offload_param" in zero:
        per_param += PARAM_OFFLOAD_BYTES * sum(n for n, _ in numel)
    return per_param * local_world_size // world_size


def check_host_memory(model: torch.nn.Module, ds_config: dict, world_size: int,
                      local_world_size: int) -> None:
    """Fail before DeepSpeed allocates the offloaded state if this node's available memory
    cannot hold it (otherwise the kernel's out-of-memory killer ends the job mid-step, with
    no message from the trainer)."""
    need = offload_host_bytes(model, ds_config, world_size, local_world_size)
    available = psutil.virtual_memory().available
    if need > available:
        gb = 1e9
        raise MemoryError(
            f"ZeRO offload needs about {need / gb:.0f} GB of host memory on this node "
            f"({OPTIMIZER_OFFLOAD_BYTES} bytes per trainable parameter with "
            f"deepspeed.offload_optimizer, {PARAM_OFFLOAD_BYTES} per parameter with "
            f"deepspeed.offload_param, shared by {world_size} ranks, {local_world_size} on this "
            f"node), only {available / gb:.0f} GB is available: train fewer parameters "
            f"(peft=lora), keep part of the optimizer on the GPU (ZeRO-3: "
            f"deepspeed.offload_optimizer_ratio < 1), spread the job over more nodes, or turn "
            f"offload off")
    if need:
        log.info("ZeRO offload: about %.1f GB of host memory on this node (%.1f GB available)",
                 need / 1e9, available / 1e9)


class MemorySnapshot:
    """Records every CUDA allocation during step ``step`` (rank 0) and dumps the history to
    ``<run_dir>/memory_snapshot_step_NNNNN.pickle`` (pytorch.org/memory_viz or
    ``python -m bench.memory_peak``). ``step`` 0: off."""

    def __init__(self, step: int, device: torch.device, rank: int, run_dir: str):
        if step < 0:
            raise ValueError(f"logging.memory_snapshot_step must be >= 0 (0: off), got {step}")
        self.step = step if rank == 0 else 0
        self.path = os.path.join(run_dir, f"memory_snapshot_step_{step:05d}.pickle")
        if self.step and device.type != "cuda":
            log.warning("logging.memory_snapshot_step=%d ignored: memory snapshots need CUDA "
                        "(running on %s)", step, device.type)
            self.step = 0

    def before_step(self, step: int) -> None:
        if step == self.step:
            # Stacks of allocations only, Python frames only (what bench.memory_peak reads):
            # recording the stacks of frees made the backward fail on an H200 (torch 2.11,
            # SystemError from run_backward).
            torch.cuda.memory._record_memory_history(max_entries=1_000_000, context="alloc",
                                                     stacks="python")

    def after_step(self, step: int) -> None:
        if step == self.step:
            torch.cuda.synchronize()
            torch.cuda.memory._dump_snapshot(self.path)
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("memory snapshot of step %d: %s", step, self.path)
