"""``mpipeline status``: a one-shot, read-only view of a running pipeline.

It renders ``metrics.snapshot`` of the run that ``rundir.connect`` joins:
read-only, so asking for status can never change what the pipeline does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from mpipeline.errors import ConfigError, ExitCode, MPipelineError
from mpipeline.metrics.snapshot import CircuitStatus, EdgeStatus, ReplicaStatus, Status, snapshot
from mpipeline.rundir import connect, find_run_dir

REPLICA_COLUMNS = (
    *("REPLICA", "PID", "CPUS", "STATE", "PROCESSED", "IN FLIGHT", "HEARTBEAT", "RESTARTS"),
    "LAST EXIT",
)
EDGE_COLUMNS = ("EDGE", "USED / CAPACITY", "RECORDS IN", "RECORDS OUT", "HIGH-WATER", "FULL")
CIRCUIT_COLUMNS = (
    "UPSTREAM",
    "CIRCUIT",
    "FAILURES IN A ROW",
    "WINDOW FAILED/CALLS",
    "OPENED",
    "NEXT",
)


# Output


def to_json(status: Status) -> str:
    return json.dumps(asdict(status), indent=2)


def render(status: Status) -> str:
    """The human table: a run line, one row per replica, one per ring edge."""
    head = (
        f"run {status.run_id}  {status.state}  supervisor pid {status.supervisor_pid}  "
        f"up {format_duration(status.uptime_s)}\n"
        f"run dir {status.run_dir}  config {status.config}\n"
    )
    if status.gateway_url:
        head += f"gateway {status.gateway_url}\n"
    if status.metrics_url:
        head += f"metrics {status.metrics_url}\n"
    head += _config_line(status)
    replicas = _table(REPLICA_COLUMNS, [_replica_row(r) for r in status.replicas], {1, 4, 5, 6, 7})
    edges = _table(EDGE_COLUMNS, [_edge_row(e) for e in status.edges], {2, 3, 4, 5})
    if status.circuits:
        rows = [_circuit_row(c) for c in status.circuits]
        edges += "\n\n" + _table(CIRCUIT_COLUMNS, rows, {2, 3, 4})
    return f"{head}\n{replicas}\n\n{edges}"


def _config_line(status: Status) -> str:
    """The config version, and the last reload when there was one."""
    line = f"config version {status.config_version}"
    last = status.reload
    if last is not None:
        line += f"  last reload: {last['state']} (attempt {last['attempt']})"
        if last.get("reason"):
            line += f": {str(last['reason']).splitlines()[0]}"
    return line + "\n"


def _replica_row(r: ReplicaStatus) -> tuple[str, ...]:
    beat = "-" if r.heartbeat_age_s is None else f"{format_duration(r.heartbeat_age_s)} ago"
    counts = (str(r.processed), str(r.in_flight), beat, str(r.restarts))
    return (r.name, str(r.pid or "-"), format_cpus(r.cpus), r.state, *counts, r.last_exit or "-")


def _circuit_row(c: CircuitStatus) -> tuple[str, ...]:
    if c.held_for_s:
        after = f"Retry-After {format_duration(c.held_for_s)}"
    elif c.retry_in_s:
        after = f"probe in {format_duration(c.retry_in_s)}"
    else:
        after = "-"
    window = f"{c.window_failures}/{c.window_calls}"
    row = (c.upstream, c.state, str(c.consecutive_failures), window, f"{c.opens}x", after)
    return row


def _edge_row(e: EdgeStatus) -> tuple[str, ...]:
    name = f"{e.producer} -> {e.consumer}"
    r = e.ring
    if r is None:
        return (name, f"{e.error} / {format_bytes(e.capacity)}", "-", "-", "-", "-")
    share = 100 * r.used_bytes / e.capacity
    used = f"{format_bytes(r.used_bytes)} / {format_bytes(e.capacity)} ({share:.0f}%)"
    if r.poisoned:
        used += " POISONED"
    full = str(r.full_events)
    return (name, used, str(r.records_in), str(r.records_out), format_bytes(r.high_water), full)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *map(line, rows)])


def format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f}".removesuffix(".0") + f" {unit}"


def format_duration(s: float) -> str:
    if s < 10:
        return f"{s:.1f}s"
    minutes, sec = divmod(int(s), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{sec:02d}s"
    return f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"


def format_cpus(cpus: list[int]) -> str:
    if not cpus:
        return "any"
    cpus = sorted(cpus)
    spans: list[str] = []
    start = prev = cpus[0]
    for c in [*cpus[1:], -2]:
        if c != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = c
        prev = c
    return ",".join(spans)


def main(
    run_dir: Path | None,
    config: Path | None,
    *,
    as_json: bool = False,
    out: TextIO,
    err: TextIO,
) -> int:
    """``mpipeline status``: 0 and the table (or JSON); 1 when none runs there; 2: bad config."""
    try:
        where = find_run_dir(run_dir, config)
    except ConfigError as exc:
        err.write(f"mpipeline status: invalid configuration:\n{exc}\n")
        return int(ExitCode.USAGE)
    try:
        with connect(where) as run:
            status = snapshot(run)
    except MPipelineError as exc:
        err.write(f"mpipeline status: {exc}\n")
        return int(ExitCode.FAILURE)
    out.write((to_json(status) if as_json else render(status)) + "\n")
    return int(ExitCode.OK)
