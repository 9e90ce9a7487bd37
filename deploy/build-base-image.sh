#!/usr/bin/env bash
# Build a local stand-in for the image the Dockerfile starts FROM, for hosts
# that cannot reach a Docker registry (this project's CI). It is Debian
# bookworm made by debootstrap from Debian's own packages, with Debian's
# python3.11 and venv, tagged under the official image's name so that the
# Dockerfile builds unchanged. A host that can pull the official image never
# needs this.
#
# Usage: deploy/build-base-image.sh [IMAGE]   (default python:3.11-slim-bookworm)
# Env:   DEBIAN_MIRROR (default: the first deb URI in this host's apt sources,
#        else http://deb.debian.org/debian)
#        FORCE=1 rebuilds even when IMAGE exists.
set -euo pipefail

image="${1:-python:3.11-slim-bookworm}"

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image already present"
    exit 0
fi

mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    mirror="$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*debian\)$/\1/p' \
        /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

root="$(mktemp -d /var/tmp/base-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT

echo "debootstrap bookworm from $mirror into $root"
# minbase: essential + apt only. python3-venv brings ensurepip (pip inside a
# venv), which is all the Dockerfile uses; ca-certificates and netbase are
# what the official slim image carries too. The CA bundle is Debian's own
# package, built inside the chroot: nothing of this host's is copied in.
debootstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates,netbase \
    bookworm "$root" "$mirror"

# The official image has python on /usr/local/bin; give the same names.
ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
# Trim what an image does not need.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/tmp/*

tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "local stand-in for $image (debootstrap bookworm)" \
    - "$image"
docker image ls "$image"
