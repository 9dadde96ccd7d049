#!/usr/bin/env bash
# loadgen side by side with Postfix's tools, in one run, interleaved rep by rep:
#   senders:   smtp-source -d  vs  loadgen send (one command per round trip)  vs
#              loadgen send --pipelining, all into Postfix's smtp-sink;
#   receivers: smtp-source -d into smtp-sink  vs  into loadgen sink.
# Prints per-run lines on stderr and two tables of medians on stdout.
#
# usage: benches/loadgen_compare.sh [REPS] [MSGS] [SESSIONS] [SIZE]
#   env LOADGEN (default target/release/loadgen), PORT (default 2660),
#       PIN_LOAD / PIN_SERVER (taskset CPU lists for the load tool and the receiver).
# Needs: postfix (smtp-source, smtp-sink), root (smtp-sink drops to user postfix).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
. "$SHARED/lib.sh"
. "$ROOT/benches/lib.sh"
need smtp-source smtp-sink

REPS=${1:-3}
MSGS=${2:-50000}
SESS=${3:-50}
SIZE=${4:-1024}
PORT=${PORT:-2660}
LOADGEN=${LOADGEN:-$ROOT/target/release/loadgen}
[ -x "$LOADGEN" ] || { echo "build first: cargo build --release -p loadgen" >&2; exit 2; }
PIN_LOAD=${PIN_LOAD:-}
PIN_SERVER=${PIN_SERVER:-}
SRV_PREFIX=(env); [ -n "$PIN_SERVER" ] && SRV_PREFIX=(taskset -c "$PIN_SERVER")
LOAD_PREFIX=(env); [ -n "$PIN_LOAD" ] && LOAD_PREFIX=(taskset -c "$PIN_LOAD")
one_server_setup loadgen_compare
TARGET="127.0.0.1:$PORT"

start_receiver() {
    case "$1" in
    smtp-sink) "${SRV_PREFIX[@]}" smtp-sink -c -u postfix -m 1024 "$TARGET" 1024 >"$WORK/srv.out" 2>&1 & ;;
    loadgen-sink) "${SRV_PREFIX[@]}" "$LOADGEN" sink --listen "$TARGET" >"$WORK/srv.out" 2>&1 & ;;
    loadgen-sink-1t) "${SRV_PREFIX[@]}" "$LOADGEN" sink --threads 1 --listen "$TARGET" >"$WORK/srv.out" 2>&1 & ;;
    esac
    SRV=$!
    wait_port 127.0.0.1 "$PORT" || { echo "$1 did not start" >&2; cat "$WORK/srv.out" >&2; exit 1; }
}

sender_cmd() {
    case "$1" in
    smtp-source) echo smtp-source -d -s "$SESS" -m "$MSGS" -l "$SIZE" -f sender@example.com -t rcpt@example.com "$TARGET" ;;
    loadgen-send) echo "$LOADGEN" send --no-progress --target "$TARGET" --connections "$SESS" --size "$SIZE" --messages "$MSGS" ;;
    loadgen-send-pipelining) echo "$LOADGEN" send --no-progress --target "$TARGET" --connections "$SESS" --size "$SIZE" --messages "$MSGS" --pipelining ;;
    esac
}

# send_run SENDER -> "sender msgs/s sender_cpu_us/msg" (receiver: smtp-sink)
send_run() {
    local t0 t1
    start_receiver smtp-sink
    t0=$(now)
    # shellcheck disable=SC2046
    /usr/bin/time -f "%U %S" -o "$WORK/time" "${LOAD_PREFIX[@]}" $(sender_cmd "$1") >"$WORK/send.out" 2>&1 ||
        { echo "$1 failed:" >&2; cat "$WORK/send.out" >&2; exit 1; }
    t1=$(now)
    stop_server
    awk -v s="$1" -v m="$MSGS" -v t0="$t0" -v t1="$t1" -v c="$(tail -1 "$WORK/time")" \
        'BEGIN {split(c, a, " "); printf "send %s %.0f %.1f\n", s, m / (t1 - t0), 1e6 * (a[1] + a[2]) / m}' |
        tee -a "$WORK/results" >&2
}

# recv_run RECEIVER -> "receiver msgs/s receiver_cpu_us/msg" (sender: smtp-source -d)
recv_run() {
    local c0 c1 t0 t1
    start_receiver "$1"
    c0=$(cpu_ticks "$SRV")
    t0=$(now)
    # shellcheck disable=SC2046
    "${LOAD_PREFIX[@]}" $(sender_cmd smtp-source) >"$WORK/send.out" 2>&1 ||
        { echo "smtp-source failed:" >&2; cat "$WORK/send.out" >&2; exit 1; }
    t1=$(now)
    sleep 0.2
    c1=$(cpu_ticks "$SRV")
    stop_server
    awk -v s="$1" -v m="$MSGS" -v t0="$t0" -v t1="$t1" -v c="$((c1 - c0))" -v hz="$CLK_TCK" \
        'BEGIN {printf "recv %s %.0f %.1f\n", s, m / (t1 - t0), 1e6 * c / hz / m}' |
        tee -a "$WORK/results" >&2
}

printf "# loadgen_compare on %s (%s cores, kernel %s), %s, %s reps x %s msgs, %s sessions, %s bytes, pin_load=%s pin_server=%s\n" \
    "$(hostname)" "$(nproc)" "$(uname -r)" "$(date -u +%Y-%m-%dT%H:%MZ)" "$REPS" "$MSGS" "$SESS" "$SIZE" "${PIN_LOAD:--}" "${PIN_SERVER:--}"
SENDERS="smtp-source loadgen-send loadgen-send-pipelining"
RECEIVERS="smtp-sink loadgen-sink loadgen-sink-1t"
for r in $(seq 1 "$REPS"); do
    for s in $SENDERS; do send_run "$s"; done
    for v in $RECEIVERS; do recv_run "$v"; done
done

table() { # KIND BASE NAMES...
    local kind=$1 base=$2; shift 2
    local br bc
    br=$(awk -v k="$kind" -v n="$base" '$1 == k && $2 == n {print $3}' "$WORK/results" | median)
    bc=$(awk -v k="$kind" -v n="$base" '$1 == k && $2 == n {print $4}' "$WORK/results" | median)
    printf "%-26s %10s %12s %10s %10s\n" "$kind" "msgs/s" "cpu_us/msg" "rate_x" "cpu_x"
    for n in "$@"; do
        local r c
        r=$(awk -v k="$kind" -v n="$n" '$1 == k && $2 == n {print $3}' "$WORK/results" | median)
        c=$(awk -v k="$kind" -v n="$n" '$1 == k && $2 == n {print $4}' "$WORK/results" | median)
        awk -v n="$n" -v r="$r" -v c="$c" -v br="$br" -v bc="$bc" \
            'BEGIN {printf "%-26s %10.0f %12.1f %9.2fx %9.2fx\n", n, r, c, r / br, c / bc}'
    done
}
echo "## senders into smtp-sink (cpu = the sender's)"
# shellcheck disable=SC2086
table send smtp-source $SENDERS
echo "## receivers fed by smtp-source -d (cpu = the receiver's)"
# shellcheck disable=SC2086
table recv smtp-sink $RECEIVERS
