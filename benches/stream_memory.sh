#!/usr/bin/env bash
# Peak memory of the relay for 8 concurrent 30 MiB messages (issue 16 §4).
#
# usage: benches/stream_memory.sh RINGRELAY LOADGEN [ROUNDS]
#   Per round: `loadgen sink` as the next hop, `ringrelay serve` (2 shards, spool on
#   /var/tmp, the real disk) routing example.test to it, then `loadgen send` with 8
#   connections x 1 message of 31457280 bytes. Once the queue is empty, prints the relay's
#   RSS before the load, its peak (VmHWM) and the growth. Ports: PORT_SINK (27625),
#   PORT_RELAY (27627), away from the shared benches' 2525/2527.
set -euo pipefail
RELAY=$1
LOADGEN=$2
ROUNDS=${3:-1}
PORT_SINK=${PORT_SINK:-27625}
PORT_RELAY=${PORT_RELAY:-27627}
SIZE=31457280

wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    return 1
}

for round in $(seq 1 "$ROUNDS"); do
    work=$(mktemp -d /var/tmp/stream_memory.XXXXXX)
    "$LOADGEN" sink --listen "127.0.0.1:$PORT_SINK" --json "$work/sink.json" >"$work/sink.log" 2>&1 &
    spid=$!
    "$RELAY" serve --listen "127.0.0.1:$PORT_RELAY" --shards 2 --spool "$work/spool" \
        --route "example.test=127.0.0.1:$PORT_SINK" >"$work/relay.log" 2>&1 &
    rpid=$!
    wait_port "$PORT_SINK"
    wait_port "$PORT_RELAY"
    sleep 0.5
    before=$(awk '/^VmRSS/{print $2}' "/proc/$rpid/status")
    "$LOADGEN" send --target "127.0.0.1:$PORT_RELAY" --connections 8 --messages 8 \
        --size "$SIZE" --timeout 120 --json "$work/send.json" >/dev/null
    until "$RELAY" queue stats --spool "$work/spool" --json | grep -Eq '"messages": *0[,}]'; do
        sleep 0.2
    done
    peak=$(awk '/^VmHWM/{print $2}' "/proc/$rpid/status")
    kill "$rpid"
    wait "$rpid" || true
    kill "$spid"
    wait "$spid" || true
    got=$(grep -o '"unique": *[0-9]*' "$work/sink.json" | grep -o '[0-9]*$')
    bad=$(grep -o '"corrupted": *[0-9]*' "$work/sink.json" | head -1 | grep -o '[0-9]*$')
    echo "round $round $RELAY: RSS before $before KiB, peak $peak KiB, growth $(((peak - before) / 1024)) MiB; sink: $got unique, $bad corrupted"
    rm -rf "$work"
done
