"""DeepSpeed: distributed setup, config from Hydra, engine, checkpoints and the HF export."""

from __future__ import annotations

import glob
import math
import os
import shutil
import socket

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from omegaconf import DictConfig
from peft import PeftModel

from .adapters import merged_model

LATEST = "latest"


def init_distributed(device: str) -> torch.device:
    """Join (or, for plain ``python -m``, create) the process group; returns this rank's device."""
    if "WORLD_SIZE" not in os.environ:  # plain `python -m`: a group of one on a free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT",
                          str(port)), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def use_bf16(cfg: DictConfig, device: torch.device) -> bool:
    mode = str(cfg.deepspeed.bf16).lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"deepspeed.bf16 must be auto, true or false, got {cfg.deepspeed.bf16!r}")
    if mode == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return mode == "true"


def deepspeed_config(cfg: DictConfig, bf16: bool) -> dict:
    """The DeepSpeed JSON config, built from the Hydra ``deepspeed``/``optim``/``trainer`` groups."""
    ds, optim, tr = cfg.deepspeed, cfg.optim, cfg.trainer
    if ds.stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.stage must be 0..3, got {ds.stage}")
    if ds.offload_param and ds.stage != 3:
        raise ValueError("deepspeed.offload_param needs stage 3")
    if ds.offload_optimizer and ds.stage < 2:
        raise ValueError("deepspeed.offload_optimizer needs stage 2 or 3")
    zero: dict = {"stage": ds.stage}
    if ds.stage >= 2:
        zero.update(overlap_comm=ds.overlap_comm, contiguous_gradients=ds.contiguous_gradients,
                    reduce_bucket_size=ds.reduce_bucket_size)
    if ds.stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "gradient_clipping": tr.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if optim.name in ("fused_adam", "cpu_adam"):
        config["optimizer"] = {"type": "Adam" if optim.name == "fused_adam" else "AdamW",
                               "params": {"lr": optim.lr, "betas": list(optim.betas),
                                          "eps": optim.eps, "weight_decay": optim.weight_decay,
                                          "adam_w_mode": True}}
        if optim.name == "cpu_adam" and not ds.offload_optimizer:
            raise ValueError("optim=cpu_adam needs optimizer offload (deepspeed=zero2_offload "
                             "or zero3_offload)")
    elif optim.name != "adamw":
        raise ValueError(f"optim.name must be adamw, fused_adam or cpu_adam, got {optim.name!r}")
    return config


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_engine(model: torch.nn.Module, cfg: DictConfig, ds_config: dict, mpu=None):
    """``deepspeed.initialize`` with torch AdamW (or DeepSpeed's Adam) and warmup + cosine;
    ``mpu``: the sequence-parallel groups (trainer/parallel.py), None without."""
    optim, tr = cfg.optim, cfg.trainer
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = None
    if optim.name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas),
                                      eps=optim.eps)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(
            s, optim.warmup_steps, tr.max_steps, optim.min_lr_ratio))

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=None if optimizer else groups,
        lr_scheduler=schedule, config=ds_config, mpu=mpu)
    return engine, scheduler


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(engine, ckpt_dir: str, step: int, client_state: dict, keep: int) -> None:
    """Save ``step_XXXXXXXX`` on all ranks, then (rank 0) atomically point ``latest`` at it.

    DeepSpeed's own ``latest`` is written by rank 0 without waiting for the other ranks' shards;
    we write ours only after the closing barrier, via rename, so an interrupted save leaves the
    previous checkpoint as ``latest``.
    """
    tag = f"step_{step:08d}"
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = os.path.join(ckpt_dir, f".{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(ckpt_dir, LATEST))
        if keep > 0:
            old = sorted(glob.glob(os.path.join(ckpt_dir, "step_*")))[:-keep]
            for path in old:
                shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def find_resume_checkpoint(resume: str, output_dir: str) -> str | None:
    """Checkpoint dir (holding ``latest``) to resume from: ``none`` -> None, ``auto`` -> the run
    under ``output_dir`` whose ``latest`` is newest (None if there is none), else the given dir."""
    if resume == "none":
        return None
    if resume == "auto":
        latest = glob.glob(os.path.join(output_dir, "*", "checkpoints", LATEST))
        return os.path.dirname(max(latest, key=os.path.getmtime)) if latest else None
    if not os.path.isfile(os.path.join(resume, LATEST)):
        raise FileNotFoundError(f"trainer.resume={resume}: no '{LATEST}' file there (expected a "
                                "<run>/checkpoints directory), or use resume=auto / none")
    return resume


def load_checkpoint(engine, ckpt_dir: str, sp_size: int) -> dict:
    """Load model, optimizer, scheduler and return the client state of ``latest``. A checkpoint
    written under another sequence-parallel size is refused: the data order (rows per
    data-parallel rank) would change, so the run would not continue the same curve."""
    path, client_state = engine.load_checkpoint(ckpt_dir, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"failed to load a checkpoint from {ckpt_dir}")
    saved = client_state.get("sequence_parallel_size", 1)
    if saved != sp_size:
        raise ValueError(f"{path} was saved with trainer.sequence_parallel_size={saved}; resume "
                         f"it with the same size (this run: {sp_size})")
    return client_state


# ---------------------------------------------------------------- HF export


def export_hf(engine, lm, tokenizer, out_dir: str, ckpt_dir: str | None,
              adapter_dir: str) -> None:
    """``save_pretrained`` (safetensors) + tokenizer on rank 0. Under ZeRO-3 the full fp32 weights
    are rebuilt from the just-saved checkpoint's shards (DeepSpeed's zero_to_fp32). A ``peft``
    model also saves its adapter to ``adapter_dir``; ``out_dir`` then holds the merged model."""
    rank0 = dist.get_rank() == 0
    state = None
    if engine.zero_optimization_stage() == 3:
        if ckpt_dir is None:
            raise ValueError("ZeRO-3 export needs a saved checkpoint")
        dist.barrier()
        if rank0:
            state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir)
            state = {k.removeprefix("lm."): v for k, v in state.items()}
    if rank0:
        if state is None:
            state = {k.removeprefix("lm."): v.detach().cpu()
                     for k, v in engine.module.state_dict().items()}
        if isinstance(lm, PeftModel):
            merged_model(lm, state, adapter_dir).save_pretrained(out_dir, safe_serialization=True)
        else:
            lm.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    dist.barrier()
