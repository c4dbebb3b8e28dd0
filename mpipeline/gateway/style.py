"""What an API style of the gateway is: its routes and its own way of saying no.

The gateway speaks three APIs over one pipeline: mpipeline's native REST
(``native.py``), OpenAI's Chat Completions (``openai.py``) and a WebSocket of
prompts (``websocket.py``). Each has its own error body, and a client of one
must never get another's: the OpenAI SDKs read ``error.type``, ``param`` and
``code``, our clients ``error.type`` and ``field``. So the error shape is a
property of the style, not of a URL prefix test: every refusal (a bad body,
a 429, a pipeline failure, a 404 under the style's prefixes) is rendered by
the style that owns the path, found through the ``Router`` (``router.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from mpipeline.errors import RequestFailed
from mpipeline.gateway.admission import Refused
from mpipeline.gateway.exchange import Reply, Request, Response, Switch

Headers = tuple[tuple[str, str], ...]
Handler = Callable[[Request, Response], Awaitable[None]]
# Path, then method, to the handler that answers it.
Routes = Mapping[str, Mapping[str, Handler]]
# A connection that asks to switch protocols: a refusal, or the switch.
Upgrade = Callable[[Request], Reply | Switch]


class ApiStyle(Protocol):
    """One API the gateway speaks: routes, protocol switches and error replies."""

    @property
    def routes(self) -> Routes:
        """Plain HTTP routes: path, then method, to the handler; a path that ends
        in "/" is a subtree, for every path under it (``router.py``)."""

    @property
    def upgrades(self) -> Mapping[str, Upgrade]:
        """Paths where a request may switch protocols (``Upgrade:``), and how."""

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Path prefixes whose unknown paths are refused in this style's shape."""

    def error_reply(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        kind: str | None = None,
        headers: Headers = (),
    ) -> Reply:
        """An error in this style's shape; ``field`` is where in the body,
        ``kind`` overrides the type (or code) the status implies."""

    def failure_reply(self, exc: RequestFailed) -> Reply:
        """A request the pipeline failed, as this style's status and body."""

    def rate_limited(self, refused: Refused) -> Reply:
        """The 429 for a request the rate limits refused, with its Retry-After."""
