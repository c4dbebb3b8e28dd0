"""Echo: a model stand-in that streams the user's input back, token by token.

It exists for tests and benchmarks: it behaves like a model (a first-token
delay, a per-token delay, an output cap, stop sequences, usage counts)
without one, so the pipeline's own cost can be measured in isolation. Of a
request's other fields it honours only ``stop`` (``fields.ECHO``); the
gateway refuses the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator

from mpipeline.config import EchoConfig
from mpipeline.messages import Assembled, PromptRequest
from mpipeline.workers._params import sampling
from mpipeline.workers._stops import StopScanner
from mpipeline.workers.base import LOCAL_TIMEOUTS, Generation, WorkerContext

# A token is a word with its trailing whitespace (the first also takes any leading
# whitespace), so joining the tokens restores a prefix of the text exactly.
_TOKEN = re.compile(r"\s*\S+\s*")


class EchoWorker:
    name = "echo"
    remote = False
    timeouts = LOCAL_TIMEOUTS

    def __init__(self, config: EchoConfig, ctx: WorkerContext | None = None) -> None:
        self._config = config
        self.max_concurrency = 1 << 30

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def _limit(self, prompt: str, request: PromptRequest, gen: Generation) -> int:
        # Whitespace-separated words stand in for model tokens in the usage count.
        gen.prompt_tokens = prompt.count(" ") + prompt.count("\n") + 1
        return request.max_tokens or self._config.max_tokens

    def _tokens(self, prompt: str, request: PromptRequest, gen: Generation) -> list[str]:
        limit = self._limit(prompt, request, gen)
        # Scan only as far as needed: one token past the limit tells "length" from "stop".
        found = [m.group() for m in itertools.islice(_TOKEN.finditer(request.input), limit + 1)]
        gen.finish_reason = "length" if len(found) > limit else "stop"
        tokens = found[:limit]
        if request.params:
            stops = sampling(request).stops
            if stops:
                return _until_stop(tokens, StopScanner(stops), gen)
        return tokens

    async def generate(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        delay = self._config.token_delay_ms / 1000.0
        for token in self._tokens(job.prompt, job.request, gen):
            if delay > 0:
                await asyncio.sleep(delay)
            gen.completion_tokens += 1
            yield token

    async def complete(self, job: Assembled, gen: Generation) -> str:
        # The same tokens as generate(), found with str.split (C speed): the text
        # up to where the remainder after ``limit`` words begins.
        request = job.request
        limit = self._limit(job.prompt, request, gen)
        text = request.input
        words = text.split(None, limit)
        if len(words) > limit:
            text = text[: len(text) - len(words[limit])]
            gen.completion_tokens = limit
            gen.finish_reason = "length"
        else:
            text = text if words else ""
            gen.completion_tokens = len(words)
            gen.finish_reason = "stop"
        if request.params:
            stops = sampling(request).stops
            cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                gen.completion_tokens = len(text.split())
                gen.finish_reason = "stop"
        if self._config.token_delay_ms > 0 and gen.completion_tokens:
            await asyncio.sleep(self._config.token_delay_ms / 1000.0 * gen.completion_tokens)
        return text


def _until_stop(tokens: list[str], scanner: StopScanner, gen: Generation) -> list[str]:
    """``tokens`` cut at the first stop sequence (the finish reason is then "stop")."""
    out: list[str] = []
    for token in tokens:
        if piece := scanner.feed(token):
            out.append(piece)
        if scanner.stopped:
            gen.finish_reason = "stop"
            return out
    if tail := scanner.flush():
        out.append(tail)
    return out
