"""The checks a server makes of its environment before it answers anything: standard library only, since the
stdio front (front.py) runs them before it has imported the rest. config.py and store.py use them too."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError, UnsafeStoreError

#: Numeric settings: variable, Settings field, type, least value.
NUMERIC_SETTINGS = (
    ("CC_TASKS_DEFAULT_TIMEOUT", "default_timeout", float, 1.0),
    ("CC_TASKS_MAX_DEPTH", "max_depth", int, 0),
    ("CC_TASKS_DEPTH", "depth", int, 0),
    ("CC_TASKS_MAX_CONCURRENT", "max_concurrent", int, 1),
    ("CC_TASKS_LEASE_SECONDS", "lease_seconds", float, 1.0),
)


def number(name: str, raw: str, conv: type, lo: float) -> float:
    """``raw`` (the value of variable ``name``) as a number of at least ``lo``, or a clear error."""
    try:
        value = conv(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number; unset it or give a {conv.__name__}") from None
    if value < lo:
        raise ConfigError(f"{name}={raw!r} must be at least {lo:g}")
    return value


def default_store_dir() -> Path:
    import tempfile  # (not at the top: a sub-agent's server, which has CC_TASKS_DIR, starts without it)

    return Path(tempfile.gettempdir()) / f"cc_tasks-{os.getuid()}"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 if missing; refuse it if it is unsafe."""
    path = Path(os.path.abspath(path))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStoreError(f"task store {path} is a symlink; refusing it (set CC_TASKS_DIR to a real directory)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStoreError(f"task store {path} is not a directory")
    if st.st_uid != os.getuid():
        raise UnsafeStoreError(
            f"task store {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
            "remove it or set CC_TASKS_DIR to a directory of your own"
        )
    if st.st_mode & 0o022:
        raise UnsafeStoreError(
            f"task store {path} is group- or world-writable (mode {oct(st.st_mode & 0o777)}); "
            f"run 'chmod 700 {path}' or set CC_TASKS_DIR elsewhere"
        )
    return path


def check_environment(env: Mapping[str, str]) -> None:
    """What a server refuses to start with: a numeric setting that is not a number or too small, and (on
    the local store: CC_TASKS_DIR, or a path in CC_TASKS_BACKEND) a store directory that is unsafe (created
    if missing). A remote backend is checked when the server connects to it."""
    for var, _, conv, lo in NUMERIC_SETTINGS:
        if env.get(var):
            number(var, env[var], conv, lo)
    backend = env.get("CC_TASKS_BACKEND")
    if not backend:
        ensure_private_dir(Path(env["CC_TASKS_DIR"]).expanduser() if env.get("CC_TASKS_DIR") else default_store_dir())
    elif "://" not in backend:  # a local store's path
        ensure_private_dir(Path(backend).expanduser())


#: The NATS backend's files: ``--nats-<key>`` flags (cc-tasks, python -m cc_tasks.worker), else these variables
#: (read by nats_conn.nats_settings); the keys are Settings.nats_files's.
NATS_FILES = {
    "creds": ("CC_TASKS_NATS_CREDS", "a NATS .creds file (user JWT and nkey seed)"),
    "nkey": ("CC_TASKS_NATS_NKEY", "a NATS nkey seed file"),
    "tls_ca": ("CC_TASKS_NATS_TLS_CA", "the CA certificates (PEM) that signed the NATS servers' certificates"),
    "tls_cert": ("CC_TASKS_NATS_TLS_CERT", "a TLS client certificate (PEM) for NATS"),
    "tls_key": ("CC_TASKS_NATS_TLS_KEY", "the TLS client certificate's key (PEM)"),
}
