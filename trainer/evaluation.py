"""Evaluation: teacher-forced passkey retrieval accuracy and LM loss per eval length."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .batching import attention_kwargs, collate
from .model import CausalLMWithChunkedLoss
from .parallel import SequenceParallel

log = logging.getLogger("trainer")


@torch.no_grad()
def evaluate(engine, eval_sets: dict, sp: SequenceParallel,
             device: torch.device) -> dict[str, float]:
    """``eval/retrieval_acc[/len_NNNNN]`` (a sample counts when every answer token is the
    argmax) and ``eval/loss[/len_NNNNN]`` (token-weighted). Every rank runs the same number of
    batches and LM-head calls (ZeRO-3 gathers stay in step); under sequence parallelism each
    rank scores the answer tokens inside its shard and the group adds them up."""
    model: CausalLMWithChunkedLoss = engine.module
    head = model.lm.get_output_embeddings()
    bs = sp.micro_batch_size
    engine.eval()
    metrics = {}
    for seq_len, ds in eval_sets.items():
        stats = torch.zeros(4, dtype=torch.float64, device=device)  # correct, samples, loss, tokens
        for b in range(math.ceil(len(ds) / (sp.dp_world * bs))):
            idx = [(b * sp.dp_world + sp.dp_rank) * bs + j for j in range(bs)]
            valid = torch.tensor([i < len(ds) for i in idx], device=device)
            full = collate([ds[i % len(ds)] for i in idx])
            predicts_answer = F.pad(full["answer_mask"][:, 1:], (0, 1))  # hidden t -> token t+1
            batch = {k: v.to(device) for k, v in sp.shard(full).items()}
            hidden = model.hidden_states(batch["input_ids"], batch["position_ids"],
                                         **attention_kwargs(batch))
            where = sp.shard_tokens(predicts_answer).to(device)
            hit = torch.zeros_like(where)
            hit[where] = head(hidden[where]).argmax(-1) == batch["shift_labels"][where]
            right, answers = sp.all_reduce(torch.stack([hit.sum(1), where.sum(1)]))
            if sp.rank == 0:  # each sample once per group
                stats[0] += ((right == answers) & (answers > 0) & valid).sum()
                stats[1] += valid.sum()
            for i in range(bs):  # same number of LM-head calls on every rank (ZeRO-3)
                labels = batch["shift_labels"][i:i + 1]
                loss = model.loss_sum(hidden[i:i + 1], labels)
                if valid[i]:
                    stats[2:] += torch.stack([loss.double(), (labels != -100).sum().double()])
        dist.all_reduce(stats)
        metrics[f"eval/retrieval_acc/len_{seq_len:05d}"] = (stats[0] / stats[1]).item()
        metrics[f"eval/loss/len_{seq_len:05d}"] = (stats[2] / stats[3].clamp(min=1)).item()
    engine.train()
    for name in ("retrieval_acc", "loss"):
        values = [v for k, v in metrics.items() if k.startswith(f"eval/{name}/")]
        metrics[f"eval/{name}"] = sum(values) / len(values)
    log.info("eval | %s", " | ".join(f"{k.removeprefix('eval/')} {v:.4f}"
                                     for k, v in metrics.items()))
    return metrics
