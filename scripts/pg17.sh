#!/usr/bin/env bash
# The suite on PostgreSQL 17, in a throwaway Debian 13 (trixie) root, as root:
#   bash scripts/pg17.sh [--etcd 3.4|3.5|both] [TAP_FILE...]
# Makes the root with debootstrap in a fresh temporary directory, installs
# PostgreSQL 17 and the build and test packages in it, builds etcd_lock there
# as the root's postgres user and installs it, then runs one leg per etcd
# version: pg_regress against its own etcd, and the TAP files (all of t/*.pl
# but t/008_jdbc.pl, which needs a JDK this root does not get; or the given
# ones, as t/NNN_name.pl or NNN_name.pl).
#   etcd 3.5: Debian 13's etcd-server/etcd-client (3.5.16), in /usr/bin.
#   etcd 3.4: this Debian 12 host's etcd and etcdctl (3.4.23, Go binaries that
#             need only libc), copied to ROOT/opt/etcd34/bin, first on PATH.
# Prints "== PostgreSQL 17, etcd V: passed" or "...: FAILED" per leg and exits
# non-zero if a leg failed.  On any exit, also on SIGINT/SIGTERM, it kills
# what runs in the root, unmounts what is mounted under it and removes it.
# Environment: PROVE_FLAGS, for prove (-v when unset; set it empty for one
# line per TAP file).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
self="$src/scripts/pg17.sh"
MIRROR=http://deb.debian.org/debian
SUITE=trixie
PG_MAJOR=17
ROOT_PACKAGES=(
    postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR
    libcurl4-openssl-dev libcjson-dev make gcc libc6-dev
    libipc-run-perl perl curl openssl ca-certificates
    etcd-server etcd-client
)

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$self" >&2
    exit "${1:-2}"
}

etcd_arg=both
tests=()
while [ $# -gt 0 ]; do
    case $1 in
        --etcd) [ $# -ge 2 ] || usage; etcd_arg=$2; shift 2 ;;
        --etcd=*) etcd_arg=${1#--etcd=}; shift ;;
        -h|--help) usage 0 ;;
        --) shift; tests+=("$@"); break ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) tests+=("$1"); shift ;;
    esac
done
case $etcd_arg in
    3.4|3.5) legs=("$etcd_arg") ;;
    both) legs=(3.5 3.4) ;;
    *) echo "--etcd takes 3.4, 3.5 or both, not '$etcd_arg'" >&2; exit 2 ;;
esac

