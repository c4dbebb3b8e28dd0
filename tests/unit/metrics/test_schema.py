"""The metrics schema: histogram bucket mapping, region layouts and label mapping.

The writer (a replica) and the reader (the supervisor) each compute a region's
layout on their own from the same facts; nothing in shared memory says which
cell is which. So these tests pin the pure functions both sides rely on: the
same inputs give the same offsets, no two series share a cell, and a duration
lands in the bucket whose ``le`` the collector exports for it.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpipeline import topology
from mpipeline.config import PipelineConfig
from mpipeline.errors import ErrorCode
from mpipeline.metrics.collect import layouts
from mpipeline.metrics.schema import (
    BUCKET_BOUNDS_S,
    BUCKET_OF_BITS,
    CODES,
    FAMILIES,
    HIST_CELLS,
    HIST_FINITE,
    HIST_HIGH_BIT,
    HIST_INF,
    HIST_LOW_BIT,
    HIST_SUM,
    REGION_CELLS,
    ROUTES,
    STATUSES,
    Region,
    gateway_region,
    route_label,
    stage_region,
    status_label,
)
from mpipeline.rundir import RunInfo
from mpipeline.workers import upstream_names

# Integer upper bounds of the finite buckets, in ns: what BUCKET_BOUNDS_S says in seconds.
BOUNDS_NS = [1 << (HIST_LOW_BIT + k) for k in range(HIST_FINITE)]


def bucket(ns: int) -> int:
    return BUCKET_OF_BITS[ns.bit_length()]


# Buckets


@pytest.mark.parametrize(
    ("ns", "expected"),
    [
        (0, 0),
        (1, 0),
        (1023, 0),
        # A duration exactly on a bound (2**10 ns is le="1.024e-06") is counted in
        # the next bucket: buckets hold durations *below* their bound.
        (1024, 1),
        (1025, 1),
        (2047, 1),
        (2048, 2),
        (2**36 - 1, HIST_FINITE - 1),
        (2**36, HIST_INF),
        (2**36 + 1, HIST_INF),
        (2**63 - 1, HIST_INF),
        (2**64 - 1, HIST_INF),
    ],
)
def test_bucket_at_boundaries(ns: int, expected: int) -> None:
    assert bucket(ns) == expected


def test_bucket_layout_constants() -> None:
    assert HIST_FINITE == HIST_HIGH_BIT - HIST_LOW_BIT + 1 == len(BUCKET_BOUNDS_S)
    assert HIST_INF == HIST_FINITE
    assert HIST_SUM == HIST_INF + 1
    assert HIST_CELLS == HIST_SUM + 1
    # Every int64 and uint64 duration has a bucket: bit_length is 0..64.
    assert len(BUCKET_OF_BITS) == 65
    assert set(BUCKET_OF_BITS) == set(range(HIST_FINITE + 1))
    # The table never points at the sum cell.
    assert HIST_SUM not in BUCKET_OF_BITS


def test_bounds_are_powers_of_two_strictly_increasing() -> None:
    assert list(BUCKET_BOUNDS_S) == [b / 1e9 for b in BOUNDS_NS]
    assert all(a < b for a, b in zip(BUCKET_BOUNDS_S, BUCKET_BOUNDS_S[1:], strict=False))
    assert all(b / a == 2 for a, b in zip(BUCKET_BOUNDS_S, BUCKET_BOUNDS_S[1:], strict=False))
    assert BUCKET_BOUNDS_S[0] == pytest.approx(1.024e-6)
    assert BUCKET_BOUNDS_S[-1] == pytest.approx(68.719476736)


@pytest.mark.parametrize("k", range(HIST_FINITE))
def test_each_bound_and_its_neighbours(k: int) -> None:
    bound = BOUNDS_NS[k]
    assert bucket(bound - 1) == k  # just below: this bucket
    assert bucket(bound) == k + 1  # on the bound: the next one (or +Inf after the last)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_a_duration_lands_in_the_first_bucket_whose_bound_exceeds_it(ns: int) -> None:
    k = bucket(ns)
    first = next((i for i, b in enumerate(BOUNDS_NS) if ns < b), HIST_INF)
    assert k == first
    if k < HIST_FINITE:
        # So every cumulative ``le`` count the collector exports is an upper bound.
        assert ns / 1e9 <= BUCKET_BOUNDS_S[k]


# Regions


def _intervals(region: Region) -> list[tuple[int, int]]:
    out = []
    for (family, _labels), offset in region.items():
        width = HIST_CELLS if FAMILIES[family].kind == "histogram" else 1
        out.append((offset, offset + width))
    return sorted(out)


def _assert_tiles(region: Region) -> None:
    """Series occupy disjoint cells that exactly fill ``[0, size)``."""
    spans = _intervals(region)
    assert spans, "an empty region"
    assert spans[0][0] == 0
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end == start, f"cells overlap or leave a gap at {end}..{start}"
    assert spans[-1][1] == region.size <= REGION_CELLS


RINGS = ["mpl-t-rag0-assemble0", "mpl-t-rag0-assemble1"]
EDGES = ["rag0-assemble0", "rag0-assemble1"]


@pytest.mark.parametrize("stage", ["rag", "assemble", "inference", "post", "stream"])
def test_stage_region_series_do_not_overlap(stage: str) -> None:
    region = stage_region(stage, f"{stage}-0", RINGS, ["echo", "backup"])
    _assert_tiles(region)
    assert region.offset("stage_duration_seconds", stage, f"{stage}-0") == 0
    assert {k[0] for k, _ in region.items()} >= {
        "stage_duration_seconds",
        "event_loop_lag_seconds",
        "expired",
        "shed",
    }
    has_upstreams = {k[0] for k, _ in region.items()} & {"upstream_calls", "tokens", "dedup_hits"}
    assert bool(has_upstreams) == (stage == "inference")


def test_inference_region_has_every_upstream_kind_and_direction() -> None:
    region = stage_region("inference", "inference-1", RINGS, ["a", "b"])
    for name in ("a", "b"):
        region.offset("upstream_calls", name)
        region.offset("upstream_retries", name)
    region.offset("dedup_hits", "cached")
    region.offset("dedup_hits", "coalesced")
    region.offset("tokens", "in")
    region.offset("tokens", "out")
    for edge in EDGES:
        region.offset("shed", edge, "ring_full")


def test_gateway_region_series_do_not_overlap_and_fit() -> None:
    region = gateway_region("gateway-0", ["mpl-t-client0-rag0", "mpl-t-client0-rag1"])
    _assert_tiles(region)
    for route in ROUTES:
        region.offset("request_duration_seconds", route)
        for status in STATUSES:
            region.offset("requests", route, status)
    for code in CODES:
        region.offset("errors", "gateway", code)
    region.offset("time_to_first_token_seconds")
    region.offset("event_loop_lag_seconds", "gateway", "gateway-0")
    # Room to spare: the region is fixed-size and shared by every future series.
    assert region.size < REGION_CELLS // 2


def test_codes_cover_every_error_code() -> None:
    assert set(CODES) == {str(c) for c in ErrorCode} | {"other"}


def test_add_is_idempotent_and_offsets_follow_widths() -> None:
    r = Region()
    assert r.add("expired", ("rag",)) == 0
    assert r.add("stage_duration_seconds", ("rag", "rag-0")) == 1
    assert r.add("expired", ("rag",)) == 0  # the same series: the same cell, no growth
    assert r.add("shed", ["e", "ring_full"]) == 1 + HIST_CELLS  # a list works like a tuple
    assert r.size == 2 + HIST_CELLS
    assert r.offset("shed", "e", "ring_full") == 1 + HIST_CELLS
    with pytest.raises(KeyError):
        r.offset("shed", "other-edge", "ring_full")


@pytest.mark.parametrize(
    ("family", "labels"),
    [
        ("expired", ()),
        ("expired", ("rag", "extra")),
        ("requests", ("/v1/prompt",)),
        ("time_to_first_token_seconds", ("x",)),
    ],
)
def test_wrong_label_count_raises(family: str, labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match=family):
        Region().add(family, labels)


def test_unknown_family_raises() -> None:
    with pytest.raises(KeyError):
        Region().add("no_such_family", ())


def test_overflow_raises_only_past_the_region() -> None:
    r = Region()
    for i in range(REGION_CELLS):
        r.add("shed", (f"e{i}", "ring_full"))
    assert r.size == REGION_CELLS  # exactly full is fine
    with pytest.raises(ValueError, match="overflow"):
        r.add("shed", ("one-more", "ring_full"))
    with pytest.raises(ValueError, match="overflow"):
        Region(size=REGION_CELLS - HIST_CELLS + 1).add("stage_duration_seconds", ("a", "a-0"))


# Layouts: the reader's view equals what every writer builds


def _config(**replicas: int) -> PipelineConfig:
    cfg = PipelineConfig()
    stages = cfg.stages
    for name, n in replicas.items():
        if name == "gateway":
            cfg = msgspec.structs.replace(
                cfg, gateway=msgspec.structs.replace(cfg.gateway, replicas=n)
            )
            continue
        table = msgspec.structs.replace(getattr(stages, name), replicas=n)
        stages = msgspec.structs.replace(stages, **{name: table})
    return msgspec.structs.replace(cfg, stages=stages)


def _info(state: dict[str, Any]) -> RunInfo:
    """``layouts`` reads the typed state; the tests edit its dict form first."""
    head = {"pid": 1, "run_id": "", "run_dir": "", "config": "", "control": ""}
    return msgspec.convert({**head, **state}, RunInfo)


def _state(cfg: PipelineConfig, run_id: str) -> dict[str, Any]:
    """``state.json`` as the supervisor writes it (the parts layouts read), JSON round-tripped."""
    topo = topology.build(cfg, run_id, cpus=[0, 1, 2, 3])
    state = {"upstreams": upstream_names(cfg.stages.inference), "topology": asdict(topo)}
    loaded: dict[str, Any] = json.loads(json.dumps(state))
    return loaded


def _writers_view(cfg: PipelineConfig, run_id: str) -> dict[int, Region]:
    """Each writer's region as replica.py and gateway/replica.py build it at boot."""
    topo = topology.build(cfg, run_id, cpus=[0, 1, 2, 3])
    out = {}
    for spec in topo.replicas:
        names = upstream_names(cfg.stages.inference) if spec.stage == "inference" else []
        out[spec.slot] = stage_region(spec.stage, spec.name, spec.outputs, names)
    clients = {c.index: c for c in topo.clients}
    for gw in topo.gateways:
        out[gw.slot] = gateway_region(gw.name, clients[gw.client].ingress)
    return out


