"""How a ``Pipeline`` gets a run to talk to: start a supervisor, or join one; claim a slot.

``Pipeline(config)`` runs ``mpipeline run`` as a child (``--parent-pid``: it
drains and exits when this process dies) and waits for its ``state.json``;
``Pipeline.attach`` only waits for the state of a run already there. Either
way the client then takes a free client slot with a ``flock`` on its lock
file, which the kernel frees if this process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from mpipeline import rundir
from mpipeline.config import PipelineConfig, dump_toml, load
from mpipeline.errors import ExitCode, MPipelineError
from mpipeline.rundir import RunInfo
from mpipeline.topology import ClientSpec

# How much of a failed supervisor's stderr goes into the error, in characters.
STDERR_TAIL = 4000
_POLL_S = 0.02


class Launched:
    """A supervisor this client started, and its captured stderr."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr: IO[bytes]) -> None:
        self.proc = proc
        self._stderr = stderr

    @classmethod
    def start(
        cls, config: PipelineConfig | str | os.PathLike[str] | None, run_dir: Path | None
    ) -> tuple[Launched, Path]:
        """Run ``mpipeline run`` for ``config``; returns it and the run dir it uses.

        A ``PipelineConfig`` (or None: the default config) is written into the
        run dir for the child to read.

        :raises ConfigError: when the config file is invalid
        """
        if isinstance(config, PipelineConfig):
            cfg = config
        else:
            cfg = load(Path(config) if config is not None else rundir.DEFAULT_CONFIG)
        run_dir = run_dir or rundir.resolve_run_dir(cfg)
        rundir.make(run_dir)
        if isinstance(config, PipelineConfig) or config is None:
            path = run_dir / "pipeline.toml"
            path.write_text(dump_toml(cfg))
        else:
            path = Path(config)
        stderr = tempfile.TemporaryFile()
        argv = [sys.executable, "-m", "mpipeline", "run", "--config", str(path)]
        argv += ["--run-dir", str(run_dir), "--parent-pid", str(os.getpid())]
        # Popen returns as soon as the child exists; readiness is awaited apart.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr)
        return cls(proc, stderr), run_dir

    @property
    def pid(self) -> int:
        return self.proc.pid

    def failure(self, run_dir: Path) -> MPipelineError | None:
        """The error to raise when the child has exited, or None while it runs."""
        code = self.proc.poll()
        if code is None:
            return None
        hint = ""
        if code == ExitCode.ALREADY_RUNNING:
            hint = (
                f"a pipeline is already running in {run_dir}: join it with "
                f"Pipeline.attach({str(run_dir)!r}), or give this one its own "
                "run_dir (or config name)\n"
            )
        return MPipelineError(f"the supervisor exited with code {code}:\n{hint}{self.tail()}")

    def tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-STDERR_TAIL:]

    async def stop(self) -> None:
        """SIGTERM (it drains), wait for the exit, release the stderr file."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)
        self._stderr.close()


async def wait_for_state(run_dir: Path, launched: Launched | None, timeout_s: float) -> RunInfo:
    """The state of the run in ``run_dir`` once it is up (ours, when ``launched``).

    :raises MPipelineError: when the child exited, nothing runs there, or the
        run was not up in ``timeout_s``
    """
    if launched is None:
        rundir.check(run_dir)  # its state.json is trusted below: it must be ours
    deadline = time.monotonic() + timeout_s
    while True:
        if launched is not None and (failed := launched.failure(run_dir)) is not None:
            raise failed
        try:
            info = rundir.read_state(run_dir)
        except MPipelineError:
            if launched is None:
                raise
            info = None  # a killed run's old file: ours replaces it once ready
        if info is not None and (launched is None or info.pid == launched.pid):
            return info
        if launched is None and not (run_dir / rundir.LOCK_FILE).exists():
            raise MPipelineError(f"no supervisor is running in {run_dir}")
        if time.monotonic() > deadline:
            raise MPipelineError(f"the pipeline in {run_dir} was not ready in time")
        await asyncio.sleep(_POLL_S)


def claim_slot(
    run_dir: Path, clients: list[ClientSpec], wanted: int | None
) -> tuple[ClientSpec, int]:
    """Take the first free client slot of ``clients``; the slot and its locked fd.

    :raises MPipelineError: when every slot is taken (saying which setting adds slots)
    """
    for spec in clients:
        fd = rundir.open_private(run_dir / f"client-{spec.index}.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return spec, fd
    if wanted is not None:
        raise MPipelineError(f"client slot {wanted} of {run_dir} is taken")
    raise MPipelineError(
        f"all {len(clients)} API client slots of {run_dir} are taken (raise gateway.api_clients)"
    )
