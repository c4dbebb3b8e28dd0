"""Post: trims, caps, and passes everything that is not a final result through."""

from __future__ import annotations

from mpipeline.config import PipelineConfig, PostConfig
from mpipeline.errors import ErrorCode
from mpipeline.messages import Completed, Failed, Message, TokenChunk, Usage
from mpipeline.stages import StageContext
from mpipeline.stages.post import Post

USAGE = Usage(prompt_tokens=3, completion_tokens=2)


def _stage(**fields: object) -> Post:
    return Post(PostConfig(**fields), StageContext("post", 0, 1, PipelineConfig()))  # type: ignore[arg-type]


def _done(text: str, finish: str = "stop") -> Completed:
    return Completed(
        request_id="r1",
        session_id="s",
        reply_to=1,
        text=text,
        usage=USAGE,
        finish_reason=finish,
        stamps={"rag": 1},
    )


def _one(stage: Post, msg: Message) -> Message:
    out = list(stage.process(msg))  # type: ignore[arg-type]
    assert len(out) == 1
    return out[0]


def test_strips_surrounding_whitespace_and_keeps_the_rest() -> None:
    out = _one(_stage(), _done("  hello  world \n"))
    assert isinstance(out, Completed)
    assert out.text == "hello  world"
    assert (out.request_id, out.session_id, out.reply_to) == ("r1", "s", 1)
    assert out.usage == USAGE
    assert out.stamps == {"rag": 1}
    assert out.finish_reason == "stop"


def test_strip_can_be_turned_off() -> None:
    msg = _done(" padded ")
    assert _one(_stage(strip=False), msg) is msg


def test_caps_long_output_and_says_so() -> None:
    out = _one(_stage(max_output_chars=5), _done("abcdefghij"))
    assert isinstance(out, Completed)
    assert (out.text, out.finish_reason) == ("abcde", "length")


def test_output_at_the_cap_is_untouched() -> None:
    msg = _done("abcde")
    assert _one(_stage(max_output_chars=5), msg) is msg


def test_chunks_within_the_cap_and_errors_pass_through_unchanged() -> None:
    stage = _stage(max_output_chars=7)
    chunk = TokenChunk(request_id="r1", session_id=None, reply_to=0, index=0, text="  long ")
    failed = Failed(
        request_id="r1",
        session_id=None,
        reply_to=0,
        code=ErrorCode.STAGE_ERROR,
        reason="boom",
        stage="assemble",
    )
    assert _one(stage, chunk) is chunk
    assert _one(stage, failed) is failed


def test_the_cap_cuts_a_stream_too() -> None:
    """Issue 17: with max_output_chars = 5, a streamed 38-character chunk went out whole."""
    stage = _stage(max_output_chars=5)
    chunk = TokenChunk(request_id="r1", session_id=None, reply_to=0, index=0, text="x" * 38)
    out = _one(stage, chunk)
    assert isinstance(out, TokenChunk) and out.text == "xxxxx"
    later = TokenChunk(request_id="r1", session_id=None, reply_to=0, index=1, text="more")
    assert list(stage.process(later)) == []
