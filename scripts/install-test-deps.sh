#!/usr/bin/env bash
# What the test suite starts besides Python: Chromium and its driver (the playground's browser tests),
# redis-server and nginx (the fleet and worker tests), pgbouncer (the tests through a connection
# pooler) and Node.js with npm (the AI SDK client test). Installs the missing ones with apt-get when
# run as root on Debian or Ubuntu; otherwise says what is missing and how to install it.
#
#   scripts/install-test-deps.sh          install what is missing (exit 1 if something still is)
#   scripts/install-test-deps.sh --check  only say what is missing
set -euo pipefail

# command -> Debian package(s)
declare -A PACKAGES=(
    [chromium]="chromium chromium-driver"
    [redis-server]="redis-server"
    [nginx]="nginx"
    [pgbouncer]="pgbouncer"
    [node]="nodejs npm"
)

found() {
    # nginx and pgbouncer live in sbin, which a normal user's PATH may lack
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]
}

missing() {
    local name out=()
    for name in chromium redis-server nginx pgbouncer node; do
        found "$name" || out+=("$name")
    done
    echo "${out[@]:-}"
}

node_packages() {
    # the AI SDK client test's npm packages, exactly as tests/node/package-lock.json pins them
    (cd "$(dirname "$0")/../tests/node" && npm ci --no-audit --no-fund --loglevel=error)
}

absent=$(missing)
if [ -z "$absent" ]; then
    echo "test dependencies: all present (chromium, redis-server, nginx, pgbouncer, node)"
    node_packages
    exit 0
fi
packages=""
for name in $absent; do packages="$packages ${PACKAGES[$name]}"; done
packages=${packages# }

if [ "${1:-}" = "--check" ]; then
    echo "test dependencies missing: $absent (Debian/Ubuntu: apt-get install $packages)" >&2
    exit 1
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing:$([ -n "$packages" ] && echo " $packages")"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null
else
    echo "test dependencies missing: $absent" >&2
    echo "install them as root, e.g.: sudo apt-get install $packages" >&2
    exit 1
fi

absent=$(missing)
if [ -n "$absent" ]; then
    echo "still missing after apt-get: $absent" >&2
    exit 1
fi
echo "test dependencies: all present (chromium, redis-server, nginx, pgbouncer, node)"
node_packages
