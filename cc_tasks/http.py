"""The same tools over MCP Streamable HTTP, with bearer-token auth on every route, and the live dashboard."""

from __future__ import annotations

import contextlib
import functools
import hmac
import ipaddress
import json
import logging
import signal
from importlib import resources
from urllib.parse import parse_qs

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from . import replies
from .errors import ApprovalError, CCTasksError, ConfigError, TaskNotFoundError
from .ids import HOST
from .manager import TaskManager
from .models import TaskTable
from .server import create_server

log = logging.getLogger("cc_tasks")
COOKIE = "cc_tasks_token"
PUBLIC_PATHS = frozenset({"/health"})
#: Most bytes of a dashboard's POST body (an answer: ids, a decision, a message of at most 2,000 characters).
MAX_BODY = 64 * 1024


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _loopback_authority(authority: str) -> bool:
    """``host[:port]`` (IPv6 in brackets) names this machine's loopback."""
    authority = authority.strip().rstrip("/")
    if authority.startswith("["):
        host = authority[1 : authority.find("]")] if "]" in authority else authority
    else:
        host = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    return bool(host) and is_loopback(host)


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"refusing to serve on {host} without a token: pass --token or set CC_TASKS_TOKEN (or bind 127.0.0.1)"
        )


class TokenAuth:
    """ASGI middleware: every request but /health needs ``Authorization: Bearer <token>`` or the dashboard's
    cookie; compared in constant time. ``GET /?token=...`` sets the cookie and redirects to a clean URL."""

    def __init__(self, app, token: str | None):
        self.app = app
        self.token = token.encode() if token else None

    def _ok(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(candidate.encode(), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # no websocket routes here: refuse rather than pass anything unchecked
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.token is None:
            # Without a token the server is bound to loopback; refuse requests whose Host or Origin is not
            # loopback, so that a web page cannot reach it by DNS rebinding.
            origin = headers.get("origin")
            if not _loopback_authority(headers.get("host", "")) or (
                origin and origin != "null" and not _loopback_authority(origin.split("://", 1)[-1])
            ):
                resp = JSONResponse({"error": "forbidden: Host/Origin is not this machine"}, status_code=403)
                return await resp(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and self._ok(auth[7:].strip()):
            return await self.app(scope, receive, send)
        cookies = dict(part.strip().split("=", 1) for part in headers.get("cookie", "").split(";") if "=" in part)
        if self._ok(cookies.get(COOKIE)):
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope["path"] == "/" and scope["method"] == "GET" and self._ok((query.get("token") or [None])[0]):
            resp = Response(status_code=303, headers={"location": "/", "cache-control": "no-store"})
            resp.set_cookie(COOKIE, self.token.decode(), httponly=True, samesite="strict", path="/")
            return await resp(scope, receive, send)
        resp = JSONResponse(
            {"error": "unauthorized: send Authorization: Bearer <token>"},
            status_code=401,
            headers={"www-authenticate": 'Bearer realm="cc-tasks"'},
        )
        return await resp(scope, receive, send)


def create_http_app(manager: TaskManager, token: str | None, path: str = "/mcp"):
    mcp = create_server(manager)

    @mcp.custom_route("/health", methods=["GET"])
    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    @mcp.custom_route("/", methods=["GET"])
    async def dashboard(request: Request) -> Response:
        html = resources.files("cc_tasks").joinpath("dashboard.html").read_text()
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    def _int(request: Request, name: str, default: int) -> int:
        raw = request.query_params.get(name)
        try:
            return default if raw is None else max(0, int(raw))
        except ValueError:
            raise CCTasksError(f"query parameter {name}={raw!r} is not a whole number") from None

    @mcp.custom_route("/api/tasks", methods=["GET"])
    async def api_tasks(request: Request) -> Response:
        try:
            limit = max(1, _int(request, "limit", 200))
        except CCTasksError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        listing = await anyio.to_thread.run_sync(functools.partial(manager.list, include_finished=True, limit=limit))
        return JSONResponse(json.loads(TaskTable.of(listing).model_dump_json()))

    def _task_route(fn):
        async def route(request: Request) -> Response:
            try:
                return await fn(request, request.path_params["task_id"])
            except TaskNotFoundError as e:
                return JSONResponse({"error": str(e)}, status_code=404)
            except CCTasksError as e:
                return JSONResponse({"error": str(e)}, status_code=400)

        return route

    @mcp.custom_route("/api/tasks/{task_id}", methods=["GET"])
    @_task_route
    async def api_task(request: Request, task_id: str) -> Response:
        record = await anyio.to_thread.run_sync(manager.get, task_id)
        return JSONResponse(json.loads(record.bounded().model_dump_json()))

    @mcp.custom_route("/api/tasks/{task_id}/transcript", methods=["GET"])
    @_task_route
    async def api_transcript(request: Request, task_id: str) -> Response:
        offset = _int(request, "offset", 0)
        record = await anyio.to_thread.run_sync(manager.get, task_id)
        entries, nxt = await anyio.to_thread.run_sync(
            functools.partial(manager.transcript, task_id, offset, max_bytes=256 * 1024)
        )
        return JSONResponse({"entries": [e.model_dump() for e in entries], "next": nxt, "status": record.status.value})

    @mcp.custom_route("/api/groups/{group}/notes", methods=["GET"])
    async def api_notes(request: Request) -> Response:
        try:
            since = _int(request, "since", 0)
            page = await anyio.to_thread.run_sync(manager.notes, request.path_params["group"], since, 200)
        except CCTasksError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse(json.loads(page.model_dump_json()))

    @mcp.custom_route("/api/tasks/{task_id}/cancel", methods=["POST"])
    @_task_route
    async def api_cancel(request: Request, task_id: str) -> Response:
        if request.headers.get("x-cc-tasks") != "1":  # not sendable cross-site without a preflight
            return JSONResponse({"error": "missing X-CC-Tasks header"}, status_code=400)
        record = await anyio.to_thread.run_sync(manager.cancel, task_id)
        return JSONResponse({"task_id": task_id, "status": record.status.value})

    @mcp.custom_route("/api/approvals", methods=["GET"])
    async def api_approvals(request: Request) -> Response:
        """The pending permission requests (of ``?group=``), oldest first: list_approvals' bounded page."""
        group = request.query_params.get("group") or None
        cursor = request.query_params.get("cursor") or None
        if len(group or "") > 200 or len(cursor or "") > 200:
            return JSONResponse({"error": "group and cursor take at most 200 characters"}, status_code=400)
        try:
            page = await anyio.to_thread.run_sync(manager.list_approvals, group, cursor)
        except CCTasksError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse(replies.approvals_reply(page).data)

    @mcp.custom_route("/api/approvals/answer", methods=["POST"])
    async def api_answer_approval(request: Request) -> Response:
        """Answer one: JSON ``{task_id, request_id, decision: "allow"|"deny", message?, remember?}``; 409 when
        the answer is refused (unknown, already answered, expired), 404 for an unknown task, 400 for bad input."""
        if request.headers.get("x-cc-tasks") != "1":  # not sendable cross-site without a preflight
            return JSONResponse({"error": "missing X-CC-Tasks header"}, status_code=400)
        body = await _read_body(request)
        try:
            answer = json.loads(body) if body is not None else None
        except ValueError:
            answer = None
        problem = _answer_problem(answer)
        if problem:
            return JSONResponse({"error": problem}, status_code=400)
        by = "dashboard" + (f" of {request.client.host}" if request.client else "") + f" on {HOST}"
        call = functools.partial(manager.answer_approval, answer["task_id"], answer["request_id"], answer["decision"],
                                 answer.get("message") or None, None, bool(answer.get("remember")), by)  # fmt: skip
        try:
            done = await anyio.to_thread.run_sync(call)
        except ApprovalError as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        except TaskNotFoundError as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        except CCTasksError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse(json.loads(done.model_dump_json()))

    return TokenAuth(mcp.http_app(path=path), token)  # outermost: nothing is reachable around it


async def _read_body(request: Request) -> bytes | None:
    """The request's body, or None past MAX_BODY bytes (read no further)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return None
    return body


def _answer_problem(answer) -> str | None:
    """What is wrong with an answer's JSON (None: nothing)."""
    if not isinstance(answer, dict):
        return f"send a JSON object (at most {MAX_BODY} bytes): {{task_id, request_id, decision, message?}}"
    unknown = sorted(set(answer) - {"task_id", "request_id", "decision", "message", "remember"})
    if unknown:
        return f"unknown field(s): {', '.join(k[:40] for k in unknown[:5])}"
    for key in ("task_id", "request_id"):
        if not isinstance(answer.get(key), str) or not 0 < len(answer[key]) <= 100:
            return f"{key} must be a string of 1 to 100 characters"
    if answer.get("decision") not in ("allow", "deny"):
        return "decision must be 'allow' or 'deny'"
    message = answer.get("message")
    if message is not None and (not isinstance(message, str) or len(message) > 2000):
        return "message must be a string of at most 2000 characters"
    if not isinstance(answer.get("remember", False), bool):
        return "remember must be true or false"
    return None


def run_http(manager: TaskManager, host: str, port: int, path: str, token: str | None) -> None:
    import uvicorn

    check_bind(host, token)
    manager.install_sigchld_handler()
    app = create_http_app(manager, token, path)
    log.info("serving MCP over HTTP on %s:%s%s (token %s)", host, port, path, "set" if token else "not set")
    # no access log: a dashboard URL may carry the token once
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning", lifespan="on")

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """SIGTERM or SIGINT: shut down gracefully and exit 0 (uvicorn re-raises the signal afterwards)."""

            def stop(signum, frame):
                log.info("HTTP server got signal %s; shutting down (running tasks continue)", signum)
                self.should_exit = True

            old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    Server(config).run()
