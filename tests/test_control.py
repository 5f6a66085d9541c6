"""The store's control socket: requests and replies, and what a bad client gets."""

import socket
import threading

import pytest

from cc_tasks import control


@pytest.fixture
def inbox(tmp_path):
    box = control.Inbox(tmp_path / "s.sock")
    stop = threading.Event()
    seen = []

    def handler(msg):
        seen.append(msg)
        if msg.get("op") == "boom":
            raise RuntimeError("bad")
        return {"echo": msg.get("op")}

    def loop():
        while not stop.is_set():
            box.serve(handler)
            stop.wait(0.002)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    box.seen = seen
    yield box
    stop.set()
    t.join(5)
    box.close()


def test_request_reply_and_fire_and_forget(inbox):
    assert (inbox.path.stat().st_mode & 0o077) == 0  # only this user can connect
    assert control.request(inbox.path, {"op": "hello"}) == {"echo": "hello"}
    assert control.send(inbox.path, {"op": "nudge"})
    assert control.request(inbox.path, {"op": "boom"}) == {"error": "RuntimeError: bad"}
    assert control.request(inbox.path, {"op": "after"}) == {"echo": "after"}  # still serving


def test_junk_is_answered_with_an_error_and_nothing_breaks(inbox):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(inbox.path))
        s.sendall(b"not json\n")
        assert b"error" in s.recv(1000)
    assert control.request(inbox.path, {"op": "ok"}) == {"echo": "ok"}


def test_nobody_listening(tmp_path):
    assert not control.send(tmp_path / "none.sock", {"op": "nudge"})
    with pytest.raises(OSError):
        control.request(tmp_path / "none.sock", {"op": "hello"})


def test_close_leaves_a_successors_socket_alone(tmp_path):
    first = control.Inbox(tmp_path / "s.sock")
    second = control.Inbox(tmp_path / "s.sock")  # (a successor binds the same path)
    first.close()
    assert (tmp_path / "s.sock").exists()
    second.close()
    assert not (tmp_path / "s.sock").exists()
