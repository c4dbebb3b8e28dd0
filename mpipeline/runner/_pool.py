"""TaskPool: how an async stage runs many messages at once, and stops them.

Each message runs *eagerly*: its handler is stepped inline, in the pump, and
only becomes a task if it actually suspends (a model call), because a task
plus a timer per message costs several microseconds, which is most of a fast
stage's budget. Per-message timeouts come from a sweeper, not timers. Turns
of one session run in order: a turn whose predecessor still runs waits for it.

An async stage runs at most ``concurrency`` messages at once; beyond that,
messages wait in the replica in a heap ordered by priority (critical first),
up to a read-ahead of ``max(batch, concurrency)``, after which the runner
stops reading and the backlog stays in the ring (FIFO). A message whose
deadline passed while it waited is answered ``deadline_exceeded`` instead of
started. The same sweeper stops work whose client cancelled it (the control
block's cancel board): a running task is cancelled, a waiting one dropped.
A stream whose client paused it (the pause board: its reader is behind)
waits between two chunks until the client lets it go on.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine, Generator
from heapq import heapify, heappop, heappush
from typing import Any

from mpipeline.control import ControlBlock
from mpipeline.errors import ErrorCode, UpstreamError
from mpipeline.messages import Message, PromptRequest, failed_from, request_of
from mpipeline.metrics.schema import BUCKET_OF_BITS, HIST_SUM
from mpipeline.runner._log import about, log
from mpipeline.runner._meter import Meter
from mpipeline.runner._sink import Sink
from mpipeline.stages.base import AsyncStage
from mpipeline.topology import ReplicaSpec

# Sweep for timed-out and cancelled messages this often.
_SWEEP_S = 0.05
# A paused stream looks at the pause board after this, then less often, up to the max.
_PAUSE_POLL_S = 0.002
_PAUSE_POLL_MAX_S = 0.05

# What the runner checks before a message may run: False when it answered it.
Admit = Callable[[Message, PromptRequest | None, int], bool]


class _Suspend:
    """Re-yield a value an eagerly stepped coroutine yielded, from inside a task."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.value)


