"""Supervisor: creates every ring, spawns and pins every replica, keeps them alive.

The only code that calls ``multiprocessing``, ``os.kill`` or reaps children.
It blocks on process sentinels plus a signal pipe (no sleep-polling), restarts
a crashed replica one-for-one with exponential backoff, gives up loudly
(FATAL) after too many restarts in a window, halts when a replica fails to
boot (gunicorn's exit 3), kills a replica whose heartbeat stalls while its
input is waiting, and on SIGTERM/SIGINT stops intake, drains, stops the
stages in flow order and removes every segment it made. A second signal
skips the drain. A flock on the run directory keeps a second supervisor out.
"""

from __future__ import annotations

import collections
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
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpipeline import _shm, rundir, topology
from mpipeline.config import PipelineConfig
from mpipeline.control import (
    ControlBlock,
    ReplicaState,
    RunState,
)
from mpipeline.errors import AlreadyRunning, ExitCode, MPipelineError
from mpipeline.ring import Ring

if TYPE_CHECKING:
    from mpipeline.gateway.ratelimit import RateLimiter
    from mpipeline.metrics import MetricsBlock
    from mpipeline.metrics.collect import RunCollector
    from mpipeline.metrics.server import MetricsServer
    from mpipeline.resilience import BreakerBoard

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (
    signal.SIGINT,  # Ctrl-C: drain, then exit 0
    signal.SIGTERM,  # service manager stop: the same
)
# How long a stopping replica gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 5.0


@dataclass
class _Replica:
    spec: topology.ReplicaSpec | topology.GatewaySpec
    process: BaseProcess | None = None
    restarts: collections.deque[float] = field(default_factory=collections.deque)
    restart_at: float | None = None
    ready: bool = False
    # SIGKILL sent for a missed heartbeat: its sentinel fires before it can be
    # reaped, so the loop comes round again and must not kill (and log) twice.
    killed: bool = False


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (killed: out of memory, or by hand?)" if code == -signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    with contextlib.suppress(ValueError):
        return f"exit {code} ({ExitCode(code).name})"
    return f"exit {code}"


