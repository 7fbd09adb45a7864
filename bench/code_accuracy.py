"""Accuracy kept by PBS on natural text: the stage protocol of docs/results.md section 2 on the
source-code corpus (``data=code``, trainer/code_corpus.py), all through ``python -m trainer.train``.

Stage A: pretrain a small Llama (GQA, head_dim 64) densely at ``--len-a`` (one run per
         ``--lr-a``): held-out loss curve; exports ``<runs-dir>/A*/hf``, the one with the lowest
         held-out loss recorded in ``--out``.
Stage B: that export without training, at each ``--lens-b``: dense vs PBS at each
         ``--thresholds`` with and without permutation: held-out loss, long-range recall loss,
         loss by position, density per layer (one optimizer step at lr 0, which leaves the
         weights as they are, on full-length training rows).
Stage C: continue training the export at ``--len-c``: dense, PBS at ``--threshold-c``, PBS at
         a fixed ``--density-c``, PBS at ``--threshold-c`` without permutation; same steps and
         data, once per ``--seeds`` (the data order): held-out loss by position, long-range
         recall, density per layer, training tokens/s.

    python3 -m bench.code_accuracy --stage A
    python3 -m bench.code_accuracy --stage B        # reads stage A's best export (or --model-path)
    python3 -m bench.code_accuracy --stage C --seeds 0     # then --seeds 1 (rows merge)

``--out`` holds one key per stage; B rows merge by (name, length) and C rows by (name, seed),
so a stage can be split over several calls. Each call writes ``<out stem>_<stage>.md`` and the
figure ``--figure`` (bench/plots.py ``code_accuracy_figure``) of every stage in ``--out``.
``--jobs N`` runs N trainer processes at once, round-robin over the visible GPUs: runs that share
a GPU are no speed comparison (tokens/s from ``--jobs 1`` or one GPU per run).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean, median

from bench.accuracy import (PBS, model_overrides, permutation_gain, stage_a_runs,
                            stage_b_rows, stage_parser, time_limit, vars_of)
from bench.plots import code_accuracy_figure
from bench.runner import TrainerRun, environment, load_json, markdown_table, run_trainers, save_json
from trainer.code_corpus import DEFAULT_PACKAGES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = stage_parser(__doc__, layers=6, hidden=512, heads=[8, 2], steps_a=4000, steps_c=300,
                     eval_samples=32, budget_s=540, runs_dir="runs/code_accuracy",
                     out="bench/results/code_accuracy.json")
    p.add_argument("--packages", nargs="+", default=[*DEFAULT_PACKAGES, "torch"],
                   help="data.packages (default: the standard-library default + torch)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="data.eval_fraction")
    p.add_argument("--recall-distance", type=int, default=4096, help="data.recall_distance")
    p.add_argument("--bucket-tokens", type=int, default=1024, help="data.loss_bucket_tokens")
    p.add_argument("--threshold-c", type=float, default=0.9, help="stage C threshold (0.9)")
    p.add_argument("--density-c", type=float, default=0.2, help="stage C fixed density (0.2)")
    p.add_argument("--variants-c", nargs="+", choices=["dense", "pbs_t", "pbs_d", "nopermute"],
                   default=["dense", "pbs_t", "pbs_d", "nopermute"], help="stage C variants")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="stage C seeds")
    p.add_argument("--figure", type=Path, default=Path("docs/figures/code_accuracy.png"))
    return p.parse_args(argv)


def common(args: argparse.Namespace, seq_len: int, eval_lens: list[int], steps: int,
           batch: int, lr: float, seed: int = 0) -> list[str]:
    """Overrides of every run: full-length code rows (``data.min_len`` follows the length),
    held-out eval at ``eval_lens``."""
    return ["data=code", f"data.packages=[{','.join(args.packages)}]", f"data.seq_len={seq_len}",
            f"data.eval_seq_lens=[{','.join(map(str, eval_lens))}]",
            f"data.eval_samples={args.eval_samples}", f"data.eval_fraction={args.eval_fraction}",
            f"data.recall_distance={args.recall_distance}",
            f"data.loss_bucket_tokens={args.bucket_tokens}", f"trainer.max_steps={steps}",
            f"trainer.micro_batch_size={batch}", "trainer.grad_accum=1", f"trainer.seed={seed}",
            "trainer.gradient_checkpointing=false", "trainer.save_final=false", f"optim.lr={lr}",
            f"optim.warmup_steps={min(100, max(1, steps // 10))}"]


def summarize(run: TrainerRun, name: str, eval_lens: list[int], tail: int = 10) -> dict:
    """Final held-out metrics per eval length, loss by position, the eval-loss curve; train
    loss, median tokens/s and density per layer over the last ``tail`` logged steps."""
    final = run.last("eval/")
    row: dict = {"name": name, "status": run.status, "error": run.error,
                 "wall_s": round(run.wall_s, 1), "steps": len(run.train_rows())}
    for n in eval_lens:
        for key, metric in (("loss", "loss"), ("recall", "recall_loss"),
                            ("recall_tokens", "recall_tokens")):
            row[f"{key}_{n}"] = final.get(f"eval/{metric}/len_{n:05d}")
    row["loss_by_pos"] = {k.removeprefix("eval/loss_by_pos/"): v for k, v in final.items()
                          if k.startswith("eval/loss_by_pos/")}
    row["curve"] = [(r["step"], r["eval/loss"]) for r in run.rows if "eval/loss" in r]
    last = run.train_rows()[-tail:]
    if last:
        row["train_loss"] = last[-1]["train/loss"]
        row["tokens_per_s"] = median(r["perf/tokens_per_sec"] for r in last)
        layers = sorted(k for k in last[-1] if k.startswith("attn/density/layer_"))
        row["density_per_layer"] = [mean(r[k] for r in last) for k in layers]
        row["density"] = mean(row["density_per_layer"]) if layers else 1.0
    return row


def stage_a(args: argparse.Namespace) -> dict:
    """One dense run per ``--lr-a``; the export with the lowest final held-out loss feeds B, C."""
    base = model_overrides(args) + common(args, args.len_a, [args.len_a], args.steps_a,
                                          args.batch_a, 0.0)
    rows = []
    for name, lr, run in stage_a_runs(args, base, evals=8):
        row = summarize(run, name, [args.len_a])
        row.update(lr=lr, export=str(Path(run.run_dir) / "hf"))
        rows.append(row)
    done = [r for r in rows if r["status"] == "ok" and r[f"loss_{args.len_a}"] is not None]
    best = min(done, key=lambda r: r[f"loss_{args.len_a}"], default=None)
    return {"settings": vars_of(args), "rows": rows, "best_export": best and best["export"]}


def stage_b(args: argparse.Namespace, model_path: str) -> dict:
    def base(n: int) -> list[str]:
        return [f"model.path={model_path}", *common(args, n, [n], 1, 1, 0.0),
                "trainer.export_hf=false"]

    rows = stage_b_rows(args, base, summarize, ("loss", "recall", "recall_tokens"))
    return {"settings": vars_of(args), "model_path": model_path, "rows": rows}


def c_variants(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    t, d = args.threshold_c, args.density_c
    every = {"dense": ("dense", ["attention=sdpa"]),
             "pbs_t": (f"pbs_t{t}", PBS + [f"attention.threshold={t}"]),
             "pbs_d": (f"pbs_d{d}", PBS + [f"attention.density={d}"]),
             "nopermute": (f"pbs_t{t}_nopermute", PBS + [f"attention.threshold={t}",
                                                        "attention.permute=false"])}
    return [every[v] for v in args.variants_c]


def stage_c(args: argparse.Namespace, model_path: str) -> dict:
    """Every variant once per seed, same steps; eval at the stage A and C lengths."""
    eval_lens = sorted({args.len_a, args.len_c})
    jobs, keys = [], []
    for seed in args.seeds:
        base = [f"model.path={model_path}", *common(args, args.len_c, eval_lens, args.steps_c,
                                                     args.batch_c, args.lr_c, seed),
                "trainer.eval_every=0", "trainer.export_hf=false", time_limit(args.budget_s)]
        for name, attn in c_variants(args):
            jobs.append((f"C-{name}-s{seed}", base + attn + args.extra))
            keys.append((name, seed))
    rows = []
    for (name, seed), run in zip(keys, run_trainers(jobs, args.runs_dir, args.budget_s,
                                                    args.jobs)):
        row = summarize(run, name, eval_lens) if run is not None else {
            "name": name, "status": "skipped", "error": "budget"}
        rows.append({**row, "seed": seed})
    return {"settings": vars_of(args), "model_path": model_path, "eval_lens": eval_lens,
            "rows": rows}


def c_summary(res: dict) -> list[dict]:
    """Per variant, over its finished seeds: means of the final metrics at the longest eval
    length, and the relative gaps to dense (PBS / dense - 1)."""
    n = max(res["eval_lens"])
    out = []
    for name in dict.fromkeys(r["name"] for r in res["rows"]):
        ok = [r for r in res["rows"] if r["name"] == name and r["status"] == "ok"]
        if not ok:
            continue
        row = {"name": name, "seeds": [r["seed"] for r in ok],
               "steps": sorted({r["steps"] for r in ok})}
        for key in ("loss", "recall"):
            for m in res["eval_lens"]:
                values = [r[f"{key}_{m}"] for r in ok if r.get(f"{key}_{m}") is not None]
                row[f"{key}_{m}"] = mean(values) if values else None
        for key in ("density", "tokens_per_s"):
            values = [r[key] for r in ok if key in r]
            row[key] = mean(values) if values else None
        layers = [r["density_per_layer"] for r in ok if r.get("density_per_layer")]
        row["density_per_layer"] = [mean(x) for x in zip(*layers)]
        final = [r[f"loss_{n}"] for r in ok if r.get(f"loss_{n}") is not None]
        row["loss_spread"] = max(final) - min(final) if final else None
        buckets = [r["loss_by_pos"] for r in ok]
        row["loss_by_pos"] = {b: mean(x[b] for x in buckets) for b in buckets[0]
                              if all(b in x for x in buckets)}
        out.append(row)
    dense = next((r for r in out if r["name"] == "dense"), None)
    for r in out:
        for key in ("loss", "recall"):
            a, b = r.get(f"{key}_{n}"), dense and dense.get(f"{key}_{n}")
            r[f"{key}_gap"] = a / b - 1 if a is not None and b else None
    return out


def targets(res: dict) -> str:
    """The issue's targets for stage C, checked per PBS variant."""
    lines = []
    for r in c_summary(res):
        if r["name"] == "dense" or r["loss_gap"] is None:
            continue
        dens = r["density"] or 1.0
        if r["recall_gap"] is None:
            verdict = "not settled (no long-range recall tokens)"
        else:
            met = r["loss_gap"] <= 0.01 and r["recall_gap"] <= 0.02 and dens <= 0.3
            verdict = "met" if met else "missed"
        lines.append(f"- {r['name']}: held-out loss {_pct(r['loss_gap'])} vs dense, long-range "
                     f"recall loss {_pct(r['recall_gap'])}, density {dens:.3f} "
                     f"({len(r['seeds'])} seed(s)): target (loss within 1 %, recall within 2 %, "
                     f"density <= 0.3) **{verdict}**")
    return "\n".join(lines)


