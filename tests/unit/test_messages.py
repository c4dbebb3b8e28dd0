from __future__ import annotations

import gc
import typing

import msgspec
import pytest
from hypothesis import given

from mpipeline.codec import Codec
from mpipeline.errors import DecodeError, ErrorCode
from mpipeline.messages import (
    EDGE_TYPES,
    Assembled,
    Completed,
    Failed,
    Message,
    Priority,
    PromptRequest,
    Reply,
    Retrieved,
    TokenChunk,
    Usage,
    failed_from,
    reply_info,
)
from tests.strategies import any_message

TAGGED = [PromptRequest, Retrieved, Assembled, TokenChunk, Completed, Failed]


def make_request(**overrides: typing.Any) -> PromptRequest:
    fields: dict[str, typing.Any] = {"request_id": "r1", "session_id": "s1", "input": "hi"}
    return PromptRequest(**(fields | overrides))


def make_failed() -> Failed:
    return Failed(
        request_id="r1",
        session_id=None,
        reply_to=2,
        code=ErrorCode.STAGE_ERROR,
        reason="boom",
        stage="post",
    )


def test_priority_crosses_a_ring_as_its_number_and_a_stray_number_is_refused() -> None:
    # The runner's backlog orders by this number (tests/unit/runner/test_async.py);
    # a record whose priority is none of the four must not decode into one.
    codec = Codec(PromptRequest)
    wire = msgspec.msgpack.decode(codec.encode(make_request(priority=Priority.LOW)))
    fields = wire[0]
    at = fields.index(int(Priority.LOW))
    for p in Priority:
        fields[at] = int(p)
        assert codec.decode_one(msgspec.msgpack.encode(wire)).priority is p
    fields[at] = len(Priority)
    with pytest.raises(DecodeError, match="enum"):
        codec.decode_one(msgspec.msgpack.encode(wire))


def test_mutable_defaults_are_not_shared() -> None:
    a, b = make_request(), make_request()
    a.stamps["rag"] = 1
    assert b.stamps == {}
    assert a.metadata is not b.metadata


def test_messages_are_frozen_but_stamps_written_later_travel_with_them() -> None:
    # Each stage stamps the message it passes on (runner._runner); the stamp
    # must reach the next stage although the message itself is frozen.
    req = make_request()
    with pytest.raises(AttributeError):
        req.input = "changed"  # type: ignore[misc]
    req.stamps["gateway"] = 123
    codec = Codec(Assembled)
    out = codec.decode_one(codec.encode(Assembled(request=req, prompt="p", dedup_key="k")))
    assert out.request.stamps == {"gateway": 123}


def test_tags_are_short_and_unique() -> None:
    tags = [cls.__struct_config__.tag for cls in TAGGED]
    assert tags == ["req", "ret", "asm", "tok", "done", "fail"]
    assert all(cls.__struct_config__.tag_field == "t" for cls in TAGGED)


@given(any_message)
def test_every_message_is_frozen_untracked_by_gc_and_an_array_on_the_wire(msg: Message) -> None:
    # What the Message base promises every edge type: no field changes after
    # it is made, no GC cost per message, and a compact array that names its type.
    field = msg.__struct_fields__[0]
    with pytest.raises(AttributeError):
        setattr(msg, field, getattr(msg, field))
    assert not gc.is_tracked(msg)
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(msg))
    assert isinstance(wire, list) and wire[0] == type(msg).__struct_config__.tag
    nested = [getattr(msg, "request", None), getattr(msg, "usage", None)]
    for part in [*nested, *getattr(msg, "context", ())]:  # Retrieved's Passages
        if part is not None:
            assert not gc.is_tracked(part)


def test_array_like_wire_form_starts_with_tag() -> None:
    chunk = TokenChunk(request_id="r", session_id=None, reply_to=1, index=0, text="a")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(chunk)) == ["tok", "r", None, 1, 0, "a"]


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        Usage(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        TokenChunk("r", None, 0, 0, "t")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "msg",
    [
        make_request(reply_to=2),
        Retrieved(request=make_request(reply_to=2)),
        Assembled(request=make_request(reply_to=2), prompt="p", dedup_key="k"),
        TokenChunk(request_id="r1", session_id="s1", reply_to=2, index=0, text="t"),
        Completed(
            request_id="r1",
            session_id="s1",
            reply_to=2,
            text="t",
            usage=Usage(prompt_tokens=1, completion_tokens=1),
        ),
    ],
    ids=lambda m: type(m).__name__,
)
def test_reply_info(msg: Message) -> None:
    assert reply_info(msg) == ("r1", "s1", 2)


def test_reply_info_of_failed() -> None:
    assert reply_info(make_failed()) == ("r1", None, 2)


def test_reply_info_rejects_unknown_message() -> None:
    with pytest.raises(TypeError, match="Message"):
        reply_info(Message())


def test_failed_from_keeps_identity() -> None:
    msg = Assembled(request=make_request(reply_to=3), prompt="p", dedup_key="k")
    failed = failed_from(msg, ErrorCode.DEADLINE_EXCEEDED, "too late", "inference")
    assert failed == Failed(
        request_id="r1",
        session_id="s1",
        reply_to=3,
        code=ErrorCode.DEADLINE_EXCEEDED,
        reason="too late",
        stage="inference",
    )
    assert isinstance(failed, Reply)


def test_failed_from_rejects_unknown_message() -> None:
    with pytest.raises(TypeError):
        failed_from(Message(), ErrorCode.INTERNAL, "x", "post")


@given(any_message)
def test_failed_from_any_message(msg: Message) -> None:
    failed = failed_from(msg, ErrorCode.INTERNAL, "why", "stage")
    assert reply_info(failed) == reply_info(msg)


def test_edge_types_cover_every_consumer() -> None:
    assert list(EDGE_TYPES) == ["rag", "assemble", "inference", "post", "stream", "gateway"]
    assert EDGE_TYPES["rag"] is PromptRequest
    assert set(typing.get_args(EDGE_TYPES["assemble"])) == {Retrieved, Failed}
    assert set(typing.get_args(EDGE_TYPES["inference"])) == {Assembled, Failed}
    from mpipeline.messages import StructuredChunk

    for stage in ("post", "stream", "gateway"):
        replies = {TokenChunk, StructuredChunk, Completed, Failed}
        assert set(typing.get_args(EDGE_TYPES[stage])) == replies


def test_edge_types_is_read_only() -> None:
    with pytest.raises(TypeError):
        EDGE_TYPES["extra"] = PromptRequest  # type: ignore[index]
