"""The real llama-cpp-python server with the packaged Gemma, called with the openai SDK.

This is the remote-upstream path of issue 5 against a real OpenAI-compatible
server: replies must carry tokens (the chat template fix in tests/llama_server.py)
both streaming and not, and the non-streaming reply must report usage.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.llama_server import LlamaServer, llama_server

__all__ = ["llama_server"]  # the fixture, imported to be used here

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SYSTEM: ChatCompletionMessageParam = {
    "role": "system",
    "content": "You are a helpful assistant who answers in one sentence.",
}
QUESTION: ChatCompletionMessageParam = {"role": "user", "content": "What is the capital of France?"}


@pytest.fixture(scope="module")
def client(llama_server: LlamaServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=llama_server.url, api_key="none", max_retries=0, timeout=60) as c:
        yield c


def test_chat_completion_returns_tokens_and_usage(
    client: OpenAI, llama_server: LlamaServer
) -> None:
    replies = [
        client.chat.completions.create(
            model=llama_server.model, messages=messages, max_tokens=8, temperature=0
        )
        for messages in ([QUESTION], [SYSTEM, QUESTION])
    ]
    for reply in replies:
        assert reply.choices[0].message.content
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None
        assert 0 < reply.usage.completion_tokens <= 8
    bare, with_system = (reply.usage.prompt_tokens for reply in replies if reply.usage)
    assert with_system > bare + 8  # the system text reached the model


def test_streamed_chat_completion_returns_tokens(client: OpenAI, llama_server: LlamaServer) -> None:
    stream = client.chat.completions.create(
        model=llama_server.model,
        messages=[SYSTEM, QUESTION],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    pieces: list[str] = []
    finish: list[str] = []
    with stream:
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
    assert "".join(pieces)
    assert finish and finish[-1] in ("stop", "length")
