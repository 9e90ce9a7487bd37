#!/usr/bin/env bash
# Creates .venv and installs the project into it: `scripts/setup.sh` for the server,
# `scripts/setup.sh dev` for the server and the test tools. Safe to run again; quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=server
[ "${1:-}" = "dev" ] && extras=server,dev
stamp=".venv/.installed-$extras-$(sha1sum pyproject.toml | cut -c1-12)"
if [ -f "$stamp" ]; then
  exit 0
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch and torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1).
.venv/bin/python -m pip install --quiet -e ".[$extras]"
rm -f .venv/.installed-*
touch "$stamp"
