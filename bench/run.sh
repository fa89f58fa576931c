#!/usr/bin/env bash
# The etcd_lock benchmark, from a fresh Debian 12 machine, as root:
#
#   bash bench/run.sh [--duration SECONDS] [--smoke] [--clients "1 8 32"]
#                     [--rounds N] [--cycles N] [--skip-install] [--keep]
#
# Installs what it needs, builds and installs etcd_lock, builds the C floor
# and the Go peers, starts a local etcd (fsync on), a second etcd that
# requires TLS client certificates, and throwaway PostgreSQL servers, then
# runs every workload of bench/README.md
# at the same concurrencies in one run.  Prints the results as markdown and
# writes them to bench/results/latest.md.  Cleans up everything on exit.
#
#   --duration S    seconds per workload run (default 5; --smoke: 1)
#   --smoke         every workload once, ~1 s each, at small concurrency;
#                   exits 0 if every workload ran (no speed is asserted)
#   --clients LIST  concurrency levels (default "1 8 32"; --smoke: "1 2")
#   --rounds N      rounds of the uncontended workloads; the tables show the
#                   median of the rounds (default 3; --smoke: 1)
#   --cycles N      lock/unlock cycles of the per-backend memory test
#                   (default 100000; --smoke: 2000)
#   --skip-install  do not run apt-get (the packages are already there)
#   --keep          keep the work directory (logs, data) instead of removing it
set -euo pipefail
export LC_ALL=C

bench=$(cd "$(dirname "$0")" && pwd)
src=$(dirname "$bench")
. "$src/scripts/lib.sh"

DURATION=
SMOKE=0
LEVELS=
CYCLES=
ROUNDS=
SKIP_INSTALL=0
KEEP=0
cmdline="bash bench/run.sh${*:+ $*}"
while [ $# -gt 0 ]; do
    case $1 in
        --duration) DURATION=$2; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --clients) LEVELS=$2; shift 2 ;;
        --cycles) CYCLES=$2; shift 2 ;;
        --skip-install) SKIP_INSTALL=1; shift ;;
        --keep) KEEP=1; shift ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$SMOKE" = 1 ]; then
    DURATION=${DURATION:-1}
    LEVELS=${LEVELS:-"1 2"}
    CYCLES=${CYCLES:-2000}
    ROUNDS=${ROUNDS:-1}
    CONTENDED_LEVELS=2
    SCALE_SESSIONS=10
    SCALE_LOCKS="1 10 100"
    HOLD_TTL=3				# a keepalive every ttl/3 = 1 s
    KA_PERIODS=2
    MEM_BUDGET=60			# seconds the memory test may take at most
else
    DURATION=${DURATION:-5}
    LEVELS=${LEVELS:-"1 8 32"}
    CYCLES=${CYCLES:-100000}
    ROUNDS=${ROUNDS:-3}
    CONTENDED_LEVELS=$(for c in $LEVELS; do [ "$c" -ge 2 ] && echo "$c"; done | xargs)
    CONTENDED_LEVELS=${CONTENDED_LEVELS:-2}
    SCALE_SESSIONS=50
    SCALE_LOCKS="1 100 1000"
    HOLD_TTL=6				# a keepalive every 2 s
    KA_PERIODS=5
    MEM_BUDGET=300
fi
# the scale runs measure lock+unlock at the middle concurrency level
SCALE_CLIENTS=$(echo $LEVELS | awk '{print $(int((NF+1)/2))}')

if [ "$(id -u)" != 0 ]; then
    echo "run this as root: it installs packages and the extension" >&2
    exit 1
fi

t_begin=$(date +%s)
say() { echo "== $*" >&2; }

# ----------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------
if [ "$SKIP_INSTALL" = 0 ]; then
    say "installing packages"
    # the Go peers: Debian's Go and etcd 3.4's Go sources (clientv3)
    extra=(golang-go golang-etcd-server-dev)
    # nodesource's nodejs ships npm itself and conflicts with Debian's npm
    command -v node >/dev/null || extra+=(nodejs)
    command -v npm >/dev/null || extra+=(npm)
    install_packages "${extra[@]}"
fi
t_installed=$(date +%s)

