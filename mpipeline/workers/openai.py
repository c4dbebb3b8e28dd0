"""OpenAI-compatible chat completions: OpenAI itself, vLLM, llama.cpp server, SGLang, Ollama.

One attempt per call, failures classified into ``UpstreamFailure`` (see
``_http``); the shard around it owns retries, the circuit and phase timeouts.

The request goes upstream as the client sent it: the pipeline's messages
(each one's own JSON when it was more than text: images, tool calls, tool
results) and every other field of its chat completion, known or not
(``PromptRequest.params``), spliced in as raw JSON, never re-encoded. Only
``model`` is the configured one, and a stream always asks for its usage
(the shard counts tokens); ``max_tokens`` and ``temperature`` come from the
config when the request has none.

Replies are decoded by ``_openai_wire``: plain ones as cheaply as ever, and
anything more (tool calls, refusal, logprobs, ``system_fingerprint``...)
kept as the upstream's own JSON, which the OpenAI route passes on.
``/completions`` and ``/embeddings`` requests go to their own path with the
client's body as it came (``_passthrough``).
``generate`` yields token by token; ``generate_reads`` yields one piece per
read (the tokens that arrived together, joined), which the shard streams as
one chunk; structured pieces are never joined, each keeps its own JSON.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec

from mpipeline.config import UpstreamConfig
from mpipeline.messages import Assembled, Turn
from mpipeline.workers import _failures, _http, _passthrough
from mpipeline.workers._client import Client
from mpipeline.workers._conn import Conn
from mpipeline.workers._openai_wire import Tally, decode_completion, decode_read, take_usage
from mpipeline.workers.base import Generation, WorkerContext
from mpipeline.workers.sse import SSEDecoder

__all__ = ["OpenAIUpstream", "decode_read"]

_ENCODER = msgspec.json.Encoder()
_PARAMS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_OBJECT = msgspec.json.Decoder(dict[str, Any])
# What the worker itself says in every request, whatever ``params`` holds.
_OWN = ("model", "messages", "stream")
# The client's length bounds: null ones give way to the config's max_tokens.
_BOUNDS = ("max_tokens", "max_completion_tokens")


def _message(turn: Turn) -> dict[str, str] | msgspec.Raw:
    """A turn as OpenAI takes it: the client's own JSON when it had more than text."""
    if turn.raw:
        return msgspec.Raw(turn.raw)
    return {"role": turn.role, "content": turn.content}


class OpenAIUpstream(_http.HttpUpstream):
    """``POST {base_url}/chat/completions``, streamed (SSE until ``[DONE]``) or not."""

    path = "/chat/completions"

    def __init__(
        self, config: UpstreamConfig, ctx: WorkerContext | None = None, *, name: str = "openai"
    ) -> None:
        super().__init__(config, ctx, name=name)

    def _headers(self, key: _http.ApiKey | None) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = "Bearer " + key.reveal()
        return headers

    async def _open_stream(self, job: Assembled) -> tuple[Client, Conn]:
        endpoint = job.request.endpoint
        if not endpoint:
            return await super()._open_stream(job)
        client = self._require_client()
        body = self._passed_body(job)
        return client, await _passthrough.open_stream(client, endpoint, body, self._stream_read_s)

    async def _fetch_body(self, job: Assembled) -> bytes:
        endpoint = job.request.endpoint
        if not endpoint:
            return await super()._fetch_body(job)
        client = self._require_client()
        body = self._passed_body(job)
        return await _passthrough.fetch_body(client, endpoint, body, self._unary_read_s)

    def _passed_body(self, job: Assembled) -> bytes:
        request = job.request
        return _passthrough.body_for(request.params, bool(request.model), self._config.model)

    def _body(self, job: Assembled, stream: bool) -> bytes:
        config = self._config
        request = job.request
        if job.messages:
            messages = [_message(t) for t in job.messages]
        elif request.input_raw:
            messages = [msgspec.Raw(request.input_raw)]
        else:
            messages = [{"role": "user", "content": request.input}]
        body: dict[str, Any] = {"model": config.model, "messages": messages, "stream": stream}
        if request.params:
            try:
                extra = _PARAMS.decode(request.params)
            except msgspec.DecodeError:
                raise _failures.invalid_request("params is not a JSON object") from None
            for key in _OWN:
                extra.pop(key, None)
            # An explicit null bound is no bound (the SDK sends max_tokens=None as
            # null): the config's max_tokens applies, as when the field is absent.
            for key in _BOUNDS:
                if bytes(extra.get(key, b"")) == b"null":
                    del extra[key]
            body.update(extra)
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            max_tokens = request.max_tokens or config.max_tokens
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
        if config.temperature is not None and "temperature" not in body:
            body["temperature"] = config.temperature
        if stream:
            # The shard counts tokens from the usage chunk; the client's other
            # stream options go on, and the gateway sends usage only if asked.
            options = body.get("stream_options")
            merged = _OBJECT.decode(options) if isinstance(options, msgspec.Raw) else {}
            merged["include_usage"] = True
            body["stream_options"] = merged
        return _ENCODER.encode(body)

    def generate(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        """Stream the reply's content deltas as tokens.

        :raises UpstreamFailure: any failure, classified (see ``_failures``)
        """
        return self._stream(job, gen, per_read=False)

    def generate_reads(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        """Stream the reply as pieces: the tokens of each network read, joined.

        :raises UpstreamFailure: any failure, classified (see ``_failures``)
        """
        return self._stream(job, gen, per_read=True)

    async def _stream(
        self, job: Assembled, gen: Generation, *, per_read: bool
    ) -> AsyncGenerator[str, None]:
        client, conn = await self._open_stream(job)
        try:
            decoder = SSEDecoder(strict=True)
            tally = Tally(gen)
            while True:
                data = await conn.read()
                if not data:
                    raise _http.stream_end(decoder)
                chunks, done, failure = decode_read(decoder, data)
                tokens: list[str] = []
                failure = tally.take(chunks, tokens) or failure
                if done and failure is None:
                    await _http.drain(client, conn)
                if tokens:
                    if not per_read or tally.structured:
                        for token in tokens:
                            yield token
                    else:
                        yield tokens[0] if len(tokens) == 1 else "".join(tokens)
                if failure is not None:
                    raise failure
                if done:
                    return
        finally:
            client.release(conn)

    async def complete(self, job: Assembled, gen: Generation) -> str:
        """The non-streaming call: the whole reply in one JSON body.

        :raises UpstreamFailure: any failure, classified (see ``_failures``)
        """
        body = await self._fetch_body(job)
        if job.request.endpoint:  # /completions, /embeddings: the reply as it came
            return _passthrough.completed(body, gen)
        reply, plain = decode_completion(body)
        if reply.error is not None:
            raise _failures.error_failure(reply.error, what="upstream reported an error")
        choice = reply.choices[0] if reply.choices else None
        if choice is None or choice.message is None:
            raise _failures.protocol_failure("upstream reply has no choices")
        text = choice.message.content or ""
        gen.finish_reason = choice.finish_reason or "stop"
        if reply.usage is not None:
            take_usage(reply.usage, gen)
        else:
            # No usage from the server: whitespace-separated words stand in for tokens.
            gen.completion_tokens = len(text.split())
        if not plain:
            gen.raw = body
            gen.raw_bytes = len(body)
        return text
