"""CPU per message of a stage replica with metrics on and off, in one process.

The whole-pipeline A/B (``mpipeline bench --metrics both``) varies by 10-15 %
from run to run on a shared 2-vCPU box, more than the cost it looks for. This
takes the IPC, the other processes and the scheduler out: the real
``StageRunner`` and the real stage (built as a replica builds it) consume
``N`` messages from a pre-filled input ring into an output ring big enough to
hold every result, with its metrics writer or without one, alternating on
and off ``ROUNDS`` times. What is left between the two is what the metrics
cost a replica per message: the stage-duration histogram, the shard's call,
dedup and token counters, the loop-lag gauge.

Usage: ``python -m bench.metrics_stage_cost [--messages N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable

import msgspec
import uvloop

from mpipeline.codec import pack_records
from mpipeline.config import PipelineConfig
from mpipeline.messages import Assembled, Message, PromptRequest
from mpipeline.metrics import MetricsBlock, Writer, stage_region
from mpipeline.replica import build_stage
from mpipeline.ring import Ring
from mpipeline.runner import StageRunner
from mpipeline.topology import ReplicaSpec, ring_name
from mpipeline.workers import upstream_names

RING_BYTES = 256 << 20
PROMPT = "x" * 480  # about the bench's 512 B prompts


def _request(i: int) -> PromptRequest:
    return PromptRequest(
        request_id=f"r{i}",
        session_id=f"s{i % 1024}",
        input=f"{i} {PROMPT}",
        reply_to=0,
        deadline_ns=time.monotonic_ns() + 600_000_000_000,
    )


def _assembled(i: int) -> Assembled:
    req = _request(i)
    return Assembled(request=req, prompt=req.input, dedup_key=f"k{i}")


STAGES: dict[str, tuple[str, Callable[[int], Message]]] = {
    # stage: (next stage, input message)
    "rag": ("assemble", _request),
    "inference": ("post", _assembled),
}


async def _consume(stage_name: str, n: int, cfg: PipelineConfig, metrics: bool, run: str) -> float:
    """Seconds of this process's CPU for one replica to take ``n`` messages through."""
    nxt, make = STAGES[stage_name]
    names = (
        ring_name(run, "client0", f"{stage_name}0"),
        ring_name(run, f"{stage_name}0", f"{nxt}0"),
        ring_name(run, f"{stage_name}0", "client0err"),
    )
    rings = [Ring.create(RING_BYTES, name) for name in names]
    block = MetricsBlock.create(f"mpl-{run}-metrics", 1) if metrics else None
    try:
        encoder = msgspec.msgpack.Encoder()
        records = pack_records(encoder.encode, [make(i) for i in range(n)], rings[0].max_record)[0]
        assert rings[0].put_many([r for r, _ in records]) == len(records)
        spec = ReplicaSpec(
            stage=stage_name,
            index=0,
            replicas=1,
            cpus=(),
            slot=0,
            next_stage=nxt,
            inputs=(names[0],),
            outputs=(names[1],),
            errors=(names[2],),
        )
        writer: Writer | None = None
        if block is not None:
            ups = upstream_names(cfg.stages.inference) if stage_name == "inference" else []
            region = stage_region(stage_name, spec.name, spec.outputs, ups)
            writer = block.writer(0, region)
        stage = build_stage(spec, cfg, "", writer)
        await stage.start()
        runner = StageRunner(spec, cfg, stage, None, writer)
        runner.attach()
        stop = asyncio.Event()
        start = time.process_time()
        task = asyncio.create_task(runner.run(stop))
        # The runner signals nothing when its input runs dry; a 1 ms poll costs
        # both arms the same.
        while runner.processed < n:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        took = time.process_time() - start
        stop.set()
        await task
        await stage.stop()
        runner.close()
        return took
    finally:
        for ring in rings:
            ring.close()
            ring.unlink()
        if block is not None:
            block.close()
            block.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    cfg = PipelineConfig()
    echo = msgspec.structs.replace(cfg.stages.inference.echo, token_delay_ms=0.0, max_tokens=16)
    inference = msgspec.structs.replace(cfg.stages.inference, echo=echo)
    cfg = msgspec.structs.replace(
        cfg, stages=msgspec.structs.replace(cfg.stages, inference=inference)
    )
    n = args.messages
    print(f"{n:,} messages per run, {args.rounds} rounds of on/off (order alternates)")
    print("ns per message; min (least disturbed run) and median over the rounds")
    cols = ("off min", 8), ("on min", 7), ("cost", 6), ("off med", 8), ("on med", 7), ("cost", 6)
    print(f"{'stage':<10}" + "".join(f" {name:>{width}}" for name, width in cols))
    for stage_name in STAGES:
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for metrics in order:
                run = f"mc{os.getpid()}{r}{int(metrics)}"
                seconds = uvloop.run(_consume(stage_name, n, cfg, metrics, run))
                times[metrics].append(seconds / n * 1e9)
        row = f"{stage_name:<10}"
        for pick in (min, statistics.median):
            without, with_ = pick(times[False]), pick(times[True])
            row += f" {without:>8,.0f} {with_:>7,.0f} {with_ - without:>6,.0f}"
        print(row)


if __name__ == "__main__":
    main()
