"""What a gateway replica counts: answers by route and status, durations, time to
first token, errors by stage and code, and requests shed at its ingress rings.

Cell indices are looked up once here so that the server and the pipeline
client add to shared memory with one index and one add per event. Paths and
statuses outside the known lists count as "other": a path is user input and
must never become a label value.
"""

from __future__ import annotations

import time

from mpipeline.metrics.block import Writer
from mpipeline.metrics.schema import CODES, ERROR_STAGES, ROUTES, STATUSES


class GatewayMetrics:
    def __init__(self, writer: Writer, replica: str) -> None:
        self.cells = writer.cells
        self._observe = writer.observe_ns
        index = writer.index
        self._requests = {
            (route, status): index("requests", route, status)
            for route in ROUTES
            for status in STATUSES
        }
        self._duration = {route: index("request_duration_seconds", route) for route in ROUTES}
        self._ttft = index("time_to_first_token_seconds")
        self._errors = {
            (stage, code): index("errors", stage, code) for stage in ERROR_STAGES for code in CODES
        }
        # The ingress edges are the ones gateway_region laid out.
        self._shed = {
            labels[0]: writer.base + offset
            for (family, labels), offset in writer.region.items()
            if family == "shed"
        }
        self._lag = index("event_loop_lag_seconds", "gateway", replica)

    def answered(self, path: str, status: int, arrived_ns: int) -> None:
        """A response was sent in full (or a stream ended, or a connection was upgraded)."""
        route = path if path in self._duration else "other"
        key = (route, str(status))
        cells = self.cells
        cells[self._requests.get(key) or self._requests[(route, "other")]] += 1
        if status != 101 and arrived_ns:  # a WebSocket's life is not a request's latency
            self._observe(self._duration[route], time.monotonic_ns() - arrived_ns)

    def first_token(self, accepted_ns: int) -> None:
        self._observe(self._ttft, time.monotonic_ns() - accepted_ns)

    def failed(self, stage: str, code: str) -> None:
        """A request ended in an error: ``stage`` that failed it ("client" is ours)."""
        if stage == "client":
            stage = "gateway"
        stage = stage if stage in ERROR_STAGES else "other"
        index = self._errors.get((stage, code))
        if index is None:
            index = self._errors[(stage, "other")]
        self.cells[index] += 1

    def shed(self, edge: str, n: int = 1) -> None:
        index = self._shed.get(edge)
        if index is not None:
            self.cells[index] += n

    def lag(self, seconds: float) -> None:
        self.cells[self._lag] = max(0.0, seconds)
