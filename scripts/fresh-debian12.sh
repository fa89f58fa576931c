#!/usr/bin/env bash
# A first run on a fresh Debian 12, checked in a throwaway root, as root:
#   bash scripts/fresh-debian12.sh [--worktree] [TAP_FILE...]
# Makes a minimal Debian 12 (bookworm) root with debootstrap, clones this
# repository's committed HEAD into its /root/etcd_lock (--worktree: copies the
# working tree instead, uncommitted changes and all), and runs there, as root
# with no standard input and CI=true, what the README tells a new user to run:
#   1. bash scripts/demo.sh
#   2. the demo again, made to fail (an etcd that does not start), and once
#      more, interrupted with SIGINT to its process group as Ctrl-C would:
#      each must say so (FAILED, interrupted) and leave nothing behind;
#   3. bash scripts/test.sh [TAP_FILE...], then the verbose mode on one file;
#   4. the README's "Installing" section, word for word: each ```sh block is
#      run with bash -ex from the checkout, and a ```sql block is the
#      standard input of the ```sh block before it (the psql it opens).
# Between the steps it compares the root with the state before the demo:
# /etc (every file the change is not explained by dpkg or by the packages'
# own maintainer scripts is an error; nothing may mention etcd_lock; no
# createcluster.d file; etcd not disabled), /tmp and /var/tmp (unchanged),
# and the processes in the root (only the cluster "15 main" and the etcd
# service that the packages started).  Ends with "N passed, N failed" over
# these checks, and exits non-zero if one failed.
#
# The packages start Debian's PostgreSQL and etcd in the root, and the root
# shares the host's network: so 127.0.0.1:2379 must be free on the host.
# Nothing is installed on the host except debootstrap if it is missing.  On
# any exit, also on SIGINT and SIGTERM, everything running in the root is
# stopped, what is mounted under it unmounted, and the root removed.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
self="$src/scripts/fresh-debian12.sh"
SUITE=bookworm
CHECKOUT=/root/etcd_lock

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$self" >&2
    exit "${1:-2}"
}
worktree=0
tests=()
for arg in "$@"; do
    case $arg in
        --worktree) worktree=1 ;;
        -h|--help) usage 0 ;;
        t/*.pl) [ -f "$src/$arg" ] || { echo "no TAP file $src/$arg" >&2; exit 2; }
                tests+=("$arg") ;;
        *) usage ;;
    esac
done

if [ "$(id -u)" != 0 ]; then
    echo "run this as root: it makes a chroot and mounts into it" >&2
    exit 1
fi

. "$src/scripts/root-lib.sh"
enter_private_namespace "$self" "$@"

started=$SECONDS
passed=0
failed=0
failures=()
times=()

check() {   # check WHAT CMD...: one named check
    local what=$1
    shift
    if "$@"; then
        passed=$((passed + 1))
        echo "   ok: $what"
    else
        failed=$((failed + 1))
        failures+=("$what")
        echo "   NOT OK: $what"
    fi
}

# run_shown NAME CMD...: a step whose output is shown as it comes and kept
# in LOG_DIR/NAME.log.  Sets RC to its exit status.
run_shown() {
    local name=$1 log tailer
    shift
    log=$LOG_DIR/$name.log
    : >"$log"
    # ends by itself with this script, if it is interrupted
    tail -n +1 -f --pid=$$ "$log" &
    tailer=$!
    RC=0
    STEP_LOG=$log step "$@" || RC=$?
    sleep 0.5
    kill "$tailer" 2>/dev/null || true
    wait "$tailer" 2>/dev/null || true
    [ -z "$(tail -c 1 "$log")" ] || echo
}

# in_checkout CMD: sets CK to what runs the shell command CMD in the root,
# from the checkout, as a user's root shell would
in_checkout() {
    CK=("${IN_ROOT[@]}" bash -c "cd $CHECKOUT && $1")
}

# --- the state of the root -------------------------------------------------

# snapshot NAME: what the checks compare, in LOG_DIR/NAME.*
snapshot() {
    local n=$LOG_DIR/$1
    (cd "$ROOT" &&
        { find etc -xdev -type l -printf '%p -> %l\n'
          find etc -xdev -type f -print0 | xargs -0 md5sum | awk '{ print $2, $1 }'
        } | LC_ALL=C sort) >"$n.etc"
    # the JVM's hsperfdata_root comes from the JDK's own packages, whose
    # maintainer scripts run java as root
    (cd "$ROOT" && find tmp var/tmp -mindepth 1 -maxdepth 1 ! -path tmp/hsperfdata_root |
        LC_ALL=C sort) >"$n.tmp"
    services >"$n.services"
}

# Whether Debian's cluster and etcd service run.  In a chroot, without
# systemd, the packages start neither (invoke-rc.d finds no runlevel): what
# matters is that the demo and the tests leave them as they were.
services() {
    local p etcd=stopped
    for p in $(root_pids); do
        # the init script starts it without arguments; ours have some
        [ "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" = "/usr/bin/etcd " ] && etcd=running
    done
    echo "etcd service: $etcd"
    { "${IN_ROOT[@]}" pg_lsclusters -h 2>/dev/null || true; } |
        awk '{ print "cluster", $1, $2 ":", $4 }'
}

# The processes in the root that the packages did not start: anything but the
# postmaster of "15 main" with its children, and the etcd service.
stray_processes() {
    local pm=
    [ -f "$ROOT/var/lib/postgresql/15/main/postmaster.pid" ] &&
        pm=$(head -n 1 "$ROOT/var/lib/postgresql/15/main/postmaster.pid")
    for p in $(root_pids); do
        ps -o pid=,ppid=,user=,args= -p "$p" 2>/dev/null || true
    done | awk -v pm="$pm" '
        $1 == pm || $2 == pm { next }
        $4 == "/usr/bin/etcd" && NF == 4 { next }
        { print }'
}

# The paths in /etc that changed between the snapshots BEFORE and AFTER and
# that the packages do not account for, one a line:
#   - a conffile (dpkg's, or one ucf manages) is the package's own as long as
#     its content is what the package recorded: an edited one is listed;
#   - any other file that dpkg lists for a package is the package's own;
#   - so are the files that the packages' maintainer scripts write: users
#     and groups (postgres, etcd, ssl-cert), the linker cache, alternatives,
#     init script and systemd unit links, CA certificates and the snakeoil
#     key, fontconfig's links, the JDK's preferences, locales' settings,
#     copies of shipped defaults (inputrc, networks, python3's
#     debian_config), postgresql-common's root.crt and apt setting, and the
#     clusters that pg_createcluster makes;
#   - anything else is listed.
unexplained_etc_changes() {
    local before=$1 after=$2
    { "${IN_ROOT[@]}" dpkg-query -W -f='${Conffiles}\n' 2>/dev/null |
          awk 'NF >= 2 && $3 != "obsolete" { print substr($1, 2), $2 }'
      awk 'NF == 2 { print substr($2, 2), $1 }' "$ROOT/var/lib/ucf/hashfile" 2>/dev/null
    } >"$LOG_DIR/conffiles"
    cat "$ROOT"/var/lib/dpkg/info/*.list | sed -n 's|^/etc/|etc/|p' >"$LOG_DIR/owned"
    LC_ALL=C comm -3 "$before" "$after" | sed 's/^\t//; s/ .*//' | LC_ALL=C sort -u |
        awk -v allow='^etc/((passwd|group|shadow|gshadow|subuid|subgid)-?|\.pwd\.lock|ld\.so\.cache|ca-certificates\.conf|locale\.gen|default/locale|inputrc|networks|python3/debian_config|postgresql-common/root\.crt|apt/apt\.conf\.d/02autoremove-postgresql)$|^etc/(alternatives|rc[0-6S]\.d|systemd/system|ssl/certs|ssl/private|fonts/conf\.d|\.java|postgresql/15/main)/' '
            FILENAME == ARGV[1] { conf[$1] = $2; next }
            FILENAME == ARGV[2] { owned[$1] = 1; next }
            FILENAME == ARGV[3] { now[$1] = $2; next }
            $1 in conf { if (($1 in now) && now[$1] != conf[$1]) print $1 " (a conffile, edited)"; next }
            $1 in owned || $1 ~ allow { next }
            { print }
        ' "$LOG_DIR/conffiles" "$LOG_DIR/owned" "$after" -
}

