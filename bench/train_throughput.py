"""End-to-end training throughput through the project's trainer: dense (SDPA cuDNN) vs PBS.

Every (variant, seq_len) is one ``python -m trainer.train`` run (Llama-3.2-1B architecture, random
init, bf16 on GPU, micro batch 1, gradient checkpointing, chunked loss, passkey data, no eval, no
checkpoint, no export); the step metrics come from the run's ``metrics.jsonl``. Medians exclude
the warm-up steps. Per length, the attention share of a dense step is measured separately
(``layers`` x SDPA cuDNN forward + forward/backward: with gradient checkpointing the forward runs
twice), giving the bound on what PBS can save: share x (1 - density).

    python3 -m bench.train_throughput --seq-lens 16384 32768          # merges into --out
    python3 -m bench.train_throughput --seq-lens 131072 --steps 5 --budget-s 500

Results are merged into ``--out`` by (variant, seq_len), so several calls fill one file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.runner import (environment, load_json, markdown_table, median_of, run_trainer,
                          write_results)

VARIANTS = {
    "dense": ["attention=sdpa"],
    "pbs_t0.9": ["attention=pbs", "attention.block_size=128", "attention.segment_size=256",
                 "attention.threshold=0.9"],
    "pbs_d0.1": ["attention=pbs", "attention.block_size=128", "attention.segment_size=256",
                 "attention.density=0.1"],
    "pbs_d0.2": ["attention=pbs", "attention.block_size=128", "attention.segment_size=256",
                 "attention.density=0.2"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768, 65536, 131072],
                   help="sequence lengths (default: 16K 32K 64K 128K)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="default: all (dense, pbs_t0.9, pbs_d0.1, pbs_d0.2)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of medians (default 2)")
    p.add_argument("--model", default="llama3_1b", help="Hydra model option (default llama3_1b)")
    p.add_argument("--sdpa-backend", default="cudnn",
                   help="dense SDPA backend (default cudnn; retried with auto on failure)")
    p.add_argument("--budget-s", type=float, default=480,
                   help="wall-clock budget; later runs are skipped (default 480)")
    p.add_argument("--layers", type=int, default=16, help="attention bound: layers (default 16)")
    p.add_argument("--heads", type=int, nargs=3, default=[32, 8, 64], metavar=("HQ", "HKV", "D"),
                   help="attention bound: q heads, kv heads, head dim (default 32 8 64)")
    p.add_argument("--extra", nargs="*", default=[],
                   help="more Hydra overrides for every run (e.g. sizes for a CPU test)")
    p.add_argument("--runs-dir", default="/tmp/pbs-throughput-runs",
                   help="trainer output_dir (default /tmp/pbs-throughput-runs)")
    p.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"),
                   help="JSON results, merged by (variant, seq_len); also writes .md next to it")
    return p.parse_args(argv)


def overrides(args: argparse.Namespace, variant: str, seq_len: int, backend: str) -> list[str]:
    common = [f"model={args.model}", "data=passkey", f"data.seq_len={seq_len}",
              "data.eval_samples=0", "data.min_len=null", "trainer.micro_batch_size=1",
              "trainer.grad_accum=1",
              f"trainer.max_steps={args.steps}", "trainer.gradient_checkpointing=true",
              "trainer.eval_every=0", "trainer.save_every=0", "trainer.save_final=false",
              "trainer.export_hf=false", "trainer.log_every=1"]
    extra = [f"attention.sdpa_backend={backend}"] if variant == "dense" else []
    return common + VARIANTS[variant] + extra + list(args.extra)


def measure(args: argparse.Namespace, variant: str, seq_len: int, timeout_s: float) -> dict:
    """One trainer run -> medians of tokens/s, TFLOP/s, step time; peak memory; density."""
    backend = args.sdpa_backend
    run = run_trainer(overrides(args, variant, seq_len, backend), args.runs_dir,
                      f"{variant}-{seq_len}", timeout_s)
    if variant == "dense" and run.status == "error" and backend != "auto":
        print(f"dense with sdpa_backend={backend} failed ({run.error}); retrying with auto")
        backend = args.sdpa_backend = "auto"  # also for the longer lengths
        run = run_trainer(overrides(args, variant, seq_len, backend), args.runs_dir,
                          f"{variant}-{seq_len}", timeout_s)
    rows = run.train_rows()
    row = {"variant": variant, "seq_len": seq_len, "status": run.status, "error": run.error,
           "steps_logged": len(rows), "wall_s": round(run.wall_s, 1)}
    if variant == "dense":
        row["sdpa_backend"] = backend
    if run.status == "ok" and len(rows) <= args.warmup:
        row.update(status="error", error=f"only {len(rows)} steps logged, warm-up {args.warmup}")
    if row["status"] != "ok":
        return row
    densities = [r["attn/density"] for r in rows[args.warmup:] if "attn/density" in r]
    row.update(tokens_per_s=median_of(rows, "perf/tokens_per_sec", args.warmup),
               tflops=median_of(rows, "perf/tflops_per_gpu", args.warmup),
               step_time_s=median_of(rows, "perf/step_time_s", args.warmup),
               mfu=median_of(rows, "perf/mfu", args.warmup),
               peak_mem_gb=max(r["mem/peak_gb"] for r in rows),
               density=sum(densities) / len(densities) if densities else 1.0)
    return row


def attention_ms(seq_len: int, hq: int, hkv: int, d: int) -> dict:
    """One layer's SDPA cuDNN attention at ``seq_len``: forward and forward+backward medians (ms).
    GQA through ``enable_gqa``; if cuDNN refuses it, K/V are expanded to ``hq`` heads."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, hq, seq_len, d, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, hkv, seq_len, d, device=dev, dtype=dt, requires_grad=True)
            for _ in range(2))
    res = {}
    for gqa in ("enable_gqa", "expanded"):
        def fwd():
            if gqa == "enable_gqa":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            kk, vv = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                with torch.no_grad():
                    res["fwd_ms"] = do_bench(fwd, return_mode="median")
                dout = torch.randn_like(fwd())
                res["fwdbwd_ms"] = do_bench(lambda: fwd().backward(dout), return_mode="median",
                                            grad_to_none=[q, k, v])
            res["gqa"] = gqa
            break
        except RuntimeError as e:
            res = {"error": str(e).splitlines()[0][:200]}
    q = k = v = None  # free them before emptying the cache
    torch.cuda.empty_cache()
    return res


