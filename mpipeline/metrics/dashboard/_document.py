"""One dashboard update as JSON: what ``top`` shows, plus totals and the DLQ tail.

The page is a thin renderer, so every number it shows is decided here, in
Python, from the same ``View`` that ``mpipeline top`` draws: the browser
only formats. Keys are spelled out one by one (no ``asdict`` of the views)
because this document is the page's contract: a field renamed in the model
must not silently vanish from the page. Latencies are milliseconds and fills
are fractions of 1, as the page shows them; a rate is ``null`` until two
frames of the same run have been read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mpipeline.metrics.rates import Samples
from mpipeline.metrics.view import Frame, RingView, StageView, View

# The client request counts (control block), as prometheus_client names their samples.
REQUEST_TOTALS = {
    "accepted": "mpipeline_requests_accepted_total",
    "completed": "mpipeline_requests_completed_total",
    "failed": "mpipeline_requests_failed_total",
    "in_flight": "mpipeline_requests_in_flight",
}
SHARD_STAGE = "inference"

Json = dict[str, Any]


def document(frame: Frame, view: View, dlq: Sequence[Mapping[str, Any]]) -> Json:
    """The update the page renders from ``frame`` (read now) and ``view`` (its rates)."""
    status = view.status
    doc: Json = {"at": frame.wall, "problem": view.problem, "dlq": list(dlq)}
    if status is None:
        return {**doc, "run": None}
    samples = Samples(frame.families)
    processed = {r.name: r.processed for r in status.replicas}
    stages = [_stage(s, processed) for s in view.stages]
    return {
        **doc,
        "run": {
            "run_id": status.run_id,
            "state": status.state,
            "uptime_s": status.uptime_s,
            "config": status.config,
            "supervisor_pid": status.supervisor_pid,
        },
        "interval_s": view.interval_s,
        "requests": {k: round(samples.total(name)) for k, name in REQUEST_TOTALS.items()},
        "requests_per_s": view.requests_per_s,
        "tokens_per_s": (
            None
            if view.tokens_per_s is None
            else {"in": view.tokens_per_s[0], "out": view.tokens_per_s[1]}
        ),
        "history": list(view.history),
        "stages": stages,
        "shards": _shards(stages),
        "rings": [_ring(r) for r in view.rings],
        "circuits": [
            {
                "upstream": c.upstream,
                "state": c.state,
                "consecutive_failures": c.consecutive_failures,
                "window_calls": c.window_calls,
                "window_failures": c.window_failures,
                "opens": c.opens,
                "retry_in_s": c.retry_in_s,
            }
            for c in view.circuits
        ],
        "dedup": (
            None
            if view.dedup is None
            else {
                "hits_per_s": view.dedup.hits_per_s,
                "calls_per_s": view.dedup.calls_per_s,
                "savings": view.dedup.savings,
                "total_savings": view.dedup.total_savings,
            }
        ),
        # Newest first: the page shows the top rows.
        "errors": [
            {"at": e.wall, "stage": e.stage, "code": e.code, "count": e.count}
            for e in reversed(view.errors)
        ],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _stage(s: StageView, processed: Mapping[str, int]) -> Json:
    replicas = [
        {
            "name": r.name,
            "pid": r.pid,
            "cpus": list(r.cpus),
            "state": r.state,
            "per_s": r.per_s,
            "processed": processed.get(r.name, 0),
            "in_flight": r.in_flight,
            "restarts": r.restarts,
            "cpu_percent": r.cpu_percent,
        }
        for r in s.replicas
    ]
    return {
        "stage": s.stage,
        "per_s": s.per_s,
        "p50_ms": _ms(s.p50_s),
        "p95_ms": _ms(s.p95_s),
        "ready": s.ready,
        "processed": sum(r["processed"] for r in replicas),
        "replicas": replicas,
    }


def _shards(stages: Sequence[Json]) -> list[Json]:
    """Each inference shard's share of the work: session hashing can load one shard more."""
    shards = [r for s in stages if s["stage"] == SHARD_STAGE for r in s["replicas"]]
    total = sum(r["processed"] for r in shards)
    return [
        {
            "name": r["name"],
            "per_s": r["per_s"],
            "in_flight": r["in_flight"],
            "processed": r["processed"],
            "share": r["processed"] / total if total else None,
        }
        for r in shards
    ]


def _ring(r: RingView) -> Json:
    return {
        "name": r.name,
        "used": r.used,
        "capacity": r.capacity,
        "fill": r.fill,
        "high_water": r.high_water,
        "high_fill": r.high_fill,
        "poisoned": r.poisoned,
        "failures": r.failures,
        "error": r.error,
    }
