"""Tests for trainer.tokenizer and trainer.data (fast, CPU)."""

import json

import pytest
import torch

from trainer.data import (IGNORE, DataConfig, answer_logit_positions, build_eval_dataset,
                          build_train_dataset, retrieval_accuracy)
from trainer.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _jsonl(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(p)


def test_tokenizer_char_level_and_round_trip(tok, tmp_path):
    assert 90 <= len(tok) <= 110
    text = "The pass key is 48213.\nRemember it! ~{}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    tok2 = build_tokenizer(str(tmp_path))
    assert len(tok2) == len(tok) and tok2(text)["input_ids"] == tok(text)["input_ids"]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    a = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    b = tok2.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    assert a["input_ids"] == b["input_ids"] and a["assistant_masks"] == b["assistant_masks"]


def test_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_tokenizer(str(tmp_path / "nope"))


def test_chat_template_assistant_mask(tok):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    out = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(kept) == "hello<eos>"


@pytest.mark.parametrize("num_keys", [1, 4])
def test_passkey_items(tok, num_keys):
    cfg = DataConfig(seq_len=512, num_keys=num_keys)
    ds = build_train_dataset(cfg, tok, seed=3)
    a, b = ds[7], ds[8]
    for item in (a, b):
        assert all(item[k].shape == (512,) for k in ("input_ids", "labels", "answer_mask"))
        assert int(item["length"]) == 512  # no min_len: full-length items
        answer = tok.decode(item["labels"][item["answer_mask"]].tolist())
        assert len(answer) == cfg.passkey_digits and answer.isdigit()
        text = tok.decode(item["input_ids"].tolist())
        if num_keys == 1:  # the classic passkey task
            assert text.count("The pass key is ") == 2
            assert f"The pass key is {answer}. Remember it." in text
            assert text.endswith(f"\nWhat is the pass key? The pass key is {answer}<eos>")
        else:  # the question names which key
            assert text.count("The pass key for ") == num_keys + 1
            name = text.rsplit("What is the pass key for ", 1)[1].split("?")[0]
            assert f"The pass key for {name} is {answer}." in text
            assert text.endswith(f"? The pass key for {name} is {answer}<eos>")
    assert torch.equal(a["input_ids"], build_train_dataset(cfg, tok, seed=3)[7]["input_ids"])
    assert not torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], build_train_dataset(cfg, tok, seed=4)[7]["input_ids"])


def test_passkey_min_len_mixes_lengths(tok):
    cfg = DataConfig(seq_len=1024, min_len=160, passkey_digits=1, answer_only_loss=True)
    ds = build_train_dataset(cfg, tok, seed=0)
    sizes = []
    for i in range(64):
        item = ds[i]
        assert item["input_ids"].shape == (1024,)
        real = item["input_ids"] != tok.pad_token_id
        size = int(real.sum())
        assert real[:size].all() and (item["labels"][size:] == IGNORE).all()  # right padding
        assert int(item["length"]) == size
        assert tok.decode(item["input_ids"][:size].tolist()).endswith("<eos>")
        assert tok.decode(item["labels"][item["answer_mask"]].tolist()).isdigit()
        sizes.append(size)
    assert 160 <= min(sizes) < 400 and max(sizes) > 700  # log-uniform over [160, 1024]
    ev = build_eval_dataset(cfg, tok, 0, seq_len=1024)
    assert (ev[0]["input_ids"] != tok.pad_token_id).all()  # eval items keep the full length
    assert int(ev[0]["length"]) == 1024
    with pytest.raises(ValueError, match="data.min_len"):
        build_train_dataset(DataConfig(seq_len=1024, min_len=2048), tok, 0)


