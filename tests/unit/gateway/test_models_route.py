"""``GET /v1/models/{name}`` through the gateway's router, with the official openai SDK.

Every name the catalog lists answers with its entry; any other name is OpenAI's
404 ``model_not_found`` (which the SDK raises as ``NotFoundError`` with that
code), not the router's generic "no route". The path is a subtree route of
the OpenAI style (``router.py``); the router's own rules for subtrees are
checked here too. No pipeline is needed: these routes never reach one.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import openai
import pytest

from mpipeline.config import Catalog, GatewayConfig, InferenceConfig, ModelConfig
from mpipeline.gateway import Gateway, bind
from mpipeline.gateway.exchange import Reply, Request, Response
from mpipeline.gateway.router import Router
from mpipeline.gateway.style import Handler, Headers, Upgrade
from mpipeline.pipeline import Pipeline

CATALOG = Catalog.build(
    [ModelConfig(name="alpha", aliases=["a"], worker="echo"), ModelConfig(name="beta")],
    InferenceConfig(),
)


async def _with_sdk(test: Any) -> None:
    """Run ``test(sdk)`` against a gateway of ``CATALOG`` on a loopback port."""
    # Only the settings the gateway writes and the run dir its start checks:
    # the models routes answer from the catalog and never call the pipeline.
    pipeline = cast(Pipeline, types.SimpleNamespace(run_dir=Path(".")))
    gateway = Gateway(pipeline, GatewayConfig(), catalog=CATALOG, drain_timeout_s=1.0)
    await gateway.start(bind("127.0.0.1", 0))
    try:
        async with openai.AsyncOpenAI(
            base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=10
        ) as sdk:
            await test(sdk)
    finally:
        await gateway.close()


def test_each_listed_name_is_retrieved_and_any_other_is_model_not_found() -> None:
    async def check(sdk: openai.AsyncOpenAI) -> None:
        listed = [m.id for m in (await sdk.models.list()).data]
        assert listed == ["alpha", "a", "beta"]
        for name in listed:
            assert (await sdk.models.retrieve(name)).id == name
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.models.retrieve("nope")
        assert caught.value.code == "model_not_found"
        body: Any = caught.value.body
        assert body["type"] == "invalid_request_error" and body["param"] == "model"
        assert "'nope'" in body["message"]
        # Other unknown OpenAI paths keep the router's 404, in OpenAI's shape.
        with pytest.raises(openai.NotFoundError) as other:
            await sdk.get("/chat/nope", cast_to=object)
        assert other.value.code is None and "no route" in str(other.value.message)

    asyncio.run(asyncio.wait_for(_with_sdk(check), 20))


# The router's subtrees


class _Style:
    """A style with only routes: enough for the router to pick a handler."""

    prefixes: tuple[str, ...] = ()
    upgrades: Mapping[str, Upgrade] = {}

    def __init__(self, routes: Mapping[str, Mapping[str, Handler]]) -> None:
        self.routes = routes

    def error_reply(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        kind: str | None = None,
        headers: Headers = (),
    ) -> Reply:
        return Reply(status, message.encode(), headers)

    def failure_reply(self, exc: object) -> Reply:
        raise AssertionError("not used")

    def rate_limited(self, refused: object) -> Reply:
        raise AssertionError("not used")


async def _handler(request: Request, response: Response) -> None:
    raise AssertionError("not called")


async def _other(request: Request, response: Response) -> None:
    raise AssertionError("not called")


async def _deeper(request: Request, response: Response) -> None:
    raise AssertionError("not called")


def test_a_subtree_takes_what_no_exact_route_names_the_longest_first() -> None:
    style = _Style(
        {
            "/v1/models": {"GET": _other},
            "/v1/models/": {"GET": _handler},
            "/v1/models/deep/": {"GET": _deeper},
            "/v1/models/exact": {"GET": _other},
        }
    )
    router = Router([cast(Any, style)], default=cast(Any, style))

    def handler(path: str) -> Handler | None:
        route = router.route(path)
        return None if route is None else route.methods["GET"]

    assert handler("/v1/models") is _other  # the list, not the subtree
    assert handler("/v1/models/anything") is _handler
    assert handler("/v1/models/org/name") is _handler
    assert handler("/v1/models/exact") is _other
    assert handler("/v1/models/deep/x") is _deeper
    assert handler("/v1/modelsx") is None
    assert handler("/v2/models/x") is None
