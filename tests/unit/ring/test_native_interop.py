"""The C ring core (native/ringcore.c) against the Python ring, on one segment.

The core is a study for issue 16, item 3 and is not wired in; these tests
keep it honest while it exists: records written by either side read back
byte for byte on the other, across wrap-around and with checksums on or off,
and the same random operations leave the same results and the same header
counters whichever side runs them in C. Built with gcc into tmp_path.
"""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpipeline.errors import RecordTooLarge, RingCorrupted, RingPoisoned
from mpipeline.ring import (
    HEADER_SIZE,
    S_CONSUMER_WAIT,
    S_CORRUPT,
    S_POISONED,
    S_PRODUCER_WAIT,
    S_READ,
    S_WRITE,
    Ring,
)
from tests.conftest import missing

ROOT = Path(__file__).parents[3]
# Header slots both implementations keep: positions, counters, high water, full events,
# corrupt records, poisoned. Pids and wait sequences are the handle's claim, not the core's.
SHARED_SLOTS = (8, 9, 10, 11, 12, 16, 17, 18, 19, 24)


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    builder: Any = _load(ROOT / "native" / "build.py", "_ringcore_build")
    why = builder.can_build()
    if why:
        missing("a C toolchain for native/ringcore.c", why)
    out = tmp_path_factory.mktemp("ringcore")
    try:
        so = builder.build(out)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"native/ringcore.c does not build:\n{exc.stderr}")
    return _load(so, "ringcore")


class Side:
    """One end of a ring, in Python (the Ring handle) or in C (a core on its mapping)."""

    def __init__(self, ring: Ring, native: ModuleType | None, bell: Callable[[], None]) -> None:
        self.ring = ring
        self.core: Any = None
        self.try_put: Callable[[bytes], bool] = ring.try_put
        self.try_get: Callable[[], memoryview | None] = ring.try_get
        if native is not None:
            self.core = native.Core(ring._mem, ring.name, bell=bell)
            self.try_put, self.try_get = self.core.try_put, self.core.try_get

    def close(self) -> None:
        if self.core is not None:
            self.core.close()
        self.ring.close()


class Pair:
    """A producer side and a consumer side of one fresh ring, and the bells they rang."""

    def __init__(
        self,
        native: ModuleType,
        producer: str,
        consumer: str,
        capacity: int,
        checksums: bool,
        max_record: int | None,
    ) -> None:
        self.bells: list[str] = []
        owner = Ring.create(capacity, checksums=checksums, max_record=max_record)
        self.prod = Side(owner, native if producer == "c" else None, self._bell("data"))
        self.cons = Side(
            Ring.attach(owner.name), native if consumer == "c" else None, self._bell("space")
        )
        self.q = owner._q

    def _bell(self, which: str) -> Callable[[], None]:
        return lambda: self.bells.append(which)

    def header(self) -> tuple[int, ...]:
        return tuple(self.q[i] for i in SHARED_SLOTS)

    def close(self) -> None:
        if self.prod.ring.closed:
            return
        self.cons.close()
        self.prod.close()
        self.prod.ring.unlink()


@pytest.fixture
def make_pair(native: ModuleType) -> Iterator[Callable[..., Pair]]:
    made: list[Pair] = []

    def make(
        producer: str,
        consumer: str,
        *,
        capacity: int = 512,
        checksums: bool = True,
        max_record: int | None = None,
    ) -> Pair:
        made.append(Pair(native, producer, consumer, capacity, checksums, max_record))
        return made[-1]

    yield make
    for pair in made:
        pair.close()


DIRECTIONS = [("c", "py"), ("py", "c"), ("c", "c")]


def payload(i: int, n: int) -> bytes:
    return bytes((i * 31 + k) & 0xFF for k in range(n))


@pytest.mark.parametrize("checksums", [True, False], ids=["crc", "nocrc"])
@pytest.mark.parametrize(("producer", "consumer"), DIRECTIONS)
def test_records_round_trip_across_wrap_around(
    make_pair: Callable[..., Pair], producer: str, consumer: str, checksums: bool
) -> None:
    pair = make_pair(producer, consumer, checksums=checksums)
    maxrec = pair.prod.ring.max_record
    sizes = [0, 1, 7, 8, 9, 100, maxrec, 3, maxrec - 1, 64] * 12  # wraps a 512 B ring many times
    for i, n in enumerate(sizes):
        buf = payload(i, n)
        assert pair.prod.try_put(buf)
        view = pair.cons.try_get()
        assert view is not None and view.readonly and bytes(view) == buf, (i, n)
    assert pair.cons.try_get() is None
    stats = pair.prod.ring.stats()
    assert stats.records_in == stats.records_out == len(sizes)
    assert stats.bytes_in == stats.bytes_out == sum(sizes)
    assert stats.write_pos > 4 * 512  # it did wrap
    assert pair.bells == []  # nobody was asleep


