"""HTTP edge of the pipeline: REST and OpenAI-compatible routes, SSE, auth.

``Gateway`` serves the routes over a ``Pipeline`` client; ``serve`` runs one
until told to stop; ``bind`` makes the listening socket first, so a busy port
fails before anything else starts.
"""

from __future__ import annotations

from mpipeline.gateway.app import Gateway, model_name, serve
from mpipeline.gateway.server import bind

__all__ = ["Gateway", "bind", "model_name", "serve"]
