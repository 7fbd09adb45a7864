"""Sweep tile/warp/stage configs of each PBS kernel at one shape and print the medians.

    python -m bench.tune --seq-len 32768 --hkv 8 --density 0.2
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from bench.attention import heavy_hitter_qkv, random_block_plan
from kernels.triton_attention import (BlockIndex, KernelConfig, attention_forward, launch_dkdv,
                                      launch_dq)

FWD = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3),
       (128, 64, 4, 3)]
DQ = [(128, 64, 8, 4), (128, 64, 8, 5), (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2),
      (64, 64, 4, 4), (128, 32, 4, 4)]
DKDV = [(64, 128, 8, 3), (64, 128, 8, 4), (64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3),
        (32, 64, 4, 3), (32, 128, 8, 4), (128, 64, 8, 2)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--block-size", type=int, default=128)
    args = p.parse_args(argv)
    B, N, Hq, Hkv, D, b = 1, args.seq_len, args.hq, args.hkv, args.head_dim, args.block_size
    q, k, v = heavy_hitter_qkv(B, Hq, Hkv, N, D, torch.bfloat16, "cuda")
    plan = random_block_plan(B, Hq, Hkv, N, b, args.density, "cuda")
    index = BlockIndex.from_plan(plan)
    key_pos = plan.key_perm.to(torch.int32)  # identity order: k, v are their own permuted copies
    scale = D ** -0.5
    out, lse = attention_forward(q, k, v, key_pos, index, scale, b)
    do = torch.randn_like(out)
    delta = (out.float() * do.float()).sum(-1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flops = 4 * B * Hq * N * N * D / 2 * plan.density
    results = {}
    for name, configs, run, f in (
        ("fwd", FWD, lambda c: attention_forward(q, k, v, key_pos, index, scale, b, c), flops),
        ("dq", DQ, lambda c: launch_dq(dq, do, q, k, v, lse, delta, key_pos, index, scale, b,
                                       c), 1.5 * flops),
        ("dkdv", DKDV, lambda c: launch_dkdv(dk, dv, do, q, k, v, lse, delta, key_pos, index,
                                             scale, b, c), 2.0 * flops),
    ):
        for spec in configs:
            cfg = KernelConfig(*spec)
            try:
                ms = do_bench(lambda: run(cfg), return_mode="median")
            except Exception as e:  # out of shared memory / registers for this config
                print(name, spec, "failed:", str(e).splitlines()[0][:120], flush=True)
                continue
            results.setdefault(name, []).append((ms, spec))
            print(f"{name} {spec} {ms:.3f} ms {f / ms / 1e9:.0f} TFLOP/s(kernel FLOPs)",
                  flush=True)
    best = {n: min(r) for n, r in results.items()}
    print("BEST", json.dumps({n: dict(ms=ms, config=spec) for n, (ms, spec) in best.items()}))
    print(f"density {plan.density:.3f}; best fwd+bwd {sum(ms for ms, _ in best.values()):.3f} ms")


if __name__ == "__main__":
    main()
