"""Triton kernels for block-sparse attention over a PBS plan: forward, backward, autograd.

Keys and values enter the autograd Function in original token order (B, Hkv, N, D);
``key_pos[p]`` is the original row of the key at permuted position p. The forward and dQ kernels
read a transient permuted copy of K/V (contiguous rows, so every key tile is one TMA copy), made
inside the Function by a gather kernel (outside autograd) and freed right after the kernel:
nothing permuted is saved for backward. Each query block walks two compacted lists of key
blocks: "full" blocks from earlier segments (every key precedes every query, no mask) and
diagonal-segment blocks (token mask ``key_pos[p] <= i`` on original positions). The backward
computes dQ row-wise over the same lists, frees its permuted copy, then dK/dV column-wise from
transposed lists, one program per KV head summing over its G query heads (no atomics:
deterministic); that kernel reads its key tile from the original K/V through ``key_pos`` (once
per program), its query tiles of Q and dO by TMA, and stores dK/dV straight to the original
rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .plan import PBSPlan

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# Block index lists
# --------------------------------------------------------------------------------------------

@dataclass
class BlockIndex:
    """Compacted block lists: ``*_cnt`` int32 (B, Hq, nb); ``*_idx`` (B, Hq, nb, width) int16
    when nb < 32768, else int32 (kernels widen them to int32 before any arithmetic).

    kv lists: per query block, the key blocks it computes; q lists: per key block, the query
    blocks that compute it. ``full`` = off-diagonal-segment, ``part`` = diagonal segment.
    """

    full_kv_cnt: torch.Tensor
    full_kv_idx: torch.Tensor
    part_kv_cnt: torch.Tensor
    part_kv_idx: torch.Tensor
    full_q_cnt: torch.Tensor
    full_q_idx: torch.Tensor
    part_q_cnt: torch.Tensor
    part_q_idx: torch.Tensor

    @classmethod
    def from_plan(cls, plan: PBSPlan) -> BlockIndex:
        seg_blocks = plan.segment_size // plan.block_size
        segments = plan.block_segments()  # document-relative segments, None without documents
        return cls(*_compact(plan.block_mask, seg_blocks, segments),
                   *_compact(plan.block_mask.transpose(-1, -2), seg_blocks, segments))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)


def _compact(mask: torch.Tensor, seg_blocks: int,
             segments: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Per row r of a (B, H, R, C) bool mask (any strides), its True columns outside r's segment
    (full) and inside it (part), in increasing order; column c lies in row r's segment iff
    c // seg_blocks == r // seg_blocks, or, given ``segments`` (int32 (B, R = C): each block's
    segment id, document-relative), iff segments[b, c] == segments[b, r]. Returns full count,
    full indices, part count, part indices: counts int32 (B, H, R), indices (B, H, R, C) and
    (B, H, R, min(seg_blocks, C)), int16 when C < 32768, else int32, zero past the count. One
    launch."""
    B, H, R, C = mask.shape
    idx_dtype = torch.int16 if C < 2**15 else torch.int32
    full_cnt = torch.empty(B, H, R, dtype=torch.int32, device=mask.device)
    part_cnt = torch.empty_like(full_cnt)
    full_idx = torch.empty(B, H, R, C, dtype=idx_dtype, device=mask.device)
    part_idx = torch.empty(B, H, R, min(seg_blocks, C), dtype=idx_dtype, device=mask.device)
    mask_u8 = mask.view(torch.uint8)
    seg_ids = mask_u8 if segments is None else segments.to(torch.int32).contiguous()
    _compact_rows[(B * H * R,)](mask_u8, seg_ids, full_cnt, full_idx, part_cnt, part_idx, H, R,
                                C, seg_blocks, part_idx.shape[-1], *mask_u8.stride(),
                                BLOCK_C=triton.next_power_of_2(C), SEGMENT_IDS=segments is not None,
                                num_warps=row_warps(C))
    return full_cnt, full_idx, part_cnt, part_idx


