"""Fitting a conversation into a token (and character) budget, whole turns only.

What gives way, in order, when system + context + history + input do not fit:

1. the oldest history turns, whole (a client's system turns stay; a tool
   result whose call went goes with it, since an OpenAI-compatible upstream
   refuses a result that answers no call);
2. the retrieved context: least relevant passages first, whole, then the last
   passage kept is cut at a token boundary to fill what room is left (context
   is not a turn: a cut passage is still useful, a cut turn is a lie about
   what someone said);
3. nothing else: when the system prompt and the input alone do not fit, the
   request is refused (``PromptTooLong``) rather than sent to fail upstream.

The search adds up per-piece counts (each text is tokenized once), because a
tokenizer pass over the whole conversation per candidate would cost more than
the stage's whole budget; the result is then counted once exactly
(``TokenCounter.conversation``, the model's own chat template for llama_cpp)
and, if the sum was optimistic, searched again with the difference held back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import msgspec

from mpipeline.messages import Passage, PromptRequest, Turn
from mpipeline.stages.tokens import TokenCounter

__all__ = ["Budget", "PromptTooLong", "conversation", "fit", "label"]

CONTEXT_HEADER = "Context:\n"
SEPARATOR = "\n\n"


class PromptTooLong(Exception):  # noqa: N818 - reads as the outcome, like TimeoutError
    """The system prompt and the input alone exceed the budget."""


@dataclass(frozen=True, slots=True)
class Budget:
    """Most prompt tokens (None: no token limit) and most characters of turn text."""

    tokens: int | None
    chars: int
    # Where ``tokens`` comes from, for the error a refused request gets.
    why: str = "budget_tokens"


def label(passage: Passage, text: str | None = None) -> str:
    """One passage as the model sees it: its source, then its text."""
    return f"[{passage.source}] {passage.text if text is None else text}"


def conversation(
    system: str, history: Sequence[Turn], question: Turn, context: Sequence[str]
) -> list[Turn]:
    """The chat the model sees: one system turn (with the context), the history, the input.

    A client's own system turns replace the configured system prompt: an
    OpenAI client that sends one means it. With no context to add, the
    client's conversation goes on exactly as it came, its system turns where
    it put them (an OpenAI-compatible upstream gets each message's own JSON).
    Retrieved context (``context``: labelled passages, most relevant first)
    joins one system turn made of the client's (or the configured prompt).
    """
    own = [t.content for t in history if t.role == "system"]
    if own and not context:
        return [*history, question]
    system = SEPARATOR.join(own) if own else system
    if context:
        ctx = CONTEXT_HEADER + SEPARATOR.join(context)
        system = f"{system}{SEPARATOR}{ctx}" if system else ctx
    turns = [Turn(role="system", content=system)] if system else []
    turns += [t for t in history if t.role != "system"]
    turns.append(question)
    return turns


class _Plan:
    """One request's pieces, each counted once, and the turns a choice of them makes."""

    def __init__(
        self, system: str, request: PromptRequest, context: list[Passage], counter: TokenCounter
    ) -> None:
        self.counter = counter
        self.system = system
        self.history = request.history
        self.question = Turn(role="user", content=request.input, raw=request.input_raw)
        self.context = context
        self.pieces = [label(p) for p in context]
        # The history turns that may go, oldest first, by their index in history.
        self.droppable = [i for i, t in enumerate(self.history) if t.role != "system"]
        self._memo: dict[str, int] = {}
        own = [t.content for t in self.history if t.role == "system"]
        self._heads = own or ([system] if system else [])

    # Counted on first use: with no token budget (most non-llama_cpp deployments) a
    # request is fitted by characters alone and no token is ever counted.
    @cached_property
    def base(self) -> int:
        """Tokens of what always stays: framing, the system turn's own text, the input."""
        turn = self.counter.per_turn
        heads = sum(self.tokens(h) + turn for h in self._heads)
        return self.counter.fixed + heads + self.tokens(self.question.content) + turn

    @cached_property
    def header(self) -> int:
        return self.tokens(CONTEXT_HEADER) + (0 if self._heads else self.counter.per_turn)

    @cached_property
    def sep(self) -> int:
        return self.tokens(SEPARATOR)

    def tokens(self, text: str) -> int:
        if (n := self._memo.get(text)) is None:
            n = self._memo[text] = self.counter.count(text)
        return n

    def valid_drops(self) -> list[int]:
        """How many of the oldest turns may go: never leaving a tool result first."""
        n = len(self.droppable)
        return [
            k
            for k in range(n + 1)
            if k in (0, n) or not _tool_result(self.history[self.droppable[k]])
        ]

    def cost(self, drop: int, pieces: Sequence[str]) -> int:
        """The additive token count of a choice: ``drop`` oldest turns gone, ``pieces`` kept."""
        kept = self.droppable[drop:]
        total = self.base + sum(self.tokens(self.history[i].content) for i in kept)
        total += len(kept) * self.counter.per_turn
        if pieces:
            total += self.header + sum(self.tokens(p) + self.sep for p in pieces)
        return total

    def turns(self, drop: int, pieces: Sequence[str]) -> list[Turn]:
        gone = set(self.droppable[:drop])
        history = [t for i, t in enumerate(self.history) if i not in gone]
        return conversation(self.system, history, self.question, pieces)


def _chars(turns: Sequence[Turn]) -> int:
    return sum(len(t.content) for t in turns)


def fit(
    system: str,
    request: PromptRequest,
    context: list[Passage],
    counter: TokenCounter,
    budget: Budget,
) -> list[Turn]:
    """The largest conversation that fits ``budget``, losing what goes first first.

    :raises PromptTooLong: if the system prompt and the input alone do not fit
    """
    plan = _Plan(system, request, context, counter)
    limit = budget.tokens
    if limit is None:
        return _search(plan, None, budget.chars)
    held = 0
    while True:
        turns = _search(plan, limit - held, budget.chars)
        exact = counter.conversation(turns)
        if exact <= limit:
            return turns
        held += exact - limit  # the sum was short by this much: search again without it


def _search(plan: _Plan, tokens: int | None, chars: int) -> list[Turn]:
    def fits(drop: int, pieces: Sequence[str]) -> bool:
        if tokens is not None and plan.cost(drop, pieces) > tokens:
            return False
        return _chars(plan.turns(drop, pieces)) <= chars

    pieces = plan.pieces
    if fits(0, pieces):
        return plan.turns(0, pieces)
    drops = plan.valid_drops()
    # 1. The fewest oldest turns whose going makes it fit (fits only gets truer).
    k = _first(drops, lambda d: fits(d, pieces))
    if k is not None:
        return plan.turns(k, pieces)
    gone = drops[-1]
    # 2. The most relevant passages that fit whole, then a cut of the next one.
    whole = _first(range(len(pieces), -1, -1), lambda p: fits(gone, pieces[:p]))
    if whole is None:
        need = plan.cost(gone, [])
        raise PromptTooLong(
            f"the system prompt and the input need {need} tokens and "
            f"{_chars(plan.turns(gone, []))} characters"
        )
    kept = list(pieces[:whole])
    if whole < len(pieces):
        part = _cut(plan, gone, kept, plan.context[whole], tokens, chars)
        if part is not None and fits(gone, [*kept, part]):
            kept.append(part)
    return plan.turns(gone, kept)


def _cut(
    plan: _Plan,
    drop: int,
    kept: list[str],
    passage: Passage,
    tokens: int | None,
    chars: int,
) -> str | None:
    """The passage cut at a token boundary to the room ``kept`` leaves; None: no room."""
    counter = plan.counter
    text = passage.text
    head = label(passage, "")
    if tokens is not None:
        room = tokens - plan.cost(drop, [*kept, head])
        if room <= 0:
            return None
        text = counter.cut(text, room)
    room_chars = chars - _chars(plan.turns(drop, [*kept, head]))
    if len(text) > room_chars:
        if room_chars <= 0:
            return None
        shorter = text[:room_chars]
        text = counter.cut(shorter, max(0, counter.count(shorter) - 1))
    return label(passage, text) if text.strip() else None


def _first(candidates: Sequence[int], ok: Callable[[int], bool]) -> int | None:
    """The first of ``candidates`` that is ``ok``, where ok is monotone: binary search."""
    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo] if lo < len(candidates) else None


class _Role(msgspec.Struct):
    role: str = ""


_ROLE = msgspec.json.Decoder(_Role)


def _tool_result(turn: Turn) -> bool:
    """A tool's answer to a call (its JSON says role "tool")."""
    if turn.role == "tool":
        return True
    if not turn.raw:
        return False
    try:
        return _ROLE.decode(turn.raw).role == "tool"
    except msgspec.DecodeError:
        return False
