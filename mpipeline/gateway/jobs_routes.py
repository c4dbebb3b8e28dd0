"""Async requests over HTTP: ``POST /v1/requests``, ``GET`` and ``DELETE /v1/requests/{id}``.

Submit-and-poll for clients that cannot hold a connection for a whole
generation. The body is ``POST /v1/prompt``'s, decoded, bounded, rate-limited
and refused by the very same code (``NativeApi.prepare``), so the two routes
can never disagree on what they accept; only ``stream`` is refused, as there
is no connection to stream on. The request then runs as a task of the
gateway's loop through ``Pipeline.submit``, exactly as a synchronous one does,
and its outcome lands in the ``JobTable`` (``jobs.py``): the result the
synchronous route would have sent, or its error with the HTTP status it would
have had.

``DELETE`` cancels the task, which is what a client that hangs up does to a
synchronous request (``connection.py`` cancels the handler): ``submit`` then
cancels the request in the pipeline (``client_cancelled``, with its DLQ
record, the shard stops generating). The job's one outcome is ``cancelled``;
a completion that races in afterwards is dropped by the table.

The table is in this process's memory: with ``gateway.replicas`` above 1 a
poll may reach a replica that does not hold the job (README).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import msgspec

from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.gateway import schemas
from mpipeline.gateway.exchange import Reply, Request, Response
from mpipeline.gateway.jobs import Job, JobState, JobTable
from mpipeline.gateway.jobs_shapes import JobOut
from mpipeline.gateway.native import NativeApi
from mpipeline.gateway.schemas import ErrorDetail, PromptResult
from mpipeline.gateway.style import Handler, Upgrade
from mpipeline.pipeline import Pipeline, RequestOptions

PATH = "/v1/requests"
PREFIX = PATH + "/"
NO_STREAM = (
    "stream is not supported on /v1/requests: there is no connection to stream on; "
    "poll GET /v1/requests/{id} for the result, or use POST /v1/prompt with stream"
)
# The error type of a submission refused because the table is full of unfinished jobs.
JOBS_FULL = "jobs_full"
CANCELLED_MESSAGE = "cancelled by DELETE /v1/requests/{id}"
# How long a DELETE waits for the cancelled request to leave the pipeline client
# (``Pipeline.cancel`` answers it at once; this only bounds a surprise).
CANCEL_WAIT_S = 5.0
# Characters of an unknown id a 404 repeats (ours are 26; a path may be 64 KiB).
ID_ECHO = 80
_ENCODE = msgspec.json.Encoder().encode

RequestJob = Job[PromptResult, RequestFailed]
RequestJobs = JobTable[PromptResult, RequestFailed]


class AsyncRequests(schemas.NativeErrors):
    """The async request routes (an ``ApiStyle``, in mpipeline's native error shape)."""

    prefixes: tuple[str, ...] = ()
    upgrades: Mapping[str, Upgrade] = {}

    def __init__(self, pipeline: Pipeline, native: NativeApi, table: RequestJobs) -> None:
        self._pipeline = pipeline
        self._native = native
        self.table = table
        self.routes: dict[str, dict[str, Handler]] = {
            PATH: {"POST": self._submit},
            PREFIX: {"GET": self._get, "DELETE": self._delete},
        }

    # Routes

    async def _submit(self, request: Request, response: Response) -> None:
        table = self.table
        # Checked before the body spends a rate-limit token on a request that cannot be held.
        if not table.has_room():
            table.refused += 1
            response.send_reply(self._full())
            return
        prepared = self._native.prepare(request, no_stream=NO_STREAM)
        if isinstance(prepared, Reply):
            response.send_reply(prepared)
            return
        body, options = prepared
        job = table.add()
        assert job is not None  # room was checked, and nothing awaited since
        task = asyncio.create_task(self._run(job.id, body.input, options))
        job.handle = task
        # One turn of the loop: the task's first step (Pipeline.submit up to its
        # first await) runs before this one resumes, as call_soon is first in, first
        # out. A request the pipeline refuses at once (too large, shutting down) is
        # then answered here, as POST /v1/prompt answers it, and never becomes a job.
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            # The client left before it got the id: nobody could ever read the job.
            task.cancel()
            table.discard(job.id)
            raise
        refused = task.exception() if task.done() and not task.cancelled() else None
        if refused is not None:  # the client is closed: the gateway answers 503
            table.discard(job.id)
            raise refused
        if job.state is JobState.FAILED and job.error is not None:
            table.discard(job.id)
            raise job.error  # the gateway answers it in this style (failure_reply)
        location = f"{PREFIX}{job.id}"
        response.send(202, _ENCODE(_view(job)), (("location", location),))

    async def _get(self, request: Request, response: Response) -> None:
        job = self._job(request, response)
        if job is not None:
            response.send(200, _ENCODE(_view(job)))

    async def _delete(self, request: Request, response: Response) -> None:
        job = self._job(request, response)
        if job is None:
            return
        if job.state in (JobState.COMPLETED, JobState.FAILED):
            message = f"request {job.id} already {job.state}; there is nothing to cancel"
            response.send_reply(self.error_reply(409, message, kind="conflict"))
            return
        task = job.handle
        self.table.cancel(job.id)  # first: a completion racing in now is dropped
        if isinstance(task, asyncio.Task) and not task.done():
            task.cancel()
            # Submit's own CancelledError path cancels the request in the pipeline
            # at once; waiting for it means nothing of it is left in flight here.
            await asyncio.wait((task,), timeout=CANCEL_WAIT_S)
        response.send(200, _ENCODE(_view(job)))

    # The request's run

    async def _run(self, job_id: str, text: str, options: RequestOptions) -> None:
        """Run one request and record its one outcome (the table keeps the first)."""
        table = self.table
        table.start(job_id)
        try:
            done = await self._pipeline.submit(text, options)
        except RequestFailed as exc:
            table.fail(job_id, exc)
        except asyncio.CancelledError:
            # A DELETE (already recorded) or the gateway closing: the request is
            # cancelled in the pipeline by submit, and this is its outcome.
            table.cancel(job_id)
        else:
            table.complete(job_id, schemas.prompt_result(done, time.monotonic_ns()))

    async def close(self) -> None:
        """Cancel the requests still running (the gateway is closing; their
        results would have nowhere to be read from) and wait for them to leave."""
        tasks = [job.handle for job in self.table.unfinished()]
        running = [t for t in tasks if isinstance(t, asyncio.Task) and not t.done()]
        for task in running:
            task.cancel()
        if running:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait(running, timeout=CANCEL_WAIT_S)

    # Helpers

    def _job(self, request: Request, response: Response) -> RequestJob | None:
        job_id = request.path.removeprefix(PREFIX)
        job = self.table.get(job_id)
        if job is None:
            ttl = f"{self.table.ttl_s:g}"
            message = (
                f"no request {job_id[:ID_ECHO]!r}: the id is unknown, or its outcome expired "
                f"(kept gateway.jobs_ttl_s = {ttl} s after it ended)"
            )
            response.send_reply(self.error_reply(404, message))
        return job

    def _full(self) -> Reply:
        message = (
            f"the gateway holds {self.table.max_jobs} unfinished async requests "
            "(gateway.jobs_max); retry later or poll and collect the ones in flight"
        )
        headers = (("retry-after", str(schemas.RETRY_AFTER_S)),)
        return self.error_reply(429, message, kind=JOBS_FULL, headers=headers)


def _view(job: RequestJob) -> JobOut:
    error: ErrorDetail | None = None
    status: int | None = None
    if job.state is JobState.CANCELLED:
        error = ErrorDetail(type=str(ErrorCode.CLIENT_CANCELLED), message=CANCELLED_MESSAGE)
        status = schemas.STATUS_FOR_CODE[ErrorCode.CLIENT_CANCELLED]
    elif job.error is not None:
        error = schemas.failure_detail(job.error)
        status = schemas.failure_status(job.error)
    return JobOut(
        id=job.id,
        status=job.state.value,
        created_at=job.created_at,
        finished_at=job.finished_at,
        expires_at=job.expires_at,
        result=job.result,
        error=error,
        http_status=status,
    )
