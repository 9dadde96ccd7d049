#!/usr/bin/env bash
# Memory after the 250, ringrelay beside Postfix under the same load in the same run
# (issue 16 §4):
#   tarpit: 60 messages of 4 MiB over 4 sessions, for a next hop that accepts TCP and never
#           speaks (the relay holds every message: queued, or in a delivery that waits);
#   large:  8 messages of 30 MiB at once (8 sessions), delivered to smtp-sink.
# For each relay and load: the PSS of the relay (its cgroup: every Postfix process) idle
# after start, and its peak (samples every 0.5 s) from the start of the load until 3 s
# after the last message was accepted (tarpit) or delivered (large). Growth = peak - idle.
#
# Postfix: ../shared/bench/postfix_relay.sh's private instance (its write_config, read
# through shared_fn, not copied) with message_size_limit = 0, because its 10 MB default
# refuses the 30 MiB messages. ringrelay: serve --smarthost, defaults.
#
# usage: benches/memory_compare.sh [REPS]      (root; loopback only; stops what it starts)
#   env RINGRELAY (binary; default target/release/ringrelay, built unless SKIP_BUILD=1),
#   QBASE (/var/tmp: queues on the real disk), LOADS ("tarpit large"), RELAYS ("ringrelay postfix")
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
. "$SHARED/lib.sh"
. "$ROOT/benches/lib.sh"
need postfix postconf smtp-source smtp-sink python3
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

REPS=${1:-1}
LOADS=${LOADS:-tarpit large}
RELAYS=${RELAYS:-ringrelay postfix}
QBASE=${QBASE:-/var/tmp}
RR_PORT=${RR_PORT:-2660}
PF_PORT=${PF_PORT:-2661}
SINK_PORT=${SINK_PORT:-2662}
cd "$ROOT"
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p ringrelay
RR=${RINGRELAY:-$ROOT/target/release/ringrelay}

# The shared harness's cgroup CPU/memory helpers and PSS sampler (over relay_pids).
. "$SHARED/lib_relay.sh"
rmdir "$WORK"
relay_pids() { cg_pids; }
WORK=$(mktemp -d "$QBASE/memcmp.XXXXXX")
chmod 755 "$WORK"   # Postfix's processes (user postfix) reach their queue through it
BASE="$WORK/pf"
CONF="$BASE/etc"
CONC=50
shared_fn "$SHARED/postfix_relay.sh" write_config pf_write_config
PEER_PID=""
RELAY=""
SAMPLER_PID=""

relay_down() {
    if [ -n "$SAMPLER_PID" ]; then stop_pid "$SAMPLER_PID"; SAMPLER_PID=""; fi
    case "$RELAY" in
        postfix) postfix -c "$CONF" stop >/dev/null 2>&1 || true ;;
        "") ;;
        *) stop_pid "$RELAY" ;;
    esac
    RELAY=""
    if [ -n "$CG" ]; then
        for p in $(cg_pids); do kill -9 "$p" 2>/dev/null || true; done
        cg_remove || true
    fi
}
cleanup() {
    relay_down
    stop_pid "$PEER_PID"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

peer_up() { # tarpit|large: what listens on SINK_PORT
    if [ "$1" = tarpit ]; then
        python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(512); held = []
while True:
    c, _ = s.accept(); held.append(c)   # never a byte back
' "$SINK_PORT" &
    else
        smtp-sink -c -u nobody "127.0.0.1:$SINK_PORT" 64 >"$WORK/sink.out" 2>&1 &
    fi
    PEER_PID=$!
    wait_port 127.0.0.1 "$SINK_PORT" || { echo "next hop did not start" >&2; exit 1; }
}

relay_up() { # ringrelay|postfix; sets PORT
    cg_new
    if [ "$1" = postfix ]; then
        PORT=$PF_PORT
        pf_write_config >/dev/null
        echo "message_size_limit = 0" >>"$CONF/main.cf"
        RELAY=postfix
        (cg_join; exec postfix -c "$CONF" start) >/dev/null 2>&1 ||
            { echo "postfix start failed" >&2; tail "$BASE/maillog" >&2; exit 1; }
    else
        PORT=$RR_PORT
        local q
        q=$(mktemp -d "$WORK/rr.q.XXXXXX")
        (cg_join; exec "$RR" serve --listen "127.0.0.1:$RR_PORT" \
            --smarthost "127.0.0.1:$SINK_PORT" --spool "$q") >"$WORK/rr.log" 2>&1 &
        RELAY=$!
    fi
    wait_port 127.0.0.1 "$PORT" 200 || { echo "$1 did not listen" >&2; exit 1; }
    sleep 2
}

pss_now_kb() { # the relay's summed PSS now
    local -a files=()
    local p
    for p in $(cg_pids); do files+=("/proc/$p/smaps_rollup"); done
    [ ${#files[@]} -gt 0 ] || { echo 0; return; }
    cat "${files[@]}" 2>/dev/null | awk '/^Pss:/ {s += $2} END {print s + 0}'
}

delivered() { # messages smtp-sink has counted
    tail -c 300 "$WORK/sink.out" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2
}

one() { # RELAY LOAD REP -> a result line
    local relay=$1 load=$2 rep=$3 idle peak msgs sessions size t0 ok took
    peer_up "$load"
    relay_up "$relay"
    idle=$(pss_now_kb)
    relay_sampler >"$WORK/mem" &
    SAMPLER_PID=$!
    if [ "$load" = tarpit ]; then msgs=60 sessions=4 size=4194304; else msgs=8 sessions=8 size=31457280; fi
    t0=$(now)
    smtp-source -d -s "$sessions" -m "$msgs" -l "$size" -f sender@example.com \
        -t rcpt@example.net "127.0.0.1:$PORT" >"$WORK/src.out" 2>&1 ||
        { echo "smtp-source failed ($relay, $load):" >&2; cat "$WORK/src.out" >&2; exit 1; }
    ok=accepted
    if [ "$load" = large ]; then
        for _ in $(seq 1200); do [ "$(delivered)" = "$msgs" ] && break; sleep 0.1; done
        [ "$(delivered)" = "$msgs" ] && ok=delivered || ok="delivered $(delivered)"
    fi
    took=$(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}')
    sleep 3
    stop_pid "$SAMPLER_PID"; SAMPLER_PID=""
    peak=$(awk '$2 > s {s = $2} END {print s + 0}' "$WORK/mem")
    relay_down
    stop_pid "$PEER_PID"; PEER_PID=""
    printf "%-10s %-7s %3s %12s %12s %12s  %s in %s s\n" "$relay" "$load" "$rep" \
        "$((idle / 1024))M" "$((peak / 1024))M" "$(((peak - idle) / 1024))M" "$msgs $ok" "$took"
}

echo "# benches/memory_compare.sh $REPS — $(date -u +%FT%TZ), commit $(git -C "$ROOT" rev-parse --short HEAD), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# ringrelay $RR; postfix $(postconf -d -h mail_version) (message_size_limit = 0); queues under $QBASE"
echo "# tarpit: smtp-source -s 4 -m 60 -l 4194304 -> relay -> a next hop that never speaks"
echo "# large:  smtp-source -s 8 -m 8 -l 31457280  -> relay -> smtp-sink"
printf "%-10s %-7s %3s %12s %12s %12s  %s\n" relay load rep "idle PSS" "peak PSS" growth outcome
for rep in $(seq 1 "$REPS"); do
    for load in $LOADS; do
        for relay in $RELAYS; do
            one "$relay" "$load" "$rep"
        done
    done
done
echo "# load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
