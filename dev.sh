#!/usr/bin/env bash
# One entry point for a fresh Debian machine: installs what is missing (Debian
# packages, a virtual environment in .venv), then runs the make target.
#
#   ./dev.sh run [DEMO OPTIONS]   the demo: pong, ipcd, ipc-tcpd, ipc-websocketd, ipc-httpd
#                                 (e.g. ./dev.sh run --tcp-port 9100 --ws-port 8180;
#                                 ./dev.sh run --help lists them)
#   ./dev.sh test                 the whole test suite (what CI runs)
#   ./dev.sh bench                the benchmarks against socat, stunnel, websockify, websocketd
#
# Each target installs only what it needs: the demo needs no browser and no
# test tools.
set -euo pipefail
cd "$(dirname "$0")"

target="${1:-test}"
[ "$#" -gt 0 ] && shift
case "$target" in
    run) debs=(python3 python3-venv make) ;;
    test|lint) debs=(python3 python3-venv make gcc socat openssl systemd iproute2 chromium haproxy nginx-light netcat-openbsd curl) ;;
    bench) debs=(python3 python3-venv make gcc libssl-dev socat stunnel4 hitch websocketd python3-websockify openssl wrk) ;;
    *) echo "usage: $0 run [DEMO OPTIONS] | test | bench | lint" >&2; exit 2 ;;
esac
if [ "$target" != run ] && [ "$#" -gt 0 ]; then
    echo "$0 $target takes no options (got: $*)" >&2
    exit 2
fi

missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # haproxy and nginx start a system-wide service on install; the tests
    # start their own on loopback, so none may be left running: a
    # policy-rc.d that answers 101 ("not allowed") keeps them stopped.
    added_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    $sudo apt-get update -q
    status=0
    $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" || status=$?
    [ -n "$added_policy" ] && $sudo rm -f /usr/sbin/policy-rc.d
    [ "$status" = 0 ] || exit "$status"
fi

if [ "$target" = run ] && [ "$#" -gt 0 ]; then
    # Options go to the demo as they are (printf %q keeps each word whole).
    exec make run DEMO_ARGS="$(printf '%q ' "$@")"
fi
exec make "$target"
