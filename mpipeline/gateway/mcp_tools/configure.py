"""``configure``: set live settings of the running pipeline, as ``mpipeline reload --set``.

The call is a reload: the arguments become the reload request, the supervisor
re-reads its file with them over it, validates, applies and answers, and the
tool returns that answer (``reload.json``'s outcome, as ``mpipeline reload
--json`` prints it, with ``render``'s words beside it). Asking is
``reloads.ask``, the command's own code, which sits below the gateway so that a
gateway replica serving ``/mcp`` may call it.

Only fields that apply live are offered: the list is ``config.diff``'s
(``is_live``), walked over the config's own fields, and each field's schema is
the config's (type, bounds, description), so ``tools/list`` shows exactly what
a call may set. A field that is not live, or not a field, is refused here
before anything is asked; a bad value is refused by the supervisor's own
checks, naming the field; either way nothing changes.

Who may call it is the transport's to say (``Authorize``): over stdio, the
run dir's owner (the server runs as that user, the run dir is 0700); over
HTTP, a request bearing the admin token (``gateway.mcp_http``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from mpipeline import reloads
from mpipeline.config import PipelineConfig
from mpipeline.config.diff import is_live
from mpipeline.gateway.mcp_tools.args import Args, BadArgumentsError, input_schema, parse
from mpipeline.gateway.mcp_tools.tools import ToolFailedError

NAME = "configure"
# How long a call waits for the supervisor's answer (gateways acknowledge within 30 s).
TIMEOUT_S = 60.0
LogLevel = Literal["debug", "info", "warning", "error"]
# Whether a call may configure: given the request it came in (the HTTP request over
# /mcp, None over stdio), None to allow it, else why not (the error the agent reads).
Authorize = Callable[[object | None], str | None]


def owner(_: object | None) -> str | None:
    """stdio: the server runs as the run dir's owner, who may reload anyway."""
    return None


class ConfigureArgs(Args, frozen=True):
    """``configure``: live fields to set over the config file, and the log level."""

    settings: Annotated[
        dict[str, Any],
        Meta(
            description="dotted config fields that apply live -> their new values, set over "
            "the config file until the next reload re-reads it"
        ),
    ] = {}
    log_level: Annotated[
        LogLevel | None, Meta(description="also set the log level of every process")
    ] = None


@functools.cache
def live_fields() -> tuple[str, ...]:
    """Every config field that applies live (``config.diff.is_live``), in file order."""
    return tuple(p for p in _paths(msgspec.to_builtins(PipelineConfig()), "") if is_live(p))


def _paths(table: Mapping[str, Any], prefix: str) -> Iterator[str]:
    for key, value in table.items():
        if isinstance(value, Mapping):
            yield from _paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@functools.cache
def schema() -> dict[str, Any]:
    """``ConfigureArgs``' schema, its ``settings`` spelled out field by field from the
    config's own schema (additional properties refused)."""
    out = input_schema(ConfigureArgs)
    (_,), tables = msgspec.json.schema_components([PipelineConfig], ref_template="#/$defs/{name}")
    fields = {path: _field_schema(tables, path) for path in live_fields()}
    out["properties"]["settings"] |= {"properties": fields, "additionalProperties": False}
    return out


def _field_schema(tables: Mapping[str, Any], path: str) -> dict[str, Any]:
    node: dict[str, Any] = tables["PipelineConfig"]
    for part in path.split("."):
        node = node["properties"][part]
        ref = node.get("$ref")
        if ref is not None:
            node = tables[ref.rsplit("/", 1)[-1]]
    # No "default": the running value may differ, and a client may fill defaults in.
    return {k: v for k, v in node.items() if k not in ("title", "default")}


def check(args: ConfigureArgs) -> None:
    """Refuse, naming it, a field that is not one or does not apply live.

    :raises BadArgumentsError: for the first such field
    """
    if not args.settings and args.log_level is None:
        raise BadArgumentsError("invalid arguments: give `settings`, `log_level` or both")
    known = set(live_fields())
    for path in args.settings:
        if path in known:
            continue
        if not _is_field(path):
            raise BadArgumentsError(
                f"invalid arguments (setting `{path}`): no such config field; the live "
                f"fields are {', '.join(live_fields())}"
            )
        raise BadArgumentsError(
            f"invalid arguments (setting `{path}`): {reloads.NOT_LIVE}: it is applied by a "
            "rolling restart or needs a new run (change the config file and run "
            "`mpipeline reload`); nothing was changed"
        )


def _is_field(path: str) -> bool:
    """True for a field of the config (not a table, not a name it does not have)."""
    node: Any = msgspec.to_builtins(PipelineConfig())
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, Mapping)


async def configure(run_dir: Path, arguments: dict[str, Any] | None) -> Any:
    """Reload with ``settings`` over the file; the outcome, or a ``ToolFailedError``
    with the supervisor's reason when it refused (nothing changed) or failed."""
    args = parse(ConfigureArgs, arguments)
    check(args)
    outcome = await asyncio.to_thread(
        reloads.ask,
        run_dir,
        log_level=args.log_level,
        settings=args.settings,
        timeout_s=TIMEOUT_S,
    )
    if outcome.state != "applied":
        raise ToolFailedError(reloads.render(outcome))
    result: dict[str, Any] = msgspec.to_builtins(outcome)
    result["summary"] = reloads.render(outcome)
    return result
