"""The retriever under rag: chunks with overlap, the shared index folder, config
errors that name the folder, and reloads that never fail a query."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpipeline import config
from mpipeline.config import PipelineConfig, RagConfig
from mpipeline.errors import ConfigError
from mpipeline.retrieval import index
from mpipeline.retrieval.chunks import chunk_text, count_tokens, fingerprint, read_chunks
from mpipeline.retrieval.live import LiveIndex

# Chunking


def test_chunks_overlap_by_the_configured_tokens_and_cover_the_text() -> None:
    text = " ".join(f"w{i}" for i in range(10))
    assert chunk_text(text, 4, 1) == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert chunk_text(text, 4, 0) == ["w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9"]
    assert chunk_text(text, 10, 3) == [text]
    assert chunk_text("  \n ", 4, 1) == []


def test_chunks_are_slices_of_the_text_and_punctuation_counts_as_a_token() -> None:
    text = "Hello,  world!\n\nSecond   line."
    assert count_tokens(text) == 7
    chunks = chunk_text(text, 4, 2)
    assert chunks == ["Hello,  world!", "world!\n\nSecond   line", "Second   line."]
    with pytest.raises(ValueError, match="overlap 4"):
        chunk_text(text, 4, 4)


def test_read_chunks_numbers_chunks_per_file_and_skips_other_suffixes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("one two three four five", encoding="utf-8")
    (tmp_path / "b.txt").write_text("six", encoding="utf-8")
    (tmp_path / "c.py").write_text("seven", encoding="utf-8")
    chunks = read_chunks(tmp_path, 3, 1)
    assert [(c.source, c.number, c.text) for c in chunks] == [
        ("b.txt", 0, "six"),
        ("sub/a.md", 0, "one two three"),
        ("sub/a.md", 1, "three four five"),
    ]


# The index folder


def _corpus(root: Path) -> Path:
    docs = root / "docs"
    docs.mkdir()
    (docs / "cats.md").write_text("Cats purr when content.", encoding="utf-8")
    (docs / "dogs.md").write_text("Dogs bark at the mail carrier.", encoding="utf-8")
    return docs


def test_the_index_is_built_once_per_corpus_state_and_memory_mapped(tmp_path: Path) -> None:
    docs = _corpus(tmp_path)
    first, folder = index.ensure(docs, tmp_path / "idx", 50, 10)
    assert folder.name == fingerprint(docs, 50, 10)
    stamp = (folder / "texts.npy").stat().st_mtime_ns
    second, again = index.ensure(docs, tmp_path / "idx", 50, 10)
    assert again == folder and (folder / "texts.npy").stat().st_mtime_ns == stamp
    assert isinstance(second._texts, np.memmap)
    assert isinstance(second._bm25.scores["data"], np.memmap)
    assert [p.source for p in second.search("dogs barking at mail", 2)] == ["dogs.md"]
    # Another chunking is another state; so is an edited file.
    assert index.ensure(docs, tmp_path / "idx", 40, 10)[1] != folder
    (docs / "cats.md").write_text("Cats purr when content, and knead.", encoding="utf-8")
    assert fingerprint(docs, 50, 10) != folder.name
    assert [p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith(".")] == []


_WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> index.Index:
    """200 short passages over 40 words with many repeats, so scores tie and most
    queries leave most passages at 0 (the shape that made argpartition slow)."""
    docs = tmp_path_factory.mktemp("ranked")
    rng = np.random.default_rng(5)
    for f in range(20):
        lines = [" ".join(rng.choice(_WORDS, size=8)) for _ in range(10)]
        (docs / f"d{f:02d}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return index.ensure(docs, tmp_path_factory.mktemp("idx"), 8, 0)[0]


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    query=st.lists(st.sampled_from([*_WORDS, "absent"]), min_size=1, max_size=5),
    k=st.integers(1, 30),
)
def test_search_returns_the_k_best_positive_scores_best_first(
    ranked: index.Index, query: list[str], k: int
) -> None:
    # Against a brute-force ranking of bm25s's own scores: the same multiset of
    # scores, best first, none at 0, and each passage the one its score says.
    text = " ".join(query)
    ids = [ranked._vocab[t] for t in dict.fromkeys(index.terms(text)) if t in ranked._vocab]
    scores = ranked._bm25.get_scores_from_ids(ids) if ids else np.zeros(len(ranked))
    want = sorted((float(s) for s in scores if s > 0), reverse=True)[:k]
    got = ranked.search(text, k)
    assert [p.score for p in got] == pytest.approx(want)
    for p in got:
        i = next(
            i
            for i in range(len(ranked))
            if ranked._sources[int(ranked._files[i])] == p.source
            and int(ranked._chunks[i]) == p.chunk
        )
        assert float(scores[i]) == pytest.approx(p.score)


# Config errors


def test_a_missing_or_empty_folder_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.py").write_text("x = 1", encoding="utf-8")
    for folder, what in ((missing, "does not exist"), (tmp_path / "empty", "holds no .txt")):
        (issue,) = config.validate(None, {"stages.rag.documents": str(folder)})
        assert issue.field == "stages.rag.documents"
        assert issue.message.startswith(f"{folder} {what}")
    with pytest.raises(ConfigError, match=f"stages.rag.documents: {missing} is not a folder"):
        index.ensure(missing, tmp_path / "idx", 50, 10)
    (issue,) = config.validate(None, {"stages.rag.chunk_overlap": 200})
    assert issue.field == "stages.rag.chunk_overlap"
    # rag switched off: its folder does not matter.
    off = {"stages.rag.documents": str(missing), "stages.rag.enabled": False}
    assert config.validate(None, off) == []


# Reload


def test_a_changed_file_is_reloaded_while_queries_keep_succeeding(tmp_path: Path) -> None:
    docs = _corpus(tmp_path)
    rag = RagConfig(documents=str(docs), index_dir=str(tmp_path / "idx"), reload_poll_s=0.05)

    async def main() -> tuple[int, set[str]]:
        live = LiveIndex(rag, PipelineConfig())
        await live.start()
        old = live.folder
        assert live.search("zebras") == []
        # A new mtime even on a coarse clock: the fingerprint must change.
        new = docs / "zebras.md"
        new.write_text("Zebras have stripes.", encoding="utf-8")
        os.utime(new, ns=(time.time_ns(), time.time_ns() + 10**9))
        queries, seen = 0, set()
        deadline = time.monotonic() + 20
        while live.folder == old:
            assert time.monotonic() < deadline, "no reload within 20 s"
            seen |= {p.source for p in live.search("zebras stripes cats")}
            queries += 1
            await asyncio.sleep(0)
        seen |= {p.source for p in live.search("zebras stripes")}
        await live.stop()
        return queries, seen

    queries, seen = asyncio.run(main())
    assert queries > 0 and "zebras.md" in seen


def test_a_reload_that_fails_keeps_the_old_index(tmp_path: Path) -> None:
    docs = _corpus(tmp_path)
    rag = RagConfig(documents=str(docs), index_dir=str(tmp_path / "idx"), reload_poll_s=0)

    async def main() -> list[str]:
        live = LiveIndex(rag, PipelineConfig())
        await live.start()
        for path in docs.iterdir():
            path.unlink()
        await live.reload()  # the folder is empty now: logged, old index kept
        found = [p.source for p in live.search("cats purr")]
        await live.stop()
        return found

    assert asyncio.run(main()) == ["cats.md"]
