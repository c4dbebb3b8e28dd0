"""In-flight coalescing and a result cache, for one inference shard.

Identical prompts are common (retried clients, agents sharing a context,
popular questions), and an LLM call is the most expensive thing the pipeline
does. Requests carry a ``dedup_key``; routing sends equal keys to one shard,
so dedup needs no cross-process state.

``Coalescer``: the first request for a key leads a ``Flight`` (it runs the
call); later ones join it and get the same tokens and the same result or the
same error. Nobody is orphaned: ``fail`` takes any exception, CancelledError
included (which followers receive as an ``UpstreamFailure`` with code
``cancelled``, since a CancelledError raised in a task that was not
cancelled would read as its own cancellation). A waiter whose client left
calls ``leave``; when the last one leaves, the flight is dropped and its
``on_abandon`` callbacks run, so a call nobody waits for stops spending
tokens. A flight leaves the table as soon as it ends, so later requests start
a new call or hit the cache.

``ResultCache``: a bounded LRU with a TTL holding immutable ``CachedResult``
values, streamed pieces included, so a streaming request replayed from the
cache still gets chunks.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType

from mpipeline.config import DedupConfig
from mpipeline.errors import ErrorCode, UpstreamFailure


@dataclass(frozen=True, slots=True)
class CachedResult:
    """One completed call. ``tokens``: the streamed pieces ("" joined, they are
    ``text``), empty when the call was not streamed."""

    text: str
    tokens: tuple[str, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    # Prompt tokens the backend reused when it made this result.
    cached_tokens: int = 0
    # The upstream's own JSON for a structured reply (``Generation.raw``), and the
    # bytes of JSON it holds in all, its structured pieces' included (the size bound).
    raw: bytes = b""
    raw_bytes: int = 0


class Flight:
    """One upstream call shared by every request with the same key.

    The leader calls ``push`` per token and ends with ``finish`` or ``fail``;
    every waiter, the leader's own request included, reads ``tokens()`` and
    ``result()`` and calls ``leave()`` if it stops waiting before the end.
    One event loop per object.
    """

    __slots__ = (
        "_abandon",
        "_done",
        "_event",
        "_exc",
        "_owner",
        "_result",
        "_tb",
        "_tokens",
        "key",
        "waiters",
    )

    def __init__(self, key: str, owner: Coalescer | None = None) -> None:
        self.key = key
        self.waiters = 1
        self._owner = owner
        self._tokens: list[str] = []
        self._done = False
        self._result: CachedResult | None = None
        self._exc: BaseException | None = None
        self._tb: TracebackType | None = None
        self._abandon: list[Callable[[], object]] = []
        # Made only when a waiter has to wait: most flights end before anyone does.
        self._event: asyncio.Event | None = None

    @property
    def done(self) -> bool:
        return self._done

    # The leader's side

    def push(self, token: str) -> None:
        """Pass one streamed piece to every waiter (ignored once the flight ended)."""
        if self._done:
            return
        self._tokens.append(token)
        self._wake()

    def finish(self, result: CachedResult) -> None:
        """End the flight with ``result`` for every waiter (a second end is ignored)."""
        if self._done:
            return
        self._result = result
        self._end()

    def fail(self, exc: BaseException) -> None:
        """End the flight with ``exc`` for every waiter (a second end is ignored)."""
        if self._done:
            return
        if isinstance(exc, asyncio.CancelledError):
            cancelled = UpstreamFailure(
                "the shared upstream call was cancelled", code=ErrorCode.CANCELLED, counts=False
            )
            cancelled.__cause__ = exc
            exc = cancelled
        self._exc = exc
        self._tb = exc.__traceback__
        self._end()

    def on_abandon(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` (e.g. the call's ``task.cancel``) once the last waiter
        leaves before the end; at once if that already happened."""
        if self.waiters <= 0 and not self._done:
            callback()
        else:
            self._abandon.append(callback)

    # A waiter's side

    async def tokens(self) -> AsyncIterator[str]:
        """Every piece pushed so far, then the live ones until the end.

        :raises BaseException: the flight's exception, if it failed
        """
        i = 0
        while True:
            pieces = self._tokens
            while i < len(pieces):
                yield pieces[i]
                i += 1
            if self._done:
                if self._exc is not None:
                    raise self._exc.with_traceback(self._tb)
                return
            await self._wait()

    async def result(self) -> CachedResult:
        """The flight's result once it ends.

        :raises BaseException: the flight's exception, if it failed
        """
        while not self._done:
            await self._wait()
        if self._exc is not None:
            raise self._exc.with_traceback(self._tb)
        assert self._result is not None
        return self._result

    def leave(self) -> None:
        """This waiter stops waiting (its client went away). The last one to
        leave abandons the flight: it leaves the table and ``on_abandon`` runs."""
        if self._done:
            return
        self.waiters -= 1
        if self.waiters > 0:
            return
        if self._owner is not None:
            self._owner._drop(self)
        callbacks, self._abandon = self._abandon, []
        for callback in callbacks:
            callback()

    def _end(self) -> None:
        self._done = True
        self._abandon = []
        if self._owner is not None:
            self._owner._drop(self)
        self._wake()

    def _wake(self) -> None:
        event = self._event
        if event is not None:
            self._event = None
            event.set()

    async def _wait(self) -> None:
        event = self._event
        if event is None:
            event = self._event = asyncio.Event()
        # Event.wait gives each waiter its own future: a cancelled waiter cancels only itself.
        await event.wait()


class Coalescer:
    """The flights in progress on one shard, by key."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self.led = 0
        self.joined = 0

    def join(self, key: str) -> tuple[Flight, bool]:
        """The flight for ``key`` and whether the caller leads it (must run the call)."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.waiters += 1
            self.joined += 1
            return flight, False
        flight = self._flights[key] = Flight(key, self)
        self.led += 1
        return flight, True

    def __len__(self) -> int:
        return len(self._flights)

    def _drop(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]


class ResultCache:
    """Recent results by key: at most ``entries``, each for ``ttl_s`` seconds, LRU first out.

    Results whose text (with the upstream JSON a structured reply carries)
    exceeds ``max_chars`` are not kept: one huge reply would otherwise cost
    the memory of thousands of ordinary ones.
    """

    def __init__(self, entries: int, ttl_s: float, max_chars: int) -> None:
        self.entries = entries
        self.ttl_s = ttl_s
        self.max_chars = max_chars
        self._items: OrderedDict[str, tuple[float, CachedResult]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.skipped = 0
        self.evicted = 0

    @classmethod
    def from_config(cls, cfg: DedupConfig) -> ResultCache:
        return cls(cfg.cache_entries, cfg.cache_ttl_s, cfg.cache_max_chars)

    def get(self, key: str, now: float) -> CachedResult | None:
        """The live result for ``key`` (``now`` in ``time.monotonic`` seconds), or None."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        if now >= item[0]:
            del self._items[key]
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: str, value: CachedResult, now: float) -> bool:
        """Keep ``value`` until ``now + ttl_s``; False when it is too long to keep."""
        if len(value.text) + value.raw_bytes > self.max_chars or self.entries <= 0:
            self.skipped += 1
            return False
        items = self._items
        items[key] = (now + self.ttl_s, value)
        items.move_to_end(key)
        if len(items) > self.entries:
            items.popitem(last=False)
            self.evicted += 1
        return True

    def __len__(self) -> int:
        return len(self._items)
