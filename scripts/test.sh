#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what it needs, checks the docs, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k cancel).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --tests
# The generated reference pages must match the code (regenerate: .venv/bin/python scripts/gen_reference.py),
# and the docs must build with no broken link, anchor or orphan page.
.venv/bin/python scripts/gen_reference.py --check
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d "$site" || { rm -rf "$site"; exit 1; }
rm -rf "$site"
exec .venv/bin/python -m pytest "$@"
