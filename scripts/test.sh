#!/usr/bin/env bash
# The test command: set up .venv (idempotent) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m ruff check .
python -m ruff format --check .
python -m pytest -q "$@"
