"""Training/eval data: synthetic passkey retrieval, source code of installed packages
(``trainer/code_corpus.py``), local JSONL, local HF ``datasets`` dirs.

Items are dicts of LongTensors ``input_ids`` and ``labels`` of shape (seq_len,). Labels follow
the HF convention: aligned with ``input_ids`` (the model shifts), ``-100`` = no loss.
Passkey items also carry ``answer_mask`` (bool, seq_len): the answer digit positions in labels;
held-out code rows ``recall_mask`` (bool, seq_len): the long-range recall tokens.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch.utils.data import Dataset

from .code_corpus import DEFAULT_PACKAGES, load_corpus
from .packing import IGNORE, Document, PackedDataset, PackedStream


@dataclass
class DataConfig:
    """Structured config of the Hydra ``data`` group."""

    name: str = "passkey"  # passkey | code | jsonl | hf_disk
    seq_len: int = 2048
    path: Optional[str] = None  # jsonl file or HF datasets save_to_disk dir
    eval_seq_lens: List[int] = field(default_factory=list)  # eval lengths; [] -> [seq_len]
    eval_samples: int = 32  # eval items (passkey) or held-out rows (code) per length; 0: no eval
    num_keys: int = 1  # passkey: key/value lines hidden in the filler (multi-key retrieval)
    passkey_digits: int = 5
    answer_only_loss: bool = False  # passkey: loss on answer only (else also LM loss on filler)
    # passkey train items: length log-uniform in [min_len, seq_len]; code: a document ends at
    # the first file end at or after min_len tokens (null: one document per file)
    min_len: Optional[int] = None
    max_len: Optional[int] = None  # code: documents cut at this many tokens (null: seq_len)
    packing: bool = False  # several documents per row at block-aligned starts (trainer/packing.py)
    packages: List[str] = field(default_factory=lambda: list(DEFAULT_PACKAGES))  # code sources
    package_versions: Dict[str, str] = field(default_factory=dict)  # code: filled in at start-up
    eval_fraction: float = 0.1  # code: share of characters held out, by whole subtrees
    recall_distance: int = 4096  # code: eval/recall_loss scores identifiers last seen further back
    loss_bucket_tokens: int = 1024  # eval/loss_by_pos: first bucket [0, this), then doubling


# ---------------------------------------------------------------- passkey retrieval

NAMES = (
    "Anna Ben Carla David Emma Felix Greta Hugo Iris Jonas Kira Liam Mona Nils Olga Paul Quinn "
    "Rosa Sven Tara Umar Vera Walt Xena Yuri Zoe Alma Boris Cleo Dino Elsa Finn Gina Hans Ida "
    "Jack Lena Mark Nora Otto"
).split()
FIXED = ("The grass is green.", "The sky is blue.", "Here we go.", "There and back again.")


def _word(rng: random.Random) -> str:
    """A made-up pronounceable word, e.g. 'tomarel'."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou")
                   for _ in range(rng.randint(2, 3))) + rng.choice(("", "n", "l", "s"))


