"""Supervisor: creates every ring, spawns and pins every replica, keeps them alive.

With ``_replicas.py``, the only code that calls ``multiprocessing``,
``os.kill`` or reaps children; ``_segments.py`` makes and removes the shared
memory. It blocks on process sentinels plus a signal pipe (no
sleep-polling), restarts a crashed replica one-for-one with exponential
backoff, gives up loudly (FATAL) after too many restarts in a window, halts
when a replica fails to boot (gunicorn's exit 3), kills a replica whose
heartbeat stalls while its input is waiting, and on SIGTERM/SIGINT stops
intake, drains, stops the stages in flow order and removes every segment it
made. A second signal skips the drain. A flock on the run directory keeps a
second supervisor out.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpipeline import _shm, rundir, topology
from mpipeline.config import PipelineConfig, dump_toml
from mpipeline.control import ControlBlock, ReplicaState, RunState
from mpipeline.errors import ExitCode
from mpipeline.supervisor._publish import run_info, serve_metrics, url_of
from mpipeline.supervisor._reload import Reloader
from mpipeline.supervisor._replicas import HANDLED_SIGNALS, Replica, describe_exit, hung, kill
from mpipeline.supervisor._segments import RunSegments

if TYPE_CHECKING:
    from mpipeline.metrics.collect import RunCollector
    from mpipeline.metrics.server import MetricsServer

log = logging.getLogger("mpipeline.supervisor")

# How long a stopping replica gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 5.0


class Supervisor:
    def __init__(
        self, cfg: PipelineConfig, config_path: Path | None, run_dir: Path | None = None
    ) -> None:
        """``config_path`` is the file ``cfg`` was read from, unchanged; None writes
        ``cfg`` into the run dir for the replicas (defaults, command-line overrides)."""
        self.cfg = cfg
        self.run_dir = run_dir or rundir.resolve_run_dir(cfg)
        self._own_config = config_path is None
        where = config_path or self.run_dir / rundir.EFFECTIVE_CONFIG
        self.config_path = where.resolve()
        self.sup = cfg.supervisor
        self.run_id = secrets.token_hex(4)
        self.topo = topology.build(cfg, self.run_id)
        self.ctx = multiprocessing.get_context("spawn")
        # One per process: a placement group is one process over several slots.
        specs: list[topology.ReplicaSpec | topology.GroupSpec | topology.GatewaySpec] = [
            *self.topo.processes,
            *self.topo.gateways,
        ]
        self.replicas = [Replica(spec) for spec in specs]
        # Bound here and handed to every gateway replica (no SO_REUSEPORT): a
        # restarted gateway serves the same socket, so the port never closes.
        self.listener: socket.socket | None = None
        self.segments: RunSegments | None = None
        self.ctl: ControlBlock | None = None
        self.metrics_server: MetricsServer | None = None
        self._collector: RunCollector | None = None
        # What /metrics reads, set once the state is published (the server thread reads it).
        self._published: rundir.Run | None = None
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = rundir.RunLock(self.run_dir)
        # What gateways get at spawn and state.json says once the run is up.
        self.info: rundir.RunInfo | None = None
        self._stopping = False
        self._force = False
        self._exit_code = ExitCode.OK
        self.log_level = logging.getLogger().getEffectiveLevel()
        # SIGHUP / `mpipeline reload` (main() sets the source file when there are overrides).
        self.reloader = Reloader(self, config_path)

    # Entry point

    def run(self) -> int:
        self._lock.acquire()
        try:
            self.reloader.forget()
            if self._own_config:  # only now: a running supervisor's file is never replaced
                rundir.write_config(self.run_dir, dump_toml(self.cfg))
            if self.topo.gateways:
                from mpipeline.gateway.server import bind

                # Before any segment or process: a busy port leaves nothing behind.
                self.listener = bind(self.cfg.gateway.host, self.cfg.gateway.port)
            if self.cfg.metrics.enabled:
                self._serve_metrics()
            removed = _shm.sweep_stale()
            if removed:
                log.info("removed %d stale segments", len(removed))
            self.segments = RunSegments.create(self.cfg, self.topo)
            self.ctl = self.segments.ctl
            self.info = self._run_info()
            self._install_signals()
            try:
                if not self._boot():
                    return int(self._exit_code)
                assert self.ctl is not None
                # RUNNING before the state file appears: a client that finds the
                # file may submit at once, and is refused while STARTING.
                self.ctl.state = RunState.RUNNING
                self._write_state()
                log.info(
                    "pipeline ready: %d replicas, run %s, %s",
                    len(self.replicas),
                    self.run_id,
                    ", ".join(f"{r.spec.name}@{list(r.spec.cpus)}" for r in self.replicas),
                )
                if self.listener is not None:
                    log.info("gateway listening on %s", url_of(self.listener))
                self._serve()
                if not self._force and self._exit_code == ExitCode.OK:
                    self._drain()
            finally:
                self._stop_all()
        finally:
            self._cleanup()
        return int(self._exit_code)

    # Setup

    def _serve_metrics(self) -> None:
        """Bind /metrics before any segment exists, like the gateway: a busy port
        leaves nothing behind. It answers with no samples until the run is published."""
        self.metrics_server, self._collector = serve_metrics(
            self.cfg, self.run_dir, lambda: self._published
        )

    def _run_info(self) -> rundir.RunInfo:
        """The run as gateways and state.json describe it (segments exist; URLs are bound)."""
        assert self.segments is not None
        metrics_url = self.metrics_server.url if self.metrics_server else None
        return run_info(self, self.segments, url_of(self.listener), metrics_url)

    def _write_state(self) -> None:
        assert self.info is not None and self.ctl is not None
        rundir.write_state(self.info)
        self._published = rundir.Run(self.run_dir, self.info, self.ctl)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only record: the main loop reacts (gunicorn's rule for handlers).
        self._signals.put_nowait(signum)

    # Processes

    def _spawn(self, rep: Replica) -> None:
        assert self.ctl is not None
        spec = rep.spec
        for slot in spec.slots:
            self.ctl.spawning(slot)
        common = (str(self.config_path), self.ctl.name, os.getpid(), self.log_level)
        if isinstance(spec, topology.GatewaySpec):
            from mpipeline.gateway import replica as gateway_replica

            assert self.listener is not None
            # spawn pickles the socket as a duplicated fd passed to the child.
            proc = rep.start(
                self.ctx, gateway_replica.main, (spec, *common, self.listener, self.info)
            )
        else:
            from mpipeline import replica

            proc = rep.start(self.ctx, replica.main, (spec, *common))
        for slot in spec.slots:
            self.ctl.spawned(slot, proc.pid or 0)

    def _boot(self) -> bool:
        assert self.ctl is not None
        for rep in self.replicas:
            self._spawn(rep)
        deadline = time.monotonic() + self.sup.boot_timeout_s
        while True:
            for rep in self.replicas:
                if not rep.ready and all(
                    self.ctl.replica_state(slot) == ReplicaState.READY for slot in rep.spec.slots
                ):
                    rep.ready = True
            if all(rep.ready for rep in self.replicas):
                return True
            for rep in self.replicas:
                assert rep.process is not None
                if rep.process.exitcode is not None:
                    log.error(
                        "replica %s failed to boot (%s); stopping",
                        rep.spec.name,
                        describe_exit(rep.process.exitcode),
                    )
                    self._exit_code = ExitCode.BOOT_ERROR
                    return False
            if not self._signals.empty():
                log.info("signal during boot; stopping")
                self._force = True
                return False
            if time.monotonic() > deadline:
                waiting = [r.spec.name for r in self.replicas if not r.ready]
                log.error("replicas %s not ready within %.0fs", waiting, self.sup.boot_timeout_s)
                self._exit_code = ExitCode.BOOT_ERROR
                return False
            self._wait(0.01)

    def _wait(self, timeout: float) -> list[Any]:
        objs: list[Any] = [self._wake_r]
        objs += [r.process.sentinel for r in self.replicas if r.process is not None]
        ready = multiprocessing.connection.wait(objs, timeout)
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
        return ready

    def _serve(self) -> None:
        interval = min(self.sup.heartbeat_interval_s, 0.5)
        while not self._stopping:
            timeout = interval
            pending = [r.restart_at for r in self.replicas if r.restart_at is not None]
            if pending:
                timeout = max(0.0, min(timeout, min(pending) - time.monotonic()))
            self._wait(self.reloader.timeout(timeout))
            self._handle_signals()
            if self._stopping:
                return
            self.reloader.step()  # before the reaper: a replica it replaces is its own
            self._reap()
            if self._exit_code != ExitCode.OK:
                return
            self._restart_due()
            self._check_liveness()

    def _handle_signals(self) -> None:
        while not self._signals.empty():
            sig = self._signals.get_nowait()
            getattr(self, f"handle_{signal.Signals(sig).name.lower()}")()

    def handle_sigint(self) -> None:
        self.handle_sigterm()

    def handle_sigterm(self) -> None:
        if self._stopping:
            log.warning("second signal: stopping now")
            self._force = True
        else:
            log.info("stopping: draining in-flight work (signal again to stop at once)")
        self._stopping = True

    def handle_sighup(self) -> None:
        self.reloader.handle()

    def _reap(self) -> None:
        assert self.ctl is not None
        now = time.monotonic()
        for rep in self.replicas:
            if self.reloader.owns(rep):
                continue
            code = rep.reap()
            if code is None:
                continue
            # Tells clients too: the requests this replica held will not come back.
            for slot in rep.spec.slots:
                self.ctl.exited(slot, code)
            if code == ExitCode.BOOT_ERROR:
                log.error("replica %s failed to boot on restart; stopping", rep.spec.name)
                self._exit_code = ExitCode.BOOT_ERROR
                return
            delay = rep.died(now, self.sup)
            for slot in rep.spec.slots:
                self.ctl.restarted(slot)
            if delay is None:
                log.error(
                    "replica %s died %d times within %.0fs (last: %s): FATAL",
                    rep.spec.name,
                    len(rep.deaths),
                    self.sup.restart_period_s,
                    describe_exit(code),
                )
                self.ctl.state = RunState.FATAL
                self._exit_code = ExitCode.FATAL
                return
            why = "killed for missing heartbeats" if rep.killed else describe_exit(code)
            log.warning("replica %s died (%s); restarting in %.2fs", rep.spec.name, why, delay)
            rep.restart_at = now + delay

    def _restart_due(self) -> None:
        now = time.monotonic()
        for rep in self.replicas:
            if rep.restart_at is not None and now >= rep.restart_at:
                if self._stopping and isinstance(rep.spec, topology.GatewaySpec):
                    rep.restart_at = None  # the listener is closed: intake has stopped
                    continue
                self._spawn(rep)

    def _check_liveness(self) -> None:
        assert self.ctl is not None and self.segments is not None
        now = time.monotonic_ns()
        for rep in self.replicas:
            why = hung(rep, self.ctl, self.segments.rings, self.sup, now)
            if why is not None and rep.process is not None:
                log.error("replica %s %s; killing it", rep.spec.name, why)
                rep.killed = True
                kill(rep.process)

    # Shutdown

    def _drain(self) -> None:
        """Stop intake, then wait for every ring to empty and every replica to go idle."""
        assert self.ctl is not None
        self.ctl.state = RunState.DRAINING
        # Stop intake at the socket: the gateways close their copies when they
        # see DRAINING, so new connections are refused instead of queueing.
        self._close_listener()
        deadline = time.monotonic() + self.sup.drain_timeout_s
        quiet = 0
        while time.monotonic() < deadline:
            self._wait(0.05)
            self._handle_signals()
            if self._force:
                return
            self._reap()
            self._restart_due()
            # A ring whose consumer is gone (a client that exited with replies
            # unread) will never drain: it must not hold the shutdown up.
            assert self.segments is not None
            rings = self.segments.rings.values()
            busy = any(r.stats().used_bytes and r.consumer_alive() for r in rings) or any(
                self.ctl.in_flight(slot) for r in self.replicas for slot in r.spec.slots
            )
            quiet = 0 if busy else quiet + 1
            if quiet >= 3:
                log.info("drained")
                return
        log.warning("drain timed out after %.0fs; stopping anyway", self.sup.drain_timeout_s)

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def _stop_all(self) -> None:
        """Stop replicas in flow order: each stage finishes before its consumer stops."""
        self._close_listener()
        for stage in ("gateway", *(name for name, _ in self.topo.stages)):
            procs = [r.process for r in self.replicas if r.spec.stage == stage and r.process]
            for proc in procs:
                kill(proc, signal.SIGKILL if self._force else signal.SIGTERM)
            deadline = time.monotonic() + (1.0 if self._force else STOP_GRACE_S)
            for proc in procs:
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.exitcode is None:
                    log.warning("%s did not stop in time; killing it", proc.name)
                    kill(proc)
                    proc.join(1.0)
        for rep in self.replicas:
            if rep.process is not None:
                rep.process.join(0)
                rep.process.close()
                rep.process = None
        if self.ctl is not None and self.ctl.state != RunState.FATAL:
            self.ctl.state = RunState.STOPPED

    def _cleanup(self) -> None:
        self._close_listener()
        self._published = None
        if self._collector is not None:
            self._collector.close()  # before the segments it reads go away
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        rundir.remove_state(self.run_dir)
        if self.segments is not None:
            self.segments.remove()
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._lock.release()
