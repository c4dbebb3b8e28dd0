"""The table of async requests (``POST /v1/requests``): ids, states, one outcome, TTL, bounds.

A client that cannot hold a connection open for a whole generation (a
serverless function, a cron job, a flaky mobile link) submits, goes away and
polls. The gateway then has to remember the request and, later, its outcome:
this table. It is kept apart from HTTP and from the pipeline (``jobs_routes.py``
runs the requests and answers the routes) so that its rules can be tested
alone, with an injected clock:

* Every job ends in exactly one outcome, the first recorded: a completion
  that arrives after a cancel is dropped, and a cancel after a completion
  changes nothing (the caller is told which won).
* An outcome is kept ``ttl_s`` seconds after it is recorded, then forgotten.
* The table holds at most ``max_jobs`` jobs. When it is full, the oldest
  finished job is forgotten early to make room; when every job is still
  unfinished, ``add`` refuses (the route answers 429 with Retry-After), so
  memory stays bounded and no request is dropped silently.

Ids come from ``secrets.token_urlsafe``: a result is readable by whoever
holds its id, so ids must not be guessable from one another.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

R = TypeVar("R")
E = TypeVar("E")

# 16 random bytes: 128 bits, as unguessable as a uuid4 and shorter in a URL.
ID_BYTES = 16
ID_PREFIX = "req_"


class JobState(StrEnum):
    """Where an async request is; the last three are outcomes, and final."""

    QUEUED = "queued"  # accepted, not yet in the pipeline
    RUNNING = "running"  # in the pipeline
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


@dataclass(slots=True)
class Job(Generic[R, E]):
    """One async request: its state, and its result or error once it has one.

    ``created_at`` and ``finished_at`` are wall-clock seconds (for the client);
    ``expires`` is on the table's clock (monotonic), when the outcome is forgotten.
    """

    id: str
    created_at: float
    state: JobState = JobState.QUEUED
    result: R | None = None
    error: E | None = None
    finished_at: float | None = None
    expires: float | None = None
    # The TTL's deadline as wall-clock seconds, for the client.
    expires_at: float | None = None
    # What the route needs to stop it (an asyncio task); the table never looks.
    handle: object = field(default=None, repr=False)


class JobTable(Generic[R, E]):
    """The async requests of one gateway, bounded by ``max_jobs``, outcomes kept ``ttl_s``.

    ``clock`` (monotonic seconds) drives expiry and ``wall`` the timestamps
    the client reads; both are injectable for tests. Not thread-safe: one
    event loop owns it.
    """

    def __init__(
        self,
        *,
        ttl_s: float,
        max_jobs: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0 or max_jobs < 1:
            raise ValueError(f"ttl_s must be > 0 and max_jobs >= 1, got {ttl_s}, {max_jobs}")
        self.ttl_s = ttl_s
        self.max_jobs = max_jobs
        self._clock = clock
        self._wall = wall
        self._jobs: dict[str, Job[R, E]] = {}
        # Finished jobs' ids, in the order they finished: with one TTL for all,
        # that is also the order they expire in, so expiry and eviction pop the front.
        self._finished: OrderedDict[str, None] = OrderedDict()
        # Submissions refused because every slot held an unfinished job.
        self.refused = 0
        # Finished jobs forgotten before their TTL to make room for new ones.
        self.evicted = 0

    def __len__(self) -> int:
        self._expire()
        return len(self._jobs)

    def has_room(self) -> bool:
        """Whether ``add`` would succeed now (a slot is free, or a finished job can go)."""
        self._expire()
        return len(self._jobs) < self.max_jobs or bool(self._finished)

    def add(self) -> Job[R, E] | None:
        """A new queued job with a fresh id; None (counted in ``refused``) when the
        table is full of unfinished jobs."""
        self._expire()
        if len(self._jobs) >= self.max_jobs:
            if not self._finished:
                self.refused += 1
                return None
            oldest, _ = self._finished.popitem(last=False)
            del self._jobs[oldest]
            self.evicted += 1
        job: Job[R, E] = Job(ID_PREFIX + secrets.token_urlsafe(ID_BYTES), self._wall())
        self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job[R, E] | None:
        """The job, or None when the id is unknown, expired or evicted."""
        self._expire()
        return self._jobs.get(job_id)

    def discard(self, job_id: str) -> None:
        """Forget a job at once (one refused before it was accepted)."""
        self._jobs.pop(job_id, None)
        self._finished.pop(job_id, None)

    def start(self, job_id: str) -> bool:
        """Queued to running; False when the job is gone or already past queued."""
        job = self._jobs.get(job_id)
        if job is None or job.state is not JobState.QUEUED:
            return False
        job.state = JobState.RUNNING
        return True

    def complete(self, job_id: str, result: R) -> bool:
        """Record the result; False (and nothing changes) when the job already has an outcome."""
        return self._end(job_id, JobState.COMPLETED, result, None)

    def fail(self, job_id: str, error: E) -> bool:
        """Record the error; False when the job already has an outcome."""
        return self._end(job_id, JobState.FAILED, None, error)

    def cancel(self, job_id: str, error: E | None = None) -> bool:
        """Record the cancel (and why, as ``error``); False when the job already has an outcome."""
        return self._end(job_id, JobState.CANCELLED, None, error)

    def unfinished(self) -> list[Job[R, E]]:
        return [job for job in self._jobs.values() if not job.state.final]

    def counts(self) -> dict[str, int]:
        """Jobs held now by state, every state named (a gauge per state)."""
        self._expire()
        out = dict.fromkeys(JobState, 0)
        for job in self._jobs.values():
            out[job.state] += 1
        return {str(state): n for state, n in out.items()}

    def _end(self, job_id: str, state: JobState, result: R | None, error: E | None) -> bool:
        job = self._jobs.get(job_id)
        if job is None or job.state.final:
            return False
        job.state = state
        job.result = result
        job.error = error
        job.handle = None
        job.finished_at = self._wall()
        job.expires = self._clock() + self.ttl_s
        job.expires_at = job.finished_at + self.ttl_s
        self._finished[job_id] = None
        return True

    def _expire(self) -> None:
        now = self._clock()
        finished = self._finished
        while finished:
            oldest = next(iter(finished))
            expires = self._jobs[oldest].expires
            assert expires is not None
            if expires > now:
                return
            finished.popitem(last=False)
            del self._jobs[oldest]
