"""Triton planning path: the plan of kernels/plan.py in six launches (same results).

- Key importance (``key_importance``): softmax of the last b queries (x G heads, read from q in
  place) over all keys of the complete segments, averaged over the rows, in two flash-style
  passes that never materialise the (G*b, N) score matrix: split-K partial row (max, sum) per
  key chunk, then column sums that combine the partials into each row's log-sum-exp.
- Permutation (``triton_segment_permutation``): one program per segment sorts (importance,
  position) packed in int64, a stable descending argsort; the tail segment keeps its order.
- Block selection (``triton_select_blocks``): one launch mean-pools query blocks and permuted key
  blocks (read through ``key_perm``, no permuted copy) and takes each key block's least original
  position; torch.matmul gives the block scores; one program per query block row then keeps the
  smallest set of top allowed blocks whose softmax mass reaches the threshold (or the top
  ``budget`` blocks), found by an exact 32-step bisection over the cut-off value's bits instead
  of a sort, plus the sink and the reachable diagonal-segment blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .plan import identity_permutation
from .triton_attention import LOG2E, KernelConfig, dot_settings, row_warps

# Importance passes, tiles (block_m = query rows, block_n = keys), warps and stages tuned on an
# H200 at N=64K, D=128, bf16 (docs/benchmarks.md, attempt 17).
_LSE_CONFIG = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
_SUM_CONFIG = KernelConfig(block_m=64, block_n=128, num_warps=4, num_stages=3)
# Split-K of the importance row pass: chunks of at least _MIN_CHUNK keys, up to about two
# waves of programs on a 132-SM GPU.
_MIN_CHUNK = 1024
_TARGET_PROGRAMS = 264


# --------------------------------------------------------------------------------------------
# Key importance and permutation
# --------------------------------------------------------------------------------------------

@triton.jit
def _query_rows(Q, QEND, pid_bh, rows, R, N, G, Hkv, nq, stride_qb, stride_qh, stride_qn,
                stride_qd, HEAD_DIM: tl.constexpr, HAS_END: tl.constexpr,
                DOT_F32: tl.constexpr):
    """Importance query rows ``rows`` (< R = G * nq) of (b, hkv) = divmod(pid_bh, Hkv): row r is
    query head hkv * G + r // nq at the (r % nq)-th of the nq positions ending at
    min(query_end[b], N) (N without ``query_end``), started no earlier than 0."""
    b = pid_bh // Hkv
    end = N
    if HAS_END:
        end = tl.minimum(tl.load(QEND + b).to(tl.int32), N)
    pos = tl.maximum(end - nq, 0) + rows % nq
    head = (pid_bh % Hkv) * G + rows // nq
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh
                + pos[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=rows[:, None] < R, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    return q


@triton.jit
def _key_tile(K, pid_bh, cols, NC, Hkv, stride_kb, stride_kh, stride_kn, stride_kd,
              HEAD_DIM: tl.constexpr, DOT_F32: tl.constexpr):
    """kT (D, n) of keys ``cols`` (< NC, else zero) of (b, hkv) = divmod(pid_bh, Hkv)."""
    offs_d = tl.arange(0, HEAD_DIM)
    base = K + (pid_bh // Hkv).to(tl.int64) * stride_kb + (pid_bh % Hkv) * stride_kh
    kT = tl.load(base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=cols[None, :] < NC, other=0.0)
    if DOT_F32:
        kT = kT.to(tl.float32)
    return kT


@triton.jit
def _importance_lse(Q, QEND, K, M_PART, L_PART, R, NC, N, G, Hkv, nq, chunk, qk_scale,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_END: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Partial row max and sum of exp2(s - max), s = (q_row . k) * scale * log2(e), over the keys
    of one chunk, for one (b*hkv, row tile, chunk)."""
    pid_bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    q = _query_rows(Q, QEND, pid_bh, rows, R, N, G, Hkv, nq, stride_qb, stride_qh, stride_qn,
                    stride_qd, HEAD_DIM, HAS_END, DOT_F32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(split * chunk, tl.minimum(split * chunk + chunk, NC), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kT = _key_tile(K, pid_bh, cols, NC, Hkv, stride_kb, stride_kh, stride_kn, stride_kd,
                       HEAD_DIM, DOT_F32)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        s = tl.where(cols[None, :] < NC, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    out = (pid_bh * tl.num_programs(2) + split) * R + rows
    tl.store(M_PART + out, m_i, mask=rows < R)
    tl.store(L_PART + out, l_i, mask=rows < R)


@triton.jit
def _row_lse(M_PART, L_PART, pid_bh, rows, R, n_splits, BLOCK_R: tl.constexpr):
    """Row log2-sum-exp from the per-chunk partials; +inf for rows >= R (zero weight)."""
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for split in range(n_splits):
        offs = (pid_bh * n_splits + split) * R + rows
        m_s = tl.load(M_PART + offs, mask=rows < R, other=0.0)
        l_s = tl.load(L_PART + offs, mask=rows < R, other=1.0)
        m_new = tl.maximum(m_i, m_s)
        l_i = l_i * tl.math.exp2(m_i - m_new) + l_s * tl.math.exp2(m_s - m_new)
        m_i = m_new
    return tl.where(rows < R, m_i + tl.math.log2(l_i), float("inf"))


@triton.jit
def _importance_sum(Q, QEND, K, M_PART, L_PART, IMP, R, NC, N, G, Hkv, nq, n_splits, qk_scale,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_END: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """IMP[key] = mean over rows of exp2(s - lse), one (b*hkv, key tile)."""
    pid_bh = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kT = _key_tile(K, pid_bh, cols, NC, Hkv, stride_kb, stride_kh, stride_kn, stride_kd,
                   HEAD_DIM, DOT_F32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        q = _query_rows(Q, QEND, pid_bh, rows, R, N, G, Hkv, nq, stride_qb, stride_qh,
                        stride_qn, stride_qd, HEAD_DIM, HAS_END, DOT_F32)
        lse = _row_lse(M_PART, L_PART, pid_bh, rows, R, n_splits, BLOCK_R)
        p = tl.math.exp2(tl.dot(q, kT, input_precision=PRECISION) * qk_scale - lse[:, None])
        acc += tl.sum(p, 0)
    tl.store(IMP + pid_bh * NC + cols, acc / R, mask=cols < NC)


@triton.jit
def _sort_segments(IMP, PERM, N, NC, S, BLOCK: tl.constexpr):
    """PERM for one (b*hkv, segment): a complete segment (ending at or before NC) lists its
    positions by decreasing importance, ties by position (stable); the tail keeps its order."""
    pid_bh = tl.program_id(0)
    first = tl.program_id(1) * S
    offs = tl.arange(0, BLOCK)
    if first < NC:
        imp = tl.load(IMP + pid_bh * NC + first + offs, mask=offs < S, other=0.0)
        # Importance >= 0: its bits order like the value; lower 32 bits: the position.
        rank = (0x7FFFFFFF - imp.to(tl.int32, bitcast=True)).to(tl.int64)
        packed = tl.where(offs < S, (rank << 32) | offs.to(tl.int64), 0x7FFFFFFFFFFFFFFF)
        src = first + tl.sort(packed).to(tl.int32)  # the lower 32 bits
    else:
        src = first + offs
    tl.store(PERM + pid_bh.to(tl.int64) * N + first + offs, src,
             mask=(offs < S) & (first + offs < N))


def key_importance(q: torch.Tensor, k: torch.Tensor, n_keys: int, n_rows: int, scale: float,
                   query_end: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, N, D), k (B, Hkv, N, D), any strides -> (B, Hkv, n_keys) fp32: the softmax of
    the last ``n_rows`` queries (those before ``query_end[b]`` if given) of the G heads of each
    KV head over its keys 0 .. n_keys - 1, averaged over those G * n_rows rows."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    R = Hq // Hkv * n_rows
    lse_cfg, sum_cfg = _LSE_CONFIG, _SUM_CONFIG
    row_tiles = triton.cdiv(R, lse_cfg.block_m)
    splits = max(1, min(triton.cdiv(n_keys, _MIN_CHUNK),
                        triton.cdiv(_TARGET_PROGRAMS, B * Hkv * row_tiles)))
    chunk = triton.cdiv(triton.cdiv(n_keys, splits), lse_cfg.block_n) * lse_cfg.block_n
    splits = triton.cdiv(n_keys, chunk)  # every chunk holds a key
    m_part = torch.empty(B * Hkv, splits, R, device=k.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    imp = torch.empty(B, Hkv, n_keys, device=k.device, dtype=torch.float32)
    dot_f32, precision = dot_settings(k)
    args = (R, n_keys, N, Hq // Hkv, Hkv, n_rows)
    consts = {"HEAD_DIM": D, "HAS_END": query_end is not None, "DOT_F32": dot_f32,
              "PRECISION": precision}
    qend = q if query_end is None else query_end
    _importance_lse[(B * Hkv, row_tiles, splits)](
        q, qend, k, m_part, l_part, *args, chunk, scale * LOG2E, *q.stride(), *k.stride(),
        BLOCK_R=lse_cfg.block_m, BLOCK_N=lse_cfg.block_n, num_warps=lse_cfg.num_warps,
        num_stages=lse_cfg.num_stages, **consts)
    _importance_sum[(B * Hkv, triton.cdiv(n_keys, sum_cfg.block_n))](
        q, qend, k, m_part, l_part, imp, *args, splits, scale * LOG2E, *q.stride(), *k.stride(),
        BLOCK_R=sum_cfg.block_m, BLOCK_N=sum_cfg.block_n, num_warps=sum_cfg.num_warps,
        num_stages=sum_cfg.num_stages, **consts)
    return imp


def triton_segment_permutation(q: torch.Tensor, k: torch.Tensor, block_size: int,
                               segment_size: int, scale: float,
                               query_end: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`kernels.plan.segment_permutation` (same arguments, same int64 (B, Hkv, N))."""
    B, _, N, _ = q.shape
    Hkv = k.shape[1]
    n_complete = (N // segment_size) * segment_size if N > segment_size else 0
    if not n_complete:
        return identity_permutation(k)
    key_perm = torch.empty(B, Hkv, N, device=k.device, dtype=torch.int64)
    imp = key_importance(q, k, n_complete, min(block_size, N), scale, query_end)
    _sort_segments[(B * Hkv, triton.cdiv(N, segment_size))](
        imp, key_perm, N, n_complete, segment_size, BLOCK=triton.next_power_of_2(segment_size),
        num_warps=4 if segment_size <= 1024 else 8)
    return key_perm


# --------------------------------------------------------------------------------------------
# Block selection
# --------------------------------------------------------------------------------------------

@triton.jit
def _pool_blocks(Q, K, PERM, PQ, PK, MIN_POS, N, Hq, Hkv, NB, n_q_programs,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 POOL_K: tl.constexpr):
    """Programs below ``n_q_programs``: PQ = mean of query block (b, h, i). The others: MIN_POS =
    least original position in permuted key block (b, hkv, j) and, if POOL_K, PK = mean of its
    keys, read through PERM. Sums in fp32; a short last block is averaged over its real rows."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    if pid < n_q_programs:
        first = (pid % NB) * BLOCK_SIZE
        bh = pid // NB
        base = Q + (bh // Hq).to(tl.int64) * stride_qb + (bh % Hq) * stride_qh
        for r0 in tl.static_range(0, BLOCK_SIZE, ROWS):
            pos = first + r0 + tl.arange(0, ROWS)
            x = tl.load(base + pos[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                        mask=pos[:, None] < N, other=0.0)
            acc += tl.sum(x.to(tl.float32), 0)
        n_real = tl.minimum(N - first, BLOCK_SIZE).to(tl.float32)
        tl.store(PQ + pid.to(tl.int64) * HEAD_DIM + offs_d, tl.math.div_rn(acc, n_real))
    else:
        kid = pid - n_q_programs
        first = (kid % NB) * BLOCK_SIZE
        bh = kid // NB
        base = K + (bh // Hkv).to(tl.int64) * stride_kb + (bh % Hkv) * stride_kh
        min_pos = N
        for r0 in tl.static_range(0, BLOCK_SIZE, ROWS):
            p = first + r0 + tl.arange(0, ROWS)
            src = tl.load(PERM + bh.to(tl.int64) * N + p, mask=p < N, other=N)
            min_pos = tl.minimum(min_pos, tl.min(src, 0).to(tl.int32))
            if POOL_K:
                x = tl.load(base + src[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=p[:, None] < N, other=0.0)
                acc += tl.sum(x.to(tl.float32), 0)
        tl.store(MIN_POS + kid, min_pos)
        if POOL_K:
            n_real = tl.minimum(N - first, BLOCK_SIZE).to(tl.float32)
            tl.store(PK + kid.to(tl.int64) * HEAD_DIM + offs_d, tl.math.div_rn(acc, n_real))


@triton.jit
def _ordered_bits(x):
    """int32 keys that order like the float32 values ``x`` (negative values included)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _select_rows(S, MIN_POS, KEEP, N, G, NB, seg_blocks, scale, threshold, density,
                 SELECT: tl.constexpr, USE_BUDGET: tl.constexpr, SINK: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """KEEP row of one (b, h, query block i), from its block scores S (unscaled pq . pk)."""
    row = tl.program_id(0)
    i = row % NB
    bh = row // NB
    cols = tl.arange(0, BLOCK)
    n_allowed = (i // seg_blocks) * seg_blocks  # key blocks of strictly earlier segments
    ok = cols < n_allowed
    if SELECT:
        s = tl.load(S + row.to(tl.int64) * NB + cols, mask=ok, other=float("-inf")) * scale
        if USE_BUDGET:
            # top ceil(density * causal blocks) minus the always-computed ones
            value = s
            always = i - n_allowed + 1
            if SINK:
                always += 1
            target = tl.maximum(tl.math.ceil(density * (i + 1).to(tl.float32)) - always, 0.0)
        else:
            m = tl.max(s, 0)
            e = tl.where(ok, tl.exp(s - tl.where(m == float("-inf"), 0.0, m)), 0.0)
            value = e / tl.maximum(tl.sum(e, 0), 1e-30)  # rows without candidates: all zero
            target = threshold
        # Largest cut-off key c with measure({key >= c}) >= target (mass for thresholds, count
        # for budgets), by bisection over the 2^32 int32 keys: exact in 32 steps. The least key
        # satisfies it unless the allowed blocks fall short of the target: then all are kept.
        key = _ordered_bits(value)
        lo = tl.full([], -2**31, tl.int64)
        hi = tl.full([], 2**31, tl.int64)
        for _ in tl.static_range(32):
            mid = lo + (hi - lo) // 2
            sel = ok & (key >= mid.to(tl.int32))
            if USE_BUDGET:
                measure = tl.sum(sel.to(tl.float32), 0)
            else:
                measure = tl.sum(tl.where(sel, value, 0.0), 0)
            good = measure >= target
            lo = tl.where(good, mid, lo)
            hi = tl.where(good, hi, mid)
        keep = ok & (key >= lo.to(tl.int32))
        keep = tl.where(target > 0, keep, False)  # a zero budget keeps nothing
    else:
        keep = ok
    # Diagonal segment: key block j if one of its keys precedes the query block's last query.
    diag = (cols >= n_allowed) & (cols < n_allowed + seg_blocks) & (cols < NB)
    # Sink: the block of the first segment where token 0 landed.
    first_segment = (cols < seg_blocks) & (cols < NB)
    min_pos = tl.load(MIN_POS + (bh // G) * NB + cols, mask=diag | first_segment, other=N)
    if SINK:
        keep |= first_segment & (min_pos == 0)
    keep |= diag & (min_pos <= tl.minimum(i * BLOCK_SIZE + BLOCK_SIZE - 1, N - 1))
    tl.store(KEEP + row.to(tl.int64) * NB + cols, keep.to(tl.int8), mask=cols < NB)


def triton_select_blocks(q: torch.Tensor, k: torch.Tensor, key_perm: torch.Tensor,
                         block_size: int, segment_size: int, threshold: float, sink: bool,
                         scale: float, density: float | None = None) -> torch.Tensor:
    """:func:`kernels.plan.select_blocks` on k in original order (read through ``key_perm``,
    int64 (B, Hkv, N) contiguous): bool (B, Hq, nb, nb)."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    nb = triton.cdiv(N, block_size)
    select = density is not None or threshold < 1.0  # else: every off-segment block
    pq = torch.empty(B, Hkv, G * nb, D, device=q.device, dtype=torch.float32)
    pk = torch.empty(B, Hkv, nb, D, device=q.device, dtype=torch.float32)
    min_pos = torch.empty(B, Hkv, nb, device=q.device, dtype=torch.int32)
    n_q_programs = B * Hq * nb if select else 0
    _pool_blocks[(n_q_programs + B * Hkv * nb,)](
        q, k, key_perm, pq, pk, min_pos, N, Hq, Hkv, nb, n_q_programs, *q.stride(), *k.stride(),
        BLOCK_SIZE=block_size, ROWS=min(block_size, 64), HEAD_DIM=D, POOL_K=select,
        num_warps=2)  # memory-bound: 30 % faster than on 4 warps at 64K (attempt 17)
    scores = torch.matmul(pq, pk.transpose(-1, -2)) if select else pq  # (B, Hkv, G*nb, nb)
    keep = torch.empty(B, Hq, nb, nb, device=q.device, dtype=torch.int8)
    _select_rows[(B * Hq * nb,)](
        scores, min_pos, keep, N, G, nb, segment_size // block_size, scale, threshold,
        0.0 if density is None else density, SELECT=select, USE_BUDGET=density is not None,
        SINK=sink, BLOCK_SIZE=block_size, BLOCK=triton.next_power_of_2(nb),
        num_warps=row_warps(nb))
    return keep.view(torch.bool)