@pytest.mark.parametrize(
    "replicas",
    [{}, {"inference": 3, "rag": 2, "gateway": 2}, {"gateway": 0, "post": 2, "stream": 2}],
)
def test_layouts_match_what_writers_build(replicas: dict[str, int]) -> None:
    cfg = _config(**replicas)
    run_id = secrets.token_hex(4)
    state = _state(cfg, run_id)
    got = {w.slot: w.region for w in layouts(_info(state))}
    want = _writers_view(cfg, run_id)
    assert sorted(got) == sorted(want) == list(range(len(want)))
    for slot, region in want.items():
        assert got[slot].cells == region.cells, f"slot {slot} differs"
        assert got[slot].size == region.size
        _assert_tiles(got[slot])


def test_layouts_are_deterministic() -> None:
    cfg = _config(inference=2, gateway=2)
    state = _state(cfg, "abcd1234")
    first = [(w.slot, w.region.cells) for w in layouts(_info(state))]
    second = [(w.slot, w.region.cells) for w in layouts(_info(_state(cfg, "abcd1234")))]
    assert first == second
    # Another run id names other rings but keeps every offset.
    other = [
        (w.slot, sorted(w.region.cells.values())) for w in layouts(_info(_state(cfg, "ffff0000")))
    ]
    assert other == [(slot, sorted(cells.values())) for slot, cells in first]


