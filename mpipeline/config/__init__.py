"""The pipeline's configuration: load ``pipeline.toml`` and check it, before anything starts.

Everything the supervisor needs to know before it creates a segment or a process
is decided here, so that a bad file fails with exit 2 and every problem named by
field and line (RELIABILITY scenario 32) instead of with a SIGBUS or an EINVAL
from ``cpu_affinity`` halfway through start-up. The tables themselves are in
``tables.py`` (re-exported here); ``_toml.py`` reads TOML errors and writes
the file back; ``_commented.py`` writes the commented default file from the
tables' own texts; ``_files.py`` finds the file a command reads and writes
out the files mpipeline ships.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from mpipeline.config import _toml, groups
from mpipeline.config._base import ENV_NAME
from mpipeline.config._files import (
    CONFIG_ENV,
    DEFAULT_PATH,
    default_toml,
    export,
    locate,
    shipped_files,
    write_new,
)
from mpipeline.config._plan import active_stages, chained, ring_bytes, ring_bytes_total
from mpipeline.config.catalog import Catalog, ServedModel, check_served
from mpipeline.config.tables import *  # noqa: F403 - the tables are this package's API
from mpipeline.config.tables import (
    MIB,
    Cpus,
    PinnedConfig,
    PipelineConfig,
    RagConfig,
)
from mpipeline.config.tables import __all__ as _tables
from mpipeline.errors import ConfigError as ConfigError
from mpipeline.errors import ConfigIssue as ConfigIssue

# /dev/shm must hold this multiple of the rings: headers, alignment, other tenants.
SHM_HEADROOM = 1.2
SHM_DIR = "/dev/shm"
_LOOPBACK_NAMES = ("localhost",)
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# Where an issue is said to be when no file was read, and when an override caused it.
DEFAULTS = "built-in defaults"
COMMAND_LINE = "command line"


# Public helpers


def load(path: Path | None, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read, decode and check a config file (None: the built-in defaults).

    ``overrides`` maps dotted fields (``"gateway.port"``) to values that replace
    the file's, as ``mpipeline run --port`` does; they are checked like the
    file, and their issues are said to come from the command line.

    :raises ConfigError: listing every issue (also in ``.issues``), one per line
    """
    cfg, issues = _check(path, overrides or {})
    if cfg is None or issues:
        raise ConfigError("\n".join(map(str, issues)), issues)
    return cfg


def validate(path: Path | None, overrides: Mapping[str, Any] | None = None) -> list[ConfigIssue]:
    """Every problem with the file at ``path`` (None: the built-in defaults), ordered by
    line; empty when it is valid."""
    return _check(path, overrides or {})[1]


def warnings(cfg: PipelineConfig) -> list[str]:
    """Legal but doubtful settings: oversubscribed cores, an open unauthenticated gateway."""
    out = []
    available = _available_cpus()
    lead = groups.leaders(active_stages(cfg))
    # One entry per process: a placement group's later members run in its first's.
    plan = {
        name: cores
        for name, cores in pinning(cfg, available).items()
        if lead.get(stage := name.rpartition("-")[0], stage) == stage
    }
    wanted = sum(len(cores) for cores in plan.values())
    users: dict[int, list[str]] = {}
    for name, cores in plan.items():
        for core in cores:
            users.setdefault(core, []).append(name)
    shared = [f"{c} ({', '.join(n)})" for c, n in sorted(users.items()) if len(n) > 1]
    if wanted > len(available):
        out.append(
            f"{len(plan)} pinned processes (stage replicas and the gateway/client) want "
            f"{wanted} cores but only {len(available)} are "
            f"available ({_ranges(available)}): they will share cores"
        )
    elif shared:
        out.append("cores shared by several replicas: " + "; ".join(shared))
    env = cfg.gateway.auth_token_env
    if env is None and not _is_loopback(cfg.gateway.host):
        out.append(
            f"gateway listens on {cfg.gateway.host} with no auth_token_env: anyone can use it"
        )
    if env is not None and env not in os.environ:
        out.append(f"gateway.auth_token_env names {env}, which is not set here")
    admin = cfg.gateway.admin_token_env
    if admin is not None and not os.environ.get(admin):
        out.append(
            f"gateway.admin_token_env names {admin}, which is not set (or is empty) here: "
            "the MCP tool configure will be refused over HTTP"
        )
    return out


def json_schema() -> dict[str, Any]:
    """JSON Schema of ``pipeline.toml`` (editors use it for TOML completion too)."""
    return msgspec.json.schema(PipelineConfig)


