#!/usr/bin/env bash
# The demo, from a fresh Debian 12 machine, as root:
#   bash scripts/demo.sh
# Installs what it needs (and only that), builds and installs etcd_lock,
# starts an etcd and a throwaway PostgreSQL with the extension, both on free
# ports, and shows sessions contending for one lock, with timestamps.
# Everything it starts or creates is stopped and removed when it exits, also
# on failure or Ctrl-C.  Debian's own "15 main" cluster and etcd service,
# which the packages set up, are left as they are: the README's Installing
# section uses them (see scripts/lib.sh).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
. "$src/scripts/lib.sh"
cd /

if [ "$(id -u)" != 0 ]; then
    echo "run this as root: it installs packages and the extension" >&2
    exit 1
fi

NAME=com.example.Order
work=
pg_data=
declare -A sess_pid=() sess_fd=() sess_shown=() sess_marks=()
bg_pids=()

cleanup() {
    local status=$? s p fd
    set +e
    trap - EXIT INT TERM
    if [ "$status" != 0 ] && [ -n "$work" ]; then
        for f in "$work"/*.out "$work/postgresql.log" "$work/etcd/etcd.log"; do
            [ -s "$f" ] || continue
            echo "---- $f (tail)" >&2
            tail -n 20 "$f" >&2
        done
    fi
    # quietly: bash would report each background job that a Ctrl-C killed
    {
        for s in "${!sess_fd[@]}"; do
            fd=${sess_fd[$s]}
            exec {fd}>&-
        done
        for p in "${sess_pid[@]}" "${bg_pids[@]}"; do
            kill "$p"
        done
        if [ -n "$pg_data" ] && [ -f "$pg_data/postmaster.pid" ]; then
            as_postgres "$PG_BIN/pg_ctl" -D "$pg_data" -m fast -w stop >/dev/null
        fi
        stop_etcd
        wait
    } 2>/dev/null
    [ -n "$work" ] && rm -rf "$work"
    if [ "$status" = 130 ] || [ "$status" = 143 ]; then
        echo "demo.sh: interrupted; stopped and removed what it had started" >&2
    elif [ "$status" != 0 ]; then
        echo "demo.sh: FAILED (exit status $status)" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# a session that died would otherwise kill this script silently
trap 'exit 141' PIPE

die() {
    echo "demo.sh: $*" >&2
    exit 1
}

heading() {
    printf '\n\n==== %s\n\n' "$*"
}

# Explanatory text, wrapped.
say() {
    printf '%s\n' "$*" | fold -s -w 78
    echo
}

# ---------------------------------------------------------------------------
# psql helpers

psql_cmd() {
    "${PSQL[@]}" "$@"
}

# One statement in a fresh connection, echoed with its output.
run() {
    printf '[any session]\n'
    psql_cmd -e -v ON_ERROR_STOP=1 -c "$1"
    echo
}

# One value from a fresh connection.
value() {
    psql_cmd -At -v ON_ERROR_STOP=1 -c "$1"
}

# poll SQL [what]: wait until the query returns t; no fixed sleeps.
poll() {
    local i
    for i in $(seq 1 600); do
        [ "$(value "$1" 2>/dev/null)" = t ] && return 0
        sleep 0.05
    done
    die "timed out waiting for ${2:-$1}"
}

# background IN OUT COMMAND...: run COMMAND in the background, reading IN and
# writing OUT, without the write ends of the sessions' FIFOs: a process that
# kept one open would keep that session from ever seeing the end of its input.
background() {
    local in=$1 out=$2
    shift 2
    (
        for fd in "${sess_fd[@]}"; do
            exec {fd}>&-
        done
        exec "$@" <"$in" >"$out" 2>&1
    ) &
}

# A session is a psql process fed through a FIFO, so that it stays connected
# between the statements this script sends it.  Its output goes to a file.
session_open() {
    local s=$1 fd
    rm -f "$work/$s.in" "$work/$s.out"
    mkfifo "$work/$s.in"
    background "$work/$s.in" "$work/$s.out" "${PSQL[@]}" -e
    sess_pid[$s]=$!
    exec {fd}>"$work/$s.in"
    sess_fd[$s]=$fd
    sess_shown[$s]=0
    sess_marks[$s]=0
}

# session_send S SQL: send SQL (one or more lines); do not wait for it.
session_send() {
    kill -0 "${sess_pid[$1]}" 2>/dev/null || die "session $1 has ended"
    printf '%s\n' "$2" >&"${sess_fd[$1]}"
}

# session_sync S: wait until S has run everything sent to it so far.
session_sync() {
    local s=$1 m i
    m=$((sess_marks[$s] + 1))
    sess_marks[$s]=$m
    session_send "$s" "\\echo @@sync $m"
    for i in $(seq 1 1200); do
        grep -qx "@@sync $m" "$work/$s.out" && return 0
        kill -0 "${sess_pid[$s]}" 2>/dev/null || break
        sleep 0.025
    done
    cat "$work/$s.out" >&2
    die "session $s did not finish its statements"
}

# session_show S: print what S printed since the last call.
session_show() {
    local s=$1 n
    n=$(wc -l <"$work/$s.out")
    if [ "$n" -gt "${sess_shown[$s]}" ]; then
        printf '[session %s]\n' "$s"
        sed -n "$((sess_shown[$s] + 1)),${n}p" "$work/$s.out" | grep -v '^@@sync ' || true
        sess_shown[$s]=$n
    fi
}

# session_run S SQL: send, wait, show.
session_run() {
    session_send "$1" "$2"
    session_sync "$1"
    session_show "$1"
}

# session_close S: end the session (psql sees end of input and disconnects).
session_close() {
    local s=$1 fd=${sess_fd[$1]}
    exec {fd}>&-
    unset "sess_fd[$s]"
    wait "${sess_pid[$s]}" || die "session $s failed"
    unset "sess_pid[$s]"
}

# The last time of day (HH:MM:SS.ffffff) a session printed.
last_time() {
    grep -oE '[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]+' "$work/$1.out" | tail -n 1
}

etcdctl_cmd() {
    "${ETCDCTL[@]}" "$@"
}

show_etcd_keys() {
    printf '[shell]\n$ etcdctl get --prefix --keys-only %s\n' "$1"
    etcdctl_cmd get --prefix --keys-only "$1" | sed '/^$/d'
    echo
}

waiting_on() {
    echo "SELECT count(*) = $2 FROM etcd_locks WHERE key = '$1' AND state = 'waiting'"
}

# ---------------------------------------------------------------------------
heading "Setting up: packages, build, etcd, PostgreSQL"

work=$(mktemp -d /tmp/etcd_lock_demo.XXXXXX)
apt_install "${DEMO_PACKAGES[@]}"
chown postgres: "$work"
echo "building and installing etcd_lock ..."
build_and_install "$src" "$work/build" >/dev/null
start_etcd "$work/etcd"
ETCDCTL=(env ETCDCTL_API=3 etcdctl --endpoints="$ETCD_URL")
echo "etcd $(etcd --version | sed -n 's/^etcd Version: //p') is serving at $ETCD_URL"
echo "(Debian's own PostgreSQL cluster \"15 main\" and etcd service are left as the"
echo " packages set them up, for the README's Installing section: this demo runs"
echo " its own, on free ports, and removes them when it ends.)"

pg_data=$work/pg
pg_port=$(free_port)
PSQL=("$PG_BIN/psql" -X -h "$work/sock" -p "$pg_port" -U postgres -d postgres)
mkdir "$work/sock"
chown postgres: "$work/sock"
as_postgres "$PG_BIN/initdb" -D "$pg_data" -U postgres -A trust \
    -E UTF8 --locale=C.UTF-8 --no-sync >"$work/initdb.log" 2>&1 ||
    { cat "$work/initdb.log" >&2; die "initdb failed"; }
cat >>"$pg_data/postgresql.conf" <<CONF

# added by scripts/demo.sh
listen_addresses = ''
port = $pg_port
unix_socket_directories = '$work/sock'
shared_preload_libraries = 'etcd_lock'
etcd_lock.endpoints = '$ETCD_URL'
CONF
as_postgres "$PG_BIN/pg_ctl" -D "$pg_data" -l "$work/postgresql.log" -w start >/dev/null ||
    { cat "$work/postgresql.log" >&2; die "PostgreSQL did not start"; }
echo "PostgreSQL $(value 'SHOW server_version') is running in $pg_data (socket in $work/sock, port $pg_port)"
echo "its postgresql.conf ends with:"
sed -n '/# added by scripts\/demo.sh/,$p' "$pg_data/postgresql.conf" | sed 's/^/    /'
echo
run "CREATE EXTENSION etcd_lock"

# ---------------------------------------------------------------------------
heading "1. A session takes a lock and keeps it; a second session waits"

say "Session A locks $NAME with a ttl of 30 seconds and keeps it. Session B asks \
for the same lock and waits."

session_open A
session_open B
session_run A "SELECT etcd_lock('$NAME', 30) AS handle, clock_timestamp()::time AS locked_at;"
session_send B "SELECT clock_timestamp()::time AS asking_at, etcd_lock('$NAME') AS handle, clock_timestamp()::time AS locked_at;"
poll "$(waiting_on "$NAME" 1)" "session B to wait"
echo "[session B]"
echo "(waiting; psql has not returned)"
echo

heading "2. What is held: the etcd_locks view and the keys in etcd"

say "While B waits, the view shows A's lock held and B's lock waiting. In etcd, \
each session has its own key under $NAME/, named after its lease in hex, as in \
etcd's own lock recipe. The key created first holds the lock."

run "SELECT * FROM etcd_locks ORDER BY state, pid"
show_etcd_keys "etcd_lock/$NAME/"

say "Session A works for two more seconds, then ends without unlocking (the \
service that held the lock exits). Its backend revokes its lease, which deletes \
its key in etcd, and B acquires at once."

session_send A "SELECT pg_sleep(2) AS work, clock_timestamp()::time AS leaving_at;
\\q"
session_close A
session_show A
session_sync B
session_show B
a_left=$(last_time A)
b_asked=$(grep -oE '[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]+' "$work/B.out" | sed -n '$!h;${x;p}')
b_locked=$(last_time B)
say "B waited $(value "SELECT round(extract(epoch FROM time '$b_locked' - time '$b_asked'), 3)") s \
for the lock, and had it $(value "SELECT round(extract(epoch FROM time '$b_locked' - time '$a_left') * 1000, 1)") ms \
after A's last statement, which ended A's session."
echo
show_etcd_keys "etcd_lock/$NAME/"
session_run B "SELECT etcd_unlock_all() AS released;"
session_close B

# ---------------------------------------------------------------------------
heading "3. Two sessions lock and unlock in turn"

say "Sessions A and B each run this loop five times: take the lock, do 100 ms of \
guarded work, note the time, unlock. etcd serves waiters in FIFO order, so the \
two alternate, and no two turns overlap."

run "CREATE TABLE turns (session text, round int, locked_at timestamptz, unlocking_at timestamptz)"
loop_sql() {
    cat <<SQL
DO \$\$
DECLARE
    h text;
    t timestamptz;
BEGIN
    FOR i IN 1..5 LOOP
        h := etcd_lock('$NAME');
        t := clock_timestamp();
        PERFORM pg_sleep(0.1);     -- the work the lock guards
        INSERT INTO turns VALUES ('$1', i, t, clock_timestamp());
        PERFORM etcd_unlock(h);
    END LOOP;
END
\$\$;
SQL
}
session_open A
session_open B
session_send A "$(loop_sql A)"
session_send B "$(loop_sql B)"
session_sync A
session_sync B
session_show A
session_close A
session_close B
echo "(session B ran the same loop with 'B')"
echo
run "SELECT session, round, locked_at::time, unlocking_at::time,
       round(extract(epoch FROM locked_at - lag(unlocking_at) OVER w) * 1000, 1) AS ms_since_previous
  FROM turns WINDOW w AS (ORDER BY locked_at) ORDER BY locked_at"
run "SELECT count(*) AS overlapping_turns
  FROM turns a JOIN turns b ON a.session < b.session
 WHERE tstzrange(a.locked_at, a.unlocking_at) && tstzrange(b.locked_at, b.unlocking_at)"

# ---------------------------------------------------------------------------
heading "4. etcdctl lock and a SQL session exclude each other"

say "With etcd_lock.prefix set to '' (superuser only), SQL lock names are etcd's \
names, so a SQL session and \`etcdctl lock\` (or Go's concurrency.Mutex, or \
jetcd) contend for the same lock."

background /dev/null "$work/etcdctl1.out" "${ETCDCTL[@]}" lock "$NAME"
etcdctl1=$!
bg_pids+=("$etcdctl1")
for i in $(seq 1 400); do
    [ -s "$work/etcdctl1.out" ] && break
    sleep 0.025
done
[ -s "$work/etcdctl1.out" ] || die "etcdctl lock did not acquire"
echo "[shell]"
echo "\$ etcdctl lock $NAME &"
sed '/^$/d' "$work/etcdctl1.out"
echo
session_open C
session_run C "SET etcd_lock.prefix = '';
SELECT etcd_try_lock('$NAME') IS NULL AS held_elsewhere;"
session_send C "SELECT clock_timestamp()::time AS asking_at, etcd_lock('$NAME') AS handle, clock_timestamp()::time AS locked_at;"
poll "$(waiting_on "$NAME" 1)" "session C to wait"
show_etcd_keys "$NAME/"
echo "[shell]"
echo "\$ kill -INT $etcdctl1    # etcdctl lock; at $(date +%H:%M:%S.%6N)"
kill -INT "$etcdctl1"
wait "$etcdctl1" || true
echo
session_sync C
session_show C

say "Now the SQL session holds the lock, and etcdctl waits for it. etcdctl runs \
\`date\` once it has the lock."

background /dev/null "$work/etcdctl2.out" "${ETCDCTL[@]}" lock "$NAME" date +%H:%M:%S.%6N
etcdctl2=$!
bg_pids+=("$etcdctl2")
for i in $(seq 1 400); do
    [ "$(etcdctl_cmd get --prefix --keys-only "$NAME/" | sed '/^$/d' | wc -l)" = 2 ] && break
    sleep 0.025
done
show_etcd_keys "$NAME/"
session_run C "SELECT clock_timestamp()::time AS unlocking_at, etcd_unlock_all() AS released;"
wait "$etcdctl2" || die "etcdctl lock failed: $(cat "$work/etcdctl2.out")"
echo "[shell]"
echo "\$ etcdctl lock $NAME date +%H:%M:%S.%6N    # started while session C held the lock"
cat "$work/etcdctl2.out"
echo
session_close C

# ---------------------------------------------------------------------------
heading "5. A crash: the lock is freed when its lease expires"

say "If a backend or the server crashes, nothing revokes the lease: etcd frees \
the lock when the lease expires, at most ttl seconds after the last renewal. \
Session D takes the lock with a ttl of 5 seconds, then its backend is killed \
with SIGKILL, which makes PostgreSQL restart."

session_open D
session_run D "SELECT etcd_lock('$NAME', 5) AS handle, clock_timestamp()::time AS locked_at, pg_backend_pid() AS pid;"
d_pid=$(value "SELECT pid FROM etcd_locks WHERE key = '$NAME'")
echo "[shell]"
echo "\$ kill -KILL $d_pid    # at $(date +%H:%M:%S.%6N)"
kill -KILL "$d_pid"
# session D's connection is gone; let its psql see the end of its input
fd=${sess_fd[D]}
exec {fd}>&-
unset "sess_fd[D]"
wait "${sess_pid[D]}" 2>/dev/null || true
unset "sess_pid[D]"
echo
# the postmaster reinitializes after a backend crash: wait until it is ready
# for the second time
for i in $(seq 1 600); do
    [ "$(grep -c 'database system is ready to accept connections' "$work/postgresql.log")" -ge 2 ] &&
        value "SELECT 1" >/dev/null 2>&1 && break
    sleep 0.05
done
value "SELECT 1" >/dev/null || die "PostgreSQL did not come back after the crash"
echo "PostgreSQL has restarted; the key is still in etcd:"
echo
show_etcd_keys "etcd_lock/$NAME/"
session_open E
session_run E "SELECT clock_timestamp()::time AS asking_at, etcd_lock('$NAME') AS handle, clock_timestamp()::time AS locked_at;"
session_run E "SELECT etcd_unlock_all() AS released;"
session_close E

# ---------------------------------------------------------------------------
heading "6. What it cost"

say "etcd_lock_stats counts every HTTP request to etcd, from the backends and \
from the lease worker. In steady state, a lock plus an unlock is two requests: \
a txn that creates the key and finds the holder, and a txn that deletes it."

session_open F
session_run F "SELECT etcd_unlock(etcd_lock('warm-up'));
SELECT requests - keepalives AS before FROM etcd_lock_stats \\gset
SELECT etcd_unlock(etcd_lock('$NAME'));
SELECT requests - keepalives - :before AS requests_per_lock_and_unlock FROM etcd_lock_stats;"
session_close F
run "SELECT * FROM etcd_lock_stats"

heading "Done"
echo "Stopping PostgreSQL and etcd, removing $work."
