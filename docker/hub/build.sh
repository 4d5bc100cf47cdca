#!/usr/bin/env bash
# Build the hub image from this checkout:
#
#   docker/hub/build.sh [TAG]          (default TAG: gpuspawner/hub:local)
#   BASE=debian:bookworm-20250520-slim docker/hub/build.sh
#
# BASE defaults to the Debian base made locally by docker/base/build-debian-base.sh, for hosts
# that reach no public registry. The CA bundle the host's pip trusts goes into the build
# (docker/hub/extra-ca/), for PyPI and npm behind a TLS-inspecting proxy. The build context
# holds only what .dockerignore lets through.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
tag=${1:-gpuspawner/hub:local}
python=${PYTHON:-python3}
base=${BASE:-gpuspawner/debian-base:bookworm}
if [ "$base" = gpuspawner/debian-base:bookworm ]; then
    "$root/docker/base/build-debian-base.sh" "$base"
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
(cd "$root" && cp -r setup.cfg pyproject.toml README.md gpuspawner jupyterhub_config.py .dockerignore "$ctx/")
mkdir -p "$ctx/docker/hub"
cp -r "$root/docker/hub/Dockerfile" "$root/docker/hub/extra-ca" "$ctx/docker/hub/"
ca=${PIP_CERT:-$("$python" -m pip config get global.cert 2>/dev/null || true)}
[ -n "$ca" ] && [ -f "$ca" ] && cp "$ca" "$ctx/docker/hub/extra-ca/build-host-ca.crt"
find "$ctx" -name __pycache__ -prune -exec rm -rf {} +

echo "building $tag from $base" >&2
docker build --quiet --network host --build-arg "BASE=$base" \
    --build-arg "REVISION=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)" \
    -f "$ctx/docker/hub/Dockerfile" -t "$tag" "$ctx" >/dev/null
echo "$tag"
