"""Topology: every ring has one producer and one consumer, and the specs agree on it.

The supervisor creates exactly ``topo.edges``, each replica attaches the names
in its ``ReplicaSpec`` and the client those in its ``ClientSpec``; if any of
the three disagree, a replica waits forever on a ring nobody writes.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import msgspec
import pytest

from mpipeline import config, topology
from mpipeline.config import ERROR_RING_BYTES, STAGE_ORDER, PipelineConfig
from mpipeline.topology import Topology

RUN_ID = "feedc0de"
CPUS = [0, 1, 2, 3]
KIB = 1024


def _config(replicas: Mapping[str, int] | None = None, *, rag: bool = True) -> PipelineConfig:
    """Default config with ``replicas`` per stage (and gateway), distinct ring sizes per stage."""
    replicas = dict(replicas or {})
    gateway = replicas.pop("gateway", 1)
    cfg = PipelineConfig()
    stages = cfg.stages
    changes: dict[str, Any] = {}
    for i, name in enumerate(STAGE_ORDER):
        table = getattr(stages, name)
        fields: dict[str, Any] = {"ring_capacity": (64 + 8 * i) * KIB}
        if name in replicas:
            fields["replicas"] = replicas[name]
        if name == "rag":
            fields["enabled"] = rag
        changes[name] = msgspec.structs.replace(table, **fields)
    return msgspec.structs.replace(
        cfg,
        gateway=msgspec.structs.replace(cfg.gateway, replicas=gateway, ring_capacity=32 * KIB),
        stages=msgspec.structs.replace(stages, **changes),
    )


def _build(cfg: PipelineConfig) -> Topology:
    return topology.build(cfg, RUN_ID, CPUS)


SHAPES = [
    {},
    {"rag": 2, "assemble": 3, "inference": 4, "post": 2, "stream": 2},
    {"inference": 1, "gateway": 3},
]


@pytest.mark.parametrize("shape", SHAPES, ids=["defaults", "wide", "narrow"])
def test_edge_count_follows_the_replica_counts(shape: dict[str, int]) -> None:
    cfg = _config(shape)
    topo = _build(cfg)
    clients = cfg.gateway.replicas + cfg.gateway.api_clients
    counts = [n for _, n in topo.stages]
    pairs = sum(a * b for a, b in zip(counts, counts[1:], strict=False))
    expected = clients * counts[0] + pairs + counts[-1] * clients + sum(counts[:-1]) * clients
    assert len(topo.edges) == expected
    assert len({e.name for e in topo.edges}) == expected
    assert all(e.name.startswith(f"mpl-{RUN_ID}-") for e in topo.edges)
    assert len(topo.clients) == clients


def ring_ends(topo: Topology) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """How many replicas and clients write and read each ring name (writers, readers)."""
    writers: collections.Counter[str] = collections.Counter()
    readers: collections.Counter[str] = collections.Counter()
    for rep in topo.replicas:
        readers.update(rep.inputs)
        # The last stage's error rings are its return rings: one writer still.
        writers.update(set(rep.outputs) | set(rep.errors))
    for client in topo.clients:
        writers.update(client.ingress)
        readers.update(client.returns)
        readers.update(client.errors)
    return writers, readers


@pytest.mark.parametrize("shape", SHAPES, ids=["defaults", "wide", "narrow"])
def test_every_ring_has_exactly_one_writer_and_one_reader(shape: dict[str, int]) -> None:
    topo = _build(_config(shape))
    writers, readers = ring_ends(topo)
    names = {e.name for e in topo.edges}
    assert set(writers) == set(readers) == names
    assert set(writers.values()) == {1}
    assert set(readers.values()) == {1}


@pytest.mark.parametrize("shape", SHAPES, ids=["defaults", "wide", "narrow"])
def test_outputs_are_indexed_by_the_next_replica_and_inputs_match(
    shape: dict[str, int],
) -> None:
    topo = _build(_config(shape))
    by_stage = collections.defaultdict(list)
    for rep in topo.replicas:
        by_stage[rep.stage].append(rep)
    names = [s for s, _ in topo.stages]
    edges = {e.name: e for e in topo.edges}
    for stage, nxt in zip(names, names[1:], strict=False):
        for rep in by_stage[stage]:
            assert rep.next_stage == nxt
            assert len(rep.outputs) == len(by_stage[nxt])
            assert len(rep.errors) == len(topo.clients)
            for j, ring in enumerate(rep.outputs):
                assert ring in by_stage[nxt][j].inputs
                assert edges[ring].producer == f"{stage}{rep.index}"
                assert edges[ring].consumer == f"{nxt}{j}"
        for rep in by_stage[nxt]:
            assert len(rep.inputs) == len(by_stage[stage])
    for rep in by_stage[names[0]]:
        assert len(rep.inputs) == len(topo.clients)
    for rep in by_stage[names[-1]]:
        assert rep.next_stage == topology.CLIENT
        assert rep.outputs == rep.errors
        assert len(rep.outputs) == len(topo.clients)


def test_replicas_are_in_flow_order_with_dense_slots_and_names() -> None:
    topo = _build(_config({"inference": 3, "post": 2}))
    assert [r.slot for r in topo.replicas] == list(range(len(topo.replicas)))
    assert [r.name for r in topo.replicas] == [
        "rag-0",
        "assemble-0",
        "inference-0",
        "inference-1",
        "inference-2",
        "post-0",
        "post-1",
        "stream-0",
    ]
    assert all(r.replicas == topo.stage_replicas(r.stage) for r in topo.replicas)
    assert topo.replica("inference-2").index == 2
    with pytest.raises(KeyError, match="no replica named 'inference-3'"):
        topo.replica("inference-3")


def test_cpus_come_from_the_pinning_plan() -> None:
    cfg = _config({"inference": 3})
    topo = _build(cfg)
    plan = config.pinning(cfg, CPUS)
    for rep in topo.replicas:
        assert list(rep.cpus) == plan[rep.name]
        assert set(rep.cpus) <= set(CPUS)


def test_clients_write_the_first_stage_and_read_returns_and_every_error_ring() -> None:
    topo = _build(_config({"inference": 2, "stream": 2}))
    first = [r for r in topo.replicas if r.stage == "rag"]
    last = [r for r in topo.replicas if r.stage == "stream"]
    not_last = [r for r in topo.replicas if r.stage != "stream"]
    for client in topo.clients:
        assert all(ring in rep.inputs for rep, ring in zip(first, client.ingress, strict=True))
        assert list(client.returns) == [rep.outputs[client.index] for rep in last]
        assert list(client.errors) == [rep.errors[client.index] for rep in not_last]


def test_capacities_belong_to_the_consumer() -> None:
    cfg = _config({"inference": 2})
    topo = _build(cfg)
    for edge in topo.edges:
        consumer = edge.consumer.rstrip("0123456789")
        if edge.consumer.endswith("err"):
            assert edge.capacity == ERROR_RING_BYTES
        elif consumer == topology.CLIENT:
            assert edge.capacity == cfg.gateway.ring_capacity
        else:
            assert edge.capacity == getattr(cfg.stages, consumer).ring_capacity
    assert sum(e.capacity for e in topo.edges) == config.ring_bytes_total(cfg)


def test_disabled_rag_leaves_it_out_and_clients_feed_assemble() -> None:
    cfg = _config({"assemble": 2}, rag=False)
    topo = _build(cfg)
    assert [s for s, _ in topo.stages] == ["assemble", "inference", "post", "stream"]
    assert not any("rag" in e.name for e in topo.edges)
    assert all(r.stage != "rag" for r in topo.replicas)
    assemble = [r for r in topo.replicas if r.stage == "assemble"]
    for client in topo.clients:
        assert len(client.ingress) == 2
        for rep, ring in zip(assemble, client.ingress, strict=True):
            assert ring in rep.inputs


def test_run_id_namespaces_every_segment() -> None:
    cfg = _config()
    a = {e.name for e in topology.build(cfg, "aaaa", CPUS).edges}
    b = {e.name for e in topology.build(cfg, "bbbb", CPUS).edges}
    assert not a & b
    assert {n.replace("aaaa", "bbbb", 1) for n in a} == b


def test_edge_label_inverts_ring_name() -> None:
    assert topology.edge_label(topology.ring_name("ab12cd34", "rag0", "assemble1")) == (
        "rag0-assemble1"
    )
