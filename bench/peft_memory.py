"""Peak memory and throughput of full fine-tuning vs LoRA, each with and without Liger's kernels,
dense (SDPA cuDNN) vs PBS at density 0.2, through the project's trainer (issue 15's table).

Every (variant, seq_len) is one ``python -m trainer.train`` run on one GPU: Llama-3.1-8B
architecture (random init, bf16, micro batch 1), gradient checkpointing, passkey data, no eval,
no checkpoint, no export; by default ZeRO-3 with optimizer offload and DeepSpeed's CPU Adam for
every variant (``--deepspeed``), so that the variants differ only in ``peft``, ``model.liger``
and the attention. Variants are ``{full,lora}_{dense,pbs}[_liger]``. Medians exclude the warm-up
steps; peak memory is the largest ``mem/peak_gb`` of the run. Lengths run in ascending order; a
variant that fails (OOM) at one length is skipped at the longer ones, so the table shows where
each stops (also across calls: failures already in ``--out`` count). ``--jobs N`` runs N
variants at once, one GPU each (round-robin over the visible GPUs); host memory bounds it: a full
fine-tuning run keeps ~130 GB of fp32 weights, gradients and Adam state in host memory.

    python3 -m bench.peft_memory --seq-lens 32768 --jobs 4           # 4 GPUs: 2 rounds of 4
    python3 -m bench.peft_memory --seq-lens 65536 --variants lora_pbs lora_pbs_liger   # 1 GPU
    python3 -m bench.peft_memory --seq-lens 196608 262144 --jobs 4   # then: the longest that fit

Results are merged into ``--out`` by (variant, seq_len), so several calls fill one file; the
table (``--out`` with .md) compares each row with full fine-tuning (same attention and Liger
setting) and with the same variant without Liger, at the same length, and names each row's
DeepSpeed overrides where they differ from the default (e.g. a partial optimizer offload,
``--deepspeed ... deepspeed.offload_optimizer_ratio=0.75``, where the host cannot hold it all).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from bench.runner import (TrainerRun, environment, load_json, markdown_table, median_of,
                          run_trainers, write_results)

ATTENTION = {"dense": ["attention=sdpa"],
             "pbs": ["attention=pbs", "attention.block_size=128", "attention.segment_size=256",
                     "attention.density=0.2"]}
# Full fine-tuning and LoRA alternate, so that N runs at a time hold at most about N/2 full
# optimizer states in host memory (8B with offload: ~130 GB each).
VARIANTS = {f"{tune}_{attn}{liger}": [*(["peft=lora"] if tune == "lora" else ["peft=none"]),
                                      *ATTENTION[attn], f"model.liger={bool(liger)}".lower()]
            for attn in ATTENTION for liger in ("", "_liger") for tune in ("full", "lora")}
DEEPSPEED = ["deepspeed=zero3", "deepspeed.offload_optimizer=true", "optim=cpu_adam"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072],
                   help="sequence lengths (default 32K 64K 128K)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="default: all 8")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of medians (default 2)")
    p.add_argument("--model", default="llama3_8b", help="Hydra model option (default llama3_8b)")
    p.add_argument("--deepspeed", nargs="+", default=DEEPSPEED,
                   help="DeepSpeed/optimizer overrides of every run "
                        f"(default: {' '.join(DEEPSPEED)})")
    p.add_argument("--sdpa-backend", default="cudnn",
                   help="SDPA backend of the dense variants (default cudnn)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, one GPU each (default 1)")
    p.add_argument("--budget-s", type=float, default=540,
                   help="wall-clock budget; runs that would start later are skipped (default 540)")
    p.add_argument("--extra", nargs="*", default=[],
                   help="more Hydra overrides for every run (e.g. sizes for a CPU test)")
    p.add_argument("--runs-dir", default="/tmp/pbs-peft-memory-runs",
                   help="trainer output_dir (default /tmp/pbs-peft-memory-runs)")
    p.add_argument("--out", type=Path, default=Path("bench/results/peft_memory.json"),
                   help="JSON results, merged by (variant, seq_len); also writes .md next to it")
    return p.parse_args(argv)


def overrides(args: argparse.Namespace, variant: str, seq_len: int) -> list[str]:
    common = [f"model={args.model}", "data=passkey", f"data.seq_len={seq_len}",
              "data.eval_samples=0", "data.min_len=null", "trainer.micro_batch_size=1",
              "trainer.grad_accum=1", f"trainer.max_steps={args.steps}",
              "trainer.gradient_checkpointing=true", "trainer.eval_every=0",
              "trainer.save_every=0", "trainer.save_final=false", "trainer.export_hf=false",
              "trainer.log_every=1", f"attention.sdpa_backend={args.sdpa_backend}"]
    return common + list(args.deepspeed) + VARIANTS[variant] + list(args.extra)


def result_row(args: argparse.Namespace, variant: str, seq_len: int,
               run: TrainerRun | None) -> dict:
    """Medians of tokens/s and step time, peak memory, density, what trained and which loss
    ran (from the run's log)."""
    row = {"variant": variant, "seq_len": seq_len}
    if run is None:
        return {**row, "status": "skipped", "error": "budget"}
    rows = run.train_rows()
    row.update(status=run.status, error=run.error, steps_logged=len(rows),
               wall_s=round(run.wall_s, 1))
    if run.status == "ok" and len(rows) <= args.warmup:
        row.update(status="error", error=f"only {len(rows)} steps logged, warm-up {args.warmup}")
    if row["status"] != "ok":
        return row
    densities = [r["attn/density"] for r in rows[args.warmup:] if "attn/density" in r]
    row.update(tokens_per_s=median_of(rows, "perf/tokens_per_sec", args.warmup),
               step_time_s=median_of(rows, "perf/step_time_s", args.warmup),
               peak_mem_gb=max(r["mem/peak_gb"] for r in rows),
               density=sum(densities) / len(densities) if densities else 1.0)
    log = (Path(run.run_dir) / "train_rank0.log").read_text(errors="replace")
    trainable = re.search(r"([0-9.]+)M of ([0-9.]+)M params train", log)
    if trainable:
        row.update(trainable_m=float(trainable[1]), params_m=float(trainable[2]))
    row["loss"] = "liger_fused" if "loss: Liger fused linear cross-entropy" in log else "chunked"
    row["liger_kernels"] = "kernels patched in" in log
    return row


def add_ratios(rows: list[dict]) -> None:
    """Per ok row: peak memory relative to full fine-tuning (same attention and Liger setting),
    and peak memory and tokens/s relative to the same variant without Liger."""
    ok = {(r["variant"], r["seq_len"]): r for r in rows if r["status"] == "ok"}
    for (variant, n), r in ok.items():
        full = ok.get((variant.replace("lora_", "full_"), n))
        if variant.startswith("lora_") and full:
            r["mem_vs_full"] = r["peak_mem_gb"] / full["peak_mem_gb"]
        plain = ok.get((variant.removesuffix("_liger"), n))
        if variant.endswith("_liger") and plain:
            r["mem_vs_no_liger"] = r["peak_mem_gb"] / plain["peak_mem_gb"]
            r["tok_s_vs_no_liger"] = r["tokens_per_s"] / plain["tokens_per_s"]


def longest(rows: list[dict]) -> list[str]:
    """The longest length each variant trained at, and why it stopped (if it did)."""
    notes = []
    for v in VARIANTS:
        mine = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["seq_len"])
        good = [r["seq_len"] for r in mine if r["status"] == "ok"]
        bad = [r for r in mine if r["status"] in ("oom", "error", "timeout")]
        if good or bad:
            stop = (f"; stops at {bad[0]['seq_len']}: {bad[0]['status']} {bad[0]['error']}"
                    if bad else "")
            notes.append(f"{v}: longest ok {max(good) if good else '-'}{stop}")
    return notes


