"""Placement groups: which consecutive stages share a process (operator chaining).

A stage's ``group`` names its process: consecutive active stages with the same
non-empty name run as one process per replica, and messages between them are
handed over as Python objects instead of crossing a ring (issue 16's chained
layout). This module is the one place that says which stages are joined;
pinning, the ring plan and the topology all ask it.

Why the rules: replica ``i`` of a group runs replica ``i`` of every member, so
the members must have the same replica count, and since a session is routed
to the same index at every ring (``routing.shard_for`` with the same count),
a session's requests still meet the same shard. A group runs on its first
stage's cores: a list of cores on a later member would be silently unused, so
it is an error instead. A group name must not be split by another stage: one
process cannot run ``rag`` and ``post`` while ``inference`` runs elsewhere in
between.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpipeline.config.tables import PipelineConfig, StageConfig

Problem = tuple[str, str]
# Names a group must not take: they already name processes or ring ends.
_RESERVED = ("gateway", "client", "supervisor")


def runs(stages: list[tuple[str, StageConfig]]) -> list[list[str]]:
    """``stages`` (active, flow order) cut into processes: a run is one process per replica."""
    out: list[list[str]] = []
    previous = ""
    for name, stage in stages:
        if stage.group and stage.group == previous:
            out[-1].append(name)
        else:
            out.append([name])
        previous = stage.group
    return out


def joined(cfg_stages: list[tuple[str, StageConfig]], producer: str, consumer: str) -> bool:
    """Whether ``producer`` hands its output to ``consumer`` in-process (no ring)."""
    groups = dict(cfg_stages)
    a, b = groups.get(producer), groups.get(consumer)
    return a is not None and b is not None and bool(a.group) and a.group == b.group


def leaders(stages: list[tuple[str, StageConfig]]) -> dict[str, str]:
    """Every stage's first stage of its process (itself when it runs alone)."""
    return {name: run[0] for run in runs(stages) for name in run}


def check(cfg: PipelineConfig, stages: list[tuple[str, StageConfig]]) -> list[Problem]:
    """The rules above, each broken one named by the field to change."""
    out: list[Problem] = []
    names = [name for name, _ in stages]
    seen: dict[str, int] = {}
    for pos, (name, stage) in enumerate(stages):
        group = stage.group
        if not group:
            continue
        field = f"stages.{name}.group"
        if group in _RESERVED or group in names:
            out.append((field, f"{group!r} is reserved (a stage or process name)"))
            continue
        if group in seen and seen[group] != pos - 1:
            out.append(
                (field, f"group {group!r} must be consecutive stages; {names[pos - 1]} is between")
            )
        seen[group] = pos
    for run in runs(stages):
        first = dict(stages)[run[0]]
        for name in run[1:]:
            stage = dict(stages)[name]
            if stage.replicas != first.replicas:
                out.append(
                    (
                        f"stages.{name}.replicas",
                        f"is {stage.replicas} but group {stage.group!r} runs "
                        f"{first.replicas} (stages.{run[0]}.replicas): every stage of a "
                        "group has its first stage's replicas",
                    )
                )
            if stage.cpus != "auto":
                out.append(
                    (
                        f"stages.{name}.cpus",
                        f"group {stage.group!r} runs on stages.{run[0]}.cpus; "
                        "set the cores there, not here",
                    )
                )
    if cfg.stages.rag.enabled is False and cfg.stages.rag.group:
        # Harmless, but a group on a stage that does not run is a likely mistake.
        out.append(("stages.rag.group", "rag is disabled (stages.rag.enabled = false)"))
    return out
