#!/usr/bin/env bash
# The project's test command (README, and CI through .ci/run): sets up .venv when needed, then checks
# that the generated code is current, lints the proto, type-checks protos/, client/ and server/ (mypy
# --strict), and runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k training`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export PATH="$PWD/.venv/bin:$PATH"

echo "== generated code is current"
PYTHON=.venv/bin/python scripts/gen-protos.sh --check

echo "== buf lint"
scripts/buf.sh lint

echo "== mypy --strict"
.venv/bin/mypy

echo "== pytest"
.venv/bin/python -m pytest "$@"
