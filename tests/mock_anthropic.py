"""A scripted, offline stand-in for the Anthropic Messages API.

The real Claude Code CLI talks to it when ``ANTHROPIC_BASE_URL`` points here.
What it answers is decided by a directive inside the task's prompt::

    @@mock {"steps": [{"bash": "echo hi > out.txt"}, {"text": "done: {last_result}"}]}

Each assistant turn of the conversation takes the next step (the step index is
the number of assistant messages after the user message holding the last directive,
so a resumed session runs the new prompt's steps). Steps:

- ``{"text": "..."}``: a final text answer. ``{last_result}`` is replaced by the
  last tool result, ``{all_results}`` by all of them joined by newlines,
  ``{prompt}`` by the first user text, ``{history}`` by the number of earlier
  user turns that carry text (a resumed session sends its earlier turns).
- ``{"bash": "cmd"}``: a ``Bash`` tool call.
- ``{"tool": "name", "input": {...}}``: any tool call; the string ``"$TASK_IDS"``
  anywhere in the input becomes the list of task ids found in earlier tool
  results, in order (used to make a parent agent wait for the tasks it started), and a
  string ``"$LAST.name"`` becomes the field ``name`` of the last tool result read as
  JSON (e.g. the ``lease`` a claim returned).
- ``{"error": 529, "type": "overloaded_error"}``: answer with an HTTP error.
- ``{"big": N}``: a text answer of N characters.
- ``{"sleep": S, ...}``: wait S seconds before answering the rest of the step.
- ``{"error_once": 529, "key": "k", ...}``: answer the error the first time this
  key is seen by this mock, then continue with the step's other fields.
- ``"usage": {"input_tokens": N, "output_tokens": M}`` in any step: the turn's usage (default 12 and 7), so
  that a turn costs money (claude prices it: 1,000,000 input tokens of a Sonnet model are $3).

A prompt without a directive gets ``mock reply: <prompt>``. Requests are logged
as JSON lines to ``$MOCK_ANTHROPIC_LOG`` when set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DIRECTIVE = re.compile(r"@@mock\s+(\{.*\})\s*$", re.S | re.M)
#: A cc-tasks task id, wherever it is in a tool result: the JSON of its structured content (which the pinned
#: Claude Code hands the model instead of the text) or its text.
TASK_ID = re.compile(r"\b[0-9]{8}-[0-9]{6}-[0-9]{3}-[0-9a-f]{8}\b")


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    out = []
    for block in content or []:
        if block.get("type") == "text":
            out.append(block.get("text", ""))
    return out


def _tool_results(messages: list[dict]) -> list[str]:
    results = []
    for msg in messages:
        if msg.get("role") != "user" or isinstance(msg.get("content"), str):
            continue
        for block in msg.get("content") or []:
            if block.get("type") != "tool_result":
                continue
            c = block.get("content")
            if isinstance(c, list):
                c = "".join(b.get("text", "") for b in c if isinstance(b, dict))
            results.append(str(c or ""))
    return results


def _find_directive(messages: list[dict]) -> tuple[dict | None, str, int, int]:
    """The last directive in the user texts, the first user text, how many user texts, and the index of
    the message that holds the directive."""
    script, first, n_text, at = None, "", 0, 0
    for i, msg in enumerate(messages):
        if msg.get("role") != "user":
            continue
        texts = [t for t in _texts(msg.get("content")) if not t.lstrip().startswith("<system-reminder>")]
        if texts:
            n_text += 1
            if not first:
                first = texts[-1]
        for t in texts:
            m = DIRECTIVE.search(t)
            if m:
                at = i
                try:
                    script = json.loads(m.group(1))
                except json.JSONDecodeError:
                    script = {"steps": [{"text": "mock: bad directive"}]}
    return script, first, n_text, at


def _sub_ids(value: Any, ids: list[str], last: dict | None = None) -> Any:
    if value == "$TASK_IDS":
        return ids
    if isinstance(value, str) and value.startswith("$LAST."):
        return (last or {}).get(value[len("$LAST.") :])
    if isinstance(value, dict):
        return {k: _sub_ids(v, ids, last) for k, v in value.items()}
    if isinstance(value, list):
        return [_sub_ids(v, ids, last) for v in value]
    return value


def _last_json(results: list[str]) -> dict | None:
    for r in reversed(results):
        try:
            value = json.loads(r)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None


class MockState:
    def __init__(self, log_path: str | None = None):
        self.log_path = log_path
        self.seen_keys: set[str] = set()
        self.lock = threading.Lock()
        self.requests: list[dict] = []

    def once(self, key: str) -> bool:
        with self.lock:
            if key in self.seen_keys:
                return False
            self.seen_keys.add(key)
            return True

    def log(self, body: dict) -> None:
        with self.lock:
            self.requests.append(body)
            if self.log_path:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(body) + "\n")


def plan_reply(body: dict, state: MockState) -> tuple[int, dict | None, list[dict]]:
    """Decide the answer: (http status, error body or None, content blocks)."""
    messages = body.get("messages") or []
    script, first, n_text, at = _find_directive(messages)
    results = _tool_results(messages)
    if script is None:
        return 200, None, [{"type": "text", "text": f"mock reply: {first[:2000]}"}]
    steps = script.get("steps") or [{"text": "ok"}]
    # A resumed session carries earlier turns: count the steps from the message that holds the directive.
    idx = sum(1 for m in messages[at:] if m.get("role") == "assistant")
    step = dict(steps[min(idx, len(steps) - 1)])
    _turn.usage = step.get("usage") if isinstance(step.get("usage"), dict) else None
    if "sleep" in step:
        time.sleep(float(step["sleep"]))
    if "error_once" in step and state.once(str(step.get("key", "default"))):
        status = int(step["error_once"])
        return (
            status,
            {
                "type": "error",
                "error": {"type": step.get("type", "overloaded_error"), "message": "mock transient error"},
            },
            [],
        )
    if "error" in step:
        status = int(step["error"])
        return (
            status,
            {
                "type": "error",
                "error": {"type": step.get("type", "api_error"), "message": step.get("message", "mock API error")},
            },
            [],
        )
    if "bash" in step:
        return (
            200,
            None,
            [
                {
                    "type": "tool_use",
                    "id": f"toolu_{uuid.uuid4().hex[:20]}",
                    "name": "Bash",
                    "input": {"command": step["bash"], "description": "mock step"},
                }
            ],
        )
    if "tool" in step:
        ids = []
        for r in results:
            for i in TASK_ID.findall(r):
                if i not in ids:
                    ids.append(i)
        return (
            200,
            None,
            [
                {
                    "type": "tool_use",
                    "id": f"toolu_{uuid.uuid4().hex[:20]}",
                    "name": step["tool"],
                    "input": _sub_ids(step.get("input", {}), ids, _last_json(results)),
                }
            ],
        )
    if "big" in step:
        n = int(step["big"])
        line = "0123456789abcdefghijklmnopqrstuvwxyz" * 3 + "\n"
        text = (line * (n // len(line) + 1))[:n]
        return 200, None, [{"type": "text", "text": text}]
    text = str(step.get("text", "ok"))
    text = (
        text.replace("{last_result}", results[-1] if results else "")
        .replace("{all_results}", "\n".join(results))
        .replace("{prompt}", first[:2000])
        .replace("{history}", str(n_text))
    )
    return 200, None, [{"type": "text", "text": text}]


#: The usage of the turn being answered (set by plan_reply from the step's "usage"; per thread).
_turn = threading.local()


def turn_usage() -> dict:
    return {"input_tokens": 12, "output_tokens": 7, **(getattr(_turn, "usage", None) or {})}


def sse_events(model: str, blocks: list[dict]) -> list[tuple[str, dict]]:
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    ev: list[tuple[str, dict]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": turn_usage()["input_tokens"],
                        "output_tokens": 1,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                    },
                },
            },
        )
    ]
    stop = "end_turn"
    for i, b in enumerate(blocks):
        if b["type"] == "text":
            ev.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}},
                )
            )
            text = b["text"]
            chunk = 65536
            for start in range(0, max(len(text), 1), chunk):
                ev.append(
                    (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": i,
                            "delta": {"type": "text_delta", "text": text[start : start + chunk]},
                        },
                    )
                )
        else:
            stop = "tool_use"
            ev.append(
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": i,
                        "content_block": {"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}},
                    },
                )
            )
            ev.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": json.dumps(b["input"])},
                    },
                )
            )
        ev.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    ev.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": turn_usage()["output_tokens"]},
            },
        )
    )
    ev.append(("message_stop", {"type": "message_stop"}))
    return ev


def make_handler(state: MockState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._json(200, {})

        do_HEAD = do_GET

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b"{}"
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                body = {}
            path = self.path.split("?")[0]
            if path.endswith("/count_tokens"):
                return self._json(200, {"input_tokens": 42})
            if not path.endswith("/v1/messages"):
                return self._json(200, {})
            state.log(body)
            status, err, blocks = plan_reply(body, state)
            if err is not None:
                return self._json(status, err)
            model = body.get("model", "claude-mock")
            if not body.get("stream"):
                stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
                return self._json(
                    200,
                    {
                        "id": f"msg_{uuid.uuid4().hex[:24]}",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": blocks,
                        "stop_reason": stop,
                        "stop_sequence": None,
                        "usage": turn_usage(),
                    },
                )
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("connection", "close")
            self.end_headers()
            for name, data in sse_events(model, blocks):
                self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()
            self.close_connection = True

    return Handler


class MockServer:
    """Runs the mock on a loopback port in a background thread."""

    def __init__(self, port: int = 0, log_path: str | None = None):
        self.state = MockState(log_path)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(self.state))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MockServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--log")
    args = ap.parse_args(argv)
    with MockServer(args.port, args.log or os.environ.get("MOCK_ANTHROPIC_LOG")) as mock:
        print(mock.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    sys.exit(main())
