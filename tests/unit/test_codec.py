from __future__ import annotations

import collections
import typing
from typing import Any

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mpipeline.codec import ERROR_PREVIEW_BYTES, Codec
from mpipeline.errors import DecodeError, ErrorCode, MPipelineError
from mpipeline.messages import (
    EDGE_TYPES,
    Completed,
    Failed,
    Message,
    PromptRequest,
    Retrieved,
    TokenChunk,
    ToPost,
    Usage,
)
from tests.strategies import EDGE_MESSAGES, any_message

STAGES = list(EDGE_TYPES)


def chunk(index: int = 0, text: str = "tok") -> TokenChunk:
    return TokenChunk(request_id="r1", session_id="s1", reply_to=0, index=index, text=text)


def done() -> Completed:
    return Completed(
        request_id="r1",
        session_id="s1",
        reply_to=0,
        text="all",
        usage=Usage(prompt_tokens=3, completion_tokens=4),
    )


def post_codec(max_record: int | None = None) -> Codec[ToPost]:
    return Codec[ToPost](ToPost, max_record=max_record)


# Round trips


@pytest.mark.parametrize("stage", STAGES)
@given(data=st.data())
def test_round_trip_one(stage: str, data: st.DataObject) -> None:
    codec: Codec[Any] = Codec(EDGE_TYPES[stage])
    msg = data.draw(EDGE_MESSAGES[stage])
    record = codec.encode(msg)
    assert codec.decode_one(record) == msg
    assert codec.decode_many(record) == [msg]


@pytest.mark.parametrize("stage", STAGES)
@settings(max_examples=50)
@given(data=st.data())
def test_round_trip_batch(stage: str, data: st.DataObject) -> None:
    codec: Codec[Any] = Codec(EDGE_TYPES[stage])
    msgs = data.draw(st.lists(EDGE_MESSAGES[stage], min_size=1, max_size=5))
    assert codec.decode_many(codec.encode_many(msgs)) == msgs


def test_round_trip_keeps_types() -> None:
    codec = post_codec()
    msgs: list[ToPost] = [chunk(), done(), chunk(1)]
    decoded = codec.decode_many(codec.encode_many(msgs))
    assert [type(m) for m in decoded] == [TokenChunk, Completed, TokenChunk]
    assert isinstance(decoded[1], Completed) and isinstance(decoded[1].usage, Usage)


def test_single_type_codec_is_typed() -> None:
    codec = Codec(PromptRequest)
    req = PromptRequest(request_id="r", input="x" * 512, stamps={"gateway": 1})
    got: PromptRequest = codec.decode_one(codec.encode(req))
    assert got == req


def test_big_batch() -> None:
    codec = post_codec()
    msgs = [chunk(i, f"t{i}") for i in range(10_000)]
    assert codec.decode_many(codec.encode_many(msgs)) == msgs


def test_encode_many_accepts_any_sequence() -> None:
    codec = post_codec()
    msgs = [chunk(0), chunk(1)]
    expected = codec.encode_many(msgs)
    assert codec.encode_many(tuple(msgs)) == expected
    assert codec.encode_many(collections.deque(msgs)) == expected


def test_encode_is_a_batch_of_one() -> None:
    codec = post_codec()
    assert codec.encode(chunk()) == codec.encode_many([chunk()])


# Encoding into a scratch buffer


def test_encode_into_at_offset() -> None:
    codec = post_codec()
    buf = bytearray(b"HEADER")
    size = codec.encode_into([chunk(), done()], buf, 6)
    assert buf[:6] == b"HEADER"
    assert len(buf) == 6 + size
    assert bytes(buf[6:]) == codec.encode_many([chunk(), done()])
    assert codec.decode_many(memoryview(buf)[6:]) == [chunk(), done()]


def test_encode_into_reuses_and_truncates() -> None:
    codec = post_codec()
    buf = bytearray()
    big = codec.encode_into([done()] * 10, buf)
    small = codec.encode_into([chunk()], buf)
    assert small < big
    assert len(buf) == small
    assert codec.decode_one(buf) == chunk()


def test_empty_batch_is_refused() -> None:
    codec = post_codec()
    with pytest.raises(ValueError, match="at least one"):
        codec.encode_many([])
    with pytest.raises(ValueError, match="at least one"):
        codec.encode_into([], bytearray())


