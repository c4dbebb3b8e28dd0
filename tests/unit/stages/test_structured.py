"""Structure through the stages: raw turns kept in place by assemble, structured pieces
as chunks of their own, JSON-mode output left alone by post, and a dedup key that
includes every part that changes the answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from mpipeline.config import AssembleConfig, InferenceConfig, PipelineConfig, PostConfig
from mpipeline.messages import (
    Assembled,
    Completed,
    Message,
    Passage,
    PromptRequest,
    StructuredChunk,
    TokenChunk,
    Turn,
    Usage,
)
from mpipeline.routing import dedup_key
from mpipeline.stages import StageContext
from mpipeline.stages.assemble import Assemble, conversation
from mpipeline.stages.calls import ShardCalls
from mpipeline.stages.inference import Inference
from mpipeline.stages.post import Post
from mpipeline.workers.base import Generation, Structured

CTX = [Passage(source="a.md", text="Paris is in France.", score=1.0)]
RAW_TOOL = b'{"role": "tool", "tool_call_id": "c1", "content": "sunny"}'
RAW_CALL = b'{"role": "assistant", "content": null, "tool_calls": [{"id": "c1"}]}'


def _req(**fields: object) -> PromptRequest:
    return PromptRequest(request_id="r1", input="sunny", **fields)  # type: ignore[arg-type]


def test_without_context_the_clients_conversation_goes_on_as_it_came() -> None:
    history = [
        Turn(role="user", content="weather?"),
        Turn(role="system", content="Be brief.", raw=b'{"role":"developer","content":"Be brief."}'),
        Turn(role="assistant", content="", raw=RAW_CALL),
    ]
    req = _req(history=history, input_raw=RAW_TOOL)
    turns = conversation("configured", req, [])
    assert turns == [*history, Turn(role="user", content="sunny", raw=RAW_TOOL)]
    # With context, the system turns join into one, before the rest, as before.
    with_ctx = conversation("configured", req, CTX)
    assert [t.role for t in with_ctx] == ["system", "user", "assistant", "user"]
    assert with_ctx[0].content.startswith("Be brief.\n\nContext:")


def test_trimming_a_long_conversation_drops_a_tool_result_with_its_call() -> None:
    stage = Assemble(
        AssembleConfig(max_prompt_chars=60, system_prompt=""),
        StageContext("assemble", 0, 1, PipelineConfig()),
    )
    history = [
        Turn(role="assistant", content="x" * 80, raw=RAW_CALL),
        Turn(role="user", content="sunny", raw=RAW_TOOL),
        Turn(role="assistant", content="It is sunny."),
    ]
    (out,) = stage.process(_req(history=history))
    assert isinstance(out, Assembled)
    assert [t.content for t in out.messages] == ["It is sunny.", "sunny"]
    # Under the budget, nothing goes, tool results included.
    (whole,) = stage.process(_req(history=history[1:]))
    assert isinstance(whole, Assembled)
    assert [t.raw for t in whole.messages] == [RAW_TOOL, b"", b""]


def test_the_dedup_key_includes_params_and_each_messages_own_json() -> None:
    base = _req()
    keys = {
        dedup_key(base),
        dedup_key(_req(params=b'{"temperature": 0}')),
        dedup_key(_req(params=b'{"temperature": 1}')),
        dedup_key(_req(input_raw=RAW_TOOL)),
        dedup_key(_req(history=[Turn(role="assistant", content="", raw=RAW_CALL)])),
        dedup_key(_req(history=[Turn(role="assistant", content="")])),
    }
    assert len(keys) == 6
    assert dedup_key(_req(params=b'{"seed": 1}')) == dedup_key(_req(params=b'{"seed": 1}'))


class _Scripted:
    """An upstream that streams the pieces it is given (plain and structured)."""

    name = "scripted"
    remote = False
    max_concurrency = 8

    def __init__(self, pieces: list[str], raw: bytes = b"") -> None:
        from mpipeline.workers.base import LOCAL_TIMEOUTS

        self.timeouts = LOCAL_TIMEOUTS
        self._pieces = pieces
        self._raw = raw

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def generate(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        for piece in self._pieces:
            yield piece
        gen.raw = self._raw

    async def complete(self, job: Assembled, gen: Generation) -> str:
        gen.raw = self._raw
        return "".join(self._pieces)


def _infer(pieces: list[str], req: PromptRequest, chunk_tokens: int = 2) -> list[Message]:
    cfg = InferenceConfig(chunk_tokens=chunk_tokens)
    stage = Inference(cfg, StageContext("inference", 0, 1, PipelineConfig()))
    stage.calls = ShardCalls(cfg, [_Scripted(pieces, b'{"usage": {}}')], None)

    async def go() -> list[Message]:
        msg = Assembled(request=req, prompt="", dedup_key="k")
        return [out async for out in stage.handle(msg)]

    return asyncio.run(go())


def test_a_structured_piece_is_a_chunk_of_its_own_between_joined_plain_ones() -> None:
    delta = Structured("", b'{"choices": [{"delta": {"tool_calls": []}}]}')
    out = _infer(["a", "b", "c", delta, "d"], _req(stream=True))
    *chunks, done = out
    assert [(type(c).__name__, c.text) for c in chunks if isinstance(c, TokenChunk)] == [
        ("TokenChunk", "ab"),
        ("TokenChunk", "c"),
        ("StructuredChunk", ""),
        ("TokenChunk", "d"),
    ]
    assert [c.index for c in chunks if isinstance(c, TokenChunk)] == [0, 1, 2, 3]
    structured = chunks[2]
    assert isinstance(structured, StructuredChunk) and structured.raw == delta.raw
    assert isinstance(done, Completed) and done.text == "abcd" and done.raw == b'{"usage": {}}'
    assert not done.verbatim


def test_json_mode_output_is_verbatim_and_post_leaves_it() -> None:
    req = _req(params=b'{"response_format": {"type": "json_object"}}')
    (done,) = _infer([' {"a": 1} \n'], req)
    assert isinstance(done, Completed) and done.verbatim
    post = Post(PostConfig(max_output_chars=3), StageContext("post", 0, 1, PipelineConfig()))
    assert list(post.process(done)) == [done]
    usage = Usage(prompt_tokens=1, completion_tokens=1)
    text = Completed(request_id="r", session_id=None, reply_to=0, text=" ab cd ", usage=usage)
    (cut,) = post.process(text)
    assert isinstance(cut, Completed) and (cut.text, cut.finish_reason) == ("ab ", "length")
