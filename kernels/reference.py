"""Pure-torch PBS attention: the CPU path and the exact reference the kernels are tested against.

Dense attention with the token-level mask that a plan defines. O(N^2) memory per head: meant for
CPU-sized problems and for float64 checks, not for long sequences on a GPU.
"""

from __future__ import annotations

import torch

from .plan import PBSPlan, permute_keys


def token_mask(plan: PBSPlan, num_heads: int) -> torch.Tensor:
    """Bool (B, Hq, N, N): query i may attend the key at permuted position p."""
    key_perm = plan.key_perm
    B, Hkv, N = key_perm.shape
    G = num_heads // Hkv
    blk = torch.arange(N, device=key_perm.device) // plan.block_size
    mask = plan.block_mask[:, :, blk][:, :, :, blk]
    key_pos = key_perm.repeat_interleave(G, dim=1)
    return mask & (key_pos[:, :, None, :] <= torch.arange(N, device=key_perm.device)[:, None])


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PBSPlan,
                        scale: float | None = None) -> torch.Tensor:
    """Attention of q over the keys the plan allows, in original token order.

    k, v are in ORIGINAL order (B, Hkv, N, D); differentiable in q, k, v. Computes in the dtype
    of its inputs (pass float64 for a reference). Rows with no allowed key give 0.
    """
    Hq, D = q.shape[1], q.shape[-1]
    G = Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    k_perm = permute_keys(k, plan.key_perm).repeat_interleave(G, dim=1)
    v_perm = permute_keys(v, plan.key_perm).repeat_interleave(G, dim=1)
    mask = token_mask(plan, Hq)
    scores = torch.matmul(q, k_perm.transpose(-1, -2)).float() * scale
    if q.dtype == torch.float64:
        scores = scores.double()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.matmul(probs.to(v.dtype), v_perm)
