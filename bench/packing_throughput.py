"""Packed vs padded training throughput in REAL tokens, through the project's trainer.

One corpus of documents of log-uniform length in [--min-len, --seq-len] tokens (chat samples of
the built-in character tokenizer, a fixed seed: the same documents for every variant), rows of
--seq-len tokens, micro batch 1, Llama-3.2-1B architecture by default. Variants:

    padded_pbs     one document per row, right-padded (today's layout), PBS threshold 0.9
    packed_pbs     documents first-fit packed at block-aligned starts, PBS threshold 0.9
    padded_pbs_d0.2 / packed_pbs_d0.2   the same at a fixed density of 0.2
    packed_flex    FlexAttention, dense inside each document (attention=flex_dense)
    packed_sdpa    SDPA with the block-diagonal mask transformers builds from packed position_ids

    python3 -m bench.packing_throughput --seq-len 65536 --steps 5
    python3 -m bench.packing_throughput --variants packed_pbs padded_pbs --steps 4

Medians of ``perf/tokens_per_sec`` (non-pad tokens) after the warm-up steps; JSON + a table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from bench.runner import environment, markdown_table, median_of, run_trainer, write_results

PBS = ["attention=pbs", "attention.threshold=0.9"]
VARIANTS = {
    "padded_pbs": PBS,
    "packed_pbs": [*PBS, "data.packing=true"],
    "padded_pbs_d0.2": [*PBS, "attention.density=0.2"],
    "packed_pbs_d0.2": [*PBS, "attention.density=0.2", "data.packing=true"],
    "packed_flex": ["attention=flex_dense", "data.packing=true"],
    "packed_sdpa": ["attention=sdpa", "data.packing=true"],
}
WORDS = "the of and to in is it that for on with as was at by be this from or have".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-len", type=int, default=65536, help="row length (default 64K)")
    p.add_argument("--min-len", type=int, default=512, help="shortest document (default 512)")
    p.add_argument("--docs", type=int, default=400, help="documents in the corpus (default 400)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of medians (default 2)")
    p.add_argument("--model", default="llama3_1b", help="Hydra model option (default llama3_1b)")
    p.add_argument("--budget-s", type=float, default=540, help="wall-clock budget (default 540)")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    p.add_argument("--runs-dir", default="/tmp/pbs-packing-runs")
    p.add_argument("--out", type=Path, default=Path("bench/results/packing_throughput.json"))
    return p.parse_args(argv)


def write_corpus(path: Path, docs: int, min_len: int, max_len: int, seed: int = 0) -> list[int]:
    """Chat samples whose templated length (characters = tokens of the built-in tokenizer) is
    log-uniform in [min_len, max_len]; returns the lengths."""
    rng = random.Random(seed)
    lengths, lines = [], []
    overhead = len("<bos>user: \nassistant: ok<eos>\n") - len("<bos><eos>") + 2  # bos, eos tokens
    for _ in range(docs):
        n = int(min_len * (max_len / min_len) ** rng.random())
        words = rng.choices(WORDS, k=n // 2 + 1)  # >= n characters with their spaces
        content = " ".join(words)[:max(1, n - overhead)]
        lines.append(json.dumps({"messages": [{"role": "user", "content": content},
                                              {"role": "assistant", "content": "ok"}]}))
        lengths.append(len(content) + overhead)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return lengths


def overrides(args: argparse.Namespace, corpus: Path, variant: str) -> list[str]:
    return [f"model={args.model}", "data=jsonl", f"data.path={corpus}",
            f"data.seq_len={args.seq_len}", "data.eval_samples=0", "trainer.micro_batch_size=1",
            "trainer.grad_accum=1", f"trainer.max_steps={args.steps}",
            "trainer.gradient_checkpointing=true", "trainer.eval_every=0", "trainer.save_every=0",
            "trainer.save_final=false", "trainer.export_hf=false", *VARIANTS[variant],
            *args.extra]


def measure(args: argparse.Namespace, corpus: Path, variant: str, timeout_s: float) -> dict:
    run = run_trainer(overrides(args, corpus, variant), args.runs_dir, variant, timeout_s)
    rows = run.train_rows()
    row = {"variant": variant, "status": run.status, "error": run.error,
           "steps_logged": len(rows), "wall_s": round(run.wall_s, 1)}
    if run.status == "ok" and len(rows) <= args.warmup:
        row.update(status="error", error=f"only {len(rows)} steps logged, warm-up {args.warmup}")
    if row["status"] != "ok":
        return row
    row.update({name: median_of(rows, key, args.warmup) for name, key in (
        ("tokens_per_s", "perf/tokens_per_sec"), ("tflops", "perf/tflops_per_gpu"),
        ("step_time_s", "perf/step_time_s"), ("packing_efficiency", "data/packing_efficiency"),
        ("docs_per_row", "data/docs_per_row"), ("density", "attn/density"),
        ("plan_ms", "attn/plan_ms"))})
    row["peak_mem_gb"] = max(r["mem/peak_gb"] for r in rows)
    return row


def table(rows: list[dict]) -> str:
    ref = {r["variant"]: r.get("tokens_per_s") for r in rows}
    header = ["variant", "status", "real tok/s", "vs padded_pbs", "vs packed_flex", "peak GB",
              "packing eff.", "docs/row", "density", "step s"]
    out = []
    for r in rows:
        tps = r.get("tokens_per_s")
        rel = [tps / ref[k] if tps and ref.get(k) else None for k in ("padded_pbs", "packed_flex")]
        out.append([r["variant"], r["status"], tps, *rel, r.get("peak_mem_gb"),
                    r.get("packing_efficiency"), r.get("docs_per_row"), r.get("density"),
                    r.get("step_time_s")])
    return markdown_table(header, out)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    corpus = Path(args.runs_dir) / "corpus.jsonl"
    lengths = write_corpus(corpus, args.docs, args.min_len, args.seq_len)
    data = {**environment(), "settings": {
        "seq_len": args.seq_len, "min_len": args.min_len, "docs": args.docs, "model": args.model,
        "steps": args.steps, "warmup": args.warmup, "extra": args.extra,
        "mean_doc_len": sum(lengths) / len(lengths),
        "log2_len_quartiles": [round(math.log2(sorted(lengths)[len(lengths) * q // 4]), 2)
                               for q in (1, 2, 3)]}, "rows": []}
    for v in args.variants:
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 60:
            data["rows"].append({"variant": v, "status": "skipped", "error": "budget"})
            continue
        data["rows"].append(measure(args, corpus, v, left))
        print({k: data["rows"][-1].get(k) for k in ("variant", "status", "tokens_per_s",
                                                    "peak_mem_gb")}, flush=True)
    md = table(data["rows"])
    write_results(args.out, data, md)
    return data


if __name__ == "__main__":
    main()
