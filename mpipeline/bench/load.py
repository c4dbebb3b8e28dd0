"""The benchmark's load generator and what it measures, for any submit target.

A target is anything with ``submit_nowait(text, session_id=, max_tokens=)``
returning a future of ``Completed``: the real ``Pipeline`` client and the
in-process asyncio baseline both are, so one generator drives both and the
numbers compare like for like.

The generator keeps no coroutine per request: each request is a future with
a done callback that records its latency and, in the closed loop, submits
the next one. Times come from ``time.monotonic_ns`` (CLOCK_MONOTONIC, as
``perf_counter_ns`` on Linux), the clock the stages stamp messages with, so
the per-hop breakdown and the end-to-end latency share one time base.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from mpipeline.bench.cpu import CpuMeter, ProcessCpu
from mpipeline.messages import Completed

# Prompt bytes and output tokens of the echo workload.
PROMPT_BYTES = 512
OUTPUT_TOKENS = 16
# Distinct sessions the requests cycle through (routes spread over shards).
SESSIONS = 1024
# Open-loop submitters tick this often; uvloop timers have 1 ms resolution.
_TICK_S = 0.001
# An open-loop phase that falls this far behind stops adding requests.
_OPEN_LOOP_MAX_INFLIGHT = 200_000
_PROGRESS_EVERY_S = 0.2
_WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor ".split()


class Target(Protocol):
    def submit_nowait(
        self, text: str, *, session_id: str | None = ..., max_tokens: int | None = ...
    ) -> asyncio.Future[Completed]: ...


class Latency(msgspec.Struct, frozen=True, kw_only=True):
    """Submit-to-result latency of one phase, microseconds."""

    samples: int
    mean_us: float
    p50_us: float
    p95_us: float
    p99_us: float
    max_us: float


class Phase(msgspec.Struct, frozen=True, kw_only=True):
    """One measured phase: full speed (closed loop) or a fixed rate (open loop)."""

    kind: str  # "full" | "rate"
    offered_rps: float | None
    completed: int
    failed: int
    duration_s: float
    throughput_rps: float
    latency: Latency
    # Median time from arriving at one stage to arriving at the next, by hop.
    hops_us: dict[str, float]
    cpu: list[ProcessCpu]
    cpu_us_per_request: float
    # CPU other processes used on the cores under test (% of one core): noise.
    foreign_cpu_percent: float


def prompt_body() -> str:
    """Words filling a 512-byte prompt after its 11-byte unique prefix."""
    words: list[str] = []
    size = 11
    i = 0
    while size < PROMPT_BYTES:
        w = _WORDS[i % len(_WORDS)]
        words.append(w)
        size += len(w) + 1
        i += 1
    return " ".join(words)[: PROMPT_BYTES - 11]


def prompts(body: str) -> Iterator[str]:
    """Unique 512-byte ASCII prompts: a result cache or dedup must never hit."""
    i = 0
    while True:
        yield f"{i:010d} {body}"
        i += 1


def percentile(sorted_ns: array[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    k = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[k] / 1000.0


def summarize(latencies: array[int]) -> Latency:
    ordered = array("q", sorted(latencies))
    n = len(ordered)
    return Latency(
        samples=n,
        mean_us=(sum(ordered) / n / 1000.0) if n else 0.0,
        p50_us=percentile(ordered, 0.50),
        p95_us=percentile(ordered, 0.95),
        p99_us=percentile(ordered, 0.99),
        max_us=ordered[-1] / 1000.0 if n else 0.0,
    )


@dataclass
class _Recorder:
    """Outcomes of one phase, fed by done callbacks."""

    keep_hops: bool
    latencies: array[int] = field(default_factory=lambda: array("q"))
    hops: dict[str, array[int]] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    last_ns: int = 0

    def record(self, fut: asyncio.Future[Completed], t0: int) -> None:
        now = time.monotonic_ns()
        self.last_ns = now
        if fut.cancelled() or fut.exception() is not None:
            self.failed += 1
            return
        self.completed += 1
        self.latencies.append(now - t0)
        if self.keep_hops:
            stamps = fut.result().stamps
            prev_name, prev = "submit", t0
            for name, at in stamps.items():
                self.hops.setdefault(f"{prev_name}>{name}", array("q")).append(at - prev)
                prev_name, prev = name, at
            self.hops.setdefault(f"{prev_name}>result", array("q")).append(now - prev)

    def hop_medians(self) -> dict[str, float]:
        return {k: percentile(array("q", sorted(v)), 0.5) for k, v in self.hops.items()}


class Progress:
    """A one-line progress bar on stderr (a line per phase when it is not a tty)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def update(self, label: str, fraction: float, detail: str) -> None:
        if not (self.enabled and self.tty):
            return
        width = 30
        filled = int(width * min(max(fraction, 0.0), 1.0))
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{label:<28} [{bar}] {fraction * 100:5.1f}% {detail:<28}")
        sys.stderr.flush()

    def done(self, label: str, detail: str) -> None:
        if not self.enabled:
            return
        prefix = "\r" if self.tty else ""
        sys.stderr.write(f"{prefix}{label:<28} {detail:<70}\n")
        sys.stderr.flush()


