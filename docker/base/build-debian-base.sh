#!/usr/bin/env bash
# Build a minimal Debian base image from Debian packages alone, for hosts that reach no
# public container registry:
#
#   docker/base/build-debian-base.sh [TAG]      (default TAG: gpuspawner/debian-base:bookworm)
#
# debootstrap makes a bookworm rootfs with Python 3 and its venv module, and `docker import`
# turns it into an image. An image already present under TAG is kept as it is, so a second
# run costs nothing. The test images (tests/images/) and the hub image (docker/) build FROM it.
# Needs root, debootstrap and a running Docker engine.
set -euo pipefail

tag=${1:-gpuspawner/debian-base:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv,ca-certificates,tini

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag is present" >&2
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    echo "debootstrap is missing: install Debian's debootstrap package (apt-get install debootstrap)" >&2
    exit 1
fi

rootfs=$(mktemp -d /var/tmp/gpuspawner-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap $suite into $rootfs (a few minutes)" >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    exit 1
}
rm -f "$rootfs.log"
# An image carries no apt lists or caches: they are large and stale the day after.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb

tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "$tag" >/dev/null
echo "built $tag" >&2
