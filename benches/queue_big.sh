#!/usr/bin/env bash
# `ringrelay queue stats|list|list --json` on a spool of COUNT queued messages (default
# 1,000,000) of 1 KiB, with an older binary beside the current one, and the server's
# restart (recovery) on that spool.
#
# The spool comes from examples/queue_big_gen.rs: the library's own record encoder writes
# the segments a two-shard relay whose next hop is down would have left (every message
# deferred, one in ten partly delivered, one in fifty held, one finished message per fifty
# besides), far faster than relaying a million messages. Every time is one run with the
# spool in the page cache (it was just written; nothing drops the cache, which would slow
# every other user of the machine): wall seconds, CPU seconds (user + system: on a shared
# machine the steadier figure) and peak RSS from /usr/bin/time.
#
# usage: benches/queue_big.sh [COUNT]
#   env NEW (default target/release/ringrelay), OLD (a binary of an older commit; skipped
#   when unset), GEN (default target/release/examples/queue_big_gen), DIR (where the spool
#   goes, default a fresh directory under /var/tmp; deleted at exit), LIMIT (seconds any
#   one command may take, default 600).
# Build first: cargo build --release --bin ringrelay --example queue_big_gen
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COUNT=${1:-1000000}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
NEW=${NEW:-$TARGET/release/ringrelay}
GEN=${GEN:-$TARGET/release/examples/queue_big_gen}
OLD=${OLD:-}
LIMIT=${LIMIT:-600}
for b in "$NEW" "$GEN" ${OLD:+"$OLD"}; do
    [ -x "$b" ] || { echo "missing $b (build first)" >&2; exit 2; }
done
command -v /usr/bin/time >/dev/null || { echo "needs /usr/bin/time" >&2; exit 2; }
WORK=$(mktemp -d "${DIR:-/var/tmp}/queue_big.XXXXXX")
SRV=""
cleanup() {
    [ -n "$SRV" ] && kill "$SRV" 2>/dev/null && wait "$SRV" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
SPOOL=$WORK/spool

# run LABEL CMD...: one timed run; prints the command, its output's last line, wall
# seconds and peak RSS.
run() {
    local label=$1
    shift
    echo "\$ $*"
    /usr/bin/time -f "%e %M %U %S" -o "$WORK/time" timeout "$LIMIT" bash -c "$*" >"$WORK/out" 2>"$WORK/err" || {
        echo "  FAILED (exit $?): $(tail -3 "$WORK/err")"
    }
    read -r secs rss user sys <"$WORK/time" || true
    printf "  %-28s %7s s wall %6s s CPU %6s MiB peak RSS   output: %s\n" "$label" "$secs" \
        "$(echo "${user:-0} + ${sys:-0}" | bc)" "$((${rss:-0} / 1024))" "$(tail -1 "$WORK/out" | cut -c1-60)"
}

printf "# queue_big on %s (%s cores, %s GiB RAM, kernel %s), %s\n" "$(hostname)" "$(nproc)" \
    "$(awk '/MemTotal/ {printf "%d", $2 / 1048576}' /proc/meminfo)" "$(uname -r)" \
    "$(date -u +%Y-%m-%dT%H:%MZ)"
echo "## spool: $COUNT queued messages of 1024 bytes (examples/queue_big_gen.rs)"
run "generate" "$GEN" "$SPOOL" "$COUNT" 1024
du -sh "$SPOOL" | sed 's/^/  /'
echo "  segments: $(ls "$SPOOL" | grep -c '^seg-')"

for which in OLD NEW; do
    bin=${!which}
    [ -n "$bin" ] || { echo "## $which: skipped (no binary given)"; continue; }
    echo "## $which: $bin"
    run "$which queue stats" "$bin" queue stats --spool "$SPOOL"
    run "$which queue stats --json" "$bin" queue stats --json --spool "$SPOOL"
    run "$which queue list | wc -l" "$bin" queue list --spool "$SPOOL" "| wc -l"
    run "$which queue list --json | wc -c" "$bin" queue list --json --spool "$SPOOL" "| wc -c"
    # The same output from both, but for the age of the oldest message.
    "$bin" queue list --spool "$SPOOL" | md5sum | sed "s/^/  $which list md5 /"
    "$bin" queue list --json --spool "$SPOOL" | md5sum | sed "s/^/  $which list --json md5 /"
done

echo "## restart: NEW serve on the spool, until it listens (recovery reads every segment)"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
DEAD=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'hostname = "relay.test"\n[delivery]\nretry_schedule_secs = [300]\n' >"$WORK/ringrelay.toml"
echo "\$ $NEW serve --config $WORK/ringrelay.toml --spool $SPOOL --listen 127.0.0.1:$PORT --route down.example=127.0.0.1:$DEAD --route up.example=127.0.0.1:$DEAD"
t0=$(date +%s.%N)
RUST_LOG=info "$NEW" serve --config "$WORK/ringrelay.toml" --spool "$SPOOL" --listen "127.0.0.1:$PORT" \
    --route "down.example=127.0.0.1:$DEAD" --route "up.example=127.0.0.1:$DEAD" 2>"$WORK/serve.log" &
SRV=$!
for _ in $(seq $((LIMIT * 10))); do
    grep -q "listening on" "$WORK/serve.log" && break
    kill -0 "$SRV" 2>/dev/null || break
    sleep 0.1
done
t1=$(date +%s.%N)
grep -o "[0-9]* message(s) to deliver after recovery.*" "$WORK/serve.log" | sed 's/^/  /' || true
rss=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$SRV/status" 2>/dev/null || echo "?")
printf "  %-28s %8.2f s  %8s MiB peak RSS\n" "start to listening" "$(echo "$t1 - $t0" | bc)" "$rss"
kill -TERM "$SRV"
wait "$SRV" 2>/dev/null || true
SRV=""
