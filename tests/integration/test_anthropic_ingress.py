"""The official anthropic SDK against ``POST /v1/messages`` of a supervised gateway
(issue 14, item 7).

One supervisor serves the module: the echo worker (which streams the last
user message back, so the text is checked end to end), a gateway replica
that wants a token, and a per-token delay so that a stream can be cut by
its deadline partway. The SDK sends the token as ``x-api-key``; the
OpenAI-style ``Authorization: Bearer`` keeps working beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.integration.conftest import ConfigFactory, SupervisorFactory, SupervisorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "anthropic-Test-Token-5678"
TOKEN_ENV = "MPIPELINE_TEST_ANTHROPIC_TOKEN"
TOKEN_DELAY_MS = 20.0
MODEL = "claude-via-mpipeline"
QUESTION = "what is the capital of France"


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("anthropic")))
    try:
        yield factory(
            {
                "gateway.replicas": 1,
                "gateway.auth_token_env": TOKEN_ENV,
                "stages.assemble.system_prompt": "",
                "stages.inference.echo.token_delay_ms": TOKEN_DELAY_MS,
                # Every request a call of its own: a replay would hide what a field changed.
                "stages.inference.dedup.cache_entries": 0,
                "stages.inference.dedup.coalesce": False,
            },
            env={TOKEN_ENV: TOKEN},
        )
    finally:
        factory.stop_all()


@pytest.fixture
def sdk(supervisor: SupervisorProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=supervisor.url, api_key=TOKEN, max_retries=0, timeout=30
    ) as client:
        yield client


def _user(text: str) -> Any:
    return {"role": "user", "content": text}


def test_a_message_comes_back_in_anthropics_shape(sdk: anthropic.Anthropic) -> None:
    reply = sdk.messages.create(model=MODEL, max_tokens=64, messages=[_user(QUESTION)])
    assert reply.type == "message" and reply.role == "assistant"
    assert reply.id.startswith("msg_")
    assert reply.model == MODEL
    assert [(b.type, getattr(b, "text", None)) for b in reply.content] == [("text", QUESTION)]
    assert reply.stop_reason == "end_turn"
    assert reply.stop_sequence is None
    assert reply.usage.output_tokens == len(QUESTION.split())
    assert reply.usage.input_tokens >= len(QUESTION.split())


def test_the_system_prompt_and_earlier_turns_reach_the_model(sdk: anthropic.Anthropic) -> None:
    alone = sdk.messages.create(model=MODEL, max_tokens=64, messages=[_user(QUESTION)])
    system = "you answer in one word only"
    history: Any = [
        _user("hello there"),
        {"role": "assistant", "content": [{"type": "text", "text": "hi, how can I help"}]},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    with_all = sdk.messages.create(
        model=MODEL,
        max_tokens=64,
        system=[{"type": "text", "text": system}],
        messages=history,
        metadata={"user_id": "session-42"},
    )
    # Echo answers the last user message; the prompt it counts holds the rest.
    assert with_all.content[0].type == "text" and with_all.content[0].text == QUESTION
    extra = with_all.usage.input_tokens - alone.usage.input_tokens
    assert extra >= len(system.split()) + len("hello there hi, how can I help".split())
    plain_system = sdk.messages.create(
        model=MODEL, max_tokens=64, system=system, messages=[_user(QUESTION)]
    )
    assert plain_system.usage.input_tokens - alone.usage.input_tokens >= len(system.split())


def test_max_tokens_and_stop_sequences_stop_the_reply(sdk: anthropic.Anthropic) -> None:
    cut = sdk.messages.create(model=MODEL, max_tokens=3, messages=[_user(QUESTION)])
    assert cut.content[0].type == "text" and cut.content[0].text.rstrip() == "what is the"
    assert cut.stop_reason == "max_tokens"
    assert cut.usage.output_tokens == 3
    stopped = sdk.messages.create(
        model=MODEL, max_tokens=64, messages=[_user(QUESTION)], stop_sequences=["capital"]
    )
    assert stopped.content[0].type == "text" and stopped.content[0].text.rstrip() == "what is the"
    streamed = sdk.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=[_user(QUESTION)],
        stop_sequences=["France"],
        stream=True,
    )
    texts = [e.delta.text for e in streamed if e.type == "content_block_delta"]  # type: ignore[union-attr]
    assert "".join(texts).rstrip() == "what is the capital of"


def test_a_stream_sends_anthropics_events_in_order(sdk: anthropic.Anthropic) -> None:
    events = list(
        sdk.messages.create(model=MODEL, max_tokens=64, messages=[_user(QUESTION)], stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}, kinds
    start = events[0]
    assert start.type == "message_start"
    assert start.message.id.startswith("msg_") and start.message.model == MODEL
    delta = events[-2]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == len(QUESTION.split())


def test_the_sdks_stream_helper_builds_the_whole_message(sdk: anthropic.Anthropic) -> None:
    with sdk.messages.stream(
        model=MODEL, max_tokens=64, system="be brief", messages=[_user(QUESTION)]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == QUESTION
    assert final.content[0].type == "text" and final.content[0].text == QUESTION
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len(QUESTION.split())
    assert final.usage.input_tokens >= len(QUESTION.split()) + 2  # the system prompt counted


def test_a_stream_cut_by_its_deadline_ends_in_an_error_event(sdk: anthropic.Anthropic) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    stream = sdk.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=[_user(words)],
        stream=True,
        extra_headers={"X-Request-Timeout": "0.5"},
    )
    texts: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as raised:
        for event in stream:  # not extend(): the texts before the error must be kept
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                texts.append(event.delta.text)  # noqa: PERF401
    assert texts, "the error came before any text: it should have been a status"
    body: Any = raised.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "timeout_error"
    assert "deadline_exceeded" in body["error"]["message"]


def test_bad_requests_are_400s_naming_the_field(
    sdk: anthropic.Anthropic, supervisor: SupervisorProcess
) -> None:
    weather: Any = {"name": "weather", "input_schema": {"type": "object"}}
    with pytest.raises(anthropic.BadRequestError) as tools:
        sdk.messages.create(model=MODEL, max_tokens=64, messages=[_user(QUESTION)], tools=[weather])
    assert tools.value.status_code == 400
    body: Any = tools.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    # Echo calls no tools: refused by name, not accepted and ignored.
    assert body["error"]["message"].startswith("tools: tools is not supported by this model")
    assert "worker echo" in body["error"]["message"]
    # Echo has no sampling: temperature is refused, not accepted and ignored.
    with pytest.raises(anthropic.BadRequestError, match="temperature is not supported"):
        sdk.messages.create(
            model=MODEL,
            max_tokens=64,
            messages=[_user(QUESTION)],
            extra_body={"temperature": 0.2},  # this SDK release has no argument for it
        )
    image: Any = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[0\]\.content\[0\]: .*echo"):
        sdk.messages.create(
            model=MODEL,
            max_tokens=64,
            messages=[{"role": "user", "content": [image]}],
        )
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[1\]\.role"):
        sdk.messages.create(
            model=MODEL,
            max_tokens=64,
            messages=[_user(QUESTION), {"role": "assistant", "content": "Paris"}],
        )
    headers = {"x-api-key": TOKEN, "content-type": "application/json"}
    raw = httpx.post(f"{supervisor.url}/v1/messages", content=b'{"model": ', headers=headers)
    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"
    assert "invalid JSON at byte" in raw.json()["error"]["message"]
    missing = {"model": MODEL, "messages": [_user(QUESTION)]}
    no_max = httpx.post(f"{supervisor.url}/v1/messages", json=missing, headers=headers)
    assert no_max.status_code == 400
    assert no_max.json()["error"]["message"].startswith("max_tokens: ")


def test_the_token_is_taken_as_x_api_key_or_bearer(supervisor: SupervisorProcess) -> None:
    with anthropic.Anthropic(
        base_url=supervisor.url, api_key="wrong-key", max_retries=0, timeout=30
    ) as wrong:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            wrong.messages.create(model=MODEL, max_tokens=8, messages=[_user(QUESTION)])
    body: Any = refused.value.body
    assert body["error"]["type"] == "authentication_error"
    assert TOKEN not in refused.value.response.text
    body_ok = {"model": MODEL, "max_tokens": 8, "messages": [_user(QUESTION)]}
    url = f"{supervisor.url}/v1/messages"
    bearer = httpx.post(url, json=body_ok, headers={"authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200, bearer.text
    assert bearer.json()["content"] == [{"type": "text", "text": QUESTION}]
    assert httpx.post(url, json=body_ok).status_code == 401
    # The key is the gateway's token on its other routes too; anthropic-version is ignored.
    status = httpx.get(
        f"{supervisor.url}/v1/status",
        headers={"x-api-key": TOKEN, "anthropic-version": "2023-06-01"},
    )
    assert status.status_code == 200


def test_other_paths_under_v1_messages_are_404s_in_anthropics_shape(
    sdk: anthropic.Anthropic,
) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk.messages.count_tokens(model=MODEL, messages=[_user(QUESTION)])
    body: Any = missing.value.body
    assert body["error"]["type"] == "not_found_error"
