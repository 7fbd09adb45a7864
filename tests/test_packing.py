"""Packing (trainer/packing.py): every token once, block-aligned documents, labels that never
cross documents, position ids that restart, deterministic rows; collation of packed rows."""

from __future__ import annotations

import json
import random

import pytest
import torch

from trainer.batching import BatchSampler, collate, context_length, real_tokens
from trainer.data import DataConfig, build_train_dataset
from trainer.packing import IGNORE, Document, PackedDataset, first_fit, pack_row
from trainer.tokenizer import build_tokenizer


def _docs(n: int, seed: int, longest: int) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = int(2 ** rng.uniform(1, longest.bit_length() - 1))
        ids = torch.arange(length) + 1000 * i  # token = document * 1000 + position
        docs.append(Document(ids, ids.clone()))
    return docs


def test_first_fit_puts_each_item_in_the_first_row_with_room():
    rows = first_fit([5, 7, 3, 4, 1, 6], capacity=10)
    assert rows == [[0, 2, 4], [1], [3, 5]]
    with pytest.raises(ValueError, match=r"in \[1, 10\]"):
        first_fit([11], 10)


@pytest.mark.parametrize("seq_len,block", [(256, 32), (512, 64)])
def test_packed_epoch_holds_every_token_once(seq_len, block):
    docs = _docs(60, seed=seq_len, longest=3 * seq_len)  # some longer than a row: split
    ds = PackedDataset(docs, seq_len, block, pad_id=-1, seed=0)
    seen = []
    for i in range(len(ds)):
        row = ds[i]
        starts, ends = row["doc_starts"], row["doc_ends"]
        assert (starts % block == 0).all() and starts[0] == 0
        assert (ends[:-1] <= starts[1:]).all() and (ends > starts).all() and ends[-1] <= seq_len
        real = torch.zeros(seq_len, dtype=torch.bool)
        for s, e in zip(starts.tolist(), ends.tolist()):
            real[s:e] = True
            assert torch.equal(row["position_ids"][s:e], torch.arange(e - s))
            assert row["labels"][s] == IGNORE  # never predicted from the previous document
            assert torch.equal(row["labels"][s + 1:e], row["input_ids"][s + 1:e])
            seen.append(row["input_ids"][s:e])
        assert (row["input_ids"][~real] == -1).all() and (row["labels"][~real] == IGNORE).all()
    seen = torch.cat(seen).sort().values
    assert torch.equal(seen, torch.cat([d.ids for d in docs]).sort().values)
    # Deterministic: the same rows again (resume rebuilds them), another seed another order.
    again = PackedDataset(docs, seq_len, block, pad_id=-1, seed=0)
    assert all(torch.equal(ds[i]["input_ids"], again[i]["input_ids"]) for i in range(len(ds)))
    other = PackedDataset(docs, seq_len, block, pad_id=-1, seed=1)
    assert not torch.equal(ds[0]["input_ids"], other[0]["input_ids"])


def test_labels_never_cross_documents_after_collation():
    docs = [Document(torch.arange(1, 40), torch.arange(1, 40)),
            Document(torch.arange(50, 70), torch.arange(50, 70))]
    row = pack_row(docs, 128, 32, pad_id=0)
    short = pack_row(docs[:1], 128, 32, pad_id=0)
    batch = collate([row, short])
    assert batch["doc_starts"].tolist() == [[0, 64], [0, 128]]  # unused slot: N
    assert batch["doc_ends"].tolist() == [[39, 84], [39, 128]]
    shift = batch["shift_labels"][0]
    assert shift[38] == IGNORE and (shift[39:64] == IGNORE).all()  # end of doc 0, its pads
    assert shift[64] == 51 and shift[83] == IGNORE and shift[127] == IGNORE
    assert batch["position_ids"][0, 64] == 0 and batch["position_ids"][0, 63] == 63
    assert batch["position_ids"][0, 127] == 127 - 64  # trailing padding runs on
    assert real_tokens(batch) == 39 + 20 + 39
    assert context_length(batch) == pytest.approx((39**2 * 2 + 20**2) / 98)


