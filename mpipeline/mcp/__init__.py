"""The MCP server's stdio transport (``mpipeline mcp``): a running pipeline for agents.

An MCP client (Claude Desktop, an agent framework, the SDK's own client)
starts ``mpipeline mcp --config FILE`` and talks MCP on its stdin and stdout.
The server attaches to the supervisor already running there as an API client
(``Pipeline.attach``, one ``gateway.api_clients`` slot) and serves the tools
and resources defined once in ``mpipeline.gateway.mcp_tools`` (``infer``,
``batch_infer``, ``pipeline_status``, ``dlq_list``, ``dlq_replay``, ``configure``; the
effective config and the metrics snapshot):

* ``server.py``: the shared server on stdio, over the attached client;
* ``cli.py``: the command's parser and handler.

The other transport, streamable HTTP, is served by every gateway replica at
``/mcp`` behind the gateway's bearer token (``gateway.mcp_http``). The tools
live in the gateway package because the gateway may import nothing above its
layer (pyproject.toml's contracts) and this package sits above it, beside
``bench``, just under ``cli``: an operator surface like the CLI's commands.
What the tools share with those commands (``mpipeline status --json``'s
snapshot, ``mpipeline dlq``'s records, JSON and resubmission) is taken from
below the gateway (``metrics.snapshot``, ``mpipeline.dlq``,
``gateway.dlq_replay``), never from ``ops``. Nothing in the runtime imports
this package, and the ``mcp`` SDK loads only when the command runs.

``configure`` (live settings) asks the supervisor through ``reloads.ask``,
the code ``mpipeline reload`` runs; here every client may call it, since the
server runs as the run dir's owner (over HTTP only the admin token may).
"""
