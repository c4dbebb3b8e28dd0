"""Live reconfiguration's parts, in-process: the plan of a change, the control block's
config words, the run-dir files, the rate limiter's new limits and the command's words."""

from __future__ import annotations

import secrets
from pathlib import Path

import msgspec
import pytest

from mpipeline import _shm, reloads
from mpipeline.config import ModelConfig, PipelineConfig, RateLimitConfig
from mpipeline.config.diff import changed_fields, is_live, plan
from mpipeline.control import ControlBlock
from mpipeline.errors import ExitCode, MPipelineError
from mpipeline.gateway.ratelimit import RateLimiter
from mpipeline.ops.reload import exit_code, parse_setting, render
from tests.integration.conftest import with_field


def _with(**fields: object) -> PipelineConfig:
    cfg = PipelineConfig()
    for dotted, value in fields.items():
        cfg = with_field(cfg, dotted.replace("__", "."), value)
    return cfg


def test_an_unchanged_config_plans_nothing() -> None:
    p = plan(PipelineConfig(), PipelineConfig())
    assert (p.changed, p.live, p.rolling, p.full) == ([], [], {}, {})
    assert not p.refused


def test_changed_fields_are_dotted_paths_and_lists_count_once() -> None:
    new = _with(gateway__timeout_s=5.0, stages__rag__top_k=7)
    assert changed_fields(PipelineConfig(), new) == ["gateway.timeout_s", "stages.rag.top_k"]


def test_gateway_timeouts_and_rate_limits_are_live() -> None:
    new = _with(
        gateway__timeout_s=5.0,
        gateway__stall_timeout_s=9.0,
        supervisor__drain_timeout_s=3.0,
    )
    p = plan(PipelineConfig(), new)
    assert sorted(p.live) == [
        "gateway.stall_timeout_s",
        "gateway.timeout_s",
        "supervisor.drain_timeout_s",
    ]
    assert p.rolling == {} and not p.refused
    limited = _with(gateway__rate_limit__requests_per_s=10.0)
    tighter = _with(gateway__rate_limit__requests_per_s=2.0, gateway__rate_limit__burst=1)
    assert plan(limited, tighter).live == [
        "gateway.rate_limit.burst",
        "gateway.rate_limit.requests_per_s",
    ]


def test_a_stage_table_restarts_that_stage_and_an_edge_policy_its_producer_too() -> None:
    p = plan(PipelineConfig(), _with(stages__post__max_output_chars=10))
    assert p.rolling == {"post": ["stages.post.max_output_chars"]}
    p = plan(PipelineConfig(), _with(stages__post__full_policy="shed"))
    assert set(p.rolling) == {"post", "inference"}
    p = plan(PipelineConfig(), _with(stages__assemble__timeout_s=3.0))
    assert set(p.rolling) == {"assemble", "rag"}
    # With rag off, assemble's producer is the gateway.
    off = _with(stages__rag__enabled=False)
    p = plan(off, with_field(off, "stages.assemble.timeout_s", 3.0))
    assert set(p.rolling) == {"assemble", "gateway"}


def test_models_restart_the_gateway_and_the_shards() -> None:
    p = plan(PipelineConfig(), _with(stages__inference__echo__max_tokens=3))
    assert p.rolling == {"inference": ["stages.inference.echo.max_tokens"]}
    p = plan(PipelineConfig(), _with(models=[ModelConfig(name="echo-a", worker="echo")]))
    assert p.rolling == {"gateway": ["models"], "inference": ["models"]}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stages.inference.replicas", 3),
        ("stages.post.ring_capacity", 3 << 20),
        ("gateway.port", 9999),
        ("gateway.replicas", 2),
        ("metrics.port", 9999),
        ("run_dir", "/elsewhere"),
    ],
)
def test_fields_that_size_the_run_are_refused_by_name(field: str, value: object) -> None:
    p = plan(PipelineConfig(), with_field(PipelineConfig(), field, value))
    assert p.refused
    assert field in p.full
    assert field in p.why_refused() and "full restart" in p.why_refused()


def test_switching_rate_limits_on_or_off_is_refused() -> None:
    on = _with(gateway__rate_limit__requests_per_s=5.0)
    assert "gateway.rate_limit.requests_per_s" in plan(PipelineConfig(), on).full
    sessions = _with(gateway__rate_limit__session_requests_per_s=1.0)
    p = plan(on, msgspec_merge(on, sessions))
    assert "gateway.rate_limit.session_requests_per_s" in p.full
    assert "gateway.rate_limit.session_requests_per_s" not in p.live


def msgspec_merge(a: PipelineConfig, b: PipelineConfig) -> PipelineConfig:
    """``a`` with ``b``'s per-session rate."""
    rate = b.gateway.rate_limit.session_requests_per_s
    merged: PipelineConfig = with_field(a, "gateway.rate_limit.session_requests_per_s", rate)
    return merged


