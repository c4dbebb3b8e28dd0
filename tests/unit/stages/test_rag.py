"""Rag: pass-through without a store; chunked BM25 passages, citations and budget with one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mpipeline.config import PipelineConfig, RagConfig
from mpipeline.errors import ConfigError
from mpipeline.messages import Citation, PromptRequest, Retrieved
from mpipeline.stages import StageContext
from mpipeline.stages.rag import Rag

DOCS = {
    "cats.md": "Cats purr when they are content. Cats sleep most of the day.",
    "dogs.txt": "Dogs bark at strangers. Dogs fetch sticks and balls.",
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


def _cfg(docs: Path, **fields: Any) -> RagConfig:
    return RagConfig(
        documents=str(docs), index_dir=str(docs.parent / "index"), reload_poll_s=0, **fields
    )


def _started(cfg: RagConfig) -> Rag:
    stage = Rag(cfg, StageContext("rag", 0, 1, PipelineConfig()))
    asyncio.run(stage.start())
    return stage


def _retrieve(stage: Rag, text: str) -> Retrieved:
    req = PromptRequest(request_id="r1", input=text)
    out = list(stage.process(req))
    assert len(out) == 1
    assert out[0].request.request_id == "r1" and out[0].request.input == text
    return out[0]


def test_without_documents_the_request_passes_with_no_context() -> None:
    req = PromptRequest(request_id="r1", input="anything about cats")
    (out,) = Rag(RagConfig(), StageContext("rag", 0, 1, PipelineConfig())).process(req)
    assert out.request is req and out.context == [] and out.request.citations == []


def test_the_right_file_ranks_first_and_is_cited(docs: Path) -> None:
    stage = _started(_cfg(docs, top_k=3, chunk_tokens=8, chunk_overlap=2))
    out = _retrieve(stage, "Why do cats purr?")
    assert out.context[0].source == "cats.md"
    assert out.context[0].chunk == 0 and out.context[0].text.startswith("Cats purr")
    assert all(p.score > 0 for p in out.context)
    assert [p.score for p in out.context] == sorted((p.score for p in out.context), reverse=True)
    assert out.request.citations == [
        Citation(source=p.source, chunk=p.chunk, score=p.score) for p in out.context
    ]
    (river,) = _retrieve(_started(_cfg(docs, top_k=1)), "river through vienna").context
    assert river.source == "deep/rivers.txt"
    assert river.text == DOCS["deep/rivers.txt"]


def test_unknown_words_find_nothing_and_cite_nothing(docs: Path) -> None:
    out = _retrieve(_started(_cfg(docs)), "zebra quantum")
    assert out.context == [] and out.request.citations == []


def test_top_k_and_the_token_budget_bound_the_context(docs: Path) -> None:
    query = "cats purr dogs bark danube"
    assert len(_retrieve(_started(_cfg(docs, top_k=2)), query).context) == 2
    # Each file is one chunk; cats.md, the best, is 13 tokens: a budget of 13 holds it alone.
    out = _retrieve(_started(_cfg(docs, top_k=3, context_tokens=13)), query)
    assert len(out.context) == 1 and len(out.request.citations) == 1


def test_a_missing_folder_fails_at_start_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    stage = Rag(_cfg(missing), StageContext("rag", 0, 1, PipelineConfig()))
    with pytest.raises(ConfigError, match=f"stages.rag.documents: {missing} is not a folder"):
        asyncio.run(stage.start())
