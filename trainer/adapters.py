"""Parameter-efficient fine-tuning through ``peft``: LoRA on the decoder's linear layers plus
modules trained in full (LongLoRA's recipe: embeddings and norms), continuing from a saved
adapter, and the export of the adapter and of the merged model.

``peft=lora`` wraps the model in a ``peft.PeftModel``: LoRA layers on ``target_modules`` and
``trainable_extra`` as peft's ``modules_to_save`` (a trained copy of each such module; the
original stays frozen, so the base weights never change). Everything downstream (attention,
gradient checkpointing, Liger, sequence parallelism, DeepSpeed) works on the wrapped model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field

import peft
import torch
from omegaconf import DictConfig
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .model import param_numel

log = logging.getLogger("trainer")

ADAPTER_DIR = "adapter"  # <run>/adapter: the adapter export beside <run>/hf (the merged model)


@dataclass
class PeftConfig:
    """``peft`` group: ``none`` (full fine-tuning) or ``lora`` (LongLoRA: LoRA plus embeddings
    and norms trained in full)."""

    method: str = "none"  # "none" | "lora"
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scale is alpha / r
    dropout: float = 0.0  # dropout on the LoRA branch's input
    # Module names (peft matching: the name or its last dotted parts); "all-linear": every
    # linear layer of the decoder (the LM head excluded).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Modules trained in full (peft's modules_to_save), matched by name suffix: "norm" matches
    # every RMSNorm (input_layernorm, post_attention_layernorm, the final norm).
    trainable_extra: list[str] = field(default_factory=lambda: ["embed_tokens", "norm"])


def check_peft(cfg: DictConfig, model_config: PretrainedConfig) -> None:
    """Errors, before any data or weights are loaded, for LoRA settings that cannot run: the
    method, rank, alpha, dropout, module names the model does not have, and a
    ``model.adapter_path`` that is not a LoRA adapter of this architecture."""
    p, path = cfg.peft, cfg.model.adapter_path
    if p.method not in ("none", "lora"):
        raise ValueError(f"peft.method must be 'none' or 'lora', got {p.method!r}")
    if p.method == "none":
        if path is not None:
            raise ValueError(f"model.adapter_path={path} continues a LoRA adapter: add peft=lora")
        return
    if p.r < 1:
        raise ValueError(f"peft.r (the LoRA rank) must be >= 1, got {p.r}")
    if p.alpha <= 0:
        raise ValueError(f"peft.alpha must be > 0, got {p.alpha}")
    if not 0 <= p.dropout < 1:
        raise ValueError(f"peft.dropout must be in [0, 1), got {p.dropout}")
    with torch.device("meta"):  # module names and shapes only
        model = AutoModelForCausalLM.from_config(model_config)
    if path is None:
        _check_names(model, list(p.target_modules), "peft.target_modules")
        _check_names(model, list(p.trainable_extra), "peft.trainable_extra", suffix=True)
        return
    config = _adapter_config(path)
    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    here = (f"this model ({type(model).__name__}, {model_config.num_hidden_layers} layers, "
            f"hidden {model_config.hidden_size})")
    try:
        lora = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as e:  # peft: none of its target modules is in this model
        raise ValueError(f"model.adapter_path={path} belongs to another architecture than "
                         f"{here}: {str(e).splitlines()[0]}") from e
    expected = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(lora).items()}
    if saved != expected:
        missing, extra = sorted(expected.keys() - saved), sorted(saved.keys() - expected)
        shapes = [f"{k}: {saved[k]} saved, {expected[k]} here" for k in sorted(saved)
                  if k in expected and saved[k] != expected[k]]
        raise ValueError(
            f"model.adapter_path={path} belongs to another architecture than {here}: "
            f"{len(missing)} weights missing {missing[:2]}, {len(extra)} unknown {extra[:2]}, "
            f"{len(shapes)} of another shape {shapes[:2]}")


def apply_peft(lm: PreTrainedModel, cfg: DictConfig) -> PreTrainedModel:
    """``lm`` wrapped by ``peft`` (``peft=lora``: fresh LoRA, or the adapter of
    ``model.adapter_path`` to continue), else ``lm`` itself. Adapter weights keep the model's
    dtype (DeepSpeed keeps the fp32 master copy)."""
    p, path = cfg.peft, cfg.model.adapter_path
    if p.method == "none":
        return lm
    if path is None:
        targets = list(p.target_modules)
        config = peft.LoraConfig(
            r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            modules_to_save=list(p.trainable_extra) or None,
            ensure_weight_tying=bool(lm.config.tie_word_embeddings),
            task_type="CAUSAL_LM")
        return peft.get_peft_model(lm, config, autocast_adapter_dtype=False)
    config = _adapter_config(path)
    config.inference_mode = False  # saved adapters say True: their weights would stay frozen
    ours = {"r": p.r, "lora_alpha": p.alpha, "lora_dropout": p.dropout}
    differ = {k: getattr(config, k) for k, v in ours.items() if getattr(config, k) != v}
    if differ:
        log.warning("model.adapter_path=%s: its own LoRA settings are used (%s), not the peft "
                    "group's", path, differ)
    model = peft.get_peft_model(lm, config, autocast_adapter_dtype=False)
    peft.set_peft_model_state_dict(model, peft.load_peft_weights(path, device="cpu"))
    return model


def trainable_summary(model: torch.nn.Module) -> str:
    """How many parameters train, of how many, and which: the model's own parameters (peft's
    frozen originals of the modules it trains in full are not counted twice)."""
    named = [(n, p) for n, p in model.named_parameters() if ".original_module." not in n]
    total = sum(param_numel(p) for _, p in named)
    trainable = sum(param_numel(p) for _, p in named if p.requires_grad)
    what = "full fine-tuning"
    if isinstance(model, peft.PeftModel):
        config = model.peft_config["default"]
        lora = sum(param_numel(p) for n, p in named if p.requires_grad and ".lora_" in n)
        targets = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
        extra = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                 if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}
        what = (f"LoRA r={config.r} alpha={config.lora_alpha} on {','.join(sorted(targets))}: "
                f"{lora / 1e6:.2f}M; in full {','.join(sorted(extra)) or 'nothing'}: "
                f"{(trainable - lora) / 1e6:.2f}M")
    return (f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M params train "
            f"({100 * trainable / max(total, 1):.2f}%, {what})")


def merged_model(lm: peft.PeftModel, state: dict[str, torch.Tensor],
                 adapter_dir: str) -> PreTrainedModel:
    """On one rank, on CPU: the trained weights ``state`` (``lm``'s state-dict keys, e.g.
    gathered from ZeRO-3 shards) in a copy of ``lm``'s architecture; saves the adapter
    (``save_pretrained``: loadable with ``peft.PeftModel.from_pretrained``) to ``adapter_dir``
    and returns the model with the adapter merged (``merge_and_unload``), in the base weights'
    dtype."""
    base = lm.get_base_model()
    with torch.device("meta"):  # the class itself: no ZeRO-3 partitioning, no weight init
        skeleton = type(base)(copy.deepcopy(base.config))
    model = peft.get_peft_model(skeleton, copy.deepcopy(lm.peft_config["default"]),
                                autocast_adapter_dtype=False)
    dtype = next(v.dtype for k, v in state.items() if k.endswith("base_layer.weight"))
    tied: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # one parameter in several modules
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                tied.setdefault(id(param), []).append((module, name))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    for (first, name), *others in tied.values():  # assign= gave each name its own tensor
        for module, other in others:
            setattr(module, other, getattr(first, name))
    meta = [k for k, v in model.state_dict().items() if v.is_meta]
    if unexpected or meta:
        raise RuntimeError(f"adapter export: trained state does not fit the model: unexpected "
                           f"{unexpected[:3]}, not filled {meta[:3]} (missing {missing[:3]})")
    model.save_pretrained(adapter_dir, safe_serialization=True)
    return model.merge_and_unload().to(dtype)


def _adapter_config(path: str) -> peft.LoraConfig:
    """The LoRA config saved in ``path`` (clear errors when it is not a LoRA adapter)."""
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file) or not os.path.isfile(
            os.path.join(path, "adapter_model.safetensors")):
        raise ValueError(f"model.adapter_path={path} is not a peft adapter (expected "
                         "adapter_config.json and adapter_model.safetensors there, as "
                         f"<run>/{ADAPTER_DIR} of a peft=lora run holds)")
    with open(config_file) as f:
        kind = json.load(f).get("peft_type")
    if kind != "LORA":
        raise ValueError(f"model.adapter_path={path} is a {kind} adapter; only LoRA continues")
    return peft.LoraConfig.from_pretrained(path)


def _check_names(model: torch.nn.Module, names: list[str], key: str,
                 suffix: bool = False) -> None:
    """Each of ``names`` matches a module as peft matches it: the full name or its last dotted
    parts (``suffix``: any end of the name, as peft matches modules_to_save); "all-linear"
    passes."""
    modules = [n for n, _ in model.named_modules() if n]
    for name in names:
        if name == "all-linear":
            continue
        if not any(m == name or m.endswith(name if suffix else "." + name) for m in modules):
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear)})
            raise ValueError(f"{key}: {type(model).__name__} has no module {name!r} (its linear "
                             f"layers: {', '.join(linear)}; use 'all-linear' for all of the "
                             "decoder's)")

