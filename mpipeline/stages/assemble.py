"""Assemble: turn retrieved context into the exact prompt the model will see.

Separate from rag because templating and budgeting are CPU work that gets
its own core instead of stealing time from retrieval. It also fixes the
dedup key, which decides the inference shard of requests without a session.
"""

from __future__ import annotations

from collections.abc import Iterable

from mpipeline.config import AssembleConfig
from mpipeline.messages import Assembled, Passage, PromptRequest, Retrieved, Turn
from mpipeline.routing import dedup_key
from mpipeline.stages.base import Stage, StageContext


def conversation(system: str, request: PromptRequest, context: list[Passage]) -> list[Turn]:
    """The chat the model sees: one system turn (with the context), the history, the input.

    A client's own system turns replace the configured system prompt: an
    OpenAI client that sends one means it. Retrieved context joins the system
    turn, before the question, most relevant first.
    """
    own = [t.content for t in request.history if t.role == "system"]
    system = "\n\n".join(own) if own else system
    if context:
        ctx = "\n\n".join(f"[{p.source}] {p.text}" for p in context)
        system = f"{system}\n\nContext:\n{ctx}" if system else f"Context:\n{ctx}"
    turns = [Turn(role="system", content=system)] if system else []
    turns += [t for t in request.history if t.role != "system"]
    turns.append(Turn(role="user", content=request.input))
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
    """Drop the oldest history turns (never the system turn or the input) to fit ``budget``."""
    head = turns[:1] if turns[0].role == "system" and len(turns) > 1 else []
    body = turns[len(head) :]
    size = sum(len(t.content) for t in turns)
    while len(body) > 1 and size > budget:
        size -= len(body.pop(0).content)
    return head + body