def test_only_live_fields_can_be_set_over_the_file() -> None:
    assert is_live("gateway.timeout_s")
    assert is_live("gateway.rate_limit.burst")
    assert is_live("supervisor.restart_intensity")
    assert not is_live("supervisor.cpus")
    assert not is_live("gateway.port")
    assert not is_live("stages.post.max_output_chars")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("gateway.timeout_s=12", ("gateway.timeout_s", 12)),
        ("gateway.rate_limit.burst = 0.5", ("gateway.rate_limit.burst", 0.5)),
        ('a.b="x y"', ("a.b", "x y")),
        ("a.b=plain words", ("a.b", "plain words")),
    ],
)
def test_settings_parse_as_toml_values(text: str, parsed: tuple[str, object]) -> None:
    assert parse_setting(text) == parsed


@pytest.mark.parametrize("text", ["gateway.timeout_s", "=3"])
def test_a_setting_needs_a_field_and_a_value(text: str) -> None:
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_setting(text)


def test_control_block_config_words() -> None:
    ctl = ControlBlock.create(f"{_shm.PREFIX}t{secrets.token_hex(4)}-control", 3, 2)
    try:
        assert (ctl.config_version, ctl.log_level) == (0, 0)
        assert [ctl.config_applied(s) for s in range(3)] == [0, 0, 0]
        ctl.config_version = 4
        ctl.log_level = 10
        ctl.apply_config(2, 4)
        assert (ctl.config_version, ctl.log_level) == (4, 10)
        assert [ctl.config_applied(s) for s in range(3)] == [0, 0, 4]
        # The last client's pause board is untouched by the config words after it.
        assert ctl.pauses(1) == 0
        with pytest.raises(IndexError):
            ctl.apply_config(3, 1)
    finally:
        ctl.close()
        ctl.unlink()


def test_outcome_and_request_files_round_trip(tmp_run_dir: Path) -> None:
    assert reloads.read_outcome(tmp_run_dir) is None
    outcome = reloads.ReloadOutcome(
        attempt=2, version=1, state="applied", at=1.0, config="/x.toml", live=["a.b"]
    )
    reloads.write_outcomes(tmp_run_dir, [outcome])
    assert reloads.read_outcome(tmp_run_dir) == outcome
    many = [msgspec.structs.replace(outcome, attempt=n) for n in range(1, 20)]
    reloads.write_outcomes(tmp_run_dir, many)
    kept = reloads.read_outcomes(tmp_run_dir)
    assert [o.attempt for o in kept] == list(range(20 - reloads.HISTORY, 20))
    assert (tmp_run_dir / reloads.RELOAD_FILE).stat().st_mode & 0o777 == 0o600
    assert reloads.take_request(tmp_run_dir) == reloads.ReloadRequest()
    reloads.write_request(tmp_run_dir, reloads.ReloadRequest(log_level="debug"))
    assert reloads.take_request(tmp_run_dir).log_level == "debug"
    assert not (tmp_run_dir / reloads.REQUEST_FILE).exists()
    (tmp_run_dir / reloads.REQUEST_FILE).write_text('{"log_level": 3}')
    with pytest.raises(MPipelineError, match="bad reload-request.json"):
        reloads.take_request(tmp_run_dir)
    assert not (tmp_run_dir / reloads.REQUEST_FILE).exists()


def test_new_limits_reach_every_view_of_the_buckets() -> None:
    name = f"{_shm.PREFIX}t{secrets.token_hex(4)}-ratelimit"
    owner = RateLimiter.create(name, RateLimitConfig(requests_per_s=1000.0, burst=1000))
    replica = RateLimiter.attach(name)
    try:
        assert all(replica.acquire(None, now=0.0) == 0.0 for _ in range(5))
        owner.set_limits(RateLimitConfig(requests_per_s=1.0, burst=2))
        # Tokens are capped at the new burst once the replica takes the limits.
        replica.refresh()
        assert replica.acquire(None, now=0.0) == 0.0
        assert replica.acquire(None, now=0.0) == 0.0
        assert replica.acquire(None, now=0.0) > 0.0
    finally:
        replica.close()
        owner.close()
        owner.unlink()


def test_the_command_says_what_happened_and_exits_accordingly() -> None:
    base = reloads.ReloadOutcome(attempt=1, version=2, state="applied", at=0.0, config="c")
    applied = reloads.ReloadOutcome(
        attempt=1,
        version=2,
        state="applied",
        at=0.0,
        config="c",
        changed=["gateway.timeout_s", "stages.post.strip"],
        live=["gateway.timeout_s"],
        restarted=["post-0"],
    )
    assert render(applied).splitlines() == [
        "config version 2 applied",
        "  live: gateway.timeout_s",
        "  restarted (rolling, drained): post-0",
    ]
    assert exit_code(applied) == ExitCode.OK
    assert render(base) == "nothing changed: config version stays 2"
    invalid = reloads.ReloadOutcome(
        attempt=1, version=2, state="refused", at=0.0, config="c", reason="invalid configuration:"
    )
    assert exit_code(invalid) == ExitCode.USAGE
    assert "nothing was changed" in render(invalid)
    full = reloads.ReloadOutcome(
        attempt=1, version=2, state="refused", at=0.0, config="c", reason="needs a full restart"
    )
    assert exit_code(full) == ExitCode.FAILURE
    not_live = msgspec.structs.replace(full, reason=reloads.NOT_LIVE + "; not x")
    assert exit_code(not_live) == ExitCode.USAGE
    assert "set over the file until the next reload: a.b=3" in render(
        msgspec.structs.replace(applied, settings={"a.b": 3})
    )
