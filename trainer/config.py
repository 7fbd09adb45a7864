"""Typed structured configs of every Hydra group, registered in the ConfigStore.

``conf/config.yaml`` starts from the ``job_schema`` node, so every key and type below is checked
when Hydra composes the config: a typo or a wrong type fails before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from .adapters import PeftConfig
from .attention import AttentionConfig
from .data import DataConfig
from .model import ModelConfig


@dataclass
class DeepSpeedConfig:
    """``deepspeed`` group: ZeRO stage, offload and precision."""

    stage: int = 0
    offload_optimizer: bool = False  # ZeRO-2/3: optimizer state (and step) on CPU
    # ZeRO-3 with optim=cpu_adam: share of the optimizer state offloaded, the rest stays and steps
    # on the GPU (DeepSpeed's partial offload, Twin-Flow; rounded to whole sub-groups of 1e9)
    offload_optimizer_ratio: float = 1.0
    offload_param: bool = False  # ZeRO-3: parameters on CPU
    bf16: str = "auto"  # "auto" (bf16 on GPUs that support it, fp32 on CPU) | "true" | "false"
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000


@dataclass
class OptimConfig:
    """``optim`` group: optimizer and warmup + cosine LR schedule."""

    name: str = "adamw"  # "adamw" (torch) | "fused_adam" (DeepSpeed, GPU) | "cpu_adam" (offload)
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at trainer.max_steps


@dataclass
class TrainerConfig:
    """``trainer`` group: loop, batch, checkpoint and eval settings."""

    max_steps: int = 100
    max_minutes: float = 0.0  # stop training after this long (0: none); eval/save/export still run
    micro_batch_size: int = 1
    grad_accum: int = 1
    grad_clip: float = 1.0
    gradient_checkpointing: bool | None = None  # None: on when data.seq_len >= 4096
    eval_every: int = 0  # 0: eval only at the end
    save_every: int = 0  # 0: checkpoint only at the end
    keep_checkpoints: int = 2  # newest complete checkpoints kept per run folder (0: all)
    output_dir: str = "runs/tiny-passkey"
    run_id: str = "${oc.env:PBS_RUN_ID}"  # one run folder per job: output_dir/run_id
    resume: str = "none"  # "none" | "auto" (newest checkpoint under output_dir) | a checkpoint dir
    save_final: bool = True  # checkpoint at the end (always saved when a ZeRO-3 HF export follows)
    export_hf: bool = True  # save_pretrained(safetensors) + tokenizer into <run>/hf at the end
    seed: int = 0
    log_every: int = 1
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    sequence_parallel_size: int = 1  # Ulysses: ranks per sequence (trainer/parallel.py)
    activation_offload: bool = False  # checkpointed layers' inputs in CPU memory until backward
    collective_timeout_min: float = 30.0  # a collective waiting longer fails the job (all groups)
    nonfinite: str = "stop"  # non-finite loss/gradients: "stop" (exit non-zero) | "skip" the step


@dataclass
class WandbConfig:
    project: str = "pbs-finetune"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # default: trainer.run_id
    mode: str = "auto"  # "auto" (online with credentials, else offline) | online | offline | disabled


@dataclass
class LoggingConfig:
    """``logging`` group: W&B, the block-mask image interval, the progress bar, and an optional
    CUDA memory snapshot of one step (``python -m bench.memory_peak`` reads it)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    image_every: int = 50  # 0: no block-mask images
    progress_bar: bool = True
    memory_snapshot_step: int = 0  # CUDA: record allocations during this step, dump for analysis


@dataclass
class JobConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    attention: AttentionConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logging: LoggingConfig = MISSING
    peft: PeftConfig = MISSING


def register_configs() -> None:
    """Schema of the whole job plus one schema per group (``conf/<group>/*.yaml`` extend them)."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    for group, node in (("model", ModelConfig), ("data", DataConfig),
                        ("attention", AttentionConfig), ("deepspeed", DeepSpeedConfig),
                        ("optim", OptimConfig), ("trainer", TrainerConfig),
                        ("logging", LoggingConfig), ("peft", PeftConfig)):
        cs.store(group=group, name=f"{group}_schema", node=node)