# check_state WHEN: the root against the state before the demo
check_state() {
    local when=$1 s
    snapshot "$when"
    check "$when: /tmp and /var/tmp as before the demo" \
        diff "$LOG_DIR/before.tmp" "$LOG_DIR/$when.tmp"
    s=$(stray_processes)
    [ -z "$s" ] || echo "$s" | sed 's/^/      left: /'
    check "$when: no process left but Debian's \"15 main\" and etcd service" [ -z "$s" ]
    s=$(unexplained_etc_changes "$LOG_DIR/before.etc" "$LOG_DIR/$when.etc")
    [ -z "$s" ] || echo "$s" | sed 's/^/      changed: /'
    check "$when: every change in /etc is the packages' own" [ -z "$s" ]
    s=$(grep -rl etcd_lock "$ROOT/etc" 2>/dev/null || true)
    [ -z "$s" ] || echo "$s" | sed 's/^/      mentions etcd_lock: /'
    check "$when: nothing in /etc mentions etcd_lock" [ -z "$s" ]
    check "$when: no file in /etc/postgresql-common/createcluster.d" \
        [ -z "$(ls -A "$ROOT/etc/postgresql-common/createcluster.d" 2>/dev/null)" ]
    check "$when: etcd is enabled (rc2.d link and systemd unit link)" \
        eval '[ -n "$(ls "$ROOT"/etc/rc2.d/S*etcd 2>/dev/null)" ] &&
              [ -L "$ROOT/etc/systemd/system/multi-user.target.wants/etcd.service" ]'
    check "$when: the cluster \"15 main\" is there" grep -q '^cluster 15 main:' "$LOG_DIR/$when.services"
    if [ -f "$LOG_DIR/packages.services" ]; then
        check "$when: Debian's etcd and \"15 main\" as the packages left them ($(paste -sd, "$LOG_DIR/packages.services"))" \
            diff "$LOG_DIR/packages.services" "$LOG_DIR/$when.services"
    else
        # the first run: the state the packages left
        cp "$LOG_DIR/$when.services" "$LOG_DIR/packages.services"
    fi
}

