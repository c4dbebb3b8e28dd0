"""``mpipeline mcp`` over stdio, driven by the MCP SDK's own client (issue 18 item 1).

A real supervisor (echo model; assemble fails prompts with POISON in them) and
the server as an agent starts it: ``stdio_client`` spawns ``mpipeline mcp
--config FILE`` and ``ClientSession`` speaks MCP to it. The run has a single
API client slot, so the server's own attachment is the only one: a DLQ replay
must go through it, and the slot must be free again once the server has exited.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import mcp_types as types
import psutil
import pytest
from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client

from mpipeline.dlq import DLQ_FILE, DeadLetter, DeadLetterQueue, RequestPayload
from mpipeline.pipeline import Pipeline
from tests.integration._mcp import CALL_TIMEOUT_S, call, check_infer, error, ok
from tests.integration.conftest import SupervisorFactory, faults_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOOLS = {"infer", "batch_infer", "pipeline_status", "dlq_list", "dlq_replay", "configure"}
CONFIG = {
    "gateway.api_clients": 1,
    # A few ms per token: an infer streams its words one chunk at a time.
    "stages.inference.echo.token_delay_ms": 5.0,
}
DETACHED = "mpipeline mcp: the client closed the connection"


def _server(config: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "mpipeline", "mcp", "--config", str(config)]
    )


async def _cli(*argv: str) -> str:
    """What ``mpipeline ARGV`` prints (it must succeed), run beside the session."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mpipeline", *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), CALL_TIMEOUT_S)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def _mcp_children() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "mcp" in child.cmdline():
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_tools_and_resources_over_stdio(start_supervisor: SupervisorFactory) -> None:
    sp = start_supervisor(CONFIG, env=faults_env("assemble:raise_on=POISON"))
    errlog = sp.run_dir.parent / "mcp-stderr.log"

    async def session() -> None:
        with errlog.open("w") as err:
            async with (
                stdio_client(_server(sp.config_path), errlog=err) as (read, write),
                ClientSession(read, write) as s,
            ):
                await s.initialize()
                await _tools_listed(s)
                await _infer(s)
                await _batch(s)
                await _status(s, sp.run_dir)
                await _bad_arguments(s)
                await _dlq(s, sp.run_dir)
                await _resources(s, sp.config_path)
                await _configure(s, sp.run_dir)

    asyncio.run(session())
    # The server left on its own when its stdin closed (not killed by the client's
    # grace timer), and took nothing with it: no process, and its client slot is free.
    assert DETACHED in errlog.read_text()
    assert _mcp_children() == []

    async def attach_again() -> str:
        async with Pipeline.attach(sp.run_dir) as p:
            return (await p.submit("slot free")).text

    assert asyncio.run(attach_again()) == "slot free"


async def _tools_listed(s: ClientSession) -> None:
    tools = {t.name: t for t in (await s.list_tools()).tools}
    assert set(tools) == TOOLS
    infer = tools["infer"].input_schema
    assert infer["type"] == "object" and infer["required"] == ["prompt"]
    assert infer["additionalProperties"] is False
    assert infer["properties"]["max_tokens"]["anyOf"][0]["minimum"] == 1
    batch = tools["batch_infer"].input_schema["properties"]
    assert batch["concurrency"]["maximum"] == 16 and batch["prompts"]["maxItems"] == 256


async def _infer(s: ClientSession) -> None:
    done = await check_infer(s)
    assert done["citations"] == []


async def _batch(s: ClientSession) -> None:
    prompts = ["first", "", "POISON second", "third words", "fourth"]
    out = ok(await call(s, "batch_infer", {"prompts": prompts, "concurrency": 2}))
    results = out["results"]
    assert [r["index"] for r in results] == list(range(len(prompts)))
    assert [r["ok"] for r in results] == [True, False, False, True, True]
    assert [r["text"] for r in results if r["ok"]] == ["first", "third words", "fourth"]
    assert results[1]["error"]["type"] == "invalid_request"
    assert "prompt" in results[1]["error"]["message"]
    assert results[2]["error"]["type"] == "stage_error"
    assert "assemble" in results[2]["error"]["message"]
    assert (out["completed"], out["failed"]) == (3, 2)


