"""Backends under test: how the contract suite opens one, makes a worker, and expires a worker's leases."""

from __future__ import annotations

import os
import secrets
import time

from cc_tasks import __version__, procs
from cc_tasks.ids import HOST
from cc_tasks.models import WorkerInfo
from cc_tasks.nats_backend import NatsBackend
from cc_tasks.store import TaskStore

KINDS = ["local", "nats"]


def open_backend(kind: str, address: str, **settings):
    if kind == "local":
        return TaskStore(address, **settings)
    if kind == "nats":
        return NatsBackend(address, **settings)
    raise ValueError(f"unknown backend kind {kind!r}")


def address_for(kind: str, tmp_path, request) -> str:
    """A fresh backend address: a store folder, or a namespace of its own on the session's nats-server."""
    if kind == "nats":
        return request.getfixturevalue("nats_url")  # (a namespace of its own on the session's nats-server)
    return str(tmp_path / "store")


def worker_info(labels: tuple[str, ...] = (), slots: int = 4) -> WorkerInfo:
    """A worker identity for this process (several may share a process: the id differs)."""
    return WorkerInfo(
        worker_id=f"w-{os.getpid()}-{secrets.token_hex(3)}",
        host=HOST,
        proc=procs.ref_of(os.getpid()),
        labels=sorted(labels),
        slots=slots,
        version=__version__,
    )


def expire(backend, worker: WorkerInfo) -> None:
    """Make ``worker`` look gone (its heartbeat stopped long ago), as a SIGKILL, a reboot or a hang would."""
    backend._seen_alive.clear()
    if backend.kind == "local":
        beat = backend.workers_dir / f"{worker.worker_id}.beat"
        beat.write_text(f"{time.monotonic() - 10 * backend.lease_seconds:20.3f}")
        return
    if backend.kind == "nats":  # its key in the workers bucket is gone, as when its TTL runs out
        nats = backend.nats
        nats._run(nats.kv_workers.purge(worker.worker_id))
        nats._connected_at = time.monotonic() - backend.lease_seconds  # (connected long enough to judge)
        return
    raise ValueError(backend.kind)