preloaded_in_main() {
    "${IN_ROOT[@]}" runuser -u postgres -- psql -X -Atc 'SHOW shared_preload_libraries' 2>/dev/null |
        grep -qx etcd_lock
}

# output_has NAME REGEX / output_lacks NAME REGEX: about LOG_DIR/NAME.log
output_has() { grep -Eq -- "$2" "$LOG_DIR/$1.log"; }
output_lacks() { ! grep -Eq -- "$2" "$LOG_DIR/$1.log"; }

timed() { times+=("$1 $(($SECONDS - $2)) s"); }

# --- the root --------------------------------------------------------------

say "a fresh Debian 12 root: demo, tests, then the README's Installing section"
if ss -Hltn 'sport = :2379' 2>/dev/null | grep -q .; then
    echo "127.0.0.1:2379 is taken on this host; Debian's etcd in the root needs it" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap on the host"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        debootstrap debian-archive-keyring >/dev/null
fi

t=$SECONDS
make_root "$SUITE"
# as an installed system has them
cat > "$ROOT/etc/apt/sources.list" <<LIST
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
LIST
if [ "$worktree" = 1 ]; then
    what="the working tree of $src"
    mkdir -p "$ROOT$CHECKOUT"
    tar -C "$src" -cf - --exclude=./.git . | tar -C "$ROOT$CHECKOUT" -xf -
