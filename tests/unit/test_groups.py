"""Placement groups in the config and the topology: who shares a process, which rings remain.

The chained layout must keep the topology's promises (one writer and one
reader per ring, the ring plan's bytes equal to what the supervisor creates)
and drop exactly the rings between members of a group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from mpipeline import config, topology
from mpipeline.config import STAGE_ORDER, PipelineConfig, chained
from mpipeline.errors import ConfigError
from tests.unit.test_topology import ring_ends

ROOT = Path(__file__).resolve().parents[2]
CPUS = [0, 1, 2, 3]


def _stages(cfg: PipelineConfig, **tables: dict[str, Any]) -> PipelineConfig:
    changes = {
        name: msgspec.structs.replace(getattr(cfg.stages, name), **fields)
        for name, fields in tables.items()
    }
    return msgspec.structs.replace(cfg, stages=msgspec.structs.replace(cfg.stages, **changes))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _edges(topo: topology.Topology) -> set[tuple[str, str]]:
    return {(e.producer, e.consumer) for e in topo.edges}


def test_chained_groups_each_run_of_equal_replicas() -> None:
    cfg = chained(PipelineConfig())  # inference has 2 replicas, the rest 1
    groups = {name: getattr(cfg.stages, name).group for name in STAGE_ORDER}
    assert groups == {
        "rag": "rag_assemble",
        "assemble": "rag_assemble",
        "inference": "",
        "post": "post_stream",
        "stream": "post_stream",
    }
    every = _stages(PipelineConfig(), **{name: {"replicas": 3} for name in STAGE_ORDER})
    assert {getattr(chained(every).stages, n).group for n in STAGE_ORDER} == {"chain"}
    # Idempotent, so a test config may be laid out twice.
    assert chained(chained(every)) == chained(every)


def test_a_group_drops_the_rings_inside_it_and_keeps_the_rest() -> None:
    topo = topology.build(chained(PipelineConfig()), "g1", CPUS)
    pairs = _edges(topo)
    assert not any(p.startswith("rag") and c.startswith("assemble") for p, c in pairs)
    assert not any(p.startswith("post") and c.startswith("stream") for p, c in pairs)
    assert ("assemble0", "inference1") in pairs and ("inference1", "post0") in pairs
    # Errors leave a group by its last member only.
    err_writers = {p for p, c in pairs if c.endswith("err")}
    assert err_writers == {"assemble0", "inference0", "inference1"}
    assert [g.name for g in topo.groups] == ["rag_assemble-0", "post_stream-0"]
    assert [p.name for p in topo.processes] == [
        "rag_assemble-0",
        "inference-0",
        "inference-1",
        "post_stream-0",
    ]
    group = topo.groups[0]
    assert group.slots == (0, 1) and group.inputs == group.members[0].inputs
    assert group.members[0].outputs == () and group.members[1].inputs == ()
    # Every member keeps its own control slot: the flow's slots are unchanged.
    assert [r.slot for r in topo.replicas] == list(range(len(topo.replicas)))


@pytest.mark.parametrize("layout", ["per-stage", "chained", "whole chain"])
def test_every_ring_still_has_one_writer_one_reader_and_the_plan_matches(layout: str) -> None:
    cfg = PipelineConfig()
    if layout == "whole chain":
        cfg = _stages(cfg, **{name: {"replicas": 2} for name in STAGE_ORDER})
    if layout != "per-stage":
        cfg = chained(cfg)
    topo = topology.build(cfg, "g2", CPUS)
    writers, readers = ring_ends(topo)
    assert set(writers) == set(readers) == {e.name for e in topo.edges}
    assert set(writers.values()) == set(readers.values()) == {1}
    # The ring plan (/dev/shm check) counts exactly what the supervisor creates.
    assert config.ring_bytes_total(cfg) == sum(e.capacity for e in topo.edges)


def test_the_whole_chain_is_one_process_per_replica_on_its_first_stages_cores() -> None:
    cfg = config.load(ROOT / "config/examples/chained.toml")
    topo = topology.build(cfg, "g3", CPUS)
    assert [g.name for g in topo.groups] == ["chain-0", "chain-1"]
    assert len(topo.processes) == 2
    assert all(len(g.members) == 5 for g in topo.groups)
    plan = config.pinning(cfg, CPUS)
    for group in topo.groups:
        assert {tuple(plan[m.name]) for m in group.members} == {group.cpus}
    # The only rings: gateway and API clients into the chains and back, nothing between.
    clients = cfg.gateway.replicas + cfg.gateway.api_clients
    assert len(topo.edges) == 2 * clients * 2
    # One process per core here: its cores are its own, so "auto" spins.
    assert all(m.own_cores for g in topo.groups for m in g.members)


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        (
            '[stages.rag]\ngroup = "g"\n[stages.inference]\nreplicas = 1\n'
            '[stages.post]\ngroup = "g"\n',
            "stages.post.group",
            "must be consecutive stages",
        ),
        (
            '[stages.assemble]\ngroup = "g"\n[stages.inference]\ngroup = "g"\n',
            "stages.inference.replicas",
            "every stage of a group has its first stage's replicas",
        ),
        (
            '[stages.rag]\ngroup = "g"\n[stages.assemble]\ngroup = "g"\ncpus = [0]\n',
            "stages.assemble.cpus",
            "runs on stages.rag.cpus",
        ),
        ('[stages.rag]\ngroup = "post"\n', "stages.rag.group", "reserved"),
        ('[stages.rag]\ngroup = "Front"\n', "stages.rag.group", "matching regex"),
    ],
    ids=["split", "replicas", "cpus", "reserved", "pattern"],
)
def test_a_bad_group_is_a_config_error_naming_the_field(
    tmp_path: Path, text: str, field: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, text))
    assert any(i.field == field and message in i.message for i in info.value.issues), [
        str(i) for i in info.value.issues
    ]


def test_warnings_count_a_group_as_one_process() -> None:
    cfg = config.load(ROOT / "config/examples/chained.toml")
    # gateway + two chains on this machine's cores: no "10 processes" from members.
    for warning in config.warnings(cfg):
        assert "pinned processes" not in warning or warning.startswith("3 pinned")
