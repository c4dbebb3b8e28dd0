"""Who writes which ring: the pure mapping from a config to processes and edges.

The supervisor creates exactly these rings and hands each replica its
``ReplicaSpec``; the client uses the same description to know where its
requests can be. Nothing here touches the OS, so it is unit-testable.

Rings: one per (producer replica, consumer replica) pair along the flow,
``client-c -> first stage -> ... -> stream-s -> client-c``, plus a small
error ring from every non-final replica to every client: a ``Failed`` goes
straight back to its caller instead of queueing behind the very backlog that
may have caused it (a shed on a full ring must not need room in that ring).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mpipeline.config import (
    ERROR_RING_BYTES,
    PipelineConfig,
    StageConfig,
    active_stages,
    groups,
    pinning,
)

CLIENT = "client"


@dataclass(frozen=True, slots=True)
class EdgeSpec:
    name: str
    producer: str
    consumer: str
    capacity: int


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """Everything a child needs to boot, small and picklable (spawn pickles it)."""

    stage: str
    index: int
    replicas: int
    cpus: tuple[int, ...]
    slot: int
    next_stage: str
    inputs: tuple[str, ...]
    # Rings to the next stage's replicas, indexed by replica; for the last
    # stage, the return rings indexed by client slot (reply_to).
    outputs: tuple[str, ...]
    # Error rings indexed by client slot; the last stage uses ``outputs``.
    errors: tuple[str, ...]
    # No other replica or gateway is pinned to any of ``cpus``: busy-polling
    # there costs nobody else's time (``spin_us = "auto"``).
    own_cores: bool = False
    # The placement group this replica runs in ("": a process of its own).
    group: str = ""

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.index}"

    @property
    def slots(self) -> tuple[int, ...]:
        return (self.slot,)


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """One process running replica ``index`` of consecutive stages (a placement group).

    Each member keeps its ``ReplicaSpec`` and control slot; only the edges
    between members have no ring (a member's ``outputs`` are empty and the
    next member's ``inputs`` too). The process reads its first member's
    inputs and writes by its last member's outputs.
    """

    group: str
    index: int
    members: tuple[ReplicaSpec, ...]

    @property
    def name(self) -> str:
        return f"{self.group}-{self.index}"

    @property
    def stage(self) -> str:
        """The first member's stage: a group stops at its first stage's turn."""
        return self.members[0].stage

    @property
    def slot(self) -> int:
        return self.members[0].slot

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(m.slot for m in self.members)

    @property
    def cpus(self) -> tuple[int, ...]:
        return self.members[0].cpus

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.members[0].inputs


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """A gateway replica: an HTTP server on client slot ``client`` (== ``index``).

    It has a control-block slot like a stage replica (heartbeat, state,
    restarts) after theirs; ``inputs`` are its return and error rings, so the
    supervisor can tell a hung gateway (results waiting, no beat) from an idle one.
    """

    index: int
    cpus: tuple[int, ...]
    slot: int
    client: int
    inputs: tuple[str, ...]

    stage = "gateway"

    @property
    def name(self) -> str:
        return f"gateway-{self.index}"

    @property
    def slots(self) -> tuple[int, ...]:
        return (self.slot,)


@dataclass(frozen=True, slots=True)
class ClientSpec:
    index: int
    ingress: tuple[str, ...]
    returns: tuple[str, ...]
    errors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Topology:
    run_id: str
    stages: tuple[tuple[str, int], ...]
    edges: tuple[EdgeSpec, ...]
    replicas: tuple[ReplicaSpec, ...]
    clients: tuple[ClientSpec, ...]
    # Client slots 0..len(gateways)-1 belong to the gateways; the rest to API clients.
    gateways: tuple[GatewaySpec, ...] = ()
    groups: tuple[GroupSpec, ...] = ()

    @property
    def processes(self) -> tuple[ReplicaSpec | GroupSpec, ...]:
        """The stage processes the supervisor runs: groups, and replicas in none."""
        grouped = {m.name for g in self.groups for m in g.members}
        alone = [r for r in self.replicas if r.name not in grouped]
        return tuple(sorted([*alone, *self.groups], key=lambda p: p.slot))

    def replica(self, name: str) -> ReplicaSpec:
        for spec in self.replicas:
            if spec.name == name:
                return spec
        raise KeyError(f"no replica named {name!r}; have {[r.name for r in self.replicas]}")

    def stage_replicas(self, stage: str) -> int:
        return dict(self.stages)[stage]


def _replica_specs(
    stages: list[tuple[str, int, int]],
    plan: dict[str, list[int]],
    inputs: dict[str, list[str]],
    outputs: dict[str, list[str]],
    errors: dict[str, list[str]],
    group_of: dict[str, str],
) -> list[ReplicaSpec]:
    """Every stage replica in flow order, its control slot its position."""
    replicas: list[ReplicaSpec] = []
    for pos, (name, n, _) in enumerate(stages):
        nxt = stages[pos + 1][0] if pos + 1 < len(stages) else CLIENT
        for i in range(n):
            rname = f"{name}-{i}"
            replicas.append(
                ReplicaSpec(
                    stage=name,
                    index=i,
                    replicas=n,
                    cpus=tuple(plan[rname]),
                    slot=len(replicas),
                    next_stage=nxt,
                    inputs=tuple(inputs[rname]),
                    outputs=tuple(outputs[rname]),
                    errors=tuple(errors.get(rname, outputs[rname])),
                    own_cores=_alone(rname, plan, group_of),
                    group=group_of.get(name, ""),
                )
            )
    return replicas


def _alone(name: str, plan: dict[str, list[int]], group_of: dict[str, str]) -> bool:
    """Whether no other process of the plan is pinned to any of ``name``'s cores.

    An unpinned replica (no cores listed) runs anywhere, so it shares. The
    members of one placement-group process share their cores with each other
    only, which is no sharing at all.
    """
    mine = set(plan[name])
    stage, _, index = name.rpartition("-")

    def same_process(other: str) -> bool:
        o_stage, _, o_index = other.rpartition("-")
        return other == name or (
            index == o_index
            and bool(group_of.get(stage))
            and group_of.get(o_stage) == group_of[stage]
        )

    return bool(mine) and all(
        same_process(other) or mine.isdisjoint(cpus) for other, cpus in plan.items()
    )


def _groups(replicas: list[ReplicaSpec]) -> tuple[GroupSpec, ...]:
    """The placement-group processes: replica ``i`` of each member, in flow order."""
    members: dict[tuple[str, int], list[ReplicaSpec]] = {}
    for spec in replicas:
        if spec.group:
            members.setdefault((spec.group, spec.index), []).append(spec)
    return tuple(
        GroupSpec(group=g, index=i, members=tuple(ms))
        for (g, i), ms in members.items()
        if len(ms) > 1
    )


def ring_name(run_id: str, producer: str, consumer: str) -> str:
    return f"mpl-{run_id}-{producer}-{consumer}"


def edge_label(name: str) -> str:
    """``"producer-consumer"`` of a ring made by ``ring_name`` (run ids hold no '-')."""
    return name.split("-", 2)[-1]


def _error_rings(
    stages: list[tuple[str, int, int]],
    active: list[tuple[str, StageConfig]],
    clients: list[str],
    edge: Callable[[str, str, int], str],
) -> dict[str, list[str]]:
    """Every non-final replica's error ring to each client, by replica name.

    A group member's errors leave by the group's last member: it has none.
    """
    errors: dict[str, list[str]] = {}
    for pos, (name, n, _) in enumerate(stages[:-1]):
        chained = groups.joined(active, name, stages[pos + 1][0])
        for i in range(n):
            errors[f"{name}-{i}"] = (
                []
                if chained
                else [edge(f"{name}{i}", f"{c}err", ERROR_RING_BYTES) for c in clients]
            )
    return errors


def build(cfg: PipelineConfig, run_id: str, cpus: list[int] | None = None) -> Topology:
    """Lay out every edge and replica for ``cfg``; ``run_id`` namespaces the segments."""
    n_clients = cfg.gateway.replicas + cfg.gateway.api_clients
    active = active_stages(cfg)
    stages = [(name, sc.replicas, sc.ring_capacity) for name, sc in active]
    # Stages that share a process with a neighbour, by their group's name.
    by_name = dict(active)
    group_of = {n: by_name[n].group for run in groups.runs(active) if len(run) > 1 for n in run}
    plan = pinning(cfg, cpus)
    edges: list[EdgeSpec] = []

    def edge(producer: str, consumer: str, capacity: int) -> str:
        name = ring_name(run_id, producer, consumer)
        edges.append(EdgeSpec(name, producer, consumer, capacity))
        return name

    clients = [f"{CLIENT}{c}" for c in range(n_clients)]
    ingress = {
        c: [edge(c, f"{stages[0][0]}{r}", stages[0][2]) for r in range(stages[0][1])]
        for c in clients
    }
    inputs: dict[str, list[str]] = {}
    outputs: dict[str, list[str]] = {}
    for r in range(stages[0][1]):
        inputs[f"{stages[0][0]}-{r}"] = [ingress[c][r] for c in clients]
    for (prod, np_, _), (cons, nc, cap) in zip(stages, stages[1:], strict=False):
        if groups.joined(active, prod, cons):
            # One process: the outputs are handed over in it, no ring (runner/_chain.py).
            for p in range(np_):
                outputs[f"{prod}-{p}"] = []
                inputs[f"{cons}-{p}"] = []
            continue
        for p in range(np_):
            outputs[f"{prod}-{p}"] = [edge(f"{prod}{p}", f"{cons}{c}", cap) for c in range(nc)]
        for c in range(nc):
            inputs[f"{cons}-{c}"] = [outputs[f"{prod}-{p}"][c] for p in range(np_)]
    last, n_last, _ = stages[-1]
    returns = {
        f"{last}-{s}": [edge(f"{last}{s}", c, cfg.gateway.ring_capacity) for c in clients]
        for s in range(n_last)
    }
    outputs.update(returns)
    errors = _error_rings(stages, active, clients, edge)
    replicas = _replica_specs(stages, plan, inputs, outputs, errors, group_of)
    client_specs = tuple(
        ClientSpec(
            index=ci,
            ingress=tuple(ingress[c]),
            returns=tuple(returns[f"{last}-{s}"][ci] for s in range(n_last)),
            errors=tuple(errors[r.name][ci] for r in replicas if errors.get(r.name)),
        )
        for ci, c in enumerate(clients)
    )
    gateways = tuple(
        GatewaySpec(
            index=g,
            cpus=tuple(plan[f"gateway-{g}"]),
            slot=len(replicas) + g,
            client=g,
            inputs=(*client_specs[g].returns, *client_specs[g].errors),
        )
        for g in range(cfg.gateway.replicas)
    )
    return Topology(
        run_id=run_id,
        stages=tuple((name, n) for name, n, _ in stages),
        edges=tuple(edges),
        replicas=tuple(replicas),
        clients=client_specs,
        gateways=gateways,
        groups=_groups(replicas),
    )
