"""The shape of the code: layers point one way (import-linter), lint and format (ruff)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=str(ROOT), capture_output=True, text=True, timeout=120)


def test_layers_have_no_cycle_and_no_upward_import():
    res = _run(str(BIN / "lint-imports"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


def test_ruff_lint_and_format():
    lint = _run(str(BIN / "ruff"), "check", ".")
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = _run(str(BIN / "ruff"), "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout[-3000:]


ADAPTERS = {"files_repo.py", "nats_repo.py", "memory_repo.py", "store.py", "nats_backend.py", "connect.py"}
PROBES = [
    re.compile(r"\.kind\s*[!=]=|==\s*\S*\.kind\b"),  # a backend's kind tested
    re.compile(r"isinstance\([^)]*\b(TaskStore|NatsBackend|FileRepo|NatsRepo|MemoryRepo)\b"),
    re.compile(r"getattr\((self\.)?(backend|store|repo)\b"),  # an optional member probed
    re.compile(r"^\s*(from|import)\s+\S*(store|nats_backend|files_repo|nats_repo|memory_repo)\b"),  # one imported
]


def test_no_module_above_the_adapters_probes_a_backend():
    """What differs between backends is a declared capability (repo.Capabilities), never a kind, a type or an
    optional member tested above the adapters (connect.py alone chooses one)."""
    found = []
    for path in sorted((ROOT / "cc_tasks").glob("*.py")):
        if path.name in ADAPTERS:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in PROBES):
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_no_class_is_over_600_lines():
    too_big = []
    for path in sorted((ROOT / "cc_tasks").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 600:
                too_big.append(f"{path.name}: class {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, "\n".join(too_big)
