"""Assemble's token budget: whole turns, newest kept, context shrunk next, refusals.

Counts here use ``tokens.Estimate`` (the counter of every worker but
llama_cpp); ``test_assemble_tokens.py`` checks the llama_cpp vocabulary and
what a real OpenAI worker sends.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpipeline.config import AssembleConfig, PipelineConfig
from mpipeline.errors import ErrorCode
from mpipeline.messages import Assembled, Failed, Passage, PromptRequest, Retrieved, Turn
from mpipeline.stages import StageContext
from mpipeline.stages.assemble import Assemble
from mpipeline.stages.budget import CONTEXT_HEADER, SEPARATOR, label
from mpipeline.stages.tokens import Estimate

COUNT = Estimate()


def _stage(**fields: object) -> Assemble:
    cfg = AssembleConfig(**fields)  # type: ignore[arg-type]
    return Assemble(cfg, StageContext("assemble", 0, 1, PipelineConfig()))


def _run(stage: Assemble, msg: Retrieved) -> Assembled | Failed:
    [out] = list(stage.process(msg))
    return out


def _passages(system_turn: Turn) -> list[str]:
    """The labelled passages a system turn carries (after the context header)."""
    _, found, ctx = system_turn.content.partition(CONTEXT_HEADER)
    return ctx.split(SEPARATOR) if found else []


words = st.text(alphabet=st.sampled_from("ab cd,.\n\u00e9\u4e2d1"), min_size=1, max_size=60)
turns = st.lists(
    st.builds(Turn, role=st.sampled_from(["user", "assistant"]), content=words), max_size=12
)
# Passage texts without newlines, so that the test can split the context turn again.
lines = st.text(alphabet=st.sampled_from("ab cd,.\u00e9\u4e2d1"), min_size=1, max_size=60)
passages = st.lists(
    st.builds(Passage, source=st.sampled_from(["a.md", "b.txt"]), text=lines, score=st.just(1.0)),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(
    history=turns,
    context=passages,
    system=st.sampled_from(["", "Be brief."]),
    question=words,
    tokens=st.integers(1, 200),
    chars=st.integers(1, 600),
)
def test_the_budget_holds_with_whole_turns_newest_kept_in_order(
    history: list[Turn],
    context: list[Passage],
    system: str,
    question: str,
    tokens: int,
    chars: int,
) -> None:
    stage = _stage(system_prompt=system, budget_tokens=tokens, max_prompt_chars=chars)
    request = PromptRequest(request_id="r", input=question, history=history)
    out = _run(stage, Retrieved(request=request, context=context))
    alone = [Turn(role="system", content=system)] if system else []
    alone.append(Turn(role="user", content=question))
    if isinstance(out, Failed):
        # Refused only when the system prompt and the input alone cannot fit.
        assert out.code == ErrorCode.INVALID_REQUEST
        assert COUNT.conversation(alone) > tokens or sum(len(t.content) for t in alone) > chars
        return
    sent = out.messages
    assert COUNT.conversation(sent) <= tokens
    assert sum(len(t.content) for t in sent) <= chars
    assert sent[-1] == Turn(role="user", content=question)  # the input, whole, last
    has_system = bool(system or context) and sent[0].role == "system"
    kept = sent[1 if has_system else 0 : -1]
    # Whole turns, the newest ones, in their order: a suffix of the history.
    assert kept == history[len(history) - len(kept) :]
    shown = _passages(sent[0]) if has_system else []
    whole = [label(p) for p in context]
    if shown != whole:
        assert not kept  # context shrinks only once the history is gone
    n = len(shown)
    if n:
        # The most relevant passages whole, the last one perhaps cut at its end.
        assert shown[: n - 1] == whole[: n - 1]
        assert whole[n - 1].startswith(shown[-1])


def test_the_issue_repro_fits_200_characters_by_shrinking_context() -> None:
    """Issue 17: 567 characters sent under max_prompt_chars = 200, context untouched."""
    history = [Turn(role="user", content="u" * 80), Turn(role="assistant", content="a" * 80)]
    context = [Passage(source="big.md", text="lorem ipsum dolor " * 20, score=1.0)]
    stage = _stage(system_prompt="Be brief.", max_prompt_chars=200)
    request = PromptRequest(request_id="r", input="What is it?", history=history)
    out = _run(stage, Retrieved(request=request, context=context))
    assert isinstance(out, Assembled)
    assert sum(len(t.content) for t in out.messages) <= 200
    assert [t.role for t in out.messages] == ["system", "user"]
    assert "[big.md] lorem ipsum" in out.messages[0].content  # cut, not dropped
    assert out.prompt.startswith("<|im_start|>system\nBe brief.")  # no mid-turn start


def test_oldest_turns_go_first_and_their_tool_results_with_them() -> None:
    call = b'{"role":"assistant","content":"","tool_calls":[]}'
    result = b'{"role":"tool","tool_call_id":"c1","content":"42"}'
    history = [
        Turn(role="assistant", content="x" * 50, raw=call),
        Turn(role="tool", content="42", raw=result),
        Turn(role="user", content="thanks"),
        Turn(role="assistant", content="welcome"),
    ]
    stage = _stage(system_prompt="", budget_tokens=30)
    out = _run(stage, Retrieved(request=PromptRequest(request_id="r", input="q", history=history)))
    assert isinstance(out, Assembled)
    assert [t.content for t in out.messages] == ["thanks", "welcome", "q"]


def test_a_budget_with_room_changes_nothing() -> None:
    history = [Turn(role="user", content="hi"), Turn(role="assistant", content="hello")]
    context = [Passage(source="a.md", text="Paris is in France.", score=1.0)]
    request = PromptRequest(request_id="r", input="Where?", history=history)
    roomy = _run(_stage(budget_tokens=1000), Retrieved(request=request, context=context))
    unlimited = _run(_stage(), Retrieved(request=request, context=context))
    assert isinstance(roomy, Assembled) and isinstance(unlimited, Assembled)
    assert roomy.messages == unlimited.messages and len(roomy.messages) == 4


def test_a_system_prompt_and_input_over_the_budget_are_refused_with_the_reason() -> None:
    stage = _stage(system_prompt="word " * 50, budget_tokens=20)
    out = _run(stage, Retrieved(request=PromptRequest(request_id="r", input="q")))
    assert isinstance(out, Failed)
    assert out.code == ErrorCode.INVALID_REQUEST and out.stage == "assemble"
    assert "at most 20 prompt tokens (budget_tokens)" in out.reason


def test_the_estimate_cuts_at_piece_boundaries_within_the_limit() -> None:
    text = "The quick brown fox, 12345 jumps.\nOver the lazy dog"
    for limit in range(COUNT.count(text) + 1):
        cut = COUNT.cut(text, limit)
        assert text.startswith(cut) and COUNT.count(cut) <= limit
    assert COUNT.cut(text, COUNT.count(text)) == text


def test_the_defaults_bound_no_prompt_but_a_llama_window() -> None:
    """A long input is no reason to refuse by default: the upstream judges its own window."""
    stage = _stage(system_prompt="Be brief.")
    long_input = "word " * 20_000
    out = _run(stage, Retrieved(request=PromptRequest(request_id="r", input=long_input)))
    assert isinstance(out, Assembled) and out.messages[-1].content == long_input


def test_a_refusal_names_only_the_bounds_that_are_set() -> None:
    stage = _stage(system_prompt="", max_prompt_chars=10)
    out = _run(stage, Retrieved(request=PromptRequest(request_id="r", input="x" * 50)))
    assert isinstance(out, Failed)
    assert "at most 10 characters (max_prompt_chars) fit" in out.reason
    assert "None" not in out.reason and "tokens" not in out.reason.split("; ", 1)[1]


def test_without_a_token_budget_no_token_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    # Counting cost assemble most of its CPU on every request (bench --workload
    # realistic); with only a character bound (or none) it must not run at all.
    counted: list[str] = []

    def count(self: Estimate, text: str) -> int:
        counted.append(text)
        return len(text.split())

    monkeypatch.setattr(Estimate, "count", count)
    context = [Passage(source="a.md", text="cats purr " * 50, score=1.0)]
    history = [Turn(role="user", content="earlier " * 40), Turn(role="assistant", content="ok")]
    request = PromptRequest(request_id="r", input="why do cats purr?", history=history)
    for chars in (0, 700):  # no bound; a bound that dropping the history meets
        out = _run(_stage(max_prompt_chars=chars), Retrieved(request=request, context=context))
        assert isinstance(out, Assembled) and counted == []
        assert out.messages[-1].content == "why do cats purr?"
    # The character bound held by dropping the oldest turn.
    assert isinstance(out, Assembled)
    assert [t.content for t in out.messages[1:]] == ["ok", "why do cats purr?"]
    assert sum(len(t.content) for t in out.messages) <= 700
    # With a token budget it counts, and the budget holds.
    out = _run(_stage(budget_tokens=60), Retrieved(request=request, context=context))
    assert isinstance(out, Assembled) and counted
    assert COUNT.conversation(out.messages) <= 60
