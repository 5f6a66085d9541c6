#!/usr/bin/env python3
"""A stdio MCP server with no tools, standard library only: what any registered MCP server costs Claude Code
at the least (a baseline of bench/subagents.py). Answers the stateless protocol's ``server/discover`` and
lists, and ``initialize`` for clients that still start a session."""

import json
import sys

INFO = {"name": "null", "version": "1"}
META = {"io.modelcontextprotocol/serverInfo": INFO}

for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    method = msg.get("method", "")
    if method == "server/discover":
        result = {"_meta": META, "ttlMs": 0, "cacheScope": "private", "supportedVersions": ["2026-07-28"],
                  "capabilities": {"tools": {"listChanged": False}}}  # fmt: skip
    elif method == "initialize":
        result = {
            "protocolVersion": msg["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": INFO,
        }
    elif method.endswith("/list"):
        result = {
            "_meta": META,
            "ttlMs": 0,
            "cacheScope": "private",
            "resultType": "complete",
            method.split("/")[0]: [],
        }
    else:
        result = {}
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}) + "\n")
    sys.stdout.flush()