# Zero-copy decoding


def test_decode_from_memoryview_slice() -> None:
    codec = post_codec()
    record = codec.encode_many([chunk(), done()])
    segment = bytearray(b"\xff" * 16 + record + b"\xff" * 16)
    view = memoryview(segment)[16 : 16 + len(record)]
    assert codec.decode_many(view) == [chunk(), done()]
    assert codec.decode_one(memoryview(codec.encode(done()))) == done()


def test_decoded_messages_do_not_hold_the_buffer() -> None:
    codec = post_codec()
    segment = bytearray(codec.encode_many([chunk(text="x" * 100), done()]))
    view = memoryview(segment)
    decoded = codec.decode_many(view)
    view.release()  # raises BufferError if anything still exported the buffer
    segment[:] = b"\x00" * len(segment)
    assert decoded == [chunk(text="x" * 100), done()]


# Bad records


@pytest.mark.parametrize("consumer", STAGES)
@given(msg=any_message)
def test_wrong_message_for_edge(consumer: str, msg: Message) -> None:
    edge = EDGE_TYPES[consumer]
    assume(not isinstance(msg, typing.get_args(edge) or edge))
    codec: Codec[Any] = Codec(edge)
    record = msgspec.msgpack.encode([msg])
    with pytest.raises(DecodeError):
        codec.decode_many(record)
    with pytest.raises(DecodeError):
        codec.decode_one(record)


def test_wrong_type_mid_batch() -> None:
    record = msgspec.msgpack.encode(
        [chunk(), Retrieved(request=PromptRequest(request_id="r", input="i"))]
    )
    with pytest.raises(
        DecodeError, match=r"TokenChunk \| StructuredChunk \| Completed \| Failed record"
    ):
        post_codec().decode_many(record)


@given(st.binary(max_size=256))
def test_garbage_raises_only_decode_error(data: bytes) -> None:
    codec = Codec[Any](EDGE_TYPES["assemble"])
    for decode in (codec.decode_many, codec.decode_one):
        try:
            decode(data)
        except DecodeError:
            pass


@given(msgs=st.lists(EDGE_MESSAGES["post"], min_size=1, max_size=4), data=st.data())
def test_corrupted_records_raise_only_decode_error(msgs: list[Any], data: st.DataObject) -> None:
    codec = post_codec()
    record = bytearray(codec.encode_many(msgs))
    index = data.draw(st.integers(0, len(record) - 1))
    record[index] = data.draw(st.integers(0, 255))
    try:
        codec.decode_many(record)
    except DecodeError:
        pass


@given(msgs=st.lists(EDGE_MESSAGES["inference"], min_size=1, max_size=4), data=st.data())
def test_truncated_records_raise_decode_error(msgs: list[Any], data: st.DataObject) -> None:
    codec: Codec[Any] = Codec(EDGE_TYPES["inference"])
    record = codec.encode_many(msgs)
    cut = data.draw(st.integers(0, len(record) - 1))
    with pytest.raises(DecodeError):
        codec.decode_many(record[:cut])


def test_invalid_utf8_raises_decode_error() -> None:
    record = bytearray(post_codec().encode(chunk(text="ok")))
    record[record.rindex(b"ok")] = 0xFF
    with pytest.raises(DecodeError, match="a string is not valid UTF-8$"):
        post_codec().decode_many(record)
    with pytest.raises(DecodeError, match="a string is not valid UTF-8$"):
        post_codec().decode_one(record)


def test_trailing_bytes_raise_decode_error() -> None:
    with pytest.raises(DecodeError):
        post_codec().decode_many(post_codec().encode(chunk()) + b"\x00")


@pytest.mark.parametrize("record", [b"", b"\x90", msgspec.msgpack.encode(chunk())])
def test_record_must_be_a_non_empty_array(record: bytes) -> None:
    with pytest.raises(DecodeError):
        post_codec().decode_many(record)


@pytest.mark.parametrize("count", [0, 2])
def test_decode_one_needs_exactly_one(count: int) -> None:
    record = msgspec.msgpack.encode([chunk()] * count)
    with pytest.raises(DecodeError, match="length 1"):
        post_codec().decode_one(record)