def test_documents_that_do_not_fit_are_an_error():
    docs = [Document(torch.arange(100), torch.arange(100))] * 2
    with pytest.raises(ValueError, match="do not fit a row of 128"):
        pack_row(docs, 128, 32, pad_id=0)
    with pytest.raises(ValueError, match="multiple of attention.block_size"):
        PackedDataset(docs, 100, 32, pad_id=0, seed=0)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_packed_passkey_rows_are_deterministic_documents(tok):
    cfg = DataConfig(seq_len=512, min_len=110, passkey_digits=1, answer_only_loss=True,
                     packing=True)
    ds = build_train_dataset(cfg, tok, seed=0, block_size=64)
    rows = [ds[i] for i in range(8)]
    assert all(torch.equal(r["input_ids"], ds[i]["input_ids"]) for i, r in enumerate(rows))
    docs = [len(r["doc_starts"]) for r in rows]
    assert max(docs) >= 2  # short items share rows
    batch = collate(rows)
    assert real_tokens(batch) / batch["input_ids"].numel() > 0.5
    for r in rows:  # each document is one passkey item: the question's answer at its end
        for s, e in zip(r["doc_starts"].tolist(), r["doc_ends"].tolist()):
            assert r["input_ids"][s] == tok.bos_token_id and r["input_ids"][e - 1] == tok.eos_token_id
            labelled = (r["labels"][s:e] != IGNORE).nonzero().flatten()
            assert len(labelled) == 2 and labelled[-1] == e - s - 1  # digit and eos


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_jsonl_packing(tmp_path, tok, kind):
    path = tmp_path / "d.jsonl"
    rng = random.Random(0)
    lines = []
    for i in range(30):
        words = " ".join(f"w{i}x{j}" for j in range(rng.randint(1, 25)))
        lines.append({"text": words} if kind == "text" else
                     {"messages": [{"role": "user", "content": words},
                                   {"role": "assistant", "content": f"ok {i}"}]})
    path.write_text("\n".join(json.dumps(x) for x in lines))
    cfg = DataConfig(name="jsonl", path=str(path), seq_len=256, packing=True)
    ds = build_train_dataset(cfg, tok, seed=0, block_size=32)
    padded = build_train_dataset(DataConfig(name="jsonl", path=str(path), seq_len=256), tok, 0)
    total = sum(real_tokens(collate([ds[i]])) for i in range(len(ds)))
    if kind == "text":
        assert total == sum(int(padded[i]["length"]) for i in range(len(padded)))
    else:  # chat: the same assistant tokens are trained, one sample per document
        want = sum(int((padded[i]["labels"] != IGNORE).sum()) for i in range(len(padded)))
        got = sum(int((ds[i]["labels"] != IGNORE).sum()) for i in range(len(ds)))
        assert got == want and len(ds) < len(padded)
    sampler = BatchSampler(ds, seed=0, micro_bs=2, grad_accum=1, world=1, rank=0)
    assert torch.equal(sampler.batch(3, 0)["input_ids"], BatchSampler(
        ds, seed=0, micro_bs=2, grad_accum=1, world=1, rank=0).batch(3, 0)["input_ids"])


@pytest.mark.parametrize("attn", [
    {"impl": "sdpa"},
    {"impl": "pbs", "threshold": 0.5},
    {"impl": "pbs", "threshold": 0.5, "dense_layers": [0]},  # dense layer on packed rows
])
def test_packed_documents_see_only_themselves_in_the_model(attn):
    """A packed row through a tiny Llama: every document's hidden states equal those of the
    document run alone (RoPE from the restarting position_ids; SDPA: the block-diagonal mask
    transformers builds from them; PBS: the documents given to the plan)."""
    from trainer.attention import AttentionConfig, install_attention
    from trainer.batching import attention_kwargs
    from trainer.model import CausalLMWithChunkedLoss, ModelConfig, architecture_config, build_model

    mcfg = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16)
    acfg = AttentionConfig(block_size=32, segment_size=64, backend="torch", **attn)
    torch.manual_seed(0)
    lm = build_model(mcfg, acfg, architecture_config(mcfg, 50, 256))
    install_attention(lm, acfg)
    model = CausalLMWithChunkedLoss(lm, 1024).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 50, (n,), generator=g) for n in (90, 30, 50)]  # + trailing pad
    batch = collate([pack_row([Document(d, d) for d in docs], 256, 32, pad_id=0)])
    with torch.no_grad():
        packed = model.hidden_states(batch["input_ids"], batch["position_ids"],
                                     **attention_kwargs(batch))
        for d, s in zip(docs, batch["doc_starts"][0].tolist()):
            padded = torch.nn.functional.pad(d, (0, -len(d) % 32))  # as in the row: pad id 0
            alone = model.hidden_states(padded[None], torch.arange(len(padded))[None],
                                        pbs_query_end=torch.tensor([len(d)]))
            torch.testing.assert_close(packed[0, s:s + len(d)], alone[0, :len(d)], atol=2e-5,
                                       rtol=1e-4)
        mixed = model.hidden_states(batch["input_ids"])  # one sequence: documents see each other
        assert not torch.allclose(mixed[0, 96:126], packed[0, 96:126], atol=1e-3)
