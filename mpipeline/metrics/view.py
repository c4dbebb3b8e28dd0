"""The numbers a live view of a run shows, computed from consecutive frames.

``mpipeline top`` (in ``ops``) and the supervisor's web dashboard (in
``metrics.dashboard``) show the same figures, so the model that turns frames
into them lives here, below both: the supervisor may not import ``ops``
(pyproject.toml's layers), and two copies of this math would drift. Like
``top``'s %CPU, each rate is the difference between the last two frames
divided by the time between them (``metrics.rates``); levels (ring fill,
circuit state) are shown as read. No Textual, no HTML and no shared memory
here: it is unit tested on synthetic frames.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import Metric

from mpipeline.messages import STAGE_ORDER
from mpipeline.metrics.rates import (
    Buckets,
    Samples,
    bucket_delta,
    counter_delta,
    quantile,
    rate,
    savings,
)
from mpipeline.metrics.snapshot import CircuitStatus, EdgeStatus, ReplicaStatus, Status

# Stages in the order a request meets them; the gateway is the edge of the run.
FLOW = ("gateway", *STAGE_ORDER)
# Routes that carry pipeline requests; probes and /v1/status would dilute the latency.
WORK_ROUTES = frozenset({"/v1/prompt", "/v1/chat/completions", "/v1/stream"})
# topology names a client's error-return rings "<client>err".
FAILURE_SUFFIX = "err"
HISTORY = 60  # refreshes of requests/s in the sparkline
ERROR_TAIL = 50  # error lines kept
QUANTILES = (0.5, 0.95)
# Sample names as prometheus_client exposes them (counters with "_total").
REQUEST_SECONDS = "mpipeline_request_duration_seconds"
STAGE_SECONDS = "mpipeline_stage_duration_seconds"
ERRORS = "mpipeline_errors_total"
CPU_SECONDS = "mpipeline_process_cpu_seconds_total"
TOKENS = "mpipeline_tokens_total"
DEDUP_HITS = "mpipeline_dedup_hits_total"
UPSTREAM_CALLS = "mpipeline_upstream_calls_total"


@dataclass(frozen=True, slots=True)
class Frame:
    """One refresh: what the run published, read at one moment.

    ``status`` is None when no supervisor could be read; ``problem`` says why
    in words fit for the screen ("no supervisor is running in ...").
    """

    at: float  # time.monotonic() of the read: rates divide by differences of it
    wall: float  # time.time() of the read, to stamp error lines for people
    status: Status | None
    families: Sequence[Metric] = ()
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaView:
    name: str
    pid: int
    cpus: tuple[int, ...]
    state: str
    per_s: float | None
    in_flight: int
    restarts: int
    cpu_percent: float | None


@dataclass(frozen=True, slots=True)
class StageView:
    stage: str
    replicas: tuple[ReplicaView, ...]
    per_s: float | None  # messages handled (gateway: requests answered) per second
    p50_s: float | None  # over the last interval; None when nothing was timed in it
    p95_s: float | None

    @property
    def ready(self) -> int:
        return sum(r.state == "READY" for r in self.replicas)


@dataclass(frozen=True, slots=True)
class RingView:
    name: str  # "producer → consumer"
    used: int
    capacity: int
    high_water: int
    poisoned: bool = False
    error: str | None = None  # why the header could not be read
    # A stage's ring of Failed messages back to a client: many, and empty when all is well.
    failures: bool = False

    @property
    def fill(self) -> float:
        return self.used / self.capacity if self.capacity else 0.0

    @property
    def high_fill(self) -> float:
        return self.high_water / self.capacity if self.capacity else 0.0


@dataclass(frozen=True, slots=True)
class CoreView:
    cpu: int
    percent: float  # the pinned replicas' CPU, shared evenly over each one's cores
    replicas: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ErrorLine:
    wall: float
    stage: str
    code: str
    count: int


@dataclass(frozen=True, slots=True)
class Dedup:
    hits_per_s: float
    calls_per_s: float
    savings: float | None  # hits / (hits + upstream calls) over the interval
    total_savings: float | None  # the same since the run started


@dataclass(frozen=True, slots=True)
class View:
    """Everything one screen shows; rates are None until a second frame of the same run."""

    status: Status | None
    problem: str | None = None
    stages: tuple[StageView, ...] = ()
    rings: tuple[RingView, ...] = ()
    circuits: tuple[CircuitStatus, ...] = ()
    cores: tuple[CoreView, ...] = ()
    requests_per_s: float | None = None
    tokens_per_s: tuple[float, float] | None = None  # (in, out)
    dedup: Dedup | None = None
    history: tuple[float, ...] = ()
    errors: tuple[ErrorLine, ...] = ()
    interval_s: float | None = None


def per_core(replicas: Iterable[tuple[str, Sequence[int], float]]) -> tuple[CoreView, ...]:
    """CPU % per core from (replica, pinned cores, replica CPU %).

    A replica pinned to several cores is assumed to spread evenly over them;
    an unpinned one (no cores) cannot be placed and is left out.
    """
    percent: dict[int, float] = {}
    names: dict[int, list[str]] = {}
    for name, cpus, pct in replicas:
        for cpu in cpus:
            percent[cpu] = percent.get(cpu, 0.0) + pct / len(cpus)
            names.setdefault(cpu, []).append(name)
    return tuple(CoreView(c, percent[c], tuple(names[c])) for c in sorted(percent))


# The stateful part: baselines, history, error tail


@dataclass(frozen=True, slots=True)
class _Since:
    """The earlier frame of a pair: what every rate is measured from."""

    samples: Samples
    status: Status
    dt: float


@dataclass(slots=True)
class Model:
    """Turns frames into views; remembers the previous frame, the sparkline and the error tail."""

    history_len: int = HISTORY
    errors_len: int = ERROR_TAIL
    history: deque[float] = field(init=False)
    errors: deque[ErrorLine] = field(init=False)
    _prev: Frame | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.history = deque(maxlen=self.history_len)
        self.errors = deque(maxlen=self.errors_len)

    def reset(self) -> None:
        """Forget the sparkline, the error tail and the baselines: the next frame starts afresh."""
        self.history.clear()
        self.errors.clear()
        self._prev = None

    def update(self, frame: Frame) -> View:
        status = frame.status
        if status is None:
            # Keep the baseline: if the same run answers again, rates span the gap.
            return View(None, frame.problem, history=tuple(self.history), errors=self._tail())
        prev, self._prev = self._prev, frame
        cur = Samples(frame.families)
        since = None
        if (
            prev is not None
            and prev.status is not None
            and prev.status.run_id == status.run_id
            and frame.at > prev.at
        ):
            since = _Since(Samples(prev.families), prev.status, frame.at - prev.at)
            self._add_errors(frame.wall, since.samples, cur)
        cpu = _cpu(cur, since)
        stages = tuple(
            _stage(stage, reps, cur, since, cpu)
            for stage in _stages(status)
            if (reps := [r for r in status.replicas if r.stage == stage])
        )
        # Every request passes the first stage after the gateway exactly once,
        # whether it came through HTTP or the Python API.
        entry = next((s for s in stages if s.stage != "gateway"), None)
        requests = entry.per_s if entry is not None else None
        if requests is not None:
            self.history.append(requests)
        return View(
            status,
            stages=stages,
            rings=tuple(_ring(e) for e in status.edges),
            circuits=tuple(status.circuits),
            cores=per_core((r.name, r.cpus, cpu[r.name]) for r in status.replicas if r.name in cpu),
            requests_per_s=requests,
            tokens_per_s=_tokens(cur, since),
            dedup=_dedup(cur, since),
            history=tuple(self.history),
            errors=self._tail(),
            interval_s=since.dt if since else None,
        )

    def _tail(self) -> tuple[ErrorLine, ...]:
        return tuple(self.errors)

    def _add_errors(self, wall: float, before: Samples, cur: Samples) -> None:
        by = ("stage", "code")
        old = before.sum_by(ERRORS, by)
        for (stage, code), value in sorted(cur.sum_by(ERRORS, by).items()):
            n = counter_delta(old.get((stage, code), 0.0), value)
            if n > 0:
                self.errors.append(ErrorLine(wall, stage, code, round(n)))


def _stage(
    stage: str,
    replicas: list[ReplicaStatus],
    cur: Samples,
    since: _Since | None,
    cpu: Mapping[str, float],
) -> StageView:
    views = []
    old = {(r.name, r.pid): r.processed for r in since.status.replicas} if since else {}
    for r in replicas:
        per_s = None
        if since is not None:
            # Keyed by pid too: a restarted replica is a new process counting from zero.
            per_s = counter_delta(old.get((r.name, r.pid), 0), r.processed) / since.dt
        views.append(
            ReplicaView(
                r.name,
                r.pid,
                tuple(r.cpus),
                r.state,
                per_s,
                r.in_flight,
                r.restarts,
                cpu.get(r.name),
            )
        )
    if since is None:
        return StageView(stage, tuple(views), None, None, None)
    timed = _latency(stage, since.samples, cur)
    p50, p95 = (quantile(q, timed) for q in QUANTILES)
    return StageView(stage, tuple(views), sum(v.per_s or 0.0 for v in views), p50, p95)


def _latency(stage: str, before: Samples, cur: Samples) -> Buckets:
    """A stage's handler times over the interval; the gateway's are whole requests."""
    if stage == "gateway":
        name, label, allowed = REQUEST_SECONDS, "route", WORK_ROUTES
    else:
        name, label, allowed = STAGE_SECONDS, "stage", frozenset({stage})

    def where(labels: Mapping[str, str]) -> bool:
        return labels.get(label) in allowed

    return bucket_delta(before.buckets(name, where), cur.buckets(name, where))


def _cpu(cur: Samples, since: _Since | None) -> dict[str, float]:
    """CPU % of each replica (100 = one core busy) over the interval."""
    if since is None:
        return {}
    by = ("replica",)
    rates = rate(since.samples.sum_by(CPU_SECONDS, by), cur.sum_by(CPU_SECONDS, by), since.dt)
    return {k[0]: 100.0 * v for k, v in rates.items()}


def _tokens(cur: Samples, since: _Since | None) -> tuple[float, float] | None:
    if since is None:
        return None
    by = ("direction",)
    rates = rate(since.samples.sum_by(TOKENS, by), cur.sum_by(TOKENS, by), since.dt)
    return rates.get(("in",), 0.0), rates.get(("out",), 0.0)


def _dedup(cur: Samples, since: _Since | None) -> Dedup | None:
    if since is None:
        return None
    hits, calls = cur.total(DEDUP_HITS), cur.total(UPSTREAM_CALLS)
    new_hits = counter_delta(since.samples.total(DEDUP_HITS), hits)
    new_calls = counter_delta(since.samples.total(UPSTREAM_CALLS), calls)
    dt = since.dt
    return Dedup(new_hits / dt, new_calls / dt, savings(new_hits, new_calls), savings(hits, calls))


def _stages(status: Status) -> list[str]:
    """The run's stages in flow order; any stage unknown here goes last, as met."""
    present = list(dict.fromkeys(r.stage for r in status.replicas))
    return [s for s in FLOW if s in present] + [s for s in present if s not in FLOW]


def _ring(e: EdgeStatus) -> RingView:
    name = f"{e.producer} → {e.consumer}"
    failures = e.consumer.endswith(FAILURE_SUFFIX)
    if e.ring is None:
        return RingView(name, 0, e.capacity, 0, error=e.error, failures=failures)
    r = e.ring
    return RingView(name, r.used_bytes, e.capacity, r.high_water, r.poisoned, failures=failures)
