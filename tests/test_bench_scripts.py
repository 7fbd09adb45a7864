"""The GPU evidence scripts (bench/train_throughput.py, bench/accuracy.py, bench/plots.py,
bench/peft_memory.py) run end to end on CPU at tiny sizes, through the real trainer subprocesses
(~3 min)."""

import json

import pytest

from bench import accuracy, needle_selection, peft_memory, plots, train_throughput

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _plain_cpu(monkeypatch):
    # conftest sets TRITON_INTERPRET for kernel tests; the trainer runs use the torch backend.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_throughput_accuracy_and_plots(tmp_path):
    results = tmp_path / "results"
    tp = train_throughput.main([
        "--model", "tiny", "--extra", "model.num_layers=1", "--seq-lens", "256",
        "--variants", "dense", "pbs_d0.2", "--steps", "2", "--warmup", "1",
        "--sdpa-backend", "auto", "--runs-dir", str(tmp_path / "tp"),
        "--out", str(results / "train_throughput.json")])
    assert [r["status"] for r in tp["rows"]] == ["ok", "ok"], tp["rows"]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in tp["rows"])
    assert {r["variant"]: r["speedup"] for r in tp["rows"]}["dense"] == 1.0
    assert (results / "train_throughput.md").read_text().startswith("| seq_len |")

    common = ["--layers", "1", "--hidden", "64", "--heads", "1", "1", "--len-a", "256",
              "--steps-a", "3", "--batch-a", "2", "--eval-samples", "2", "--lens-b", "512",
              "--thresholds", "0.9", "--len-c", "512", "--steps-c", "2", "--batch-c", "1",
              "--runs-dir", str(tmp_path / "acc"), "--out", str(results / "accuracy.json")]
    a = accuracy.main(["--stage", "A", *common, "--lr-a", "1e-3", "3e-3", "--jobs", "2"])
    assert [(r["name"], r["status"]) for r in a["rows"]] == [("A-lr0.001", "ok"),
                                                              ("A-lr0.003", "ok")]
    assert all(r["acc_256"] is not None for r in a["rows"])
    assert a["best_export"] in [r["export"] for r in a["rows"]]
    ns = needle_selection.main([a["best_export"], "--seq-len", "256", "--items", "8",
                                "--thresholds", "0.5", "1.0", "--block-size", "32",
                                "--segment-size", "64", "--sharp", "0"])
    rows = {(r["threshold"], r["permute"]): r for r in ns["rows"]}
    heads = rows[1.0, True]["sharp_heads"]
    assert heads > 0 and all(r["sharp_heads"] == heads for r in ns["rows"])
    assert rows[1.0, True]["hits"] == rows[1.0, False]["hits"] == heads  # threshold 1 keeps all
    b = accuracy.main(["--stage", "B", *common, "--jobs", "2"])
    assert [(r["name"], r["status"]) for r in b["rows"]] == [
        ("dense", "ok"), ("pbs_t0.9", "ok"), ("pbs_t0.9_nopermute", "ok")]
    assert len(b["rows"][1]["density_per_layer"]) == 1
    c = accuracy.main(["--stage", "C", *common])
    assert [r["status"] for r in c["rows"]] == ["ok"] * 3
    assert c["rows"][1]["steps"] == 2 and c["rows"][1]["acc_512"] is not None
    c = accuracy.main(["--stage", "C", *common, "--peft", "lora", "--permute-c", "on",
                       "--extra", "trainer.eval_every=1"])  # rows merge into C
    assert [(r["name"], r["peft"], r["status"]) for r in c["rows"]] == [
        ("dense", "none", "ok"), ("pbs_t0.9", "none", "ok"), ("pbs_t0.9_nopermute", "none", "ok"),
        ("dense", "lora", "ok"), ("pbs_t0.9", "lora", "ok")]
    assert [step for step, _ in c["rows"][-1]["curve"]] == [0, 1, 2]
    gaps = accuracy.lora_gaps(c).splitlines()
    assert len(gaps) == 2 and gaps[0].startswith("- dense at 512: LoRA ")
    assert "LoRA" in (results / "accuracy_C.md").read_text()
    saved = json.loads((results / "accuracy.json").read_text())
    assert set(saved) == {"A", "B", "C"} and len(saved["C"]["rows"]) == 5

    (results / "lora_accuracy.json").write_text((results / "accuracy.json").read_text())
    made = plots.main(["--results", str(results), "--figures", str(tmp_path / "fig"),
                       "--only", "density_vs_length", "throughput_vs_length",
                       "accuracy_vs_density", "lora_accuracy"])
    assert [p.name for p in made] == ["density_vs_length.png", "throughput_vs_length.png",
                                      "accuracy_vs_density.png", "lora_accuracy.png"]


