"""Outbox: where a replica's outputs wait for their ring, and how they get there.

Every output is routed as it is made: by session hash (``mpipeline.routing``)
to one of the next stage's rings, or, in the last stage, to the return ring of
the client named by ``reply_to``. ``Failed`` messages go straight to the
client's error ring instead, so that an error never queues behind the very
backlog that may have caused it. Messages wait in a list per destination until
a flush, which writes one record per destination per batch (more only when a
record would pass ``PER_RECORD`` messages or the ring's ``max_record``); a
message too large for any record is answered ``too_large``.

Full rings follow the consuming stage's policy: ``block`` waits up to the
earliest deadline in the record, then answers ``deadline_exceeded``; ``shed``
fails the record at once with ``ring_full:<edge>``. Every destination gets its
non-blocking write before any write waits, so one full ring never holds up
the others. A full error ring is waited on for a bounded time, then the
errors are logged and dropped: the client's own deadline answers the caller.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from mpipeline.codec import pack_records
from mpipeline.errors import ErrorCode, PeerGone, RingFull
from mpipeline.messages import Failed, Message, failed_from, request_of
from mpipeline.ring import Ring
from mpipeline.routing import message_key, shard_for
from mpipeline.runner._log import about, log
from mpipeline.runner._meter import Meter
from mpipeline.topology import ReplicaSpec, edge_label

# A Failed that cannot reach its client within this is logged and dropped:
# the client's own deadline answers the caller.
_ERROR_PUT_TIMEOUT_S = 1.0

# Records still to write to one ring after its non-blocking try: (ring, [(record,
# messages in it)], shed on full, an error ring).
_Waiting = tuple[Ring, list[tuple[bytes, list[Message]]], bool, bool]


class Outbox:
    """The output and error rings of one replica and the messages waiting for them."""

    def __init__(
        self,
        spec: ReplicaSpec,
        meter: Meter,
        *,
        is_last: bool,
        shed: bool,
        block_timeout_s: float,
    ) -> None:
        self.spec = spec
        self.name = spec.stage
        self.is_last = is_last
        # The edge's policy belongs to the consuming stage; return rings always block.
        self.shed = shed
        self.block_timeout_s = block_timeout_s
        self._meter = meter
        self.encoder = msgspec.msgpack.Encoder()
        self.outputs: list[Ring] = []
        self.errors: list[Ring] = []
        # Messages waiting for a flush, per output ring (index: replica or client).
        self.pending: list[list[Message]] = []
        # Per error ring (index: client); the same lists as ``pending`` in the last stage.
        self.err_pending: list[list[Message]] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    def attach(self, *, spin_s: float) -> None:
        """Attach the output and error rings; a full one is polled ``spin_s`` before a park."""
        spec = self.spec
        self.outputs = [Ring.attach(n, spin_s=spin_s) for n in spec.outputs]
        self.errors = (
            self.outputs
            if spec.errors == spec.outputs
            else [Ring.attach(n, spin_s=spin_s) for n in spec.errors]
        )
        self.pending = [[] for _ in self.outputs]
        self.err_pending = (
            self.pending if self.errors is self.outputs else [[] for _ in self.errors]
        )

    def close(self) -> None:
        rings = {id(r): r for r in (*self.outputs, *self.errors)}
        for ring in rings.values():
            ring.close()

    def emit(self, msg: Message) -> None:
        """Queue ``msg`` for the ring it is routed to (written at the next flush)."""
        if type(msg) is Failed:
            if msg.reply_to < len(self.err_pending):
                self.err_pending[msg.reply_to].append(msg)
            else:
                log.error(
                    "%s: Failed for unknown client %d dropped",
                    self.spec.name,
                    msg.reply_to,
                    extra=about(msg),
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
                    extra=about(msg),
                )
            return
        n = len(self.pending)
        self.pending[0 if n == 1 else shard_for(message_key(msg), n)].append(msg)

    def has_pending(self) -> bool:
        return any(self.pending) or (self.err_pending is not self.pending and any(self.err_pending))

    def schedule_flush(self) -> None:
        """Flush from a task of its own, unless one is already under way."""
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        # One writer per ring at a time: the pumps of several input rings and the
        # flush task share these output rings, and two coroutines blocked in put()
        # on one ring would break its single-producer protocol and reorder batches.
        async with self._flush_lock:
            await self._flush_locked()

    async def finish(self) -> None:
        """Flush what waits, and wait for a flush task that is still writing."""
        await self.flush()
        if self._flush_task is not None:
            await self._flush_task

    async def _flush_locked(self) -> None:
        # Non-blocking writes to every destination first, so one full ring
        # never holds up the others (head-of-line blocking); then wait.
        waiting: list[_Waiting] = []
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
        records, too_large, unencodable = pack_records(self.encoder.encode, msgs, ring.max_record)
        for msg in too_large:
            reason = f"message exceeds ring {ring.name}'s max record of {ring.max_record} bytes"
            self.emit(failed_from(msg, ErrorCode.TOO_LARGE, reason, self.name))
        for msg, why in unencodable:
            # A stage made a message its ring cannot carry: a bug of the stage's.
            log.error("%s: output %s", self.spec.name, why, extra=about(msg))
            self.emit(failed_from(msg, ErrorCode.STAGE_ERROR, f"output {why}", self.name))
        return records

    async def _write(
        self, ring: Ring, record: bytes, msgs: list[Message], *, shed: bool, errors: bool
    ) -> None:
        if ring.try_put(record):
            return
        if shed:
            self._meter.count_shed(ring.name, len(msgs))
            edge = edge_label(ring.name)
            for msg in msgs:
                self.emit(failed_from(msg, ErrorCode.RING_FULL, f"ring_full:{edge}", self.name))
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
        self._meter.count_expired(len(msgs))
        reason = f"ring {ring.name} stayed full past the deadline"
        for msg in msgs:
            self.emit(failed_from(msg, ErrorCode.DEADLINE_EXCEEDED, reason, self.name))

    def _block_timeout(self, msgs: list[Message]) -> float:
        now = time.monotonic_ns()
        best = self.block_timeout_s
        for msg in msgs:
            req = request_of(msg)
            if req is not None and req.deadline_ns:
                best = min(best, (req.deadline_ns - now) / 1e9)
        return max(best, 0.0)
