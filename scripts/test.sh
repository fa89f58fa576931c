#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine, as root:
#   bash scripts/test.sh [--matrix] [--transport=json|grpc|both] [--verbose]
#                        [TAP_FILE...]
# Installs what it needs, builds and installs etcd_lock, then runs the
# pg_regress suite against a local etcd and the TAP suite (each TAP test
# starts its own etcd): PostgreSQL 15 with Debian 12's etcd 3.4, once per
# transport (etcd_lock.transport; both by default).  Given TAP files
# (t/NNN_name.pl), it runs those instead of all of t/*.pl.
#
# --matrix (or ETCD_LOCK_MATRIX=1) runs the other legs too:
#   - PostgreSQL 15 with etcd 3.5 (Debian 13's, unpacked, not installed),
#     once per transport;
#   - PostgreSQL 17 with etcd 3.5 over gRPC and etcd 3.4 over JSON, in a
#     throwaway Debian 13 root (scripts/pg17.sh), removed with its mounts on
#     any exit.
# --verbose (or PROVE_FLAGS=-v) prints every TAP assertion; by default prove
# prints one line per test file, and what failed is printed in full.
#
# It uses neither Debian's "15 main" cluster nor its etcd service: its
# servers run on free ports, and its files are in one temporary directory,
# removed on any exit (see scripts/lib.sh).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
. "$src/scripts/lib.sh"
cd /

matrix=${ETCD_LOCK_MATRIX:-0}
transports=(json grpc)
export PROVE_FLAGS=${PROVE_FLAGS:-}
tests=()
for arg in "$@"; do
    case $arg in
        --matrix) matrix=1 ;;
        --transport=json|--transport=grpc) transports=("${arg#--transport=}") ;;
        --transport=both) transports=(json grpc) ;;
        -v|--verbose) PROVE_FLAGS=-v ;;
        t/*.pl) tests+=("$arg") ;;
        *) echo "usage: bash scripts/test.sh [--matrix] [--transport=json|grpc|both] [--verbose] [t/NNN_name.pl...]" >&2; exit 2 ;;
    esac
done
for t in "${tests[@]}"; do
    [ -f "$src/$t" ] || { echo "no TAP file $src/$t" >&2; exit 2; }
done

if [ "$(id -u)" != 0 ]; then
    echo "run this as root: it installs packages and the extension" >&2
    exit 1
fi

# The JVM of the JDBC test keeps its performance data in
# /tmp/hsperfdata_postgres, and leaves that directory behind, empty.
hsperf=/tmp/hsperfdata_postgres
[ -e "$hsperf" ] && hsperf=
work=
cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    stop_etcd
    [ -n "$work" ] && rm -rf "$work"
    [ -n "$hsperf" ] && rmdir "$hsperf" 2>/dev/null
    [ "$status" = 130 ] && echo "== interrupted" >&2
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
work=$(mktemp -d /tmp/etcd_lock_test.XXXXXX)

echo "== layout: $(bash "$src/scripts/check-layout.sh" | grep 'include cycle')"
bash "$src/scripts/check-layout.sh" >/dev/null || { echo "== FAILED: layout (scripts/check-layout.sh)"; exit 1; }
echo "== installing packages"
install_packages
chown postgres: "$work"
echo "== building"
build=$(build_and_install "$src" "$work/build")

# run_leg NAME TRANSPORT: the suite on the installed build, with the etcd
# first on PATH.  Returns non-zero if anything failed.
run_leg() {
    local name=$1
    export ETCD_LOCK_TRANSPORT=$2
    echo "== $name: $(etcd --version | sed -n 's/^etcd Version: /etcd /p'), transport $2"
    if run_suite "$build" "$work" "${tests[@]}"; then
        echo "== $name: passed"
    else
        echo "== $name: FAILED (${SUITE_FAILED[*]})"
        return 1
    fi
}

status=0
failed=()
for tr in "${transports[@]}"; do
    run_leg "PostgreSQL 15, etcd 3.4, $tr" "$tr" || { status=1; failed+=("15+3.4/$tr"); }
done

if [ "$matrix" = 1 ]; then
    echo "== fetching etcd 3.5 from Debian 13"
    etcd35=$(fetch_etcd35 "$work/etcd35")
    for tr in "${transports[@]}"; do
        PATH="$etcd35:$PATH" run_leg "PostgreSQL 15, etcd 3.5, $tr" "$tr" ||
            { status=1; failed+=("15+3.5/$tr"); }
    done
    if ! bash "$src/scripts/pg17.sh" --etcd 3.5:grpc,3.4:json "${tests[@]}"; then
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
