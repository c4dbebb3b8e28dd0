"""Logging setup: the one call every mpipeline process makes before it logs.

The supervisor and each replica are separate interpreters (``spawn``), so
each configures its own root logger; doing it here means they all write the
same two formats, stamp every record with the process's stage and replica,
keep httpx/httpcore/websockets quiet, and redact secrets the same way.

Text is for people: ``TIME LEVEL replica[pid] logger: message request_id=...``.
JSON lines are for log shippers: one object per record (keys in
:class:`JsonFormatter`), chosen with ``mpipeline run --log-format json`` or
``MPIPELINE_LOG_FORMAT=json``. The CLI puts its choice in that variable
before the supervisor spawns anything, so children (which inherit the
environment) log the same way without a new spawn argument.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, TextIO

import msgspec

# Read by every process; the CLI sets it from --log-format before spawning.
FORMAT_ENV = "MPIPELINE_LOG_FORMAT"
FORMATS = ("auto", "text", "json")
# Environment variables whose values are secrets, by the end of their name.
SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET")
# Shorter values ("1", "true", "dev") would blank out ordinary words.
MIN_SECRET_LEN = 8
REDACTED = "[redacted]"
# httpx and httpcore log request URLs at INFO and DEBUG (an upstream URL may
# carry a key in its query); websockets logs every connection at INFO.
QUIET_LOGGERS = ("httpx", "httpcore", "websockets")
# Attributes every LogRecord has, plus what formatters and our filter add:
# anything else on a record came from ``extra=`` and goes into the JSON.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "stage",
    "replica",
    "request_id",
}
# What msgspec raises for a value enc_hook=repr cannot save (a cycle, a huge int).
_ENCODE_ERRORS = (msgspec.EncodeError, TypeError, ValueError, OverflowError, RecursionError)
_JSON_KEYS = frozenset({"ts", "level", "logger", "msg", "pid", "stage", "replica", "exc", "stack"})

Redact = Callable[[str], str]


def resolve(fmt: str, environ: Mapping[str, str] = os.environ) -> str:
    """``"text"`` or ``"json"`` for a ``--log-format`` value.

    ``auto`` defers to :data:`FORMAT_ENV` and is otherwise text, even when
    stderr is not a terminal: output redirected to a file, piped through
    ``tee``, or captured by a ``Pipeline`` object into its error messages is
    still read by people, and a format that changed with where stderr points
    would surprise them. A log shipper asks for JSON explicitly. An unknown
    value also means text: logging setup must never stop a process booting.
    """
    if fmt == "auto":
        fmt = environ.get(FORMAT_ENV, "auto")
    return "json" if fmt.strip().lower() == "json" else "text"


def secrets_from(environ: Mapping[str, str]) -> frozenset[str]:
    """Values of ``*_KEY``, ``*_TOKEN`` and ``*_SECRET`` variables long enough to matter."""
    return frozenset(
        value
        for name, value in environ.items()
        if name.upper().endswith(SECRET_SUFFIXES) and len(value) >= MIN_SECRET_LEN
    )


def redactor(secrets: Collection[str]) -> Redact:
    """A function that replaces every secret in a string by :data:`REDACTED`.

    Built once per process: one compiled alternation (longest first, so a
    secret that contains another goes whole), or the identity when there is
    nothing to hide. Each secret is also matched as JSON escapes it, since
    the JSON format redacts its encoded line.
    """
    forms = set(secrets)
    forms.update(msgspec.json.encode(s).decode()[1:-1] for s in secrets)
    if not forms:
        return _same
    pattern = re.compile("|".join(re.escape(s) for s in sorted(forms, key=len, reverse=True)))
    return lambda text: pattern.sub(REDACTED, text)


def _same(text: str) -> str:
    return text


class ProcessFilter(logging.Filter):
    """Stamps every record the handler sees with this process's stage and replica.

    On the handler rather than a logger, so records propagated from every
    logger in the process get it. The process's identity always wins: a
    record about another replica names that one in its message.
    """

    def __init__(self, stage: str | None, replica: str | None) -> None:
        super().__init__()
        self.stage = stage
        self.replica = replica

    def filter(self, record: logging.LogRecord) -> bool:
        record.stage = self.stage
        record.replica = self.replica
        return True


class TextFormatter(logging.Formatter):
    """Today's human format, with `` request_id=...`` when the record has one."""

    def __init__(self, label: str, redact: Redact = _same) -> None:
        label = label.replace("%", "%%")
        super().__init__(f"%(asctime)s %(levelname)s {label}[%(process)d] %(name)s: %(message)s")
        self._redact = redact

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return line if request_id is None else f"{line} request_id={request_id}"

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line.

    Keys: ``ts`` (RFC 3339 UTC, milliseconds), ``level``, ``logger``, ``msg``
    (the formatted message), ``pid``, ``stage``, ``replica`` (null in the
    supervisor), ``request_id`` when the record has one, ``exc`` and
    ``stack`` when it has them, then any other ``extra=`` fields (those that
    would shadow one of these keys are dropped). A value JSON cannot hold is
    written as its ``repr``, so a careless ``extra=`` never loses the record.
    """

    def __init__(self, redact: Redact = _same) -> None:
        super().__init__()
        self._redact = redact
        self._encode = msgspec.json.Encoder(enc_hook=repr).encode

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _rfc3339(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
            "stage": getattr(record, "stage", None),
            "replica": getattr(record, "replica", None),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            out["request_id"] = request_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        out.update(
            (key, value)
            for key, value in vars(record).items()
            if key not in _RECORD_ATTRS and key not in _JSON_KEYS and not key.startswith("_")
        )
        try:
            line = self._encode(out)
        except _ENCODE_ERRORS:  # enc_hook covers odd types; not a self-referencing dict
            line = self._encode({k: self._safe(v) for k, v in out.items()})
        return self._redact(line.decode())

    def _safe(self, value: object) -> object:
        try:
            self._encode(value)
        except _ENCODE_ERRORS:
            return repr(value)
        return value


def _rfc3339(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class _Handler(logging.StreamHandler[TextIO]):
    """Ours, so a second :func:`setup` replaces it instead of doubling every line."""


def build_handler(
    fmt: str,
    *,
    stage: str | None,
    replica: str | None,
    stream: TextIO | None = None,
    environ: Mapping[str, str] = os.environ,
) -> logging.Handler:
    """The handler :func:`setup` installs: format, process stamp and redaction."""
    redact = redactor(secrets_from(environ))
    formatter: logging.Formatter
    if resolve(fmt, environ) == "json":
        formatter = JsonFormatter(redact)
    else:
        formatter = TextFormatter(replica or stage or "mpipeline", redact)
    handler = _Handler(sys.stderr if stream is None else stream)
    handler.addFilter(ProcessFilter(stage, replica))
    handler.setFormatter(formatter)
    return handler


def setup(
    level: int,
    fmt: str,
    *,
    stage: str | None,
    replica: str | None,
    stream: TextIO | None = None,
) -> None:
    """Send this process's log records to stderr as ``fmt`` ("auto", "text" or "json").

    ``stage``/``replica`` name the process ("inference"/"inference-0"; the
    supervisor is "supervisor"/None). Replaces a handler an earlier call
    installed; leaves other handlers (pytest's) alone. Secrets are read from
    the environment now, once: variables set later are not redacted.
    """
    handler = build_handler(fmt, stage=stage, replica=replica, stream=stream)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    wanted = os.environ.get(FORMAT_ENV, "auto") if fmt == "auto" else fmt
    if wanted.strip().lower() not in FORMATS:
        logging.getLogger(__name__).warning("unknown log format %r: using text", wanted)
