#!/usr/bin/env bash
# The front end's user-space work per message, counted rather than timed: each server runs
# under valgrind's callgrind while Postfix's smtp-source sends it messages, and the
# instructions it executed in user space are read from callgrind's totals. Instruction
# counts repeat to within about 1% from run to run, where CPU time on this VM varies by
# ±15%, so this is how small changes to the connection path are compared. Kernel work
# is not counted (callgrind sees user space only); the same script counts the server's
# system calls per message in a run without valgrind (perf), which is where most of the
# kernel's share comes from.
#
# Each server is measured twice, with WARM and with WARM + MSGS messages, and the
# difference divided by MSGS: start-up and shutdown cancel out. smtp-sink runs as in
# sink_compare.sh (`-c`: it prints a running count, part of its per-message cost there too).
#
# usage: benches/sink_instructions.sh [MSGS] [WARM]      (default 3000 500)
#   env RINGRELAY (default target/release/ringrelay), RINGRELAY_BASE (for the
#       ringrelay-base-uring variant), PORT (default 2670), VARIANTS (default
#       "smtp-sink ringrelay-uring ringrelay-epoll").
# Needs: valgrind, postfix (smtp-source, smtp-sink), root (smtp-sink drops to postfix);
# perf for the system-call column (left empty without it).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
. "$SHARED/lib.sh"
. "$ROOT/benches/lib.sh"
need smtp-source smtp-sink valgrind callgrind_annotate

MSGS=${1:-3000}
WARM=${2:-500}
PORT=${PORT:-2670}
RINGRELAY=${RINGRELAY:-$ROOT/target/release/ringrelay}
VARIANTS=${VARIANTS:-"smtp-sink ringrelay-uring ringrelay-epoll"}
[ -x "$RINGRELAY" ] || { echo "build first: cargo build --release ($RINGRELAY missing)" >&2; exit 2; }
one_server_setup sink_instructions
chmod 777 "$WORK" # smtp-sink writes its callgrind output as user postfix
# wait_port's probe connection holds a slot until the server, slow under valgrind, has
# closed it; with smtp-source's 50 sessions that is 51, over the per-address cap of 50.
cat >"$WORK/ringrelay.toml" <<TOML
[limits]
max_connections_per_ip = 1000
TOML

# server_cmd VARIANT -> the command line of that server
server_cmd() {
    case "$1" in
    smtp-sink) echo "smtp-sink -c -u postfix -m 1024 127.0.0.1:$PORT 1024" ;;
    ringrelay-uring) echo "$RINGRELAY serve --sink --config $WORK/ringrelay.toml --io uring --shards 1 --listen 127.0.0.1:$PORT" ;;
    ringrelay-epoll) echo "$RINGRELAY serve --sink --config $WORK/ringrelay.toml --io epoll --shards 1 --listen 127.0.0.1:$PORT" ;;
    ringrelay-base-uring) echo "${RINGRELAY_BASE:?set RINGRELAY_BASE} serve --sink --config $WORK/ringrelay.toml --io uring --shards 1 --listen 127.0.0.1:$PORT" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
    esac
}

send() { smtp-source -d -s 50 -m "$1" -l 1024 -f sender@example.com -t rcpt@example.com "127.0.0.1:$PORT" >"$WORK/src.out" 2>&1 || { echo "smtp-source failed" >&2; cat "$WORK/src.out" >&2; exit 1; }; }

# instructions VARIANT N -> user-space instructions of the server over a run of N messages
instructions() {
    local out="$WORK/cg.$1.$2" cmd
    cmd=$(server_cmd "$1")
    # callgrind opens its output file at start and writes it at exit, so a server that drops
    # privileges could not write it: smtp-sink runs as postfix from the start (no -u).
    local as=()
    if [ "$1" = smtp-sink ]; then
        as=(setpriv --reuid=postfix --regid=postfix --clear-groups)
        cmd=${cmd/ -u postfix/}
    fi
    # shellcheck disable=SC2086
    ${as[@]+"${as[@]}"} valgrind --tool=callgrind --callgrind-out-file="$out" $cmd >"$WORK/srv.out" 2>&1 &
    SRV=$!
    wait_port 127.0.0.1 "$PORT" 300 || { echo "$1 did not start under valgrind" >&2; cat "$WORK/srv.out" >&2; exit 1; }
    send "$2"
    sleep 0.5
    stop_server
    [ -s "$out" ] || { echo "$1 wrote no callgrind output" >&2; cat "$WORK/srv.out" >&2; exit 1; }
    # awk reads to the end: with pipefail, callgrind_annotate must not die of SIGPIPE.
    callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !n++ {gsub(",", "", $1); print $1}'
}

# syscalls VARIANT -> system calls per message, without valgrind (empty without perf)
syscalls() {
    command -v perf >/dev/null || { echo ""; return; }
    # shellcheck disable=SC2046
    env $(server_cmd "$1") >"$WORK/srv.out" 2>&1 &
    SRV=$!
    wait_port 127.0.0.1 "$PORT" || { echo "$1 did not start" >&2; exit 1; }
    send "$WARM"
    perf stat -e raw_syscalls:sys_enter -x, -o "$WORK/perf.out" -p "$SRV" &
    local ps=$!
    sleep 1 # perf attaches to the running server before the counted messages start
    send "$MSGS"
    sleep 0.3
    kill -INT "$ps"; wait "$ps" 2>/dev/null || true
    stop_server
    # A count perf could not take ("<not counted>", no permission) fails the run.
    awk -F, -v m="$MSGS" '/raw_syscalls/ {n = $1} END {
        if (n !~ /^[0-9]+$/) { print "perf could not count system calls: " n > "/dev/stderr"; exit 1 }
        printf "%.2f", n / m }' "$WORK/perf.out"
}

printf "# sink_instructions on %s (%s cores, kernel %s), %s, %s msgs (after %s), 50 sessions, 1024 bytes, one shard\n" \
    "$(hostname)" "$(nproc)" "$(uname -r)" "$(date -u +%Y-%m-%dT%H:%MZ)" "$MSGS" "$WARM"
printf "%-24s %16s %18s\n" server "user_instr/msg" "syscalls/msg"
for v in $VARIANTS; do
    # Into files, not `$(...)`: in the main shell a failure exits the script, and the
    # cleanup trap knows the server to stop.
    instructions "$v" "$WARM" >"$WORK/a"
    instructions "$v" "$((WARM + MSGS))" >"$WORK/b"
    syscalls "$v" >"$WORK/s"
    a=$(cat "$WORK/a") b=$(cat "$WORK/b") s=$(cat "$WORK/s")
    [ -n "$a" ] && [ -n "$b" ] || { echo "no instruction count for $v" >&2; exit 1; }
    awk -v v="$v" -v a="$a" -v b="$b" -v m="$MSGS" -v s="$s" 'BEGIN {printf "%-24s %16.0f %18s\n", v, (b - a) / m, s}'
done
