"""The client's in-flight table: every accepted request until its one outcome.

This is where the promise "exactly one outcome per accepted request" is kept:
a result resolves the request's future, a ``Failed`` (from the pipeline or
made here: deadline passed, replica restarted, supervisor gone, client
cancelled) is written to the dead-letter queue first and only then raised to
the caller, and the entry leaves the table at once, so a late answer finds
nothing to answer twice.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from mpipeline.dlq import DeadLetterQueue, gone_letter, letter_for
from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.messages import Completed, Failed, PromptRequest, StructuredChunk, TokenChunk
from mpipeline.pipeline._chunks import HARD_LIMIT, HIGH_WATER, LOW_WATER, ChunkBuffer
from mpipeline.routing import request_key, shard_for


class ClientMetrics(Protocol):
    """What the client counts, when a gateway replica gives it somewhere to count
    (``gateway.metrics.GatewayMetrics`` is one): defined here, so that the client
    library never imports the gateway."""

    def shed(self, edge: str, n: int) -> None: ...
    def first_token(self, accepted_ns: int) -> None: ...
    def failed(self, stage: str, code: str) -> None: ...


class Board(Protocol):
    """The control block's pause and cancel boards, as the table uses them."""

    def pause(self, client: int, request_id: str) -> None: ...
    def resume(self, client: int, request_id: str) -> None: ...
    def cancel(self, client: int, request_id: str) -> None: ...


@dataclass(slots=True)
class Pending:
    request: PromptRequest
    deadline_ns: int
    future: asyncio.Future[Completed]
    accepted_ns: int
    chunks: ChunkBuffer | None = None
    # Set for requests with their own deadline_ms; the rest expire in submit order.
    custom_deadline: bool = False
    route: dict[str, int] = field(default_factory=dict)
    # The submit-order queue of its default timeout, which it leaves when it ends.
    queue: dict[str, Pending] | None = None


