"""Ring in one process, on real shared memory: API contract, corruption, lifetime.

The property test at the end drives a producer and a consumer handle through
random interleavings and checks every result and every header counter against
a model that does the same byte accounting (``RingModel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import mmap
import os
import pickle
import secrets
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
import uvloop
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mpipeline import _shm
from mpipeline.errors import (
    PeerGone,
    RecordTooLarge,
    RingClosed,
    RingCorrupted,
    RingEmpty,
    RingError,
    RingFull,
    RingNotFound,
)
from mpipeline.ring import (
    DEFAULT_SPIN_S,
    HEADER_SIZE,
    MAGIC,
    MAX_CAPACITY,
    S_CAPACITY,
    S_CONSUMER_PID,
    S_CONSUMER_WAIT,
    S_DATA_OFFSET,
    S_EPOCH,
    S_MAGIC,
    S_MAX_RECORD,
    S_PRODUCER_WAIT,
    S_READ,
    S_VERSION,
    S_WRITE,
    VERSION,
    Ring,
)
from tests.conftest import machine_fact

T = TypeVar("T")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def _name() -> str:
    return f"test-{secrets.token_hex(6)}"


@contextlib.contextmanager
def raw(name: str) -> Iterator[mmap.mmap]:
    """Map a segment as a bystander (the corrupting harness, or the supervisor)."""
    with open(_shm.segment_path(name), "r+b") as f, mmap.mmap(f.fileno(), 0) as mem:
        yield mem


def peek(name: str, slot: int) -> int:
    with raw(name) as mem:
        value: int = _U64.unpack_from(mem, slot * 8)[0]
        return value


def poke(name: str, slot: int, value: int) -> None:
    with raw(name) as mem:
        _U64.pack_into(mem, slot * 8, value)


def poke_data(name: str, offset: int, fmt: struct.Struct, value: int) -> None:
    """Overwrite a field at ``offset`` in the data area."""
    with raw(name) as mem:
        fmt.pack_into(mem, HEADER_SIZE + offset, value)


def flip_data_byte(name: str, offset: int) -> None:
    with raw(name) as mem:
        mem[HEADER_SIZE + offset] ^= 0xFF


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def drain(consumer: Ring) -> list[bytes]:
    """Copies of every record left, in order (get_many may stop at a cached write position)."""
    out: list[bytes] = []
    while batch := consumer.get_many(64):
        out += [bytes(v) for v in batch]
    return out


def rec_size(n: int) -> int:
    """Bytes a record of ``n`` payload bytes takes: 8-byte header, padded to 8."""
    return (n + 15) & -8


@pytest.fixture
def ring() -> Iterator[Ring]:
    """A 1 KiB ring (max_record 248); the creator handle, unlinked afterwards."""
    with Ring.create(1024, name=_name()) as r:
        yield r


@pytest.fixture
def consumer(ring: Ring) -> Iterator[Ring]:
    with Ring.attach(ring.name) as c:
        yield c


# Creation


@pytest.mark.parametrize("capacity", [0, 56, 60, 65, 1020, MAX_CAPACITY + 8])
def test_create_rejects_bad_capacity(capacity: int) -> None:
    with pytest.raises(ValueError, match=f"got {capacity}"):
        Ring.create(capacity, name=_name())


@pytest.mark.parametrize("max_record", [-1, 1024 // 2 - 7])
def test_create_rejects_bad_max_record(max_record: int) -> None:
    with pytest.raises(ValueError, match="max_record"):
        Ring.create(1024, name=_name(), max_record=max_record)


@pytest.mark.parametrize("name", ["a/b", "", "mpl-"])
def test_create_rejects_bad_name(name: str) -> None:
    with pytest.raises(ValueError, match="segment name"):
        Ring.create(1024, name=name)


def test_default_max_record_fits_a_huge_ring() -> None:
    # capacity // 4 exceeds the u32 record length from 16 GiB up: the default
    # must be clamped, not rejected (capacity may be up to 2**40).
    st = os.statvfs(_shm.SHM_DIR)
    capacity = max(1 << 35, (st.f_blocks * st.f_frsize + (1 << 30)) // 8 * 8)
    if st.f_blocks == 0 or capacity > 1 << 40:
        machine_fact("needs a /dev/shm smaller than the ring, so nothing is allocated")
    with pytest.raises(RingError, match="--shm-size"):  # not ValueError for max_record
        Ring.create(capacity, name=_name())


def test_create_existing_name_raises_and_leaves_the_owner_alone(ring: Ring) -> None:
    assert ring.try_put(b"kept")
    with pytest.raises(FileExistsError):
        Ring.create(1024, name=ring.name)
    assert bytes(ring.try_get() or b"") == b"kept"


def test_create_defaults_and_properties() -> None:
    with Ring.create(4096) as r:
        assert r.name.startswith(_shm.PREFIX)
        assert r.capacity == 4096
        assert r.max_record == 4096 // 4 - 8
        assert r.is_creator and not r.closed
        assert "capacity=4096" in repr(r)
        stats = r.stats()
        assert (stats.epoch, stats.used_bytes, stats.depth, stats.occupancy) == (1, 0, 0, 0.0)
        assert not stats.poisoned
    assert r.closed and "closed" in repr(r)


def test_name_gets_prefix_and_attach_accepts_either_form() -> None:
    short = _name()
    with Ring.create(1024, name=short) as r:
        assert r.name == _shm.PREFIX + short
        for name in (short, r.name):
            with Ring.attach(name) as a:
                assert a.name == r.name and not a.is_creator


def _at_offset_200(r: Ring) -> None:
    """Leave ``r`` (capacity 256, max_record 120) empty, its write position at offset 200."""
    assert r.put_many([b"a" * 96, b"b" * 88]) == 2  # 104 + 96 bytes
    assert len(r.get_many(10)) == 2
    assert r.get_many(0) == []
    assert r.stats().used_bytes == 0


def test_record_that_exactly_fits_the_tail_does_not_wrap() -> None:
    with Ring.create(256, name=_name(), max_record=120) as r:
        _at_offset_200(r)
        assert r.try_put(b"t" * 48)  # 56 bytes: exactly the tail
        assert r.stats().write_pos == 256
        with raw(r.name) as mem:
            assert _U32.unpack_from(mem, HEADER_SIZE + 200)[0] == 48
        assert bytes(r.try_get() or b"") == b"t" * 48
        assert r.try_put(b"next")  # starts at offset 0 of the next lap
        assert bytes(r.try_get() or b"") == b"next"


def test_record_one_byte_too_big_for_the_tail_wraps() -> None:
    with Ring.create(256, name=_name(), max_record=120) as r:
        _at_offset_200(r)
        assert r.try_put(b"w" * 49)  # 64 bytes: the 56-byte tail is skipped
        stats = r.stats()
        assert (stats.write_pos, stats.bytes_in) == (200 + 56 + 64, 96 + 88 + 49)
        with raw(r.name) as mem:
            assert _U32.unpack_from(mem, HEADER_SIZE + 200)[0] == 0xFFFFFFFF  # wrap marker
            assert _U32.unpack_from(mem, HEADER_SIZE)[0] == 49
        assert bytes(r.try_get() or b"") == b"w" * 49
        assert r.try_get() is None
        assert r.stats().used_bytes == 0


def test_a_wrapping_record_needs_room_for_the_skipped_tail_too() -> None:
    with Ring.create(256, name=_name(), max_record=120) as r:
        assert r.put_many([b"a" * 56, b"b" * 112, b"c" * 48]) == 3  # 64 + 120 + 56 = 240
        assert r.try_get() is not None
        assert r.try_get() is not None  # releases the first: 176 bytes in use, 80 free
        assert r.stats().used_bytes == 176
        # At offset 240 only 16 bytes remain before the end, so a 64-byte record
        # costs 16 + 64 = 80: it fits exactly; a 72-byte one (57 bytes) does not.
        assert not r.try_put(b"x" * 57)
        assert r.try_put(b"y" * 56)
        assert r.stats().used_bytes == 256
        assert r.stats().write_pos == 256 + 64
        assert not r.try_put(b"")
        assert drain(r) == [b"c" * 48, b"y" * 56]


def test_largest_max_record_always_fits_an_empty_ring() -> None:
    for capacity in (64, 72, 136, 1000):
        limit = capacity // 2 - 8
        with Ring.create(capacity, name=_name(), max_record=limit) as r:
            for _ in range(capacity // 8 + 1):  # walk the start offset round the ring
                assert r.try_put(b"z" * limit)
                assert bytes(r.try_get() or b"") == b"z" * limit
                assert r.get_many(0) == []  # releases it: the ring is empty again
                assert r.try_put(b"")  # shift the next start by 8 bytes
                assert r.try_get() is not None
                assert r.get_many(0) == []


# Put and get


def test_roundtrip_of_every_buffer_type(ring: Ring, consumer: Ring) -> None:
    records: list[bytes | bytearray | memoryview] = [b"bytes", bytearray(b"ba"), memoryview(b"mv")]
    for rec in records:
        assert ring.try_put(rec)
    assert ring.put_many([b"m1", memoryview(bytearray(b"m2"))]) == 2
    got = [bytes(v) for v in consumer.get_many(10)]
    assert got == [b"bytes", b"ba", b"mv", b"m1", b"m2"]


def test_empty_ring_gives_none_and_empty_batch(ring: Ring, consumer: Ring) -> None:
    assert consumer.try_get() is None
    assert consumer.get_many(10) == []
    assert ring.try_put(b"a")
    assert consumer.get_many(0) == []
    assert [bytes(v) for v in consumer.get_many(10)] == [b"a"]
    assert consumer.try_get() is None


def test_zero_length_records_take_eight_bytes() -> None:
    with Ring.create(64, name=_name()) as r:
        for _ in range(8):
            assert r.try_put(b"")
        assert not r.try_put(b"")
        assert r.stats().used_bytes == 64
        views = r.get_many(100)
        assert [len(v) for v in views] == [0] * 8
        assert r.try_get() is None
        assert r.stats().records_out == 8


def test_full_ring_try_put_false_until_space_is_released(ring: Ring, consumer: Ring) -> None:
    while ring.try_put(b"r" * 120):
        pass
    full = ring.stats().full_events
    assert full == 1
    assert not ring.try_put(b"r" * 120)
    assert ring.put_many([b"r" * 120]) == 0
    assert ring.stats().full_events == full + 2
    first = consumer.try_get()
    assert first is not None
    # Handed out but not yet released: still no room.
    assert not ring.try_put(b"r" * 120)
    assert consumer.try_get() is not None  # releases the first
    assert ring.try_put(b"r" * 120)


@pytest.mark.parametrize("batched", [False, True])
def test_released_space_is_usable_to_the_last_byte(
    ring: Ring, consumer: Ring, batched: bool
) -> None:
    assert ring.put_many([b"r" * 120] * 8) == 8  # 8 x 128 bytes: exactly full
    assert consumer.try_get() is not None
    assert consumer.try_get() is not None  # releases the first record: 128 bytes free
    # The producer's cached read position is stale now; it must re-read it and
    # see that the record fits exactly.
    if batched:
        assert ring.put_many([b"s" * 120, b""]) == 1
    else:
        assert ring.try_put(b"s" * 120)
        assert not ring.try_put(b"")
    assert ring.stats().used_bytes == 1024


def _parked(ring: Ring, slot: int) -> bool:
    """True when that side's wait sequence in the header is odd: asleep on its doorbell."""
    return bool(peek(ring.name, slot) & 1)


