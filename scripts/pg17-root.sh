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
    stop_etcd
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

work=$(mktemp -d /tmp/etcd_lock_leg.XXXXXX)
chown postgres: "$work"
run_suite "$build" "$work" "$@" || failed+=("${SUITE_FAILED[@]}")
[ ${#failed[@]} = 0 ]
