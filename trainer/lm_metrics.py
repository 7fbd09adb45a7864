"""Held-out LM metrics beside the mean loss: loss by position bucket and long-range recall.

Both are sums and counts over tokens: each rank adds up the tokens it holds (its rows, and its
1/sp shard of each row under sequence parallelism) and one all-reduce over all ranks gives the
totals, so the values are exact under data and sequence parallelism. Positions are the
``position_ids`` of the predicting tokens, which restart at every packed document.
"""

from __future__ import annotations

import torch

from .packing import IGNORE


def position_buckets(first: int, longest: int) -> list[int]:
    """Bucket edges 0, first, 2 first, 4 first, ... up to the first edge >= ``longest``."""
    if first < 1 or first & (first - 1):
        raise ValueError(f"data.loss_bucket_tokens must be a power of two, got {first}")
    edges = [0, first]
    while edges[-1] < longest:
        edges.append(2 * edges[-1])
    return edges


def token_loss_stats(losses: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor,
                     recall: torch.Tensor | None, edges: list[int]) -> torch.Tensor:
    """float64 vector of sums and counts over the scored positions (target not -100):
    [loss sum, tokens, recall loss sum, recall tokens, then (loss sum, tokens) per position
    bucket of ``edges``]. ``losses``, ``targets``, ``positions`` (of the predicting token) and
    ``recall`` (whether the target is a long-range recall token; None: none is) share one shape."""
    scored = targets != IGNORE
    loss = torch.where(scored, losses.double(), 0.0)
    bucket = torch.bucketize(positions, torch.tensor(edges[1:-1], device=positions.device),
                             right=True)[scored]
    buckets = torch.zeros(len(edges) - 1, 2, dtype=torch.float64, device=losses.device)
    buckets[:, 0].index_add_(0, bucket, loss[scored])
    buckets[:, 1].index_add_(0, bucket, torch.ones_like(loss[scored]))
    hit = scored & recall if recall is not None else torch.zeros_like(scored)
    head = torch.stack([loss.sum(), scored.sum().double(), loss[hit].sum(), hit.sum().double()])
    return torch.cat([head, buckets.flatten()])


def lm_metrics(stats: dict[int, torch.Tensor], edges: list[int],
               recall: bool) -> dict[str, float]:
    """``eval/loss/len_NNNNN`` and, with ``recall``, ``eval/recall_tokens/len_NNNNN`` and
    ``eval/recall_loss/len_NNNNN`` (where there were any) per eval length; ``eval/loss_by_pos/
    AAAAA-BBBBB`` (positions AAAAA to BBBBB) pooled over the lengths, for buckets with tokens.
    ``stats``: the summed :func:`token_loss_stats` of each eval length."""
    metrics, pooled = {}, sum(stats.values())
    for n, s in stats.items():
        s = s.tolist()
        metrics[f"eval/loss/len_{n:05d}"] = s[0] / max(s[1], 1.0)
        if recall:
            metrics[f"eval/recall_tokens/len_{n:05d}"] = s[3]
            if s[3] > 0:
                metrics[f"eval/recall_loss/len_{n:05d}"] = s[2] / s[3]
    for (lo, hi), (total, count) in zip(zip(edges, edges[1:]), pooled[4:].view(-1, 2).tolist()):
        if count > 0:
            metrics[f"eval/loss_by_pos/{lo:05d}-{hi - 1:05d}"] = total / count
    return metrics
