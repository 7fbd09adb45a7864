"""data=code (trainer/code_corpus.py) and the held-out LM metrics (trainer/lm_metrics.py): a
deterministic corpus split by subtree, tokens that round-trip, exact position-bucket and
long-range recall values on hand-made sequences, sums that add up over sequence shards."""

from __future__ import annotations

import hashlib
import importlib
import json
import keyword
import re
import sys

import numpy as np
import pytest
import torch

from trainer.batching import collate
from tests.trainer_utils import TINY, check, run_dirs, run_job, wandb_config, wandb_history_keys
from trainer.code_corpus import (DEFAULT_PACKAGES, CodeCorpus, cut_points, document_lengths,
                                 identifier_spans, recall_mask, split_subtrees)
from trainer.data import DataConfig, build_eval_dataset, build_train_dataset
from trainer.lm_metrics import lm_metrics, position_buckets, token_loss_stats
from trainer.packing import IGNORE
from trainer.parallel import SequenceParallel
from trainer.tokenizer import build_tokenizer

STDLIB = ["json", "email", "http", "logging", "concurrent"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def fakepkg(tmp_path, monkeypatch):
    """An installed package with known files: two subtrees, a tab, a non-ASCII character, an
    empty file and a __pycache__ folder (both left out)."""
    root = tmp_path / "fakepkg"
    (root / "sub").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / "__init__.py").write_text("from .b import alpha\n")
    (root / "b.py").write_text("def alpha(x):\n\treturn x  # caf\u00e9\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "c.py").write_text("beta = 1\n")
    (root / "__pycache__" / "junk.py").write_text("junk = 1\n")
    (root / "notes.txt").write_text("not python\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return root


def test_fake_package_files_headers_and_round_trip(tok, fakepkg):
    corpus = CodeCorpus(["fakepkg"], tok, eval_fraction=0.5)
    assert corpus.subtrees == {
        "fakepkg": [("fakepkg/__init__.py", "# file: fakepkg/__init__.py\nfrom .b import alpha\n"),
                    ("fakepkg/b.py", "# file: fakepkg/b.py\ndef alpha(x):\n        return x  "
                                     "# caf?\n")],
        "fakepkg/sub": [("fakepkg/sub/c.py", "# file: fakepkg/sub/c.py\nbeta = 1\n")]}
    assert corpus.versions == {"fakepkg": "unknown"}
    assert sorted(corpus.train_subtrees + corpus.eval_subtrees) == ["fakepkg", "fakepkg/sub"]
    (train,) = corpus.train_subtrees
    docs = corpus.documents(None, 10**6)  # one document per file
    texts = [t for _, t in corpus.subtrees[train]]
    assert len(docs) == len(texts)
    for doc, text in zip(docs, texts):
        ids = doc.ids.tolist()
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids[1:]) == text and tok(text, add_special_tokens=False)[
            "input_ids"] == ids[1:]
    assert [len(d) for d in docs] == [len(t) + 1 for t in texts]  # one token per character


def test_corpus_is_deterministic_and_split_by_subtree(tok):
    a, b = CodeCorpus(STDLIB, tok, 0.2), CodeCorpus(STDLIB, tok, 0.2)
    assert a.subtrees == b.subtrees and (a.train_subtrees, a.eval_subtrees) == (
        b.train_subtrees, b.eval_subtrees)
    files = {k: {p for p, _ in v} for k, v in a.subtrees.items()}
    train = set().union(*(files[k] for k in a.train_subtrees))
    held = set().union(*(files[k] for k in a.eval_subtrees))
    assert train and held and not train & held
    assert train | held == set().union(*files.values())
    chars = {k: sum(len(t) for _, t in v) for k, v in a.subtrees.items()}
    held_chars = sum(chars[k] for k in a.eval_subtrees)
    assert abs(held_chars - 0.2 * sum(chars.values())) <= max(chars.values()) / 2
    assert all(v.startswith("python ") for v in a.versions.values())

    da, db = a.documents(1024, 4096), b.documents(1024, 4096)
    assert len(da) == len(db) > 100 and all(torch.equal(x.ids, y.ids) for x, y in zip(da, db))
    assert all(1024 <= len(d) <= 4096 for d in da)
    ra, rb = a.eval_rows(2048, 8, 256), b.eval_rows(2048, 8, 256)
    assert len(ra) == 8 and all(torch.equal(x[k], y[k]) for x, y in zip(ra, rb) for k in x)
    header = re.compile(r"# file: (\S+)/[^/\s]+\.py\n")
    for d in da:  # every file header in a document names a train subtree, and vice versa
        assert set(header.findall(tok.decode(d.ids[1:].tolist()))) <= set(a.train_subtrees)
    for r in ra:
        assert r["input_ids"].shape == r["recall_mask"].shape == (2048,)
        assert set(header.findall(tok.decode(r["input_ids"][1:].tolist()))) <= set(
            a.eval_subtrees)


def test_cut_points_by_hand():
    assert cut_points([3, 10, 12, 30], min_body=4, max_body=6) == [
        (0, 6), (6, 10), (10, 16), (16, 22), (22, 28)]  # tail 28-30 < 4 dropped
    assert cut_points([3, 10, 12, 30], min_body=1, max_body=100) == [
        (0, 3), (3, 10), (10, 12), (12, 30)]  # one per file


def test_identifier_spans_and_recall_mask_by_hand():
    text = "def foo(x):\n    return foo_bar + x1 + 0x1f  # foo\n"
    first, end, names = identifier_spans(text, np.arange(len(text)))  # one token per character
    assert names == ["foo", "x", "foo_bar", "x1", "foo"]  # no keywords, nothing inside 0x1f
    assert first.tolist() == [4, 8, 23, 33, 46] and end.tolist() == [7, 9, 30, 35, 49]
    # Two characters per token: spans in tokens.
    first, end, _ = identifier_spans(text, np.arange(0, len(text), 2))
    assert first.tolist() == [2, 4, 11, 16, 23] and end.tolist() == [4, 5, 15, 18, 25]

    # A: tokens 0-2 and 26-28 (26 back: marked after its first token), B: 6-8, 30-32 (24
    # back: marked), 35-37 (5 back: not), C: one-token identifier at 40 and 60 (20 back: its
    # only token marked), D: seen once.
    starts, ends, names = [0, 6, 26, 30, 35, 40, 45, 60], [3, 9, 29, 33, 38, 41, 47, 61], \
        [0, 1, 0, 1, 1, 2, 3, 2]
    mask = recall_mask(starts, ends, names, 64, distance=10)
    assert mask.nonzero().flatten().tolist() == [27, 28, 31, 32, 60]
    assert recall_mask(starts, ends, names, 64, distance=20).nonzero().flatten().tolist() == [
        27, 28, 31, 32]  # exactly 20 back is not more than 20


def test_eval_rows_recall_mask_equals_brute_force(tok, fakepkg):
    """The whole held-out stream as one row: the mask equals a direct scan of its text."""
    (fakepkg / "sub" / "c.py").write_text("beta = 1\n" + "# pad\n" * 8 + "gamma = beta\nbeta\n")
    corpus = CodeCorpus(["fakepkg"], tok, eval_fraction=0.01)
    text = "".join(t for k in corpus.eval_subtrees for _, t in corpus.subtrees[k])
    (row,) = corpus.eval_rows(len(text) + 1, samples=4, distance=30)
    assert tok.decode(row["input_ids"][1:].tolist()) == text
    want, last = torch.zeros(len(text) + 1, dtype=torch.bool), {}
    for m in re.finditer(r"\b[A-Za-z_]\w*", text, re.ASCII):
        if keyword.iskeyword(m[0]):
            continue
        if m[0] in last and m.start() - last[m[0]] > 30:
            # row position = character + 1 (bos); all but the first character (one: itself)
            want[m.start() + 1 + (len(m[0]) > 1):m.end() + 1] = True
        last[m[0]] = m.start()
    assert want.any() and torch.equal(row["recall_mask"], want)


def test_token_loss_stats_by_hand():
    """Two packed documents (positions restart), one unscored target, buckets [0,2) [2,4)
    [4,8), recall targets at 3 positions; and the sums of two sequence shards add up."""
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    targets = torch.tensor([[5, 5, IGNORE, 5, 5, 5, 5, IGNORE]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    recall = torch.tensor([[False, True, True, False, False, True, True, False]])
    edges = position_buckets(2, 5)
    assert edges == [0, 2, 4, 8]
    got = token_loss_stats(losses, targets, positions, recall, edges)
    # scored: 1 2 4 5 6 7 (positions 0 1 0 1 2 3); recall scored: 2 (pos 1), 6, 7
    assert got.tolist() == [25, 6, 15, 3, 12, 4, 13, 2, 0, 0]
    halves = sum(token_loss_stats(losses[:, s:s + 4], targets[:, s:s + 4],
                                  positions[:, s:s + 4], recall[:, s:s + 4], edges)
                 for s in (0, 4))
    assert torch.equal(halves, got)
    assert token_loss_stats(losses, targets, positions, None, edges)[2:4].tolist() == [0, 0]
    m = lm_metrics({512: got, 1024: got}, edges, recall=True)
    assert m["eval/loss/len_00512"] == pytest.approx(25 / 6)
    assert m["eval/recall_loss/len_01024"] == 5.0 and m["eval/recall_tokens/len_00512"] == 3
    assert m["eval/loss_by_pos/00000-00001"] == 3.0 and m["eval/loss_by_pos/00002-00003"] == 6.5
    assert "eval/loss_by_pos/00004-00007" not in m  # no tokens there
    with pytest.raises(ValueError, match="data.loss_bucket_tokens must be a power of two"):
        position_buckets(1000, 4096)


def test_recall_targets_shift_before_sharding():
    rows = [{"input_ids": torch.arange(8), "labels": torch.arange(8),
             "recall_mask": torch.tensor([0, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool)}] * 2
    batch = collate(rows)
    assert batch["shift_recall_mask"][0].tolist() == [0, 1, 1, 0, 0, 0, 1, 0]
    shards = [SequenceParallel(2, 2, rank, 2).shard(batch) for rank in (0, 1)]
    for key in ("shift_recall_mask", "recall_mask", "position_ids"):
        assert torch.equal(torch.cat([s[key] for s in shards], 1), batch[key])


def test_data_code_padded_and_packed_rows(tok):
    cfg = DataConfig(name="code", packages=STDLIB, seq_len=1024, min_len=256, eval_fraction=0.2,
                     eval_samples=4, recall_distance=256)
    padded = build_train_dataset(cfg, tok, seed=0)
    assert cfg.package_versions == {p: f"python {__import__('platform').python_version()}"
                                    for p in STDLIB}
    lengths = [int(padded[i]["length"]) for i in range(len(padded))]
    assert min(lengths) >= 256 and max(lengths) == 1024
    packed = build_train_dataset(DataConfig(name="code", packages=STDLIB, seq_len=1024,
                                            min_len=256, eval_fraction=0.2, packing=True),
                                 tok, seed=0, block_size=64)
    docs = sum(int((packed[i]["doc_starts"] < 1024).sum()) for i in range(len(packed)))
    assert docs == len(padded) and len(packed) < len(padded)
    ev = build_eval_dataset(cfg, tok, 0, seq_len=2048)
    assert len(ev) == 4 and all(r["input_ids"].shape == (2048,) for r in ev)
    assert sum(int(r["recall_mask"].sum()) for r in ev) > 0
    corpus = CodeCorpus(STDLIB, tok, 0.2)  # without min_len: one document per source file
    assert document_lengths(STDLIB, max_len=10**7, eval_fraction=0.2) == [
        len(text) + 1 for k in corpus.train_subtrees for _, text in corpus.subtrees[k]]


@pytest.mark.parametrize("overrides,match", [
    (dict(packages=["no_such_package_xyz"]), r"data.packages: 'no_such_package_xyz' is not "
                                             r"installed"),
    (dict(packages=["argparse"]), r"'argparse' is a single module"),
    (dict(packages=["json", "json"]), r"json comes twice"),
    (dict(packages=["json"]), r"give 1 subtree\(s\) \(json\); a held-out split by subtree "
                              r"needs at least 2"),
    (dict(packages=[]), r"data.packages is empty"),
    (dict(eval_fraction=1.5), r"data.eval_fraction must be in \(0, 1\)"),
    (dict(min_len=600, max_len=500), r"data.min_len=600 must be in \[2, data.max_len=500\]"),
    (dict(max_len=4096), r"data.max_len=4096 must be in \[2, data.seq_len=1024\]"),
    (dict(min_len=10**6, seq_len=10**6), r"no training document: every train subtree is "
                                         r"shorter than data.min_len"),
    (dict(package_versions={"json": "python 0.1", "email": "python 0.1"}),
     r"data.package_versions=.* but this machine has"),
])
def test_data_code_errors_name_the_key(tok, overrides, match):
    cfg = DataConfig(**{"name": "code", "packages": ["json", "email"], "seq_len": 1024,
                        "eval_fraction": 0.2, **overrides})
    with pytest.raises(ValueError, match=match):
        build_train_dataset(cfg, tok, 0)


def test_empty_package_and_too_long_eval(tok, fakepkg):
    (fakepkg.parent / "emptypkg").mkdir()
    (fakepkg.parent / "emptypkg" / "__init__.py").write_text("\n")
    importlib.invalidate_caches()
    with pytest.raises(ValueError, match="'emptypkg' holds no non-empty .py file"):
        CodeCorpus(["emptypkg", "fakepkg"], tok, 0.5)
    cfg = DataConfig(name="code", packages=["fakepkg"], seq_len=64, eval_fraction=0.5,
                     eval_samples=2)
    with pytest.raises(ValueError, match=r"eval length 4096 .* longer than the held-out split"):
        build_eval_dataset(cfg, tok, 0, seq_len=4096)


def test_split_by_hash_order_towards_the_held_out_share():
    """In hash order a subtree is held out if at least half of it fits under the target; one
    always trains; the first one is held out when none fits."""
    order = sorted("abcde", key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    assert order == ["d", "c", "b", "e", "a"]
    sizes = {"d": 100, "c": 10, "b": 30, "e": 20, "a": 40}  # 200 characters
    assert split_subtrees(sizes, 0.2) == (["a", "d", "e"], ["c", "b"])  # d: 50 > 40; 10 + 30
    assert split_subtrees(sizes, 0.3) == (["a", "b", "c", "e"], ["d"])  # 50 <= 60, then full
    assert split_subtrees(sizes, 0.01) == (["a", "b", "c", "e"], ["d"])  # none fits: the first
    assert split_subtrees(sizes, 0.99) == (["a"], ["d", "c", "b", "e"])  # one always trains


def test_tiny_job_on_code(tmp_path):
    """The tiny job on data=code: held-out loss by position and long-range recall in W&B, the
    packages' versions in the W&B config."""
    out = tmp_path / "out"
    check(run_job(["data=code", *TINY, "trainer.max_steps=3", "data.recall_distance=64",
                   "data.loss_bucket_tokens=64", f"trainer.output_dir={out}",
                   "logging.wandb.mode=offline"], tmp_path))
    (run,) = run_dirs(out)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert final["step"] == 3 and "eval/retrieval_acc" not in final
    assert {"eval/loss_by_pos/00000-00063", "eval/loss_by_pos/00064-00127",
            "eval/loss_by_pos/00128-00255", "eval/recall_loss/len_00256",
            "eval/recall_loss"} <= wandb_history_keys(tmp_path)
    assert final["eval/recall_tokens/len_00256"] > 0 and final["eval/loss"] < rows[0]["eval/loss"]
    versions = wandb_config(tmp_path)["data"]["package_versions"]
    assert set(versions) == set(DEFAULT_PACKAGES) and versions["json"].startswith("python 3.")


@pytest.mark.slow
def test_sequence_parallel_eval_equals_one_rank(tmp_path):
    """Held-out loss by position and long-range recall at SP=2 (each rank scores half of every
    row) equal the single-rank values."""
    args = ["data=code", f"data.packages=[{','.join(STDLIB)}]", "data.eval_fraction=0.2",
            *TINY, "data.eval_samples=6", "data.recall_distance=64", "data.loss_bucket_tokens=32",
            "attention.threshold=0.7", "deepspeed=zero1", "trainer.max_steps=1",
            "trainer.micro_batch_size=2", "trainer.export_hf=false", "trainer.save_final=false",
            "logging.wandb.mode=disabled"]
    check(run_job([*args, f"trainer.output_dir={tmp_path}/one"], tmp_path))
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", "29647", "--no_local_rank", "--module"]
    check(run_job([*args, f"trainer.output_dir={tmp_path}/two",
                   "trainer.sequence_parallel_size=2"], tmp_path, launcher=launcher, timeout=400))
    (one,), (two,) = run_dirs(tmp_path / "one"), run_dirs(tmp_path / "two")
    evals = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"eval/loss"' in line] for run in (one, two)]
    for ref, got in zip(*evals):  # before and after the step
        keys = {k for k in ref if k.startswith(("eval/loss_by_pos/", "eval/recall"))}
        assert len(keys) >= 6 and keys == {k for k in got if k.startswith(
            ("eval/loss_by_pos/", "eval/recall"))}
        for key in keys | {"eval/loss"}:
            assert got[key] == pytest.approx(ref[key], abs=1e-5), key
