"""Token buckets: refill math on an injected clock, both buckets or neither, the
session table's bounded memory, and one budget shared by several processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import stat
import time
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from mpipeline import _shm, config
from mpipeline.config import RateLimitConfig
from mpipeline.errors import RingCorrupted, RingNotFound
from mpipeline.gateway import ratelimit
from mpipeline.gateway.ratelimit import RateLimiter, bucket_size, retry_after_s

T0 = 1_000_000.0  # an injected clock, well after any segment's creation


@contextlib.contextmanager
def private(**fields: Any) -> Iterator[RateLimiter]:
    limiter = RateLimiter.private(RateLimitConfig(**fields))
    try:
        yield limiter
    finally:
        limiter.close()


@pytest.fixture
def name() -> Iterator[str]:
    name = f"mpl-test-rl-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        _shm.unlink_segment(name)


def take(limiter: RateLimiter, n: int, session: str | None = None, now: float = T0) -> int:
    """How many of ``n`` requests at ``now`` get in."""
    return sum(limiter.acquire(session, now) == 0.0 for _ in range(n))


def refusal(limiter: RateLimiter, session: str | None, now: float) -> tuple[float, str]:
    """The wait and the bucket that refused (a call, so the checker does not narrow it)."""
    wait = limiter.acquire(session, now)
    return wait, limiter.refused_by


# Sizes and rounding


def test_bucket_size_defaults_to_one_second_of_rate() -> None:
    assert bucket_size(10, 0) == 10
    assert bucket_size(2.5, 0) == 3
    assert bucket_size(0.2, 0) == 1
    assert bucket_size(10, 4) == 4


@pytest.mark.parametrize(
    ("wait", "header"), [(1e-9, 1), (0.2, 1), (1.0, 1), (1.01, 2), (2.5, 3), (59.99, 60)]
)
def test_retry_after_rounds_up_to_whole_seconds(wait: float, header: int) -> None:
    assert retry_after_s(wait) == header


# The global bucket


def test_burst_then_refill_at_the_rate() -> None:
    with private(requests_per_s=2, burst=5) as rl:
        assert take(rl, 10) == 5
        # Empty: the next token is half a second away at 2/s.
        assert rl.acquire(None, T0) == pytest.approx(0.5)
        assert rl.refused_by == "global"
        assert rl.acquire(None, T0 + 0.25) == pytest.approx(0.25)
        assert rl.acquire(None, T0 + 0.5) == 0.0
        # A long pause refills no more than the burst.
        assert take(rl, 10, now=T0 + 100) == 5
        assert rl.admitted == 11 and rl.refused == 5 + 2 + 5


def test_a_clock_behind_the_bucket_neither_refills_nor_rewinds() -> None:
    with private(requests_per_s=1, burst=1) as rl:
        assert rl.acquire(None, T0) == 0.0
        # Another process stamped a later time first: no negative refill.
        assert rl.acquire(None, T0 - 5) == pytest.approx(1.0)
        assert rl.acquire(None, T0 + 1) == 0.0


def test_fractional_rates() -> None:
    with private(requests_per_s=0.5, burst=1) as rl:
        assert rl.acquire(None, T0) == 0.0
        wait = rl.acquire(None, T0)
        assert wait == pytest.approx(2.0) and retry_after_s(wait) == 2
        assert rl.acquire(None, T0 + 1.999) > 0
        assert rl.acquire(None, T0 + 2.0) == 0.0


def test_off_admits_everything() -> None:
    with private() as rl:
        assert take(rl, 1000, "s") == 1000


# Sessions


def test_each_session_has_its_own_bucket() -> None:
    with private(session_requests_per_s=1, session_burst=2) as rl:
        assert take(rl, 5, "alice") == 2
        assert rl.refused_by == "session"
        assert take(rl, 5, "bob") == 2
        # No session: only the (absent) global limit applies.
        assert take(rl, 5, None) == 5
        assert rl.acquire("alice", T0) == pytest.approx(1.0)
        assert rl.acquire("alice", T0 + 1) == 0.0


def test_global_and_session_both_needed_and_never_half_taken() -> None:
    with private(requests_per_s=1, burst=3, session_requests_per_s=1, session_burst=2) as rl:
        assert take(rl, 2, "alice") == 2
        # Alice is out; her refusals must not spend the global bucket.
        assert take(rl, 10, "alice") == 0
        assert rl.refused_by == "session"
        assert take(rl, 1, "bob") == 1
        # Now the global bucket is empty: Bob has a token left but may not use it...
        wait, bucket = refusal(rl, "bob", T0)
        assert wait == pytest.approx(1.0) and bucket == "global"
        # ...and keeps it: one second later the global refill lets him in once.
        assert rl.acquire("bob", T0 + 1) == 0.0
        assert rl.acquire("carol", T0 + 1) > 0


def test_the_longer_wait_is_reported() -> None:
    with private(requests_per_s=10, burst=1, session_requests_per_s=0.25, session_burst=1) as rl:
        assert rl.acquire("s", T0) == 0.0
        wait = rl.acquire("s", T0)
        assert wait == pytest.approx(4.0) and rl.refused_by == "session"


def test_a_full_bucket_is_evicted_and_a_busy_one_shared() -> None:
    # One slot only: every session competes for it.
    with private(session_requests_per_s=1, session_burst=2, session_slots=1) as rl:
        assert take(rl, 1, "alice") == 1
        # Alice's bucket is not full: Bob shares it (1 token left between them).
        assert take(rl, 3, "bob") == 1
        assert take(rl, 1, "alice") == 0
        # Two seconds later the bucket is full again, so Bob may take the slot over;
        # Alice then finds it busy and shares, which is what she would get anyway.
        assert take(rl, 1, "bob", now=T0 + 2) == 1
        assert take(rl, 3, "alice", now=T0 + 2) == 1


def test_sessions_keep_their_slots_among_neighbours() -> None:
    # Many sessions in a table with room for them: each gets exactly its own burst.
    with private(session_requests_per_s=1, session_burst=3, session_slots=1024) as rl:
        sessions = [f"session-{i}" for i in range(200)]
        for s in sessions:
            assert take(rl, 5, s) == 3, s
        assert all(rl.acquire(s, T0) > 0 for s in sessions)


def test_session_ids_that_are_not_valid_utf8_text_still_hash() -> None:
    with private(session_requests_per_s=1, session_burst=1) as rl:
        assert rl.acquire("a\ud800b", T0) == 0.0
        assert rl.acquire("a\ud800b", T0) > 0


def test_config_wants_a_power_of_two_of_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "_free_shm_bytes", lambda: 1 << 40)
    path = tmp_path / "cfg.toml"
    path.write_text("[gateway.rate_limit]\nsession_slots = 1000\nrequests_per_s = -1\n")
    found = [(i.line, i.field, i.message) for i in config.validate(path)]
    assert found == [
        (2, "gateway.rate_limit.session_slots", "1000 is not a power of two"),
        (3, "gateway.rate_limit.requests_per_s", "must be >= 0"),
    ]
    assert not RateLimitConfig().enabled
    assert RateLimitConfig(session_requests_per_s=0.5).enabled


# The shared segment


def test_segment_is_0600_attachable_and_unlinked(name: str) -> None:
    cfg = RateLimitConfig(requests_per_s=5, burst=5, session_requests_per_s=1, session_slots=64)
    rl = RateLimiter.create(name, cfg)
    path = _shm.segment_path(name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == ratelimit.segment_size(cfg)
    other = RateLimiter.attach(name)
    assert take(rl, 3, now=time.monotonic()) == 3
    assert take(other, 3, now=time.monotonic()) == 2  # one budget
    assert other.admitted == rl.admitted == 5
    other.unlink()  # not the creator: a no-op
    assert path.exists()
    other.close()
    rl.close()
    rl.unlink()
    assert not path.exists()
    with pytest.raises(RingNotFound):
        RateLimiter.attach(name)


def test_session_table_is_skipped_when_sessions_are_unlimited() -> None:
    assert ratelimit.segment_size(RateLimitConfig(requests_per_s=1)) == 8 * ratelimit.HEADER_WORDS


def test_attach_refuses_other_segments(name: str) -> None:
    fd, mem = _shm.create_segment(name, 4096)
    mem.close()
    os.close(fd)
    with pytest.raises(RingCorrupted, match="not an mpipeline rate limiter"):
        RateLimiter.attach(name)


def test_sweep_removes_the_segment_of_a_dead_creator(name: str) -> None:
    rl = RateLimiter.create(name, RateLimitConfig(requests_per_s=1))
    rl.close()
    assert _shm.sweep_stale(prefix=name) == []  # we are alive
    assert _shm.sweep_stale(prefix=name, alive=lambda pid, start: False) == [name]


def _hammer(name: str, results: Connection) -> None:
    """Child: take tokens until refused; report how many got in."""
    rl = RateLimiter.attach(name)
    results.send("ready")
    results.recv()  # start together
    admitted = 0
    while rl.acquire(None) == 0.0:
        admitted += 1
    rl.close()
    results.send(admitted)


def test_two_processes_share_one_global_budget(name: str) -> None:
    # Enough tokens that both processes take them at once for a while (without the
    # lock, lost updates admit tens of thousands too many), and a refill too slow to
    # add one during the test: together they must get exactly the burst.
    burst = 200_000
    rl = RateLimiter.create(name, RateLimitConfig(requests_per_s=1e-6, burst=burst))
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_hammer, args=(name, theirs))
    child.start()
    try:
        assert ours.poll(60), "the child did not attach"
        assert ours.recv() == "ready"
        ours.send("go")
        mine = 0
        while rl.acquire(None) == 0.0:
            mine += 1
        assert ours.poll(60), "the child did not finish"
        theirs_admitted = ours.recv()
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
    assert mine + theirs_admitted == burst, (mine, theirs_admitted)
    assert rl.admitted == burst and rl.refused >= 2
    rl.close()
    rl.unlink()


def _hold_lock(name: str, results: Connection) -> None:
    import fcntl

    fd = os.open(_shm.segment_path(name), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    results.send("locked")
    time.sleep(60)


def test_a_killed_lock_holder_does_not_wedge_the_others(name: str) -> None:
    rl = RateLimiter.create(name, RateLimitConfig(requests_per_s=100))
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_hold_lock, args=(name, theirs))
    child.start()
    try:
        assert ours.poll(60) and ours.recv() == "locked"
        child.kill()
        child.join(30)
        assert rl.acquire(None) == 0.0  # would block forever if the lock outlived it
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        rl.close()
        rl.unlink()
