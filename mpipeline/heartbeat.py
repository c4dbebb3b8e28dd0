"""The control block: one small shared segment of liveness and state for a run.

Gunicorn's heartbeat idea without a file or a pipe: each replica stores a
monotonic timestamp and a processed count in its own slot, the supervisor
reads them to tell hung from busy, and clients read the per-replica
generation to learn that a replica was replaced (so the requests it held get
an explicit error instead of a hang). Keeping it in /dev/shm means a slow
disk can never stall a heartbeat (gunicorn#1305).

Layout: u64 slots. Header (0-7): magic, kind, replicas, clients, state,
supervisor pid, supervisor start ticks, started ns. Then 8 slots per replica
(pid, generation, heartbeat ns, processed, in flight, state, last exit,
restarts) and 8 per client (pid, start ticks, cancel count, spare), then a
cancel board of ``CANCEL_SLOTS`` u64 per client. Each replica slot has one
writer at a time: the replica, except generation/last exit/restarts and pid
which the supervisor writes while the replica is down.

The cancel board is how a client that lost its caller (an HTTP client that
hung up) stops work already inside the pipeline without a message that would
queue behind the very backlog it wants to skip: the client stores the
64-bit hash of the request id at ``hash % CANCEL_SLOTS`` of its own board and
bumps its cancel count; a stage compares before it starts a request and
between streamed chunks. A newer cancel may overwrite an older one in the
same slot: cancelling is best effort (the client has already answered the
caller), and a full 64-bit hash never cancels the wrong request by accident
in practice.
"""

from __future__ import annotations

import enum
import mmap
import os
import time

import xxhash

from mpipeline import _shm
from mpipeline.errors import RingCorrupted
from mpipeline.ring import MAGIC

KIND_CONTROL = 0x100 | 1
HEADER_SLOTS = 8
SLOT_WIDTH = 8
H_MAGIC, H_KIND, H_REPLICAS, H_CLIENTS, H_STATE, H_PID, H_START, H_STARTED = range(8)
R_PID, R_GENERATION, R_HEARTBEAT, R_PROCESSED, R_INFLIGHT, R_STATE, R_EXIT, R_RESTARTS = range(8)
C_PID, C_START, C_CANCELS = range(3)
# Recent cancellations remembered per client.
CANCEL_SLOTS = 1024


class RunState(enum.IntEnum):
    STARTING = 0
    RUNNING = 1
    DRAINING = 2
    STOPPED = 3
    FATAL = 4


class ReplicaState(enum.IntEnum):
    DOWN = 0
    BOOTING = 1
    READY = 2
    DRAINING = 3
    EXITED = 4


