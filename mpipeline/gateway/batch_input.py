"""What comes in for a batch: the multipart upload of ``POST /v1/files``, and its JSONL lines.

The gateway is a hand-written HTTP server with the whole body in memory
(bounded by ``gateway.max_body_bytes``, a 413 past it), so the small
``multipart/form-data`` form the SDKs send (a ``purpose`` field and a
``file``) is parsed with the standard library's ``email`` parser: no new
dependency for two fields.

The input file is checked line by line before any line runs, as OpenAI
does it: a batch whose file has a line that is not JSON, lacks a field,
names another endpoint or repeats a ``custom_id`` fails validation, and its
``errors.data`` names each bad line by number (1-based), so nothing runs
half a file the user would have to pick apart.
"""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass

import msgspec

from mpipeline.gateway.batch_shapes import ENDPOINTS, BatchError, InputLine, StreamFlag
from mpipeline.gateway.schemas import Problem

# OpenAI's own bound on the requests of one batch.
MAX_LINES = 50_000
# Errors named in a failed batch's ``errors.data`` (the rest are counted in the last one).
MAX_ERRORS = 100
MAX_FILENAME = 256

_DECODE_LINE = msgspec.json.Decoder(InputLine)
_DECODE_STREAM = msgspec.json.Decoder(StreamFlag)


@dataclass(frozen=True, slots=True)
class Upload:
    filename: str
    purpose: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Line:
    """A checked input line: what to run, and under which id its outcome is written."""

    custom_id: str
    url: str
    body: bytes


def parse_upload(content_type: str | None, body: bytes) -> Upload | Problem:
    """The ``purpose`` and ``file`` of a ``multipart/form-data`` body."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        return Problem("POST /v1/files takes multipart/form-data with a file and a purpose")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    try:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    except (ValueError, TypeError) as exc:
        return Problem(f"the multipart body could not be parsed: {exc}")
    if not message.is_multipart():
        return Problem("the multipart body has no parts (is the boundary right?)")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        fields[name] = (part.get_filename(), data)
    if "file" not in fields:
        return Problem("the form has no file", field="file")
    if "purpose" not in fields:
        return Problem("the form has no purpose; use purpose=batch", field="purpose")
    purpose = fields["purpose"][1].decode("utf-8", errors="replace").strip()
    if purpose != "batch":
        message_ = f"purpose {purpose[:64]!r} is not supported here; use purpose=batch"
        return Problem(message_, field="purpose")
    filename, data = fields["file"]
    return Upload((filename or "input.jsonl")[:MAX_FILENAME], purpose, data)


def check_lines(data: bytes, endpoint: str) -> list[Line] | list[BatchError]:
    """The file's lines, every one checked; or why it fails (each bad line by number)."""
    lines: list[Line] = []
    errors: list[BatchError] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(lines) >= MAX_LINES:
            errors.append(_error("too_many_requests", f"more than {MAX_LINES} lines", number))
            break
        problem = _check(raw, endpoint, seen)
        if isinstance(problem, BatchError):
            errors.append(msgspec.structs.replace(problem, line=number))
        else:
            seen.add(problem.custom_id)
            lines.append(problem)
    if not lines and not errors:
        errors.append(_error("empty_file", "the input file has no request line", None))
    if errors:
        if len(errors) > MAX_ERRORS:
            more = len(errors) - MAX_ERRORS + 1
            errors = errors[: MAX_ERRORS - 1]
            errors.append(_error("too_many_errors", f"and {more} more bad lines", None))
        return errors
    return lines


def _check(raw: bytes, endpoint: str, seen: set[str]) -> Line | BatchError:
    try:
        line = _DECODE_LINE.decode(raw)
    except msgspec.DecodeError as exc:
        return _error("invalid_json_line", f"the line is not a request: {exc}", None)
    if line.url not in ENDPOINTS:
        served = ", ".join(ENDPOINTS)
        return _error("invalid_url", f"url {line.url[:128]!r} is not served; use one of {served}")
    if line.url != endpoint:
        message = f"url {line.url} is not the batch's endpoint {endpoint}"
        return _error("mismatched_endpoint", message, param="url")
    if line.custom_id in seen:
        message = f"custom_id {line.custom_id!r} is repeated; each line needs its own"
        return _error("duplicate_custom_id", message, param="custom_id")
    body = bytes(line.body)
    if not body.lstrip().startswith(b"{"):
        return _error("invalid_body", "body must be a JSON object", param="body")
    try:
        stream = _DECODE_STREAM.decode(body).stream
    except msgspec.DecodeError as exc:
        return _error("invalid_body", f"body is not valid JSON: {exc}", param="body")
    if stream is True:
        message = "stream is not supported in a batch: each outcome is one output line"
        return _error("invalid_body", message, param="body.stream")
    return Line(line.custom_id, line.url, body)


def _error(
    code: str, message: str, line: int | None = None, *, param: str | None = None
) -> BatchError:
    return BatchError(code=code, message=message, param=param, line=line)