# The TAP files to run, relative to the source directory.  t/008_jdbc.pl
# compiles a Java client against the PostgreSQL JDBC driver; this root gets no
# JDK, so it is left out here (scripts/test.sh runs it on PostgreSQL 15).
prove_tests=()
if [ ${#tests[@]} = 0 ]; then
    for f in "$src"/t/[0-9]*.pl; do
        f=t/${f##*/}
        [ "$f" = t/008_jdbc.pl ] || prove_tests+=("$f")
    done
else
    for f in "${tests[@]}"; do
        f=t/${f#t/}
        case $f in *.pl) ;; *) f=$f.pl ;; esac
        if [ ! -f "$src/$f" ]; then
            echo "no TAP file $src/$f" >&2
            exit 2
        fi
        if [ "$f" = t/008_jdbc.pl ]; then
            echo "== leaving out t/008_jdbc.pl: the PostgreSQL 17 root has no JDK" >&2
            continue
        fi
        prove_tests+=("$f")
    done
    if [ ${#prove_tests[@]} = 0 ]; then
        echo "no TAP file left to run" >&2
        exit 2
    fi
fi

if [ "$(id -u)" != 0 ]; then
    echo "run this as root: it makes a chroot and mounts into it" >&2
    exit 1
fi

# Work in a private mount namespace when the kernel lets us: whatever is
# mounted under the root then vanishes with this script even if it is killed
# with SIGKILL, and nothing can propagate to the host's /dev.  The cleanup
# below unmounts everything explicitly all the same.  PG17_NO_UNSHARE=1 skips
# this (to check the explicit cleanup against the host's findmnt).
if [ -z "${PG17_IN_NAMESPACE:-}" ] && [ -z "${PG17_NO_UNSHARE:-}" ] &&
    unshare --mount --propagation private true 2>/dev/null; then
    export PG17_IN_NAMESPACE=1
    exec unshare --mount --propagation private bash "$self" --etcd "$etcd_arg" "${prove_tests[@]}"
fi

started=$SECONDS
ROOT=
BG_PID=
CLEANED=
LOG_DIR=
CHROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "== $*"; }

# --- cleanup ---------------------------------------------------------------

# PIDs of the processes whose root directory is the chroot or inside it.
root_pids() {
    local p r
    for p in /proc/[0-9]*; do
        r=$(readlink "$p/root" 2>/dev/null) || continue
        case $r in
            "$ROOT"|"$ROOT"/*) echo "${p#/proc/}" ;;
        esac
    done
}

# Mount points at or under the root, innermost (latest) first.
root_mounts() {
    awk -v r="$ROOT" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo | tac
}

kill_root_processes() {
    local sig pids i
    for sig in TERM KILL; do
        pids=$(root_pids)
        [ -n "$pids" ] || return 0
        say "stopping $(echo $pids | wc -w) process(es) left in the root (SIG$sig)"
        kill -s "$sig" $pids 2>/dev/null || true
        for i in $(seq 1 50); do
            [ -n "$(root_pids)" ] || return 0
            sleep 0.1
        done
    done
    pids=$(root_pids)
    if [ -n "$pids" ]; then
        echo "processes still in the root after SIGKILL:" >&2
        ps -o pid,stat,args -p "$(echo $pids | tr ' ' ,)" >&2 || true
    fi
}

unmount_root() {
    local m try
    for try in 1 2 3; do
        for m in $(root_mounts); do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        done
        [ -n "$(root_mounts)" ] || return 0
        sleep 0.5
    done
    echo "still mounted under $ROOT:" >&2
    root_mounts >&2
    return 1
}

cleanup() {
    local status=$?
    set +e
    trap '' INT TERM
    [ -n "$CLEANED" ] && return
    CLEANED=1
    exec 1>&7 2>&8  # the script's own output, wherever the signal came
    if [ -n "$BG_PID" ]; then
        # our current step (debootstrap, apt-get, make, prove) and its children
        kill -s TERM -- "-$BG_PID" 2>/dev/null
        sleep 0.5
        kill -s KILL -- "-$BG_PID" 2>/dev/null
    fi
    [ -n "$LOG_DIR" ] && rm -rf "$LOG_DIR"
    if [ -n "$ROOT" ] && [ -d "$ROOT" ]; then
        kill_root_processes
        if unmount_root; then
            rm -rf --one-file-system "$ROOT"
            say "cleaned up: nothing left in the root, nothing mounted under it, root removed"
        else
            echo "== NOT removing $ROOT: something is still mounted under it" >&2
            [ "$status" != 0 ] || status=1
        fi
    fi
    exit "$status"
}
exec 7>&1 8>&2
trap cleanup EXIT
trap 'echo "== interrupted (SIGINT)" >&8; exit 130' INT
trap 'echo "== terminated (SIGTERM)" >&8; exit 143' TERM

# Run a step in the background, in its own process group, and wait for it:
# a trapped signal interrupts `wait` at once (not after the step), and the
# cleanup can stop the whole step by its process group.
# With STEP_LOG set, the step's output goes to that file.
step() {
    local rc=0
    if [ -n "${STEP_LOG:-}" ]; then
        setsid "$@" </dev/null >"$STEP_LOG" 2>&1 7>&- 8>&- &
    else
        setsid "$@" </dev/null 7>&- 8>&- &
    fi
    BG_PID=$!
    wait "$BG_PID" || rc=$?
    BG_PID=
    return "$rc"
}

# in_root [PATH]: sets IN_ROOT to the command prefix that runs something as
# root inside the root, with a clean environment (and PATH, if given).
in_root() {
    IN_ROOT=(chroot "$ROOT" /usr/bin/env -i PATH="${1:-$CHROOT_PATH}" LANG=C.UTF-8
             HOME=/root DEBIAN_FRONTEND=noninteractive CI="${CI:-true}")
    [ -n "${PROVE_FLAGS+x}" ] && IN_ROOT+=(PROVE_FLAGS="$PROVE_FLAGS")
    [ -n "${PG_TEST_TIMEOUT_DEFAULT:-}" ] && IN_ROOT+=(PG_TEST_TIMEOUT_DEFAULT="$PG_TEST_TIMEOUT_DEFAULT")
    return 0
}

# run_logged NAME CMD...: a step whose output goes to LOG_DIR/NAME.log,
# printed (its end) if it fails.
run_logged() {
    local name=$1 log
    shift
    log=$LOG_DIR/$name.log
    if ! STEP_LOG=$log step "$@"; then
        echo "---- $name failed; the end of its output:" >&2
        tail -n 60 "$log" >&2
        return 1
    fi
}

# --- the host's part -------------------------------------------------------

say "PostgreSQL $PG_MAJOR in a Debian 13 root; etcd: ${legs[*]}; TAP: ${prove_tests[*]} (never t/008_jdbc.pl: no JDK in the root)"
t=$SECONDS
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -r /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if [[ " ${legs[*]} " == *" 3.4 "* ]]; then
    [ -x /usr/bin/etcd ] || need+=(etcd-server)
    [ -x /usr/bin/etcdctl ] || need+=(etcd-client)
fi
if [ ${#need[@]} -gt 0 ]; then
    say "installing on the host: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # a systemd machine would start the packaged etcd on port 2379
    if [[ " ${need[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null &&
        [ -d /run/systemd/system ]; then
        systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
fi
if [[ " ${legs[*]} " == *" 3.4 "* ]]; then
    v=$(/usr/bin/etcd --version 2>/dev/null | sed -n 's/^etcd Version: //p')
    case $v in
        3.4.*) ;;
        *) echo "the host's /usr/bin/etcd is '$v', not 3.4 (this needs a Debian 12 host for the 3.4 leg)" >&2
           exit 1 ;;
    esac
fi

t_host=$((SECONDS - t))

t=$SECONDS
ROOT=$(mktemp -d /tmp/etcd_lock_pg17.XXXXXX)
chmod 755 "$ROOT"   # it is / for the postgres user in there
LOG_DIR=$ROOT.logs  # beside the root, so debootstrap gets an empty directory
mkdir -p "$LOG_DIR"
in_root

say "debootstrap --variant=minbase $SUITE $ROOT $MIRROR"
run_logged debootstrap debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR"
t_debootstrap=$((SECONDS - t))

t=$SECONDS
for m in /proc /sys /dev /dev/pts /dev/shm; do
    mkdir -p "$ROOT$m"
    mount --bind "$m" "$ROOT$m"
    # keep later mounts under it (e.g. ROOT/dev/pts) from reaching the host
    mount --make-private "$ROOT$m"
done
rm -f "$ROOT/etc/resolv.conf"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
[ -s "$ROOT/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
# no service starts in the root, and postgresql-17 creates no main cluster
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
mkdir -p "$ROOT/etc/postgresql-common/createcluster.d"
echo 'create_main_cluster = false' > "$ROOT/etc/postgresql-common/createcluster.d/etcd_lock.conf"
# a throwaway root: no fsync per package, no documentation, no translations
cat > "$ROOT/etc/dpkg/dpkg.cfg.d/etcd_lock" <<'CONF'
force-unsafe-io
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
CONF
cat > "$ROOT/etc/apt/apt.conf.d/99etcd_lock" <<'CONF'
Acquire::Languages "none";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dpkg::Use-Pty "false";
CONF

say "installing in the root: ${ROOT_PACKAGES[*]}"
run_logged apt-update "${IN_ROOT[@]}" apt-get -q update
run_logged apt-install "${IN_ROOT[@]}" apt-get -y -q install "${ROOT_PACKAGES[@]}"
t_install=$((SECONDS - t))
pg_version=$("${IN_ROOT[@]}" /usr/lib/postgresql/$PG_MAJOR/bin/pg_config --version)
etcd35_version=$("${IN_ROOT[@]}" etcd --version | sed -n 's/^etcd Version: //p')
say "in the root: $pg_version, etcd $etcd35_version in /usr/bin"
if [[ " ${legs[*]} " == *" 3.4 "* ]]; then
    mkdir -p "$ROOT/opt/etcd34/bin"
    cp /usr/bin/etcd /usr/bin/etcdctl "$ROOT/opt/etcd34/bin/"
    say "in the root: etcd $("${IN_ROOT[@]}" /opt/etcd34/bin/etcd --version | sed -n 's/^etcd Version: //p') in /opt/etcd34/bin (the host's)"
fi

# --- build -----------------------------------------------------------------

t=$SECONDS
rev=$(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo '?')
[ -n "$(git -C "$src" status --porcelain --untracked-files=no 2>/dev/null)" ] && rev="$rev plus uncommitted changes"
say "building $src ($rev) in the root"
mkdir -p "$ROOT/build/etcd_lock"
tar -C "$src" -cf - \
    --exclude=./.git --exclude=./tmp_check --exclude=./tmp_regress \
    --exclude=./results --exclude=./log --exclude=./regression.diffs \
    --exclude=./regression.out --exclude=./regress.conf \
    --exclude=./bench/node_modules --exclude=./bench/results \
    --exclude='*.o' --exclude='*.so' --exclude='*.bc' . |
    tar -C "$ROOT/build/etcd_lock" -xf -
"${IN_ROOT[@]}" chown -R postgres: /build
pgc=PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
if ! step "${IN_ROOT[@]}" runuser -u postgres -- make -C /build/etcd_lock -s -j2 "$pgc"; then
    say "PostgreSQL $PG_MAJOR: build FAILED"
    for leg in "${legs[@]}"; do
        say "PostgreSQL $PG_MAJOR, etcd $leg: FAILED (build)"
    done
    exit 1
fi
step "${IN_ROOT[@]}" make -C /build/etcd_lock -s install "$pgc"
t_build=$((SECONDS - t))

# --- the legs --------------------------------------------------------------

failed=0
summary=()
for leg in "${legs[@]}"; do
    t=$SECONDS
    if [ "$leg" = 3.4 ]; then in_root "/opt/etcd34/bin:$CHROOT_PATH"; else in_root; fi
    say "PostgreSQL $PG_MAJOR, etcd $leg"
    rc=0
    step "${IN_ROOT[@]}" bash /build/etcd_lock/scripts/pg17-root.sh \
        "$leg" "${prove_tests[@]}" || rc=$?
    what=$(cat "$ROOT/build/leg-$leg.failed" 2>/dev/null || true)
    if [ "$rc" = 0 ]; then
        line="PostgreSQL $PG_MAJOR, etcd $leg: passed ($((SECONDS - t)) s)"
    else
        failed=1
        line="PostgreSQL $PG_MAJOR, etcd $leg: FAILED${what:+ ($what)} ($((SECONDS - t)) s)"
    fi
    say "$line"
    summary+=("$line")
done

say "times: host packages ${t_host} s, debootstrap ${t_debootstrap} s, packages ${t_install} s, build ${t_build} s, total $((SECONDS - started)) s"
for line in "${summary[@]}"; do
    say "$line"
done
exit "$failed"
