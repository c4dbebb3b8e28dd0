"""Requests for OpenAI's endpoints beyond chat (``PromptRequest.endpoint``): assemble
leaves them alone, and their dedup key tells them from a chat with the same params."""

from __future__ import annotations

from mpipeline.config import AssembleConfig, PipelineConfig
from mpipeline.messages import Assembled, PromptRequest, Retrieved
from mpipeline.routing import dedup_key
from mpipeline.stages.assemble import Assemble
from mpipeline.stages.base import StageContext

BODY = b'{"model":"m","input":"hello"}'


def _request(endpoint: str) -> PromptRequest:
    return PromptRequest(request_id="r", input="", params=BODY, endpoint=endpoint)


def test_assemble_passes_an_endpoint_request_on_without_a_prompt() -> None:
    ctx = StageContext("assemble", 0, 1, PipelineConfig())
    stage = Assemble(AssembleConfig(system_prompt="be kind"), ctx)
    (out,) = stage.process(Retrieved(request=_request("/embeddings")))
    assert isinstance(out, Assembled)
    assert out.request.params == BODY
    assert (out.prompt, out.messages) == ("", [])


def test_the_dedup_key_includes_the_endpoint() -> None:
    keys = {dedup_key(_request(e)) for e in ("", "/embeddings", "/completions")}
    assert len(keys) == 3