def test_passkey_labels_and_eval(tok):
    cfg = DataConfig(seq_len=400, answer_only_loss=True, eval_samples=5)
    item = build_train_dataset(cfg, tok, 0)[0]
    kept = item["labels"] != IGNORE
    assert tok.decode(item["labels"][kept].tolist())[-6:-5].isdigit()
    assert int(kept.sum()) == cfg.passkey_digits + 1  # digits + eos
    ev = build_eval_dataset(cfg, tok, 0, seq_len=300)
    assert len(ev) == 5 and ev[0]["input_ids"].shape == (300,)
    assert build_eval_dataset(DataConfig(eval_samples=0), tok, 0, 300) is None
    with pytest.raises(ValueError, match="too short"):
        build_train_dataset(DataConfig(seq_len=50), tok, 0)


def test_retrieval_accuracy(tok):
    ds = build_eval_dataset(DataConfig(seq_len=200, eval_samples=3), tok, 0, 200)
    batch = {k: torch.stack([ds[i][k] for i in range(3)]) for k in ds[0]}
    v = len(tok)
    logits = torch.zeros(3, 200, v)
    logits[:, :-1].scatter_(2, batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1), 1.0)  # perfect
    assert retrieval_accuracy(logits, batch) == (3, 3)
    pos = answer_logit_positions(batch)
    logits[1, pos[1, -1]] = 0  # break the last digit of sample 1 -> argmax token 0
    assert retrieval_accuracy(logits, batch) == (2, 3)
    light = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, v))
    assert retrieval_accuracy(light, batch) == (2, 3)


def test_jsonl_text_chunking(tok, tmp_path):
    path = _jsonl(tmp_path, [{"text": "a" * 10}, "", {"text": "b" * 15}])
    ds = build_train_dataset(DataConfig(name="jsonl", path=path, seq_len=8), tok, 0)
    stream = "<bos>" + "a" * 10 + "<eos><bos>" + "b" * 15 + "<eos>"  # 29 tokens -> 4 chunks
    assert len(ds) == 4
    ids = torch.cat([ds[i]["input_ids"] for i in range(4)])
    labels = torch.cat([ds[i]["labels"] for i in range(4)])
    assert tok.decode(ids[:29].tolist()) == stream
    assert torch.equal(labels[:29], ids[:29]) and (labels[29:] == IGNORE).all()
    assert (ids[29:] == tok.pad_token_id).all()


def test_jsonl_chat_masking(tok, tmp_path):
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    path = _jsonl(tmp_path, [{"messages": msgs}])
    item = build_train_dataset(DataConfig(name="jsonl", path=path, seq_len=80), tok, 0)[0]
    kept = item["labels"][item["labels"] != IGNORE].tolist()
    assert tok.decode(kept) == "4<eos>6<eos>"
    assert item["input_ids"].shape == (80,)
    short = build_train_dataset(DataConfig(name="jsonl", path=path, seq_len=20), tok, 0)[0]
    assert short["input_ids"].shape == (20,)


@pytest.mark.parametrize("lines,match", [
    ([{"text": "ok"}, "{bad json"], r"d\.jsonl:2: invalid JSON"),
    ([{"text": "ok"}, "", {"txt": "x"}], r"d\.jsonl:3: missing key 'text'"),
    ([{"text": 5}], r"d\.jsonl:1: 'text' must be a string"),
    ([{"messages": [{"role": "user"}]}], r"d\.jsonl:1: 'messages' must be"),
    ([[1, 2]], r"d\.jsonl:1: expected a JSON object"),
    (["", "  "], r"d\.jsonl: empty dataset"),
])
def test_jsonl_errors(tok, tmp_path, lines, match):
    path = _jsonl(tmp_path, lines)
    with pytest.raises(ValueError, match=match):
        build_train_dataset(DataConfig(name="jsonl", path=path, seq_len=16), tok, 0)


def test_missing_file_and_bad_name(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        build_train_dataset(DataConfig(name="jsonl", path=str(tmp_path / "missing.jsonl")), tok, 0)
    with pytest.raises(ValueError, match="needs data.path"):
        build_train_dataset(DataConfig(name="jsonl"), tok, 0)
    with pytest.raises(ValueError, match="unknown data.name"):
        build_train_dataset(DataConfig(name="csv"), tok, 0)
