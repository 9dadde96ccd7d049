#!/usr/bin/env bash
# MX routing against static routing, side by side in one run (interleaved rep by rep):
#   loadgen send -> ringrelay (spool on the real disk) -> loadgen sink, with the recipient
#   domain routed (a) by --route, (b) by MX through the DNS fixture (examples/dns_fixture),
#   cache warm after the first message; then (c) MX over 1,000 domains, reporting the DNS
#   queries per second the relay made.
# Prints per-run lines on stderr and a table of medians on stdout.
#
# usage: benches/mx_compare.sh [REPS] [MSGS] [CONNECTIONS]
#   env QBASE (spool parent; default /var/tmp, the real disk).
# Needs: cargo build --release -p ringrelay -p loadgen --example dns_fixture
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
. "$SHARED/lib.sh"
REPS=${1:-3}
MSGS=${2:-20000}
CONNS=${3:-50}
QBASE=${QBASE:-/var/tmp}
BIN=$ROOT/target/release
for b in "$BIN/ringrelay" "$BIN/loadgen" "$BIN/examples/dns_fixture"; do
    [ -x "$b" ] || { echo "build first: cargo build --release -p ringrelay -p loadgen --example dns_fixture" >&2; exit 2; }
done
SINK_PORT=2690
RELAY_PORT=2691
WORK=$(mktemp -d /tmp/mx_compare.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# The DNS fixture: d1.test .. d1000.test MX 10 mx.bench.test -> 127.0.0.1, TTL 300.
"$BIN/examples/dns_fixture" 1000 127.0.0.1 300 3600 >"$WORK/dns.out" &
PIDS+=($!)
for _ in $(seq 1 50); do grep -q "dns on" "$WORK/dns.out" 2>/dev/null && break; sleep 0.1; done
DNS=$(awk '/dns on/ {print $3}' "$WORK/dns.out")
[ -n "$DNS" ] || { echo "dns fixture did not start" >&2; exit 1; }

# one_run MODE(static|mx|mx1000) -> "mode accept/s e2e/s dns_queries"
one_run() {
    local mode=$1 q relay sink t0 t1 domains=() extra=()
    q=$(mktemp -d "$QBASE/rr-mx.XXXXXX")
    cat >"$WORK/relay.toml" <<TOML
[delivery]
smtp_port = $SINK_PORT
nameservers = ["$DNS"]
TOML
    case "$mode" in
    static) extra=(--route "d1.test=127.0.0.1:$SINK_PORT"); domains=(--domain d1.test) ;;
    mx) domains=(--domain d1.test) ;;
    mx1000) for i in $(seq 1 1000); do domains+=(--domain "d$i.test"); done ;;
    esac
    "$BIN/loadgen" sink --listen "127.0.0.1:$SINK_PORT" --expect "$MSGS" >"$WORK/sink.out" 2>&1 & sink=$!
    PIDS+=("$sink")
    "$BIN/ringrelay" serve --config "$WORK/relay.toml" --listen "127.0.0.1:$RELAY_PORT" --spool "$q" "${extra[@]}" \
        2>"$WORK/relay.log" & relay=$!
    PIDS+=("$relay")
    wait_port 127.0.0.1 "$SINK_PORT"; wait_port 127.0.0.1 "$RELAY_PORT"
    local q0 q1
    q0=$(dns_queries)
    t0=$(now)
    "$BIN/loadgen" send --no-progress --target "127.0.0.1:$RELAY_PORT" --messages "$MSGS" --connections "$CONNS" \
        --pipelining "${domains[@]}" >"$WORK/send.out" 2>&1
    t1=$(now)
    wait "$sink" 2>/dev/null || true
    local t2; t2=$(now)
    q1=$(dns_queries)
    kill -TERM "$relay"; wait "$relay" 2>/dev/null || true
    rm -rf "$q"
    awk -v mode="$mode" -v m="$MSGS" -v t0="$t0" -v t1="$t1" -v t2="$t2" -v q="$((q1 - q0))" \
        'BEGIN {printf "%s %.0f %.0f %d %.0f\n", mode, m / (t1 - t0), m / (t2 - t0), q, q / (t2 - t0)}' |
        tee -a "$WORK/results" >&2
}
# The fixture prints its running query total once a second; wait for a fresh line first.
dns_queries() {
    sleep 1.1
    awk '/^queries/ {n = $2} END {print n + 0}' "$WORK/dns.out"
}

printf "# mx_compare on %s (%s cores), %s, %s reps x %s msgs, %s connections, dns %s\n" \
    "$(hostname)" "$(nproc)" "$(date -u +%Y-%m-%dT%H:%MZ)" "$REPS" "$MSGS" "$CONNS" "$DNS"
for r in $(seq 1 "$REPS"); do one_run static; one_run mx; done
one_run mx1000
printf "%-8s %10s %10s %12s\n" route "accept/s" "e2e/s" "dns_queries"
for mode in static mx mx1000; do
    printf "%-8s %10.0f %10.0f %12.0f\n" "$mode" \
        "$(awk -v m="$mode" '$1 == m {print $2}' "$WORK/results" | median)" \
        "$(awk -v m="$mode" '$1 == m {print $3}' "$WORK/results" | median)" \
        "$(awk -v m="$mode" '$1 == m {print $4}' "$WORK/results" | median)"
done
echo "# mx1000: DNS queries per second over the run (e2e window):" \
    "$(awk '$1 == "mx1000" {print $5}' "$WORK/results" | median)"
