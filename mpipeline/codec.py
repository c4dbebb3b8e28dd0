"""Turn ring records into typed messages and back; the only code that does.

A record is always a msgpack *array* of one or more messages, so a producer
that has several messages ready writes one record and the consumer pays one
decode call for the batch. Build one ``Codec`` per edge per process: msgspec
compiles the edge's type into the decoder once.

Decoding reads straight from the ``memoryview`` the ring hands out, without a
copy, and the decoded messages share no memory with it (no ``Raw`` or ``bytes``
views in any message), so the ring may reuse the slot as soon as a decode
returns. Decoder memory is bounded by the record size, which the ring caps
(``max_record``): msgspec never trusts a length prefix beyond the bytes that
are actually there, and no message has an ``Any`` field to nest into.

Struct options (``array_like=True, gc=False`` in ``messages.py``) were adopted
after measuring them (``python -m bench.codec_timeit``; table in the README): on
realistic messages ``array_like`` shrinks records 12-40 % and encodes 18-28 %
faster, and ``gc=False`` takes another 5-10 % off decoding. Together, decoding a
message from a 64-message record drops from 146 to 109 ns for a TokenChunk and
from 500 to 456 ns for a PromptRequest with a 512 B prompt. That is far from
msgspec's "2x", since most of a request's decode time goes into its strings and dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Generic, NamedTuple, TypeVar, get_args, overload

import msgspec

from mpipeline.errors import DecodeError

__all__ = ["Codec"]

T = TypeVar("T")

# msgspec before 0.23 reports invalid UTF-8 inside a str as UnicodeDecodeError,
# 0.23 as a DecodeError; both get the same sentence of ours (``_why``).
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError)
# How much of a bad record a DecodeError shows, in bytes (as hex).
ERROR_PREVIEW_BYTES = 32


class Codec(Generic[T]):
    """Encoder and decoders for the messages of one edge.

    ``edge_type`` is a message class or a union of them (``messages.ToPost``).
    ``max_record`` is the ring's record size limit; larger input is refused
    before decoding. Annotate unions, as msgspec does: ``Codec[ToPost](ToPost)``.
    """

    __slots__ = ("_decode_many", "_decode_one", "_encoder", "_max_record", "_name")

    @overload
    def __init__(self: Codec[T], edge_type: type[T], *, max_record: int | None = None) -> None: ...
    @overload
    def __init__(self: Codec[Any], edge_type: Any, *, max_record: int | None = None) -> None: ...
    def __init__(self, edge_type: Any, *, max_record: int | None = None) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        batch = Annotated[list[edge_type], msgspec.Meta(min_length=1)]
        self._decode_many = msgspec.msgpack.Decoder(batch).decode
        self._decode_one = msgspec.msgpack.Decoder(tuple[edge_type]).decode
        self._max_record = max_record
        self._name = " | ".join(t.__name__ for t in get_args(edge_type) or (edge_type,))

    def encode(self, msg: T) -> bytes:
        """Encode a record that holds the single message ``msg``."""
        return self._encoder.encode((msg,))

    def encode_many(self, msgs: Sequence[T]) -> bytes:
        """Encode one record that holds every message of ``msgs``, in order.

        :raises ValueError: if ``msgs`` is empty (a record holds at least one)
        """
        return self._encoder.encode(_as_batch(msgs))

    def encode_into(self, msgs: Sequence[T], buf: bytearray, offset: int = 0) -> int:
        """Encode a record of ``msgs`` into ``buf`` at ``offset``; return its length.

        ``buf`` is resized to end exactly at the record (its allocation is kept),
        so one scratch bytearray serves every record a process writes.

        :raises ValueError: if ``msgs`` is empty (a record holds at least one)
        """
        self._encoder.encode_into(_as_batch(msgs), buf, offset)
        return len(buf) - offset

    def decode_many(self, buf: bytes | bytearray | memoryview) -> list[T]:
        """Decode every message of the record in ``buf``.

        :raises DecodeError: if ``buf`` is too large, is not msgpack, is not a
            non-empty array, or holds a message this edge does not carry
        """
        if self._max_record is not None and _nbytes(buf) > self._max_record:
            raise self._too_large(buf)
        try:
            batch: list[T] = self._decode_many(buf)
        except _DECODE_ERRORS as exc:
            raise self._error(buf, _why(exc)) from exc
        return batch

    def decode_one(self, buf: bytes | bytearray | memoryview) -> T:
        """Decode a record that must hold exactly one message.

        :raises DecodeError: as ``decode_many``, and if the record holds more
            or fewer than one message
        """
        if self._max_record is not None and _nbytes(buf) > self._max_record:
            raise self._too_large(buf)
        try:
            msg: T = self._decode_one(buf)[0]
        except _DECODE_ERRORS as exc:
            raise self._error(buf, _why(exc)) from exc
        return msg

    def _too_large(self, buf: bytes | bytearray | memoryview) -> DecodeError:
        return self._error(buf, f"larger than max_record={self._max_record}")

    def _error(self, buf: bytes | bytearray | memoryview, why: str) -> DecodeError:
        # Released at once so that the caller can still release its own view.
        with memoryview(buf) as view, view.cast("B") as octets:
            size = octets.nbytes
            head = octets[:ERROR_PREVIEW_BYTES].hex(" ")
        more = " ..." if size > ERROR_PREVIEW_BYTES else ""
        return DecodeError(f"bad {self._name} record of {size} bytes ({head}{more}): {why}")


# Messages per ring record: enough to amortize ring and codec calls, few
# enough that a record of ordinary prompts stays far below max_record.
PER_RECORD = 64

M = TypeVar("M")

# What an encoder raises for a message it cannot encode: an int beyond 64 bits
# (OverflowError), a value of a type it does not know, a str with lone surrogates.
UNENCODABLE = (OverflowError, msgspec.EncodeError, TypeError, ValueError, UnicodeEncodeError)


class Packed(NamedTuple, Generic[M]):
    """``pack_records``' answer: what to write and what the caller must answer instead."""

    # Each record with the messages it holds, in order.
    records: list[tuple[bytes, list[M]]]
    # Messages too large for any record of this ring.
    too_large: list[M]
    # Messages the encoder refused, each with its reason.
    unencodable: list[tuple[M, str]]


