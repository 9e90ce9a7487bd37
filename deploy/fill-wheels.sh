#!/usr/bin/env bash
# Fill a wheel directory with every package of deploy/requirements.lock, for
# building the image where no package index can be reached from inside a
# build (see deploy/offline-build.py). Idempotent: pip skips files that are
# already there. This host must be CPython 3.11 on Linux x86_64, the image's
# platform; pip here uses this host's own index configuration.
#
# Usage: deploy/fill-wheels.sh [DIR]   (default: $TRAINER_WHEEL_DIR or
#        /var/cache/trainer-wheels)
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${1:-${TRAINER_WHEEL_DIR:-/var/cache/trainer-wheels}}"
python="${PYTHON:-python3}"
mkdir -p "$dir"
# --no-deps: the lock lists every package already; a lock that misses one
# fails the image build, which is where that should show.
"$python" -m pip download --quiet --only-binary=:all: --no-deps \
    -r deploy/requirements.lock -d "$dir"
echo "wheel dir $dir: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
