#!/usr/bin/env bash
# The README's two commands: set everything up (idempotent), then run the demo sweep or the tests.
#   bash scripts/quickstart.sh demo [sweep flags...]   -> python sweeps/full_paper.py on the built-in dataset
#   bash scripts/quickstart.sh test [pytest flags...]  -> the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
shift || true
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
case "$what" in
    demo) exec .venv/bin/python sweeps/full_paper.py "$@" ;;
    test) exec .venv/bin/python -m pytest -q "$@" ;;
    *) echo "usage: bash scripts/quickstart.sh demo|test [args...]" >&2; exit 2 ;;
esac
