"""The fine-tuning job: ``python -m trainer.train [hydra overrides]``.

Also under ``deepspeed --num_gpus N [--no_local_rank] --module trainer.train ...`` and
``torchrun --nproc_per_node N -m trainer.train ...``. All ranks share one run folder
``trainer.output_dir/trainer.run_id`` (``PBS_RUN_ID``) and write ``train_rank<R>.log`` there.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .attention import install_attention, sdpa_backend_context
from .config import register_configs
from .data import answer_logit_positions, build_eval_dataset, build_train_dataset, retrieval_accuracy
from .engine import (build_engine, deepspeed_config, export_hf, find_resume_checkpoint,
                     init_distributed, load_checkpoint, save_checkpoint, use_bf16)
from .model import CausalLMWithChunkedLoss, build_model
from .tokenizer import build_tokenizer
from .wandb_logger import WandbLogger, flops_per_token, peak_flops, peak_memory_gb

log = logging.getLogger("trainer")
_SHUFFLE_MAX_LEN = 10**7  # datasets up to this length are shuffled per epoch; longer ones are
# generated on the fly (passkey) and already random per index.


class BatchSampler:
    """Deterministic global order: micro-batch ``m`` of ``step`` on ``rank`` depends only on
    (seed, step, m, rank), so resuming at a step replays exactly the same data."""

    def __init__(self, dataset, seed: int, micro_bs: int, grad_accum: int, world: int, rank: int):
        self.ds, self.seed = dataset, seed
        self.micro_bs, self.grad_accum, self.world, self.rank = micro_bs, grad_accum, world, rank
        self._perm: tuple[int, torch.Tensor] | None = None

    def _index(self, g: int) -> int:
        n = len(self.ds)
        if n > _SHUFFLE_MAX_LEN:
            return g % n
        epoch = g // n
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=gen))
        return int(self._perm[1][g % n])

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        first = ((step * self.grad_accum + micro) * self.world + self.rank) * self.micro_bs
        return collate([self.ds[self._index(first + j)] for j in range(self.micro_bs)])


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


@torch.no_grad()
def evaluate(engine, eval_sets: dict, micro_bs: int, device: torch.device) -> dict[str, float]:
    """Teacher-forced passkey retrieval accuracy and LM loss per eval length (all ranks take
    the same number of batches, so ZeRO-3 gathers stay in step)."""
    model: CausalLMWithChunkedLoss = engine.module
    rank, world = dist.get_rank(), dist.get_world_size()
    engine.eval()
    metrics = {}
    for seq_len, ds in eval_sets.items():
        stats = torch.zeros(4, dtype=torch.float64, device=device)  # correct, total, loss, n
        n_batches = math.ceil(len(ds) / (world * micro_bs))
        for b in range(n_batches):
            idx = [(b * world + rank) * micro_bs + j for j in range(micro_bs)]
            valid = [i < len(ds) for i in idx]
            batch = {k: v.to(device) for k, v in
                     collate([ds[i % len(ds)] for i in idx]).items()}
            hidden = model.hidden_states(batch["input_ids"], batch["length"])
            pos = answer_logit_positions(batch)
            answer_hidden = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
            logits = model.lm.get_output_embeddings()(answer_hidden)
            keep = torch.tensor(valid, device=device)
            sub = {k: v[keep] for k, v in batch.items()}
            if keep.any():
                correct, total = retrieval_accuracy(logits[keep], sub)
                stats += torch.tensor([correct, total, 0, 0], dtype=torch.float64, device=device)
            for i in range(micro_bs):  # same number of LM-head calls on every rank (ZeRO-3)
                loss = model.loss_from_hidden(hidden[i:i + 1], batch["labels"][i:i + 1])
                if valid[i]:
                    stats[2:] += torch.stack([loss.double(), loss.new_ones((), dtype=torch.float64)])
        dist.all_reduce(stats)
        metrics[f"eval/retrieval_acc/len_{seq_len:05d}"] = (stats[0] / stats[1]).item()
        metrics[f"eval/loss/len_{seq_len:05d}"] = (stats[2] / stats[3]).item()
    engine.train()
    accs = [v for k, v in metrics.items() if k.startswith("eval/retrieval_acc/")]
    losses = [v for k, v in metrics.items() if k.startswith("eval/loss/")]
    metrics["eval/retrieval_acc"] = sum(accs) / len(accs)
    metrics["eval/loss"] = sum(losses) / len(losses)
    log.info("eval | %s", " | ".join(f"{k.removeprefix('eval/')} {v:.4f}"
                                     for k, v in metrics.items()))
    return metrics


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from ``cfg``, train ``trainer.max_steps`` steps (or until
    ``trainer.max_minutes``), evaluate, save, export."""
    tr = cfg.trainer
    device = init_distributed(tr.device)
    if cfg.attention.impl == "flex" and cfg.attention.block_size % 64:
        raise ValueError(f"attention=flex needs attention.block_size a multiple of 64 (Flex's "
                         f"kernel tiles must divide it), got {cfg.attention.block_size}")
    if cfg.attention.impl == "flex" and device.type != "cuda":
        raise ValueError("attention=flex trains on CUDA only: torch FlexAttention has no backward "
                         f"on {device.type}")
    if tr.max_minutes < 0:
        raise ValueError(f"trainer.max_minutes must be >= 0 (0: no time limit), got "
                         f"{tr.max_minutes}")
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = HydraConfig.get().runtime.output_dir
    if rank != 0:  # other ranks log to their own file only
        for h in list(logging.getLogger().handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logging.getLogger().removeHandler(h)
    if device.type == "cpu" and world > 1 and "OMP_NUM_THREADS" not in os.environ:
        log.warning("%d CPU ranks without OMP_NUM_THREADS: set OMP_NUM_THREADS=1 (or cores per "
                    "rank) to avoid thread oversubscription (~5x slower steps)", world)
    random.seed(tr.seed)
    torch.manual_seed(tr.seed)

    tokenizer = build_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
    train_ds = build_train_dataset(cfg.data, tokenizer, tr.seed)
    if len(train_ds) == 0:
        raise ValueError(f"training dataset is empty (data.name={cfg.data.name})")
    eval_lens = list(cfg.data.eval_seq_lens) or [cfg.data.seq_len]
    eval_sets = {n: ds for n in eval_lens
                 if (ds := build_eval_dataset(cfg.data, tokenizer, tr.seed, n)) is not None}

    bf16 = use_bf16(cfg, device)
    ds_config = deepspeed_config(cfg, bf16)
    zero3_scope = None
    if cfg.deepspeed.stage == 3:  # partition weights while they load (needs accelerate)
        from transformers.integrations import HfDeepSpeedConfig
        zero3_scope = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive)
    lm = build_model(cfg.model, cfg.attention, len(tokenizer), max([cfg.data.seq_len, *eval_lens]),
                     dtype=torch.bfloat16 if bf16 else torch.float32)
    grad_ckpt = tr.gradient_checkpointing
    if grad_ckpt is None:
        grad_ckpt = cfg.data.seq_len >= 4096
    if grad_ckpt:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tracker = install_attention(lm, cfg.attention)
    model = CausalLMWithChunkedLoss(lm, cfg.model.loss_chunk_tokens)
    engine, scheduler = build_engine(model, cfg, ds_config)

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    resume = [find_resume_checkpoint(tr.resume, tr.output_dir) if rank == 0 else None]
    dist.broadcast_object_list(resume, src=0)
    start_step, tokens_seen = 0, 0
    if resume[0] is not None:
        state = load_checkpoint(engine, resume[0])
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        log.info("resumed from %s at step %d", resume[0], start_step)

    logger = WandbLogger(cfg, run_dir, rank)
    sampler = BatchSampler(train_ds, tr.seed, tr.micro_batch_size, tr.grad_accum, world, rank)
    tokens_per_step = tr.micro_batch_size * tr.grad_accum * world * cfg.data.seq_len
    log.info("run folder %s | %d ranks on %s | bf16=%s | ZeRO-%d | %.1fM params | attention=%s",
             run_dir, world, device.type, bf16, cfg.deepspeed.stage,
             sum(getattr(p, "ds_numel", p.numel()) for p in lm.parameters()) / 1e6,
             cfg.attention.impl)

    first_eval = {}
    if eval_sets and start_step == 0:
        first_eval = evaluate(engine, eval_sets, tr.micro_batch_size, device)
        logger.log(first_eval, step=0)
    bar = tqdm(total=tr.max_steps, initial=start_step, disable=rank != 0 or
               not cfg.logging.progress_bar, desc="train", dynamic_ncols=True)
    last = {}
    # DeepSpeed records the grad norm in its ZeRO/bf16 optimizers; plain fp32 needs our own.
    own_grad_norm = not (engine.zero_optimization() or engine.bfloat16_enabled())
    grad_norm = None
    loss_acc = torch.zeros((), device=device)
    t_log, steps_since_log, saved_step = time.perf_counter(), 0, None
    deadline = time.perf_counter() + 60 * tr.max_minutes if tr.max_minutes > 0 else None
    done = start_step
    snapshot = MemorySnapshot(cfg.logging.memory_snapshot_step, device, rank, run_dir)
    for step in range(start_step, tr.max_steps):
        done = step + 1
        snapshot.before_step(done)
        draw = (cfg.logging.image_every > 0 and rank == 0 and tracker.pbs_layers
                and done % cfg.logging.image_every == 0)
        tracker.capture_plan = bool(draw)
        log_step = done % tr.log_every == 0 or done == tr.max_steps
        tracker.time_plans = log_step  # plan timing only where it is read (no syncs otherwise)
        for micro in range(tr.grad_accum):
            batch = sampler.batch(step, micro)
            with sdpa_backend_context(cfg.attention.sdpa_backend):
                loss = engine(batch["input_ids"].to(device), batch["labels"].to(device),
                              batch["length"].to(device))
                engine.backward(loss)
            if own_grad_norm and micro == tr.grad_accum - 1:
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in engine.module.parameters() if p.grad is not None])
            engine.step()
            loss_acc += loss.detach().float() / tr.grad_accum
        tracker.capture_plan = tracker.time_plans = False
        snapshot.after_step(done)
        tokens_seen += tokens_per_step
        steps_since_log += 1
        if log_step:
            dist.all_reduce(loss_acc)
            densities = tracker.reduce()
            dt = (time.perf_counter() - t_log) / steps_since_log
            norm = float(grad_norm) if own_grad_norm else _grad_norm(engine)
            last = train_metrics(loss_acc.item() / world / steps_since_log,
                                 scheduler.get_last_lr()[0], norm, tokens_seen, dt,
                                 tokens_per_step, world, densities, tracker.reduce_plan_ms(),
                                 device, flops_per_token(lm.config, cfg.data.seq_len, densities))
            tps = last["perf/tokens_per_sec"]
            logger.log(last, step=done)
            if draw:
                logger.log_block_mask(tracker.last_plan, done, tracker.image_layer)
            bar.set_postfix(loss=f"{last['train/loss']:.3f}", tok_s=f"{tps:.0f}",
                            density=f"{last.get('attn/density', 1.0):.2f}")
            (log.debug if bar.disable is False else log.info)(
                "step %d | loss %.6f | lr %.2e | %.0f tok/s | density %.3f", done,
                last["train/loss"], last["train/lr"], tps, last.get("attn/density", 1.0))
            loss_acc.zero_()
            t_log, steps_since_log = time.perf_counter(), 0
        bar.update(1)
        if tr.eval_every and done % tr.eval_every == 0 and done < tr.max_steps and eval_sets:
            logger.log(evaluate(engine, eval_sets, tr.micro_batch_size, device), step=done)
        if tr.save_every and done % tr.save_every == 0:
            save_checkpoint(engine, ckpt_dir, done, _client_state(done, tokens_seen, world),
                            tr.keep_checkpoints)
            saved_step = done
        if deadline is not None and done < tr.max_steps and out_of_time(deadline, device):
            log.warning("trainer.max_minutes=%g reached: stopping at step %d of %d",
                        tr.max_minutes, done, tr.max_steps)
            break
    bar.close()

    final_eval = evaluate(engine, eval_sets, tr.micro_batch_size, device) if eval_sets else {}
    logger.log(final_eval, step=done)
    # The ZeRO-3 export rebuilds the weights from the final checkpoint, so it forces that save.
    export_needs_ckpt = tr.export_hf and engine.zero_optimization_stage() == 3
    if (tr.save_final or export_needs_ckpt) and saved_step != done:
        save_checkpoint(engine, ckpt_dir, done, _client_state(done, tokens_seen, world),
                        tr.keep_checkpoints)
    if tr.export_hf:
        export_hf(engine, lm, tokenizer, os.path.join(run_dir, "hf"), ckpt_dir)
    summary = {**last, **final_eval}
    if rank == 0:
        print_summary(summary, first_eval, run_dir)
    logger.finish(summary)
    return summary