async def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5.0
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def test_put_waits_until_a_consumer_task_drains(ring: Ring, consumer: Ring) -> None:
    while ring.try_put(b"p" * 100):
        pass
    # 9 x 112 bytes used; 40 bytes need 48 plus the 16-byte tail: no room.
    big = b"last" * 10
    got: list[bytes] = []

    async def drain_once_parked() -> None:
        await _until(lambda: _parked(ring, S_PRODUCER_WAIT), "put() to park")
        while len(got) < 10:
            got.append(bytes(await consumer.get(timeout=5)))

    async def main() -> None:
        task = asyncio.ensure_future(drain_once_parked())
        await ring.put(big, timeout=5)
        await task

    run(main())
    assert got == [b"p" * 100] * 9 + [big]


def test_get_waits_until_a_producer_task_puts(ring: Ring, consumer: Ring) -> None:
    async def put_once_parked() -> None:
        await _until(lambda: _parked(ring, S_CONSUMER_WAIT), "get() to park")
        await ring.put(b"hello")

    async def main() -> bytes:
        task = asyncio.ensure_future(put_once_parked())
        view = await consumer.get(timeout=5)
        await task
        return bytes(view)

    assert run(main()) == b"hello"


@pytest.mark.parametrize("spin_s", [0.0, DEFAULT_SPIN_S])
def test_put_times_out_with_ring_full(spin_s: float) -> None:
    with Ring.create(64, name=_name(), spin_s=spin_s) as r:
        while r.try_put(b""):
            pass
        start = time.monotonic()
        with pytest.raises(RingFull, match="stayed full for 0.1s") as info:
            run(r.put(b"", timeout=0.1))
        assert 0.09 <= time.monotonic() - start < 1.0
        assert isinstance(info.value, TimeoutError)
        with pytest.raises(RingFull):
            run(r.put(b"", timeout=0))


