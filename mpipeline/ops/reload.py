"""``mpipeline reload``: ask the running supervisor to re-read its config file, and wait.

The command only asks: it signals the supervisor (SIGHUP, after writing a
request file when ``--log-level`` is given) and then waits for the
supervisor's answer in ``reload.json``, an attempt newer than the one it saw
before, and prints it. The supervisor validates and applies (or refuses);
an invalid file changes nothing, and its issues come back here with exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import msgspec

from mpipeline import reloads
from mpipeline.errors import ConfigError, ExitCode, MPipelineError
from mpipeline.rundir import connect, find_run_dir

# How often the command looks for the answer.
POLL_S = 0.05


def render(outcome: reloads.ReloadOutcome) -> str:
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


def parse_setting(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` with VALUE as TOML (``12``, ``0.5``, ``"text"``), else as a string.

    :raises ValueError: without ``=`` or a field name
    """
    field, sep, value = text.partition("=")
    field = field.strip()
    if not sep or not field:
        raise ValueError(f"expected FIELD=VALUE, e.g. gateway.timeout_s=12: {text!r}")
    try:
        return field, tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return field, value.strip()


def exit_code(outcome: reloads.ReloadOutcome) -> int:
    if outcome.state == "applied":
        return int(ExitCode.OK)
    reason = outcome.reason or ""
    if outcome.state == "refused" and reason.startswith((reloads.INVALID, reloads.NOT_LIVE)):
        return int(ExitCode.USAGE)
    return int(ExitCode.FAILURE)


def main(
    run_dir: Path | None,
    config: Path | None,
    *,
    log_level: str | None = None,
    settings: Mapping[str, Any] | None = None,
    timeout_s: float = 60.0,
    as_json: bool = False,
    out: TextIO,
    err: TextIO,
) -> int:
    """0 applied; 2 the file (or a setting) is invalid, or a setting is not live;
    1 refused otherwise, failed, or no answer in time."""
    try:
        where = find_run_dir(run_dir, config)
    except ConfigError as exc:
        err.write(f"mpipeline reload: {reloads.INVALID} (nothing was changed):\n{exc}\n")
        return int(ExitCode.USAGE)
    try:
        outcome = ask(where, log_level=log_level, settings=settings, timeout_s=timeout_s)
    except MPipelineError as exc:
        err.write(f"mpipeline reload: {exc}\n")
        return int(ExitCode.FAILURE)
    text = json.dumps(msgspec.to_builtins(outcome), indent=2) if as_json else render(outcome)
    (out if outcome.state == "applied" else err).write(text + "\n")
    return exit_code(outcome)


def ask(
    run_dir: Path,
    *,
    log_level: str | None = None,
    settings: Mapping[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> reloads.ReloadOutcome:
    """Ask the supervisor of ``run_dir`` to reload and wait for its answer (also the
    entry point for other operator surfaces, such as an MCP ``configure`` tool).

    :raises MPipelineError: when no supervisor runs there, or it gave no answer in time
    """
    with connect(run_dir) as run:
        pid = run.info.pid
    before = reloads.read_outcome(run_dir)
    seen = before.attempt if before is not None else 0
    if log_level is not None or settings:
        request = reloads.ReloadRequest(log_level=log_level, settings=dict(settings or {}))
        reloads.write_request(run_dir, request)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise MPipelineError(f"the supervisor (pid {pid}) is gone") from None
    outcome = _wait(run_dir, seen, timeout_s)
    if outcome is None:
        raise MPipelineError(f"no answer from the supervisor (pid {pid}) in {timeout_s}s")
    return outcome


def _wait(run_dir: Path, seen: int, timeout_s: float) -> reloads.ReloadOutcome | None:
    """The outcome of the first attempt after ``seen`` once it has ended (signals that
    come together are one attempt), or None at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ours = [o for o in reloads.read_outcomes(run_dir) if o.attempt > seen]
        if ours and ours[0].state != "applying":
            return ours[0]
        time.sleep(POLL_S)
    return None
