# Shared steps of scripts/test.sh, scripts/demo.sh and bench/run.sh.
# Everything here runs as root on Debian 12; PostgreSQL itself runs as the
# "postgres" user that the postgresql-15 package creates.

PG_BIN=/usr/lib/postgresql/15/bin
export PG_CONFIG=$PG_BIN/pg_config

# Install what building and testing need.  Safe to run again.
install_packages() {
    # keep the postgresql-15 package from creating and starting a "main"
    # cluster on port 5432
    mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/etcd_lock.conf
    export DEBIAN_FRONTEND=noninteractive
    local extra=()
    # the JDBC test compiles a small client; bring a JDK only where none is
    command -v javac >/dev/null || extra+=(default-jdk-headless)
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        make gcc libc6-dev postgresql-15 postgresql-server-dev-15 postgresql-client-15 \
        libcurl4-openssl-dev libcjson-dev etcd-server etcd-client \
        curl libipc-run-perl openssl ca-certificates rsync libpostgresql-jdbc-java \
        "${extra[@]}" "$@" >/dev/null
    # a systemd machine would start the packaged etcd on port 2379
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
}

# Copy the source to a directory the postgres user can write, build it there
# as postgres, and install it as root.  Prints the build directory.
build_and_install() {
    local src=$1 dir
    dir=$(mktemp -d /tmp/etcd_lock.XXXXXX)
    cp -a "$src"/. "$dir"/
    rm -rf "$dir/.git"
    chown -R postgres: "$dir"
    runuser -u postgres -- make -C "$dir" -s clean >/dev/null
    runuser -u postgres -- make -C "$dir" -s >&2
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
    runuser -u postgres -- etcd --name solo --data-dir "$dir/data" \
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
        sleep 0.1
    done
    echo "etcd did not start; its log:" >&2
    cat "$dir/etcd.log" >&2
    return 1
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
