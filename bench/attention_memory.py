"""Peak GPU memory of one attention call, phase by phase: PBS (plan, forward, backward) vs torch
SDPA (cuDNN) dense, on the same inputs. Shows where PBS's extra bytes come from.

    python -m bench.attention_memory                              # 1B Llama shapes at 128K
    python -m bench.attention_memory --seq-len 65536 --density 0.1

Each phase reports the peak allocated above what was live when it started (MB); "kept" is what
stays allocated after the phase (saved tensors, outputs, gradients).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import git_commit
from kernels import block_sparse_attention, pbs_plan


def phase(name: str, fn: Callable[[], object], rows: list[dict]) -> object:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    rows.append({"phase": name, "peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20,
                 "kept_mb": (torch.cuda.memory_allocated() - before) / 2**20})
    return result


def measure_impl(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                 args: argparse.Namespace) -> list[dict]:
    """Phases of one forward + backward of ``impl`` on fresh leaf copies of q, k, v."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    rows: list[dict] = []
    if impl == "pbs":
        plan = phase("plan", lambda: pbs_plan(q, k, args.block_size, args.segment_size,
                                              density=args.density), rows)
        out = phase("forward", lambda: block_sparse_attention(q, k, v, plan), rows)
    else:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = phase("forward", lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True), rows)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        phase("backward", lambda: out.backward(do), rows)
    return rows


def measure(args: argparse.Namespace) -> dict:
    B, N, (Hq, Hkv, D) = 1, args.seq_len, args.heads
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    do = torch.randn_like(q)
    result = {}
    for impl in ("sdpa_cudnn", "pbs"):
        result[impl] = measure_impl(impl, q, k, v, do, args)
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--heads", type=int, nargs=3, default=[32, 8, 64], metavar=("HQ", "HKV", "D"),
                   help="query heads, KV heads, head dim (default: Llama-3.2-1B 32 8 64)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--segment-size", type=int, default=256)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--out", type=Path, default=None, help="also write JSON here")
    args = p.parse_args(argv)
    res = {"card": torch.cuda.get_device_name(), "commit": git_commit(), "seq_len": args.seq_len,
           "heads": args.heads, "density": args.density, "phases": measure(args)}
    for impl, rows in res["phases"].items():
        for r in rows:
            print(f"{impl:<11} {r['phase']:<9} peak +{r['peak_mb']:8.1f} MB   kept +{r['kept_mb']:8.1f} MB")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
