"""The MCP server (``mpipeline mcp``): a running pipeline as tools and resources for agents.

An MCP client (Claude Desktop, an agent framework, the SDK's own client)
starts ``mpipeline mcp --config FILE`` and talks MCP on its stdin and stdout.
The server attaches to the supervisor already running there as an API client
(``Pipeline.attach``, one ``gateway.api_clients`` slot) and serves:

* ``server.py``: the SDK's low-level server, the tool list and the dispatch;
* ``args.py``: each tool's arguments as a msgspec struct, which both checks a
  call and writes the JSON schema ``tools/list`` shows;
* ``tools.py``: ``infer``, ``batch_infer``, ``pipeline_status``;
* ``dlq.py``: ``dlq_list``, ``dlq_replay``;
* ``resources.py``: the effective config and the metrics snapshot;
* ``cli.py``: the command's parser and handler.

Where it sits in the layers (pyproject.toml's import contracts): beside
``bench``, just under ``cli``. It is an operator surface like the CLI's own
commands, and it answers with what they print: ``pipeline_status`` is
``mpipeline status --json``, ``dlq_list``/``dlq_replay`` are ``mpipeline dlq
list|replay``, taken from ``ops`` rather than written twice. Only the CLI could
import ``ops``; the one change to the contracts is that this package may too
(and sits above it, so ``ops`` can never import it back). Nothing in the
runtime imports it, and the ``mcp`` SDK loads only when the command runs.

``configure`` (issue 18's live settings) is left out: it needs live
reconfiguration (issue 18 item 3), which does not exist yet. The streamable
HTTP transport on the gateway (``/mcp``) is not built either: the gateway is
not ASGI and the SDK's session manager is.
"""
