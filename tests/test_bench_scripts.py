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
    saved = json.loads((results / "accuracy.json").read_text())
    assert set(saved) == {"A", "B", "C"}

    made = plots.main(["--results", str(results), "--figures", str(tmp_path / "fig"),
                       "--only", "density_vs_length", "throughput_vs_length",
                       "accuracy_vs_density"])
    assert [p.name for p in made] == ["density_vs_length.png", "throughput_vs_length.png",
                                      "accuracy_vs_density.png"]


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
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| seq_len |") and "lora_pbs_liger: longest ok 256" in table


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
