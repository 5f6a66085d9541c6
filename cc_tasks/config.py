"""Configuration from the environment (CLI flags override the same fields)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, Field

from .errors import ClaudeNotFoundError, ConfigError


def default_store_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"cc_tasks-{os.getuid()}"


def default_max_concurrent() -> int:
    """Twice the CPU count, at most one per GiB of memory, between 2 and 16."""
    import psutil

    cpus = os.cpu_count() or 2
    gib = psutil.virtual_memory().total // (1 << 30)
    return max(2, min(16, 2 * cpus, gib))


class Settings(BaseModel):
    store_dir: Path = Field(default_factory=default_store_dir)
    claude_bin: str = "claude"
    default_timeout: float = 3600.0
    max_depth: int = 2
    depth: int = 0
    max_concurrent: int = Field(default_factory=default_max_concurrent)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if env is None else env
        values: dict = {}
        if env.get("CC_TASKS_DIR"):
            values["store_dir"] = Path(env["CC_TASKS_DIR"]).expanduser()
        if env.get("CC_TASKS_CLAUDE_BIN"):
            values["claude_bin"] = env["CC_TASKS_CLAUDE_BIN"]
        for var, key, conv, lo in (
            ("CC_TASKS_DEFAULT_TIMEOUT", "default_timeout", float, 1.0),
            ("CC_TASKS_MAX_DEPTH", "max_depth", int, 0),
            ("CC_TASKS_DEPTH", "depth", int, 0),
            ("CC_TASKS_MAX_CONCURRENT", "max_concurrent", int, 1),
        ):
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            try:
                val = conv(raw)
            except ValueError:
                raise ConfigError(f"{var}={raw!r} is not a number; unset it or give a {conv.__name__}") from None
            if val < lo:
                raise ConfigError(f"{var}={raw!r} must be at least {lo}")
            values[key] = val
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