def table(stage: str, res: dict) -> str:
    rows = res["rows"]
    if stage == "A":
        n = res["settings"]["len_a"]
        body = [[r["name"], r["status"], r.get("lr"), r["steps"], r.get("train_loss"),
                 r.get(f"loss_{n}"), " ".join(f"{loss:.3f}" for _, loss in r["curve"])]
                for r in rows]
        return markdown_table(["run", "status", "lr", "steps", "train loss",
                               f"held-out loss @{n}", "held-out loss curve"], body)
    if stage == "B":
        dense = {r["seq_len"]: r for r in rows if r["name"] == "dense" and r["status"] == "ok"}
        body = []
        for r in rows:
            ref = dense.get(r.get("seq_len"), {})
            body.append([r.get("seq_len"), r["name"], r.get("threshold"), r["status"],
                         r.get("loss"), _gap(r.get("loss"), ref.get("loss")), r.get("recall"),
                         _gap(r.get("recall"), ref.get("recall")), r.get("density"),
                         _layers(r)])
        return markdown_table(["seq_len", "attention", "threshold", "status", "held-out loss",
                               "vs dense", "recall loss", "vs dense", "density",
                               "density per layer"], body) + "\n\n" + permutation_gain(rows)
    lens = res["eval_lens"]
    summary = c_summary(res)
    body = [[r["name"], " ".join(map(str, r["seeds"])), " ".join(map(str, r["steps"])),
             *[r.get(f"loss_{n}") for n in lens], _pct(r["loss_gap"]),
             r.get(f"recall_{lens[-1]}"), _pct(r["recall_gap"]), r["loss_spread"],
             r.get("density"), _layers(r), r.get("tokens_per_s")] for r in summary]
    text = markdown_table(["attention", "seeds", "steps", *[f"loss@{n}" for n in lens],
                           "vs dense", f"recall@{lens[-1]}", "vs dense", "seed spread",
                           "density", "density per layer", "tok/s"], body)
    buckets = list(dict.fromkeys(b for r in summary for b in r["loss_by_pos"]))
    by_pos = markdown_table(["held-out loss by position", *buckets],
                            [[r["name"], *[r["loss_by_pos"].get(b) for b in buckets]]
                             for r in summary])
    return "\n\n".join(x for x in (text, targets(res), permutation_gain(summary), by_pos) if x)


