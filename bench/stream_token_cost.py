"""CPU per streamed token of an inference shard proxying an OpenAI-compatible stream.

Run: ``.venv/bin/python -m bench.stream_token_cost [--streams 2000] [--concurrency 64]
[--tokens 64] [--rounds 3]``

The real ``Inference`` stage (its ``ShardCalls``, phase timeouts, the
``openai`` worker and its client), built as a replica builds it, streams
replies from the fast fake upstream (``mpipeline.bench.fake_upstream``,
pinned to another core) in one process pinned to one core, ``concurrency``
streams at a time; every message the stage yields is encoded for the ring
as the runner would (``Codec.encode``), so the figure is the shard's whole
CPU per token except the ring write. Two upstream paces: ``burst`` (the
fake writes a reply's 64 tokens back to back, so a read often holds
several) and ``paced`` (1 ms between tokens, so most reads hold one). Two ways through
the call path: token by token (the default) and read by read
(``coalesce_reads``: the tokens of one read become one chunk). The table
gives CPU µs per token and per stream, and the messages each stream sent
on to post (each of which post, stream and the gateway handle again).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time

import httpx
import msgspec
import uvloop

from mpipeline.codec import Codec
from mpipeline.config import DedupConfig, InferenceConfig, OpenAIConfig, PipelineConfig
from mpipeline.messages import EDGE_TYPES, Assembled, Message, PromptRequest, TokenChunk, Turn
from mpipeline.stages.base import StageContext
from mpipeline.stages.inference import Inference

PACES = {"burst": 0.0, "paced": 1.0}


def _stage(port: int, tokens: int, concurrency: int, reads: bool) -> Inference:
    upstream = OpenAIConfig(
        base_url=f"http://127.0.0.1:{port}/v1",
        model="fake-model",
        api_key_env="",
        max_tokens=tokens,
        max_concurrency=concurrency,
    )
    cfg = InferenceConfig(
        worker="openai",
        openai=upstream,
        concurrency=concurrency,
        dedup=DedupConfig(coalesce=False, cache_entries=0),
        coalesce_reads=reads,
    )
    ctx = StageContext(stage="inference", replica=0, replicas=1, config=PipelineConfig())
    return Inference(cfg, ctx)


async def _round(stage: Inference, streams: int, concurrency: int) -> tuple[float, int, int]:
    """CPU seconds, tokens and messages for ``streams`` streams."""
    codec = Codec(EDGE_TYPES["post"])
    encode = codec.encode
    left = streams
    tokens = messages = 0

    async def lane() -> None:
        nonlocal left, tokens, messages
        while left > 0:
            left -= 1
            req = PromptRequest(request_id=str(left), input="x" * 480, stream=True)
            job = Assembled(
                request=req, prompt="", dedup_key="", messages=[Turn(role="user", content="x")]
            )
            msg: Message
            async for msg in stage.handle(job):
                encode(msg)
                messages += 1
                if isinstance(msg, TokenChunk):
                    tokens += msg.text.count("tok")

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(asyncio.create_task(lane()) for _ in range(concurrency)))
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return cpu, tokens, messages


async def measure(
    port: int, tokens: int, streams: int, concurrency: int, reads: bool
) -> tuple[float, float, float]:
    """CPU µs per token, per stream, and messages per stream."""
    stage = _stage(port, tokens, concurrency, reads)
    await stage.start()
    try:
        await _round(stage, max(50, streams // 10), concurrency)  # warm-up
        cpu, got, messages = await _round(stage, streams, concurrency)
    finally:
        await stage.stop()
    if got != streams * tokens:
        raise RuntimeError(f"expected {streams * tokens} tokens, got {got}")
    return cpu / got * 1e6, cpu / streams * 1e6, messages / streams


def _upstream(port: int, tokens: int, delay_ms: float, core: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "mpipeline.bench.fake_upstream", "--port", str(port)]
    cmd += ["--tokens", str(tokens), "--token-delay-ms", str(delay_ms)]
    proc = subprocess.Popen(cmd, preexec_fn=lambda: os.sched_setaffinity(0, [core]))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("the fake upstream did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()
    from mpipeline.bench.servers import free_port

    cores = sorted(os.sched_getaffinity(0))
    best: dict[tuple[str, bool], tuple[float, float, float]] = {}
    for pace, delay_ms in PACES.items():
        port = free_port()
        upstream = _upstream(port, args.tokens, delay_ms, cores[-1])
        os.sched_setaffinity(0, [cores[0]])
        try:
            for r in range(args.rounds):
                for reads in (False, True):
                    got = uvloop.run(
                        measure(port, args.tokens, args.streams, args.concurrency, reads)
                    )
                    key = (pace, reads)
                    if key not in best or got[0] < best[key][0]:
                        best[key] = got
                    how = "read by read" if reads else "token by token"
                    print(
                        f"round {r + 1} {pace:<6} {how:<15} {got[0]:6.1f} µs/token "
                        f"{got[1]:8.1f} µs/stream {got[2]:5.1f} messages/stream",
                        flush=True,
                    )
        finally:
            os.sched_setaffinity(0, cores)
            upstream.terminate()
            upstream.wait(10)
    print(f"\nbest of {args.rounds}, {args.streams} streams of {args.tokens} tokens, ")
    print(
        f"{args.concurrency} at a time, shard on core {cores[0]}, upstream on core {cores[-1]}:\n"
    )
    print("| upstream | call path | CPU µs/token | CPU µs/stream | messages/stream |")
    print("|:--|:--|--:|--:|--:|")
    for (pace, reads), (per_token, per_stream, msgs) in best.items():
        how = "read by read" if reads else "token by token"
        print(f"| {pace} | {how} | {per_token:.1f} | {per_stream:,.0f} | {msgs:.1f} |")
    if args.json:
        out = {f"{p}/{'reads' if r else 'tokens'}": v for (p, r), v in best.items()}
        with open(args.json, "wb") as f:
            f.write(msgspec.json.encode(out))


if __name__ == "__main__":
    main()