def test_peft_memory_table(tmp_path):
    """Full fine-tuning vs LoRA vs LoRA + Liger (on CPU Liger is skipped with a warning: the
    run goes on with the chunked loss), merged into one JSON with the ratios and a table."""
    out = tmp_path / "peft_memory.json"
    common = ["--model", "tiny", "--seq-lens", "256", "--steps", "2", "--warmup", "1",
              "--deepspeed", "deepspeed=zero0", "optim=adamw", "--sdpa-backend", "auto",
              "--extra", "model.num_layers=1", "--runs-dir", str(tmp_path / "runs"),
              "--out", str(out)]
    peft_memory.main([*common, "--variants", "full_pbs", "lora_pbs"])
    data = peft_memory.main([*common, "--variants", "lora_pbs_liger"])  # merges into the file
    rows = {r["variant"]: r for r in data["rows"]}
    assert sorted(rows) == ["full_pbs", "lora_pbs", "lora_pbs_liger"]
    assert all(r["status"] == "ok" and r["peak_mem_gb"] > 0 for r in rows.values()), rows
    assert rows["lora_pbs"]["trainable_m"] < rows["full_pbs"]["trainable_m"]
    assert rows["lora_pbs"]["params_m"] > rows["full_pbs"]["params_m"]  # base + the adapter
    assert rows["lora_pbs"]["mem_vs_full"] > 0 and rows["lora_pbs_liger"]["mem_vs_no_liger"] > 0
    assert rows["lora_pbs_liger"]["loss"] == "chunked"  # CPU: Liger skipped
    assert not rows["lora_pbs_liger"]["liger_kernels"]
    assert rows["full_pbs"]["deepspeed"] == ["deepspeed=zero0", "optim=adamw"]
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| seq_len |") and "lora_pbs_liger: longest ok 256" in table
    assert table.count("| deepspeed=zero0 optim=adamw |") == 3  # differs from the default


def test_memory_peak_replays_allocations_and_names_their_sites(tmp_path):
    """A hand-made allocation history: the peak is the highest live total relative to the start
    (a free of an older allocation counts down), and it is split by the allocating source line."""
    import pickle

    from bench import memory_peak

    def ev(action, addr, size, file="/repo/kernels/plan.py", line=1):
        return {"action": action, "addr": addr, "size": size,
                "frames": [{"filename": "??", "line": 0, "name": "c10::alloc"},
                           {"filename": file, "line": line, "name": "f"},
                           {"filename": "/x/site-packages/torch/nn/module.py", "line": 9}]}

    trace = [ev("alloc", 1, 100), ev("alloc", 2, 50, line=2), ev("free_completed", 9, 30),
             ev("free_completed", 1, 100), ev("alloc", 3, 200, "/x/site-packages/torch/f.py", 5),
             ev("alloc", 4, 10, line=2), ev("free_completed", 3, 200)]
    got = memory_peak.peak_breakdown(trace)
    assert got["peak_bytes"] == 50 - 30 + 200 + 10 and got["end_bytes"] == 30
    assert dict(got["sites"]) == {"torch/f.py:5 (f)": 200, "kernels/plan.py:2 (f)": 60}
    snap = tmp_path / "snap.pickle"
    snap.write_bytes(pickle.dumps({"segments": [{"device": 0, "allocated_size": 1000}],
                                   "device_traces": [trace]}))
    res = memory_peak.main([str(snap)])
    assert res["baseline_bytes"] == 970
    (tmp_path / "bad.pickle").write_bytes(b"not a pickle")
    with pytest.raises(SystemExit, match="not a torch.cuda.memory snapshot"):
        memory_peak.main([str(tmp_path / "bad.pickle")])


