"""``mpipeline reload``: ask the running supervisor to re-read its config file, and wait.

The command only asks: it signals the supervisor (SIGHUP, after writing a
request file when ``--log-level`` is given) and then waits for the
supervisor's answer in ``reload.json``, an attempt newer than the one it saw
before, and prints it. The supervisor validates and applies (or refuses);
an invalid file changes nothing, and its issues come back here with exit 2.
Asking and the words of the answer are ``reloads.ask`` and ``reloads.render``,
shared with the MCP ``configure`` tool, which answers the same way.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import msgspec

from mpipeline import reloads
from mpipeline.errors import ConfigError, ExitCode, MPipelineError
from mpipeline.reloads import render
from mpipeline.rundir import find_run_dir

__all__ = ["exit_code", "main", "parse_setting", "render"]


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
        outcome = reloads.ask(where, log_level=log_level, settings=settings, timeout_s=timeout_s)
    except MPipelineError as exc:
        err.write(f"mpipeline reload: {exc}\n")
        return int(ExitCode.FAILURE)
    text = json.dumps(msgspec.to_builtins(outcome), indent=2) if as_json else render(outcome)
    (out if outcome.state == "applied" else err).write(text + "\n")
    return exit_code(outcome)
