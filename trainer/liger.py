"""Liger's Triton kernels (``liger-kernel``, ``model.liger=true``): RMSNorm, SwiGLU and RoPE of
the model family patched into the built model, and the fused linear cross-entropy (LM head +
loss per chunk, gradients computed in the forward, the logits never whole) in place of the
chunked loss.

Liger's kernels are GPU kernels: on other devices nothing is patched and a warning names what
was skipped, so one config runs everywhere. Where a piece does not apply (a family Liger does
not know, an activation other than SiLU, an LM head that is not a plain bias-free linear layer,
e.g. one that carries a LoRA adapter) the model's own code and the chunked loss stay, with a
warning saying why.
"""

from __future__ import annotations

import inspect
import logging

import peft
import torch
from transformers import PreTrainedModel

log = logging.getLogger("trainer")

_KERNELS = {"rms_norm": "RMSNorm", "swiglu": "SwiGLU", "rope": "RoPE"}


def check_liger(enabled: bool, device: torch.device) -> None:
    """Before any work: on CUDA, ``model.liger=true`` needs ``liger-kernel`` installed."""
    if not enabled or device.type != "cuda":
        return
    try:
        import liger_kernel  # noqa: F401
    except ImportError as e:
        raise ImportError("model.liger=true needs liger-kernel: pip install -e '.[liger]' "
                          "(or pip install liger-kernel)") from e


def apply_liger(lm: PreTrainedModel, enabled: bool,
                device: torch.device) -> torch.nn.Module | None:
    """Patch Liger's RMSNorm, SwiGLU and RoPE into ``lm`` (a model or a ``peft`` wrapper; call
    after ``peft``, as the HF Trainer does: Liger patches peft's trained copies of the norms
    too) and return Liger's fused linear cross-entropy (summed, -100 ignored) where it applies,
    else None (the chunked loss is kept)."""
    if not enabled:
        return None
    if device.type != "cuda":
        log.warning("model.liger=true on %s: Liger's kernels need a CUDA GPU; skipped RMSNorm, "
                    "SwiGLU, RoPE and the fused linear cross-entropy (the model's own layers "
                    "and the chunked loss run)", device.type)
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    base = lm.get_base_model() if isinstance(lm, peft.PeftModel) else lm
    model_type = base.config.model_type
    patch = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    wanted = dict.fromkeys(_KERNELS, True)
    if getattr(base.config, "hidden_act", "silu") not in ("silu", "swish"):
        wanted["swiglu"] = False
        log.warning("model.liger: SwiGLU skipped: the model's activation is %s, not SiLU",
                    base.config.hidden_act)
    if patch is None:
        log.warning("model.liger: Liger has no kernels for model type %r: skipped RMSNorm, "
                    "SwiGLU, RoPE", model_type)
    else:
        accepted = inspect.signature(patch).parameters
        skipped = [_KERNELS[k] for k in wanted if k not in accepted]
        if skipped:
            log.warning("model.liger: Liger's %s patch has no %s: skipped", model_type,
                        ", ".join(skipped))
        patch(model=base, cross_entropy=False, fused_linear_cross_entropy=False,
              **{k: v for k, v in wanted.items() if k in accepted})
        log.info("model.liger: Liger's %s kernels patched in (%s)", model_type,
                 ", ".join(_KERNELS[k] for k, v in wanted.items() if v and k in accepted))
    why = fused_loss_blocker(base.get_output_embeddings())
    if why is not None:
        log.warning("model.liger: fused linear cross-entropy skipped (%s): the chunked loss runs",
                    why)
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")


def fused_loss_blocker(head: torch.nn.Module) -> str | None:
    """Why Liger's fused linear cross-entropy, which reads ``head.weight`` directly, would
    compute something else than ``head(hidden)``; None when it applies."""
    if isinstance(head, peft.tuners.lora.LoraLayer):
        return "the LM head carries a LoRA adapter"
    inner = head.modules_to_save["default"] if isinstance(
        head, peft.utils.other.ModulesToSaveWrapper) else head
    if type(inner) is not torch.nn.Linear:
        return f"the LM head is a {type(inner).__name__}, not a plain linear layer"
    if inner.bias is not None:
        return "the LM head has a bias"
    return None
