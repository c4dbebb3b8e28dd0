"""``mpipeline status``: a one-shot, read-only view of a running pipeline.

Everything comes from what the supervisor already publishes: ``state.json``
in the run directory (pid, run id, control segment, topology), the control
block (per-replica pid, state, heartbeat, counters) and each ring's header.
Nothing here claims a ring side, takes a lock or writes a byte, so asking for
status can never change what the pipeline does; ``profiling`` reuses
``connect`` to find a replica's pid the same way.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import msgspec

from mpipeline.config import PipelineConfig, load, resolve_run_dir
from mpipeline.control import SIGNALLED, ControlBlock, ReplicaState
from mpipeline.errors import ConfigError, ExitCode, MPipelineError, RingCorrupted, RingNotFound
from mpipeline.ring import Ring
from mpipeline.supervisor import LOCK_FILE, STATE_FILE

DEFAULT_CONFIG = Path("config/pipeline.toml")
PROC_LOCKS = Path("/proc/locks")
# Ring.attach validates positions it reads one after the other; on a busy ring
# the consumer can pass the write position it saw, so a failed check is retried.
ATTACH_ATTEMPTS = 3
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


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    name: str
    stage: str
    index: int
    slot: int
    pid: int
    cpus: list[int]
    state: str
    processed: int
    in_flight: int
    heartbeat_age_s: float | None
    restarts: int
    generation: int
    last_exit: str | None


@dataclass(frozen=True, slots=True)
class RingCounters:
    used_bytes: int
    records_in: int
    records_out: int
    high_water: int
    full_events: int
    corrupt_records: int
    poisoned: bool
    producer_pid: int
    consumer_pid: int


_COUNTERS = {f.name for f in fields(RingCounters)}


@dataclass(frozen=True, slots=True)
class EdgeStatus:
    name: str
    producer: str
    consumer: str
    capacity: int
    # None when the header could not be read (the run is stopping); ``error`` says why.
    ring: RingCounters | None
    error: str | None


@dataclass(frozen=True, slots=True)
class CircuitStatus:
    """One upstream's circuit breaker, shared by every inference shard."""

    upstream: str
    state: str
    consecutive_failures: int
    window_calls: int
    window_failures: int
    opens: int
    # Seconds until an open circuit lets a probe through; until a Retry-After ends.
    retry_in_s: float
    held_for_s: float


@dataclass(frozen=True, slots=True)
class Status:
    run_dir: str
    run_id: str
    config: str
    state: str
    supervisor_pid: int
    uptime_s: float
    replicas: list[ReplicaStatus]
    edges: list[EdgeStatus]
    gateway_url: str | None = None
    circuits: list[CircuitStatus] = field(default_factory=list)
    metrics_url: str | None = None


@dataclass(frozen=True, slots=True)
class Run:
    """A live supervisor's published state plus an attached (read-only) control block."""

    run_dir: Path
    state: dict[str, Any]
    control: ControlBlock


# Finding the run


def find_run_dir(run_dir: Path | None, config: Path | None) -> Path:
    """``--run-dir`` if given, else the run dir of ``--config`` (or of the default config).

    :raises ConfigError: when the config file named is invalid.
    """
    if run_dir is not None:
        return run_dir
    if config is None:
        config = DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None
    return resolve_run_dir(load(config) if config is not None else PipelineConfig())


def lock_holder(run_dir: Path) -> int | None:
    """Pid holding the supervisor's flock on ``run_dir``, read from /proc/locks (no locking)."""
    path = run_dir / LOCK_FILE
    try:
        inode = path.stat().st_ino
        written = path.read_text().strip()
        table = PROC_LOCKS.read_text()
    except OSError:
        return None
    for line in table.splitlines():
        parts = line.split()
        # "1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF"; waiters have "->".
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        pid, where = parts[4], parts[5]
        if where.rsplit(":", 1)[-1] == str(inode) and pid == written:
            return int(pid)
    return None


