"""Assemble: templates, context placement, truncation and the dedup key."""

from __future__ import annotations

import pytest

from mpipeline.config import AssembleConfig, PipelineConfig
from mpipeline.errors import ErrorCode
from mpipeline.messages import Assembled, Failed, Passage, PromptRequest, Retrieved, Turn
from mpipeline.routing import dedup_key
from mpipeline.stages import StageContext
from mpipeline.stages.assemble import Assemble, conversation, render

CUE = "<|im_start|>assistant\n"
CTX = [
    Passage(source="a.md", text="Paris is in France.", score=2.5),
    Passage(source="b.txt", text="Lyon too.", score=1.0),
]


def _stage(**fields: object) -> Assemble:
    cfg = AssembleConfig(**fields)  # type: ignore[arg-type]
    return Assemble(cfg, StageContext("assemble", 0, 1, PipelineConfig()))


def _one(stage: Assemble, msg: Retrieved | PromptRequest) -> Assembled:
    out = list(stage.process(msg))
    assert len(out) == 1 and isinstance(out[0], Assembled)
    return out[0]


def _req(text: str = "Where is Paris?", **kw: object) -> PromptRequest:
    return PromptRequest(request_id="r1", input=text, **kw)  # type: ignore[arg-type]


def test_chatml_without_context() -> None:
    out = _one(_stage(system_prompt="Be brief."), Retrieved(request=_req()))
    assert out.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhere is Paris?<|im_end|>\n" + CUE
    )


def test_chatml_puts_context_in_the_system_message_most_relevant_first() -> None:
    out = _one(_stage(system_prompt="Be brief."), Retrieved(request=_req(), context=CTX))
    system = "Be brief.\n\nContext:\n[a.md] Paris is in France.\n\n[b.txt] Lyon too."
    assert out.prompt == (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        "<|im_start|>user\nWhere is Paris?<|im_end|>\n" + CUE
    )
    assert out.prompt.index("[a.md]") < out.prompt.index("[b.txt]") < out.prompt.index("user")


def test_chatml_with_no_system_prompt_has_no_system_turn() -> None:
    assert render("chatml", conversation("", _req("hi"), [])) == (
        "<|im_start|>user\nhi<|im_end|>\n" + CUE
    )
    with_ctx = render("chatml", conversation("", _req("hi"), CTX[:1]))
    assert with_ctx.startswith("<|im_start|>system\nContext:\n[a.md] Paris is in France.")


@pytest.mark.parametrize(
    ("system", "context", "expected"),
    [
        ("Sys.", [], "Sys.\n\nq"),
        ("", [], "q"),
        ("", CTX[1:], "Context:\n[b.txt] Lyon too.\n\nq"),
    ],
)
def test_plain_template(system: str, context: list[Passage], expected: str) -> None:
    assert render("plain", conversation(system, _req("q"), context)) == expected


def test_a_prompt_request_is_accepted_directly_when_rag_is_off() -> None:
    req = _req()
    out = _one(_stage(template="plain", system_prompt=""), req)
    assert out.request is req
    assert out.prompt == "Where is Paris?"


def test_a_prompt_whose_input_alone_is_too_long_is_refused_not_cut() -> None:
    stage = _stage(max_prompt_chars=60)
    [out] = list(stage.process(Retrieved(request=_req("x" * 500 + " the question?"), context=CTX)))
    assert isinstance(out, Failed)
    assert out.code == ErrorCode.INVALID_REQUEST and "60 characters" in out.reason


def test_short_prompts_are_not_touched() -> None:
    stage = _stage(template="plain", system_prompt="", max_prompt_chars=15)
    assert _one(stage, _req("exactly 15 char")).prompt == "exactly 15 char"


def test_dedup_key_is_the_routing_key_of_the_request_whatever_the_context() -> None:
    stage = _stage()
    req = _req("same", max_tokens=7)
    plain = _one(stage, Retrieved(request=req))
    with_ctx = _one(stage, Retrieved(request=req, context=CTX))
    assert plain.dedup_key == with_ctx.dedup_key == dedup_key(req)
    assert _one(stage, _req("different")).dedup_key != plain.dedup_key


def test_history_goes_between_the_system_turn_and_the_input() -> None:
    history = [Turn(role="user", content="Hi"), Turn(role="assistant", content="Hello!")]
    out = _one(_stage(system_prompt="Be brief."), Retrieved(request=_req(history=history)))
    assert out.messages == [
        Turn(role="system", content="Be brief."),
        *history,
        Turn(role="user", content="Where is Paris?"),
    ]
    assert out.prompt.index("Hello!") < out.prompt.index("Where is Paris?")


def test_a_clients_system_turn_replaces_the_configured_one_and_keeps_the_context() -> None:
    history = [Turn(role="system", content="Answer in French.")]
    out = _one(
        _stage(system_prompt="Be brief."), Retrieved(request=_req(history=history), context=CTX[1:])
    )
    assert out.messages[0] == Turn(
        role="system", content="Answer in French.\n\nContext:\n[b.txt] Lyon too."
    )
    assert [t.role for t in out.messages] == ["system", "user"]


def test_the_dedup_key_depends_on_the_history() -> None:
    plain = _one(_stage(), Retrieved(request=_req()))
    after = _one(_stage(), Retrieved(request=_req(history=[Turn(role="user", content="x")])))
    assert plain.dedup_key != after.dedup_key


def test_long_histories_lose_their_oldest_turns_first() -> None:
    history = [Turn(role="user", content="a" * 100), Turn(role="assistant", content="b" * 100)]
    out = _one(
        _stage(max_prompt_chars=150, system_prompt="S"), Retrieved(request=_req(history=history))
    )
    assert out.messages[0].role == "system"
    assert out.messages[-1].content == "Where is Paris?"
    assert all(t.content != "a" * 100 for t in out.messages)