work=$(mktemp -d /tmp/etcd_lock_bench.XXXXXX)
chmod 755 "$work"
build=
PG_INSTANCES=()
ETCD_PIDS=()
BG_PIDS=()
cleanup() {
    local rc=$? p i
    set +e
    for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for i in "${PG_INSTANCES[@]}"; do
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$work/pg-$i/data" -m immediate -w stop >/dev/null 2>&1
    done
    for p in "${ETCD_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${BG_PIDS[@]}" "${ETCD_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    # etcd itself is not our child: give it 5 s to go
    for p in "${ETCD_PIDS[@]}"; do
        for i in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
    if [ "$KEEP" = 1 ]; then
        echo "kept the work directory $work" >&2
    else
        rm -rf "$work"
    fi
    [ -n "$build" ] && rm -rf "$build"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "building and installing etcd_lock"
# what is built is the working tree: note its commit and whether it differs
commit=$(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$src" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo " + uncommitted changes" || true)
build=$(build_and_install "$src")

say "building the C driver"
mkdir -p "$work/bin" "$work/logs" "$work/pglog" "$work/sql"
gcc -O2 -o "$work/bin/floor" "$bench/floor.c" -lcurl -lcjson -lpthread

# The Go peers, against the etcd 3.4 sources that golang-etcd-server-dev
# puts in /usr/share/gocode: GOPATH mode, no module proxy, no network, and
# a build cache and go env of their own in the work directory.
say "building the Go peers (clientv3 of etcd 3.4, GOPATH mode, offline)"
GO_OK=1
if ! (cd "$bench" && env GO111MODULE=off GOFLAGS= GOPROXY=off GOENV=off \
        GOPATH="/usr/share/gocode:$work/go/path" GOCACHE="$work/go/cache" \
        go build -o "$work/bin/gopeer" gopeer.go) >"$work/logs/go-build.log" 2>&1; then
    GO_OK=0
    echo "building the Go peers failed:" >&2
    tail -n 20 "$work/logs/go-build.log" >&2
fi
# the postgres user runs pgbench and psql: give it copies it can read (a
# checkout under /root is not readable by it)
cp "$bench"/pgbench/*.sql "$work/sql/"
chown -R postgres: "$work"

say "installing the npm etcd3 client (into a temp dir)"
NPM_OK=1
if ! npm install --prefix "$work/npm" --cache "$work/npm-cache" --no-audit --no-fund \
        --loglevel=error etcd3@1.1.2 >"$work/logs/npm.log" 2>&1; then
    NPM_OK=0
    echo "npm install etcd3 failed:" >&2
    tail -n 20 "$work/logs/npm.log" >&2
fi
export NODE_PATH="$work/npm/node_modules"

# a CA, a server certificate with serverAuth AND clientAuth (etcd 3.4's
# gateway needs both), and a client certificate
CERTS=$work/certs
make_certs() {
    mkdir -p "$CERTS"
    (
        cd "$CERTS"
        cat > ext.cnf <<'EOF'
[server]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[client]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
EOF
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca.pem \
            -days 2 -subj /CN=etcd-lock-bench-ca
        openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr \
            -subj /CN=127.0.0.1
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
            -out server.pem -days 2 -extfile ext.cnf -extensions server
        openssl req -newkey rsa:2048 -nodes -keyout client-key.pem -out client.csr \
            -subj /CN=etcd-lock-bench-client
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
            -out client.pem -days 2 -extfile ext.cnf -extensions client
    ) >"$work/logs/openssl.log" 2>&1
    chown -R postgres: "$CERTS"
    chmod 600 "$CERTS"/*-key.pem
}
TLS_ARGS=(--cacert "$CERTS/ca.pem" --cert "$CERTS/client.pem" --key "$CERTS/client-key.pem")

# start_etcd_bench NAME DIR [tls]: a one-member etcd on free loopback ports,
# as the postgres user, with fsync ON (lib.sh's start_etcd passes
# --unsafe-no-fsync, which suits tests but not benchmarks).  It runs in a
# session of its own (setsid), hence in its own scheduler autogroup: in
# ours, the kernel would split one group's CPU share between etcd and the
# clients measured against it.
# Sets ETCD_URL and ETCD_PID (etcd's own pid, whose CPU time we read), and
# appends the pids to ETCD_PIDS.
start_etcd_bench() {
    local name=$1 dir=$2 tls=${3:-} cport pport scheme=http tlsargs=() curlargs=() i
    cport=$(free_port)
    pport=$(free_port)
    mkdir -p "$dir"
    chown postgres: "$dir"
    if [ -n "$tls" ]; then
        scheme=https
        tlsargs=(--cert-file "$CERTS/server.pem" --key-file "$CERTS/server-key.pem"
                 --trusted-ca-file "$CERTS/ca.pem" --client-cert-auth)
        curlargs=("${TLS_ARGS[@]}")
    fi
    setsid runuser -u postgres -- etcd --name "$name" --data-dir "$dir/data" \
        --listen-client-urls "$scheme://127.0.0.1:$cport" \
        --advertise-client-urls "$scheme://127.0.0.1:$cport" \
        --listen-peer-urls "http://127.0.0.1:$pport" \
        --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
        --initial-cluster "$name=http://127.0.0.1:$pport" \
        "${tlsargs[@]}" --logger=zap --log-outputs=stderr \
        >"$dir/etcd.log" 2>&1 &
    ETCD_PIDS+=($!)
    ETCD_URL="$scheme://127.0.0.1:$cport"
    for i in $(seq 1 100); do
        if curl -sf "${curlargs[@]}" "$ETCD_URL/health" >/dev/null 2>&1; then
            # etcd itself, under runuser (setsid may have forked too)
            ETCD_PID=$(pgrep -u postgres -f -- "^etcd --name $name --data-dir $dir/data " | head -n 1)
            [ -n "$ETCD_PID" ] || { echo "cannot find the pid of etcd $name" >&2; return 1; }
            ETCD_PIDS+=("$ETCD_PID")
            return 0
        fi
        sleep 0.1
    done
    echo "etcd $name did not start; its log:" >&2
    cat "$dir/etcd.log" >&2
    return 1
}

say "starting etcd (fsync on) and an etcd that requires TLS client certificates"
make_certs
start_etcd_bench bench "$work/etcd"
ETCD_HTTP=$ETCD_URL
ETCD_HTTP_PID=$ETCD_PID
start_etcd_bench benchtls "$work/etcd-tls" tls
ETCD_TLS=$ETCD_URL
ETCD_TLS_PID=$ETCD_PID
CLK_TCK=$(getconf CLK_TCK)
# CPU time (clock ticks, user + system) an etcd has used so far
etcd_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# start_pg NAME "extra postgresql.conf lines": a throwaway PostgreSQL that
# listens on a Unix socket in a temp dir only, on a free port number
declare -A PG_SOCK PG_PORT
start_pg() {
    local name=$1 conf=$2 dir
    dir=$work/pg-$name
    mkdir -p "$dir/sock"
    chown -R postgres: "$dir"
    PG_PORT[$name]=$(free_port)
    PG_SOCK[$name]=$dir/sock
    runuser -u postgres -- "$PG_BIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 \
        --no-sync >"$work/logs/initdb-$name.log" 2>&1
    cat >> "$dir/data/postgresql.conf" <<CONF
listen_addresses = ''
port = ${PG_PORT[$name]}
unix_socket_directories = '$dir/sock'
max_connections = 200
shared_preload_libraries = 'etcd_lock'
etcd_lock.max_locks = 4096
$conf
CONF
    PG_INSTANCES+=("$name")
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w start >/dev/null
    PGI=$name
    sql "CREATE EXTENSION etcd_lock" >/dev/null
    sql "CREATE TABLE bench_items(id bigserial PRIMARY KEY, client int, at timestamptz)" >/dev/null
    sql "CREATE UNLOGGED TABLE bench_handoff(run text, client int, ta timestamptz, tr timestamptz)" >/dev/null
}
# psql as postgres on instance $PGI
psqlb() {
    runuser -u postgres -- "$PG_BIN/psql" -h "${PG_SOCK[$PGI]}" -p "${PG_PORT[$PGI]}" -U postgres \
        -d postgres -X -q -v ON_ERROR_STOP=1 "$@"
}
sql() { psqlb -At -c "$1"; }

say "starting throwaway PostgreSQL servers"
start_pg http "etcd_lock.endpoints = '$ETCD_HTTP'"
HAVE_XACT=$(sql "SELECT count(*) FROM pg_proc WHERE proname = 'etcd_xact_lock'")
HAVE_TLS=$(sql "SELECT count(*) FROM pg_settings WHERE name = 'etcd_lock.cert'")
HAVE_GRPC=$(sql "SELECT count(*) FROM pg_settings WHERE name = 'etcd_lock.transport'")
if [ "$HAVE_GRPC" -gt 0 ]; then
    # the same etcd, over its gRPC API instead of the gateway
    start_pg grpc "etcd_lock.endpoints = '$ETCD_HTTP'
etcd_lock.transport = 'grpc'"
fi
if [ "$HAVE_TLS" -gt 0 ]; then
    start_pg tls "etcd_lock.endpoints = '$ETCD_TLS'
etcd_lock.cacert = '$CERTS/ca.pem'
etcd_lock.cert = '$CERTS/client.pem'
etcd_lock.key = '$CERTS/client-key.pem'"
fi
PGI=http

# ----------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------
declare -A OPS P50 P99 NOTE REQS CALLS CONNS LOCKS NOPS CLIENTCPU ETCDCPU DRV_REQS DRV_CONNS
FAILED=()

# "p50 p99" of the numbers (ms) in a file, one per line
percentiles() {
    sort -g "$1" | awk '{v[NR-1]=$1} END {
        if (NR == 0) { print "0 0"; exit }
        printf "%.3f %.3f\n", v[int(0.50*(NR-1)+0.5)], v[int(0.99*(NR-1)+0.5)] }'
}

fail() {
    FAILED+=("$1")
    NOTE[$1]="failed"
    echo "   FAILED: $1${2:+ (log: $2)}" >&2
    if [ -n "${2:-}" ]; then tail -n 15 "$2" >&2; fi
    return 0
}

# run_driver KEY CMD...: a driver that prints a RESULT line
run_driver() {
    local key=$1 log line kv
    shift
    log="$work/logs/${key//@/_}.log"
    if "$@" >"$log" 2>&1 && line=$(grep '^RESULT ' "$log" | tail -n 1) && [ -n "$line" ]; then
        for kv in $line; do
            case $kv in
                ops_s=*) OPS[$key]=${kv#*=} ;;
                p50_ms=*) P50[$key]=${kv#*=} ;;
                p99_ms=*) P99[$key]=${kv#*=} ;;
                ops=*) NOPS[$key]=${kv#*=} ;;
                requests=*) DRV_REQS[$key]=${kv#*=} ;;
                conns=*) DRV_CONNS[$key]=${kv#*=} ;;
                cpu_ms_per_op=*) CLIENTCPU[$key]=${kv#*=} ;;
            esac
        done
        echo "   $key: ${OPS[$key]}/s p50 ${P50[$key]} ms p99 ${P99[$key]} ms" >&2
    else
        fail "$key" "$log"
    fi
}

# etcd_url_of INSTANCE and the curl arguments to reach it
etcd_curl() {
    if [ "$PGI" = tls ]; then
        curl -sf "${TLS_ARGS[@]}" "$ETCD_TLS$1"
    else
        curl -sf "$ETCD_HTTP$1"
    fi
}
etcd_port() { if [ "$PGI" = tls ]; then echo "${ETCD_TLS##*:}"; else echo "${ETCD_HTTP##*:}"; fi; }

# gRPC calls etcd started, by method ("Txn 1234"), as counted by etcd
# itself (the gateway turns each HTTP request into one gRPC call)
etcd_calls() {
    etcd_curl /metrics | awk '/^grpc_server_started_total\{/ {
        if (match($0, /grpc_method="[^"]*"/)) c[substr($0, RSTART + 13, RLENGTH - 14)] += $NF }
        END { for (m in c) print m, c[m] }' | sort
}

# sample_conns PORT FILE PID: while PID runs, every 0.2 s, note "pid inode"
# of each TCP socket that a postgres process has open to 127.0.0.1:PORT.
# A socket inode is never reused while it lives, so the distinct inodes
# are the connections the backends (and the worker) used.
sample_conns() {
    : >"$2"
    while kill -0 "$3" 2>/dev/null; do
        ss -Htanpe "( dport = :$1 )" | awk '/users:\(\("postgres"/ {
            match($0, /pid=[0-9]+/); pid = substr($0, RSTART + 4, RLENGTH - 4)
            match($0, /ino:[0-9]+/); print pid, substr($0, RSTART + 4, RLENGTH - 4) }' >>"$2"
        sleep 0.2
    done
}

# per_pair_calls N BEFORE AFTER: the calls etcd started between two
# etcd_calls snapshots, by method, per pair ("Txn 2.00, Watch 1.00")
per_pair_calls() {
    awk -v n="$1" 'NR == FNR {b[$1] = $2; next}
        { d = ($2 - b[$1]) / n; if (d >= 0.005) { printf "%s%s %.2f", sep, $1, d; sep = ", " } }' "$2" "$3"
}

stats() { sql "SELECT requests - keepalives, acquired FROM etcd_lock_stats" | tr '|' ' '; }

# run_pgbench KEY CLIENTS SCRIPT [pgbench args]: on instance $PGI
run_pgbench() {
    local key=$1 c=$2 script=$3 log s0 s1 tps r0 a0 r1 a1 port pid f=${1//@/_}
    shift 3
    log="$work/logs/$f.log"
    port=$(etcd_port)
    s0=$(stats)
    etcd_calls >"$work/calls.before"
    rm -f "$work/pglog/$f".*
    runuser -u postgres -- pgbench -n -h "${PG_SOCK[$PGI]}" -p "${PG_PORT[$PGI]}" -U postgres \
        -f "$work/sql/$script" -c "$c" -j "$c" -T "$DURATION" \
        -l --log-prefix="$work/pglog/$f" "$@" postgres >"$log" 2>&1 &
    pid=$!
    sample_conns "$port" "$work/conns" "$pid"
    if wait "$pid" &&
        tps=$(awk '/^tps = .*without initial connection time/ {print $3}' "$log") &&
        [ -n "$tps" ]; then
        s1=$(stats)
        etcd_calls >"$work/calls.after"
        OPS[$key]=$(printf '%.1f' "$tps")
        cat "$work/pglog/$f".* | awk '{printf "%.3f\n", $3/1000}' >"$work/lat"
        read -r "P50[$key]" "P99[$key]" < <(percentiles "$work/lat")
        # etcd requests per lock, as etcd_lock counts them (keepalives
        # excluded) and as etcd counts them by method; new TCP connections
        read -r r0 a0 <<<"$s0"
        read -r r1 a1 <<<"$s1"
        if [ $((a1 - a0)) -gt 0 ]; then
            LOCKS[$key]=$((a1 - a0))
            REQS[$key]=$(awk -v r=$((r1 - r0)) -v a=$((a1 - a0)) 'BEGIN {printf "%.2f", r/a}')
            CALLS[$key]=$(per_pair_calls $((a1 - a0)) "$work/calls.before" "$work/calls.after")
            CONNS[$key]=$(awk '{ s[$2] = 1; p[$1] = 1 } END { printf "%d by %d processes\n", length(s), length(p) }' "$work/conns")
        fi
        echo "   $key: ${OPS[$key]}/s p50 ${P50[$key]} ms p99 ${P99[$key]} ms${REQS[$key]:+; per lock: ${REQS[$key]} requests (etcd: ${CALLS[$key]}); TCP connections: ${CONNS[$key]}}" >&2
    else
        fail "$key" "$log"
    fi
}

# etcdctl lock NAME -- true in a shell loop, one process per lock
etcdctl_driver() {
    local c=$1 secs=$2 i end_us pids=() rc=0 p start end n p50 p99
    end_us=$(( ${EPOCHREALTIME/./} + ${secs%.*} * 1000000 ))
    for i in $(seq 0 $((c - 1))); do
        (
            while [ "${EPOCHREALTIME/./}" -lt "$end_us" ]; do
                t0=$EPOCHREALTIME
                etcdctl --endpoints="$ETCD_HTTP" lock "bench/etcdctl/$c/$i" -- true \
                    >/dev/null 2>"$work/etcdctl.err.$i" || { echo "ERROR"; exit 1; }
                echo "$t0 $EPOCHREALTIME"
            done
        ) >"$work/etcdctl.$i" &
        pids+=($!)
    done
    # wait for these loops only: etcd itself is a child of this shell too
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    cat "$work"/etcdctl.[0-9]* >"$work/etcdctl.all"
    rm -f "$work"/etcdctl.[0-9]*
    if grep -q ERROR "$work/etcdctl.all"; then
        cat "$work"/etcdctl.err.* >&2
        rc=1
    fi
    awk '$1 != "ERROR" {printf "%.3f\n", ($2-$1)*1000}' "$work/etcdctl.all" >"$work/lat"
    read -r start end n < <(awk '$1 != "ERROR" { if (s == "" || $1 < s) s = $1; if ($2 > e) e = $2; n++ }
        END { printf "%s %s %d\n", s, e, n }' "$work/etcdctl.all")
    read -r p50 p99 < <(percentiles "$work/lat")
    awk -v n="$n" -v s="$start" -v e="$end" -v p50="$p50" -v p99="$p99" -v rc=$rc 'BEGIN {
        secs = e - s; if (secs <= 0) secs = 1
        printf "RESULT ops=%d secs=%.3f ops_s=%.1f p50_ms=%s p99_ms=%s errors=%d\n", n, secs, n/secs, p50, p99, rc }'
    [ "$rc" = 0 ] && [ "$n" -gt 0 ]
}

# ----------------------------------------------------------------------
# 1-3: uncontended lock+unlock.  Every workload at one concurrency level,
# then the next level, then the next round, so that each ratio compares runs
# taken side by side.  The tables show each figure's median over the rounds.
# ----------------------------------------------------------------------
declare -A R_OPS R_P50 R_P99 R_ECPU R_CCPU

# measure ETCD_PID RUNNER KEY ARGS...: one round of one workload, by
# run_driver or run_pgbench.  Also takes the CPU time that etcd (ETCD_PID)
# used during the run, per pair done: the driver's ops, or the locks that
# etcd_lock_stats counted.  Workloads that take no etcd lock get none.
measure() {
    local epid=$1 runner=$2 key=$3 t0 t1 n PGI=$PGI
    shift 2
    # etcd_calls asks the etcd of instance $PGI
    [ "$epid" = "$ETCD_TLS_PID" ] && PGI=tls
    unset "OPS[$key]" "P50[$key]" "P99[$key]" "NOPS[$key]" "LOCKS[$key]" "CLIENTCPU[$key]"
    etcd_calls >"$work/calls.m0"
    t0=$(etcd_ticks "$epid")
    "$runner" "$@"
    t1=$(etcd_ticks "$epid")
    [ -n "${OPS[$key]:-}" ] || return 0
    # a driver's calls by method, per pair, as etcd counts them (run_pgbench
    # does this itself, per lock that etcd_lock counted)
    if [ -n "${NOPS[$key]:-}" ] && [ "${NOPS[$key]}" -gt 0 ]; then
        etcd_calls >"$work/calls.m1"
        CALLS[$key]=$(per_pair_calls "${NOPS[$key]}" "$work/calls.m0" "$work/calls.m1")
    fi
    R_OPS[$key]+="${OPS[$key]} "
    R_P50[$key]+="${P50[$key]} "
    R_P99[$key]+="${P99[$key]} "
    [ -z "${CLIENTCPU[$key]:-}" ] || R_CCPU[$key]+="${CLIENTCPU[$key]} "
    n=${NOPS[$key]:-${LOCKS[$key]:-0}}
    if [ "$n" -gt 0 ]; then
        R_ECPU[$key]+="$(awk -v d=$((t1 - t0)) -v n="$n" -v hz="$CLK_TCK" \
            'BEGIN { printf "%.3f", d * 1000 / hz / n }') "
        echo "   $key: etcd CPU $(echo "${R_ECPU[$key]}" | awk '{print $NF}') ms per pair" >&2
    fi
}

# median of the numbers in a string
median() {
    tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) exit
        if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# go_peer KEY MODE CLIENTS [tls]: one round of the Go peer in MODE
go_peer() {
    local key=$1 mode=$2 c=$3 url=$ETCD_HTTP pid=$ETCD_HTTP_PID tlsargs=()
    if [ "$GO_OK" != 1 ]; then
        fail "$key" "$work/logs/go-build.log"
        return 0
    fi
    if [ -n "${4:-}" ]; then
        url=$ETCD_TLS
        pid=$ETCD_TLS_PID
        tlsargs=("${TLS_ARGS[@]}")
    fi
    measure "$pid" run_driver "$key" "$work/bin/gopeer" --mode "$mode" --endpoints "$url" \
        --clients "$c" --secs "$DURATION" --prefix "bench/go$mode${4:-}/$c/" "${tlsargs[@]}"
}

H=$ETCD_HTTP_PID
for round in $(seq 1 "$ROUNDS"); do
for c in $LEVELS; do
    say "round $round of $ROUNDS: uncontended lock+unlock at $c client(s), ${DURATION}s each"
    measure "$H" run_driver "floor@$c" "$work/bin/floor" --url "$ETCD_HTTP" --clients "$c" \
        --secs "$DURATION" --prefix "etcd_lock/bench/floor/$c/"
    go_peer "gofloor@$c" floor "$c"
    PGI=http
    for w in session session1; do
        measure "$H" run_pgbench "$w@$c" "$c" "$w.sql"
    done
    if [ "$HAVE_XACT" -gt 0 ]; then
        measure "$H" run_pgbench "xact@$c" "$c" xact.sql
    else
        NOTE[xact@$c]="skipped (etcd_xact_lock not available)"
        echo "   xact@$c: ${NOTE[xact@$c]}" >&2
    fi
    if [ "$HAVE_GRPC" -gt 0 ]; then
        PGI=grpc
        for w in session session1 xact; do
            measure "$H" run_pgbench "${w}grpc@$c" "$c" "$w.sql"
        done
        PGI=http
    else
        for w in session session1 xact; do
            NOTE[${w}grpc@$c]="skipped (no etcd_lock.transport setting)"
        done
    fi
    measure "$H" run_pgbench "insert@$c" "$c" insert.sql
    measure "$H" run_pgbench "advisory@$c" "$c" advisory.sql
    go_peer "gosvc@$c" service "$c"
    go_peer "goshared@$c" shared "$c"
    go_peer "goblog@$c" blog "$c"
    if [ "$NPM_OK" = 1 ]; then
        measure "$H" run_driver "npm@$c" node "$bench/etcd3_peer.js" --url "$ETCD_HTTP" \
            --clients "$c" --secs "$DURATION" --prefix "bench/npm/$c/"
    elif [ "$SMOKE" = 1 ]; then
        # the smoke run checks our own workloads; a registry hiccup is not ours
        NOTE[npm@$c]="skipped (npm install failed)"
        echo "   npm@$c: ${NOTE[npm@$c]}" >&2
    else
        fail "npm@$c" "$work/logs/npm.log"
    fi
    measure "$H" run_driver "etcdctl@$c" etcdctl_driver "$c" "$DURATION"
    # over TLS with client certificates
    measure "$ETCD_TLS_PID" run_driver "floortls@$c" "$work/bin/floor" --url "$ETCD_TLS" \
        --clients "$c" --secs "$DURATION" --prefix "etcd_lock/bench/floortls/$c/" "${TLS_ARGS[@]}"
    if [ "$HAVE_TLS" -gt 0 ]; then
        PGI=tls
        measure "$ETCD_TLS_PID" run_pgbench "sessiontls@$c" "$c" session.sql
        PGI=http
    else
        NOTE[sessiontls@$c]="skipped (no etcd_lock.cert setting)"
    fi
    go_peer "goblogtls@$c" blog "$c" tls
done
done
PGI=http
for key in "${!R_OPS[@]}"; do
    OPS[$key]=$(median "${R_OPS[$key]}")
    P50[$key]=$(median "${R_P50[$key]}")
    P99[$key]=$(median "${R_P99[$key]}")
    ETCDCPU[$key]=$(median "${R_ECPU[$key]:-}")
    CLIENTCPU[$key]=$(median "${R_CCPU[$key]:-}")
done

# ----------------------------------------------------------------------
# 2c: contended, N clients on one name
# ----------------------------------------------------------------------
declare -A HO_N HO_RATE HO_P50 HO_P99 HO_OVERLAP HO_HOLD HO_SLOW
contended_run() {	# contended_run KEY CLIENTS, on instance $PGI
    local key=$1 c=$2
    run_pgbench "$key" "$c" contended.sql -D "run=$key"
    [ "${NOTE[$key]:-}" = failed ] && return 0
    # order the acquisitions; the gap from one holder's release to the next
    # holder's acquire is a handoff.  An acquire before the previous release
    # would be a broken lock: count those.
    read -r "HO_N[$key]" "HO_RATE[$key]" "HO_P50[$key]" "HO_P99[$key]" "HO_OVERLAP[$key]" \
        "HO_HOLD[$key]" "HO_SLOW[$key]" < <(sql "
        WITH o AS (
            SELECT ta, tr, lag(tr) OVER (ORDER BY ta) AS prev_tr
            FROM bench_handoff WHERE run = '$key')
        SELECT count(prev_tr),
               round((count(*) / greatest(extract(epoch FROM max(ta) - min(ta)), 0.001))::numeric, 1),
               round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM ta - prev_tr) * 1000))::numeric, 3),
               round((percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM ta - prev_tr) * 1000))::numeric, 3),
               count(*) FILTER (WHERE ta < prev_tr),
               round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM tr - ta) * 1000))::numeric, 3),
               round(100.0 * count(*) FILTER (WHERE ta - prev_tr > interval '20 ms') / greatest(count(prev_tr), 1), 1)
        FROM o" | tr '|' ' ')
    echo "   $key: ${HO_RATE[$key]} handoffs/s, release->acquire p50 ${HO_P50[$key]} ms p99 ${HO_P99[$key]} ms, ${HO_SLOW[$key]}% over 20 ms, overlaps ${HO_OVERLAP[$key]}" >&2
    if [ "${HO_N[$key]:-0}" -lt 1 ] || [ "${HO_OVERLAP[$key]}" != 0 ]; then
        fail "$key" "$work/logs/${key//@/_}.log"
    fi
}
for c in $CONTENDED_LEVELS; do
    say "contended: $c clients on one name, ${DURATION}s"
    PGI=http
    contended_run "contended@$c" "$c"
    if [ "$HAVE_TLS" -gt 0 ]; then
        PGI=tls
        contended_run "contendedtls@$c" "$c"
    fi
    if [ "$HAVE_GRPC" -gt 0 ]; then
        PGI=grpc
        contended_run "contendedgrpc@$c" "$c"
    fi
done
PGI=http

# ----------------------------------------------------------------------
# 4: scale: locks held at once, worker keepalives, shared memory
# ----------------------------------------------------------------------
declare -A SC_LEASES SC_KA SC_KAPER
SHMEM=$(sql "SELECT size, allocated_size FROM pg_shmem_allocations WHERE name = 'etcd_lock'" | tr '|' ' ')
KA_PERIOD_MS=$(( HOLD_TTL * 1000 / 3 ))

wait_for() {		# wait_for SQL-condition SECONDS
    local deadline=$(( $(date +%s) + $2 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        [ "$(sql "SELECT ($1)" 2>/dev/null)" = t ] && return 0
        sleep 0.1
    done
    return 1
}

stop_holders() {
    sql "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'bench_holder'" >/dev/null || true
    local p
    for p in "${BG_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    BG_PIDS=()
    wait_for "SELECT locks = 0 AND leases = 0 FROM etcd_lock_stats" 30 || true
}

LOST_HELD=0			# etcd_lock_stats.lost while the holders hold
LOST_END=0			# and while they are being terminated
for k in $SCALE_LOCKS; do
    say "scale: $k lock(s) held by $SCALE_SESSIONS sessions (ttl $HOLD_TTL s)"
    key="scale@$k"
    for i in $(seq 0 $((SCALE_SESSIONS - 1))); do
        n=$(( k / SCALE_SESSIONS + (i < k % SCALE_SESSIONS ? 1 : 0) ))
        runuser -u postgres -- env PGAPPNAME=bench_holder "$PG_BIN/psql" -h "${PG_SOCK[http]}" \
            -p "${PG_PORT[http]}" -U postgres -d postgres -X -q -At \
            -c "SELECT count(etcd_lock('bench/hold/$i/' || g, $HOLD_TTL)) FROM generate_series(1, $n) g" \
            -c "SELECT pg_sleep(100000)" >"$work/logs/holder.$i.log" 2>&1 &
        BG_PIDS+=($!)
    done
    if ! wait_for "(SELECT locks FROM etcd_lock_stats) = $k AND
                   (SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bench_holder'
                    AND query LIKE '%pg_sleep%') = $SCALE_SESSIONS" 120; then
        fail "$key" "$work/logs/holder.0.log"
        stop_holders
        continue
    fi
    lost_a=$(sql "SELECT lost FROM etcd_lock_stats")
    SC_LEASES[$key]=$(sql "SELECT leases FROM etcd_lock_stats")
    # leases granted together renew together, every ttl/3: start the window
    # half a period after a renewal and make it KA_PERIODS periods long, so
    # that exactly KA_PERIODS renewals of each lease fall inside it
    ka=$(sql "SELECT keepalives FROM etcd_lock_stats")
    wait_for "SELECT keepalives > $ka FROM etcd_lock_stats" $(( HOLD_TTL + 2 )) || true
    sleep "$(awk -v p=$KA_PERIOD_MS 'BEGIN {print p / 2000}')"
    read -r ka0 t0 < <(sql "SELECT keepalives, extract(epoch FROM clock_timestamp()) FROM etcd_lock_stats" | tr '|' ' ')
    sleep "$(awk -v p=$KA_PERIOD_MS -v n=$KA_PERIODS 'BEGIN {print p * n / 1000}')"
    read -r ka1 t1 < <(sql "SELECT keepalives, extract(epoch FROM clock_timestamp()) FROM etcd_lock_stats" | tr '|' ' ')
    SC_KA[$key]=$(awk -v a="$ka0" -v b="$ka1" -v s="$t0" -v e="$t1" 'BEGIN {printf "%.2f", (b-a)/(e-s)}')
    SC_KAPER[$key]=$(awk -v a="$ka0" -v b="$ka1" -v s="$t0" -v e="$t1" -v l="${SC_LEASES[$key]}" -v p=$KA_PERIOD_MS \
        'BEGIN {printf "%.2f", (l > 0) ? (b-a) / l / ((e-s) * 1000 / p) : 0}')
    echo "   $key: ${SC_LEASES[$key]} leases, ${SC_KA[$key]} keepalives/s = ${SC_KAPER[$key]} per lease per ttl/3" >&2
    # uncontended lock+unlock while they are held
    run_pgbench "$key" "$SCALE_CLIENTS" session.sql
    lost_b=$(sql "SELECT lost FROM etcd_lock_stats")
    LOST_HELD=$(( LOST_HELD + lost_b - lost_a ))
    stop_holders
    LOST_END=$(( LOST_END + $(sql "SELECT lost FROM etcd_lock_stats") - lost_b ))
done

# ----------------------------------------------------------------------
# 4: per-backend memory over many lock/unlock cycles, in one session
# ----------------------------------------------------------------------
say "per-backend memory: up to $CYCLES lock/unlock cycles in one session (budget ${MEM_BUDGET}s)"
snapshot="SELECT 'MEM', @N@, (SELECT sum(total_bytes) FROM pg_backend_memory_contexts),
  (regexp_match(pg_read_file('/proc/self/status'), 'RssAnon:\\s+(\\d+)'))[1],
  (regexp_match(pg_read_file('/proc/self/status'), 'VmRSS:\\s+(\\d+)'))[1],
  round(extract(epoch FROM clock_timestamp() - :'t0')::numeric, 1),
  split_part(pg_read_file('/proc/self/stat'), ' ', 14)::bigint + split_part(pg_read_file('/proc/self/stat'), ' ', 15)::bigint;"
{
    echo "SELECT clock_timestamp() AS t0 \\gset"
    done_n=0
    depth=0
    for target in 1000 10000 $(seq 20000 10000 "$CYCLES") "$CYCLES"; do
        [ "$target" -gt "$CYCLES" ] && target=$CYCLES
        [ "$target" -le "$done_n" ] && continue
        if [ "$done_n" -gt 0 ]; then
            # stop when the time budget is spent
            echo "SELECT clock_timestamp() - :'t0' < interval '$MEM_BUDGET s' AS go \\gset"
            echo "\\if :go"
            depth=$((depth + 1))
        fi
        echo "\\o /dev/null"
        echo "SELECT 'SELECT etcd_unlock(etcd_lock(''bench/mem''))' FROM generate_series(1, $((target - done_n))) \\gexec"
        echo "\\o"
        echo "${snapshot//@N@/$target}"
        done_n=$target
    done
    for _ in $(seq 1 $depth); do echo "\\endif"; done
} >"$work/sql/mem.sql"
chown postgres: "$work/sql/mem.sql"
MEM_ROWS=()
MEM_TICKS=()
mem_e0=$(etcd_ticks "$ETCD_HTTP_PID")
if psqlb -At -F ' ' -f "$work/sql/mem.sql" >"$work/logs/mem.log" 2>&1; then
    mem_e1=$(etcd_ticks "$ETCD_HTTP_PID")
    while read -r tag cycles ctx rssanon vmrss secs ticks; do
        if [ "$tag" = MEM ]; then
            MEM_ROWS+=("$cycles $ctx $rssanon $vmrss $secs")
            MEM_TICKS+=("$cycles $ticks")
        fi
    done <"$work/logs/mem.log"
    echo "   memory: ${#MEM_ROWS[@]} snapshots, last: ${MEM_ROWS[-1]:-none}" >&2
    [ "${#MEM_ROWS[@]}" -ge 2 ] || fail "memory" "$work/logs/mem.log"
else
    fail "memory" "$work/logs/mem.log"
fi

# a crashed backend or worker restarts the whole server: that is a failure
CRASHES=$(cat "$work"/pg-*/postgres.log | grep -c 'terminated by signal' || true)
if [ "$CRASHES" -gt 0 ]; then
    fail "postgres-crash"
    grep -h 'terminated by signal' "$work"/pg-*/postgres.log | head -n 5 >&2
fi

# ----------------------------------------------------------------------
# report
# ----------------------------------------------------------------------
t_end=$(date +%s)
say "writing the report"
ratio() {		# ratio A B: A/B as "0.91x", or "-"
    awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2fx\n", a / b }'
}
cell() {		# cell KEY: "970/s (0.96 / 2.76)"
    local k=$1
    if [ -n "${OPS[$k]:-}" ]; then
        printf '%s/s (%s / %s)' "$(printf '%.0f' "${OPS[$k]}")" "${P50[$k]}" "${P99[$k]}"
    else
        printf '%s' "${NOTE[$k]:--}"
    fi
}
# goal TEXT VALUES THRESHOLD OP: met if every value OP threshold (values
# may end in "x"; "-" is not measured)
goal() {
    local verdict
    verdict=$(awk -v v="$2" -v t="$3" -v op="$4" 'BEGIN {
        n = split(v, a, " "); ok = 1; cnt = 0
        for (i = 1; i <= n; i++) {
            if (a[i] == "-" || a[i] == "") continue
            cnt++; x = a[i]; sub(/x$/, "", x); x += 0
            if ((op == ">=" && x < t) || (op == "<" && x >= t) || (op == "<=" && x > t) || (op == "(0,]" && (x <= 0 || x > t))) ok = 0 }
        if (cnt == 0) print "not measured"; else print (ok ? "met" : "**not met**") }')
    echo "| $1 | ${2:--} | ${5:--} | $verdict |"
}
levels_of() { local w=$1 f=$2 b=${3:-} c; for c in $LEVELS; do "$f" "$w" "$b" "$c"; done | xargs; }
ratio_at() { ratio "${OPS[$1@$3]:-}" "${OPS[$2@$3]:-}"; }
short_name() {
    case $1 in
        floor) echo "JSON floor" ;;
        session) echo "etcd_lock session (JSON)" ;;
        session1) echo "etcd_lock 1 statement (JSON)" ;;
        xact) echo "etcd_lock xact (JSON)" ;;
        sessiongrpc) echo "etcd_lock session (gRPC)" ;;
        session1grpc) echo "etcd_lock 1 statement (gRPC)" ;;
        xactgrpc) echo "etcd_lock xact (gRPC)" ;;
        gofloor) echo "gRPC floor" ;;
        floortls) echo "JSON floor over TLS" ;;
        gosvc) echo "Go service" ;;
        goshared) echo "Go shared session" ;;
        goblog) echo "Go blog pattern" ;;
        goblogtls) echo "Go blog pattern over TLS" ;;
        npm) echo "npm etcd3" ;;
        etcdctl) echo "etcdctl lock" ;;
        *) echo "$1" ;;
    esac
}

