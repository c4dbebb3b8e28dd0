"""Inference with the echo worker: tokens, limits, streaming chunks and usage.

The non-streaming path asks the worker for ``complete()`` and the streaming
path iterates ``generate()``; a client must get the same text, usage and
finish reason either way, which the property test at the end checks.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from mpipeline.config import EchoConfig, InferenceConfig, PipelineConfig
from mpipeline.messages import Assembled, Completed, Message, PromptRequest, TokenChunk
from mpipeline.stages import StageContext
from mpipeline.stages.inference import Inference

PROMPT = "<|im_start|>user\nsay the thing please<|im_end|>\n"


def _stage(chunk_tokens: int = 1, **echo: object) -> Inference:
    cfg = InferenceConfig(echo=EchoConfig(**echo), chunk_tokens=chunk_tokens)  # type: ignore[arg-type]
    return Inference(cfg, StageContext("inference", 0, 1, PipelineConfig()))


def _run(stage: Inference, req: PromptRequest, prompt: str = PROMPT) -> list[Message]:
    async def go() -> list[Message]:
        await stage.start()
        try:
            msg = Assembled(request=req, prompt=prompt, dedup_key="k")
            return [out async for out in stage.handle(msg)]
        finally:
            await stage.stop()

    return asyncio.run(go())


def _req(text: str, **kw: object) -> PromptRequest:
    return PromptRequest(request_id="r7", session_id="s1", input=text, reply_to=1, **kw)  # type: ignore[arg-type]


def _split(out: list[Message]) -> tuple[list[TokenChunk], Completed]:
    *chunks, done = out
    assert isinstance(done, Completed)
    assert all(isinstance(c, TokenChunk) for c in chunks)
    return chunks, done  # type: ignore[return-value]


def test_echo_returns_the_input_with_usage_and_identity() -> None:
    req = _req("  say  the thing\nplease ")
    req.stamps["rag"] = 11
    chunks, done = _split(_run(_stage(), req))
    assert chunks == []
    assert done.text == "  say  the thing\nplease "
    assert (done.request_id, done.session_id, done.reply_to) == ("r7", "s1", 1)
    assert done.finish_reason == "stop"
    assert done.usage.completion_tokens == 4
    assert done.usage.prompt_tokens > 0
    assert done.stamps == {"rag": 11}


def test_request_max_tokens_caps_the_reply() -> None:
    _, done = _split(_run(_stage(max_tokens=100), _req("a b c d e", max_tokens=2)))
    assert (done.text, done.finish_reason, done.usage.completion_tokens) == ("a b ", "length", 2)


def test_config_max_tokens_applies_without_a_request_limit() -> None:
    _, done = _split(_run(_stage(max_tokens=3), _req("one two three four")))
    assert (done.text, done.finish_reason) == ("one two three ", "length")


def test_exactly_max_tokens_is_not_cut() -> None:
    _, done = _split(_run(_stage(max_tokens=3), _req("one two three")))
    assert (done.text, done.finish_reason) == ("one two three", "stop")


def test_streaming_chunks_join_to_the_final_text() -> None:
    text = "alpha beta gamma delta epsilon"
    chunks, done = _split(_run(_stage(chunk_tokens=2), _req(text, stream=True)))
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.text for c in chunks] == ["alpha beta ", "gamma delta ", "epsilon"]
    assert "".join(c.text for c in chunks) == done.text == text
    assert all((c.request_id, c.session_id, c.reply_to) == ("r7", "s1", 1) for c in chunks)
    assert done.usage.completion_tokens == 5


def test_one_token_per_chunk_by_default() -> None:
    chunks, done = _split(_run(_stage(), _req("a b c", stream=True)))
    assert [c.text for c in chunks] == ["a ", "b ", "c"]
    assert done.text == "a b c"


def test_streaming_respects_max_tokens() -> None:
    chunks, done = _split(_run(_stage(), _req("a b c d", stream=True, max_tokens=2)))
    assert [c.text for c in chunks] == ["a ", "b "]
    assert (done.text, done.finish_reason) == ("a b ", "length")


def test_token_delay_is_awaited_not_blocking() -> None:
    async def go(stream: bool) -> tuple[list[Message], int]:
        stage = _stage(token_delay_ms=5)  # each its own: no result cached from the other
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        msg = Assembled(request=_req("a b c d", stream=stream), prompt="p", dedup_key="k")
        out = [o async for o in stage.handle(msg)]
        task.cancel()
        return out, ticks

    for stream in (False, True):
        out, ticks = asyncio.run(go(stream))
        assert _split(out)[1].text == "a b c d"
        assert ticks > 0


def test_empty_and_blank_input_complete_with_no_tokens() -> None:
    for text in ("", "   \n"):
        for stream in (False, True):
            chunks, done = _split(_run(_stage(), _req(text, stream=stream)))
            assert chunks == []
            assert (done.text, done.usage.completion_tokens, done.finish_reason) == ("", 0, "stop")


# Words and every kind of whitespace str.split and the regex \s must agree on.
_PIECES = ["a", "bc", "é", " ", "  ", "\n", "\t", "\r", "\x0b", "\x1c", "\x85", "\u00a0", "\u2003"]
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=12).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=_TEXT, max_tokens=st.one_of(st.none(), st.integers(1, 6)))
def test_streaming_and_plain_replies_agree(text: str, max_tokens: int | None) -> None:
    plain = _split(_run(_stage(max_tokens=4), _req(text, max_tokens=max_tokens)))[1]
    chunks, streamed = _split(
        _run(_stage(max_tokens=4), _req(text, max_tokens=max_tokens, stream=True))
    )
    assert "".join(c.text for c in chunks) == streamed.text
    assert (plain.text, plain.usage, plain.finish_reason) == (
        streamed.text,
        streamed.usage,
        streamed.finish_reason,
    )
    assert text.startswith(plain.text)