@pytest.mark.parametrize(("producer", "consumer"), DIRECTIONS)
def test_a_full_ring_refuses_until_the_next_get_releases_space(
    make_pair: Callable[..., Pair], producer: str, consumer: str
) -> None:
    pair = make_pair(producer, consumer)
    buf = payload(1, 100)
    written = 0
    while pair.prod.try_put(buf):
        written += 1
    assert written == 512 // 112 and pair.prod.ring.stats().full_events == 1
    got = [bytes(v) for v in iter(pair.cons.try_get, None)]
    assert got == [buf] * written
    assert pair.prod.try_put(buf)  # the last get released only up to the record it handed out


def test_the_c_producer_refuses_an_oversize_record_naming_both_sizes(
    make_pair: Callable[..., Pair],
) -> None:
    pair = make_pair("c", "py")
    maxrec = pair.prod.ring.max_record
    with pytest.raises(RecordTooLarge, match=f"{maxrec + 1} bytes exceeds .* {maxrec} bytes"):
        pair.prod.try_put(bytes(maxrec + 1))
    assert pair.q[S_WRITE] == 0


def test_the_c_consumer_skips_and_counts_a_bad_checksum(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair("py", "c")
    assert pair.prod.try_put(b"first record") and pair.prod.try_put(b"second")
    pair.prod.ring._mv[HEADER_SIZE + 8] ^= 0xFF  # flip the first payload byte
    with pytest.raises(RingCorrupted, match="checksum mismatch") as exc:
        pair.cons.try_get()
    assert exc.value.record == b"\x99irst record"  # type: ignore[attr-defined]
    assert pair.q[S_CORRUPT] == 1
    view = pair.cons.try_get()
    assert view is not None and bytes(view) == b"second"


def test_the_c_consumer_poisons_the_ring_on_a_bad_length(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair("py", "c")
    assert pair.prod.try_put(b"x" * 16)
    pair.prod.ring._mv[HEADER_SIZE : HEADER_SIZE + 4] = (10_000).to_bytes(4, "little")
    with pytest.raises(RingPoisoned, match="exceeds max_record"):
        pair.cons.try_get()
    assert pair.q[S_POISONED] == 1
    with pytest.raises(RingPoisoned, match="is poisoned"):
        pair.cons.try_get()


def test_the_c_sides_ring_a_sleeping_peer_once_per_sleep(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair("c", "c")
    pair.q[S_CONSUMER_WAIT] = 1  # the consumer announced it sleeps
    assert pair.prod.try_put(b"a") and pair.prod.try_put(b"b")
    assert pair.bells == ["data"]
    pair.q[S_CONSUMER_WAIT] = 3
    pair.q[S_PRODUCER_WAIT] = 5
    assert pair.prod.try_put(b"c")
    assert pair.cons.try_get() is not None  # publishes nothing yet
    assert pair.cons.try_get() is not None  # releases "a": the producer is rung
    assert pair.cons.try_get() is not None
    assert pair.bells == ["data", "data", "space"]


def test_a_c_view_outlives_the_core_and_the_ring(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair("py", "c")
    assert pair.prod.try_put(b"kept")
    view = pair.cons.try_get()
    assert view is not None
    pair.cons.close()
    assert bytes(view) == b"kept"
    with pytest.raises(ValueError, match="closed"):
        pair.cons.core.try_get()
    view.release()


# Random operations, the same on a Python pair and on a mixed pair: every result
# and the shared header slots must agree after every step.
OPS = st.lists(
    st.one_of(st.integers(min_value=0, max_value=130), st.just(-1)), min_size=1, max_size=60
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, direction=st.sampled_from(DIRECTIONS), checksums=st.booleans())
def test_c_and_python_sides_behave_identically(
    make_pair: Callable[..., Pair], ops: list[int], direction: tuple[str, str], checksums: bool
) -> None:
    # max_record 120 of 256: records up to half the ring, and some over the limit.
    ref = make_pair("py", "py", capacity=256, checksums=checksums, max_record=120)
    mixed = make_pair(*direction, capacity=256, checksums=checksums, max_record=120)
    for i, op in enumerate(ops):
        results: list[object] = []
        for pair in (ref, mixed):
            if op < 0:
                view = pair.cons.try_get()
                results.append(None if view is None else bytes(view))
                continue
            try:
                results.append(pair.prod.try_put(payload(i, op)))
            except RecordTooLarge:
                results.append(RecordTooLarge)
        assert results[0] == results[1], (i, op)
        assert ref.header() == mixed.header(), (i, op)
    assert ref.q[S_READ] == mixed.q[S_READ]
    # Hypothesis runs many examples in one test call: free their segments as it goes.
    ref.close()
    mixed.close()
