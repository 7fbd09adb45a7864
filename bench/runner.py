"""Run the project's trainer (``python -m trainer.train``) as a subprocess and read its metrics.

Each run writes ``<output_dir>/<run_id>/metrics.jsonl`` (one JSON object per logged step, the
W&B keys); :func:`run_trainer` returns those rows with the exit status and an error summary.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from bench import git_commit

REPO = Path(__file__).resolve().parent.parent
# Quiet, no W&B, no block-mask images, no progress bar: only the metrics file matters here.
QUIET = ["logging.wandb.mode=disabled", "logging.image_every=0", "logging.progress_bar=false"]


@dataclass
class TrainerRun:
    """Outcome of one trainer subprocess."""

    status: str  # "ok" | "oom" | "error" | "timeout"
    error: str
    wall_s: float
    run_dir: str
    rows: list[dict] = field(default_factory=list)

    def train_rows(self) -> list[dict]:
        return [r for r in self.rows if "train/loss" in r]

    def last(self, prefix: str) -> dict:
        """The last logged row holding a key that starts with ``prefix``."""
        hits = [r for r in self.rows if any(k.startswith(prefix) for k in r)]
        return hits[-1] if hits else {}


def run_trainer(overrides: list[str], output_dir: str, run_id: str,
                timeout_s: float, gpu: str | None = None, nproc: int = 1) -> TrainerRun:
    """``python -m trainer.train <overrides>`` into ``output_dir/run_id`` (on GPU ``gpu`` if
    given; ``nproc`` > 1: that many ranks through the deepspeed launcher); never raises."""
    run_dir = Path(output_dir) / run_id
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    env = {**os.environ, "PBS_RUN_ID": run_id}  # the trainer picks a free port by itself
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    launcher = [sys.executable, "-m"] if nproc == 1 else [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
        "--master_port", str(29500 + os.getpid() % 1000), "--no_local_rank", "--module"]
    cmd = [*launcher, "trainer.train", f"trainer.output_dir={output_dir}", *QUIET, *overrides]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(1.0, timeout_s))
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout or ""
        rc, out = None, partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    wall = time.perf_counter() - t0
    rows = read_metrics(run_dir / "metrics.jsonl")
    if rc == 0:
        return TrainerRun("ok", "", wall, str(run_dir), rows)
    print(out[-3000:], flush=True)
    return TrainerRun(*failure(rc, out), wall, str(run_dir), rows)


def failure(rc: int | None, output: str) -> tuple[str, str]:
    """(status, error) of a run that did not exit 0 (``rc`` None: it ran out of time)."""
    status = "timeout" if rc is None else "error"
    if "out of memory" in output.lower() or "OutOfMemoryError" in output:
        status = "oom"
    if rc is not None and rc < 0:  # a signal ended it: its last output line explains nothing
        return status, f"killed by {signal.Signals(-rc).name}" + (
            " (the host's out-of-memory killer?)" if rc == -signal.SIGKILL else "")
    return status, error_line(output) or status


def run_trainers(jobs: list[tuple[str, list[str]]], output_dir: str, budget_s: float,
                 parallel: int = 1) -> list[TrainerRun | None]:
    """Run ``(run_id, overrides)`` jobs, ``parallel`` at a time (round-robin over the visible
    GPUs, several per GPU if ``parallel`` exceeds them), each with the budget left when it starts;
    a job that would start with under 30 s left is skipped (None). Results in job order."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    gpus = gpus[:torch.cuda.device_count()]
    t0 = time.perf_counter()

    def one(i: int, run_id: str, overrides: list[str]) -> TrainerRun | None:
        left = budget_s - (time.perf_counter() - t0)
        if left < 30:
            return None
        gpu = gpus[i % len(gpus)] if len(gpus) > 1 else None
        return run_trainer(overrides, output_dir, run_id, left, gpu)

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        futures = [pool.submit(one, i, run_id, over) for i, (run_id, over) in enumerate(jobs)]
        return [f.result() for f in futures]


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def error_line(output: str) -> str:
    """The last line that looks like an exception message (for the results table)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln.lower()]
    return (errors or lines or [""])[-1][:300]


def median_of(rows: list[dict], key: str, skip: int) -> float | None:
    """Median of ``key`` over ``rows[skip:]`` (warm-up rows excluded)."""
    values = [r[key] for r in rows[skip:] if key in r]
    return median(values) if values else None


def environment() -> dict:
    """Card, versions, commit and date for the results files."""
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": sys.version.split()[0],
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    info["commit"] = git_commit()
    return info


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}", flush=True)


def write_results(out: Path, data: dict, table: str, note: str = "") -> None:
    """JSON to ``out``, the markdown table beside it (``.md``), and the table on stdout."""
    save_json(out, data)
    out.with_suffix(".md").write_text(table + "\n")
    print(f"\n{data['device']} | commit {data['commit']}{note}\n{table}", flush=True)


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = [[f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in r]
           for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in fmt])
