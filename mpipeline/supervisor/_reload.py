"""Live reconfiguration, the supervisor's side: SIGHUP or ``mpipeline reload``.

The supervisor re-reads the run's config file (with the same command-line
overrides as at start), validates it, and sorts the changes
(``config.diff.plan``). An invalid file, or one that changes what only a new
run can (replica counts, ring sizes, listen addresses, the upstreams that
size the breaker board), changes nothing: the outcome is "refused" with the
reason. Otherwise it writes the validated config into the run dir (where
every replica started from now on reads it), bumps the config version in the
control block, updates the shared rate limiter, and restarts the replicas
whose settings are read only at start, one at a time (``_rolling.py``).
Gateway replicas take their live fields on their next beat and acknowledge
the version (control block, per slot); the supervisor acknowledges for the
stage replicas it left running (nothing of theirs changed) and for each
replacement once it is ready. The outcome, in ``reload.json``, turns from
"applying" to "applied" when every replica runs the new version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import msgspec

from mpipeline import reloads, rundir, topology
from mpipeline.config import (
    DEFAULTS,
    Catalog,
    ConfigError,
    PipelineConfig,
    SupervisorConfig,
    dump_toml,
    load,
)
from mpipeline.config.diff import Plan, is_live, plan
from mpipeline.control import ControlBlock
from mpipeline.errors import MPipelineError
from mpipeline.supervisor._replicas import Replica
from mpipeline.supervisor._rolling import RollingRestart
from mpipeline.supervisor._segments import RunSegments

log = logging.getLogger("mpipeline.supervisor")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS |= {"error": logging.ERROR}
# How long gateways get to acknowledge a version before the outcome says so.
ACK_TIMEOUT_S = 30.0


class Supervisor(Protocol):
    """The parts of ``_supervisor.Supervisor`` a reload reads and replaces."""

    cfg: PipelineConfig
    sup: SupervisorConfig
    topo: topology.Topology
    ctl: ControlBlock | None
    segments: RunSegments | None
    info: rundir.RunInfo | None
    run_dir: Path
    run_id: str
    replicas: list[Replica]
    config_path: Path
    log_level: int
    _stopping: bool

    def _spawn(self, rep: Replica) -> None: ...

    def _write_state(self) -> None: ...


class Reloader:
    """The run's config version, the reload in progress, and ``reload.json``."""

    def __init__(self, sup: Supervisor, source: Path | None) -> None:
        self._sup = sup
        # The file a reload re-reads (None: the built-in defaults) and the run's
        # overrides; unknown until ``set_source`` when the run has overrides.
        self.source = source
        self.overrides: Mapping[str, Any] = {}
        self._known = source is not None
        self.attempt = 0
        self.version = 0
        self._outcome: reloads.ReloadOutcome | None = None
        self._history: list[reloads.ReloadOutcome] = []
        self._ack_deadline = 0.0
        # A SIGHUP that came while a reload was being applied: handled after it.
        self._deferred = False
        self.rolling = RollingRestart(
            lambda: sup.ctl,
            sup._spawn,
            lambda: sup.sup.drain_timeout_s,
            lambda: sup.sup.boot_timeout_s,
        )
        self.rolling.on_ready = self._replaced

    # The supervisor's loop

    def owns(self, rep: Replica) -> bool:
        return self.rolling.owns(rep) and not self._sup._stopping

    def timeout(self, timeout: float) -> float:
        return self.rolling.timeout(timeout)

    def step(self) -> None:
        if self._sup._stopping:
            self.rolling.abandon()
            return
        self.rolling.step()
        outcome = self._outcome
        if outcome is None or outcome.state != "applying" or self.rolling.busy:
            return
        waiting = self._unacknowledged()
        if self.rolling.failure is not None:
            self._finish("failed", self.rolling.failure)
        elif not waiting:
            self._finish("applied", None)
        elif time.monotonic() > self._ack_deadline:
            self._finish("failed", f"{', '.join(waiting)} did not take the new config in time")
        if self._deferred and self._outcome is not None and self._outcome.state != "applying":
            self._deferred = False
            self.handle()

    def set_source(self, path: Path | None, overrides: Mapping[str, Any]) -> None:
        """What the run's config came from: a reload reads it again the same way."""
        self.source, self.overrides, self._known = path, dict(overrides), True

    def forget(self) -> None:
        """A new run starts at version 0: an old run's outcome must not show."""
        reloads.remove_outcome(self._sup.run_dir)

    # SIGHUP

    def handle(self) -> None:
        """Re-read, validate and apply the config file; every path records an outcome."""
        sup = self._sup
        if self.rolling.busy or (self._outcome is not None and self._outcome.state == "applying"):
            # After the one in progress, so that reload.json shows them in order.
            log.info("reload: deferred until the reload in progress is applied")
            self._deferred = True
            return
        self.attempt += 1
        try:
            request = reloads.take_request(sup.run_dir)
        except MPipelineError as exc:
            self._refuse(str(exc))
            return
        level = None
        if request.log_level is not None:
            level = LEVELS.get(request.log_level.lower())
            if level is None:
                self._refuse(f"unknown log level {request.log_level!r} ({', '.join(LEVELS)})")
                return
        if sup._stopping:
            self._refuse("the run is stopping")
            return
        if not self._known:
            self._refuse("this run's config did not come from a file it can read again")
            return
        fixed = sorted(k for k in request.settings if not is_live(k))
        if fixed:
            self._refuse(
                f"{reloads.NOT_LIVE}; not {', '.join(fixed)} (change the file "
                "and reload: it is applied by a rolling restart, or needs a new run)"
            )
            return
        try:
            # None: the run is on the built-in defaults (with its overrides).
            new = load(self.source, {**self.overrides, **request.settings})
        except ConfigError as exc:
            self._refuse(f"{reloads.INVALID}:\n{exc}")
            return
        diff = plan(sup.cfg, new)
        new_topo = topology.build(new, sup.run_id)
        restart = self._restarts(diff, new, new_topo)
        if diff.refused:
            self._refuse(diff.why_refused(), diff)
            return
        self._apply(new, new_topo, diff, restart, level, request)

    def _restarts(self, diff: Plan, new: PipelineConfig, topo: topology.Topology) -> list[Replica]:
        """The replicas to replace, in flow order; adds to ``diff.full`` what forbids it."""
        from mpipeline.workers import served_upstream_names

        old_cfg, sup = self._sup.cfg, self._sup
        before, after = Catalog.of(old_cfg), Catalog.of(new)
        if (served_upstream_names(before), before.remote) != (
            served_upstream_names(after),
            after.remote,
        ):
            diff.full["upstreams"] = (
                "the served upstreams change, which sizes the breaker board and the metrics"
            )
        if topo.edges != sup.topo.edges:
            if not diff.full:  # else the fields that change them are named already
                diff.full["topology"] = "the rings between the replicas change"
            return []
        specs = {s.name: s for s in (*topo.processes, *topo.gateways)}
        out = []
        for rep in sup.replicas:
            spec = specs.get(rep.spec.name)
            if spec is None:
                diff.full.setdefault("topology", f"{rep.spec.name} would not exist")
                continue
            moved = spec != rep.spec
            if moved or not _stages(rep.spec).isdisjoint(diff.rolling):
                out.append(rep)
                if moved:
                    diff.rolling.setdefault(rep.spec.stage, []).append(f"{rep.spec.name}.cpus")
        order = ["gateway", *(name for name, _ in sup.topo.stages)]
        out.sort(key=lambda r: order.index(r.spec.stage) if r.spec.stage in order else 0)
        return out

    def _apply(
        self,
        new: PipelineConfig,
        topo: topology.Topology,
        diff: Plan,
        restart: list[Replica],
        level: int | None,
        request: reloads.ReloadRequest,
    ) -> None:
        sup = self._sup
        ctl, seg = sup.ctl, sup.segments
        assert ctl is not None and seg is not None and sup.info is not None
        if level is not None:
            sup.log_level = ctl.log_level = level
            logging.getLogger().setLevel(level)
        if diff.changed:
            # The file first, then the version: a replica that sees the version reads it.
            path = rundir.write_config(sup.run_dir, dump_toml(new)).resolve()
            sup.config_path = path
            sup.cfg, sup.sup, sup.topo = new, new.supervisor, topo
            specs = {s.name: s for s in (*topo.processes, *topo.gateways)}
            for rep in sup.replicas:
                rep.spec = specs[rep.spec.name]
            if seg.limiter is not None:
                seg.limiter.set_limits(new.gateway.rate_limit)
            sup.info = msgspec.structs.replace(
                sup.info,
                config=str(path),
                breaker_config=new.stages.inference.breaker,
                topology=topo,
            )
            sup._write_state()
            self.version += 1
            ctl.config_version = self.version
            self._acknowledge(restart)
            self.rolling.start(restart)
        self._ack_deadline = (
            time.monotonic() + ACK_TIMEOUT_S + sup.sup.drain_timeout_s * len(restart)
        )
        self._outcome = reloads.ReloadOutcome(
            attempt=self.attempt,
            version=self.version,
            state="applying",
            at=time.time(),
            config=str(self.source or DEFAULTS),
            changed=diff.changed,
            live=diff.live,
            restarted=[r.spec.name for r in restart],
            log_level=request.log_level,
            settings=request.settings,
        )
        self._write()
        log.info(
            "reload: config version %d: %d fields changed (live: %s; restarting: %s)%s",
            self.version,
            len(diff.changed),
            ", ".join(diff.live) or "none",
            ", ".join(r.spec.name for r in restart) or "none",
            f"; log level {request.log_level}" if request.log_level else "",
        )
        self.step()

    # Acknowledgements

    def _acknowledge(self, restart: list[Replica]) -> None:
        """Stage replicas left running have nothing new: they run the new version as they are."""
        ctl = self._sup.ctl
        assert ctl is not None
        for rep in self._sup.replicas:
            if rep.spec.stage != "gateway" and rep not in restart:
                for slot in rep.spec.slots:
                    ctl.apply_config(slot, self.version)

    def _replaced(self, rep: Replica) -> None:
        ctl = self._sup.ctl
        if ctl is not None and rep.spec.stage != "gateway":
            for slot in rep.spec.slots:
                ctl.apply_config(slot, self.version)

    def _unacknowledged(self) -> list[str]:
        ctl = self._sup.ctl
        assert ctl is not None
        return [
            r.spec.name
            for r in self._sup.replicas
            if r.process is not None
            and any(ctl.config_applied(slot) < self.version for slot in r.spec.slots)
        ]

    # Outcomes

    def _refuse(self, why: str, diff: Plan | None = None) -> None:
        log.error("reload refused: %s", why)
        self._outcome = reloads.ReloadOutcome(
            attempt=self.attempt,
            version=self.version,
            state="refused",
            at=time.time(),
            done_at=time.time(),
            config=str(self.source or DEFAULTS),
            changed=diff.changed if diff else [],
            reason=why,
        )
        self._write()

    def _finish(self, state: reloads.Outcome, why: str | None) -> None:
        assert self._outcome is not None
        self._outcome = msgspec.structs.replace(
            self._outcome,
            state=state,
            reason=why,
            done_at=time.time(),
            restarted=self.rolling.done if state == "failed" else self._outcome.restarted,
        )
        self._write()
        if state == "applied":
            log.info("reload: config version %d applied by every replica", self.version)
        else:
            log.error("reload: config version %d: %s", self.version, why)

    def _write(self) -> None:
        """Publish the current attempt, beside the few before it."""
        outcome = self._outcome
        assert outcome is not None
        if self._history and self._history[-1].attempt == outcome.attempt:
            self._history[-1] = outcome
        else:
            self._history.append(outcome)
        del self._history[: -reloads.HISTORY]
        reloads.write_outcomes(self._sup.run_dir, self._history)


def _stages(spec: topology.ReplicaSpec | topology.GroupSpec | topology.GatewaySpec) -> set[str]:
    """The stages a process runs: a placement group runs several."""
    if isinstance(spec, topology.GroupSpec):
        return {m.stage for m in spec.members}
    return {spec.stage}
