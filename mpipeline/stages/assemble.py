"""Assemble: turn retrieved context into the exact prompt the model will see.

Separate from rag because templating and budgeting are CPU work that gets
its own core instead of stealing time from retrieval. It also fixes the
dedup key, which decides the inference shard of requests without a session.
"""

from __future__ import annotations

from collections.abc import Iterable

from mpipeline.config import AssembleConfig
from mpipeline.messages import Assembled, Passage, PromptRequest, Retrieved
from mpipeline.routing import dedup_key
from mpipeline.stages.base import Stage, StageContext


def render(template: str, system: str, user: str, context: list[Passage]) -> str:
    """Format the prompt; context goes before the question, most relevant first."""
    if context:
        ctx = "\n\n".join(f"[{p.source}] {p.text}" for p in context)
        system = f"{system}\n\nContext:\n{ctx}" if system else f"Context:\n{ctx}"
    if template == "chatml":
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return f"{system}\n\n{user}" if system else user


class Assemble(Stage[Retrieved | PromptRequest, Assembled]):
    name = "assemble"

    def __init__(self, config: AssembleConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._config = config

    def process(self, msg: Retrieved | PromptRequest) -> Iterable[Assembled]:
        # A PromptRequest arrives directly when rag is disabled.
        request, context = (msg.request, msg.context) if isinstance(msg, Retrieved) else (msg, [])
        cfg = self._config
        prompt = render(cfg.template, cfg.system_prompt, request.input, context)
        if len(prompt) > cfg.max_prompt_chars:
            # Keep the end: that is where the question and the assistant cue are.
            prompt = prompt[-cfg.max_prompt_chars :]
        return (Assembled(request=request, prompt=prompt, dedup_key=dedup_key(request)),)
