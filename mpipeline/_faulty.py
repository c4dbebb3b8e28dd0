"""Wrap a stage with injected faults (see faults.py); test builds only."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from mpipeline.faults import Faults
from mpipeline.messages import Message, PromptRequest, request_of
from mpipeline.stages.base import AsyncStage, Stage


def _check(faults: Faults, seen: int, msg: Message) -> None:
    if faults.crash_after is not None and seen > faults.crash_after:
        os._exit(70)
    if faults.hang_after is not None and seen > faults.hang_after:
        time.sleep(3600)  # block the event loop: alive but hung
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
