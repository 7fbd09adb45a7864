"""Trainable permuted block-sparse (PBS) attention (arXiv 2510.21270)."""

from .attention import (block_sparse_attention, doc_starts_from_position_ids, pbs_attention,
                        pbs_plan)
from .plan import PBSPlan
from .reference import reference_attention, token_mask

__all__ = ["pbs_attention", "pbs_plan", "block_sparse_attention", "doc_starts_from_position_ids",
           "PBSPlan", "reference_attention", "token_mask"]
