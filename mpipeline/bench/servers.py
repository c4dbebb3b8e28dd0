"""The systems ``mpipeline bench --http`` measures, as subprocesses it starts and stops.

The gateway is the whole pipeline started the way an operator would (one
command, one config file); the peer is ``bench.peer``. Both are started
with this process's affinity narrowed to the cores under test, so they and
every child inherit it, and both are stopped with SIGTERM like a service
manager would. Stopping also checks that nothing outlived the run: no
process of the tree, no ``/dev/shm`` segment of the supervisor's run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import psutil

from mpipeline import _shm, rundir
from mpipeline.bench.cpu import pin
from mpipeline.bench.layout import Layout, laid_out
from mpipeline.config import PipelineConfig
from mpipeline.control import ControlBlock
from mpipeline.errors import MPipelineError

GATEWAY = "gateway"
# The same gateway in front of the chained layout (``bench --http --layout ...,chained``).
CHAINED = "gateway, chained"
PEER = "uvicorn+starlette"
HOST = "127.0.0.1"
PATH = "/v1/prompt"
# One gateway process, free to run on every core under test: it is the
# busiest process, so more replicas would mostly add context switches on 2 cores.
GATEWAY_REPLICAS = 1
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def gateway_config(
    cores: list[int],
    port: int,
    run_dir: Path,
    *,
    token_delay_ms: float = 0.0,
    layout: Layout = "per-stage",
) -> PipelineConfig:
    """The bench pipeline on ``cores`` (``config_for_cores``) behind a gateway on ``port``.

    The gateway may run on any of the cores, like the client of ``mpipeline
    bench``: it is the busiest process, and the kernel balances it against
    the pinned stages better than a fixed core would. Metrics stay off, as in
    the HTTP numbers recorded before they existed; ``mpipeline bench --metrics
    both`` measures what they cost.
    """
    cfg = laid_out(cores, None, layout, metrics=False)
    gw = msgspec.structs.replace(
        cfg.gateway,
        host=HOST,
        port=port,
        replicas=GATEWAY_REPLICAS,
        cpus=list(cores),
        cores_per_replica=len(cores),
    )
    inference = cfg.stages.inference
    echo = msgspec.structs.replace(inference.echo, token_delay_ms=token_delay_ms)
    stages = msgspec.structs.replace(
        cfg.stages, inference=msgspec.structs.replace(inference, echo=echo)
    )
    return msgspec.structs.replace(cfg, run_dir=str(run_dir), gateway=gw, stages=stages)


def gateway_command(config: Path, run_dir: Path) -> list[str]:
    """How the pipeline with its HTTP gateway is started: the one place to change it.

    ``--parent-pid`` makes the supervisor stop if this process dies without
    stopping it (a SIGKILLed bench must not leave a pipeline behind).
    """
    cmd = [sys.executable, "-m", "mpipeline", "run", "--config", str(config)]
    return [*cmd, "--run-dir", str(run_dir), "--parent-pid", str(os.getpid())]


def peer_command(config: Path, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "mpipeline.bench.peer", "--config", str(config)]
    return [*cmd, "--host", HOST, "--port", str(port)]


class Server:
    """A system under test in a subprocess: started pinned, stopped with SIGTERM."""

    def __init__(
        self, system: str, cmd: list[str], port: int, workdir: Path, run_dir: Path | None = None
    ) -> None:
        self.system = system
        self.cmd = cmd
        self.port = port
        self.log_path = workdir / f"{system.replace('+', '-')}-{port}.log"
        # The supervisor's run directory, where its state names its processes and segments.
        self.run_dir = run_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, psutil.Process] = {}
        self.run_id: str | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"

    def start(self, cpus: list[int]) -> None:
        # Children inherit the mask; the supervisor pins each stage inside it.
        restore = pin(cpus)
        try:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
        finally:
            restore()
        self._wait_ready()
        self.processes()
        if self.run_dir is not None:
            with contextlib.suppress(OSError, MPipelineError):
                info = rundir.read_state(self.run_dir)
                if info is not None:
                    self.run_id = info.run_id

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(
                    f"{self.system} exited {code} while starting:\n{self.log_tail()}"
                )
            if _get_status(self.port, "/readyz") == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.system} not ready after {READY_TIMEOUT_S:.0f}s")
            time.sleep(0.05)

    def processes(self) -> dict[str, int]:
        """Name to pid of every process of the system, remembered for the leak check."""
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        tree = [root]
        with contextlib.suppress(psutil.Error):
            tree += root.children(recursive=True)
        names = self._replica_names()
        found = {}
        for i, p in enumerate(tree):
            self.seen[p.pid] = p
            name = names.get(p.pid) or (self.system if p is root else f"other-{i}")
            found[name] = p.pid
        return found

    def _replica_names(self) -> dict[int, str]:
        """``{pid: "rag-0", ...}`` from the supervisor's state and control block."""
        if self.run_dir is None:
            return {}
        try:
            info = rundir.read_state(self.run_dir)
            if info is None:
                return {}
            ctl = ControlBlock.attach(info.control)
        except (OSError, MPipelineError):
            return {}
        try:
            topo = info.topology
            names = {ctl.supervisor_pid: "supervisor"}
            names.update({ctl.pid(spec.slot): spec.name for spec in topo.gateways})
            names.update({ctl.pid(spec.slot): spec.name for spec in topo.replicas})
            return names
        finally:
            ctl.close()

    def stop(self) -> list[str]:
        """SIGTERM, wait, then SIGKILL what is left; what was left behind, as text."""
        if self.proc is None:
            return []
        with contextlib.suppress(psutil.Error):
            self.processes()
        problems = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.system} ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s")
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for pid, p in self.seen.items():
            while _alive(p) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(p):
                problems.append(f"{self.system}: process {pid} outlived its parent")
                with contextlib.suppress(psutil.Error):
                    p.kill()
        if self.run_id is not None:
            left = sorted(p.name for p in _shm.SHM_DIR.glob(f"{_shm.PREFIX}{self.run_id}-*"))
            if left:
                problems.append(f"{self.system}: segments left in /dev/shm: {', '.join(left)}")
        self.proc = None
        return problems

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _get_status(port: int, path: str) -> int | None:
    """Status of ``GET path``, or None when nothing answers yet."""
    try:
        with socket.create_connection((HOST, port), timeout=2.0) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64)
    except OSError:
        return None
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None
