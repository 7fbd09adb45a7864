"""Test entry point: build the trainer's job from Hydra overrides, run the first micro-batch
forward + backward exactly as ``trainer.train`` does, and save (rank 0) the loss and every
parameter's full gradient (gathered from ZeRO partitions) to ``$GRADS_OUT``.

    PBS_RUN_ID=x GRADS_OUT=/tmp/g.pt python -m tests.first_step_grads [overrides...]
"""

from __future__ import annotations

import os

import hydra
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from omegaconf import DictConfig, OmegaConf

from trainer.batching import BatchSampler
from trainer.config import register_configs
from trainer.train import build_job, forward_backward


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    job = build_job(cfg)
    tr = cfg.trainer
    sampler = BatchSampler(job.train_ds, tr.seed, tr.micro_batch_size, tr.grad_accum,
                           job.sp.dp_world, job.sp.dp_rank)
    loss = forward_backward(job, sampler.batch(0, 0))
    grads = {name: safe_get_full_grad(p).detach().cpu().clone()
             for name, p in job.engine.module.named_parameters()}
    offload = getattr(job.offload, "stats", None)  # DeepSpeed's activation offload, if on
    if dist.get_rank() == 0:
        torch.save({"loss": loss.cpu(), "grads": grads,
                    "offload_marked": offload.marked_tensors if offload else 0},
                   os.environ["GRADS_OUT"])
    dist.barrier()


if __name__ == "__main__":
    register_configs()
    main()
    dist.destroy_process_group()
    os._exit(0)
