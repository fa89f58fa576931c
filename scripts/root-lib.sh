# Throwaway Debian roots for scripts/pg17.sh and scripts/fresh-debian12.sh.
# Sourced, by a script running as root on the host.  The script calls
#   enter_private_namespace "$self" ARGS...   (first: re-executes the script)
#   make_root SUITE                           (debootstrap, mounts; sets ROOT)
# and then runs things in the root with step / run_logged and "${IN_ROOT[@]}".
# On any exit, also on SIGINT and SIGTERM, it kills what runs in the root,
# unmounts what is mounted under it and removes it.

MIRROR=http://deb.debian.org/debian
CHROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ROOT=
BG_PID=
CLEANED=
LOG_DIR=

say() { echo "== $*"; }

# enter_private_namespace SCRIPT ARGS...: run SCRIPT again, with ARGS, in a
# private mount namespace when the kernel lets us: whatever is mounted under
# the root then vanishes with the script even if it is killed with SIGKILL,
# and nothing can propagate to the host's /dev.  The cleanup unmounts
# everything explicitly all the same.  ROOT_NO_UNSHARE=1 skips this (to check
# the explicit cleanup against the host's findmnt).  Returns only in the
# namespace (or without one).
enter_private_namespace() {
    local self=$1
    shift
    if [ -z "${ROOT_IN_NAMESPACE:-}" ] && [ -z "${ROOT_NO_UNSHARE:-}" ] &&
        unshare --mount --propagation private true 2>/dev/null; then
        export ROOT_IN_NAMESPACE=1
        exec unshare --mount --propagation private bash "$self" "$@"
    fi
}

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

root_cleanup() {
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
trap root_cleanup EXIT
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
             HOME=/root CI="${CI:-true}")
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

# make_root SUITE: debootstrap a minimal Debian SUITE in a new temporary
# directory ROOT, with the host's /proc, /sys, /dev and /dev/pts bound in, a
# /dev/shm of its own, the host's resolver, and dpkg set to skip fsync and
# documentation.  Sets ROOT, LOG_DIR and IN_ROOT.
make_root() {
    local suite=$1 m
    ROOT=$(mktemp -d "/tmp/etcd_lock_$suite.XXXXXX")
    chmod 755 "$ROOT"   # it is / for the postgres user in there
    LOG_DIR=$ROOT.logs  # beside the root, so debootstrap gets an empty directory
    mkdir -p "$LOG_DIR"
    in_root
    say "debootstrap --variant=minbase $suite $ROOT $MIRROR"
    run_logged debootstrap debootstrap --variant=minbase "$suite" "$ROOT" "$MIRROR"
    for m in /proc /sys /dev /dev/pts; do
        mkdir -p "$ROOT$m"
        mount --bind "$m" "$ROOT$m"
        # keep later mounts under it (e.g. ROOT/dev/pts) from reaching the host
        mount --make-private "$ROOT$m"
    done
    # PostgreSQL keeps shared memory segments in /dev/shm: not the host's
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$ROOT/dev/shm"
    rm -f "$ROOT/etc/resolv.conf"
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    [ -s "$ROOT/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
    # a throwaway root: no fsync per package, no documentation
    cat > "$ROOT/etc/dpkg/dpkg.cfg.d/etcd_lock" <<'CONF'
force-unsafe-io
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
CONF
}
