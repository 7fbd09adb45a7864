"""Packing (``data.packing=true``): several documents per row, each starting at a block boundary.

Layout (``../shared/design/packing.md``, the contract ``kernels.pbs_plan`` takes): documents one
after another, each starting at a multiple of the attention block size; after a document's last
real token, pads (label -100) fill its last block. ``position_ids`` restart at 0 at every
document and run on through its pads (and, after the last document, through the row's trailing
padding, so that transformers' packed-sequence mask never makes a pad a document of its own).
The label of each document's first token is -100, so no token is trained to predict the next
document. A document longer than a row is cut into row-sized pieces that are packed as
documents of their own (positions restart in each piece; attention never crosses pieces).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

IGNORE = -100


@dataclass
class Document:
    """One tokenized document: ``labels`` aligned with ``ids`` (-100 = no loss)."""

    ids: torch.Tensor  # int64 (L,)
    labels: torch.Tensor  # int64 (L,)

    def __len__(self) -> int:
        return self.ids.shape[0]


def split_long(docs: Sequence[Document], seq_len: int) -> list[Document]:
    """Documents longer than ``seq_len`` cut into consecutive pieces of ``seq_len`` tokens (the
    last one shorter); empty documents dropped."""
    pieces = []
    for doc in docs:
        for s in range(0, len(doc), seq_len):
            pieces.append(Document(doc.ids[s:s + seq_len], doc.labels[s:s + seq_len]))
    return pieces


def first_fit(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit bin packing in the given order: item i goes into the first row with room for it
    (a new row if none). A max-tree over the rows' free space finds that row in O(log n)."""
    if any(not 0 < s <= capacity for s in sizes):
        raise ValueError(f"every size must be in [1, {capacity}]")
    leaves = 1 << max(1, (len(sizes) - 1).bit_length())
    free = [capacity] * (2 * leaves)  # node -> most free space of a row below it
    rows: list[list[int]] = []
    for i, size in enumerate(sizes):
        node = 1
        while node < leaves:
            node = 2 * node if free[2 * node] >= size else 2 * node + 1
        row = node - leaves
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        free[node] -= size
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return rows


def padded_length(n: int, block_size: int) -> int:
    return math.ceil(n / block_size) * block_size


def pack_row(docs: Sequence[Document], seq_len: int, block_size: int,
             pad_id: int) -> dict[str, torch.Tensor]:
    """One packed row: ``input_ids``, ``labels``, ``position_ids`` (seq_len,) and the documents'
    ``doc_starts`` / ``doc_ends`` (real ends), int64 (len(docs),)."""
    ids = torch.full((seq_len,), pad_id, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE, dtype=torch.long)
    pos = torch.empty(seq_len, dtype=torch.long)
    starts, ends, cursor, last = [], [], 0, 0
    for doc in docs:
        n, span = len(doc), padded_length(len(doc), block_size)
        if cursor + span > seq_len:
            raise ValueError(f"documents of {sum(len(d) for d in docs)} tokens do not fit a row "
                             f"of {seq_len} at block-aligned starts")
        ids[cursor:cursor + n] = doc.ids
        labels[cursor + 1:cursor + n] = doc.labels[1:]  # the first token predicts nothing back
        pos[cursor:cursor + span] = torch.arange(span)
        starts.append(cursor)
        ends.append(cursor + n)
        cursor, last = cursor + span, span
    pos[cursor:] = torch.arange(last, last + seq_len - cursor)  # trailing padding
    return {"input_ids": ids, "labels": labels, "position_ids": pos,
            "doc_starts": torch.tensor(starts, dtype=torch.long),
            "doc_ends": torch.tensor(ends, dtype=torch.long)}


class PackedDataset(Dataset):
    """A finite document set first-fit packed into rows of ``seq_len`` tokens, once, in a
    seeded order (deterministic: the same rows for the same documents, seed and sizes; every
    token of every document lands in exactly one row)."""

    def __init__(self, docs: Sequence[Document], seq_len: int, block_size: int, pad_id: int,
                 seed: int):
        if seq_len % block_size:
            raise ValueError(f"data.packing needs data.seq_len ({seq_len}) to be a multiple of "
                             f"attention.block_size ({block_size})")
        pieces = split_long(docs, seq_len)
        if not pieces:
            raise ValueError("nothing to pack: every document is empty")
        order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed))
        self.docs = [pieces[i] for i in order.tolist()]
        self.rows = first_fit([padded_length(len(d), block_size) for d in self.docs], seq_len)
        self.seq_len, self.block_size, self.pad_id = seq_len, block_size, pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return pack_row([self.docs[j] for j in self.rows[i]], self.seq_len, self.block_size,
                        self.pad_id)


class PackedStream(Dataset):
    """Rows packed from an endless source of generated documents (passkey items): row ``i``
    takes candidates ``i * per_row`` .. ``(i + 1) * per_row - 1`` in order, each if it still fits;
    one that does not is skipped (generated data: nothing is lost). Row ``i`` depends only on
    ``i``, so any row is built directly and resume replays it."""

    def __init__(self, source: Dataset, seq_len: int, block_size: int, pad_id: int,
                 per_row: int, length: int = 10**9):
        if seq_len % block_size:
            raise ValueError(f"data.packing needs data.seq_len ({seq_len}) to be a multiple of "
                             f"attention.block_size ({block_size})")
        self.source, self.seq_len, self.block_size = source, seq_len, block_size
        self.pad_id, self.per_row, self.length = pad_id, per_row, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        docs, used = [], 0
        for j in range(i * self.per_row, (i + 1) * self.per_row):
            doc = item_document(self.source[j % len(self.source)])
            span = padded_length(len(doc), self.block_size)
            if used + span <= self.seq_len:
                docs.append(doc)
                used += span
            if self.seq_len - used < self.block_size:
                break
        return pack_row(docs, self.seq_len, self.block_size, self.pad_id)


def item_document(item: dict[str, torch.Tensor]) -> Document:
    """The real (unpadded) tokens of a right-padded item as a document."""
    n = int(item["length"])
    return Document(item["input_ids"][:n], item["labels"][:n])


def packing_stats(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(documents, rows) of a packed batch (unused document slots hold N)."""
    n = batch["input_ids"].shape[1]
    return int((batch["doc_starts"] < n).sum()), batch["input_ids"].shape[0]
