"""A PBS plan executed by torch FlexAttention (``attention=flex``; also ``bench.attention``)."""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from kernels import PBSPlan
from kernels.plan import permute_keys


def flex_block_mask(plan: PBSPlan, compiled: bool = True) -> BlockMask:
    """Flex ``BlockMask`` over keys in permuted order that computes exactly ``plan``.

    Selected blocks of earlier segments are full (every key precedes every query); those of the
    query's own segment are partial, masked per token on original positions. With packed
    documents the segments are the plan's document-relative ones (``diagonal_segment_mask`` per
    row) and the block mask is block-diagonal, so no document sees another. Compiled Flex walks
    the block lists, so ``mask_mod`` is only the token order there; uncompiled ``flex_attention``
    ignores the lists and applies ``mask_mod`` to all N x N pairs, so it also checks the block bit.
    """
    diag = plan.diagonal_segment_mask()
    full_cnt, full_idx = _compact(plan.block_mask & ~diag)
    part_cnt, part_idx = _compact(plan.block_mask & diag)
    blocks, key_pos, bs = plan.block_mask, plan.key_perm, plan.block_size
    G = blocks.shape[1] // key_pos.shape[1]
    N = key_pos.shape[-1]

    def token_order(b, h, q_idx, kv_idx):
        return key_pos[b, h // G, kv_idx] <= q_idx

    def plan_mask(b, h, q_idx, kv_idx):
        return blocks[b, h, q_idx // bs, kv_idx // bs] & token_order(b, h, q_idx, kv_idx)

    return BlockMask.from_kv_blocks(part_cnt, part_idx, full_cnt, full_idx, BLOCK_SIZE=bs,
                                    mask_mod=token_order if compiled else plan_mask,
                                    seq_lengths=(N, N))


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Count (B, H, R) and column indices (B, H, R, C) of each row's True entries, those first
    and in increasing order (int32)."""
    order = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return mask.sum(-1, dtype=torch.int32), order.to(torch.int32)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def flex_plan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PBSPlan,
                        scale: float | None = None) -> torch.Tensor:
    """Attention over ``plan`` by FlexAttention (compiled on CUDA, eager elsewhere, where torch
    has no Flex backward). q (B, Hq, N, D), k, v (B, Hkv, N, D) in original order; returns
    (B, Hq, N, D) in the original token order."""
    attend = _compiled_flex_attention() if q.is_cuda else flex_attention
    return attend(q, permute_keys(k, plan.key_perm), permute_keys(v, plan.key_perm),
                  block_mask=flex_block_mask(plan, compiled=q.is_cuda), scale=scale,
                  enable_gqa=True)
