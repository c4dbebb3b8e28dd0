"""The control block: one small shared segment of liveness and state for a run.

Gunicorn's heartbeat idea without a file or a pipe: each replica stores a
monotonic timestamp and a processed count in its own slot, the supervisor
reads them to tell hung from busy, and clients read the per-replica
generation to learn that a replica was replaced (so the requests it held get
an explicit error instead of a hang). Keeping it in /dev/shm means a slow
disk can never stall a heartbeat (gunicorn#1305).

Layout: u64 slots. Header (0-7, ``_shm.Segment``'s): magic, kind, replicas,
clients, run state, supervisor pid, supervisor start ticks, started ns. Then
8 slots per replica (pid, generation, heartbeat ns, processed, in flight,
state, last exit, restarts) and 8 per client (pid, start ticks, cancel count,
paused count, and its request counts: accepted, completed, failed, in
flight), then a cancel board of ``CANCEL_SLOTS`` u64 per client, then a pause
board of ``PAUSE_SLOTS`` u64 per client, then the config words: the run's
config version and log level (the supervisor writes both on a reload) and,
per replica, the config version it has applied (the replica writes it).
Each replica slot has one writer at
a time: the replica, except generation/last exit/restarts and pid which the
supervisor writes while the replica is down.

The cancel board is how a client that lost its caller (an HTTP client that
hung up) stops work already inside the pipeline without a message that would
queue behind the very backlog it wants to skip: the client stores the
64-bit hash of the request id at ``hash % CANCEL_SLOTS`` of its own board and
bumps its cancel count; a stage compares before it starts a request and
between streamed chunks. A newer cancel may overwrite an older one in the
same slot: cancelling is best effort (the client has already answered the
caller), and a full 64-bit hash never cancels the wrong request by accident
in practice.

The pause board is how a stream's slow reader reaches the shard that feeds
it (issue 15): when a client holds too many unread chunks of one request it
stores the request's hash on its pause board, and the shard, which checks
between streamed chunks, stops generating that request until the slot is
cleared; other requests on the same rings go on. A stage reads the client's
paused count first, so a client with nothing paused costs one load.
Collisions are possible and harmless: a pause lost to another request in the
same slot only lets chunks come on, and the client's hard bound still holds.

Only this module knows the slot numbers: the supervisor, replicas, clients
and readers use the typed accessors below (``get``/``put`` with the ``R_*``
names are the raw form, for tests and tools that poke one word).
"""

from __future__ import annotations

import enum
import mmap
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

import xxhash

from mpipeline import _shm

SLOT_WIDTH = 8
# Header words 2-4 (the rest are _shm's).
H_REPLICAS, H_CLIENTS, H_STATE = _shm.H_WORD2, _shm.H_WORD3, _shm.H_WORD4
R_PID, R_GENERATION, R_HEARTBEAT, R_PROCESSED, R_INFLIGHT, R_STATE, R_EXIT, R_RESTARTS = range(8)
C_PID, C_START, C_CANCELS, C_PAUSED, C_ACCEPTED, C_COMPLETED, C_FAILED, C_INFLIGHT = range(8)
# Recent cancellations remembered per client.
CANCEL_SLOTS = 1024
# Streams one client can hold paused at once without a collision being likely.
PAUSE_SLOTS = 1024
# Run-wide config words after the boards: version, log level.
CONFIG_WORDS = 2
# A signal death is stored in the last-exit slot as this bit | signo.
SIGNALLED = 0x10000


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


class RequestCounts(NamedTuple):
    """One client's requests: every accepted one is completed, failed or in flight."""

    accepted: int
    completed: int
    failed: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    """One replica slot, read at once (for status, top and /metrics)."""

    pid: int
    generation: int
    heartbeat_ns: int
    processed: int
    in_flight: int
    state: int
    last_exit: int
    restarts: int


