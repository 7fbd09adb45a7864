"""Attention benchmark: PBS kernels vs torch SDPA (cuDNN, flash; dense) vs FlexAttention with
the same block mask, side by side in one run on one GPU.

    python -m bench.attention                      # full sweep (N = 8K..128K, Hkv = 32 and 8)
    python -m bench.attention --seq-lens 16384 --hkv 8 --out /tmp/a.json
    python -m bench.attention --cases packed --seq-lens 65536 --hkv 8   # packed documents only

Times are ``triton.testing.do_bench`` medians (ms). FLOPs are counted on computed blocks only:
forward 4 * B * Hq * N^2 * D / 2 * density, backward 2.5x that, forward+backward 3.5x. The
``packed`` case (one row of N tokens packed with documents of log-uniform lengths, 512..N,
block-aligned, fixed seed; attention inside documents only) counts 4 * b^2 * D per computed
block and head, so its TFLOP/s compare per computed block with the unpacked rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from bench import git_commit
from kernels import PBSPlan, block_sparse_attention, pbs_attention, pbs_plan
from kernels.plan import permute_keys
from kernels.triton_attention import BlockIndex, BlockSparseAttentionFunction
from trainer.flex import flex_block_mask

MODES = ("fwd", "bwd", "fwdbwd")
CASES = ("unpacked", "packed")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def causal_flops(B: int, H: int, N: int, D: int, density: float, mode: str) -> float:
    return 4 * B * H * N * N * D / 2 * density * FLOP_FACTOR[mode]


def heavy_hitter_qkv(B, Hq, Hkv, N, D, dtype, device, seed=0, segment=256, hot_share=0.125,
                     hitters_per_segment=24):
    """Inputs whose attention has structure: in a few "hot" segments of each KV head, a few
    dozen heavy-hitter keys that the queries of that head group attend to (the scattered
    "vertical lines" PBS permutes together); everything else unit-normal noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, N, D, device=device, generator=g)
    k = torch.randn(B, Hkv, N, D, device=device, generator=g)
    v = torch.randn(B, Hkv, N, D, device=device, generator=g)
    n_seg = max(1, N // segment)
    G = Hq // Hkv
    for h in range(Hkv):
        hot = torch.randperm(n_seg, device=device, generator=g)[:max(1, int(n_seg * hot_share))]
        offs = torch.randint(0, min(segment, N), (len(hot), hitters_per_segment), device=device,
                             generator=g)
        idx = (hot[:, None] * segment + offs).flatten().clamp(max=N - 1)
        direction = torch.randn(D, device=device, generator=g)
        direction = direction / direction.norm() * D ** 0.5
        k[:, h, idx] += 3.0 * direction
        q[:, h * G:(h + 1) * G] += direction
    return [x.to(dtype) for x in (q, k, v)]


def packed_documents(N: int, block: int, seed: int = 0, min_len: int = 512,
                     device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """``doc_starts``, ``query_end`` (1, M) int64 of one row of N tokens packed with documents
    whose real lengths are log-uniform in [min_len, N] (a fixed seed), each starting at a
    multiple of ``block`` (its last block padded); the last document is cut to fit the row."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(min(min_len, N)), math.log(N)
    starts, ends, pos = [], [], 0
    while pos < N:
        length = min(round(math.exp(lo + torch.rand((), generator=g).item() * (hi - lo))),
                     N - pos)
        starts.append(pos)
        ends.append(pos + length)
        pos += math.ceil(length / block) * block
    return (torch.tensor([starts], device=device), torch.tensor([ends], device=device))


def random_block_plan(B, Hq, Hkv, N, block, density, device, seed=0) -> PBSPlan:
    """Identity permutation; per query block the diagonal block plus random earlier blocks so
    that computed / causal blocks is ``density``."""
    g = torch.Generator(device=device).manual_seed(seed)
    nb = math.ceil(N / block)
    blk = torch.arange(nb, device=device)
    earlier = blk[None, :] < blk[:, None]
    keep_n = (torch.ceil(density * (blk + 1)) - 1).clamp(min=0)  # besides the diagonal
    scores = torch.rand(B, Hq, nb, nb, device=device, generator=g).masked_fill(~earlier, -1)
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    mask = (rank < keep_n[:, None]) & earlier
    mask |= torch.eye(nb, dtype=torch.bool, device=device)
    key_perm = torch.arange(N, device=device).expand(B, Hkv, N).clone()
    return PBSPlan(key_perm, mask, block, block)


def time_modes(fwd, inputs, modes=MODES) -> dict[str, float]:
    """Median ms of forward, backward (retained graph) and forward+backward."""
    res = {}
    for x in inputs:
        x.grad = None
    if "fwd" in modes:
        with torch.no_grad():
            res["fwd"] = do_bench(fwd, return_mode="median")
    out = fwd()
    dout = torch.randn_like(out)
    if "bwd" in modes:
        res["bwd"] = do_bench(lambda: out.backward(dout, retain_graph=True), return_mode="median",
                              grad_to_none=inputs)
    if "fwdbwd" in modes:
        res["fwdbwd"] = do_bench(lambda: fwd().backward(dout), return_mode="median",
                                 grad_to_none=inputs)
    return res


def bench_shape(N, Hq, Hkv, D, block, segment, densities, threshold, dtype, flex_fn, device):
    B = 1
    G = Hq // Hkv
    rows = []
    q, k, v = heavy_hitter_qkv(B, Hq, Hkv, N, D, dtype, device, segment=segment)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    kr = k.detach().repeat_interleave(G, 1).requires_grad_()
    vr = v.detach().repeat_interleave(G, 1).requires_grad_()

    def row(impl, mask, density, times, **extra):
        r = dict(impl=impl, mask=mask, N=N, Hq=Hq, Hkv=Hkv, D=D, density=density, **extra)
        for m, ms in times.items():
            r[f"{m}_ms"] = ms
            r[f"{m}_tflops"] = causal_flops(B, Hq, N, D, density, m) / ms / 1e9
        rows.append(r)
        print(json.dumps(r), flush=True)

    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
        def dense(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        try:
            row(name, "dense", 1.0, time_modes(dense, [q, kr, vr]))
        except RuntimeError as e:  # backend unavailable for this shape/build
            print(f"{name} skipped: {e}")

    plans = [("fixed", d, random_block_plan(B, Hq, Hkv, N, block, d, device)) for d in densities]
    _, plan = pbs_attention(q, k, v, block, segment, threshold, return_plan=True)
    plans.append(("pbs", threshold, plan))
    _, mp_plan = pbs_attention(q, k, v, block, segment, threshold, permute=False,
                               return_plan=True)
    plans.append(("meanpool", threshold, mp_plan))

    scale = D ** -0.5
    for kind, target, plan in plans:
        density = plan.density
        tag = dict(target=target)
        # Ours, kernel only (index prebuilt; K/V in original order, read through key_pos).
        index = BlockIndex.from_plan(plan)
        key_pos = plan.key_perm.to(torch.int32)
        kernel = lambda: BlockSparseAttentionFunction.apply(  # noqa: E731
            q, k, v, key_pos, scale, block, *index.tensors())
        row("pbs_kernel", kind, density, time_modes(kernel, [q, k, v]), **tag)
        if kind == "fixed":  # end to end with the given plan: index build + kernels
            e2e = lambda: block_sparse_attention(q, k, v, plan)  # noqa: E731
            row("pbs_e2e", kind, density, time_modes(e2e, [q, k, v], ("fwd", "fwdbwd")), **tag)
        else:  # the whole method: plan (permutation + selection) + kernels
            permute = kind == "pbs"
            full = lambda: pbs_attention(q, k, v, block, segment, threshold,  # noqa: E731
                                         permute=permute)
            t = time_modes(full, [q, k, v], ("fwd", "fwdbwd"))
            plan_ms = do_bench(lambda: pbs_attention_plan_only(q, k, block, segment, threshold,
                                                               permute), return_mode="median")
            row("pbs_e2e", kind, density, t, plan_ms=plan_ms,
                plan_share=plan_ms / t["fwdbwd"], **tag)
        if flex_fn is not None:
            kp = permute_keys(k.detach(), plan.key_perm).requires_grad_()
            vp = permute_keys(v.detach(), plan.key_perm).requires_grad_()
            bm = flex_block_mask(plan)
            flex = lambda: flex_fn(q, kp, vp, block_mask=bm, enable_gqa=G > 1)  # noqa: E731
            row("flex", kind, density, time_modes(flex, [q, kp, vp]), **tag)

    return rows


def bench_packed(N, Hq, Hkv, D, block, segment, density, threshold, dtype, flex_fn, device,
                 seed=0):
    """One packed row (``packed_documents``): our kernels with the document-aware plan
    (threshold, fixed density, and the dense document mask: threshold 1 without permutation)
    vs FlexAttention with the same block masks, and dense cuDNN over the whole row."""
    B, G = 1, Hq // Hkv
    q, k, v = heavy_hitter_qkv(B, Hq, Hkv, N, D, dtype, device, segment=segment)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    starts, ends = packed_documents(N, block, seed, device=device)
    info = dict(case="packed", docs=starts.shape[1], real_tokens=int((ends - starts).sum()))
    rows = []

    def row(impl, mask, density, times, computed=None, **extra):
        r = dict(impl=impl, mask=mask, N=N, Hq=Hq, Hkv=Hkv, D=D, density=density, **info,
                 **extra)
        if computed is not None:
            r["computed_blocks"] = computed
        for m, ms in times.items():
            flops = (causal_flops(B, Hq, N, D, 1.0, m) if computed is None else
                     4 * block * block * D * computed * FLOP_FACTOR[m])
            r[f"{m}_ms"] = ms
            r[f"{m}_tflops"] = flops / ms / 1e9
            r[f"{m}_real_tokens_per_s"] = info["real_tokens"] / ms * 1e3
        rows.append(r)
        print(json.dumps(r), flush=True)

    def dense_row() -> dict[str, float]:  # no document mask: what ignoring the documents costs
        kr = k.detach().repeat_interleave(G, 1).requires_grad_()
        vr = v.detach().repeat_interleave(G, 1).requires_grad_()

        def dense():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        return time_modes(dense, [q, kr, vr])
    try:
        row("sdpa_cudnn", "dense_row", 1.0, dense_row())
    except RuntimeError as e:
        print(f"sdpa_cudnn skipped: {e}")

    variants = [("pbs", threshold, dict(threshold=threshold)),
                ("pbs_density", density, dict(density=density)),
                ("doc_dense", 1.0, dict(threshold=1.0, permute=False))]
    scale = D ** -0.5
    for kind, target, kwargs in variants:
        layout = dict(doc_starts=starts, query_end=ends, **kwargs)
        plan = pbs_plan(q, k, block, segment, **layout)
        tag = dict(target=target, computed=int(plan.block_mask.sum()))
        index = BlockIndex.from_plan(plan)
        key_pos = plan.key_perm.to(torch.int32)
        kernel = lambda: BlockSparseAttentionFunction.apply(  # noqa: E731
            q, k, v, key_pos, scale, block, *index.tensors())
        row("pbs_kernel", kind, plan.density, time_modes(kernel, [q, k, v]), **tag)
        full = lambda: pbs_attention(q, k, v, block, segment, **layout)  # noqa: E731
        t = time_modes(full, [q, k, v], ("fwd", "fwdbwd"))
        plan_ms = do_bench(lambda: BlockIndex.from_plan(pbs_plan(q, k, block, segment,
                                                                 **layout)),
                           return_mode="median")
        row("pbs_e2e", kind, plan.density, t, plan_ms=plan_ms, plan_share=plan_ms / t["fwdbwd"],
            **tag)
        if flex_fn is not None:
            kp = permute_keys(k.detach(), plan.key_perm).requires_grad_()
            vp = permute_keys(v.detach(), plan.key_perm).requires_grad_()
            bm = flex_block_mask(plan)
            flex = lambda: flex_fn(q, kp, vp, block_mask=bm, enable_gqa=G > 1)  # noqa: E731
            row("flex", kind, plan.density, time_modes(flex, [q, kp, vp]), **tag)
    return rows


def pbs_attention_plan_only(q, k, block, segment, threshold, permute):
    """The planning part of pbs_attention (permutation, gather, selection, index lists)."""
    return BlockIndex.from_plan(pbs_plan(q, k, block, segment, threshold, permute=permute,
                                         backend="triton"))


def profile_plan(args) -> None:
    from torch.profiler import ProfilerActivity, profile
    for N in args.seq_lens:
        for hkv in args.hkv:
            q, k, _ = heavy_hitter_qkv(1, args.hq, hkv, N, args.head_dim, torch.bfloat16, "cuda",
                                       segment=args.segment_size)
            run = lambda: pbs_attention_plan_only(q, k, args.block_size,  # noqa: E731
                                                  args.segment_size, args.threshold, True)
            run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            print(f"N={N} Hkv={hkv} plan {do_bench(run, return_mode='median'):.2f} ms")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                            max_name_column_width=60))


def summarize(rows) -> str:
    """A short markdown table: fwd+bwd ms and TFLOP/s per computed block, speedups."""
    lines = ["| N | Hkv | mask | density | impl | fwd ms | fwd+bwd ms | TFLOP/s (fwd+bwd) | "
             "vs cuDNN dense | vs Flex | plan share |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = [x for x in rows if x["N"] == r["N"] and x["Hkv"] == r["Hkv"]
                and x.get("case") == r.get("case")]
        cudnn = next((x for x in base if x["impl"] == "sdpa_cudnn"), None)
        flex = next((x for x in base if x["impl"] == "flex" and x["mask"] == r["mask"]
                     and x.get("target") == r.get("target")), None)
        fb = r.get("fwdbwd_ms")
        vs_cudnn = f"{cudnn['fwdbwd_ms'] / fb:.2f}x" if cudnn and fb else ""
        vs_flex = (f"{flex['fwdbwd_ms'] / fb:.2f}x" if flex and fb and r["impl"] != "flex"
                   and not r["impl"].startswith("sdpa") else "")
        share = f"{r['plan_share']:.1%}" if "plan_share" in r else ""
        mask = f"packed ({r['docs']} docs) {r['mask']}" if r.get("case") == "packed" else r["mask"]
        lines.append(
            f"| {r['N']} | {r['Hkv']} | {mask} {r.get('target', '')} | {r['density']:.3f} | "
            f"{r['impl']} | {r.get('fwd_ms', float('nan')):.2f} | {fb or float('nan'):.2f} | "
            f"{r.get('fwdbwd_tflops', float('nan')):.0f} | {vs_cudnn} | {vs_flex} | {share} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--hkv", type=int, nargs="+", default=[32, 8])
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--segment-size", type=int, default=256)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.5, 1.0])
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                   help="unpacked: one sequence per row (fixed masks, PBS, MeanPooling); packed: "
                        "one row of documents of log-uniform lengths (512..N)")
    p.add_argument("--packed-density", type=float, default=0.2,
                   help="fixed density of the packed case's second PBS plan")
    p.add_argument("--packed-seed", type=int, default=0, help="seed of the document lengths")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--profile-plan", action="store_true",
                   help="print a torch.profiler table of the planning ops and exit")
    p.add_argument("--out", type=Path, default=Path("bench/results/attention.json"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.attention needs a CUDA GPU")
    device = "cuda"
    if args.profile_plan:
        profile_plan(args)
        return
    flex_fn = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention
        # Every plan's mask_mod captures a new tensor: let dynamo keep one graph per plan
        # instead of falling back to eager flex_attention (which materialises N x N scores).
        torch._dynamo.config.cache_size_limit = 1024
        torch._dynamo.config.accumulated_cache_size_limit = 1024
        flex_fn = torch.compile(flex_attention, dynamic=False)

    rows = []
    for N in args.seq_lens:
        for hkv in args.hkv:
            if "unpacked" in args.cases:
                rows += bench_shape(N, args.hq, hkv, args.head_dim, args.block_size,
                                    args.segment_size, args.densities, args.threshold,
                                    torch.bfloat16, flex_fn, device)
                torch.cuda.empty_cache()
            if "packed" in args.cases:
                rows += bench_packed(N, args.hq, hkv, args.head_dim, args.block_size,
                                     args.segment_size, args.packed_density, args.threshold,
                                     torch.bfloat16, flex_fn, device, args.packed_seed)
                torch.cuda.empty_cache()
    meta = dict(card=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                commit=git_commit(), torch=torch.__version__,
                triton=__import__("triton").__version__, dtype="bfloat16", B=1,
                block_size=args.block_size, segment_size=args.segment_size,
                threshold=args.threshold, cases=args.cases, packed_density=args.packed_density,
                packed_seed=args.packed_seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    table = summarize(rows)
    args.out.with_suffix(".md").write_text(json.dumps(meta) + "\n\n" + table + "\n")
    print(json.dumps(meta))
    print(table)


if __name__ == "__main__":
    main()
