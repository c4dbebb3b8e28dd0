"""The pipeline a bench run starts: replicas and cores from a core count, and a layout.

``per-stage`` is the design's default, one process per stage replica;
``chained`` runs the whole flow as one placement group per core (issue 16's
operator chaining): every stage gets a replica per core, and replica ``i`` of
each stage shares one process, so a request crosses no ring between stages.
``mpipeline bench --layout per-stage,chained`` measures both in one run.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from mpipeline.config import PipelineConfig, active_stages, chained, pinning

Layout = Literal["per-stage", "chained"]
LAYOUTS: tuple[Layout, ...] = ("per-stage", "chained")
# Stages besides inference get one replica per this many cores (at least one).
CORES_PER_SIDE_REPLICA = 8


def config_for_cores(
    cores: list[int],
    base: PipelineConfig | None = None,
    *,
    shared: bool = False,
    metrics: bool = True,
    heavy: tuple[str, ...] = ("inference",),
) -> PipelineConfig:
    """The bench's pipeline on ``cores``: echo, no delay, shards = cores.

    ``heavy`` (inference; the stages with the most work) get one replica per
    core each; the others one replica per ``CORES_PER_SIDE_REPLICA`` cores (at
    least one), since each costs a fraction of a shard. Replicas are dealt over ``cores`` in flow
    order, one core each, wrapping when there are more replicas than cores
    (the way ``cpus = "auto"`` deals the affinity mask), so consecutive stages
    land on different cores. ``shared``: every replica may run on all of
    ``cores`` and the kernel balances them instead. ``metrics``: the replicas
    count into the metrics block and the supervisor serves /metrics on a free
    port, as a default deployment does; off records nothing.
    """
    cfg = base or PipelineConfig()
    c = len(cores)
    side = max(1, c // CORES_PER_SIDE_REPLICA)
    stages = cfg.stages
    offset = 0
    updates = {}
    for name, _ in active_stages(cfg):
        st = getattr(stages, name)
        n = c if name in heavy else side
        if shared:
            cpus, per = list(cores), c
        else:
            # A list is dealt from its start, so rotate it to continue where the last stage ended.
            k = offset % c
            cpus, per = [*cores[k:], *cores[:k]], 1
        offset += n
        fields: dict[str, object] = {"replicas": n, "cpus": cpus, "cores_per_replica": per}
        if name == "inference":
            echo = msgspec.structs.replace(st.echo, token_delay_ms=0.0, max_tokens=16)
            fields["echo"] = echo
        updates[name] = msgspec.structs.replace(st, **fields)
    return msgspec.structs.replace(
        cfg,
        stages=msgspec.structs.replace(stages, **updates),
        metrics=msgspec.structs.replace(cfg.metrics, enabled=metrics, port=0),
        # The bench client plays the gateway; `bench --http` adds a real one.
        gateway=msgspec.structs.replace(cfg.gateway, replicas=0),
    )


def laid_out(
    cores: list[int],
    base: PipelineConfig | None,
    layout: Layout,
    *,
    shared: bool = False,
    metrics: bool = True,
    heavy: tuple[str, ...] = ("inference",),
) -> PipelineConfig:
    """``config_for_cores`` in ``layout``: chained gives every stage a replica per core
    and groups them, one process per core running the whole flow."""
    if layout == "per-stage":
        return config_for_cores(cores, base, shared=shared, metrics=metrics, heavy=heavy)
    every = tuple(name for name, _ in active_stages(base or PipelineConfig()))
    return chained(config_for_cores(cores, base, shared=shared, metrics=metrics, heavy=every))


def stage_pinning(cfg: PipelineConfig, cores: list[int]) -> dict[str, list[int]]:
    """Cores of every stage replica; the bench client, which plays the gateway, gets all."""
    stages = {name for name, _ in active_stages(cfg)}
    plan = {k: v for k, v in pinning(cfg, cores).items() if k.rsplit("-", 1)[0] in stages}
    return {"client (bench)": list(cores), **plan}
