"""StageRunner: everything around a stage, written once.

Reads its input rings in batches, decodes each record (a msgpack array of
messages) straight from shared memory, checks deadlines, stamps, calls the
stage, routes every output by session hash to the next stage's ring (or, in
the last stage, to the client named by ``reply_to``), and writes one record
per destination per batch. An exception in a message becomes a ``Failed``
for that request only; ``Failed`` messages go straight to the client's
error ring. Full rings follow the consuming stage's policy: ``block`` waits
up to the earliest deadline in the batch, ``shed`` fails the batch at once.

Async stages run each message *eagerly*: the handler is stepped inline and
only becomes a task if it actually suspends (a model call), because a task
plus a timer per message costs several microseconds, which is most of a
fast stage's budget. Per-message timeouts come from a sweeper, not timers.

An async stage runs at most ``concurrency`` messages at once; beyond that,
messages wait in the replica in a heap ordered by priority (critical first),
up to a read-ahead of ``max(batch, concurrency)``, after which the runner
stops reading and the backlog stays in the ring (FIFO). The same sweeper
stops work whose client cancelled it (the control block's cancel board).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Coroutine, Generator
from typing import Any

import msgspec

from mpipeline.codec import Codec, pack_records
from mpipeline.config import PipelineConfig
from mpipeline.control import ControlBlock, RunState
from mpipeline.errors import (
    DecodeError,
    ErrorCode,
    PeerGone,
    RingCorrupted,
    RingEmpty,
    RingFull,
    RingPoisoned,
    UpstreamError,
)
from mpipeline.messages import (
    EDGE_TYPES,
    Completed,
    Failed,
    Message,
    PromptRequest,
    failed_from,
    request_of,
)
from mpipeline.metrics.block import Cells, Writer
from mpipeline.metrics.schema import BUCKET_OF_BITS, HIST_CELLS, HIST_SUM
from mpipeline.ring import Ring
from mpipeline.routing import message_key, shard_for
from mpipeline.stages.base import AsyncStage, BaseStage, Stage
from mpipeline.topology import ReplicaSpec, edge_label

log = logging.getLogger(__name__)

# How long an idle pump sleeps on its doorbell before re-checking for a stop.
_IDLE_WAIT_S = 0.25
# Sweep for timed-out messages this often.
_SWEEP_S = 0.05
# A Failed that cannot reach its client within this is logged and dropped:
# the client's own deadline answers the caller.
_ERROR_PUT_TIMEOUT_S = 1.0


def _about(msg: Message) -> dict[str, str]:
    """``extra=`` for a log record about one request: its id (logs.py prints it)."""
    req = request_of(msg)
    request_id = req.request_id if req is not None else getattr(msg, "request_id", None)
    return {"request_id": request_id} if request_id else {}


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


class StageRunner:
    def __init__(
        self,
        spec: ReplicaSpec,
        cfg: PipelineConfig,
        stage: BaseStage[Any, Any],
        ctl: ControlBlock | None = None,
        metrics: Writer | None = None,
    ) -> None:
        self.spec = spec
        self.stage = stage
        self.name = spec.stage
        self.ctl = ctl
        stage_cfg = getattr(cfg.stages, spec.stage)
        self.batch: int = stage_cfg.batch
        self.timeout_ns = int(stage_cfg.timeout_s * 1e9)
        self.is_last = spec.next_stage == "client"
        next_cfg = None if self.is_last else getattr(cfg.stages, spec.next_stage)
        # The edge's policy belongs to the consuming stage; return rings always block.
        self.shed = next_cfg is not None and next_cfg.full_policy == "shed"
        self.block_timeout_s = next_cfg.timeout_s if next_cfg is not None else 30.0
        self.heartbeat_s = cfg.supervisor.heartbeat_interval_s
        self._beat_every_ns = int(self.heartbeat_s * 1e9)
        self._next_beat_ns = 0
        self._beat_handle: asyncio.TimerHandle | None = None
        in_type: Any = EDGE_TYPES[spec.stage]
        # The first stage reads requests from clients; assemble does when rag is off.
        self.decoder: Codec[Message] = Codec(in_type | PromptRequest | Failed)
        self.encoder = msgspec.msgpack.Encoder()
        self.inputs: list[Ring] = []
        self.outputs: list[Ring] = []
        self.errors: list[Ring] = []
        self.pending: list[list[Message]] = []
        self.err_pending: list[list[Message]] = []
        self.processed = 0
        self.inflight = 0
        self.expired = 0
        self.shed_count = 0
        self.corrupt = 0
        self._stopping = False
        self._eager = False
        self._tasks: dict[asyncio.Task[None], int] = {}
        self._sessions: dict[str, asyncio.Task[None]] = {}
        self._timed_out: set[asyncio.Task[None]] = set()
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._idle: set[asyncio.Task[Any]] = set()
        self._capacity_free = asyncio.Event()
        self._capacity_free.set()
        self._max_inflight = stage.max_concurrency if isinstance(stage, AsyncStage) else 0
        if self._max_inflight:
            self._max_inflight = getattr(stage_cfg, "concurrency", self._max_inflight)
        # Messages read but not started, as (priority, arrival, message).
        self._backlog: list[tuple[int, int, Message]] = []
        self._backlog_limit = max(self.batch, self._max_inflight)
        self._arrivals = itertools.count()
        self._backlog_handle: asyncio.Handle | None = None
        # Task -> (client, request id), for the cancel sweep.
        self._task_req: dict[asyncio.Task[None], tuple[int, str]] = {}
        self._cancelled: set[asyncio.Task[None]] = set()
        self._cancels_seen: list[int] = []
        self.cancelled = 0
        # Metrics: cell indices looked up once; the hot path adds to cells directly.
        self._cells: Cells | None = None
        self._m_duration = self._m_lag = self._m_expired = 0
        self._m_shed: dict[str, int] = {}
        self._beat_due = 0.0
        # Bucket counts and (at HIST_SUM) the ns sum of stage durations since the last beat.
        self._hist = [0] * HIST_CELLS
        if metrics is not None:
            self._cells = metrics.cells
            self._m_duration = metrics.index("stage_duration_seconds", spec.stage, spec.name)
            self._m_lag = metrics.index("event_loop_lag_seconds", spec.stage, spec.name)
            self._m_expired = metrics.index("expired", spec.stage)
            self._m_shed = {
                name: metrics.index("shed", edge_label(name), "ring_full") for name in spec.outputs
            }

    # Lifecycle

    def attach(self) -> None:
        spec = self.spec
        self.inputs = [Ring.attach(n) for n in spec.inputs]
        self.outputs = [Ring.attach(n) for n in spec.outputs]
        self.errors = (
            self.outputs if spec.errors == spec.outputs else [Ring.attach(n) for n in spec.errors]
        )
        self.pending = [[] for _ in self.outputs]
        self.err_pending = (
            self.pending if self.errors is self.outputs else [[] for _ in self.errors]
        )

    def close(self) -> None:
        rings = {id(r): r for r in (*self.inputs, *self.outputs, *self.errors)}
        for ring in rings.values():
            ring.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then finish what is in hand and flush."""
        loop = asyncio.get_running_loop()
        self._beat_handle = loop.call_later(0, self._beat)
        sweeper = asyncio.create_task(self._sweep()) if self._max_inflight else None
        pumps = [asyncio.create_task(self._pump(r), name=f"pump-{r.name}") for r in self.inputs]
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*pumps, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            self._stopping = True
            for pump in pumps:
                if pump in self._idle:
                    pump.cancel()  # parked on its doorbell: stop now, not at the next tick
            await asyncio.gather(*pumps)
            while self._tasks or self._backlog:
                if self._tasks:
                    await asyncio.wait(list(self._tasks))
                else:
                    self._start_waiting()
                await asyncio.sleep(0)
            await self._flush()
            if self._flush_task is not None:
                await self._flush_task
        finally:
            self._stopping = True
            stopper.cancel()
            for t in pumps:
                t.cancel()
            if sweeper is not None:
                sweeper.cancel()
            if self._beat_handle is not None:
                self._beat_handle.cancel()  # the live one: each beat schedules the next
            self._beat_once()

    def _beat_once(self) -> None:
        self._next_beat_ns = time.monotonic_ns() + self._beat_every_ns
        if self.ctl is not None:
            self.ctl.beat(self.spec.slot, self.processed, self.inflight)
        self._publish()

    def _publish(self) -> None:
        """Add the stage-duration histogram gathered since the last beat to shared memory.

        Per message, an add to a local list costs a third of an add to a
        shared-memory cell (measured: bench/metrics_stage_cost.py), and the
        duration histogram is the one metric touched for every message. The
        price: a scrape lags by up to one heartbeat, and a crash loses that much.
        """
        cells = self._cells
        if cells is None:
            return
        base = self._m_duration
        hist = self._hist
        for i, n in enumerate(hist):
            if n:
                cells[base + i] += n
                hist[i] = 0

    def _beat(self) -> None:
        self._beat_once()
        loop = asyncio.get_running_loop()
        cells = self._cells
        if cells is not None and self._beat_due:
            # How late this timer fired: time the loop spent blocked elsewhere.
            cells[self._m_lag] = max(0.0, loop.time() - self._beat_due)
        if self._stopping:
            return
        # While the supervisor drains, report often so it can see us go idle.
        draining = self.ctl is not None and self.ctl.state == RunState.DRAINING
        delay = 0.02 if draining else self.heartbeat_s
        self._beat_due = loop.time() + delay
        self._beat_handle = loop.call_later(delay, self._beat)

    # Input

    async def _pump(self, ring: Ring) -> None:
        decode = self.decoder.decode_many
        get_many = ring.get_many
        dispatch = self._dispatch_async if self._max_inflight else self._dispatch
        batch = self.batch
        clock = time.monotonic_ns
        # Sync stages are timed here, per message, into the local histogram that
        # each heartbeat publishes; async ones when their handler ends.
        hist = None if self._max_inflight or self._cells is None else self._hist
        while not self._stopping:
            try:
                views = get_many(batch)
            except RingPoisoned:
                raise  # framing is lost: crash, and let the supervisor decide
            except RingCorrupted as exc:
                self.corrupt += 1  # one bad record, already skipped
                log.error("%s: %s", self.spec.name, exc)
                continue
            if not views:
                if self._has_pending():
                    await self._flush()
                task = asyncio.current_task()
                assert task is not None
                self._idle.add(task)
                try:
                    views = [await ring.get(timeout=_IDLE_WAIT_S)]
                except RingEmpty:
                    continue
                except asyncio.CancelledError:
                    if self._stopping:
                        return  # stopped while idle: nothing was taken from the ring
                    raise
                finally:
                    self._idle.discard(task)
            if self._max_inflight and len(self._backlog) >= self._backlog_limit:
                self._capacity_free.clear()
                await self._capacity_free.wait()
            now = start = time.monotonic_ns()
            for view in views:
                try:
                    msgs = decode(view)
                except DecodeError as exc:
                    self.corrupt += 1
                    log.error("%s: undecodable record from %s: %s", self.spec.name, ring.name, exc)
                    continue
                for msg in msgs:
                    dispatch(msg, now)
                    # A slow stage can spend long on one batch without returning to
                    # the loop, whose timer would beat: beat from here, so that busy
                    # is never taken for hung (a clock read, ~60 ns, per message).
                    then, now = now, clock()
                    if hist is not None:
                        hist[BUCKET_OF_BITS[(now - then).bit_length()]] += 1
                    if now >= self._next_beat_ns:
                        self._beat_once()
            if hist is not None:
                hist[HIST_SUM] += now - start  # the per-message times add up to this
            await self._flush()
            # Let the other pumps, the beat timer and the flush task run between batches.
            await asyncio.sleep(0)

    def _admit(self, msg: Message, req: PromptRequest | None, now: int) -> bool:
        """Deadline check and stamping; False when the message was answered here.

        ``req`` is ``request_of(msg)``, passed in so that callers which need it too
        unwrap it once.
        """
        if type(msg) is Failed:
            self._emit(msg)
            return False
        if req is not None:
            if req.deadline_ns and now > req.deadline_ns:
                self._count_expired(1)
                reason = f"deadline passed before stage {self.name}"
                self._emit(failed_from(msg, ErrorCode.DEADLINE_EXCEEDED, reason, self.name))
                return False
            req.stamps[self.name] = now
        elif type(msg) is Completed:
            msg.stamps[self.name] = now
        return True

    def _dispatch(self, msg: Message, now: int) -> None:
        if not self._admit(msg, request_of(msg), now):
            return
        stage = self.stage
        assert isinstance(stage, Stage)
        try:
            for out in stage.process(msg):
                self._emit(out)
        except Exception as exc:  # one bad message must not stop the stage
            log.exception("%s: stage error", self.spec.name, extra=_about(msg))
            reason = f"{type(exc).__name__}: {exc}"
            self._emit(failed_from(msg, ErrorCode.STAGE_ERROR, reason, self.name))
        self.processed += 1

    def _dispatch_async(self, msg: Message, now: int) -> None:
        req = request_of(msg)
        if not self._admit(msg, req, now):
            return
        if req is not None and self._is_cancelled(req):
            return
        if self.inflight >= self._max_inflight:
            priority = int(req.priority) if req is not None else 0
            heapq.heappush(self._backlog, (priority, next(self._arrivals), msg))
            return
        self._start(msg, req, now)

    def _is_cancelled(self, req: PromptRequest) -> bool:
        ctl = self.ctl
        if ctl is None or not ctl.cancels(req.reply_to):  # no hash until a cancel exists
            return False
        if ctl.cancelled(req.reply_to, req.request_id):
            self.cancelled += 1
            self.processed += 1
            return True
        return False

    def _start_waiting(self) -> None:
        """Start backlog messages, best priority first, while there is capacity."""
        self._backlog_handle = None
        backlog = self._backlog
        started = False
        while backlog and self.inflight < self._max_inflight:
            _, _, msg = heapq.heappop(backlog)
            req = request_of(msg)
            now = time.monotonic_ns()
            if req is not None:
                if req.deadline_ns and now > req.deadline_ns:
                    self._count_expired(1)
                    reason = f"deadline passed waiting in stage {self.name}"
                    self._emit(failed_from(msg, ErrorCode.DEADLINE_EXCEEDED, reason, self.name))
                    started = True
                    continue
                if self._is_cancelled(req):
                    continue
            self._start(msg, req, now)
            started = True
        if len(backlog) < self._backlog_limit:
            self._capacity_free.set()
        if started:
            self._schedule_flush()

    def _start(self, msg: Message, req: PromptRequest | None, now: int) -> None:
        prev = None
        session = req.session_id if req is not None else None
        if session:
            prev = self._sessions.get(session)
        self.inflight += 1
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

    async def _run_one(self, msg: Message, prev: asyncio.Task[None] | None, started: int) -> None:
        stage = self.stage
        assert isinstance(stage, AsyncStage)
        try:
            if prev is not None and not prev.done():
                # Turns of one session run in order: wait for the previous one.
                await asyncio.wait([prev])
            async for out in stage.handle(msg):
                self._emit(out)
                self._schedule_flush()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task in self._cancelled:
                self.cancelled += 1  # its client has answered the caller already
                return
            if task is not None and task in self._timed_out:
                self._count_expired(1)
                reason = f"stage {self.name} timed out"
                self._emit(failed_from(msg, ErrorCode.DEADLINE_EXCEEDED, reason, self.name))
            else:
                reason = f"stage {self.name} is shutting down"
                self._emit(failed_from(msg, ErrorCode.SHUTTING_DOWN, reason, self.name))
                raise
        except UpstreamError as exc:  # classified already: no traceback, the code says it
            log.warning("%s: %s: %s", self.spec.name, exc.code, exc, extra=_about(msg))
            wait = exc.retry_after_s or 0.0
            self._emit(failed_from(msg, exc.code, str(exc), self.name, wait))
        except Exception as exc:  # one bad message must not stop the stage
            log.exception("%s: stage error", self.spec.name, extra=_about(msg))
            reason = f"{type(exc).__name__}: {exc}"
            self._emit(failed_from(msg, ErrorCode.STAGE_ERROR, reason, self.name))
        finally:
            self.inflight -= 1
            self.processed += 1
            if self._cells is not None:
                took = time.monotonic_ns() - started
                hist = self._hist
                hist[BUCKET_OF_BITS[took.bit_length()]] += 1
                hist[HIST_SUM] += took
            if self._backlog:
                if self._backlog_handle is None:
                    loop = asyncio.get_running_loop()
                    self._backlog_handle = loop.call_soon(self._start_waiting)
            else:
                self._capacity_free.set()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic_ns()
            for task, deadline in list(self._tasks.items()):
                if now > deadline and task not in self._timed_out:
                    self._timed_out.add(task)
                    task.cancel()
            self._sweep_cancels()

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
        kept = []
        for entry in self._backlog:
            req = request_of(entry[2])
            if req is not None and req.reply_to in changed and self._is_cancelled(req):
                continue
            kept.append(entry)
        if len(kept) != len(self._backlog):
            heapq.heapify(kept)
            self._backlog = kept
            if len(kept) < self._backlog_limit:
                self._capacity_free.set()

    # Output

    def _emit(self, msg: Message) -> None:
        if type(msg) is Failed:
            if msg.reply_to < len(self.err_pending):
                self.err_pending[msg.reply_to].append(msg)
            else:
                log.error(
                    "%s: Failed for unknown client %d dropped",
                    self.spec.name,
                    msg.reply_to,
                    extra=_about(msg),
                )
            return
        if self.is_last:
            reply_to = msg.reply_to  # type: ignore[attr-defined]
            if reply_to < len(self.pending):
                self.pending[reply_to].append(msg)
            else:
                log.error(
                    "%s: reply for unknown client %d dropped",
                    self.spec.name,
                    reply_to,
                    extra=_about(msg),
                )
            return
        n = len(self.pending)
        self.pending[0 if n == 1 else shard_for(message_key(msg), n)].append(msg)

    def _has_pending(self) -> bool:
        return any(self.pending) or (self.err_pending is not self.pending and any(self.err_pending))

    def _schedule_flush(self) -> None:
        if self._eager:
            return  # the pump flushes after the batch it is dispatching
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        # One writer per ring at a time: the pumps of several input rings and the
        # flush task share these output rings, and two coroutines blocked in put()
        # on one ring would break its single-producer protocol and reorder batches.
        async with self._flush_lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        # Non-blocking writes to every destination first, so one full ring
        # never holds up the others (head-of-line blocking); then wait.
        waiting: list[tuple[Ring, list[tuple[bytes, list[Message]]], bool, bool]] = []
        groups = [(self.outputs, self.pending, self.shed, False)]
        if self.err_pending is not self.pending:
            groups.append((self.errors, self.err_pending, False, True))
        for rings, pending, shed, errors in groups:
            for i, msgs in enumerate(pending):
                if not msgs:
                    continue
                pending[i] = []
                ring = rings[i]
                records = self._records(ring, msgs)
                written = ring.put_many([record for record, _ in records])
                if written < len(records):
                    waiting.append((ring, records[written:], shed, errors))
        for ring, records, shed, errors in waiting:
            for record, msgs in records:
                await self._write(ring, record, msgs, shed=shed, errors=errors)

    def _records(self, ring: Ring, msgs: list[Message]) -> list[tuple[bytes, list[Message]]]:
        records, too_large = pack_records(self.encoder.encode, msgs, ring.max_record)
        for msg in too_large:
            reason = f"message exceeds ring {ring.name}'s max record of {ring.max_record} bytes"
            self._emit(failed_from(msg, ErrorCode.TOO_LARGE, reason, self.name))
        return records

    async def _write(
        self, ring: Ring, record: bytes, msgs: list[Message], *, shed: bool, errors: bool
    ) -> None:
        if ring.try_put(record):
            return
        if shed:
            self.shed_count += len(msgs)
            if self._cells is not None:
                self._cells[self._m_shed[ring.name]] += len(msgs)
            edge = edge_label(ring.name)
            for msg in msgs:
                self._emit(failed_from(msg, ErrorCode.RING_FULL, f"ring_full:{edge}", self.name))
            return
        timeout = _ERROR_PUT_TIMEOUT_S if errors else self._block_timeout(msgs)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                await ring.put(record, timeout=max(remaining, 0.0))
                return
            except PeerGone:
                # The supervisor restarts the consumer; wait for its successor.
                if remaining <= 0:
                    break
                await asyncio.sleep(0.05)
            except RingFull:
                break
        if errors:
            log.error("%s: could not deliver %d errors on %s", self.spec.name, len(msgs), ring.name)
            return
        self._count_expired(len(msgs))
        reason = f"ring {ring.name} stayed full past the deadline"
        for msg in msgs:
            self._emit(failed_from(msg, ErrorCode.DEADLINE_EXCEEDED, reason, self.name))

    def _count_expired(self, n: int) -> None:
        self.expired += n
        if self._cells is not None:
            self._cells[self._m_expired] += n

    def _block_timeout(self, msgs: list[Message]) -> float:
        now = time.monotonic_ns()
        best = self.block_timeout_s
        for msg in msgs:
            req = request_of(msg)
            if req is not None and req.deadline_ns:
                best = min(best, (req.deadline_ns - now) / 1e9)
        return max(best, 0.0)
