"""Session affinity: shard_for is stable and even, and every routing key agrees.

The client decides which in-flight requests a restarted replica stranded by
computing ``request_key`` itself, while the runners route with
``message_key``; the two must name the same replica for every stage, or a
crash fails the wrong requests and hangs the right ones.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from typing import Any

import msgspec
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from mpipeline.errors import ErrorCode
from mpipeline.messages import (
    Assembled,
    Completed,
    Failed,
    Message,
    PromptRequest,
    Retrieved,
    TokenChunk,
    Turn,
    Usage,
)
from mpipeline.routing import dedup_key, message_key, request_key, shard_for
from tests.strategies import texts

STAGES = ("rag", "assemble", "inference", "post", "stream")


def _request(
    request_id: str = "r1", session_id: str | None = None, text: str = "hello", **kw: object
) -> PromptRequest:
    return PromptRequest(request_id=request_id, session_id=session_id, input=text, **kw)  # type: ignore[arg-type]


def _carrier_into(stage: str, req: PromptRequest) -> Message:
    """The message that carries ``req`` on its way into ``stage``."""
    if stage == "rag":
        return req
    if stage == "assemble":
        return Retrieved(request=req)
    if stage == "inference":
        return Assembled(request=req, prompt="p", dedup_key=dedup_key(req))
    return Completed(
        request_id=req.request_id,
        session_id=req.session_id,
        reply_to=req.reply_to,
        text="t",
        usage=Usage(prompt_tokens=1, completion_tokens=1),
    )


# shard_for


def test_single_replica_is_always_zero() -> None:
    assert {shard_for(f"k{i}", 1) for i in range(100)} == {0}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("session-1", [1, 2, 1, 3]),
        ("alice", [0, 0, 0, 5]),
        ("bob", [1, 0, 1, 4]),
        ("", [0, 1, 2, 4]),
        ("émoji-🙂", [0, 1, 0, 2]),
    ],
)
def test_shard_for_is_pinned_across_processes_and_runs(key: str, expected: list[int]) -> None:
    # Literal values: a salted hash (str.__hash__) would differ per process.
    assert [shard_for(key, n) for n in (2, 3, 4, 7)] == expected
    assert shard_for(key, 3) == xxhash.xxh3_64_intdigest(key.encode()) % 3


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_shard_for_stays_in_range_and_is_deterministic(n: int) -> None:
    keys = [f"session-{i}" for i in range(500)]
    first = [shard_for(k, n) for k in keys]
    assert all(0 <= s < n for s in first)
    assert first == [shard_for(k, n) for k in keys]


@pytest.mark.parametrize("n", [2, 3, 7])
def test_shard_for_spreads_keys_evenly(n: int) -> None:
    total = 30_000
    counts = collections.Counter(shard_for(f"user-{i}", n) for i in range(total))
    assert set(counts) == set(range(n))
    expected = total / n
    # Binomial sd is about sqrt(total/n) (~100 here); 6 % is many sigmas.
    for shard, count in counts.items():
        assert abs(count - expected) < 0.06 * expected, (shard, counts)


# Keys


def test_a_session_routes_by_its_id_into_every_stage() -> None:
    req = _request(session_id="s-42")
    assert {request_key(req, stage) for stage in STAGES} == {"s-42"}


def test_without_session_inference_routes_by_dedup_key_and_others_by_request_id() -> None:
    req = _request(request_id="abc")
    assert request_key(req, "inference") == dedup_key(req)
    for stage in ("rag", "assemble", "post", "stream"):
        assert request_key(req, stage) == "abc"


def test_empty_session_counts_as_no_session() -> None:
    req = _request(request_id="abc", session_id="")
    assert request_key(req, "rag") == "abc"
    assert request_key(req, "inference") == dedup_key(req)


def test_dedup_key_depends_on_the_work_not_on_who_asked() -> None:
    a = _request(request_id="1", session_id="x", text="same words")
    b = _request(request_id="2", session_id=None, text="same words", reply_to=1)
    assert dedup_key(a) == dedup_key(b)
    assert dedup_key(a) != dedup_key(_request(text="other words"))
    assert dedup_key(a) != dedup_key(_request(text="same words", max_tokens=5))
    assert dedup_key(_request(text="1")) != dedup_key(_request(text="", max_tokens=1))


@pytest.mark.parametrize("session", ["sess-7", None])
@pytest.mark.parametrize("stage", STAGES)
def test_runner_and_client_agree_on_the_replica_of_every_stage(
    stage: str, session: str | None
) -> None:
    for i in range(200):
        req = _request(request_id=f"req-{i}", session_id=session, text=f"prompt {i % 17}")
        msg = _carrier_into(stage, req)
        assert message_key(msg) == request_key(req, stage)
        for n in (2, 3):
            assert shard_for(message_key(msg), n) == shard_for(request_key(req, stage), n)


def test_every_reply_of_a_request_routes_together() -> None:
    req = _request(request_id="r9")
    chunk = TokenChunk(request_id="r9", session_id=None, reply_to=0, index=0, text="a")
    failed = Failed(
        request_id="r9",
        session_id=None,
        reply_to=0,
        code=ErrorCode.STAGE_ERROR,
        reason="x",
        stage="post",
    )
    keys = {message_key(m) for m in (chunk, failed, _carrier_into("post", req))}
    assert keys == {"r9"}


def test_message_key_rejects_an_unroutable_message() -> None:
    with pytest.raises(TypeError, match="cannot route Message"):
        message_key(Message())


# The same answer in every process

# Runs in a child with its own PYTHONHASHSEED: the routing of each request
# into each stage, and a salted str hash to show the seed took effect.
_ROUTE_IN_CHILD = """
import sys
import msgspec
from mpipeline.messages import PromptRequest
from mpipeline.routing import request_key, shard_for
stages, ns = sys.argv[1].split(","), [int(n) for n in sys.argv[2].split(",")]
requests = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=list[PromptRequest])
routes = [[(request_key(r, s), [shard_for(request_key(r, s), n) for n in ns]) for s in stages]
          for r in requests]
sys.stdout.buffer.write(msgspec.msgpack.encode([hash("salted?"), routes]))
"""
REPLICAS = (2, 3, 5, 8)
turns = st.builds(Turn, role=st.sampled_from(["system", "user", "assistant"]), content=texts)
routed_requests = st.builds(
    PromptRequest,
    request_id=texts,
    session_id=st.none() | texts,
    input=texts,
    max_tokens=st.none() | st.integers(1, 1 << 20),
    history=st.lists(turns, max_size=3),
)


def _routes_in_a_child(requests: list[PromptRequest], hash_seed: str) -> tuple[int, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _ROUTE_IN_CHILD, ",".join(STAGES), ",".join(map(str, REPLICAS))],
        input=msgspec.msgpack.encode(requests),
        capture_output=True,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    salted, routes = msgspec.msgpack.decode(done.stdout)
    return salted, routes


@settings(max_examples=10, deadline=None)
@given(st.lists(routed_requests, min_size=1, max_size=60))
def test_every_process_routes_every_request_to_the_same_replica(
    requests: list[PromptRequest],
) -> None:
    """Gateway, client and runners are separate processes, each with its own str hash salt."""
    here = [
        [[request_key(r, s), [shard_for(request_key(r, s), n) for n in REPLICAS]] for s in STAGES]
        for r in requests
    ]
    (salt_a, routes_a), (salt_b, routes_b) = (_routes_in_a_child(requests, s) for s in "12")
    assert salt_a != salt_b  # the children's hash() differs, so routing must not use it
    assert routes_a == routes_b == here
