"""Rates and percentiles from two reads of Prometheus-style running totals.

Everything the supervisor publishes is a running total (messages processed,
histogram buckets, CPU seconds, errors). A live view wants what happened
*lately*, so each figure is the difference between two reads divided by the
time between them. This is that arithmetic alone, with no shared memory and
no drawing, so ``mpipeline top`` and the web dashboard compute the same
numbers and it is unit tested on synthetic samples.

Counters follow Prometheus ``rate()``: a series that went down was reset (a
restarted replica counts from zero again), so its delta is its new value; a
series missing from the earlier read was zero there (``collect`` leaves out
most all-zero series).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client.core import Metric

Key = tuple[str, ...]
Buckets = dict[float, float]  # cumulative count by upper bound (math.inf last), as ``le``


class Samples:
    """A frame's samples by name, so a query does not walk every family."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._by_name: dict[str, list[tuple[Mapping[str, str], float]]] = {}
        for fam in families:
            for s in fam.samples:
                self._by_name.setdefault(s.name, []).append((s.labels, s.value))

    def sum_by(self, name: str, by: Sequence[str] = ()) -> dict[Key, float]:
        """Sum of the samples called ``name``, grouped by the labels ``by``."""
        out: dict[Key, float] = {}
        for labels, value in self._by_name.get(name, ()):
            key = tuple(labels.get(b, "") for b in by)
            out[key] = out.get(key, 0.0) + value
        return out

    def total(self, name: str) -> float:
        return sum(self.sum_by(name).values())

    def buckets(self, histogram: str, where: Callable[[Mapping[str, str]], bool]) -> Buckets:
        """Cumulative bucket counts of the ``histogram`` series ``where`` picks, summed."""
        out: Buckets = {}
        for labels, value in self._by_name.get(histogram + "_bucket", ()):
            if where(labels):
                le = float(labels["le"])  # "+Inf" parses as inf
                out[le] = out.get(le, 0.0) + value
        return out


def counter_delta(prev: float, cur: float) -> float:
    """How much a counter grew; a counter that went down was reset and counts from 0."""
    return cur if cur < prev else cur - prev


def bucket_delta(prev: Buckets | None, cur: Buckets) -> Buckets:
    """Observations between two reads of a cumulative histogram.

    A smaller total means the histogram was reset: everything in ``cur`` is new.
    The result is kept cumulative (non-decreasing) even if a writer moved
    between the reads of two buckets.
    """
    if not prev or cur.get(math.inf, 0.0) < prev.get(math.inf, 0.0):
        return dict(cur)
    out: Buckets = {}
    running = 0.0
    for le in sorted(cur):
        running = max(running, cur[le] - prev.get(le, 0.0))
        out[le] = running
    return out


def quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus ``histogram_quantile``: linear inside the bucket holding rank q·count.

    None when nothing was observed. A rank in the +Inf bucket answers with the
    largest finite bound, as Prometheus does.
    """
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf:
        return None
    total = buckets[math.inf]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank and count > below:
            if upper == math.inf:
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def savings(hits: float, calls: float) -> float | None:
    """Share of model work avoided: answers given without their own upstream call."""
    done = hits + calls
    return hits / done if done > 0 else None


def rate(prev: Mapping[Key, float], cur: Mapping[Key, float], dt: float) -> dict[Key, float]:
    """Per-second growth of each series in ``cur`` over ``dt`` seconds (resets counted)."""
    return {k: counter_delta(prev.get(k, 0.0), v) / dt for k, v in cur.items()}
