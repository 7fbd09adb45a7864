"""Evaluation per eval length: LM loss (also by position bucket and, on held-out code, on
long-range recall tokens: ``trainer/lm_metrics.py``) and teacher-forced passkey retrieval."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .batching import attention_kwargs, collate
from .lm_metrics import lm_metrics, position_buckets, token_loss_stats
from .model import CausalLMWithChunkedLoss
from .parallel import SequenceParallel

log = logging.getLogger("trainer")


@torch.no_grad()
def evaluate(engine, eval_sets: dict, sp: SequenceParallel, device: torch.device,
             bucket_tokens: int) -> dict[str, float]:
    """``eval/loss[/len_NNNNN]`` (token-weighted), ``eval/loss_by_pos/...`` (buckets from
    ``bucket_tokens``, doubling), and where the eval items carry them ``eval/recall_loss[/...]``
    (``recall_mask``) and ``eval/retrieval_acc[/len_NNNNN]`` (``answer_mask``: a sample counts
    when every answer token is the argmax). Every rank runs the same number of batches and
    LM-head calls (ZeRO-3 gathers stay in step); under sequence parallelism each rank scores
    the tokens of its shard and the sums are reduced over all ranks."""
    model: CausalLMWithChunkedLoss = engine.module
    head = model.lm.get_output_embeddings()
    bs = sp.micro_batch_size
    edges = position_buckets(bucket_tokens, max(eval_sets))
    engine.eval()
    metrics, stats, has_recall = {}, {}, False
    for seq_len, ds in eval_sets.items():
        lm = torch.zeros(4 + 2 * (len(edges) - 1), dtype=torch.float64, device=device)
        retrieval = torch.zeros(2, dtype=torch.float64, device=device)  # correct, samples
        passkey = "answer_mask" in ds[0]
        for b in range(math.ceil(len(ds) / (sp.dp_world * bs))):
            idx = [(b * sp.dp_world + sp.dp_rank) * bs + j for j in range(bs)]
            valid = torch.tensor([i < len(ds) for i in idx], device=device)
            full = collate([ds[i % len(ds)] for i in idx])
            batch = {k: v.to(device) for k, v in sp.shard(full).items()}
            hidden = model.hidden_states(batch["input_ids"], batch["position_ids"],
                                         **attention_kwargs(batch))
            if passkey:
                retrieval += _retrieval(head, hidden, batch, full, sp, valid)
            recall = batch.get("shift_recall_mask")
            has_recall |= recall is not None
            for i in range(bs):  # same number of LM-head calls on every rank (ZeRO-3)
                labels = batch["shift_labels"][i:i + 1]
                losses = model.token_losses(hidden[i:i + 1], labels)
                if valid[i]:
                    lm += token_loss_stats(losses, labels, batch["position_ids"][i:i + 1],
                                           None if recall is None else recall[i:i + 1], edges)
        dist.all_reduce(lm)
        stats[seq_len] = lm
        if passkey:
            dist.all_reduce(retrieval)
            metrics[f"eval/retrieval_acc/len_{seq_len:05d}"] = (retrieval[0] / retrieval[1]).item()
    engine.train()
    metrics.update(lm_metrics(stats, edges, has_recall))
    for name in ("retrieval_acc", "loss", "recall_loss"):
        values = [v for k, v in metrics.items() if k.startswith(f"eval/{name}/len_")]
        if values:
            metrics[f"eval/{name}"] = sum(values) / len(values)
    log.info("eval | %s", " | ".join(f"{k.removeprefix('eval/')} {v:.4f}"
                                     for k, v in metrics.items()))
    return metrics


def _retrieval(head: torch.nn.Module, hidden: torch.Tensor, batch: dict, full: dict,
               sp: SequenceParallel, valid: torch.Tensor) -> torch.Tensor:
    """[correct, samples] of this rank's rows (counted on the group's first rank): each rank
    checks the answer tokens inside its shard and the group adds them up."""
    predicts_answer = F.pad(full["answer_mask"][:, 1:], (0, 1))  # hidden t -> token t+1
    where = sp.shard_tokens(predicts_answer).to(hidden.device)
    hit = torch.zeros_like(where)
    hit[where] = head(hidden[where]).argmax(-1) == batch["shift_labels"][where]
    right, answers = sp.all_reduce(torch.stack([hit.sum(1), where.sum(1)]))
    counts = torch.zeros(2, dtype=torch.float64, device=hidden.device)
    if sp.rank == 0:  # each sample once per group
        counts[0] += ((right == answers) & (answers > 0) & valid).sum()
        counts[1] += valid.sum()
    return counts
