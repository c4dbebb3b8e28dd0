"""The prompt budget end to end: a conversation over ``stages.assemble.budget_tokens``
reaches the upstream with its oldest turns dropped whole, and one whose system prompt
and input alone cannot fit is a 400 naming the limit (issue 17, item 2), through a
supervised gateway and the official openai SDK."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from mpipeline.config import OpenAIConfig
from tests.fault_upstream import FaultUpstream, Ok
from tests.integration.conftest import ConfigFactory, SupervisorFactory, SupervisorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BUDGET = 120


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultUpstream]:
    with FaultUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def supervisor(
    tmp_path_factory: pytest.TempPathFactory, upstream: FaultUpstream
) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("budget")))
    try:
        yield factory(
            {
                "gateway.replicas": 1,
                "stages.assemble.budget_tokens": BUDGET,
                "stages.inference.worker": "openai",
                "stages.inference.openai": OpenAIConfig(
                    base_url=upstream.openai_url, api_key_env=""
                ),
                "stages.inference.retry.max_retries": 0,
            }
        )
    finally:
        factory.stop_all()


@pytest.fixture
def sdk(supervisor: SupervisorProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{supervisor.url}/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def _turn(role: str, n: int) -> dict[str, str]:
    return {"role": role, "content": f"turn {n}: " + " ".join(["word"] * 20)}


def test_old_turns_are_dropped_whole_to_fit_the_budget(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    upstream.default = Ok()
    history = [_turn("user" if i % 2 == 0 else "assistant", i) for i in range(10)]
    messages: Any = [*history, {"role": "user", "content": "and now?"}]
    sdk.chat.completions.create(model="m", messages=messages)
    sent = upstream.calls[-1].body["messages"]
    assert sent[-1] == {"role": "user", "content": "and now?"}
    kept = [m for m in sent if m["content"].startswith("turn ")]
    assert 0 < len(kept) < len(history), len(kept)
    # Whole turns, the newest ones, in order.
    assert kept == history[len(history) - len(kept) :]


def test_a_prompt_that_cannot_fit_is_a_400_naming_the_limit(sdk: openai.OpenAI) -> None:
    long_input = " ".join(["word"] * (BUDGET * 3))
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": long_input}])
    assert "budget_tokens" in str(refused.value), refused.value
