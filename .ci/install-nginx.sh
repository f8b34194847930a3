#!/usr/bin/env bash
# nginx as a load balancer in front of several servers, for the tests only (tests/support/load_balancer.py), from
# the Debian package `nginx` (bookworm: 1.22.1). The package is downloaded (`apt-get download`, no root needed) and
# unpacked into .ci/nginx/; the binary is linked into .venv/bin, where the tests look. Nothing is installed
# system-wide and no service runs: the tests start nginx with their own prefix, config and error log.
# Idempotent: does nothing when the link works. If apt cannot fetch the package (no package lists and not root,
# not Debian), it says so and exits 0: serving does not need nginx; the tests that do skip (fail on CI).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
target="$root/.ci/nginx"
bin="$root/.venv/bin"
mkdir -p "$bin"

if "$bin/nginx" -v >/dev/null 2>&1; then
    echo "install-nginx: already installed: $("$bin/nginx" -v 2>&1 | head -n 1)"
    exit 0
fi

skip() {
    echo "install-nginx: $1; the load-balancer tests will skip (and fail under CI=true)" >&2
    exit 0
}
command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || skip "apt-get/dpkg-deb not found"

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
chmod 755 "$workdir"  # apt's download sandbox user must be able to write here
download() { (cd "$workdir" && apt-get download -qq nginx >/dev/null 2>&1); }
if ! download; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null && download || skip "apt-get download nginx failed"
    else
        skip "apt-get download nginx failed (as root, run: apt-get update)"
    fi
fi
rm -rf "$target.partial"
dpkg-deb -x "$workdir"/nginx_*.deb "$target.partial"
rm -rf "$target"
mv "$target.partial" "$target"
ln -sf "$target/usr/sbin/nginx" "$bin/nginx"
"$bin/nginx" -v >/dev/null 2>&1 || skip "the unpacked nginx does not run (missing libraries? ldd $target/usr/sbin/nginx)"
echo "install-nginx: $("$bin/nginx" -v 2>&1 | head -n 1) in .ci/nginx"