def _gap(a: float | None, b: float | None) -> str:
    return _pct(a / b - 1) if a is not None and b else "-"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2%}"


def _layers(row: dict) -> str:
    return " ".join(f"{d:.2f}" for d in row.get("density_per_layer", [])) or "-"


def merge(old: dict | None, new: dict, key: str) -> dict:
    """``new`` with the rows of ``old`` it does not redo (same name and ``key``) kept."""
    if old:
        redone = {(r["name"], r.get(key)) for r in new["rows"]}
        new["rows"] = [r for r in old["rows"] if (r["name"], r.get(key)) not in redone] + \
            new["rows"]
    return new


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = load_json(args.out)
    model_path = args.model_path or data.get("A", {}).get("best_export") or ""
    if args.stage != "A" and not (Path(model_path) / "config.json").exists():
        raise SystemExit(f"no stage A export ({model_path or 'none recorded in ' + str(args.out)})"
                         ": run --stage A first or pass --model-path")
    if args.stage == "A":
        res = stage_a(args)
    else:
        res = {"B": stage_b, "C": stage_c}[args.stage](args, str(Path(model_path).resolve()))
        res = merge(data.get(args.stage), res, "seq_len" if args.stage == "B" else "seed")
    res.update(environment())
    data[args.stage] = res
    save_json(args.out, data)
    md = table(args.stage, res)
    args.out.with_name(f"{args.out.stem}_{args.stage}.md").write_text(md + "\n")
    code_accuracy_figure(data, args.figure)
    print(f"\nstage {args.stage} | {res['device']} | commit {res['commit']}\n{md}\n"
          f"figure: {args.figure}")
    return res


if __name__ == "__main__":
    main()
