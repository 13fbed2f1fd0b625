#!/usr/bin/env bash
# Install what bench/run needs: wrk and etcd from Debian's packages, and
# corral in the repository's .venv (scripts/venv.sh creates it if missing).
# Run it as root or with sudo. It installs nothing that is already there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v etcd >/dev/null || missing+=(etcd-server)

if ((${#missing[@]})); then
    apt-get update
    for package in "${missing[@]}"; do
        policy="$(apt-cache policy "$package")"
        if [[ "$policy" != *"Candidate: "[0-9]* ]]; then
            echo "bench/setup.sh: package $package has no install candidate in apt's sources" >&2
            exit 1
        fi
    done
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

if [[ ! -x "$root/.venv/bin/corral" ]]; then
    source "$root/scripts/venv.sh"
fi
