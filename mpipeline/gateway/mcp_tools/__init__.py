"""The MCP tools and resources, defined once for both transports (issue 18 item 1).

* ``args.py``: each tool's arguments as a msgspec struct, which both checks a
  call and writes the JSON schema ``tools/list`` shows;
* ``tools.py``: ``infer``, ``batch_infer``, ``pipeline_status``;
* ``dlq.py``: ``dlq_list``, ``dlq_replay``;
* ``configure.py``: ``configure`` (live settings, through ``reloads.ask``;
  admin only over HTTP);
* ``resources.py``: the effective config and the metrics snapshot;
* ``server.py``: the SDK's low-level server, the tool list and the dispatch.

Why here, inside the gateway package: the streamable HTTP transport runs in
every gateway replica (``gateway.mcp_http``, ``/mcp``), and the gateway may
import nothing above its layer (pyproject.toml's contracts), while ``mpipeline
mcp`` (stdio, above the gateway) may import this. The tools need only a
pipeline client, the run dir, the DLQ, the status snapshot and the reload
request (``reloads``), all below the
gateway, plus the native route's types (``gateway.schemas``), so ``infer``
is refused for exactly what ``POST /v1/prompt`` refuses. In a replica every
tool runs over that replica's own pipeline client, as ``/v1/prompt`` does;
over stdio, over the client ``mpipeline mcp`` attaches as.

Nothing imports this package at start-up: the ``mcp`` SDK it needs takes
about 0.6 s to import, paid by ``mpipeline mcp`` and by a gateway replica on
its first ``/mcp`` request, never by a run that does not use MCP.
"""
