"""The docs: the generated reference pages match the code, and the site builds with no broken link, anchor or
orphan page (``mkdocs build --strict``). scripts/test.sh runs both before pytest too; here the suite itself
catches drift."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CC_TASKS_")} | {"NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(150)
def test_the_generated_reference_pages_match_the_code():
    r = _run([sys.executable, "scripts/gen_reference.py", "--check"], timeout=140)
    assert r.returncode == 0, f"{r.stderr[-4000:]}\nregenerate with: .venv/bin/python scripts/gen_reference.py"


@pytest.mark.timeout(150)
def test_the_docs_build_strictly(tmp_path):
    mkdocs = BIN / "mkdocs"
    if not mkdocs.exists():
        pytest.fail(f"{mkdocs} is missing: run scripts/bootstrap.sh (the test extra has mkdocs and mkdocs-material)")
    r = _run([str(mkdocs), "build", "--strict", "-d", str(tmp_path / "site")], timeout=140)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "tools" / "index.html").exists()


def test_the_readme_and_claude_md_stay_short():
    assert len((ROOT / "README.md").read_bytes()) < 12_000  # (wc -c)
    assert len((ROOT / "CLAUDE.md").read_bytes()) < 6_000
