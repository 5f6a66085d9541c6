"""Configuration from the environment (CLI flags override the same fields)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import psutil
from pydantic import BaseModel, Field

from .checks import NUMERIC_SETTINGS, default_store_dir, number
from .errors import ClaudeNotFoundError, ConfigError


def default_max_concurrent() -> int:
    """CC_TASKS_MAX_CONCURRENT, else twice the CPU count, at most one per GiB of memory, between 2 and 16."""
    raw = os.environ.get("CC_TASKS_MAX_CONCURRENT")
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"CC_TASKS_MAX_CONCURRENT={raw!r} must be a whole number of at least 1")
        return value
    cpus = os.cpu_count() or 2
    gib = psutil.virtual_memory().total // (1 << 30)
    return max(2, min(16, 2 * cpus, gib))


def _env_float(name: str, default: float, lo: float) -> float:
    raw = os.environ.get(name)
    return number(name, raw, float, lo) if raw else default


#: The lease on NATS when CC_TASKS_LEASE_SECONDS is not set: a JetStream leader election (4-8 s measured, plus
#: the clients' backoff) must not make live workers look gone.
NATS_LEASE_SECONDS = 30.0


def default_lease_seconds(remote: bool = False) -> float:
    """How long a worker that stops renewing (hung, or on a host where its pid cannot be checked) keeps its
    leases: CC_TASKS_LEASE_SECONDS, default 10 s (30 s on NATS: ``remote``)."""
    return _env_float("CC_TASKS_LEASE_SECONDS", NATS_LEASE_SECONDS if remote else 10.0, 1.0)


def default_worker_idle() -> float:
    """Seconds the store's on-demand worker waits with nothing to do before it exits (CC_TASKS_WORKER_IDLE)."""
    return _env_float("CC_TASKS_WORKER_IDLE", 600.0, 1.0)


#: How deep sub-agents may nest by default (CC_TASKS_MAX_DEPTH): the user's session is depth 0.
DEFAULT_MAX_DEPTH = 2


class Settings(BaseModel):
    store_dir: Path = Field(default_factory=default_store_dir)
    #: CC_TASKS_BACKEND: a nats:// or tls:// URL (NATS JetStream), else None: the local store at ``store_dir``
    backend: str | None = None
    #: The ``--nats-*`` flags: creds, nkey, tls_ca, tls_cert, tls_key -> a file (else CC_TASKS_NATS_*, read by
    #: nats_conn when a NATS backend opens)
    nats_files: dict[str, str] = Field(default_factory=dict)
    claude_bin: str = "claude"
    default_timeout: float = 3600.0
    max_depth: int = DEFAULT_MAX_DEPTH
    depth: int = 0
    max_concurrent: int = Field(default_factory=default_max_concurrent)
    lease_seconds: float = Field(default_factory=default_lease_seconds)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if env is None else env
        values: dict = {}
        if env.get("CC_TASKS_DIR"):
            values["store_dir"] = Path(env["CC_TASKS_DIR"]).expanduser()
        if env.get("CC_TASKS_BACKEND"):
            values["backend"] = env["CC_TASKS_BACKEND"]
        if env.get("CC_TASKS_CLAUDE_BIN"):
            values["claude_bin"] = env["CC_TASKS_CLAUDE_BIN"]
        for var, key, conv, lo in NUMERIC_SETTINGS:
            raw = env.get(var)
            if raw:
                values[key] = number(var, raw, conv, lo)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def resolve_claude(self) -> str:
        """The absolute path of the claude binary, or a clear error."""
        name = self.claude_bin
        if os.sep in name:
            path = Path(name).expanduser()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path.resolve())
            raise ClaudeNotFoundError(
                f"claude CLI not found: CC_TASKS_CLAUDE_BIN={name!r} is not an executable file; "
                "point it at the claude binary or unset it to use 'claude' from PATH"
            )
        found = shutil.which(name)
        if not found:
            raise ClaudeNotFoundError(
                f"claude CLI not found: {name!r} is not on PATH; install it "
                "(npm install -g @anthropic-ai/claude-code) or set CC_TASKS_CLAUDE_BIN to its path"
            )
        return found
