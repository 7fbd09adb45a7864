"""Triton kernels for the two costly steps of planning (same results as kernels/plan.py).

- Key importance: softmax of the last b queries (x G heads) over all keys of the complete
  segments, averaged over the rows, in two flash-style passes (row log-sum-exp, then column
  sums) that never materialise the (G*b, N) score matrix.
- Block selection: per query block row, softmax over the allowed key blocks, then the smallest
  set of top blocks whose mass reaches the threshold (or the top ``budget`` blocks), found by
  bisection on the cut-off value instead of a sort.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_attention import LOG2E, dot_settings

_BISECT_STEPS = 40


@triton.jit
def _importance_lse(Q, K, LSE, R, NC, qk_scale, stride_qb, stride_qr, stride_kb, stride_kn,
                    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Row log2-sum-exp of (q_rows . k) * scale over the NC keys, one (b*hkv, row tile)."""
    pid_bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + pid_bh * stride_qb + rows[:, None] * stride_qr + offs_d[None, :],
                mask=rows[:, None] < R, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, NC, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kT = tl.load(K + pid_bh * stride_kb + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=cols[None, :] < NC, other=0.0)
        if DOT_F32:
            kT = kT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        s = tl.where(cols[None, :] < NC, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(LSE + pid_bh * R + rows, m_i + tl.math.log2(l_i), mask=rows < R)


@triton.jit
def _importance_sum(Q, K, LSE, IMP, R, NC, qk_scale, stride_qb, stride_qr, stride_kb,
                    stride_kn, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """IMP[key] = mean over rows of exp2(s - lse), one (b*hkv, key tile)."""
    pid_bh = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kT = tl.load(K + pid_bh * stride_kb + cols[None, :] * stride_kn + offs_d[:, None],
                 mask=cols[None, :] < NC, other=0.0)
    if DOT_F32:
        kT = kT.to(tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        q = tl.load(Q + pid_bh * stride_qb + rows[:, None] * stride_qr + offs_d[None, :],
                    mask=rows[:, None] < R, other=0.0)
        lse = tl.load(LSE + pid_bh * R + rows, mask=rows < R, other=float("inf"))
        if DOT_F32:
            q = q.to(tl.float32)
        p = tl.math.exp2(tl.dot(q, kT, input_precision=PRECISION) * qk_scale - lse[:, None])
        acc += tl.sum(p, 0)
    tl.store(IMP + pid_bh * NC + cols, acc / R, mask=cols < NC)


def key_importance(q_rows: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, Hkv, R, D) query rows, (B, Hkv, NC, D) keys -> (B, Hkv, NC) fp32 mean softmax."""
    B, Hkv, R, D = q_rows.shape
    NC = k.shape[2]
    q_rows = q_rows.reshape(B * Hkv, R, D).contiguous()
    k = k.reshape(B * Hkv, NC, D) if k.is_contiguous() else k.reshape(B * Hkv, NC, D).contiguous()
    lse = torch.empty(B * Hkv, R, device=k.device, dtype=torch.float32)
    imp = torch.empty(B * Hkv, NC, device=k.device, dtype=torch.float32)
    dot_f32, precision = dot_settings(k)
    common = (R, NC, scale * LOG2E, q_rows.stride(0), q_rows.stride(1), k.stride(0), k.stride(1))
    _importance_lse[(B * Hkv, triton.cdiv(R, 64))](q_rows, k, lse, *common, HEAD_DIM=D,
                                                   BLOCK_R=64, BLOCK_N=128, DOT_F32=dot_f32, PRECISION=precision,
                                                   num_warps=8)
    _importance_sum[(B * Hkv, triton.cdiv(NC, 128))](q_rows, k, lse, imp, *common, HEAD_DIM=D,
                                                     BLOCK_R=64, BLOCK_N=128, DOT_F32=dot_f32, PRECISION=precision,
                                                     num_warps=8)
    return imp.view(B, Hkv, NC)


@triton.jit
def _select_rows(S, ALLOWED, BUDGET, KEEP, NB, threshold, USE_BUDGET: tl.constexpr,
                 BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """KEEP[row, j] for one (b, h, query block) row of block scores S (already scaled)."""
    row = tl.program_id(0)
    i = row % NB
    cols = tl.arange(0, BLOCK)
    n_allowed = tl.load(ALLOWED + i)  # allowed key blocks are 0 .. n_allowed - 1
    ok = cols < n_allowed
    s = tl.load(S + row.to(tl.int64) * NB + cols, mask=ok, other=float("-inf"))
    if USE_BUDGET:
        value = tl.where(ok, s, float("-inf"))
        target = tl.load(BUDGET + i)
        lo = tl.where(n_allowed > 0, tl.min(tl.where(ok, s, float("inf")), 0), 0.0)
        hi = tl.where(n_allowed > 0, tl.max(value, 0), 0.0)
    else:
        m = tl.max(s, 0)
        e = tl.where(ok, tl.exp(s - tl.where(m == float("-inf"), 0.0, m)), 0.0)
        value = e / tl.maximum(tl.sum(e, 0), 1e-30)  # rows without candidates: all zero
        target = threshold
        lo = 0.0
        hi = tl.max(value, 0)
    # Largest cut-off c with measure({value >= c}) >= target: mass for thresholds, count for
    # budgets. lo always satisfies it (every allowed block), hi is the top block.
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) * 0.5
        sel = value >= mid
        if USE_BUDGET:
            measure = tl.sum(sel.to(tl.float32), 0)
        else:
            measure = tl.sum(tl.where(sel, value, 0.0), 0)
        good = measure >= target
        lo = tl.where(good, mid, lo)
        hi = tl.where(good, hi, mid)
    if USE_BUDGET:
        top = tl.sum((value >= hi).to(tl.float32), 0) >= target
    else:
        top = tl.sum(tl.where(value >= hi, value, 0.0), 0) >= target
    cut = tl.where(top, hi, lo)
    cut = tl.where(target > 0, cut, float("inf"))  # a zero budget keeps nothing
    keep = ok & (value >= cut)
    tl.store(KEEP + row.to(tl.int64) * NB + cols, keep.to(tl.int8), mask=cols < NB)


def select_rows(scores: torch.Tensor, n_allowed: torch.Tensor, threshold: float,
                budget: torch.Tensor | None) -> torch.Tensor:
    """scores (B, H, nb, nb) fp32; key blocks j < n_allowed[i] are candidates for row i.
    Returns bool (B, H, nb, nb): the kept candidates."""
    B, H, nb, _ = scores.shape
    scores = scores.contiguous()
    keep = torch.empty(B, H, nb, nb, device=scores.device, dtype=torch.int8)
    budget_t = budget if budget is not None else n_allowed
    _select_rows[(B * H * nb,)](scores, n_allowed.to(torch.int32).contiguous(),
                                budget_t.to(torch.float32).contiguous(), keep, nb,
                                float(threshold), USE_BUDGET=budget is not None,
                                BLOCK=triton.next_power_of_2(nb), STEPS=_BISECT_STEPS,
                                num_warps=4 if nb <= 2048 else 8)
    return keep.view(torch.bool)
