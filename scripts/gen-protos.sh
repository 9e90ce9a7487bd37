#!/usr/bin/env bash
# Regenerates the Python code for protos/ into trainer/ (the path mirrors the proto package, so
# the code imports as `from trainer.v1 import trainer_pb2`). The generated files are committed;
# `scripts/gen-protos.sh --check` fails when they are not current (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# protoc finds the mypy-protobuf plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) beside that python.
PATH="$(dirname "$PY"):$PATH"
out=.
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/trainer/v1"
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  protos/trainer/v1/*.proto
if [ "${1:-}" = "--check" ]; then
  for f in "$out"/trainer/v1/*; do
    name=trainer/v1/$(basename "$f")
    if ! cmp -s "$f" "$name"; then
      echo "generated code is not current: $name (run scripts/gen-protos.sh)" >&2
      exit 1
    fi
  done
  echo "generated code is current"
fi
