"""Figures for docs/results.md, from the JSON under bench/results/ (runs on CPU).

    python3 -m bench.plots                     # every figure whose inputs exist
    python3 -m bench.plots --only attention_map

(a) ``attention_map.png``: one head's attention (synthetic heavy-hitter input, N=2048) in original
    key order with the MeanPooling selection (no permutation) and in permuted key order with the
    PBS selection, at the same threshold; skipped blocks veiled, so the selected blocks stand out.
(b) ``density_vs_length.png``: density vs sequence length (accuracy stage B, attention bench,
    throughput runs).
(c) ``throughput_vs_length.png``: training tokens/s vs sequence length, dense vs PBS.
(d) ``accuracy_vs_density.png``: retrieval accuracy vs density (accuracy stages B and C).
(e) ``code_accuracy.png``: the stage protocol on natural text (bench/code_accuracy.py): stage A's
    held-out loss curve, stage B's density and loss vs threshold, stage C's loss by position.
(f) ``lora_accuracy.png``: retrieval accuracy vs step while fine-tuning at the longer length, full
    fine-tuning vs LoRA, one panel per attention (stage C of ``lora_accuracy*.json``:
    bench/accuracy.py with ``--peft none lora`` and ``--extra trainer.eval_every=K``).
Figures whose inputs are missing are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

FIGURES = ("attention_map", "density_vs_length", "throughput_vs_length", "accuracy_vs_density",
           "code_accuracy", "packing_throughput", "lora_accuracy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("bench/results"),
                   help="folder of train_throughput.json, accuracy.json, attention.json")
    p.add_argument("--figures", type=Path, default=Path("docs/figures"), help="output folder")
    p.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES))
    p.add_argument("--seq-len", type=int, default=2048, help="(a): sequence length (default 2048)")
    p.add_argument("--threshold", type=float, default=0.9, help="(a): threshold (default 0.9)")
    p.add_argument("--q-scale", type=float, default=0.8,
                   help="(a): query scale, i.e. heavy-hitter strength (default 0.8)")
    return p.parse_args(argv)


def attention_map(args: argparse.Namespace, out: Path) -> None:
    from bench.attention import heavy_hitter_qkv
    from kernels import pbs_attention
    from kernels.reference import token_mask

    n, block, segment = args.seq_len, 64, 256
    q, k, v = heavy_hitter_qkv(1, 1, 1, n, 64, torch.float32, "cpu", segment=segment,
                               hot_share=0.375)
    q = q * args.q_scale  # softer heavy hitters: the background stays visible
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = (q[0, 0] @ k[0, 0].T / 8.0).masked_fill(~causal, float("-inf")).softmax(-1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4))
    for ax, permute in zip(axes, (False, True)):
        _, plan = pbs_attention(q, k, v, block, segment, args.threshold, permute=permute,
                                return_plan=True, backend="torch")
        perm = plan.key_perm[0, 0]
        shown = probs[:, perm]  # columns in the plan's key order (identity without permutation)
        captured = (shown * token_mask(plan, 1)[0, 0]).sum().item() / n
        blocks = plan.block_mask[0, 0] & torch.ones_like(plan.block_mask[0, 0]).tril()
        outline = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
        causal_blocks = torch.ones_like(blocks).tril().repeat_interleave(block, 0) \
            .repeat_interleave(block, 1)
        ax.imshow(shown.clamp_min(1e-6).log10(), cmap="magma", vmin=-4.5, vmax=-0.5,
                  interpolation="nearest")
        veil = torch.tensor([0.55, 0.8, 1.0, 0.5]).expand(n, n, 4).clone()
        veil[..., 3] *= (~outline & causal_blocks).float()
        ax.imshow(veil.numpy(), interpolation="nearest")
        name = "PBS: permuted key order" if permute else "before permutation (MeanPooling)"
        ax.set_title(f"{name}\ndensity {plan.density:.2f}, attention mass kept {captured:.2f}",
                     fontsize=10)
        ax.set_xlabel("key position (plan order)")
        ax.set_ylabel("query position")
    fig.suptitle(f"one head, heavy-hitter input, N={n}, blocks {block}, segments {segment}, "
                 f"threshold {args.threshold} (log10 attention; blue veil: skipped blocks)",
                 fontsize=10)
    _save(fig, out)


def _save(fig, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def density_vs_length(args: argparse.Namespace, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = 0
    acc = _load(args.results / "accuracy.json").get("B", {}).get("rows", [])
    series: dict[str, list[tuple[int, float]]] = {}
    for r in acc:
        if r.get("status") == "ok" and r["name"] != "dense" and "density" in r:
            series.setdefault(f"trained model, {r['name']}", []).append(
                (r["seq_len"], r["density"]))
    for r in _load(args.results / "attention.json").get("rows", []):
        if r.get("impl") == "pbs_kernel" and r.get("mask") in ("pbs", "meanpool"):
            series.setdefault(f"heavy-hitter input, {r['mask']}", []).append((r["N"], r["density"]))
    for r in _load(args.results / "train_throughput.json").get("rows", []):
        if r["variant"] == "pbs_t0.9" and r["status"] == "ok":
            series.setdefault("1B random init, pbs_t0.9", []).append((r["seq_len"], r["density"]))
    for label, pts in sorted(series.items()):
        pts = sorted(set(pts))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if "nopermute" not in label
                and "meanpool" not in label else "s--", label=label, markersize=4)
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise FileNotFoundError("no density results (accuracy.json B, attention.json, "
                                "train_throughput.json)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("density (computed / causal blocks)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, out)


def throughput_vs_length(args: argparse.Namespace, out: Path) -> None:
    rows = [r for r in _load(args.results / "train_throughput.json").get("rows", [])
            if r["status"] == "ok"]
    if not rows:
        raise FileNotFoundError("no rows in train_throughput.json")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for variant in sorted({r["variant"] for r in rows}):
        pts = sorted((r["seq_len"], r["tokens_per_s"]) for r in rows if r["variant"] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("training tokens/s (1 GPU)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, out)


def packing_throughput(args: argparse.Namespace, out: Path) -> None:
    """Real tokens/s per layout and attention (bench/packing_throughput.py, 64K rows)."""
    data = _load(args.results / "packing_throughput_64k.json")
    rows = [r for r in data.get("rows", []) if r["status"] == "ok"]
    if not rows:
        raise FileNotFoundError("no rows in packing_throughput_64k.json")
    rows.sort(key=lambda r: r["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    colors = ["tab:gray" if r["variant"].startswith("padded") else "tab:blue" if "pbs" in
              r["variant"] else "tab:orange" for r in rows]
    ax.barh([r["variant"] for r in rows], [r["tokens_per_s"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(r["tokens_per_s"], i, f" {r['tokens_per_s'] / 1e3:.1f}K"
                + (f" (density {r['density']:.2f})" if r.get("density") else ""), va="center")
    ax.set_xlabel("real (non-pad) training tokens/s, 1 GPU")
    ax.set_xlim(0, 1.35 * rows[-1]["tokens_per_s"])
    s = data.get("settings", {})
    ax.set_title(f"{s.get('model')}, rows of {s.get('seq_len')} tokens, documents "
                 f"{s.get('min_len')}..{s.get('seq_len')} (log-uniform), {data.get('device')}",
                 fontsize=8)
    _save(fig, out)


def accuracy_vs_density(args: argparse.Namespace, out: Path) -> None:
    acc = _load(args.results / "accuracy.json")
    b = [r for r in acc.get("B", {}).get("rows", []) if r.get("status") == "ok"]
    c = [r for r in acc.get("C", {}).get("rows", []) if r.get("status") == "ok"]
    if not b and not c:
        raise FileNotFoundError("no stage B/C rows in accuracy.json")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for n in sorted({r["seq_len"] for r in b}):
        for permute, marker in ((True, "o-"), (False, "s--")):
            pts = sorted((r.get("density", 1.0), r["acc"]) for r in b if r["seq_len"] == n
                         and r["name"] != "dense" and r["permute"] == permute)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker,
                        label=f"no training, {n}, {'PBS' if permute else 'no permutation'}")
        dense = [r["acc"] for r in b if r["seq_len"] == n and r["name"] == "dense"]
        if dense:
            ax.scatter([1.0], dense, marker="*", s=80, label=f"no training, {n}, dense")
    len_c = max(acc.get("C", {}).get("eval_lens", [0]))
    for r in c:
        tags = "".join([", LoRA" if r.get("peft") == "lora" else "",
                        f", seed {r['seed']}" if r.get("seed") else ""])
        ax.scatter([r.get("density", 1.0)], [r.get(f"acc_{len_c}")], marker="D", s=50,
                   label=f"fine-tuned at {len_c}, {r['name']}{tags}")
    ax.set_xlabel("density")
    ax.set_ylabel("passkey retrieval accuracy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    _save(fig, out)


def lora_accuracy(args: argparse.Namespace, out: Path) -> None:
    """Retrieval curves of full fine-tuning (solid) vs LoRA (dashed) per attention, every seed and
    run length of the stage C results in ``lora_accuracy*.json``."""
    runs = []  # (file stem, planned steps, eval length, row)
    for path in sorted(args.results.glob("lora_accuracy*.json")):
        c = _load(path).get("C", {})
        n = max(c.get("eval_lens", [0]))
        runs += [(path.stem, c["settings"]["steps_c"], n, r) for r in c.get("rows", [])
                 if r.get("status") == "ok" and r.get("curve")]
    if not runs:
        raise FileNotFoundError("no stage C curves in lora_accuracy*.json")
    names = list(dict.fromkeys(r["name"] for *_, r in runs))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), sharey=True,
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        for stem, steps, n, r in (x for x in runs if x[3]["name"] == name):
            lora = r.get("peft") == "lora"
            ax.plot(*zip(*r["curve"]), "--" if lora else "-", marker="o", ms=3,
                    label=f"{'LoRA' if lora else 'full'}, seed {r.get('seed', 0)}, "
                          f"{r['steps']}/{steps} steps ({stem})")
        ax.set_title(f"{name}: retrieval at {n}", fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("passkey retrieval accuracy")
    _save(fig, out)


def code_accuracy(args: argparse.Namespace, out: Path) -> None:
    data = _load(args.results / "code_accuracy.json")
    if not data:
        raise FileNotFoundError("no code_accuracy.json")
    code_accuracy_figure(data, out)


def code_accuracy_figure(data: dict, out: Path) -> None:
    """Four panels from bench/code_accuracy.py's results (a stage not run yet says so): A's
    held-out loss per eval step; B at its longest length: density and held-out / recall loss
    relative to dense vs threshold, with and without permutation; C: held-out loss by position
    per variant (mean over seeds)."""
    from bench.code_accuracy import c_summary

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (a_ax, dens_ax), (gap_ax, c_ax) = axes
    for r in data.get("A", {}).get("rows", []):
        if r.get("curve"):
            a_ax.plot(*zip(*r["curve"]), "o-", markersize=3, label=r["name"])
    a_ax.set(xlabel="step", ylabel="held-out loss (nats/token)", title="A: dense pretraining")
    b = [r for r in data.get("B", {}).get("rows", []) if r.get("status") == "ok"]
    n = max((r["seq_len"] for r in b), default=None)
    dense = next((r for r in b if r["seq_len"] == n and r["name"] == "dense"), {})
    for permute, style in ((True, "o-"), (False, "s--")):
        pts = sorted((r["threshold"], r) for r in b if r["seq_len"] == n
                     and r["name"] != "dense" and r["permute"] == permute)
        label = "PBS" if permute else "no permutation"
        if pts:
            dens_ax.plot([t for t, _ in pts], [r["density"] for _, r in pts], style, label=label)
        for key, color in (("loss", "C0"), ("recall", "C3")):
            gap = [(t, r[key] / dense[key] - 1) for t, r in pts
                   if r.get(key) is not None and dense.get(key)]
            if gap:
                name = "held-out" if key == "loss" else "long-range recall"
                gap_ax.plot(*zip(*gap), style, color=color, label=f"{name} loss, {label}")
    dens_ax.set(xlabel="threshold", ylabel="density", title=f"B: no training, {n} tokens")
    gap_ax.set(xlabel="threshold", ylabel="relative to dense", title=f"B: loss vs dense, {n}")
    c = data.get("C")
    for r in c_summary(c) if c else []:
        pts = sorted((int(k.split("-")[1]) + 1, v) for k, v in r["loss_by_pos"].items())
        c_ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", markersize=3,
                  label=f"{r['name']} (density {r['density'] or 1:.2f})")
    c_ax.set_xscale("log", base=2)
    c_ax.set(xlabel="position (bucket end)", ylabel="held-out loss",
             title="C: after training at the long length")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not run yet", ha="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, out)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    args.figures.mkdir(parents=True, exist_ok=True)
    made = []
    for name in args.only:
        out = args.figures / f"{name}.png"
        try:
            globals()[name](args, out)
        except FileNotFoundError as e:
            print(f"skipped {name}: {e}")
            continue
        print(f"wrote {out}")
        made.append(out)
    return made


if __name__ == "__main__":
    main()
