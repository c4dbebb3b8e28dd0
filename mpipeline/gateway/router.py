"""Which API style owns a path: its handlers for plain HTTP, its switch for an upgrade,
and the style whose error shape answers it.

Built once from the styles' own tables, so a route and the style that refuses
its requests can never disagree. A path no style serves is refused in the
shape of the style whose prefixes it falls under (a mistyped OpenAI path gets
OpenAI's 404, which the SDKs understand), else in the default style's.

A route whose path ends in ``/`` is a subtree, as in Go's ``http.ServeMux``:
it answers every path under it that no exact route names, so a style can say
no to a path in its own words (``GET /v1/models/{name}`` for a name there is
no model of is OpenAI's 404 ``model_not_found``, not the router's "no route").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mpipeline.gateway.style import ApiStyle, Handler, Upgrade


@dataclass(frozen=True, slots=True)
class Route:
    """One path: its handlers by method, and the style they belong to."""

    methods: Mapping[str, Handler]
    style: ApiStyle


class Router:
    """Path to ``Route`` (plain HTTP), to ``Upgrade`` (a protocol switch), and to a style."""

    def __init__(self, styles: Iterable[ApiStyle], *, default: ApiStyle) -> None:
        self._routes: dict[str, Route] = {}
        self._upgrades: dict[str, Upgrade] = {}
        self._prefixes: list[tuple[str, ApiStyle]] = []
        self._default = default
        for style in styles:
            for path, methods in style.routes.items():
                if path in self._routes:
                    raise ValueError(f"two styles route {path}")
                self._routes[path] = Route(methods, style)
            for path, upgrade in style.upgrades.items():
                if path in self._upgrades:
                    raise ValueError(f"two styles switch protocols on {path}")
                self._upgrades[path] = upgrade
            self._prefixes += [(prefix, style) for prefix in style.prefixes]
        # Subtree routes (a path ending in "/"), the longest first.
        self._subtrees = sorted(
            ((path, route) for path, route in self._routes.items() if path.endswith("/")),
            key=lambda item: -len(item[0]),
        )

    def route(self, path: str) -> Route | None:
        """The exact route for ``path``, else the longest subtree it falls under."""
        route = self._routes.get(path)
        if route is None:
            for prefix, subtree in self._subtrees:
                if path.startswith(prefix):
                    return subtree
        return route

    def upgrade(self, path: str) -> Upgrade | None:
        return self._upgrades.get(path)

    def style_for(self, path: str) -> ApiStyle:
        """The style whose error shape answers a request for ``path``, routed or not."""
        route = self.route(path)
        if route is not None:
            return route.style
        for prefix, style in self._prefixes:
            if path.startswith(prefix):
                return style
        return self._default
