"""Where the CPU of ``mpipeline bench --workload realistic`` goes, per process.

The realistic workload's own numbers say how fast it is; this says why: it
starts the pipeline exactly as the bench does at ``--cores`` (the same
config, pinning and streamed requests, ``mpipeline.bench.workload``), keeps
``--window`` streams in flight at full speed, samples every replica and the
client itself with ``py-spy record --format raw`` over the same window, and
files each sample under the buckets of ``bench/profile_share.py``
(transport, codec, stage work, runner bookkeeping, event loop) with stage
work split by the stage whose code it is. Usage:
``python -m bench.profile_realistic [--cores 2] [--seconds 5] [--window N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import tempfile
import time
from pathlib import Path

import psutil
import uvloop

from bench.profile_share import BUCKETS, HEADER, bucket, record_all, share_cells, stacks
from mpipeline.bench.cores import Options, replica_pids, window_for
from mpipeline.bench.cpu import pin
from mpipeline.bench.layout import config_for_cores
from mpipeline.bench.load import Load, Target, closed_loop
from mpipeline.bench.workload import realistic
from mpipeline.pipeline import Pipeline

# Stage work, split by whose code a sample is in (the innermost frame that names one).
STAGE_CODE = (
    ("rag (bm25s, numpy)", ("/retrieval/", "/stages/rag.py", "bm25s")),
    ("assemble (token budget)", ("/stages/assemble.py", "/stages/budget.py", "/stages/tokens.py")),
    ("inference (echo, calls)", ("/stages/inference.py", "/stages/calls.py", "/workers/")),
    ("post (redaction)", ("/stages/post.py", "/stages/redact.py")),
    ("stream", ("/stages/stream.py",)),
)


def stage_of(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for name, parts in STAGE_CODE:
            if any(part in frame for part in parts):
                return name
    return "other stage code"


async def drive(
    cores: list[int], seconds: float, window: int | None, out: Path
) -> dict[str, float]:
    """Run the load, sample every process; the CPU % of one core each process used."""
    work = realistic(out / "work", quick=True)
    cfg = config_for_cores(cores, work.config, heavy=work.heavy)
    opts = Options(cores=(len(cores),), workload=work)
    if window is None:
        window = window_for(cfg, opts)
    async with Pipeline(cfg, run_dir=out / "run") as p:
        pids = {"client (bench)": os.getpid(), **replica_pids(out / "run")}
        target: Target = work.target(p)
        load = Load(window=window, texts=work.prompts())
        task = asyncio.ensure_future(
            closed_loop(target, load, requests=None, duration_s=seconds + 2.0)
        )
        await asyncio.sleep(1.0)  # warm up before sampling
        procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        before = {name: sum(proc.cpu_times()[:2]) for name, proc in procs.items()}
        t0 = time.monotonic()
        await record_all(pids, seconds, out)
        elapsed = time.monotonic() - t0
        cpu = {
            name: 100 * (sum(proc.cpu_times()[:2]) - before[name]) / elapsed
            for name, proc in procs.items()
        }
        phase = await task
        print(f"load: {phase.throughput_rps:,.0f} streamed req/s, window {window}")
    return cpu


def report(out: Path, cpu: dict[str, float]) -> None:
    rows: dict[str, collections.Counter[str]] = {}
    stages: collections.Counter[str] = collections.Counter()
    for name in cpu:
        counts: collections.Counter[str] = collections.Counter()
        for stack, n in stacks(out / f"{name}.txt").items():
            where = bucket(stack)
            counts[where] += n
            if where == BUCKETS[2]:
                stages[stage_of(stack)] += n
        rows[name] = counts
    rows["all"] = sum(rows.values(), collections.Counter())
    print(f"{'process':16s} {'CPU %':>6s}{HEADER}")
    for name, counts in rows.items():
        used = sum(cpu.values()) if name == "all" else cpu[name]
        cells = share_cells(counts)
        print(f"{name:16s} {used:6.0f}{cells}")
    total = sum(stages.values()) or 1
    print("\nstage work, by stage (% of all stage-work samples):")
    for name, samples in stages.most_common():
        print(f"  {name:28s} {100 * samples / total:5.1f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2, help="the bench's core count")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=None, help="streams in flight")
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    with tempfile.TemporaryDirectory(prefix="mpipeline-profile-") as tmp:
        out = Path(tmp)
        restore = pin(cores)  # as the bench: the supervisor and its replicas inherit the mask
        try:
            cpu = uvloop.run(drive(cores, args.seconds, args.window, out))
        finally:
            restore()
        report(out, cpu)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
