"""Connecting to NATS for the JetStream backend: the backend URL and its files (`NatsSettings`), a
redacted form for logs and records, the connection itself (reconnects forever once up, a bounded first
connect), and `retrying`, which rides out leader elections and reconnects.

URL: ``nats://HOST[:PORT][,HOST[:PORT]...][/NAMESPACE]`` (``tls://`` for TLS), with ``user:password@`` or
``token@`` before the first host; ``?namespace=NAME`` (or ``?ns=NAME``) instead of the path, ``?replicas=N``
(1-5, default 1: 3 on a 3-node cluster). The namespace (default ``cc_tasks``) prefixes every stream and
bucket name, so several installations can share one NATS. Files come from flags or the
environment (flags win): ``CC_TASKS_NATS_CREDS`` (a ``.creds`` file), ``CC_TASKS_NATS_NKEY`` (an nkey seed
file), ``CC_TASKS_NATS_TLS_CA``, ``CC_TASKS_NATS_TLS_CERT`` and ``CC_TASKS_NATS_TLS_KEY``.

Credentials live only in `NatsSettings` (as `SecretStr`, hidden from ``repr``) and in the connection; logs,
replies and records get `redacted` URLs. Only the NATS modules import this one (and ``nats``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from pydantic import BaseModel, ConfigDict, SecretStr

from .errors import BackendUnreachableError, NatsConfigError

log = logging.getLogger("cc_tasks.nats")

DEFAULT_NAMESPACE = "cc_tasks"
DEFAULT_PORT = 4222
SCHEMES = ("nats", "tls")
NAMESPACE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_REPLICAS = 5
ENV_FILES = {
    "creds": "CC_TASKS_NATS_CREDS",
    "nkey": "CC_TASKS_NATS_NKEY",
    "tls_ca": "CC_TASKS_NATS_TLS_CA",
    "tls_cert": "CC_TASKS_NATS_TLS_CERT",
    "tls_key": "CC_TASKS_NATS_TLS_KEY",
}
# A dead server is noticed after PING_INTERVAL * MAX_OUTSTANDING_PINGS seconds without a pong (a closed
# socket at once); a lost server is tried again every RECONNECT_WAIT seconds, forever.
PING_INTERVAL = 5
MAX_OUTSTANDING_PINGS = 3
RECONNECT_WAIT = 1
ATTEMPT_TIMEOUT = 2  # one server's TCP + TLS + CONNECT handshake


def is_nats_url(url: str) -> bool:
    """Whether ``url`` names a NATS backend (``nats://`` or ``tls://``) rather than a local store."""
    return url.strip().lower().startswith(tuple(f"{s}://" for s in SCHEMES))


class NatsSettings(BaseModel):
    """Where and how to connect: servers (no credentials in them), namespace, credentials, TLS files."""

    model_config = ConfigDict(frozen=True)

    scheme: str = "nats"
    servers: tuple[str, ...]
    namespace: str = DEFAULT_NAMESPACE
    replicas: int = 1
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds_file: Path | None = None
    nkey_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    connect_timeout: float = 10.0
    name: str = "cc-tasks"

    @property
    def tls(self) -> bool:
        return self.scheme == "tls" or self.tls_ca is not None or self.tls_cert is not None

    @property
    def url(self) -> str:
        """The URL without credentials: what logs, get_server_info and records show."""
        hosts = ",".join(s.split("://", 1)[1] for s in self.servers)
        ns = "" if self.namespace == DEFAULT_NAMESPACE else f"/{self.namespace}"
        replicas = "" if self.replicas == 1 else f"?replicas={self.replicas}"
        return f"{self.scheme}://{hosts}{ns}{replicas}"

    @property
    def auth(self) -> str:
        """How this connection authenticates, without the secret (for get_server_info)."""
        if self.creds_file:
            return "creds"
        if self.nkey_file:
            return "nkey"
        if self.token:
            return "token"
        if self.user:
            return f"user {self.user}"
        return "none"


def _fail(url: str, what: str) -> NatsConfigError:
    return NatsConfigError(f"backend URL {redacted(url)}: {what}")


def _split_url(url: str) -> tuple[str, list[str], str, str]:
    """(scheme, host entries with their userinfo, path, query) of a possibly multi-host URL."""
    m = re.fullmatch(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://(.*?)\s*", url, flags=re.S)
    if not m:
        raise _fail(url, "not a URL; write nats://HOST:4222 (or tls://HOST:4222)")
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme not in SCHEMES:
        raise _fail(url, f"unknown scheme {scheme!r}; use nats://HOST:PORT, or tls://HOST:PORT for TLS")

    def same_scheme(mm: re.Match) -> str:
        if mm.group(1).lower() != scheme:
            raise _fail(url, f"mixes schemes {scheme!r} and {mm.group(1).lower()!r}; use one for every server")
        return ","

    rest = re.sub(r",\s*([A-Za-z][A-Za-z0-9+.-]*)://", same_scheme, rest)
    cut = re.search(r"[/?#]", rest)
    netloc, tail = (rest[: cut.start()], rest[cut.start() :]) if cut else (rest, "")
    if "#" in tail:
        raise _fail(url, "a '#' fragment has no meaning here; remove it (percent-encode a '#' in a password)")
    path, _, query = tail.partition("?")
    return scheme, [e.strip() for e in netloc.split(",")], path, query


def _host(url: str, scheme: str, entry: str) -> tuple[str, str]:
    """``scheme://host:port`` of one entry, and its userinfo ('' when none)."""
    userinfo, at, hostport = entry.rpartition("@")
    if not hostport:
        raise _fail(url, "a server is empty; list servers as HOST:PORT separated by commas")
    try:
        parts = urlsplit(f"{scheme}://{hostport}")
        port = parts.port or DEFAULT_PORT
    except ValueError as e:
        raise _fail(url, f"server {hostport!r}: {e}; write HOST:PORT with PORT between 1 and 65535") from None
    host = parts.hostname
    if not host or parts.path or parts.query:
        raise _fail(url, f"server {hostport!r} is not HOST[:PORT]")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}", userinfo if at else ""


def _file(name: str, path: str | os.PathLike | None) -> Path | None:
    if path is None or str(path) == "":
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise NatsConfigError(f"{name}={str(path)!r}: no such file; give the path of an existing file or unset it")
    if not os.access(p, os.R_OK):
        raise NatsConfigError(f"{name}={str(path)!r}: not readable by this user; fix its permissions")
    return p.resolve()


def nats_settings(
    url: str,
    *,
    creds: str | os.PathLike | None = None,
    nkey: str | os.PathLike | None = None,
    tls_ca: str | os.PathLike | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    connect_timeout: float | None = None,
) -> NatsSettings:
    """The settings a backend URL, flags and the environment describe (flags override the environment);
    `NatsConfigError` naming what is wrong and what to do otherwise."""
    env = os.environ if env is None else env
    scheme, entries, path, query = _split_url(url)
    if "@" in path + query:
        raise _fail(url, "an '@' after the host; percent-encode '/', '?' and '#' in a user name, password or token")

    servers: list[str] = []
    userinfos = set()
    for entry in entries:
        server, userinfo = _host(url, scheme, entry)
        servers.append(server)
        if userinfo:
            userinfos.add(userinfo)
    if len(userinfos) > 1:
        raise _fail(url, "different credentials on different servers; give them once, before the first host")
    user = password = token = None
    if userinfos:
        info = userinfos.pop()
        name, colon, secret = info.partition(":")
        if colon:
            user, password = unquote(name), unquote(secret)
            if not user or not password:
                raise _fail(url, "user:password@ needs both a user and a password")
        else:
            token = unquote(name)

    namespace = path.strip("/")
    replicas = 1
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "replicas":
            if not value.isdigit() or not 1 <= int(value) <= MAX_REPLICAS:
                raise _fail(
                    url, f"replicas={value!r}: give a whole number from 1 to {MAX_REPLICAS} (3 on a 3-node cluster)"
                )
            replicas = int(value)
            continue
        if key not in ("namespace", "ns"):
            raise _fail(url, f"unknown option {key!r}; the options are namespace=NAME (or ns=NAME) and replicas=N")
        if namespace and namespace != value:
            raise _fail(url, "two different namespaces (path and ?namespace=); give one")
        namespace = value
    namespace = namespace or DEFAULT_NAMESPACE
    if not NAMESPACE_RE.fullmatch(namespace):
        raise _fail(
            url,
            f"namespace {namespace!r}: use 1 to 64 letters, digits, '-' or '_' (it prefixes stream and bucket names)",
        )

    def pick(flag: str | os.PathLike | None, key: str) -> Path | None:
        var = ENV_FILES[key]
        if flag is not None and str(flag) != "":
            return _file(f"--nats-{key.replace('_', '-')}", flag)
        return _file(var, env.get(var))

    files = {key: pick(flag, key) for key, flag in zip(ENV_FILES, (creds, nkey, tls_ca, tls_cert, tls_key))}
    if files["creds"] and files["nkey"]:
        raise NatsConfigError(
            f"both a .creds file ({ENV_FILES['creds']}) and an nkey seed ({ENV_FILES['nkey']}) given; keep one"
        )
    if (files["creds"] or files["nkey"]) and (user or token):
        raise _fail(url, "credentials in the URL and a .creds/nkey file; use one way to authenticate")
    if files["tls_cert"] and not files["tls_key"]:
        raise NatsConfigError(
            f"a TLS client certificate without its key: set {ENV_FILES['tls_key']} (or --nats-tls-key) too"
        )
    if files["tls_key"] and not files["tls_cert"]:
        raise NatsConfigError(
            f"a TLS client key without its certificate: set {ENV_FILES['tls_cert']} (or --nats-tls-cert) too"
        )
    extra = {} if connect_timeout is None else {"connect_timeout": connect_timeout}
    return NatsSettings(
        scheme=scheme,
        servers=tuple(servers),
        namespace=namespace,
        replicas=replicas,
        user=user,
        password=password,
        token=token,
        creds_file=files["creds"],
        nkey_file=files["nkey"],
        tls_ca=files["tls_ca"],
        tls_cert=files["tls_cert"],
        tls_key=files["tls_key"],
        **extra,
    )


def redacted(url: str) -> str:
    """``url`` without user, password or token; never raises (an unparseable URL loses every
    ``...@``)."""
    try:
        scheme, entries, path, query = _split_url(url)
        if "@" not in path + query:
            hosts = ",".join(e.rpartition("@")[2] for e in entries)
            return f"{scheme}://{hosts}{path}{'?' + query if query else ''}"
    except NatsConfigError:
        pass
    except Exception:  # (a log line must not fail)
        return "<unparseable URL>"
    # Not parseable, or an '@' past the hosts (a secret with an unencoded '/', '?' or '#'): drop everything
    # up to the last '@'.
    m = re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]*://)(.*)", url, flags=re.S)
    if m and "@" in m.group(2):
        return (m.group(1) + m.group(2).rpartition("@")[2]).strip()
    return re.sub(r"[^/,@\s]*@", "", url).strip()


def tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    """The client's TLS context: the CA file (else the system's), the client certificate if any."""
    if not settings.tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
    except (ssl.SSLError, OSError) as e:
        raise NatsConfigError(f"TLS CA file {settings.tls_ca}: {e}; give a PEM file of CA certificates") from None
    if settings.tls_cert:
        try:
            ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
        except (ssl.SSLError, OSError) as e:
            raise NatsConfigError(
                f"TLS client certificate {settings.tls_cert} / key {settings.tls_key}: {e}; "
                "give a PEM certificate and its unencrypted PEM key"
            ) from None
    return ctx


def _fatal(e: BaseException) -> str | None:
    """What to tell the user when retrying the first connect cannot help (bad credentials, TLS)."""
    if isinstance(e, (nats.errors.AuthorizationError, nats.errors.InvalidUserCredentialsError)):
        return "the server refused the credentials (authorization violation); check the user/password, token, .creds or nkey"
    if "authorization" in str(e).lower() or "authentication" in str(e).lower():
        return f"the server refused the credentials ({e}); check the user/password, token, .creds or nkey"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS verification failed ({e.verify_message}); set CC_TASKS_NATS_TLS_CA to the CA that signed the server's certificate"
    if isinstance(e, ssl.SSLError):
        return f"TLS failed ({e}); check the server's TLS settings and CC_TASKS_NATS_TLS_* (a client certificate if it verifies clients)"
    if isinstance(e, nats.errors.SecureConnRequiredError):
        return "the server requires TLS; use tls://HOST:PORT and set CC_TASKS_NATS_TLS_CA"
    if isinstance(e, nats.errors.SecureConnWantedError):
        return "TLS was asked for but the server does not offer it; use nats:// or enable TLS on the server"
    return None


