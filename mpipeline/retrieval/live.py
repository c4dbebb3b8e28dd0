"""The index a rag replica searches, kept current while the replica serves.

A reload (SIGHUP to the replica, or a changed fingerprint of the documents
found by polling) builds or loads the new index in a worker thread and then
swaps one attribute between two queries: ``search`` runs on the event loop
thread, so a query sees the old index or the new one, never half of each,
and no request waits for a build or fails because of one. A reload that
fails (the folder emptied, a file unreadable) is logged and the old index
stays: a bad edit to the corpus must not take retrieval down.

It lives here and not in the stage because stages may not touch signals or
the file system (the import contracts in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from mpipeline import rundir
from mpipeline.config import PipelineConfig, RagConfig
from mpipeline.messages import Passage
from mpipeline.retrieval import index
from mpipeline.retrieval.chunks import fingerprint

log = logging.getLogger("mpipeline.rag")


def cache_dir(rag: RagConfig, cfg: PipelineConfig) -> Path:
    """Where built indexes live: ``index_dir``, else ``rag-index`` in the run dir."""
    if rag.index_dir is not None:
        return Path(rag.index_dir).expanduser()
    return rundir.resolve_run_dir(cfg) / "rag-index"


class LiveIndex:
    def __init__(self, rag: RagConfig, cfg: PipelineConfig) -> None:
        assert rag.documents is not None
        self._rag = rag
        self._documents = Path(rag.documents).expanduser()
        self._cache = cache_dir(rag, cfg)
        self._index: index.Index | None = None
        self.folder: Path | None = None  # the loaded index's folder
        self._reloading: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._hup = False

    def load(self) -> None:
        """Build or load the index of the documents now (at boot: before ready).

        :raises ConfigError: naming the folder when it is missing or holds no text.
        """
        self._index, self.folder = self._ensure()

    async def start(self) -> None:
        """Load, then watch for SIGHUP and (every ``reload_poll_s``) for changed files."""
        await asyncio.to_thread(self.load)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self._hup = True
        if self._rag.reload_poll_s > 0:
            self._poller = asyncio.create_task(self._poll(self._rag.reload_poll_s))

    async def stop(self) -> None:
        if self._hup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._hup = False
        for task in (self._poller, self._reloading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def __len__(self) -> int:
        return len(self._index) if self._index is not None else 0

    def search(self, query: str) -> list[Passage]:
        if self._index is None:
            return []
        return self._index.search(query, self._rag.top_k, self._rag.context_tokens)

    def request_reload(self) -> None:
        """Start a reload unless one is running (one that is already reads the files anew)."""
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.create_task(self.reload())

    async def reload(self) -> None:
        try:
            new, folder = await asyncio.to_thread(self._ensure)
        except Exception as exc:  # any failure keeps the index that works
            log.warning("rag: reload of %s failed, keeping the old index: %s", self._documents, exc)
            return
        if folder != self.folder:
            self._index, self.folder = new, folder  # the swap: one store, between queries
            log.info("rag: reloaded %s: %d passages (%s)", self._documents, len(new), folder.name)

    def _ensure(self) -> tuple[index.Index, Path]:
        rag = self._rag
        return index.ensure(self._documents, self._cache, rag.chunk_tokens, rag.chunk_overlap)

    async def _poll(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                now = await asyncio.to_thread(
                    fingerprint, self._documents, self._rag.chunk_tokens, self._rag.chunk_overlap
                )
            except Exception as exc:  # the folder is gone or empty: keep serving, say so
                log.warning("rag: cannot read %s: %s", self._documents, exc)
                continue
            if self.folder is None or now != self.folder.name:
                self.request_reload()
