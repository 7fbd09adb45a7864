"""The fine-tuning job: ``python -m trainer.train [hydra overrides]``.

Also under ``deepspeed --num_gpus N [--no_local_rank] --module trainer.train ...`` and
``torchrun --nproc_per_node N -m trainer.train ...``. All ranks share one run folder
``trainer.output_dir/trainer.run_id`` (``PBS_RUN_ID``) and write ``train_rank<R>.log`` there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass

import deepspeed
import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .adapters import ADAPTER_DIR, apply_peft, check_peft, trainable_summary
from .attention import DensityTracker, install_attention, sdpa_backend_context
from .batching import BatchSampler, attention_kwargs
from .config import register_configs
from .data import build_eval_dataset, build_train_dataset
from .engine import (build_engine, deepspeed_config, export_hf, find_resume_checkpoint,
                     init_distributed, load_checkpoint, save_checkpoint, set_collective_timeout,
                     use_bf16)
from .evaluation import evaluate
from .lm_metrics import position_buckets
from .faults import (NONFINITE_MODES, StepGuard, StopSignals, Verdict, clear_stale_build_locks,
                     collective_errors)
from .liger import apply_liger, check_liger
from .memory import MemorySnapshot, activation_offload, tile_mlps
from .metrics import StepMeter, attention_stats, print_summary, train_metrics
from .model import CausalLMWithChunkedLoss, architecture_config, build_model
from .parallel import SequenceParallel, check_sequence_parallel
from .tokenizer import build_tokenizer
from .wandb_logger import WandbLogger

log = logging.getLogger("trainer")


@dataclass
class Job:
    """Everything the train loop runs on, built from the config by :func:`build_job`."""

    cfg: DictConfig
    device: torch.device
    rank: int
    run_dir: str
    tokenizer: PreTrainedTokenizerBase
    lm: PreTrainedModel
    engine: deepspeed.DeepSpeedEngine
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tracker: DensityTracker
    sp: SequenceParallel
    train_ds: Dataset
    eval_sets: dict[int, Dataset]
    offload: contextlib.AbstractContextManager
    zero3_scope: object | None  # transformers' HfDeepSpeedConfig: must outlive the model


def build_job(cfg: DictConfig) -> Job:
    """Process group, checks, tokenizer, data, model (with attention, gradient checkpointing,
    memory switches and sequence parallelism) and the DeepSpeed engine."""
    tr = cfg.trainer
    device = init_distributed(tr.device, tr.collective_timeout_min)
    rank, world = dist.get_rank(), dist.get_world_size()
    _quiet_other_ranks(rank, world, device)
    if int(os.environ["LOCAL_RANK"]) == 0:  # one rank per node, before any rank loads an op
        clear_stale_build_locks()
    dist.barrier()
    resolve_block_size(cfg.attention, device)
    random.seed(tr.seed)
    torch.manual_seed(tr.seed)

    tokenizer = build_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
    seq_lens = [cfg.data.seq_len, *(list(cfg.data.eval_seq_lens) or [cfg.data.seq_len])]
    model_config = architecture_config(cfg.model, len(tokenizer), max(seq_lens))
    check_job(cfg, device, model_config, world, seq_lens)
    sp = SequenceParallel(tr.sequence_parallel_size, tr.micro_batch_size, rank, world)
    train_ds = build_train_dataset(cfg.data, tokenizer, tr.seed, cfg.attention.block_size)
    if len(train_ds) == 0:
        raise ValueError(f"training dataset is empty (data.name={cfg.data.name})")
    eval_sets = {n: ds for n in dict.fromkeys(seq_lens[1:])
                 if (ds := build_eval_dataset(cfg.data, tokenizer, tr.seed, n)) is not None}

    bf16 = use_bf16(cfg, device)
    ds_config = deepspeed_config(cfg, bf16)
    zero3_scope = None
    if cfg.deepspeed.stage == 3:  # partition weights while they load (needs accelerate)
        from transformers.integrations import HfDeepSpeedConfig
        zero3_scope = HfDeepSpeedConfig(ds_config)
    lm = build_model(cfg.model, cfg.attention, model_config,
                     dtype=torch.bfloat16 if bf16 else torch.float32)
    grad_ckpt = tr.gradient_checkpointing
    if grad_ckpt is None:
        grad_ckpt = cfg.data.seq_len >= 4096
    if grad_ckpt:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm = apply_peft(lm, cfg)
    fused_loss = apply_liger(lm, cfg.model.liger, device)
    if cfg.model.tiled_mlp:
        tile_mlps(lm)
    tracker = install_attention(lm, cfg.attention)
    sp.register(lm, cfg.data.seq_len)
    engine, scheduler = build_engine(
        CausalLMWithChunkedLoss(lm, cfg.model.loss_chunk_tokens, fused_loss), cfg, ds_config,
        sp.mpu)
    set_collective_timeout(tr.collective_timeout_min)  # also on the groups made since init
    run_dir = HydraConfig.get().runtime.output_dir
    log.info("run folder %s | %d ranks on %s (sequence parallel %d) | bf16=%s | ZeRO-%d | "
             "attention=%s, blocks of %s | loss: %s | %s", run_dir, world, device.type, sp.size,
             bf16, cfg.deepspeed.stage, cfg.attention.impl, cfg.attention.block_size,
             "Liger fused linear cross-entropy" if fused_loss else "chunked",
             trainable_summary(lm))
    return Job(cfg, device, rank, run_dir, tokenizer, lm, engine, scheduler, tracker, sp,
               train_ds, eval_sets, activation_offload(tr.activation_offload, grad_ckpt, device),
               zero3_scope)


def forward_backward(job: Job, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One micro-batch: this rank's shard, forward, its share of the token-weighted mean loss
    over the sequence-parallel group, backward (gradients accumulate until ``engine.step``).
    Returns the micro-batch's loss (the whole sequence's, on every rank of the group)."""
    inputs = {k: v.to(job.device) for k, v in job.sp.shard(batch).items()}
    with sdpa_backend_context(job.cfg.attention.sdpa_backend), job.offload:
        loss_sum, tokens = job.engine(inputs["input_ids"], inputs["shift_labels"],
                                      inputs["position_ids"], **attention_kwargs(inputs))
        loss = job.sp.mean_loss(loss_sum, tokens)
        job.engine.backward(loss)
    return job.sp.all_reduce(loss.detach().float())


