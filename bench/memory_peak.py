"""Where a training step's peak GPU memory goes, from a snapshot the trainer wrote with
``logging.memory_snapshot_step=N`` (``torch.cuda.memory`` allocation history).

    python -m bench.memory_peak runs/<run>/memory_snapshot_step_00003.pickle --top 15

Replays the recorded allocations and frees, finds the moment the live bytes peak, and sums the
allocations alive then by the source line that made them (the innermost frame in this project or
in transformers/torch Python code). Memory allocated before recording began (weights, optimizer
state) is the constant baseline and is reported once. Two snapshots (e.g. ``attention=sdpa`` and
``attention=pbs``) side by side show where their peaks differ.
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict
from pathlib import Path

_OWN = ("/kernels/", "/trainer/", "/bench/")


def allocation_site(frames: list[dict]) -> str:
    """``file:line (function)`` of the innermost project frame, else of the innermost Python
    frame, else ``?``."""
    python = [f for f in frames if str(f.get("filename", "")).endswith(".py")]
    own = [f for f in python if any(part in f["filename"] for part in _OWN)]
    frame = (own or python or [None])[0]
    if frame is None:
        return "?"
    name = frame["filename"]
    for marker in ("site-packages/", *(p.lstrip("/") for p in _OWN)):
        if marker in name:
            name = name[name.index(marker):].removeprefix("site-packages/")
            break
    return f"{name}:{frame['line']} ({frame.get('name', '?')})"


def peak_breakdown(trace: list[dict]) -> dict:
    """Peak of the live bytes relative to the start of the trace (frees of older allocations
    count down), and the allocations made during the trace that were alive at that moment."""
    live: dict[int, tuple[int, str]] = {}
    now = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], allocation_site(e.get("frames", [])))
            now += e["size"]
            if now > peak:
                peak, at_peak = now, dict(live)
        elif e["action"] == "free_completed":
            now -= live.pop(e["addr"])[0] if e["addr"] in live else e["size"]
    sites: dict[str, int] = defaultdict(int)
    for size, site in at_peak.values():
        sites[site] += size
    return {"peak_bytes": peak, "end_bytes": now,
            "new_end_bytes": sum(size for size, _ in live.values()),
            "sites": sorted(sites.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("snapshot", type=Path, help="memory_snapshot_step_NNNNN.pickle")
    p.add_argument("--device", type=int, default=0, help="CUDA device index in the snapshot")
    p.add_argument("--top", type=int, default=15, help="allocation sites to list (default 15)")
    args = p.parse_args(argv)
    if not args.snapshot.is_file():
        raise SystemExit(f"snapshot not found: {args.snapshot}")
    try:
        data = pickle.loads(args.snapshot.read_bytes())
        trace = data["device_traces"][args.device]
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError) as e:
        raise SystemExit(f"{args.snapshot}: not a torch.cuda.memory snapshot for device "
                         f"{args.device} ({type(e).__name__}: {e})") from None
    result = peak_breakdown(trace)
    baseline = sum(s["allocated_size"] for s in data.get("segments", [])
                   if s.get("device", args.device) == args.device) - result["end_bytes"]
    # live at the start of the step = live at the dump - net change during the step
    result["baseline_bytes"] = baseline
    gib = 2**30
    print(f"live when recording began:   {baseline / gib:.2f} GiB")
    print(f"peak above that in the step: {result['peak_bytes'] / gib:.2f} GiB "
          f"(peak {(baseline + result['peak_bytes']) / gib:.2f} GiB)")
    print("| allocated at | GiB alive at the peak |\n|---|---|")
    for site, size in result["sites"][:args.top]:
        print(f"| {site} | {size / gib:.3f} |")
    return result


if __name__ == "__main__":
    main()
