#!/usr/bin/env bash
# The suite on PostgreSQL 17, in a throwaway Debian 13 (trixie) root, as root:
#   bash scripts/pg17.sh [--etcd 3.4|3.5|both] [--verbose] [TAP_FILE...]
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
# prove prints one line per TAP file; --verbose (or PROVE_FLAGS=-v) prints
# every assertion.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
self="$src/scripts/pg17.sh"
SUITE=trixie
PG_MAJOR=17
ROOT_PACKAGES=(
    postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR
    libcurl4-openssl-dev libcjson-dev make gcc libc6-dev
    libipc-run-perl perl curl openssl ca-certificates python3-h2
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
        -v|--verbose) export PROVE_FLAGS=-v; shift ;;
        -h|--help) usage 0 ;;
        --) shift; tests+=("$@"); break ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) tests+=("$1"); shift ;;
    esac
done
# legs: VERSION or VERSION:TRANSPORT (json by default), separated by commas
case $etcd_arg in
    both) legs=(3.5 3.4) ;;
    *) IFS=, read -r -a legs <<<"$etcd_arg" ;;
esac
for leg in "${legs[@]}"; do
    case $leg in
        3.4|3.5|3.4:json|3.4:grpc|3.5:json|3.5:grpc) ;;
        *) echo "--etcd takes 3.4, 3.5, both, or legs such as 3.5:grpc,3.4:json, not '$etcd_arg'" >&2
           exit 2 ;;
    esac
done
need34=0
for leg in "${legs[@]}"; do
    [ "${leg%%:*}" = 3.4 ] && need34=1
done

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

. "$src/scripts/root-lib.sh"
enter_private_namespace "$self" --etcd "$etcd_arg" "${prove_tests[@]}"

started=$SECONDS

# --- the host's part -------------------------------------------------------

say "PostgreSQL $PG_MAJOR in a Debian 13 root; etcd: ${legs[*]}; TAP: ${prove_tests[*]} (never t/008_jdbc.pl: no JDK in the root)"
t=$SECONDS
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -r /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if [ "$need34" = 1 ]; then
    [ -x /usr/bin/etcd ] || need+=(etcd-server)
    [ -x /usr/bin/etcdctl ] || need+=(etcd-client)
fi
if [ ${#need[@]} -gt 0 ]; then
    say "installing on the host: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$need34" = 1 ]; then
    v=$(/usr/bin/etcd --version 2>/dev/null | sed -n 's/^etcd Version: //p')
    case $v in
        3.4.*) ;;
        *) echo "the host's /usr/bin/etcd is '$v', not 3.4 (this needs a Debian 12 host for the 3.4 leg)" >&2
           exit 1 ;;
    esac
fi

t_host=$((SECONDS - t))

t=$SECONDS
make_root "$SUITE"
t_debootstrap=$((SECONDS - t))

t=$SECONDS
# no service starts in the root, and postgresql-17 creates no main cluster
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
mkdir -p "$ROOT/etc/postgresql-common/createcluster.d"
echo 'create_main_cluster = false' > "$ROOT/etc/postgresql-common/createcluster.d/etcd_lock.conf"
cat > "$ROOT/etc/apt/apt.conf.d/99etcd_lock" <<'CONF'
Acquire::Languages "none";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dpkg::Use-Pty "false";
CONF

say "installing in the root: ${ROOT_PACKAGES[*]}"
run_logged apt-update "${IN_ROOT[@]}" apt-get -q update
run_logged apt-install "${IN_ROOT[@]}" DEBIAN_FRONTEND=noninteractive apt-get -y -q install "${ROOT_PACKAGES[@]}"
t_install=$((SECONDS - t))
pg_version=$("${IN_ROOT[@]}" /usr/lib/postgresql/$PG_MAJOR/bin/pg_config --version)
etcd35_version=$("${IN_ROOT[@]}" etcd --version | sed -n 's/^etcd Version: //p')
say "in the root: $pg_version, etcd $etcd35_version in /usr/bin"
if [ "$need34" = 1 ]; then
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
    ver=${leg%%:*}
    transport=json
    [[ $leg == *:* ]] && transport=${leg#*:}
    if [ "$ver" = 3.4 ]; then in_root "/opt/etcd34/bin:$CHROOT_PATH"; else in_root; fi
    IN_ROOT+=(ETCD_LOCK_TRANSPORT="$transport")
    say "PostgreSQL $PG_MAJOR, etcd $ver, transport $transport"
    rc=0
    step "${IN_ROOT[@]}" bash /build/etcd_lock/scripts/pg17-root.sh \
        "$ver" "${prove_tests[@]}" || rc=$?
    what=$(cat "$ROOT/build/leg-$ver.failed" 2>/dev/null || true)
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
