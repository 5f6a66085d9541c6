"""Which backend a server, a worker or a CLI command uses: ``--backend URL``, else CC_TASKS_BACKEND, else the
local store (CC_TASKS_DIR, or ``--store``). ``nats://`` and ``tls://`` URLs open the NATS backend; anything
else is a store directory (any other ``scheme://`` is refused: it is a mistyped URL, not a folder name)."""

from __future__ import annotations

import re
from pathlib import Path

from .config import NATS_LEASE_SECONDS, Settings
from .engine import TaskEngine as Backend
from .errors import ConfigError
from .store import TaskStore

REMOTE_SCHEMES = ("nats://", "tls://")
_URL = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(url: str | None) -> bool:
    """Whether ``url`` names the NATS backend (the scheme in any case: ``NATS://`` too)."""
    return bool(url) and url.strip().lower().startswith(REMOTE_SCHEMES)


def open_backend(
    url: str | None = None,
    *,
    settings: Settings | None = None,
    max_concurrent: int | None = None,
    lease_seconds: float | None = None,
    nats_files: dict[str, str] | None = None,
) -> Backend:
    """The backend at ``url`` (None: the settings' backend, else their store directory). ``nats_files``: the
    ``--nats-*`` flags (creds, nkey, tls_ca, tls_cert, tls_key), else the settings'."""
    s = settings or Settings.from_env()
    url = url or s.backend
    cap = max_concurrent or s.max_concurrent
    lease = lease_seconds or s.lease_seconds
    if url and not is_remote(url) and _URL.match(url):
        raise ConfigError(
            f"backend {shown(url)}: not a backend URL; use nats://HOST:PORT or tls://HOST:PORT for NATS, or a "
            "directory path for the local store"
        )
    if is_remote(url):
        # (imported here, not for a cycle: nats-py is a fifth of a local server's start-up, and only NATS needs it)
        from .nats_backend import NatsBackend

        files = s.nats_files if nats_files is None else nats_files
        if not lease_seconds and "lease_seconds" not in s.model_fields_set:
            lease = NATS_LEASE_SECONDS  # (CC_TASKS_LEASE_SECONDS not set: NATS's own default)
        return NatsBackend(url, max_concurrent=cap, lease_seconds=lease, **files)
    root = Path(url).expanduser() if url else s.store_dir
    return TaskStore(root, max_concurrent=cap, lease_seconds=lease)


def shown(url: str | None) -> str | None:
    """``url`` without credentials (for logs and replies): nats_conn.redacted for anything like a URL (imported
    only then, as above); a directory path as it is."""
    if not url or not _URL.match(url):
        return url
    from .nats_conn import redacted

    return redacted(url)
