"""How many upstream calls dedup saves on a Zipf-distributed prompt workload.

Run: ``.venv/bin/python -m bench.dedup_zipf [--requests 20000] [--distinct 10000]
[--s 1.1] [--concurrency 64] [--latency-ms 20] [--modes cache,coalesce,both]``

Popular prompts dominate real LLM traffic (agents sharing a context, retried
clients, the same question from many users), and the reference orchestrator
claims 60-80 % of calls saved on its own demo. This drives one shard's dedup
path (``ResultCache`` in front of ``Coalescer``, as ``stages/calls.py`` does)
with prompts drawn from a Zipf(s) law over a finite set of ``distinct``
prompts (``p(k) ∝ 1/k^s``, k = 1..distinct, normalised: numpy's own ``zipf``
has an unbounded support), ``concurrency`` requests at a time. Every call
that gets through is a real HTTP request over loopback to the in-repo fault
upstream (``tests/fault_upstream.py``), which answers after ``latency-ms`` and
counts the calls it served: the saving is computed from its count, not from
our own.

Modes: ``cache`` (the result cache alone), ``coalesce`` (in-flight sharing
alone), ``both`` (the shard's default), ``none`` (the baseline). The best
possible saving is ``1 - unique prompts / requests``: one call per prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import uvloop

from mpipeline.resilience import CachedResult, Coalescer, ResultCache
from tests.fault_upstream import FaultUpstream, Ok

MODES = ("none", "cache", "coalesce", "both")


def zipf_keys(requests: int, distinct: int, s: float, seed: int) -> np.ndarray:
    """``requests`` prompt ranks in ``[0, distinct)`` with ``p(k) ∝ 1/(k+1)^s``."""
    weights = np.arange(1, distinct + 1, dtype=np.float64) ** -s
    return np.random.default_rng(seed).choice(distinct, size=requests, p=weights / weights.sum())


@dataclass
class Outcome:
    mode: str
    requests: int
    calls: int
    cache_hits: int
    coalesced: int
    wall_s: float

    @property
    def saved(self) -> float:
        return 1.0 - self.calls / self.requests


async def drive(args: argparse.Namespace, mode: str, ranks: np.ndarray, url: str) -> Outcome:
    cache = (
        ResultCache(args.cache_entries, args.ttl_s, 65536) if mode in ("cache", "both") else None
    )
    coalescer = Coalescer() if mode in ("coalesce", "both") else None
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    joined = 0

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:

        async def call(prompt: str) -> CachedResult:
            body = {"model": "bench", "messages": [{"role": "user", "content": prompt}]}
            reply = await client.post("/chat/completions", json=body)
            reply.raise_for_status()
            return CachedResult(text=reply.json()["choices"][0]["message"]["content"])

        async def request(prompt: str) -> CachedResult:
            nonlocal joined
            if cache is not None:
                hit = cache.get(prompt, time.monotonic())
                if hit is not None:
                    return hit
            if coalescer is None:
                result = await call(prompt)
            else:
                flight, leader = coalescer.join(prompt)
                if not leader:
                    joined += 1
                    return await flight.result()
                try:
                    result = await call(prompt)
                except BaseException as exc:
                    flight.fail(exc)
                    raise
                flight.finish(result)
            if cache is not None:
                cache.put(prompt, result, time.monotonic())
            return result

        prompts: Iterator[str] = (f"prompt number {rank}" for rank in ranks.tolist())

        async def worker() -> None:
            for prompt in prompts:
                result = await request(prompt)
                assert result.text.split() == prompt.split(), (result.text, prompt)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
    return Outcome(
        mode=mode,
        requests=len(ranks),
        calls=0,  # filled in from the upstream's own count
        cache_hits=cache.hits if cache is not None else 0,
        coalesced=joined,
        wall_s=wall,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--distinct", type=int, default=10_000)
    parser.add_argument("--s", type=float, default=1.1, help="Zipf exponent")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="upstream reply delay")
    parser.add_argument("--cache-entries", type=int, default=4096, help="ResultCache size")
    parser.add_argument("--ttl-s", type=float, default=60.0, help="ResultCache TTL")
    parser.add_argument("--modes", default="cache,coalesce,both", help=f"from {','.join(MODES)}")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")

    ranks = zipf_keys(args.requests, args.distinct, args.s, args.seed)
    unique = len(np.unique(ranks))
    print(
        f"{args.requests} requests over {args.distinct} prompts, Zipf s={args.s}: "
        f"{unique} unique, best possible saving {1 - unique / args.requests:.1%}; "
        f"concurrency {args.concurrency}, upstream latency {args.latency_ms:g} ms, "
        f"cache {args.cache_entries} entries / {args.ttl_s:g} s"
    )
    print(f"{'mode':<9} {'calls':>7} {'saved':>7} {'cache hits':>10} {'coalesced':>9} "
          f"{'wall s':>7} {'req/s':>8}")  # fmt: skip
    for mode in modes:
        with FaultUpstream(default=Ok(first_token_delay_s=args.latency_ms / 1000)) as up:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                outcome = runner.run(drive(args, mode, ranks, up.openai_url))
            outcome.calls = len(up.calls)
        print(
            f"{mode:<9} {outcome.calls:>7} {outcome.saved:>7.1%} {outcome.cache_hits:>10} "
            f"{outcome.coalesced:>9} {outcome.wall_s:>7.2f} "
            f"{outcome.requests / outcome.wall_s:>8.0f}"
        )


if __name__ == "__main__":
    main()
