"""Sink: what a stage's outputs are handed to, a ring ``Outbox`` or an in-process ``LocalLink``.

The runner and the task pool only emit, flush and finish; whether the next
stage is another process behind a ring or the next member of the same
placement group is decided once, when the runner is built.
"""

from __future__ import annotations

from typing import Protocol

from mpipeline.messages import Message


class Sink(Protocol):
    def attach(self, *, spin_s: float) -> None: ...

    def close(self) -> None: ...

    def emit(self, msg: Message) -> None: ...

    def has_pending(self) -> bool: ...

    def schedule_flush(self) -> None: ...

    async def flush(self) -> None: ...

    async def finish(self) -> None: ...
