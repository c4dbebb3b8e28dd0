"""What a reload would change: two configs compared field by field, and how each change applies.

A live reload (``mpipeline reload``, SIGHUP) must never half-apply a file, so
the supervisor first sorts every changed field into one of three ways to
apply it, and refuses the whole reload when any field needs a full restart:

* **live**: the running processes take the new value without a restart
  (the gateway's timeouts and rate limits, the supervisor's own policy);
* **rolling**: the replicas of the named stages are restarted one at a time,
  each drained first, with the listening socket held open by the supervisor
  (every stage table, models and upstreams, a stage's cores);
* **full**: the shape of the run changes (replica counts, ring capacities,
  listen addresses, the run dir): the rings and segments would have to be
  rebuilt, so only a new ``mpipeline run`` can apply it.

Pure: configs in, a ``Plan`` out. The supervisor adds what needs more than
the config to see: the replica specs the topology derives (cores dealt out
by ``"auto"`` move when another stage's cores change) and the set of served
upstreams (which sizes the breaker board and the metrics regions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import msgspec

from mpipeline.config.tables import STAGE_ORDER, PipelineConfig

# Fields only a new run can change: they size or name segments, sockets and slots.
FULL_RESTART = (
    "name",
    "run_dir",
    "metrics.*",
    "supervisor.cpus",
    "supervisor.heartbeat_interval_s",
    "gateway.replicas",
    "gateway.host",
    "gateway.port",
    "gateway.api_clients",
    "gateway.ring_capacity",
    "gateway.auth_token_env",
    "gateway.rate_limit.session_slots",
    "stages.*.replicas",
    "stages.*.ring_capacity",
    "stages.rag.enabled",
)
# Fields the running processes take as they are (see the module docstring).
LIVE = (
    "supervisor.*",
    "gateway.timeout_s",
    "gateway.stream_timeout_s",
    "gateway.stall_timeout_s",
    "gateway.rate_limit.*",
)
# A stage's edge policy is the producer's to apply: its outbox reads the consumer's table.
PRODUCER_SIDE = ("full_policy", "timeout_s")


@dataclass(frozen=True)
class Plan:
    """How a reload applies: every changed field path, sorted into the three ways."""

    changed: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    # Stage (or "gateway") -> the changed fields that make its replicas restart.
    rolling: dict[str, list[str]] = field(default_factory=dict)
    # Field -> why it needs a new run.
    full: dict[str, str] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return bool(self.full)

    def why_refused(self) -> str:
        """One line naming every field that needs a full restart."""
        items = "; ".join(f"{f} ({why})" for f, why in sorted(self.full.items()))
        return f"needs a full restart (stop and `mpipeline run` again): {items}"


def changed_fields(old: PipelineConfig, new: PipelineConfig) -> list[str]:
    """Dotted paths of the fields whose values differ (a list counts as one field)."""
    out: list[str] = []
    _walk(msgspec.to_builtins(old), msgspec.to_builtins(new), "", out)
    return sorted(out)


def _walk(a: Any, b: Any, prefix: str, out: list[str]) -> None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            _walk(a.get(key), b.get(key), f"{prefix}{key}.", out)
    elif a != b:
        out.append(prefix.removesuffix("."))


def plan(old: PipelineConfig, new: PipelineConfig) -> Plan:
    """Sort the changes from ``old`` to ``new`` into live, rolling and full."""
    result = Plan(changed=changed_fields(old, new))
    for path in result.changed:
        if _matches(path, FULL_RESTART):
            result.full[path] = "it sizes the run's processes, rings or sockets"
        elif _matches(path, LIVE):
            result.live.append(path)
        else:
            for stage in _restarted(path, old):
                result.rolling.setdefault(stage, []).append(path)
    _session_table(old, new, result)
    return result


def is_live(path: str) -> bool:
    """True when a change of the field at ``path`` applies without a restart."""
    return _matches(path, LIVE) and not _matches(path, FULL_RESTART)


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(path, p) or fnmatchcase(path, p + ".*") for p in patterns)


def _restarted(path: str, old: PipelineConfig) -> list[str]:
    """The stages whose replicas read ``path`` when they start."""
    parts = path.split(".")
    if parts[0] == "models":
        # The gateway checks requests against the catalog; the shards call the models.
        return ["gateway", "inference"]
    if parts[0] == "gateway":
        return ["gateway"]
    if parts[0] == "stages" and len(parts) > 2 and parts[1] in STAGE_ORDER:
        stage = parts[1]
        out = [stage]
        if parts[2] in PRODUCER_SIDE:
            out.append(_producer_of(stage, old))
        return out
    return ["gateway", *STAGE_ORDER]  # a field this module does not know: restart all


def _producer_of(stage: str, cfg: PipelineConfig) -> str:
    """The stage that writes into ``stage``'s input rings ("gateway" for the first)."""
    order = [s for s in STAGE_ORDER if s != "rag" or cfg.stages.rag.enabled]
    i = order.index(stage) if stage in order else 0
    return order[i - 1] if i > 0 else "gateway"


def _session_table(old: PipelineConfig, new: PipelineConfig, result: Plan) -> None:
    """Rate limits switched on or off make or drop the limiter segment; per-session
    limits switched on or off resize its table: both need a new run."""
    a, b = old.gateway.rate_limit, new.gateway.rate_limit
    flips = {
        "gateway.rate_limit.requests_per_s": (a.enabled != b.enabled, "rate limits on or off"),
        "gateway.rate_limit.session_requests_per_s": (
            (a.session_requests_per_s > 0) != (b.session_requests_per_s > 0),
            "per-session limits on or off",
        ),
    }
    for path, (flipped, what) in flips.items():
        if flipped:
            result.full[path] = f"turning {what} makes the rate limiter anew"
            if path in result.live:
                result.live.remove(path)
