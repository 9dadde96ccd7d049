#!/usr/bin/env bash
# The latency target of the performance issue: time from the end of DATA to the 250, p99,
# at half the maximum rate. loadgen send --rate R (open loop, 50 connections, pipelining,
# 1 KiB) into `ringrelay serve` (durable spool on the real disk) relaying to Postfix's
# smtp-sink. Each rep gets a fresh relay and spool. loadgen reports two latencies:
# `transaction` (intended start -> 250, coordinated omission counted) and `end of data`
# (content's terminator written -> 250: the group commit's fdatasync and the reply).
# Prints one line per run on stderr and the medians on stdout.
#
# usage: benches/latency.sh [REPS] [RATE] [SECONDS]     (default 3 5500 10)
#   env SHARDS (default 0 = one per core), PIN_RELAY / PIN_LOAD (taskset CPU lists),
#       QBASE (spool parent, default /var/tmp: the real disk)
# Needs: root, postfix (smtp-sink), cargo build --release -p ringrelay -p loadgen.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
. "$SHARED/lib.sh"
need smtp-sink
REPS=${1:-3}
RATE=${2:-5500}
SECS=${3:-10}
SHARDS=${SHARDS:-0}
QBASE=${QBASE:-/var/tmp}
BIN=$ROOT/target/release
SINK_PORT=2760
RELAY_PORT=2761
WORK=$(mktemp -d /tmp/latency.XXXXXX)
SINK=""
RELAY=""
cleanup() {
    [ -n "$RELAY" ] && kill "$RELAY" 2>/dev/null
    [ -n "$SINK" ] && kill "$SINK" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
RELAY_PREFIX=(env); [ -n "${PIN_RELAY:-}" ] && RELAY_PREFIX=(taskset -c "$PIN_RELAY")
LOAD_PREFIX=(env); [ -n "${PIN_LOAD:-}" ] && LOAD_PREFIX=(taskset -c "$PIN_LOAD")

"${LOAD_PREFIX[@]}" smtp-sink -c -u postfix "127.0.0.1:$SINK_PORT" 1024 >/dev/null 2>&1 &
SINK=$!
wait_port 127.0.0.1 "$SINK_PORT"
printf "# latency on %s (%s cores), %s, %s reps x %s s at %s msgs/s, shards=%s pin_relay=%s pin_load=%s\n" \
    "$(hostname)" "$(nproc)" "$(date -u +%Y-%m-%dT%H:%MZ)" "$REPS" "$SECS" "$RATE" "$SHARDS" "${PIN_RELAY:--}" "${PIN_LOAD:--}"
for r in $(seq 1 "$REPS"); do
    q=$(mktemp -d "$QBASE/rr-lat.XXXXXX")
    "${RELAY_PREFIX[@]}" "$BIN/ringrelay" serve --shards "$SHARDS" --listen "127.0.0.1:$RELAY_PORT" \
        --smarthost "127.0.0.1:$SINK_PORT" --spool "$q" 2>"$WORK/relay.log" &
    RELAY=$!
    wait_port 127.0.0.1 "$RELAY_PORT" 100 || { echo "relay did not start" >&2; cat "$WORK/relay.log" >&2; exit 1; }
    "${LOAD_PREFIX[@]}" "$BIN/loadgen" send --no-progress --target "127.0.0.1:$RELAY_PORT" --connections 50 \
        --pipelining --size 1024 --rate "$RATE" --duration "$SECS" --json "$WORK/send.json" >/dev/null 2>&1 || true
    kill -TERM "$RELAY"; wait "$RELAY" 2>/dev/null || true; RELAY=""
    rm -rf "$q"
    python3 - "$WORK/send.json" <<'PY' | tee -a "$WORK/runs" >&2
import json, sys
d = json.load(open(sys.argv[1]))
t, e = d["latency_us"]["transaction"], d["latency_us"]["end_of_data"]
ms = lambda us: us / 1000
print(f'{d["throughput"]["accepted_per_s"]:.0f} {ms(t["p50"]):.2f} {ms(t["p99"]):.2f} '
      f'{ms(e["p50"]):.2f} {ms(e["p99"]):.2f} {ms(e["p999"]):.2f} {ms(e["max"]):.2f}')
PY
done
col() { awk -v c="$1" '{print $c}' "$WORK/runs" | median; }
printf "%10s %10s %10s %10s %10s %12s %10s\n" "accepted/s" "txn_p50" "txn_p99" "eod_p50" "eod_p99" "eod_p99.9" "eod_max"
printf "%10s %10s %10s %10s %10s %12s %10s   (ms, medians of %s)\n" "$(col 1)" "$(col 2)" "$(col 3)" "$(col 4)" "$(col 5)" "$(col 6)" "$(col 7)" "$REPS"