def test_long_context_table(tmp_path):
    """The max-context driver: lengths in order, a variant with every memory switch, peak memory
    and real tokens/s per run, the longest completed length per variant."""
    from bench import long_context

    out = long_context.main([
        "--model", "tiny", "--lengths", "256", "512", "--variants", "pbs_d0.2", "pbs_d0.2_all",
        "--steps", "2", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "lc.json"),
        "--extra", "model.num_layers=1", "attention.block_size=32", "attention.segment_size=64"])
    assert [(r["variant"], r["seq_len"], r["status"]) for r in out["rows"]] == [
        ("pbs_d0.2", 256, "ok"), ("pbs_d0.2_all", 256, "ok"), ("pbs_d0.2", 512, "ok"),
        ("pbs_d0.2_all", 512, "ok")]
    assert all(r["peak_mem_gb"] > 0 and r["tokens_per_s"] > 0 for r in out["rows"])
    assert out["longest_ok"] == {"pbs_d0.2": 512, "pbs_d0.2_all": 512}
    with pytest.raises(ValueError, match="unknown variant"):
        long_context.parse_args(["--variants", "pbs_d0.2_fast"])


def test_code_accuracy_stages(tmp_path):
    """The natural-text stage protocol (bench/code_accuracy.py) at tiny sizes on CPU: A's
    held-out curve and export, B's dense/PBS rows with recall tokens, C's variants per seed with
    gaps to dense; the markdown tables and the figure."""
    from bench import code_accuracy

    out, fig = tmp_path / "results" / "code.json", tmp_path / "code.png"
    common = ["--packages", "json", "email", "--eval-fraction", "0.2", "--layers", "1",
              "--hidden", "64", "--heads", "1", "1",
              "--len-a", "256", "--steps-a", "3", "--batch-a", "2", "--eval-samples", "2",
              "--lens-b", "512", "--thresholds", "0.9", "--len-c", "512", "--steps-c", "2",
              "--batch-c", "1", "--recall-distance", "128", "--bucket-tokens", "64", "--jobs", "2",
              "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--figure", str(fig)]
    a = code_accuracy.main(["--stage", "A", *common])
    (row,) = a["rows"]
    assert row["status"] == "ok" and len(row["curve"]) >= 4 and a["best_export"] == row["export"]
    b = code_accuracy.main(["--stage", "B", *common])
    assert [(r["name"], r["status"]) for r in b["rows"]] == [
        ("dense", "ok"), ("pbs_t0.9", "ok"), ("pbs_t0.9_nopermute", "ok")]
    assert all(r["recall_tokens"] > 0 and r["loss"] > 0 for r in b["rows"])
    assert len(b["rows"][1]["density_per_layer"]) == 1 and "00256-00511" in b["rows"][0][
        "loss_by_pos"]
    c = code_accuracy.main(["--stage", "C", *common, "--variants-c", "dense", "pbs_t",
                            "--seeds", "3"])
    assert [(r["name"], r["seed"], r["status"], r["steps"]) for r in c["rows"]] == [
        ("dense", 3, "ok", 2), ("pbs_t0.9", 3, "ok", 2)]
    assert c["rows"][1]["loss_512"] > 0 and c["rows"][1]["tokens_per_s"] > 0
    md = (out.parent / "code_C.md").read_text()
    assert "pbs_t0.9: held-out loss" in md and "held-out loss by position" in md
    assert fig.stat().st_size > 0


def test_code_accuracy_seeds_merge_and_targets_by_hand():
    """Stage C rows of two calls (one per seed) merge by (name, seed); the summary averages the
    seeds and checks the issue's targets against dense."""
    from bench.code_accuracy import c_summary, merge, targets

    def row(name, seed, loss, recall, density=None):
        r = {"name": name, "seed": seed, "status": "ok", "steps": 10, "loss_512": loss,
             "recall_512": recall, "loss_by_pos": {"00000-00511": loss}, "tokens_per_s": 1.0}
        return r | ({"density": density, "density_per_layer": [density]} if density else {})

    first = {"eval_lens": [512], "rows": [row("dense", 0, 2.0, 3.0), row("pbs_d0.2", 0, 2.0,
                                                                        3.0, 0.2)]}
    second = {"eval_lens": [512], "rows": [row("dense", 1, 2.2, 3.4),
                                           row("pbs_d0.2", 1, 2.23, 3.5, 0.3)]}
    res = merge(first, second, "seed")
    assert [(r["name"], r["seed"]) for r in res["rows"]] == [
        ("dense", 0), ("pbs_d0.2", 0), ("dense", 1), ("pbs_d0.2", 1)]
    pbs = {r["name"]: r for r in c_summary(res)}["pbs_d0.2"]
    assert pbs["loss_gap"] == pytest.approx(4.23 / 4.2 - 1) and pbs["density"] == 0.25
    assert pbs["recall_gap"] == pytest.approx(6.5 / 6.4 - 1) and pbs["seeds"] == [0, 1]
    assert "**met**" in targets(res)  # +0.71 % loss, +1.56 % recall, density 0.25
    res["rows"][-1]["recall_512"] = 3.7  # +4.7 % recall
    assert "**missed**" in targets(res)


