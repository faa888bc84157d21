#!/usr/bin/env bash
# Installs the Debian packages the system tests need: PostgreSQL (a throwaway metadata database),
# Redis, and Chromium (the browser test of the connection form drives it headless through Playwright).
# Does nothing when all are present; needs root to install.
set -euo pipefail

missing=()
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    missing+=(postgresql)
fi
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    missing+=(redis-server)
fi
if [ ! -x /usr/bin/chromium ]; then
    missing+=(chromium)
fi

if [ ${#missing[@]} -eq 0 ]; then
    echo "system packages: postgresql, redis-server and chromium are installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "system packages: missing ${missing[*]}; not root, so not installing them:" \
        "the tests that need them will be skipped (install: apt-get install postgresql redis-server chromium)"
    exit 0
fi

echo "system packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The packages' own services are not wanted: the tests start throwaway servers on free ports.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
remove_policy() { if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi; }
trap remove_policy EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "system packages: installed ${missing[*]}"