def train(cfg: DictConfig) -> dict[str, float]:
    """Build the job and :func:`run` it, with SIGTERM/SIGUSR1 turned into a clean stop and the
    W&B run finished (as failed) if training raises."""
    with StopSignals() as signals:
        job = build_job(cfg)
        with WandbLogger(cfg, job.run_dir, job.rank) as logger:
            return run(job, logger, signals)


def run(job: Job, logger: WandbLogger, signals: StopSignals) -> dict[str, float]:
    """Train ``trainer.max_steps`` steps, evaluate, save, export. ``trainer.max_minutes`` ends
    training early (the final eval, save and export still run); a stop signal on any rank ends
    it after the current step with a checkpoint and nothing else, for ``trainer.resume=auto``."""
    cfg, tr, engine, sp, tracker, device = (job.cfg, job.cfg.trainer, job.engine, job.sp,
                                            job.tracker, job.device)
    start_step, tokens_seen, nonfinite_steps = resume(engine, tr, job.rank, sp.size)
    buckets = cfg.data.loss_bucket_tokens
    sampler = BatchSampler(job.train_ds, tr.seed, tr.micro_batch_size, tr.grad_accum,
                           sp.dp_world, sp.dp_rank)
    meter = StepMeter(counts_samples=sp.rank == 0, resumed=tokens_seen, device=device)
    guard = StepGuard(tr.nonfinite, signals, tr.max_minutes, device, logger, nonfinite_steps)
    snapshot = MemorySnapshot(cfg.logging.memory_snapshot_step, device, job.rank, job.run_dir)
    bar = tqdm(total=tr.max_steps, initial=start_step, disable=job.rank != 0 or
               not cfg.logging.progress_bar, desc="train", dynamic_ncols=True)
    first_eval, last, done, verdict = {}, {}, start_step, Verdict()
    saved_step = start_step or None  # a resumed run's checkpoint exists already
    if job.eval_sets and start_step == 0:
        first_eval = evaluate(engine, job.eval_sets, sp, device, buckets)
        logger.log(first_eval, step=0)
    for step in range(start_step, tr.max_steps):
        done = step + 1
        snapshot.before_step(done)
        draw = (cfg.logging.image_every > 0 and job.rank == 0 and tracker.pbs_layers
                and done % cfg.logging.image_every == 0)
        tracker.capture_plan = bool(draw)
        log_now = done % tr.log_every == 0 or done == tr.max_steps
        tracker.time_plans = log_now  # plan timing only where it is read (no syncs otherwise)
        verdict, grad_norm = train_step(job, sampler, meter, guard, step)
        tracker.capture_plan = tracker.time_plans = False
        snapshot.after_step(done)
        if log_now:
            last = log_step(job, logger, meter, guard, grad_norm, done, echo=bar.disable)
            if draw:
                logger.log_block_mask(tracker.last_plan, done, tracker.image_layer)
            bar.set_postfix(loss=f"{last['train/loss']:.3f}",
                            tok_s=f"{last['perf/tokens_per_sec']:.0f}",
                            density=f"{last.get('attn/density', 1.0):.2f}")
        bar.update(1)
        with meter.paused():
            if (tr.eval_every and done % tr.eval_every == 0 and done < tr.max_steps
                    and job.eval_sets and not verdict.stop):
                logger.log(evaluate(engine, job.eval_sets, sp, device, buckets), step=done)
            if (tr.save_every and done % tr.save_every == 0) or verdict.signal:
                save(job, meter, guard, done)
                saved_step = done
        if verdict.signal:
            log.warning("%s received: stopping at step %d of %d, checkpoint step_%08d saved; "
                        "trainer.resume=auto continues from it", verdict.signal, done,
                        tr.max_steps, done)
            break
        if verdict.late:
            log.warning("trainer.max_minutes=%g reached: stopping at step %d of %d",
                        tr.max_minutes, done, tr.max_steps)
            break
    bar.close()
    if verdict.signal:  # no final eval or export: the requeued job does them
        summary = {**last, "stopped_by": verdict.signal}
        logger.finish(summary)
        return summary

    final_eval = evaluate(engine, job.eval_sets, sp, device, buckets) if job.eval_sets else {}
    logger.log(final_eval, step=done)
    # The ZeRO-3 export rebuilds the weights from the final checkpoint, so it forces that save.
    export_needs_ckpt = tr.export_hf and engine.zero_optimization_stage() == 3
    if (tr.save_final or export_needs_ckpt) and saved_step != done:
        save(job, meter, guard, done)
    if tr.export_hf:
        export_hf(engine, job.lm, job.tokenizer, os.path.join(job.run_dir, "hf"),
                  os.path.join(job.run_dir, "checkpoints"), os.path.join(job.run_dir, ADAPTER_DIR))
    summary = {**last, **final_eval}
    if job.rank == 0:
        print_summary(summary, first_eval, job.run_dir)
    logger.finish(summary)
    return summary


