"""What is counted, under which labels, and where each number lives in a region.

Every writer (a stage replica or a gateway replica) owns one fixed-size
region of float64 cells in the run's metrics block, indexed by its control
block slot. Which cell holds which series is a pure function of facts both
sides know: the writer's stage and name, the rings it writes, the upstream
names, and the fixed route/status/code lists below. The writer computes its
own region's layout at boot; the supervisor computes every region's layout
from ``state.json`` at scrape time. No directory is stored in shared memory,
so there is nothing to parse, nothing to corrupt, and nothing to keep in sync
when a replica restarts (the new process computes the same layout and goes on
counting where its predecessor stopped: counters never reset).

Histograms use power-of-two buckets in nanoseconds: the bucket of a duration
is ``ns.bit_length()``, one integer instruction instead of a bisect, which is
what lets every message of every stage be timed under the 3 % budget. The
buckets span 1.024 µs to 68.7 s, a factor of two apart; ``histogram_quantile``
interpolates inside a bucket, so p95 is within that factor and usually much
closer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mpipeline.errors import ErrorCode
from mpipeline.messages import STAGE_ORDER
from mpipeline.topology import edge_label

PREFIX = "mpipeline_"
Kind = Literal["counter", "gauge", "histogram"]

# Histogram cells: bucket k (0..HIST_FINITE-1) holds durations below
# 2 ** (HIST_LOW_BIT + k) ns, then the +Inf bucket, then the sum in ns.
HIST_LOW_BIT = 10  # 1.024 µs
HIST_HIGH_BIT = 36  # 68.7 s
HIST_FINITE = HIST_HIGH_BIT - HIST_LOW_BIT + 1
HIST_INF = HIST_FINITE
HIST_SUM = HIST_FINITE + 1
HIST_CELLS = HIST_FINITE + 2
# ns.bit_length() -> bucket offset, for any int64 duration.
BUCKET_OF_BITS: tuple[int, ...] = tuple(
    0 if b <= HIST_LOW_BIT else (b - HIST_LOW_BIT if b <= HIST_HIGH_BIT else HIST_INF)
    for b in range(65)
)
# Upper bounds in seconds, as Prometheus's ``le`` label.
BUCKET_BOUNDS_S: tuple[float, ...] = tuple(
    (1 << (HIST_LOW_BIT + k)) / 1e9 for k in range(HIST_FINITE)
)

# One region per writer. Generous: a gateway uses about 600 cells, a stage
# replica 40 plus 3 per output ring and 2 per upstream.
REGION_CELLS = 4096


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # without the prefix; a counter's without "_total" as in prometheus_client
    kind: Kind
    help: str
    labels: tuple[str, ...]


def _families(*items: Family) -> dict[str, Family]:
    return {f.name: f for f in items}


FAMILIES = _families(
    # Written by gateway replicas.
    Family(
        "requests", "counter", "HTTP requests answered, by route and status.", ("route", "status")
    ),
    Family(
        "request_duration_seconds",
        "histogram",
        "Time from a request's arrival to its answer's end (the whole stream).",
        ("route",),
    ),
    Family(
        "time_to_first_token_seconds",
        "histogram",
        "Time from a streaming request's arrival to its first token at the gateway.",
        (),
    ),
    Family(
        "errors",
        "counter",
        "Requests that ended in an error, by the stage that failed them and the code.",
        ("stage", "code"),
    ),
    # Written by stage replicas.
    Family(
        "stage_duration_seconds",
        "histogram",
        "Time one message spends in a stage's handler.",
        ("stage", "replica"),
    ),
    Family(
        "shed",
        "counter",
        "Requests refused because a ring was full, by edge and reason.",
        ("edge", "reason"),
    ),
    Family("expired", "counter", "Requests whose deadline passed inside a stage.", ("stage",)),
    Family(
        "event_loop_lag_seconds",
        "gauge",
        "How late the replica's last heartbeat timer fired: a blocked event loop.",
        ("stage", "replica"),
    ),
    Family(
        "upstream_calls",
        "counter",
        "Calls made to a model upstream (each retry is a call).",
        ("upstream",),
    ),
    Family("upstream_retries", "counter", "Retries of failed upstream calls.", ("upstream",)),
    Family(
        "dedup_hits",
        "counter",
        "Requests answered without their own upstream call: coalesced or cached.",
        ("kind",),
    ),
    Family("tokens", "counter", "Model tokens, prompt (in) and completion (out).", ("direction",)),
    Family(
        "redactions",
        "counter",
        "Entities post redacted from output, by kind (never the value).",
        ("kind",),
    ),
    # Read by the supervisor from ring headers, the control block, the breaker
    # board and psutil at scrape time (no cells).
    Family("queue_depth", "gauge", "Records waiting in a ring.", ("edge",)),
    Family("ring_used_bytes", "gauge", "Bytes in use in a ring.", ("edge",)),
    Family("ring_capacity_bytes", "gauge", "A ring's data capacity in bytes.", ("edge",)),
    Family("ring_high_water_bytes", "gauge", "The most bytes a ring has held at once.", ("edge",)),
    Family(
        "ring_records",
        "counter",
        "Records through a ring, written (in) and read (out).",
        ("edge", "direction"),
    ),
    Family(
        "circuit_state",
        "gauge",
        "An upstream's circuit: 0 closed, 1 open (calls fail fast), 2 half open (probing).",
        ("upstream",),
    ),
    Family("circuit_opens", "counter", "Times an upstream's circuit opened.", ("upstream",)),
    Family(
        "stage_restarts",
        "counter",
        "Times the supervisor restarted a replica.",
        ("stage", "replica"),
    ),
    Family(
        "process_cpu_seconds",
        "counter",
        "CPU time of a replica's process (user + system).",
        ("stage", "replica"),
    ),
    Family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of a replica's process.",
        ("stage", "replica"),
    ),
    Family("replica_up", "gauge", "1 when a replica is running and ready.", ("stage", "replica")),
    # Live reconfiguration: the run's config version and the one each replica runs.
    Family("config_version", "gauge", "The run's config version (+1 per applied reload).", ()),
    Family(
        "replica_config_version",
        "gauge",
        "The config version a replica has applied.",
        ("stage", "replica"),
    ),
    # Read from the control block's client slots: every client, gateways and
    # Python API clients alike. accepted = completed + failed + in_flight
    # holds in every scrape (invariant I6).
    Family(
        "requests_accepted",
        "counter",
        "Requests a client accepted into the pipeline.",
        ("client",),
    ),
    Family(
        "requests_completed", "counter", "Accepted requests that ended in a result.", ("client",)
    ),
    Family(
        "requests_failed",
        "counter",
        "Accepted requests that ended in an error (each has its DLQ record).",
        ("client",),
    ),
    Family("requests_in_flight", "gauge", "Accepted requests not yet answered.", ("client",)),
)

# The gateway's routes; anything else is counted as "other" (a path is user input).
ROUTES = (
    "/v1/prompt",
    "/v1/chat/completions",
    "/v1/stream",
    "/v1/status",
    "/v1/models",
    "/healthz",
    "/readyz",
    "/openapi.json",
    "other",
)
# Statuses the gateway sends; anything else is "other".
STATUSES = (
    "101",
    "200",
    "400",
    "401",
    "404",
    "405",
    "408",
    "413",
    "415",
    "422",
    "426",
    "429",
    "431",
    "499",
    "500",
    "502",
    "503",
    "504",
    "other",
)
# Stages a Failed can name, plus "gateway" for errors raised at the gateway.
ERROR_STAGES = ("gateway", *STAGE_ORDER, "other")
CODES = (*(str(c) for c in ErrorCode), "other")
DEDUP_KINDS = ("coalesced", "cached")
DIRECTIONS = ("in", "out")
# What post's redaction counts (mpipeline/stages/redact.py): the built-in entities,
# then every user pattern as one kind (a name from the config is not a fixed label).
REDACTION_KINDS = ("email", "phone", "card", "iban", "ssn", "ip", "api_key", "secret", "custom")

Key = tuple[str, tuple[str, ...]]


@dataclass(slots=True)
class Region:
    """Cell offsets of one writer's series, relative to its region's start."""

    cells: dict[Key, int] = field(default_factory=dict)
    size: int = 0

    def add(self, family: str, labels: Sequence[str] = ()) -> int:
        fam = FAMILIES[family]
        if len(labels) != len(fam.labels):
            raise ValueError(f"{family} takes labels {fam.labels}, got {tuple(labels)}")
        key = (family, tuple(labels))
        if key in self.cells:
            return self.cells[key]
        offset = self.size
        self.size += HIST_CELLS if fam.kind == "histogram" else 1
        if self.size > REGION_CELLS:
            raise ValueError(f"metrics region overflow: {self.size} cells > {REGION_CELLS}")
        self.cells[key] = offset
        return offset

    def offset(self, family: str, *labels: str) -> int:
        return self.cells[(family, labels)]

    def items(self) -> Iterable[tuple[Key, int]]:
        return self.cells.items()


def stage_region(
    stage: str, replica: str, rings: Sequence[str], upstreams: Sequence[str] = ()
) -> Region:
    """A stage replica's series. ``rings``: the names of the rings it writes (and may
    shed on). Writers and the reader both pass ring names, so both derive the edge
    labels here, the same way: their layouts must agree cell for cell."""
    edges = [edge_label(name) for name in rings]
    r = Region()
    r.add("stage_duration_seconds", (stage, replica))
    r.add("event_loop_lag_seconds", (stage, replica))
    r.add("expired", (stage,))
    for edge in edges:
        r.add("shed", (edge, "ring_full"))
    if stage == "inference":
        for name in upstreams:
            r.add("upstream_calls", (name,))
            r.add("upstream_retries", (name,))
        for kind in DEDUP_KINDS:
            r.add("dedup_hits", (kind,))
        for direction in DIRECTIONS:
            r.add("tokens", (direction,))
    if stage == "post":
        for kind in REDACTION_KINDS:
            r.add("redactions", (kind,))
    return r


def gateway_region(replica: str, rings: Sequence[str]) -> Region:
    """A gateway replica's series. ``rings``: the names of its ingress rings."""
    edges = [edge_label(name) for name in rings]
    r = Region()
    for route in ROUTES:
        for status in STATUSES:
            r.add("requests", (route, status))
        r.add("request_duration_seconds", (route,))
    r.add("time_to_first_token_seconds")
    for stage in ERROR_STAGES:
        for code in CODES:
            r.add("errors", (stage, code))
    r.add("event_loop_lag_seconds", ("gateway", replica))
    for edge in edges:
        r.add("shed", (edge, "ring_full"))
    return r


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


def status_label(status: int) -> str:
    text = str(status)
    return text if text in STATUSES else "other"


__all__ = [
    "BUCKET_BOUNDS_S",
    "BUCKET_OF_BITS",
    "CODES",
    "ERROR_STAGES",
    "FAMILIES",
    "HIST_CELLS",
    "HIST_INF",
    "HIST_SUM",
    "PREFIX",
    "REDACTION_KINDS",
    "REGION_CELLS",
    "ROUTES",
    "STATUSES",
    "Family",
    "Region",
    "gateway_region",
    "route_label",
    "stage_region",
    "status_label",
]
