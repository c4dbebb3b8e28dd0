"""``python -m mpipeline.gateway --config FILE``: a pipeline with its HTTP gateway.

Starts ``Pipeline(config)`` (which runs the supervisor) and serves HTTP on
the client's slot until SIGINT or SIGTERM, then drains and stops both. The
listening socket is bound before the pipeline starts, so a busy port fails
at once and leaves no process or segment behind (RELIABILITY scenario 33).
Until the supervisor runs gateway replicas itself, this is how to serve HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from mpipeline.config import ConfigError, PipelineConfig, load
from mpipeline.errors import ExitCode, MPipelineError
from mpipeline.gateway.app import Gateway, model_name
from mpipeline.gateway.auth import BearerAuth
from mpipeline.gateway.server import bind
from mpipeline.pipeline import Pipeline

log = logging.getLogger("mpipeline.gateway")

HANDLED_SIGNALS = (
    signal.SIGINT,  # Ctrl-C: drain, then exit 0
    signal.SIGTERM,  # service manager stop: the same
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpipeline.gateway", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("config/pipeline.toml"))
    parser.add_argument("--run-dir", type=Path, default=None, help="override run_dir")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s gateway[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = load(args.config)
        BearerAuth.from_env(cfg.gateway.auth_token_env)  # refuse before anything starts
    except ConfigError as exc:
        log.error("%s", exc)
        return ExitCode.USAGE
    try:
        sock = bind(cfg.gateway.host, cfg.gateway.port)
    except MPipelineError as exc:
        log.error("%s", exc)
        return ExitCode.FAILURE
    try:
        uvloop.run(_run(cfg, args.config, args.run_dir, sock))
    except MPipelineError as exc:
        log.error("%s", exc)
        return ExitCode.FAILURE
    finally:
        sock.close()
    return ExitCode.OK


async def _run(cfg: PipelineConfig, path: Path, run_dir: Path | None, sock: socket.socket) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    async with Pipeline(path, run_dir=run_dir) as pipeline:
        gateway = Gateway(pipeline, cfg.gateway, model=model_name(cfg))
        await gateway.start(sock)
        try:
            await stop.wait()
            log.info("stopping: draining requests in progress")
        finally:
            await gateway.close()


if __name__ == "__main__":
    sys.exit(main())