class Supervisor:
    def __init__(self, cfg: PipelineConfig, config_path: Path, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path.resolve()
        self.run_dir = run_dir or rundir.resolve_run_dir(cfg)
        self.sup = cfg.supervisor
        self.run_id = secrets.token_hex(4)
        self.topo = topology.build(cfg, self.run_id)
        self.ctx = multiprocessing.get_context("spawn")
        specs: list[topology.ReplicaSpec | topology.GatewaySpec] = [
            *self.topo.replicas,
            *self.topo.gateways,
        ]
        self.replicas = [_Replica(spec) for spec in specs]
        self.rings: list[Ring] = []
        # Bound here and handed to every gateway replica (no SO_REUSEPORT): a
        # restarted gateway serves the same socket, so the port never closes.
        self.listener: socket.socket | None = None
        # Token buckets every gateway shares, so a limit holds across replicas.
        self.limiter: RateLimiter | None = None
        self.breakers: BreakerBoard | None = None
        self.ctl: ControlBlock | None = None
        self.metrics: MetricsBlock | None = None
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

    # Entry point

    def run(self) -> int:
        self._lock.acquire()
        try:
            if self.topo.gateways:
                from mpipeline.gateway.server import bind

                # Before any segment or process: a busy port leaves nothing behind.
                self.listener = bind(self.cfg.gateway.host, self.cfg.gateway.port)
            if self.cfg.metrics.enabled:
                self._serve_metrics()
            removed = _shm.sweep_stale()
            if removed:
                log.info("removed %d stale segments", len(removed))
            self._create_segments()
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
                    log.info("gateway listening on %s", self.gateway_url)
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
        from mpipeline.metrics.collect import Reader, RunCollector
        from mpipeline.metrics.server import MetricsServer

        collector = RunCollector(Reader(), lambda: self._published)
        server = MetricsServer(self.cfg.metrics.host, self.cfg.metrics.port, collector)
        self._collector = collector
        try:
            server.start()
        except OSError as exc:
            raise MPipelineError(
                f"cannot serve metrics on {self.cfg.metrics.host}:{self.cfg.metrics.port}: "
                f"{exc.strerror or exc} (set metrics.port, or metrics.enabled = false)"
            ) from None
        self.metrics_server = server

    def _create_segments(self) -> None:
        from mpipeline.metrics import MetricsBlock, segment_name

        self.ctl = ControlBlock.create(
            f"mpl-{self.run_id}-control", len(self.replicas), len(self.topo.clients)
        )
        if self.cfg.metrics.enabled:
            # Every replica counts in its own region, indexed by its control slot.
            name = segment_name(f"mpl-{self.run_id}")
            self.metrics = MetricsBlock.create(name, len(self.replicas))
        if self.topo.gateways and self.cfg.gateway.rate_limit.enabled:
            from mpipeline.gateway.ratelimit import RateLimiter

            self.limiter = RateLimiter.create(
                f"mpl-{self.run_id}-ratelimit", self.cfg.gateway.rate_limit
            )
        inference = self.cfg.stages.inference
        if inference.remote:
            # One circuit per upstream for every shard: one shard's failures
            # make them all fail fast.
            from mpipeline.resilience import BreakerBoard

            self.breakers = BreakerBoard.create(f"mpl-{self.run_id}-breakers", inference.breaker)
        for edge in self.topo.edges:
            self.rings.append(Ring.create(edge.capacity, edge.name))

    @property
    def gateway_url(self) -> str | None:
        if self.listener is None:
            return None
        host, port = self.listener.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def _run_info(self) -> rundir.RunInfo:
        """The run as gateways and state.json describe it (segments exist; URLs are bound)."""
        from mpipeline.workers import upstream_names

        assert self.ctl is not None
        breakers = self.breakers
        return rundir.RunInfo(
            pid=os.getpid(),
            run_id=self.run_id,
            run_dir=str(self.run_dir),
            config=str(self.config_path),
            control=self.ctl.name,
            ratelimit=self.limiter.name if self.limiter else None,
            breakers=breakers.name if breakers else None,
            breaker_config=self.cfg.stages.inference.breaker,
            metrics=self.metrics.name if self.metrics else None,
            gateway_url=self.gateway_url,
            metrics_url=self.metrics_server.url if self.metrics_server else None,
            upstreams=upstream_names(self.cfg.stages.inference),
            topology=self.topo,
        )

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

    def _spawn(self, rep: _Replica) -> None:
        assert self.ctl is not None
        spec = rep.spec
        self.ctl.spawning(spec.slot)
        common = (str(self.config_path), self.ctl.name, os.getpid(), self.log_level)
        if isinstance(spec, topology.GatewaySpec):
            from mpipeline.gateway import replica as gateway_replica

            assert self.listener is not None
            # spawn pickles the socket as a duplicated fd passed to the child.
            target: Any = gateway_replica.main
            args: tuple[Any, ...] = (spec, *common, self.listener, self.info)
        else:
            from mpipeline import replica

            target, args = replica.main, (spec, *common)
        proc = self.ctx.Process(target=target, args=args, name=f"mpipeline-{spec.name}")
        # Children inherit the mask: a Ctrl-C during their start stays pending
        # until they have set SIGINT to ignored, instead of a traceback.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(HANDLED_SIGNALS))
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.ctl.spawned(spec.slot, proc.pid or 0)
        rep.process = proc
        rep.ready = False
        rep.restart_at = None
        rep.killed = False

    def _boot(self) -> bool:
        assert self.ctl is not None
        for rep in self.replicas:
            self._spawn(rep)
        deadline = time.monotonic() + self.sup.boot_timeout_s
        while True:
            for rep in self.replicas:
                if not rep.ready and self.ctl.replica_state(rep.spec.slot) == ReplicaState.READY:
                    rep.ready = True
            if all(rep.ready for rep in self.replicas):
                return True
            for rep in self.replicas:
                assert rep.process is not None
                if rep.process.exitcode is not None:
                    log.error(
                        "replica %s failed to boot (%s); stopping",
                        rep.spec.name,
                        _describe_exit(rep.process.exitcode),
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
            self._wait(timeout)
            self._handle_signals()
            if self._stopping:
                return
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

    def _reap(self) -> None:
        assert self.ctl is not None
        now = time.monotonic()
        for rep in self.replicas:
            proc = rep.process
            if proc is None or proc.exitcode is None:
                continue
            code = proc.exitcode
            proc.join(0)
            proc.close()
            rep.process = None
            slot = rep.spec.slot
            # Tells clients too: the requests this replica held will not come back.
            self.ctl.exited(slot, code)
            if code == ExitCode.BOOT_ERROR:
                log.error("replica %s failed to boot on restart; stopping", rep.spec.name)
                self._exit_code = ExitCode.BOOT_ERROR
                return
            window = self.sup.restart_period_s
            while rep.restarts and now - rep.restarts[0] > window:
                rep.restarts.popleft()
            rep.restarts.append(now)
            self.ctl.restarted(slot)
            if len(rep.restarts) > self.sup.restart_intensity:
                log.error(
                    "replica %s died %d times within %.0fs (last: %s): FATAL",
                    rep.spec.name,
                    len(rep.restarts),
                    window,
                    _describe_exit(code),
                )
                self.ctl.state = RunState.FATAL
                self._exit_code = ExitCode.FATAL
                return
            delay = min(
                self.sup.backoff_initial_s * 2 ** (len(rep.restarts) - 1), self.sup.backoff_max_s
            )
            why = "killed for missing heartbeats" if rep.killed else _describe_exit(code)
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
        assert self.ctl is not None
        limit_ns = int(self.sup.liveness_timeout_s * 1e9)
        now = time.monotonic_ns()
        for rep in self.replicas:
            proc = rep.process
            if proc is None or rep.killed or proc.exitcode is not None:
                continue
            slot = rep.spec.slot
            state = self.ctl.replica_state(slot)
            if state == ReplicaState.READY:
                rep.ready = True
            age = now - self.ctl.heartbeat_ns(slot)
            if age <= limit_ns:
                continue
            if state == ReplicaState.BOOTING:
                if age > int(self.sup.boot_timeout_s * 1e9):
                    log.error("replica %s stuck booting; killing it", rep.spec.name)
                    rep.killed = True
                    self._kill(proc)
                continue
            busy = self.ctl.in_flight(slot) > 0 or any(
                self._ring(name).stats().used_bytes > 0 for name in rep.spec.inputs
            )
            if busy:
                log.error(
                    "replica %s is hung (no heartbeat for %.1fs with work waiting); killing it",
                    rep.spec.name,
                    age / 1e9,
                )
                rep.killed = True
                self._kill(proc)

    def _ring(self, name: str) -> Ring:
        for ring in self.rings:
            if ring.name == name:
                return ring
        raise KeyError(name)

    @staticmethod
    def _kill(proc: BaseProcess) -> None:
        with contextlib.suppress(ProcessLookupError):
            if proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)

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
            busy = any(r.stats().used_bytes and r.consumer_alive() for r in self.rings) or any(
                self.ctl.in_flight(r.spec.slot) for r in self.replicas
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
                with contextlib.suppress(ProcessLookupError):
                    if proc.pid is not None and proc.exitcode is None:
                        os.kill(proc.pid, signal.SIGKILL if self._force else signal.SIGTERM)
            deadline = time.monotonic() + (1.0 if self._force else STOP_GRACE_S)
            for proc in procs:
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.exitcode is None:
                    log.warning("%s did not stop in time; killing it", proc.name)
                    self._kill(proc)
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
        for ring in self.rings:
            ring.close()
            ring.unlink()
        self.rings.clear()
        if self.limiter is not None:
            self.limiter.close()
            self.limiter.unlink()
            self.limiter = None
        if self.breakers is not None:
            self.breakers.close()
            self.breakers.unlink()
            self.breakers = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics.unlink()
            self.metrics = None
        if self.ctl is not None:
            # Give attached clients a moment to read the final state.
            time.sleep(0.05)
            self.ctl.close()
            self.ctl.unlink()
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._lock.release()


def main(
    config_path: Path,
    run_dir: Path | None = None,
    parent_pid: int | None = None,
    log_level: int = logging.INFO,
) -> int:
    """``mpipeline run``: validate, then supervise in the foreground until stopped."""
    from mpipeline import config as config_mod
    from mpipeline import logs
    from mpipeline.errors import ConfigError

    logs.setup(log_level, os.environ.get(logs.FORMAT_ENV, "auto"), stage="supervisor", replica=None)
    try:
        cfg = config_mod.load(config_path)
    except ConfigError as exc:
        log.error("invalid configuration:\n%s", exc)
        return int(ExitCode.USAGE)
    if cfg.gateway.replicas and cfg.gateway.auth_token_env:
        from mpipeline.gateway.auth import BearerAuth

        try:
            BearerAuth.from_env(cfg.gateway.auth_token_env)  # refuse before anything starts
        except ConfigError as exc:
            log.error("%s", exc)
            return int(ExitCode.USAGE)
    for warning in config_mod.warnings(cfg):
        log.warning("%s", warning)
    if parent_pid is not None:
        # Run on behalf of a Pipeline object: drain and exit when its process dies.
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:
            return int(ExitCode.FAILURE)
    try:
        sup = Supervisor(cfg, config_path, run_dir)
        return sup.run()
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return int(ExitCode.ALREADY_RUNNING)
    except MPipelineError as exc:
        log.error("%s", exc)
        return int(ExitCode.FAILURE)