async def _status(s: ClientSession, run_dir: Path) -> None:
    status = ok(await call(s, "pipeline_status", {}))
    expected = json.loads(await _cli("status", "--json", "--run-dir", str(run_dir)))

    def replicas(snap: dict[str, Any]) -> list[tuple[str, int, str]]:
        return [(r["name"], r["pid"], r["state"]) for r in snap["replicas"]]

    assert replicas(status) == replicas(expected)
    assert status["run_id"] == expected["run_id"] and status["state"] == "RUNNING"


async def _configure(s: ClientSession, run_dir: Path) -> None:
    """Over stdio the run dir's owner may configure: a live field applies, with the
    outcome ``mpipeline reload --json`` would print; anything else changes nothing."""
    settings = {"gateway.stall_timeout_s": 12.5, "supervisor.drain_timeout_s": 7}
    done = ok(await call(s, "configure", {"settings": settings, "log_level": "info"}))
    assert (done["state"], done["version"]) == ("applied", 1)
    assert done["live"] == sorted(settings) and done["restarted"] == []
    assert done["settings"] == settings and done["log_level"] == "info"
    status = json.loads(await _cli("status", "--json", "--run-dir", str(run_dir)))
    assert status["config_version"] == 1 and status["reload"]["attempt"] == done["attempt"]
    # The effective config resource is the new version's.
    config = (await s.read_resource("mpipeline://config/effective")).contents[0]
    assert isinstance(config, types.TextResourceContents)
    assert "stall_timeout_s = 12.5" in config.text and "drain_timeout_s = 7.0" in config.text
    for bad, words in (
        ({"settings": {"stages.inference.replicas": 2}}, "`stages.inference.replicas`"),
        ({"settings": {"gateway.timout_s": 2}}, "`gateway.timout_s`): no such config field"),
        ({"settings": {"gateway.stall_timeout_s": "lots"}}, "gateway.stall_timeout_s"),
        ({"log_level": "loud"}, "`log_level`"),
        ({}, "give `settings`, `log_level` or both"),
    ):
        assert words in error(await call(s, "configure", bad)), bad
    status = json.loads(await _cli("status", "--json", "--run-dir", str(run_dir)))
    assert status["config_version"] == 1


async def _bad_arguments(s: ClientSession) -> None:
    text = error(await call(s, "infer", {"prompt": "x", "max_tokens": 0}))
    assert "`max_tokens`" in text and ">= 1" in text
    assert "`prompt`" in error(await call(s, "infer", {"session_id": "a"}))
    assert "tempreature" in error(await call(s, "infer", {"prompt": "x", "tempreature": 1}))
    assert "`concurrency`" in error(
        await call(s, "batch_infer", {"prompts": ["a"], "concurrency": 99})
    )
    assert "no tool 'infre'" in error(await call(s, "infre", {"prompt": "x"}))
    assert "`since`" in error(await call(s, "dlq_list", {"since": "yesterday-ish"}))
    # A request the pipeline fails is an error result naming the code and the stage.
    text = error(await call(s, "infer", {"prompt": "POISON pill"}))
    assert text.startswith("stage_error in assemble") and "request " in text


