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
import time

import msgspec

from mpipeline.codec import pack_records
from mpipeline.errors import ErrorCode, RingFull
from mpipeline.messages import PromptRequest
from mpipeline.pipeline._inflight import Inflight
from mpipeline.ring import Ring
from mpipeline.routing import request_key, shard_for
from mpipeline.topology import edge_label


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

    def put(self, req: PromptRequest, loop: asyncio.AbstractEventLoop) -> None:
        """Queue ``req`` for its replica (by the routing key); written this loop turn."""
        n = len(self._batches)
        self._batches[0 if n == 1 else shard_for(request_key(req, self._first_stage), n)].append(
            req
        )
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._flushing is not None and not self._flushing.done():
            return  # the running flush picks these up
        for i, batch in enumerate(self._batches):
            if not batch:
                continue
            records = self._records(batch)
            written = self._ingress[i].put_many([record for record, _ in records])
            if written == len(records):
                self._batches[i] = []
            else:
                self._batches[i] = [req for _, part in records[written:] for req in part]
                self._flushing = asyncio.get_running_loop().create_task(self._flush_slow())
                return

    def _records(self, batch: list[PromptRequest]) -> list[tuple[bytes, list[PromptRequest]]]:
        # The client refused inputs too large for a record before queueing them.
        records, _ = pack_records(self._encode, batch, self._ingress[0].max_record)
        return records

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

    def _shed(self, ring: Ring, part: list[PromptRequest]) -> None:
        edge = edge_label(ring.name)
        table = self._table
        if table.metrics is not None:
            table.metrics.shed(edge, len(part))
        reason = f"ring_full:{edge}"
        for req in part:
            failed = table.failed(req.request_id, req.session_id, ErrorCode.RING_FULL, reason)
            table.resolve_failed(failed)
