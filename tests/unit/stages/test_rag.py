"""Rag: pass-through without a store, BM25 passages from a folder with one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mpipeline.config import PipelineConfig, RagConfig
from mpipeline.errors import ConfigError
from mpipeline.messages import PromptRequest, Retrieved
from mpipeline.retrieval.bm25 import BM25Index, tokenize
from mpipeline.stages import StageContext
from mpipeline.stages.rag import Rag

DOCS = {
    "cats.md": "Cats purr when they are content.\n\nCats sleep most of the day.",
    "dogs.txt": "Dogs bark at strangers.\n\n\n  Dogs fetch sticks and balls.  \n",
    "deep/rivers.txt": "The Danube flows through Vienna and Budapest.",
    "ignored.py": "cats cats cats dogs dogs purr",
    "empty.md": "\n\n   \n",
}


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    for rel, text in DOCS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def _started(cfg: RagConfig) -> Rag:
    stage = Rag(cfg, StageContext("rag", 0, 1, PipelineConfig()))
    asyncio.run(stage.start())
    return stage


def _retrieve(stage: Rag, text: str) -> Retrieved:
    req = PromptRequest(request_id="r1", input=text)
    out = list(stage.process(req))
    assert len(out) == 1
    assert out[0].request is req
    return out[0]


def test_without_documents_the_request_passes_with_no_context() -> None:
    out = _retrieve(_started(RagConfig()), "anything about cats")
    assert out.context == []


def test_finds_the_most_relevant_paragraph_first(docs: Path) -> None:
    stage = _started(RagConfig(documents=str(docs), top_k=2))
    out = _retrieve(stage, "Why do cats purr?")
    assert [p.source for p in out.context] == ["cats.md", "cats.md"]
    assert out.context[0].text == "Cats purr when they are content."
    assert out.context[0].score > out.context[1].score > 0


def test_sources_are_relative_paths_and_subfolders_are_indexed(docs: Path) -> None:
    stage = _started(RagConfig(documents=str(docs), top_k=1))
    (best,) = _retrieve(stage, "river through vienna").context
    assert best.source == "deep/rivers.txt"
    assert best.text == "The Danube flows through Vienna and Budapest."


def test_top_k_bounds_the_context_and_unknown_words_find_nothing(docs: Path) -> None:
    stage = _started(RagConfig(documents=str(docs), top_k=1))
    assert len(_retrieve(stage, "dogs fetch and bark").context) == 1
    assert _retrieve(stage, "zebra quantum").context == []


def test_only_txt_and_md_files_count_and_blank_paragraphs_are_dropped(docs: Path) -> None:
    index = BM25Index.from_folder(docs)
    # cats.md: 2, dogs.txt: 2 (stripped), rivers.txt: 1; .py and blank paragraphs ignored.
    assert len(index) == 5
    texts = [p.text for p in index.search("dogs", 10)]
    assert "Dogs fetch sticks and balls." in texts
    assert all("cats cats cats" not in t for t in texts)


def test_a_missing_folder_fails_at_start(tmp_path: Path) -> None:
    stage = Rag(
        RagConfig(documents=str(tmp_path / "nope")), StageContext("rag", 0, 1, PipelineConfig())
    )
    with pytest.raises(ConfigError, match="is not a folder"):
        asyncio.run(stage.start())


def test_bm25_prefers_rare_terms_and_shorter_passages() -> None:
    index = BM25Index(
        [
            ("a", "the common word appears here the the"),
            ("b", "the rare zyzzyva appears here"),
            ("c", "the rare zyzzyva appears here among many other padding words in a long text"),
        ]
    )
    ranked = index.search("the zyzzyva", 3)
    assert [p.source for p in ranked][:2] == ["b", "c"]
    assert tokenize("Héllo, WORLD_1!") == ["héllo", "world_1"]
