"""A one-shot, read-only reading of a live run: replicas, rings, circuits.

Everything comes from what the supervisor already publishes: ``state.json``
(``rundir.RunInfo``), the control block (per-replica pid, state, heartbeat,
counters), each ring's header and the breaker board. Nothing here claims a
ring side, takes a lock or writes a byte, so reading can never change what
the pipeline does. ``mpipeline status`` and ``top`` render it, the gateway's
``/v1/status`` serves it, and ``/metrics`` is collected from it.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field, fields
from typing import Any

import msgspec

from mpipeline.control import SIGNALLED, ReplicaState
from mpipeline.errors import ExitCode, MPipelineError, RingCorrupted, RingNotFound
from mpipeline.reloads import read_outcome
from mpipeline.resilience import BreakerBoard
from mpipeline.ring import Ring
from mpipeline.rundir import Run, RunInfo
from mpipeline.topology import EdgeSpec, GatewaySpec, ReplicaSpec

# Ring.attach validates positions it reads one after the other; on a busy ring
# the consumer can pass the write position it saw, so a failed check is retried.
ATTACH_ATTEMPTS = 3


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
    # The config version this replica has applied (live reconfiguration).
    config_version: int = 0


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
    # The run's config version, and its last reload (``reloads.ReloadOutcome`` as a dict).
    config_version: int = 0
    reload: dict[str, Any] | None = None


def snapshot(run: Run) -> Status:
    """Read every replica slot and ring header once."""
    ctl = run.control
    now = time.monotonic_ns()
    replicas = []
    topo = run.info.topology
    specs: list[GatewaySpec | ReplicaSpec] = [*topo.gateways, *topo.replicas]
    for spec in specs:
        slot = spec.slot
        rec = ctl.record(slot)
        beat = rec.heartbeat_ns
        replicas.append(
            ReplicaStatus(
                name=spec.name,
                stage=spec.stage,
                index=spec.index,
                slot=slot,
                pid=rec.pid,
                cpus=list(spec.cpus),
                state=_state_name(rec.state),
                processed=rec.processed,
                in_flight=rec.in_flight,
                heartbeat_age_s=max(0, now - beat) / 1e9 if beat else None,
                restarts=rec.restarts,
                generation=rec.generation,
                last_exit=describe_exit(rec.last_exit, rec.restarts),
                config_version=ctl.config_applied(slot),
            )
        )
    edges = [_edge(e) for e in topo.edges]
    return Status(
        run_dir=str(run.run_dir),
        run_id=run.info.run_id,
        config=run.info.config,
        gateway_url=run.info.gateway_url,
        metrics_url=run.info.metrics_url,
        state=ctl.state.name,
        supervisor_pid=ctl.supervisor_pid,
        uptime_s=max(0, now - ctl.started_ns) / 1e9,
        replicas=replicas,
        edges=edges,
        circuits=_circuits(run.info),
        config_version=ctl.config_version,
        reload=_reload(run),
    )


def _reload(run: Run) -> dict[str, Any] | None:
    """The run's last reload outcome, or None (none yet, or its file unreadable)."""
    try:
        outcome = read_outcome(run.run_dir)
    except MPipelineError:
        return None
    return None if outcome is None else msgspec.to_builtins(outcome)


def _circuits(info: RunInfo) -> list[CircuitStatus]:
    """The run's circuit breakers (none unless the worker calls remote upstreams)."""
    if not info.breakers:
        return []
    try:
        board = BreakerBoard.attach(info.breakers, info.breaker_config)
    except (RingNotFound, RingCorrupted):
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


def _edge(spec: EdgeSpec) -> EdgeStatus:
    ring: RingCounters | None = None
    error: str | None = None
    for _ in range(ATTACH_ATTEMPTS):
        try:
            handle = Ring.attach(spec.name)
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
    return EdgeStatus(spec.name, spec.producer, spec.consumer, spec.capacity, ring, error)


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