def deepspeed_changes(row: dict) -> str:
    """The row's DeepSpeed/optimizer overrides that differ from the default ``DEEPSPEED``."""
    return " ".join(o for o in row.get("deepspeed", DEEPSPEED) if o not in DEEPSPEED) or "default"


def table(data: dict) -> str:
    header = ["seq_len", "variant", "status", "tok/s", "peak GB", "density", "trainable M",
              "loss", "mem vs full", "mem vs no Liger", "tok/s vs no Liger", "DeepSpeed"]
    order = list(VARIANTS)
    rows = [[r["seq_len"], r["variant"], r["status"], r.get("tokens_per_s"), r.get("peak_mem_gb"),
             r.get("density"), r.get("trainable_m"), r.get("loss"), r.get("mem_vs_full"),
             r.get("mem_vs_no_liger"), r.get("tok_s_vs_no_liger"), deepspeed_changes(r)]
            for r in sorted(data["rows"], key=lambda r: (r["seq_len"], order.index(r["variant"])))]
    return "\n".join([markdown_table(header, rows), "", *longest(data["rows"])])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    data = load_json(args.out)
    data.update(environment())
    data["settings"] = {"model": args.model, "steps": args.steps, "warmup": args.warmup,
                        "deepspeed": args.deepspeed, "extra": args.extra}
    rows = {(r["variant"], r["seq_len"]): r for r in data.get("rows", [])}
    failed = {r["variant"] for r in rows.values()  # in an earlier call, at a shorter length
              if r["status"] in ("oom", "error", "timeout") and r["seq_len"] < min(args.seq_lens)}
    for n in sorted(args.seq_lens):
        todo = [v for v in args.variants if v not in failed]
        for v in set(args.variants) - set(todo):
            rows[v, n] = {"variant": v, "seq_len": n, "status": "skipped",
                          "error": "failed at a shorter length"}
        left = args.budget_s - (time.perf_counter() - t0)
        runs = run_trainers([(f"{v}-{n}", overrides(args, v, n)) for v in todo], args.runs_dir,
                            left, args.jobs)
        for v, run in zip(todo, runs):
            row = result_row(args, v, n, run)
            # merged files span calls: each row names its machine, commit and DeepSpeed setup
            row.update(device=data["device"], commit=data["commit"], deepspeed=args.deepspeed)
            rows[v, n] = row
            if row["status"] in ("oom", "error", "timeout"):
                failed.add(v)
            print({k: row.get(k) for k in ("variant", "seq_len", "status", "tokens_per_s",
                                           "peak_mem_gb", "loss")}, flush=True)
    data["rows"] = sorted(rows.values(), key=lambda r: (r["seq_len"], r["variant"]))
    add_ratios(data["rows"])
    md = table(data)
    data["notes"] = longest(data["rows"])
    write_results(args.out, data, md)
    return data


if __name__ == "__main__":
    main()