def train_step(job: Job, sampler: BatchSampler, meter: StepMeter, guard: StepGuard,
               step: int) -> tuple[Verdict, torch.Tensor | None]:
    """One optimizer step over ``trainer.grad_accum`` micro-batches; the guard's verdict, the
    same on every rank, decides whether its update is applied and whether the job stops.
    Returns it and the gradient norm where DeepSpeed records none (else None)."""
    tr, engine = job.cfg.trainer, job.engine
    loss = torch.zeros((), device=job.device)
    for micro in range(tr.grad_accum):
        batch = sampler.batch(step, micro)
        meter.add(batch)
        micro_loss = forward_backward(job, batch)
        guard.watch(micro_loss)
        loss += micro_loss / tr.grad_accum
        if micro < tr.grad_accum - 1:
            engine.step()  # accumulation only: DeepSpeed updates at the last micro-batch
    grad_norm = own_grad_norm(engine)
    verdict = guard.decide(step + 1, grad_norm)
    with guard.applying(engine, verdict):
        engine.step()
    guard.after_step(engine, job.scheduler, verdict, step + 1)
    meter.steps += 1
    if verdict.apply:
        meter.add_loss(loss)
    return verdict, grad_norm


def log_step(job: Job, logger: WandbLogger, meter: StepMeter, guard: StepGuard,
             grad_norm: torch.Tensor | None, step: int, echo: bool) -> dict[str, float]:
    """Reduce and log the metrics of the steps since the last log step (``echo``: also as an
    INFO line, where no progress bar shows them)."""
    counts = meter.reduce(job.device)
    densities, plan_ms = attention_stats(job.tracker, job.device)
    norm = float(grad_norm) if grad_norm is not None else _grad_norm(job.engine)
    metrics = train_metrics(counts["loss"], job.scheduler.get_last_lr()[0], norm, counts,
                            densities, plan_ms, job.device, job.lm.config)
    metrics["train/nonfinite_steps"] = guard.nonfinite_steps
    logger.log(metrics, step=step)
    log.log(logging.INFO if echo else logging.DEBUG,
            "step %d | loss %.6f | lr %.2e | %.0f tok/s | density %.3f", step,
            metrics["train/loss"], metrics["train/lr"], metrics["perf/tokens_per_sec"],
            metrics.get("attn/density", 1.0))
    return metrics


def save(job: Job, meter: StepMeter, guard: StepGuard, step: int) -> None:
    """Checkpoint ``step`` with the client state resume needs (step, tokens, non-finite steps,
    every rank's RNG, the sequence-parallel size)."""
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    state = {"step": step, "tokens_seen": meter.tokens_seen(job.device), "rng": states,
             "nonfinite_steps": guard.nonfinite_steps, "sequence_parallel_size": job.sp.size}
    save_checkpoint(job.engine, os.path.join(job.run_dir, "checkpoints"), step, state,
                    job.cfg.trainer.keep_checkpoints)


