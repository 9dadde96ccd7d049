#!/usr/bin/env bash
# Group commit on and off: smtp-source -> ringrelay (spool on the real disk) -> smtp-sink,
# once with group commit (the default) and once with RINGRELAY_GROUP_COMMIT=off (one
# fdatasync per message), interleaved rep by rep. Reports accepted msgs/s, messages per
# fsync, the mean fsync time and the mean commit window per fsync, from the relay's own
# shutdown log line.
#
# usage: benches/group_commit.sh [REPS] [MSGS] [SESSIONS]
#   env RINGRELAY (default target/release/ringrelay), QBASE (default /var/tmp: real disk),
#   SWITCH (default RINGRELAY_GROUP_COMMIT): the variable set to "off" in the "off" runs;
#   SWITCH=RINGRELAY_COMMIT_WINDOW compares the adaptive commit window (off by default)
#   on and off: its "on" runs set it to "on".
# Needs: postfix (smtp-source, smtp-sink), root (smtp-sink drops to user postfix).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
. "$SHARED/lib.sh"
need smtp-source smtp-sink
REPS=${1:-3}
MSGS=${2:-20000}
SESS=${3:-50}
RINGRELAY=${RINGRELAY:-$ROOT/target/release/ringrelay}
QBASE=${QBASE:-/var/tmp}
SWITCH=${SWITCH:-RINGRELAY_GROUP_COMMIT}
SINK_PORT=2680
RELAY_PORT=2681
WORK=$(mktemp -d /tmp/group_commit.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

one_run() { # MODE(on|off)
    local q t0 t1 sink relay
    q=$(mktemp -d "$QBASE/rr-gc.XXXXXX")
    smtp-sink -c -u postfix "127.0.0.1:$SINK_PORT" 1024 >/dev/null 2>&1 & sink=$!
    PIDS=("$sink")
    wait_port 127.0.0.1 "$SINK_PORT"
    if [ "$1" = off ]; then export "$SWITCH=off"
    elif [ "$SWITCH" = RINGRELAY_COMMIT_WINDOW ]; then export "$SWITCH=on"
    else unset "$SWITCH"; fi
    "$RINGRELAY" serve --listen "127.0.0.1:$RELAY_PORT" --smarthost "127.0.0.1:$SINK_PORT" --spool "$q" 2>"$WORK/relay.log" & relay=$!
    PIDS+=("$relay")
    wait_port 127.0.0.1 "$RELAY_PORT"
    t0=$(now)
    smtp-source -d -s "$SESS" -m "$MSGS" -l 1024 -f a@example.com -t b@example.com "127.0.0.1:$RELAY_PORT" >/dev/null 2>&1
    t1=$(now)
    kill -TERM "$relay"; wait "$relay" 2>/dev/null || true
    kill "$sink"; wait "$sink" 2>/dev/null || true
    rm -rf "$q"
    awk -v mode="$1" -v m="$MSGS" -v t0="$t0" -v t1="$t1" '
        /made durable in/ { n = 0; for (i = 1; i <= NF; i++) { if ($i == "message(s)") msgs += $(i-1)
            if ($i == "sync(s)" && $(i-1) ~ /^[0-9]+$/) { n = $(i-1); syncs += n }
            if ($i == "each),") synced += n * $(i-2); if ($i == "window") waited += substr($(i+1), 2) } }
        END { printf "%s %.0f %.1f %.0f %.0f\n", mode, m / (t1 - t0), (syncs > 0 ? msgs / syncs : 0),
            (syncs > 0 ? synced / syncs : 0), (syncs > 0 ? waited * 1000 / syncs : 0) }' "$WORK/relay.log" |
        tee -a "$WORK/results" >&2
}
printf "# group_commit (%s on/off) on %s (%s cores), %s, %s reps x %s msgs, %s sessions, spool under %s\n" \
    "$SWITCH" "$(hostname)" "$(nproc)" "$(date -u +%Y-%m-%dT%H:%MZ)" "$REPS" "$MSGS" "$SESS" "$QBASE"
for r in $(seq 1 "$REPS"); do one_run on; one_run off; done
printf "%-14s %10s %16s %14s %16s\n" "$SWITCH" "accept/s" "messages/fsync" "fsync µs" "window µs/fsync"
for mode in on off; do
    printf "%-14s %10.0f %16.1f %14.0f %16.0f\n" "$mode" \
        "$(awk -v m="$mode" '$1 == m {print $2}' "$WORK/results" | median)" \
        "$(awk -v m="$mode" '$1 == m {print $3}' "$WORK/results" | median)" \
        "$(awk -v m="$mode" '$1 == m {print $4}' "$WORK/results" | median)" \
        "$(awk -v m="$mode" '$1 == m {print $5}' "$WORK/results" | median)"
done
