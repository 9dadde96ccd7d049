#!/usr/bin/env bash
# Two ringrelay nodes behind HAProxy (contrib/haproxy.cfg's shape: send-proxy-v2,
# check-send-proxy, option smtpchk), each with its own spool and node_id; loadgen send
# drives mail through the balancer into loadgen sink; KILL_AFTER seconds in, node 1 is
# SIGKILLed and restarted on its spool. At the end the sink checks send's manifest: no
# acknowledged message may be lost. Prints send's and the sink's summaries and the verdict.
# Everything on 127.0.0.1; everything started is stopped by PID.
#
# usage: benches/farm.sh [MESSAGES] [CONNECTIONS] [RATE] [KILL_AFTER]
#   defaults: 20000 messages, 50 connections, 4000 msgs/s, kill after 2 s
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MSGS=${1:-20000}
CONNS=${2:-50}
RATE=${3:-4000}
KILL_AFTER=${4:-2}
command -v haproxy >/dev/null || { echo "haproxy is not installed (apt-get install haproxy)" >&2; exit 1; }
cd "$ROOT"
cargo build --release -q -p ringrelay -p loadgen
RR="$ROOT/target/release/ringrelay"
LG="$ROOT/target/release/loadgen"
WORK=$(mktemp -d /var/tmp/ringrelay-farm.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

FRONT=4625; SINK=4626; P1=4627; P2=4628; L1=4629; L2=4630
"$LG" sink --listen 127.0.0.1:$SINK --check-manifest "$WORK/manifest" --manifest-wait 10 \
    --json "$WORK/sink.json" >"$WORK/sink.log" 2>&1 &
SINK_PID=$!; PIDS+=("$SINK_PID")

node_config() { # N PROXY_PORT PLAIN_PORT
    cat >"$WORK/node$1.toml" <<TOML
node_id = $1
listen = ["127.0.0.1:$3"]
[proxy]
listen = ["127.0.0.1:$2"]
[relay]
mynetworks = ["127.0.0.1/32"]
[spool]
dir = "$WORK/spool$1"
[delivery]
routes = { "example.test" = "127.0.0.1:$SINK" }
retry_schedule_secs = [1]
TOML
}
start_node() { # N
    "$RR" serve --config "$WORK/node$1.toml" >>"$WORK/node$1.log" 2>&1 &
    NODE_PID[$1]=$!; PIDS+=("${NODE_PID[$1]}")
}
declare -a NODE_PID
node_config 1 $P1 $L1; node_config 2 $P2 $L2
start_node 1; start_node 2
sed -e "s/^\(\s*\)bind .*/\1bind 127.0.0.1:$FRONT/" \
    -e '/^\s*server /d' -e '/^\s*\(daemon\|user \|group \|log \/dev\)/d' \
    -e 's/^\(\s*\)maxconn .*/\1maxconn 2000/' contrib/haproxy.cfg >"$WORK/haproxy.cfg"
cat >>"$WORK/haproxy.cfg" <<CFG
    server node1 127.0.0.1:$P1 send-proxy-v2 check check-send-proxy inter 300 fall 2 rise 1
    server node2 127.0.0.1:$P2 send-proxy-v2 check check-send-proxy inter 300 fall 2 rise 1
CFG
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PIDS+=("$!")
sleep 1.5
"$LG" send --target 127.0.0.1:$FRONT --messages "$MSGS" --connections "$CONNS" --rate "$RATE" \
    --pipelining --manifest "$WORK/manifest" --json "$WORK/send.json" --give-up-after 30 \
    >"$WORK/send.log" 2>&1 &
SEND_PID=$!; PIDS+=("$SEND_PID")
sleep "$KILL_AFTER"
kill -9 "${NODE_PID[1]}"; wait "${NODE_PID[1]}" 2>/dev/null || true
echo "node 1 SIGKILLed ${KILL_AFTER}s in; restarting it on its spool"
start_node 1
wait "$SEND_PID" || { echo "loadgen send failed:"; cat "$WORK/send.log"; exit 1; }
for n in 1 2; do
    for _ in $(seq 300); do
        q=$("$RR" queue stats --spool "$WORK/spool$n" --json | sed -n 's/.*"messages": *\([0-9]*\).*/\1/p')
        [ "${q:-1}" = 0 ] && break; sleep 0.1
    done
done
kill -TERM "$SINK_PID"; wait "$SINK_PID"; RC=$?
echo "== loadgen send"; tail -n 12 "$WORK/send.log"
echo "== loadgen sink"; tail -n 12 "$WORK/sink.log"
case $RC in
  0) echo "verdict: no acknowledged message lost" ;;
  3) echo "verdict: ACKNOWLEDGED MESSAGES LOST"; exit 3 ;;
  *) echo "verdict: sink exited $RC"; exit "$RC" ;;
esac
