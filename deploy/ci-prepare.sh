#!/usr/bin/env bash
# Get a Docker engine ready for the end-to-end deployment test
# (tests/test_deployment.py, marked `docker`), on a Debian host with no
# Docker registry in reach, as CI does before the test suite:
#
#   1. installs Debian's docker.io and debootstrap when they are missing;
#   2. starts dockerd in the background when no engine answers, and waits;
#   3. builds the local stand-in of the base image when it is absent
#      (deploy/build-base-image.sh);
#   4. fills the wheel directory the offline build installs from
#      (deploy/fill-wheels.sh).
#
# Idempotent: each step is skipped when its result is already there. It never
# fails the CI run: when a step cannot be done it says why and exits 0, and
# the e2e test then skips with the reason (no engine), or fails (no base
# image or wheels while an engine runs).
set -uo pipefail
cd "$(dirname "$0")/.."

log() { echo "ci-prepare: $*"; }
give_up() { log "$*; the Docker e2e test will skip or fail with the reason"; exit 0; }

export DEBIAN_FRONTEND=noninteractive
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    if [[ $(id -u) != 0 ]]; then
        give_up "docker.io/debootstrap missing and not root, cannot install them"
    fi
    log "installing docker.io and debootstrap"
    apt-get update -qq >/dev/null || give_up "apt-get update failed"
    apt-get install -y -qq docker.io debootstrap >/dev/null || give_up "apt-get install docker.io debootstrap failed"
fi

if docker info >/dev/null 2>&1; then
    log "a Docker engine is running"
else
    dockerd_log=/var/log/ci-dockerd.log
    log "starting dockerd (log: $dockerd_log)"
    # setsid: the daemon outlives this script, in its own session.
    setsid nohup dockerd >"$dockerd_log" 2>&1 </dev/null &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        if ! kill -0 $! 2>/dev/null; then
            tail -n 20 "$dockerd_log"
            give_up "dockerd exited at start"
        fi
        sleep 1
    done
    docker info >/dev/null 2>&1 || { tail -n 20 "$dockerd_log"; give_up "dockerd did not answer within 60 s"; }
    log "dockerd is up: $(docker info --format '{{.ServerVersion}} {{.Driver}}')"
fi

# Images left untagged by earlier builds (a changed lock leaves a 6 GB one
# behind); only dangling ones, never the layer cache of tagged images.
docker image prune --force >/dev/null 2>&1 || true

started=$SECONDS
bash deploy/build-base-image.sh || give_up "could not build the base image"
log "base image ready ($((SECONDS - started))s)"

started=$SECONDS
bash deploy/fill-wheels.sh 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2) \
    || give_up "could not fill the wheel directory"
log "wheel directory ready ($((SECONDS - started))s)"
