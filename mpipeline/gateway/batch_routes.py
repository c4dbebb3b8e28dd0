"""OpenAI's Batch API over HTTP: ``/v1/files`` and ``/v1/batches``, as the SDKs call them.

``client.files.create(file=..., purpose="batch")`` uploads a JSONL file of
requests; ``client.batches.create(input_file_id=..., endpoint=...,
completion_window="24h")`` runs it in the background; ``batches.retrieve``,
``batches.list`` and ``batches.cancel`` follow it; ``files.content`` reads
the output and error files. Answers and refusals are OpenAI's shapes
(``OpenAIErrors``: 400 ``invalid_request_error`` with ``param``), since the
SDKs parse them.

Nothing here is held in memory: every answer is read from the run dir
(``batch_files``), so with several gateway replicas on one socket any of
them answers for any batch, while exactly one runs it (``batch_runner``).
A new batch is taken by the replica that created it at once; cancel leaves
a marker that the runner, wherever it is, acts on.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import msgspec

from mpipeline.config import GatewayConfig
from mpipeline.gateway import schemas
from mpipeline.gateway.batch_execute import LineExecutor
from mpipeline.gateway.batch_files import MAX_BATCHES, MAX_FILES, BatchStore, new_id, now
from mpipeline.gateway.batch_input import parse_upload
from mpipeline.gateway.batch_runner import BatchRunner
from mpipeline.gateway.batch_shapes import (
    UNFINISHED,
    WINDOW_S,
    Batch,
    BatchList,
    CreateBatchBody,
    FileDeleted,
    FileList,
)
from mpipeline.gateway.exchange import Reply, Request, Response
from mpipeline.gateway.models import Models
from mpipeline.gateway.openai_reply import OpenAIErrors, problem_reply
from mpipeline.gateway.schemas import Problem
from mpipeline.gateway.style import Handler, Upgrade
from mpipeline.pipeline import Pipeline

FILES = "/v1/files"
BATCHES = "/v1/batches"
CONTENT = "/content"
CANCEL = "/cancel"
# ``GET /v1/batches``: OpenAI's page size, default and most.
PAGE = 20
MAX_PAGE = 100
JSONL = "application/jsonl"
_ENCODE = msgspec.json.Encoder().encode
_DECODE_CREATE = msgspec.json.Decoder(CreateBatchBody)


class Batches(OpenAIErrors):
    """The Batch API routes (an ``ApiStyle`` in OpenAI's error shape); ``start`` once
    the pipeline client knows its run dir, ``close`` with the gateway."""

    prefixes: tuple[str, ...] = (FILES, BATCHES)
    upgrades: Mapping[str, Upgrade] = {}

    def __init__(
        self,
        pipeline: Pipeline,
        cfg: GatewayConfig,
        *,
        model: str,
        models: Models,
        keepalive_s: float,
    ) -> None:
        self._pipeline = pipeline
        self._concurrency = cfg.batch_concurrency
        self._executor = LineExecutor(
            pipeline,
            model=model,
            models=models,
            priority=schemas.PRIORITIES[cfg.batch_priority],
            keepalive_s=keepalive_s,
        )
        self._runner: BatchRunner | None = None
        self.routes: dict[str, dict[str, Handler]] = {
            FILES: {"POST": self._upload, "GET": self._files},
            f"{FILES}/": {"GET": self._file, "DELETE": self._delete},
            BATCHES: {"POST": self._create, "GET": self._list},
            f"{BATCHES}/": {"GET": self._retrieve, "POST": self._cancel},
        }

    def start(self, run_dir: Path) -> None:
        """Open the store under ``run_dir`` and start adopting unfinished batches."""
        store = BatchStore(run_dir)
        self._runner = BatchRunner(
            store,
            self._executor.execute,
            concurrency=self._concurrency,
            not_ready=lambda: self._pipeline.not_ready(),
        )
        self._runner.start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.close()

    @property
    def _store(self) -> BatchStore:
        assert self._runner is not None, "Batches.start was not called"
        return self._runner.store

    # Files

    async def _upload(self, request: Request, response: Response) -> None:
        upload = parse_upload(request.header("content-type"), request.body)
        if isinstance(upload, Problem):
            response.send_reply(problem_reply(upload))
            return
        if self._store.file_count() >= MAX_FILES:
            response.send_reply(self._files_full())
            return
        obj = self._store.add_file(upload.filename, "batch", upload.data)
        response.send(200, _ENCODE(obj))

    async def _files(self, request: Request, response: Response) -> None:
        response.send(200, _ENCODE(FileList(data=self._store.list_files())))

    async def _file(self, request: Request, response: Response) -> None:
        rest = request.path.removeprefix(f"{FILES}/")
        file_id = rest.removesuffix(CONTENT)
        if self._store.file(file_id) is None:
            response.send_reply(self._no_file(file_id))
            return
        if rest.endswith(CONTENT):
            data = self._store.content(file_id) or b""
            response.send(200, data, content_type=JSONL)
            return
        response.send(200, _ENCODE(self._store.file(file_id)))

    async def _delete(self, request: Request, response: Response) -> None:
        file_id = request.path.removeprefix(f"{FILES}/")
        if not self._store.delete_file(file_id):
            response.send_reply(self._no_file(file_id))
            return
        response.send(200, _ENCODE(FileDeleted(id=file_id)))

    # Batches

    async def _create(self, request: Request, response: Response) -> None:
        body = schemas.decode(_DECODE_CREATE, request.body)
        if isinstance(body, Problem):
            response.send_reply(problem_reply(body))
            return
        source = self._store.file(body.input_file_id)
        if source is None or source.purpose != "batch":
            why = "no such file" if source is None else f"its purpose is {source.purpose}"
            message = f"input_file_id {body.input_file_id!r} is not a batch input file: {why}"
            response.send_reply(self.error_reply(400, message, field="input_file_id"))
            return
        # A batch's output and error files land among the files: both caps apply.
        if self._store.file_count() >= MAX_FILES:
            response.send_reply(self._files_full())
            return
        if self._store.batch_count() >= MAX_BATCHES:
            message = f"this run holds {MAX_BATCHES} batches, the most it keeps; start a new run"
            response.send_reply(self.error_reply(400, message))
            return
        created = now()
        batch = Batch(
            id=new_id("batch_"),
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            created_at=created,
            expires_at=created + WINDOW_S[body.completion_window],
            metadata=body.metadata,
        )
        self._store.write_batch(batch)
        assert self._runner is not None
        self._runner.adopt(batch.id)
        response.send(200, _ENCODE(batch))

    async def _list(self, request: Request, response: Response) -> None:
        query = urllib.parse.parse_qs(request.query, keep_blank_values=True)
        after = query.get("after", [None])[0]
        # One value of plain ASCII digits: int() would also take " 5", "1_0", "+5" or
        # other scripts' digits, and parse_qs would drop a blank one unasked.
        given = query.get("limit", [str(PAGE)])
        text = given[0] if len(given) == 1 else ""
        limit = int(text) if text.isascii() and text.isdigit() and len(text) <= 4 else 0
        if not 1 <= limit <= MAX_PAGE:
            message = f"limit must be a whole number from 1 to {MAX_PAGE}"
            response.send_reply(self.error_reply(400, message, field="limit"))
            return
        batches = [self._view(b) for b in self._store.batches()]
        if after is not None:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        page = batches[:limit]
        listing = BatchList(
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=len(batches) > limit,
        )
        response.send(200, _ENCODE(listing))

    async def _retrieve(self, request: Request, response: Response) -> None:
        batch_id = request.path.removeprefix(f"{BATCHES}/")
        batch = self._store.batch(batch_id)
        if batch is None:
            response.send_reply(self._no_batch(batch_id))
            return
        response.send(200, _ENCODE(self._view(batch)))

    async def _cancel(self, request: Request, response: Response) -> None:
        rest = request.path.removeprefix(f"{BATCHES}/")
        if not rest.endswith(CANCEL):
            message = f"POST {request.path}: use POST {BATCHES}/{{batch_id}}{CANCEL}"
            response.send_reply(self.error_reply(404, message))
            return
        batch_id = rest.removesuffix(CANCEL)
        batch = self._store.batch(batch_id)
        if batch is None:
            response.send_reply(self._no_batch(batch_id))
            return
        if batch.status in UNFINISHED:
            self._store.request_cancel(batch_id)
            assert self._runner is not None
            self._runner.adopt(batch_id)  # no runner anywhere: this replica ends it
        elif batch.status != "cancelled":
            message = f"batch {batch_id} is already {batch.status}; there is nothing to cancel"
            response.send_reply(self.error_reply(409, message))
            return
        response.send(200, _ENCODE(self._view(self._store.batch(batch_id) or batch)))

    # Helpers

    def _view(self, batch: Batch) -> Batch:
        """The batch as a client should see it: cancelling as soon as it was asked to be."""
        if batch.status in ("validating", "in_progress") and self._store.cancel_requested(batch.id):
            return msgspec.structs.replace(
                batch, status="cancelling", cancelling_at=batch.cancelling_at or now()
            )
        return batch

    def _files_full(self) -> Reply:
        message = (
            f"this run holds {MAX_FILES} files, the most it keeps; "
            f"delete some with DELETE {FILES}/{{file_id}}"
        )
        return self.error_reply(400, message, field="file")

    def _no_file(self, file_id: str) -> Reply:
        return self.error_reply(404, f"no file {file_id[:80]!r}", field="file_id")

    def _no_batch(self, batch_id: str) -> Reply:
        return self.error_reply(404, f"no batch {batch_id[:80]!r}", field="batch_id")
