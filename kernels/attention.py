"""Public entry points: ``pbs_attention`` (plan, then attend with Triton or pure torch),
``pbs_plan`` (the plan alone) and ``block_sparse_attention`` (attend over a given plan)."""

from __future__ import annotations

import os
import weakref

import torch

from .plan import (Documents, PBSPlan, document_layout, identity_permutation, permute_keys,
                   segment_permutation, select_blocks)
from .reference import reference_attention

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_HEAD_DIMS = (32, 64, 128)


def pbs_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 128,
                  segment_size: int = 256, threshold: float = 0.9, sink: bool = True,
                  permute: bool = True, *, density: float | None = None,
                  scale: float | None = None, query_end: torch.Tensor | None = None,
                  doc_starts: torch.Tensor | None = None, return_plan: bool = False,
                  backend: str = "auto") -> torch.Tensor | tuple[torch.Tensor, PBSPlan]:
    """Causal permuted block-sparse attention.

    Args:
        q: (B, Hq, N, D); k, v: (B, Hkv, N, D) with Hq a multiple of Hkv (GQA).
        block_size: tokens per query/key block (b).
        segment_size: tokens per permutation segment (S), a multiple of ``block_size``.
        threshold: cumulative block-score mass to keep per query block, in (0, 1].
        sink: always compute the key block holding token 0 (after the permutation: the block
            where token 0 landed; with documents, each document's first token).
        permute: reorder keys inside segments by importance (False: the MeanPooling baseline).
        density: if given, keep a fixed share of causal blocks per query block instead of
            ``threshold`` (for controlled comparisons).
        scale: softmax scale, default 1/sqrt(D).
        query_end: optional int (B,) real length of each right-padded sequence: key importance
            then comes from the last ``block_size`` queries before it, not from padding. With
            ``doc_starts``: int (B, M), the absolute real end (exclusive) of each document,
            ``start_d < end_d <= next start`` (or N), ignored in unused slots; the rest of a
            document's last block are its pads, blocks after it up to the next document (or
            N) belong to no document (never computed, output 0).
        doc_starts: optional int32/int64 (B, M) on q's device: packed rows, the first token of
            each document of each row. Used slots strictly increasing multiples of
            ``block_size``, the first 0; unused trailing slots hold N; N must be a multiple of
            ``block_size``. Attention never crosses documents; segments, permutation,
            importance (from each document's last real queries), selection, sink and density
            are per document: each document's rows equal ``pbs_attention`` on that document
            alone (see ``doc_starts_from_position_ids``). Checking the values needs them on
            the host (a device sync on CUDA): done once per tensor object and version (a weak
            memo), so passing the same tensors to every layer of a forward syncs once.
        return_plan: also return the :class:`PBSPlan` (permutation, block mask, density).
        backend: "triton", "torch" (dense masked reference) or "auto" (Triton on CUDA or
            under ``TRITON_INTERPRET=1``, else torch).

    Returns (B, Hq, N, D) in the original token order and the input dtype.
    """
    _validate(q, k, v, block_size, segment_size, threshold, density)
    backend, scale, docs = _setup(q, block_size, scale, backend, query_end, doc_starts)
    plan = _plan(q, k, block_size, segment_size, threshold, sink, permute, density, scale,
                 query_end, docs, backend == "triton")
    out = _attend(q, k, v, plan, scale, backend)
    return (out, plan) if return_plan else out


def pbs_plan(q: torch.Tensor, k: torch.Tensor, block_size: int = 128, segment_size: int = 256,
             threshold: float = 0.9, sink: bool = True, permute: bool = True, *,
             density: float | None = None, scale: float | None = None,
             query_end: torch.Tensor | None = None, doc_starts: torch.Tensor | None = None,
             backend: str = "auto") -> PBSPlan:
    """The plan of :func:`pbs_attention` with the same arguments (permutation + block selection,
    no attention): ``block_sparse_attention(q, k, v, pbs_plan(q, k, ...))`` equals
    ``pbs_attention(q, k, v, ...)``. Lets callers time or reuse the plan."""
    _validate(q, k, k, block_size, segment_size, threshold, density)
    backend, scale, docs = _setup(q, block_size, scale, backend, query_end, doc_starts)
    return _plan(q, k, block_size, segment_size, threshold, sink, permute, density, scale,
                 query_end, docs, backend == "triton")


