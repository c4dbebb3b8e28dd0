"""Which upstream a call goes to: the pool's strategies, and retries elsewhere first.

A pool puts several upstreams behind one worker. An unhealthy member is
ejected by its circuit breaker (the shard skips members whose circuit refuses)
and probed back by the breaker's half-open state, so the chooser only orders
members; it never tracks health itself. A single upstream is a pool of one.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal

import xxhash

from mpipeline.messages import Assembled
from mpipeline.workers.base import Upstream

Strategy = Literal["round_robin", "least_outstanding", "session_hash"]
# Not the shard router's seed: with as many members as shards, routing and
# picking by the same hash would send every session of a shard to one member.
_SEED = 0x5EED_9E37


class Chooser:
    """Orders a pool's members for one call; counts each member's calls in flight."""

    def __init__(self, upstreams: Sequence[Upstream], strategy: Strategy) -> None:
        if not upstreams:
            raise ValueError("a pool needs at least one upstream")
        self.upstreams = list(upstreams)
        self._strategy = strategy
        self._next = 0
        self.outstanding = {u.name: 0 for u in upstreams}

    def order(self, job: Assembled, tried: Collection[str] = ()) -> list[Upstream]:
        """Members in the order to try them; those already tried for this request go last
        (a retry goes elsewhere when it can, as LiteLLM's router does)."""
        ups = self.upstreams
        n = len(ups)
        if n == 1:
            return ups
        if self._strategy == "round_robin":
            start = self._next
            self._next = (start + 1) % n
        elif self._strategy == "session_hash":
            key = job.request.session_id or job.dedup_key
            start = xxhash.xxh3_64_intdigest(key.encode(), seed=_SEED) % n
        else:
            # Fewest calls in flight; ties rotate so equal members share the load.
            start = self._next
            self._next = (start + 1) % n
            rotated = ups[start:] + ups[:start]
            ordered = sorted(rotated, key=lambda u: self.outstanding[u.name])
            return _untried_first(ordered, tried)
        return _untried_first(ups[start:] + ups[:start], tried)

    def begin(self, upstream: Upstream) -> None:
        self.outstanding[upstream.name] += 1

    def end(self, upstream: Upstream) -> None:
        self.outstanding[upstream.name] -= 1


def _untried_first(ups: list[Upstream], tried: Collection[str]) -> list[Upstream]:
    if not tried:
        return ups
    return [u for u in ups if u.name not in tried] + [u for u in ups if u.name in tried]
