"""Public entry points: ``pbs_attention`` (plan, then attend with Triton or pure torch),
``pbs_plan`` (the plan alone) and ``block_sparse_attention`` (attend over a given plan)."""

from __future__ import annotations

import os

import torch

from .plan import (PBSPlan, identity_permutation, permute_keys, segment_permutation,
                   select_blocks)
from .reference import reference_attention

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_HEAD_DIMS = (32, 64, 128)


def pbs_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 128,
                  segment_size: int = 256, threshold: float = 0.9, sink: bool = True,
                  permute: bool = True, *, density: float | None = None,
                  scale: float | None = None, query_end: torch.Tensor | None = None,
                  return_plan: bool = False,
                  backend: str = "auto") -> torch.Tensor | tuple[torch.Tensor, PBSPlan]:
    """Causal permuted block-sparse attention.

    Args:
        q: (B, Hq, N, D); k, v: (B, Hkv, N, D) with Hq a multiple of Hkv (GQA).
        block_size: tokens per query/key block (b).
        segment_size: tokens per permutation segment (S), a multiple of ``block_size``.
        threshold: cumulative block-score mass to keep per query block, in (0, 1].
        sink: always compute the key block holding token 0 (after the permutation: the block
            where token 0 landed).
        permute: reorder keys inside segments by importance (False: the MeanPooling baseline).
        density: if given, keep a fixed share of causal blocks per query block instead of
            ``threshold`` (for controlled comparisons).
        scale: softmax scale, default 1/sqrt(D).
        query_end: optional int (B,) real length of each right-padded sequence: key importance
            then comes from the last ``block_size`` queries before it, not from padding.
        return_plan: also return the :class:`PBSPlan` (permutation, block mask, density).
        backend: "triton", "torch" (dense masked reference) or "auto" (Triton on CUDA or
            under ``TRITON_INTERPRET=1``, else torch).

    Returns (B, Hq, N, D) in the original token order and the input dtype.
    """
    _validate(q, k, v, block_size, segment_size, threshold, density)
    backend, scale = _setup(q, block_size, scale, backend, query_end)
    plan = _plan(q, k, block_size, segment_size, threshold, sink, permute, density, scale,
                 query_end, backend == "triton")
    out = _attend(q, k, v, plan, scale, backend)
    return (out, plan) if return_plan else out


def pbs_plan(q: torch.Tensor, k: torch.Tensor, block_size: int = 128, segment_size: int = 256,
             threshold: float = 0.9, sink: bool = True, permute: bool = True, *,
             density: float | None = None, scale: float | None = None,
             query_end: torch.Tensor | None = None, backend: str = "auto") -> PBSPlan:
    """The plan of :func:`pbs_attention` with the same arguments (permutation + block selection,
    no attention): ``block_sparse_attention(q, k, v, pbs_plan(q, k, ...))`` equals
    ``pbs_attention(q, k, v, ...)``. Lets callers time or reuse the plan."""
    _validate(q, k, k, block_size, segment_size, threshold, density)
    backend, scale = _setup(q, block_size, scale, backend, query_end)
    return _plan(q, k, block_size, segment_size, threshold, sink, permute, density, scale,
                 query_end, backend == "triton")


@torch.no_grad()
def _plan(q, k, block_size, segment_size, threshold, sink, permute, density, scale, query_end,
          use_triton) -> PBSPlan:
    """The plan (a constant for autograd). The torch path pools a temporary permuted copy of
    the keys; the Triton path reads them in original order through ``key_perm``."""
    q, k = q.detach(), k.detach()
    if use_triton:
        from .triton_plan import triton_segment_permutation, triton_select_blocks
        key_perm = (triton_segment_permutation(q, k, block_size, segment_size, scale, query_end)
                    if permute else identity_permutation(k))
        block_mask = triton_select_blocks(q, k, key_perm, block_size, segment_size, threshold,
                                          sink, scale, density)
    else:
        key_perm = (segment_permutation(q, k, block_size, segment_size, scale, query_end)
                    if permute else identity_permutation(k))
        block_mask = select_blocks(q, permute_keys(k, key_perm), key_perm, block_size,
                                   segment_size, threshold, sink, scale, density)
    return PBSPlan(key_perm, block_mask, block_size, segment_size)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PBSPlan,
                           scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention over a given plan (e.g. a fixed block mask for benchmarks); k, v in original
    order, differentiable in q, k, v."""
    _validate(q, k, v, plan.block_size, plan.segment_size, 1.0, None)
    backend, scale = _setup(q, plan.block_size, scale, backend)
    return _attend(q, k, v, plan, scale, backend)


def _attend(q, k, v, plan, scale, backend):
    """k, v in original order for both backends (the Triton kernels gather rows themselves)."""
    if backend == "torch":
        return reference_attention(q, k, v, plan, scale)
    from .triton_attention import triton_block_sparse_attention
    return triton_block_sparse_attention(q, k, v, plan, scale)


def _setup(q: torch.Tensor, block_size: int, scale: float | None, backend: str,
           query_end: torch.Tensor | None = None) -> tuple[str, float]:
    """Checks shared by the entry points; the resolved backend and softmax scale."""
    _validate_query_end(query_end, q)
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    backend = _resolve_backend(backend, q)
    if backend == "triton":
        _validate_triton(q, block_size)
    return backend, q.shape[-1] ** -0.5 if scale is None else scale


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
