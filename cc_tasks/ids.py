"""Helpers every module shares (a leaf: it imports only the error tree): this host's name, task ids, atomic
file writes."""

from __future__ import annotations

import os
import re
import secrets
import socket
from datetime import datetime, timezone
from pathlib import Path

from .errors import InvalidTaskIdError

TASK_ID_RE = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9]{3}-[0-9a-f]{8}")
WORKER_ID_RE = re.compile(r"w-[0-9]+-[0-9a-f]{6}")
HOST = socket.gethostname()


def new_task_id(now: datetime | None = None) -> str:
    """Time-sortable id: ``YYYYMMDD-HHMMSS-mmm-<8 hex>`` (UTC)."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}-{secrets.token_hex(4)}"


def validate_task_id(task_id: object) -> str:
    if not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id):
        shown = repr(task_id)[:80]
        raise InvalidTaskIdError(
            f"invalid task id {shown}: task ids look like 20260101-120000-000-1a2b3c4d "
            "(use an id returned by start_cc_task_async or list_active_tasks)"
        )
    return task_id


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