def test_attention_bench_parses_and_builds_its_packed_rows_on_cpu():
    """bench.attention runs on a GPU only; here: its arguments, the packed row's documents
    (log-uniform lengths, block-aligned starts, filling the row) and a valid packed plan."""
    import torch

    from bench import attention
    from kernels import pbs_plan
    args = attention.parse_args(["--cases", "packed", "--seq-lens", "65536", "--hkv", "8",
                                 "--packed-density", "0.2"])
    assert args.cases == ["packed"] and args.packed_density == 0.2 and args.packed_seed == 0
    assert attention.parse_args([]).cases == ["unpacked", "packed"]
    N, b = 65536, 128
    starts, ends = attention.packed_documents(N, b, device="cpu")
    assert torch.equal(starts, attention.packed_documents(N, b, device="cpu")[0])  # fixed seed
    lengths = (ends - starts)[0]
    assert (starts % b == 0).all() and (starts[0, 1:] > starts[0, :-1]).all()
    assert starts[0, 0] == 0 and ends[0, -1] <= N < starts[0, -1] + (lengths[-1] // b + 1) * b
    assert (lengths[:-1] >= 512).all() and starts.shape[1] >= 3
    N, b = 4096, 128
    starts, ends = attention.packed_documents(N, b, device="cpu")
    q, k = torch.randn(1, 2, N, 16), torch.randn(1, 1, N, 16)
    plan = pbs_plan(q, k, b, 256, threshold=1.0, permute=False, doc_starts=starts,
                    query_end=ends, backend="torch")
    assert plan.density == 1.0 and plan.doc_first_block is not None
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            attention.main(["--cases", "packed"])


def test_packing_throughput_table(tmp_path):
    """Padded vs packed through the trainer on one corpus: real tokens/s per variant, the
    packed rows fuller than the padded ones."""
    from bench import packing_throughput

    out = packing_throughput.main([
        "--model", "tiny", "--seq-len", "512", "--min-len", "64", "--docs", "40",
        "--variants", "padded_pbs", "packed_pbs", "--steps", "2", "--warmup", "1",
        "--budget-s", "1200",
        "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "p.json"),
        "--extra", "model.num_layers=1", "attention.block_size=32", "attention.segment_size=64"])
    rows = {r["variant"]: r for r in out["rows"]}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows.values()), rows
    assert rows["packed_pbs"]["packing_efficiency"] > rows["padded_pbs"]["packing_efficiency"]
    assert rows["packed_pbs"]["docs_per_row"] > 1 == rows["padded_pbs"]["docs_per_row"]
    assert "| packed_pbs | ok |" in (tmp_path / "p.md").read_text()


def test_failed_run_names_its_cause():
    """A run killed by a signal (the host's OOM killer sends SIGKILL) says so, not the last
    line it happened to print; a CUDA OOM is an "oom"; otherwise the exception's line."""
    from bench.runner import failure

    assert failure(-9, "  return func(*args, **kwargs)\n") == (
        "error", "killed by SIGKILL (the host's out-of-memory killer?)")
    assert failure(-15, "") == ("error", "killed by SIGTERM")
    assert failure(1, "Traceback\ntorch.OutOfMemoryError: CUDA out of memory.\n")[0] == "oom"
    assert failure(1, "Traceback\nValueError: data.seq_len must be > 0\n") == (
        "error", "ValueError: data.seq_len must be > 0")
    assert failure(None, "")[0] == "timeout"
