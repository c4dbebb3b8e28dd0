"""The MCP ``configure`` tool's parts in-process: which fields it offers (config.diff's
live ones), what it refuses before asking anything, and the HTTP admin check."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import pytest

from mpipeline.config import PipelineConfig
from mpipeline.config.diff import is_live
from mpipeline.gateway.admission import Admission
from mpipeline.gateway.mcp_http import McpHttp
from mpipeline.gateway.mcp_tools import configure
from mpipeline.gateway.mcp_tools.args import BadArgumentsError
from mpipeline.pipeline import Pipeline

ADMIN = "adm1n-Token-value"
NO_PIPELINE = cast(Pipeline, object())


def test_the_offered_fields_are_exactly_the_live_ones() -> None:
    fields = configure.live_fields()
    assert {"gateway.timeout_s", "gateway.rate_limit.burst", "supervisor.drain_timeout_s"} <= set(
        fields
    )
    assert all(is_live(f) for f in fields)
    # Not live: sizes of the run, or read only at a replica's start.
    for fixed in ("gateway.replicas", "gateway.rate_limit.session_slots", "supervisor.cpus"):
        assert fixed not in fields
    settings = configure.schema()["properties"]["settings"]
    assert list(settings["properties"]) == list(fields)
    assert settings["additionalProperties"] is False
    timeout = settings["properties"]["gateway.timeout_s"]
    assert timeout["type"] == "number" and "description" in timeout and "default" not in timeout


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"settings": {"gateway.replicas": 3}}, "`gateway.replicas`): only live settings"),
        ({"settings": {"gateway.rate_limit": {}}}, "`gateway.rate_limit`): no such config"),
        ({"settings": {"supervisor.nope": 1}}, "`supervisor.nope`): no such config field"),
        ({}, "give `settings`, `log_level` or both"),
        ({"log_level": "chatty"}, "`log_level`"),
        ({"settings": {"gateway.timeout_s": 5}, "extra": 1}, "extra"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_asked(
    tmp_path: Path, arguments: dict[str, object], words: str
) -> None:
    # tmp_path has no supervisor: anything that got as far as asking would say so instead.
    with pytest.raises(BadArgumentsError) as refused:
        asyncio.run(configure.configure(tmp_path, arguments))
    assert words in str(refused.value)


def _mcp(admin_env: str | None, environ: dict[str, str]) -> McpHttp:
    admission = Admission.for_gateway(PipelineConfig().gateway.rate_limit, None)
    return McpHttp(
        NO_PIPELINE, admission=admission, max_body=1024, admin_token_env=admin_env, environ=environ
    )


class _Request:
    def __init__(self, authorization: str | None) -> None:
        self.headers = {} if authorization is None else {"authorization": authorization}


def test_over_http_only_the_admin_token_may_configure() -> None:
    mcp = _mcp("ADMIN_ENV", {"ADMIN_ENV": ADMIN})
    assert mcp.admits(f"Bearer {ADMIN}") and mcp._authorize(_Request(f"Bearer {ADMIN}")) is None
    for sent in (None, "Bearer user-token", f"Basic {ADMIN}", f"Bearer {ADMIN}x"):
        assert not mcp.admits(sent)
        refused = mcp._authorize(_Request(sent))
        assert refused is not None and refused.startswith("configure needs admin")
        assert ADMIN not in refused


@pytest.mark.parametrize(
    ("admin_env", "environ", "why"),
    [
        (None, {}, "no admin token is configured"),
        ("ADMIN_ENV", {}, "names ADMIN_ENV, which is not set (or is empty)"),
        ("ADMIN_ENV", {"ADMIN_ENV": ""}, "names ADMIN_ENV, which is not set (or is empty)"),
    ],
)
def test_with_no_admin_token_configure_is_always_refused_saying_how_to_enable_it(
    admin_env: str | None, environ: dict[str, str], why: str
) -> None:
    mcp = _mcp(admin_env, environ)
    assert not mcp.admits("Bearer ") and not mcp.admits(None)
    refused = mcp._authorize(_Request("Bearer anything"))
    assert refused is not None and why in refused
    assert "set gateway.admin_token_env to the NAME of an environment variable" in refused
    assert configure.owner(None) is None  # stdio: the run dir's owner
