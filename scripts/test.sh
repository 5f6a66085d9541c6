#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what it needs, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k cancel).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --tests
exec .venv/bin/python -m pytest "$@"
