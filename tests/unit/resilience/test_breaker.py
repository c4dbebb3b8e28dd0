"""Circuit breakers: the state machine on an injected clock, the rate window, half-open
probing one at a time, leases, Retry-After holds, and one board shared by processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import stat
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

from mpipeline import _shm
from mpipeline.config import BreakerConfig
from mpipeline.errors import RingCorrupted, RingNotFound
from mpipeline.resilience import _breaker_shm as layout
from mpipeline.resilience.breaker import (
    DISABLED,
    Breaker,
    BreakerBoard,
    Permit,
    Refusal,
    probes_needed,
)

T0 = 1_000_000.0  # an injected clock, well after boot


@contextlib.contextmanager
def board(**fields: Any) -> Iterator[BreakerBoard]:
    b = BreakerBoard.private(BreakerConfig(**fields))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def name() -> Iterator[str]:
    name = f"mpl-test-br-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        _shm.unlink_segment(name)


def permit(br: Breaker, now: float = T0, lease_s: float | None = None) -> Permit:
    decision = br.allow(now, lease_s)
    assert isinstance(decision, Permit), decision
    return decision


def refusal(br: Breaker, now: float = T0) -> Refusal:
    decision = br.allow(now)
    assert isinstance(decision, Refusal), decision
    return decision


def fail(br: Breaker, n: int, now: float = T0) -> None:
    for _ in range(n):
        br.record(permit(br, now), False, now)


# Closed -> open


def test_opens_after_consecutive_failures_and_fails_fast() -> None:
    with board(consecutive_failures=3, open_s=5.0) as b:
        br = b.breaker("openai")
        fail(br, 2)
        assert br.state().state == "closed"
        assert br.state().consecutive_failures == 2
        fail(br, 1)
        assert br.state().state == "open"
        r = refusal(br, T0 + 1.0)
        assert r.reason == "open" and r.wait_s == pytest.approx(4.0)
        assert br.refused == 1
        assert br.state().retry_at == pytest.approx(T0 + 5.0)


def test_a_success_resets_the_run_of_failures() -> None:
    with board(consecutive_failures=3, min_calls=1000) as b:
        br = b.breaker("u")
        for _ in range(10):
            fail(br, 2)
            br.record(permit(br), True, T0)
        assert br.state().state == "closed"
        assert br.state().consecutive_failures == 0


def test_verdicts_without_a_verdict_count_for_nothing() -> None:
    with board(consecutive_failures=2, min_calls=1) as b:
        br = b.breaker("u")
        for _ in range(10):
            br.record(permit(br), None, T0)
        s = br.state()
        assert s.state == "closed" and s.window_calls == 0


def test_failure_rate_over_the_window_opens() -> None:
    with board(consecutive_failures=100, failure_rate=0.5, window_s=8.0, min_calls=10) as b:
        br = b.breaker("u")
        for i in range(9):
            br.record(permit(br), i % 2 == 0, T0)  # 5 successes, 4 failures
        assert br.state().state == "closed"
        assert (br.state(T0).window_calls, br.state(T0).window_failures) == (9, 4)
        br.record(permit(br), False, T0)  # 10 calls, 5 failures: 50 %
        assert br.state().state == "open"


def test_rate_needs_min_calls() -> None:
    with board(consecutive_failures=100, failure_rate=0.5, min_calls=10) as b:
        br = b.breaker("u")
        for _ in range(4):
            br.record(permit(br), True, T0)
            br.record(permit(br), False, T0)
        assert br.state().state == "closed"  # 50 % of 8 calls: not enough calls


def test_old_failures_leave_the_window() -> None:
    with board(consecutive_failures=100, failure_rate=0.5, window_s=8.0, min_calls=4) as b:
        for name, later in (("recent", T0 + 1.0), ("aged", T0 + 8.0)):
            br = b.breaker(name)
            for ok in (False, True, True, True):
                br.record(permit(br), ok, T0)
            fail(br, 2, later)  # with the old calls: 3 of 6 failed, 50 %
            assert br.state(later).state == ("open" if name == "recent" else "closed")


# Half-open


def test_half_open_lets_one_probe_at_a_time_and_closes_only_after_all_probes() -> None:
    transitions: list[tuple[str, str, str]] = []
    cfg = BreakerConfig(consecutive_failures=1, open_s=5.0, probes=3, probe_success_rate=1.0)
    b = BreakerBoard.private(cfg, on_transition=lambda *t: transitions.append(t))
    try:
        br = b.breaker("u")
        fail(br, 1)
        t = T0 + 5.0
        probe = permit(br, t)
        assert probe.probe and br.state().state == "half_open"
        assert refusal(br, t).reason == "probing"  # at most one concurrent probe
        br.record(probe, True, t)
        assert br.state().state == "half_open"  # not "close on the first success"
        for _ in range(2):
            probe = permit(br, t)
            assert refusal(br, t).reason == "probing"
            br.record(probe, True, t)
        s = br.state()
        assert s.state == "closed" and s.probes_succeeded == 3
        assert isinstance(br.allow(t), Permit)
        assert transitions == [
            ("u", "closed", "open"),
            ("u", "open", "half_open"),
            ("u", "half_open", "closed"),
        ]
        assert s.transitions == 3 and s.opens == 1
    finally:
        b.close()


def test_probes_reopen_as_soon_as_the_rate_is_out_of_reach() -> None:
    with board(consecutive_failures=1, open_s=1.0, probes=4, probe_success_rate=0.5) as b:
        br = b.breaker("u")
        assert probes_needed(b.cfg) == 2
        fail(br, 1)
        t = T0 + 1.0
        for _ in range(2):
            br.record(permit(br, t), False, t)
            assert br.state().state == "half_open"  # 2 of the 2 left may still succeed
        br.record(permit(br, t), False, t)
        assert br.state().state == "open"
        assert refusal(br, t + 0.5).reason == "open"


def test_probes_close_at_the_success_rate() -> None:
    with board(consecutive_failures=1, open_s=1.0, probes=4, probe_success_rate=0.5) as b:
        br = b.breaker("u")
        fail(br, 1)
        t = T0 + 1.0
        for ok in (True, False, False, True):
            probe = permit(br, t)
            assert br.state().state == "half_open"
            br.record(probe, ok, t)
        assert br.state().state == "closed"


def test_a_single_probe_closes_on_its_success() -> None:
    with board(consecutive_failures=1, open_s=1.0, probes=1) as b:
        br = b.breaker("u")
        fail(br, 1)
        br.record(permit(br, T0 + 1), True, T0 + 1)
        assert br.state().state == "closed"


def test_a_lost_probe_expires_and_counts_as_a_failure() -> None:
    with board(consecutive_failures=1, open_s=1.0, probes=2) as b:
        br = b.breaker("u")
        fail(br, 1)
        t = T0 + 1.0
        lost = permit(br, t, lease_s=2.0)
        assert refusal(br, t + 1.9).reason == "probing"
        r = refusal(br, t + 2.0)  # expired: a failure, and 2 of 2 can no longer succeed
        assert r.reason == "open"
        assert br.state().state == "open" and br.state().opens == 2
        br.record(lost, True, t + 2.1)  # too late: ignored
        assert br.state().state == "open"


def test_a_lost_last_probe_that_still_closes_the_circuit_lets_the_call_through() -> None:
    # Found by test_breaker_model.py: the call that noticed the loss closed the
    # circuit, yet was refused as "probing".
    with board(consecutive_failures=1, open_s=1.0, probes=2, probe_success_rate=0.5) as b:
        br = b.breaker("u")
        fail(br, 1)
        t = T0 + 1.0
        br.record(permit(br, t), True, t)
        permit(br, t, lease_s=0.5)  # never reported
        closed = permit(br, t + 0.5)  # lost: 1 of 2 succeeded, which is enough
        assert closed.probe == 0 and br.state().state == "closed"
        br.record(closed, False, t + 0.5)  # a verdict of the closed state: counted
        assert br.state().state == "open"


def test_a_probe_released_without_verdict_gives_its_turn_back() -> None:
    with board(consecutive_failures=1, open_s=1.0, probes=2) as b:
        br = b.breaker("u")
        fail(br, 1)
        t = T0 + 1.0
        br.record(permit(br, t), None, t)
        assert br.state().probes_granted == 0
        for _ in range(2):
            br.record(permit(br, t), True, t)
        assert br.state().state == "closed"


def test_verdicts_from_an_earlier_state_are_ignored() -> None:
    with board(consecutive_failures=2, open_s=1.0, probes=1) as b:
        br = b.breaker("u")
        early = [permit(br) for _ in range(5)]
        fail(br, 2)
        assert br.state().state == "open"
        for p in early:
            br.record(p, True, T0)  # granted while closed: must not close it
        assert br.state().state == "open"
        br.record(permit(br, T0 + 1), True, T0 + 1)
        for p in early:
            br.record(p, False, T0 + 1)  # nor reopen the new closed state
        assert br.state().state == "closed" and br.state().consecutive_failures == 0


# Retry-After holds and the switch


def test_defer_holds_every_call_until_not_before() -> None:
    with board() as b:
        br = b.breaker("u")
        br.defer(T0 + 2.0)
        br.defer(T0 + 1.0)  # never shortens
        assert br.not_before == T0 + 2.0
        r = refusal(br, T0)
        assert r.reason == "deferred" and r.wait_s == pytest.approx(2.0)
        assert isinstance(br.allow(T0 + 2.0), Permit)


def test_an_open_breaker_reports_the_later_of_its_open_time_and_the_hold() -> None:
    with board(consecutive_failures=1, open_s=1.0) as b:
        br = b.breaker("u")
        fail(br, 1)
        br.defer(T0 + 3.0)
        r = refusal(br, T0)
        assert r.reason == "open" and r.wait_s == pytest.approx(3.0)
        assert refusal(br, T0 + 1.5).reason == "deferred"  # half-open, but no probe yet
        assert permit(br, T0 + 3.0).probe


def test_disabled_never_opens_but_honours_retry_after() -> None:
    with board(enabled=False, consecutive_failures=1) as b:
        br = b.breaker("u")
        for _ in range(10):
            p = br.allow(T0)
            assert p is DISABLED
            br.record(p, False, T0)
        br.defer(T0 + 1.0)
        assert refusal(br, T0).reason == "deferred"
        assert br.state().state == "closed"


# The board


def test_slots_are_found_by_name_and_listed() -> None:
    with board() as b:
        a, c = b.breaker("openai"), b.breaker("anthropic")
        assert b.breaker("openai") is a
        fail(a, 1)
        names = [(s.name, s.window_failures) for s in b.snapshot(T0)]
        assert names == [("openai", 1), ("anthropic", 0)]
        assert c.state().state == "closed"


def test_bad_names_and_a_full_board_are_refused() -> None:
    b = BreakerBoard.private(BreakerConfig(), slots=2)
    try:
        with pytest.raises(ValueError, match="ASCII"):
            b.breaker("é")
        with pytest.raises(ValueError, match="1-32"):
            b.breaker("x" * 33)
        b.breaker("a")
        b.breaker("b")
        with pytest.raises(ValueError, match="no free slot"):
            b.breaker("c")
    finally:
        b.close()
    with pytest.raises(ValueError, match="at least one slot"):
        BreakerBoard.private(BreakerConfig(), slots=0)


def test_segment_is_0600_shared_and_unlinked(name: str) -> None:
    cfg = BreakerConfig(consecutive_failures=1)
    owner = BreakerBoard.create(name, cfg, slots=4)
    path = _shm.segment_path(name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == layout.segment_size(4)
    other = BreakerBoard.attach(name, cfg)
    fail(owner.breaker("u"), 1)
    assert refusal(other.breaker("u")).reason == "open"
    assert [s.name for s in other.snapshot()] == ["u"]
    other.unlink()  # not the creator: a no-op
    assert path.exists()
    other.close()
    owner.close()
    owner.unlink()
    assert not path.exists()
    with pytest.raises(RingNotFound):
        BreakerBoard.attach(name, cfg)


def test_attach_refuses_other_segments_and_sweep_knows_the_board(name: str) -> None:
    fd, mem = _shm.create_segment(name, 4096)
    mem.close()
    os.close(fd)
    with pytest.raises(RingCorrupted, match="not an mpipeline breaker board"):
        BreakerBoard.attach(name, BreakerConfig())
    _shm.unlink_segment(name)
    BreakerBoard.create(name, BreakerConfig(), slots=1).close()
    assert _shm.sweep_stale(prefix=name) == []  # its creator (us) is alive
    assert _shm.sweep_stale(prefix=name, alive=lambda pid, start: False) == [name]


# The two processes share the parent's injected clock: a descheduled process
# cannot see the circuit close early, as it could with a real open_s of 50 ms.
SHARED_OPEN_S = 30.0


def _child(name: str, conn: Connection) -> None:
    """Child: attach, then obey ``(fail|probe|exit, now)`` from the parent."""
    cfg = BreakerConfig(consecutive_failures=3, open_s=SHARED_OPEN_S, probes=1)
    b = BreakerBoard.attach(name, cfg)
    br = b.breaker("shared")
    conn.send("ready")
    while True:
        cmd, now = conn.recv()
        if cmd == "fail":
            fail(br, 3, now)
            conn.send(br.state(now).state)
        elif cmd == "probe":
            decision = br.allow(now, lease_s=60.0)
            conn.send(isinstance(decision, Permit) and decision.probe > 0)
        else:
            os._exit(0)  # with the probe still out: it is never reported


def test_two_processes_share_one_board(name: str) -> None:
    cfg = BreakerConfig(consecutive_failures=3, open_s=SHARED_OPEN_S, probes=1)
    b = BreakerBoard.create(name, cfg, slots=4)
    br = b.breaker("shared")
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_child, args=(name, theirs))
    child.start()
    reopened = T0 + SHARED_OPEN_S + 2
    try:
        assert ours.poll(60) and ours.recv() == "ready"
        ours.send(("fail", T0))
        assert ours.poll(30) and ours.recv() == "open"
        assert refusal(br, T0 + 1).reason == "open"  # the child's failures
        assert br.state(T0 + 1).retry_at == T0 + SHARED_OPEN_S
        ours.send(("probe", T0 + SHARED_OPEN_S))
        assert ours.poll(30) and ours.recv() is True
        assert refusal(br, T0 + SHARED_OPEN_S + 1).reason == "probing"  # the child holds it
        ours.send(("exit", 0.0))
        child.join(30)
        assert child.exitcode == 0
        # The holder died with its probe out: counted as failed at once, long
        # before its 60 s lease ends, and the circuit opens again.
        assert refusal(br, reopened).reason == "open"
        state = br.state(reopened)
        assert (state.opens, state.opened_at) == (2, reopened)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        b.close()
        b.unlink()