def dump_toml(cfg: PipelineConfig) -> str:
    """The effective config as TOML; unset optional fields are left out."""
    return _toml.write_toml(msgspec.to_builtins(cfg))


def cpus_for(
    stage_cfg: PinnedConfig, index: int, n_available: list[int], stage_offset: int = 0
) -> list[int]:
    """The cores replica ``index`` is pinned to, sorted.

    A ``cpus`` list is dealt out ``cores_per_replica`` at a time, wrapping around.
    ``"auto"`` deals from ``n_available`` (the affinity mask) the same way, starting
    at ``stage_offset`` so that consecutive stages land on different cores.
    """
    k = stage_cfg.cores_per_replica
    cpus = stage_cfg.cpus
    pool, start = (n_available, stage_offset) if cpus == "auto" else (cpus, 0)
    start += index * k
    return sorted({pool[(start + j) % len(pool)] for j in range(k)})


def pinning(cfg: PipelineConfig, available: list[int] | None = None) -> dict[str, list[int]]:
    """Cores of every replica, by name (``"gateway-0"``, ``"inference-1"``...).

    "auto" stages get consecutive blocks of the affinity mask in flow order. The
    supervisor is not included: ``supervisor.cpus == "auto"`` means unpinned.
    """
    available = _available_cpus() if available is None else available
    plan: dict[str, list[int]] = {}
    offset = 0
    stages = active_stages(cfg)
    lead = groups.leaders(stages)
    sets: list[tuple[str, PinnedConfig]] = [("gateway", cfg.gateway), *stages]
    for name, pinned in sets:
        if lead.get(name, name) != name:  # a group runs on its first stage's cores
            for i in range(pinned.replicas):
                plan[f"{name}-{i}"] = plan[f"{lead[name]}-{i}"]
            continue
        for i in range(pinned.replicas):
            plan[f"{name}-{i}"] = cpus_for(pinned, i, available, offset)
        offset += pinned.replicas * pinned.cores_per_replica
    return plan


# Checks


def _available_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _free_shm_bytes() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None  # no /dev/shm on this OS; creating the segments will tell
    return st.f_bavail * st.f_frsize


