"""Gateways served in-process on a ``Pipeline`` client, on a uvloop thread of their own.

The integration tests of the HTTP edge use this instead of gateway replicas:
the gateways' own code on a real pipeline (real rings, real replicas), while
a test uses blocking clients (httpx, the official ``openai`` SDK, raw sockets)
without sharing the gateways' event loop, and can reach the client library
(``pipeline``) and its control block from the outside.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from mpipeline.config import GatewayConfig
from mpipeline.gateway import Gateway, bind
from mpipeline.pipeline import Pipeline

T = TypeVar("T")
CALL_TIMEOUT_S = 20.0


class Gateways:
    """A ``Pipeline`` client attached to ``run_dir`` and one ``Gateway`` per config.

    ``urls`` are the gateways' addresses, in the order of ``configs``; each
    config comes with the environment its token variable is read from.
    """

    def __init__(
        self,
        run_dir: Path,
        configs: Sequence[tuple[GatewayConfig, Mapping[str, str] | None]],
        *,
        keepalive_s: float = 15.0,
    ) -> None:
        self.run_dir = run_dir
        self.urls: list[str] = []
        self._configs = list(configs)
        self._keepalive_s = keepalive_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.pipeline: Pipeline | None = None
        self._thread = threading.Thread(target=self._main, name="gateways", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise AssertionError("the gateways did not start in 30 s")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        uvloop.run(self._serve())

    async def _serve(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with Pipeline.attach(self.run_dir) as pipeline:
                self.pipeline = pipeline
                gateways = [
                    Gateway(
                        pipeline,
                        cfg,
                        environ=environ,
                        keepalive_s=self._keepalive_s,
                        drain_timeout_s=2,
                    )
                    for cfg, environ in self._configs
                ]
                for gateway in gateways:
                    await gateway.start(bind("127.0.0.1", 0))
                self.urls = [g.url for g in gateways]
                self._ready.set()
                try:
                    await self._stop.wait()
                finally:
                    for gateway in gateways:
                        await gateway.close()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the gateways' loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT_S)

    def inflight(self) -> int:
        """Requests the gateways' pipeline client holds in flight now."""
        assert self.pipeline is not None
        return self.call(_inflight(self.pipeline))

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the gateway thread did not stop"


async def _inflight(pipeline: Pipeline) -> int:
    """Read on the pipeline's own loop: its table is not shared with other threads."""
    return pipeline.inflight
