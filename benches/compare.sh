#!/usr/bin/env bash
# Reruns every side-by-side comparison and target measurement in PERF.md on this machine
# and prints the tables: the front end against smtp-sink, loadgen against Postfix's tools,
# the front end's instructions and system calls counted under valgrind (if installed),
# the durable relay against Postfix (shared harness), 1 shard against 2, group commit and
# its window on and off, MX against static routing, idle connections, the latency target,
# and (with SWEEP=1) the offered-load sweep and its plot.
# Takes about 12 minutes on 2 cores (15 more with SWEEP=1). Needs postfix installed and root
# (see ../shared/bench).
#
# usage: benches/compare.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
cd "$ROOT"
cargo build --release -p ringrelay -p loadgen --example dns_fixture
RR="$ROOT/target/release/ringrelay"
echo "## 1. serve --sink against smtp-sink (pinned: load on CPU 0, server on CPU 1)"
PIN_LOAD=0 PIN_SERVER=1 VARIANTS="smtp-sink ringrelay-uring ringrelay-epoll" \
    benches/sink_compare.sh 5 40000 50 1024 2>/dev/null
echo "## 7. serve --sink against smtp-sink, nothing pinned, default shards: local connections steered by CPU, and by hash"
VARIANTS="smtp-sink ringrelay-uring ringrelay-uring-hash ringrelay-epoll" \
    benches/sink_compare.sh 5 40000 50 1024 2>/dev/null
echo "## 11.8 the hand-written ring prototype beside the server (registered files, submit per op, DEFER_TASKRUN, POLL_FIRST)"
cargo build --release --bench ring_sink
PIN_LOAD=0 PIN_SERVER=1 VARIANTS="smtp-sink ringrelay-uring ring-proto ring-proto-fixed ring-proto-each ring-proto-defer-pollfirst" \
    benches/sink_compare.sh 5 40000 50 1024 2>/dev/null
if command -v valgrind >/dev/null; then
    echo "## 11.10 the front end counted: user-space instructions and system calls per message"
    benches/sink_instructions.sh 3000 500 2>/dev/null
else
    echo "## 11.10 skipped: valgrind is not installed (apt-get install -y valgrind)"
fi
echo "## 3. loadgen against smtp-source / smtp-sink"
benches/loadgen_compare.sh 3 50000 50 1024 2>/dev/null
echo "## 4. durable relay against Postfix (shared harness), then ringrelay 2 shards / 1 shard pinned"
"$SHARED/postfix_relay.sh" 3 10000 50 2>/dev/null | tail -3
RELAY_NAME=ringrelay RELAY_CMD="$RR serve --listen 127.0.0.1:2527 --smarthost 127.0.0.1:2525 --spool \$QDIR" \
    "$SHARED/any_relay.sh" 3 30000 50 2>/dev/null | tail -3
PIN_LOAD=0 PIN_RELAY=1 RELAY_NAME=ringrelay-1-shard-pinned \
    RELAY_CMD="$RR serve --shards 1 --listen 127.0.0.1:2527 --smarthost 127.0.0.1:2525 --spool \$QDIR" \
    "$SHARED/any_relay.sh" 3 30000 50 2>/dev/null | tail -3
echo "## 4. group commit on and off"
benches/group_commit.sh 3 15000 50 2>/dev/null
echo "## 11.4 the adaptive commit window on and off"
SWITCH=RINGRELAY_COMMIT_WINDOW benches/group_commit.sh 3 15000 50 2>/dev/null
echo "## 5. MX against static routing"
benches/mx_compare.sh 3 20000 50 2>/dev/null
echo "## 6. 10,000 idle connections"
benches/idle_connections.sh 3 10000 2>/dev/null
echo "## 11.6 end of DATA to 250 at half the maximum rate"
benches/latency.sh 3 5500 10 2>/dev/null
if [ "${SWEEP:-0}" = 1 ]; then
    echo "## 8. offered load against throughput and p99 (writes benches/results/rate_sweep.*)"
    benches/rate_sweep.sh 5
fi
