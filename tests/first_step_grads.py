"""Test entry point: build the trainer's job from Hydra overrides, run the first micro-batch
forward + backward exactly as ``trainer.train`` does, and save (rank 0) the loss and every
trained parameter's full gradient (gathered from ZeRO partitions) to ``$GRADS_OUT``.

    PBS_RUN_ID=x GRADS_OUT=/tmp/g.pt python -m tests.first_step_grads [overrides...]

With ``FUSED_LOSS_STANDIN=1`` the loss is :class:`StandInFusedLoss` in place of Liger's fused
linear cross-entropy (which needs a GPU): the same call, reading the LM head's weight outside
the head's forward.
"""

from __future__ import annotations

import os

import hydra
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad
from omegaconf import DictConfig, OmegaConf

import trainer.train
from trainer.batching import BatchSampler
from trainer.config import register_configs
from trainer.train import build_job, forward_backward


class StandInFusedLoss(torch.nn.Module):
    """Liger's ``LigerFusedLinearCrossEntropyLoss(reduction="sum")`` call in plain torch."""

    def forward(self, weight: torch.Tensor, hidden: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    job = build_job(cfg)
    tr = cfg.trainer
    sampler = BatchSampler(job.train_ds, tr.seed, tr.micro_batch_size, tr.grad_accum,
                           job.sp.dp_world, job.sp.dp_rank)
    loss = forward_backward(job, sampler.batch(0, 0))
    grads = {name: safe_get_full_grad(p).detach().cpu().clone()
             for name, p in job.engine.module.named_parameters() if p.requires_grad}
    offload = getattr(job.offload, "stats", None)  # DeepSpeed's activation offload, if on
    if dist.get_rank() == 0:
        torch.save({"loss": loss.cpu(), "grads": grads,
                    "offload_marked": offload.marked_tensors if offload else 0},
                   os.environ["GRADS_OUT"])
    dist.barrier()


if __name__ == "__main__":
    if os.environ.get("FUSED_LOSS_STANDIN"):
        trainer.train.apply_liger = lambda lm, enabled, device: StandInFusedLoss()
    register_configs()
    main()
    dist.destroy_process_group()
    os._exit(0)
