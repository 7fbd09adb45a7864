"""Micro-batches: the deterministic sampler, collation and what a batch carries.

A batch is a dict of tensors. Per-token fields (``SEQUENCE_KEYS``, shape (B, N)) are what
sequence parallelism shards along N; everything else is per row and stays whole:

- ``input_ids``, ``labels`` (HF convention: aligned with the inputs, -100 = no loss),
  ``position_ids`` (restart at 0 at every packed document), ``shift_labels`` (the target of each
  position: ``labels`` shifted left by one, -100 at the end, made before any sharding so that a
  shard's last position still has its target), ``answer_mask`` (passkey items), ``recall_mask``
  (held-out code rows: long-range recall tokens) and ``shift_recall_mask`` (whether the target
  of each position is one, shifted like ``shift_labels``);
- padded rows: ``length`` (B,), the real tokens before the right padding;
- packed rows: ``doc_starts`` and ``doc_ends`` (B, M), the first token and the real end of each
  document (slots past a row's last document hold N), as ``kernels.pbs_plan`` takes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE

SEQUENCE_KEYS = ("input_ids", "labels", "shift_labels", "position_ids", "answer_mask",
                 "recall_mask", "shift_recall_mask")
_SHUFFLE_MAX_LEN = 10**7  # datasets up to this length are shuffled per epoch; longer ones are
# generated on the fly (passkey) and already random per index.


class BatchSampler:
    """Deterministic global order: micro-batch ``m`` of ``step`` on data-parallel rank ``rank``
    depends only on (seed, step, m, rank), so resuming at a step replays exactly the same data.
    Ranks of one sequence-parallel group share a data-parallel rank: they get the same rows."""

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
    """Stack items; pad per-row document lists to the batch's most documents (with N); add
    ``position_ids`` (0..N-1 where the items have none), ``shift_labels`` and, for rows with a
    ``recall_mask``, ``shift_recall_mask``."""
    batch = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key in ("doc_starts", "doc_ends"):
            n, most = items[0]["input_ids"].shape[0], max(len(x) for x in values)
            values = [F.pad(x, (0, most - len(x)), value=n) for x in values]
        batch[key] = torch.stack(values)
    ids = batch["input_ids"]
    if "position_ids" not in batch:
        batch["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
    batch["shift_labels"] = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    if "recall_mask" in batch:
        batch["shift_recall_mask"] = F.pad(batch["recall_mask"][:, 1:], (0, 1), value=False)
    return batch


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding (what throughput counts), from host-side batch fields."""
    if "doc_starts" in batch:
        return int((batch["doc_ends"] - batch["doc_starts"]).sum())
    if "length" in batch:
        return int(batch["length"].sum())
    return batch["input_ids"].numel()


def context_length(batch: dict[str, torch.Tensor]) -> float:
    """Mean causal context length that attention FLOPs scale with: sum of L^2 over the
    documents (or padded rows) of length L, over the real tokens."""
    if "doc_starts" in batch:
        lengths = batch["doc_ends"] - batch["doc_starts"]
    elif "length" in batch:
        lengths = batch["length"]
    else:
        lengths = torch.full(batch["input_ids"].shape[:1], batch["input_ids"].shape[1])
    return float((lengths.double() ** 2).sum() / lengths.sum().clamp(min=1))


def attention_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the PBS layers need besides q, k, v: the documents of packed rows (GLOBAL token
    offsets, also under sequence parallelism), or the real length of right-padded rows."""
    if "doc_starts" in batch:
        return {"pbs_doc_starts": batch["doc_starts"], "pbs_query_end": batch["doc_ends"]}
    if "length" in batch:
        return {"pbs_query_end": batch["length"]}
    return {}
