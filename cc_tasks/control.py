"""The local store's control socket: how servers and the CLI nudge the store's worker, and how it answers.

One line of JSON each way over a Unix socket inside the store (0700: only this user can reach it; the
worker also checks the peer's uid). Requests: ``hello`` (who are you: identity, pid, tasks), ``nudge`` (look
at the queue now), ``quit`` (take no more work; exit once running tasks end). A ``nudge`` is sent without
waiting for a reply: it waits in the socket's backlog until the worker gets to it. Nothing here starts,
claims or pushes a task: the worker pulls its work from the store.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__

CONNECT_TIMEOUT = 2.0
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
#: Who a worker is. A worker of another cc-tasks version is replaced; workers of the same version from other
#: checkouts or interpreters share the queue (workers pull: they coexist).
#: The store's on-disk format: a worker that reads another one is replaced even at the same version.
STORE_FORMAT = 3
IDENTITY = {"version": __version__, "format": STORE_FORMAT, "package": PACKAGE_PARENT, "python": sys.executable}


def same_version(hello: dict) -> bool:
    identity = hello.get("identity")
    return (
        isinstance(identity, dict) and identity.get("version") == __version__ and identity.get("format") == STORE_FORMAT
    )


def _recv_line(s: socket.socket) -> bytes:
    """Bytes up to and including the first newline, or whatever came before the peer closed."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def request(path: Path, msg: dict, timeout: float = CONNECT_TIMEOUT) -> dict:
    """Send ``msg`` and return the reply. Raises OSError or ValueError when nobody answers sensibly."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(msg).encode() + b"\n")
        reply = json.loads(_recv_line(s) or b"{}")
    if not isinstance(reply, dict):
        raise ValueError("the worker's reply is not a JSON object")
    return reply


def send(path: Path, msg: dict) -> bool:
    """Send ``msg`` without waiting for the reply; False if nobody listens."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(CONNECT_TIMEOUT)
            s.connect(str(path))
            s.sendall(json.dumps(msg).encode() + b"\n")
        return True
    except OSError:
        return False


class Inbox:
    """The worker's end: a listening socket that answers every waiting request with ``handler(msg)``."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o077)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        self.inode = os.stat(path).st_ino
        self.sock.listen(128)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve(self, handler: Callable[[dict], dict]) -> None:
        """Answer every request waiting now (a bad request gets an error reply; never raises for one)."""
        while True:
            try:
                conn = self.sock.accept()[0]
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                try:
                    conn.setblocking(True)
                    conn.settimeout(5.0)
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    if struct.unpack("3i", creds)[1] != os.getuid():
                        continue
                    buf = _recv_line(conn)
                    if not buf.endswith(b"\n"):
                        continue
                    msg = json.loads(buf)
                    reply = handler(msg if isinstance(msg, dict) else {})
                except Exception as e:  # a bad client must not take the worker down
                    reply = {"error": f"{type(e).__name__}: {e}"}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass

    def close(self) -> None:
        """Stop listening; remove the socket if it is still ours (not a successor's)."""
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass
