"""Helpers for the trainer tests: run the job in a subprocess, read its logs and W&B file."""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Small, fast overrides: 2 layers, 256 tokens, blocks of 32 in segments of 64 (so PBS is sparse).
TINY = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16", "data.seq_len=256",
        "data.eval_samples=4", "attention.block_size=32", "attention.segment_size=64",
        "attention.backend=torch", "logging.progress_bar=false", "optim.warmup_steps=2",
        "trainer.grad_accum=1"]


def compose_config(overrides: list[str]):
    """The job's config from ``conf/`` with Hydra command-line ``overrides``."""
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def save_base_model(path: Path, overrides: list[str], seed: int = 0) -> Path:
    """A random-init model of the ``model.*`` ``overrides`` (e.g. ``TINY``'s) and the built-in
    tokenizer, saved as a local HF checkpoint: the "pretrained" base ``model.path`` loads."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.model import ModelConfig, architecture_config
    from trainer.tokenizer import build_tokenizer

    fields = {k.removeprefix("model."): type(getattr(ModelConfig, k.removeprefix("model.")))(v)
              for k, v in (o.split("=", 1) for o in overrides if o.startswith("model."))}
    tokenizer = build_tokenizer()
    config = architecture_config(ModelConfig(**fields), len(tokenizer), 512)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                        "MASTER_PORT", "PBS_RUN_ID")}
    env.update(WANDB_DIR=str(tmp_path), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_MODE="offline",
               WANDB_SILENT="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HYDRA_FULL_ERROR="0", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def run_job(args: list[str], tmp_path: Path, launcher: list[str] | None = None,
            timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m"]) + ["trainer.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=job_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(run_dir: Path, rank: int = 0) -> dict[int, float]:
    """{step: loss} from the per-rank log file."""
    text = (run_dir / f"train_rank{rank}.log").read_text()
    return {int(s): float(v) for s, v in re.findall(r"step (\d+) \| loss ([0-9.]+)", text)}


def wandb_records(wandb_dir: Path) -> list:
    """The ``wandb_internal_pb2.Record``s of the offline run's ``.wandb`` file (LevelDB-log
    framing)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    data = Path(files[0]).read_bytes()
    block, pos, chunk, records = 32768, 7, b"", []  # 7-byte W&B header, then 32 KiB blocks
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(chunk)
            records.append(rec)
            chunk = b""
        if length == 0 and kind == 0:
            break
    return records


def wandb_history_keys(wandb_dir: Path) -> set[str]:
    """Keys of every history row in the offline run."""
    return {item.key or item.nested_key[0] for rec in wandb_records(wandb_dir)
            if rec.WhichOneof("record_type") == "history" for item in rec.history.item}


def wandb_config(wandb_dir: Path) -> dict:
    """The offline run's config (top-level keys, values decoded from JSON): the run record's,
    updated by any config records."""
    config = {}
    for rec in wandb_records(wandb_dir):
        kind = rec.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = rec.run.config.update if kind == "run" else rec.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    return config


def run_dirs(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.iterdir() if p.is_dir())
