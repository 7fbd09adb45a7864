"""Planning for PBS attention: segment-wise key permutation and block selection.

Everything here runs under ``torch.no_grad`` on detached tensors (selection is a constant for
autograd, like top-k) and works on any device. Memory per head is O(N * D + (N / b)^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Temporary score tensors of the importance pass are kept under this many bytes.
_IMPORTANCE_CHUNK_BYTES = 512 * 2**20


@dataclass
class PBSPlan:
    """What PBS attention computes, in a form a reference can check exactly.

    Query ``i`` may attend the key stored at permuted position ``p`` iff
    ``block_mask[b, h, i // block_size, p // block_size]`` and ``key_perm[b, h // G, p] <= i``.
    With packed documents the block mask is block-diagonal (no block of one document selects a
    block of another; blocks outside documents are never computed) and segments are cut from
    each document's start: ``doc_first_block`` says where.
    """

    key_perm: torch.Tensor  # int64 (B, Hkv, N): original position of the key at permuted p
    block_mask: torch.Tensor  # bool (B, Hq, nb, nb): computed (query block, permuted key block)
    block_size: int
    segment_size: int
    # int32 (B, nb): first block of each block's document, -1 outside documents; None: one
    # document per row, spanning it
    doc_first_block: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.block_mask.shape[-1]

    @property
    def density(self) -> float:
        """Computed blocks over the blocks dense causal attention computes (syncs the device);
        with documents, causal blocks inside documents."""
        B, Hq, nb, _ = self.block_mask.shape
        if self.doc_first_block is None:
            return self.block_mask.sum().item() / (B * Hq * nb * (nb + 1) / 2)
        computed, causal = torch.stack([self.block_mask.sum().double(),
                                        self.causal_blocks().sum().double()]).tolist()
        return computed / (Hq * causal)

    def causal_blocks(self) -> torch.Tensor:
        """Float (B,): blocks dense causal attention computes per row and head; with documents
        the sum over documents of nb_d (nb_d + 1) / 2."""
        B, nb = self.block_mask.shape[0], self.num_blocks
        if self.doc_first_block is None:
            return torch.full((B,), nb * (nb + 1) / 2, device=self.block_mask.device)
        first = self.doc_first_block
        blk = torch.arange(nb, device=first.device)
        return torch.where(first >= 0, blk - first + 1, 0).sum(-1).float()

    def block_segments(self) -> torch.Tensor | None:
        """Int32 (B, nb): first block of each block's (document-relative) segment, -1 outside
        documents; None without documents (segment of block j: j // (S / b))."""
        if self.doc_first_block is None:
            return None
        first = self.doc_first_block
        blk = torch.arange(self.num_blocks, device=first.device, dtype=torch.int32)
        seg_blocks = self.segment_size // self.block_size
        return torch.where(first >= 0, first + (blk - first) // seg_blocks * seg_blocks, -1)

    def diagonal_segment_mask(self) -> torch.Tensor:
        """Bool, True where key block j lies in query block i's own segment: (nb, nb) without
        documents, (B, 1, nb, nb) with them (broadcasts against ``block_mask``)."""
        segments = self.block_segments()
        if segments is None:
            return same_segment(self.num_blocks, self.block_size, self.segment_size,
                                self.block_mask.device)
        same = (segments[:, :, None] == segments[:, None, :]) & (segments >= 0)[:, :, None]
        return same[:, None]

    def density_per_head(self) -> torch.Tensor:
        """Float (B, Hq): computed blocks over causal blocks (inside documents) for each head."""
        if self.doc_first_block is None:
            nb = self.num_blocks
            return self.block_mask.sum((-1, -2)).float() / (nb * (nb + 1) / 2)
        return self.block_mask.sum((-1, -2)).float() / self.causal_blocks()[:, None]


@dataclass(frozen=True)
class Documents:
    """Layout of packed rows as device tables (built without a host sync from validated
    ``doc_starts`` / ``query_end``, see ``kernels.attention``). Document d of row b covers
    tokens [starts[b, d], end_blocks[b, d] * block_size): its real tokens end at ends[b, d], the
    rest of its last block are its pads. Unused slots: start = end = N (no block)."""

    starts: torch.Tensor  # int32 (B, M): first token of each document
    ends: torch.Tensor  # int32 (B, M): real end (exclusive) of each document
    end_blocks: torch.Tensor  # int32 (B, M): first block after each document
    block_doc: torch.Tensor  # int32 (B, nb): document slot of each block, -1 outside documents
    first_block: torch.Tensor  # int32 (B, nb): first block of each block's document, -1 outside

    @property
    def num_slots(self) -> int:
        return self.starts.shape[1]

    def complete_keys(self, segment_size: int, block_size: int) -> torch.Tensor:
        """Int32 (B, M): keys in each document's complete segments (0 when its padded length
        N_d <= S), as ``segment_permutation`` counts them for a sequence of N_d."""
        padded = self.end_blocks * block_size - self.starts
        return torch.where(padded > segment_size, padded // segment_size * segment_size, 0)

    def spans(self, block_size: int) -> list[list[tuple[int, int, int]]]:
        """Per row, (start, real end, padded end) of each document (host lists: syncs)."""
        rows = zip(self.starts.tolist(), self.ends.tolist(), self.end_blocks.tolist())
        return [[(s, e, end_block * block_size) for s, e, end_block in zip(*row) if s < e]
                for row in rows]


def document_layout(doc_starts: torch.Tensor, query_end: torch.Tensor | None, N: int,
                    block_size: int) -> Documents:
    """Device tables of a (validated) packed layout; no host sync. ``query_end`` (B, M) or
    None (each document ends where the next starts, the last at N)."""
    starts = doc_starts.to(torch.int32)
    B, _ = starts.shape
    used = starts < N
    following = torch.cat([starts[:, 1:], starts.new_full((B, 1), N)], 1)
    ends = following if query_end is None else torch.where(used, query_end.to(torch.int32), N)
    end_blocks = (ends + block_size - 1) // block_size
    nb = N // block_size
    first_token = torch.arange(0, N, block_size, device=starts.device, dtype=torch.int32)
    doc = torch.searchsorted(starts.contiguous(), first_token.expand(B, nb).contiguous(),
                             right=True, out_int32=True) - 1
    inside = torch.arange(nb, device=starts.device) < end_blocks.gather(1, doc.long())
    block_doc = torch.where(inside, doc, -1)
    first_block = torch.where(inside, (starts // block_size).gather(1, doc.long()), -1)
    return Documents(starts, ends, end_blocks, block_doc, first_block)


def same_segment(nb: int, block_size: int, segment_size: int,
                 device: torch.device | str) -> torch.Tensor:
    seg = torch.arange(nb, device=device) * block_size // segment_size
    return seg[:, None] == seg[None, :]


def segment_permutation(q: torch.Tensor, k: torch.Tensor, block_size: int, segment_size: int,
                        scale: float, query_end: torch.Tensor | None = None) -> torch.Tensor:
    """Key order inside each complete segment, most important key first.

    Importance of a key = softmax attention it gets from the last ``block_size`` queries
    (no causal mask, over the keys of all complete segments), averaged over those queries and
    over the G query heads that share its KV head. ``query_end`` (int (B,), optional): the
    real length of each right-padded sequence; its last queries before that end are used.
    Returns int64 (B, Hkv, N); the incomplete tail segment (and every N <= segment_size) keeps
    identity order. (Triton: :func:`kernels.triton_plan.triton_segment_permutation`.)
    """
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    n_complete = (N // segment_size) * segment_size if N > segment_size else 0
    key_perm = identity_permutation(k)
    if n_complete == 0:
        return key_perm

    nq = min(block_size, N)
    if query_end is None:
        q_last = q[:, :, N - nq:, :]
    else:
        start = (query_end.clamp(max=N) - nq).clamp(min=0)
        rows = (start[:, None] + torch.arange(nq, device=q.device))[:, None, :, None]
        q_last = torch.gather(q, 2, rows.expand(B, Hq, nq, D))
    q_last = q_last.reshape(B, Hkv, G * nq, D)
    k_seg = k[:, :, :n_complete, :]
    importance = torch.empty(B, Hkv, n_complete, device=k.device, dtype=torch.float32)
    rows_bytes = B * G * nq * n_complete * k.element_size()
    heads_per_chunk = max(1, _IMPORTANCE_CHUNK_BYTES // rows_bytes)
    for h0 in range(0, Hkv, heads_per_chunk):
        h1 = min(Hkv, h0 + heads_per_chunk)
        scores = torch.matmul(q_last[:, h0:h1] * scale, k_seg[:, h0:h1].transpose(-1, -2))
        importance[:, h0:h1] = torch.softmax(scores, -1).mean(dim=-2, dtype=torch.float32)

    n_seg = n_complete // segment_size
    order = torch.argsort(importance.view(B, Hkv, n_seg, segment_size), dim=-1,
                          descending=True, stable=True)
    offsets = torch.arange(0, n_complete, segment_size, device=k.device).view(1, 1, n_seg, 1)
    key_perm[:, :, :n_complete] = (order + offsets).view(B, Hkv, n_complete)
    return key_perm


def block_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over blocks of ``block_size`` tokens along dim -2; a short last block is averaged
    over its real tokens only. (B, H, N, D) -> (B, H, ceil(N / b), D) float32."""
    N = x.shape[-2]
    n_full = N // block_size
    pooled = x[..., :n_full * block_size, :].unflatten(-2, (n_full, block_size)).sum(
        dim=-2, dtype=torch.float32) / block_size
    if N % block_size:
        tail = x[..., n_full * block_size:, :].sum(dim=-2, keepdim=True, dtype=torch.float32)
        pooled = torch.cat([pooled, tail / (N % block_size)], dim=-2)
    return pooled


def select_blocks(q: torch.Tensor, k_perm: torch.Tensor, key_perm: torch.Tensor, block_size: int,
                  segment_size: int, threshold: float, sink: bool, scale: float,
                  density: float | None = None) -> torch.Tensor:
    """Bool block mask (B, Hq, nb, nb) over (query block, permuted key block).

    Off-segment key blocks are ranked by softmax(pooled_q . pooled_k * scale) and the smallest
    top set whose mass reaches ``threshold`` is kept (or, when ``density`` is given, the top
    ``ceil(density * causal_blocks)`` minus the always-computed ones). The sink block (the
    permuted block holding token 0, as in the authors' ``first_token_mask``) and every
    key block of the query block's own segment that holds a key at or before the block's last
    query are always kept. (Triton: :func:`kernels.triton_plan.triton_select_blocks`.)
    """
    B, Hq, N, D = q.shape
    Hkv = k_perm.shape[1]
    G = Hq // Hkv
    nb = math.ceil(N / block_size)
    device = q.device

    pq = block_pool(q, block_size).view(B, Hkv, G * nb, D)
    pk = block_pool(k_perm, block_size)
    scores = torch.matmul(pq, pk.transpose(-1, -2)).view(B, Hq, nb, nb) * scale

    diag = same_segment(nb, block_size, segment_size, device)
    blk = torch.arange(nb, device=device)
    n_allowed = (blk * block_size // segment_size) * (segment_size // block_size)
    off_segment = blk[None, :] < n_allowed[:, None]  # key blocks of strictly earlier segments
    budget = None
    if density is not None:
        always = (diag & (blk[None, :] <= blk[:, None])).sum(-1) + int(sink)
        budget = (torch.ceil(density * (blk + 1).float()) - always).clamp_(min=0)

    if density is None and threshold >= 1.0:
        keep = off_segment.expand(B, Hq, nb, nb).clone()
    else:
        scores = scores.masked_fill(~off_segment, float("-inf"))
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        if budget is None:
            probs = torch.softmax(sorted_scores, dim=-1).nan_to_num_(0.0)
            before = torch.cumsum(probs, dim=-1) - probs  # mass of the blocks ranked higher
            keep_sorted = before < threshold
        else:
            keep_sorted = blk[None, :].float() < budget[:, None]
        keep_sorted = keep_sorted & torch.isfinite(sorted_scores)
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)

    min_pos = torch.nn.functional.pad(key_perm, (0, nb * block_size - N), value=N)
    min_pos = min_pos.view(B, Hkv, nb, block_size).amin(dim=-1)  # (B, Hkv, nb)
    if sink:  # the block where token 0 landed (in segment 0), not permuted block 0
        keep |= (min_pos == 0).repeat_interleave(G, dim=1)[:, :, None, :]
    # Diagonal segment: keep key block j if some key in it precedes the block's last query.
    last_q = torch.clamp(blk * block_size + block_size - 1, max=N - 1)
    reachable = min_pos[:, :, None, :] <= last_q[None, None, :, None]  # (B, Hkv, nb, nb)
    reachable = reachable.repeat_interleave(G, dim=1)
    keep |= diag & reachable
    return keep


def identity_permutation(k: torch.Tensor) -> torch.Tensor:
    B, Hkv, N, _ = k.shape
    return torch.arange(N, device=k.device).expand(B, Hkv, N).clone()


def permute_keys(x: torch.Tensor, key_perm: torch.Tensor) -> torch.Tensor:
    """Gather (B, Hkv, N, D) rows into permuted order (differentiable in x)."""
    return torch.gather(x, 2, key_perm.unsqueeze(-1).expand_as(x))
