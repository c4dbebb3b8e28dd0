"""What a config runs: the active stages in flow order and the ring memory they need.

Apart from ``config/__init__`` for size; both are re-exported there. The ring
plan must agree with ``topology.build``, which makes exactly these rings.
"""

from __future__ import annotations

import msgspec.structs

from mpipeline.config import groups
from mpipeline.config.tables import ERROR_RING_BYTES, PipelineConfig, StageConfig
from mpipeline.messages import STAGE_ORDER


def active_stages(cfg: PipelineConfig) -> list[tuple[str, StageConfig]]:
    """The stages the topology runs, in flow order: rag is left out when disabled."""
    skip = () if cfg.stages.rag.enabled else ("rag",)
    return [(name, getattr(cfg.stages, name)) for name in STAGE_ORDER if name not in skip]


def ring_bytes(cfg: PipelineConfig) -> dict[str, int]:
    """Bytes of ring memory per consuming stage ("gateway" for the return rings,
    "errors" for the error rings).

    One ring per (producer replica, consumer replica) pair, sized by the consumer.
    The gateway side counts every client slot: the gateway replicas and the
    ``api_clients`` slots for Python clients and the CLI.
    """
    gateway = cfg.gateway.replicas + cfg.gateway.api_clients
    out = {}
    producers = gateway
    stages = active_stages(cfg)
    for pos, (name, stage) in enumerate(stages):
        # No ring between two stages of one placement group.
        chained = pos > 0 and groups.joined(stages, stages[pos - 1][0], name)
        out[name] = 0 if chained else producers * stage.replicas * stage.ring_capacity
        producers = stage.replicas
    out["gateway"] = producers * gateway * cfg.gateway.ring_capacity
    # Error rings: every replica but the last stage's has one to every client,
    # except inside a group, whose members' errors leave by its last member.
    senders = sum(
        stage.replicas
        for pos, (name, stage) in enumerate(stages[:-1])
        if not groups.joined(stages, name, stages[pos + 1][0])
    )
    out["errors"] = senders * gateway * ERROR_RING_BYTES
    return out


def ring_bytes_total(cfg: PipelineConfig) -> int:
    """Bytes of every ring the topology creates."""
    return sum(ring_bytes(cfg).values())


def chained(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with every maximal run of consecutive stages of equal replicas in one group.

    The chained layout of ``mpipeline bench --layout chained`` and of the
    reliability suite's second run: with the defaults (inference sharded,
    the rest single) it is ``front`` = rag + assemble, the shards alone, and
    ``back`` = post + stream; with every stage at N replicas, one process per
    shard runs the whole chain. A later member's own cores are dropped (a
    group runs on its first stage's).
    """
    active = active_stages(cfg)
    names = [name for name, _ in active]
    new = {name: getattr(cfg.stages, name) for name in names}
    start = 0
    while start < len(active):
        end = start
        while end + 1 < len(active) and active[end + 1][1].replicas == active[start][1].replicas:
            end += 1
        run = names[start : end + 1]
        group = (
            "" if len(run) == 1 else "chain" if len(run) == len(names) else f"{run[0]}_{run[-1]}"
        )
        for pos, name in enumerate(run):
            stage = new[name]
            cpus = stage.cpus if pos == 0 else "auto"
            new[name] = msgspec.structs.replace(stage, group=group, cpus=cpus)
        start = end + 1
    stages = msgspec.structs.replace(cfg.stages, **new)
    return msgspec.structs.replace(cfg, stages=stages)
