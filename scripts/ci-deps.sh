#!/usr/bin/env bash
# Install the programs that the acceptance tests need beyond Python, from
# Debian's packages: prometheus, for tests/test_prometheus.py, haproxy, for
# tests/test_haproxy.py, and dig (in dnsutils), for tests/test_dns_tools.py.
# Run as root, as CI does. A program already on PATH is not installed again.
set -euo pipefail

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v dig >/dev/null 2>&1 || missing+=(dnsutils)

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
echo "==> installing Debian packages: ${missing[*]}" >&2
apt-get update -qq
# The package's post-install step starts its service where systemd runs; the
# tests start their own prometheus and haproxy, so policy-rc.d keeps services
# stopped.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    created_policy=1
fi
status=0
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
if [ "$created_policy" -eq 1 ]; then
    rm -f "$policy"
fi
exit "$status"
