"""``mpipeline mcp``'s transport: the shared server (``gateway.mcp_tools``) on stdio.

The tools and resources are defined once, in the gateway layer, because the
gateway serves the same server at ``/mcp`` over streamable HTTP and may not
import this package. Here they run over the pipeline client this process
attaches as (one ``gateway.api_clients`` slot). ``configure`` is allowed to
every client here: the server runs as the run dir's owner (the run dir is
0700), who may reload the run anyway, and stdio reaches no one else.
"""

from __future__ import annotations

from pathlib import Path

from mpipeline.gateway.mcp_tools.configure import owner
from mpipeline.gateway.mcp_tools.server import build
from mpipeline.pipeline import Pipeline


async def serve_stdio(run_dir: Path) -> None:
    """Attach to the run in ``run_dir`` and serve MCP on stdin/stdout until stdin closes."""
    from mcp.server.stdio import stdio_server

    async with Pipeline.attach(run_dir) as p:
        server = build(p, run_dir, authorize=owner)
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
