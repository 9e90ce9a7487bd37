#!/usr/bin/env bash
# Creates .venv and installs the project into it, editable: the contract (protos/), the server
# (server/) and the SDK with its CLI (client/). `scripts/setup.sh` for those, `scripts/setup.sh dev`
# adds their optional extras and the test tools (the root pyproject.toml's `dev` group). Safe to run
# again; quick when nothing changed.
#
# --cpu installs PyTorch's CPU-only build (from https://download.pytorch.org/whl/cpu) instead of the
# default CUDA build from PyPI: about 0.2 GB of wheels instead of about 5.5 GB (torch plus the
# nvidia-* CUDA libraries), for hosts without an NVIDIA GPU. The default is unchanged.
#   scripts/setup.sh --cpu        scripts/setup.sh dev --cpu
set -euo pipefail
cd "$(dirname "$0")/.."
extras=server
cpu=""
for arg in "$@"; do
  case "$arg" in
    dev) extras=dev ;;
    --cpu) cpu=-cpu ;;
    *) echo "usage: scripts/setup.sh [dev] [--cpu]" >&2; exit 2 ;;
  esac
done
stamp=".venv/.installed-$extras$cpu-$(cat pyproject.toml ./*/pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  echo "setup: .venv is up to date ($extras${cpu:+, CPU-only torch})"
  exit 0
fi
PY=${PYTHON:-python3}
step() { echo "setup: $* ..."; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
step "upgrading pip"
.venv/bin/python -m pip install --quiet --upgrade pip
# torch and torchvision are pinned in server/pyproject.toml (2.14.1 / 0.29.1).
if [ -n "$cpu" ]; then
  pins=$(grep -oE '"(torch|torchvision)==[^"]+"' server/pyproject.toml | tr -d '"' | tr '\n' ' ')
  step "installing CPU-only $pins from https://download.pytorch.org/whl/cpu"
  # shellcheck disable=SC2086  # the pins are separate arguments
  .venv/bin/python -m pip install --progress-bar on --index-url https://download.pytorch.org/whl/cpu $pins
fi
# The single distribution of earlier versions (remote-trainer) would shadow the namespace: remove it.
.venv/bin/python -m pip uninstall --quiet --yes remote-trainer 2>/dev/null || true
step "installing protos/, server/ and client/ ($extras; the first time downloads torch: minutes)"
if [ "$extras" = dev ]; then
  .venv/bin/python -m pip install --progress-bar on -e ./protos -e "./server[ray,tensorboard]" \
    -e "./client[plot]" --group dev
else
  .venv/bin/python -m pip install --progress-bar on -e ./protos -e ./server -e ./client
fi
rm -f .venv/.installed-*
touch "$stamp"
echo "setup: done. Run the tools from .venv/bin (.venv/bin/trainer-server), or 'source .venv/bin/activate' first."
