"""Model construction (from an architecture config or a local HF checkpoint) and the chunked loss."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .attention import AttentionConfig

_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}


@dataclass
class RopeScalingConfig:
    """RoPE override to extend context (HF ``rope_parameters``); ``rope_type: null`` keeps the
    architecture's / checkpoint's own RoPE. Unset (null) fields are left out."""

    rope_type: str | None = None  # "linear" | "dynamic" | "yarn" | "longrope" | "llama3"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    attention_factor: float | None = None  # yarn / longrope


@dataclass
class ModelConfig:
    """``model`` group. With ``path`` set, the architecture fields are ignored (the checkpoint's
    own config is used) except ``rope_scaling``/``max_position_embeddings`` overrides."""

    path: str | None = None  # local HF checkpoint directory
    tokenizer_path: str | None = None  # default: ``path`` (None and no path: built-in chars)
    family: str = "llama"  # "llama" | "qwen2" | "mistral"
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    vocab_size: int | None = None  # None: len(tokenizer)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int | None = None  # None: checkpoint's / max(data lengths)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases (set by its config class)
    rope_scaling: RopeScalingConfig = field(default_factory=lambda: RopeScalingConfig())
    loss_chunk_tokens: int = 4096  # tokens per chunk of the LM-head + cross-entropy
    tiled_mlp: bool = False  # DeepSpeed's TiledMLP: decoder MLPs over shards of the sequence
    liger: bool = False  # Liger's RMSNorm/SwiGLU/RoPE + fused linear cross-entropy (CUDA)
    adapter_path: str | None = None  # a saved LoRA adapter (<run>/adapter) to continue (peft=lora)


def param_numel(p: torch.nn.Parameter) -> int:
    """A parameter's full size, also when ZeRO-3 has partitioned it (``ds_numel``)."""
    return getattr(p, "ds_numel", p.numel())


def architecture_config(cfg: ModelConfig, vocab_size: int, max_len: int) -> PretrainedConfig:
    """HF config of the model to train, with ``rope_scaling`` and context overrides applied."""
    if cfg.path is not None:
        if not os.path.isdir(cfg.path):
            raise FileNotFoundError(f"model.path is not a directory: {cfg.path}")
        config = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    else:
        if cfg.family not in _FAMILIES:
            raise ValueError(f"model.family must be one of {sorted(_FAMILIES)}, got {cfg.family!r}")
        config = AutoConfig.for_model(
            _FAMILIES[cfg.family], vocab_size=cfg.vocab_size or vocab_size,
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings or max_len,
            tie_word_embeddings=cfg.tie_word_embeddings)
        if cfg.family == "llama":
            config.attention_bias = cfg.attention_bias
    if cfg.path is not None and cfg.max_position_embeddings is not None:
        config.max_position_embeddings = cfg.max_position_embeddings
    if cfg.rope_scaling.rope_type is not None:
        rope = cfg.rope_scaling
        items = rope.items() if hasattr(rope, "items") else vars(rope).items()  # DictConfig or dataclass
        scaling = {k: v for k, v in items if v is not None}
        base = getattr(config, "rope_parameters", None) or {}
        scaling.setdefault("rope_theta", base.get("rope_theta", cfg.rope_theta))
        config.rope_parameters = scaling
    if config.vocab_size < vocab_size:
        raise ValueError(f"model vocab ({config.vocab_size}) is smaller than the tokenizer's "
                         f"({vocab_size}); use the checkpoint's tokenizer")
    config.use_cache = False
    return config


def build_model(cfg: ModelConfig, attn: AttentionConfig, config: PretrainedConfig,
                dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Causal LM of ``config`` (``architecture_config``; the weights of ``cfg.path`` if set)
    with the attention implementation of ``attn`` (PBS, Flex or SDPA).

    Call inside ``HfDeepSpeedConfig`` scope for ZeRO-3 so weights are partitioned at load.
    """
    if attn.impl not in ("pbs", "flex", "sdpa"):
        raise ValueError(f"attention.impl must be 'pbs', 'flex' or 'sdpa', got {attn.impl!r}")
    impl = "sdpa" if attn.impl == "sdpa" else "pbs"  # flex runs in the "pbs" attention function
    if cfg.path is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, config=config, dtype=dtype,
                                                     attn_implementation=impl,
                                                     local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=impl)
    return model


class CausalLMWithChunkedLoss(torch.nn.Module):
    """Wraps a HF causal LM (or its ``peft`` wrapper): forward -> (summed token loss, labelled
    tokens) of this rank's part of the batch, never materialising the full (N, vocab) logits
    (LM head + cross-entropy per chunk, recomputed in backward; or ``fused_loss``, Liger's fused
    linear cross-entropy, trainer/liger.py, when gradients are on). The caller divides (over the
    sequence-parallel group when the sequence is sharded)."""

    def __init__(self, lm: PreTrainedModel, chunk_tokens: int,
                 fused_loss: torch.nn.Module | None = None):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.fused_loss = fused_loss

    def forward(self, input_ids: torch.Tensor, shift_labels: torch.Tensor,
                position_ids: torch.Tensor | None = None,
                **attn_kwargs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden_states(input_ids, position_ids, **attn_kwargs)
        return self.loss_sum(hidden, shift_labels), (shift_labels != -100).sum()

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      **attn_kwargs: torch.Tensor) -> torch.Tensor:
        """Last hidden states. ``position_ids`` restart at packed documents (RoPE and the SDPA
        document mask follow them); ``attn_kwargs`` reach the PBS layers (``pbs_query_end``,
        ``pbs_doc_starts``: trainer/batching.py ``attention_kwargs``)."""
        return self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                     use_cache=False, **attn_kwargs).last_hidden_state

    def loss_sum(self, hidden: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the positions whose target (``shift_labels``, aligned with
        ``hidden``) is not -100; float32. Liger's fused loss reads the head's weight inside the
        engine's forward (ZeRO-3 gathers it there); the no-grad eval keeps the chunked loss."""
        head = self.lm.get_output_embeddings()
        if self.fused_loss is not None and torch.is_grad_enabled():
            return self.fused_loss(head.weight, hidden.flatten(0, 1),
                                   shift_labels.flatten()).float()
        chunk = max(1, self.chunk_tokens // hidden.shape[0])
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[1], chunk):
            h, t = hidden[:, s:s + chunk], shift_labels[:, s:s + chunk]
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss_sum, head, h, t, use_reentrant=False)
            else:
                total = total + _chunk_loss_sum(head, h, t)
        return total

    def token_losses(self, hidden: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every position (float32, 0 where the target is -100), chunked as
        in :meth:`loss_sum`; for evaluation, under ``torch.no_grad``."""
        head = self.lm.get_output_embeddings()
        chunk = max(1, self.chunk_tokens // hidden.shape[0])
        out = []
        for s in range(0, hidden.shape[1], chunk):
            logits = head(hidden[:, s:s + chunk]).float()
            t = shift_labels[:, s:s + chunk]
            out.append(F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=-100,
                                       reduction="none").view(t.shape))
        return torch.cat(out, dim=1)


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                           reduction="sum")
