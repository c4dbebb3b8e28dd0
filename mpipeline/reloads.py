"""The run dir's record of live reconfiguration: the last reload's outcome, and a request.

``mpipeline reload`` and SIGHUP are answered by the supervisor, which is the
only writer of ``reload.json``: its latest attempts, each with its number,
the config version in effect, and what happened (applied live, replicas
restarted, or refused and why). ``mpipeline reload`` waits for the first
attempt after the newest one it saw before signalling (a few are kept, so a
quick second reload cannot hide the first one's end); ``mpipeline status``
and ``/v1/status`` show the latest.

Options a signal cannot carry (``--log-level``, ``--set``) travel in
``reload-request.json``, which the command writes just before the signal and
the supervisor takes (reads and removes) when the signal arrives. Both files
are 0600 in the owner's 0700 run dir, so only the run's user can ask.

``ask`` is the asking side, whole: write the request, signal, wait for the
answer. ``mpipeline reload`` and the MCP ``configure`` tool (served by a
gateway replica, which may not import ``ops``) both call it, so it sits here,
below the gateway. Askers take turns (``reload-ask.lock``): the request file
holds one request, and two written at once would lose one of them silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from mpipeline.errors import MPipelineError
from mpipeline.rundir import connect, open_private, write_atomically

RELOAD_FILE = "reload.json"
REQUEST_FILE = "reload-request.json"
ASK_LOCK = "reload-ask.lock"
# How often an asker looks for the answer (and for its turn).
POLL_S = 0.05
# The outcome's ``state``: still rolling replicas, done, or nothing changed.
Outcome = Literal["applying", "applied", "refused", "failed"]
# Attempts kept in the file.
HISTORY = 8
# How a refusal's reason starts when the request itself is wrong (the command exits 2).
INVALID = "invalid configuration"
NOT_LIVE = "only live settings can be set"


class ReloadOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """``reload.json``: the latest reload attempt of a run, as its supervisor decided it."""

    # Attempts since the run started (one per SIGHUP), and the config version now in effect.
    attempt: int
    version: int
    state: Outcome
    # Wall-clock seconds (time.time) of the decision and of the end of any rolling restart.
    at: float
    done_at: float | None = None
    config: str
    changed: list[str] = []
    live: list[str] = []
    # Replicas restarted (or still to restart, while "applying"), in order.
    restarted: list[str] = []
    reason: str | None = None
    log_level: str | None = None
    # Live fields that ``--set`` put over the file's values, with their values.
    settings: dict[str, Any] = {}


class ReloadLog(msgspec.Struct, frozen=True, kw_only=True):
    """``reload.json``: the latest ``HISTORY`` attempts, oldest first."""

    outcomes: list[ReloadOutcome] = []


class ReloadRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``reload-request.json``: what ``mpipeline reload`` asks beyond re-reading the file."""

    log_level: str | None = None
    # Live fields (dotted path -> value) set over the file for this reload: the next
    # reload re-reads the file without them.
    settings: dict[str, Any] = {}


_ENCODE = msgspec.json.Encoder()
_LOG = msgspec.json.Decoder(ReloadLog)
_REQUEST = msgspec.json.Decoder(ReloadRequest)


def write_outcomes(run_dir: Path, outcomes: list[ReloadOutcome]) -> None:
    """Publish the latest attempts (the last ``HISTORY`` of ``outcomes``)."""
    write_atomically(run_dir / RELOAD_FILE, _ENCODE.encode(ReloadLog(outcomes=outcomes[-HISTORY:])))


def read_outcomes(run_dir: Path) -> list[ReloadOutcome]:
    """The latest attempts, oldest first; empty when the run has had no reload.

    :raises MPipelineError: when the file is unreadable or not a reload log
    """
    try:
        return _LOG.decode((run_dir / RELOAD_FILE).read_bytes()).outcomes
    except FileNotFoundError:
        return []
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MPipelineError(f"cannot read {run_dir / RELOAD_FILE}: {exc}") from None


