#!/usr/bin/env bash
# One leg of scripts/pg17.sh.  It runs inside the Debian 13 root that
# scripts/pg17.sh makes, as root there, once etcd_lock is built in
# /build/etcd_lock and installed:
#   bash scripts/pg17-root.sh ETCD_VERSION TAP_FILE...
# The etcd first on PATH must be ETCD_VERSION (3.4 or 3.5).  Runs pg_regress
# against an etcd of its own, as scripts/test.sh does, then the given TAP
# files, prints the logs of what failed, and writes what failed, one line,
# to /build/leg-ETCD_VERSION.failed.
set -euo pipefail
want=$1
shift
build=/build/etcd_lock
. "$build/scripts/lib.sh"
PG_BIN=/usr/lib/postgresql/17/bin
export PG_CONFIG=$PG_BIN/pg_config

failed_file=/build/leg-$want.failed
rm -f "$failed_file"
failed=()
work=
cleanup() {
    local status=$?
    set +e
    [ -n "${ETCD_PID:-}" ] && kill "$ETCD_PID" 2>/dev/null
    [ -n "$work" ] && rm -rf "$work"
    if [ ${#failed[@]} -gt 0 ]; then
        (IFS=,; echo "${failed[*]}" | sed 's/,/, /g') > "$failed_file"
    elif [ "$status" != 0 ]; then
        echo "error in the leg's script" > "$failed_file"
    fi
    exit "$status"
}
trap cleanup EXIT

v=$(etcd --version | sed -n 's/^etcd Version: //p')
echo "== $($PG_CONFIG --version); etcd $v ($(command -v etcd)); etcdctl $(etcdctl version | sed -n 's/^etcdctl version: //p')"
case $v in
    "$want".*) ;;
    *) failed+=("etcd on PATH is $v, not $want"); exit 1 ;;
esac

cd "$build"
rm -rf tmp_check tmp_regress results log regression.diffs regression.out regress.conf
work=$(mktemp -d /tmp/etcd_lock_leg.XXXXXX)
chown postgres: "$work"

echo "== pg_regress"
start_etcd "$work/etcd"
cat > regress.conf <<CONF
shared_preload_libraries = 'etcd_lock'
etcd_lock.endpoints = '$ETCD_URL'
etcd_lock.request_timeout = '2s'
CONF
chown postgres: regress.conf
if ! runuser -u postgres -- make -C "$build" -s installcheck TAP_TESTS= PG_CONFIG="$PG_CONFIG"; then
    failed+=(pg_regress)
    cat regression.diffs 2>/dev/null || true
    for f in tmp_regress/log/*; do
        [ -f "$f" ] || continue
        echo "---- $f (tail)"
        tail -n 40 "$f"
    done
fi
kill "$ETCD_PID" 2>/dev/null || true
ETCD_PID=

echo "== TAP: $*"
set +e
runuser -u postgres -- make -C "$build" -s installcheck REGRESS= PG_CONFIG="$PG_CONFIG" \
    PROVE_FLAGS="${PROVE_FLAGS--v}" PROVE_TESTS="$*" 2>&1 | tee "$work/prove.out"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then
    bad=$(awk '/^Test Summary Report/ { s = 1 } s && /^t\/[^ ]+\.pl/ { print $1 }' "$work/prove.out")
    [ -n "$bad" ] || bad=TAP
    for t in $bad; do
        failed+=("$t")
        name=${t#t/}
        name=${name%.pl}
        f=tmp_check/log/regress_log_$name
        if [ -f "$f" ]; then
            # what led to each failed test (not the TODO ones), then the end
            grep -n '^\[[0-9:.]*\]([0-9.]*s) not ok' "$f" | grep -v '# TODO' | cut -d: -f1 |
                while read -r n; do
                    echo "---- $f, lines $((n > 40 ? n - 40 : 1))-$((n + 5))"
                    sed -n "$((n > 40 ? n - 40 : 1)),$((n + 5))p" "$f"
                done
            echo "---- $f (tail)"
            tail -n 30 "$f"
        fi
        for f in tmp_check/log/"${name}"_*.log; do
            [ -f "$f" ] || continue
            echo "---- $f (tail)"
            tail -n 40 "$f"
        done
    done
    if [ "$bad" = TAP ]; then
        for f in tmp_check/log/regress_log_*; do
            [ -f "$f" ] || continue
            echo "---- $f (tail)"
            tail -n 60 "$f"
        done
    fi
fi
[ ${#failed[@]} = 0 ]