@contextlib.contextmanager
def connect(run_dir: Path) -> Iterator[Run]:
    """Attach to the supervisor running in ``run_dir``.

    :raises MPipelineError: naming the reason when none is running there (or
        it is still starting), so the CLI can print it and exit 1.
    """
    where = f"in {run_dir}"
    if not run_dir.is_dir():
        raise MPipelineError(f"no supervisor is running {where}: the directory does not exist")
    try:
        state: dict[str, Any] = json.loads((run_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        holder = lock_holder(run_dir)
        if holder is not None:
            raise MPipelineError(
                f"the supervisor {where} (pid {holder}) is still starting; try again shortly"
            ) from None
        raise MPipelineError(
            f"no supervisor is running {where} (no {STATE_FILE}); start one with "
            "`mpipeline run`, or point at another with --run-dir/--config"
        ) from None
    except PermissionError:
        raise _other_user(where) from None
    except (OSError, ValueError) as exc:
        raise MPipelineError(f"cannot read {run_dir / STATE_FILE}: {exc}") from None
    pid = state.get("pid")
    stale = MPipelineError(
        f"no supervisor is running {where}: {STATE_FILE} names pid {pid}, which is gone "
        "(a killed supervisor leaves it; `mpipeline shm sweep` removes its segments)"
    )
    try:
        control = ControlBlock.attach(state["control"])
    except (RingNotFound, RingCorrupted):
        raise stale from None
    except PermissionError:
        raise _other_user(where) from None
    try:
        if control.supervisor_pid != pid or not control.supervisor_alive():
            raise stale
        yield Run(run_dir, state, control)
    finally:
        control.close()


def _other_user(where: str) -> MPipelineError:
    return MPipelineError(f"the pipeline {where} belongs to another user; run this as that user")


# Reading


def snapshot(run: Run) -> Status:
    """Read every replica slot and ring header once."""
    ctl = run.control
    now = time.monotonic_ns()
    replicas = []
    topo = run.state["topology"]
    gateways = [{**g, "stage": "gateway"} for g in topo.get("gateways", ())]
    for spec in [*gateways, *topo["replicas"]]:
        slot = spec["slot"]
        rec = ctl.record(slot)
        beat = rec.heartbeat_ns
        replicas.append(
            ReplicaStatus(
                name=f"{spec['stage']}-{spec['index']}",
                stage=spec["stage"],
                index=spec["index"],
                slot=slot,
                pid=rec.pid,
                cpus=list(spec["cpus"]),
                state=_state_name(rec.state),
                processed=rec.processed,
                in_flight=rec.in_flight,
                heartbeat_age_s=max(0, now - beat) / 1e9 if beat else None,
                restarts=rec.restarts,
                generation=rec.generation,
                last_exit=describe_exit(rec.last_exit, rec.restarts),
            )
        )
    edges = [_edge(e) for e in run.state["topology"]["edges"]]
    return Status(
        run_dir=str(run.run_dir),
        run_id=run.state["run_id"],
        config=run.state.get("config", ""),
        gateway_url=run.state.get("gateway_url"),
        metrics_url=run.state.get("metrics_url"),
        state=ctl.state.name,
        supervisor_pid=ctl.supervisor_pid,
        uptime_s=max(0, now - ctl.started_ns) / 1e9,
        replicas=replicas,
        edges=edges,
        circuits=_circuits(run.state),
    )


def _circuits(state: dict[str, Any]) -> list[CircuitStatus]:
    """The run's circuit breakers (none unless the worker calls remote upstreams)."""
    name = state.get("breakers")
    if not name:
        return []
    from mpipeline.config import BreakerConfig
    from mpipeline.resilience import BreakerBoard

    try:
        cfg = msgspec.convert(state.get("breaker_config") or {}, BreakerConfig)
        board = BreakerBoard.attach(name, cfg)
    except (RingNotFound, RingCorrupted, msgspec.ValidationError):
        return []
    try:
        now = time.monotonic()
        return [
            CircuitStatus(
                upstream=b.name,
                state=b.state,
                consecutive_failures=b.consecutive_failures,
                window_calls=b.window_calls,
                window_failures=b.window_failures,
                opens=b.opens,
                retry_in_s=max(0.0, b.retry_at - now) if b.retry_at else 0.0,
                held_for_s=max(0.0, b.not_before - now),
            )
            for b in board.snapshot()
        ]
    finally:
        board.close()


def _edge(spec: dict[str, Any]) -> EdgeStatus:
    ring: RingCounters | None = None
    error: str | None = None
    for _ in range(ATTACH_ATTEMPTS):
        try:
            handle = Ring.attach(spec["name"])
        except RingNotFound:
            error = "gone (the run is stopping)"
            break
        except RingCorrupted as exc:
            error = str(exc)
            continue
        try:
            s = handle.stats()
        finally:
            handle.close()
        # Positions are read one after the other: a busy consumer can pass the
        # write position seen, so clamp instead of showing a negative fill.
        counters = {k: v for k, v in s._asdict().items() if k in _COUNTERS}
        ring = RingCounters(**{**counters, "used_bytes": max(0, s.used_bytes)})
        error = None
        break
    return EdgeStatus(
        spec["name"], spec["producer"], spec["consumer"], spec["capacity"], ring, error
    )


def _state_name(value: int) -> str:
    try:
        return ReplicaState(value).name
    except ValueError:
        return f"?{value}"


def describe_exit(raw: int, restarts: int) -> str | None:
    """The control block's last-exit slot in words; None when the replica never exited."""
    if raw == 0 and restarts == 0:
        return None
    if raw & SIGNALLED:
        signo = raw & 0xFFFF
        try:
            return f"killed by {signal.Signals(signo).name}"
        except ValueError:
            return f"killed by signal {signo}"
    try:
        return f"exit {raw} ({ExitCode(raw).name})"
    except ValueError:
        return f"exit {raw}"


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
    replicas = _table(REPLICA_COLUMNS, [_replica_row(r) for r in status.replicas], {1, 4, 5, 6, 7})
    edges = _table(EDGE_COLUMNS, [_edge_row(e) for e in status.edges], {2, 3, 4, 5})
    if status.circuits:
        rows = [_circuit_row(c) for c in status.circuits]
        edges += "\n\n" + _table(CIRCUIT_COLUMNS, rows, {2, 3, 4})
    return f"{head}\n{replicas}\n\n{edges}"


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
