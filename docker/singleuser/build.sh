#!/usr/bin/env bash
# Build the Debian single-user image, once per content: prints the tag it built or found.
#
#   docker/singleuser/build.sh REPO [PACKAGES]
#     REPO      image repository, e.g. gpuspawner/singleuser
#     PACKAGES  PyPI packages beside jupyterhub (default: jupyterlab; the tests use jupyter_server)
#
# The tag is a hash of the Dockerfile, the base image, the JupyterHub version and PACKAGES, so an
# unchanged image is never rebuilt and a changed one never reused. JupyterHub's version is the
# one installed beside this script's python3 (the hub's), so hub and single-user server match.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=${1:?usage: $0 REPO [PACKAGES]}
packages=${2:-jupyterlab}
python=${PYTHON:-python3}
base=gpuspawner/debian-base:bookworm

"$here/../base/build-debian-base.sh" "$base"
jhv=$("$python" -c 'import importlib.metadata as m; print(m.version("jupyterhub"))')
base_id=$(docker image inspect --format '{{.Id}}' "$base")
key=$( { cat "$here/Dockerfile"; echo "$base_id $jhv $packages"; } | sha256sum | cut -c1-12)
tag="$repo:$key"

if ! docker image inspect "$tag" >/dev/null 2>&1; then
    # The CA bundle the host's pip trusts goes into the build: PyPI may sit behind a proxy.
    ca=${PIP_CERT:-$("$python" -m pip config get global.cert 2>/dev/null || true)}
    [ -n "$ca" ] || ca=$("$python" -c 'import pip._vendor.certifi as c; print(c.where())')
    ctx=$(mktemp -d)
    trap 'rm -rf "$ctx"' EXIT
    cp "$here/Dockerfile" "$ctx/"
    cp "$ca" "$ctx/pip-ca.crt"
    echo "building $tag (jupyterhub $jhv, $packages)" >&2
    docker build --quiet --network host --build-arg "BASE=$base" \
        --build-arg "JUPYTERHUB_VERSION=$jhv" --build-arg "PACKAGES=$packages" \
        -t "$tag" "$ctx" >/dev/null
fi
echo "$tag"
