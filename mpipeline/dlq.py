"""The dead-letter queue: a durable record of every accepted request that failed.

The client promises each accepted request exactly one outcome; when that
outcome is an error (shed, expired, a stage error, a restarted replica,
shutdown, a cancelled or vanished client) the request itself would be lost
with it. So before the caller hears of the error, the request's full payload
and the reason go to ``<run_dir>/dlq.jsonl``, from where an operator can list,
inspect and replay them (``mpipeline dlq``).

The file is one self-describing JSON object per line, tagged by ``kind``:
``dead`` records and ``replayed`` markers. It is an operator's file that must
outlive code changes, so it never uses the rings' positional (array_like)
encoding. Several processes (gateway replicas, API clients, the replay CLI)
append to it at once: each batch is a single ``write`` on an ``O_APPEND``
descriptor, which the kernel places whole at the end of a regular file, so
lines from different processes never interleave.

"Recorded" means fsynced. Writes are group-committed: everything recorded
during one event-loop turn, and everything that arrives while a batch is being
written, goes out as one write plus one fsync in a worker thread, so the loop
never blocks on the disk and a burst of sheds costs one fsync, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

import msgspec

from mpipeline import rundir
from mpipeline.errors import ErrorCode, MPipelineError
from mpipeline.messages import Completed, Failed, Priority, PromptRequest

__all__ = [
    "DLQ_FILE",
    "DeadLetter",
    "DeadLetterQueue",
    "Entry",
    "Listed",
    "ReplayMarker",
    "RequestPayload",
    "ResultPayload",
    "gone_letter",
    "letter_for",
    "listing",
    "read_entries",
]

DLQ_FILE = "dlq.jsonl"

log = logging.getLogger(__name__)


class RequestPayload(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the client sent, enough to submit the request again."""

    input: str
    session_id: str | None = None
    metadata: dict[str, str] = {}
    # The Priority's name in lower case: stable even if the numbers change.
    priority: str = "normal"
    # The request's whole budget as accepted; None when unknown.
    deadline_ms: float | None = None
    max_tokens: int | None = None
    stream: bool = False

    def priority_value(self) -> Priority:
        try:
            return Priority[self.priority.upper()]
        except KeyError:
            return Priority.NORMAL


class ResultPayload(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome that reached a client slot after its client was gone."""

    # "completed", or the ErrorCode of the Failed that arrived.
    outcome: str
    text: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    # The Failed's reason and stage, for an error outcome.
    error: str | None = None
    stage: str | None = None


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="dead"):
    """One failed request: what the client saw (``id``, ``reason``) and what it sent.

    ``request`` is None only for ``client_gone`` records, which hold the
    ``result`` that nobody was left to receive instead.
    """

    id: str
    ts: float
    reason: str
    stage: str
    message: str
    request: RequestPayload | None = None
    result: ResultPayload | None = None


class ReplayMarker(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="replayed"):
    """A record was submitted again; appended, never edited in place.

    ``new_request_id`` is None when the pipeline refused the resubmission
    before accepting it; ``outcome`` is "ok" or the new ErrorCode.
    """

    replay_of: str
    ts: float
    new_request_id: str | None
    outcome: str
    message: str = ""


Entry: TypeAlias = DeadLetter | ReplayMarker


def letter_for(request: PromptRequest, failed: Failed, deadline_ms: float | None) -> DeadLetter:
    """The record of an accepted ``request`` that ended in ``failed``."""
    return DeadLetter(
        id=request.request_id,
        ts=time.time(),
        reason=str(failed.code),
        stage=failed.stage,
        message=failed.reason,
        request=RequestPayload(
            input=request.input,
            session_id=request.session_id,
            metadata=dict(request.metadata),
            priority=_priority_name(request.priority),
            deadline_ms=deadline_ms,
            max_tokens=request.max_tokens,
            stream=request.stream,
        ),
    )


def gone_letter(msg: Completed | Failed) -> DeadLetter:
    """The record of an outcome that reached a slot whose client had gone away."""
    if isinstance(msg, Completed):
        result = ResultPayload(
            outcome="completed",
            text=msg.text,
            prompt_tokens=msg.usage.prompt_tokens,
            completion_tokens=msg.usage.completion_tokens,
            finish_reason=msg.finish_reason,
        )
    else:
        result = ResultPayload(outcome=str(msg.code), error=msg.reason, stage=msg.stage)
    return DeadLetter(
        id=msg.request_id,
        ts=time.time(),
        reason=str(ErrorCode.CLIENT_GONE),
        stage="client",
        message=f"the client of slot {msg.reply_to} was gone when its outcome arrived",
        result=result,
    )


def _priority_name(value: int) -> str:
    try:
        return Priority(value).name.lower()
    except ValueError:
        return str(value)


# Writing


class DeadLetterQueue:
    """The appending side of one DLQ file, owned by one event loop.

    ``record`` never fails the caller: if the disk refuses a batch the error
    is logged and counted in ``errors`` and the futures resolve anyway, because
    the client's own answer (the error it is owed) matters more than the copy.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.written = 0
        self.errors = 0
        _prepare_dir(self.path.parent)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise MPipelineError(f"cannot open the dead-letter queue {self.path}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MPipelineError(f"the dead-letter queue {self.path} is not a regular file")
            if st.st_uid != os.geteuid():
                owner = f"belongs to uid {st.st_uid}, not to this user"
                raise MPipelineError(f"the dead-letter queue {self.path} {owner}")
            # The creation mode is filtered by the umask (and ignored for an existing
            # file); the payloads are the clients' prompts, so force owner-only.
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._encoder = msgspec.json.Encoder()
        self._lines: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._scheduled = False
        self._writing = False
        self._last: asyncio.Future[None] | None = None
        self._closed = False
        # One thread: batches go out in order, and a slow disk never takes the
        # default executor's threads from the rest of the process.
        self._executor: ThreadPoolExecutor | None = None

    def record(self, entries: Iterable[Entry]) -> asyncio.Future[None]:
        """Queue ``entries``; the future resolves once they are written and fsynced.

        Must be called from the event loop thread. The entries are encoded at
        once, so the caller may drop or reuse them.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._closed:
            self.errors += 1
            log.error("dead-letter queue %s is closed; records lost: %r", self.path, entries)
            future.set_result(None)
            return future
        encode = self._encoder.encode
        self._lines.extend(encode(entry) + b"\n" for entry in entries)
        self._waiters.append(future)
        self._last = future
        if not self._scheduled and not self._writing:
            self._scheduled = True
            loop.call_soon(self._start_batch)
        return future

    async def flush(self) -> None:
        """Wait until everything recorded so far is on disk (or has failed)."""
        last = self._last
        if last is not None and not last.done():
            await asyncio.shield(last)

    async def aclose(self) -> None:
        """Flush, then close the file; later ``record`` calls only log."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        os.close(self._fd)
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _start_batch(self) -> None:
        self._scheduled = False
        if self._writing or not self._waiters:
            return
        data = b"".join(self._lines)
        n = len(self._lines)
        waiters = self._waiters
        self._lines = []
        self._waiters = []
        self._writing = True
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="dlq")
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self._executor, self._write, data)
        done.add_done_callback(lambda f: self._batch_done(f, n, waiters))

    def _write(self, data: bytes) -> None:
        """One write for the whole batch, so no other appender lands inside it."""
        view = memoryview(data)
        while view:
            # A short write happens only when the disk fills; the retry then fails too.
            view = view[os.write(self._fd, view) :]
        if self.fsync:
            os.fsync(self._fd)

    def _batch_done(
        self, done: asyncio.Future[None], n: int, waiters: list[asyncio.Future[None]]
    ) -> None:
        self._writing = False
        exc = done.exception() if not done.cancelled() else asyncio.CancelledError()
        if exc is None:
            self.written += n
        else:
            self.errors += n
            log.error("dead-letter queue %s: %d records not recorded: %s", self.path, n, exc)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self._waiters and not self._scheduled:
            self._start_batch()


