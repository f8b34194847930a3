#!/usr/bin/env bash
# Prometheus and promtool for the monitoring tests only (tests/test_deploy_files.py: promtool check/test;
# tests/test_prometheus_integration.py: a real server), from the Debian package `prometheus` (bookworm: 2.42).
# The package is downloaded (`apt-get download`, no root needed) and unpacked into .ci/prometheus/; the two
# binaries are linked into .venv/bin, where the tests look. Nothing is installed system-wide and no service runs.
# Idempotent: does nothing when both links work. If apt cannot fetch the package (no package lists and not root,
# not Debian), it says so and exits 0: serving does not need Prometheus; the tests that do skip (fail on CI).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
target="$root/.ci/prometheus"
bin="$root/.venv/bin"
mkdir -p "$bin"

if "$bin/prometheus" --version >/dev/null 2>&1 && "$bin/promtool" --version >/dev/null 2>&1; then
    echo "install-prometheus: already installed: $("$bin/prometheus" --version 2>&1 | head -n 1)"
    exit 0
fi

skip() {
    echo "install-prometheus: $1; the monitoring tests will skip (and fail under CI=true)" >&2
    exit 0
}
command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || skip "apt-get/dpkg-deb not found"

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
chmod 755 "$workdir"  # apt's download sandbox user must be able to write here
download() { (cd "$workdir" && apt-get download -qq prometheus >/dev/null 2>&1); }
if ! download; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null && download || skip "apt-get download prometheus failed"
    else
        skip "apt-get download prometheus failed (as root, run: apt-get update)"
    fi
fi
rm -rf "$target.partial"
dpkg-deb -x "$workdir"/prometheus_*.deb "$target.partial"
rm -rf "$target"
mv "$target.partial" "$target"
ln -sf "$target/usr/bin/prometheus" "$bin/prometheus"
ln -sf "$target/usr/bin/promtool" "$bin/promtool"
echo "install-prometheus: $("$bin/prometheus" --version 2>&1 | head -n 1) in .ci/prometheus"