@pytest.mark.parametrize("spin_s", [0.0, DEFAULT_SPIN_S])
def test_get_times_out_with_ring_empty(spin_s: float) -> None:
    with Ring.create(64, name=_name(), spin_s=spin_s) as r:
        start = time.monotonic()
        with pytest.raises(RingEmpty, match="stayed empty for 0.1s") as info:
            run(r.get(timeout=0.1))
        assert 0.09 <= time.monotonic() - start < 1.0
        assert isinstance(info.value, TimeoutError)


def test_put_raises_peer_gone_when_the_recorded_consumer_is_dead(
    ring: Ring, consumer: Ring
) -> None:
    assert consumer.try_get() is None  # claims the consumer side
    while ring.try_put(b"x" * 100):
        pass
    assert ring.consumer_alive() is True
    # A pid above pid_max can never be alive: the consumer "died".
    poke(ring.name, S_CONSUMER_PID, _dead_pid())
    assert ring.consumer_alive() is False
    start = time.monotonic()
    with pytest.raises(PeerGone, match="consumer pid"):
        run(ring.put(b"x" * 100, timeout=5))
    assert time.monotonic() - start < 1.0


def test_put_waits_for_a_successor_when_the_consumer_closed_cleanly(ring: Ring) -> None:
    with Ring.attach(ring.name) as c:
        assert c.try_get() is None
    assert ring.consumer_alive() is None  # a clean close clears the pid
    while ring.try_put(b"x" * 100):
        pass
    with pytest.raises(RingFull):
        run(ring.put(b"x" * 100, timeout=0.2))


def test_producer_alive_reflects_the_producer(ring: Ring, consumer: Ring) -> None:
    assert ring.producer_alive() is None
    assert ring.try_put(b"a")
    assert consumer.producer_alive() is True
    assert consumer.stats().producer_pid == os.getpid()


# Oversized records


def test_oversize_record_raises_naming_both_sizes_and_writes_nothing(
    ring: Ring, consumer: Ring
) -> None:
    assert ring.try_put(b"a")
    before = ring.stats()
    with raw(ring.name) as mem:
        data_before = bytes(mem[HEADER_SIZE:])
    with pytest.raises(RecordTooLarge, match=r"record of 249 bytes .* max_record of 248") as info:
        ring.try_put(b"x" * 249)
    assert isinstance(info.value, ValueError)
    with pytest.raises(RecordTooLarge):
        run(ring.put(b"x" * 10_000))
    assert ring.stats() == before
    with raw(ring.name) as mem:
        assert bytes(mem[HEADER_SIZE:]) == data_before
    assert [bytes(v) for v in consumer.get_many(10)] == [b"a"]


def test_put_many_with_an_oversize_record_in_the_middle_publishes_nothing(
    ring: Ring, consumer: Ring
) -> None:
    assert ring.try_put(b"a")
    before = ring.stats()
    with pytest.raises(RecordTooLarge, match="249 bytes"):
        ring.put_many([b"b", b"c" * 200, b"x" * 249, b"d"])
    assert ring.stats() == before
    assert [bytes(v) for v in consumer.get_many(10)] == [b"a"]
    # The handle is still usable, and the next batch lands where the failed one would have.
    assert ring.put_many([b"e", b"f"]) == 2
    assert [bytes(v) for v in consumer.get_many(10)] == [b"e", b"f"]