@torch.no_grad()
def _plan(q, k, block_size, segment_size, threshold, sink, permute, density, scale, query_end,
          docs: Documents | None, use_triton) -> PBSPlan:
    """The plan (a constant for autograd). The torch path pools a temporary permuted copy of
    the keys; the Triton path reads them in original order through ``key_perm``."""
    q, k = q.detach(), k.detach()
    if docs is None:
        key_perm, block_mask = (_triton_plan if use_triton else _torch_plan)(
            q, k, block_size, segment_size, threshold, sink, permute, density, scale, query_end)
        return PBSPlan(key_perm, block_mask, block_size, segment_size)
    if use_triton:
        key_perm, block_mask = _triton_plan(q, k, block_size, segment_size, threshold, sink,
                                            permute, density, scale, None, docs)
    else:
        key_perm, block_mask = _torch_document_plan(q, k, block_size, segment_size, threshold,
                                                    sink, permute, density, scale, docs)
    return PBSPlan(key_perm, block_mask, block_size, segment_size, docs.first_block)


def _triton_plan(q, k, block_size, segment_size, threshold, sink, permute, density, scale,
                 query_end, docs=None):
    from .triton_plan import triton_segment_permutation, triton_select_blocks
    key_perm = (triton_segment_permutation(q, k, block_size, segment_size, scale, query_end, docs)
                if permute else identity_permutation(k))
    block_mask = triton_select_blocks(q, k, key_perm, block_size, segment_size, threshold, sink,
                                      scale, density, docs)
    return key_perm, block_mask


def _torch_plan(q, k, block_size, segment_size, threshold, sink, permute, density, scale,
                query_end):
    key_perm = (segment_permutation(q, k, block_size, segment_size, scale, query_end)
                if permute else identity_permutation(k))
    block_mask = select_blocks(q, permute_keys(k, key_perm), key_perm, block_size, segment_size,
                               threshold, sink, scale, density)
    return key_perm, block_mask