async def _drive(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Continue a coroutine that was started outside any task (an eager start)."""
    while True:
        try:
            sent = await _Suspend(yielded)
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            yielded = coro.send(sent)
        except StopIteration:
            return


class TaskPool:
    """The running and waiting messages of one async stage replica."""

    def __init__(
        self,
        spec: ReplicaSpec,
        stage: AsyncStage[Any, Any],
        ctl: ControlBlock | None,
        outbox: Sink,
        meter: Meter,
        *,
        limit: int,
        read_ahead: int,
        timeout_ns: int,
    ) -> None:
        self.spec = spec
        self.name = spec.stage
        self.stage = stage
        self.ctl = ctl
        # Messages running at once; more wait in the backlog.
        self.limit = limit
        # Backlog length at which the pumps stop reading their rings.
        self.read_ahead = read_ahead
        self.timeout_ns = timeout_ns
        self._outbox = outbox
        self._meter = meter
        # True while a message is stepped inline: the pump flushes after its batch.
        self._eager = False
        # Task -> deadline (monotonic ns), for the timeout sweep.
        self._tasks: dict[asyncio.Task[None], int] = {}
        # Session -> its latest task, which the session's next turn waits for.
        self._sessions: dict[str, asyncio.Task[None]] = {}
        self._timed_out: set[asyncio.Task[None]] = set()
        # Set while the backlog is below ``read_ahead``.
        self._room = asyncio.Event()
        self._room.set()
        # Messages read but not started, as (priority, arrival, message); changed
        # in place only, as the pumps' dispatchers hold it.
        self._backlog: list[tuple[int, int, Message]] = []
        self._arrivals = itertools.count()
        self._backlog_handle: asyncio.Handle | None = None
        # Task -> (client, request id), for the cancel sweep.
        self._task_req: dict[asyncio.Task[None], tuple[int, str]] = {}
        self._cancelled: set[asyncio.Task[None]] = set()
        self._cancels_seen: list[int] = []

    # What the runner calls

    def dispatcher(self, admit: Admit) -> Callable[[Message, int], None]:
        """The pump's call per message: admit it, then start it or let it wait.

        Built once per pump, as a closure over locals, so that a message costs
        no attribute lookup that the work itself does not need.
        """
        meter = self._meter
        limit = self.limit
        backlog = self._backlog
        arrivals = self._arrivals
        is_cancelled = self._is_cancelled
        start = self._start

        def dispatch(msg: Message, now: int) -> None:
            req = request_of(msg)
            if not admit(msg, req, now):
                return
            if req is not None and is_cancelled(req):
                return
            # While others wait, a newcomer waits too, even if a slot has just
            # freed: the backlog's start is due and takes the best of them.
            if meter.inflight >= limit or backlog:
                priority = int(req.priority) if req is not None else 0
                heappush(backlog, (priority, next(arrivals), msg))
                return
            start(msg, req, now)

        return dispatch

    def saturated(self) -> bool:
        """Whether the backlog is full: the pumps stop reading until ``room``."""
        return len(self._backlog) >= self.read_ahead

    async def room(self) -> None:
        """Wait until the backlog is below its read-ahead."""
        self._room.clear()
        await self._room.wait()

    async def drain(self) -> None:
        """Finish every running and waiting message (the pumps have stopped)."""
        while self._tasks or self._backlog:
            if self._tasks:
                await asyncio.wait(list(self._tasks))
            else:
                self._start_waiting()
            await asyncio.sleep(0)

    async def sweep(self) -> None:
        """Stop timed-out and cancelled work, every ``_SWEEP_S``, until cancelled."""
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic_ns()
            for task, deadline in list(self._tasks.items()):
                if now > deadline and task not in self._timed_out:
                    self._timed_out.add(task)
                    task.cancel()
            self._sweep_cancels()

    # Starting

    def _is_cancelled(self, req: PromptRequest) -> bool:
        ctl = self.ctl
        if ctl is None or not ctl.cancels(req.reply_to):  # no hash until a cancel exists
            return False
        if ctl.cancelled(req.reply_to, req.request_id):
            self._meter.cancelled += 1
            self._meter.processed += 1
            return True
        return False

    def _start_waiting(self) -> None:
        """Start backlog messages, best priority first, while there is capacity."""
        self._backlog_handle = None
        backlog = self._backlog
        meter = self._meter
        started = False
        while backlog and meter.inflight < self.limit:
            _, _, msg = heappop(backlog)
            req = request_of(msg)
            now = time.monotonic_ns()
            if req is not None:
                if req.deadline_ns and now > req.deadline_ns:
                    meter.count_expired(1)
                    reason = f"deadline passed waiting in stage {self.name}"
                    self._outbox.emit(
                        failed_from(msg, ErrorCode.DEADLINE_EXCEEDED, reason, self.name)
                    )
                    started = True
                    continue
                if self._is_cancelled(req):
                    continue
            self._start(msg, req, now)
            started = True
        if len(backlog) < self.read_ahead:
            self._room.set()
        if started:
            self._schedule_flush()

    def _start(self, msg: Message, req: PromptRequest | None, now: int) -> None:
        prev = None
        session = req.session_id if req is not None else None
        if session:
            prev = self._sessions.get(session)
        coro = self._run_one(msg, prev, now)
        self._eager = True
        try:
            yielded = coro.send(None)
        except StopIteration:
            return
        finally:
            self._eager = False
        # It suspended: it becomes a task, with a deadline for the sweeper.
        deadline = now + self.timeout_ns
        if req is not None and req.deadline_ns:
            deadline = min(deadline, req.deadline_ns)
        task = asyncio.get_running_loop().create_task(_drive(coro, yielded))
        self._tasks[task] = deadline
        if req is not None:
            self._task_req[task] = (req.reply_to, req.request_id)
        task.add_done_callback(self._task_done)
        if session:
            self._sessions[session] = task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        del self._tasks[task]
        self._task_req.pop(task, None)
        self._timed_out.discard(task)
        self._cancelled.discard(task)
        for key, t in list(self._sessions.items()):
            if t is task:
                del self._sessions[key]
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._eager:
            return  # the pump flushes after the batch it is dispatching
        self._outbox.schedule_flush()

    # Running

    async def _run_one(self, msg: Message, prev: asyncio.Task[None] | None, started: int) -> None:
        # In flight from its first step (inline, in ``_start``) to its finally.
        meter = self._meter
        meter.inflight += 1
        emit = self._outbox.emit
        try:
            if prev is not None and not prev.done():
                # Turns of one session run in order: wait for the previous one.
                await asyncio.wait([prev])
            board = self.ctl
            req = request_of(msg)
            # A stream is held while its reader is behind (the client's pause board).
            stream = req if board is not None and req is not None and req.stream else None
            async for out in self.stage.handle(msg):
                emit(out)
                self._schedule_flush()
                if stream is not None and board is not None and board.pauses(stream.reply_to):
                    await self._while_paused(board, stream)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task in self._cancelled:
                meter.cancelled += 1  # its client has answered the caller already
                return
            if task is not None and task in self._timed_out:
                meter.count_expired(1)
                reason = f"stage {self.name} timed out"
                emit(failed_from(msg, ErrorCode.DEADLINE_EXCEEDED, reason, self.name))
            else:
                reason = f"stage {self.name} is shutting down"
                emit(failed_from(msg, ErrorCode.SHUTTING_DOWN, reason, self.name))
                raise
        except UpstreamError as exc:  # classified already: no traceback, the code says it
            log.warning("%s: %s: %s", self.spec.name, exc.code, exc, extra=about(msg))
            wait = exc.retry_after_s or 0.0
            emit(failed_from(msg, exc.code, str(exc), self.name, wait))
        except Exception as exc:  # one bad message must not stop the stage
            log.exception("%s: stage error", self.spec.name, extra=about(msg))
            reason = f"{type(exc).__name__}: {exc}"
            emit(failed_from(msg, ErrorCode.STAGE_ERROR, reason, self.name))
        finally:
            meter.inflight -= 1
            meter.processed += 1
            if meter.cells is not None:
                took = time.monotonic_ns() - started
                hist = meter.hist
                hist[BUCKET_OF_BITS[took.bit_length()]] += 1
                hist[HIST_SUM] += took
            if self._backlog:
                if self._backlog_handle is None:
                    loop = asyncio.get_running_loop()
                    self._backlog_handle = loop.call_soon(self._start_waiting)
            else:
                self._room.set()

    async def _while_paused(self, board: ControlBlock, req: PromptRequest) -> None:
        """Hold a stream between two chunks while its client has it paused.

        The client pauses a request whose reader is far behind (the pause
        board), so a reader who never reads costs no more model time; the
        sweeper still times it out or cancels it while it waits here.
        """
        client, rid = req.reply_to, req.request_id
        if not board.paused(client, rid):
            return
        self._meter.paused += 1
        wait = _PAUSE_POLL_S
        while board.paused(client, rid):
            await asyncio.sleep(wait)
            wait = min(wait * 2, _PAUSE_POLL_MAX_S)

    # Cancels

    def _sweep_cancels(self) -> None:
        """Stop running and waiting work of clients that posted cancels since last time."""
        ctl = self.ctl
        if ctl is None:
            return
        counts = [ctl.cancels(c) for c in range(ctl.n_clients)]
        if counts == self._cancels_seen:
            return
        changed = {c for c, n in enumerate(counts) if self._cancels_seen[c : c + 1] != [n]}
        self._cancels_seen = counts
        for task, (client, request_id) in list(self._task_req.items()):
            if client in changed and task not in self._cancelled:
                if ctl.cancelled(client, request_id):
                    self._cancelled.add(task)
                    task.cancel()
        backlog = self._backlog
        kept = []
        for entry in backlog:
            req = request_of(entry[2])
            if req is not None and req.reply_to in changed and self._is_cancelled(req):
                continue
            kept.append(entry)
        if len(kept) != len(backlog):
            heapify(kept)
            backlog[:] = kept
            if len(kept) < self.read_ahead:
                self._room.set()
