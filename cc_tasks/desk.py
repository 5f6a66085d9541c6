"""The supervisor's end of a task's approval server (approve.py): a private Unix socket the server hands each of
claude's permission requests to. A request a rule answers is answered at once; any other becomes a fact in the
store under the task's lease (``ask_approval``) until the lead, a person or the timeout answers it
(``take_answer``, looked at every POLL seconds). Closing the desk (the task stops) answers what still waits."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from . import approve
from .checks import ensure_private_dir
from .errors import CCTasksError
from .models import ApprovalAnswer, ApprovalRule, Lease

log = logging.getLogger("cc_tasks")
#: Seconds between two looks at the record for an answer.
POLL = 0.25
#: claude's hard limit on one MCP call (MCP_TOOL_TIMEOUT, ms): a request is denied this long before it.
HARD_LIMIT_MARGIN = 5.0


def request_timeout(option: float, env: dict[str, str]) -> float:
    """A request's time to be answered: the task's option, less than claude's MCP_TOOL_TIMEOUT when set."""
    try:
        hard = float(env.get("MCP_TOOL_TIMEOUT") or 0) / 1000
    except ValueError:
        hard = 0.0
    return max(1.0, min(option, hard - HARD_LIMIT_MARGIN)) if hard > 0 else option


def reply(answer: ApprovalAnswer, tool_input: Any) -> dict:
    """What claude's permission prompt tool must answer (one JSON object in one text content)."""
    if answer.decision == "allow":
        return {"behavior": "allow", "updatedInput": answer.updated_input or tool_input}
    return {"behavior": "deny", "message": answer.message or f"denied by {answer.by}"}


_home: list[Path] = []


def _socket_dir() -> Path:
    """The private folder of this user's desks' sockets (made and checked once per process)."""
    if not _home:
        _home.append(ensure_private_dir(Path(tempfile.gettempdir()) / f"cc_tasks-approve-{os.getuid()}"))
    return _home[0]


class ApprovalDesk:
    """No thread of its own while nothing asks: the supervisor's loop polls ``fileno()`` and calls ``accept()``
    (each request then gets a thread, as it may wait minutes for its answer)."""

    def __init__(self, backend, lease: Lease, rules: list[ApprovalRule], timeout: float):
        self.backend, self.lease, self.rules, self.timeout = backend, lease, rules, timeout
        self.path = _socket_dir() / f"{lease.task_id}-{lease.epoch}-{secrets.token_hex(3)}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self._closed = threading.Event()

    def fileno(self) -> int:
        return self.sock.fileno()

    def server_config(self) -> dict:
        """The ``--mcp-config`` entry of the approval server (a name of its own: the nesting limit's
        deniedMcpServers never removes it)."""
        argv = ["-I", "-S", approve.__file__]
        env = {"CC_TASKS_APPROVAL_SOCKET": str(self.path)}
        return {"mcpServers": {approve.NAME: {"type": "stdio", "command": sys.executable, "args": argv, "env": env}}}

    def close(self) -> None:
        self._closed.set()
        try:
            self.sock.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def accept(self) -> None:
        """Take the requests waiting on the socket (non-blocking), a thread each."""
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, OSError):
                return
            conn.setblocking(True)
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid != os.getuid():
                conn.close()
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        return
                    buf += chunk
                req = json.loads(buf)
                conn.settimeout(None)
                answer = self.answer(str(req.get("tool_name")), req.get("input") or {})
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except (OSError, ValueError) as e:
                log.warning("task %s: an approval request failed: %s", self.lease.task_id, e)

    def answer(self, tool_name: str, tool_input: Any) -> dict:
        """The answer for one request: a rule's at once, else the one the store gets (or the timeout's)."""
        b, lease = self.backend, self.lease
        try:
            rule = b.rule_answer(b.read(lease.task_id, cached=True), self.rules, tool_name, tool_input)
            if rule is not None:
                b.event(lease, "approval_answered", tool=tool_name, decision=rule.decision, by=f"rule {rule.tool}")
                by = f"the task's approval rule {rule.tool}"
                return reply(ApprovalAnswer(decision=rule.decision, by=by, message=f"denied by {by}"), tool_input)
            pending = b.ask_approval(lease, tool_name, tool_input, self.timeout)
            while not self._closed.wait(POLL):
                got = b.take_answer(lease, pending.request_id)
                if got is not None:
                    return reply(got, tool_input)
        except CCTasksError as e:
            log.warning("task %s: approval: %s", lease.task_id, e)
        return {"behavior": "deny", "message": "the task is stopping; no answer was given"}
