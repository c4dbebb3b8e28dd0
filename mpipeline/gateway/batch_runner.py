"""Runs batches: one runner per batch in the whole run, whichever replica it is on.

Every gateway replica has a ``BatchRunner``. A batch runs on the replica
that holds its ``flock`` (``BatchStore.lock``) and nowhere else; the replica
that created it takes it at once, and every replica looks every few seconds
(``scan_interval_s``) for an unfinished batch whose lock is free — its
runner died with its process — and adopts it. The kernel drops a dead
holder's lock, so there is no lease to expire and no heartbeat to trust.

A run validates the input file (``batch_input``), then runs the lines not
yet answered (``BatchStore.answered``: a resumed batch skips what it already
wrote), at most ``concurrency`` at once, each through ``execute`` — the
synchronous route's own handler, at the batch priority (``batch_routes``).
Each outcome is appended to the output or error file as it comes, so a kill
loses only the lines in flight, and they run again on resume.

Cancel is a marker file any replica can write; the runner polls for it while
it runs and cancels its lines in flight, which cancels their requests in
the pipeline exactly as a client that hangs up does. Lines already answered
stay in the output; the batch ends ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable

import msgspec

from mpipeline.errors import MPipelineError
from mpipeline.gateway.batch_files import Appender, BatchStore, now, output_ids
from mpipeline.gateway.batch_input import Line, check_lines
from mpipeline.gateway.batch_shapes import (
    UNFINISHED,
    WINDOW_S,
    Batch,
    BatchError,
    BatchErrors,
    LineError,
    LineResponse,
    OutputLine,
    RequestCounts,
)

log = logging.getLogger(__name__)

# One line, run through the synchronous route: (url, body) -> (HTTP status, JSON body).
Execute = Callable[[str, bytes], Awaitable[tuple[int, bytes]]]
# Why the pipeline should get no traffic now (starting, draining), or None.
NotReady = Callable[[], str | None]
# The one refusal that is no line's outcome: the pipeline is starting or stopping.
# The line is not written; the batch stops here and is resumed once it can run.
NOT_NOW = "shutting_down"
# How often a runner looks for the cancel marker and writes its progress (counts).
CANCEL_POLL_S = 0.2
_replace = msgspec.structs.replace
_ENCODE = msgspec.json.Encoder().encode


class _Answer(msgspec.Struct):
    id: str | None = None


class _Detail(msgspec.Struct):
    message: str = ""
    code: str | None = None
    type: str | None = None


class _Failure(msgspec.Struct):
    error: _Detail = msgspec.field(default_factory=_Detail)


class NotNowError(MPipelineError):
    """The pipeline refused a line as starting or stopping: resume the batch later."""


class BatchRunner:
    """Adopts and runs the batches of one store; ``start`` on the gateway's loop."""

    def __init__(
        self,
        store: BatchStore,
        execute: Execute,
        *,
        concurrency: int,
        not_ready: NotReady = lambda: None,
        scan_interval_s: float = 2.0,
    ) -> None:
        self.store = store
        self.execute = execute
        self.not_ready = not_ready
        self._concurrency = concurrency
        self._scan_interval_s = scan_interval_s
        self._running: dict[str, asyncio.Task[None]] = {}
        # Batches seen ended: a scan reads each finished batch's file once, not forever.
        self._ended: set[str] = set()
        self._scanner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._scanner = asyncio.create_task(self._scan())

    async def close(self) -> None:
        """Stop scanning and stop every batch here: lines in flight are cancelled and
        not written, the locks are released, and another replica (or this one's
        successor) resumes them."""
        tasks = [t for t in (self._scanner, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def adopt(self, batch_id: str) -> bool:
        """Run ``batch_id`` here if no runner holds it; whether it runs here now."""
        if batch_id in self._running:
            return True
        fd = self.store.lock(batch_id)
        if fd is None:
            return False
        self._running[batch_id] = asyncio.create_task(self._hold(batch_id, fd))
        return True

    async def _scan(self) -> None:
        while True:
            try:
                for batch_id in self.store.batch_ids():
                    if batch_id in self._ended or batch_id in self._running:
                        continue
                    batch = self.store.batch(batch_id)
                    if batch is not None and batch.status in UNFINISHED:
                        self.adopt(batch_id)
                    elif batch is not None:
                        self._ended.add(batch_id)
            except (OSError, msgspec.DecodeError) as exc:
                log.warning("batch scan of %s failed: %s", self.store.root, exc)
            await asyncio.sleep(self._scan_interval_s)

    async def _hold(self, batch_id: str, fd: int) -> None:
        try:
            await self._run(batch_id)
        except asyncio.CancelledError:
            raise
        except MPipelineError as exc:  # the pipeline client is closing: resumed later
            log.info("batch %s stopped: %s", batch_id, exc)
        except Exception:
            log.exception("batch %s stopped by an error; another scan resumes it", batch_id)
        finally:
            os.close(fd)
            self._running.pop(batch_id, None)

    # One batch, under its lock

    async def _run(self, batch_id: str) -> None:
        batch = self.store.batch(batch_id)  # read again: the last holder may have ended it
        if batch is None or batch.status not in UNFINISHED:
            return
        if self.store.cancel_requested(batch_id) and batch.status == "validating":
            self._finish(self.cancelling(batch), "cancelled")
            return
        content = self.store.content(batch.input_file_id)
        if content is None:
            message = f"the input file {batch.input_file_id} no longer exists"
            self._fail(batch, "invalid_file", message)
            return
        checked = check_lines(content, batch.endpoint)
        if batch.status == "validating":
            if checked and not isinstance(checked[0], Line):
                errors = [e for e in checked if not isinstance(e, Line)]
                t = now()
                self.store.write_batch(
                    _replace(batch, status="failed", failed_at=t, errors=BatchErrors(data=errors))
                )
                return
            counts = RequestCounts(total=len(checked))
            batch = _replace(
                batch, status="in_progress", in_progress_at=now(), request_counts=counts
            )
            self.store.write_batch(batch)
        lines = [line for line in checked if isinstance(line, Line)]
        done, completed, failed = self.store.answered(batch_id)
        counts = RequestCounts(total=len(lines), completed=completed, failed=failed)
        batch = _replace(batch, request_counts=counts)
        if batch.status == "in_progress":
            batch = await self._lines(batch, [x for x in lines if x.custom_id not in done])
        if batch.status == "cancelling" or self.store.cancel_requested(batch_id):
            self._finish(self.cancelling(batch), "cancelled")
        elif batch.status == "expired":
            self._finish(batch, "expired")
        else:
            finalizing = _replace(batch, status="finalizing", finalizing_at=now())
            self.store.write_batch(finalizing)
            self._finish(finalizing, "completed")

    async def _lines(self, batch: Batch, pending: list[Line]) -> Batch:
        """Run ``pending``; the batch as it stands when they are done or it stopped."""
        out_id, err_id = output_ids(batch.id)
        output = Appender(self.store.content_path(out_id))
        run = _Run(self, batch, output, Appender(self.store.content_path(err_id)))
        slots = asyncio.Semaphore(self._concurrency)

        def ended(task: asyncio.Task[None]) -> None:
            run.inflight.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                run.failure = task.exception()

        watcher = asyncio.create_task(run.watch())
        try:
            for line in pending:
                await run.ready()
                await slots.acquire()
                if run.stopped() or run.failure is not None:
                    slots.release()
                    break
                task = asyncio.create_task(run.one(line))
                run.inflight.add(task)
                task.add_done_callback(ended)
            while run.inflight:
                await asyncio.wait(set(run.inflight))
        except asyncio.CancelledError:
            for task in run.inflight:
                task.cancel()
            if run.inflight:
                await asyncio.wait(set(run.inflight))
            raise
        finally:
            watcher.cancel()
            run.output.close()
            run.errors.close()
        if run.failure is not None:
            raise run.failure  # the pipeline closing, or a surprise: resumed later
        return run.batch

    # Ends

    def cancelling(self, batch: Batch) -> Batch:
        if batch.status == "cancelling":
            return batch
        batch = _replace(batch, status="cancelling", cancelling_at=batch.cancelling_at or now())
        self.store.write_batch(batch)
        return batch

    def _finish(self, batch: Batch, status: str) -> None:
        out_id, err_id = output_ids(batch.id)
        output = self.store.publish_output(out_id, f"{batch.id}_output.jsonl")
        errors = self.store.publish_output(err_id, f"{batch.id}_errors.jsonl")
        stamp = {f"{status}_at": now()}
        batch = _replace(
            batch,
            status=status,
            output_file_id=output.id if output else None,
            error_file_id=errors.id if errors else None,
            **stamp,
        )
        self.store.write_batch(batch)
        log.info("batch %s %s: %s", batch.id, status, batch.request_counts)

    def _fail(self, batch: Batch, code: str, message: str) -> None:
        errors = BatchErrors(data=[BatchError(code=code, message=message)])
        self.store.write_batch(_replace(batch, status="failed", failed_at=now(), errors=errors))


class _Run:
    """The lines of one batch in flight, its files and its live counts."""

    def __init__(
        self, runner: BatchRunner, batch: Batch, output: Appender, errors: Appender
    ) -> None:
        self.runner = runner
        self.batch = batch
        self.output = output
        self.errors = errors
        self.inflight: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None
        # Counts changed since the state file was last written.
        self.dirty = False
        window = WINDOW_S.get(batch.completion_window, WINDOW_S["24h"])
        self._expires_at = batch.created_at + window

    def stopped(self) -> bool:
        return self.batch.status != "in_progress"

    async def ready(self) -> None:
        """Wait while the pipeline is not ready (a replica still booting, say)."""
        while True:  # polled: readiness is the pipeline client's, with no event to await
            if self.runner.not_ready() is None or self.stopped():
                return
            await asyncio.sleep(CANCEL_POLL_S)

    async def watch(self) -> None:
        """Notice a cancel (any replica's marker) or the window's end; stop the lines."""
        store = self.runner.store
        while not self.stopped():
            if store.cancel_requested(self.batch.id):
                self.batch = self.runner.cancelling(self.batch)
            elif now() >= self._expires_at:
                self.batch = _replace(self.batch, status="expired")
            else:
                if self.dirty:
                    self.dirty = False
                    store.write_batch(self.batch)
                await asyncio.sleep(CANCEL_POLL_S)
                continue
            for task in list(self.inflight):
                task.cancel()

    async def one(self, line: Line) -> None:
        status, body = await self.runner.execute(line.url, line.body)
        line_id = f"batch_req_{secrets.token_hex(12)}"
        request_id = _request_id(body) or line_id
        response = LineResponse(status_code=status, request_id=request_id, body=msgspec.Raw(body))
        counts = self.batch.request_counts
        if status == 200:
            record = OutputLine(id=line_id, custom_id=line.custom_id, response=response)
            self.output.append(_ENCODE(record))
            counts = _replace(counts, completed=counts.completed + 1)
        else:
            error = _line_error(body, status)
            if error.code == NOT_NOW:
                raise NotNowError(error.message)
            record = OutputLine(
                id=line_id, custom_id=line.custom_id, response=response, error=error
            )
            self.errors.append(_ENCODE(record))
            counts = _replace(counts, failed=counts.failed + 1)
        self.batch = _replace(self.batch, request_counts=counts)
        self.dirty = True


def _request_id(body: bytes) -> str | None:
    with contextlib.suppress(msgspec.DecodeError):
        return msgspec.json.decode(body, type=_Answer).id
    return None


def _line_error(body: bytes, status: int) -> LineError:
    try:
        detail = msgspec.json.decode(body, type=_Failure).error
    except msgspec.DecodeError:
        return LineError(code=None, message=f"HTTP {status}")
    return LineError(code=detail.code or detail.type, message=detail.message)
