"""Pipeline: the library face of mpipeline (the reference's ``spawn_pipeline``).

``async with Pipeline(config) as p`` starts a supervisor for ``config`` and
plays the gateway's part in the calling process: it claims a client slot,
writes requests to the first stage's rings and reads results, chunks and
errors from its return and error rings. ``Pipeline.attach(run_dir)`` joins a
supervisor that is already running instead (``_launch.py`` does both).

The client owns the promise that every accepted request ends in exactly one
outcome: it keeps an in-flight table with deadlines, fails requests whose
replica the supervisor replaced (the control block's generation counter)
with ``stage_restarted``, and fails everything if the supervisor goes away.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, Self, Unpack

from mpipeline.codec import Codec
from mpipeline.config import PipelineConfig
from mpipeline.control import ControlBlock, ReplicaState, RequestCounts, RunState
from mpipeline.dlq import DLQ_FILE, DeadLetterQueue
from mpipeline.errors import ErrorCode, MPipelineError, RequestFailed, RingEmpty
from mpipeline.messages import Completed, PromptRequest, ToGateway, TokenChunk
from mpipeline.pipeline import limits
from mpipeline.pipeline._chunks import ChunkBuffer
from mpipeline.pipeline._inflight import ClientMetrics, Inflight, Pending
from mpipeline.pipeline._launch import Launched, claim_slot, wait_for_state
from mpipeline.pipeline._options import DEFAULT, RequestFields, RequestOptions, merged
from mpipeline.pipeline._outbox import Outbox
from mpipeline.ring import Ring
from mpipeline.rundir import RunInfo

# The client answers a request itself this long after its deadline, so the
# pipeline's own, more specific, expiry error normally arrives first.
DEADLINE_GRACE_S = 0.25
_WATCH_S = 0.02
# Room left in a record for everything in a request but its input text (at
# most a quarter of the record, so small rings still take short prompts).
_ENVELOPE_BYTES = 4096
_IDLE_WAIT_S = 0.25
# Requests waiting this long with no ring write at all: the client path is
# stuck, and /readyz says so (a full ring normally drains or sheds sooner).
STUCK_AFTER_S = 10.0
# How long a stream may stay paused for its reader before it is cut.
STALL_TIMEOUT_S = 30.0


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig | str | os.PathLike[str] | None = None,
        *,
        run_dir: str | os.PathLike[str] | None = None,
        timeout_s: float = 30.0,
        boot_timeout_s: float = 60.0,
    ) -> None:
        self._config_arg = config
        self._run_dir_arg = Path(run_dir) if run_dir is not None else None
        # The deadline of a request that names none; streams may get their own
        # (the gateway sets both from gateway.timeout_s and stream_timeout_s).
        self.timeout_s = timeout_s
        self.stream_timeout_s: float | None = None
        self.boot_timeout_s = boot_timeout_s
        # A stream whose reader takes nothing for this long is cut ``slow_client``
        # (``_chunks.py``); the gateway sets its ``stall_timeout_s`` here.
        self.stall_timeout_s = STALL_TIMEOUT_S
        self._owns_supervisor = True
        self._launched: Launched | None = None
        self._rings: list[Ring] = []
        self._ingress: list[Ring] = []
        self.stats = {"submitted": 0, "completed": 0, "failed": 0, "late": 0, "gone": 0}
        self._table = Inflight(self.stats)
        # The table's requests by id (the name tests and tools look at).
        self._inflight = self._table.pending
        self._outbox: Outbox | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._input_limit = 0
        self._counts_base = self._counts_sent = RequestCounts(0, 0, 0, 0)
        self._ctl: ControlBlock | None = None
        self._slot_fd = -1
        self._info: RunInfo | None = None
        self._slot: int | None = None
        self._ids = itertools.count()
        self._prefix = ""
        self._closed = False
        self._decoder: Codec[Any] = Codec(ToGateway)

    def use_metrics(self, metrics: ClientMetrics) -> None:
        """Count errors, first tokens and sheds in a gateway replica's metrics region."""
        self._table.metrics = metrics

    @classmethod
    def attach(cls, run_dir: str | os.PathLike[str], *, timeout_s: float = 30.0) -> Pipeline:
        """A Pipeline that joins the supervisor already running in ``run_dir``.

        It takes a free API client slot (``gateway.api_clients`` of them).
        """
        p = cls(None, run_dir=run_dir, timeout_s=timeout_s)
        p._owns_supervisor = False
        return p

    @classmethod
    def for_gateway(cls, info: RunInfo, client: int, *, timeout_s: float = 30.0) -> Pipeline:
        """The client of gateway replica ``client``, from the supervisor's own state.

        A gateway boots before ``state.json`` exists (it is written once every
        replica is ready), so the supervisor hands it the same description.
        """
        p = cls(None, run_dir=info.run_dir, timeout_s=timeout_s)
        p._owns_supervisor = False
        p._info = info
        p._slot = client
        return p

    # Lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start (or join) the supervisor and take a client slot.

        A start that fails releases what it had taken (the supervisor it
        started, its captured stderr, rings and slot) before it raises.
        """
        try:
            if self._owns_supervisor:
                self._launched, self._run_dir_arg = Launched.start(
                    self._config_arg, self._run_dir_arg
                )
            assert self._run_dir_arg is not None
            info = self._info or await wait_for_state(
                self._run_dir_arg, self._launched, self.boot_timeout_s
            )
            self._connect(info)
            self._table.dlq = DeadLetterQueue(self._run_dir_arg / DLQ_FILE)
        except BaseException:
            await self.close()
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._receive(r)) for r in self._rings_in]
        self._tasks.append(loop.create_task(self._watch()))

    def _connect(self, info: RunInfo) -> None:
        topo = info.topology
        clients = list(topo.clients)
        assert self._run_dir_arg is not None
        n_gateways = len(topo.gateways)
        if self._slot is not None:
            candidates = [clients[self._slot]]
        else:
            candidates = clients[n_gateways:]  # the gateways' slots are theirs alone
        spec, self._slot_fd = claim_slot(self._run_dir_arg, candidates, self._slot)
        self._client = spec
        self._stages = list(topo.stages)
        self._replica_slots = {(r.stage, r.index): r.slot for r in topo.replicas}
        self._ctl = ControlBlock.attach(info.control)
        self._table.board = self._ctl
        self._generations = self._ctl.generations()
        self._ingress = [Ring.attach(n) for n in spec.ingress]
        self._rings_in = [Ring.attach(n) for n in (*spec.returns, *spec.errors)]
        self._rings = [*self._ingress, *self._rings_in]
        self._outbox = Outbox(self._ingress, self._stages[0][0], self._table)
        max_record = self._ingress[0].max_record
        self._input_limit = max_record - min(_ENVELOPE_BYTES, max_record // 4)
        # pid, slot and a per-client nonce: a later client in the same process on
        # the same slot must never take a late result for one of its own.
        self._prefix = f"{os.getpid():x}{spec.index}{secrets.token_hex(2)}-"
        self._table.reply_to = spec.index
        self._ctl.clear_pauses(spec.index)  # an earlier client's pauses end with it
        # Counts go on from an earlier client's on this slot; what it still held
        # when it went away ended without an answer from here: failed.
        old = self._ctl.request_counts(spec.index)
        self._counts_base = RequestCounts(
            old.accepted, old.completed, old.failed + old.in_flight, 0
        )
        self._publish_counts()
        self._table.prefix = self._prefix

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._table.fail_all(ErrorCode.SHUTTING_DOWN, "the client closed")
        if self._table.dlq is not None:
            await self._table.dlq.aclose()  # those failures are recorded before we exit
        if self._ctl is not None:
            self._publish_counts()
        for ring in self._rings:
            ring.close()
        if self._ctl is not None:
            self._ctl.close()
        if self._slot_fd >= 0:
            os.close(self._slot_fd)
        if self._launched is not None:
            await self._launched.stop()

    @property
    def supervisor_pid(self) -> int | None:
        return self._ctl.supervisor_pid if self._ctl is not None else None

    @property
    def run_dir(self) -> Path | None:
        return self._run_dir_arg

    # Requests

    def _new_request(self, text: str, opts: RequestOptions, stream: bool) -> Pending:
        if self._closed or self._ctl is None:
            raise MPipelineError("the pipeline client is closed")
        session_id = opts.session_id
        if self._ctl.raw_state != RunState.RUNNING:
            raise RequestFailed(
                self._table.failed(
                    "",
                    session_id,
                    ErrorCode.SHUTTING_DOWN,
                    f"the pipeline is {self._ctl.state.name.lower()}",
                )
            )
        if opts is not DEFAULT or len(text) * 4 > self._input_limit:
            refused = limits.refusal(text, opts, self._input_limit)
            if refused is not None:
                raise RequestFailed(self._table.failed("", session_id, *refused))
        now = time.monotonic_ns()
        deadline_ms = opts.deadline_ms
        if deadline_ms is not None:
            timeout = deadline_ms / 1000.0
        elif stream and self.stream_timeout_s is not None:
            timeout = self.stream_timeout_s
        else:
            timeout = self.timeout_s
        req = PromptRequest(
            request_id=f"{self._prefix}{next(self._ids)}",
            session_id=session_id,
            input=text,
            metadata=opts.metadata or {},
            priority=opts.priority,
            deadline_ns=now + int(timeout * 1e9),
            reply_to=self._client.index,
            stream=stream,
            max_tokens=opts.max_tokens,
            history=list(opts.history or ()),
            params=opts.params or b"",
            input_raw=opts.input_raw or b"",
            model=opts.model or "",
            endpoint=opts.endpoint or "",
        )
        loop = asyncio.get_running_loop()
        chunks = ChunkBuffer() if stream else None
        pending = Pending(req, req.deadline_ns, loop.create_future(), now, chunks)
        pending.custom_deadline = deadline_ms is not None
        self._table.add(pending, int(timeout * 1e9))
        self.stats["submitted"] += 1
        assert self._outbox is not None
        self._outbox.put(req, loop)
        return pending

    async def submit(
        self, text: str, options: RequestOptions | None = None, /, **fields: Unpack[RequestFields]
    ) -> Completed:
        """Run one request through the pipeline and return its result.

        ``options`` (or the same fields as keywords) say how; see ``RequestOptions``.

        :raises RequestFailed: when the request ended in an explicit error
            (shed, expired, stage error, replica restarted, shutting down).
        """
        pending = self._new_request(text, merged(options, fields), False)
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller gave up (an HTTP client hung up): stop the work too.
            self.cancel(pending.request.request_id)
            raise

    def submit_nowait(
        self, text: str, options: RequestOptions | None = None, /, **fields: Unpack[RequestFields]
    ) -> asyncio.Future[Completed]:
        """Send one request and return the future of its result, without awaiting it.

        For load generators that keep thousands of requests in flight: a future
        plus a done callback costs far less than a coroutine per request. The
        future fails with ``RequestFailed`` as ``submit`` would raise it.
        Must be called from the event loop that started the client.

        :raises RequestFailed: at once, when the request cannot be accepted
            (invalid, or the pipeline is not running).
        :raises MPipelineError: if the client is closed.
        """
        return self._new_request(text, merged(options, fields), False).future

    async def stream(
        self, text: str, options: RequestOptions | None = None, /, **fields: Unpack[RequestFields]
    ) -> AsyncIterator[TokenChunk]:
        """Yield token chunks as the model makes them; ends when the request completes.

        :raises RequestFailed: as ``submit``, possibly after some chunks.
        """
        async for event in self.stream_events(text, merged(options, fields)):
            if isinstance(event, TokenChunk):
                yield event

    async def stream_events(
        self, text: str, options: RequestOptions | None = None, /, **fields: Unpack[RequestFields]
    ) -> AsyncGenerator[TokenChunk | Completed, None]:
        """Like ``stream``, then the final ``Completed`` (usage, finish reason, timings).

        An iterator closed early (a client that left) cancels the request:
        see ``cancel``.

        :raises RequestFailed: as ``submit``, possibly after some chunks.
        """
        pending = self._new_request(text, merged(options, fields), True)
        chunks = pending.chunks
        assert chunks is not None
        future = pending.future
        taken = self._table.taken
        try:
            while True:
                chunk = chunks.take()
                if chunk is not None:
                    if chunks.paused_ns:
                        taken(pending, chunks)
                    yield chunk
                    continue
                if future.done():
                    yield future.result()  # raises RequestFailed
                    return
                await chunks.wait(future)  # type: ignore[arg-type]
        finally:
            if not future.done():
                self.cancel(pending.request.request_id)
                future.add_done_callback(_retrieve)

    def cancel(
        self,
        request_id: str,
        reason: str = "the client went away",
        code: ErrorCode = ErrorCode.CLIENT_CANCELLED,
    ) -> bool:
        """Give up on a request in flight: answer it ``code`` and stop its work.

        Stages skip a cancelled request and an inference shard stops streaming
        it at the next chunk (the control block's cancel board), so a client
        that hangs up stops spending model time. ``code`` says why in the DLQ
        record: ``client_cancelled`` (the caller left), ``slow_client`` (it
        stopped reading). False when the request has already ended.
        """
        pending = self._inflight.get(request_id)
        if pending is None:
            return False
        if code is ErrorCode.SLOW_CLIENT:
            self._table.cut(pending, reason)
            return True
        if self._ctl is not None:
            self._ctl.cancel(self._client.index, request_id)
        session = pending.request.session_id
        self._table.resolve_failed(self._table.failed(request_id, session, code, reason))
        return True

    @property
    def ready(self) -> bool:
        """True while the supervisor runs and every replica is up (``/readyz``)."""
        return self.not_ready() is None

    def not_ready(self) -> str | None:
        """Why this client should get no traffic (``/readyz``), or None when it should."""
        ctl = self._ctl
        if ctl is None or self._closed:
            return "the pipeline client is closed"
        if not ctl.supervisor_alive():
            return "the supervisor is gone"
        if ctl.raw_state != RunState.RUNNING:
            return f"the pipeline is {ctl.state.name.lower()}"
        for (stage, index), slot in self._replica_slots.items():
            state = ctl.replica_state(slot)
            if state != ReplicaState.READY:
                return f"replica {stage}-{index} is {_state_name(state)}"
        return self._client_path_problem()

    def _publish_counts(self) -> None:
        """Put this client's request counts where /metrics reads them (invariant I6).

        Taken at one instant of the loop, so accepted = completed + failed +
        in flight holds in every published set, and in every scrape.
        """
        stats, base = self.stats, self._counts_base
        counts = RequestCounts(
            base.accepted + stats["submitted"],
            base.completed + stats["completed"],
            base.failed + stats["failed"],
            len(self._inflight),
        )
        if counts != self._counts_sent and self._ctl is not None:
            self._ctl.publish_requests(self._client.index, counts)
            self._counts_sent = counts

    def _client_path_problem(self) -> str | None:
        """Why this client's own path is stuck (issue 15: a wedged client stayed "ready")."""
        for task in self._tasks:
            if task.done():
                return "the pipeline client's result loop has stopped"
        assert self._outbox is not None
        stalled = self._outbox.stalled_s()
        if stalled > STUCK_AFTER_S:
            return f"requests have waited {stalled:.0f} s for the first stage's ring"
        return None

    @property
    def inflight(self) -> int:
        """Requests accepted and not yet answered."""
        return len(self._inflight)

    @property
    def client_index(self) -> int:
        """This client's slot: the ``reply_to`` of its requests."""
        return self._client.index

    # Results

    async def _receive(self, ring: Ring) -> None:
        decode = self._decoder.decode_many
        deliver = self._table.deliver
        while True:
            views = ring.get_many(256)
            if not views:
                try:
                    views = [await ring.get(timeout=_IDLE_WAIT_S)]
                except RingEmpty:
                    continue
            for view in views:
                for msg in decode(view):
                    deliver(msg)

    async def _watch(self) -> None:
        """Deadlines, replaced replicas and a vanished supervisor, every 20 ms."""
        ctl = self._ctl
        assert ctl is not None
        grace = int(DEADLINE_GRACE_S * 1e9)
        while True:
            await asyncio.sleep(_WATCH_S)
            now = time.monotonic_ns()
            self._table.expire(now - grace)
            self._publish_counts()
            if self._table.paused:
                stall = self.stall_timeout_s
                self._table.cut_stalled(now - int(stall * 1e9), stall)
            gens = ctl.generations()
            if gens != self._generations:
                replicas = dict(self._stages)
                for (stage, index), slot in self._replica_slots.items():
                    if gens[slot] != self._generations[slot]:
                        self._table.fail_through(stage, index, replicas[stage])
                self._generations = gens
            state = ctl.state
            if state in (RunState.STOPPED, RunState.FATAL) or not ctl.supervisor_alive():
                reason = f"the pipeline is {state.name.lower()}"
                self._table.fail_all(ErrorCode.SHUTTING_DOWN, reason)


def _state_name(value: int) -> str:
    try:
        return ReplicaState(value).name.lower()
    except ValueError:
        return f"in state {value}"


def _retrieve(future: asyncio.Future[Completed]) -> None:
    """Mark an abandoned request's outcome as seen, so asyncio logs nothing."""
    if not future.cancelled():
        future.exception()
