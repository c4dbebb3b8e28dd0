"""One shard's path from an assembled prompt to tokens: cache, coalescing, circuit,
limits, timeouts and the retry loop, in that order.

This is the only retry loop of the system (RELIABILITY 1.5): upstreams make one
attempt each and say what went wrong (``UpstreamFailure``); this module decides.

* **Cache.** A recent result for the same dedup key is replayed (tokens and
  all, so a stream still streams) without calling anything.
* **Coalescing.** Identical requests in flight share one call: the first
  makes it (in its own task: a task per request would double the shard's cost
  per request, measured), the others follow it and get the same tokens and the
  same result or the same error. If the first request is cancelled (its client
  left), a follower that has received nothing yet makes the call again; one
  that is already streaming ends with an error, since its reply cannot start
  over.
* **Circuit.** Each remote upstream has a breaker shared by every shard
  through shared memory; an open one fails the call fast with 503
  ``circuit_open`` and a Retry-After of its time to half-open. A pool skips
  members whose circuit refuses.
* **Limits and timeouts.** A semaphore per upstream bounds calls in flight;
  connect, first-token, between-token and total timeouts bound each attempt.
* **Retries.** Exponential backoff with full jitter, at least the upstream's
  Retry-After, within the request's deadline and the shard's retry budget,
  and never once a token of this call has been passed on: a client must not
  see a reply start twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from mpipeline.config import InferenceConfig
from mpipeline.errors import ErrorCode, UpstreamFailure
from mpipeline.messages import Assembled
from mpipeline.metrics.block import Cells, Writer
from mpipeline.resilience import (
    Breaker,
    BreakerBoard,
    CachedResult,
    Coalescer,
    Flight,
    Permit,
    ResultCache,
    RetryBudget,
    bounded,
    delay_s,
    phased,
)
from mpipeline.workers.base import Generation, Upstream
from mpipeline.workers.pool import Chooser

log = logging.getLogger("mpipeline.inference")


@dataclass(slots=True)
class CallStats:
    """Counters of one shard's calls, for status and metrics."""

    calls: int = 0
    retries: int = 0
    retries_refused: int = 0
    cache_hits: int = 0
    coalesced: int = 0
    circuit_rejections: int = 0
    failures: dict[str, int] = field(default_factory=dict)


