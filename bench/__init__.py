"""Benchmarks and GPU evidence scripts (not tests): see docs/benchmarks.md and docs/results.md."""

import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """Short commit of the checkout; ``BENCH_COMMIT`` overrides it (a device machine gets the
    working tree without .git)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent.parent)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"
