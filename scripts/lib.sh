# Shared steps of scripts/test.sh, scripts/demo.sh, scripts/pg17-root.sh and
# bench/run.sh.  Everything here runs as root on Debian; PostgreSQL itself
# runs as the "postgres" user that the postgresql-15 package creates.
#
# What these scripts leave on the machine: the packages they install, and the
# extension installed into PostgreSQL 15.  Installing the packages does what
# Debian's packages always do: postgresql-15 creates and starts the cluster
# "15 main" (port 5432) and etcd-server starts etcd on 127.0.0.1:2379 (on
# systemd; invoke-rc.d elsewhere).  The scripts use neither: they run their
# own PostgreSQL and etcd on free ports in a temporary directory that they
# remove on exit, so Debian's cluster and etcd stay as the README's Installing
# section expects them.

PG_BIN=/usr/lib/postgresql/15/bin
export PG_CONFIG=$PG_BIN/pg_config

# What building etcd_lock needs, what the demo adds, what the tests add.
BUILD_PACKAGES=(make gcc libc6-dev postgresql-15 postgresql-server-dev-15
                libcurl4-openssl-dev libcjson-dev)
DEMO_PACKAGES=("${BUILD_PACKAGES[@]}" postgresql-client-15 etcd-server etcd-client curl)
TEST_PACKAGES=("${DEMO_PACKAGES[@]}" libipc-run-perl openssl ca-certificates python3-h2
               libpostgresql-jdbc-java)

# as_postgres CMD...: run CMD as the postgres user, from /.  The caller's
# directory may be one postgres cannot enter (a checkout under /root), and
# PostgreSQL's programs complain about that on every start.
as_postgres() {
    runuser -u postgres -- env -C / "$@"
}

