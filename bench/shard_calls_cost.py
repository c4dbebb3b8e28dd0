"""CPU per request of the inference shard's call path (``ShardCalls.tokens``) with echo.

Runs 50,000 unique prompts through one ``ShardCalls`` under uvloop, as many
concurrent tasks as the runner would, with the result cache and coalescing off,
each alone, and both on. Unique prompts: dedup never hits, so this is its cost.
Usage: ``.venv/bin/python -m bench.shard_calls_cost``.
"""

from __future__ import annotations

import asyncio
import time

import uvloop

from mpipeline.config import DedupConfig, InferenceConfig
from mpipeline.messages import Assembled, PromptRequest
from mpipeline.stages.calls import ShardCalls
from mpipeline.workers import WorkerContext, build_upstreams
from mpipeline.workers.base import Generation

MODES = {
    "off": DedupConfig(coalesce=False, cache_entries=0),
    "cache": DedupConfig(coalesce=False),
    "coalesce": DedupConfig(cache_entries=0),
    "both": DedupConfig(),
}


def _calls(dedup: DedupConfig) -> ShardCalls:
    cfg = InferenceConfig(dedup=dedup)
    return ShardCalls(cfg, build_upstreams(cfg, WorkerContext()), None)


async def per_request_us(calls: ShardCalls, n: int = 50_000) -> float:
    jobs = [
        Assembled(
            request=PromptRequest(request_id=str(i), input=f"hello world {i}"),
            prompt="p",
            dedup_key=f"k{i}",
        )
        for i in range(n)
    ]

    async def one(job: Assembled) -> str:
        return "".join([p async for p in calls.tokens(job, Generation(), False)])

    started = time.perf_counter()
    await asyncio.gather(*(one(j) for j in jobs))
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    for name, dedup in MODES.items():
        runs = [uvloop.run(per_request_us(_calls(dedup))) for _ in range(3)]
        print(f"{name:9s}", " ".join(f"{r:5.1f}" for r in runs), "µs/request")


if __name__ == "__main__":
    main()
