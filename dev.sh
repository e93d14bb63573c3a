#!/usr/bin/env bash
# One entry point for a fresh Debian machine: installs what is missing (Debian
# packages, a virtual environment in .venv), then runs the make target.
#
#   ./dev.sh run     the demo: pong, ipcd, ipc-tcpd, ipc-websocketd
#   ./dev.sh test    the whole test suite (what CI runs)
#   ./dev.sh bench   the benchmarks against socat, stunnel, websockify, websocketd
set -euo pipefail
cd "$(dirname "$0")"

target="${1:-test}"
case "$target" in
    run|test|lint) debs=(python3 python3-venv make gcc socat openssl systemd iproute2 chromium) ;;
    bench) debs=(python3 python3-venv make gcc libssl-dev socat stunnel4 websocketd python3-websockify openssl) ;;
    *) echo "usage: $0 run|test|bench|lint" >&2; exit 2 ;;
esac

missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q
    $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

exec make "$target"
