#!/usr/bin/env bash
# Through HAProxy against direct, same run, interleaved rep by rep (issue 17's figures):
#   direct     loadgen send -> one node's plain listener -> loadgen sink
#   farm       loadgen send -> HAProxy (send-proxy-v2) -> two nodes' PROXY listeners -> sink
# and the PROXY header's cost per connection, one node behind HAProxy, a new connection
# per message:
#   hp-plain   HAProxy -> the node's plain listener (no header)
#   hp-proxy   HAProxy -> the node's PROXY listener (send-proxy-v2)
# Prints, per variant, the median of REPS runs: delivered msgs/s (send start to the sink's
# last message) and the relays' CPU per message (utime+stime from /proc).
#
# usage: benches/farm_compare.sh [REPS] [MESSAGES] [CONNECTIONS]   (defaults 3 20000 50)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPS=${1:-3}; MSGS=${2:-20000}; CONNS=${3:-50}
command -v haproxy >/dev/null || { echo "haproxy is not installed" >&2; exit 1; }
cd "$ROOT"
cargo build --release -q -p ringrelay -p loadgen
RR="$ROOT/target/release/ringrelay"; LG="$ROOT/target/release/loadgen"
WORK=$(mktemp -d /var/tmp/ringrelay-farmcmp.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT; trap 'exit 130' INT TERM
TICK=$(getconf CLK_TCK)
cpu_ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }

node() { # N PLAIN_PORT PROXY_PORT SINK_PORT -> prints pid
    rm -rf "$WORK/spool$1"
    cat >"$WORK/n$1.toml" <<TOML
node_id = $1
listen = ["127.0.0.1:$2"]
[proxy]
listen = ["127.0.0.1:$3"]
[relay]
mynetworks = ["127.0.0.0/8"]
[spool]
dir = "$WORK/spool$1"
[delivery]
routes = { "example.test" = "127.0.0.1:$4" }
TOML
    "$RR" serve --config "$WORK/n$1.toml" >"$WORK/n$1.log" 2>&1 &
    echo $!
}
haproxy_for() { # FRONT SEND_PROXY(0|1) BACKEND... -> prints pid
    local front=$1 sp=$2; shift 2
    { printf 'global\n    maxconn 2000\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n'
      printf 'frontend f\n    bind 127.0.0.1:%s\n    default_backend b\nbackend b\n    balance roundrobin\n' "$front"
      local i=0; for b in "$@"; do i=$((i+1))
        if [ "$sp" = 1 ]; then printf '    server s%s %s send-proxy-v2\n' $i "$b"; else printf '    server s%s %s\n' $i "$b"; fi
      done; } >"$WORK/hp.cfg"
    haproxy -db -f "$WORK/hp.cfg" >"$WORK/hp.log" 2>&1 &
    echo $!
}
run_variant() { # VARIANT -> prints "msgs_per_s cpu_us_per_msg"
    local v=$1 sinkp=4726 front=4727 extra=()
    "$LG" sink --listen 127.0.0.1:$sinkp --expect "$MSGS" --timeout 120 >"$WORK/sink.log" 2>&1 &
    local sink=$!
    local n1 n2="" hp="" target
    case $v in
      direct)   n1=$(node 1 4728 4729 $sinkp); target=127.0.0.1:4728 ;;
      farm)     n1=$(node 1 4728 4729 $sinkp); n2=$(node 2 4730 4731 $sinkp)
                hp=$(haproxy_for $front 1 127.0.0.1:4729 127.0.0.1:4731); target=127.0.0.1:$front ;;
      hp-plain) n1=$(node 1 4728 4729 $sinkp); hp=$(haproxy_for $front 0 127.0.0.1:4728)
                target=127.0.0.1:$front; extra=(--new-connection-per-message) ;;
      hp-proxy) n1=$(node 1 4728 4729 $sinkp); hp=$(haproxy_for $front 1 127.0.0.1:4729)
                target=127.0.0.1:$front; extra=(--new-connection-per-message) ;;
    esac
    sleep 1
    local relays=($n1 $n2) c0 t0 t1 c1
    c0=$(cpu_ticks "${relays[@]}"); t0=$(date +%s.%N)
    "$LG" send --target "$target" --messages "$MSGS" --connections "$CONNS" "${extra[@]}" >"$WORK/send.log" 2>&1
    wait "$sink" || true
    t1=$(date +%s.%N); c1=$(cpu_ticks "${relays[@]}")
    for p in "${relays[@]}" $hp; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    awk -v n="$MSGS" -v a="$t0" -v b="$t1" -v c="$((c1 - c0))" -v tk="$TICK" \
        'BEGIN { printf "%.0f %.1f\n", n / (b - a), c / tk * 1e6 / n }'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
VARIANTS="direct farm hp-plain hp-proxy"
for v in $VARIANTS; do : >"$WORK/$v.rate"; : >"$WORK/$v.cpu"; done
for rep in $(seq "$REPS"); do
    for v in $VARIANTS; do
        read -r rate cpu < <(run_variant "$v")
        echo "rep $rep $v: $rate msgs/s, $cpu us/msg relay CPU" >&2
        echo "$rate" >>"$WORK/$v.rate"; echo "$cpu" >>"$WORK/$v.cpu"
    done
done
printf "%-9s %10s %14s\n" variant "msgs/s" "relay_us/msg"
for v in $VARIANTS; do
    printf "%-9s %10s %14s\n" "$v" "$(median <"$WORK/$v.rate")" "$(median <"$WORK/$v.cpu")"
done