def train_metrics(loss: float, lr: float, grad_norm: float, tokens_seen: int, step_time: float,
                  tokens_per_step: int, world: int, densities: dict[int, float],
                  plan_ms: float | None, device: torch.device,
                  flops_per_tok: float) -> dict[str, float]:
    """The W&B keys of one log step (MFU only on GPUs with a known peak; ``plan_ms``: PBS
    planning time of the log step, summed over layers and micro-batches)."""
    tps = tokens_per_step / step_time
    tflops = flops_per_tok * tps / world / 1e12
    metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
               "train/tokens_seen": tokens_seen, "perf/step_time_s": step_time,
               "perf/tokens_per_sec": tps, "perf/tokens_per_sec_per_gpu": tps / world,
               "perf/tflops_per_gpu": tflops, "mem/peak_gb": peak_memory_gb(device)}
    peak = peak_flops(device)
    if peak is not None:
        metrics["perf/mfu"] = tflops * 1e12 / peak
    if densities:
        metrics["attn/density"] = sum(densities.values()) / len(densities)
        metrics.update({f"attn/density/layer_{i:02d}": d for i, d in densities.items()})
    if plan_ms is not None:
        metrics["attn/plan_ms"] = plan_ms
    return metrics


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


def out_of_time(deadline: float, device: torch.device) -> bool:
    """True on every rank once any rank has passed ``deadline`` (so all ranks stop together)."""
    late = torch.tensor(float(time.perf_counter() > deadline), device=device)
    dist.all_reduce(late, op=dist.ReduceOp.MAX)
    return bool(late.item())


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def _client_state(step: int, tokens_seen: int, world: int) -> dict:
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return {"step": step, "tokens_seen": tokens_seen, "rng": states}


def print_summary(summary: dict, first_eval: dict, run_dir: str) -> None:
    """Plain table of the last logged metrics (and the retrieval accuracy before training)."""
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in sorted(summary.items())]
    for key in ("eval/retrieval_acc", "eval/loss"):
        if key in first_eval and key in summary:
            rows.append((f"{key} (before -> after)", f"{first_eval[key]:.4g} -> {summary[key]:.4g}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    print("\n".join(["", f"summary ({run_dir})", *lines]), flush=True)


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    train(cfg)


def main() -> None:
    # The deepspeed launcher without --no_local_rank appends --local_rank=N, which Hydra rejects.
    sys.argv = [a for a in sys.argv if not a.startswith(("--local_rank", "--local-rank"))]
    os.environ["PBS_RUN_ID"] = _run_id()
    register_configs()
    _hydra_main()
    if dist.is_initialized():  # clean exit on gloo (see shared environment facts)
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    main()
