"""The NATS JetStream backend: the task engine over JetStream (nats_repo.NatsRepo), for tasks shared by servers
and workers on several machines. ``NatsBackend(url)`` is what ``connect.open_backend`` returns for a
``nats://`` or ``tls://`` URL; the layout of the namespace is in nats_repo's docstring."""

from __future__ import annotations

from .config import default_lease_seconds
from .engine import TaskEngine
from .nats_conn import NatsSettings
from .nats_repo import NatsRepo


class NatsBackend(TaskEngine):
    """``url``: ``nats://[user:pass@]host:port[/NS][?ns=NS&replicas=N]``; ``files``: creds, nkey, tls_ca, tls_cert,
    tls_key (the ``--nats-*`` flags; the environment's CC_TASKS_NATS_* otherwise)."""

    def __init__(
        self,
        url: str,
        *,
        max_concurrent: int | None = None,
        lease_seconds: float | None = None,
        settings: NatsSettings | None = None,
        **files: str | None,
    ):
        lease = lease_seconds or default_lease_seconds(remote=True)
        self.nats = NatsRepo(url, lease_seconds=lease, settings=settings, **files)
        super().__init__(self.nats, max_concurrent=max_concurrent)
        self.url, self.ns = url, self.nats.ns
