from __future__ import annotations

import typing

import msgspec
import pytest
from hypothesis import given

from mpipeline.errors import ErrorCode
from mpipeline.messages import (
    EDGE_TYPES,
    Assembled,
    Completed,
    Failed,
    Message,
    Passage,
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


def test_priority_orders_critical_first() -> None:
    assert sorted(Priority, reverse=True)[-1] is Priority.CRITICAL
    assert [int(p) for p in Priority] == [0, 1, 2, 3]


def test_request_defaults() -> None:
    req = PromptRequest(request_id="r1", input="hi")
    assert req.session_id is None
    assert req.metadata == {}
    assert req.priority is Priority.NORMAL
    assert req.deadline_ns == 0
    assert req.reply_to == 0
    assert req.stream is False
    assert req.max_tokens is None
    assert req.stamps == {}


def test_mutable_defaults_are_not_shared() -> None:
    a, b = make_request(), make_request()
    a.stamps["rag"] = 1
    assert b.stamps == {}
    assert a.metadata is not b.metadata


def test_messages_are_frozen_but_stamps_are_writable() -> None:
    req = make_request()
    with pytest.raises(AttributeError):
        req.input = "changed"  # type: ignore[misc]
    req.stamps["gateway"] = 123
    assert req.stamps == {"gateway": 123}


def test_tags_are_short_and_unique() -> None:
    tags = [cls.__struct_config__.tag for cls in TAGGED]
    assert tags == ["req", "ret", "asm", "tok", "done", "fail"]
    assert all(cls.__struct_config__.tag_field == "t" for cls in TAGGED)


def test_options_are_inherited() -> None:
    for cls in [*TAGGED, Passage, Usage]:
        config = cls.__struct_config__
        assert config.frozen and config.array_like and not config.gc


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
    for stage in ("post", "stream", "gateway"):
        assert set(typing.get_args(EDGE_TYPES[stage])) == {TokenChunk, Completed, Failed}


def test_edge_types_is_read_only() -> None:
    with pytest.raises(TypeError):
        EDGE_TYPES["extra"] = PromptRequest  # type: ignore[index]
