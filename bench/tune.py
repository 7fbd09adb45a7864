"""Time each PBS kernel (forward, dQ, dK/dV) at one shape: the default configs, or a sweep of
tile/warp/stage configs, and print (optionally write as JSON) the medians.

    python -m bench.tune --seq-len 32768 --hkv 8 --density 0.2             # config sweep
    python -m bench.tune --seq-len 65536 --density 1.0 0.2 --defaults-only --out /tmp/k.json

TFLOP/s count the matmuls each kernel does on the computed blocks (forward 2 per block, dQ 3,
dK/dV 4), so they compare kernels with each other and with the tensor cores' rate.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
from pathlib import Path

import torch
from triton.testing import do_bench

from bench import git_commit
from bench.attention import heavy_hitter_qkv, random_block_plan
from kernels import triton_attention as ta
from kernels.triton_attention import BlockIndex, KernelConfig

FWD = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3), (128, 64, 4, 3)]
DQ = [(128, 64, 8, 4), (128, 64, 8, 5), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 4),
      (128, 32, 4, 4)]
DKDV = [(64, 128, 8, 4), (64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3),
        (32, 128, 8, 4), (128, 64, 8, 2)]


def time_kernels(N: int, Hq: int, Hkv: int, D: int, b: int, density: float,
                 defaults_only: bool) -> list[dict]:
    """Median ms of each kernel, default config first, on a random fixed-density plan."""
    q, k, v = heavy_hitter_qkv(1, Hq, Hkv, N, D, torch.bfloat16, "cuda")
    plan = random_block_plan(1, Hq, Hkv, N, b, density, "cuda")
    index = BlockIndex.from_plan(plan)
    key_pos = plan.key_perm.to(torch.int32)  # identity order: k, v are their own permuted copies
    scale = D ** -0.5
    out, lse = ta.attention_forward(q, k, v, key_pos, index, scale, b)
    do = torch.randn_like(out)
    delta = (out.float() * do.float()).sum(-1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flops = 4 * Hq * N * N * D / 2 * plan.density
    kernels = (
        ("fwd", ta.FWD_CONFIG, FWD, 1.0,
         lambda c: ta.attention_forward(q, k, v, key_pos, index, scale, b, c)),
        ("dq", ta.BWD_DQ_CONFIG, DQ, 1.5,
         lambda c: ta.launch_dq(dq, do, q, k, v, lse, delta, key_pos, index, scale, b, c)),
        ("dkdv", ta.BWD_DKDV_CONFIG, DKDV, 2.0,
         lambda c: ta.launch_dkdv(dk, dv, do, q, k, v, lse, delta, key_pos, index, scale, b, c)),
    )
    rows = []
    for name, default, sweep, factor, run in kernels:
        configs = [default] + ([] if defaults_only else
                               [c for c in (KernelConfig(*s) for s in sweep) if c != default])
        for cfg in configs:
            fitted = cfg.fit(b, q.dtype)  # what the launcher runs
            spec = [fitted.block_m, fitted.block_n, fitted.num_warps, fitted.num_stages]
            try:
                ms = do_bench(functools.partial(run, cfg), return_mode="median")
            except Exception as e:  # out of shared memory / registers for this config
                print(name, spec, "failed:", str(e).splitlines()[0][:120], flush=True)
                continue
            row = dict(N=N, Hq=Hq, Hkv=Hkv, D=D, density=round(plan.density, 4), kernel=name,
                       config=spec, default=cfg == default, ms=ms,
                       tflops=factor * flops / ms / 1e9)
            rows.append(row)
            print(f"d={row['density']:.3f} {name} {spec} {ms:.3f} ms "
                  f"{row['tflops']:.0f} TFLOP/s", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--density", type=float, nargs="+", default=[0.2])
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--defaults-only", action="store_true",
                   help="time the configs the kernels use, no sweep")
    p.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.tune needs a CUDA GPU")
    rows = [r for d in args.density for r in time_kernels(
        args.seq_len, args.hq, args.hkv, args.head_dim, args.block_size, d, args.defaults_only)]
    for d in sorted({r["density"] for r in rows}):
        best = {n: min((r for r in rows if r["kernel"] == n and r["density"] == d),
                       key=lambda r: r["ms"]) for n in ("fwd", "dq", "dkdv")}
        print(f"density {d:.3f}: best", {n: (r["config"], round(r["ms"], 3))
                                          for n, r in best.items()},
              f"fwd+bwd {sum(r['ms'] for r in best.values()):.3f} ms")
    if args.out:
        meta = dict(card=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                    commit=git_commit(), torch=torch.__version__,
                    triton=__import__("triton").__version__, dtype="bfloat16", B=1,
                    block_size=args.block_size, mask="fixed density, identity order")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
