#!/usr/bin/env bash
# TCP segments per message on loopback, smtp-sink against `ringrelay serve --sink`, both
# driven by smtp-source (1 KiB, 50 sessions, many messages per connection): the kernel's
# TCP counters (nstat) over one run each, divided by the message count. Loopback counts
# both ends, so "in" and "out" are each the client's plus the server's segments. Shows
# whether either server makes the kernel send more packets (extra ACKs, split replies)
# than the other for the same dialogue.
#
# usage: benches/segments.sh [MSGS]      (default 40000)
#   env RINGRELAY (default target/release/ringrelay), PORT (default 2650)
# Needs: postfix (smtp-source, smtp-sink), iproute2 (nstat), root (smtp-sink drops to
# user postfix). Run on a quiet machine: nstat counts every connection on the host.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
. "$SHARED/lib.sh"
. "$ROOT/benches/lib.sh"
need smtp-source smtp-sink nstat

MSGS=${1:-40000}
PORT=${PORT:-2650}
RINGRELAY=${RINGRELAY:-$ROOT/target/release/ringrelay}
[ -x "$RINGRELAY" ] || { echo "build first: cargo build --release ($RINGRELAY missing)" >&2; exit 2; }
one_server_setup segments
# wait_port's probe connection may still count when smtp-source's 50 sessions arrive: room
# for more than 50 from one address.
printf '[limits]\nmax_connections_per_ip = 1000\n' >"$WORK/ringrelay.toml"
COUNTERS='TcpInSegs|TcpOutSegs|TcpExtDelayedACKs|TcpExtTCPPureAcks|TcpExtTCPHPAcks|TcpExtTCPAutoCorking'

printf "# segments on %s (%s cores, kernel %s), %s, %s msgs, 50 sessions, 1024 bytes\n" \
    "$(hostname)" "$(nproc)" "$(uname -r)" "$(date -u +%Y-%m-%dT%H:%MZ)" "$MSGS"
printf "%-16s %-24s %10s\n" server counter per_msg
for server in smtp-sink ringrelay; do
    case $server in
    smtp-sink) smtp-sink -c -u postfix "127.0.0.1:$PORT" 1024 >/dev/null 2>&1 & ;;
    ringrelay) "$RINGRELAY" serve --sink --config "$WORK/ringrelay.toml" --listen "127.0.0.1:$PORT" 2>/dev/null & ;;
    esac
    SRV=$!
    wait_port 127.0.0.1 "$PORT" || { echo "$server did not start" >&2; exit 1; }
    nstat -n >/dev/null
    smtp-source -d -s 50 -m "$MSGS" -l 1024 -f sender@example.com -t rcpt@example.com \
        "127.0.0.1:$PORT" >/dev/null
    nstat -z 2>/dev/null | awk -v n="$MSGS" -v s="$server" -v re="^($COUNTERS)\$" \
        '$1 ~ re {printf "%-16s %-24s %10.2f\n", s, $1, $2 / n}'
    stop_server
done