def test_unknown_error_code_is_refused() -> None:
    good = Failed(
        request_id="r",
        session_id=None,
        reply_to=0,
        code=ErrorCode.INTERNAL,
        reason="x",
        stage="post",
    )
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode([good]))
    wire[0][4] = "no_such_code"
    with pytest.raises(DecodeError, match="no_such_code"):
        post_codec().decode_one(msgspec.msgpack.encode(wire))


# Error reports


def test_decode_error_shows_head_of_record() -> None:
    record = b"\xc1" + bytes(range(100))
    with pytest.raises(DecodeError) as info:
        post_codec().decode_many(memoryview(record))
    message = str(info.value)
    assert f"of {len(record)} bytes" in message
    assert record[:ERROR_PREVIEW_BYTES].hex(" ") + " ..." in message
    assert record[: ERROR_PREVIEW_BYTES + 1].hex(" ") not in message
    assert isinstance(info.value, MPipelineError)
    assert isinstance(info.value.__cause__, msgspec.DecodeError)


def test_decode_error_of_short_record_shows_it_all() -> None:
    with pytest.raises(DecodeError, match=r"\(c1\)"):
        post_codec().decode_one(b"\xc1")


def test_decode_error_names_single_type() -> None:
    with pytest.raises(DecodeError, match="bad PromptRequest record"):
        Codec(PromptRequest).decode_many(b"\xc1")


# Size bound


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_max_record(wrap: Any) -> None:
    record = post_codec().encode(chunk())
    fits = post_codec(max_record=len(record))
    assert fits.decode_one(wrap(record)) == chunk()
    assert fits.decode_many(wrap(record)) == [chunk()]
    small = post_codec(max_record=len(record) - 1)
    with pytest.raises(DecodeError, match=f"max_record={len(record) - 1}"):
        small.decode_many(wrap(record))
    with pytest.raises(DecodeError, match="max_record"):
        small.decode_one(wrap(record))


def test_max_record_counts_bytes_of_wide_views() -> None:
    record = post_codec().encode(chunk(text="x" * 200))
    padded = record + b"\x00" * (-len(record) % 4)
    view = memoryview(padded).cast("I")
    with pytest.raises(DecodeError, match="max_record") as info:
        post_codec(max_record=len(padded) - 1).decode_many(view)
    assert padded[:ERROR_PREVIEW_BYTES].hex(" ") + " ..." in str(info.value)


def test_view_can_be_released_after_decode_error() -> None:
    view = memoryview(bytearray(b"\xc1" * 64))
    with pytest.raises(DecodeError):
        post_codec().decode_many(view)
    view.release()


def test_pack_records_groups_splits_oversize_groups_and_reports_huge_messages() -> None:
    from mpipeline.codec import PER_RECORD, pack_records

    encoder = msgspec.msgpack.Encoder()
    small = [f"m{i}" for i in range(PER_RECORD + 3)]
    records, too_large, unencodable = pack_records(encoder.encode, small, 1 << 20)
    assert [len(part) for _, part in records] == [PER_RECORD, 3]
    assert [msgspec.msgpack.decode(r) for r, _ in records] == [small[:PER_RECORD], small[-3:]]
    assert too_large == []
    # A group over the limit is re-encoded one message per record; a message that
    # fits no record comes back to the caller instead of being dropped.
    mixed = ["a" * 40, "b" * 40, "c" * 200]
    records, too_large, unencodable = pack_records(encoder.encode, mixed, 100)
    assert [part for _, part in records] == [["a" * 40], ["b" * 40]]
    assert all(len(r) <= 100 for r, _ in records)
    assert too_large == ["c" * 200]
    assert unencodable == []


def test_pack_records_fails_only_the_message_it_cannot_encode() -> None:
    # Issue 15: one int beyond 64 bits raised out of the whole batch's encode
    # and poisoned it. Now the rest is written and the bad one comes back.
    from mpipeline.codec import pack_records

    encoder = msgspec.msgpack.Encoder()
    msgs: list[object] = [1, 2**64, 3, "x\ud800", 4]
    records, too_large, unencodable = pack_records(encoder.encode, msgs, 1 << 20)
    assert [part for _, part in records] == [[1], [3], [4]]
    assert too_large == []
    assert [m for m, _ in unencodable] == [2**64, "x\ud800"]
    assert "cannot be encoded" in unencodable[0][1]
