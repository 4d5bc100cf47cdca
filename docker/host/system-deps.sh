#!/usr/bin/env bash
# Make sure the host has what the hub and the test suite need from Debian's packages:
#
#   docker/host/system-deps.sh run     for `make run`: a Docker engine, debootstrap, Node.js + npm
#   docker/host/system-deps.sh test    for `make test`: the same, plus docker-registry, Chromium
#                                      with its driver (the browser test), docker-compose
#                                      (validating docker/docker-compose.yml) and PostgreSQL (the
#                                      audit store's tests start a throwaway server of their own),
#                                      and Prometheus (the metrics test scrapes the hub with one of its own)
#
# As root on Debian/Ubuntu, missing packages are installed with apt-get; otherwise the script
# names what to install and fails. Packages already present are left alone.
set -euo pipefail

declare -A package_of=(
    [dockerd]=docker.io [debootstrap]=debootstrap [npm]=npm [node]=nodejs [docker-registry]=docker-registry
    [chromium]=chromium [chromedriver]=chromium-driver [docker-compose]=docker-compose
    [prometheus]=prometheus
)
commands=(dockerd debootstrap node npm)
[ "${1:-}" = test ] && commands+=(docker-registry chromium chromedriver docker-compose prometheus)

missing=()
for cmd in "${commands[@]}"; do
    command -v "$cmd" >/dev/null || PATH="$PATH:/usr/sbin" command -v "$cmd" >/dev/null || missing+=("${package_of[$cmd]}")
done
# Debian keeps the server's programs off PATH, in /usr/lib/postgresql/<version>/bin.
if [ "${1:-}" = test ] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && ! command -v initdb >/dev/null; then
    missing+=(postgresql)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" iptables ca-certificates >/dev/null
else
    echo "missing Debian packages: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