def test_put_many_writes_the_prefix_that_fits(ring: Ring, consumer: Ring) -> None:
    batch = [bytes([i]) * 200 for i in range(10)]
    assert ring.put_many(batch) == 1024 // rec_size(200)
    assert ring.stats().full_events == 1
    assert ring.put_many([]) == 0
    assert [bytes(v) for v in consumer.get_many(100)] == batch[:4]


def test_put_many_takes_any_iterable(ring: Ring, consumer: Ring) -> None:
    assert ring.put_many(bytes([i]) for i in range(5)) == 5
    assert [bytes(v) for v in consumer.get_many(100)] == [bytes([i]) for i in range(5)]


# Views into shared memory


def test_view_stays_valid_until_the_next_get(ring: Ring, consumer: Ring) -> None:
    assert ring.try_put(b"A" * 100)
    view = consumer.try_get()
    assert view is not None
    # The producer fills everything else; the held record is not reused.
    while ring.try_put(b"B" * 100):
        pass
    assert bytes(view) == b"A" * 100
    assert ring.stats().used_bytes == 1024 - 1024 % rec_size(100)
    nxt = consumer.try_get()
    assert nxt is not None and bytes(nxt) == b"B" * 100
    assert ring.try_put(b"C" * 100)  # the first record's space was released


def test_batch_views_stay_valid_until_the_next_get(ring: Ring, consumer: Ring) -> None:
    assert ring.put_many([b"1" * 100, b"2" * 100, b"3" * 100]) == 3
    views = consumer.get_many(3)
    while ring.try_put(b"B" * 100):
        pass
    assert [bytes(v) for v in views] == [b"1" * 100, b"2" * 100, b"3" * 100]


def test_view_outlives_close_and_unlink() -> None:
    r = Ring.create(1024, name=_name())
    with r:
        assert r.try_put(b"still here")
        view = r.try_get()
        assert view is not None
    assert r.closed and not _shm.segment_path(r.name).exists()
    assert bytes(view) == b"still here"
    view.release()


def test_view_is_read_only(ring: Ring, consumer: Ring) -> None:
    # The docstring promises a read-only view: a consumer must not be able to
    # scribble over a record the producer may be about to reuse.
    assert ring.try_put(b"abc")
    view = consumer.try_get()
    assert view is not None
    assert view.readonly
    assert ring.try_put(b"d")
    assert all(v.readonly for v in consumer.get_many(1))


# Attach and header validation


def test_attach_missing_segment_raises_ring_not_found() -> None:
    with pytest.raises(RingNotFound, match="no shared-memory segment") as info:
        Ring.attach(_name())
    assert isinstance(info.value, FileNotFoundError)


def _dead_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1


Corruption = Callable[[str], None]


def _set(slot: int, value: int) -> Corruption:
    return lambda name: poke(name, slot, value)


def _set_both(write: int, read: int) -> Corruption:
    def corrupt(name: str) -> None:
        poke(name, S_WRITE, write)
        poke(name, S_READ, read)

    return corrupt


def _truncate(size: int) -> Corruption:
    return lambda name: os.truncate(_shm.segment_path(name), size)


HEADER_CORRUPTIONS: dict[str, tuple[Corruption, str]] = {
    "bad magic": (_set(S_MAGIC, MAGIC ^ 1), "not an mpipeline ring"),
    "zero magic": (_set(S_MAGIC, 0), "not an mpipeline ring"),
    "wrong version": (_set(S_VERSION, VERSION + 1), "layout version 2, expected 1"),
    "truncated below the header": (_truncate(100), "100 bytes, smaller than a ring header"),
    "truncated to 8 bytes": (_truncate(8), "smaller than a ring header"),
    "empty file": (_truncate(0), "smaller than a ring header"),
    "truncated data area": (_truncate(HEADER_SIZE + 512), "capacity 1024 does not match"),
    "capacity bigger than file": (_set(S_CAPACITY, 2048), "capacity 2048 does not match"),
    "capacity not a multiple of 8": (_set(S_CAPACITY, 1020), "capacity 1020 does not match"),
    "capacity zero": (_set(S_CAPACITY, 0), "capacity 0 does not match"),
    "data offset": (_set(S_DATA_OFFSET, 0), "data offset 0"),
    "max_record over half": (_set(S_MAX_RECORD, 600), "max_record 600 exceeds"),
    "write < read": (_set_both(32, 64), "write=32 read=64 are inconsistent"),
    "write - read > capacity": (_set(S_WRITE, 1032), "write=1032 read=0 are inconsistent"),
    "misaligned write": (_set(S_WRITE, 12), "write=12 read=0 are inconsistent"),
    "misaligned read": (_set_both(64, 4), "write=64 read=4 are inconsistent"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CORRUPTIONS))
def test_attach_refuses_a_corrupted_header(case: str) -> None:
    corrupt, message = HEADER_CORRUPTIONS[case]
    with Ring.create(1024, name=_name()) as owner:
        owner.close()  # nothing may touch the mapping while we truncate the file
        corrupt(owner.name)
        # Exactly RingCorrupted: never IndexError, struct.error or ValueError.
        with pytest.raises(RingCorrupted, match=message):
            Ring.attach(owner.name)


def test_attach_refuses_a_stale_epoch_or_capacity() -> None:
    with Ring.create(1024, name=_name(), epoch=7) as owner:
        with Ring.attach(owner.name, expect_epoch=7, expect_capacity=1024) as ok:
            assert ok.stats().epoch == 7
        with pytest.raises(RingCorrupted, match="epoch 7, expected 6 .stale attach."):
            Ring.attach(owner.name, expect_epoch=6)
        with pytest.raises(RingCorrupted, match="capacity 1024, expected 2048"):
            Ring.attach(owner.name, expect_capacity=2048)


