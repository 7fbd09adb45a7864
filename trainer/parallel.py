"""Sequence parallelism: DeepSpeed's Ulysses (ALST) around the model's attention.

With ``trainer.sequence_parallel_size=sp`` the ranks form groups of ``sp`` consecutive ranks.
The ranks of a group take the same rows (one data-parallel rank) and each keeps 1/sp of every
row's tokens for everything but attention. DeepSpeed's ``UlyssesSPAttentionHF`` wraps the
attention function: an all-to-all gives each rank the WHOLE sequence for Hq/sp query heads (and
its share of the KV heads), the core attention (``pbs``, ``sdpa``; ``flex`` runs inside ``pbs``)
runs unchanged, and a second all-to-all returns the rank's tokens. PBS plans per head over the
whole sequence, so planning and kernels need nothing special; per-row inputs that PBS reads
(``pbs_query_end``, ``pbs_doc_starts``) are passed through un-gathered and so carry GLOBAL token
offsets (the sampler builds them before sharding). The loss is the token-weighted mean over the
group (``mean_loss``); ZeRO reduces gradients over all ranks through the ``mpu`` it is given,
summing over the ranks of a group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from transformers import PretrainedConfig, PreTrainedModel

from .batching import SEQUENCE_KEYS


class SequenceParallel:
    """This rank's place in the sequence-parallel layout (``size`` 1: plain data parallelism)."""

    def __init__(self, size: int, micro_batch_size: int, rank: int, world: int):
        self.size, self.micro_batch_size = size, micro_batch_size
        self.rank = rank % size  # place in its group (groups are [i * sp, (i + 1) * sp))
        self.dp_rank, self.dp_world = rank // size, world // size
        self.group = None
        self.mpu = None

    def register(self, lm: PreTrainedModel, seq_len: int) -> None:
        """Wrap the model's attention implementation with Ulysses (after ``pbs`` is registered
        with transformers and never re-registered) and create the groups; ``self.mpu`` then
        goes to ``deepspeed.initialize``."""
        if self.size == 1:
            return
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        self.mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=lm, core_attn_implementation=lm.config._attn_implementation,
            sequence_parallel_size=self.size, micro_batch_size=self.micro_batch_size,
            seq_length=seq_len, seq_length_is_variable=True)
        self.group = self.mpu.get_sequence_parallel_group()

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slice of every per-token field (``SEQUENCE_KEYS``); per-row fields
        (lengths, documents) stay whole."""
        rows = batch["input_ids"].shape[0]
        if rows != self.micro_batch_size:
            raise ValueError(f"micro batch of {rows} rows, expected trainer.micro_batch_size="
                             f"{self.micro_batch_size}: the batch size may not change between "
                             "steps (DeepSpeed's Ulysses attention is built for a fixed one)")
        if self.size == 1:
            return batch
        return {k: self.shard_tokens(v) if k in SEQUENCE_KEYS else v for k, v in batch.items()}

    def shard_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous 1/sp of dim 1 of a (B, N, ...) tensor."""
        n = x.shape[1] // self.size
        return x[:, self.rank * n:(self.rank + 1) * n]

    def mean_loss(self, loss_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's share of the token-weighted mean loss of the whole sequence: its own
        summed loss over the group's labelled tokens (0, not NaN, when there are none).
        DeepSpeed sums gradients over the ranks of a group (and averages over data-parallel
        ranks), so the shares' gradients add up to the whole sequence's; so do their values
        (``all_reduce`` of the detached share gives the loss to log)."""
        return loss_sum / self.all_reduce(tokens.clone()).clamp(min=1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group (not differentiable), in place; a no-op without SP."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x


def check_sequence_parallel(cfg: DictConfig, config: PretrainedConfig, world: int,
                            seq_lens: list[int]) -> None:
    """Errors, before any work, for layouts Ulysses cannot run (``config``: the model's HF
    config; ``seq_lens``: training and eval lengths)."""
    sp = cfg.trainer.sequence_parallel_size
    if sp < 1:
        raise ValueError(f"trainer.sequence_parallel_size must be >= 1, got {sp}")
    if sp == 1:
        return
    if world % sp:
        raise ValueError(f"trainer.sequence_parallel_size={sp} must divide the number of ranks "
                         f"({world}){' (it is larger than the world)' if sp > world else ''}")
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    if hq % sp:
        raise ValueError(f"trainer.sequence_parallel_size={sp} must divide the model's "
                         f"{hq} query heads")
    if hkv % sp and sp % hkv:
        raise ValueError(f"trainer.sequence_parallel_size={sp} and the model's {hkv} KV heads: "
                         "one must divide the other")
    if cfg.deepspeed.stage == 0:
        raise ValueError("trainer.sequence_parallel_size > 1 needs ZeRO stage 1, 2 or 3 "
                         "(deepspeed=zero1|zero2|zero3...): DeepSpeed's stage 0 crashes with "
                         "Ulysses in its bf16 grad-norm path (deepspeed issue 7833)")
    unit = sp * (1 if cfg.attention.impl == "sdpa" else cfg.attention.block_size)
    for n in seq_lens:
        if n % unit:
            what = "" if cfg.attention.impl == "sdpa" else " * attention.block_size"
            raise ValueError(f"sequence length {n} must be a multiple of "
                             f"trainer.sequence_parallel_size{what} = {unit}")
    if cfg.data.packing and cfg.attention.impl == "sdpa":
        raise ValueError("data.packing with attention=sdpa under sequence parallelism: Ulysses "
                         "drops the attention mask, so SDPA would attend across documents; use "
                         "attention=pbs, or attention=flex_dense for a dense baseline")
