"""Assemble: turn retrieved context into the exact prompt the model will see.

Separate from rag because templating and budgeting are CPU work that gets
its own core instead of stealing time from retrieval. It also fixes the
dedup key, which decides the inference shard of requests without a session.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from mpipeline.config import AssembleConfig
from mpipeline.messages import Assembled, Passage, PromptRequest, Retrieved, Turn
from mpipeline.routing import dedup_key
from mpipeline.stages.base import Stage, StageContext


def conversation(system: str, request: PromptRequest, context: list[Passage]) -> list[Turn]:
    """The chat the model sees: one system turn (with the context), the history, the input.

    A client's own system turns replace the configured system prompt: an
    OpenAI client that sends one means it. With no context to add, the
    client's conversation goes on exactly as it came, its system turns where
    it put them (an OpenAI-compatible upstream gets each message's own JSON).
    Retrieved context joins one system turn made of the client's (or the
    configured prompt), before the question, most relevant first.
    """
    history = request.history
    question = Turn(role="user", content=request.input, raw=request.input_raw)
    own = [t.content for t in history if t.role == "system"]
    if own and not context:
        return [*history, question]
    system = "\n\n".join(own) if own else system
    if context:
        ctx = "\n\n".join(f"[{p.source}] {p.text}" for p in context)
        system = f"{system}\n\nContext:\n{ctx}" if system else f"Context:\n{ctx}"
    turns = [Turn(role="system", content=system)] if system else []
    turns += [t for t in history if t.role != "system"]
    turns.append(question)
    return turns


def render(template: str, turns: list[Turn]) -> str:
    """The conversation as one text, for backends that take a prompt string."""
    if template == "chatml":
        parts = [f"<|im_start|>{t.role}\n{t.content}<|im_end|>\n" for t in turns]
        return "".join(parts) + "<|im_start|>assistant\n"
    # Plain text: the system prompt and the user's words as they are, replies labelled.
    return "\n\n".join(
        f"{t.role}: {t.content}" if t.role == "assistant" else t.content for t in turns
    )


class Assemble(Stage[Retrieved | PromptRequest, Assembled]):
    name = "assemble"

    def __init__(self, config: AssembleConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._config = config

    def process(self, msg: Retrieved | PromptRequest) -> Iterable[Assembled]:
        # A PromptRequest arrives directly when rag is disabled.
        request, context = (msg.request, msg.context) if isinstance(msg, Retrieved) else (msg, [])
        if request.endpoint:  # not a chat: the client's body goes upstream as it came
            return (Assembled(request=request, prompt="", dedup_key=dedup_key(request)),)
        cfg = self._config
        turns = conversation(cfg.system_prompt, request, context)
        prompt = render(cfg.template, turns)
        if len(prompt) > cfg.max_prompt_chars:
            # Keep the end: that is where the question and the assistant cue are.
            prompt = prompt[-cfg.max_prompt_chars :]
            turns = _fit(turns, cfg.max_prompt_chars)
        key = dedup_key(request)
        return (Assembled(request=request, prompt=prompt, dedup_key=key, messages=turns),)


def _fit(turns: list[Turn], budget: int) -> list[Turn]:
    """Drop the oldest history turns (never the system turn or the input) to fit ``budget``.

    A tool result whose call went with the turns before it goes too: an
    OpenAI-compatible upstream refuses a result that answers no call.
    """
    head = turns[:1] if turns[0].role == "system" and len(turns) > 1 else []
    body = turns[len(head) :]
    size = sum(len(t.content) for t in turns)
    dropped = False
    while len(body) > 1 and (size > budget or (dropped and _tool_result(body[0]))):
        size -= len(body.pop(0).content)
        dropped = True
    return head + body


class _Role(msgspec.Struct):
    role: str = ""


_ROLE = msgspec.json.Decoder(_Role)


def _tool_result(turn: Turn) -> bool:
    if not turn.raw:
        return False
    try:
        return _ROLE.decode(turn.raw).role == "tool"
    except msgspec.DecodeError:
        return False