def test_attach_lists_every_problem_at_once() -> None:
    with Ring.create(1024, name=_name()) as owner:
        poke(owner.name, S_WRITE, 12)
        poke(owner.name, S_EPOCH, 3)
        with pytest.raises(RingCorrupted, match="inconsistent; epoch 3, expected 1"):
            Ring.attach(owner.name, expect_epoch=1)


# Corrupted records


def test_bad_checksum_is_skipped_and_the_next_get_continues(ring: Ring, consumer: Ring) -> None:
    assert ring.put_many([b"good-1", b"evil", b"good-2"]) == 3
    flip_data_byte(ring.name, rec_size(6) + 8)  # first payload byte of "evil"
    assert bytes(consumer.try_get() or b"") == b"good-1"
    with pytest.raises(RingCorrupted, match=f"checksum mismatch .* position {rec_size(6)}") as info:
        consumer.try_get()
    assert info.value.record == b"\x9avil"  # type: ignore[attr-defined]
    assert bytes(consumer.try_get() or b"") == b"good-2"
    assert consumer.try_get() is None
    stats = ring.stats()
    assert stats.corrupt_records == 1 and not stats.poisoned
    assert (stats.records_in, stats.records_out, stats.used_bytes) == (3, 3, 0)


def test_bad_checksum_first_in_a_batch_raises_then_the_batch_continues(
    ring: Ring, consumer: Ring
) -> None:
    assert ring.put_many([b"evil", b"good-1", b"good-2"]) == 3
    flip_data_byte(ring.name, 8)
    with pytest.raises(RingCorrupted, match="checksum mismatch"):
        consumer.get_many(10)
    assert [bytes(v) for v in consumer.get_many(10)] == [b"good-1", b"good-2"]
    assert consumer.get_many(10) == []
    stats = ring.stats()
    assert (stats.records_in, stats.records_out, stats.corrupt_records) == (3, 3, 1)


def test_bad_checksum_mid_batch_ends_it_early_and_is_counted_once(
    ring: Ring, consumer: Ring
) -> None:
    assert ring.put_many([b"good-1", b"evil", b"good-2"]) == 3
    flip_data_byte(ring.name, rec_size(6) + 8)
    assert [bytes(v) for v in consumer.get_many(10)] == [b"good-1"]
    with pytest.raises(RingCorrupted, match="checksum mismatch"):
        consumer.get_many(10)
    assert [bytes(v) for v in consumer.get_many(10)] == [b"good-2"]
    assert consumer.get_many(10) == []
    stats = ring.stats()
    assert stats.corrupt_records == 1
    # Three records went in; three came out (one of them skipped as corrupt).
    assert (stats.records_in, stats.records_out) == (3, 3)
    assert stats.bytes_in == stats.bytes_out
    assert stats.depth == 0


def test_checksums_off_delivers_flipped_bytes_unchecked() -> None:
    with Ring.create(1024, name=_name(), checksums=False) as r:
        assert r.try_put(b"evil")
        flip_data_byte(r.name, 8)
        assert bytes(r.try_get() or b"") == b"\x9avil"


def _every_get_raises_corrupted(consumer: Ring) -> None:
    for _ in range(3):
        with pytest.raises(RingCorrupted, match="poisoned|corrupted"):
            consumer.try_get()
        with pytest.raises(RingCorrupted, match="poisoned|corrupted"):
            consumer.get_many(10)
        with pytest.raises(RingCorrupted, match="poisoned|corrupted"):
            run(consumer.get(timeout=1))


def test_bogus_length_poisons_the_ring(ring: Ring, consumer: Ring) -> None:
    assert ring.put_many([b"good", b"bogus", b"later"]) == 3
    poke_data(ring.name, rec_size(4), _U32, 249)  # one over max_record
    assert bytes(consumer.try_get() or b"") == b"good"
    with pytest.raises(RingCorrupted, match="record length 249 at position 16 exceeds max_record"):
        consumer.try_get()
    _every_get_raises_corrupted(consumer)
    stats = ring.stats()
    assert stats.poisoned and stats.corrupt_records == 1
    # The poison is in the header: a successor consumer refuses too.
    consumer.close()
    with Ring.attach(ring.name) as successor:
        with pytest.raises(RingCorrupted, match="poisoned"):
            successor.try_get()


def test_length_running_past_the_write_position_poisons_the_ring(
    ring: Ring, consumer: Ring
) -> None:
    assert ring.try_put(b"short")
    poke_data(ring.name, 0, _U32, 200)  # plausible, but longer than what was published
    with pytest.raises(RingCorrupted, match="runs past the write position"):
        consumer.get_many(10)
    _every_get_raises_corrupted(consumer)


def test_huge_length_never_escapes_as_index_error(ring: Ring, consumer: Ring) -> None:
    assert ring.try_put(b"x")
    poke_data(ring.name, 0, _U32, 0xFFFFFFFE)
    with pytest.raises(RingCorrupted):
        consumer.try_get()


def test_wrap_marker_pointing_at_garbage_poisons(ring: Ring, consumer: Ring) -> None:
    assert ring.try_put(b"x")
    poke_data(ring.name, 0, _U32, 0xFFFFFFFF)  # a wrap marker where a record was
    with pytest.raises(RingCorrupted):
        consumer.try_get()


# Header corrupted under live handles (RELIABILITY.md scenario 15): the next
# operation must notice, and must never deliver bytes that were not published.


def _caught_up(ring: Ring, consumer: Ring, *records: bytes) -> None:
    assert ring.put_many(records) == len(records)
    assert len(consumer.get_many(100)) == len(records)
    assert consumer.get_many(100) == []  # released; consumer position == write position


