#!/usr/bin/env bash
# Front end alone, side by side: Postfix's smtp-source drives, in turn, Postfix's
# smtp-sink and `ringrelay serve --sink` (io_uring and epoll drivers), with the same
# message size and session count, interleaved rep by rep so machine noise hits all alike.
# Prints per-run lines on stderr and a table of medians (and ratios to smtp-sink) on stdout.
#
# usage: benches/sink_compare.sh [REPS] [MSGS] [SESSIONS] [SIZE]
#   env RINGRELAY (default target/release/ringrelay), PORT (default 2640),
#       SHARDS (ringrelay shards, default 0 = one per core), VARIANTS (see below),
#       RINGRELAY_BASE (the binary of the ringrelay-base-uring variant, for A/Bs of a change),
#       PIN_LOAD / PIN_SERVER (CPU lists for taskset: pin smtp-source and the server),
#       RING_SINK (the benches/ring_sink.rs prototype for the ring-proto* variants; default:
#       the newest build of `cargo build --release --bench ring_sink`).
# Variants: smtp-sink, ringrelay-uring, ringrelay-epoll, ringrelay-uring-SETUP,
#   ringrelay-uring-hash (RINGRELAY_REUSEPORT=hash: local connections not steered by CPU),
#   ringrelay-base-uring, and ring-proto[-fixed][-each][-defer|-plain][-rw][-pollfirst][-tokio]
#   (the prototype on a hand-written ring: registered files, one submit per operation, ring
#   setup flags, READ/WRITE instead of RECV/SEND, RECVSEND_POLL_FIRST, the loop hosted as a
#   task of a tokio runtime).
# Needs: postfix (smtp-source, smtp-sink), root (smtp-sink drops to user postfix).
# Uses ../shared/bench/lib.sh for CPU accounting, so figures match the shared harness.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
. "$SHARED/lib.sh"
. "$ROOT/benches/lib.sh"
need smtp-source smtp-sink

REPS=${1:-3}
MSGS=${2:-100000}
SESS=${3:-50}
SIZE=${4:-1024}
PORT=${PORT:-2640}
SHARDS=${SHARDS:-0}
RINGRELAY=${RINGRELAY:-$ROOT/target/release/ringrelay}
VARIANTS=${VARIANTS:-"smtp-sink ringrelay-uring ringrelay-epoll"}
case "$VARIANTS" in *ring-proto*)
    RING_SINK=${RING_SINK:-$(ls -t "$ROOT"/target/release/deps/ring_sink-* 2>/dev/null | grep -v '\.d$' | head -1 || true)} ;;
esac
[ -x "$RINGRELAY" ] || { echo "build first: cargo build --release ($RINGRELAY missing)" >&2; exit 2; }
one_server_setup sink_compare

PIN_LOAD=${PIN_LOAD:-}
PIN_SERVER=${PIN_SERVER:-}
# Prefixes that exec into the command, so $! is the server's own PID.
SRV_PREFIX=(env); [ -n "$PIN_SERVER" ] && SRV_PREFIX=(taskset -c "$PIN_SERVER")
LOAD_PREFIX=(env); [ -n "$PIN_LOAD" ] && LOAD_PREFIX=(taskset -c "$PIN_LOAD")

start_server() {
    case "$1" in
    smtp-sink) "${SRV_PREFIX[@]}" smtp-sink -c -u postfix -m 1024 "127.0.0.1:$PORT" 1024 >"$WORK/srv.out" 2>&1 & ;;
    ringrelay-uring) "${SRV_PREFIX[@]}" "$RINGRELAY" serve --sink --io uring --shards "$SHARDS" --listen "127.0.0.1:$PORT" 2>"$WORK/srv.out" & ;;
    ringrelay-uring-hash) # every connection by the kernel's hash, local ones too (no steering)
        RINGRELAY_REUSEPORT=hash "${SRV_PREFIX[@]}" "$RINGRELAY" serve --sink --io uring --shards "$SHARDS" --listen "127.0.0.1:$PORT" 2>"$WORK/srv.out" & ;;
    ringrelay-uring-*) # ringrelay-uring-SETUP: RINGRELAY_URING_SETUP=SETUP (plain, single, defer)
        RINGRELAY_URING_SETUP=${1#ringrelay-uring-} "${SRV_PREFIX[@]}" "$RINGRELAY" serve --sink --io uring --shards "$SHARDS" --listen "127.0.0.1:$PORT" 2>"$WORK/srv.out" & ;;
    ringrelay-base-uring) # A/B of a code change: the binary in $RINGRELAY_BASE (e.g. built from main)
        "${SRV_PREFIX[@]}" "${RINGRELAY_BASE:?set RINGRELAY_BASE}" serve --sink --io uring --shards "$SHARDS" --listen "127.0.0.1:$PORT" 2>"$WORK/srv.out" & ;;
    ring-proto*) # the prototype; its switches are read from the variant's name
        local files="" submit="" setup="" ops="" recv="" host=""
        case "$1" in *-fixed*) files=fixed ;; esac
        case "$1" in *-rw*) ops=rw ;; esac
        case "$1" in *-pollfirst*) recv=pollfirst ;; esac
        case "$1" in *-each*) submit=each ;; esac
        case "$1" in *-tokio*) host=tokio ;; esac
        case "$1" in *-defer*) setup=defer ;; *-plain*) setup=plain ;; esac
        local sw
        for sw in $(echo "${1#ring-proto}" | tr '-' ' '); do
            case "$sw" in fixed|each|rw|pollfirst|defer|plain|tokio) ;;
                *) echo "unknown switch '$sw' in variant $1" >&2; exit 2 ;; esac
        done
        RING_FILES=$files RING_SUBMIT=$submit RING_SETUP=$setup RING_OPS=$ops RING_RECV=$recv RING_HOST=$host \
            "${SRV_PREFIX[@]}" "${RING_SINK:?build the prototype: cargo build --release --bench ring_sink}" \
            --listen "127.0.0.1:$PORT" >"$WORK/srv.out" 2>&1 & ;;
    ringrelay-epoll) "${SRV_PREFIX[@]}" "$RINGRELAY" serve --sink --io epoll --shards "$SHARDS" --listen "127.0.0.1:$PORT" 2>"$WORK/srv.out" & ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
    esac
    SRV=$!
    wait_port 127.0.0.1 "$PORT" || { echo "$1 did not start" >&2; cat "$WORK/srv.out" >&2; exit 1; }
}

