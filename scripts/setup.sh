#!/usr/bin/env bash
# Creates .venv and installs the project into it, editable: the contract (protos/), the server
# (server/) and the SDK with its CLI (client/). `scripts/setup.sh` for those, `scripts/setup.sh dev`
# adds their optional extras and the test tools (the root pyproject.toml's `dev` group). Safe to run
# again; quick when nothing changed.
#
# Which PyTorch build: on a host without an NVIDIA GPU (no nvidia-smi on the PATH, no
# /proc/driver/nvidia) the CPU-only build from https://download.pytorch.org/whl/cpu, about 0.2 GB of
# wheels, rather than the CUDA build from PyPI, about 5.5 GB (torch plus the nvidia-* CUDA
# libraries); it says which it chose and why. Where that index cannot be reached (a network that
# reaches PyPI only), it says so and installs the build from PyPI after all. --cpu asks for the
# CPU-only build whatever the host (and fails if pip finds none), --cuda for the CUDA build.
#   scripts/setup.sh [dev] [--cpu | --cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
extras=server
build=auto
for arg in "$@"; do
  case "$arg" in
    dev) extras=dev ;;
    --cpu) build=cpu ;;
    --cuda) build=cuda ;;
    *) echo "usage: scripts/setup.sh [dev] [--cpu | --cuda]" >&2; exit 2 ;;
  esac
done
cpu=""
if [ "$build" = cpu ]; then
  cpu=-cpu
elif [ "$build" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia ]; then
    echo "setup: an NVIDIA GPU driver is here: the CUDA build of PyTorch (--cpu for the CPU-only one)"
  else
    cpu=-cpu
    echo "setup: no NVIDIA GPU here (no nvidia-smi, no /proc/driver/nvidia): the CPU-only build of PyTorch" \
      "(--cuda for the CUDA one)"
  fi
fi
stamp=".venv/.installed-$extras$cpu-$(cat pyproject.toml ./*/pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then  # it holds which torch build was installed
  installed=$(cat "$stamp")
  echo "setup: .venv is up to date ($extras${installed:+, $installed})"
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
installed="torch from PyPI"
if [ -n "$cpu" ]; then
  pins=$(grep -oE '"(torch|torchvision)==[^"]+"' server/pyproject.toml | tr -d '"' | tr '\n' ' ')
  step "installing CPU-only $pins from https://download.pytorch.org/whl/cpu"
  # shellcheck disable=SC2086  # the pins are separate arguments
  if ! .venv/bin/python -m pip install --progress-bar on --retries 1 --timeout 20 \
      --index-url https://download.pytorch.org/whl/cpu $pins && [ "$build" = cpu ]; then
    exit 1  # asked for by --cpu: no other build instead
  fi
  # What came: the CPU-only build (a +cpu version), or, where that index could not be reached,
  # whatever pip's other sources had (a mirror of PyPI), or nothing yet (PyPI's, installed below).
  version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || echo "none")
  case "$version" in
    *+cpu) installed="CPU-only torch" ;;
    *) echo "setup: torch $version, not the CPU-only build: https://download.pytorch.org/whl/cpu could not be" \
         "reached (then PyPI's build, the CUDA one, about 5.5 GB; it runs on the CPU as well), or another" \
         "build was installed already (remove .venv to start afresh)"
       installed="torch from PyPI (not the CPU-only build)" ;;
  esac
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
echo "$installed" > "$stamp"
echo "setup: done. Run the tools from .venv/bin (.venv/bin/trainer-server), or 'source .venv/bin/activate' first."
