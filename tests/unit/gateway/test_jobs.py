"""The async requests' table (``gateway/jobs.py``): states, one outcome, TTL, bounds.

The clock is injected, so expiry is tested at its exact edge without waiting.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mpipeline import config
from mpipeline.gateway.jobs import ID_PREFIX, JobState, JobTable

TTL_S = 60.0


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def table(clock: Clock, max_jobs: int = 4) -> JobTable[str, str]:
    return JobTable(ttl_s=TTL_S, max_jobs=max_jobs, clock=clock, wall=lambda: 5e8 + clock.now)


def test_a_job_goes_queued_running_completed_and_keeps_its_result(clock: Clock) -> None:
    jobs = table(clock)
    job = jobs.add()
    assert job is not None
    assert jobs.counts()["queued"] == 1
    assert job.id.startswith(ID_PREFIX) and jobs.get(job.id) is job
    assert jobs.start(job.id)
    assert jobs.counts()["running"] == 1
    assert not jobs.start(job.id)  # only from queued
    assert jobs.complete(job.id, "hello")
    assert (job.state, job.result, job.error) == (JobState.COMPLETED, "hello", None)
    assert job.finished_at == 5e8 + clock.now
    assert job.expires_at == job.finished_at + TTL_S
    assert jobs.counts() == {
        "queued": 0,
        "running": 0,
        "completed": 1,
        "failed": 0,
        "cancelled": 0,
    }


def test_ids_are_unguessable_and_unique(clock: Clock) -> None:
    jobs = table(clock, max_jobs=1000)
    ids = set()
    for _ in range(500):
        job = jobs.add()
        assert job is not None
        ids.add(job.id)
    assert len(ids) == 500
    # 16 random bytes, URL-safe base64: 22 characters after the prefix.
    assert {len(i) for i in ids} == {len(ID_PREFIX) + 22}


@pytest.mark.parametrize("first", ["complete", "fail", "cancel"])
def test_the_first_outcome_is_the_only_one(clock: Clock, first: str) -> None:
    """Exactly one outcome: whatever comes after the first changes nothing."""
    jobs = table(clock)
    job = jobs.add()
    assert job is not None
    jobs.start(job.id)
    ends: dict[str, Callable[[], bool]] = {
        "complete": lambda: jobs.complete(job.id, "result"),
        "fail": lambda: jobs.fail(job.id, "boom"),
        "cancel": lambda: jobs.cancel(job.id),
    }
    assert ends[first]()
    state, result, error, finished = job.state, job.result, job.error, job.finished_at
    clock.now += 1
    for name, end in ends.items():
        assert not end(), name
    assert (job.state, job.result, job.error, job.finished_at) == (state, result, error, finished)
    assert sum(jobs.counts().values()) == 1


def test_completion_after_cancel_is_dropped(clock: Clock) -> None:
    jobs = table(clock)
    job = jobs.add()
    assert job is not None
    jobs.start(job.id)
    assert jobs.cancel(job.id, "by DELETE")
    assert not jobs.complete(job.id, "late result")
    assert (job.state, job.result, job.error) == (JobState.CANCELLED, None, "by DELETE")


def test_cancel_after_completion_changes_nothing(clock: Clock) -> None:
    jobs = table(clock)
    job = jobs.add()
    assert job is not None
    jobs.start(job.id)
    assert jobs.complete(job.id, "done")
    assert not jobs.cancel(job.id)
    assert (job.state, job.result) == (JobState.COMPLETED, "done")


def test_a_queued_job_can_be_cancelled_and_then_never_starts(clock: Clock) -> None:
    jobs = table(clock)
    job = jobs.add()
    assert job is not None
    assert jobs.cancel(job.id)
    assert not jobs.start(job.id)
    assert job.state is JobState.CANCELLED


def test_an_outcome_expires_after_the_ttl_and_not_before(clock: Clock) -> None:
    jobs = table(clock)
    job = jobs.add()
    assert job is not None
    jobs.start(job.id)
    clock.now += 10 * TTL_S  # unfinished jobs do not expire
    assert jobs.get(job.id) is job
    jobs.fail(job.id, "boom")
    clock.now += TTL_S - 0.001
    assert jobs.get(job.id) is job
    clock.now += 0.001
    assert jobs.get(job.id) is None
    assert len(jobs) == 0
    assert not jobs.complete(job.id, "too late")  # a forgotten job takes no outcome


def test_expiry_follows_the_order_jobs_finished_in(clock: Clock) -> None:
    jobs = table(clock)
    a, b = jobs.add(), jobs.add()
    assert a is not None and b is not None
    jobs.complete(b.id, "b")
    clock.now += TTL_S / 2
    jobs.complete(a.id, "a")
    clock.now += TTL_S / 2
    assert jobs.get(b.id) is None and jobs.get(a.id) is a


def test_a_full_table_of_unfinished_jobs_refuses_and_counts(clock: Clock) -> None:
    jobs = table(clock, max_jobs=2)
    first, second = jobs.add(), jobs.add()
    assert first is not None and second is not None
    assert not jobs.has_room()
    assert jobs.add() is None and jobs.add() is None
    assert jobs.refused == 2
    assert jobs.get(first.id) is first and jobs.get(second.id) is second
    # One finishes: its slot can be taken (the oldest finished result goes first).
    jobs.complete(first.id, "done")
    assert jobs.has_room()
    third = jobs.add()
    assert third is not None
    assert jobs.get(first.id) is None and jobs.evicted == 1
    assert len(jobs) == 2


def test_eviction_takes_the_oldest_finished_job(clock: Clock) -> None:
    jobs = table(clock, max_jobs=3)
    a, b, c = jobs.add(), jobs.add(), jobs.add()
    assert a is not None and b is not None and c is not None
    jobs.fail(b.id, "b")
    clock.now += 1
    jobs.complete(a.id, "a")
    assert jobs.add() is not None
    assert jobs.get(b.id) is None and jobs.get(a.id) is a and jobs.get(c.id) is c


def test_expired_jobs_make_room_before_anything_is_evicted(clock: Clock) -> None:
    jobs = table(clock, max_jobs=1)
    job = jobs.add()
    assert job is not None
    jobs.complete(job.id, "x")
    clock.now += TTL_S
    assert jobs.add() is not None
    assert jobs.evicted == 0 and jobs.refused == 0


def test_discard_forgets_a_job_at_once(clock: Clock) -> None:
    jobs = table(clock, max_jobs=1)
    job = jobs.add()
    assert job is not None
    jobs.discard(job.id)
    assert jobs.get(job.id) is None and jobs.has_room()
    jobs.discard(job.id)  # twice is harmless


@pytest.mark.parametrize(("ttl_s", "max_jobs"), [(0, 1), (-1, 1), (1, 0)])
def test_bounds_are_checked(ttl_s: float, max_jobs: int) -> None:
    with pytest.raises(ValueError, match="ttl_s must be > 0 and max_jobs >= 1"):
        JobTable[str, str](ttl_s=ttl_s, max_jobs=max_jobs)


def test_the_config_keys_are_bounded_with_a_clear_error() -> None:
    issues = config.validate(None, {"gateway.jobs_max": 0, "gateway.jobs_ttl_s": 0})
    assert [(i.field, i.message) for i in issues] == [
        ("gateway.jobs_max", "must be >= 1"),
        ("gateway.jobs_ttl_s", "must be > 0"),
    ]
    [too_long] = config.validate(None, {"gateway.jobs_ttl_s": 8 * 24 * 3600})
    assert too_long.message == "must be <= 604800"
    cfg = config.load(None, {"gateway.jobs_max": 5, "gateway.jobs_ttl_s": 2.5})
    assert (cfg.gateway.jobs_max, cfg.gateway.jobs_ttl_s) == (5, 2.5)
