#!/usr/bin/env bash
# Install everything cc-tasks needs into this checkout: a virtualenv (.venv) with the package and its
# test dependencies, and the pinned Claude Code CLI (tools/claude-cli/node_modules/.bin/claude).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
CLAUDE_VERSION="$(.venv/bin/python -c 'import json;print(json.load(open("tools/claude-cli/package.json"))["dependencies"]["@anthropic-ai/claude-code"])')"
if [ "$(tools/claude-cli/node_modules/.bin/claude --version 2>/dev/null | cut -d' ' -f1)" != "$CLAUDE_VERSION" ]; then
  (cd tools/claude-cli && npm install --no-audit --no-fund --loglevel=error)
fi
echo "bootstrap: $(.venv/bin/python --version), fastmcp $(.venv/bin/python -c 'import fastmcp;print(fastmcp.__version__)'), claude $(tools/claude-cli/node_modules/.bin/claude --version)"
