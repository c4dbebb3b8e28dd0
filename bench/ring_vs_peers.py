"""Ring against its peers: one-way throughput and latency between two pinned processes.

The Ring is the pipeline's only IPC, so issue 2 asks what it buys over what a
Python programmer would otherwise reach for: ``multiprocessing.Queue`` and
``Pipe``, faster-fifo, and pyzmq PUSH/PULL over ``ipc://``. Every transport
carries the same msgspec ``PromptRequest`` records, encoded by the producer and
decoded to the typed Struct by the consumer inside the timing, in one run.

Run: ``.venv/bin/python -m bench.ring_vs_peers [--n N] [--sizes 64,512,4096]
[--json FILE] [--quick] [--repeat R]``. The child-side loops live in
``bench/_ipc_loops.py``, the tables and ratios in ``bench/_ipc_report.py``;
``bench/RESULTS.md`` holds a full run and what each row does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from importlib import metadata
from multiprocessing.context import SpawnContext
from typing import Any, Final

from bench._ipc_loops import BATCH, CAPACITY, Job, ceiling_child, idle_child, run_child
from bench._ipc_report import NAMES, Latency, Report, Throughput, render
from mpipeline.ring import Ring

# Both sides report within this, or the run is killed and reported as failed.
RUN_TIMEOUT_S: Final = 120.0

# (transport, mode, what one call carries); printed beside every result.
THROUGHPUT_PLAN: Final = (
    ("ring", "single", "1 msg per try_put/try_get"),
    ("ring", "nocrc", "1 msg per try_put/try_get, checksums off"),
    ("ring", "await", "1 msg per await put/get (uvloop, default 20 us spin)"),
    ("ring", "many", f"put_many/get_many of {BATCH} 1-msg records"),
    ("ring", "record", f"{BATCH} msgs in one record per try_put/try_get"),
    ("queue", "single", "1 msg per put/get (pickled bytes)"),
    ("queue", "many", f"list of {BATCH} 1-msg records per put/get (pickled)"),
    ("queue", "record", f"{BATCH} msgs in one record per put/get"),
    ("pipe", "single", "1 msg per send_bytes/recv_bytes"),
    ("pipe", "many", f"list of {BATCH} 1-msg records per send/recv (pickled)"),
    ("pipe", "record", f"{BATCH} msgs in one record per send_bytes/recv_bytes"),
    ("ff", "single", "1 msg per put/get (raw bytes, no pickle)"),
    ("ff", "many", f"put_many/get_many of {BATCH} 1-msg records"),
    ("ff", "record", f"{BATCH} msgs in one record per put/get"),
    ("zmq", "single", "1 msg per send/recv"),
    ("zmq", "many", f"send_multipart/recv_multipart of {BATCH} frames"),
    ("zmq", "record", f"{BATCH} msgs in one record per send/recv"),
)
LATENCY_PLAN: Final = (
    ("ring", "awake", "busy-polls try_get"),
    ("ring", "asleep", "await get(), spin_s=0: parks on the doorbell"),
    ("queue", "blocking", "blocking get()"),
    ("pipe", "blocking", "blocking recv_bytes()"),
    ("ff", "blocking", "blocking get()"),
    ("zmq", "blocking", "blocking recv()"),
)


def machine_info(cpus: Sequence[int]) -> dict[str, str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    pinned = f"producer cpu {cpus[0]}, consumer cpu {cpus[-1]}"
    if len(cpus) == 1:
        pinned += " (one core: both share it, so these numbers understate the Ring)"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "msgspec": metadata.version("msgspec"),
        "uvloop": metadata.version("uvloop"),
        "faster-fifo": metadata.version("faster-fifo"),
        "pyzmq": metadata.version("pyzmq"),
        "pinning": pinned,
        "loadavg before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def open_link(ctx: SpawnContext, job: Job, notes: dict[str, Any]) -> tuple[Any, Callable[[], None]]:
    """Create the transport in the parent; return what the children need and a cleanup.

    The cleanup adds what the transport itself counted to ``notes``.
    """
    if job.transport == "ring":
        ring = Ring.create(CAPACITY, checksums=job.mode != "nocrc")

        def drop_ring() -> None:
            # Times the producer found the ring full: the consumer was the slower side.
            notes["full_events"] = ring.stats().full_events
            ring.close()
            ring.unlink()

        return ring.name, drop_ring
    if job.transport == "queue":
        per_put = job.size * (1 if job.mode == "single" else BATCH)
        q: Any = ctx.Queue(maxsize=max(1, CAPACITY // per_put))  # the Ring's bound, in items
        return q, q.close
    if job.transport == "pipe":
        recv_end, send_end = ctx.Pipe(duplex=False)

        def drop_pipe() -> None:
            recv_end.close()
            send_end.close()

        return (recv_end, send_end), drop_pipe
    if job.transport == "ff":
        import faster_fifo  # type: ignore[import-not-found]
        import faster_fifo_reduction  # type: ignore[import-untyped]  # noqa: F401  (pickling)

        return faster_fifo.Queue(max_size_bytes=CAPACITY), lambda: None
    tmp = tempfile.mkdtemp(prefix="mpl-bench-")
    return f"ipc://{tmp}/zmq.sock", lambda: shutil.rmtree(tmp, ignore_errors=True)


def run_pair(ctx: SpawnContext, job: Job, cpus: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Run one producer/consumer pair; return each side's result (or its error)."""
    notes: dict[str, Any] = {}
    link, cleanup = open_link(ctx, job, notes)
    ready = ctx.Event()
    out: Any = ctx.Queue()
    procs = [
        ctx.Process(target=run_child, args=(role, job, link, cpu, ready, out), name=role)
        for role, cpu in (("consumer", cpus[-1]), ("producer", cpus[0]))
    ]
    results: dict[str, dict[str, Any]] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(results) < len(procs):
            try:
                role, res = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                results.setdefault("consumer", {"error": f"timed out after {RUN_TIMEOUT_S}s"})
                break
            results[role] = res
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        out.close()
        cleanup()
    results["link"] = notes
    return results


