"""Fixtures for tests that run a real supervisor: small configs, and supervisors
that are always stopped, however the test ends.

A supervisor runs as ``python -m mpipeline run`` in its own session (so a test
can signal its whole process group the way a terminal would) with its output
in a log file the test can read. Every wait polls against a deadline; none
sleeps a fixed time and hopes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from mpipeline import _shm, topology
from mpipeline.config import STAGE_ORDER, PipelineConfig, chained, dump_toml, load
from mpipeline.control import R_PID, R_STATE, ControlBlock, ReplicaState, RunState
from mpipeline.rundir import LOCK_FILE, STATE_FILE

# The suite's second layout (scripts/test.sh): the reliability tests again, chained.
LAYOUT_ENV = "MPIPELINE_TEST_LAYOUT"
LAYOUTS = ("per-stage", "chained")
# Generous for a loaded 2-core CI box; a boot normally takes about a second.
BOOT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.02
# Small rings boot fast and fill quickly; still far above any test's records.
SMALL_RING = 64 * 1024

# What every test config starts from: fast beats and restarts, small rings, one
# replica per stage, metrics on (so every test exercises them) on a free port.
BASE_OVERRIDES: dict[str, object] = {
    "metrics.enabled": True,
    "metrics.port": 0,
    # No HTTP gateway process unless a test asks for one (then on port 0).
    "gateway.replicas": 0,
    "gateway.port": 0,
    "gateway.ring_capacity": SMALL_RING,
    "supervisor.heartbeat_interval_s": 0.1,
    # Loose: a loaded CI box must not get a healthy replica killed as hung.
    "supervisor.liveness_timeout_s": 10.0,
    "supervisor.backoff_initial_s": 0.05,
    "supervisor.backoff_max_s": 0.5,
    "supervisor.drain_timeout_s": 10.0,
    "supervisor.boot_timeout_s": BOOT_TIMEOUT_S,
    "stages.inference.replicas": 1,
    **{f"stages.{stage}.ring_capacity": SMALL_RING for stage in STAGE_ORDER},
}


def faults_env(spec: str) -> dict[str, str]:
    """Environment that turns on fault injection (faults.py), e.g. ``"post:boot_error"``."""
    return {"MPIPELINE_TESTING": "1", "MPIPELINE_FAULTS": spec}


def with_field(obj: Any, dotted: str, value: object) -> Any:
    """A copy of the Struct ``obj`` with the field at ``dotted`` ("a.b.c") replaced."""
    head, _, rest = dotted.partition(".")
    if not hasattr(obj, head):
        raise AttributeError(f"{type(obj).__name__} has no field {head!r}")
    new = with_field(getattr(obj, head), rest, value) if rest else value
    return msgspec.structs.replace(obj, **{head: new})


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, poll: float = POLL_S
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(poll)


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie runs no code; only its parent can reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def lock_is_free(run_dir: Path) -> bool:
    path = run_dir / LOCK_FILE
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def run_segments(run_id: str) -> list[str]:
    """Segments and doorbells of one run still in /dev/shm."""
    return sorted(p.name for p in _shm.SHM_DIR.glob(f"{_shm.PREFIX}{run_id}-*"))


class ConfigFactory:
    """Builds small test configs; ``write`` puts one in a TOML file for the CLI."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.run_dir = tmp_path / "run"
        self._files = 0

    def __call__(self, overrides: Mapping[str, object] | None = None) -> PipelineConfig:
        cfg = PipelineConfig(run_dir=str(self.run_dir))
        for key, value in {**BASE_OVERRIDES, **(overrides or {})}.items():
            cfg = with_field(cfg, key, value)
        return self.laid_out(cfg)

    @staticmethod
    def laid_out(cfg: PipelineConfig) -> PipelineConfig:
        """``cfg`` in the layout under test: ``MPIPELINE_TEST_LAYOUT=chained`` runs
        every run of stages with equal replicas as one placement group."""
        layout = os.environ.get(LAYOUT_ENV, "per-stage")
        assert layout in LAYOUTS, f"{LAYOUT_ENV}={layout!r}: one of {LAYOUTS}"
        return chained(cfg) if layout == "chained" else cfg

    def write(self, cfg: PipelineConfig | Mapping[str, object] | None = None) -> Path:
        cfg = self(cfg) if not isinstance(cfg, PipelineConfig) else self.laid_out(cfg)
        self._files += 1
        path = self.tmp_path / f"pipeline-{self._files}.toml"
        path.write_text(dump_toml(cfg), encoding="utf-8")
        return path


