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

from .plan import Documents, identity_permutation
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
def _doc_keys(QEND, KEY0, NCK, b, d, M, NC, N, HAS_END: tl.constexpr, DOCS: tl.constexpr):
    """(first key, complete-segment keys, real end) of document d of row b: read from the
    (B, M) tables with DOCS, else the one document spanning the row (NC complete keys, real end
    min(query_end[b], N), or N without ``query_end``)."""
    if DOCS:
        doc = b * M + d
        key0 = tl.load(KEY0 + doc)
        nc = tl.load(NCK + doc)
        end = tl.load(QEND + doc)
    else:
        key0 = 0
        nc = NC
        end = N
        if HAS_END:
            end = tl.minimum(tl.load(QEND + b).to(tl.int32), N)
    return key0, nc, end


@triton.jit
def _query_rows(Q, pid_bh, rows, first, end, R, G, Hkv, nq, stride_qb, stride_qh, stride_qn,
                stride_qd, HEAD_DIM: tl.constexpr, DOT_F32: tl.constexpr):
    """Importance query rows ``rows`` (< R = G * nq) of (b, hkv) = divmod(pid_bh, Hkv): row r is
    query head hkv * G + r // nq at the (r % nq)-th of the nq positions ending at ``end``,
    started no earlier than ``first`` (the document's first token)."""
    b = pid_bh // Hkv
    pos = tl.maximum(end - nq, first) + rows % nq
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
def _importance_lse(Q, QEND, K, M_PART, L_PART, KEY0, NCK, R, NC, N, G, Hkv, M, nq, chunk,
                    qk_scale, stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_END: tl.constexpr, DOCS: tl.constexpr, DOT_F32: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Partial row max and sum of exp2(s - max), s = (q_row . k) * scale * log2(e), over one
    chunk of a document's complete-segment keys, for one ((b*hkv) * M + document, row tile,
    chunk); chunks past the document's keys (unused slots, short documents) do nothing."""
    pid = tl.program_id(0)
    pid_bh = pid // M
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    key0, nc, end = _doc_keys(QEND, KEY0, NCK, pid_bh // Hkv, pid % M, M, NC, N, HAS_END, DOCS)
    if split * chunk < nc:
        q = _query_rows(Q, pid_bh, rows, key0, end, R, G, Hkv, nq, stride_qb, stride_qh,
                        stride_qn, stride_qd, HEAD_DIM, DOT_F32)
        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(key0 + split * chunk, key0 + tl.minimum(split * chunk + chunk, nc),
                           BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            kT = _key_tile(K, pid_bh, cols, key0 + nc, Hkv, stride_kb, stride_kh, stride_kn,
                           stride_kd, HEAD_DIM, DOT_F32)
            s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
            s = tl.where(cols[None, :] < key0 + nc, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        out = (pid * tl.num_programs(2) + split) * R + rows
        tl.store(M_PART + out, m_i, mask=rows < R)
        tl.store(L_PART + out, l_i, mask=rows < R)


@triton.jit
def _row_lse(M_PART, L_PART, part, rows, R, splits, n_splits, BLOCK_R: tl.constexpr):
    """Row log2-sum-exp from the first ``n_splits`` of the ``splits`` per-chunk partials of
    ``part``; +inf for rows >= R (zero weight)."""
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for split in range(n_splits):
        offs = (part * splits + split) * R + rows
        m_s = tl.load(M_PART + offs, mask=rows < R, other=0.0)
        l_s = tl.load(L_PART + offs, mask=rows < R, other=1.0)
        m_new = tl.maximum(m_i, m_s)
        l_i = l_i * tl.math.exp2(m_i - m_new) + l_s * tl.math.exp2(m_s - m_new)
        m_i = m_new
    return tl.where(rows < R, m_i + tl.math.log2(l_i), float("inf"))


@triton.jit
def _importance_sum(Q, QEND, K, M_PART, L_PART, IMP, KEY0, NCK, BLOCK_DOC, R, NC, N, G, Hkv, M,
                    NB, nq, splits, chunk, block_size, imp_stride, qk_scale,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_END: tl.constexpr, DOCS: tl.constexpr, DOT_F32: tl.constexpr,
                    PRECISION: tl.constexpr):
    """IMP[key] = mean over its document's rows of exp2(s - lse), one (b*hkv, key tile). With
    DOCS the tile's first block names the document (a tile never holds keys of two: it is no
    wider than a block, or rows hold one document) and IMP is indexed by absolute position."""
    pid_bh = tl.program_id(0)
    first_col = tl.program_id(1) * BLOCK_N
    cols = first_col + tl.arange(0, BLOCK_N)
    b = pid_bh // Hkv
    d = 0
    if DOCS:
        d = tl.load(BLOCK_DOC + b * NB + first_col // block_size)
    key0, nc, end = _doc_keys(QEND, KEY0, NCK, b, tl.maximum(d, 0), M, NC, N, HAS_END, DOCS)
    n_splits = splits  # every chunk holds a key of the row's one document
    if DOCS:
        nc = tl.where(d >= 0, nc, 0)
        n_splits = tl.cdiv(nc, chunk)
    if first_col < key0 + nc:
        kT = _key_tile(K, pid_bh, cols, key0 + nc, Hkv, stride_kb, stride_kh, stride_kn,
                       stride_kd, HEAD_DIM, DOT_F32)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, R, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            q = _query_rows(Q, pid_bh, rows, key0, end, R, G, Hkv, nq, stride_qb, stride_qh,
                            stride_qn, stride_qd, HEAD_DIM, DOT_F32)
            lse = _row_lse(M_PART, L_PART, pid_bh * M + tl.maximum(d, 0), rows, R, splits,
                           n_splits, BLOCK_R)
            p = tl.math.exp2(tl.dot(q, kT, input_precision=PRECISION) * qk_scale - lse[:, None])
            acc += tl.sum(p, 0)
        tl.store(IMP + pid_bh * imp_stride + cols, acc / R, mask=cols < key0 + nc)


@triton.jit
def _sorted_segment(IMP, first, S, BLOCK: tl.constexpr):
    """Positions first .. first + S - 1 by decreasing IMP[position], ties by position (a
    stable descending argsort), int32."""
    offs = tl.arange(0, BLOCK)
    imp = tl.load(IMP + first + offs, mask=offs < S, other=0.0)
    # Importance >= 0: its bits order like the value; lower 32 bits: the position.
    rank = (0x7FFFFFFF - imp.to(tl.int32, bitcast=True)).to(tl.int64)
    packed = tl.where(offs < S, (rank << 32) | offs.to(tl.int64), 0x7FFFFFFFFFFFFFFF)
    return first + tl.sort(packed).to(tl.int32)  # the lower 32 bits


@triton.jit
def _sort_segments(IMP, PERM, N, NC, S, BLOCK: tl.constexpr):
    """PERM for one (b*hkv, segment): a complete segment (ending at or before NC) lists its
    positions by decreasing importance, ties by position (stable); the tail keeps its order."""
    pid_bh = tl.program_id(0)
    first = tl.program_id(1) * S
    offs = tl.arange(0, BLOCK)
    if first < NC:
        src = _sorted_segment(IMP + pid_bh * NC, first, S, BLOCK)
    else:
        src = first + offs
    tl.store(PERM + pid_bh.to(tl.int64) * N + first + offs, src,
             mask=(offs < S) & (first + offs < N))


@triton.jit
def _sort_doc_segments(IMP, PERM, BLOCK_DOC, KEY0, NCK, N, NB, M, Hkv, S, block_size,
                       BLOCK: tl.constexpr):
    """PERM for one (b*hkv, block): if the block starts a complete segment of its document,
    that segment's positions by decreasing importance (IMP by absolute position), ties by
    position; other blocks are left alone (PERM starts as the identity)."""
    pid_bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = pid_bh // Hkv
    d = tl.load(BLOCK_DOC + b * NB + blk)
    doc = b * M + tl.maximum(d, 0)
    key0 = tl.load(KEY0 + doc)
    first = blk * block_size
    if (d >= 0) & ((first - key0) % S == 0) & (first + S <= key0 + tl.load(NCK + doc)):
        offs = tl.arange(0, BLOCK)
        src = _sorted_segment(IMP + pid_bh.to(tl.int64) * N, first, S, BLOCK)
        tl.store(PERM + pid_bh.to(tl.int64) * N + first + offs, src, mask=offs < S)


def key_importance(q: torch.Tensor, k: torch.Tensor, n_keys: int, n_rows: int, scale: float,
                   query_end: torch.Tensor | None = None, docs: Documents | None = None,
                   complete: torch.Tensor | None = None, block_size: int = 0) -> torch.Tensor:
    """q (B, Hq, N, D), k (B, Hkv, N, D), any strides -> (B, Hkv, n_keys) fp32: the softmax of
    the last ``n_rows`` queries (those before ``query_end[b]`` if given) of the G heads of each
    KV head over its keys 0 .. n_keys - 1, averaged over those G * n_rows rows.

    With ``docs`` (and ``complete`` (B, M), each document's complete-segment keys): the same
    per document, over its complete keys and from its last real queries, -> (B, Hkv, N) by
    absolute position (only complete-segment keys written); ``n_keys`` bounds ``complete``."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    R = Hq // Hkv * n_rows
    M = 1 if docs is None else docs.num_slots
    lse_cfg, sum_cfg = _LSE_CONFIG, _SUM_CONFIG
    row_tiles = triton.cdiv(R, lse_cfg.block_m)
    splits = max(1, min(triton.cdiv(n_keys, _MIN_CHUNK),
                        triton.cdiv(_TARGET_PROGRAMS, B * Hkv * row_tiles)))
    chunk = triton.cdiv(triton.cdiv(n_keys, splits), lse_cfg.block_n) * lse_cfg.block_n
    splits = triton.cdiv(n_keys, chunk)  # every chunk holds a key (of a document that long)
    m_part = torch.empty(B * Hkv * M, splits, R, device=k.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    if docs is None:
        imp = torch.empty(B, Hkv, n_keys, device=k.device, dtype=torch.float32)
        qend = q if query_end is None else query_end
        key0 = n_complete = block_doc = q  # unused
        block_n = sum_cfg.block_n
    else:
        imp = torch.empty(B, Hkv, N, device=k.device, dtype=torch.float32)
        qend, key0, n_complete, block_doc = docs.ends, docs.starts, complete, docs.block_doc
        block_n = sum_cfg.block_n if M == 1 else min(sum_cfg.block_n, block_size)
    dot_f32, precision = dot_settings(k)
    consts = {"HEAD_DIM": D, "HAS_END": query_end is not None, "DOCS": docs is not None,
              "DOT_F32": dot_f32, "PRECISION": precision}
    _importance_lse[(B * Hkv * M, row_tiles, splits)](
        q, qend, k, m_part, l_part, key0, n_complete, R, n_keys, N, Hq // Hkv, Hkv, M, n_rows,
        chunk, scale * LOG2E, *q.stride(), *k.stride(),
        BLOCK_R=lse_cfg.block_m, BLOCK_N=lse_cfg.block_n, num_warps=lse_cfg.num_warps,
        num_stages=lse_cfg.num_stages, **consts)
    _importance_sum[(B * Hkv, triton.cdiv(imp.shape[-1], block_n))](
        q, qend, k, m_part, l_part, imp, key0, n_complete, block_doc, R, n_keys, N, Hq // Hkv,
        Hkv, M, 0 if docs is None else N // block_size, n_rows, splits, chunk, block_size,
        imp.shape[-1], scale * LOG2E, *q.stride(), *k.stride(),
        BLOCK_R=sum_cfg.block_m, BLOCK_N=block_n, num_warps=sum_cfg.num_warps,
        num_stages=sum_cfg.num_stages, **consts)
    return imp


def triton_segment_permutation(q: torch.Tensor, k: torch.Tensor, block_size: int,
                               segment_size: int, scale: float,
                               query_end: torch.Tensor | None = None,
                               docs: Documents | None = None) -> torch.Tensor:
    """:func:`kernels.plan.segment_permutation` (same arguments, same int64 (B, Hkv, N)); with
    ``docs``, that of each document's padded slice with its real end, without a host sync."""
    B, _, N, _ = q.shape
    Hkv = k.shape[1]
    n_complete = (N // segment_size) * segment_size if N > segment_size else 0
    if not n_complete:  # (with documents: no document is longer than N)
        return identity_permutation(k)
    sort_cfg = dict(BLOCK=triton.next_power_of_2(segment_size),
                    num_warps=4 if segment_size <= 1024 else 8)
    if docs is None:
        key_perm = torch.empty(B, Hkv, N, device=k.device, dtype=torch.int64)
        imp = key_importance(q, k, n_complete, min(block_size, N), scale, query_end)
        _sort_segments[(B * Hkv, triton.cdiv(N, segment_size))](
            imp, key_perm, N, n_complete, segment_size, **sort_cfg)
        return key_perm
    complete = docs.complete_keys(segment_size, block_size)
    imp = key_importance(q, k, n_complete, block_size, scale, docs=docs, complete=complete,
                         block_size=block_size)
    key_perm = identity_permutation(k)
    _sort_doc_segments[(B * Hkv, N // block_size)](
        imp, key_perm, docs.block_doc, docs.starts, complete, N, N // block_size,
        docs.num_slots, Hkv, segment_size, block_size, **sort_cfg)
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
                 BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr, DOC_FIRST=None, H=1,
                 DOCS: tl.constexpr = False):
    """KEEP row of one (b, h, query block i), from its block scores S (unscaled pq . pk). With
    DOCS, DOC_FIRST (B, NB) gives the first block of block i's document (-1: none, an empty
    row) and everything is relative to it; else one document starts at block 0."""
    row = tl.program_id(0)
    i = row % NB
    bh = row // NB
    cols = tl.arange(0, BLOCK)
    if DOCS:
        first = tl.load(DOC_FIRST + (bh // H) * NB + i)  # the document's first block
        # key blocks first .. n_allowed - 1: the document's earlier segments (outside documents:
        # first = n_allowed = NB, every range below is empty)
        n_allowed = tl.where(first >= 0, first + (i - first) // seg_blocks * seg_blocks, NB)
        first = tl.where(first >= 0, first, NB)
    else:
        first = 0
        n_allowed = (i // seg_blocks) * seg_blocks  # key blocks of strictly earlier segments
    ok = (cols >= first) & (cols < n_allowed)
    if SELECT:
        s = tl.load(S + row.to(tl.int64) * NB + cols, mask=ok, other=float("-inf")) * scale
        if USE_BUDGET:
            # top ceil(density * causal blocks) minus the always-computed ones
            value = s
            always = i - n_allowed + 1
            if SINK:
                always += 1
            causal = (i - first + 1).to(tl.float32)
            target = tl.maximum(tl.math.ceil(density * causal) - always, 0.0)
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
    # Sink: the block of the document's first segment where its first token landed.
    first_segment = (cols >= first) & (cols < first + seg_blocks) & (cols < NB)
    min_pos = tl.load(MIN_POS + (bh // G) * NB + cols, mask=diag | first_segment, other=N)
    if SINK:
        keep |= first_segment & (min_pos == first * BLOCK_SIZE)
    keep |= diag & (min_pos <= tl.minimum(i * BLOCK_SIZE + BLOCK_SIZE - 1, N - 1))
    tl.store(KEEP + row.to(tl.int64) * NB + cols, keep.to(tl.int8), mask=cols < NB)


def triton_select_blocks(q: torch.Tensor, k: torch.Tensor, key_perm: torch.Tensor,
                         block_size: int, segment_size: int, threshold: float, sink: bool,
                         scale: float, density: float | None = None,
                         docs: Documents | None = None) -> torch.Tensor:
    """:func:`kernels.plan.select_blocks` on k in original order (read through ``key_perm``,
    int64 (B, Hkv, N) contiguous): bool (B, Hq, nb, nb); with ``docs``, block-diagonal, that
    of each document's padded slice (rows outside documents empty)."""
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
        num_warps=row_warps(nb), **({} if docs is None else
                                   dict(DOC_FIRST=docs.first_block, H=Hq, DOCS=True)))
    return keep.view(torch.bool)
