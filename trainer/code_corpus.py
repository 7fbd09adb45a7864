"""Source-code corpus (``data=code``): long natural documents from installed Python packages.

Each listed package is located on this Python without importing it. Its directories that hold
``.py`` files are the corpus's subtrees (a directory's own files; each subdirectory is a subtree
of its own). A subtree's text is its files in sorted name order, each after a header line
``# file: <path>``, normalized to printable ASCII and newline (tabs expanded to 8 columns, any
other character -> ``?``), so the built-in character tokenizer covers every character and
decoding gives the text back. Subtrees go to the train or the held-out split whole, by a hash
of their path (``split_subtrees``), so no file is in both.

- Training documents are cut from each train subtree's token stream: a document ends at the
  first file end at or after ``min_len`` tokens, or after ``max_len`` tokens inside a long file
  (the rest of the file opens the next document); a subtree's tail shorter than ``min_len`` is
  dropped. ``min_len=None``: one document per file, cut at ``max_len`` (the files' own lengths).
- Held-out rows are consecutive fixed-length pieces of the held-out subtrees (in split order),
  each with a ``recall_mask``: the tokens of identifiers whose previous occurrence in the row
  starts more than ``distance`` tokens earlier (``recall_mask``).

Every document and row starts with the tokenizer's ``<bos>`` (counted in its length).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import keyword
import logging
import os
import platform
import re
import sys
from collections.abc import Sequence
from functools import cached_property, lru_cache

import numpy as np
import torch

from .packing import Document

log = logging.getLogger("trainer")

# Standard-library packages present (as directories) on CPython 3.10-3.13; ~3.9M characters in
# 33 subtrees on 3.11 (encodings is left out: mostly codec tables).
DEFAULT_PACKAGES = ("asyncio", "collections", "concurrent", "ctypes", "curses", "dbm", "email",
                    "html", "http", "importlib", "json", "logging", "multiprocessing", "sqlite3",
                    "unittest", "urllib", "wsgiref", "xml", "xmlrpc", "zoneinfo")
HEADER = "# file: {}\n"
_OUTSIDE_ASCII = re.compile(r"[^\n\x20-\x7e]")
_IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def normalize(text: str) -> str:
    """Printable ASCII and newline: tabs expanded to 8 columns, anything else -> ``?``."""
    return _OUTSIDE_ASCII.sub("?", text.expandtabs(8))


def package_roots(name: str) -> list[tuple[str, str]]:
    """(base, root) directories of package ``name`` (dotted names: a subpackage); file paths
    are written relative to ``base``, the directory that holds the top-level package."""
    top, _, rest = name.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    where = f"Python {platform.python_version()} at {sys.executable}"
    if spec is None:
        raise ValueError(f"data.packages: {name!r} is not installed ({where})")
    if not spec.submodule_search_locations:
        raise ValueError(f"data.packages: {name!r} is a single module ({spec.origin}), not a "
                         "package directory")
    roots = [(os.path.dirname(loc), os.path.join(loc, *rest.split(".")) if rest else loc)
             for loc in sorted(spec.submodule_search_locations)]
    roots = [(base, root) for base, root in roots if os.path.isdir(root)]
    if not roots:
        raise ValueError(f"data.packages: {name!r}: no such subpackage directory ({where})")
    return roots


def package_version(name: str) -> str:
    """``python X.Y.Z`` for the standard library, else the installed distribution(s) and
    version(s) (``unknown`` when no distribution claims the package)."""
    top = name.partition(".")[0]
    if top in sys.stdlib_module_names:
        return f"python {platform.python_version()}"
    dists = sorted(set(importlib.metadata.packages_distributions().get(top, [])))
    return ", ".join(f"{d} {importlib.metadata.version(d)}" for d in dists) or "unknown"


def read_subtrees(packages: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """{subtree path: [(file path, header + normalized text)]} over every non-empty ``.py`` file
    of the packages, files in sorted order."""
    subtrees: dict[str, list[tuple[str, str]]] = {}
    for name in packages:
        found = 0
        for base, root in package_roots(name):
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                key = os.path.relpath(dirpath, base).replace(os.sep, "/")
                files = []
                for f in sorted(filenames):
                    if not f.endswith(".py"):
                        continue
                    with open(os.path.join(dirpath, f), encoding="utf-8", errors="replace") as fh:
                        text = normalize(fh.read())
                    if text.strip():
                        path = f"{key}/{f}"
                        files.append((path, HEADER.format(path) + text.rstrip("\n") + "\n"))
                if not files:
                    continue
                if key in subtrees:
                    raise ValueError(f"data.packages: {key} comes twice (a package listed twice, "
                                     "or with one of its subpackages)")
                subtrees[key] = files
                found += len(files)
        if not found:
            raise ValueError(f"data.packages: {name!r} holds no non-empty .py file "
                             f"({', '.join(r for _, r in package_roots(name))})")
    return subtrees


def split_subtrees(sizes: dict[str, int], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) subtree paths. In the order of the SHA-256 of their paths, a subtree is
    held out when that brings the held-out characters closer to ``eval_fraction`` of all (half
    of it or more fits under the target), leaving at least one subtree to train; the first
    subtree in that order is held out if none is. Train in sorted order, held-out in hash order."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"data.eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(sizes) < 2:
        raise ValueError(f"data.packages give {len(sizes)} subtree(s) ({', '.join(sizes)}); a "
                         "held-out split by subtree needs at least 2: add packages")
    order = sorted(sizes, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    target, held, chars = eval_fraction * sum(sizes.values()), [], 0
    for key in order:
        if chars + sizes[key] / 2 <= target and len(held) < len(order) - 1:
            held.append(key)
            chars += sizes[key]
    held = held or order[:1]
    return sorted(set(sizes) - set(held)), held


def cut_points(file_ends: Sequence[int], min_body: int, max_body: int) -> list[tuple[int, int]]:
    """(start, end) token spans of a stream whose files end at ``file_ends`` (ascending, the
    last one the stream's length): each span ends at the first file end at or after
    ``min_body`` tokens, or is cut at ``max_body`` tokens; a tail under ``min_body`` is dropped."""
    spans, start = [], 0
    for end in file_ends:
        while end - start > max_body:
            spans.append((start, start + max_body))
            start += max_body
        if end - start >= min_body:
            spans.append((start, end))
            start = end
    return spans


def identifier_spans(text: str, token_at: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(first token, end token) arrays and names of the identifier occurrences of ``text``
    (ASCII Python identifiers, keywords left out, in strings and comments too), in order;
    ``token_at``: the first character of each token (ascending)."""
    found = [m for m in _IDENTIFIER.finditer(text) if not keyword.iskeyword(m[0])]
    first = np.searchsorted(token_at, [m.start() for m in found], side="right") - 1
    last = np.searchsorted(token_at, [m.end() - 1 for m in found], side="right") - 1
    return first.astype(np.int64), last.astype(np.int64) + 1, [m[0] for m in found]


def recall_mask(starts: Sequence[int], ends: Sequence[int], names: Sequence[int], length: int,
                distance: int) -> torch.Tensor:
    """Bool (length,) mask of long-range recall tokens. ``starts``/``ends``: token spans of the
    identifier occurrences of a row, in order; ``names``: which identifier each is. An
    occurrence whose previous occurrence in the row starts more than ``distance`` tokens
    earlier marks its tokens after the one holding its first character (its only token when
    it is one token): what copying from far back predicts."""
    mask = torch.zeros(length, dtype=torch.bool)
    last: dict[int, int] = {}
    for s, e, w in zip(starts, ends, names):
        before = last.get(w)
        if before is not None and s - before > distance:
            mask[s + 1 if e - s > 1 else s:e] = True
        last[w] = s
    return mask


class CodeCorpus:
    """The subtrees of ``packages`` split into train and held-out, tokenized on first use."""

    def __init__(self, packages: Sequence[str], tokenizer, eval_fraction: float):
        if not packages:
            raise ValueError("data.packages is empty: name at least one installed package")
        self.tokenizer = tokenizer
        self.subtrees = read_subtrees(packages)
        self.versions = {p: package_version(p) for p in packages}
        self.train_subtrees, self.eval_subtrees = split_subtrees(
            {k: sum(len(t) for _, t in files) for k, files in self.subtrees.items()},
            eval_fraction)
        self._bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]

    def _encode(self, texts: list[str], offsets: bool = False) -> dict:
        return self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)

    @cached_property
    def _train_streams(self) -> list[tuple[torch.Tensor, list[int]]]:
        """(token ids, file ends) per train subtree."""
        streams = []
        for key in self.train_subtrees:
            ids = self._encode([t for _, t in self.subtrees[key]])["input_ids"]
            streams.append((torch.cat([torch.tensor(x, dtype=torch.long) for x in ids]),
                            np.cumsum([len(x) for x in ids]).tolist()))
        return streams

    @cached_property
    def _eval_stream(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """Token ids of the held-out subtrees one after another, and the (start, end) token
        spans and identifier numbers of their identifier occurrences (Python keywords left
        out), in order."""
        ids, starts, ends, names, vocab, base = [], [], [], [], {}, 0
        for key in self.eval_subtrees:
            texts = [t for _, t in self.subtrees[key]]
            enc = self._encode(texts, offsets=True)
            for text, x, offs in zip(texts, enc["input_ids"], enc["offset_mapping"]):
                first, end, found = identifier_spans(text, np.array([o[0] for o in offs]))
                starts.append(first + base)
                ends.append(end + base)
                names += [vocab.setdefault(w, len(vocab)) for w in found]
                ids.append(torch.tensor(x, dtype=torch.long))
                base += len(x)
        return (torch.cat(ids), np.concatenate(starts), np.concatenate(ends),
                np.array(names, dtype=np.int64))

    def documents(self, min_len: int | None, max_len: int) -> list[Document]:
        """Training documents of ``min_len`` to ``max_len`` tokens (module docstring)."""
        bos = torch.tensor(self._bos, dtype=torch.long)
        low = 1 if min_len is None else min_len - len(self._bos)
        docs = []
        for ids, file_ends in self._train_streams:
            for s, e in cut_points(file_ends, low, max_len - len(self._bos)):
                doc = torch.cat([bos, ids[s:e]])
                docs.append(Document(doc, doc))
        if not docs:
            raise ValueError(f"no training document: every train subtree is shorter than "
                             f"data.min_len={min_len} tokens (add data.packages or lower it)")
        return docs

    def eval_rows(self, seq_len: int, samples: int, distance: int) -> list[dict[str, torch.Tensor]]:
        """Up to ``samples`` held-out rows of exactly ``seq_len`` tokens, spread evenly over the
        held-out stream: ``input_ids``, ``labels`` and ``recall_mask``."""
        ids, starts, ends, names = self._eval_stream
        body = seq_len - len(self._bos)
        pieces = len(ids) // body
        if pieces == 0:
            raise ValueError(f"eval length {seq_len} (data.eval_seq_lens / data.seq_len) is "
                             f"longer than the held-out split ({len(ids)} tokens): raise "
                             "data.eval_fraction or add data.packages")
        rows = []
        for k in range(min(samples, pieces)):
            s = k * pieces // min(samples, pieces) * body
            lo, hi = np.searchsorted(starts, s), np.searchsorted(starts, s + body)
            inside = ends[lo:hi] <= s + body
            shift = s - len(self._bos)  # stream offset -> row position
            row = torch.cat([torch.tensor(self._bos, dtype=torch.long), ids[s:s + body]])
            mask = recall_mask((starts[lo:hi][inside] - shift).tolist(),
                               (ends[lo:hi][inside] - shift).tolist(),
                               names[lo:hi][inside].tolist(), seq_len, distance)
            rows.append({"input_ids": row, "labels": row, "recall_mask": mask})
        return rows


@lru_cache(maxsize=1)
def load_corpus(packages: tuple[str, ...], tokenizer, eval_fraction: float) -> CodeCorpus:
    """The corpus of ``packages``, built once for the train and eval sets of a job."""
    corpus = CodeCorpus(packages, tokenizer, eval_fraction)
    log.info("data=code: %d subtrees of %s, held out: %s | versions %s", len(corpus.subtrees),
             ", ".join(packages), ", ".join(corpus.eval_subtrees), corpus.versions)
    return corpus


def document_lengths(packages: Sequence[str] = DEFAULT_PACKAGES, min_len: int | None = None,
                     max_len: int = 1 << 17, eval_fraction: float = 0.1,
                     tokenizer=None) -> list[int]:
    """Token lengths of the training documents (built-in character tokenizer by default):
    with ``min_len=None`` one document per source file, cut at ``max_len``, i.e. the real
    length distribution of source files, for packing benchmarks."""
    if tokenizer is None:
        from .tokenizer import build_tokenizer
        tokenizer = build_tokenizer()
    corpus = load_corpus(tuple(packages), tokenizer, eval_fraction)
    return [len(d) for d in corpus.documents(min_len, max_len)]