class SupervisorProcess:
    """One ``mpipeline run`` subprocess and what a test needs to poke at it."""

    def __init__(
        self,
        config_path: Path,
        run_dir: Path,
        log_path: Path,
        env: Mapping[str, str],
        args: Sequence[str] = (),
    ) -> None:
        self.config_path = config_path
        self.run_dir = run_dir
        self.log_path = log_path
        cmd = [sys.executable, "-m", "mpipeline", "run", "--config", str(config_path)]
        cmd += ["--run-dir", str(run_dir), *args]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **env},
                start_new_session=True,
            )
        self.pid = self.proc.pid
        self._state: dict[str, Any] | None = None

    # Observing

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"supervisor {self.pid} still running after {timeout:.1f}s; log:\n{self.log()}"
            ) from None

    def wait_log(self, text: str, timeout: float) -> None:
        def seen() -> bool:
            if text in self.log():
                return True
            assert self.running(), f"supervisor exited before logging {text!r}:\n{self.log()}"
            return False

        wait_until(seen, timeout, f"{text!r} in the supervisor log")

    def wait_ready(self, timeout: float = BOOT_TIMEOUT_S) -> dict[str, Any]:
        """Wait until the run's state file is ours and the control block says RUNNING."""

        def ready() -> dict[str, Any] | None:
            assert self.running(), (
                f"supervisor exited with {self.proc.returncode} while booting:\n{self.log()}"
            )
            try:
                state: dict[str, Any] = json.loads((self.run_dir / STATE_FILE).read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return None
            if state.get("pid") != self.pid:
                return None
            ctl = ControlBlock.attach(state["control"])
            try:
                return state if ctl.state == RunState.RUNNING else None
            finally:
                ctl.close()

        self._state = wait_until(ready, timeout, f"supervisor {self.pid} to be ready")
        return self._state

    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            return self.wait_ready()
        return self._state

    @property
    def run_id(self) -> str:
        return str(self.state["run_id"])

    @contextlib.contextmanager
    def control(self) -> Iterator[ControlBlock]:
        ctl = ControlBlock.attach(self.state["control"])
        try:
            yield ctl
        finally:
            ctl.close()

    def slot(self, replica: str) -> int:
        for rep in self.state["topology"]["replicas"]:
            if f"{rep['stage']}-{rep['index']}" == replica:
                return int(rep["slot"])
        for gw in self.state["topology"].get("gateways", ()):
            if f"gateway-{gw['index']}" == replica:
                return int(gw["slot"])
        raise KeyError(replica)

    @property
    def url(self) -> str:
        """The gateway's base URL (the supervisor bound it; port 0 means any)."""
        url = self.state.get("gateway_url")
        assert url, "this run has no gateway (gateway.replicas = 0)"
        return str(url)

    def replica_pid(self, replica: str) -> int:
        with self.control() as ctl:
            return ctl.get(self.slot(replica), R_PID)

    def process_of(self, replica: str) -> str:
        """The process that runs ``replica``: its group's ("rag_assemble-0"), or itself."""
        return self._group_of(replica)[0]

    def comembers(self, replica: str) -> list[str]:
        """The replicas that share ``replica``'s process (itself alone when in no group)."""
        return self._group_of(replica)[1]

    def _group_of(self, replica: str) -> tuple[str, list[str]]:
        # From the config, not the state file: a run that failed to boot has none.
        for group in topology.build(load(self.config_path), "test").groups:
            names = [m.name for m in group.members]
            if replica in names:
                return group.name, names
        return replica, [replica]

    def process_names(self) -> list[str]:
        """One name per stage process: a placement group counts once."""
        return list(dict.fromkeys(self.process_of(name) for name in self.replica_names()))

    def replica_names(self) -> list[str]:
        return [f"{r['stage']}-{r['index']}" for r in self.state["topology"]["replicas"]]

    def wait_replaced(self, replica: str, old_pid: int, timeout: float = BOOT_TIMEOUT_S) -> int:
        """Wait for a new process in ``replica``'s slot to report ready; return its pid."""
        slot = self.slot(replica)

        def replaced() -> int:
            assert self.running(), f"supervisor exited:\n{self.log()}"
            with self.control() as ctl:
                pid = ctl.get(slot, R_PID)
                ok = pid not in (0, old_pid) and ctl.get(slot, R_STATE) == ReplicaState.READY
            return pid if ok else 0

        pid: int = wait_until(replaced, timeout, f"{replica} to be restarted")
        return pid

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    @contextlib.contextmanager
    def explain(self) -> Iterator[None]:
        """Append the supervisor's log to any assertion that fails inside."""
        try:
            yield
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- supervisor log ---\n{self.log()[-6000:]}") from exc

    # Acting

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.pid, sig)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the group; sweep what a killed run leaves behind."""
        kids = self.descendants()
        killed = False
        if self.running():
            self.send(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                killed = True
        else:
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            # The whole session: replicas that outlived their supervisor too.
            os.killpg(self.pid, signal.SIGKILL)
        if killed:
            self.proc.wait(STOP_TIMEOUT_S)
        psutil.wait_procs(kids, timeout=5)
        if killed:
            _shm.sweep_stale()


class SupervisorFactory:
    """Starts supervisors for a test and stops every one of them afterwards."""

    def __init__(self, configs: ConfigFactory) -> None:
        self.configs = configs
        self.started: list[SupervisorProcess] = []

    def __call__(
        self,
        cfg: PipelineConfig | Mapping[str, object] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        run_dir: Path | None = None,
        config_path: Path | None = None,
        wait: bool = True,
        args: Sequence[str] = (),
    ) -> SupervisorProcess:
        """Start ``mpipeline run`` on ``cfg``; ``args`` are extra command-line options."""
        path = config_path or self.configs.write(cfg)
        n = len(self.started) + 1
        sp = SupervisorProcess(
            path,
            run_dir or self.configs.run_dir,
            self.configs.tmp_path / f"supervisor-{n}.log",
            {"PYTHONFAULTHANDLER": "1", **(env or {})},
            args,
        )
        self.started.append(sp)
        if wait:
            sp.wait_ready()
        return sp

    def stop_all(self) -> None:
        for sp in reversed(self.started):
            sp.stop()


@pytest.fixture
def configs(tmp_path: Path) -> ConfigFactory:
    """Factory of small test configs whose run_dir is a fresh temporary folder."""
    return ConfigFactory(tmp_path)


@pytest.fixture
def start_supervisor(configs: ConfigFactory) -> Iterator[SupervisorFactory]:
    """Factory of ``mpipeline run`` subprocesses, each in its own process group."""
    factory = SupervisorFactory(configs)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def running_supervisor(start_supervisor: SupervisorFactory) -> SupervisorProcess:
    """A ready supervisor with the base test config (one replica per stage)."""
    return start_supervisor()
