"""Fault injection for tests: ``MPIPELINE_FAULTS="stage:kind=arg,..."``, and the stage wrapper.

Honoured only when ``MPIPELINE_TESTING=1`` as well, so a stray variable in
production does nothing. Kinds: ``boot_error`` (fail before ready),
``crash_after=N`` (hard exit after N messages), ``raise_on=TEXT`` (raise
for inputs containing TEXT), ``hang_after=N`` (block the loop after N),
``busy_ms=N`` (burn N ms of CPU per message: a CPU-bound stage that makes
progress, whatever the stage's own cost).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from mpipeline.messages import Message, PromptRequest, request_of
from mpipeline.stages.base import AsyncStage, Stage


@dataclass(frozen=True)
class Faults:
    boot_error: bool = False
    crash_after: int | None = None
    raise_on: str | None = None
    hang_after: int | None = None
    busy_ms: int | None = None

    @property
    def any(self) -> bool:
        return self != Faults()


def for_stage(stage: str, env: dict[str, str] | None = None) -> Faults:
    env = dict(os.environ) if env is None else env
    if env.get("MPIPELINE_TESTING") != "1":
        return Faults()
    spec = env.get("MPIPELINE_FAULTS", "")
    kw: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, what = item.partition(":")
        if where != stage:
            continue
        kind, _, arg = what.partition("=")
        if kind == "boot_error":
            kw["boot_error"] = True
        elif kind in ("crash_after", "hang_after", "busy_ms"):
            kw[kind] = int(arg)
        elif kind == "raise_on":
            kw["raise_on"] = arg
        else:
            raise ValueError(f"unknown fault {kind!r} in MPIPELINE_FAULTS")
    return Faults(**kw)  # type: ignore[arg-type]


# Wrapping a stage (test builds only: replica.py wraps when any fault is set)


def _check(faults: Faults, seen: int, msg: Message) -> None:
    if faults.crash_after is not None and seen > faults.crash_after:
        os._exit(70)
    if faults.hang_after is not None and seen > faults.hang_after:
        time.sleep(3600)  # block the event loop: alive but hung
    if faults.busy_ms is not None:
        until = time.perf_counter() + faults.busy_ms / 1000
        while time.perf_counter() < until:  # CPU, not a sleep: busy, not hung
            pass
    req = request_of(msg)
    if faults.raise_on and isinstance(req, PromptRequest) and faults.raise_on in req.input:
        raise RuntimeError("injected raise_on fault")


def wrap(stage: Stage[Any, Any] | AsyncStage[Any, Any], faults: Faults) -> Any:
    seen = 0
    if isinstance(stage, AsyncStage):
        inner_handle = stage.handle

        async def handle(msg: Message) -> AsyncIterator[Message]:
            nonlocal seen
            seen += 1
            _check(faults, seen, msg)
            async for out in inner_handle(msg):
                yield out

        stage.handle = handle  # type: ignore[method-assign]
        return stage
    inner = stage.process

    def process(msg: Message) -> Iterable[Message]:
        nonlocal seen
        seen += 1
        _check(faults, seen, msg)
        return inner(msg)

    stage.process = process  # type: ignore[method-assign]
    return stage
