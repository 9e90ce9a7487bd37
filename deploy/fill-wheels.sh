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
# Quick path: every pinned name-version already has its wheel.
if "$python" - "$dir" deploy/requirements.lock <<'PY'
import re
import sys
from pathlib import Path

have = set()
for wheel in Path(sys.argv[1]).glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    have.add((re.sub(r"[-_.]+", "-", name).lower(), version))
for line in Path(sys.argv[2]).read_text().splitlines():
    if line.strip() and not line.startswith("#"):
        name, _, version = line.partition("==")
        if (name, version) not in have:
            sys.exit(1)
PY
then
    echo "wheel dir $dir: every locked package is there"
    exit 0
fi
# --no-deps: the lock lists every package already; a lock that misses one
# fails the image build, which is where that should show.
"$python" -m pip download --quiet --only-binary=:all: --no-deps \
    -r deploy/requirements.lock -d "$dir"
echo "wheel dir $dir: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
