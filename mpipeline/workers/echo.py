"""Echo: a model stand-in that streams the user's input back, token by token.

It exists for tests and benchmarks: it behaves like a model (a first-token
delay, a per-token delay, an output cap, usage counts) without one, so the
pipeline's own cost can be measured in isolation.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from mpipeline.config import EchoConfig
from mpipeline.messages import PromptRequest
from mpipeline.workers.base import Generation

# A token is a word with its trailing whitespace, so joining tokens restores the text.
_TOKEN = re.compile(r"\S+\s*|\s+")


class EchoWorker:
    def __init__(self, config: EchoConfig) -> None:
        self._config = config

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def generate(
        self, prompt: str, request: PromptRequest, gen: Generation
    ) -> AsyncIterator[str]:
        limit = request.max_tokens or self._config.max_tokens
        tokens = _TOKEN.findall(request.input)
        gen.prompt_tokens = len(_TOKEN.findall(prompt))
        gen.finish_reason = "length" if len(tokens) > limit else "stop"
        delay = self._config.token_delay_ms / 1000.0
        for token in tokens[:limit]:
            if delay > 0:
                await asyncio.sleep(delay)
            gen.completion_tokens += 1
            yield token
