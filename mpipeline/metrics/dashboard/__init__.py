"""The web dashboard: a live page of the run, served beside ``/metrics``.

It shows what ``mpipeline top`` shows (the pipeline flow with per-stage rates
and latency, ring fill per edge, shard load, circuits, dedup savings, recent
errors) plus the dead-letter queue's tail, in a browser, updated once a
second by server-sent events.

Where it lives, and why here. The supervisor serves ``/metrics`` from
``metrics.server``, and the dashboard is more routes on that server: same
host, port and token, no second listener. Its numbers must be ``top``'s
numbers, but the supervisor sits below ``ops`` in the import layers
(pyproject.toml) and may not import ``mpipeline.ops``; so the model that
turns two reads into rates moved down from ``ops`` into ``metrics.view``
(and ``metrics.rates``), where both import it, instead of being imported
upward or copied. The frames come from the supervisor's own ``RunCollector``
(``frame``), i.e. the very shared-memory reads a scrape makes, under the same
lock. The DLQ lives above ``metrics``, so its tail is handed in as a callable
by the supervisor (``supervisor._dashboard``), which may import it.

The parts: ``_feed`` reads the run once per refresh for every viewer;
``_document`` turns a view into the JSON the page renders; ``_app`` holds the
routes, the token check and the event streams; ``static/`` the page, its
script and its style, shipped as package data (no CDN: a supervisor on a
closed network serves the whole page itself).
"""

from __future__ import annotations

from mpipeline.metrics.dashboard._app import DEFAULT_INTERVAL_S, PAGE, Dashboard
from mpipeline.metrics.dashboard._document import document
from mpipeline.metrics.dashboard._feed import DlqTail, Feed, FrameSource

# Each open stream holds a server thread: enough for a team's screens, not a crowd.
MAX_STREAMS = 16

__all__ = [
    "DEFAULT_INTERVAL_S",
    "MAX_STREAMS",
    "PAGE",
    "Dashboard",
    "DlqTail",
    "Feed",
    "FrameSource",
    "document",
]
