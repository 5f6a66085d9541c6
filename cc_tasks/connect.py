"""Which backend a server, a worker or a CLI command uses: ``--backend URL``, else CC_TASKS_BACKEND, else the
local store (CC_TASKS_DIR, or ``--store``). ``nats://`` and ``tls://`` URLs open the NATS backend; anything
else is a store directory."""

from __future__ import annotations

from pathlib import Path

from .backend import Backend
from .config import Settings, redact
from .store import TaskStore

REMOTE_SCHEMES = ("nats://", "tls://")


def is_remote(url: str | None) -> bool:
    return bool(url) and url.startswith(REMOTE_SCHEMES)


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
    if is_remote(url):
        # (imported here, not for a cycle: nats-py is a fifth of a local server's start-up, and only NATS needs it)
        from .nats_backend import NatsBackend

        files = s.nats_files if nats_files is None else nats_files
        return NatsBackend(url, max_concurrent=cap, lease_seconds=lease, **files)
    root = Path(url).expanduser() if url else s.store_dir
    return TaskStore(root, max_concurrent=cap, lease_seconds=lease)


def shown(url: str | None) -> str | None:
    """``url`` without credentials (for logs and replies)."""
    return redact(url) if url else url