else
    what="$(git -C "$src" rev-parse --abbrev-ref HEAD) at $(git -C "$src" rev-parse --short HEAD)"
    git clone -q --no-hardlinks "$src" "$ROOT$CHECKOUT"
    [ -z "$(git -C "$src" status --porcelain --untracked-files=no)" ] ||
        say "note: uncommitted changes in $src are not in the clone (--worktree takes them)"
fi
chown -R 0:0 "$ROOT$CHECKOUT"
mkdir "$ROOT/fresh-check"    # this script's own files in the root
timed "debootstrap and checkout" "$t"
say "in $ROOT$CHECKOUT: $what"
snapshot before

# --- 1. the demo -----------------------------------------------------------

t=$SECONDS
say "1. bash scripts/demo.sh"
in_checkout "bash scripts/demo.sh"
run_shown demo "${CK[@]}"
timed "demo" "$t"
check "demo: exit status 0 (was $RC)" [ "$RC" = 0 ]
check "demo: named the packages before apt-get" output_has demo '^installing with apt-get: make gcc'
check "demo: showed apt's progress while it ran" output_has demo '^  \.\.\. [0-9]+ s: '
check "demo: no 'could not change directory'" output_lacks demo 'could not change directory'
check "demo: installed no JDK" \
    eval '! "${IN_ROOT[@]}" dpkg-query -W -f "\${db:Status-Abbrev}\n" "openjdk-*" 2>/dev/null | grep -q "^ii"'
check_state "after the demo"

# --- 2. the demo, failing and interrupted ----------------------------------

t=$SECONDS
say "2a. the demo with an etcd that does not start"
mkdir -p "$ROOT/fresh-check/bin"
printf '#!/bin/sh\necho "etcd: failing on purpose (scripts/fresh-debian12.sh)" >&2\nexit 1\n' \
    >"$ROOT/fresh-check/bin/etcd"
chmod 755 "$ROOT/fresh-check/bin/etcd"
in_root "/fresh-check/bin:$CHROOT_PATH"
in_checkout "bash scripts/demo.sh"
in_root
RC=0
STEP_LOG=$LOG_DIR/demo-fail.log step "${CK[@]}" || RC=$?
tail -n 8 "$LOG_DIR/demo-fail.log" | sed 's/^/   | /'
check "failing demo: exit status not 0 (was $RC)" [ "$RC" != 0 ]
check "failing demo: printed its FAILED line" output_has demo-fail '^demo\.sh: FAILED \(exit status [0-9]+\)$'
rm -rf "$ROOT/fresh-check/bin"
check_state "after the failing demo"

say "2b. the demo, interrupted (SIGINT to its process group) while two sessions hold and wait"
log=$LOG_DIR/demo-int.log
in_checkout "exec bash scripts/demo.sh"
setsid "${CK[@]}" </dev/null >"$log" 2>&1 7>&- 8>&- &
BG_PID=$!
for i in $(seq 1 1200); do
    grep -q '^==== 2\.' "$log" && break
    kill -0 "$BG_PID" 2>/dev/null || break
    sleep 0.1
done
kill -s INT -- "-$BG_PID" 2>/dev/null || true
RC=0
wait "$BG_PID" || RC=$?
BG_PID=
tail -n 4 "$log" | sed 's/^/   | /'
# psql catches SIGINT, and bash then leaves it to psql (it does not run its
# own trap): so the demo says "interrupted" or "FAILED", as it happens
check "interrupted demo: exit status not 0 (was $RC)" [ "$RC" != 0 ]
check "interrupted demo: said so" output_has demo-int '^demo\.sh: (interrupted|FAILED)'
check_state "after the interrupted demo"
timed "failing and interrupted demos" "$t"

