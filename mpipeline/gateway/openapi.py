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

from mpipeline.gateway import batch_openapi
from mpipeline.gateway.anthropic_shapes import AnthropicErrorBody, AnthropicMessage, MessagesBody
from mpipeline.gateway.jobs_shapes import JobBody, JobOut
from mpipeline.gateway.openai_endpoints import CompletionBody, EmbeddingBody
from mpipeline.gateway.openai_request import ChatBody
from mpipeline.gateway.openai_shapes import ChatCompletion, ModelList, OpenAIErrorBody
from mpipeline.gateway.schemas import ErrorBody, Health, PromptBody, PromptResult, Readiness

PATH = "/openapi.json"
VERSION = "1"
_REF = "#/components/schemas/{name}"
# Statuses a route may answer with an error body, beyond its own.
# 404: a model there is none of ([[models]]), or a backend without the endpoint.
_NATIVE_ERRORS = (400, 401, 404, 405, 408, 413, 415, 429, 500, 502, 503, 504)
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
    types += [OpenAIErrorBody, Health, Readiness, MessagesBody, AnthropicMessage]
    types += [AnthropicErrorBody, CompletionBody, EmbeddingBody, JobBody, JobOut]
    types += batch_openapi.TYPES
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
        schemes = {"bearer": {"type": "http", "scheme": "bearer"}}
        # Anthropic's SDK sends the same token as x-api-key (taken on every route).
        schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "x-api-key"}
        doc["components"]["securitySchemes"] = schemes
        doc["security"] = [{"bearer": []}]
        doc["paths"]["/v1/messages"]["post"]["security"] = [{"bearer": []}, {"apiKey": []}]
        for path in ("/healthz", "/readyz"):
            doc["paths"][path]["get"]["security"] = []
    return msgspec.json.encode(doc)


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(schema: dict[str, Any], statuses: tuple[int, ...]) -> dict[str, Any]:
    return {str(s): _json(schema, "An error, with what to fix where it can say") for s in statuses}


def _get(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": responses}}


def _post(summary: str, schema: dict[str, Any], responses: dict[str, Any]) -> dict[str, Any]:
    request = {"required": True, "content": {"application/json": {"schema": schema}}}
    return {"post": {"summary": summary, "requestBody": request, "responses": responses}}


def _streamed(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A 200 that is JSON, or an event stream when the body says ``stream``."""
    ok = _json(schema, description)
    ok["content"].update(_SSE)
    return ok


def _jobs(ref: dict[str, dict[str, Any]], native: dict[str, Any]) -> dict[str, Any]:
    """``/v1/requests``: submit (202 and a Location), then poll or cancel by id."""
    job = ref["JobOut"]
    submit = _post(
        "Submit a prompt to run in the background (async request)",
        ref["JobBody"],
        {"202": _json(job, "Accepted; poll the Location"), **_errors(native, _NATIVE_ERRORS)},
    )
    submit["post"]["responses"]["202"]["headers"] = {
        "Location": {"schema": {"type": "string"}, "description": "/v1/requests/{id}"}
    }
    param = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    gone = _errors(native, (401, 404))
    by_id = {
        "parameters": [param],
        "get": {
            "summary": "An async request's status, and its result or error once it ended",
            "responses": {"200": _json(job, "The request"), **gone},
        },
        "delete": {
            "summary": "Cancel an async request (its outcome becomes cancelled)",
            "responses": {
                "200": _json(job, "Cancelled (or already was)"),
                **_errors(native, (401, 404, 409)),
            },
        },
    }
    return {"/v1/requests": submit, "/v1/requests/{id}": by_id}


def _paths(ref: dict[str, dict[str, Any]]) -> dict[str, Any]:
    native, openai = ref["ErrorBody"], ref["OpenAIErrorBody"]
    anthropic = ref["AnthropicErrorBody"]
    # Passed through: the upstream's own answer, whatever shape it has.
    passed = {"type": "object"}
    passed_errors = _errors(openai, _OPENAI_ERRORS)
    return {
        "/healthz": _get("Liveness: the process answers", {"200": _json(ref["Health"], "Alive")}),
        "/readyz": _get(
            "Readiness: every replica and this client's path are up",
            {
                "200": _json(ref["Readiness"], "Ready"),
                "503": _json(ref["Readiness"], "Not ready, and why"),
            },
        ),
        "/v1/status": _get(
            "The gateway's and the pipeline's state (mpipeline status --json)",
            {"200": _json({"type": "object"}, "The status"), **_errors(native, (401, 503))},
        ),
        "/v1/prompt": _post(
            "Run one prompt through the pipeline",
            ref["PromptBody"],
            {
                "200": _streamed(ref["PromptResult"], "The result (stream: false)"),
                **_errors(native, _NATIVE_ERRORS),
            },
        ),
        "/v1/chat/completions": _post(
            "OpenAI-compatible chat completions",
            ref["ChatBody"],
            {
                "200": _streamed(ref["ChatCompletion"], "The completion (stream: false)"),
                **_errors(openai, _OPENAI_ERRORS),
            },
        ),
        "/v1/models": _get(
            "The models this gateway serves (OpenAI's list shape)",
            {"200": _json(ref["ModelList"], "The models"), **_errors(openai, (401,))},
        ),
        "/v1/completions": _post(
            "OpenAI legacy completions, passed through to an OpenAI upstream",
            ref["CompletionBody"],
            {"200": _streamed(passed, "The upstream's reply (stream: false)"), **passed_errors},
        ),
        "/v1/embeddings": _post(
            "OpenAI embeddings, passed through to an OpenAI-compatible upstream",
            ref["EmbeddingBody"],
            {"200": _json(passed, "The upstream's reply, as it sent it"), **passed_errors},
        ),
        "/v1/messages": _post(
            "Anthropic Messages API (text, images and tools)",
            ref["MessagesBody"],
            {
                "200": _streamed(ref["AnthropicMessage"], "The message (stream: false)"),
                **_errors(anthropic, _OPENAI_ERRORS),
            },
        ),
        "/v1/stream": _get(
            "The WebSocket of prompts; a plain GET is refused", _errors(native, (401, 426))
        ),
        **_jobs(ref, native),
        **batch_openapi.paths(ref, openai),
        PATH: _get(
            "This document",
            {"200": _json({"type": "object"}, "OpenAPI 3.1"), **_errors(native, (401,))},
        ),
    }
