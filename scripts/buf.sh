#!/usr/bin/env bash
# Runs buf (from npm's @bufbuild/buf, installed into .tools/ on first use): `scripts/buf.sh lint`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .tools/node_modules/.bin/buf ]; then
  mkdir -p .tools
  npm install --silent --prefix .tools @bufbuild/buf@1.75.0 >/dev/null
fi
exec .tools/node_modules/.bin/buf "$@"
