"""Weights & Biases logging from rank 0, FLOP/MFU accounting and block-mask images."""

from __future__ import annotations

import json
import netrc
import os

import torch
from omegaconf import DictConfig, OmegaConf

# Dense bf16 tensor-core peak per device (FLOP/s); MFU is skipped for devices not listed.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
              "A10G": 125e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_token(config, context: float, densities: dict[int, float]) -> float:
    """Training FLOPs per token (forward + backward, no recompute): 6 x matmul params plus
    causal attention over the computed blocks (``densities`` per PBS layer, 1.0 elsewhere);
    ``context``: the sequence (document) length that attention is causal over, or the mean
    of L^2 / L over documents of lengths L."""
    h, layers = config.hidden_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = h * (2 * q + 2 * kv) + 3 * h * config.intermediate_size
    matmul = layers * per_layer + h * config.vocab_size
    attn_dense = 2 * 2 * context * q / 2  # QK^T and PV, half the pairs are causal
    attn = sum(attn_dense * densities.get(i, 1.0) for i in range(layers))
    return 6 * matmul + 3 * attn


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """A W&B run on rank 0 (none elsewhere, none with mode=disabled)."""

    def __init__(self, cfg: DictConfig, run_dir: str, rank: int):
        wcfg = cfg.logging.wandb
        mode = wcfg.mode
        if mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"logging.wandb.mode must be auto, online, offline or disabled, "
                             f"got {mode!r}")
        if mode == "auto":
            mode = "online" if _has_credentials() else "offline"
        self.run = None
        self._warned_no_matplotlib = False
        # Machine-readable copy of every logged dict (rank 0, any W&B mode): <run>/metrics.jsonl
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a") if rank == 0 else None
        if rank != 0 or mode == "disabled":
            return
        import wandb
        os.environ.setdefault("WANDB_DIR", run_dir)
        self.run = wandb.init(project=wcfg.project, entity=wcfg.entity, group=wcfg.group,
                              tags=list(wcfg.tags), name=wcfg.name or cfg.trainer.run_id,
                              mode=mode, dir=os.environ["WANDB_DIR"],
                              config=OmegaConf.to_container(cfg, resolve=True))
        if mode == "offline":
            print(f"wandb: offline run (no credentials); upload later with: "
                  f"wandb sync {os.path.dirname(self.run.dir)}", flush=True)

    def log(self, metrics: dict, step: int) -> None:
        if self._jsonl is not None and metrics:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self._jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_block_mask(self, plan: tuple, step: int, layer: int) -> None:
        """Log the captured plan of ``layer`` as an image (skipped without matplotlib)."""
        if self.run is None or plan is None:
            return
        try:
            import matplotlib
        except ImportError:
            if not self._warned_no_matplotlib:
                print("wandb: matplotlib is not installed; block-mask images are skipped "
                      "(pip install matplotlib)", flush=True)
                self._warned_no_matplotlib = True
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import wandb
        fig = block_mask_figure(*plan, title=f"layer {layer}, batch 0, head 0, step {step}")
        self.run.log({"attn/block_mask": wandb.Image(fig)}, step=step)
        plt.close(fig)

    def finish(self, summary: dict, exit_code: int = 0) -> None:
        """Close the metrics file and finish the W&B run (marked failed for ``exit_code`` != 0);
        later calls do nothing."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.run is not None:
            self.run.summary.update(summary)
            self.run.finish(exit_code=exit_code)
            self.run = None

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Finish the run as failed, with the error in its summary, when training raises."""
        if exc is not None:
            self.finish({"error": f"{exc_type.__name__}: {exc}"}, exit_code=1)


def block_mask_figure(block_mask: torch.Tensor, key_perm: torch.Tensor, block_size: int,
                      title: str):
    """Two panels: computed (query block, permuted key block) and the same computation seen in
    original key order (share of each original key block's keys that are computed)."""
    import matplotlib.pyplot as plt

    nb, n = block_mask.shape[0], key_perm.shape[0]
    perm_block = torch.arange(n) // block_size
    token_cols = block_mask[:, perm_block].float()  # (nb, N) over permuted positions
    original = torch.zeros(nb, n).index_copy_(1, key_perm, token_cols)
    counts = torch.bincount(torch.arange(n) // block_size, minlength=nb).float()
    original_blocks = torch.zeros(nb, nb).index_add_(1, torch.arange(n) // block_size, original)
    original_blocks /= counts
    causal = torch.tril(torch.ones(nb, nb, dtype=torch.bool))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
    for ax, data, name in ((axes[0], block_mask.float(), "permuted key blocks"),
                           (axes[1], original_blocks, "original key order")):
        ax.imshow(data.masked_fill(~causal, float("nan")), cmap="viridis", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xlabel(name)
        ax.set_ylabel("query block")
    fig.suptitle(f"{title}: density {block_mask[causal].float().mean():.2f}")
    fig.tight_layout()
    return fig
