#!/usr/bin/env bash
# Install what bench/dns/run needs: dnsperf from Debian's packages, and corral in the
# repository's .venv (scripts/venv.sh creates it if missing). Run as root, or with sudo;
# it installs nothing that is already there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if ! command -v dnsperf >/dev/null; then
    apt-get update
    policy="$(apt-cache policy dnsperf)"
    if [[ "$policy" != *"Candidate: "[0-9]* ]]; then
        echo "bench/dns/setup.sh: package dnsperf has no install candidate in apt's sources" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y dnsperf
fi

if [[ ! -x "$root/.venv/bin/corral" ]]; then
    source "$root/scripts/venv.sh"
fi