def _prepare_dir(path: Path) -> None:
    rundir.create(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "%s is open to other users (mode %o); the dead-letter queue there holds "
            "request payloads: chmod 700 it",
            path,
            mode,
        )


# Reading


_decoder = msgspec.json.Decoder(Entry)
_RECORD_START = b'{"kind":'


def read_entries(
    path: str | os.PathLike[str], warn: Callable[[str], None] | None = None
) -> Iterator[Entry]:
    """Every entry in the file, in order; bad lines are skipped with a warning.

    A crash in the middle of a write leaves a torn last line (no newline);
    that is expected after a power loss and is reported as such, not as an
    error. A missing file is an empty queue.
    """
    say = warn if warn is not None else log.warning
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield _decoder.decode(line)
                continue
            except msgspec.DecodeError as exc:
                error = exc
            # A writer that died mid-line leaves no newline, so the next append
            # (from any process) continues the same line: keep that record.
            start = line.find(_RECORD_START, 1)
            tail = None
            if start > 0:
                with contextlib.suppress(msgspec.DecodeError):
                    tail = _decoder.decode(line[start:])
            if tail is not None or not line.endswith(b"\n"):
                say(f"{path}:{lineno}: torn record (a crash while writing?); skipped")
            else:
                say(f"{path}:{lineno}: not a dead-letter record ({error}); skipped")
            if tail is not None:
                yield tail


@dataclass(slots=True)
class Listed:
    """A dead record with the replays made of it, oldest first."""

    record: DeadLetter
    replays: list[ReplayMarker] = field(default_factory=list)

    @property
    def replayed(self) -> ReplayMarker | None:
        return self.replays[-1] if self.replays else None

    @property
    def pending_replay(self) -> bool:
        """A request no resubmission was accepted for yet: what ``replay --all`` takes.

        A replay that failed again was recorded under its new id, so that
        record, not this one, is the one still to replay.
        """
        return self.record.request is not None and not any(
            m.new_request_id is not None for m in self.replays
        )


def listing(
    entries: Iterable[Entry],
    *,
    reasons: Sequence[str] = (),
    since: float | None = None,
    ids: Sequence[str] = (),
) -> list[Listed]:
    """Dead records joined with their replay markers, filtered, in file order."""
    records: list[Listed] = []
    by_id: dict[str, list[Listed]] = {}
    for entry in entries:
        if isinstance(entry, ReplayMarker):
            for item in by_id.get(entry.replay_of, ()):
                item.replays.append(entry)
            continue
        item = Listed(entry)
        records.append(item)
        by_id.setdefault(entry.id, []).append(item)
    wanted = set(ids)
    return [
        item
        for item in records
        if (not reasons or item.record.reason in reasons)
        and (since is None or item.record.ts >= since)
        and (not wanted or item.record.id in wanted)
    ]
