"""The client's way in: requests batched per first-stage replica, written once per loop turn.

Requests submitted in one turn of the event loop go out together, one record
per first-stage replica (the ring's ``put_many``), so a client with thousands
of requests in flight pays one ring write per batch, not per request. A full
ring does not drop anything: the rest waits (``block``) up to the soonest
deadline of its batch, then those requests end ``ring_full`` with their DLQ
record, like a shed inside the pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from mpipeline.codec import pack_records
from mpipeline.errors import ErrorCode, RingFull
from mpipeline.messages import PromptRequest
from mpipeline.pipeline._inflight import Inflight
from mpipeline.ring import Ring
from mpipeline.routing import request_key, shard_for
from mpipeline.topology import edge_label

log = logging.getLogger("mpipeline.pipeline")


class Outbox:
    """Requests waiting to be written to the first stage's rings, one list per replica."""

    def __init__(self, ingress: list[Ring], first_stage: str, table: Inflight) -> None:
        self._ingress = ingress
        self._first_stage = first_stage
        self._table = table
        self._batches: list[list[PromptRequest]] = [[] for _ in ingress]
        self._encode = msgspec.msgpack.Encoder().encode
        self._flush_handle: asyncio.Handle | None = None
        self._flushing: asyncio.Task[None] | None = None
        # Since when requests have waited with no write at all (0: none wait).
        self._stalled_since_ns = 0

    def put(self, req: PromptRequest, loop: asyncio.AbstractEventLoop) -> None:
        """Queue ``req`` for its replica (by the routing key); written this loop turn."""
        n = len(self._batches)
        self._batches[0 if n == 1 else shard_for(request_key(req, self._first_stage), n)].append(
            req
        )
        if not self._stalled_since_ns:
            self._stalled_since_ns = time.monotonic_ns()
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)

    def stalled_s(self) -> float:
        """Seconds the oldest waiting request has waited with no ring write at all.

        A healthy outbox writes within a loop turn; a full first-stage ring
        holds it up to the requests' deadlines. Longer means the client path
        is stuck (``/readyz`` turns red).
        """
        since = self._stalled_since_ns
        return 0.0 if not since else (time.monotonic_ns() - since) / 1e9

    def _progress(self) -> None:
        self._stalled_since_ns = time.monotonic_ns() if any(self._batches) else 0

    def _flush(self) -> None:
        self._flush_handle = None
        if self._flushing is not None and not self._flushing.done():
            return  # the running flush picks these up
        for i, batch in enumerate(self._batches):
            if not batch:
                continue
            # Taken off first: whatever happens below, nothing stays at the head.
            self._batches[i] = []
            try:
                records = self._records(batch)
            except Exception:  # one bad batch must not wedge the client
                log.exception("pipeline client: could not pack %d requests", len(batch))
                self._fail(batch, ErrorCode.INTERNAL, "the client could not send the request")
                continue
            written = self._ingress[i].put_many([record for record, _ in records])
            if written < len(records):
                self._batches[i] = [req for _, part in records[written:] for req in part]
                self._flushing = asyncio.get_running_loop().create_task(self._flush_slow())
                if written:
                    self._stalled_since_ns = time.monotonic_ns()
                return
        self._progress()

    def _records(self, batch: list[PromptRequest]) -> list[tuple[bytes, list[PromptRequest]]]:
        """``batch`` as records; a request that cannot be written is answered now."""
        max_record = self._ingress[0].max_record
        records, too_large, unencodable = pack_records(self._encode, batch, max_record)
        if too_large:
            reason = f"the request exceeds the ring's record limit of {max_record} bytes"
            self._fail(too_large, ErrorCode.TOO_LARGE, reason)
        for req, why in unencodable:
            self._fail([req], ErrorCode.INVALID_REQUEST, f"the request {why}")
        return records

    def _fail(self, reqs: list[PromptRequest], code: ErrorCode, reason: str) -> None:
        table = self._table
        for req in reqs:
            table.resolve_failed(table.failed(req.request_id, req.session_id, code, reason))

    async def _flush_slow(self) -> None:
        """The first stage's ring is full: wait (block) up to each batch's deadline."""
        while any(self._batches):
            for i, batch in enumerate(self._batches):
                if not batch:
                    continue
                self._batches[i] = []
                ring = self._ingress[i]
                for record, part in self._records(batch):
                    soonest = min(r.deadline_ns for r in part)
                    timeout = max(0.0, (soonest - time.monotonic_ns()) / 1e9)
                    try:
                        await ring.put(record, timeout=timeout)
                    except RingFull:
                        self._shed(ring, part)
                    self._stalled_since_ns = time.monotonic_ns()
        self._progress()

    def _shed(self, ring: Ring, part: list[PromptRequest]) -> None:
        edge = edge_label(ring.name)
        table = self._table
        if table.metrics is not None:
            table.metrics.shed(edge, len(part))
        reason = f"ring_full:{edge}"
        for req in part:
            failed = table.failed(req.request_id, req.session_id, ErrorCode.RING_FULL, reason)
            table.resolve_failed(failed)
