#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine, as root:
#   bash scripts/test.sh
# Installs what it needs, builds and installs etcd_lock, then runs the
# pg_regress suite against a local etcd and the TAP suite (each TAP test
# starts its own etcd).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
. "$src/scripts/lib.sh"

if [ "$(id -u)" != 0 ]; then
    echo "run this as root: it installs packages and the extension" >&2
    exit 1
fi

echo "== installing packages"
install_packages
echo "== building"
build=$(build_and_install "$src")
work=$(mktemp -d /tmp/etcd_lock_test.XXXXXX)
chown postgres: "$work"
cleanup() {
    [ -n "${ETCD_PID:-}" ] && kill "$ETCD_PID" 2>/dev/null || true
}
trap cleanup EXIT

echo "== pg_regress"
start_etcd "$work/etcd"
cat > "$build/regress.conf" <<CONF
shared_preload_libraries = 'etcd_lock'
etcd_lock.endpoints = '$ETCD_URL'
etcd_lock.request_timeout = '2s'
CONF
chown postgres: "$build/regress.conf"
status=0
if ! runuser -u postgres -- make -C "$build" -s installcheck TAP_TESTS= ; then
    status=1
    cat "$build/regression.diffs" 2>/dev/null || true
fi
kill "$ETCD_PID" 2>/dev/null || true
ETCD_PID=

echo "== TAP"
if ! runuser -u postgres -- make -C "$build" -s installcheck REGRESS= PROVE_FLAGS="${PROVE_FLAGS:--v}"; then
    status=1
    for f in "$build"/tmp_check/log/regress_log_*; do
        [ -f "$f" ] || continue
        echo "---- $f (tail)"
        tail -n 60 "$f"
    done
fi
if [ "$status" = 0 ]; then
    echo "== all tests passed"
else
    echo "== FAILED"
fi
exit "$status"