@dataclass
class Load:
    """The workload: prompt stream, sessions and window shared by every phase."""

    window: int
    max_tokens: int = OUTPUT_TOKENS
    texts: Iterator[str] = field(default_factory=lambda: prompts(prompt_body()))
    sessions: list[str] = field(default_factory=lambda: [f"session-{i}" for i in range(SESSIONS)])
    sent: int = 0

    def submit(self, target: Target) -> tuple[asyncio.Future[Completed], int]:
        session = self.sessions[self.sent % SESSIONS]
        self.sent += 1
        text = next(self.texts)
        t0 = time.monotonic_ns()
        return target.submit_nowait(text, session_id=session, max_tokens=self.max_tokens), t0


async def closed_loop(
    target: Target,
    load: Load,
    *,
    requests: int | None,
    duration_s: float | None,
    cpu: CpuMeter | None = None,
    progress: Progress | None = None,
    label: str = "",
    keep_hops: bool = False,
) -> Phase:
    """Full speed: keep ``load.window`` requests in flight until N are done or time is up."""
    loop = asyncio.get_running_loop()
    rec = _Recorder(keep_hops)
    finished: asyncio.Future[None] = loop.create_future()
    start = time.monotonic_ns()
    stop_ns = start + int(duration_s * 1e9) if duration_s is not None else None
    state = {"sent": 0, "open": True}

    def submit_one() -> None:
        fut, t0 = load.submit(target)
        state["sent"] += 1
        fut.add_done_callback(functools.partial(on_done, t0=t0))

    def on_done(fut: asyncio.Future[Completed], *, t0: int) -> None:
        rec.record(fut, t0)
        if state["open"]:
            if (requests is not None and state["sent"] >= requests) or (
                stop_ns is not None and rec.last_ns >= stop_ns
            ):
                state["open"] = False
            else:
                submit_one()
                return
        if rec.completed + rec.failed >= state["sent"] and not finished.done():
            finished.set_result(None)

    if cpu is not None:
        cpu.start()
    for _ in range(min(load.window, requests or load.window)):
        submit_one()
    ticker = loop.create_task(
        _report_progress(rec, progress, label, start, requests=requests, duration_s=duration_s)
    )
    try:
        await finished
    finally:
        ticker.cancel()
    cpu_use, foreign = cpu.stop() if cpu is not None else ([], 0.0)
    return _phase("full", None, rec, start, cpu_use, foreign)


async def open_loop(
    target: Target,
    load: Load,
    *,
    rate: float,
    duration_s: float,
    cpu: CpuMeter | None = None,
    progress: Progress | None = None,
    label: str = "",
) -> Phase:
    """Fixed rate: submit on a schedule regardless of completions, for latency."""
    loop = asyncio.get_running_loop()
    rec = _Recorder(keep_hops=True)
    pending: set[asyncio.Future[Completed]] = set()

    def on_done(fut: asyncio.Future[Completed], *, t0: int) -> None:
        pending.discard(fut)
        rec.record(fut, t0)

    if cpu is not None:
        cpu.start()
    start = time.monotonic_ns()
    total = int(rate * duration_s)
    ticker = loop.create_task(
        _report_progress(rec, progress, label, start, requests=None, duration_s=duration_s)
    )
    sent = 0
    try:
        while sent < total:
            due = min(total, int((time.monotonic_ns() - start) * rate / 1e9) + 1) - sent
            if len(pending) > _OPEN_LOOP_MAX_INFLIGHT:
                due = 0
            for _ in range(due):
                fut, t0 = load.submit(target)
                pending.add(fut)
                fut.add_done_callback(functools.partial(on_done, t0=t0))
            sent += due
            await asyncio.sleep(_TICK_S)
        while pending:
            await asyncio.wait(list(pending))
    finally:
        ticker.cancel()
    cpu_use, foreign = cpu.stop() if cpu is not None else ([], 0.0)
    return _phase("rate", rate, rec, start, cpu_use, foreign)


def _phase(
    kind: str,
    offered: float | None,
    rec: _Recorder,
    start: int,
    cpu: list[ProcessCpu],
    foreign: float,
) -> Phase:
    duration = max(rec.last_ns - start, 1) / 1e9
    total_cpu_s = sum(p.percent for p in cpu) / 100.0 * duration
    return Phase(
        kind=kind,
        offered_rps=offered,
        completed=rec.completed,
        failed=rec.failed,
        duration_s=duration,
        throughput_rps=rec.completed / duration,
        latency=summarize(rec.latencies),
        hops_us=rec.hop_medians(),
        cpu=cpu,
        cpu_us_per_request=(total_cpu_s / rec.completed * 1e6) if rec.completed else 0.0,
        foreign_cpu_percent=foreign,
    )


async def _report_progress(
    rec: _Recorder,
    progress: Progress | None,
    label: str,
    start: int,
    *,
    requests: int | None,
    duration_s: float | None,
) -> None:
    if progress is None:
        return
    while True:
        await asyncio.sleep(_PROGRESS_EVERY_S)
        elapsed = (time.monotonic_ns() - start) / 1e9
        done = rec.completed + rec.failed
        if requests is not None:
            fraction = done / requests
        else:
            fraction = elapsed / duration_s if duration_s else 0.0
        progress.update(label, fraction, f"{done / max(elapsed, 1e-9):,.0f} req/s")
