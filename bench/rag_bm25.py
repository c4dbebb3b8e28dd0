"""Rag retrieval: bm25s against the hand-written BM25 it replaced (issue 17, item 1).

Run: ``.venv/bin/python -m bench.rag_bm25 [--passages 10000] [--queries 1000] [--k 5]``

Writes a generated corpus (``passages`` paragraphs of 100 words drawn from a
Zipf law over a 30,000-word vocabulary, like prose, 100 paragraphs per file)
to a temporary folder and times, for each retriever, building the index and
top-k queries of 2-6 words drawn from the same law. bm25s is timed three
ways: ``Index.search`` on the index as ``mpipeline index build`` saves it and
every replica memory-maps it, and the rag stage's whole ``process`` (query
terms, search, passages and citations). The hand-written BM25 is the 78-line
module that main had before (kept below, verbatim but for names, as the
baseline). With ``chunk_tokens = 100`` and no overlap the chunks are the
paragraphs, so both retrievers rank the same 10,000 passages.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mpipeline.config import PipelineConfig, RagConfig
from mpipeline.messages import PromptRequest
from mpipeline.retrieval import index
from mpipeline.retrieval.chunks import read_chunks
from mpipeline.stages import StageContext
from mpipeline.stages.rag import Rag

WORDS_PER_PASSAGE = 100
PER_FILE = 100
VOCAB = 30_000


class HandBM25:
    """main's hand-written BM25 before issue 17 (mpipeline/retrieval/bm25.py)."""

    _word = re.compile(r"\w+", re.UNICODE)

    def __init__(self, passages: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        self._k1, self._b = k1, b
        self._tfs = [Counter(self._tok(text)) for text in passages]
        self._lens = [sum(tf.values()) for tf in self._tfs]
        n = len(passages)
        self._avg = sum(self._lens) / n
        df: Counter[str] = Counter()
        for tf in self._tfs:
            df.update(tf.keys())
        self._idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}
        self._postings: dict[str, list[int]] = {}
        for i, tf in enumerate(self._tfs):
            for t in tf:
                self._postings.setdefault(t, []).append(i)

    def _tok(self, text: str) -> list[str]:
        return [w.lower() for w in self._word.findall(text)]

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        scores: dict[int, float] = {}
        k1, b = self._k1, self._b
        for term in set(self._tok(query)):
            idf = self._idf.get(term)
            if idf is None:
                continue
            for i in self._postings[term]:
                tf = self._tfs[i][term]
                norm = tf + k1 * (1 - b + b * self._lens[i] / self._avg)
                scores[i] = scores.get(i, 0.0) + idf * tf * (k1 + 1) / norm
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def _words(rng: np.random.Generator, n: int) -> list[str]:
    ranks = np.minimum(rng.zipf(1.2, n), VOCAB)
    return [f"w{r}" for r in ranks]


def write_corpus(folder: Path, passages: int, rng: np.random.Generator) -> None:
    for f in range(math.ceil(passages / PER_FILE)):
        count = min(PER_FILE, passages - f * PER_FILE)
        paras = [" ".join(_words(rng, WORDS_PER_PASSAGE)) for _ in range(count)]
        (folder / f"doc{f:04d}.txt").write_text("\n\n".join(paras), encoding="utf-8")


def _timed(fn: Callable[[str], object], queries: list[str]) -> tuple[float, float, float]:
    """p50, p99 and mean of one call, in milliseconds (after 50 warm-up calls)."""
    for q in queries[:50]:
        fn(q)
    times = []
    for q in queries:
        t0 = time.perf_counter_ns()
        fn(q)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)], statistics.fmean(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(17)
    queries = [" ".join(_words(rng, int(rng.integers(2, 7)))) for _ in range(args.queries)]
    with tempfile.TemporaryDirectory() as tmp:
        docs, cache = Path(tmp) / "docs", Path(tmp) / "index"
        docs.mkdir()
        write_corpus(docs, args.passages, rng)
        rows: list[tuple[str, float, tuple[float, float, float]]] = []

        t0 = time.perf_counter()
        chunks = read_chunks(docs, WORDS_PER_PASSAGE, 0)
        hand = HandBM25([c.text for c in chunks])
        rows.append(
            (
                "hand-written BM25",
                time.perf_counter() - t0,
                _timed(lambda q: hand.search(q, args.k), queries),
            )
        )

        t0 = time.perf_counter()
        built, _ = index.ensure(docs, cache, WORDS_PER_PASSAGE, 0)
        build_s = time.perf_counter() - t0
        rows.append(
            (
                "bm25s, Index.search (mmap)",
                build_s,
                _timed(lambda q: built.search(q, args.k), queries),
            )
        )

        cfg = RagConfig(
            documents=str(docs),
            index_dir=str(cache),
            top_k=args.k,
            chunk_tokens=WORDS_PER_PASSAGE,
            chunk_overlap=0,
            context_tokens=0,
            reload_poll_s=0,
        )
        stage = Rag(cfg, StageContext("rag", 0, 1, PipelineConfig()))
        asyncio.run(stage.start())
        req = [PromptRequest(request_id=str(i), input=q) for i, q in enumerate(queries)]
        by_text = {r.input: r for r in req}
        rows.append(
            (
                "bm25s, Rag.process (stage)",
                build_s,
                _timed(lambda q: list(stage.process(by_text[q])), queries),
            )
        )

        same = sum(
            [i for i, _ in hand.search(q, args.k)][:1]
            == [int(p.source[3:7]) * PER_FILE + p.chunk for p in built.search(q, args.k)][:1]
            for q in queries
        )
    print(f"{len(chunks)} passages, {args.queries} queries, top-{args.k}")
    print(f"{'retriever':<30} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, build, (p50, p99, mean) in rows:
        print(f"{name:<30} {build:>8.2f} {p50:>8.3f} {p99:>8.3f} {mean:>8.3f}")
    print(f"same best passage: {same}/{len(queries)} queries")


if __name__ == "__main__":
    main()
