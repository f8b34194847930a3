#!/usr/bin/env bash
# Install Prometheus and promtool from the Debian package `prometheus` (bookworm: 2.42), for
# tests/test_deploy_files.py (promtool check/test) and tests/test_prometheus_integration.py (a real server).
# Idempotent: does nothing when both are already on PATH. Runs as root (CI and developer machines are root).
#
# Fallback when apt-get install cannot run (held dpkg lock, broken dependencies): unpack the same .deb into
# /opt/prometheus and link the two static binaries into /usr/local/bin; the tests need nothing else from it.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "install-prometheus: already installed: $(prometheus --version 2>&1 | head -n 1)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq

# The package's postinst starts a service on :9090; nothing here wants it running.
created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
fi
cleanup() { if [ -n "$created_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

# --no-install-recommends: skips node-exporter, smartmontools and friends (the package recommends them).
if ! apt-get install -y -qq --no-install-recommends prometheus; then
    echo "install-prometheus: apt-get install failed; unpacking the .deb instead" >&2
    workdir="$(mktemp -d)"
    (cd "$workdir" && apt-get download prometheus)
    dpkg-deb -x "$workdir"/prometheus_*.deb /opt/prometheus
    ln -sf /opt/prometheus/usr/bin/prometheus /usr/local/bin/prometheus
    ln -sf /opt/prometheus/usr/bin/promtool /usr/local/bin/promtool
    rm -rf "$workdir"
fi

prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
