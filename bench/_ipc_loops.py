"""Child-process side of ``bench.ring_vs_peers``: the messages and the timed loops.

Each transport is reduced to a few bound methods (``Ends``), so the shared loops
call the peers' own methods with no wrapper in between. The Ring's unbatched
loops are written out inline for the same reason: its ``try_`` calls return
instead of blocking, and a Python wrapper that spins on them would add a
function call per message to the side under test.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any, Final, NamedTuple

import uvloop

from mpipeline.codec import Codec
from mpipeline.errors import RingEmpty
from mpipeline.messages import PromptRequest
from mpipeline.ring import Ring

BATCH: Final = 64
# Distinct messages a producer cycles through; a multiple of BATCH.
POOL: Final = 1024
# Ring data bytes, and faster-fifo's buffer bytes, so both bound the same amount.
CAPACITY: Final = 4 << 20
LATENCY_RATE_HZ: Final = 2_000
# Below this size the message has the shape of a bare request (no metadata).
SMALL: Final = 256
TEXT: Final = "Summarise the following passage in two sentences. " * 100
META: Final = {"user": "u-4711", "model": "llama-3-8b", "lang": "en"}
READY_TIMEOUT_S: Final = 60.0

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Job:
    """One measurement: ``mode`` is a batching mode or, for latency, a consumer kind."""

    transport: str  # ring | queue | pipe | ff | zmq
    mode: str  # single | nocrc | await | many | record | awake | asleep | blocking
    size: int
    n: int

    @property
    def latency(self) -> bool:
        return self.mode in ("awake", "asleep", "blocking")


class Ends(NamedTuple):
    send: Callable[[Any], object]
    send_many: Callable[[list[bytes]], object]
    recv: Callable[[], Buffer]
    recv_many: Callable[[int], Sequence[Buffer]]
    close: Callable[[], object]


def message(size: int, seq: int, pad: int, sent_ns: int) -> PromptRequest:
    """A realistic PromptRequest; ``stamps["sent"]`` carries the send time."""
    if size < SMALL:
        return PromptRequest(request_id=f"{seq:08x}", input=TEXT[:pad], stamps={"sent": sent_ns})
    return PromptRequest(
        request_id=f"{seq:08x}-d9cb-469f-a165-70867728950e",
        session_id="sess-7c9e6679",
        input=TEXT[:pad],
        metadata=META,
        deadline_ns=sent_ns + 30_000_000_000,
        reply_to=1,
        max_tokens=256,
        stamps={"sent": sent_ns},
    )


def make_pool(codec: Codec[PromptRequest], size: int) -> list[PromptRequest]:
    """POOL messages whose one-message records encode to ``size`` bytes exactly."""
    now = time.perf_counter_ns()
    pad = 0
    for _ in range(5):
        got = len(codec.encode(message(size, 0, pad, now)))
        if got == size:
            break
        pad = max(0, pad + size - got)
    if got != size or pad > len(TEXT):
        raise ValueError(f"cannot build a {size}-byte message (smallest is {got} bytes)")
    return [message(size, i, pad, now) for i in range(POOL)]


def batches(pool: list[PromptRequest]) -> list[list[PromptRequest]]:
    return [pool[i : i + BATCH] for i in range(0, len(pool), BATCH)]


def _same(x: Any = None) -> Any:
    return x


def ring_ends(ring: Ring) -> Ends:
    put, get, put_many, get_many = ring.try_put, ring.try_get, ring.put_many, ring.get_many

    def send(buf: Buffer) -> None:
        while not put(buf):
            pass

    def send_many(bufs: list[bytes]) -> None:
        done = put_many(bufs)
        while done < len(bufs):
            done += put_many(bufs[done:])

    def recv() -> memoryview:
        view = get()
        while view is None:
            view = get()
        return view

    def recv_many(n: int) -> list[memoryview]:
        views = get_many(n)
        while not views:
            views = get_many(n)
        return views

    return Ends(send, send_many, recv, recv_many, ring.close)


def peer_ends(job: Job, link: Any, producer: bool) -> Ends:
    """Open one side of a peer transport, ready to use when this returns."""
    if job.transport == "queue":
        q = link
        return Ends(q.put, q.put, q.get, lambda _n: q.get(), q.close)
    if job.transport == "pipe":
        recv_end, send_end = link
        if producer:
            recv_end.close()
        return Ends(
            send_end.send_bytes,
            send_end.send,
            recv_end.recv_bytes,
            lambda _n: recv_end.recv(),
            send_end.close if producer else recv_end.close,
        )
    if job.transport == "ff":
        import faster_fifo_reduction  # type: ignore[import-untyped]  # noqa: F401

        ff = link
        # Raw bytes both ways: no pickle, and loads hands out a view into ff's buffer
        # (valid until the next get), the same zero-copy deal the Ring offers.
        ff.loads = ff.dumps = _same
        return Ends(
            ff.put, ff.put_many, ff.get, lambda n: ff.get_many(max_messages_to_get=n), _same
        )
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH if producer else zmq.PULL)
    (sock.connect if producer else sock.bind)(link)

    def close() -> None:
        sock.close()  # default linger: a producer flushes before it exits
        ctx.term()

    return Ends(sock.send, sock.send_multipart, sock.recv, lambda _n: sock.recv_multipart(), close)


def produce(job: Job, ends: Ends, codec: Codec[PromptRequest], pool: list[PromptRequest]) -> None:
    enc, encm, n = codec.encode, codec.encode_many, job.n
    if job.mode == "many":
        for b in itertools.islice(itertools.cycle(batches(pool)), n // BATCH):
            ends.send_many([enc(m) for m in b])
    elif job.mode == "record":
        send = ends.send
        for b in itertools.islice(itertools.cycle(batches(pool)), n // BATCH):
            send(encm(b))
    else:
        send = ends.send
        for m in itertools.islice(itertools.cycle(pool), n):
            send(enc(m))


def consume(job: Job, ends: Ends, codec: Codec[PromptRequest]) -> tuple[float, PromptRequest]:
    """Receive ``job.n`` messages; return seconds from the first to the last, and the last."""
    dec1, decm, recv, n = codec.decode_one, codec.decode_many, ends.recv, job.n
    if job.mode == "single":
        buf = recv()
        t0 = time.perf_counter()
        last = dec1(buf)
        for _ in range(n - 1):
            last = dec1(recv())
        return time.perf_counter() - t0, last
    got = 0
    t0 = 0.0
    while got < n:
        if job.mode == "many":
            bufs = ends.recv_many(BATCH)
            if not got:
                t0 = time.perf_counter()
            for buf in bufs:
                last = dec1(buf)
            got += len(bufs)
        else:
            buf = recv()
            if not got:
                t0 = time.perf_counter()
            msgs = decm(buf)
            got += len(msgs)
            last = msgs[-1]
    return time.perf_counter() - t0, last


def ring_produce_single(
    ring: Ring, n: int, codec: Codec[PromptRequest], pool: list[PromptRequest]
) -> None:
    put, enc = ring.try_put, codec.encode
    for m in itertools.islice(itertools.cycle(pool), n):
        buf = enc(m)
        while not put(buf):
            pass


def ring_consume_single(
    ring: Ring, n: int, codec: Codec[PromptRequest]
) -> tuple[float, PromptRequest]:
    get, dec1 = ring.try_get, codec.decode_one
    view = get()
    while view is None:
        view = get()
    t0 = time.perf_counter()
    last = dec1(view)
    for _ in range(n - 1):
        view = get()
        while view is None:
            view = get()
        last = dec1(view)
    return time.perf_counter() - t0, last


async def ring_produce_await(
    ring: Ring, n: int, codec: Codec[PromptRequest], pool: list[PromptRequest]
) -> None:
    put, enc = ring.put, codec.encode
    for m in itertools.islice(itertools.cycle(pool), n):
        await put(enc(m))


async def ring_consume_await(
    ring: Ring, n: int, codec: Codec[PromptRequest]
) -> tuple[float, PromptRequest]:
    get, dec1 = ring.get, codec.decode_one
    view = await get()
    t0 = time.perf_counter()
    last = dec1(view)
    for _ in range(n - 1):
        last = dec1(await get())
    return time.perf_counter() - t0, last


def produce_paced(
    n: int, send: Callable[[bytes], object], codec: Codec[PromptRequest], pool: list[PromptRequest]
) -> None:
    """Send ``n`` messages at LATENCY_RATE_HZ, each stamped just before it is encoded."""
    period = 1 / LATENCY_RATE_HZ
    t_next = time.perf_counter()
    for i in range(n):
        delay = t_next - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t_next += period
        m = pool[i % POOL]
        m.stamps["sent"] = time.perf_counter_ns()  # the one mutable field, as the runner does
        send(codec.encode(m))


def consume_latency(n: int, recv: Callable[[], Buffer], codec: Codec[PromptRequest]) -> list[int]:
    dec1, now = codec.decode_one, time.perf_counter_ns
    lat = []
    for _ in range(n):
        sent = dec1(recv()).stamps["sent"]
        lat.append(now() - sent)  # now() only after the message arrived
    return lat


async def consume_latency_asleep(ring: Ring, n: int, codec: Codec[PromptRequest]) -> list[int]:
    dec1, now, get = codec.decode_one, time.perf_counter_ns, ring.get
    lat = []
    for _ in range(n):
        sent = dec1(await get()).stamps["sent"]
        lat.append(now() - sent)
    return lat


def producer(job: Job, link: Any, ready: Event) -> dict[str, Any]:
    codec = Codec(PromptRequest)
    pool = make_pool(codec, job.size)
    # Open only once the consumer is ready: a zmq connect before the bind backs off 100 ms.
    if not ready.wait(READY_TIMEOUT_S):
        raise TimeoutError("consumer never became ready")
    ring = Ring.attach(link) if job.transport == "ring" else None
    ends = ring_ends(ring) if ring is not None else peer_ends(job, link, True)
    try:
        t0 = time.perf_counter()
        if job.latency:
            produce_paced(job.n, ends.send, codec, pool)
        elif ring is not None and job.mode in ("single", "nocrc"):
            ring_produce_single(ring, job.n, codec, pool)
        elif ring is not None and job.mode == "await":
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(ring_produce_await(ring, job.n, codec, pool))
        else:
            produce(job, ends, codec, pool)
        return {"seconds": time.perf_counter() - t0}
    finally:
        ends.close()


def consumer(job: Job, link: Any, ready: Event) -> dict[str, Any]:
    codec = Codec(PromptRequest)
    ring = None
    if job.transport == "ring":
        # spin_s=0: every get that finds the ring empty parks on the doorbell at once.
        ring = Ring.attach(link, spin_s=0.0) if job.mode == "asleep" else Ring.attach(link)
    ends = ring_ends(ring) if ring is not None else peer_ends(job, link, False)
    try:
        ready.set()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if job.latency:
            if ring is not None and job.mode == "asleep":
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    lat = runner.run(consume_latency_asleep(ring, job.n, codec))
            else:
                lat = consume_latency(job.n, ends.recv, codec)
            cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
            return {"latency_ns": lat, "cpu_fraction": cpu}
        if ring is not None and job.mode in ("single", "nocrc"):
            seconds, last = ring_consume_single(ring, job.n, codec)
        elif ring is not None and job.mode == "await":
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                seconds, last = runner.run(ring_consume_await(ring, job.n, codec))
        else:
            seconds, last = consume(job, ends, codec)
        want = f"{(job.n - 1) % POOL:08x}"
        if not last.request_id.startswith(want):
            raise AssertionError(f"last message is {last.request_id[:8]}, expected {want}")
        return {"seconds": seconds, "messages": job.n}
    finally:
        ends.close()


def run_child(role: str, job: Job, link: Any, cpu: int, ready: Event, out: Any) -> None:
    """Process entry: pin to ``cpu``, run one side, report a dict on ``out``."""
    try:
        os.sched_setaffinity(0, {cpu})
        switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
        result = (producer if role == "producer" else consumer)(job, link, ready)
        # Involuntary context switches: how often something else took this core.
        result["preempted"] = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - switches
    except Exception:
        result = {"error": traceback.format_exc()}
    out.put((role, result))


def ceiling_child(size: int, seconds: float, cpu: int, out: Any) -> None:
    """Process entry: the in-process codec loops that bound any transport."""
    os.sched_setaffinity(0, {cpu})
    codec = Codec(PromptRequest)
    pool = make_pool(codec, size)
    groups = batches(pool)
    ones = [codec.encode(m) for m in pool]
    records = [codec.encode_many(b) for b in groups]
    enc, encm, dec1, decm = codec.encode, codec.encode_many, codec.decode_one, codec.decode_many

    def enc_dec_1() -> None:
        for m in pool:
            dec1(enc(m))

    def dec_1() -> None:
        for buf in ones:
            dec1(buf)

    def enc_dec_b() -> None:
        for b in groups:
            decm(encm(b))

    def dec_b() -> None:
        for buf in records:
            decm(buf)

    loops = {
        "encode+decode 1-msg record": enc_dec_1,
        "decode 1-msg record": dec_1,
        f"encode+decode {BATCH}-msg record": enc_dec_b,
        f"decode {BATCH}-msg record": dec_b,
    }
    out.put({name: _rate(fn, seconds) for name, fn in loops.items()})


def _rate(fn: Callable[[], None], seconds: float) -> float:
    """Best of three rounds of ``seconds`` each, in messages per second."""
    best = 0.0
    for _ in range(3):
        count, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            fn()
            count += POOL
        best = max(best, count / elapsed)
    return best


def idle_child(seconds: float, cpu: int, out: Any) -> None:
    """Process entry: the CPU an ``await get()`` costs on an empty ring (default spin)."""
    os.sched_setaffinity(0, {cpu})

    async def wait(ring: Ring) -> None:
        try:
            await ring.get(timeout=seconds)
        except RingEmpty:
            pass

    with (
        Ring.create(CAPACITY) as ring,
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        runner.run(wait(ring))
        cpu_fraction = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    out.put({"cpu_fraction": cpu_fraction})