class Inflight:
    """Accepted requests by id, their deadlines, and how each one ends."""

    def __init__(self, stats: dict[str, int]) -> None:
        self.pending: dict[str, Pending] = {}
        self.stats = stats
        # Requests on a default timeout, one queue per timeout (ns): in submit order,
        # so in deadline order too, and expiry stops at the first live one. Streams
        # and plain requests have defaults of their own (an hour against minutes).
        self._queues: dict[int, dict[str, Pending]] = {}
        # Requests with their own deadline, as (deadline_ns, request id).
        self._deadlines: list[tuple[int, str]] = []
        self.dlq: DeadLetterQueue | None = None
        self.metrics: ClientMetrics | None = None
        # This client's slot (every Failed made here goes to it) and request-id prefix.
        self.reply_to = 0
        self.prefix = ""
        # Where pauses and cancels are posted (the run's control block), once attached.
        self.board: Board | None = None
        # Streams paused because their reader is behind, by request id.
        self.paused: dict[str, Pending] = {}

    def add(self, pending: Pending, timeout_ns: int = 0) -> None:
        """Track ``pending`` until its outcome; ``timeout_ns`` is the default timeout it
        is on (the queue it expires in), unless it has a deadline of its own."""
        rid = pending.request.request_id
        self.pending[rid] = pending
        if pending.custom_deadline:
            heap = self._deadlines
            heapq.heappush(heap, (pending.deadline_ns, rid))
            # Ended requests stay in the heap until their deadline: with deadlines of
            # up to an hour, sweep them out once they outnumber the live ones.
            if len(heap) > 2 * len(self.pending) + 1024:
                self._deadlines = [e for e in heap if e[1] in self.pending]
                heapq.heapify(self._deadlines)
            return
        queue = self._queues.get(timeout_ns)
        if queue is None:
            queue = self._queues[timeout_ns] = {}
        queue[rid] = pending
        pending.queue = queue

    def failed(
        self,
        request_id: str,
        session_id: str | None,
        code: ErrorCode,
        reason: str,
        stage: str = "client",
    ) -> Failed:
        return Failed(
            request_id=request_id,
            session_id=session_id,
            reply_to=self.reply_to,
            code=code,
            reason=reason,
            stage=stage,
        )

    # Outcomes

    def deliver(self, msg: TokenChunk | Completed | Failed) -> None:
        """A chunk, result or error that came back on one of our rings."""
        pending = self.pending.get(msg.request_id)
        if pending is None:
            if not isinstance(msg, TokenChunk) and not msg.request_id.startswith(self.prefix):
                self._client_gone(msg)
            else:
                self.stats["late"] += 1  # already answered (expired, restarted): never twice
            return
        if type(msg) is TokenChunk or type(msg) is StructuredChunk:
            chunks = pending.chunks
            if chunks is not None and chunks.put(msg) >= HIGH_WATER:
                self._behind(pending, chunks)
            if msg.index == 0 and self.metrics is not None:
                self.metrics.first_token(pending.accepted_ns)
            return
        if type(msg) is Completed:
            del self.pending[msg.request_id]
            if pending.queue is not None:
                del pending.queue[msg.request_id]
            if pending.chunks is not None and pending.chunks.paused_ns:
                self._unpause(pending, pending.chunks)
            self.stats["completed"] += 1
            future = pending.future
            if not future.done():  # done: the caller cancelled its wait
                future.set_result(msg)
        else:
            assert isinstance(msg, Failed)
            self._dead_letter(pending, msg)

    def resolve_failed(self, failed: Failed) -> None:
        pending = self.pending.get(failed.request_id)
        if pending is not None:
            self._dead_letter(pending, failed)

    def _dead_letter(self, pending: Pending, failed: Failed) -> None:
        """End an accepted request in ``failed``: its DLQ record first, then the error.

        The entry leaves the in-flight table at once, so whatever arrives for
        it while the record is written finds nothing to answer twice. The
        caller hears of the error only once the record is fsynced: an error a
        client saw always has its record, even if this process dies next.
        """
        del self.pending[failed.request_id]
        if pending.queue is not None:
            del pending.queue[failed.request_id]
        chunks = pending.chunks
        if chunks is not None and chunks.paused_ns:
            self._unpause(pending, chunks)
        self.stats["failed"] += 1
        if self.metrics is not None:
            self.metrics.failed(failed.stage, failed.code)
        answer = functools.partial(_answer_failed, pending.future, failed)
        if self.dlq is None:  # never started: nothing was accepted through a ring
            answer(None)
            return
        budget_ms = (pending.deadline_ns - pending.accepted_ns) / 1e6
        letter = letter_for(pending.request, failed, budget_ms)
        self.dlq.record((letter,)).add_done_callback(answer)

    def _client_gone(self, msg: Completed | Failed) -> None:
        """An outcome for a request of an earlier process on this slot (its client is gone)."""
        self.stats["gone"] += 1
        if self.dlq is not None:
            self.dlq.record((gone_letter(msg),))

    # Slow readers

    def _behind(self, pending: Pending, chunks: ChunkBuffer) -> None:
        """A stream's reader is ``HIGH_WATER`` chunks behind: pause it, or cut it."""
        if len(chunks) > HARD_LIMIT:
            self.cut(pending, f"the reader fell {len(chunks)} chunks behind")
        elif not chunks.paused_ns:
            chunks.paused_ns = time.monotonic_ns()
            rid = pending.request.request_id
            self.paused[rid] = pending
            if self.board is not None:
                self.board.pause(self.reply_to, rid)

    def taken(self, pending: Pending, chunks: ChunkBuffer) -> None:
        """The reader took a chunk: a paused stream goes on once it is down to ``LOW_WATER``."""
        if chunks.paused_ns and len(chunks) <= LOW_WATER:
            self._unpause(pending, chunks)

    def _unpause(self, pending: Pending, chunks: ChunkBuffer) -> None:
        chunks.paused_ns = 0
        rid = pending.request.request_id
        self.paused.pop(rid, None)
        if self.board is not None:
            self.board.resume(self.reply_to, rid)

    def cut_stalled(self, cutoff_ns: int, stall_s: float) -> None:
        """Cut the streams paused since before ``cutoff_ns``: their readers stalled."""
        for pending in list(self.paused.values()):
            chunks = pending.chunks
            if chunks is not None and chunks.paused_ns and chunks.paused_ns < cutoff_ns:
                self.cut(pending, f"the reader took nothing for {stall_s:g} s")

    def cut(self, pending: Pending, reason: str) -> None:
        """End a stream whose reader does not read: ``slow_client``, and stop its work."""
        rid = pending.request.request_id
        if self.board is not None:
            self.board.cancel(self.reply_to, rid)
        if pending.chunks is not None:
            pending.chunks.clear()  # its reader gets the error next, not a backlog first
        failed = self.failed(rid, pending.request.session_id, ErrorCode.SLOW_CLIENT, reason)
        self.resolve_failed(failed)

    def fail_all(self, code: ErrorCode, reason: str) -> None:
        self.fail_where(lambda _: True, code, reason)

    def fail_where(
        self, hit: Callable[[Pending], bool], code: ErrorCode, reason: str, stage: str = "client"
    ) -> None:
        """Fail every request in flight for which ``hit`` is true."""
        for rid, p in list(self.pending.items()):
            if hit(p):
                self.resolve_failed(self.failed(rid, p.request.session_id, code, reason, stage))

    def fail_through(self, stage: str, index: int, replicas: int) -> None:
        """Fail every in-flight request whose route passes the replaced replica."""
        reason = f"replica {stage}-{index} was restarted while holding this request"

        def routed_there(p: Pending) -> bool:
            return shard_for(request_key(p.request, stage), replicas) == index

        self.fail_where(routed_there, ErrorCode.STAGE_RESTARTED, reason, stage)

    # Deadlines

    def expire(self, cutoff: int) -> None:
        """Fail the requests whose deadline is before ``cutoff`` (monotonic ns)."""
        reason = "no answer before the deadline"
        for rid in self._expired(cutoff):
            session = self.pending[rid].request.session_id
            self.resolve_failed(self.failed(rid, session, ErrorCode.DEADLINE_EXCEEDED, reason))

    def _expired(self, cutoff: int) -> Iterable[str]:
        """In-flight requests whose deadline is before ``cutoff``, without a full scan.

        Requests on a default timeout expire in submit order, the order of their
        queue: scan each from the front and stop at the first live one. Requests
        with their own deadline sit in a heap.
        """
        out = []
        for queue in self._queues.values():
            for rid, p in queue.items():
                if p.deadline_ns > cutoff:
                    break
                out.append(rid)
        heap = self._deadlines
        while heap and heap[0][0] <= cutoff:
            _, rid = heapq.heappop(heap)
            if rid in self.pending:
                out.append(rid)
        return out


def _answer_failed(future: asyncio.Future[Completed], failed: Failed, _recorded: object) -> None:
    if not future.done():  # done: the caller cancelled its wait
        future.set_exception(RequestFailed(failed))
