"""The SSE decoder: the WHATWG rules, chunking anywhere, and what counts as garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpipeline.workers.sse import SSEDecoder, SSEEvent


def decode(*chunks: bytes, strict: bool = False) -> list[SSEEvent]:
    decoder = SSEDecoder(strict=strict)
    events = [e for chunk in chunks for e in decoder.feed(chunk)]
    decoder.finish()
    return events


def test_data_lines_dispatch_on_a_blank_line() -> None:
    assert decode(b"data: a\n\ndata: b\n\n") == [
        SSEEvent("message", b"a"),
        SSEEvent("message", b"b"),
    ]


def test_multi_line_data_is_joined_by_newlines() -> None:
    assert decode(b"data: one\ndata:two\ndata:  three\n\n") == [
        SSEEvent("message", b"one\ntwo\n three")
    ]


def test_event_id_and_retry_fields() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"event: delta\nid: 7\nretry: 1500\ndata: x\n\ndata: y\n\n")
    assert events == [SSEEvent("delta", b"x", "7"), SSEEvent("message", b"y", "7")]
    assert decoder.retry_ms == 1500


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(ending: bytes) -> None:
    stream = ending.join([b"event: e", b"data: 1", b"", b"data: 2", b"", b""])
    assert decode(stream) == [SSEEvent("e", b"1"), SSEEvent("message", b"2")]


def test_crlf_split_across_chunks_is_one_line_ending() -> None:
    assert decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [SSEEvent("message", b"a\nb")]


def test_comments_and_ignored_fields() -> None:
    stream = b": keep-alive\nretry: soon\nid: a\x00b\nfoo: bar\ndata: x\n\n"
    assert decode(stream) == [SSEEvent("message", b"x")]


def test_field_without_colon_and_empty_data() -> None:
    assert decode(b"data\n\ndata:\ndata:\n\n") == [
        SSEEvent("message", b""),
        SSEEvent("message", b"\n"),
    ]


def test_event_without_data_is_not_dispatched_and_resets_the_type() -> None:
    assert decode(b"event: lonely\n\ndata: x\n\n") == [SSEEvent("message", b"x")]


def test_leading_bom_is_dropped_even_split() -> None:
    assert decode(b"\xef\xbb", b"\xbfdata: x\n\n") == [SSEEvent("message", b"x")]
    assert decode(b"\xef\xbb\xbf") == []


def test_multibyte_characters_split_across_chunks() -> None:
    stream = "event: ünï\ndata: 日本語 🎉\n\n".encode()
    for cut in range(1, len(stream)):
        assert decode(stream[:cut], stream[cut:]) == [SSEEvent("ünï", "日本語 🎉".encode())]


def test_strict_rejects_unknown_fields() -> None:
    decoder = SSEDecoder(strict=True)
    with pytest.raises(ValueError, match="unknown field"):
        decoder.feed(b"<html><body>Bad Gateway</body></html>\n\n")


def test_non_utf8_event_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        SSEDecoder().feed(b"event: \xff\n")


@pytest.mark.parametrize(
    "stream", [b"data: {", b"data: x\n", b"event: a\n", b"data: x\r\ndata: y\r\n"]
)
def test_finish_reports_a_body_cut_mid_event(stream: bytes) -> None:
    decoder = SSEDecoder()
    decoder.feed(stream)
    assert decoder.pending
    with pytest.raises(ValueError, match="mid-event"):
        decoder.finish()


def test_finish_is_quiet_between_events() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: x\n\n: trailing comment\n")
    assert not decoder.pending
    decoder.finish()


def test_line_and_event_size_limits() -> None:
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(ValueError, match="too large"):
        for _ in range(20):
            decoder.feed(b"x" * 10)
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(ValueError, match="too large"):
        decoder.feed(b"data: " + b"y" * 40 + b"\n" + b"data: " + b"y" * 70 + b"\n")


# Hypothesis: any valid stream, cut into chunks anywhere, decodes to the same events.

_TEXT = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\x00"), max_size=12
)
_EVENTS = st.lists(
    st.tuples(
        st.one_of(st.none(), _TEXT.filter(lambda s: s != "")),
        st.lists(_TEXT, min_size=1, max_size=3),
    ),
    max_size=6,
)


def _encode(events: list[tuple[str | None, list[str]]], endings: list[bytes]) -> bytes:
    out: list[bytes] = []
    i = 0

    def line(text: str) -> None:
        nonlocal i
        ending = endings[i % len(endings)]
        if not text and ending.startswith(b"\n") and out and out[-1].endswith(b"\r"):
            ending = b"\r"  # "\r" then "\n" would read as one "\r\n", not a blank line
        out.append(text.encode() + ending)
        i += 1

    for name, data in events:
        line(": comment")
        if name is not None:
            line(f"event: {name}")
        for piece in data:
            line(f"data: {piece}")
        line("")
    return b"".join(out)


@given(
    events=_EVENTS,
    endings=st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_any_chunking_gives_the_same_events(
    events: list[tuple[str | None, list[str]]], endings: list[bytes], cuts: list[int]
) -> None:
    stream = _encode(events, endings)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    expected = [SSEEvent(name or "message", "\n".join(data).encode()) for name, data in events]
    assert decode(stream) == expected
    assert decode(*chunks) == expected
