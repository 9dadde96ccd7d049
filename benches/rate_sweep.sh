#!/usr/bin/env bash
# Offered load against delivered throughput and p99 latency, for ringrelay and Postfix:
# loadgen send --rate R (open loop, latency from each message's intended start) into the
# relay, which relays to Postfix's smtp-sink. Each rate gets a fresh relay with an empty
# queue on the real disk. Each point is the median of REPS runs (default 3), the reps of a
# rate run back to back. Writes benches/results/rate_sweep.csv (medians; every run in
# rate_sweep_runs.csv) and, when gnuplot is installed, benches/results/rate_sweep.svg.
#
# usage: benches/rate_sweep.sh [SECONDS_PER_RATE] [RATES...]
#   default: 5 s at 250 500 1000 2000 4000 8000 12000 16000 msgs/s; env REPS (default 3)
# Needs: root, postfix (postfix, smtp-sink), cargo build --release -p ringrelay -p loadgen.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
. "$SHARED/lib.sh"
need postfix smtp-sink
[ "$(id -u)" = 0 ] || { echo "run as root (Postfix runs a private instance)" >&2; exit 1; }
SECS=${1:-5}
REPS=${REPS:-3}
shift 2>/dev/null || true
RATES=${*:-250 500 1000 2000 4000 8000 12000 16000}
BIN=$ROOT/target/release
OUT=$ROOT/benches/results
SINK_PORT=2750
RELAY_PORT=2751
PF=/var/tmp/ringrelay-sweep-postfix
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/rate_sweep.XXXXXX)
SINK=""
RELAY=""
cleanup() {
    [ -n "$RELAY" ] && kill "$RELAY" 2>/dev/null
    [ -d "$PF/etc" ] && postfix -c "$PF/etc" stop >/dev/null 2>&1
    [ -n "$SINK" ] && kill "$SINK" 2>/dev/null
    rm -rf "$WORK" "$PF"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A private Postfix: listens on 127.0.0.1:$RELAY_PORT, relays everything to the sink,
# queue on the real disk, nothing chrooted, no DNS, no TLS.
postfix_start() {
    rm -rf "$PF"
    mkdir -p "$PF/etc" "$PF/queue" "$PF/data"
    chown postfix "$PF/data"
    cat >"$PF/etc/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
maillog_file = $PF/maillog
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.sweep.invalid
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
relayhost = [127.0.0.1]:$SINK_PORT
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = none
default_process_limit = 200
smtp_destination_concurrency_limit = 50
default_destination_concurrency_limit = 50
notify_classes =
CF
    cat >"$PF/etc/master.cf" <<CF
127.0.0.1:$RELAY_PORT inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
CF
    postfix -c "$PF/etc" start >/dev/null 2>&1 || { echo "postfix start failed" >&2; tail "$PF/maillog" >&2; exit 1; }
}

start_relay() { # SYSTEM
    case "$1" in
    ringrelay)
        local q; q=$(mktemp -d /var/tmp/rr-sweep.XXXXXX)
        "$BIN/ringrelay" serve --listen "127.0.0.1:$RELAY_PORT" --smarthost "127.0.0.1:$SINK_PORT" \
            --spool "$q" 2>"$WORK/relay.log" &
        RELAY=$!
        echo "$q" >"$WORK/spool" ;;
    postfix) postfix_start ;;
    esac
    wait_port 127.0.0.1 "$RELAY_PORT" 100 || { echo "$1 did not start" >&2; exit 1; }
}
stop_relay() { # SYSTEM
    case "$1" in
    ringrelay) kill -TERM "$RELAY"; wait "$RELAY" 2>/dev/null || true; RELAY=""; rm -rf "$(cat "$WORK/spool")" ;;
    postfix) postfix -c "$PF/etc" stop >/dev/null 2>&1; rm -rf "$PF" ;;
    esac
}

smtp-sink -c -u postfix "127.0.0.1:$SINK_PORT" 1024 >/dev/null 2>&1 &
SINK=$!
wait_port 127.0.0.1 "$SINK_PORT"
HEADER="system,offered_per_s,accepted_per_s,p50_ms,p99_ms,end_of_data_p99_ms"
echo "$HEADER" >"$OUT/rate_sweep.csv"
echo "$HEADER" >"$OUT/rate_sweep_runs.csv"
printf "# rate_sweep on %s (%s cores), %s, %s s per rate, medians of %s\n" "$(hostname)" "$(nproc)" "$(date -u +%Y-%m-%dT%H:%MZ)" "$SECS" "$REPS"
for system in ringrelay postfix; do
    for rate in $RATES; do
        : >"$WORK/reps"
        for _ in $(seq 1 "$REPS"); do
            start_relay "$system"
            "$BIN/loadgen" send --no-progress --target "127.0.0.1:$RELAY_PORT" --connections 50 --pipelining \
                --size 1024 --rate "$rate" --duration "$SECS" --json "$WORK/send.json" >/dev/null 2>&1 || true
            stop_relay "$system"
            python3 - "$system" "$rate" "$WORK/send.json" <<'PY' | tee -a "$OUT/rate_sweep_runs.csv" >>"$WORK/reps"
import json, sys
system, rate, path = sys.argv[1], sys.argv[2], sys.argv[3]
d = json.load(open(path))
t, e = d["latency_us"]["transaction"], d["latency_us"]["end_of_data"]
print(f'{system},{rate},{d["throughput"]["accepted_per_s"]:.0f},{t["p50"] / 1000:.2f},{t["p99"] / 1000:.2f},{e["p99"] / 1000:.2f}')
PY
        done
        med() { cut -d, -f"$1" "$WORK/reps" | median; }
        echo "$system,$rate,$(med 3),$(med 4),$(med 5),$(med 6)" | tee -a "$OUT/rate_sweep.csv"
    done
done
if command -v gnuplot >/dev/null; then
    gnuplot <<GP
set terminal svg size 900,420 font "sans,11"
set output "$OUT/rate_sweep.svg"
set datafile separator ","
set multiplot layout 1,2 title "1 KiB messages, 50 connections, pipelining; relay -> smtp-sink; medians of $REPS; $(hostname), $(date -u +%Y-%m-%d)"
set logscale x; set logscale y; set grid
set xlabel "offered msgs/s"; set ylabel "accepted msgs/s"; set key top left
plot "< grep ^ringrelay $OUT/rate_sweep.csv" using 2:3 with linespoints title "ringrelay", \
     "< grep ^postfix $OUT/rate_sweep.csv" using 2:3 with linespoints title "Postfix 3.7"
set ylabel "p99 latency, ms (from intended start)"; set key top left
plot "< grep ^ringrelay $OUT/rate_sweep.csv" using 2:5 with linespoints title "ringrelay", \
     "< grep ^postfix $OUT/rate_sweep.csv" using 2:5 with linespoints title "Postfix 3.7"
unset multiplot
GP
    echo "plot: $OUT/rate_sweep.svg"
fi