async def connect(settings: NatsSettings, **handlers) -> Client:
    """A connection that reconnects forever once up. The first connect is bounded by
    ``settings.connect_timeout`` and stops at once on refused credentials or a TLS failure:
    `BackendUnreachableError` saying which. ``handlers`` are nats-py's callbacks (``error_cb``,
    ``disconnected_cb``, ``reconnected_cb``, ``closed_cb``, ...)."""
    nc = Client()
    user_error_cb = handlers.pop("error_cb", None)
    last: list[BaseException] = []
    fatal: list[BaseException] = []
    stopped = asyncio.Event()

    async def error_cb(e: Exception) -> None:
        last[:] = [e]
        if not nc.is_connected and _fatal(e) and not fatal:
            fatal.append(e)
            stopped.set()
        if user_error_cb is not None:
            await user_error_cb(e)
        else:
            log.warning("NATS %s: %s", settings.url, e)

    opts: dict = {
        "servers": list(settings.servers),
        "name": settings.name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": RECONNECT_WAIT,
        "ping_interval": PING_INTERVAL,
        "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
        "connect_timeout": ATTEMPT_TIMEOUT,
        "error_cb": error_cb,
        **handlers,
    }
    if settings.user:
        opts["user"] = settings.user
        opts["password"] = settings.password.get_secret_value() if settings.password else ""
    if settings.token:
        opts["token"] = settings.token.get_secret_value()
    if settings.creds_file:
        opts["user_credentials"] = str(settings.creds_file)
    if settings.nkey_file:
        opts["nkeys_seed"] = str(settings.nkey_file)
    ctx = tls_context(settings)
    if ctx is not None:
        opts["tls"] = ctx

    attempt = asyncio.ensure_future(nc.connect(**opts))
    stop = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({attempt, stop}, timeout=settings.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
        return nc
    failed = attempt.exception() if attempt.done() and not attempt.cancelled() else None
    if isinstance(failed, nats.errors.InvalidCallbackTypeError):
        raise failed  # a programming error, not the network's
    attempt.cancel()
    try:
        await attempt
    except BaseException:  # (the reason is reported below)
        pass
    try:
        await nc.close()
    except Exception:  # (closing a connection that never opened)
        pass
    if fatal:
        why = _fatal(fatal[0])
    elif failed is not None:
        why = _fatal(failed) or str(failed)
    else:
        why = (_fatal(last[0]) if last else None) or (
            f"no server answered within {settings.connect_timeout:g} s (last error: {last[0] if last else 'none'}); "
            "check that nats-server runs with JetStream (-js) and listens on that address"
        )
    raise BackendUnreachableError(f"cannot connect to NATS at {settings.url}: {why}")


# Errors a leader election, a server restart or a reconnect produce: the request may be tried again.
# Logical answers (a compare-and-set conflict, KeyWrongLastSequenceError; a missing key or stream,
# NotFoundError; a bad request) are not among them and propagate at once.
TRANSIENT = (
    nats.errors.TimeoutError,  # incl. FlushTimeoutError; asyncio.TimeoutError is its base
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
# JetStream error codes that mean "no leader / not ready yet". Observed in tests/test_nats_conn.py's leader
# kill: TimeoutError, NoStreamResponseError, ServiceUnavailableError 10008. The others are nats-server's
# errors.json codes for the same situations, not seen there (a 500, so not caught by the 503 rule).
TRANSIENT_ERR_CODES = {
    10007,  # JetStream cluster not assigned to this server
    10008,  # JetStream system temporarily unavailable (a 503)
    10009,  # JetStream cluster can not handle request (not leader)
    10118,  # stream is offline
    10119,  # consumer is offline
}

T = TypeVar("T")


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` is a NATS error that trying again may clear (no leader yet, reconnecting, timeout)."""
    if isinstance(e, (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.NotFoundError)):
        return False
    if isinstance(e, nats.js.errors.BadRequestError):
        return False
    if isinstance(e, TRANSIENT) or isinstance(e, asyncio.TimeoutError):
        return True
    if isinstance(e, nats.js.errors.APIError):
        return e.code == 503 or e.err_code in TRANSIENT_ERR_CODES
    return False


BACKOFF_START = 0.05
BACKOFF_CAP = 1.0
#: ``retrying(..., deadline=FOREVER)``: until the server answers (a worker's writes for its running tasks).
FOREVER = math.inf


async def retrying(fn: Callable[[], Awaitable[T]], *, what: str, deadline: float = 30) -> T:
    """``await fn()``, again after a jittered exponential pause (50 ms doubling to 1 s) while it fails
    with a transient NATS error (`is_transient`), for at most ``deadline`` seconds (`FOREVER`: no limit); then
    `BackendUnreachableError` naming ``what``. Any other error propagates at once.

    A retried write may have landed before its answer was lost: make ``fn`` idempotent (a
    compare-and-set on the revision read before, a message id) or check after a conflict whether the
    value already is yours."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return await fn()
        except Exception as e:
            if not is_transient(e):
                raise
            elapsed = time.monotonic() - start
            if elapsed >= deadline:
                raise BackendUnreachableError(
                    f"{what}: NATS did not answer for {elapsed:.0f} s ({type(e).__name__}: {e}); "
                    "check that the NATS servers run and that a majority of a cluster is up"
                ) from e
            ceiling = min(BACKOFF_CAP, BACKOFF_START * (2**attempt))
            pause = min(ceiling / 2 + random.uniform(0, ceiling / 2), max(0.0, deadline - elapsed))
            attempt += 1
            log.debug("%s: %s: %s; try %d in %.0f ms", what, type(e).__name__, e, attempt + 1, pause * 1000)
            await asyncio.sleep(pause)