def row_warps(n: int) -> int:
    """Warps for a program that reduces or scans one row of ``n`` elements: one per 1024, so
    that up to 128K tokens (nb = 1024 blocks) the reductions stay inside one warp's shuffles.
    On an H200 at nb = 512, 4 warps made the selection 2.5x slower than 1 and 2 warps 1.5x; at
    nb = 1024 the compaction on 1 warp was 3 % faster than on 2."""
    return max(1, min(8, n // 1024))


@triton.jit
def _store_list(CNT, IDX, sel, cols, width):
    """IDX[0:width] = the columns where ``sel`` holds, in order, then zeros; CNT = their count."""
    sel = sel.to(tl.int32)
    slot = tl.cumsum(sel, axis=0) - 1
    count = tl.sum(sel, axis=0)
    tl.store(IDX + slot, cols.to(IDX.dtype.element_ty), mask=(sel > 0) & (slot < width))
    tl.store(IDX + cols, tl.zeros_like(cols).to(IDX.dtype.element_ty),
             mask=(cols >= count) & (cols < width))
    tl.store(CNT, count)


@triton.jit
def _compact_rows(MASK, SEG, FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, H, R, C, seg_blocks,
                  part_width, stride_b, stride_h, stride_r, stride_c, BLOCK_C: tl.constexpr,
                  SEGMENT_IDS: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // (H * R)
    h = (pid // R) % H
    r = pid % R
    cols = tl.arange(0, BLOCK_C)
    m = tl.load(MASK + b * stride_b + h * stride_h + r * stride_r + cols * stride_c,
                mask=cols < C, other=0) != 0
    if SEGMENT_IDS:  # per-block ids (documents: segments cut from each document's start)
        seg = tl.load(SEG + b * C + cols, mask=cols < C, other=-1)
        in_segment = seg == tl.load(SEG + b * C + r)
    else:
        in_segment = cols // seg_blocks == r // seg_blocks
    _store_list(FULL_CNT + pid, FULL_IDX + pid.to(tl.int64) * C, m & ~in_segment, cols, C)
    _store_list(PART_CNT + pid, PART_IDX + pid.to(tl.int64) * part_width, m & in_segment, cols,
                part_width)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _load_key_tile(K_desc, V_desc, KPOS_ptr, b, hk, start, N, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, V_TRANSPOSED: tl.constexpr,
                   DOT_F32: tl.constexpr):
    """kT (D, n), v (n, D) or vT (D, n) of the keys at permuted positions start..start+n, read
    by TMA from the permuted K/V copies (rows past N read as zeros), and the original positions
    of those keys. Unmasked tiles (full blocks) load no positions (the permuted positions are
    returned, unused); masked ones give int32 max past N."""
    cols = start + tl.arange(0, BLOCK_N)
    kT = tl.trans(K_desc.load([b, hk, start, 0]).reshape(BLOCK_N, HEAD_DIM))
    v = V_desc.load([b, hk, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    if V_TRANSPOSED:
        v = tl.trans(v)
    if MASKED:
        key_pos = tl.load(KPOS_ptr + cols, mask=cols < N, other=2147483647)
    else:
        key_pos = cols
    if DOT_F32:
        kT = kT.to(tl.float32)
        v = v.to(tl.float32)
    return kT, v, key_pos


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, offs_m, K_desc, V_desc, KPOS_ptr, b, hk, CNT_ptr, IDX_ptr,
                    row, idx_width, N, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASKED: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of one query tile over one compacted list of key blocks."""
    SUBS: tl.constexpr = BLOCK // BLOCK_N
    count = tl.load(CNT_ptr + row)
    for t in range(0, count * SUBS):
        kblk = tl.load(IDX_ptr + row * idx_width + t // SUBS).to(tl.int32)
        kT, v, key_pos = _load_key_tile(K_desc, V_desc, KPOS_ptr, b, hk,
                                        kblk * BLOCK + (t % SUBS) * BLOCK_N, N, HEAD_DIM,
                                        BLOCK_N, MASKED, False, DOT_F32)
        qk = tl.dot(q, kT, input_precision=PRECISION)
        if MASKED:
            qk = tl.where(key_pos[None, :] <= offs_m[:, None], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows so far
            p = tl.math.exp2(qk - m_safe[:, None])
        else:  # every key allowed: finite row max; scale and shift in one FMA per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = m_new
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K_desc, V_desc, KPOS, O, LSE,
              FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, full_width, part_width,
              qk_scale, N, H, G, NB,
              stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on,
              HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    # Grid (query tiles, H, B), tiles fastest: the programs in flight read one head's keys and
    # share them in L2. Heaviest (last) query tiles first.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * H + h
    hk = h // G
    start_m = tile * BLOCK_M
    row = pid_bh * NB + start_m // BLOCK

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=offs_m[:, None] < N, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    KPOS_ptr = KPOS + (b * (H // G) + hk) * N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, offs_m, K_desc, V_desc, KPOS_ptr, b, hk,
                                    FULL_CNT, FULL_IDX, row, full_width, N, qk_scale, HEAD_DIM,
                                    BLOCK, BLOCK_N, False, DOT_F32, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, offs_m, K_desc, V_desc, KPOS_ptr, b, hk,
                                    PART_CNT, PART_IDX, row, part_width, N, qk_scale, HEAD_DIM,
                                    BLOCK, BLOCK_N, True, DOT_F32, PRECISION)

    has_keys = l_i > 0.0  # rows with no allowed key give 0 (and +inf LSE: zero gradient)
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))
    in_rows = offs_m < N
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=in_rows[:, None])
    tl.store(LSE + pid_bh * N + offs_m, lse, mask=in_rows)


@triton.jit
def _gather_kv_rows(K, V, KPOS, K_OUT, V_OUT, N, Hkv, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, HEAD_DIM: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """K_OUT[b, h, p] = K[b, h, KPOS[b, h, p]] (and V), outputs contiguous (B, Hkv, N, D)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    in_range = (rows < N)[:, None]
    src = tl.load(KPOS + pid_bh * N + rows, mask=rows < N, other=0)[:, None]
    dst = (pid_bh.to(tl.int64) * N + rows[:, None]) * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + src * stride_kn + offs_d[None, :],
                mask=in_range)
    tl.store(K_OUT + dst, k, mask=in_range)
    v = tl.load(V + b * stride_vb + h * stride_vh + src * stride_vn + offs_d[None, :],
                mask=in_range)
    tl.store(V_OUT + dst, v, mask=in_range)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, N, stride_ob, stride_oh, stride_on, stride_dob, stride_doh,
                    stride_don, H, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < N
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=rows, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :], mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, offs_m, K_desc, V_desc, KPOS_ptr, b, hk, CNT_ptr,
                       IDX_ptr, row, idx_width, N, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                       MASKED: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    SUBS: tl.constexpr = BLOCK // BLOCK_N
    count = tl.load(CNT_ptr + row)
    for t in range(0, count * SUBS):
        kblk = tl.load(IDX_ptr + row * idx_width + t // SUBS).to(tl.int32)
        kT, vT, key_pos = _load_key_tile(K_desc, V_desc, KPOS_ptr, b, hk,
                                         kblk * BLOCK + (t % SUBS) * BLOCK_N, N, HEAD_DIM,
                                         BLOCK_N, MASKED, True, DOT_F32)
        qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            p = tl.where(key_pos[None, :] <= offs_m[:, None], p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K_desc, V_desc, KPOS, DO, DQ, LSE, DELTA,
                 FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, full_width, part_width,
                 qk_scale, sm_scale, N, H, G, NB,
                 stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                 HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """dQ for one query tile, row-wise over the key blocks it computed. DQ has q's strides."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # grid and order as in the forward
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * H + h
    hk = h // G
    start_m = tile * BLOCK_M
    row = pid_bh * NB + start_m // BLOCK

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < N
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(Q + q_off, mask=rows, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :], mask=rows, other=0.0)
    lse = tl.load(LSE + pid_bh * N + offs_m, mask=offs_m < N, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * N + offs_m, mask=offs_m < N, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    KPOS_ptr = KPOS + (b * (H // G) + hk) * N

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, offs_m, K_desc, V_desc, KPOS_ptr, b, hk,
                            FULL_CNT, FULL_IDX, row, full_width, N, qk_scale, HEAD_DIM, BLOCK,
                            BLOCK_N, False, DOT_F32, PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, offs_m, K_desc, V_desc, KPOS_ptr, b, hk,
                            PART_CNT, PART_IDX, row, part_width, N, qk_scale, HEAD_DIM, BLOCK,
                            BLOCK_N, True, DOT_F32, PRECISION)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, key_pos, Q_desc, DO_desc, b, h, LSE_ptr, DELTA_ptr,
                         CNT_ptr, IDX_ptr, col, idx_width, N, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                         MASKED: tl.constexpr, EVEN_N: tl.constexpr, DOT_F32: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over one query head's compacted query-block list."""
    SUBS: tl.constexpr = BLOCK // BLOCK_M
    count = tl.load(CNT_ptr + col)
    for t in range(0, count * SUBS):
        qblk = tl.load(IDX_ptr + col * idx_width + t // SUBS).to(tl.int32)
        start_m = qblk * BLOCK + (t % SUBS) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qT = tl.trans(Q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM))
        do = DO_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)  # zeros past N
        if EVEN_N:  # every query block is complete: no row masks in the loop
            lse = tl.load(LSE_ptr + offs_m)
            delta = tl.load(DELTA_ptr + offs_m)
        else:
            in_rows = offs_m < N
            lse = tl.load(LSE_ptr + offs_m, mask=in_rows, other=float("inf"))
            delta = tl.load(DELTA_ptr + offs_m, mask=in_rows, other=0.0)
        if DOT_F32:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        qkT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:
            pT = tl.where(key_pos[:, None] <= offs_m[None, :], pT, 0.0)
        # dV before dP^T: the other order (dS^T computed under the dV wgmma) spills in the loop
        # at 255 registers and is slower (docs/benchmarks.md, attempt 19)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q_desc, K, V, KPOS, DO_desc, DK, DV, LSE, DELTA, ORDER,
                   FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, full_width, part_width,
                   qk_scale, sm_scale, N, H, G, NB, n_tiles,
                   stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, DOT_F32: tl.constexpr,
                   PRECISION: tl.constexpr):
    """dK, dV of one tile of permuted key positions of one KV head, summed over its G query
    heads. K/V are read from, and DK/DV stored to, the original rows ``key_pos`` of the tile.
    Program i computes tile ORDER[i] = (b * Hkv + hk) * n_tiles + key tile."""
    Hkv = H // G
    item = tl.load(ORDER + tl.program_id(0))
    pid_bhk = item // n_tiles
    start_n = (item % n_tiles) * BLOCK_N
    b = pid_bhk // Hkv
    hk = pid_bhk % Hkv
    kblk = start_n // BLOCK

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_range = offs_n < N
    key_pos = tl.load(KPOS + pid_bhk * N + offs_n, mask=in_range, other=2147483647)
    rows = tl.where(in_range, key_pos, 0)[:, None]
    cols = in_range[:, None]
    k = tl.load(K + b * stride_kb + hk * stride_kh + rows * stride_kn + offs_d[None, :],
                mask=cols, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + rows * stride_vn + offs_d[None, :],
                mask=cols, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        col = (b * H + h) * NB + kblk
        LSE_ptr = LSE + (b * H + h) * N
        DELTA_ptr = DELTA + (b * H + h) * N
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, key_pos, Q_desc, DO_desc, b, h, LSE_ptr,
                                      DELTA_ptr, FULL_CNT, FULL_IDX, col, full_width, N,
                                      qk_scale, HEAD_DIM, BLOCK, BLOCK_M, False, EVEN_N, DOT_F32,
                                      PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, key_pos, Q_desc, DO_desc, b, h, LSE_ptr,
                                      DELTA_ptr, PART_CNT, PART_IDX, col, part_width, N,
                                      qk_scale, HEAD_DIM, BLOCK, BLOCK_M, True, EVEN_N, DOT_F32,
                                      PRECISION)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + rows * stride_dkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=cols)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + rows * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=cols)


# --------------------------------------------------------------------------------------------
# Launchers and autograd
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelConfig:
    """Tiles (each divides the logical block size), warps and pipeline stages of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def fit(self, block: int, dtype: torch.dtype) -> "KernelConfig":
        """Tiles no larger than the logical block; fp32 tiles halved to fit shared memory."""
        cap = 64 if dtype == torch.float32 else 256
        return KernelConfig(min(self.block_m, block, cap), min(self.block_n, block, cap),
                            self.num_warps, min(self.num_stages, 2) if cap == 64 else
                            self.num_stages)


# Tuned on an H200 for D=128 bf16 (bench/tune.py, docs/benchmarks.md); the interpreter ignores
# warps and stages.
FWD_CONFIG = KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
BWD_DQ_CONFIG = KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
BWD_DKDV_CONFIG = KernelConfig(block_m=64, block_n=128, num_warps=8, num_stages=3)
LOG2E = 1.4426950408889634
_HEAVY_TILE = 4.0  # dK/dV: key tiles with more than this times the mean work start first


def dot_settings(x: torch.Tensor) -> tuple[bool, str]:
    """(cast dot operands to fp32, input_precision) for inputs like ``x``: fp32 under the
    interpreter (its bf16 dot is broken) and for fp32 inputs, which use IEEE fp32 dots."""
    dot_f32 = _INTERPRET or x.dtype == torch.float32
    return dot_f32, "ieee" if x.dtype == torch.float32 else "tf32"


def _strides(*xs: torch.Tensor) -> list[int]:
    return [s for x in xs for s in x.stride()[:3]]


def _tma_ready(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a contiguous copy when its layout cannot back a TMA descriptor (last dim
    strided, a broadcast or unaligned stride, an unaligned base)."""
    ok = (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
          and all(s > 0 and s * x.element_size() % 16 == 0 for s in x.stride()[:-1]))
    return x if ok else x.contiguous()


def _rows_desc(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor of a (B, H, N, D) tensor (rows contiguous, strides 16-byte aligned) whose
    tiles are ``rows`` consecutive rows of one head; rows past N read as zeros."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, x.shape[-1]])


def permuted_kv(k: torch.Tensor, v: torch.Tensor,
                key_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permuted copies of k and v (B, Hkv, N, D), contiguous, row p = original row
    ``key_pos[p]`` (int32 (B, Hkv, N)), made by one kernel outside autograd: transient inputs
    of the forward and dQ kernels, never saved."""
    B, Hkv, N, D = k.shape
    k_perm = torch.empty(B, Hkv, N, D, dtype=k.dtype, device=k.device)
    v_perm = torch.empty_like(k_perm)
    _gather_kv_rows[(B * Hkv, triton.cdiv(N, 64))](k, v, key_pos, k_perm, v_perm, N, Hkv,
                                                   *_strides(k, v), HEAD_DIM=D, BLOCK_R=64)
    return k_perm, v_perm


def attention_forward(q, k_perm, v_perm, key_pos, index: BlockIndex, scale: float, block: int,
                      cfg: KernelConfig = FWD_CONFIG):
    """Returns (out (B, Hq, N, D) in q.dtype, lse (B, Hq, N) fp32 log2-domain). ``k_perm``,
    ``v_perm`` in the plan's key order (``permuted_kv``); ``key_pos`` only masks the diagonal
    segment."""
    B, H, N, D = q.shape
    G = H // k_perm.shape[1]
    nb = index.full_kv_cnt.shape[-1]
    cfg = cfg.fit(block, q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    dot_f32, precision = dot_settings(q)
    _attn_fwd[(triton.cdiv(N, cfg.block_m), H, B)](
        q, _rows_desc(k_perm, cfg.block_n), _rows_desc(v_perm, cfg.block_n), key_pos, out, lse,
        index.full_kv_cnt, index.full_kv_idx, index.part_kv_cnt, index.part_kv_idx,
        index.full_kv_idx.shape[-1], index.part_kv_idx.shape[-1],
        scale * LOG2E, N, H, G, nb, *_strides(q, out),
        HEAD_DIM=D, BLOCK=block, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_F32=dot_f32,
        PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def attention_backward(do, q, k, v, out, lse, key_pos, index: BlockIndex, scale: float,
                       block: int, dq_cfg: KernelConfig = BWD_DQ_CONFIG,
                       dkdv_cfg: KernelConfig = BWD_DKDV_CONFIG):
    """Returns dq, dk, dv; k, v, dk and dv in original token order. The dQ kernel reads a
    transient permuted copy of k, v, freed before dk, dv are allocated and the dK/dV kernel
    (which reads k, v through ``key_pos``) runs: the copies never coexist with dk, dv."""
    B, H, N, D = q.shape
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(B * H, triton.cdiv(N, 64))](
        out, do, delta, N, *_strides(out, do), H, HEAD_DIM=D, BLOCK_M=64)
    dq = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device)  # q's strides
    k_perm, v_perm = permuted_kv(k, v, key_pos)
    launch_dq(dq, do, q, k_perm, v_perm, lse, delta, key_pos, index, scale, block, dq_cfg)
    del k_perm, v_perm
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    launch_dkdv(dk, dv, do, q, k, v, lse, delta, key_pos, index, scale, block, dkdv_cfg)
    return dq, dk, dv


def launch_dq(dq, do, q, k_perm, v_perm, lse, delta, key_pos, index: BlockIndex, scale: float,
              block: int, cfg: KernelConfig = BWD_DQ_CONFIG) -> None:
    """dQ kernel; ``k_perm``, ``v_perm`` in the plan's key order (``permuted_kv``)."""
    B, H, N, D = q.shape
    cfg = cfg.fit(block, q.dtype)
    dot_f32, precision = dot_settings(q)
    _attn_bwd_dq[(triton.cdiv(N, cfg.block_m), H, B)](
        q, _rows_desc(k_perm, cfg.block_n), _rows_desc(v_perm, cfg.block_n), key_pos, do, dq,
        lse, delta, index.full_kv_cnt, index.full_kv_idx, index.part_kv_cnt, index.part_kv_idx,
        index.full_kv_idx.shape[-1], index.part_kv_idx.shape[-1],
        scale * LOG2E, scale, N, H, H // k_perm.shape[1], index.full_kv_cnt.shape[-1],
        *_strides(q, do),
        HEAD_DIM=D, BLOCK=block, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_F32=dot_f32, PRECISION=precision, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)


def launch_dkdv(dk, dv, do, q, k, v, lse, delta, key_pos, index: BlockIndex, scale: float,
                block: int, cfg: KernelConfig = BWD_DKDV_CONFIG) -> None:
    """dK/dV kernel; ``k``, ``v``, ``dk``, ``dv`` in original token order (rows ``key_pos``)."""
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    cfg = cfg.fit(block, q.dtype)
    dot_f32, precision = dot_settings(q)
    tiles = triton.cdiv(N, cfg.block_n)
    order = dkdv_tile_order(index, Hkv, tiles, block // cfg.block_n)
    _attn_bwd_dkdv[(order.numel(),)](
        _rows_desc(q, cfg.block_m), k, v, key_pos, _rows_desc(do, cfg.block_m), dk, dv, lse,
        delta, order, index.full_q_cnt, index.full_q_idx, index.part_q_cnt, index.part_q_idx,
        index.full_q_idx.shape[-1], index.part_q_idx.shape[-1],
        scale * LOG2E, scale, N, H, H // Hkv, index.full_kv_cnt.shape[-1], tiles,
        *_strides(k, v, dk, dv),
        HEAD_DIM=D, BLOCK=block, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EVEN_N=N % block == 0,
        DOT_F32=dot_f32, PRECISION=precision, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)


def dkdv_tile_order(index: BlockIndex, Hkv: int, tiles: int, tiles_per_block: int) -> torch.Tensor:
    """Launch order of the dK/dV programs, int32 items (b * Hkv + hk) * tiles + key tile.

    Key tiles fastest, so that the programs in flight share one head's Q and dO in L2 (2-10 %
    faster than heads fastest on fixed masks at 64K), except that heavy tiles go first, the
    heaviest first: a key tile with more than ``_HEAVY_TILE`` times the mean work (a plan's sink
    block, the first block of a segment of heavy hitters: picked by most query blocks of all G
    heads) takes about as long as a whole SM's share of the kernel, and started late it ends
    the kernel late. Built on the device without a sync.
    """
    B, H, nb = index.full_q_cnt.shape
    work = (index.full_q_cnt + index.part_q_cnt).view(B, Hkv, H // Hkv, nb).sum(2)
    work = work[..., None].expand(B, Hkv, nb, tiles_per_block).flatten(2)[..., :tiles].flatten()
    heavy = work > _HEAVY_TILE * work.float().mean()
    return torch.argsort(torch.where(heavy, -work, 1), stable=True).to(torch.int32)


class BlockSparseAttentionFunction(torch.autograd.Function):
    """Attention with a compacted block index (Triton). k, v (and dk, dv) in original token
    order; ``key_pos`` int32 (B, Hkv, N) is the plan's key order (original row of permuted p).
    Saves the original k, v; the permuted copies the forward and dQ kernels read are transient
    (made here without autograd, freed after their kernel)."""

    @staticmethod
    def forward(ctx, q, k, v, key_pos, scale, block, *index_tensors):
        index = BlockIndex(*index_tensors)
        k_perm, v_perm = permuted_kv(k, v, key_pos)
        out, lse = attention_forward(q, k_perm, v_perm, key_pos, index, scale, block)
        del k_perm, v_perm
        ctx.save_for_backward(q, k, v, out, lse, key_pos, *index_tensors)
        ctx.scale, ctx.block = scale, block
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, key_pos, *index_tensors = ctx.saved_tensors
        do = _tma_ready(do)
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, key_pos, BlockIndex(*index_tensors),
                                        ctx.scale, ctx.block)
        return (dq, dk, dv) + (None,) * (3 + len(index_tensors))


def triton_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  plan: PBSPlan, scale: float) -> torch.Tensor:
    """Differentiable Triton attention; k, v in original token order (permuted through
    ``plan.key_perm`` inside the Function), gradients returned in original order."""
    q = _tma_ready(q)  # k, v are read through pointers: unit last stride is all they need
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    key_pos = plan.key_perm.to(torch.int32).contiguous()
    index = BlockIndex.from_plan(plan)
    return BlockSparseAttentionFunction.apply(q, k, v, key_pos, scale, plan.block_size,
                                              *index.tensors())