def test_live_write_below_read_is_detected_by_the_consumer(ring: Ring, consumer: Ring) -> None:
    _caught_up(ring, consumer, b"a" * 10, b"b" * 10, b"c" * 10)
    poke(ring.name, S_WRITE, 8)
    with pytest.raises(RingCorrupted):
        consumer.get_many(10)
    with pytest.raises(RingCorrupted):
        consumer.try_get()


def test_live_write_beyond_capacity_is_detected_not_replayed(ring: Ring, consumer: Ring) -> None:
    # Go round the ring so the whole data area holds old, valid, checksummed records.
    for i in range(40):
        _caught_up(ring, consumer, bytes([i]) * 100)
    read = ring.stats().read_pos
    poke(ring.name, S_WRITE, read + 2 * 1024)
    replayed: list[bytes] = []
    try:
        for _ in range(20):
            replayed.extend(bytes(v) for v in consumer.get_many(100))
    except RingCorrupted:
        pass
    else:
        pytest.fail(f"not detected; {len(replayed)} stale records were delivered as new")
    assert replayed == [], "stale records were delivered as new before detection"


def test_live_read_beyond_write_is_detected_by_the_producer(ring: Ring, consumer: Ring) -> None:
    _caught_up(ring, consumer, b"a" * 10)
    poke(ring.name, S_READ, 4096)
    with pytest.raises(RingCorrupted):
        for _ in range(20):  # would overwrite records the consumer has not read
            ring.try_put(b"b" * 100)


def test_supervisor_poison_stops_a_live_consumer(ring: Ring, consumer: Ring) -> None:
    assert ring.put_many([b"a", b"b"]) == 2
    assert bytes(consumer.try_get() or b"") == b"a"
    ring.poison()
    assert ring.stats().poisoned
    with pytest.raises(RingCorrupted, match="poisoned"):
        consumer.try_get()


def test_poisoned_ring_refuses_a_new_consumer(ring: Ring) -> None:
    assert ring.try_put(b"a")
    ring.poison()
    with Ring.attach(ring.name) as c:
        with pytest.raises(RingCorrupted, match="supervisor marked this ring poisoned"):
            c.try_get()


# Lifetime


def test_only_the_creator_unlinks(ring: Ring, consumer: Ring) -> None:
    with pytest.raises(RingError, match="only its creator unlinks"):
        consumer.unlink()
    assert _shm.segment_path(ring.name).exists()


def test_creator_context_manager_closes_and_unlinks() -> None:
    with Ring.create(1024, name=_name()) as r:
        name = r.name
        assert r.try_put(b"a")
        assert bytes(r.try_get() or b"") == b"a"
        run(r.put(b"b"))  # opens the doorbells too
        assert bytes(run(r.get())) == b"b"
    assert r.closed
    assert not [p for p in _shm.SHM_DIR.iterdir() if p.name.startswith(name)]


def test_attached_context_manager_only_closes(ring: Ring) -> None:
    with Ring.attach(ring.name) as c:
        pass
    assert c.closed
    assert _shm.segment_path(ring.name).exists()


def test_close_twice_is_fine(ring: Ring) -> None:
    ring.close()
    ring.close()
    assert ring.closed


def test_close_clears_pids_and_releases_the_held_record(ring: Ring) -> None:
    assert ring.put_many([b"a", b"b"]) == 2
    c = Ring.attach(ring.name)
    assert bytes(c.try_get() or b"") == b"a"
    assert ring.stats().read_pos == 0
    c.close()
    stats = ring.stats()
    assert stats.consumer_pid == 0
    assert stats.read_pos == rec_size(1)
    assert stats.records_out == 1
    with Ring.attach(ring.name) as c2:
        assert [bytes(v) for v in c2.get_many(10)] == [b"b"]


USES: dict[str, Callable[[Ring], object]] = {
    "try_put": lambda r: r.try_put(b"x"),
    "put_many": lambda r: r.put_many([b"x"]),
    "put": lambda r: run(r.put(b"x", timeout=0.1)),
    "try_get": lambda r: r.try_get(),
    "get_many": lambda r: r.get_many(1),
    "get": lambda r: run(r.get(timeout=0.1)),
    "stats": lambda r: r.stats(),
    "occupancy": lambda r: r.occupancy(),
    "poison": lambda r: r.poison(),
}


@pytest.mark.parametrize("use", sorted(USES))
@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after-use"])
def test_use_after_close_raises_ring_closed(use: str, warm: bool) -> None:
    with Ring.create(1024, name=_name()) as r:
        if warm:  # the handle has already taken both sides
            assert r.try_put(b"a") and r.try_put(b"b")
            assert r.try_get() is not None
        r.close()
        with pytest.raises(RingClosed, match="closed"):
            USES[use](r)


def test_pickle_attaches_by_name(ring: Ring) -> None:
    clone = pickle.loads(pickle.dumps(ring))
    with clone:
        assert isinstance(clone, Ring)
        assert clone.name == ring.name and not clone.is_creator
        assert ring.try_put(b"through the clone")
        assert bytes(clone.try_get() or b"") == b"through the clone"
    assert _shm.segment_path(ring.name).exists()


def test_unclosed_handle_warns(ring: Ring) -> None:
    def leak() -> None:
        Ring.attach(ring.name)

    with pytest.warns(ResourceWarning, match="never closed"):
        leak()
        gc.collect()