def _torch_document_plan(q, k, block_size, segment_size, threshold, sink, permute, density,
                         scale, docs: Documents):
    """The single-sequence torch plan of each document's padded slice (``query_end`` its real
    length), assembled: key order offset by the document's start, block-diagonal block mask.
    Blocks outside documents keep identity order and compute nothing. Rows that are each one
    document spanning the row run today's batched call (bit-identical to it)."""
    B, Hq, N, _ = q.shape
    spans = docs.spans(block_size)
    if all(len(row) == 1 and row[0][0] == 0 and row[0][2] == N for row in spans):
        ends = [row[0][1] for row in spans]
        query_end = None if min(ends) == N else torch.tensor(ends, device=q.device)
        return _torch_plan(q, k, block_size, segment_size, threshold, sink, permute, density,
                           scale, query_end)
    nb = N // block_size
    key_perm = identity_permutation(k)
    block_mask = torch.zeros(B, Hq, nb, nb, dtype=torch.bool, device=q.device)
    for b, row in enumerate(spans):
        for start, end, padded_end in row:
            span = slice(start, padded_end)
            blocks = slice(start // block_size, padded_end // block_size)
            perm, mask = _torch_plan(q[b:b + 1, :, span], k[b:b + 1, :, span], block_size,
                                     segment_size, threshold, sink, permute, density, scale,
                                     torch.tensor([end - start], device=q.device))
            key_perm[b, :, span] = perm[0] + start
            block_mask[b, :, blocks, blocks] = mask[0]
    return key_perm, block_mask


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PBSPlan,
                           scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention over a given plan (e.g. a fixed block mask for benchmarks); k, v in original
    order, differentiable in q, k, v. Documents come from the plan (``doc_first_block``)."""
    _validate(q, k, v, plan.block_size, plan.segment_size, 1.0, None)
    backend, scale, _ = _setup(q, plan.block_size, scale, backend)
    return _attend(q, k, v, plan, scale, backend)


def doc_starts_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``doc_starts`` (B, M) int64 of packed rows from their ``position_ids`` (B, N): a document
    starts at token 0 and wherever the position restarts at 0 (transformers' packing
    convention; pads continue their document's count); rows with fewer than M = the largest
    document count are padded with N. M depends on the values: one device sync on CUDA.
    Block alignment is checked by ``pbs_attention`` / ``pbs_plan``."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        raise ValueError("position_ids must be a (B, N) tensor, got "
                         f"{getattr(position_ids, 'shape', type(position_ids).__name__)}")
    B, N = position_ids.shape
    is_start = position_ids == 0
    is_start[:, 0] = True
    count = is_start.sum(-1)
    M = int(count.max())
    pos = torch.arange(N, device=position_ids.device).expand(B, N)
    # starts first, in order (a stable sort of "not a start"), then N for the unused slots
    order = torch.sort((~is_start).to(torch.int8), dim=-1, stable=True).indices[:, :M]
    slot = torch.arange(M, device=position_ids.device)
    return torch.where(slot < count[:, None], pos.gather(1, order), N)


def _attend(q, k, v, plan, scale, backend):
    """k, v in original order for both backends (the Triton kernels gather rows themselves)."""
    if backend == "torch":
        return reference_attention(q, k, v, plan, scale)
    from .triton_attention import triton_block_sparse_attention
    return triton_block_sparse_attention(q, k, v, plan, scale)


def _setup(q: torch.Tensor, block_size: int, scale: float | None, backend: str,
           query_end: torch.Tensor | None = None, doc_starts: torch.Tensor | None = None
           ) -> tuple[str, float, Documents | None]:
    """Checks shared by the entry points; the resolved backend, softmax scale and documents."""
    if doc_starts is None:
        _validate_query_end(query_end, q)
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    backend = _resolve_backend(backend, q)
    if backend == "triton":
        _validate_triton(q, block_size)
    docs = None if doc_starts is None else _documents(doc_starts, query_end, q, block_size)
    return backend, q.shape[-1] ** -0.5 if scale is None else scale, docs


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend


def _validate(q, k, v, block_size, segment_size, threshold, density) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, N, D), got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES + (torch.float64,):
            raise ValueError(f"{name} has unsupported dtype {x.dtype}; use float16, bfloat16 or "
                             "float32")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    (B, Hq, N, D), (Bk, Hkv, Nk, Dk) = q.shape, k.shape
    if B != Bk:
        raise ValueError(f"batch sizes differ: q has {B}, k/v have {Bk}")
    if N != Nk:
        raise ValueError(f"sequence lengths differ: q has {N}, k/v have {Nk} (causal "
                         "self-attention needs q_len == kv_len)")
    if D != Dk:
        raise ValueError(f"head dims differ: q has {D}, k/v have {Dk}")
    if N == 0 or Hq == 0 or Hkv == 0 or B == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(segment_size, int) or segment_size <= 0 or segment_size % block_size:
        raise ValueError(f"segment_size ({segment_size}) must be a positive multiple of "
                         f"block_size ({block_size})")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def _validate_query_end(query_end: torch.Tensor | None, q: torch.Tensor) -> None:
    if query_end is None:
        return
    if not isinstance(query_end, torch.Tensor) or query_end.dtype not in (torch.int32, torch.int64):
        raise ValueError("query_end must be an int32/int64 tensor of shape (B,), got "
                         f"{getattr(query_end, 'dtype', type(query_end).__name__)}")
    if query_end.shape != (q.shape[0],):
        raise ValueError(f"query_end must have shape (B,) = ({q.shape[0]},), got "
                         f"{tuple(query_end.shape)}")
    if query_end.device != q.device:
        raise ValueError(f"query_end is on {query_end.device}, q on {q.device}")


# Documents already checked, per doc_starts tensor object (entries leave with the tensor):
# id -> (doc_starts ref, (versions, N, block_size), query_end ref or None, Documents)
_CHECKED_DOCS: dict[int, tuple] = {}


def _documents(doc_starts: torch.Tensor, query_end: torch.Tensor | None, q: torch.Tensor,
               block_size: int) -> Documents:
    """Validated device tables of a packed layout. Shapes, dtypes and devices are checked on
    every call; the values (a device sync on CUDA) once per (doc_starts, query_end) tensor
    objects and versions, N and block size: the trainer passes the same tensors to every
    layer, so a forward syncs once."""
    B, N = q.shape[0], q.shape[2]
    if not isinstance(doc_starts, torch.Tensor) or doc_starts.dtype not in (torch.int32,
                                                                             torch.int64):
        raise ValueError("doc_starts must be an int32/int64 tensor of shape (B, M), got "
                         f"{getattr(doc_starts, 'dtype', type(doc_starts).__name__)}")
    if doc_starts.dim() != 2 or doc_starts.shape[0] != B or doc_starts.shape[1] == 0:
        raise ValueError(f"doc_starts must have shape (B, M) with B = {B}, M >= 1, got "
                         f"{tuple(doc_starts.shape)}")
    if doc_starts.device != q.device:
        raise ValueError(f"doc_starts is on {doc_starts.device}, q on {q.device}")
    if N % block_size:
        raise ValueError(f"with doc_starts, N ({N}) must be a multiple of block_size "
                         f"({block_size})")
    if query_end is not None:
        if (not isinstance(query_end, torch.Tensor)
                or query_end.dtype not in (torch.int32, torch.int64)):
            raise ValueError("query_end must be an int32/int64 tensor, got "
                             f"{getattr(query_end, 'dtype', type(query_end).__name__)}")
        if query_end.shape != doc_starts.shape:
            raise ValueError("with doc_starts, query_end must have shape (B, M) = "
                             f"{tuple(doc_starts.shape)} (each document's real end), got "
                             f"{tuple(query_end.shape)}")
        if query_end.device != q.device:
            raise ValueError(f"query_end is on {query_end.device}, q on {q.device}")
    key = id(doc_starts)
    state = (doc_starts._version, None if query_end is None else query_end._version, N,
             block_size)
    hit = _CHECKED_DOCS.get(key)
    if (hit is not None and hit[0]() is doc_starts and hit[1] == state
            and (hit[2] is None if query_end is None else hit[2]() is query_end)):
        return hit[3]
    _check_document_values(doc_starts, query_end, N, block_size)
    docs = document_layout(doc_starts, query_end, N, block_size)
    if hit is None or hit[0]() is not doc_starts:
        weakref.finalize(doc_starts, _CHECKED_DOCS.pop, key, None)
    _CHECKED_DOCS[key] = (weakref.ref(doc_starts), state,
                          None if query_end is None else weakref.ref(query_end), docs)
    return docs


def _check_document_values(doc_starts: torch.Tensor, query_end: torch.Tensor | None, N: int,
                           block_size: int) -> None:
    """The value rules of ``doc_starts`` / ``query_end``, read back in one transfer."""
    starts = doc_starts.long()
    used = starts < N
    following = torch.cat([starts[:, 1:], starts.new_full((starts.shape[0], 1), N)], 1)
    rules = [
        ((starts < 0) | (starts > N), f"doc_starts must lie in [0, N = {N}] (N marks an "
                                      "unused slot)"),
        (starts[:, :1] != 0, "the first document of each row must start at 0 (doc_starts[:, 0] "
                             "== 0)"),
        (used & (starts % block_size != 0), f"doc_starts must be multiples of block_size "
                                            f"({block_size})"),
        ((following <= starts) & used | (following < N) & ~used,
         "doc_starts must be strictly increasing, unused trailing slots holding N"),
    ]
    if query_end is not None:
        end = query_end.long()
        rules.append((used & ((end <= starts) | (end > following)),
                      "query_end must satisfy start < end <= next start (or N) for each "
                      "document"))
    flags = torch.stack([bad.any() for bad, _ in rules]).tolist()
    for (bad, message), failed in zip(rules, flags):
        if failed:
            row = int(bad.any(-1).nonzero()[0])
            raise ValueError(f"{message}; row {row}: doc_starts {doc_starts[row].tolist()}"
                             + ("" if query_end is None else
                                f", query_end {query_end[row].tolist()}"))


def _validate_triton(q: torch.Tensor, block_size: int) -> None:
    if q.dtype not in _DTYPES:
        raise ValueError(f"the Triton backend takes float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] not in _TRITON_HEAD_DIMS:
        raise ValueError(f"the Triton backend supports head dims {_TRITON_HEAD_DIMS}, got "
                         f"{q.shape[-1]} (use backend='torch')")
    if block_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"the Triton backend needs block_size in (16, 32, 64, 128, 256), got "
                         f"{block_size}")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         f"importing kernels); got tensors on {q.device}")