# one_run VARIANT -> appends "variant msgs_per_s cpu_us_per_msg peak_rss_kb user_us sys_us"
# to $WORK/results (user and kernel time per message split from /proc/PID/stat). The table
# takes the median of each column on its own, so user + sys need not add up to the total.
one_run() {
    local v=$1 c0 c1 t0 t1 rss u0 u1
    start_server "$v"
    c0=$(cpu_ticks "$SRV")
    u0=$(awk '{print $14}' "/proc/$SRV/stat" 2>/dev/null) || { echo "$v died" >&2; cat "$WORK/srv.out" >&2; exit 1; }
    t0=$(now)
    "${LOAD_PREFIX[@]}" smtp-source -d -s "$SESS" -m "$MSGS" -l "$SIZE" -f sender@example.com -t rcpt@example.com \
        "127.0.0.1:$PORT" >"$WORK/src.out" 2>&1 || { echo "smtp-source failed" >&2; cat "$WORK/src.out" >&2; exit 1; }
    t1=$(now)
    sleep 0.2
    c1=$(cpu_ticks "$SRV")
    u1=$(awk '{print $14}' "/proc/$SRV/stat" 2>/dev/null) || { echo "$v died during the run" >&2; cat "$WORK/srv.out" >&2; exit 1; }
    rss=$(peak_rss_kb "$SRV")
    stop_server
    awk -v v="$v" -v m="$MSGS" -v t0="$t0" -v t1="$t1" -v c="$((c1 - c0))" -v u="$((u1 - u0))" -v hz="$CLK_TCK" -v rss="$rss" \
        'BEGIN {printf "%s %.0f %.1f %d %.1f %.1f\n", v, m / (t1 - t0), 1e6 * c / hz / m, rss, 1e6 * u / hz / m, 1e6 * (c - u) / hz / m}' | tee -a "$WORK/results" >&2
}

printf "# sink_compare on %s (%s cores, kernel %s), %s, %s reps x %s msgs, %s sessions, %s bytes, shards=%s pin_load=%s pin_server=%s\n" \
    "$(hostname)" "$(nproc)" "$(uname -r)" "$(date -u +%Y-%m-%dT%H:%MZ)" "$REPS" "$MSGS" "$SESS" "$SIZE" "$SHARDS" "${PIN_LOAD:--}" "${PIN_SERVER:--}"
for r in $(seq 1 "$REPS"); do
    for v in $VARIANTS; do one_run "$v"; done
done
base_rate=$(awk '$1 == "smtp-sink" {print $2}' "$WORK/results" | median)
base_cpu=$(awk '$1 == "smtp-sink" {print $3}' "$WORK/results" | median)
printf "%-28s %10s %12s %14s %12s %10s %8s %8s\n" server "msgs/s" "cpu_us/msg" "rate_vs_sink" "cpu_vs_sink" "peakRSS_MB" "user_us" "sys_us"
for v in $VARIANTS; do
    rate=$(awk -v v="$v" '$1 == v {print $2}' "$WORK/results" | median)
    cpu=$(awk -v v="$v" '$1 == v {print $3}' "$WORK/results" | median)
    rss=$(awk -v v="$v" '$1 == v {print $4}' "$WORK/results" | median)
    usr=$(awk -v v="$v" '$1 == v {print $5}' "$WORK/results" | median)
    sys=$(awk -v v="$v" '$1 == v {print $6}' "$WORK/results" | median)
    awk -v v="$v" -v r="$rate" -v c="$cpu" -v br="$base_rate" -v bc="$base_cpu" -v rss="$rss" -v u="$usr" -v k="$sys" \
        'BEGIN {rr = (br + 0 > 0) ? sprintf("%.2fx", r / br) : "-"   # "-": no smtp-sink in VARIANTS
                cr = (bc + 0 > 0) ? sprintf("%.2fx", c / bc) : "-"
                printf "%-28s %10.0f %12.1f %14s %12s %10.1f %8.1f %8.1f\n", v, r, c, rr, cr, rss / 1024, u, k}'
done