def test_stats_and_occupancy_from_another_handle(ring: Ring, consumer: Ring) -> None:
    assert ring.put_many([b"x" * 100] * 3) == 3
    stats = consumer.stats()
    assert stats.used_bytes == 3 * rec_size(100)
    assert stats.depth == 3
    assert stats.high_water == 3 * rec_size(100)
    assert consumer.occupancy() == pytest.approx(3 * rec_size(100) / 1024)
    assert stats.occupancy == consumer.occupancy()


# Idle cost


@pytest.mark.parametrize("spin_s", [0.0, DEFAULT_SPIN_S])
def test_idle_waiter_burns_no_cpu(spin_s: float) -> None:
    with Ring.create(4096, name=_name(), spin_s=spin_s) as r:

        async def idle() -> tuple[float, float]:
            # This thread's CPU only: the waiter runs on the loop's thread, while
            # the leak check's watcher thread (tests/conftest.py) costs about 0.1 %
            # of its own, enough with a busy box to push the process over 1 %.
            cpu, wall = time.thread_time(), time.perf_counter()
            with pytest.raises(RingEmpty):
                await r.get(timeout=1.0)
            return time.thread_time() - cpu, time.perf_counter() - wall

        cpu, wall = run(idle())
    assert wall >= 0.99
    assert cpu / wall < 0.01, f"idle get() used {cpu / wall:.2%} of a core"


# Property test against a model


class RingModel:
    """What a producer and a consumer handle should observe, byte for byte.

    Mirrors the ring's accounting: a record of n bytes takes ``(n + 15) & -8``;
    one that does not fit before the end of the data area also consumes the
    tail (a wrap marker). A batch handed out by a get keeps its space until the
    next get; a get only re-reads the write position when it has consumed all
    it last saw.
    """

    def __init__(self, capacity: int, max_record: int) -> None:
        self.capacity = capacity
        self.max_record = max_record
        self.write = 0
        self.released = 0  # published read position
        self.next_read = 0  # consumer's position after what it handed out
        self.seen_write = 0  # consumer's cached write position
        self.queue: deque[tuple[bytes, int]] = deque()  # (payload, end position)
        self.records_in = self.bytes_in = 0
        self.handed = self.handed_bytes = 0
        self.records_out = self.bytes_out = 0
        self.high_water = self.full_events = 0

    def need(self, n: int, at: int) -> int:
        rec = rec_size(n)
        tail = self.capacity - at % self.capacity
        return rec if rec <= tail else rec + tail

    def fits(self, n: int, at: int | None = None) -> bool:
        at = self.write if at is None else at
        return at + self.need(n, at) - self.released <= self.capacity

    def put_many(self, payloads: list[bytes]) -> int | None:
        """The count written, or None when RecordTooLarge is due (nothing published)."""
        w = self.write
        accepted: list[tuple[bytes, int]] = []
        for p in payloads:
            if len(p) > self.max_record:
                return None
            if not self.fits(len(p), w):
                self.full_events += 1
                break
            w += self.need(len(p), w)
            accepted.append((p, w))
        if accepted:
            self.write = w
            self.queue.extend(accepted)
            self.records_in += len(accepted)
            self.bytes_in += sum(len(p) for p, _ in accepted)
            self.high_water = max(self.high_water, self.write - self.released)
        return len(accepted)

    def release(self) -> None:
        self.released = self.next_read
        self.records_out, self.bytes_out = self.handed, self.handed_bytes

    def get_many(self, max_n: int) -> list[bytes]:
        self.release()
        if self.next_read == self.seen_write:
            self.seen_write = self.write
        out: list[bytes] = []
        while self.next_read < self.seen_write and len(out) < max_n:
            payload, self.next_read = self.queue.popleft()
            self.handed += 1
            self.handed_bytes += len(payload)
            out.append(payload)
        return out

    def reattach_consumer(self) -> None:
        self.release()  # close() releases what was handed out
        self.seen_write = self.next_read  # a new handle reads the write position first


