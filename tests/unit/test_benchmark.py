"""How ``mpipeline bench`` derives a pipeline from a core count (pure, no processes)."""

from __future__ import annotations

import pytest

from mpipeline.bench.cores import WINDOW_PER_FRONT_REPLICA, command_line, options, window_for
from mpipeline.bench.layout import config_for_cores, laid_out, stage_pinning


def test_one_core_puts_every_replica_on_it() -> None:
    cfg = config_for_cores([3])
    assert cfg.stages.inference.replicas == 1
    plan = stage_pinning(cfg, [3])
    assert set(map(tuple, plan.values())) == {(3,)}
    assert "client (bench)" in plan
    assert not any(name.startswith("gateway") for name in plan)
    assert cfg.stages.inference.echo.token_delay_ms == 0
    assert cfg.stages.inference.echo.max_tokens == 16
    # Metrics on as deployed, on a free port (two benches never collide); off on request.
    assert cfg.metrics.enabled and cfg.metrics.port == 0
    assert not config_for_cores([3], metrics=False).metrics.enabled


def test_two_cores_give_two_shards_on_different_cores() -> None:
    cfg = config_for_cores([0, 1])
    plan = stage_pinning(cfg, [0, 1])
    assert cfg.stages.inference.replicas == 2
    assert plan["inference-0"] != plan["inference-1"]
    # Consecutive stages land on different cores.
    assert plan["rag-0"] != plan["assemble-0"]


@pytest.mark.parametrize(("cores", "side"), [(4, 1), (8, 1), (16, 2), (64, 8)])
def test_side_stages_scale_with_cores(cores: int, side: int) -> None:
    cfg = config_for_cores(list(range(cores)))
    assert cfg.stages.inference.replicas == cores
    for name in ("rag", "assemble", "post", "stream"):
        assert getattr(cfg.stages, name).replicas == side
    plan = stage_pinning(cfg, list(range(cores)))
    used = {c for cpus in plan.values() for c in cpus}
    assert used == set(range(cores))
    assert all(len(cpus) == 1 for name, cpus in plan.items() if name != "client (bench)")


def test_shared_pins_every_replica_to_all_cores() -> None:
    cfg = config_for_cores([0, 1, 2], shared=True)
    assert all(cpus == [0, 1, 2] for cpus in stage_pinning(cfg, [0, 1, 2]).values())


def test_quick_options_and_their_command_line() -> None:
    opts = options(quick=True, cores=(1, 2))
    assert opts.duration_s is not None and opts.duration_s < 1
    cmd = command_line(opts)
    assert cmd[:4] == ["mpipeline", "bench", "--cores", "1,2"]
    assert "--duration" in cmd
    assert command_line(options(requests=1000))[4:6] == ["--requests", "1000"]


def test_window_scales_with_the_first_stage_unless_given() -> None:
    assert window_for(config_for_cores([0, 1]), options()) == WINDOW_PER_FRONT_REPLICA
    assert window_for(config_for_cores(list(range(16))), options()) == 2 * WINDOW_PER_FRONT_REPLICA
    assert window_for(config_for_cores([0]), options(window=100)) == 100
    assert "--window" not in command_line(options())
    assert command_line(options(window=100))[-2:] == ["--window", "100"]


def test_the_chained_layout_runs_the_whole_flow_as_one_process_per_core() -> None:
    cfg = laid_out([0, 1], None, "chained")
    stages = [cfg.stages.rag, cfg.stages.assemble, cfg.stages.inference]
    stages += [cfg.stages.post, cfg.stages.stream]
    assert {s.group for s in stages} == {"chain"} and {s.replicas for s in stages} == {2}
    # A group runs on its first stage's cores: one core per chain, not shared.
    plan = stage_pinning(cfg, [0, 1])
    assert plan["rag-0"] == plan["stream-0"] == [0] and plan["rag-1"] == plan["post-1"] == [1]
    assert laid_out([0, 1], None, "per-stage") == config_for_cores([0, 1])
