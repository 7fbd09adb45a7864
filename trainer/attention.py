"""PBS attention as a ``transformers`` attention implementation, with per-layer density tracking.

``install_attention(model, cfg)`` switches every decoder layer of a model loaded with
``attn_implementation="pbs"`` to PBS (layers in ``cfg.dense_layers`` keep SDPA, or, on packed
rows, attend densely inside each document through the same kernels). Each PBS layer
plans (permutation + block selection), then attends over the plan with the PBS kernels
(``impl=pbs``) or FlexAttention (``impl=flex``). Densities and plan times are kept as device
tensors / CUDA events and reduced once per log step, so the train loop adds no device syncs.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kernels import block_sparse_attention, pbs_plan

from .flex import flex_plan_attention


@dataclass
class AttentionConfig:
    """``attention`` group: ``pbs`` (permuted block-sparse), ``flex`` (the PBS plan run by
    FlexAttention) or ``sdpa`` (dense baseline)."""

    impl: str = "pbs"  # "pbs" | "flex" | "sdpa"
    block_size: int | None = None  # None: 128 on CUDA (fastest kernels), 64 elsewhere
    segment_size: int = 256
    threshold: float = 0.9
    permute: bool = True
    sink: bool = True
    density: float | None = None  # fixed share of blocks instead of threshold
    dense_layers: list[int] = field(default_factory=list)  # layer indices kept on SDPA
    backend: str = "auto"  # kernels backend: "auto" | "triton" | "torch"
    image_layer: int = -1  # layer whose block mask is drawn (-1: last PBS layer)
    sdpa_backend: str = "auto"  # torch SDPA backend of dense layers: auto|cudnn|flash|efficient|math


_SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                  "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def sdpa_backend_context(name: str) -> contextlib.AbstractContextManager:
    """Pin torch SDPA to one backend (``auto``: torch's own choice) for forward + backward."""
    if name == "auto":
        return contextlib.nullcontext()
    if name not in _SDPA_BACKENDS:
        raise ValueError(f"attention.sdpa_backend must be auto or one of {sorted(_SDPA_BACKENDS)}, "
                         f"got {name!r}")
    return sdpa_kernel([_SDPA_BACKENDS[name]])


def _elapsed_ms(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
    end.synchronize()
    return start.elapsed_time(end)


class DensityTracker:
    """Collects computed-block counts per layer as tensors and, while ``time_plans`` is set,
    the planning time; ``reduce()`` and ``reduce_plan_ms()`` sync once."""

    def __init__(self, pbs_layers: list[int], image_layer: int):
        self.pbs_layers = pbs_layers
        self.image_layer = image_layer
        self.capture_plan = False
        self.last_plan = None
        self.time_plans = False
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}
        self._plan_times: list[float | tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def time_plan(self, device: torch.device) -> Iterator[None]:
        """Time the enclosed planning if ``time_plans`` is set: CUDA events (read at
        ``reduce_plan_ms``, no sync here), else the CPU clock."""
        if not self.time_plans:
            yield
        elif device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._plan_times.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._plan_times.append((time.perf_counter() - t0) * 1e3)

    def reduce_plan_ms(self) -> float | None:
        """Milliseconds of all plans timed since the last call (None if none), then reset."""
        if not self._plan_times:
            return None
        total = sum(t if isinstance(t, float) else _elapsed_ms(*t) for t in self._plan_times)
        self._plan_times.clear()
        return total

    def record(self, layer: int, plan) -> None:
        density = plan.density_per_head().mean().detach()
        self._sums[layer] = self._sums.get(layer, 0) + density
        self._counts[layer] = self._counts.get(layer, 0) + 1
        if self.capture_plan and layer == self.image_layer:
            self.last_plan = (plan.block_mask[0, 0].cpu(), plan.key_perm[0, 0].cpu(),
                              plan.block_size)

    def reduce(self) -> dict[int, float]:
        """Mean density per PBS layer since the last call (one device sync), then reset."""
        if not self._sums:
            return {}
        layers = sorted(self._sums)
        means = torch.stack([self._sums[i] / self._counts[i] for i in layers]).tolist()
        self._sums.clear()
        self._counts.clear()
        return dict(zip(layers, means))


@dataclass
class _LayerSettings:
    cfg: AttentionConfig
    tracker: DensityTracker
    layer: int
    dense: bool  # one of attention.dense_layers: SDPA, or dense inside packed documents


def pbs_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """``transformers`` attention function: (B, Hq, N, D) in, ((B, N, Hq, D), None) out.

    Causal over the whole row unless the model's kwargs carry documents: transformers passes no
    mask to a custom implementation. ``pbs_query_end`` (int (B,)): real lengths of right-padded
    rows, each planned as one document (no block of the padding computed) where N is a multiple
    of the block size, else as ``kernels.pbs_plan``'s ``query_end`` (keys ranked by the last
    real queries); with ``pbs_doc_starts`` (int (B, M), packed rows) it is (B, M), the real end
    of each document, and attention stays inside documents (``kernels.pbs_plan``). Both hold
    GLOBAL token offsets under sequence parallelism. Dense layers keep SDPA on padded rows.
    """
    query_end = kwargs.pop("pbs_query_end", None)
    doc_starts = kwargs.pop("pbs_doc_starts", None)
    settings: _LayerSettings | None = getattr(module, "pbs_settings", None)
    if (settings is None or query.shape[2] != key.shape[2]
            or (settings.dense and doc_starts is None)):
        # Not installed, incremental decoding, or a dense layer: dense causal attention.
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    cfg, tracker = settings.cfg, settings.tracker
    if doc_starts is None and query_end is not None and query.shape[2] % cfg.block_size == 0:
        doc_starts, query_end = padded_rows_as_documents(query_end)
    # A dense layer on packed rows: every causal block inside each document, no permutation.
    threshold, permute, density = ((1.0, False, None) if settings.dense
                                   else (cfg.threshold, cfg.permute, cfg.density))
    documents = {} if doc_starts is None else {"doc_starts": doc_starts}
    with tracker.time_plan(query.device):
        plan = pbs_plan(query, key, cfg.block_size, cfg.segment_size, threshold, cfg.sink,
                        permute, density=density, scale=scaling, query_end=query_end,
                        backend=cfg.backend, **documents)
    if cfg.impl == "flex":
        out = flex_plan_attention(query, key, value, plan, scaling)
    else:
        out = block_sparse_attention(query, key, value, plan, scaling, cfg.backend)
    if not settings.dense and (module.training or tracker.capture_plan):
        tracker.record(settings.layer, plan)
    return out.transpose(1, 2), None


AttentionInterface.register("pbs", pbs_attention_forward)

# The layout of the last padded batch: (weakref to its query_end, version, (doc_starts, ends)).
_PADDED_LAYOUT: list = [None]


def padded_rows_as_documents(query_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows as one document each, ``(doc_starts, ends)`` of shape (B, 1): the
    kernels then skip every block of the padding and plan the real tokens' last segment as the
    document's (incomplete) tail. The same tensors for every layer of a batch, so the kernels
    check the layout once per batch."""
    hit = _PADDED_LAYOUT[0]
    if hit is not None and hit[0]() is query_end and hit[1] == query_end._version:
        return hit[2]
    layout = (torch.zeros_like(query_end)[:, None], query_end[:, None])
    _PADDED_LAYOUT[0] = (weakref.ref(query_end), query_end._version, layout)
    return layout


def decoder_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Self-attention modules of a HF decoder model, in layer order."""
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with layer_idx/o_proj; "
                         "PBS attention supports Llama-style decoders (Llama, Qwen2, Mistral, ...)")
    return sorted(modules, key=lambda m: m.layer_idx)


def install_attention(model: torch.nn.Module, cfg: AttentionConfig) -> DensityTracker:
    """Attach PBS settings to every non-dense decoder layer; returns the density tracker."""
    if cfg.impl != "sdpa" and cfg.block_size is None:
        raise ValueError("attention.block_size is null: set it (the trainer picks 128 on CUDA "
                         "and 64 elsewhere before it installs attention)")
    modules = decoder_attention_modules(model)
    num_layers = len(modules)
    dense = {i % num_layers for i in cfg.dense_layers}
    bad = [i for i in cfg.dense_layers if not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(f"attention.dense_layers {bad} out of range for {num_layers} layers")
    pbs_layers = [] if cfg.impl == "sdpa" else [m.layer_idx for m in modules
                                                if m.layer_idx not in dense]
    image_layer = pbs_layers[-1] if pbs_layers else -1
    if cfg.image_layer != -1:
        image_layer = cfg.image_layer % num_layers
        if image_layer not in pbs_layers:
            raise ValueError(f"attention.image_layer={cfg.image_layer} is not a PBS layer "
                             f"(PBS layers: {pbs_layers})")
    tracker = DensityTracker(pbs_layers, image_layer)
    if cfg.impl != "sdpa":
        for m in modules:
            m.pbs_settings = _LayerSettings(cfg, tracker, m.layer_idx, m.layer_idx in dense)
    return tracker