machine_cpu=$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')
machine_mem=$(free -h | awk '/^Mem:/ {print $2}')
etcd_version=$(etcd --version 2>/dev/null | awk '/etcd Version/ {print $3}')
pg_version=$("$PG_BIN/postgres" --version | awk '{print $3}')
hdr_levels=""
sep_levels=""
for c in $LEVELS; do hdr_levels+=" $c client$([ "$c" = 1 ] || echo s) |"; sep_levels+="---|"; done
hdr_cpu=""
sep_cpu=""
for c in $LEVELS; do hdr_cpu+=" $c client$([ "$c" = 1 ] || echo s) | etcd CPU |"; sep_cpu+="---|---|"; done

mkdir -p "$bench/results"
report="$bench/results/latest.md"
{
    echo "# etcd_lock benchmark results"
    echo
    echo "- command: \`$cmdline\`$([ "$SMOKE" = 1 ] && echo ' (smoke run: the numbers mean nothing)')"
    echo "- etcd_lock commit $commit$dirty; $(date -u '+%Y-%m-%d %H:%M UTC'); $((t_end - t_installed)) s after package install"
    echo "- machine: $(nproc) CPUs ($machine_cpu), $machine_mem RAM, Linux $(uname -r)"
    echo "- etcd $etcd_version (one member on loopback, fsync on), PostgreSQL $pg_version (defaults, fsync on), ${DURATION} s per run"
    echo
    echo "## Uncontended lock + unlock"
    echo
    echo "Lock+unlock pairs per second (p50 / p99 latency of one pair, ms), each client on its own name,"
    echo "and etcd's CPU time (user + system, from /proc) per pair, in ms. Each figure is the median of"
    echo "$ROUNDS round(s)."
    echo
    echo "| workload |$hdr_cpu"
    echo "|---|$sep_cpu"
    for w in floor gofloor session session1 xact sessiongrpc session1grpc xactgrpc sessiontls \
             gosvc goshared goblog npm etcdctl floortls goblogtls insert advisory; do
        case $w in *grpc) [ "$HAVE_GRPC" = 0 ] && continue ;; esac
        case $w in
            floor) label="JSON floor: etcd_lock's 2 requests over the gateway, kept-alive HTTP (C, no PostgreSQL)" ;;
            gofloor) label="gRPC floor: the same 2 requests from Go over gRPC (clientv3 KV.Txn)" ;;
            session) label="**etcd_lock** session lock; unlock (2 statements)" ;;
            session1) label="**etcd_lock** session lock and unlock in 1 statement" ;;
            xact) label="**etcd_lock** xact lock around an INSERT (BEGIN; lock; INSERT; COMMIT)" ;;
            sessiontls) label="**etcd_lock** session lock; unlock, over TLS with client certs" ;;
            sessiongrpc) label="**etcd_lock over gRPC** session lock; unlock (2 statements)" ;;
            session1grpc) label="**etcd_lock over gRPC** lock and unlock in 1 statement" ;;
            xactgrpc) label="**etcd_lock over gRPC** xact lock around an INSERT" ;;
            gosvc) label="peer: Go service, one client and session reused per worker (best practice)" ;;
            goshared) label="peer: Go service, one client and session shared by all workers" ;;
            goblog) label="peer: Go, the blog's pattern: new client and session per lock" ;;
            npm) label="peer: npm etcd3 lock acquire + release" ;;
            etcdctl) label="peer: etcdctl lock NAME -- true (a process per lock)" ;;
            floortls) label="JSON floor over TLS with client certs (kept-alive)" ;;
            goblogtls) label="peer: Go, the blog's pattern, TLS with client certs" ;;
            insert) label="reference: that INSERT transaction without the lock" ;;
            advisory) label="reference: pg_advisory_lock; pg_advisory_unlock" ;;
        esac
        row="| $label |"
        for c in $LEVELS; do row+=" $(cell "$w@$c") | ${ETCDCPU[$w@$c]:--} |"; done
        echo "$row"
    done
    echo
    echo "## Ratios: pairs/s ÷ pairs/s, same concurrency, same run"
    echo
    echo "| ratio |$hdr_levels"
    echo "|---|$sep_levels"
    for pair in session:floor session:gofloor session:gosvc session:goshared session:goblog \
                sessiongrpc:gofloor sessiongrpc:gosvc sessiongrpc:goshared sessiongrpc:session \
                session1grpc:gofloor session1grpc:gosvc xactgrpc:xact \
                session:npm session:etcdctl session:goblogtls \
                session1:floor sessiontls:floortls sessiontls:goblogtls \
                xact:floor xact:gosvc xact:goblog xact:npm xact:etcdctl xact:goblogtls \
                floor:gofloor floor:gosvc floor:goblog floor:npm floortls:goblogtls; do
        e=${pair%%:*}
        b=${pair#*:}
        [ "$e" = xact ] && [ "$HAVE_XACT" = 0 ] && continue
        [ "$e" = sessiontls ] && [ "$HAVE_TLS" = 0 ] && continue
        case $e in *grpc) [ "$HAVE_GRPC" = 0 ] && continue ;; esac
        el=$e
        [ "$e" = session ] && [ "$b" = goblogtls ] && el="session (over HTTP)"
        case $e in floor|floortls) el="ceiling: $e" ;; esac
        row="| $el ÷ $(short_name "$b") |"
        for c in $LEVELS; do row+=" $(ratio_at "$e" "$b" "$c") |"; done
        echo "$row"
    done
    echo
    echo "## etcd CPU per pair ÷ etcd CPU per pair, same concurrency, same run"
    echo
    echo "What the same work costs etcd on each path; above 1 means the first costs etcd more."
    echo
    echo "| ratio |$hdr_levels"
    echo "|---|$sep_levels"
    for pair in floor:gofloor session:gofloor session:gosvc gosvc:gofloor \
                sessiongrpc:session session1grpc:session1 xactgrpc:xact sessiongrpc:gofloor sessiongrpc:gosvc; do
        e=${pair%%:*}
        b=${pair#*:}
        row="| $(short_name "$e") ÷ $(short_name "$b") |"
        for c in $LEVELS; do row+=" $(ratio "${ETCDCPU[$e@$c]:-}" "${ETCDCPU[$b@$c]:-}") |"; done
        echo "$row"
    done
    echo
    echo "## etcd requests and connections per etcd_lock run"
    echo
    echo "Per lock+unlock: requests as etcd_lock counts them (etcd_lock_stats, keepalives excluded) and gRPC"
    echo "calls as etcd counts them, by method (its /metrics); the floor sends 2 (Txn 2.00). TCP connections:"
    echo "distinct sockets that PostgreSQL processes had open to etcd, sampled every 0.2 s with ss; one per"
    echo "backend is expected (two while waiting: the watch has its own), and the worker's when it renews."
    echo
    echo "| run | requests per lock | etcd calls per lock | TCP connections | locks |"
    echo "|---|---|---|---|---|"
    for k in $(for w in session session1 xact sessiongrpc session1grpc xactgrpc sessiontls; do
                   for c in $LEVELS; do echo "$w@$c"; done; done
               for c in $CONTENDED_LEVELS; do echo "contended@$c"; echo "contendedtls@$c"; echo "contendedgrpc@$c"; done
               for k in $SCALE_LOCKS; do echo "scale@$k"; done); do
        [ -n "${REQS[$k]:-}" ] || continue
        echo "| $k | ${REQS[$k]} | ${CALLS[$k]:-} | ${CONNS[$k]} | ${LOCKS[$k]} |"
    done
    echo
    echo "The floors and peers, per lock+unlock pair: requests as the driver counts them (unary calls for"
    echo "the Go peers; the blog pattern's keepalive stream is not one), calls as etcd counts them, and"
    echo "the connections the driver opened (floor: curl's count, with the one its set-up opened; Go: gRPC's,"
    echo "while the clock ran). Last round."
    echo
    echo "| run | requests per pair | etcd calls per pair | connections opened | pairs |"
    echo "|---|---|---|---|---|"
    for w in floor gofloor gosvc goshared goblog npm etcdctl floortls goblogtls; do
        for c in $LEVELS; do
            k=$w@$c
            [ -n "${NOPS[$k]:-}" ] || continue
            echo "| $k | $(ratio "${DRV_REQS[$k]:-}" "${NOPS[$k]}" | tr -d x) | ${CALLS[$k]:--} | ${DRV_CONNS[$k]:--} | ${NOPS[$k]} |"
        done
    done
    echo
    echo "## Contended: N clients on one name"
    echo
    echo "| clients | handoffs/s | release → acquire p50 | p99 | over 20 ms | hold p50 | handoffs | overlaps (must be 0) |"
    echo "|---|---|---|---|---|---|---|---|"
    for k in $(for c in $CONTENDED_LEVELS; do echo "contended@$c"; [ "$HAVE_TLS" -gt 0 ] && echo "contendedtls@$c"
                   [ "$HAVE_GRPC" -gt 0 ] && echo "contendedgrpc@$c"; done); do
        c=${k#*@}
        [ "${k%@*}" = contendedtls ] && c="$c, over TLS"
        [ "${k%@*}" = contendedgrpc ] && c="$c, over gRPC"
        echo "| $c | ${HO_RATE[$k]:-failed} | ${HO_P50[$k]:--} ms | ${HO_P99[$k]:--} ms | ${HO_SLOW[$k]:--}% | ${HO_HOLD[$k]:--} ms | ${HO_N[$k]:--} | ${HO_OVERLAP[$k]:--} |"
    done
    echo
    echo "## Scale: locks held at once by $SCALE_SESSIONS sessions (lease ttl $HOLD_TTL s)"
    echo
    echo "| locks held | leases | worker keepalives/s | per lease per ttl/3 | lock+unlock at $SCALE_CLIENTS client(s) meanwhile |"
    echo "|---|---|---|---|---|"
    for k in $SCALE_LOCKS; do
        key="scale@$k"
        echo "| $k | ${SC_LEASES[$key]:--} | ${SC_KA[$key]:--} | ${SC_KAPER[$key]:--} | $(cell "$key") |"
    done
    echo
    read -r shm_size shm_alloc <<<"$SHMEM"
    echo "Shared memory (pg_shmem_allocations, name 'etcd_lock'): $shm_size bytes for etcd_lock.max_locks = 4096,"
    echo "i.e. $(( shm_size / 4096 )) bytes per lock slot + lease slot, allocated at start whatever the number of locks held."
    echo "etcd_lock_stats.lost while the locks were held: $LOST_HELD (must be 0); while the holding sessions were"
    echo "being terminated (pg_terminate_backend, which makes them revoke their leases): $LOST_END (see the README)."
    echo
    echo "## Per-backend memory over lock/unlock cycles in one session"
    echo
    echo "| cycles | memory contexts (bytes) | RssAnon (kB) | VmRSS (kB) | elapsed s |"
    echo "|---|---|---|---|---|"
    for r in "${MEM_ROWS[@]}"; do
        read -r cy ctx ra vr el <<<"$r"
        echo "| $cy | $ctx | $ra | $vr | $el |"
    done
    if [ "${#MEM_ROWS[@]}" -ge 2 ]; then
        read -r cy0 ctx0 ra0 _ _ <<<"${MEM_ROWS[0]}"
        read -r cy1 ctx1 ra1 _ _ <<<"${MEM_ROWS[-1]}"
        echo
        echo "From $cy0 to $cy1 cycles: memory contexts $((ctx1 - ctx0)) bytes, RssAnon $((ra1 - ra0)) kB."
        if [ "$cy1" -lt "$CYCLES" ]; then
            echo "Stopped at $cy1 of $CYCLES cycles: the ${MEM_BUDGET} s budget ran out."
        fi
    fi
    echo
    echo "## CPU time per lock+unlock (ms, user + system)"
    echo
    echo "The client process's own CPU time, as the drivers report it (medians; the pgbench rows run"
    echo "in PostgreSQL backends, whose CPU is not isolated here), and, for the memory loop, the backend's."
    echo
    echo "| workload | client process at $(echo $LEVELS | sed 's/ /, /g') clients | etcd |"
    echo "|---|---|---|"
    for w in floor gofloor gosvc goshared goblog floortls goblogtls; do
        echo "| $(short_name "$w") | $(for c in $LEVELS; do echo "${CLIENTCPU[$w@$c]:--}"; done | xargs | sed 's/ /, /g') | $(for c in $LEVELS; do echo "${ETCDCPU[$w@$c]:--}"; done | xargs | sed 's/ /, /g') |"
    done
    if [ "${#MEM_TICKS[@]}" -ge 2 ]; then
        read -r mc0 mt0 <<<"${MEM_TICKS[0]}"
        read -r mc1 mt1 <<<"${MEM_TICKS[-1]}"
        echo "| memory loop: 1 statement per cycle, psql \\gexec (client process = the backend) | $(awk -v t=$((mt1 - mt0)) -v n=$((mc1 - mc0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.3f", t * 1000 / hz / n }') | $(awk -v d=$((mem_e1 - mem_e0)) -v n="$mc1" -v hz="$CLK_TCK" 'BEGIN { printf "%.3f", d * 1000 / hz / n }') |"
    fi
    echo
    echo "## Goals"
    echo
    echo "The ceiling is the same ratio for the floor itself: what etcd_lock would reach with zero overhead."
    echo
    echo "| goal | measured | ceiling | verdict |"
    echo "|---|---|---|---|"
    has_level() { case " $LEVELS " in *" $1 "*) return 0 ;; esac; return 1; }
    if has_level 1; then
        goal "session lock+unlock ≥ 0.85× floor at 1 client" "$(ratio_at session floor 1)" 0.85 ">=" "1.00x"
    fi
    if has_level 8; then
        goal "session lock+unlock ≥ 0.8× floor at 8 clients" "$(ratio_at session floor 8)" 0.8 ">=" "1.00x"
    fi
    goal "session ≥ 1.8× npm etcd3 (at $LEVELS clients)" "$(levels_of session ratio_at npm)" 1.8 ">=" \
        "$(levels_of floor ratio_at npm)"
    goal "session ≥ 1.8× the Go blog pattern (at $LEVELS clients)" "$(levels_of session ratio_at goblog)" 1.8 ">=" \
        "$(levels_of floor ratio_at goblog)"
    if [ "$HAVE_TLS" -gt 0 ]; then
        goal "session over TLS ≥ 3× the Go blog pattern over TLS (at $LEVELS clients)" "$(levels_of sessiontls ratio_at goblogtls)" 3 ">=" \
            "$(levels_of floortls ratio_at goblogtls)"
    else
        goal "session ≥ 3× the Go blog pattern over TLS (etcd_lock over HTTP: it has no TLS settings)" "$(levels_of session ratio_at goblogtls)" 3 ">=" \
            "$(levels_of floortls ratio_at goblogtls)"
    fi
    if [ "$HAVE_GRPC" -gt 0 ]; then
        goal "etcd CPU per pair over gRPC ≤ 0.6× over JSON (at $LEVELS clients)" \
            "$(for c in $LEVELS; do ratio "${ETCDCPU[sessiongrpc@$c]:-}" "${ETCDCPU[session@$c]:-}"; done | xargs)" 0.6 "<=" \
            "$(for c in $LEVELS; do ratio "${ETCDCPU[gofloor@$c]:-}" "${ETCDCPU[floor@$c]:-}"; done | xargs)"
        goal "session over gRPC ≥ 0.85× the Go service (at $LEVELS clients)" "$(levels_of sessiongrpc ratio_at gosvc)" 0.85 ">=" \
            "$(levels_of gofloor ratio_at gosvc)"
        goal "session over gRPC ≥ 0.85× the gRPC floor (at $LEVELS clients)" "$(levels_of sessiongrpc ratio_at gofloor)" 0.85 ">=" \
            "1.00x"
    fi
    goal "session over JSON ≥ 0.85× the Go service (at $LEVELS clients)" "$(levels_of session ratio_at gosvc)" 0.85 ">=" \
        "$(levels_of floor ratio_at gosvc)"
    goal "contended handoff p50 < 5 ms (ms, at $CONTENDED_LEVELS clients, HTTP)" \
        "$(for c in $CONTENDED_LEVELS; do echo "${HO_P50[contended@$c]:--}"; done | xargs)" 5 "<"
    if [ "$HAVE_GRPC" -gt 0 ]; then
        goal "contended handoff p50 < 5 ms (ms, at $CONTENDED_LEVELS clients, gRPC)" \
            "$(for c in $CONTENDED_LEVELS; do echo "${HO_P50[contendedgrpc@$c]:--}"; done | xargs)" 5 "<"
    fi
    goal "keepalives ≤ 1 per lease per ttl/3, and > 0 (at $SCALE_LOCKS locks held)" \
        "$(for k in $SCALE_LOCKS; do echo "${SC_KAPER[scale@$k]:--}"; done | xargs)" 1.05 "(0,]"
    echo
    echo "The keepalive verdict allows 5% for the edges of the window; 0 means the worker renewed nothing."
    if [ "$CRASHES" -gt 0 ]; then
        echo
        echo "**PostgreSQL crashed $CRASHES time(s) during the run** (each crash restarts the server and ends every session):"
        echo
        grep -h 'terminated by signal' "$work"/pg-*/postgres.log | head -n 5 | sed 's/^/    /'
    fi
    if [ "${#FAILED[@]}" -gt 0 ]; then
        echo
        echo "**Failed:** ${FAILED[*]}"
    fi
} >"$report"
cat "$report"
echo >&2
say "report written to $report; $((t_end - t_begin)) s in all, $((t_end - t_installed)) s after package install"
if [ "${#FAILED[@]}" -gt 0 ]; then
    say "FAILED: ${FAILED[*]}"
    exit 1
fi
exit 0
