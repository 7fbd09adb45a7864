"""DeepSpeed: distributed setup, config from Hydra, engine, checkpoints and the HF export."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import socket
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from omegaconf import DictConfig
from peft import PeftModel

from .adapters import merged_model
from .memory import check_host_memory

log = logging.getLogger("trainer")

LATEST = "latest"
MANIFEST = "manifest.json"


def init_distributed(device: str, timeout_min: float) -> torch.device:
    """Join (or, for plain ``python -m``, create) the process group, whose collectives fail
    after ``timeout_min`` minutes (``trainer.collective_timeout_min``); returns this rank's
    device."""
    if timeout_min <= 0:
        raise ValueError(f"trainer.collective_timeout_min must be > 0, got {timeout_min}")
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
    # A failed or timed-out NCCL collective ends the process (its watchdog names the rank and
    # the collective) instead of hanging; the flight recorder lets gloo errors name it too.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    # DeepSpeed's CPU shared-memory comm op serves only inference all-reduce (AutoTP), never
    # training; skip its JIT build at start-up, and with it the build lock that a run killed
    # during the build leaves behind (later runs then wait on it forever). DeepSpeed keeps
    # its op probe in one module dict so that edits like this one persist; only accelerators
    # with this op (CPU) read it, so others are left unprobed, as before.
    if get_accelerator().get_op_builder("ShareMemCommBuilder") is not None:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo",
                               timeout=timedelta(minutes=timeout_min))
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def set_collective_timeout(timeout_min: float) -> None:
    """Give every process group of this rank the timeout: the groups DeepSpeed and Ulysses
    create (ZeRO's data-parallel group among them) otherwise get torch's default (30 min on
    gloo, 10 on NCCL), not the one the default group was created with."""
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    for group in list(_world.pg_map):
        _set_pg_timeout(timedelta(minutes=timeout_min), group)


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
    partial = ds.offload_optimizer_ratio != 1.0
    if not 0.0 <= ds.offload_optimizer_ratio <= 1.0:
        raise ValueError(f"deepspeed.offload_optimizer_ratio must be in [0, 1], got "
                         f"{ds.offload_optimizer_ratio}")
    if partial and not (ds.stage == 3 and ds.offload_optimizer and optim.name == "cpu_adam"):
        raise ValueError("deepspeed.offload_optimizer_ratio < 1 (partial offload) needs stage 3, "
                         "deepspeed.offload_optimizer=true and optim=cpu_adam")
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
        if partial:
            zero["offload_optimizer"]["ratio"] = ds.offload_optimizer_ratio
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
    check_host_memory(model, ds_config, dist.get_world_size(),
                      int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))
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
    """Save ``step_XXXXXXXX`` on all ranks, record every file's size in its manifest, then
    (rank 0) atomically point ``latest`` at it and prune to the ``keep`` newest.

    DeepSpeed's own ``latest`` is written by rank 0 without waiting for the other ranks' shards;
    ours moves only after every rank has written its files, via rename, so a save that dies
    half-way leaves the previous checkpoint as ``latest``. The manifest lets resume tell a
    complete checkpoint from one truncated or missing files later (see ``checkpoint_problem``).
    """
    tag = f"step_{step:08d}"
    tag_dir = os.path.join(ckpt_dir, tag)
    rank0 = dist.get_rank() == 0
    if rank0 and os.path.isdir(tag_dir) and _read_latest(ckpt_dir) != tag:
        shutil.rmtree(tag_dir)  # what a killed save of this step left: start clean
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, _file_sizes(tag_dir))  # a writer sees its file's true size
    if rank0:
        files: dict[str, int] = {}
        for view in views:
            for name, size in view.items():
                files[name] = max(files.get(name, 0), size)
        _write_atomic(os.path.join(tag_dir, MANIFEST), json.dumps({"files": files}, indent=1))
        _write_atomic(os.path.join(ckpt_dir, LATEST), tag)
        if keep > 0:
            for old in _tags(ckpt_dir, up_to=tag)[keep:]:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()


def find_resume_checkpoint(resume: str, output_dir: str) -> tuple[str, str] | None:
    """(checkpoint dir, tag) to resume from. ``none`` -> None. ``auto`` -> the newest complete
    checkpoint under ``output_dir``: runs by the age of their ``latest`` (newest first), in each
    the tag ``latest`` names, then older ones; an incomplete one is skipped with a warning
    (None if none is left). A ``<run>/checkpoints`` dir (its ``latest``) or a
    ``<run>/checkpoints/step_N`` dir must be complete, else a clear error."""
    if resume == "none":
        return None
    if resume == "auto":
        latest = glob.glob(os.path.join(output_dir, "*", "checkpoints", LATEST))
        for ckpt_dir in map(os.path.dirname, sorted(latest, key=os.path.getmtime, reverse=True)):
            for tag in _tags(ckpt_dir, up_to=_read_latest(ckpt_dir)):
                problem = checkpoint_problem(os.path.join(ckpt_dir, tag))
                if problem is None:
                    return ckpt_dir, tag
                log.warning("trainer.resume=auto: skipping checkpoint %s: %s; trying the one "
                            "before it", os.path.join(ckpt_dir, tag), problem)
        return None
    resume = resume.rstrip("/")
    if os.path.isfile(os.path.join(resume, LATEST)):
        ckpt_dir, tag = resume, _read_latest(resume)
    elif os.path.basename(resume).startswith("step_") and os.path.isdir(resume):
        ckpt_dir, tag = os.path.split(resume)
    else:
        raise FileNotFoundError(f"trainer.resume={resume}: no '{LATEST}' file there (expected a "
                                "<run>/checkpoints directory or one of its step_N folders), or "
                                "use resume=auto / none")
    problem = checkpoint_problem(os.path.join(ckpt_dir, tag))
    if problem is not None:
        older = [t for t in _tags(ckpt_dir, up_to=tag)
                 if t != tag and checkpoint_problem(os.path.join(ckpt_dir, t)) is None]
        hint = (f"resume from the previous complete one with trainer.resume="
                f"{os.path.join(ckpt_dir, older[0])}" if older else "no older complete one here")
        raise RuntimeError(f"trainer.resume={resume}: checkpoint {tag} cannot be loaded: "
                           f"{problem}; {hint} (resume=auto falls back by itself)")
    return ckpt_dir, tag


def checkpoint_problem(tag_dir: str) -> str | None:
    """Why the checkpoint in ``tag_dir`` cannot be loaded (a file its manifest lists is missing
    or has another size, e.g. truncated by a kill or a full disk), or None. A checkpoint without
    a manifest (saved before manifests existed) is trusted."""
    if not os.path.isdir(tag_dir):
        return "its folder is missing"
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for name, size in sorted(files.items()):
        file = os.path.join(tag_dir, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, {size} when saved (truncated?)"
    return None


def load_checkpoint(engine, ckpt_dir: str, tag: str, sp_size: int) -> dict:
    """Load model, optimizer, scheduler of ``tag`` and return its client state. A checkpoint
    written under another sequence-parallel size is refused: the data order (rows per
    data-parallel rank) would change, so the run would not continue the same curve."""
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"failed to load checkpoint {tag} from {ckpt_dir}")
    saved = client_state.get("sequence_parallel_size", 1)
    if saved != sp_size:
        raise ValueError(f"{path} was saved with trainer.sequence_parallel_size={saved}; resume "
                         f"it with the same size (this run: {sp_size})")
    return client_state


def _tags(ckpt_dir: str, up_to: str) -> list[str]:
    """The ``step_N`` folders of ``ckpt_dir`` up to ``up_to``, newest first (newer ones are
    left by a save that never completed, or by a run resumed from an older checkpoint)."""
    names = (os.path.basename(p) for p in glob.glob(os.path.join(ckpt_dir, "step_*")))
    return sorted((n for n in names if n <= up_to), reverse=True)


def _read_latest(ckpt_dir: str) -> str:
    try:
        with open(os.path.join(ckpt_dir, LATEST)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def _file_sizes(folder: str) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, n), folder): os.path.getsize(os.path.join(d, n))
            for d, _, names in os.walk(folder) for n in names if n != MANIFEST}


def _write_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
