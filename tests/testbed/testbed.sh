#!/usr/bin/env bash
# The Docker side of gpuspawner's test bed.
#
#   tests/testbed/testbed.sh start    make sure a Docker engine answers; if none does and we may
#                                    start one, start dockerd with the stand-in
#                                    nvidia-container-runtime-hook on its PATH
#   tests/testbed/testbed.sh engine   make sure a Docker engine answers, starting a plain dockerd
#                                    (no stand-in hook) if none does: what `make run` needs
#   tests/testbed/testbed.sh stop     stop the dockerd this script started
#   tests/testbed/testbed.sh status   say which engine answers and whether it takes GPU requests
#
# State lives in $GPUSPAWNER_TESTBED (default /var/tmp/gpuspawner-testbed): the installed hook,
# the hook's records (one JSON file per GPU container), dockerd's pid file and log.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
testbed=${GPUSPAWNER_TESTBED:-/var/tmp/gpuspawner-testbed}
pidfile=$testbed/dockerd.pid
log=$testbed/dockerd.log

say() { printf 'testbed: %s\n' "$*" >&2; }

engine_answers() { docker info >/dev/null 2>&1; }

ours_running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

real_hook() {
    # A host with NVIDIA's container toolkit has the real hook; the stand-in must never shadow it.
    command -v nvidia-container-runtime-hook 2>/dev/null | grep -v "^$testbed/bin/" || true
}

install_hook() {
    local python
    python=$(readlink -f "$(command -v python3)")
    mkdir -p "$testbed/bin" "$testbed/hook-records"
    sed -e "s|@PYTHON@|$python|" -e "s|@RECORDS_DIR@|$testbed/hook-records|" \
        "$here/nvidia-container-runtime-hook.in" >"$testbed/bin/nvidia-container-runtime-hook"
    chmod 0755 "$testbed/bin/nvidia-container-runtime-hook"
}

start() {
    local with_hook=$1
    if engine_answers; then
        if ours_running && [ -f "$testbed/dockerd.with-hook" ]; then
            install_hook  # refresh the hook in place: runc runs it by path at each container start
            say "dockerd (pid $(cat "$pidfile")) already running with the stand-in hook"
        elif ours_running; then
            say "dockerd (pid $(cat "$pidfile")) already running, without the stand-in hook"
        else
            say "using the Docker engine that already answers (not started by the test bed)"
        fi
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v dockerd >/dev/null; then
        say "no Docker engine answers, and this script can only start one as root with dockerd installed"
        say "install Debian's docker.io and run: sudo $0 start"
        return 1
    fi
    local path=$PATH
    mkdir -p "$testbed"
    rm -f "$testbed/dockerd.with-hook"
    if [ "$with_hook" = yes ] && [ -z "$(real_hook)" ]; then
        install_hook
        # dockerd looks the hook up on its own PATH once, at start-up.
        path="$testbed/bin:$PATH"
        touch "$testbed/dockerd.with-hook"
        say "starting dockerd with the stand-in nvidia-container-runtime-hook (log: $log)"
    else
        say "starting dockerd (log: $log)"
    fi
    PATH=$path setsid dockerd --pidfile "$pidfile" >"$log" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        if engine_answers; then
            say "dockerd is up: $(docker version --format 'server {{.Server.Version}}')"
            return 0
        fi
        sleep 0.5
    done
    say "dockerd did not answer within 60 s; the end of its log:"
    tail -n 30 "$log" >&2
    return 1
}

stop() {
    if ours_running; then
        kill "$(cat "$pidfile")"
        for _ in $(seq 1 60); do ours_running || { say "dockerd stopped"; return 0; }; sleep 0.5; done
        say "dockerd did not stop within 30 s"
        return 1
    fi
    say "no dockerd started by the test bed is running"
}

status() {
    if ! engine_answers; then
        say "no Docker engine answers"
        return 1
    fi
    say "engine: $(docker version --format 'server {{.Server.Version}}')"
    if ours_running; then
        say "started by the test bed, stand-in hook at $testbed/bin, records in $testbed/hook-records"
    fi
}

case "${1:-}" in
    start) start yes ;;
    engine) start no ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|engine|stop|status" >&2; exit 2 ;;
esac
