"""Assemble: turn retrieved context into the exact prompt the model will see.

Separate from rag because templating and budgeting are CPU work that gets
its own core instead of stealing time from retrieval. It also fixes the
dedup key, which decides the inference shard of requests without a session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from mpipeline.config import AssembleConfig
from mpipeline.config.catalog import Catalog
from mpipeline.errors import ErrorCode
from mpipeline.messages import (
    Assembled,
    Failed,
    Passage,
    PromptRequest,
    Retrieved,
    Turn,
    failed_from,
)
from mpipeline.routing import dedup_key
from mpipeline.stages import budget
from mpipeline.stages.base import Stage, StageContext
from mpipeline.stages.budget import Budget, PromptTooLong
from mpipeline.stages.tokens import Estimate, TokenCounter, Vocabulary, load_vocabulary

# The character bound when max_prompt_chars is 0 (none): more than any body can hold.
_NO_BOUND = 1 << 62


def conversation(system: str, request: PromptRequest, context: list[Passage]) -> list[Turn]:
    """The whole chat the model would see, before any budget (``budget.conversation``)."""
    question = Turn(role="user", content=request.input, raw=request.input_raw)
    return budget.conversation(
        system, request.history, question, [budget.label(p) for p in context]
    )


def render(template: str, turns: list[Turn]) -> str:
    """The conversation as one text, for backends that take a prompt string.

    Of the workers only echo reads it (its usage count): the chat APIs take
    ``messages``, and llama_cpp renders ``messages`` in its model's own chat
    format (``[stages.inference.llama_cpp] chat_format``), the one the model
    was trained on, which a pipeline-wide template could only get wrong.
    """
    if template == "chatml":
        parts = [f"<|im_start|>{t.role}\n{t.content}<|im_end|>\n" for t in turns]
        return "".join(parts) + "<|im_start|>assistant\n"
    # Plain text: the system prompt and the user's words as they are, replies labelled.
    return "\n\n".join(
        f"{t.role}: {t.content}" if t.role == "assistant" else t.content for t in turns
    )


class Assemble(Stage[Retrieved | PromptRequest, Assembled | Failed]):
    """Builds each request's conversation within its model's token budget.

    Each model of the run (``[[models]]``, or the inference worker) counts with
    its own counter: a llama_cpp model with its GGUF's vocabulary, loaded
    here without weights (``vocab_only``), which is why this runs in ``start``;
    every other worker with ``tokens.Estimate``.
    """

    name = "assemble"

    def __init__(self, config: AssembleConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._config = config
        self._catalog = Catalog.of(ctx.config)
        self._estimate = Estimate()
        self._counters: dict[tuple[str, str | None], TokenCounter] = {}

    async def start(self) -> None:
        """Load the vocabulary of every llama_cpp model, off the loop (a second each)."""
        for model in self._catalog.models:
            if model.inference.worker == "llama_cpp":
                await asyncio.to_thread(self._counter, model.key)

    async def stop(self) -> None:
        for counter in self._counters.values():
            if isinstance(counter, Vocabulary):
                counter.close()
        self._counters.clear()

    def _counter(self, key: str) -> TokenCounter:
        model = self._catalog.by_key(key) or self._catalog.default
        if model.inference.worker != "llama_cpp":
            return self._estimate
        llama = model.inference.llama_cpp
        vocab = (llama.model_path, llama.chat_format)
        if (counter := self._counters.get(vocab)) is None:
            counter = self._counters[vocab] = load_vocabulary(*vocab)
        return counter

    def _budget(self, request: PromptRequest) -> Budget:
        cfg = self._config
        model = self._catalog.by_key(request.model) or self._catalog.default
        configured = cfg.budget_tokens or None
        if model.inference.worker != "llama_cpp":
            return Budget(configured, cfg.max_prompt_chars or _NO_BOUND)
        llama = model.inference.llama_cpp
        reply = request.max_tokens or llama.max_tokens
        window = llama.n_ctx - reply
        why = f"n_ctx {llama.n_ctx} - max_tokens {reply}"
        if configured is not None and configured < window:
            window, why = configured, "budget_tokens"
        return Budget(window, cfg.max_prompt_chars or _NO_BOUND, why)

    def process(self, msg: Retrieved | PromptRequest) -> Iterable[Assembled | Failed]:
        # A PromptRequest arrives directly when rag is disabled.
        request, context = (msg.request, msg.context) if isinstance(msg, Retrieved) else (msg, [])
        if request.endpoint:  # not a chat: the client's body goes upstream as it came
            return (Assembled(request=request, prompt="", dedup_key=dedup_key(request)),)
        cfg = self._config
        limit = self._budget(request)
        try:
            if limit.tokens is not None and limit.tokens <= 0:
                raise PromptTooLong("max_tokens leaves no room for a prompt")
            counter = self._counter(request.model)
            turns = budget.fit(cfg.system_prompt, request, context, counter, limit)
        except PromptTooLong as exc:
            bounds = []
            if limit.tokens is not None:
                bounds.append(f"{limit.tokens} prompt tokens ({limit.why})")
            if limit.chars < _NO_BOUND:
                bounds.append(f"{limit.chars} characters (max_prompt_chars)")
            reason = f"prompt too long: {exc}; at most {' and '.join(bounds)} fit"
            return (failed_from(request, ErrorCode.INVALID_REQUEST, reason, self.name),)
        prompt = render(cfg.template, turns)
        key = dedup_key(request)
        return (Assembled(request=request, prompt=prompt, dedup_key=key, messages=turns),)
