"""Cheaper hops (issue 16): the per-stage spin policy (``spin_us``)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from mpipeline import config, topology
from mpipeline.config import PipelineConfig
from mpipeline.ring import DEFAULT_SPIN_S
from mpipeline.runner import StageRunner
from mpipeline.runner._outbox import Outbox
from mpipeline.runner._runner import spin_seconds
from tests.unit.runner.rig import Retrieve, Rig, configure


@pytest.mark.parametrize(
    ("spin_us", "own_cores", "expect"),
    [
        ("auto", True, DEFAULT_SPIN_S),
        ("auto", False, 0.0),
        (0, True, 0.0),
        (50, False, 50e-6),
        (1000, True, 1e-3),
    ],
)
def test_spin_seconds(spin_us: int | str, own_cores: bool, expect: float) -> None:
    assert spin_seconds(spin_us, own_cores=own_cores) == pytest.approx(expect)


@pytest.mark.parametrize(
    ("spin_us", "own_cores", "expect"),
    [("auto", True, DEFAULT_SPIN_S), ("auto", False, 0.0), (7, False, 7e-6)],
)
def test_the_runner_gives_every_ring_its_stage_spin(
    spin_us: int | str, own_cores: bool, expect: float
) -> None:
    cfg = configure(PipelineConfig(), "rag", spin_us=spin_us)

    async def body() -> list[float]:
        async with Rig(Retrieve, "rag", cfg, outputs=2) as rig:
            spec = dataclasses.replace(rig.spec, own_cores=own_cores)
            runner = StageRunner(spec, cfg, rig.stage)
            runner.attach()
            try:
                outbox = runner.outbox
                assert isinstance(outbox, Outbox)
                rings = [*runner.inputs, *outbox.outputs, *outbox.errors]
                return [r.spin_s for r in rings]
            finally:
                runner.close()

    # One input ring, two outputs, one error ring (one client).
    assert asyncio.run(body()) == [pytest.approx(expect)] * 4


def test_replicas_own_their_cores_only_when_nothing_else_is_pinned_there() -> None:
    cfg = PipelineConfig()
    # Two cores for six replicas and a gateway: every one shares.
    small = topology.build(cfg, "t", [0, 1])
    assert [r.own_cores for r in small.replicas] == [False] * len(small.replicas)
    # Sixteen: one core each, gateway included.
    big = topology.build(cfg, "t", list(range(16)))
    assert [r.own_cores for r in big.replicas] == [True] * len(big.replicas)
    # A stage pinned onto the gateway's core shares it; the others do not.
    pinned = configure(cfg, "post", cpus=[0])
    mixed = {r.name: r.own_cores for r in topology.build(pinned, "t", list(range(16))).replicas}
    assert mixed.pop("post-0") is False
    assert all(mixed.values())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1001", "expected int <= 1000"),
        ("-1", "expected int >= 0"),
        ('"fast"', "must be 'auto'"),
        ("2.5", "expected"),
    ],
)
def test_spin_us_out_of_bounds_is_a_clear_error(tmp_path: Path, value: str, message: str) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text(f"[stages.post]\nspin_us = {value}\n", encoding="utf-8")
    [issue] = config.validate(path)
    assert issue.field == "stages.post.spin_us"
    assert issue.line == 2
    assert message in issue.message


def test_spin_us_defaults_to_auto_and_takes_microseconds(tmp_path: Path) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text("[stages.post]\nspin_us = 40\n", encoding="utf-8")
    cfg = config.load(path)
    assert cfg.stages.post.spin_us == 40
    assert cfg.stages.rag.spin_us == "auto"
