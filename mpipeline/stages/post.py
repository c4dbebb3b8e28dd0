"""Post: the last word on what the model said, before anyone sees it.

Works chunk by chunk on streams and on the final text: redaction of PII and
secrets (``redact.py``, off unless ``[stages.post.redact] enabled``), trimming
and a hard cap on output length, which holds on streams too.

A stream keeps a little state per request (post replicas get all of one
request's chunks, in order: replies route by session or request id): the
characters sent, for the cap; the index of the next chunk; and the tail that
redaction holds back because it could still grow into a secret. A chunk with
nothing to hold goes on in the same step, so redaction adds no latency to
the first token; a tail is released with the next chunk that shows it cannot
become a match, or at the end. Chunk indexes are renumbered so that the
client still sees 0, 1, 2... when a chunk was held whole. The state goes
with the request's ``Completed`` or ``Failed``.

Its transforms touch text content only: tool calls and the rest of a
structured reply travel in ``raw``, which post never reads (a structured
chunk passes as it came, after the text before it), and a reply the client
asked to be JSON (``verbatim``) is left exactly as the model wrote it, since
a trimmed or cut JSON document is a broken one (``redact.json_output``
opts in to redacting it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

from mpipeline.config import PostConfig, RedactConfig
from mpipeline.errors import ConfigError
from mpipeline.messages import Completed, Failed, Message, Reply, StructuredChunk, TokenChunk
from mpipeline.stages.base import Stage, StageContext
from mpipeline.stages.redact import ENTITIES, CustomPattern, Redactor
from mpipeline.workers._http import read_api_key

# Streams one replica keeps state for. Each ends with its request's Completed or
# Failed; one that never does (its shard died) is dropped, oldest first, past this.
MAX_STREAMS = 65536


class _Stream:
    """What post knows about one request's stream between its chunks."""

    __slots__ = ("capped", "held", "index", "parts", "seen", "sent")

    def __init__(self) -> None:
        self.held = ""  # raw text held back by redaction
        self.index = 0  # of the next chunk sent on
        self.sent = 0  # characters sent on, for the cap
        self.capped = False
        # The stream redacted so far and the raw characters it came from: when they
        # are the whole result, the Completed gets it instead of a second pass.
        self.parts: list[str] = []
        self.seen = 0


class Post(Stage[TokenChunk | Completed | Failed, Message]):
    name = "post"

    def __init__(self, config: PostConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._config = config
        self._cap = config.max_output_chars
        self._streams: dict[str, _Stream] = {}
        self._redactor = _redactor(config.redact, ctx) if config.redact.enabled else None

    def process(self, msg: TokenChunk | Completed | Failed) -> Iterable[Message]:
        kind = type(msg)
        if kind is TokenChunk:
            return self._chunk(msg)  # type: ignore[arg-type]
        if kind is Completed:
            return self._done(msg)  # type: ignore[arg-type]
        return self._other(msg)

    def _chunk(self, msg: TokenChunk) -> Iterable[Message]:
        state = self._streams.get(msg.request_id)
        if state is None:
            state = self._open(msg.request_id)
        text = msg.text
        redactor = self._redactor
        if redactor is not None and text and not state.capped:
            held = state.held
            state.seen += len(text)
            text, state.held = redactor.split(held + text if held else text, len(held))
            if not text:
                return ()
            state.parts.append(text)
        return self._send(state, msg, text)

    def _done(self, msg: Completed) -> Iterable[Message]:
        state = self._streams.pop(msg.request_id, None)
        out = self._flush(state, msg) if state is not None else []
        text = msg.text
        if self._redactor is not None and (not msg.verbatim or self._config.redact.json_output):
            if state is not None and not state.capped and state.seen == len(text):
                text = "".join(state.parts)  # what the client was sent, redacted
            else:  # a stream's redactions were counted as its chunks went by
                text = self._redactor.redact(text, counted=state is None)
        elif msg.verbatim:
            out.append(msg)
            return out
        if self._config.strip:
            text = text.strip()
        finish = msg.finish_reason
        if len(text) > self._cap or (state is not None and state.capped):
            text = text[: self._cap]
            finish = "length"
        if text == msg.text and finish == msg.finish_reason:
            out.append(msg)
        else:
            out.append(msgspec.structs.replace(msg, text=text, finish_reason=finish))
        return out

    def _other(self, msg: Message) -> Iterable[Message]:
        """A structured chunk or an error: after the text held before it."""
        assert isinstance(msg, Reply)
        if type(msg) is StructuredChunk:
            state = self._streams.get(msg.request_id) or self._open(msg.request_id)
            out = self._flush(state, msg)
            state.seen = -1  # its text is in the result, not in the stream
            index = state.index
            state.index += 1
            out.append(msg if index == msg.index else msgspec.structs.replace(msg, index=index))
            return out
        ended = self._streams.pop(msg.request_id, None)
        done = self._flush(ended, msg) if ended is not None else []
        done.append(msg)
        return done

    def _send(self, state: _Stream, msg: Reply, text: str) -> list[Message]:
        """The chunk that carries ``text`` on, within the cap; none past it."""
        if state.capped:
            return []
        room = self._cap - state.sent
        if len(text) > room:
            text = text[:room]
            state.capped = True
            if not text:
                return []
        state.sent += len(text)
        index = state.index
        state.index = index + 1
        if type(msg) is TokenChunk and index == msg.index and text == msg.text:
            return [msg]
        return [
            TokenChunk(
                request_id=msg.request_id,
                session_id=msg.session_id,
                reply_to=msg.reply_to,
                index=index,
                text=text,
            )
        ]

    def _flush(self, state: _Stream, msg: Reply) -> list[Message]:
        """The held tail, redacted as final: the stream ends or is interrupted here."""
        if not state.held or self._redactor is None:
            return []
        text = self._redactor.redact(state.held)
        state.held = ""
        state.parts.append(text)
        return self._send(state, msg, text) if text else []

    def _open(self, request_id: str) -> _Stream:
        streams = self._streams
        if len(streams) >= MAX_STREAMS:
            oldest = next(iter(streams))
            self.ctx.log.warning("dropping the stream state of request %s (unfinished)", oldest)
            del streams[oldest]
        state = streams[request_id] = _Stream()
        return state


def _redactor(cfg: RedactConfig, ctx: StageContext) -> Redactor:
    """The configured redactor, counting into this replica's metrics."""
    if cfg.hash_key_env:
        try:
            secret = read_api_key(cfg.hash_key_env)
        except ConfigError:
            message = f"stages.post.redact.hash_key_env names {cfg.hash_key_env}, which is "
            raise ConfigError(message + "not set, empty or not printable ASCII") from None
        assert secret is not None
        seed = secret.reveal().encode()
    else:
        # The same for every post replica of one run (the run id), new for the next run.
        seed = f"mpipeline redact {ctx.segments}".encode()
    custom = []
    for i, p in enumerate(cfg.patterns):
        try:
            custom.append(CustomPattern(p.name, p.regex, p.action))
        except Exception as exc:  # re.error; the module is redact's business
            where = f"stages.post.redact.patterns[{i}].regex"
            raise ConfigError(f"{where}: {p.regex!r} does not compile: {exc}") from None
    count = None
    writer = ctx.metrics
    if writer is not None:
        cells = writer.cells
        index = {kind: writer.index("redactions", kind) for kind in (*ENTITIES, "custom")}

        def count(kind: str) -> None:
            cells[index[kind]] += 1.0

    return Redactor(
        {e: getattr(cfg, e) for e in ENTITIES},
        custom,
        key=hashlib.blake2b(seed, digest_size=32).digest(),
        count=count,
    )
