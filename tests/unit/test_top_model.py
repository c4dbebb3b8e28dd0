"""The dashboard's numbers, from synthetic frames: rates, percentiles, CPU, dedup, errors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from mpipeline.metrics.rates import bucket_delta, counter_delta, quantile, savings
from mpipeline.metrics.snapshot import EdgeStatus, ReplicaStatus, RingCounters, Status
from mpipeline.metrics.view import Frame, Model, per_core

BOUNDS = (0.001, 0.002, 0.004, 0.008)


def replica(
    name: str, pid: int = 100, processed: int = 0, cpus: Sequence[int] = (0,)
) -> ReplicaStatus:
    stage, _, index = name.rpartition("-")
    return ReplicaStatus(
        name=name,
        stage=stage,
        index=int(index),
        slot=0,
        pid=pid,
        cpus=list(cpus),
        state="READY",
        processed=processed,
        in_flight=0,
        heartbeat_age_s=0.1,
        restarts=0,
        generation=1,
        last_exit=None,
    )


def status(*replicas: ReplicaStatus, run_id: str = "run1") -> Status:
    ring = RingCounters(512, 10, 9, 768, 0, 0, False, 1, 2)
    edge = EdgeStatus("mpl-run1-rag0-assemble0", "rag0", "assemble0", 1024, ring, None)
    failures = EdgeStatus("mpl-run1-rag0-client0err", "rag0", "client0err", 1024, ring, None)
    return Status(
        run_dir="/run",
        run_id=run_id,
        config="p.toml",
        state="RUNNING",
        supervisor_pid=1,
        uptime_s=5.0,
        replicas=list(replicas),
        edges=[edge, failures],
    )


def counter(name: str, labels: Sequence[str], values: dict[tuple[str, ...], float]) -> Metric:
    fam = CounterMetricFamily(name, "help", labels=list(labels))
    for key, value in values.items():
        fam.add_metric(list(key), value)
    return fam


def histogram(
    name: str, labels: Sequence[str], values: dict[tuple[str, ...], Sequence[float]]
) -> Metric:
    """``values``: per label set, the count in each bucket of BOUNDS then above them."""
    fam = HistogramMetricFamily(name, "help", labels=list(labels))
    for key, counts in values.items():
        running, buckets = 0.0, []
        for bound, n in zip((*BOUNDS, math.inf), counts, strict=True):
            running += n
            buckets.append(("+Inf" if bound == math.inf else repr(bound), running))
        fam.add_metric(list(key), buckets, sum_value=0.0)
    return fam


def frame(at: float, st: Status | None, *families: Metric, problem: str | None = None) -> Frame:
    return Frame(at, 1_700_000_000.0 + at, st, families, problem)


# Pure math


def test_counter_delta_treats_a_drop_as_a_reset() -> None:
    assert counter_delta(10, 15) == 5
    assert counter_delta(10, 10) == 0
    assert counter_delta(500, 30) == 30  # a restarted process counts from zero


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    buckets = {0.001: 50.0, 0.002: 90.0, 0.004: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.001)
    assert quantile(0.95, buckets) == pytest.approx(0.003)
    assert quantile(0.25, buckets) == pytest.approx(0.0005)


def test_quantile_in_the_inf_bucket_is_the_largest_finite_bound() -> None:
    assert quantile(0.99, {0.001: 1.0, 0.002: 1.0, math.inf: 10.0}) == 0.002


def test_quantile_of_nothing_is_none() -> None:
    assert quantile(0.5, {}) is None
    assert quantile(0.5, {0.001: 0.0, math.inf: 0.0}) is None


def test_bucket_delta_keeps_the_new_observations_and_restarts_on_a_reset() -> None:
    prev = {0.001: 100.0, 0.002: 100.0, math.inf: 100.0}
    cur = {0.001: 100.0, 0.002: 105.0, math.inf: 110.0}
    assert bucket_delta(prev, cur) == {0.001: 0.0, 0.002: 5.0, math.inf: 10.0}
    assert bucket_delta(prev, {0.001: 1.0, math.inf: 2.0}) == {0.001: 1.0, math.inf: 2.0}
    assert bucket_delta(None, cur) == cur


def test_savings_is_the_share_answered_without_an_upstream_call() -> None:
    assert savings(20, 20) == 0.5
    assert savings(0, 0) is None


def test_per_core_spreads_a_replica_over_its_cores_and_skips_unpinned_ones() -> None:
    cores = per_core([("a", [0], 50.0), ("b", [0, 1], 60.0), ("c", [], 99.0)])
    assert [(c.cpu, c.percent, c.replicas) for c in cores] == [
        (0, 80.0, ("a", "b")),
        (1, 30.0, ("b",)),
    ]


# The model over frames


def test_first_frame_has_structure_but_no_rates() -> None:
    view = Model().update(frame(0.0, status(replica("rag-0", processed=5))))
    assert [s.stage for s in view.stages] == ["rag"]
    assert view.requests_per_s is None and view.stages[0].per_s is None
    assert view.history == () and view.cores == () and view.dedup is None
    assert view.rings[0].fill == 0.5 and view.rings[0].high_fill == 0.75
    assert not view.rings[0].failures and view.rings[1].failures


def test_rates_come_from_the_difference_between_frames() -> None:
    model = Model()
    names = ("gateway-0", "rag-0", "inference-0", "inference-1")

    def at(t: float, *processed: int) -> Frame:
        reps = [replica(n, pid, p) for pid, (n, p) in enumerate(zip(names, processed, strict=True))]
        return frame(t, status(*reps))

    model.update(at(0.0, 10, 100, 40, 60))
    view = model.update(at(2.0, 210, 300, 140, 260))
    rates = {s.stage: s.per_s for s in view.stages}
    assert [s.stage for s in view.stages] == ["gateway", "rag", "inference"]
    assert rates == {"gateway": 100.0, "rag": 100.0, "inference": 150.0}
    assert [r.per_s for r in view.stages[2].replicas] == [50.0, 100.0]
    # requests/s: the first stage after the gateway, which every request passes once.
    assert view.requests_per_s == 100.0
    assert view.history == (100.0,)
    assert view.interval_s == 2.0


def test_a_restarted_replica_counts_from_zero() -> None:
    model = Model()
    model.update(frame(0.0, status(replica("rag-0", pid=10, processed=500))))
    view = model.update(frame(1.0, status(replica("rag-0", pid=11, processed=30))))
    assert view.requests_per_s == 30.0


def test_latency_percentiles_cover_only_the_last_interval() -> None:
    name = "mpipeline_stage_duration_seconds"
    labels = ("stage", "replica")
    before = histogram(
        name, labels, {("rag", "rag-0"): [100, 0, 0, 0, 0], ("post", "post-0"): [1, 0, 0, 0, 0]}
    )
    # 10 new rag observations, all in (4 ms, 8 ms]: spread over two replicas.
    after = histogram(
        name,
        labels,
        {
            ("rag", "rag-0"): [100, 0, 0, 6, 0],
            ("rag", "rag-1"): [0, 0, 0, 4, 0],
            ("post", "post-0"): [1, 0, 0, 0, 0],
        },
    )
    model = Model()
    st = status(replica("rag-0"), replica("rag-1"), replica("post-0"))
    model.update(frame(0.0, st, before))
    view = model.update(frame(1.0, st, after))
    rag, post = view.stages
    assert rag.p50_s == pytest.approx(0.006)  # the whole run's p50 would be under 1 ms
    assert rag.p95_s == pytest.approx(0.0078)
    assert post.p50_s is None  # nothing timed in the interval


def test_gateway_latency_counts_pipeline_routes_not_probes() -> None:
    name = "mpipeline_request_duration_seconds"
    st = status(replica("gateway-0"), replica("rag-0"))
    model = Model()
    model.update(frame(0.0, st, histogram(name, ["route"], {("/v1/prompt",): [0] * 5})))
    after = histogram(
        name, ["route"], {("/v1/prompt",): [0, 4, 0, 0, 0], ("/healthz",): [50, 0, 0, 0, 0]}
    )
    view = model.update(frame(1.0, st, after))
    gateway = view.stages[0]
    assert gateway.p50_s == pytest.approx(0.0015)


def test_cpu_per_replica_and_per_pinned_core() -> None:
    st = status(
        replica("rag-0", cpus=[0]), replica("post-0", cpus=[0, 1]), replica("stream-0", cpus=[])
    )
    name, labels = "mpipeline_process_cpu_seconds", ["stage", "replica"]
    before = counter(
        name, labels, {("rag", "rag-0"): 1.0, ("post", "post-0"): 2.0, ("stream", "stream-0"): 0}
    )
    after = counter(
        name, labels, {("rag", "rag-0"): 1.5, ("post", "post-0"): 2.6, ("stream", "stream-0"): 1}
    )
    model = Model()
    model.update(frame(10.0, st, before))
    view = model.update(frame(11.0, st, after))
    cpu = {r.name: r.cpu_percent for s in view.stages for r in s.replicas}
    assert cpu == pytest.approx({"rag-0": 50.0, "post-0": 60.0, "stream-0": 100.0})
    assert [(c.cpu, round(c.percent, 6)) for c in view.cores] == [(0, 80.0), (1, 30.0)]


def test_dedup_savings_over_the_interval_and_since_start() -> None:
    def fams(coalesced: float, cached: float, calls: float) -> list[Metric]:
        kinds: dict[tuple[str, ...], float] = {("coalesced",): coalesced, ("cached",): cached}
        hits = counter("mpipeline_dedup_hits", ["kind"], kinds)
        return [hits, counter("mpipeline_upstream_calls", ["upstream"], {("echo",): calls})]

    st = status(replica("inference-0"))
    model = Model()
    model.update(frame(0.0, st, *fams(10, 5, 40)))
    view = model.update(frame(2.0, st, *fams(20, 15, 60)))
    assert view.dedup is not None
    assert view.dedup.hits_per_s == 10.0 and view.dedup.calls_per_s == 10.0
    assert view.dedup.savings == 0.5
    assert view.dedup.total_savings == pytest.approx(35 / 95)


def test_tokens_per_second_by_direction() -> None:
    st = status(replica("inference-0"))
    model = Model()
    model.update(frame(0.0, st, counter("mpipeline_tokens", ["direction"], {("in",): 100})))
    after = counter("mpipeline_tokens", ["direction"], {("in",): 300, ("out",): 50})
    assert model.update(frame(2.0, st, after)).tokens_per_s == (100.0, 25.0)


def test_error_tail_has_one_line_per_new_error_code_and_keeps_the_newest() -> None:
    def errors(values: dict[tuple[str, ...], float]) -> Metric:
        return counter("mpipeline_errors", ["stage", "code"], values)

    st = status(replica("rag-0"))
    model = Model(errors_len=2)
    model.update(frame(0.0, st))  # absent series were zero
    view = model.update(frame(1.0, st, errors({("inference", "upstream_timeout"): 3})))
    assert [(e.stage, e.code, e.count, e.wall) for e in view.errors] == [
        ("inference", "upstream_timeout", 3, 1_700_000_001.0)
    ]
    view = model.update(frame(2.0, st, errors({("inference", "upstream_timeout"): 3})))
    assert len(view.errors) == 1  # nothing new
    both: dict[tuple[str, ...], float] = {
        ("inference", "upstream_timeout"): 5,
        ("gateway", "ring_full"): 1,
    }
    view = model.update(frame(3.0, st, errors(both)))
    assert [(e.code, e.count) for e in view.errors] == [("ring_full", 1), ("upstream_timeout", 2)]


def test_reset_forgets_history_errors_and_baselines() -> None:
    errors = "mpipeline_errors"
    model = Model()
    model.update(frame(0.0, status(replica("rag-0", processed=0))))
    fam = counter(errors, ["stage", "code"], {("rag", "stage_error"): 1})
    view = model.update(frame(1.0, status(replica("rag-0", processed=10)), fam))
    assert view.history == (10.0,) and len(view.errors) == 1
    model.reset()
    view = model.update(frame(2.0, status(replica("rag-0", processed=20)), fam))
    assert view.history == () and view.errors == () and view.requests_per_s is None
    view = model.update(frame(3.0, status(replica("rag-0", processed=25)), fam))
    assert view.history == (5.0,) and view.errors == ()


def test_a_new_run_starts_new_baselines() -> None:
    model = Model()
    model.update(frame(0.0, status(replica("rag-0", processed=500), run_id="a")))
    view = model.update(frame(1.0, status(replica("rag-0", processed=10), run_id="b")))
    assert view.requests_per_s is None


def test_no_supervisor_keeps_the_history_and_says_why() -> None:
    model = Model()
    model.update(frame(0.0, status(replica("rag-0", processed=0))))
    model.update(frame(1.0, status(replica("rag-0", processed=7))))
    view = model.update(frame(2.0, None, problem="no supervisor is running in /run"))
    assert view.status is None and view.problem == "no supervisor is running in /run"
    assert view.history == (7.0,)
    # The same run answering again: the rate spans the gap.
    view = model.update(frame(3.0, status(replica("rag-0", processed=13))))
    assert view.requests_per_s == 3.0
