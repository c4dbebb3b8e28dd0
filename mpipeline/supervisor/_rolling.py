"""A rolling restart: replace some replicas one at a time, each drained first.

A reload whose changes need new processes (a stage's table, its cores, the
models) restarts just the replicas that read them. One at a time: the
replica gets SIGTERM, which makes it finish what it holds and flush (a stage
replica) or let its requests finish (a gateway replica), and exit 0; its
successor starts on the new config and attaches the same rings, where what
arrived meanwhile waits. The listening socket is the supervisor's, so it
stays open throughout and new connections queue in its backlog.

A clean exit is not a death: it does not count against the restart
intensity, and the slot's generation does not move, because nothing the
replica held was lost (moving it would make clients fail the requests that
passed through it). A replica that does not exit within the drain timeout
is killed, and then the usual death path tells the clients.

The supervisor's loop calls ``step`` each time round, before it reaps, and
its reaper leaves alone the replica that ``owns`` says is being replaced.
"""

from __future__ import annotations

import collections
import logging
import signal
import time
from collections.abc import Callable, Iterable

from mpipeline.control import ControlBlock, ReplicaState
from mpipeline.supervisor._replicas import Replica, describe_exit, kill

log = logging.getLogger("mpipeline.supervisor")

# How often the loop looks while a replacement boots (it has no sentinel to wake it).
POLL_S = 0.05


class RollingRestart:
    """The replicas still to replace, and the one being replaced now."""

    def __init__(
        self,
        ctl: Callable[[], ControlBlock | None],
        spawn: Callable[[Replica], None],
        drain_timeout_s: Callable[[], float],
        boot_timeout_s: Callable[[], float],
    ) -> None:
        self._ctl = ctl
        self._spawn = spawn
        self._drain_timeout_s = drain_timeout_s
        self._boot_timeout_s = boot_timeout_s
        self._queue: collections.deque[Replica] = collections.deque()
        self._current: Replica | None = None
        self._stopping = False  # SIGTERM sent, not yet reaped
        self._deadline = 0.0
        self.done: list[str] = []
        self.failure: str | None = None
        # Called with each replacement that reported ready (it runs the new config).
        self.on_ready: Callable[[Replica], None] = lambda rep: None

    @property
    def busy(self) -> bool:
        return self._current is not None or bool(self._queue)

    def pending(self) -> list[str]:
        reps = ([self._current] if self._current else []) + list(self._queue)
        return [r.spec.name for r in reps]

    def start(self, replicas: Iterable[Replica]) -> None:
        self._queue.extend(replicas)
        self.done = []
        self.failure = None

    def owns(self, rep: Replica) -> bool:
        """True while ``rep`` is stopping for a replacement: the reaper must leave it."""
        return self._stopping and rep is self._current

    def abandon(self) -> None:
        """Stop rolling (the run is stopping): the usual paths handle every replica."""
        self._queue.clear()
        self._current = None
        self._stopping = False

    def timeout(self, timeout: float) -> float:
        """The loop's wait, shortened while a replacement boots."""
        return min(timeout, POLL_S) if self.busy else timeout

    def step(self) -> None:
        """Move the restart on as far as it can go without waiting."""
        ctl = self._ctl()
        while ctl is not None and self.busy:
            if self._current is None:
                self._next()
                continue
            rep = self._current
            if self._stopping:
                if not self._reaped(rep, ctl):
                    return
            elif not self._booted(rep, ctl):
                return

    def _next(self) -> None:
        rep = self._queue.popleft()
        proc = rep.process
        if proc is None or proc.exitcode is not None:
            # Down already (a crash): its restart reads the new config anyway.
            self.done.append(rep.spec.name)
            return
        log.info("reload: restarting %s (draining it first)", rep.spec.name)
        self._current = rep
        self._stopping = True
        self._deadline = time.monotonic() + self._drain_timeout_s()
        kill(proc, signal.SIGTERM)

    def _reaped(self, rep: Replica, ctl: ControlBlock) -> bool:
        proc = rep.process
        assert proc is not None
        if proc.exitcode is None:
            if time.monotonic() > self._deadline and not rep.killed:
                log.warning("reload: %s did not drain in time; killing it", rep.spec.name)
                rep.killed = True
                kill(proc)
            return False
        code = rep.reap()
        assert code is not None
        clean = code == 0 and not rep.killed
        if not clean:
            log.warning("reload: %s ended badly (%s)", rep.spec.name, describe_exit(code))
        for slot in rep.spec.slots:
            if clean:
                ctl.set_state(slot, ReplicaState.DOWN)  # drained: the generation stays
            else:
                ctl.exited(slot, code)  # clients fail what it held
        self._stopping = False
        self._spawn(rep)
        self._deadline = time.monotonic() + self._boot_timeout_s()
        return True

    def _booted(self, rep: Replica, ctl: ControlBlock) -> bool:
        proc = rep.process
        if all(ctl.replica_state(s) == ReplicaState.READY for s in rep.spec.slots):
            rep.ready = True
            self.done.append(rep.spec.name)
            self.on_ready(rep)
            self._current = None
            return True
        if proc is None or proc.exitcode is not None or time.monotonic() > self._deadline:
            # The supervisor's own paths restart it (or stop the run on a boot error).
            self.failure = f"{rep.spec.name} did not come back ready on the new config"
            log.error("reload: %s; not restarting the rest", self.failure)
            self.abandon()
            return True
        return False