async def _dlq(s: ClientSession, run_dir: Path) -> None:
    path = run_dir / DLQ_FILE
    letter = DeadLetter(
        id="dead-1",
        ts=1.0,
        reason="ring_full",
        stage="rag",
        message="ring_full:rag0-assemble0",
        request=RequestPayload(input="replay me please", deadline_ms=20_000.0),
    )
    dlq = DeadLetterQueue(path)
    await dlq.record([letter])
    await dlq.aclose()

    listed = ok(await call(s, "dlq_list", {}))
    by_id = {r["id"]: r for r in listed["records"]}
    # The poisoned requests above (batch item and infer) and the planted record.
    assert "dead-1" in by_id and listed["total"] == 3 == listed["not_replayed"]
    assert {r["reason"] for r in listed["records"]} == {"stage_error", "ring_full"}
    only = ok(await call(s, "dlq_list", {"reasons": ["ring_full"]}))
    assert [r["id"] for r in only["records"]] == ["dead-1"]

    assert "not both" in error(await call(s, "dlq_replay", {}))
    replay = ok(await call(s, "dlq_replay", {"ids": ["dead-1", "nope"]}))
    (one,) = replay["replays"]
    assert one["id"] == "dead-1" and one["outcome"] == "ok" and one["new_request_id"]
    assert replay["notes"] == ["nope: no such record (or filtered out)"]
    after = ok(await call(s, "dlq_list", {"ids": ["dead-1"]}))
    (record,) = after["records"]
    assert [(m["outcome"], m["new_request_id"]) for m in record["replays"]] == [
        ("ok", one["new_request_id"])
    ]
    # The poisoned ones still fail (the fault is still on): each an outcome, not an error.
    rest = ok(await call(s, "dlq_replay", {"all": True}))
    assert sorted(r["outcome"] for r in rest["replays"]) == ["stage_error", "stage_error"]
    assert rest["failed"] == 2


async def _resources(s: ClientSession, config_path: Path) -> None:
    listed = {str(r.uri): r for r in (await s.list_resources()).resources}
    assert set(listed) == {"mpipeline://config/effective", "mpipeline://metrics"}
    config = (await s.read_resource("mpipeline://config/effective")).contents[0]
    assert isinstance(config, types.TextResourceContents)
    assert config.text == await _cli("config", "show", str(config_path))
    assert "token_delay_ms = 5.0" in config.text
    assert config.mime_type == "application/toml"
    metrics = (await s.read_resource("mpipeline://metrics")).contents[0]
    assert isinstance(metrics, types.TextResourceContents)
    # The requests above are counted, as /metrics counts them.
    assert "# TYPE mpipeline_" in metrics.text
    assert "mpipeline_ring_capacity_bytes{" in metrics.text
    with pytest.raises(MCPError, match="no resource"):
        await s.read_resource("mpipeline://nothing")


def test_no_pipeline_running_is_a_clear_exit_1(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    done = subprocess.run(
        [sys.executable, "-m", "mpipeline", "mcp", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1, done.stderr
    assert f"no supervisor is running in {run_dir}" in done.stderr and done.stdout == ""


def test_no_client_slot_free_is_a_clear_exit_1(start_supervisor: SupervisorFactory) -> None:
    sp = start_supervisor(CONFIG)

    async def with_the_only_slot_taken() -> subprocess.CompletedProcess[str]:
        async with Pipeline.attach(sp.run_dir):
            return await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "mpipeline", "mcp", "--config", str(sp.config_path)],
                capture_output=True,
                text=True,
                timeout=CALL_TIMEOUT_S,
                check=False,
                stdin=subprocess.DEVNULL,
            )

    done = asyncio.run(with_the_only_slot_taken())
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert (
        done.stderr.startswith("mpipeline mcp: all 1 API client slots")
        and "Traceback" not in done.stderr
    )
    assert "gateway.api_clients" in done.stderr


def test_a_stopped_pipeline_gives_error_results_not_a_dead_server(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = start_supervisor(CONFIG)
    errlog = sp.run_dir.parent / "mcp-stderr.log"

    async def session() -> None:
        with errlog.open("w") as err:
            async with (
                stdio_client(_server(sp.config_path), errlog=err) as (read, write),
                ClientSession(read, write) as s,
            ):
                await s.initialize()
                assert ok(await call(s, "infer", {"prompt": "before"}))["text"] == "before"
                await asyncio.to_thread(sp.stop)
                text = error(await call(s, "infer", {"prompt": "after"}))
                assert text.startswith("shutting_down"), text
                assert "no supervisor is running" in error(await call(s, "pipeline_status", {}))
                with pytest.raises(MCPError, match="no supervisor is running"):
                    await s.read_resource("mpipeline://metrics")

    asyncio.run(session())
    assert DETACHED in errlog.read_text()
    assert _mcp_children() == []