def pack_records(encode: Callable[[list[M]], bytes], msgs: list[M], max_record: int) -> Packed[M]:
    """Encode ``msgs`` once into records of at most ``PER_RECORD`` messages.

    A group that comes out over ``max_record``, or that the encoder refuses, is
    re-encoded one message per record, so one bad message costs only itself:
    a poisoned batch left at the head of a queue would stall every message
    behind it for good. Nothing is dropped: what cannot be written comes back
    in ``too_large`` or ``unencodable`` for the caller to answer.
    """
    records: list[tuple[bytes, list[M]]] = []
    too_large: list[M] = []
    unencodable: list[tuple[M, str]] = []
    for k in range(0, len(msgs), PER_RECORD):
        part = msgs[k : k + PER_RECORD]
        try:
            record = encode(part)
        except UNENCODABLE:
            pass
        else:
            if len(record) <= max_record:
                records.append((record, part))
                continue
        for msg in part:
            try:
                one = encode([msg])
            except UNENCODABLE as exc:
                unencodable.append((msg, f"cannot be encoded: {exc}"))
                continue
            if len(one) <= max_record:
                records.append((one, [msg]))
            else:
                too_large.append(msg)
    return Packed(records, too_large, unencodable)


def _why(exc: Exception) -> str:
    """Our sentence for the faults we can name; msgspec's own text for the rest."""
    if isinstance(exc, UnicodeDecodeError) or "utf-8" in str(exc).lower():
        return "a string is not valid UTF-8"
    return str(exc)


def _nbytes(buf: bytes | bytearray | memoryview) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def _as_batch(msgs: Sequence[T]) -> list[T] | tuple[T, ...]:
    if not msgs:
        raise ValueError("a record holds at least one message")
    return msgs if isinstance(msgs, list | tuple) else list(msgs)
