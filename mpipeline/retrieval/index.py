"""The rag index: bm25s scores over the corpus chunks, saved once, memory-mapped by all.

Why bm25s: it precomputes every (term, chunk) BM25 score into a sparse CSC
matrix, so a query is a sum of a few numpy slices and an argpartition; the
hand-written BM25 it replaced walked Python dicts per posting, about 30x
slower on 10,000 passages (bench/rag_bm25.py, bench/RESULTS.md).

Why a folder per corpus state: the folder is named by the corpus fingerprint
(``chunks.fingerprint``), so every rag replica, a restart, and ``mpipeline
index build`` agree on where an index is without talking to each other. The
first to need it builds it into a private temporary folder and renames it
into place (atomic), and everyone loads it with ``mmap``: the score arrays and
the chunk texts are pages of one file in the page cache, shared, never copied
per process. Only the vocabulary (a dict) is per process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import bm25s  # type: ignore[import-untyped]
import numpy as np
from bm25s.stopwords import STOPWORDS_EN  # type: ignore[import-untyped]

from mpipeline.messages import Passage
from mpipeline.retrieval.chunks import Chunk, count_tokens, fingerprint, read_chunks

_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset(STOPWORDS_EN)
_ARRAYS = ("texts", "offsets", "files", "chunks", "tokens")


def terms(text: str) -> list[str]:
    """What BM25 matches on: lowercased words, English stopwords left out (they
    rank nothing and make the longest postings)."""
    return [w for w in (m.lower() for m in _WORD.findall(text)) if w not in _STOP]


class Index:
    """A loaded index: search it, ``len`` it; immutable, so a swap needs no lock."""

    def __init__(self, bm25: Any, arrays: dict[str, np.ndarray], sources: list[str]) -> None:
        self._bm25 = bm25
        self._vocab: dict[str, int] = bm25.vocab_dict
        self._texts = arrays["texts"]
        self._offsets = arrays["offsets"]
        self._files = arrays["files"]
        self._chunks = arrays["chunks"]
        self._tokens = arrays["tokens"]
        self._sources = sources

    def __len__(self) -> int:
        return len(self._files)

    def search(self, query: str, k: int, budget: int = 0) -> list[Passage]:
        """The best ``k`` chunks for ``query``, best first, with a score above 0.

        ``budget`` > 0 caps the passages' tokens in total: ranking stops at the
        first chunk that would go over it (a lower-ranked chunk never jumps ahead).
        """
        ids = [self._vocab[t] for t in dict.fromkeys(terms(query)) if t in self._vocab]
        if not ids or not len(self):
            return []
        scores = self._bm25.get_scores_from_ids(ids)
        # Rank only the chunks that hold a query term: a query's scores are mostly
        # zeros, and numpy's argpartition over 10,000 values that are nearly all
        # equal took 1.6 ms where this takes 0.04 ms (bench/RESULTS.md, issue 17).
        top = np.flatnonzero(scores > 0)
        if k < len(top):
            top = top[np.argpartition(scores[top], -k)[-k:]]
        top = top[np.argsort(-scores[top], kind="stable")]
        out: list[Passage] = []
        spent = 0
        for i in top.tolist():
            score = float(scores[i])
            spent += int(self._tokens[i])
            if budget and spent > budget:
                break
            text = bytes(self._texts[self._offsets[i] : self._offsets[i + 1]]).decode()
            source = self._sources[int(self._files[i])]
            out.append(Passage(source=source, text=text, score=score, chunk=int(self._chunks[i])))
        return out


def build(chunks: list[Chunk], into: Path) -> None:
    """Index ``chunks`` and save the result as the folder ``into`` (atomically: a
    reader sees the whole folder or none; if another process won the race, its
    identical folder stays)."""
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{into.name}-", dir=into.parent))
    try:
        bm25 = bm25s.BM25()
        bm25.index([terms(c.text) for c in chunks], show_progress=False)
        bm25.save(tmp / "bm25", show_progress=False)
        sources = list(dict.fromkeys(c.source for c in chunks))
        file_of = {s: i for i, s in enumerate(sources)}
        blobs = [c.text.encode() for c in chunks]
        arrays: dict[str, np.ndarray] = {
            "texts": np.frombuffer(b"".join(blobs), dtype=np.uint8),
            "offsets": np.cumsum([0, *map(len, blobs)], dtype=np.int64),
            "files": np.array([file_of[c.source] for c in chunks], dtype=np.int32),
            "chunks": np.array([c.number for c in chunks], dtype=np.int32),
            "tokens": np.array([count_tokens(c.text) for c in chunks], dtype=np.int32),
        }
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "sources.json").write_text(json.dumps(sources), encoding="utf-8")
        try:
            os.rename(tmp, into)
        except OSError:
            if not (into / "sources.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(folder: Path) -> Index:
    """The index saved in ``folder``, memory-mapped read-only."""
    bm25 = bm25s.BM25.load(folder / "bm25", mmap=True, show_progress=False)
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    sources = json.loads((folder / "sources.json").read_text(encoding="utf-8"))
    return Index(bm25, arrays, sources)


def ensure(documents: Path, cache: Path, size: int, overlap: int) -> tuple[Index, Path]:
    """The index of ``documents`` as it is now: loaded from ``cache`` when a build of
    this state is there, else built into it first; and the folder it lives in.

    :raises ConfigError: naming ``documents`` when it is missing or has no corpus file.
    """
    folder = cache / fingerprint(documents, size, overlap)
    if not (folder / "sources.json").is_file():
        build(read_chunks(documents, size, overlap), folder)
    return load(folder), folder
