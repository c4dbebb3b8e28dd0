"""The collector over a real run's segments, without a supervisor or any replica.

A ``rundir.Run`` is put together the way the supervisor publishes one: the
topology's rings, a control block, a metrics block and ``state.json`` (kept as
a JSON round-tripped dict that a test may edit, decoded on each read). The
writers are built with exactly the regions and helpers the replicas use, so
a disagreement between what a replica writes and what ``/metrics`` reads
shows up here as a wrong or missing number.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mpipeline import rundir, topology
from mpipeline.config import ERROR_RING_BYTES, STAGE_ORDER, BreakerConfig, PipelineConfig
from mpipeline.control import R_PID, R_RESTARTS, R_STATE, ControlBlock, ReplicaState, RunState
from mpipeline.gateway.metrics import GatewayMetrics
from mpipeline.metrics.block import MetricsBlock, Writer, segment_name
from mpipeline.metrics.collect import Reader, RunCollector, collect, layouts
from mpipeline.metrics.schema import (
    BUCKET_BOUNDS_S,
    FAMILIES,
    HIST_LOW_BIT,
    PREFIX,
    ROUTES,
    STATUSES,
    gateway_region,
    stage_region,
)
from mpipeline.resilience import BreakerBoard, Permit
from mpipeline.ring import Ring
from mpipeline.topology import edge_label
from mpipeline.workers import upstream_names

KIB = 1024
RING = 64 * KIB
Labels = tuple[tuple[str, str], ...]
Samples = dict[str, dict[Labels, float]]


def _config() -> PipelineConfig:
    """Two gateways, one API client, two inference shards, small rings."""
    cfg = PipelineConfig()
    cfg = msgspec.structs.replace(
        cfg,
        gateway=msgspec.structs.replace(cfg.gateway, replicas=2, api_clients=1, ring_capacity=RING),
    )
    stages = cfg.stages
    for name in STAGE_ORDER:
        fields: dict[str, Any] = {"ring_capacity": RING}
        if name == "inference":
            fields["replicas"] = 2
        stages = msgspec.structs.replace(
            stages, **{name: msgspec.structs.replace(getattr(stages, name), **fields)}
        )
    return msgspec.structs.replace(cfg, stages=stages)


class FakeRun:
    """Every segment of one run, created here, as the supervisor would."""

    def __init__(self, run_dir: Path, stack: contextlib.ExitStack, *, metrics: bool = True) -> None:
        self.cfg = _config()
        self.run_id = secrets.token_hex(4)
        self.topo = topology.build(self.cfg, self.run_id, cpus=[0, 1, 2, 3])
        n = len(self.topo.replicas) + len(self.topo.gateways)
        self.ctl = ControlBlock.create(f"mpl-{self.run_id}-control", n, len(self.topo.clients))
        stack.callback(self._drop, self.ctl)
        self.ctl.state = RunState.RUNNING
        self.block: MetricsBlock | None = None
        if metrics:
            self.block = MetricsBlock.create(segment_name(f"mpl-{self.run_id}"), n)
            stack.callback(self._drop, self.block)
        self.rings: dict[str, Ring] = {}
        for edge in self.topo.edges:
            ring = stack.enter_context(Ring.create(edge.capacity, edge.name))
            self.rings[edge_label(edge.name)] = ring
        self.breakers: BreakerBoard | None = None
        self.state: dict[str, Any] = json.loads(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "run_id": self.run_id,
                    "config": "test.toml",
                    "control": self.ctl.name,
                    "breakers": None,
                    "breaker_config": msgspec.to_builtins(self.cfg.stages.inference.breaker),
                    "gateway_url": None,
                    "metrics": self.block.name if self.block else None,
                    "metrics_url": None,
                    "upstreams": upstream_names(self.cfg.stages.inference),
                    "topology": asdict(self.topo),
                }
            )
        )
        self.run_dir = run_dir
        self._stack = stack

    @property
    def run(self) -> rundir.Run:
        """The run as readers see it, from ``state`` as it is now."""
        info = msgspec.convert({"run_dir": str(self.run_dir), **self.state}, rundir.RunInfo)
        return rundir.Run(self.run_dir, info, self.ctl)

    @staticmethod
    def _drop(seg: ControlBlock | MetricsBlock | BreakerBoard) -> None:
        seg.close()
        seg.unlink()

    def with_breakers(self, cfg: BreakerConfig) -> BreakerBoard:
        name = f"mpl-{self.run_id}-breakers"
        self.breakers = BreakerBoard.create(name, cfg)
        self._stack.callback(self._drop, self.breakers)
        self.state["breakers"] = name
        self.state["breaker_config"] = msgspec.to_builtins(cfg)
        return self.breakers

    def stage(self, name: str) -> Writer:
        """The writer a stage replica builds (replica.py ``_metrics_writer``)."""
        assert self.block is not None
        spec = self.topo.replica(name)
        names = upstream_names(self.cfg.stages.inference) if spec.stage == "inference" else []
        return self.block.writer(
            spec.slot, stage_region(spec.stage, spec.name, spec.outputs, names)
        )

    def gateway(self, index: int) -> GatewayMetrics:
        """What a gateway replica builds (gateway/replica.py ``_metrics``)."""
        assert self.block is not None
        spec = self.topo.gateways[index]
        clients = {c["index"]: c for c in self.state["topology"]["clients"]}
        writer = self.block.writer(
            spec.slot, gateway_region(spec.name, clients[spec.client]["ingress"])
        )
        return GatewayMetrics(writer, spec.name)

    def slot(self, name: str) -> int:
        if name.startswith("gateway-"):
            return self.topo.gateways[int(name.split("-")[1])].slot
        return self.topo.replica(name).slot


@pytest.fixture
def run(tmp_run_dir: Path) -> Iterator[FakeRun]:
    with contextlib.ExitStack() as stack:
        yield FakeRun(tmp_run_dir, stack)


def _samples(metrics: list[Metric]) -> Samples:
    out: Samples = {}
    for m in metrics:
        for s in m.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _key(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get(PREFIX + name, {}).get(_key(**labels))


# Families


def test_every_family_is_declared_even_with_no_run() -> None:
    registry_metrics = list(RunCollector(Reader(), lambda: None).collect())
    names = [m.name for m in registry_metrics]
    assert names == [PREFIX + n for n in FAMILIES]
    assert all(not m.samples for m in registry_metrics)
    for m in registry_metrics:
        assert m.type == FAMILIES[m.name.removeprefix(PREFIX)].kind


def test_a_closed_collector_reads_nothing_more(run: FakeRun) -> None:
    """The supervisor closes its collector before it closes the segments a scrape
    reads: later scrapes get the declared families and no samples."""
    collector = RunCollector(Reader(), lambda: run.run)
    assert any(m.samples for m in collector.collect())
    collector.close()
    after = list(collector.collect())
    assert [m.name for m in after] == [PREFIX + n for n in FAMILIES]
    assert all(not m.samples for m in after)


def test_every_family_is_declared_on_an_idle_run(run: FakeRun) -> None:
    metrics = collect(run.run)
    assert [m.name for m in metrics] == [PREFIX + n for n in FAMILIES]


# Counters from the metrics block


def test_counters_without_a_replica_label_are_summed_across_writers(run: FakeRun) -> None:
    gw0, gw1 = run.gateway(0), run.gateway(1)
    now = time.monotonic_ns()
    for _ in range(3):
        gw0.answered("/v1/prompt", 200, now)
    for _ in range(2):
        gw1.answered("/v1/prompt", 200, now)
    gw1.answered("/v1/chat/completions", 429, now)
    inf0, inf1 = run.stage("inference-0"), run.stage("inference-1")
    inf0.add(inf0.index("expired", "inference"), 2)
    inf1.add(inf1.index("expired", "inference"), 3)
    inf0.add(inf0.index("upstream_calls", "echo"), 4)
    inf1.add(inf1.index("upstream_calls", "echo"), 6)
    inf1.add(inf1.index("tokens", "out"), 11)
    inf0.add(inf0.index("dedup_hits", "cached"))

    s = _samples(collect(run.run))
    assert _get(s, "requests_total", route="/v1/prompt", status="200") == 5
    assert _get(s, "requests_total", route="/v1/chat/completions", status="429") == 1
    assert _get(s, "expired_total", stage="inference") == 5
    assert _get(s, "upstream_calls_total", upstream="echo") == 10
    assert _get(s, "tokens_total", direction="out") == 11
    assert _get(s, "dedup_hits_total", kind="cached") == 1
    # Summed series come out once, not once per writer.
    assert len(s[PREFIX + "expired_total"]) == len(set(STAGE_ORDER))


def test_sparse_families_are_absent_at_zero_dense_ones_present(run: FakeRun) -> None:
    s = _samples(collect(run.run))
    # Sparse: a route x status x stage x code grid of zeros would be 700 series per scrape.
    assert PREFIX + "requests_total" not in s
    assert PREFIX + "errors_total" not in s
    assert PREFIX + "request_duration_seconds_count" not in s
    assert PREFIX + "upstream_calls_total" not in s
    assert PREFIX + "tokens_total" not in s
    # Dense: a zero tells "nothing happened" from "no data".
    for stage in STAGE_ORDER:
        assert _get(s, "expired_total", stage=stage) == 0
    for spec in run.topo.replicas:
        labels = {"stage": spec.stage, "replica": spec.name}
        assert _get(s, "stage_duration_seconds_count", **labels) == 0
        assert _get(s, "stage_duration_seconds_sum", **labels) == 0
        assert _get(s, "event_loop_lag_seconds", **labels) == 0
    for gw in run.topo.gateways:
        assert _get(s, "event_loop_lag_seconds", stage="gateway", replica=gw.name) == 0
    assert _get(s, "time_to_first_token_seconds_count") == 0
    # Every edge a writer can shed on: stage outputs and gateway ingress.
    sheds = {dict(k)["edge"] for k in s[PREFIX + "shed_total"]}
    outputs = {edge_label(n) for spec in run.topo.replicas for n in spec.outputs}
    ingress = {edge_label(n) for g in run.topo.gateways for n in run.topo.clients[g.client].ingress}
    assert sheds == outputs | ingress
    assert all(v == 0 for v in s[PREFIX + "shed_total"].values())


def test_gateway_metrics_map_user_input_to_fixed_labels(run: FakeRun) -> None:
    gw = run.gateway(0)
    now = time.monotonic_ns()
    gw.answered("/nope", 404, now)
    gw.answered("/v1/prompt", 299, now)  # not a status the gateway sends
    gw.answered("/v1/stream", 101, now)  # a WebSocket: counted, never timed
    gw.failed("client", "deadline_exceeded")
    gw.failed("inference", "upstream_timeout")
    gw.failed("someone", "no_such_code")
    gw.failed("rag", "no_such_code")
    gw.shed("client0-rag0", 4)
    gw.shed("not-my-edge", 100)  # not an edge of this gateway: ignored
    gw.lag(-1.0)

    s = _samples(collect(run.run))
    assert _get(s, "requests_total", route="other", status="404") == 1
    assert _get(s, "requests_total", route="/v1/prompt", status="other") == 1
    assert _get(s, "requests_total", route="/v1/stream", status="101") == 1
    assert _get(s, "request_duration_seconds_count", route="other") == 1
    assert _get(s, "request_duration_seconds_count", route="/v1/prompt") == 1
    assert _get(s, "request_duration_seconds_count", route="/v1/stream") is None
    assert _get(s, "errors_total", stage="gateway", code="deadline_exceeded") == 1
    assert _get(s, "errors_total", stage="inference", code="upstream_timeout") == 1
    assert _get(s, "errors_total", stage="other", code="other") == 1
    assert _get(s, "errors_total", stage="rag", code="other") == 1
    assert _get(s, "shed_total", edge="client0-rag0", reason="ring_full") == 4
    assert _get(s, "event_loop_lag_seconds", stage="gateway", replica="gateway-0") == 0
    for name, series in s.items():
        for labels in series:
            values = set(dict(labels).values())
            assert not values & {"/nope", "299", "someone", "no_such_code", "not-my-edge"}, name


def test_every_route_and_status_has_a_cell(run: FakeRun) -> None:
    gw = run.gateway(1)
    for route in ROUTES:
        for status_text in STATUSES:
            code = 999 if status_text == "other" else int(status_text)
            gw.answered(route, code, 0)  # arrived_ns 0: counted, not timed
    s = _samples(collect(run.run))
    assert len(s[PREFIX + "requests_total"]) == len(ROUTES) * len(STATUSES)
    assert all(v == 1 for v in s[PREFIX + "requests_total"].values())
    assert PREFIX + "request_duration_seconds_count" not in s


# Histograms


def test_histograms_are_cumulative_with_inf_equal_to_count(run: FakeRun) -> None:
    w = run.stage("inference-1")
    hist = w.index("stage_duration_seconds", "inference", "inference-1")
    durations = [0, 500, 1500, 1500, 3000, 1_000_000, 2**36 - 1, 2**36, 2**40]
    for ns in durations:
        w.observe_ns(hist, ns)
    s = _samples(collect(run.run))
    labels = {"stage": "inference", "replica": "inference-1"}
    buckets = {
        dict(k)["le"]: v
        for k, v in s[PREFIX + "stage_duration_seconds_bucket"].items()
        if {n: x for n, x in k if n != "le"} == labels
    }
    assert len(buckets) == len(BUCKET_BOUNDS_S) + 1
    assert buckets["+Inf"] == len(durations)
    assert _get(s, "stage_duration_seconds_count", **labels) == len(durations)
    assert _get(s, "stage_duration_seconds_sum", **labels) == pytest.approx(sum(durations) / 1e9)
    finite = sorted((float(le), v) for le, v in buckets.items() if le != "+Inf")
    assert [le for le, _ in finite] == list(BUCKET_BOUNDS_S)
    counts = [v for _, v in finite]
    assert counts == sorted(counts), "cumulative counts must never go down"
    for k, (le, v) in enumerate(finite):
        # Each ``le`` bucket counts the observations below its bound (2**(10+k) ns);
        # one exactly on a bound is counted from the next bucket up.
        bound_ns = 1 << (HIST_LOW_BIT + k)
        assert le == bound_ns / 1e9
        assert v == sum(1 for ns in durations if ns < bound_ns), le
    assert buckets[repr(BUCKET_BOUNDS_S[-1])] == len(durations) - 2  # 2**36 and 2**40: +Inf only
    # The other shard's histogram is untouched (and still exported: dense).
    other = {"stage": "inference", "replica": "inference-0"}
    assert _get(s, "stage_duration_seconds_count", **other) == 0


def test_request_duration_and_time_to_first_token(run: FakeRun) -> None:
    gw0, gw1 = run.gateway(0), run.gateway(1)
    start = time.monotonic_ns()
    gw0.answered("/v1/prompt", 200, start)
    gw1.answered("/v1/prompt", 504, start)
    gw0.first_token(start)
    gw1.first_token(start)
    gw1.first_token(start)
    took = (time.monotonic_ns() - start) / 1e9
    s = _samples(collect(run.run))
    assert _get(s, "request_duration_seconds_count", route="/v1/prompt") == 2
    total = _get(s, "request_duration_seconds_sum", route="/v1/prompt")
    assert total is not None and 0 <= total <= 2 * took
    assert _get(s, "time_to_first_token_seconds_count") == 3
    assert _get(s, "time_to_first_token_seconds_bucket", le="+Inf") == 3


# Ring gauges, the control block, circuits


def test_ring_gauges_come_from_the_ring_headers(run: FakeRun) -> None:
    ring = run.rings["client0-rag0"]
    for i in range(5):
        assert ring.try_put(b"x" * (100 + i))
    consumer = Ring.attach(ring.name)
    try:
        assert consumer.try_get() is not None
        assert consumer.try_get() is not None  # releases the first record
        stats = ring.stats()
        s = _samples(collect(run.run))
    finally:
        consumer.close()
    edge = {"edge": "client0-rag0"}
    assert _get(s, "queue_depth", **edge) == stats.records_in - stats.records_out
    assert _get(s, "ring_records_total", direction="in", **edge) == 5 == stats.records_in
    assert _get(s, "ring_records_total", direction="out", **edge) == stats.records_out
    assert stats.records_out >= 1
    assert _get(s, "ring_used_bytes", **edge) == stats.used_bytes > 0
    assert _get(s, "ring_high_water_bytes", **edge) == stats.high_water >= stats.used_bytes
    assert _get(s, "ring_capacity_bytes", **edge) == RING
    # Every edge is listed, idle or not, with its own capacity.
    assert len(s[PREFIX + "ring_capacity_bytes"]) == len(run.topo.edges)
    assert _get(s, "ring_capacity_bytes", edge="rag0-client0err") == ERROR_RING_BYTES
    assert _get(s, "queue_depth", edge="rag0-assemble0") == 0


def test_replicas_from_the_control_block_and_psutil(run: FakeRun) -> None:
    post = run.slot("post-0")
    gw = run.slot("gateway-1")
    run.ctl.put(post, R_STATE, ReplicaState.READY)
    run.ctl.put(post, R_RESTARTS, 2)
    run.ctl.put(post, R_PID, os.getpid())
    run.ctl.put(gw, R_STATE, ReplicaState.READY)
    s = _samples(collect(run.run))
    assert _get(s, "stage_restarts_total", stage="post", replica="post-0") == 2
    assert _get(s, "stage_restarts_total", stage="rag", replica="rag-0") == 0
    assert _get(s, "replica_up", stage="post", replica="post-0") == 1
    assert _get(s, "replica_up", stage="gateway", replica="gateway-1") == 1
    assert _get(s, "replica_up", stage="rag", replica="rag-0") == 0  # still BOOTING
    everyone = len(run.topo.replicas) + len(run.topo.gateways)
    assert len(s[PREFIX + "replica_up"]) == everyone
    # Process figures only where there is a pid.
    cpu = s[PREFIX + "process_cpu_seconds_total"]
    assert list(cpu) == [_key(stage="post", replica="post-0")]
    assert list(cpu.values())[0] > 0
    rss = _get(s, "process_resident_memory_bytes", stage="post", replica="post-0")
    assert rss is not None and rss > 1024 * 1024


def test_a_process_shared_by_a_placement_group_is_counted_once(run: FakeRun) -> None:
    # post-0 and stream-0 in one process: its CPU and memory under post-0 alone.
    for name in ("post-0", "stream-0"):
        run.ctl.put(run.slot(name), R_STATE, ReplicaState.READY)
        run.ctl.put(run.slot(name), R_PID, os.getpid())
    s = _samples(collect(run.run))
    assert list(s[PREFIX + "process_cpu_seconds_total"]) == [_key(stage="post", replica="post-0")]
    assert list(s[PREFIX + "process_resident_memory_bytes"]) == [
        _key(stage="post", replica="post-0")
    ]
    assert _get(s, "replica_up", stage="stream", replica="stream-0") == 1


def test_circuits_from_the_breaker_board(run: FakeRun) -> None:
    cfg = BreakerConfig(consecutive_failures=1, open_s=60.0)
    board = run.with_breakers(cfg)
    now = time.monotonic()
    closed = board.breaker("up-closed")
    is_open = board.breaker("up-open")
    due = board.breaker("up-due")
    closed.allow(now)
    for br, at in ((is_open, now), (due, now - 120.0)):
        permit = br.allow(at)
        assert isinstance(permit, Permit), permit
        br.record(permit, False, at)
    s = _samples(collect(run.run))
    assert _get(s, "circuit_state", upstream="up-closed") == 0
    assert _get(s, "circuit_state", upstream="up-open") == 1
    # Open past its open_s: the next call probes, so it reads as half-open.
    assert _get(s, "circuit_state", upstream="up-due") == 2
    assert _get(s, "circuit_opens_total", upstream="up-open") == 1
    assert _get(s, "circuit_opens_total", upstream="up-closed") == 0


# Readers, layouts and the exposition


def test_layouts_of_the_published_state_match_the_writers(run: FakeRun) -> None:
    by_slot = {w.slot: w.region for w in layouts(run.run.info)}
    for spec in run.topo.replicas:
        assert by_slot[spec.slot].cells == run.stage(spec.name).region.cells
    for gw in run.topo.gateways:
        region = gateway_region(gw.name, run.topo.clients[gw.client].ingress)
        assert by_slot[gw.slot].cells == region.cells


def test_a_run_without_a_metrics_block_still_has_rings_and_replicas(tmp_run_dir: Path) -> None:
    with contextlib.ExitStack() as stack:
        bare = FakeRun(tmp_run_dir, stack, metrics=False)
        s = _samples(collect(bare.run))
    assert PREFIX + "stage_duration_seconds_count" not in s
    assert PREFIX + "expired_total" not in s
    assert len(s[PREFIX + "ring_capacity_bytes"]) == len(bare.topo.edges)
    assert PREFIX + "replica_up" in s


def test_a_missing_or_foreign_block_is_skipped(run: FakeRun) -> None:
    run.state["metrics"] = f"mpl-{run.run_id}-control"  # not a metrics block
    s = _samples(collect(run.run))
    assert PREFIX + "expired_total" not in s
    run.state["metrics"] = f"mpl-{run.run_id}-gone"
    s = _samples(collect(run.run))
    assert PREFIX + "expired_total" not in s
    assert PREFIX + "ring_capacity_bytes" in s


def test_a_reader_keeps_its_block_and_sees_new_counts(run: FakeRun) -> None:
    w = run.stage("rag-0")
    expired = w.index("expired", "rag")
    with Reader() as reader:
        w.add(expired)
        first = _samples(reader.collect(run.run))
        w.add(expired, 2)
        second = _samples(reader.collect(run.run))
    assert _get(first, "expired_total", stage="rag") == 1
    assert _get(second, "expired_total", stage="rag") == 3
    # A block handed in is the caller's: the reader does not close it.
    assert run.block is not None
    with Reader(run.block) as reader:
        assert _get(_samples(reader.collect(run.run)), "expired_total", stage="rag") == 3
    assert run.block.read(run.slot("rag-0"))[expired - w.base] == 3


def test_exposition_renders_and_parses(run: FakeRun) -> None:
    gw = run.gateway(0)
    now = time.monotonic_ns()
    for _ in range(4):
        gw.answered("/v1/prompt", 200, now)
    gw.failed("assemble", "stage_error")
    w = run.stage("assemble-0")
    w.observe_ns(w.index("stage_duration_seconds", "assemble", "assemble-0"), 2500)
    run.rings["rag0-assemble0"].try_put(b"one record")

    registry = CollectorRegistry(auto_describe=False)
    reader = Reader()
    registry.register(RunCollector(reader, lambda: run.run))
    try:
        text = generate_latest(registry).decode()
    finally:
        reader.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, fam in FAMILIES.items():
        parsed = families[(PREFIX + name).removesuffix("_total")]
        assert parsed.type == fam.kind, name
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert values[(PREFIX + "requests_total", _key(route="/v1/prompt", status="200"))] == 4
    assert values[(PREFIX + "errors_total", _key(stage="assemble", code="stage_error"))] == 1
    assert values[(PREFIX + "queue_depth", _key(edge="rag0-assemble0"))] == 1
    labels = _key(stage="assemble", replica="assemble-0")
    assert values[(PREFIX + "stage_duration_seconds_count", labels)] == 1
    assert values[(PREFIX + "stage_duration_seconds_sum", labels)] == pytest.approx(2.5e-6)
    le = dict(labels) | {"le": "4.096e-06"}
    assert values[(PREFIX + "stage_duration_seconds_bucket", tuple(sorted(le.items())))] == 1
    le["le"] = "2.048e-06"
    assert values[(PREFIX + "stage_duration_seconds_bucket", tuple(sorted(le.items())))] == 0
    # Every label name is one of the family's declared labels (plus a histogram's le).
    for name, fam in FAMILIES.items():
        declared = set(fam.labels)
        for sample in families[(PREFIX + name).removesuffix("_total")].samples:
            assert set(sample.labels) - {"le"} == declared, sample
