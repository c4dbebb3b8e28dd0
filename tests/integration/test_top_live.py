"""``mpipeline top`` against a real supervised pipeline with traffic through the gateway.

The app runs under Textual's harness reading the run the way it does in a
terminal (``RunSource``: state file, control block, rings, metrics block);
``--once`` runs as its own process. Both must show every replica and a
non-zero request rate while a client keeps requests flowing.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from mpipeline.ops.top import RunSource, TopApp
from tests._screen import screen_text
from tests.integration.conftest import SupervisorFactory, SupervisorProcess, wait_until

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 60.0
SEEN_TIMEOUT_S = 20.0
HTTP_TIMEOUT_S = 10.0
INTERVAL_S = 0.2
SIZE = (120, 70)
_NOW = re.compile(r"^now ([\d,.]+)", re.MULTILINE)


@pytest.fixture
def live(start_supervisor: SupervisorFactory) -> SupervisorProcess:
    """A pipeline with one HTTP gateway replica, so requests go the way clients send them."""
    return start_supervisor({"gateway.replicas": 1})


class Load:
    """Requests to /v1/prompt from one thread until the block ends."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answered = 0
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT_S) as client:
            while not self._stop.is_set():
                reply = client.post("/v1/prompt", json={"input": f"hello top {self.answered}"})
                if reply.status_code != 200:
                    self.failure = f"{reply.status_code}: {reply.text}"
                    return
                self.answered += 1

    @contextmanager
    def running(self) -> Iterator[Load]:
        """Load while the block runs; a failed request fails the test after it."""
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(HTTP_TIMEOUT_S)
        assert self.failure is None, f"a request failed: {self.failure}"


def _names(sp: SupervisorProcess) -> list[str]:
    return ["gateway-0", *sp.replica_names()]


@pytest.mark.timeout(90)
def test_top_shows_every_replica_and_the_live_request_rate(live: SupervisorProcess) -> None:
    source = RunSource(live.run_dir)

    async def drive() -> None:
        app = TopApp(source, interval=INTERVAL_S, run_dir=live.run_dir)
        async with app.run_test(size=SIZE) as pilot:
            with Load(live.url).running():
                deadline = time.monotonic() + SEEN_TIMEOUT_S
                while not app.view.requests_per_s:
                    assert time.monotonic() < deadline, f"no request rate:\n{screen_text(app)}"
                    await pilot.pause(INTERVAL_S)
            text = screen_text(app)
            assert f"run {live.run_id}  RUNNING" in text, text
            for name in _names(live):
                row = next((line for line in text.splitlines() if f"  {name} " in line), None)
                assert row is not None and "READY" in row, f"{name} missing:\n{text}"
            assert "rag0 → assemble0" in text
            assert "cpu" in text
            await pilot.press("q")
            await pilot.pause()
            assert app.return_code == 0

    try:
        with live.explain():
            asyncio.run(drive())
    finally:
        source.close()


@pytest.mark.timeout(90)
def test_top_once_prints_a_snapshot_with_a_nonzero_rate(live: SupervisorProcess) -> None:
    argv = ["top", "--once", "--interval", "0.5", "--run-dir", str(live.run_dir)]
    with live.explain(), Load(live.url).running() as load:
        wait_until(lambda: load.answered >= 10, SEEN_TIMEOUT_S, "requests through the gateway")
        done = subprocess.run(
            [sys.executable, "-m", "mpipeline", *argv],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(f"mpipeline top  run {live.run_id}  RUNNING"), out
    for name in _names(live):
        assert re.search(rf"^  {name} +READY ", out, re.MULTILINE), f"{name} missing:\n{out}"
    rate = _NOW.search(out)
    assert rate is not None and float(rate[1].replace(",", "")) > 0, out