def _sentence(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(FIXED)
    return f"The {_word(rng)} is {_word(rng)}."


class PasskeyDataset(Dataset):
    """Filler text with ``num_keys`` "The pass key is <digits>." lines at random depths, ending
    with a question about one of them and its answer, exactly ``seq_len`` tokens:

        <bos> filler.. key line.. filler.. \\nWhat is the pass key? The pass key is <digits><eos>

    (with several keys: "pass key for <name>" in the key lines and the question).

    Item ``i`` depends only on (seed, split, i).
    """

    def __init__(self, tokenizer, seq_len: int, seed: int, *, num_keys: int = 1,
                 digits: int = 5, answer_only_loss: bool = False, length: int = 10**9,
                 split: str = "train", min_len: Optional[int] = None):
        if num_keys < 1 or num_keys > len(NAMES):
            raise ValueError(f"data.num_keys must be in 1..{len(NAMES)}, got {num_keys}")
        if digits < 1:
            raise ValueError(f"data.passkey_digits must be >= 1, got {digits}")
        self.tok, self.seq_len, self.seed, self.split = tokenizer, seq_len, seed, split
        self.num_keys, self.digits, self.answer_only_loss, self.length = (
            num_keys, digits, answer_only_loss, length)
        bos = tokenizer.bos_token_id
        self._bos = [] if bos is None else [bos]
        eos = tokenizer.eos_token_id
        self._eos = [] if eos is None else [eos]
        longest = max(NAMES, key=len)
        fixed = (len(self._bos) + len(self._eos) + len(self._ids(self._question(longest)))
                 + len(self._ids("9" * digits))
                 + num_keys * len(self._ids(self._key_line(longest, "9" * digits))))
        if seq_len < fixed + 32:
            raise ValueError(f"data.seq_len={seq_len} too short for {num_keys} passkey(s); "
                             f"need at least {fixed + 32}")
        if min_len is not None and not fixed + 32 <= min_len <= seq_len:
            raise ValueError(f"data.min_len={min_len} must be in [{fixed + 32}, "
                             f"data.seq_len={seq_len}] for {num_keys} passkey(s)")
        self.min_len = min_len
        self._pad_id = _pad_id(tokenizer) if min_len is not None else 0  # 0: never written

    def __len__(self) -> int:
        return self.length

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _subject(self, name: str) -> str:
        """"pass key" alone for one key (the classic passkey task), "pass key for <name>" for
        several, so the question says which one."""
        return "pass key" if self.num_keys == 1 else f"pass key for {name}"

    def _key_line(self, name: str, value: str) -> str:
        return f" The {self._subject(name)} is {value}. Remember it."

    def _question(self, name: str) -> str:
        # Ends like the key line, so the answer follows the same context.
        subject = self._subject(name)
        return f"\nWhat is the {subject}? The {subject} is "

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = random.Random(f"{self.split}:{self.seed}:{i}")
        size = self.seq_len
        if self.min_len is not None:  # log-uniform length, right-padded: short items learn first
            size = min(size, int(self.min_len * (self.seq_len / self.min_len) ** rng.random()))
        names = rng.sample(NAMES, self.num_keys)
        values = ["".join(rng.choice("0123456789") for _ in range(self.digits)) for _ in names]
        target = rng.randrange(self.num_keys)
        keys = [self._ids(self._key_line(n, v)) for n, v in zip(names, values)]
        question = self._ids(self._question(names[target]))
        answer = self._ids(values[target])
        budget = (size - len(self._bos) - len(question) - len(answer) - len(self._eos)
                  - sum(map(len, keys)))
        filler, bounds = self._filler(rng, budget)
        depths = sorted(rng.choice(bounds) for _ in keys)
        ids, prev = list(self._bos), 0
        for d, k in zip(depths, keys):
            ids += filler[prev:d] + k
            prev = d
        ids += filler[prev:] + question
        start = len(ids)
        ids += answer + self._eos
        labels = [IGNORE] * start + ids[start:] if self.answer_only_loss else ids
        item = _pad(ids, labels, self.seq_len, self._pad_id)  # right padding of a shorter item
        item["answer_mask"] = torch.zeros(self.seq_len, dtype=torch.bool)
        item["answer_mask"][start:start + len(answer)] = True
        return item

    def _filler(self, rng: random.Random, budget: int) -> tuple[list[int], list[int]]:
        """Exactly ``budget`` filler tokens from a small per-item pool of sentences of made-up
        words, plus the sentence boundaries (token offsets) where key lines may go. Repeated
        unknown words can only be predicted by looking back: the filler's LM loss trains the
        same in-context copying that retrieval needs."""
        pool = [self._ids(" " + _sentence(rng)) for _ in range(rng.randint(3, 8))]
        ids: list[int] = []
        bounds = [0]
        while len(ids) < budget:
            ids += rng.choice(pool)
            bounds.append(len(ids))
        return ids[:budget], [b for b in bounds if b <= budget]


# ---------------------------------------------------------------- user data


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append((lineno, rec))
    if not records:
        raise ValueError(f"{path}: empty dataset (no JSON lines)")
    return records


def _pad(ids: list[int], labels: list[int], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to ``seq_len``; ``length`` is the real token count (PBS ranks keys by the
    queries just before it instead of by padding)."""
    n = seq_len - len(ids)
    return {"input_ids": torch.tensor(ids + [pad_id] * n, dtype=torch.long),
            "labels": torch.tensor(labels + [IGNORE] * n, dtype=torch.long),
            "length": torch.tensor(len(ids), dtype=torch.long)}


class TokenChunks(Dataset):
    """Documents concatenated and cut into ``seq_len`` chunks (the padded layout of text: a
    chunk may hold the end of one document and the start of the next); the last partial chunk
    is padded (labels -100)."""

    def __init__(self, docs: list[Document], seq_len: int, pad_id: int):
        stream = torch.cat([d.ids for d in docs]).tolist()
        self.chunks = [stream[s:s + seq_len] for s in range(0, len(stream), seq_len)]
        self.seq_len, self.pad_id = seq_len, pad_id

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        c = self.chunks[i]
        return _pad(c, c, self.seq_len, self.pad_id)


class PaddedDocuments(Dataset):
    """One document per row, truncated to ``seq_len`` and right-padded (chat samples)."""

    def __init__(self, docs: list[Document], seq_len: int, pad_id: int):
        self.docs, self.seq_len, self.pad_id = docs, seq_len, pad_id

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d = self.docs[i]
        return _pad(d.ids[:self.seq_len].tolist(), d.labels[:self.seq_len].tolist(), self.seq_len,
                    self.pad_id)


def _doc_ids(tokenizer, texts: list[str]) -> list[Document]:
    """[bos] text [eos] per text, every token trained."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    docs = [torch.tensor(bos + x + eos, dtype=torch.long) for x in ids]
    return [Document(d, d) for d in docs]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return pad


def _check_messages(path: str, lineno: int, msgs) -> None:
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs)
    if not ok:
        raise ValueError(f"{path}:{lineno}: 'messages' must be a non-empty list of "
                         "{'role': str, 'content': str} objects")


def jsonl_documents(path: str, tokenizer) -> tuple[str, list[Document]]:
    """(format, documents) of a JSONL file: ``{"text": ...}`` lines ("text": every token
    trained) or ``{"messages": [...]}`` lines ("chat": loss on assistant tokens only). The first
    line decides the format; every line must then have that key."""
    records = _read_jsonl(path)
    key = "messages" if "messages" in records[0][1] else "text"
    for lineno, rec in records:
        if key not in rec:
            raise ValueError(f"{path}:{lineno}: missing key '{key}' (format set by line "
                             f"{records[0][0]})")
        if key == "text" and not isinstance(rec["text"], str):
            raise ValueError(f"{path}:{lineno}: 'text' must be a string, got "
                             f"{type(rec['text']).__name__}")
        if key == "messages":
            _check_messages(path, lineno, rec["messages"])
    if key == "text":
        return "text", _doc_ids(tokenizer, [r["text"] for _, r in records])
    if "{% generation %}" not in (tokenizer.chat_template or "").replace("{%- generation", "{% generation"):
        raise ValueError(f"{path}: chat data needs a tokenizer chat template with "
                         "{% generation %} markers (assistant-only loss)")
    docs = []
    for lineno, rec in records:
        try:
            out = tokenizer.apply_chat_template(rec["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        except Exception as e:  # template errors (e.g. unknown role) -> name the line
            raise ValueError(f"{path}:{lineno}: chat template failed: {e}") from e
        ids = torch.tensor(list(out["input_ids"]), dtype=torch.long)
        mask = torch.tensor(list(out["assistant_masks"]), dtype=torch.bool)
        docs.append(Document(ids, ids.masked_fill(~mask, IGNORE)))
    return "chat", docs


def hf_disk_documents(path: str, tokenizer) -> list[Document]:
    """The "text" column of a ``datasets.save_to_disk`` directory (split "train" if a
    DatasetDict), one document per row, every token trained."""
    try:
        import datasets
    except ImportError:
        raise ImportError("data.name=hf_disk needs the 'datasets' package: pip install datasets") from None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF datasets directory not found: {path}")
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: DatasetDict has no 'train' split (has {list(ds)})")
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise ValueError(f"{path}: no 'text' column (columns: {ds.column_names})")
    if len(ds) == 0:
        raise ValueError(f"{path}: empty dataset")
    return _doc_ids(tokenizer, list(ds["text"]))


# ---------------------------------------------------------------- public interface


def build_train_dataset(cfg: DataConfig, tokenizer, seed: int, block_size: int = 64) -> Dataset:
    """Training rows selected by ``cfg.name``; deterministic (row i depends on seed and i).

    Padded (default): passkey items, code documents and chat samples one per row, right-padded;
    text documents concatenated and chunked. ``cfg.packing``: documents first-fit packed at
    multiples of ``block_size`` (trainer/packing.py)."""
    if cfg.name == "passkey":
        items = PasskeyDataset(tokenizer, cfg.seq_len, seed, num_keys=cfg.num_keys,
                               digits=cfg.passkey_digits, answer_only_loss=cfg.answer_only_loss,
                               min_len=cfg.min_len)
        if not cfg.packing:
            return items
        per_row = 2 * math.ceil(cfg.seq_len / (cfg.min_len or cfg.seq_len)) + 1
        return PackedStream(items, cfg.seq_len, block_size, _pad_id(tokenizer), per_row)
    pad = _pad_id(tokenizer)
    if cfg.name == "code":
        docs = code_corpus_of(cfg, tokenizer).documents(cfg.min_len, cfg.max_len or cfg.seq_len)
        if cfg.packing:
            return PackedDataset(docs, cfg.seq_len, block_size, pad, seed)
        return PaddedDocuments(docs, cfg.seq_len, pad)
    if cfg.name not in ("jsonl", "hf_disk"):
        raise ValueError(f"unknown data.name={cfg.name!r} (expected passkey, code, jsonl or "
                         "hf_disk)")
    if not cfg.path:
        raise ValueError(f"data.name={cfg.name} needs data.path")
    kind, docs = (jsonl_documents(cfg.path, tokenizer) if cfg.name == "jsonl"
                  else ("text", hf_disk_documents(cfg.path, tokenizer)))
    if cfg.packing:
        return PackedDataset(docs, cfg.seq_len, block_size, pad, seed)
    return TokenChunks(docs, cfg.seq_len, pad) if kind == "text" else PaddedDocuments(
        docs, cfg.seq_len, pad)


def code_corpus_of(cfg: DataConfig, tokenizer):
    """The ``data=code`` corpus after checking its keys; records the packages' versions in
    ``cfg.package_versions`` (the run's W&B config), or checks them against versions given there."""
    max_len = cfg.max_len or cfg.seq_len
    if cfg.min_len is not None and not 2 <= cfg.min_len <= max_len:
        raise ValueError(f"data.min_len={cfg.min_len} must be in [2, data.max_len={max_len}]")
    if not 2 <= max_len <= cfg.seq_len:
        raise ValueError(f"data.max_len={max_len} must be in [2, data.seq_len={cfg.seq_len}]")
    if cfg.recall_distance < 1:
        raise ValueError(f"data.recall_distance must be >= 1, got {cfg.recall_distance}")
    corpus = load_corpus(tuple(cfg.packages), tokenizer, cfg.eval_fraction)
    given = dict(cfg.package_versions)
    if given and given != corpus.versions:
        raise ValueError(f"data.package_versions={given} but this machine has {corpus.versions}")
    cfg.package_versions = corpus.versions
    return corpus


def build_eval_dataset(cfg: DataConfig, tokenizer, seed: int, seq_len: int) -> Optional[Dataset]:
    """Eval set at ``seq_len``: ``cfg.eval_samples`` held-out rows for ``data=code``, else
    passkey retrieval items (for every other ``data.name``: it measures long-context retrieval);
    None when eval_samples is 0."""
    if cfg.eval_samples <= 0:
        return None
    if cfg.name == "code":
        return code_corpus_of(cfg, tokenizer).eval_rows(seq_len, cfg.eval_samples,
                                                     cfg.recall_distance)
    return PasskeyDataset(tokenizer, seq_len, seed, num_keys=cfg.num_keys,
                          digits=cfg.passkey_digits, answer_only_loss=cfg.answer_only_loss,
                          length=cfg.eval_samples, split="eval")


def answer_logit_positions(batch: dict) -> torch.Tensor:
    """(B, K) positions whose logits predict the K answer tokens (answer position - 1).
    Gather hidden states there and apply the LM head to get light (B, K, V) logits."""
    mask = batch["answer_mask"]
    k = int(mask[0].sum())
    if not bool((mask.sum(1) == k).all()):
        raise ValueError("all samples in a batch must have the same number of answer tokens")
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return pos[mask].view(mask.shape[0], k) - 1


def retrieval_accuracy(logits: torch.Tensor, batch: dict) -> tuple[int, int]:
    """(correct, total) samples whose answer tokens are all predicted exactly by argmax.

    ``logits`` is either full (B, seq_len, V) or only at ``answer_logit_positions(batch)``
    (B, K, V). Teacher-forced, equal to greedy decoding of the answer.
    """
    pos = answer_logit_positions(batch)
    targets = batch["labels"].gather(1, pos + 1)
    if logits.shape[1] == batch["labels"].shape[1]:
        logits = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    elif logits.shape[1] != pos.shape[1]:
        raise ValueError(f"logits length {logits.shape[1]} is neither seq_len "
                         f"{batch['labels'].shape[1]} nor the answer length {pos.shape[1]}")
    correct = (logits.argmax(-1) == targets.to(logits.device)).all(dim=1)
    return int(correct.sum()), int(correct.numel())