class ControlBlock:
    """Typed access to the control segment; cheap enough to call per heartbeat."""

    def __init__(self, name: str, fd: int, mem: mmap.mmap, *, creator: bool) -> None:
        self.name = name
        self._fd = fd
        self._mem = mem
        self._creator = creator
        self._mv = memoryview(mem)
        self._q = self._mv.cast("Q")
        self.n_replicas: int = self._q[H_REPLICAS]
        self.n_clients: int = self._q[H_CLIENTS]
        self._boards = HEADER_SLOTS + SLOT_WIDTH * (self.n_replicas + self.n_clients)

    @classmethod
    def create(cls, name: str, n_replicas: int, n_clients: int) -> ControlBlock:
        size = 8 * (HEADER_SLOTS + SLOT_WIDTH * (n_replicas + n_clients) + CANCEL_SLOTS * n_clients)
        fd, mem = _shm.create_segment(name, size)
        with memoryview(mem) as mv, mv.cast("Q") as q:
            q[H_KIND] = KIND_CONTROL
            q[H_REPLICAS] = n_replicas
            q[H_CLIENTS] = n_clients
            pid = os.getpid()
            q[H_PID] = pid
            q[H_START] = _shm.proc_start_ticks(pid) or 0
            q[H_STARTED] = time.monotonic_ns()
            q[H_MAGIC] = MAGIC
        return cls(name, fd, mem, creator=True)

    @classmethod
    def attach(cls, name: str) -> ControlBlock:
        fd, mem = _shm.attach_segment(name)
        ok = len(mem) >= 8 * HEADER_SLOTS
        if ok:
            with memoryview(mem) as mv, mv[: 8 * HEADER_SLOTS].cast("Q") as q:
                ok = q[H_MAGIC] == MAGIC and q[H_KIND] == KIND_CONTROL
        if not ok:
            mem.close()
            os.close(fd)
            raise RingCorrupted(f"segment {name} is not an mpipeline control block")
        return cls(name, fd, mem, creator=False)

    # Run-wide

    @property
    def state(self) -> RunState:
        return RunState(self._q[H_STATE])

    @state.setter
    def state(self, value: RunState) -> None:
        self._q[H_STATE] = value

    @property
    def raw_state(self) -> int:
        """The state as a plain int: no enum construction on hot paths."""
        return int(self._q[H_STATE])

    @property
    def supervisor_pid(self) -> int:
        return int(self._q[H_PID])

    def supervisor_alive(self) -> bool:
        return _shm.process_alive(self._q[H_PID], self._q[H_START])

    @property
    def started_ns(self) -> int:
        return int(self._q[H_STARTED])

    # Replica slots

    def _base(self, slot: int) -> int:
        if not 0 <= slot < self.n_replicas:
            raise IndexError(f"replica slot {slot} out of range({self.n_replicas})")
        return HEADER_SLOTS + SLOT_WIDTH * slot

    def get(self, slot: int, field: int) -> int:
        return int(self._q[self._base(slot) + field])

    def put(self, slot: int, field: int, value: int) -> None:
        self._q[self._base(slot) + field] = value

    def beat(self, slot: int, processed: int, inflight: int) -> None:
        base = HEADER_SLOTS + SLOT_WIDTH * slot
        q = self._q
        q[base + R_PROCESSED] = processed
        q[base + R_INFLIGHT] = inflight
        q[base + R_HEARTBEAT] = time.monotonic_ns()

    def generations(self) -> list[int]:
        q = self._q
        return [q[HEADER_SLOTS + SLOT_WIDTH * s + R_GENERATION] for s in range(self.n_replicas)]

    # Client slots

    def client_put(self, client: int, field: int, value: int) -> None:
        self._q[HEADER_SLOTS + SLOT_WIDTH * (self.n_replicas + client) + field] = value

    # Cancel board

    def cancel(self, client: int, request_id: str) -> None:
        """Ask every stage to drop ``request_id`` of ``client`` (best effort)."""
        if not 0 <= client < self.n_clients:
            raise IndexError(f"client slot {client} out of range({self.n_clients})")
        h = xxhash.xxh3_64_intdigest(request_id.encode()) or 1
        self._q[self._boards + CANCEL_SLOTS * client + h % CANCEL_SLOTS] = h
        count = HEADER_SLOTS + SLOT_WIDTH * (self.n_replicas + client) + C_CANCELS
        self._q[count] += 1

    def cancels(self, client: int) -> int:
        """How many cancels ``client`` ever posted: 0 lets a stage skip hashing."""
        if not 0 <= client < self.n_clients:
            return 0
        return int(self._q[HEADER_SLOTS + SLOT_WIDTH * (self.n_replicas + client) + C_CANCELS])

    def cancelled(self, client: int, request_id: str) -> bool:
        """True when ``client`` cancelled ``request_id``; one hash and one load."""
        if not 0 <= client < self.n_clients:
            return False
        h = xxhash.xxh3_64_intdigest(request_id.encode()) or 1
        return bool(self._q[self._boards + CANCEL_SLOTS * client + h % CANCEL_SLOTS] == h)

    def close(self) -> None:
        self._q.release()
        self._mv.release()
        self._mem.close()
        os.close(self._fd)

    def unlink(self) -> None:
        if self._creator:
            _shm.unlink_segment(self.name)
