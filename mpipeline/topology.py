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

from dataclasses import dataclass

from mpipeline.config import ERROR_RING_BYTES, PipelineConfig, active_stages, pinning

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

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.index}"


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
                    own_cores=_alone(rname, plan),
                )
            )
    return replicas


def _alone(name: str, plan: dict[str, list[int]]) -> bool:
    """Whether no other process of the plan is pinned to any core of ``name``'s.

    An unpinned replica (no cores listed) runs anywhere, so it shares.
    """
    mine = set(plan[name])
    return bool(mine) and all(
        other == name or mine.isdisjoint(cpus) for other, cpus in plan.items()
    )


def ring_name(run_id: str, producer: str, consumer: str) -> str:
    return f"mpl-{run_id}-{producer}-{consumer}"


def edge_label(name: str) -> str:
    """``"producer-consumer"`` of a ring made by ``ring_name`` (run ids hold no '-')."""
    return name.split("-", 2)[-1]


def build(cfg: PipelineConfig, run_id: str, cpus: list[int] | None = None) -> Topology:
    """Lay out every edge and replica for ``cfg``; ``run_id`` namespaces the segments."""
    n_clients = cfg.gateway.replicas + cfg.gateway.api_clients
    stages = [(name, sc.replicas, sc.ring_capacity) for name, sc in active_stages(cfg)]
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
    errors: dict[str, list[str]] = {}
    for name, n, _ in stages[:-1]:
        for i in range(n):
            errors[f"{name}-{i}"] = [
                edge(f"{name}{i}", f"{c}err", ERROR_RING_BYTES) for c in clients
            ]
    replicas = _replica_specs(stages, plan, inputs, outputs, errors)
    client_specs = tuple(
        ClientSpec(
            index=ci,
            ingress=tuple(ingress[c]),
            returns=tuple(returns[f"{last}-{s}"][ci] for s in range(n_last)),
            errors=tuple(errors[r.name][ci] for r in replicas if r.name in errors),
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
    )
