"""One supervised process slot: its spec, its process, and the restart policy's memory.

A replica slot outlives its processes: when one dies the supervisor reaps it,
counts the death against the restart intensity (more than
``restart_intensity`` deaths within ``restart_period_s`` is FATAL, as in OTP
and supervisord) and starts the next after an exponential backoff. This is
the only module that starts processes (``spawn`` only: the supervisor has
threads, and uvloop does not survive a fork) or sends them signals.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any

from mpipeline import topology
from mpipeline.config import SupervisorConfig
from mpipeline.control import ControlBlock, ReplicaState
from mpipeline.errors import ExitCode
from mpipeline.ring import Ring

HANDLED_SIGNALS = (
    signal.SIGINT,  # Ctrl-C: drain, then exit 0
    signal.SIGTERM,  # service manager stop: the same
    signal.SIGHUP,  # `mpipeline reload`: re-read the config file and apply it live
)


@dataclass
class Replica:
    spec: topology.ReplicaSpec | topology.GroupSpec | topology.GatewaySpec
    process: BaseProcess | None = None
    # When it died lately (monotonic s), for the restart intensity window.
    deaths: collections.deque[float] = field(default_factory=collections.deque)
    restart_at: float | None = None
    ready: bool = False
    # SIGKILL sent for a missed heartbeat: its sentinel fires before it can be
    # reaped, so the loop comes round again and must not kill (and log) twice.
    killed: bool = False

    def died(self, now: float, policy: SupervisorConfig) -> float | None:
        """Count a death at ``now``; the delay before the next start, or None for FATAL."""
        window = policy.restart_period_s
        while self.deaths and now - self.deaths[0] > window:
            self.deaths.popleft()
        self.deaths.append(now)
        if len(self.deaths) > policy.restart_intensity:
            return None
        doubled: float = policy.backoff_initial_s * 2 ** (len(self.deaths) - 1)
        return min(doubled, policy.backoff_max_s)

    def start(
        self,
        ctx: SpawnContext,
        target: Callable[..., None],
        args: Sequence[Any],
    ) -> BaseProcess:
        """Start a process for this slot, with the supervisor's signals blocked meanwhile."""
        proc = ctx.Process(target=target, args=tuple(args), name=f"mpipeline-{self.spec.name}")
        # Children inherit the mask: a Ctrl-C during their start stays pending
        # until they have set SIGINT to ignored, instead of a traceback.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(HANDLED_SIGNALS))
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.process = proc
        self.ready = False
        self.restart_at = None
        self.killed = False
        return proc

    def reap(self) -> int | None:
        """The exit code of a process that has ended (it is released), else None."""
        proc = self.process
        if proc is None or proc.exitcode is None:
            return None
        code = proc.exitcode
        proc.join(0)
        proc.close()
        self.process = None
        return code


def hung(
    rep: Replica,
    ctl: ControlBlock,
    rings: Mapping[str, Ring],
    policy: SupervisorConfig,
    now_ns: int,
) -> str | None:
    """Why ``rep``'s live process must be killed, or None: stuck booting, or no
    heartbeat for ``liveness_timeout_s`` while work waits for it (a quiet
    replica with nothing to do may beat late; a busy one never, the runner
    beats between messages)."""
    proc = rep.process
    if proc is None or rep.killed or proc.exitcode is not None:
        return None
    slots = rep.spec.slots
    state = ctl.replica_state(slots[0])
    if state == ReplicaState.READY:
        rep.ready = True
    # A placement group's members beat their own slots: any one beating is a live process.
    age = now_ns - max(ctl.heartbeat_ns(slot) for slot in slots)
    if age <= int(policy.liveness_timeout_s * 1e9):
        return None
    if state == ReplicaState.BOOTING:
        return "is stuck booting" if age > int(policy.boot_timeout_s * 1e9) else None
    busy = any(ctl.in_flight(slot) > 0 for slot in slots) or any(
        rings[name].stats().used_bytes > 0 for name in rep.spec.inputs
    )
    if busy:
        return f"is hung (no heartbeat for {age / 1e9:.1f}s with work waiting)"
    return None


def kill(proc: BaseProcess, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        if proc.pid is not None and proc.exitcode is None:
            os.kill(proc.pid, sig)


def describe_exit(code: int | None) -> str:
    """A process's end in words: "exit 3 (BOOT_ERROR)", "killed by SIGKILL (...)"."""
    if code is None:
        return "still running"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (killed: out of memory, or by hand?)" if code == -signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    with contextlib.suppress(ValueError):
        return f"exit {code} ({ExitCode(code).name})"
    return f"exit {code}"
