"""The max-context table: the longest sequence whose training steps complete, per attention and
memory-switch setting, on the GPUs given; peak memory and real tokens/s at every length tried.

Each (variant, length) is one trainer run of ``--steps`` steps (micro batch 1, bf16, gradient
checkpointing, passkey rows of full length, no eval/checkpoint). Lengths are tried in increasing
order; a variant stops at its first failure (out of memory, error, or the time budget).

    python3 -m bench.long_context --lengths 131072 262144 524288 --variants pbs_d0.2 pbs_d0.2_all
    python3 -m bench.long_context --nproc 4 --sp 4 --model llama3_8b --lengths 1048576 \\
        --extra deepspeed=zero3_offload optim=cpu_adam

Variants: ``<attention>[_<switches>]``; attention ``dense`` (SDPA cuDNN), ``pbs_d0.2``,
``pbs_t0.9``; switches ``offload`` (trainer.activation_offload), ``tiled`` (model.tiled_mlp),
``all`` (both).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.runner import environment, markdown_table, median_of, run_trainer, write_results

ATTENTION = {
    "dense": ["attention=sdpa", "attention.sdpa_backend=cudnn"],
    "pbs_d0.2": ["attention=pbs", "attention.density=0.2"],
    "pbs_t0.9": ["attention=pbs", "attention.threshold=0.9"],
}
SWITCHES = {"": [], "offload": ["trainer.activation_offload=true"],
            "tiled": ["model.tiled_mlp=true"],
            "all": ["trainer.activation_offload=true", "model.tiled_mlp=true"]}


def variant_overrides(name: str) -> list[str]:
    """Overrides of a variant name such as ``pbs_d0.2_all``."""
    for attn, over in ATTENTION.items():
        if name == attn or name.startswith(attn + "_"):
            switch = name[len(attn) + 1:]
            if switch in SWITCHES:
                return over + SWITCHES[switch]
    raise ValueError(f"unknown variant {name!r}: <{'|'.join(ATTENTION)}>[_<"
                     f"{'|'.join(s for s in SWITCHES if s)}>]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288])
    p.add_argument("--variants", nargs="+", default=["pbs_d0.2", "pbs_d0.2_all"])
    p.add_argument("--model", default="llama3_1b")
    p.add_argument("--nproc", type=int, default=1, help="ranks (GPUs) per run (default 1)")
    p.add_argument("--sp", type=int, default=1, help="trainer.sequence_parallel_size")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per run (default 2)")
    p.add_argument("--budget-s", type=float, default=540)
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    p.add_argument("--runs-dir", default="/tmp/pbs-long-context-runs")
    p.add_argument("--out", type=Path, default=Path("bench/results/long_context.json"))
    args = p.parse_args(argv)
    for v in args.variants:
        variant_overrides(v)
    return args


def overrides(args: argparse.Namespace, variant: str, n: int) -> list[str]:
    sp = [f"trainer.sequence_parallel_size={args.sp}"] if args.sp > 1 else []
    zero = ["deepspeed=zero1"] if args.sp > 1 and not any(
        x.startswith("deepspeed=") for x in args.extra) else []
    return [f"model={args.model}", "data=passkey", f"data.seq_len={n}", "data.min_len=null",
            "data.eval_samples=0", "trainer.micro_batch_size=1", "trainer.grad_accum=1",
            f"trainer.max_steps={args.steps}", "trainer.gradient_checkpointing=true",
            "trainer.eval_every=0", "trainer.save_every=0", "trainer.save_final=false",
            "trainer.export_hf=false", *sp, *zero, *variant_overrides(variant), *args.extra]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    data = {**environment(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": []}
    data["settings"]["runs_dir"] = str(args.runs_dir)
    stopped: set[str] = set()
    for n in sorted(args.lengths):
        for v in args.variants:
            left = args.budget_s - (time.perf_counter() - t0)
            if v in stopped or left < 60:
                data["rows"].append({"variant": v, "seq_len": n, "status": "skipped",
                                     "error": "stopped at a shorter length" if v in stopped
                                     else "budget"})
                continue
            run = run_trainer(overrides(args, v, n), args.runs_dir, f"{v}-{n}", left,
                              nproc=args.nproc)
            rows = run.train_rows()
            row = {"variant": v, "seq_len": n, "status": run.status, "error": run.error,
                   "steps": len(rows), "wall_s": round(run.wall_s, 1)}
            if rows:
                row.update(peak_mem_gb=max(r["mem/peak_gb"] for r in rows),
                           tokens_per_s=median_of(rows, "perf/tokens_per_sec", min(1, len(rows) - 1)),
                           step_time_s=rows[-1]["perf/step_time_s"],
                           density=rows[-1].get("attn/density", 1.0))
            if run.status != "ok":
                stopped.add(v)
            data["rows"].append(row)
            print({k: row.get(k) for k in ("variant", "seq_len", "status", "peak_mem_gb",
                                           "tokens_per_s")}, flush=True)
    longest = {v: max((r["seq_len"] for r in data["rows"] if r["variant"] == v
                       and r["status"] == "ok"), default=None) for v in args.variants}
    data["longest_ok"] = longest
    header = ["variant", "seq_len", "status", "peak GB", "real tok/s", "step s", "density"]
    md = markdown_table(header, [[r["variant"], r["seq_len"], r["status"], r.get("peak_mem_gb"),
                                  r.get("tokens_per_s"), r.get("step_time_s"), r.get("density")]
                                 for r in data["rows"]])
    md += "\n\nlongest completed: " + ", ".join(f"{v} {n}" for v, n in longest.items())
    write_results(args.out, data, md, f" | {args.nproc} GPU(s), sp {args.sp}")
    return data


if __name__ == "__main__":
    main()
