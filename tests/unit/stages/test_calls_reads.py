"""The shard's call path with ``coalesce_reads``: a remote stream goes on read by read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from mpipeline.config import DedupConfig, InferenceConfig, TimeoutsConfig
from mpipeline.messages import Assembled, PromptRequest
from mpipeline.stages.calls import ShardCalls
from mpipeline.workers.base import Generation

NO_DEDUP = DedupConfig(coalesce=False, cache_entries=0)


class Reads:
    """A remote upstream whose stream came in two reads: ``["a", "b"]``, then ``["c"]``."""

    name = "up"
    remote = True
    timeouts = TimeoutsConfig()
    max_concurrency = 4

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def generate(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        for token in "abc":
            gen.completion_tokens += 1
            yield token

    async def generate_reads(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        gen.completion_tokens = 3
        yield "ab"
        yield "c"

    async def complete(self, job: Assembled, gen: Generation) -> str:
        return "abc"


def _pieces(coalesce: bool) -> list[str]:
    cfg = InferenceConfig(dedup=NO_DEDUP, coalesce_reads=coalesce)
    shard = ShardCalls(cfg, [Reads()], None)
    job = Assembled(request=PromptRequest(request_id="r", input="x"), prompt="", dedup_key="k")
    gen = Generation()

    async def main() -> list[str]:
        return [piece async for piece in shard.tokens(job, gen, True)]

    pieces = asyncio.run(main())
    assert gen.completion_tokens == 3
    return pieces


def test_token_by_token_without_coalescing() -> None:
    assert _pieces(False) == ["a", "b", "c"]


def test_read_by_read_when_coalescing() -> None:
    assert _pieces(True) == ["ab", "c"]


def test_coalescing_is_the_default() -> None:
    assert InferenceConfig().coalesce_reads is True
