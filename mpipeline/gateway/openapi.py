"""``GET /openapi.json``: the gateway's HTTP routes as an OpenAPI 3.1 document.

Generated, not written: every request body and JSON answer is a msgspec
Struct the routes decode or encode (``schemas.py``, ``openai.py``,
``openai_shapes.py``), and ``msgspec.json.schema_components`` turns those
same types into the document's schemas, bounds included (a ``max_tokens``
of 2^64 is out of the documented range as it is out of the decoded one).
So a route added with its types is documented on its first day, and the
schemathesis test fuzzes it against this document from then on.

The WebSocket (``GET /v1/stream``) is not an HTTP exchange that OpenAPI can
describe; the document lists its plain-GET refusal (426) and points to the
README for the message protocol.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mpipeline.gateway.openai_request import ChatBody
from mpipeline.gateway.openai_shapes import ChatCompletion, ModelList, OpenAIErrorBody
from mpipeline.gateway.schemas import ErrorBody, Health, PromptBody, PromptResult, Readiness

PATH = "/openapi.json"
VERSION = "1"
_REF = "#/components/schemas/{name}"
# Statuses a route may answer with an error body, beyond its own.
_NATIVE_ERRORS = (400, 401, 405, 408, 413, 415, 429, 500, 502, 503, 504)
_OPENAI_ERRORS = _NATIVE_ERRORS
# A stream answer: server-sent events, each a JSON ``data`` line and maybe an ``event`` name.
_SSE = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
            "required": ["data"],
        }
    }
}


def document(*, model: str, auth: bool) -> bytes:
    """The document for a gateway serving ``model``; ``auth``: a bearer token is set."""
    types = [PromptBody, PromptResult, ErrorBody, ChatBody, ChatCompletion, ModelList]
    types += [OpenAIErrorBody, Health, Readiness]
    refs, components = msgspec.json.schema_components(types, ref_template=_REF)
    ref = {t.__name__: r for t, r in zip(types, refs, strict=True)}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "mpipeline gateway",
            "version": VERSION,
            "description": (
                "mpipeline's HTTP routes. GET /v1/stream is a WebSocket of prompts "
                "(see the README); with a token set, every route but /healthz and "
                f"/readyz wants it. The model served is {model}."
            ),
        },
        "paths": _paths(ref),
        "components": {"schemas": components},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        for path in ("/healthz", "/readyz"):
            doc["paths"][path]["get"]["security"] = []
    return msgspec.json.encode(doc)


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(schema: dict[str, Any], statuses: tuple[int, ...]) -> dict[str, Any]:
    return {str(s): _json(schema, "An error, with what to fix where it can say") for s in statuses}


def _paths(ref: dict[str, dict[str, Any]]) -> dict[str, Any]:
    native, openai = ref["ErrorBody"], ref["OpenAIErrorBody"]
    prompt_ok = _json(ref["PromptResult"], "The result (stream: false)")
    prompt_ok["content"].update(_SSE)
    chat_ok = _json(ref["ChatCompletion"], "The completion (stream: false)")
    chat_ok["content"].update(_SSE)
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness: the process answers",
                "responses": {"200": _json(ref["Health"], "Alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: every replica and this client's path are up",
                "responses": {
                    "200": _json(ref["Readiness"], "Ready"),
                    "503": _json(ref["Readiness"], "Not ready, and why"),
                },
            }
        },
        "/v1/status": {
            "get": {
                "summary": "The gateway's and the pipeline's state (mpipeline status --json)",
                "responses": {
                    "200": _json({"type": "object"}, "The status"),
                    **_errors(native, (401, 503)),
                },
            }
        },
        "/v1/prompt": {
            "post": {
                "summary": "Run one prompt through the pipeline",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref["PromptBody"]}},
                },
                "responses": {"200": prompt_ok, **_errors(native, _NATIVE_ERRORS)},
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI-compatible chat completions",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref["ChatBody"]}},
                },
                "responses": {"200": chat_ok, **_errors(openai, _OPENAI_ERRORS)},
            }
        },
        "/v1/models": {
            "get": {
                "summary": "The model this gateway serves (OpenAI's list shape)",
                "responses": {
                    "200": _json(ref["ModelList"], "The models"),
                    **_errors(openai, (401,)),
                },
            }
        },
        "/v1/stream": {
            "get": {
                "summary": "The WebSocket of prompts; a plain GET is refused",
                "responses": _errors(native, (401, 426)),
            }
        },
        PATH: {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": _json({"type": "object"}, "OpenAPI 3.1"),
                    **_errors(native, (401,)),
                },
            }
        },
    }