def own_grad_norm(engine) -> torch.Tensor | None:
    """The gradient norm where DeepSpeed records none (fp32 without ZeRO), before the step."""
    if engine.zero_optimization() or engine.bfloat16_enabled():
        return None
    return torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters()
                                          if p.grad is not None])


def check_job(cfg: DictConfig, device: torch.device, model_config, world: int,
              seq_lens: list[int]) -> None:
    """Errors for settings that cannot run, before any data or model is built."""
    attn, tr = cfg.attention, cfg.trainer
    if attn.impl == "flex" and attn.block_size % 64:
        raise ValueError(f"attention=flex needs attention.block_size a multiple of 64 (Flex's "
                         f"kernel tiles must divide it), got {attn.block_size}")
    if attn.impl == "flex" and device.type != "cuda":
        raise ValueError("attention=flex trains on CUDA only: torch FlexAttention has no backward "
                         f"on {device.type}")
    position_buckets(cfg.data.loss_bucket_tokens, max(seq_lens))  # raises for a bad value
    if tr.max_minutes < 0:
        raise ValueError(f"trainer.max_minutes must be >= 0 (0: no time limit), got "
                         f"{tr.max_minutes}")
    if tr.nonfinite not in NONFINITE_MODES:
        raise ValueError(f"trainer.nonfinite must be one of {', '.join(NONFINITE_MODES)}, got "
                         f"{tr.nonfinite!r}")
    check_sequence_parallel(cfg, model_config, world, seq_lens)
    check_peft(cfg, model_config)
    check_liger(cfg.model.liger, device)


def resolve_block_size(attn: DictConfig, device: torch.device) -> None:
    """``attention.block_size: null`` -> 128 on CUDA (the kernels' fast tiles: 1.75x dense at
    64K on an H200 against 1.26x with 64, docs/results.md), 64 elsewhere."""
    if attn.block_size is None:
        attn.block_size = 128 if device.type == "cuda" else 64


def resume(engine, tr: DictConfig, rank: int, sp_size: int) -> tuple[int, int, int]:
    """(step, tokens seen, non-finite steps) of the checkpoint ``trainer.resume`` names (zeros
    for none), loaded into ``engine`` with every rank's RNG state."""
    found = [find_resume_checkpoint(tr.resume, tr.output_dir) if rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    if found[0] is None:
        return 0, 0, 0
    ckpt_dir, tag = found[0]
    state = load_checkpoint(engine, ckpt_dir, tag, sp_size)
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    log.info("resumed from %s at step %d", os.path.join(ckpt_dir, tag), state["step"])
    return state["step"], state["tokens_seen"], state.get("nonfinite_steps", 0)


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _quiet_other_ranks(rank: int, world: int, device: torch.device) -> None:
    """Ranks other than 0 log to their own file only; warn about CPU thread oversubscription."""
    if rank != 0:
        for h in list(logging.getLogger().handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logging.getLogger().removeHandler(h)
    if device.type == "cpu" and world > 1 and "OMP_NUM_THREADS" not in os.environ:
        log.warning("%d CPU ranks without OMP_NUM_THREADS: set OMP_NUM_THREADS=1 (or cores per "
                    "rank) to avoid thread oversubscription (~5x slower steps)", world)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def _run_id() -> str:
    """One id per job, equal on all ranks: PBS_RUN_ID, SLURM_JOB_ID, the launcher's start time
    (ranks of one node share their parent), else now."""
    if os.environ.get("PBS_RUN_ID"):
        return os.environ["PBS_RUN_ID"]
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    start = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            with open(f"/proc/{os.getppid()}/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/stat") as f:
                boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
            start = boot + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            return f"ppid-{os.getppid()}"
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(start))


# An absolute path: also found when another module calls main() (tests/fault_job.py).
@hydra.main(version_base="1.3", config_name="config",
            config_path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf"))
def _hydra_main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    with collective_errors():
        train(cfg)


def main() -> None:
    # The deepspeed launcher without --no_local_rank appends --local_rank=N, which Hydra rejects.
    sys.argv = [a for a in sys.argv if not a.startswith(("--local_rank", "--local-rank"))]
    os.environ["PBS_RUN_ID"] = _run_id()
    register_configs()
    try:
        _hydra_main()
    except BaseException as e:  # Hydra reports a failed job as SystemExit(1)
        if not dist.is_initialized():
            raise
        if not isinstance(e, SystemExit):
            traceback.print_exc()
        _exit(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _exit(0)


def _exit(code: int) -> None:
    """Flush and leave at once: interpreter teardown with a gloo group can abort (shared
    environment facts), or wait on a peer that died."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
