#!/usr/bin/env bash
# Regenerates the Python code for protos/trainer/v1/*.proto into
# protos/remote_trainer/contract/trainer/v1/ (the contract distribution). protoc sees protos/ as
# remote_trainer/contract/, so the generated code imports absolutely
# (`from remote_trainer.contract.trainer.v1 import trainer_pb2`) with no rewriting, while the proto
# package (and so the wire) stays `trainer.v1`. trainer.binpb is the descriptor set with the proto's
# comments (source info), which the server's reflection serves so `grpcurl describe` prints them (the
# _pb2 modules drop comments). scripts/gen-errors.py then makes the error catalogue's readable forms
# from the ErrorReason enum's comments in it: protos/remote_trainer/contract/reasons.py and
# docs/errors.md. The generated files are committed;
# `scripts/gen-protos.sh --check` fails when they are not current (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# protoc finds the mypy-protobuf plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) beside that python.
PATH="$(dirname "$PY"):$PATH"
generated=remote_trainer/contract/trainer/v1
out=protos
root=.  # where gen-errors.py writes protos/remote_trainer/contract/reasons.py and docs/errors.md
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  root=$out
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/$generated"
"$PY" -m grpc_tools.protoc -Iremote_trainer/contract=protos \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  --include_source_info --descriptor_set_out="$out/$generated/trainer.binpb" \
  protos/trainer/v1/*.proto >/dev/null
"$PY" scripts/gen-errors.py "$out/$generated/trainer.binpb" "$root"
if [ "${1:-}" = "--check" ]; then
  current() {  # current MADE COMMITTED: fails, naming COMMITTED, when they differ
    if ! cmp -s "$1" "$2"; then
      echo "generated code is not current: $2 (run scripts/gen-protos.sh)" >&2
      exit 1
    fi
  }
  for f in "$out/$generated"/*; do
    current "$f" "protos/$generated/$(basename "$f")"
  done
  for name in protos/remote_trainer/contract/reasons.py docs/errors.md; do
    current "$root/$name" "$name"
  done
  echo "generated code is current"
fi