def run_single(ctx: SpawnContext, target: Callable[..., None], *args: Any) -> dict[str, Any]:
    out: Any = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, out))
    proc.start()
    try:
        res: dict[str, Any] = out.get(timeout=RUN_TIMEOUT_S)
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        out.close()
    return res


def error_of(results: dict[str, dict[str, Any]]) -> str:
    for role in ("consumer", "producer"):
        err = results.get(role, {}).get("error")
        if err:
            print(f"  {role} failed:\n{err}", file=sys.stderr)
            return str(err).strip().splitlines()[-1]
    return ""


def throughput(ctx: SpawnContext, job: Job, what: str, cpus: Sequence[int]) -> Throughput:
    res = run_pair(ctx, job, cpus)
    row = Throughput(job.size, job.transport, job.mode, what, error=error_of(res))
    if not row.error:
        cons = res["consumer"]
        row.messages = cons["messages"]
        row.msgs_per_s = cons["messages"] / cons["seconds"]
        row.mb_per_s = row.msgs_per_s * job.size / 1e6
        row.preempted = cons["preempted"]
        row.full_events = res["link"].get("full_events")
    return row


def measure(args: argparse.Namespace, report: Report, cpus: Sequence[int]) -> None:
    ctx = mp.get_context("spawn")
    for size in args.sizes:
        print(f"size {size} B: in-process ceiling", file=sys.stderr)
        report.ceilings[size] = run_single(ctx, ceiling_child, size, args.ceiling_s, cpus[-1])
        for transport, mode, what in THROUGHPUT_PLAN:
            print(f"size {size} B: {NAMES[transport]} {mode}", file=sys.stderr)
            runs = [
                throughput(ctx, Job(transport, mode, size, args.n), what, cpus)
                for _ in range(args.repeat)
            ]
            report.throughput.append(max(runs, key=lambda r: r.msgs_per_s))
        for transport, mode, what in LATENCY_PLAN:
            print(f"size {size} B: {NAMES[transport]} latency ({mode})", file=sys.stderr)
            res = run_pair(ctx, Job(transport, mode, size, args.latency_n), cpus)
            lat = Latency(size, transport, what, error=error_of(res))
            if not lat.error:
                ns = sorted(res["consumer"]["latency_ns"][args.warmup :])
                lat.samples = len(ns)
                lat.p50_us = statistics.median(ns) / 1e3
                lat.p99_us = ns[min(len(ns) - 1, int(len(ns) * 0.99))] / 1e3
                lat.max_us = ns[-1] / 1e3
                lat.consumer_cpu_pct = 100 * res["consumer"]["cpu_fraction"]
                lat.preempted = res["consumer"]["preempted"]
            report.latency.append(lat)
    print(f"idle waiter: {args.idle_s}s on an empty ring", file=sys.stderr)
    idle = run_single(ctx, idle_child, args.idle_s, cpus[-1])
    report.idle_cpu_pct = 100 * idle["cpu_fraction"]
    report.machine["loadavg after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ring_vs_peers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--n", type=int, default=200_000, help="messages per throughput run")
    parser.add_argument("--sizes", default="64,512,4096", help="encoded message sizes in bytes")
    parser.add_argument("--latency-n", type=int, default=2_000, help="messages per latency run")
    parser.add_argument(
        "--repeat", type=int, default=1, help="throughput runs per row; the best is kept"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every result to FILE")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small counts")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        args.n, args.latency_n = min(args.n, 20_000), min(args.latency_n, 300)
    args.n = max(BATCH, args.n // BATCH * BATCH)  # batched modes move whole batches
    args.warmup = min(50, args.latency_n // 10)
    args.ceiling_s = 0.05 if args.quick else 0.3
    args.idle_s = 0.5 if args.quick else 2.0
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))[:2]
    command = "python -m bench.ring_vs_peers " + " ".join(sys.argv[1:] if argv is None else argv)
    report = Report(machine_info(cpus), command.strip())
    started = time.monotonic()
    measure(args, report, cpus)
    report.machine["wall"] = f"{time.monotonic() - started:.0f} s"
    print(render(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report), f, indent=2)


if __name__ == "__main__":
    main()
