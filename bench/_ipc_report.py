"""Results of ``bench.ring_vs_peers`` and how they are printed: tables, ratios, targets.

The tables are Markdown padded to line up in a terminal, so a run can be pasted
into ``bench/RESULTS.md`` as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from bench._ipc_loops import BATCH, LATENCY_RATE_HZ

# The issue 2 throughput targets, in messages per second.
TARGET_512_MSGS: Final = 1_000_000
TARGET_4K_MSGS: Final = 600_000

# How each transport key is printed.
NAMES: Final = {
    "ring": "Ring",
    "queue": "mp.Queue",
    "pipe": "mp.Pipe",
    "ff": "faster-fifo",
    "zmq": "pyzmq ipc",
}
BATCHED: Final = ("many", "record")


@dataclass
class Throughput:
    size: int
    transport: str
    mode: str
    what: str
    msgs_per_s: float = 0.0
    mb_per_s: float = 0.0
    messages: int = 0
    preempted: int = 0
    full_events: int | None = None
    error: str = ""


@dataclass
class Latency:
    size: int
    transport: str
    consumer: str
    p50_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    consumer_cpu_pct: float = 0.0
    samples: int = 0
    preempted: int = 0
    error: str = ""


@dataclass
class Report:
    machine: dict[str, str]
    command: str
    throughput: list[Throughput] = field(default_factory=list)
    ceilings: dict[int, dict[str, float]] = field(default_factory=dict)
    latency: list[Latency] = field(default_factory=list)
    idle_cpu_pct: float = 0.0


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table padded to line up in a terminal too; numbers align right."""
    cols = range(len(header))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in cols]
    right = [all(c[:1].isdigit() or not c for c in (r[i] for r in rows)) for i in cols]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if r else ":" + "-" * (w + 1)
            for w, r in zip(widths, right, strict=True)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def best(report: Report, size: int, transport: str, modes: Sequence[str]) -> Throughput | None:
    rows = [
        r
        for r in report.throughput
        if r.size == size and r.transport == transport and r.mode in modes and not r.error
    ]
    return max(rows, key=lambda r: r.msgs_per_s, default=None)


def ratio(a: Throughput | None, b: Throughput | None) -> str:
    if a is None or b is None or not b.msgs_per_s:
        return "n/a"
    return f"{a.msgs_per_s / b.msgs_per_s:.1f}x ({a.mode} / {b.mode})"


def render(report: Report) -> str:
    out = ["Machine: " + "; ".join(f"{k} {v}" for k, v in report.machine.items())]
    out.append(f"Command: {report.command}\n")
    out.append("Throughput: messages received / consumer wall time from first to last message.")
    out.append("'preempted': involuntary context switches of the consumer (other load).")
    out.append("'ring full': times the Ring producer found no room (the consumer was slower).\n")
    rows = [
        [str(r.size), NAMES[r.transport], r.what]
        + (
            [f"FAILED: {r.error}", "", "", ""]
            if r.error
            else [
                f"{r.msgs_per_s:,.0f}",
                f"{r.mb_per_s:,.1f}",
                str(r.preempted),
                "" if r.full_events is None else f"{r.full_events:,}",
            ]
        )
        for r in report.throughput
    ]
    header = ["size B", "transport", "batching", "msg/s", "MB/s", "preempted", "ring full"]
    out.append(table(header, rows))
    out.append("\nIn-process ceiling (one process, same codec, no IPC):\n")
    rows = [
        [str(size), k, f"{v:,.0f}"] for size, c in report.ceilings.items() for k, v in c.items()
    ]
    out.append(table(["size B", "loop", "msg/s"], rows))
    out.append(
        f"\nOne-way latency at {LATENCY_RATE_HZ:,} msg/s "
        "(stamped before encode, read after decode):\n"
    )
    rows = [
        [str(r.size), NAMES[r.transport], r.consumer]
        + (
            [f"FAILED: {r.error}", "", "", "", ""]
            if r.error
            else [
                f"{r.p50_us:.1f}",
                f"{r.p99_us:.1f}",
                f"{r.max_us:.1f}",
                f"{r.consumer_cpu_pct:.0f}",
                str(r.preempted),
            ]
        )
        for r in report.latency
    ]
    header = ["size B", "transport", "consumer", "p50 us", "p99 us", "max us", "CPU %", "preempted"]
    out.append(table(header, rows))
    out.append(f"\nIdle waiter (await get() on an empty ring): {report.idle_cpu_pct:.2f} % CPU\n")
    out.append("Ratios and targets:\n")
    out.extend(summary(report))
    return "\n".join(out)


def summary(report: Report) -> list[str]:
    lines = []
    for size, ceil in report.ceilings.items():
        ring1, ringb = best(report, size, "ring", ["single"]), best(report, size, "ring", BATCHED)
        q1, qb = best(report, size, "queue", ["single"]), best(report, size, "queue", BATCHED)
        ff1, ffb = best(report, size, "ff", ["single"]), best(report, size, "ff", BATCHED)
        lines.append(
            f"- {size} B: Ring / mp.Queue {ratio(ring1, q1)}, {ratio(ringb, q1)}, "
            f"{ratio(ringb, qb)}; Ring / faster-fifo {ratio(ring1, ff1)}, {ratio(ringb, ffb)}"
        )
        for row, kind in ((ring1, "1-msg"), (ringb, f"{BATCH}-msg")):
            if row is not None and (kind == "1-msg" or row.mode == "record"):
                dec = 100 * row.msgs_per_s / ceil[f"decode {kind} record"]
                both = 100 * row.msgs_per_s / ceil[f"encode+decode {kind} record"]
                lines.append(
                    f"  Ring {row.mode} = {dec:.0f} % of the in-process decode-only loop "
                    f"({kind} records), {both:.0f} % of encode+decode"
                )
    for size, target in ((512, TARGET_512_MSGS), (4096, TARGET_4K_MSGS)):
        for modes in (["single"], BATCHED):
            r = best(report, size, "ring", modes)
            if r is not None:
                lines.append(
                    f"- target {size} B >= {target:,} msg/s, Ring {r.mode}: {r.msgs_per_s:,.0f} "
                    f"({r.msgs_per_s / target:.2f}x) {verdict(r.msgs_per_s >= target)}"
                )
    ring1, ringb = best(report, 512, "ring", ["single"]), best(report, 512, "ring", BATCHED)
    q1, qb = best(report, 512, "queue", ["single"]), best(report, 512, "queue", BATCHED)
    ffb = best(report, 512, "ff", BATCHED)
    for a, b, want in ((ringb, q1, 6.0), (ring1, q1, 6.0), (ringb, qb, 6.0), (ringb, ffb, 1.5)):
        if a is not None and b is not None:
            x = a.msgs_per_s / b.msgs_per_s
            lines.append(
                f"- target 512 B Ring >= {want:g}x {NAMES[b.transport]}: {ratio(a, b)} "
                f"{verdict(x >= want)}"
            )
    for lat in report.latency:
        if lat.transport == "ring" and lat.size == 512 and not lat.error:
            limit = 10.0 if lat.consumer.startswith("busy") else 60.0
            lines.append(
                f"- target 512 B p50 <= {limit:.0f} us ({lat.consumer}): {lat.p50_us:.1f} us "
                f"{verdict(lat.p50_us <= limit)}"
            )
    idle = report.idle_cpu_pct
    lines.append(f"- target idle waiter < 1 % CPU: {idle:.2f} % {verdict(idle < 1)}")
    return lines


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"
