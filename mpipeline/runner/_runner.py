"""StageRunner: the lifecycle of a replica, its input pumps, admission and dispatch.

One pump per input ring reads records in batches and decodes each one (a
msgpack array of messages) straight from shared memory. Every message is
admitted first: a ``Failed`` passes through to its client, a request whose
deadline has passed is answered ``deadline_exceeded`` before the stage sees
it, and the rest are stamped with the time this stage received them. Then a
sync stage's ``process`` runs inline, an exception in it becoming a ``Failed``
for that request only, or an async stage's message goes to the task pool.
After each batch the outbox writes what the batch produced.

This is the hottest code of the project: every message of every stage passes
through the loop in ``_pump`` and the dispatcher it calls. The dispatchers are
closures over locals, built once per pump, and the loop binds what it calls
per message to locals too: an attribute lookup or a method call per message
is measurable (``bench/metrics_stage_cost.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from mpipeline.codec import Codec
from mpipeline.config import PipelineConfig
from mpipeline.control import ControlBlock
from mpipeline.errors import DecodeError, ErrorCode, RingCorrupted, RingEmpty, RingPoisoned
from mpipeline.messages import (
    EDGE_TYPES,
    Completed,
    Failed,
    Message,
    PromptRequest,
    failed_from,
    request_of,
)
from mpipeline.metrics.block import Writer
from mpipeline.metrics.schema import BUCKET_OF_BITS, HIST_SUM
from mpipeline.ring import DEFAULT_SPIN_S, Ring
from mpipeline.runner._log import about, log
from mpipeline.runner._meter import Meter
from mpipeline.runner._outbox import Outbox
from mpipeline.runner._pool import TaskPool
from mpipeline.runner._sink import Sink
from mpipeline.stages.base import AsyncStage, BaseStage, Stage
from mpipeline.topology import ReplicaSpec

# How long an idle pump sleeps on its doorbell before re-checking for a stop.
_IDLE_WAIT_S = 0.25


def spin_seconds(spin_us: int | str, *, own_cores: bool) -> float:
    """How long this replica's rings busy-poll before parking (a stage's ``spin_us``).

    "auto" spins only on cores of its own: where replicas share a core, a
    spinning waiter takes the core from the very process it is waiting for.
    """
    if spin_us == "auto":
        return DEFAULT_SPIN_S if own_cores else 0.0
    return int(spin_us) / 1e6


class StageRunner:
    """Everything around one stage replica: ``attach``, ``await run(stop)``, ``close``."""

    def __init__(
        self,
        spec: ReplicaSpec,
        cfg: PipelineConfig,
        stage: BaseStage[Any, Any],
        ctl: ControlBlock | None = None,
        metrics: Writer | None = None,
        sink: Sink | None = None,
    ) -> None:
        """``sink`` replaces the ring outbox: a ``LocalLink`` to the next member of
        this replica's placement group (``_chain.py``)."""
        self.spec = spec
        self.stage = stage
        self.name = spec.stage
        stage_cfg = getattr(cfg.stages, spec.stage)
        self.batch: int = stage_cfg.batch
        self.spin_s = spin_seconds(stage_cfg.spin_us, own_cores=spec.own_cores)
        is_last = spec.next_stage == "client"
        next_cfg = None if is_last else getattr(cfg.stages, spec.next_stage)
        self.meter = Meter(spec, cfg.supervisor.heartbeat_interval_s, ctl, metrics)
        # The edge's policy belongs to the consuming stage; return rings always block.
        self.outbox: Sink = sink or Outbox(
            spec,
            self.meter,
            is_last=is_last,
            shed=next_cfg is not None and next_cfg.full_policy == "shed",
            block_timeout_s=next_cfg.timeout_s if next_cfg is not None else 30.0,
        )
        self.pool: TaskPool | None = None
        if isinstance(stage, AsyncStage):
            limit = getattr(stage_cfg, "concurrency", stage.max_concurrency)
            self.pool = TaskPool(
                spec,
                stage,
                ctl,
                self.outbox,
                self.meter,
                limit=limit,
                read_ahead=max(self.batch, limit),
                timeout_ns=int(stage_cfg.timeout_s * 1e9),
            )
        # Pools whose full backlog stops the pumps: this stage's, and in a
        # placement group the later members' too (no ring between to fill up).
        self.pools: list[TaskPool] = [self.pool] if self.pool is not None else []
        in_type: Any = EDGE_TYPES[spec.stage]
        # The first stage reads requests from clients; assemble does when rag is off.
        self.decoder: Codec[Message] = Codec(in_type | PromptRequest | Failed)
        self.inputs: list[Ring] = []
        self._stopping = False
        # Pumps parked on their doorbell, which a stop cancels at once.
        self._idle: set[asyncio.Task[Any]] = set()

    def entry(self) -> Callable[[Message, int], None]:
        """What takes one message into this stage: admission, then the stage or its pool.

        The pumps build their own; a placement group's ``LocalLink`` calls this one.
        """
        return self._dispatcher() if self.pool is None else self.pool.dispatcher(self._admit)

    @property
    def processed(self) -> int:
        """Messages the stage ran (to any end) or dropped for a cancel, as the beat reports."""
        return self.meter.processed

    # Lifecycle

    def attach(self) -> None:
        self.inputs = [Ring.attach(n, spin_s=self.spin_s) for n in self.spec.inputs]
        self.outbox.attach(spin_s=self.spin_s)

    def close(self) -> None:
        for ring in self.inputs:
            ring.close()
        self.outbox.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then finish what is in hand and flush."""
        pool = self.pool
        self.meter.start()
        sweeper = asyncio.create_task(pool.sweep()) if pool is not None else None
        pumps = [asyncio.create_task(self._pump(r), name=f"pump-{r.name}") for r in self.inputs]
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*pumps, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            self._stopping = self.meter.stopping = True
            for pump in pumps:
                if pump in self._idle:
                    pump.cancel()  # parked on its doorbell: stop now, not at the next tick
            await asyncio.gather(*pumps)
            if pool is not None:
                await pool.drain()
            await self.outbox.finish()
        finally:
            self._stopping = True
            stopper.cancel()
            for t in pumps:
                t.cancel()
            if sweeper is not None:
                sweeper.cancel()
            self.meter.stop()

    # Input

    async def _pump(self, ring: Ring) -> None:
        decode = self.decoder.decode_many
        get_many = ring.get_many
        pool = self.pool
        pools = self.pools
        dispatch = self.entry()
        outbox = self.outbox
        meter = self.meter
        batch = self.batch
        clock = time.monotonic_ns
        # Sync stages are timed here, per message, into the local histogram that
        # each heartbeat publishes; async ones when their handler ends.
        hist = None if pool is not None or meter.cells is None else meter.hist
        while not self._stopping:
            try:
                views = get_many(batch)
            except RingPoisoned:
                raise  # framing is lost: crash, and let the supervisor decide
            except RingCorrupted as exc:
                meter.corrupt += 1  # one bad record, already skipped
                log.error("%s: %s", self.spec.name, exc)
                continue
            if not views:
                view = await self._idle_get(ring)
                if view is None:
                    if self._stopping:
                        return  # stopped while idle: nothing was taken from the ring
                    continue
                views = [view]
            for full in pools:
                if full.saturated():
                    await full.room()
            now = start = clock()
            for view in views:
                try:
                    msgs = decode(view)
                except DecodeError as exc:
                    meter.corrupt += 1
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
                    if now >= meter.next_beat_ns:
                        meter.beat()
            if hist is not None:
                hist[HIST_SUM] += now - start  # the per-message times add up to this
            await outbox.flush()
            # Let the other pumps, the beat timer and the flush task run between batches.
            await asyncio.sleep(0)

    async def _idle_get(self, ring: Ring) -> memoryview | None:
        """Flush, then wait for one record; None after ``_IDLE_WAIT_S`` or a stop.

        One record, not a wake and a whole batch (``Ring.wait_readable`` and
        ``get_many``): a pump that woke once per batch carried a zero-delay
        stream's chunks to its client faster than the client's pause could
        take, and the client cut readers that had not had a turn to read
        (bench/RESULTS.md, "Cheaper hops").
        """
        if self.outbox.has_pending():
            await self.outbox.flush()
        task = asyncio.current_task()
        assert task is not None
        self._idle.add(task)
        try:
            return await ring.get(timeout=_IDLE_WAIT_S)
        except RingEmpty:
            return None
        except asyncio.CancelledError:
            if self._stopping:
                return None
            raise
        finally:
            self._idle.discard(task)

    def _admit(self, msg: Message, req: PromptRequest | None, now: int) -> bool:
        """Deadline check and stamping; False when the message was answered here.

        ``req`` is ``request_of(msg)``, passed in so that callers which need it too
        unwrap it once.
        """
        if type(msg) is Failed:
            self.outbox.emit(msg)
            return False
        if req is not None:
            if req.deadline_ns and now > req.deadline_ns:
                self.meter.count_expired(1)
                reason = f"deadline passed before stage {self.name}"
                self.outbox.emit(failed_from(msg, ErrorCode.DEADLINE_EXCEEDED, reason, self.name))
                return False
            req.stamps[self.name] = now
        elif type(msg) is Completed:
            msg.stamps[self.name] = now
        return True

    def _dispatcher(self) -> Callable[[Message, int], None]:
        """The pump's call per message for a sync stage: admit, process, route.

        Built once per pump, as a closure over locals (see the module docstring).
        """
        stage = self.stage
        assert isinstance(stage, Stage)
        admit = self._admit
        emit = self.outbox.emit
        meter = self.meter
        name = self.name
        replica = self.spec.name

        def dispatch(msg: Message, now: int) -> None:
            if not admit(msg, request_of(msg), now):
                return
            try:
                for out in stage.process(msg):
                    emit(out)
            except Exception as exc:  # one bad message must not stop the stage
                log.exception("%s: stage error", replica, extra=about(msg))
                reason = f"{type(exc).__name__}: {exc}"
                emit(failed_from(msg, ErrorCode.STAGE_ERROR, reason, name))
            meter.processed += 1

        return dispatch