def add_bounds(data: dict, args: argparse.Namespace) -> None:
    """Attention share of the dense step per length, then speedup and bound per PBS row."""
    import torch

    rows = data["rows"]
    dense = {r["seq_len"]: r for r in rows if r["variant"] == "dense" and r["status"] == "ok"}
    bounds = data.setdefault("attention_share", {})
    for n, drow in dense.items():
        if torch.cuda.is_available() and "fwd_ms" not in bounds.get(str(n), {}):
            bounds[str(n)] = attention_ms(n, *args.heads)
        t = bounds.get(str(n), {})
        if "fwd_ms" in t:
            attn_s = args.layers * (t["fwd_ms"] + t["fwdbwd_ms"]) / 1e3
            t.update(layers=args.layers, attn_step_s=attn_s)
            t["share"] = t["attn_step_s"] / drow["step_time_s"]
    for r in rows:
        d, share = dense.get(r["seq_len"]), bounds.get(str(r["seq_len"]), {}).get("share")
        if r["status"] != "ok" or d is None:
            continue
        r["speedup"] = r["tokens_per_s"] / d["tokens_per_s"]
        r["mem_vs_dense"] = r["peak_mem_gb"] / d["peak_mem_gb"]
        if share is not None and r["variant"] != "dense":
            r["max_saving"] = share * (1 - min(1.0, r["density"]))
            r["bound_speedup"] = 1 / (1 - r["max_saving"])


def stop_notes(rows: list[dict]) -> list[str]:
    """Where each variant stops ("stops at N because ...")."""
    notes = []
    for v in VARIANTS:
        bad = sorted((r for r in rows if r["variant"] == v and r["status"] != "ok"),
                     key=lambda r: r["seq_len"])
        if bad:
            notes.append(f"{v} stops at {bad[0]['seq_len']} because {bad[0]['status']}: "
                         f"{bad[0]['error']}")
    return notes


def table(data: dict) -> str:
    header = ["seq_len", "variant", "status", "tok/s", "TFLOP/s", "peak GB", "density",
              "speedup", "attn share", "bound speedup"]
    share = data.get("attention_share", {})
    rows = [[r["seq_len"], r["variant"], r["status"], r.get("tokens_per_s"), r.get("tflops"),
             r.get("peak_mem_gb"), r.get("density"), r.get("speedup"),
             share.get(str(r["seq_len"]), {}).get("share"), r.get("bound_speedup")]
            for r in sorted(data["rows"], key=lambda r: (r["seq_len"], list(VARIANTS).index(
                r["variant"])))]
    return "\n".join([markdown_table(header, rows), "", *stop_notes(data["rows"])])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    data = load_json(args.out)
    data.update(environment())
    data["settings"] = {"model": args.model, "steps": args.steps, "warmup": args.warmup,
                        "extra": args.extra}
    rows = {(r["variant"], r["seq_len"]): r for r in data.get("rows", [])}
    failed: set[str] = set()
    last_wall = 0.0
    for n in sorted(args.seq_lens):
        for v in args.variants:
            left = args.budget_s - (time.perf_counter() - t0)
            if v in failed:
                rows[v, n] = {"variant": v, "seq_len": n, "status": "skipped",
                              "error": "failed at a shorter length"}
                continue
            if left < last_wall:  # the next run would not fit (runs grow with length)
                rows[v, n] = {"variant": v, "seq_len": n, "status": "skipped",
                              "error": f"budget ({left:.0f}s left)"}
                continue
            row = measure(args, v, n, left)
            row.update(device=data["device"], commit=data["commit"])  # merged files span calls
            rows[v, n] = row
            last_wall = row["wall_s"]
            if row["status"] in ("oom", "error"):
                failed.add(v)
            print({k: row.get(k) for k in ("variant", "seq_len", "status", "tokens_per_s",
                                           "peak_mem_gb", "density")}, flush=True)
    data["rows"] = sorted(rows.values(), key=lambda r: (r["seq_len"], r["variant"]))
    add_bounds(data, args)
    md = table(data)
    data["notes"] = stop_notes(data["rows"])
    write_results(args.out, data, md)
    return data


if __name__ == "__main__":
    main()
