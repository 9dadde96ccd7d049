#!/usr/bin/env bash
# Reruns every side-by-side comparison in PERF.md on this machine and prints the tables:
# the front end against smtp-sink, loadgen against Postfix's tools, the durable relay against
# Postfix (shared harness), group commit on/off, and MX against static routing.
# Takes about 10 minutes on 2 cores. Needs postfix installed and root (see ../shared/bench).
#
# usage: benches/compare.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
cd "$ROOT"
cargo build --release -p ringrelay -p loadgen --example dns_fixture
echo "## 1. serve --sink against smtp-sink (pinned)"
PIN_LOAD=0 PIN_SERVER=1 VARIANTS="smtp-sink ringrelay-uring ringrelay-epoll" \
    benches/sink_compare.sh 3 60000 50 1024 2>/dev/null
echo "## 3. loadgen against smtp-source / smtp-sink"
benches/loadgen_compare.sh 3 50000 50 1024 2>/dev/null
echo "## 4. durable relay against Postfix (shared harness)"
"$SHARED/postfix_relay.sh" 3 10000 50 2>/dev/null | tail -3
RELAY_NAME=ringrelay RELAY_CMD="$ROOT/target/release/ringrelay serve --listen 127.0.0.1:2527 --smarthost 127.0.0.1:2525 --spool \$QDIR" \
    "$SHARED/any_relay.sh" 3 30000 50 2>/dev/null | tail -3
echo "## 4. group commit on and off"
benches/group_commit.sh 3 15000 50 2>/dev/null
echo "## 5. MX against static routing"
benches/mx_compare.sh 3 20000 50 2>/dev/null
