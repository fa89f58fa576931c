#!/usr/bin/env bash
# Checks the layout of the C sources, with coreutils' tsort and grep:
#   1. the graph of which file includes which of our headers has no cycle
#      (a file and its header are one node: client.c and client.h are
#      "client"); tsort fails on a loop and names it;
#   2. every function a header exports is used by some other file.
# Prints the graph, lowest layer first.  Exits non-zero on a finding.
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
edges=$(
    for f in *.c *.h; do
        from=${f%.*}
        { grep -o '^#include "[a-z_]*\.h"' "$f" || true; } |
            sed 's/^#include "\(.*\)\.h"/\1/' |
            while read -r to; do
                # ours only: PostgreSQL's headers are not in this directory
                if [ -f "$to.h" ] && [ "$to" != "$from" ]; then
                    echo "$from $to"
                fi
            done
    done | sort -u
)
echo "includes (file -> headers it uses):"
echo "$edges" | awk '{a[$1] = a[$1] " " $2} END {for (k in a) print "  " k ":" a[k]}' | sort
if order=$(echo "$edges" | tsort 2>&1); then
    echo "no include cycle; from the top down: $(echo $order)"
else
    echo "include cycle:" >&2
    echo "$order" >&2
    status=1
fi

for h in *.h; do
    # PGDLLEXPORT: called by the postmaster, by name
    for fn in $(grep -v PGDLLEXPORT "$h" | grep -o '^extern [^(]*[ *]\([a-z_0-9]*\)(' | sed 's/.*[ *]\([a-z_0-9]*\)($/\1/'); do
        users=$(grep -lw "$fn" -- *.c | grep -v "^${h%.h}\.c$" || true)
        if [ -z "$users" ]; then
            echo "$h exports $fn, which no other file uses" >&2
            status=1
        fi
    done
done
[ "$status" = 0 ] && echo "every exported function is used outside its file"
exit "$status"
