#!/usr/bin/env bash
# The project's test command (what `make test` and CI run): lint, then the whole pytest suite
# (slow and cluster tests included) inside a loopback-only network namespace when possible.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -k config
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
echo "== ruff"
"$VENV/bin/ruff" check .
echo "== pytest"
# pytest exits 5 when no test ran: that is a failure too (set -e keeps any non-zero status).
scripts/netns.sh "$VENV/bin/python" -m pytest "$@"