# apt_install PKG...: install those of PKG that are not installed yet.  Names
# them first, then, while apt-get runs, prints what it is doing every ten
# seconds.  apt-get's output goes to an unlinked temporary file (nothing is
# left in /tmp, whatever happens), and its end is printed if it fails.
apt_install() {
    local missing=() p fd log hb rc=0 t0=$SECONDS
    for p in "$@"; do
        dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' ||
            missing+=("$p")
    done
    if [ ${#missing[@]} = 0 ]; then
        echo "packages: all $# already installed"
        return 0
    fi
    echo "installing with apt-get: ${missing[*]} (and what they depend on)"
    log=$(mktemp /tmp/etcd_lock_apt.XXXXXX)
    exec {fd}>"$log"
    rm -f "$log"
    log=/dev/fd/$fd
    # the heartbeat stops by itself when this script is gone
    (
        main=$$ n=0
        while sleep 1 && kill -0 "$main" 2>/dev/null; do
            n=$((n + 1))
            [ $((n % 10)) = 0 ] || continue
            line=$(grep -E '^(Get:|Unpacking|Setting up|Processing|Reading|Fetched)' "$log" | tail -n 1 | cut -c1-100)
            echo "  ... ${n} s: ${line:-starting}"
        done
    ) &
    hb=$!
    export DEBIAN_FRONTEND=noninteractive
    apt-get -q update </dev/null >&"$fd" 2>&1 &&
        apt-get -q install -y --no-install-recommends "${missing[@]}" </dev/null >&"$fd" 2>&1 ||
        rc=$?
    kill "$hb" 2>/dev/null || true
    wait "$hb" 2>/dev/null || true
    if [ "$rc" != 0 ]; then
        echo "apt-get failed (exit status $rc); the end of its output:" >&2
        tail -n 30 "$log" >&2
    else
        echo "installed in $((SECONDS - t0)) s: $(grep -c '^Setting up' "$log") packages"
    fi
    exec {fd}>&-
    return "$rc"
}

# install_packages [PKG...]: what building and testing need, plus PKG.  Safe
# to run again.
install_packages() {
    local extra=()
    # the JDBC test compiles a small client; bring a JDK only where none is
    command -v javac >/dev/null || extra+=(default-jdk-headless)
    apt_install "${TEST_PACKAGES[@]}" "${extra[@]}" "$@"
}

# build_and_install SRC [DIR]: copy the source to DIR (a new temporary
# directory if not given), which the postgres user can write, build it there
# as postgres, and install it as root.  Prints the build directory.
build_and_install() {
    local src=$1 dir=${2:-}
    if [ -z "$dir" ]; then
        dir=$(mktemp -d /tmp/etcd_lock.XXXXXX)
    fi
    mkdir -p "$dir"
    tar -C "$src" -cf - --exclude=./.git . | tar -C "$dir" -xf -
    chown -R postgres: "$dir"
    as_postgres make -C "$dir" -s clean >/dev/null
    as_postgres make -C "$dir" -s >&2
    make -C "$dir" -s install >&2
    echo "$dir"
}

# A free TCP port on loopback.
free_port() {
    perl -MIO::Socket::INET -e \
        'print IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1", LocalPort => 0)->sockport'
}

# start_etcd DIR: start a one-member etcd on free loopback ports, as the
# postgres user, with its data and log in DIR.  Sets ETCD_URL and ETCD_PID.
start_etcd() {
    local dir=$1 cport pport
    cport=$(free_port)
    pport=$(free_port)
    mkdir -p "$dir"
    chown postgres: "$dir"
    # not through as_postgres: $! must be runuser, which passes our SIGTERM
    # on to etcd
    runuser -u postgres -- env -C / etcd --name solo --data-dir "$dir/data" \
        --listen-client-urls "http://127.0.0.1:$cport" \
        --advertise-client-urls "http://127.0.0.1:$cport" \
        --listen-peer-urls "http://127.0.0.1:$pport" \
        --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
        --initial-cluster "solo=http://127.0.0.1:$pport" \
        --logger=zap --log-outputs=stderr --unsafe-no-fsync \
        >"$dir/etcd.log" 2>&1 &
    ETCD_PID=$!
    ETCD_URL="http://127.0.0.1:$cport"
    local i
    for i in $(seq 1 100); do
        if curl -sf "$ETCD_URL/health" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$ETCD_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "etcd did not start; its log:" >&2
    cat "$dir/etcd.log" >&2
    return 1
}

# Stop the etcd of start_etcd, if any, and wait until it has exited.
stop_etcd() {
    if [ -n "${ETCD_PID:-}" ]; then
        kill "$ETCD_PID" 2>/dev/null || true
        wait "$ETCD_PID" 2>/dev/null || true
    fi
    ETCD_PID=
}

# fetch_etcd35 DIR: Debian 13's etcd-server and etcd-client (3.5.16),
# downloaded into DIR with a private apt state and unpacked, without
# installing anything.  The binaries need only libc.  Prints their directory.
fetch_etcd35() {
    local dir=$1 f
    local apt=(-o Dir::Etc::SourceList="$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
               -o Dir::State::Lists="$dir/lists" -o Dir::Cache="$dir/cache")
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    echo 'deb http://deb.debian.org/debian trixie main' > "$dir/sources.list"
    (cd "$dir" && apt-get "${apt[@]}" -qq update &&
        apt-get "${apt[@]}" -qq download etcd-server etcd-client) >/dev/null 2>&1
    for f in "$dir"/etcd-*.deb; do
        dpkg-deb -x "$f" "$dir/x"
    done
    chmod -R a+rX "$dir"
    echo "$dir/x/usr/bin"
}

# run_suite BUILD WORK [TAP_FILE...]: the test suite on the build tree BUILD
# (built and installed), as postgres: pg_regress against an etcd of its own,
# with its data under WORK, then the TAP files (t/*.pl when none are given),
# each of which starts its own etcd; PROVE_FLAGS goes to prove.  Prints what
# failed, with the logs that tell why, names it in SUITE_FAILED, and returns
# 1 if anything failed.  PG_CONFIG and PATH choose PostgreSQL and etcd.
run_suite() {
    local build=$1 work=$2 rc bad t name f
    shift 2
    SUITE_FAILED=()
    rm -rf "$build"/{tmp_check,tmp_regress,results,log,regression.diffs,regression.out}

    # ETCD_LOCK_TRANSPORT (json or grpc) goes into every server's settings:
    # regress.conf, and for TAP, TEMP_CONFIG, which PostgreSQL::Test::Cluster
    # appends to each node's postgresql.conf
    local transport=${ETCD_LOCK_TRANSPORT:-json}
    echo "etcd_lock.transport = '$transport'" > "$work/transport.conf"
    chmod 644 "$work/transport.conf"

    echo "== pg_regress"
    start_etcd "$(mktemp -d "$work/etcd.XXXXXX")"
    cat > "$build/regress.conf" <<CONF
shared_preload_libraries = 'etcd_lock'
etcd_lock.endpoints = '$ETCD_URL'
etcd_lock.request_timeout = '2s'
etcd_lock.transport = '$transport'
CONF
    chown postgres: "$build/regress.conf"
    if ! as_postgres env PATH="$PATH" make -C "$build" -s installcheck TAP_TESTS= \
            PG_CONFIG="$PG_CONFIG"; then
        SUITE_FAILED+=(pg_regress)
        cat "$build/regression.diffs" 2>/dev/null || true
        for f in "$build"/tmp_regress/log/*; do
            [ -f "$f" ] || continue
            echo "---- $f (tail)"
            tail -n 40 "$f"
        done
    fi
    stop_etcd

    echo "== TAP${*:+: $*}"
    rc=0
    # The TAP nodes' socket directories go to TMPDIR, and stay there when a
    # test fails (PostgreSQL::Test::Utils keeps them for a post-mortem):
    # under WORK, they go with it.
    mkdir -p "$work/tmp"
    chown postgres: "$work/tmp"
    : >"$work/prove.out"
    as_postgres env PATH="$PATH" TMPDIR="$work/tmp" TEMP_CONFIG="$work/transport.conf" \
        ETCD_LOCK_TRANSPORT="$transport" make -C "$build" -s installcheck REGRESS= \
        PG_CONFIG="$PG_CONFIG" PROVE_FLAGS="${PROVE_FLAGS:-}" PROVE_TESTS="$*" \
        >>"$work/prove.out" 2>&1 &
    # prove's output is shown as it comes, and kept to find what failed
    tail -n +1 --pid=$! -f "$work/prove.out"
    wait $! || rc=$?
    [ "$rc" = 0 ] && return "$((${#SUITE_FAILED[@]} > 0))"

    bad=$(awk '/^Test Summary Report/ { s = 1 } s && /^t\/[^ ]+\.pl/ { print $1 }' "$work/prove.out")
    [ -n "$bad" ] || bad=TAP
    for t in $bad; do
        SUITE_FAILED+=("$t")
        name=${t#t/}
        name=${name%.pl}
        f=$build/tmp_check/log/regress_log_$name
        if [ -f "$f" ]; then
            # what led to each failed assertion (not the TODO ones): the 40
            # lines before it and 5 after, each line once; then the end
            awk 'BEGIN { last = -1 }
                 NR == FNR {
                     if ($0 ~ /^\[[0-9:.]*\]\([0-9.]*s\) not ok/ && $0 !~ /# TODO/)
                         for (i = (FNR > 40 ? FNR - 40 : 1); i <= FNR + 5; i++) want[i] = 1
                     next
                 }
                 FNR in want {
                     if (FNR != last + 1) print "---- " FILENAME ", from line " FNR
                     print
                     last = FNR
                 }' "$f" "$f"
            echo "---- $f (tail)"
            tail -n 30 "$f"
        fi
        for f in "$build"/tmp_check/log/"${name}"_*.log; do
            [ -f "$f" ] || continue
            echo "---- $f (tail)"
            tail -n 40 "$f"
        done
    done
    if [ "$bad" = TAP ]; then
        for f in "$build"/tmp_check/log/regress_log_*; do
            [ -f "$f" ] || continue
            echo "---- $f (tail)"
            tail -n 60 "$f"
        done
    fi
    return 1
}