def _check(
    path: Path | None, overrides: Mapping[str, Any]
) -> tuple[PipelineConfig | None, list[ConfigIssue]]:
    file = DEFAULTS if path is None else str(path)
    text = ""
    try:
        if path is not None:
            text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [ConfigIssue(file, None, "", "no such file")]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [ConfigIssue(file, None, "", f"cannot read: {exc}")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, message = _toml.syntax_error(text, exc)
        return None, [ConfigIssue(file, line, "", f"TOML syntax: {message}")]
    for field, value in overrides.items():
        _override(data, field.split("."), value)
    problems: list[_toml.Problem] = []
    cfg = _toml.decode_table(PipelineConfig, data, "", problems)
    problems += _semantics(cfg)
    lines = _toml.key_lines(text)
    issues = [
        ConfigIssue(COMMAND_LINE, None, f, m)
        if f in overrides
        else ConfigIssue(file, _toml.line_of(lines, f), f, m)
        for f, m in problems
    ]
    return cfg, sorted(issues, key=lambda i: (i.line is None, i.line or 0))


def _override(data: dict[str, Any], keys: list[str], value: object) -> None:
    """Set ``data[k1][k2]...`` to ``value``, making missing tables; a key that holds
    something else than a table is left alone (decoding reports it)."""
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            return
    data[keys[-1]] = value


def _semantics(cfg: PipelineConfig) -> list[_toml.Problem]:
    """Checks that span fields or depend on this machine."""
    out: list[_toml.Problem] = []
    available = _available_cpus()
    _check_cpus(out, "supervisor", cfg.supervisor.cpus, 1, available)
    pinned: list[tuple[str, PinnedConfig]] = [("gateway", cfg.gateway)]
    pinned += [(f"stages.{name}", s) for name, s in active_stages(cfg)]
    for path, p in pinned:
        _check_cpus(out, path, p.cpus, p.cores_per_replica, available)
    for path, host in (("gateway.host", cfg.gateway.host), ("metrics.host", cfg.metrics.host)):
        if not _valid_host(host):
            out.append((path, f"{host!r} is neither an IP address nor a hostname"))
    if cfg.metrics.enabled and cfg.metrics.port == cfg.gateway.port != 0:
        out.append(("metrics.port", f"is the same as gateway.port ({cfg.gateway.port})"))
    for path, env in (
        ("gateway.auth_token_env", cfg.gateway.auth_token_env),
        ("gateway.admin_token_env", cfg.gateway.admin_token_env),
    ):
        if env is not None and not ENV_NAME.fullmatch(env):
            # Never echo it: someone may have pasted the token itself here.
            out.append((path, "must be the NAME of an environment variable"))
    out += check_served(cfg)
    out += groups.check(cfg, active_stages(cfg))
    if cfg.stages.rag.enabled:
        out += _check_rag(cfg.stages.rag)
    slots = cfg.gateway.rate_limit.session_slots
    if slots & (slots - 1):
        out.append(("gateway.rate_limit.session_slots", f"{slots} is not a power of two"))
    sup = cfg.supervisor
    if sup.backoff_initial_s > sup.backoff_max_s:
        out.append(("supervisor.backoff_max_s", "must be >= backoff_initial_s"))
    if sup.liveness_timeout_s <= sup.heartbeat_interval_s:
        out.append(("supervisor.liveness_timeout_s", "must be > heartbeat_interval_s"))
    by_stage = ring_bytes(cfg)
    need = sum(by_stage.values())
    free = _free_shm_bytes()
    if free is not None and need * SHM_HEADROOM > free:
        top = max(by_stage, key=by_stage.__getitem__)
        field = "gateway.ring_capacity" if top == "gateway" else f"stages.{top}.ring_capacity"
        message = (
            f"rings need {_mib(need)} (x{SHM_HEADROOM} = {_mib(need * SHM_HEADROOM)}) but "
            f"{SHM_DIR} has {_mib(free)} free; the largest share is {top}'s "
            f"({_mib(by_stage[top])}). Shrink rings or replicas, or grow {SHM_DIR} "
            "(docker run --shm-size)"
        )
        out.append((field, message))
    return out


def _check_rag(rag: RagConfig) -> list[_toml.Problem]:
    """The documents folder exists and holds a corpus file: found now, not as a boot
    error of every rag replica (the retriever checks again when it loads)."""
    out: list[_toml.Problem] = []
    if rag.chunk_overlap >= rag.chunk_tokens:
        out.append(("stages.rag.chunk_overlap", f"must be < chunk_tokens ({rag.chunk_tokens})"))
    if rag.documents is None:
        return out
    folder = Path(rag.documents).expanduser()
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        out.append(("stages.rag.documents", f"{folder} {what}"))
    elif not any(p.suffix in (".txt", ".md") and p.is_file() for p in folder.rglob("*")):
        out.append(("stages.rag.documents", f"{folder} holds no .txt or .md file"))
    return out


def _check_cpus(
    out: list[_toml.Problem], path: str, cpus: Cpus, k: int, available: list[int]
) -> None:
    if cpus == "auto":
        if k > len(available):
            message = f"is {k} but only {_ranges(available)} are available"
            out.append((f"{path}.cores_per_replica", message))
        return
    if not cpus:
        out.append((f"{path}.cpus", 'must list at least one core (or be "auto")'))
        return
    twice = sorted({c for c in cpus if cpus.count(c) > 1})
    if twice:
        out.append((f"{path}.cpus", f"lists {_ranges(twice)} more than once"))
    outside = sorted(set(cpus) - set(available))
    if outside:
        message = f"{_ranges(outside)} outside the CPU affinity (allowed: {_ranges(available)})"
        out.append((f"{path}.cpus", message))
    if k > len(set(cpus)):
        out.append((f"{path}.cores_per_replica", f"is {k} but cpus lists {len(set(cpus))}"))


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        return (
            len(host) <= 253
            and all(_HOST_LABEL.fullmatch(label) for label in labels)
            and not labels[-1].isdigit()
        )
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in _LOOPBACK_NAMES


def _ranges(cores: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``, the way taskset and cpusets write them."""
    spans: list[list[int]] = []
    for c in cores:
        if spans and spans[-1][1] == c - 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


__all__ = [
    *_tables,
    "COMMAND_LINE",
    "Catalog",
    "CONFIG_ENV",
    "ConfigError",
    "ConfigIssue",
    "DEFAULTS",
    "DEFAULT_PATH",
    "ServedModel",
    "active_stages",
    "chained",
    "cpus_for",
    "default_toml",
    "dump_toml",
    "export",
    "json_schema",
    "load",
    "locate",
    "pinning",
    "ring_bytes",
    "ring_bytes_total",
    "shipped_files",
    "validate",
    "warnings",
    "write_new",
]
