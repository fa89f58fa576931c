#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine, as root:
#   bash scripts/test.sh [--matrix] [--verbose]
# Installs what it needs, builds and installs etcd_lock, then runs the
# pg_regress suite against a local etcd and the TAP suite (each TAP test
# starts its own etcd): PostgreSQL 15 with Debian 12's etcd 3.4.
#
# --matrix (or ETCD_LOCK_MATRIX=1) runs the other legs too:
#   - PostgreSQL 15 with etcd 3.5 (Debian 13's, unpacked, not installed);
#   - PostgreSQL 17 with etcd 3.4 and with etcd 3.5, in a throwaway Debian 13
#     root (scripts/pg17.sh), removed with its mounts on any exit.
# --verbose (or PROVE_FLAGS=-v) prints every TAP assertion; by default, one
# line per test file and the logs of what failed.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
. "$src/scripts/lib.sh"

matrix=${ETCD_LOCK_MATRIX:-0}
export PROVE_FLAGS=${PROVE_FLAGS:-}
for arg in "$@"; do
    case $arg in
        --matrix) matrix=1 ;;
        -v|--verbose) PROVE_FLAGS=-v ;;
        *) echo "usage: bash scripts/test.sh [--matrix] [--verbose]" >&2; exit 2 ;;
    esac
done

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
    rm -rf "$work"
}
trap cleanup EXIT

# run_leg NAME: pg_regress and TAP on the installed build, with the etcd
# first on PATH.  Returns non-zero if anything failed.
run_leg() {
    local name=$1 status=0 f
    echo "== $name: $(etcd --version | sed -n 's/^etcd Version: /etcd /p')"
    echo "== $name: pg_regress"
    start_etcd "$work/etcd-$RANDOM"
    cat > "$build/regress.conf" <<CONF
shared_preload_libraries = 'etcd_lock'
etcd_lock.endpoints = '$ETCD_URL'
etcd_lock.request_timeout = '2s'
CONF
    chown postgres: "$build/regress.conf"
    if ! runuser -u postgres -- env PATH="$PATH" make -C "$build" -s installcheck TAP_TESTS= ; then
        status=1
        cat "$build/regression.diffs" 2>/dev/null || true
    fi
    kill "$ETCD_PID" 2>/dev/null || true
    ETCD_PID=

    echo "== $name: TAP"
    rm -rf "$build/tmp_check"
    if ! runuser -u postgres -- env PATH="$PATH" make -C "$build" -s installcheck REGRESS= PROVE_FLAGS="$PROVE_FLAGS"; then
        status=1
        for f in "$build"/tmp_check/log/regress_log_*; do
            [ -f "$f" ] || continue
            grep -q 'not ok\|Looks like\|died' "$f" || continue
            echo "---- $f (tail)"
            tail -n 60 "$f"
        done
    fi
    if [ "$status" = 0 ]; then
        echo "== $name: passed"
    else
        echo "== $name: FAILED"
    fi
    return "$status"
}

status=0
failed=()
run_leg "PostgreSQL 15, etcd 3.4" || { status=1; failed+=("15+3.4"); }

if [ "$matrix" = 1 ]; then
    echo "== fetching etcd 3.5 from Debian 13"
    etcd35=$(fetch_etcd35 "$work/etcd35")
    PATH="$etcd35:$PATH" run_leg "PostgreSQL 15, etcd 3.5" || { status=1; failed+=("15+3.5"); }
    if ! bash "$src/scripts/pg17.sh" --etcd both; then
        status=1
        failed+=("17")
    fi
fi

if [ "$status" = 0 ]; then
    echo "== all tests passed"
else
    echo "== FAILED: ${failed[*]}"
fi
exit "$status"
