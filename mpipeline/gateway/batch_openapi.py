"""The Batch API's part of ``/openapi.json``: its paths, from the types its routes encode.

Kept beside the routes rather than in ``openapi.py`` so that the document's
module only names these types and merges these paths; the shapes are the
ones ``batch_routes`` decodes and encodes (``batch_shapes``), so the
schemathesis test fuzzes the routes against what they really take.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mpipeline.gateway.batch_shapes import (
    Batch,
    BatchList,
    CreateBatchBody,
    FileDeleted,
    FileList,
    FileObject,
)

TYPES: tuple[msgspec.StructMeta, ...] = (
    FileObject,
    FileList,
    FileDeleted,
    Batch,
    BatchList,
    CreateBatchBody,
)
_ERRORS = (400, 401, 404, 405, 408, 413, 429, 500, 503)
_UPLOAD = {
    "type": "object",
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSONL, one request a line"},
        "purpose": {"type": "string", "enum": ["batch"]},
    },
    "required": ["file", "purpose"],
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def paths(ref: dict[str, dict[str, Any]], error: dict[str, Any]) -> dict[str, Any]:
    """``/v1/files`` and ``/v1/batches``, with OpenAI's error body (``error``) on each."""

    def answers(schema: dict[str, Any], what: str, *statuses: int) -> dict[str, Any]:
        fails = {str(s): _json(error, "An error, in OpenAI's shape") for s in statuses or _ERRORS}
        return {"200": _json(schema, what), **fails}

    upload = {"required": True, "content": {"multipart/form-data": {"schema": _UPLOAD}}}
    create = {"required": True, "content": {"application/json": {"schema": ref["CreateBatchBody"]}}}
    content = {
        "description": "The file's bytes (JSONL)",
        "content": {"application/jsonl": {"schema": {"type": "string"}}},
    }
    return {
        "/v1/files": {
            "post": {
                "summary": "Upload a batch input file (OpenAI's files.create, purpose batch)",
                "requestBody": upload,
                "responses": answers(ref["FileObject"], "The file"),
            },
            "get": {
                "summary": "The files: inputs, and batches' outputs",
                "responses": answers(ref["FileList"], "The files", 401),
            },
        },
        "/v1/files/{file_id}": {
            "parameters": [_param("file_id")],
            "get": {
                "summary": "A file's object",
                "responses": answers(ref["FileObject"], "The file", 401, 404),
            },
            "delete": {
                "summary": "Delete a file",
                "responses": answers(ref["FileDeleted"], "Deleted", 401, 404),
            },
        },
        "/v1/files/{file_id}/content": {
            "parameters": [_param("file_id")],
            "get": {
                "summary": "A file's content (a batch's output or error lines)",
                "responses": {**answers(ref["FileObject"], "", 401, 404), "200": content},
            },
        },
        "/v1/batches": {
            "post": {
                "summary": "Run a file of requests in the background (OpenAI's batches.create)",
                "requestBody": create,
                "responses": answers(ref["Batch"], "The batch, validating"),
            },
            "get": {
                "summary": "The batches, newest first",
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                ],
                "responses": answers(ref["BatchList"], "A page of batches", 400, 401),
            },
        },
        "/v1/batches/{batch_id}": {
            "parameters": [_param("batch_id")],
            "get": {
                "summary": "A batch: status, counts, output and error file ids",
                "responses": answers(ref["Batch"], "The batch", 401, 404),
            },
        },
        "/v1/batches/{batch_id}/cancel": {
            "parameters": [_param("batch_id")],
            "post": {
                "summary": "Cancel a batch: lines in flight are cancelled, outputs kept",
                "responses": answers(ref["Batch"], "The batch, cancelling", 401, 404, 409),
            },
        },
    }
