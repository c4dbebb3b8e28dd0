"""Redaction on streams, through the post stage: no planted secret reaches the client,
however the reply is cut into chunks, and the stream equals the redacted whole text."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from mpipeline.config import PipelineConfig, PostConfig, RedactConfig, RedactPattern
from mpipeline.errors import ErrorCode
from mpipeline.messages import Completed, Failed, Message, StructuredChunk, TokenChunk, Usage
from mpipeline.metrics.block import Writer
from mpipeline.metrics.schema import stage_region
from mpipeline.stages import StageContext
from mpipeline.stages.post import Post
from mpipeline.stages.redact import ENTITIES, Redactor
from tests.redaction_samples import planted_text, random_split

USAGE = Usage(prompt_tokens=1, completion_tokens=1)
ACTIONS = st.sampled_from(["mask", "hash", "drop"])


def _stage(*, metrics: Writer | None = None, **redact: object) -> Post:
    post = PostConfig(strip=False, redact=RedactConfig(enabled=True, **redact))  # type: ignore[arg-type]
    return Post(
        post, StageContext("post", 0, 1, PipelineConfig(), segments="mpl-t", metrics=metrics)
    )


def _chunk(text: str, index: int, rid: str = "r") -> TokenChunk:
    return TokenChunk(request_id=rid, session_id=None, reply_to=0, index=index, text=text)


def _done(text: str, rid: str = "r", verbatim: bool = False) -> Completed:
    return Completed(
        request_id=rid, session_id=None, reply_to=0, text=text, usage=USAGE, verbatim=verbatim
    )


def _stream(stage: Post, pieces: Sequence[str], rid: str = "r") -> tuple[list[TokenChunk], Message]:
    out: list[Message] = []
    for i, piece in enumerate(pieces):
        out += stage.process(_chunk(piece, i, rid))
    out += stage.process(_done("".join(pieces), rid))
    chunks = [m for m in out[:-1] if isinstance(m, TokenChunk)]
    assert len(chunks) == len(out) - 1
    return chunks, out[-1]


@settings(max_examples=300)
@given(st.randoms(use_true_random=False), st.integers(1, 4), st.integers(1, 40), ACTIONS)
def test_no_planted_secret_reaches_the_client(
    rng: random.Random, secrets: int, pieces: int, action: str
) -> None:
    text, planted = planted_text(rng, secrets)
    actions: dict[str, Any] = dict.fromkeys(ENTITIES, action)
    stage = _stage(**actions)
    chunks, done = _stream(stage, random_split(rng, text, pieces))
    streamed = "".join(c.text for c in chunks)
    for value in planted:
        assert value not in streamed, (value, text)
    assert isinstance(done, Completed)
    assert streamed == done.text == stage._redactor.redact(text, counted=False)  # type: ignore[union-attr]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert not stage._streams  # the state went with the Completed


# Text made of what the break rule is about: digits, capitals, separators, "Bearer",
# pieces of entities. Whatever it is, the stream must equal the whole.
PIECES = st.sampled_from(
    [
        "a", "Z", "7", "0", " ", "  ", "\n", ".", "-", "@", ":", "+", "(", ")", "/", "=",
        "Bearer ", "bearer", "sk-", "AKIA", "DE89", "4111", " 1111", "555", "x@y.io",
        "192.168.", "::", "eyJ", "_", ",", "é", "EMP-",
    ]
)  # fmt: skip


@settings(max_examples=400)
@given(st.lists(PIECES, max_size=60).map("".join), st.lists(st.integers(0, 200), max_size=12))
def test_any_split_gives_the_whole_texts_redaction(text: str, cuts: list[int]) -> None:
    redactor = Redactor({}, [])
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    out, held = [], ""
    for piece in pieces:
        final, held = redactor.split(held + piece, len(held))
        out.append(final)
    out.append(redactor.redact(held))
    assert "".join(out) == redactor.redact(text)


def test_a_chunk_with_nothing_to_hold_goes_out_in_the_same_step() -> None:
    stage = _stage()
    first = _chunk("Hello! How can I help you today? ", 0)
    assert list(stage.process(first)) == [first]  # the very message: no copy, no wait
    held = list(stage.process(_chunk("Mail me at jo", 1)))
    assert [m.text for m in held] == ["Mail me at "]  # type: ignore[attr-defined]
    rest = list(stage.process(_chunk("e@example.com today! ", 2)))
    assert [m.text for m in rest] == ["[email] today! "]  # type: ignore[attr-defined]


def test_a_chunk_held_whole_keeps_indexes_dense() -> None:
    stage = _stage()
    chunks, done = _stream(stage, ["4111", " 1111", " 1111 1111", " is mine"])
    assert [(c.index, c.text) for c in chunks] == [(0, "[card] is "), (1, "mine")]
    assert isinstance(done, Completed) and done.text == "[card] is mine"


def test_the_cap_holds_on_streams() -> None:
    post = PostConfig(max_output_chars=5)
    stage = Post(post, StageContext("post", 0, 1, PipelineConfig()))
    chunks, done = _stream(stage, ["ab", "cd", "ef 123-45-6789 and more", "gh"])
    assert "".join(c.text for c in chunks) == "abcde"
    assert isinstance(done, Completed) and (done.text, done.finish_reason) == ("abcde", "length")


def test_json_mode_and_structured_chunks_are_left_alone() -> None:
    stage = _stage()
    verbatim = _done('{"email": "a@b.co"}', rid="j", verbatim=True)
    assert list(stage.process(verbatim)) == [verbatim]
    opted_in = _stage(json_output=True)
    (out,) = opted_in.process(verbatim)
    assert isinstance(out, Completed) and out.text == '{"email": "[email]"}'
    # A structured chunk (a tool call's JSON in raw) passes as it came, after the
    # text held before it, which is released first.
    raw = b'{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"a@b.co"}}]}}]}'
    structured = StructuredChunk(
        request_id="s", session_id=None, reply_to=0, index=1, text="", raw=raw
    )
    assert [m.text for m in stage.process(_chunk("write to bob", 0, "s"))] == ["write to "]  # type: ignore[attr-defined]
    out_msgs = list(stage.process(structured))
    assert [type(m) for m in out_msgs] == [TokenChunk, StructuredChunk]
    assert out_msgs[0].text == "bob"  # type: ignore[attr-defined]
    assert out_msgs[1] == msgspec.structs.replace(structured, index=2)  # renumbered only


def test_a_failure_releases_the_tail_and_the_state() -> None:
    stage = _stage()
    list(stage.process(_chunk("call 555 123", 0)))
    failed = Failed(
        request_id="r",
        session_id=None,
        reply_to=0,
        code=ErrorCode.STAGE_ERROR,
        reason="x",
        stage="inference",
    )
    out = list(stage.process(failed))
    assert [getattr(m, "text", None) for m in out[:-1]] == ["555 123"] and out[-1] is failed
    assert not stage._streams


def test_custom_patterns_from_config_and_metrics_by_kind() -> None:
    region = stage_region("post", "post-0", [])
    cells = [0.0] * region.size
    writer = Writer(cells, 0, region, None)  # type: ignore[arg-type]
    stage = _stage(metrics=writer, patterns=[RedactPattern(name="emp", regex=r"EMP-\d{6}")])
    chunks, done = _stream(stage, ["id EMP-12", "3456 and a@b.co, a@", "b.co."])
    assert "".join(c.text for c in chunks) == "id [emp] and [email], [email]."
    assert isinstance(done, Completed) and done.text == "id [emp] and [email], [email]."
    counts = {labels[0]: cells[off] for (fam, labels), off in region.items() if fam == "redactions"}
    assert counts["email"] == 2 and counts["custom"] == 1  # the stream's, not again the result's
    assert sum(counts.values()) == 3


def test_redaction_is_off_by_default_and_chunks_pass_as_they_are() -> None:
    stage = Post(PostConfig(), StageContext("post", 0, 1, PipelineConfig()))
    chunk = _chunk("ssn 123-45-67", 0)
    assert list(stage.process(chunk)) == [chunk]
    (done,) = stage.process(_done("ssn 123-45-6789"))
    assert isinstance(done, Completed) and done.text == "ssn 123-45-6789"
