"""Every exception, error code and exit code of mpipeline, defined once.

Exceptions live here and nowhere else so that callers can catch by family
(``RingError``, ``ConfigError``...) without importing the module that raised,
and so that errors which cross process boundaries travel as an ``ErrorCode``
plus a reason string, never as pickled exception objects.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Protocol


class ExitCode(enum.IntEnum):
    """Process exit codes of the CLI, the supervisor and stage replicas."""

    OK = 0
    FAILURE = 1
    # Bad configuration or command line: nothing was created.
    USAGE = 2
    # A replica failed while booting; the supervisor halts instead of looping
    # (gunicorn's WORKER_BOOT_ERROR).
    BOOT_ERROR = 3
    # Too many restarts within the intensity window: the pipeline gave up.
    FATAL = 4
    # Another supervisor holds the run directory lock.
    ALREADY_RUNNING = 5


class ErrorCode(enum.StrEnum):
    """Machine-readable reason carried by a ``Failed`` message and HTTP errors."""

    INVALID_REQUEST = "invalid_request"
    TOO_LARGE = "too_large"
    RING_FULL = "ring_full"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    STAGE_ERROR = "stage_error"
    STAGE_RESTARTED = "stage_restarted"
    SHUTTING_DOWN = "shutting_down"
    DECODE_ERROR = "decode_error"
    RING_CORRUPTED = "ring_corrupted"
    UPSTREAM_ERROR = "upstream_error"
    # The upstream missed a phase timeout (connect, first token, between tokens, total).
    UPSTREAM_TIMEOUT = "upstream_timeout"
    # The upstream said 429 (or 503 with Retry-After) and retries ran out.
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    CIRCUIT_OPEN = "circuit_open"
    CANCELLED = "cancelled"
    # The client went away before its result: its request was cancelled.
    CLIENT_CANCELLED = "client_cancelled"
    # A result reached a gateway slot whose earlier process (and client) is gone.
    CLIENT_GONE = "client_gone"
    # A stream's reader stopped reading for longer than its stall timeout.
    SLOW_CLIENT = "slow_client"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


class MPipelineError(Exception):
    """Root of every error raised on purpose by mpipeline."""


class ReaderStalled(ConnectionResetError):  # noqa: N818 - reads as what happened
    """A stream's reader took nothing for longer than the stall timeout.

    A ``ConnectionError``, so every writer that handles a client that left
    handles this one too; the gateway also records it as ``slow_client``.
    """


class AlreadyRunning(MPipelineError):  # noqa: N818 - reads as the state found
    """Another supervisor holds the run directory's lock (exit 5)."""


class BootError(MPipelineError):
    """A replica could not get ready; the supervisor must not restart it in a loop (exit 3)."""


class ConfigError(MPipelineError):
    """The configuration file or a command-line setting is invalid.

    ``issues`` lists every problem found in a config file (empty when the error is
    about something else, such as a command-line flag); the message repeats them,
    one per line.
    """

    def __init__(self, message: str, issues: Iterable[ConfigIssue] = ()) -> None:
        super().__init__(message)
        self.issues: list[ConfigIssue] = list(issues)


@dataclasses.dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file: where it is, which field, and what is wrong."""

    file: str
    # 1-based; None when the problem has no place in the text (a missing file).
    line: int | None
    # Dotted path such as "stages.rag.replicas"; "" for the file as a whole.
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return ": ".join(part for part in (where, self.field, self.message) if part)


# Ring errors


class RingError(MPipelineError):
    """Something is wrong with a shared-memory ring or its use."""


class RingFull(RingError, TimeoutError):  # noqa: N818 - named for the state, like anyio's WouldBlock
    """An awaitable ``put`` timed out because the consumer did not make room."""


class RingEmpty(RingError, TimeoutError):  # noqa: N818
    """An awaitable ``get`` timed out with nothing to read."""


class RingClosed(RingError):  # noqa: N818
    """This ring handle was closed; it can no longer be used."""


class RecordTooLarge(RingError, ValueError):  # noqa: N818
    """A record is larger than the ring accepts; nothing was written."""


class RingCorrupted(RingError):  # noqa: N818
    """The segment's header or a record failed validation."""


class RingPoisoned(RingCorrupted):
    """The ring's framing is broken; every later get raises until it is recreated."""


class RingNotFound(RingError, FileNotFoundError):  # noqa: N818
    """No segment of that name exists."""


class PeerGone(RingError):  # noqa: N818
    """The process on the other side of the ring died and none replaced it."""


# Stage and upstream errors


class StageError(MPipelineError):
    """A stage could not process a message."""


class UpstreamError(MPipelineError):
    """A model backend failed (HTTP error, timeout, broken stream).

    ``code`` is what the client sees; ``retry_after_s`` (0: none) becomes its
    Retry-After, so a client backs off as long as the upstream asked us to.
    """

    code: ErrorCode = ErrorCode.UPSTREAM_ERROR
    retry_after_s: float | None = None


class UpstreamFailure(UpstreamError):  # noqa: N818 - one failed attempt, not an error type family
    """One failed attempt, classified for the retry loop and the circuit breaker.

    ``retryable``: another attempt may succeed (5xx, 429, timeouts, a dropped
    connection before the first token); 400/401/403/404 never do.
    ``counts``: the failure says the upstream is unhealthy, so it counts toward
    its circuit (timeouts and connection errors do; a client's bad request and a
    cancelled call do not). ``retry_after_s`` is the server's Retry-After.
    ``code`` is what the client finally sees if no retry succeeds.

    The message must never contain an API key, a header or the request body:
    it reaches logs, the DLQ and the client.
    """

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode = ErrorCode.UPSTREAM_ERROR,
        status: int | None = None,
        retryable: bool = False,
        counts: bool = True,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retryable = retryable
        self.counts = counts
        self.retry_after_s = retry_after_s


# Message errors


class DecodeError(MPipelineError):
    """A ring record is not a valid batch of the messages its edge carries."""


class FailedOutcome(Protocol):
    """What ``RequestFailed`` needs of the ``messages.Failed`` it carries (a
    protocol, so that this module imports nothing of mpipeline's)."""

    @property
    def request_id(self) -> str: ...
    @property
    def code(self) -> ErrorCode: ...
    @property
    def reason(self) -> str: ...
    @property
    def stage(self) -> str: ...
    @property
    def retry_after_s(self) -> float: ...


class RequestFailed(MPipelineError):  # noqa: N818 - reads as an outcome: "request failed"
    """A request ended in an explicit error; ``code``/``stage`` say where and why."""

    def __init__(self, failed: FailedOutcome) -> None:
        super().__init__(f"{failed.code}: {failed.reason} (stage {failed.stage})")
        self.failed = failed
        self.code = failed.code
        self.stage = failed.stage
        self.request_id = failed.request_id