def payload(seq: int, n: int) -> bytes:
    return (seq.to_bytes(4, "little") * (n // 4 + 1))[:n]


class RingMachine(RuleBasedStateMachine):
    """A producer and a consumer handle on one ring, against ``RingModel``."""

    def __init__(self) -> None:
        super().__init__()
        self.owner: Ring | None = None
        self.producer: Ring | None = None
        self.consumer: Ring | None = None
        self.model = RingModel(64, 8)
        self.seq = 0
        self.held: list[tuple[memoryview, bytes]] = []

    @initialize(
        capacity=st.integers(8, 512).map(lambda k: k * 8),
        max_record=st.one_of(st.none(), st.floats(0, 1)),
        checksums=st.booleans(),
    )
    def create(self, capacity: int, max_record: float | None, checksums: bool) -> None:
        limit = capacity // 2 - 8
        chosen = None if max_record is None else int(max_record * limit)
        self.owner = Ring.create(
            capacity, name=_name(), max_record=chosen, checksums=checksums, spin_s=0
        )
        self.producer = Ring.attach(self.owner.name)
        self.consumer = Ring.attach(self.owner.name)
        self.model = RingModel(capacity, self.owner.max_record)

    def teardown(self) -> None:
        self.drop_views()
        for handle in (self.consumer, self.producer, self.owner):
            if handle is not None:
                handle.close()
        if self.owner is not None:
            self.owner.unlink()

    def drop_views(self) -> None:
        for view, _ in self.held:
            view.release()
        self.held = []

    def next_payload(self, n: int) -> bytes:
        self.seq += 1
        return payload(self.seq, n)

    def sizes(self) -> st.SearchStrategy[int]:
        top = self.model.max_record
        return st.one_of(st.sampled_from([0, top, max(top - 7, 0)]), st.integers(0, top))

    # Producer rules

    def put_one(self, n: int) -> None:
        assert self.producer is not None
        p = self.next_payload(n)
        expected = self.model.fits(n)
        assert self.producer.try_put(p) is expected
        if expected:
            self.model.put_many([p])
        else:
            self.model.full_events += 1

    @rule(data=st.data())
    def try_put(self, data: st.DataObject) -> None:
        self.put_one(data.draw(self.sizes(), label="size"))

    @rule(back=st.integers(0, 7))
    def put_exactly_to_the_end(self, back: int) -> None:
        """A record whose padded size is exactly the tail: it ends at the data area's end."""
        tail = self.model.capacity - self.model.write % self.model.capacity
        n = tail - 8 - back
        if 0 <= n <= self.model.max_record:
            assert rec_size(n) == tail
            self.put_one(n)

    @rule(over=st.integers(1, 8))
    def put_one_past_the_end(self, over: int) -> None:
        """A record one pad step too big for the tail: it must wrap."""
        tail = self.model.capacity - self.model.write % self.model.capacity
        n = tail - 8 + over
        if 0 <= n <= self.model.max_record:
            self.put_one(n)

    @rule()
    def fill_to_the_end(self) -> None:
        """Put records until the data area is filled exactly to its end, or the ring is full."""
        cap = self.model.capacity
        for _ in range(cap // 8):
            tail = cap - self.model.write % cap
            n = min(tail - 8, self.model.max_record)
            if not self.model.fits(n):
                break
            self.put_one(n)
            if self.model.write % cap == 0:
                break

    def exact_fill_sizes(self) -> list[int]:
        """Payload sizes that leave the ring with exactly zero free bytes, wrapping nowhere."""
        m = self.model
        biggest = (m.max_record + 8) & -8  # the largest padded record a payload may take
        w, free = m.write, m.released + m.capacity - m.write
        sizes: list[int] = []
        while free:
            rec = min(free, m.capacity - w % m.capacity, biggest)
            sizes.append(rec - 8)
            w += rec
            free -= rec
        return sizes

    @rule(batched=st.booleans(), one_more=st.booleans())
    def fill_exactly_full(self, batched: bool, one_more: bool) -> None:
        """Use the last free byte, then (optionally) ask for one record more."""
        assert self.producer is not None
        sizes = self.exact_fill_sizes() + ([0] if one_more else [])
        if batched:
            batch = [self.next_payload(n) for n in sizes]
            assert self.producer.put_many(batch) == self.model.put_many(batch)
        else:
            for n in sizes:
                self.put_one(n)
        assert self.model.write - self.model.released == self.model.capacity

    @rule(data=st.data(), oversize_at=st.one_of(st.none(), st.integers(0, 12)))
    def put_many(self, data: st.DataObject, oversize_at: int | None) -> None:
        assert self.producer is not None
        sizes = data.draw(st.lists(self.sizes(), max_size=12), label="sizes")
        if oversize_at is not None:
            sizes.insert(min(oversize_at, len(sizes)), self.model.max_record + 1)
        batch = [self.next_payload(n) for n in sizes]
        expected = self.model.put_many(batch)
        if expected is None:
            with pytest.raises(RecordTooLarge):
                self.producer.put_many(batch)
        else:
            assert self.producer.put_many(batch) == expected

    @rule(extra=st.integers(1, 100))
    def try_put_oversize(self, extra: int) -> None:
        assert self.producer is not None
        with pytest.raises(RecordTooLarge):
            self.producer.try_put(bytes(self.model.max_record + extra))

    @rule()
    def reattach_producer(self) -> None:
        assert self.owner is not None and self.producer is not None
        self.producer.close()
        self.producer = Ring.attach(self.owner.name)

    # Consumer rules

    def take(self, got: list[memoryview], expected: list[bytes]) -> None:
        assert [bytes(v) for v in got] == expected
        self.held = list(zip(got, expected, strict=True))

    @rule()
    def try_get(self) -> None:
        assert self.consumer is not None
        self.drop_views()
        expected = self.model.get_many(1)
        view = self.consumer.try_get()
        self.take([] if view is None else [view], expected)

    @rule(max_n=st.integers(0, 16))
    def get_many(self, max_n: int) -> None:
        assert self.consumer is not None
        self.drop_views()
        expected = self.model.get_many(max_n)
        self.take(self.consumer.get_many(max_n), expected)

    @precondition(lambda self: bool(self.model.queue))
    @rule()
    def get_awaitable(self) -> None:
        assert self.consumer is not None
        self.drop_views()
        expected = self.model.get_many(1)
        self.take([run(self.consumer.get(timeout=1))], expected)

    @rule()
    def reattach_consumer(self) -> None:
        assert self.owner is not None and self.consumer is not None
        self.drop_views()
        self.consumer.close()
        self.model.reattach_consumer()
        self.consumer = Ring.attach(self.owner.name)

    # What must hold after every step

    @invariant()
    def header_matches_model(self) -> None:
        if self.owner is None:
            return
        m = self.model
        stats = self.owner.stats()
        assert (stats.write_pos, stats.read_pos) == (m.write, m.released)
        assert stats.used_bytes == m.write - m.released <= m.capacity
        assert (stats.records_in, stats.bytes_in) == (m.records_in, m.bytes_in)
        assert (stats.records_out, stats.bytes_out) == (m.records_out, m.bytes_out)
        assert stats.depth == m.records_in - m.records_out
        assert stats.high_water == m.high_water
        assert stats.full_events == m.full_events
        assert stats.corrupt_records == 0 and not stats.poisoned

    @invariant()
    def held_views_are_intact(self) -> None:
        for view, expected in self.held:
            assert bytes(view) == expected


RingMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_ring_matches_model = RingMachine.TestCase