def test_layouts_without_upstreams_or_gateways() -> None:
    """An older state.json (no "upstreams") still gives the stage regions."""
    cfg = _config(gateway=0)
    state = _state(cfg, "0badf00d")
    del state["upstreams"]
    regions = {w.slot: w.region for w in layouts(_info(state))}
    inference = next(r for r in state["topology"]["replicas"] if r["stage"] == "inference")
    keys = {k for k, _ in regions[inference["slot"]].items()}
    assert not any(name == "upstream_calls" for name, _ in keys)
    assert ("tokens", ("in",)) in keys


# Label mapping


@pytest.mark.parametrize("route", ROUTES)
def test_known_routes_are_their_own_label(route: str) -> None:
    assert route_label(route) == route


@pytest.mark.parametrize(
    "path",
    ["/nope", "/v1/prompt/", "/v1/prompt?x=1", "/V1/PROMPT", "", "/metrics", "/\u00e9\u00e8"],
)
def test_unknown_paths_are_other(path: str) -> None:
    assert route_label(path) == "other"


@pytest.mark.parametrize("status", [int(s) for s in STATUSES if s != "other"])
def test_known_statuses_are_their_own_label(status: int) -> None:
    assert status_label(status) == str(status)


@pytest.mark.parametrize("status", [0, 100, 201, 204, 302, 418, 511, 999, -1])
def test_unknown_statuses_are_other(status: int) -> None:
    assert status_label(status) == "other"
