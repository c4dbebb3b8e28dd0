"""Redaction end to end: the official openai SDK streams a reply with planted secrets
through the gateway and a real pipeline, and none of them reaches it.

The echo worker replies with the prompt, one word per chunk (``chunk_tokens = 1``),
so every secret with a space in it (a card in groups, ``Bearer <token>``, an IBAN)
arrives at post split across chunks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import httpx
import openai
import pytest

from mpipeline.config import GatewayConfig
from tests.integration._live import Gateways
from tests.integration.conftest import ConfigFactory, SupervisorFactory, SupervisorProcess
from tests.redaction_samples import planted_text

HTTP_TIMEOUT_S = 10.0
SECRETS = {
    "email": "jane.doe@example.com",
    "card": "4111 1111 1111 1111",
    "ssn": "123-45-6789",
    "iban": "DE89 3704 0044 0532 0130 00",
    "phone": "+1 415 555 0100",
    "ip": "10.20.30.40",
    "api_key": "sk-proj-Q7xN2mK9pL4vR8sT1wY6zA3bC5dE0fG",
}
PROMPT = (
    f"Mail {SECRETS['email']} or call {SECRETS['phone']}; card {SECRETS['card']}, "
    f"SSN {SECRETS['ssn']}, IBAN {SECRETS['iban']}, host {SECRETS['ip']}, "
    f"key {SECRETS['api_key']} and Authorization: Bearer abcdefghij0123456789klmnop ok"
)


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("redaction")))
    try:
        yield factory(
            {
                "stages.inference.echo.max_tokens": 400,
                "stages.post.redact.enabled": True,
                "stages.post.redact.email": "hash",
            }
        )
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def sdk(supervisor: SupervisorProcess) -> Iterator[openai.OpenAI]:
    gateways = Gateways(supervisor.run_dir, [(GatewayConfig(), None)])
    try:
        with openai.OpenAI(
            base_url=f"{gateways.urls[0]}/v1", api_key="unused", max_retries=0
        ) as client:
            yield client
    finally:
        gateways.close()


def _streamed(sdk: openai.OpenAI, prompt: str) -> list[str]:
    stream = sdk.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": prompt}], stream=True, max_tokens=400
    )
    return [c.choices[0].delta.content or "" for c in stream if c.choices]


def test_a_streamed_reply_carries_no_planted_secret(
    sdk: openai.OpenAI, supervisor: SupervisorProcess
) -> None:
    deltas = _streamed(sdk, PROMPT)
    streamed = "".join(deltas)
    # A stream of pieces: a secret's chunks went out as one, once it was whole.
    assert len([d for d in deltas if d]) > 10 and streamed.endswith(" ok")
    for kind, value in SECRETS.items():
        assert value not in streamed, kind
        assert f"[{kind}" in streamed, kind
    assert "Bearer [api_key]" in streamed and "abcdefghij0123456789klmnop" not in streamed
    assert streamed.startswith("Mail [email:")  # hashed, as configured
    # The stream equals the redacted whole reply, as a non-streaming call returns it.
    whole = sdk.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": PROMPT}]
    )
    assert whole.choices[0].message.content == streamed.strip()
    # Counted by entity in /metrics (never the value).
    text = httpx.get(supervisor.state["metrics_url"], timeout=HTTP_TIMEOUT_S).text
    counts = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mpipeline_redactions_total{")
    }
    assert counts["email"] >= 1 and counts["card"] >= 1 and counts["api_key"] >= 2
    assert SECRETS["email"] not in text


def test_random_replies_with_planted_secrets_leak_nothing(sdk: openai.OpenAI) -> None:
    rng = random.Random(17)
    for _ in range(10):
        text, planted = planted_text(rng, 4)
        streamed = "".join(_streamed(sdk, text))
        assert streamed.count("[") >= len(planted)  # the whole reply came back
        for value in planted:
            assert value not in streamed, (value, text)
