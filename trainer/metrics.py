"""What one log step reports: throughput in real tokens, FLOPs, densities; and the summary."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .attention import DensityTracker
from .batching import context_length, real_tokens
from .wandb_logger import flops_per_token, peak_flops, peak_memory_gb


class StepMeter:
    """Counts what the rows held (host-side, no device sync): real (non-pad) tokens, row tokens,
    documents and rows, once per sample (only the first rank of a sequence-parallel group
    counts), and the losses of the steps whose update was applied (on the device). ``reduce``
    sums them since its last call over all ranks (one all-reduce); ``tokens_seen`` is the
    running total of real tokens, ``resumed`` included."""

    def __init__(self, counts_samples: bool, resumed: int, device: torch.device):
        self.counts_samples, self.resumed = counts_samples, resumed
        self.start = time.perf_counter()
        self.steps = 0
        self._window = [0.0] * 6  # real, row tokens, documents, rows, real * context, losses
        self._total = 0.0  # real tokens since start-up
        self._loss = torch.zeros((), dtype=torch.float64, device=device)

    def add_loss(self, loss: torch.Tensor) -> None:
        """The mean loss of a step whose update was applied (skipped steps' are left out)."""
        self._loss += loss.detach()
        self._window[5] += 1

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        if not self.counts_samples:
            return
        real = real_tokens(batch)
        rows, n = batch["input_ids"].shape
        docs = int((batch["doc_starts"] < n).sum()) if "doc_starts" in batch else rows
        for i, x in enumerate((real, rows * n, docs, rows, real * context_length(batch))):
            self._window[i] += x
        self._total += real

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Totals over all ranks since the last call, then reset: ``steps`` (optimizer steps),
        ``seconds``, ``real_tokens``, ``row_tokens``, ``docs``, ``rows``, ``context`` (mean
        causal context per real token), ``tokens_seen`` and ``loss`` (mean over ranks and the
        applied steps; NaN if none was applied)."""
        t = torch.tensor([*self._window, self._total], dtype=torch.float64, device=device)
        t = torch.cat([t, self._loss.view(1)])
        dist.all_reduce(t)
        real, row_tokens, docs, rows, weighted, losses, total, loss = t.tolist()
        now = time.perf_counter()
        out = {"steps": self.steps, "seconds": now - self.start, "real_tokens": real,
               "row_tokens": row_tokens, "docs": docs, "rows": rows,
               "context": weighted / max(real, 1.0), "tokens_seen": self.resumed + int(total),
               "loss": loss / losses if losses else float("nan")}
        self.start, self.steps, self._window = now, 0, [0.0] * 6
        self._loss.zero_()
        return out

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the enclosed time (eval, checkpoint) out of the step time."""
        t0 = time.perf_counter()
        yield
        self.start += time.perf_counter() - t0

    def tokens_seen(self, device: torch.device) -> int:
        """Real tokens trained so far, over all ranks (one all-reduce)."""
        t = torch.tensor([self._total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return self.resumed + int(t.item())


def attention_stats(tracker: DensityTracker,
                    device: torch.device) -> tuple[dict[int, float], float | None]:
    """Density per PBS layer and plan time since the last call, each the mean over all ranks
    (one all-reduce): every rank plans its own heads (sequence parallelism) or rows (data
    parallelism). Plan time None where nothing was timed."""
    densities, plan_ms = tracker.reduce(), tracker.reduce_plan_ms()
    t = torch.tensor([*densities.values(), plan_ms or 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    means = (t / dist.get_world_size()).tolist()
    return dict(zip(densities, means)), None if plan_ms is None else means[-1]


def train_metrics(loss: float, lr: float, grad_norm: float, counts: dict, densities: dict[int, float], plan_ms: float | None, device: torch.device,
                  model_config) -> dict[str, float]:
    """The W&B keys of one log step. Throughput counts real tokens, each once (not once per
    sequence-parallel rank); TFLOP/s and MFU are per GPU (6 x matmul params + causal attention
    inside documents on the computed blocks); ``plan_ms``: PBS planning time of the log step on
    one GPU, summed over layers and micro-batches (mean over GPUs)."""
    world = dist.get_world_size()
    step_time = counts["seconds"] / max(counts["steps"], 1)
    tps = counts["real_tokens"] / counts["seconds"]
    tflops = flops_per_token(model_config, counts["context"], densities) * tps / world / 1e12
    metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
               "train/tokens_seen": counts["tokens_seen"], "perf/step_time_s": step_time,
               "perf/tokens_per_sec": tps, "perf/tokens_per_sec_per_gpu": tps / world,
               "perf/tflops_per_gpu": tflops, "mem/peak_gb": peak_memory_gb(device),
               "data/packing_efficiency": counts["real_tokens"] / max(counts["row_tokens"], 1),
               "data/docs_per_row": counts["docs"] / max(counts["rows"], 1)}
    peak = peak_flops(device)
    if peak is not None:
        metrics["perf/mfu"] = tflops * 1e12 / peak
    if densities:
        metrics["attn/density"] = sum(densities.values()) / len(densities)
        metrics.update({f"attn/density/layer_{i:02d}": d for i, d in densities.items()})
    if plan_ms is not None:
        metrics["attn/plan_ms"] = plan_ms
    return metrics


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