def read_outcome(run_dir: Path) -> ReloadOutcome | None:
    """The latest attempt, or None when the run has had no reload.

    :raises MPipelineError: when the file is unreadable or not a reload log
    """
    outcomes = read_outcomes(run_dir)
    return outcomes[-1] if outcomes else None


def remove_outcome(run_dir: Path) -> None:
    """Forget the outcome (a new run starts at version 0)."""
    with contextlib.suppress(FileNotFoundError):
        (run_dir / RELOAD_FILE).unlink()


def write_request(run_dir: Path, request: ReloadRequest) -> None:
    write_atomically(run_dir / REQUEST_FILE, _ENCODE.encode(request))


def take_request(run_dir: Path) -> ReloadRequest:
    """The pending request, removed; an empty one when there is none.

    :raises MPipelineError: when the file is not a request (it is removed too)
    """
    path = run_dir / REQUEST_FILE
    try:
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return ReloadRequest()
    try:
        data = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    try:
        return _REQUEST.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MPipelineError(f"bad {REQUEST_FILE}: {exc}") from None


def render(outcome: ReloadOutcome) -> str:
    """The outcome in words: one head line, then what was applied and how."""
    if outcome.state == "refused":
        return (
            f"reload refused (config version stays {outcome.version}): {outcome.reason}\n"
            "nothing was changed"
        )
    if outcome.state == "failed":
        head = f"reload to config version {outcome.version} failed: {outcome.reason}"
    elif not outcome.changed:
        head = f"nothing changed: config version stays {outcome.version}"
    else:
        head = f"config version {outcome.version} applied"
    lines = [head]
    if outcome.live:
        lines.append(f"  live: {', '.join(outcome.live)}")
    if outcome.restarted:
        lines.append(f"  restarted (rolling, drained): {', '.join(outcome.restarted)}")
    if outcome.log_level:
        lines.append(f"  log level: {outcome.log_level}")
    if outcome.settings:
        values = ", ".join(f"{k}={v!r}" for k, v in sorted(outcome.settings.items()))
        lines.append(f"  set over the file until the next reload: {values}")
    return "\n".join(lines)


def ask(
    run_dir: Path,
    *,
    log_level: str | None = None,
    settings: Mapping[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> ReloadOutcome:
    """Ask the supervisor of ``run_dir`` to reload and wait for its answer (blocking:
    an event loop calls it in a thread).

    :raises MPipelineError: when no supervisor runs there, another asker holds the
        turn past ``timeout_s``, or the supervisor gave no answer in time
    """
    deadline = time.monotonic() + timeout_s
    with connect(run_dir) as run:
        pid = run.info.pid
    with _turn(run_dir, deadline):
        before = read_outcome(run_dir)
        seen = before.attempt if before is not None else 0
        if log_level is not None or settings:
            write_request(
                run_dir, ReloadRequest(log_level=log_level, settings=dict(settings or {}))
            )
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            raise MPipelineError(f"the supervisor (pid {pid}) is gone") from None
        outcome = _wait(run_dir, seen, deadline)
    if outcome is None:
        raise MPipelineError(f"no answer from the supervisor (pid {pid}) in {timeout_s}s")
    return outcome


@contextlib.contextmanager
def _turn(run_dir: Path, deadline: float) -> Iterator[None]:
    """This asker's turn: an flock on ``ASK_LOCK``, polled until ``deadline``."""
    fd = open_private(run_dir / ASK_LOCK, os.O_RDWR | os.O_CREAT)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise MPipelineError("another reload is being asked for; try again") from None
                time.sleep(POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def _wait(run_dir: Path, seen: int, deadline: float) -> ReloadOutcome | None:
    """The outcome of the first attempt after ``seen`` once it has ended (signals that
    come together are one attempt), or None at the deadline."""
    while time.monotonic() < deadline:
        ours = [o for o in read_outcomes(run_dir) if o.attempt > seen]
        if ours and ours[0].state != "applying":
            return ours[0]
        time.sleep(POLL_S)
    return None
