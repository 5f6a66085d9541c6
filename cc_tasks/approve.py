"""The approval server a sub-agent asks (standard library only: it starts in a few tens of milliseconds, and the
sub-agent waits for it before its first turn).

claude runs it as the MCP server ``cc-tasks-approvals`` with ``--permission-prompt-tool
mcp__cc-tasks-approvals__approve``: for a tool call its permissions do not cover, claude calls ``approve`` with
``{"tool_name", "input", "tool_use_id"}`` and waits. This server hands the request to the task's supervisor over
the Unix socket named by ``CC_TASKS_APPROVAL_SOCKET`` (the supervisor, in the worker, records it in the store
under its lease and waits for the lead, a person or a rule to answer) and answers claude with one text content
holding ``{"behavior": "allow", "updatedInput": ...}`` or ``{"behavior": "deny", "message": ...}``. While it
waits it sends progress on the request's token, so claude's idle watchdog does not fire.

It answers the stateless protocol (``server/discover``) and ``initialize``; each call runs in a thread of its
own (claude may ask several at once)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

NAME = "cc-tasks-approvals"
TOOL = "approve"
INFO = {"name": NAME, "version": "1"}
META = {"io.modelcontextprotocol/serverInfo": INFO}
#: Seconds between progress notifications while a request waits (claude's idle watchdog looks every 30 s).
KEEPALIVE = 15.0
SCHEMA = {
    "type": "object",
    "properties": {
        "tool_name": {"type": "string", "description": "The tool claude wants to run."},
        "input": {"type": "object", "description": "Its input."},
        "tool_use_id": {"type": "string"},
    },
    "required": ["tool_name", "input"],
}
TOOLS = [
    {
        "name": TOOL,
        "description": "Asks the lead agent or a person (through cc-tasks) whether a tool call may run.",
        "inputSchema": SCHEMA,
    }
]
_out = threading.Lock()


def send(msg: dict) -> None:
    line = json.dumps(msg) + "\n"
    with _out:
        sys.stdout.write(line)
        sys.stdout.flush()


def ask(args: dict, progress: object) -> dict:
    """The supervisor's answer to one request, or a denial saying why there is none."""
    path = os.environ.get("CC_TASKS_APPROVAL_SOCKET", "")
    request = {"op": "ask", "tool_name": args.get("tool_name"), "input": args.get("input"),
               "tool_use_id": args.get("tool_use_id")}  # fmt: skip
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(json.dumps(request).encode() + b"\n")
            s.settimeout(KEEPALIVE)
            buf, n = b"", 0
            while not buf.endswith(b"\n"):
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    n += 1
                    if progress is not None:
                        note = {"progressToken": progress, "progress": n, "message": "waiting for an answer"}
                        send({"jsonrpc": "2.0", "method": "notifications/progress", "params": note})
                    continue
                if not chunk:
                    break
                buf += chunk
        answer = json.loads(buf or b"{}")
    except (OSError, ValueError) as e:
        return {"behavior": "deny", "message": f"cc-tasks could not ask for approval ({type(e).__name__}: {e})"}
    if answer.get("behavior") not in ("allow", "deny"):
        return {"behavior": "deny", "message": "cc-tasks gave no answer (the task is stopping)"}
    return answer


def call(msg: dict) -> None:
    params = msg.get("params") or {}
    progress = (params.get("_meta") or {}).get("progressToken")
    if params.get("name") != TOOL:
        send(
            {
                "jsonrpc": "2.0",
                "id": msg["id"],
                "error": {"code": -32602, "message": f"unknown tool {params.get('name')!r}"},
            }
        )
        return
    answer = ask(params.get("arguments") or {}, progress)
    result = {"content": [{"type": "text", "text": json.dumps(answer)}], "isError": False, "resultType": "complete"}
    send({"jsonrpc": "2.0", "id": msg["id"], "result": result})


def reply(msg: dict) -> dict | None:
    method = msg.get("method", "")
    if method == "server/discover":
        return {"_meta": META, "ttlMs": 0, "cacheScope": "private", "supportedVersions": ["2026-07-28"],
                "capabilities": {"tools": {"listChanged": False}}}  # fmt: skip
    if method == "initialize":
        version = (msg.get("params") or {}).get("protocolVersion") or "2025-06-18"
        return {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": INFO}
    if method == "tools/list":
        return {"_meta": META, "ttlMs": 0, "cacheScope": "private", "resultType": "complete", "tools": TOOLS}
    if method.endswith("/list"):
        return {"_meta": META, "ttlMs": 0, "cacheScope": "private", "resultType": "complete", method.split("/")[0]: []}
    if method == "ping":
        return {}
    return None


def main() -> int:
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            send({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}})
            continue
        if not isinstance(msg, dict) or "id" not in msg:
            continue
        if msg.get("method") == "tools/call":
            threading.Thread(target=call, args=(msg,), daemon=True).start()
            continue
        result = reply(msg)
        if result is None:
            send({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "method not found"}})
        else:
            send({"jsonrpc": "2.0", "id": msg["id"], "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