class ShardCalls:
    """The call path of one inference shard over its upstreams."""

    def __init__(
        self,
        cfg: InferenceConfig,
        upstreams: Sequence[Upstream],
        board: BreakerBoard | None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = cfg
        self.chooser = Chooser(upstreams, cfg.pool.strategy)
        self._limits = {u.name: asyncio.Semaphore(u.max_concurrency) for u in upstreams}
        # With ``coalesce_reads``, a remote stream travels on read by read where the
        # upstream can (``generate_reads``): the tokens that arrived together become
        # one piece, so one chunk and one message per hop instead of one per token.
        reads = cfg.coalesce_reads
        self._pieces = {
            u.name: getattr(u, "generate_reads", u.generate) if reads else u.generate
            for u in upstreams
        }
        self._breakers: dict[str, Breaker] = {}
        if board is not None:
            self.use_breakers(board)
        self._budget = RetryBudget(cfg.retry)
        dedup = cfg.dedup
        self._coalescer: Coalescer | None = Coalescer() if dedup.coalesce else None
        self._cache: ResultCache | None = None
        if dedup.cache_entries:
            self._cache = ResultCache(dedup.cache_entries, dedup.cache_ttl_s, dedup.cache_max_chars)
        self._remote = any(u.remote for u in upstreams)
        self._rng = rng or random.Random()
        self.stats = CallStats()
        self._cells: Cells | None = None
        self._m_calls: dict[str, int] = {}
        self._m_retries: dict[str, int] = {}
        self._m_cached = self._m_coalesced = self._m_in = self._m_out = 0

    def use_metrics(self, writer: Writer) -> None:
        """Count calls, retries, dedup hits and tokens in the shard's metrics region."""
        names = [u.name for u in self.chooser.upstreams]
        self._m_calls = {n: writer.index("upstream_calls", n) for n in names}
        self._m_retries = {n: writer.index("upstream_retries", n) for n in names}
        self._m_cached = writer.index("dedup_hits", "cached")
        self._m_coalesced = writer.index("dedup_hits", "coalesced")
        self._m_in = writer.index("tokens", "in")
        self._m_out = writer.index("tokens", "out")
        self._cells = writer.cells

    def use_breakers(self, board: BreakerBoard) -> None:
        """Guard every remote upstream with its circuit on ``board`` (claimed by name)."""
        self._breakers = {u.name: board.breaker(u.name) for u in self.chooser.upstreams if u.remote}

    # The entry point

    def tokens(self, job: Assembled, gen: Generation, stream: bool) -> AsyncIterator[str]:
        """The reply's tokens (one piece holding the whole text when not ``stream``);
        ``gen`` has the usage and finish reason once the iterator ends.

        :raises UpstreamFailure: when no attempt succeeded (or one failed after
            tokens were passed on)
        """
        if self._cache is None and self._coalescer is None:
            # Nothing to replay, remember or share: the attempts are the whole
            # path, one generator fewer to resume for every piece.
            self._budget.deposit()
            return self._attempts(job, gen, stream)
        return self._deduplicated(job, gen, stream)

    async def _deduplicated(
        self, job: Assembled, gen: Generation, stream: bool
    ) -> AsyncIterator[str]:
        self._budget.deposit()
        key = job.dedup_key
        cache = self._cache
        if cache is not None:
            hit = cache.get(key, time.monotonic())
            if hit is not None:
                self.stats.cache_hits += 1
                if self._cells is not None:
                    self._cells[self._m_cached] += 1
                _fill(gen, hit)
                gen.cached_tokens = hit.prompt_tokens  # nothing evaluated for this one
                # A result cached from a non-streamed call streams as one piece.
                for piece in hit.tokens if stream and hit.tokens else (hit.text,):
                    if piece:
                        yield piece
                return
        if self._coalescer is None:
            parts: list[str] = []
            async for piece in self._attempts(job, gen, stream):
                parts.append(piece)
                yield piece
            self._remember(key, gen, parts, stream)
            return
        while True:
            flight, leader = self._coalescer.join(key)
            if leader:
                async for piece in self._lead(flight, job, gen, stream):
                    yield piece
                return
            self.stats.coalesced += 1
            if self._cells is not None:
                self._cells[self._m_coalesced] += 1
            follower = _Follower()
            async for piece in self._follow(flight, gen, stream, follower):
                yield piece
            if not follower.orphaned:
                return
            # The request that made the call went away before this one got a token:
            # make the call again (this request may lead it now).

    # Coalescing

    async def _lead(
        self, flight: Flight, job: Assembled, gen: Generation, stream: bool
    ) -> AsyncIterator[str]:
        """Make the call for this request, in its own task (no task per request:
        most requests have no twin), and share every piece with the followers."""
        parts: list[str] = []
        try:
            async for piece in self._attempts(job, gen, stream):
                parts.append(piece)
                flight.push(piece)
                yield piece
        except Exception as exc:  # every follower must hear, whatever it was
            flight.fail(exc)
            raise
        except BaseException:
            # Cancelled or closed (its client left): followers hear "cancelled",
            # never a GeneratorExit of ours.
            flight.fail(asyncio.CancelledError())
            raise
        result = self._result(gen, parts, stream)
        flight.finish(result)
        if self._cache is not None and gen.finish_reason in ("stop", "length"):
            self._cache.put(job.dedup_key, result, time.monotonic())

    async def _follow(
        self, flight: Flight, gen: Generation, stream: bool, follower: _Follower
    ) -> AsyncIterator[str]:
        finished = False
        sent = False
        try:
            try:
                if stream:
                    async for piece in flight.tokens():
                        sent = True
                        yield piece
                result: CachedResult = await flight.result()
            except UpstreamFailure as exc:
                if exc.code == ErrorCode.CANCELLED and not sent:
                    follower.orphaned = True
                    finished = True
                    return
                raise
            finished = True
        finally:
            if not finished:
                flight.leave()
        _fill(gen, result)
        if not stream:
            yield result.text
        elif not result.tokens and result.text:
            yield result.text  # the leader did not stream: one piece for all

    def _remember(self, key: str, gen: Generation, parts: list[str], stream: bool) -> None:
        if self._cache is not None and gen.finish_reason in ("stop", "length"):
            self._cache.put(key, self._result(gen, parts, stream), time.monotonic())

    @staticmethod
    def _result(gen: Generation, parts: list[str], stream: bool) -> CachedResult:
        return CachedResult(
            text="".join(parts),
            tokens=tuple(parts) if stream else (),
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
            finish_reason=gen.finish_reason,
            cached_tokens=gen.cached_tokens,
            raw=gen.raw,
            raw_bytes=gen.raw_bytes,
        )

    # The retry loop

    async def _attempts(self, job: Assembled, gen: Generation, stream: bool) -> AsyncIterator[str]:
        deadline_ns = job.request.deadline_ns
        if self._remote:
            # The runner starts a message's coroutine eagerly, outside any task,
            # and moves it into one at its first suspension. The phase timeouts
            # cancel the current task, so there must be one: suspend first.
            await asyncio.sleep(0)
        tried: list[str] = []
        attempt = 0
        while True:
            upstream, breaker, permit = await self._choose(job, tried, deadline_ns)
            tried.append(upstream.name)
            sent = False
            one = Generation()
            self.stats.calls += 1
            cells = self._cells
            if cells is not None:
                cells[self._m_calls[upstream.name]] += 1
            self.chooser.begin(upstream)
            try:
                async with self._limits[upstream.name]:
                    if not upstream.remote:
                        # Local work has no network phases to time (the stage's own
                        # timeout and the deadline sweeper still bound it).
                        if stream:
                            async for piece in upstream.generate(job, one):
                                sent = True
                                yield piece
                        else:
                            text = await upstream.complete(job, one)
                            sent = True
                            yield text
                    elif stream:
                        inner = self._pieces[upstream.name](job, one)
                        async for piece in phased(
                            inner, upstream.timeouts, deadline_ns, upstream=upstream.name
                        ):
                            sent = True
                            yield piece
                    else:
                        text = await bounded(
                            upstream.complete(job, one),
                            upstream.timeouts,
                            deadline_ns,
                            upstream=upstream.name,
                        )
                        sent = True
                        yield text
            except UpstreamFailure as exc:
                wait = self._failed_attempt(exc, upstream, breaker, permit, attempt, sent, job)
                if wait is None:
                    raise
                attempt += 1
                await asyncio.sleep(wait)
                continue
            except BaseException:
                # Cancelled (client gone, deadline) or a bug: no verdict on the upstream.
                self._settle(breaker, permit, None)
                raise
            finally:
                self.chooser.end(upstream)
            self._settle(breaker, permit, True)
            if cells is not None:
                cells[self._m_in] += one.prompt_tokens
                cells[self._m_out] += one.completion_tokens
            gen.prompt_tokens = one.prompt_tokens
            gen.completion_tokens = one.completion_tokens
            gen.finish_reason = one.finish_reason
            gen.cached_tokens = one.cached_tokens
            gen.raw = one.raw
            gen.raw_bytes = one.raw_bytes
            return

    def _failed_attempt(
        self,
        exc: UpstreamFailure,
        upstream: Upstream,
        breaker: Breaker | None,
        permit: Permit | None,
        attempt: int,
        sent: bool,
        job: Assembled,
    ) -> float | None:
        """Settle the breaker and count a failed call; the wait before a retry, or
        None to give up (no retry once bytes went to the client)."""
        self._settle(breaker, permit, False if exc.counts else None)
        self._note_failure(upstream, exc, breaker)
        wait = None if sent else self._retry_delay(attempt, exc, job.request.deadline_ns)
        if wait is None:
            return None
        log.info(
            "retrying %s in %.2fs after %s (attempt %d)",
            upstream.name,
            wait,
            exc.code,
            attempt + 1,
            extra={"request_id": job.request.request_id},
        )
        self.stats.retries += 1
        if self._cells is not None:
            self._cells[self._m_retries[upstream.name]] += 1
        return wait

    def _retry_delay(self, attempt: int, exc: UpstreamFailure, deadline_ns: int) -> float | None:
        """Seconds to wait before the next attempt, or None: give up now."""
        if not exc.retryable or attempt >= self._cfg.retry.max_retries:
            return None
        wait = delay_s(attempt, exc, self._cfg.retry, self._rng)
        if wait is None:
            return None
        if deadline_ns and time.monotonic_ns() + int(wait * 1e9) >= deadline_ns:
            return None
        if not self._budget.try_withdraw():
            self.stats.retries_refused += 1
            return None
        return wait

    def _note_failure(
        self, upstream: Upstream, exc: UpstreamFailure, breaker: Breaker | None
    ) -> None:
        self.stats.failures[exc.code] = self.stats.failures.get(exc.code, 0) + 1
        if breaker is not None and exc.retry_after_s:
            # No call to this upstream from any shard before the time it asked for.
            breaker.defer(time.monotonic() + exc.retry_after_s)

    # Circuits

    async def _choose(
        self, job: Assembled, tried: list[str], deadline_ns: int
    ) -> tuple[Upstream, Breaker | None, Permit | None]:
        """The first member whose circuit lets a call through, waiting out a
        Retry-After hold when it ends before the deadline.

        :raises UpstreamFailure: ``circuit_open`` when every circuit refuses
        """
        while True:
            soonest = None
            for upstream in self.chooser.order(job, tried):
                breaker = self._breakers.get(upstream.name)
                if breaker is None:
                    return upstream, None, None
                # A probe's lease: as long as this call may take. An expired lease
                # counts as a failed probe, so it must not end before the call.
                lease = upstream.timeouts.total_s
                if deadline_ns:
                    lease = min(lease, max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9))
                decision = breaker.allow(lease_s=lease + 1.0)
                if isinstance(decision, Permit):
                    return upstream, breaker, decision
                held = decision.reason == "deferred"
                if soonest is None or decision.wait_s < soonest[0]:
                    soonest = (decision.wait_s, held)
            assert soonest is not None
            wait, held = soonest
            remaining = (deadline_ns - time.monotonic_ns()) / 1e9 if deadline_ns else float("inf")
            if held and wait < remaining and wait <= self._cfg.retry.max_retry_after_s:
                await asyncio.sleep(wait)
                continue
            self.stats.circuit_rejections += 1
            if held:
                raise UpstreamFailure(
                    "the upstream asked us to wait (Retry-After)",
                    code=ErrorCode.UPSTREAM_RATE_LIMITED,
                    counts=False,
                    retry_after_s=max(wait, 0.001),
                )
            raise UpstreamFailure(
                "circuit open: the upstream failed recently; retry later",
                code=ErrorCode.CIRCUIT_OPEN,
                counts=False,
                retry_after_s=max(wait, 0.001),
            )

    @staticmethod
    def _settle(breaker: Breaker | None, permit: Permit | None, ok: bool | None) -> None:
        if breaker is not None and permit is not None:
            breaker.record(permit, ok)


@dataclass(slots=True)
class _Follower:
    """Set when the call a request followed was cancelled by the request that made it."""

    orphaned: bool = False


def _fill(gen: Generation, result: CachedResult) -> None:
    gen.prompt_tokens = result.prompt_tokens
    gen.completion_tokens = result.completion_tokens
    gen.finish_reason = result.finish_reason
    # Coalesced requests share the call's usage, as they share its reply.
    gen.cached_tokens = result.cached_tokens
    gen.raw = result.raw
    gen.raw_bytes = result.raw_bytes