class ControlBlock(_shm.Segment):
    """Typed access to the control segment; cheap enough to call per heartbeat."""

    KIND = _shm.Kind.CONTROL
    WHAT = "control block"

    def __init__(self, name: str, fd: int, mem: mmap.mmap, *, creator: bool) -> None:
        super().__init__(name, fd, mem, creator=creator)
        self._q = self.words()
        self.n_replicas: int = self._q[H_REPLICAS]
        self.n_clients: int = self._q[H_CLIENTS]
        self._clients = _shm.HEADER_WORDS + SLOT_WIDTH * self.n_replicas
        self._boards = self._clients + SLOT_WIDTH * self.n_clients
        self._pauses = self._boards + CANCEL_SLOTS * self.n_clients
        self._config = self._pauses + PAUSE_SLOTS * self.n_clients

    @classmethod
    def create(cls, name: str, n_replicas: int, n_clients: int) -> ControlBlock:
        slots = _shm.HEADER_WORDS + SLOT_WIDTH * (n_replicas + n_clients)
        size = 8 * (slots + (CANCEL_SLOTS + PAUSE_SLOTS) * n_clients + CONFIG_WORDS + n_replicas)
        return cls._create(name, size, {H_REPLICAS: n_replicas, H_CLIENTS: n_clients})

    @classmethod
    def attach(cls, name: str) -> ControlBlock:
        """:raises RingNotFound: no such segment; RingCorrupted: not a control block."""
        return cls._attach(name)

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
        return self.creator_pid

    def supervisor_alive(self) -> bool:
        return self.creator_alive()

    @property
    def started_ns(self) -> int:
        return self.created_ns

    # Replica slots: raw words

    def _base(self, slot: int) -> int:
        if not 0 <= slot < self.n_replicas:
            raise IndexError(f"replica slot {slot} out of range({self.n_replicas})")
        return _shm.HEADER_WORDS + SLOT_WIDTH * slot

    def get(self, slot: int, field: int) -> int:
        return int(self._q[self._base(slot) + field])

    def put(self, slot: int, field: int, value: int) -> None:
        self._q[self._base(slot) + field] = value

    # Replica slots: what each side does

    def record(self, slot: int) -> ReplicaRecord:
        base = self._base(slot)
        return ReplicaRecord(*(int(v) for v in self._q[base : base + SLOT_WIDTH]))

    def pid(self, slot: int) -> int:
        return self.get(slot, R_PID)

    def replica_state(self, slot: int) -> int:
        """The slot's ``ReplicaState`` as an int (an unknown value stays readable)."""
        return self.get(slot, R_STATE)

    def in_flight(self, slot: int) -> int:
        return self.get(slot, R_INFLIGHT)

    def heartbeat_ns(self, slot: int) -> int:
        return self.get(slot, R_HEARTBEAT)

    def spawning(self, slot: int) -> None:
        """The supervisor is about to start a process for ``slot``: booting, as of now.

        Before the start, not after: a quick replica may report READY at once.
        """
        self.put(slot, R_STATE, ReplicaState.BOOTING)
        self.put(slot, R_HEARTBEAT, time.monotonic_ns())

    def spawned(self, slot: int, pid: int) -> None:
        """The process the supervisor started for ``slot`` is ``pid``."""
        self.put(slot, R_PID, pid)

    def booting(self, slot: int, pid: int) -> None:
        """A replica process announces itself (its own pid, before it is ready)."""
        self.put(slot, R_PID, pid)
        self.put(slot, R_STATE, ReplicaState.BOOTING)

    def set_state(self, slot: int, state: ReplicaState) -> None:
        self.put(slot, R_STATE, state)

    def exited(self, slot: int, code: int) -> None:
        """The supervisor reaped the slot's process (``code``: <0 for a signal death).

        The generation moves on, which tells every client that the requests
        this replica held will not come back.
        """
        base = self._base(slot)
        q = self._q
        q[base + R_STATE] = ReplicaState.DOWN
        q[base + R_EXIT] = code & 0xFFFF if code >= 0 else SIGNALLED | -code
        q[base + R_GENERATION] += 1

    def restarted(self, slot: int) -> None:
        self._q[self._base(slot) + R_RESTARTS] += 1

    def beat(self, slot: int, processed: int, inflight: int) -> None:
        base = _shm.HEADER_WORDS + SLOT_WIDTH * slot
        q = self._q
        q[base + R_PROCESSED] = processed
        q[base + R_INFLIGHT] = inflight
        q[base + R_HEARTBEAT] = time.monotonic_ns()

    def generations(self) -> list[int]:
        q = self._q
        first = _shm.HEADER_WORDS + R_GENERATION
        return [q[first + SLOT_WIDTH * s] for s in range(self.n_replicas)]

    # Client slots

    def client_put(self, client: int, field: int, value: int) -> None:
        self._q[self._clients + SLOT_WIDTH * client + field] = value

    # Cancel board

    def cancel(self, client: int, request_id: str) -> None:
        """Ask every stage to drop ``request_id`` of ``client`` (best effort)."""
        if not 0 <= client < self.n_clients:
            raise IndexError(f"client slot {client} out of range({self.n_clients})")
        h = xxhash.xxh3_64_intdigest(request_id.encode()) or 1
        self._q[self._boards + CANCEL_SLOTS * client + h % CANCEL_SLOTS] = h
        self._q[self._clients + SLOT_WIDTH * client + C_CANCELS] += 1

    def cancels(self, client: int) -> int:
        """How many cancels ``client`` ever posted: 0 lets a stage skip hashing."""
        if not 0 <= client < self.n_clients:
            return 0
        return int(self._q[self._clients + SLOT_WIDTH * client + C_CANCELS])

    def cancelled(self, client: int, request_id: str) -> bool:
        """True when ``client`` cancelled ``request_id``; one hash and one load."""
        if not 0 <= client < self.n_clients:
            return False
        h = xxhash.xxh3_64_intdigest(request_id.encode()) or 1
        return bool(self._q[self._boards + CANCEL_SLOTS * client + h % CANCEL_SLOTS] == h)

    # Request counts (invariant I6: accepted = completed + failed + in flight)

    def publish_requests(self, client: int, counts: RequestCounts) -> None:
        """Store a client's counts, taken at one instant of its event loop."""
        at = self._clients + SLOT_WIDTH * client + C_ACCEPTED
        self._q[at : at + 4] = memoryview(struct.pack("4Q", *counts)).cast("Q")

    def request_counts(self, client: int) -> RequestCounts:
        """A client's last published counts, never torn by a write in progress.

        The client publishes every few ms and a store is four words, so two
        reads in a row that agree were not interleaved with a store.
        """
        at = self._clients + SLOT_WIDTH * client + C_ACCEPTED
        q = self._q
        while True:
            first = tuple(q[at : at + 4])
            if tuple(q[at : at + 4]) == first:
                return RequestCounts(*(int(v) for v in first))

    # Pause board

    def clear_pauses(self, client: int) -> None:
        """Forget every pause of a client slot (a new client claimed it)."""
        start = self._pauses + PAUSE_SLOTS * client
        self._q[start : start + PAUSE_SLOTS] = memoryview(bytes(8 * PAUSE_SLOTS)).cast("Q")
        self._q[self._clients + SLOT_WIDTH * client + C_PAUSED] = 0

    def pause(self, client: int, request_id: str) -> None:
        """Ask the shard streaming ``request_id`` of ``client`` to stop generating it."""
        if not 0 <= client < self.n_clients:
            raise IndexError(f"client slot {client} out of range({self.n_clients})")
        h = xxhash.xxh3_64_intdigest(request_id.encode()) or 1
        at = self._pauses + PAUSE_SLOTS * client + h % PAUSE_SLOTS
        q = self._q
        if q[at] != h:
            if not q[at]:
                q[self._clients + SLOT_WIDTH * client + C_PAUSED] += 1
            q[at] = h

    def resume(self, client: int, request_id: str) -> None:
        """Let a paused request go on (nothing if another took its slot since)."""
        if not 0 <= client < self.n_clients:
            return
        h = xxhash.xxh3_64_intdigest(request_id.encode()) or 1
        at = self._pauses + PAUSE_SLOTS * client + h % PAUSE_SLOTS
        q = self._q
        if q[at] == h:
            q[at] = 0
            q[self._clients + SLOT_WIDTH * client + C_PAUSED] -= 1

    def pauses(self, client: int) -> int:
        """How many of ``client``'s streams are paused now: 0 lets a stage skip hashing."""
        if not 0 <= client < self.n_clients:
            return 0
        return int(self._q[self._clients + SLOT_WIDTH * client + C_PAUSED])

    def paused(self, client: int, request_id: str) -> bool:
        """True while ``client`` holds ``request_id`` paused; one hash and one load."""
        if not 0 <= client < self.n_clients:
            return False
        h = xxhash.xxh3_64_intdigest(request_id.encode()) or 1
        return bool(self._q[self._pauses + PAUSE_SLOTS * client + h % PAUSE_SLOTS] == h)

    # Config version (live reconfiguration)

    @property
    def config_version(self) -> int:
        """The version of the config the run is on: 0 at start, +1 per accepted reload."""
        return int(self._q[self._config])

    @config_version.setter
    def config_version(self, value: int) -> None:
        self._q[self._config] = value

    @property
    def log_level(self) -> int:
        """The ``logging`` level every process should use; 0 leaves each one's own."""
        return int(self._q[self._config + 1])

    @log_level.setter
    def log_level(self, value: int) -> None:
        self._q[self._config + 1] = value

    def config_applied(self, slot: int) -> int:
        """The config version the process in ``slot`` says it runs with."""
        self._base(slot)  # range check
        return int(self._q[self._config + CONFIG_WORDS + slot])

    def apply_config(self, slot: int, version: int) -> None:
        """A replica acknowledges that it runs with config ``version``."""
        self._base(slot)
        self._q[self._config + CONFIG_WORDS + slot] = version
