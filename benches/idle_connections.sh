#!/usr/bin/env bash
# The idle-connection target of the performance issue: 10,000 connections opened and
# greeted, then left idle; the server's RSS while they are all open (target <= 64 MiB).
# Runs `ringrelay serve --sink` on each driver REPS times, a fresh server per run, and
# prints the median RSS per driver.
#
# usage: benches/idle_connections.sh [REPS] [CONNECTIONS]     (default 3 10000)
#   env RINGRELAY (default target/release/ringrelay), PORT (default 2720)
# Needs: root or a nofile limit above CONNECTIONS (the script raises its own), python3.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
. "$SHARED/lib.sh"
REPS=${1:-3}
N=${2:-10000}
PORT=${PORT:-2720}
RINGRELAY=${RINGRELAY:-$ROOT/target/release/ringrelay}
WORK=$(mktemp -d /tmp/idle.XXXXXX)
SRV=""
cleanup() { [ -n "$SRV" ] && kill "$SRV" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
# The server and the client each need a descriptor per connection (and some spare).
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -gt "$((N + 100))" ] ||
    { echo "nofile limit $(ulimit -n) is too low for $N connections" >&2; exit 1; }
cat >"$WORK/idle.toml" <<TOML
[limits]
max_connections = $((N * 2))
max_connections_per_ip = $((N * 2))
TOML
printf "# idle_connections on %s (%s cores), %s, %s reps x %s connections\n" \
    "$(hostname)" "$(nproc)" "$(date -u +%Y-%m-%dT%H:%MZ)" "$REPS" "$N"
for r in $(seq 1 "$REPS"); do
    for io in uring epoll; do
        "$RINGRELAY" serve --sink --io "$io" --config "$WORK/idle.toml" --listen "127.0.0.1:$PORT" 2>"$WORK/srv.out" &
        SRV=$!
        wait_port 127.0.0.1 "$PORT" || { cat "$WORK/srv.out" >&2; exit 1; }
        empty=$(awk '/^VmRSS/ {print $2}' "/proc/$SRV/status")
        line=$(python3 "$ROOT/benches/idle_connections.py" "$N" "$PORT" "$SRV")
        kill -TERM "$SRV"; wait "$SRV" 2>/dev/null || true; SRV=""
        rss=$(sed -n 's/.*VmRSS:\([0-9]*\).*/\1/p' <<<"$line")
        echo "$io $rss $empty $line" | tee -a "$WORK/runs" >&2
        sleep 1
    done
done
printf "%-8s %14s %16s %12s\n" driver "RSS_MiB_idle" "empty_server_MiB" "KB_per_conn"
for io in uring epoll; do
    rss=$(awk -v d="$io" '$1 == d {print $2}' "$WORK/runs" | median)
    empty=$(awk -v d="$io" '$1 == d {print $3}' "$WORK/runs" | median)
    awk -v d="$io" -v r="$rss" -v e="$empty" -v n="$N" \
        'BEGIN {printf "%-8s %14.1f %16.1f %12.1f\n", d, r / 1024, e / 1024, (r - e) / n}'
done