# --- 3. the tests ----------------------------------------------------------

t=$SECONDS
say "3. bash scripts/test.sh ${tests[*]}"
in_checkout "bash scripts/test.sh ${tests[*]}"
run_shown test "${CK[@]}"
timed "test.sh" "$t"
check "test.sh: exit status 0 (was $RC)" [ "$RC" = 0 ]
check "test.sh: all tests passed" output_has test '^== all tests passed$'
check "test.sh: quiet ($(wc -l <"$LOG_DIR/test.log") lines, no TAP assertion lines)" \
    output_lacks test '^(not )?ok [0-9]'
check "test.sh: no 'could not change directory'" output_lacks test 'could not change directory'
check_state "after test.sh"

t=$SECONDS
say "3b. bash scripts/test.sh --verbose t/001_contention.pl (output in the log only)"
in_checkout "bash scripts/test.sh --verbose t/001_contention.pl"
RC=0
STEP_LOG=$LOG_DIR/test-verbose.log step "${CK[@]}" || RC=$?
check "test.sh --verbose: exit status 0 (was $RC)" [ "$RC" = 0 ]
grep -c '^ok [0-9]' "$LOG_DIR/test-verbose.log" | sed 's/^/   assertion lines: /'
check "test.sh --verbose: prints the assertions" output_has test-verbose '^ok [0-9]+ - '
check_state "after test.sh --verbose"
timed "test.sh --verbose" "$t"

# --- 4. the README's Installing section, word for word ---------------------

t=$SECONDS
say "4. the README's Installing section"
# blocks in order: fresh-check/install-N.sh or .sql
awk -v dir="$ROOT/fresh-check" '
    /^## / { inside = ($0 == "## Installing") }
    !inside { next }
    /^```/ && !inblk { inblk = 1; n++; kind = substr($0, 4); f = sprintf("%s/install-%d.%s", dir, n, kind == "" ? "txt" : kind); printf "" > f; next }
    /^```/ && inblk { inblk = 0; close(f); next }
    inblk { print > f }
' "$src/README.md"
blocks=$(cd "$ROOT/fresh-check" && ls install-* 2>/dev/null | sort -t- -k2 -n)
check "the Installing section has sh blocks" [ -n "$(echo "$blocks" | grep '\.sh$')" ]
prev=
last=
RC=0
for b in $blocks ""; do
    if [ -n "$prev" ]; then
        input=/dev/null
        case $b in *.sql) input=/fresh-check/$b ;; esac
        echo "---- README block ${prev#install-} (input: $input)"
        sed 's/^/   | /' "$ROOT/fresh-check/$prev"
        [ "$input" = /dev/null ] || sed 's/^/   < /' "$ROOT$input"
        in_checkout "bash -ex /fresh-check/$prev <$input"
        run_shown "readme-${prev%.sh}" "${CK[@]}"
        check "README block ${prev#install-}: exit status 0 (was $RC)" [ "$RC" = 0 ]
        [ "$RC" = 0 ] || break
        last=readme-${prev%.sh}
        prev=
    fi
    case $b in *.sh) prev=$b ;; esac
done
if [ "$RC" = 0 ]; then
    check "README: psql printed no ERROR" output_lacks "$last" 'ERROR'
    check "README: the first lock is in Debian's etcd (etcdctl lists etcd_lock/my-first-lock/...)" \
        output_has "$last" '^etcd_lock/my-first-lock/[0-9a-f]+$'
    check "README: etcd_lock is loaded in \"15 main\"" preloaded_in_main
fi
timed "Installing section" "$t"

say "times: ${times[*]/%/,} total $((SECONDS - started)) s"
if [ "$failed" != 0 ]; then
    say "failed checks:"
    printf '   %s\n' "${failures[@]}"
fi
echo "fresh-debian12: $passed passed, $failed failed"
[ "$failed" = 0 ]
