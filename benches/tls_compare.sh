#!/usr/bin/env bash
# TLS on both legs, ringrelay against Postfix 3.7, in one run (issue 14's performance part):
#
#   loadgen send [--starttls] -> relay (spool / queue on the real disk) -> loadgen sink [TLS]
#
# 1. Relays, interleaved rep by rep (ringrelay's three variants rotate their order):
#    pf-tls       a private Postfix with smtpd_tls_security_level = may (cert/key below) and
#                 smtp_tls_security_level = may, the sink offering STARTTLS
#    pf-plain     the same Postfix with TLS off on both legs (reference; PF_PLAIN=0 skips)
#    rr-tls       ringrelay with [tls] cert_file/key_file and [delivery] tls = "may"
#    rr-plain     ringrelay with no [tls] and delivery.tls = "none": no TLS anywhere
#    rr-plain-tlsconf  ringrelay configured as rr-tls, but a plaintext client and a sink
#                 that offers no STARTTLS (A/B against rr-plain: TLS merely configured)
#    Per run: delivered msgs/s (send start -> `loadgen sink --expect N` has all N), the
#    relay's CPU per delivered message (its cgroup: every process it forks, however
#    reaped), its peak RSS and PSS (sum over its processes, sampled every 0.5 s), and the
#    TLS sessions each leg saw (loadgen's JSON on both sides).
# 2. Handshake cost against ringrelay (TLS configured, relaying to a TLS sink):
#    - benches/tls_probe.py: HS_N connections one after another, plain / full handshake /
#      resumed (the previous connection's ticket offered; the client reports whether the
#      server resumed), with ringrelay's CPU per connection (cgroup, ns resolution).
#    - loadgen sequentially: HS_COLD separate `loadgen send --starttls --connections 1
#      --messages 1` (a new process: an empty session cache, so a full handshake each),
#      against one `--connections 1 --new-connection-per-message` run of HS_WARM messages
#      (one ClientConfig and its in-memory cache: later connections may resume).
#    - loadgen --starttls --new-connection-per-message --connections CONNS, against the same
#      without --starttls: msgs/s, handshake p50/p99, relay CPU per message.
#    - outbound: ringrelay relaying to tls_probe.py's sink, which closes the connection
#      after every message, so each delivery opens a new TLS connection; the probe counts
#      the handshakes that resumed (ringrelay's log line does not say).
# 3. Idle connections (the method of benches/idle_connections.sh: `serve --sink`, a fresh
#    server per run, its VmRSS with every connection open and idle), per I/O driver:
#    greet        benches/idle_connections.py, no [tls] (the existing figure's method)
#    ehlo         benches/idle_tls.py plain: greeting and EHLO, [tls] configured
#    starttls     benches/idle_tls.py starttls: greeting, EHLO, STARTTLS, handshake, EHLO
#
# Everything on 127.0.0.1; every process it starts is stopped by PID (Postfix with
# `postfix -c DIR stop`, then its cgroup is emptied); its temporary directories are removed.
# Nothing under /etc is touched. The load tool is loadgen, not smtp-source: smtp-source
# has no STARTTLS. The shared harness's helpers (../shared/bench/lib.sh, lib_relay.sh)
# do the counting: cgroup CPU, the RSS/PSS sampler, medians.
#
# usage: benches/tls_compare.sh [REPS] [MSGS_POSTFIX] [MSGS_RINGRELAY]   (default 3 5000 30000)
#   env CONNS (50), SIZE (1024), PF_PLAIN (1), HS_N (500), HS_ROUNDS (2), HS_COLD (100),
#       HS_WARM (200), NEWCONN_MSGS (5000), IDLE_N (10000), IDLE_IO ("uring epoll"),
#       IDLE_REPS (1), KEY ("rsa:2048", or "ec" for P-256), SKIP_BUILD=1, QBASE (/var/tmp),
#       RINGRELAY, LOADGEN (binaries; default target/release/), SECTIONS ("1 2 3": which
#       parts run), PF (1; 0 leaves Postfix out of part 1: e.g.
#       `PF=0 SECTIONS=1 benches/tls_compare.sh 7` for more reps of ringrelay's A/B alone),
#       ports RR_PORT (2650) SINK_PORT (2651) IDLE_PORT (2652) PF_PORT (2654),
#       DRAIN_TIMEOUT (300 s)
# Needs root (cgroups, a private Postfix), postfix 3.7, openssl, python3, jq. Takes about
# 6.5 minutes on 2 vCPUs at the defaults. Postfix keeps its defaults beside TLS: with
# smtp_tls_connection_reuse = no (the default) its client opens a new TLS connection for
# every delivery, which the sink's session count shows.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
. "$SHARED/lib.sh"
. "$ROOT/benches/lib.sh"
need postfix postconf openssl python3 jq
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

REPS=${1:-3}
MSGS_PF=${2:-5000}
MSGS_RR=${3:-30000}
CONNS=${CONNS:-50}
SIZE=${SIZE:-1024}
PF=${PF:-1}
PF_PLAIN=${PF_PLAIN:-1}
[ "$PF" = 1 ] || PF_PLAIN=0
SECTIONS=${SECTIONS:-1 2 3}
on() { [[ " $SECTIONS " == *" $1 "* ]]; }
HS_N=${HS_N:-500}
HS_ROUNDS=${HS_ROUNDS:-2}
HS_COLD=${HS_COLD:-100}
HS_WARM=${HS_WARM:-200}
NEWCONN_MSGS=${NEWCONN_MSGS:-5000}
IDLE_N=${IDLE_N:-10000}
IDLE_IO=${IDLE_IO:-uring epoll}
IDLE_REPS=${IDLE_REPS:-1}
KEY=${KEY:-rsa:2048}
QBASE=${QBASE:-/var/tmp}
RR_PORT=${RR_PORT:-2650}
SINK_PORT=${SINK_PORT:-2651}
IDLE_PORT=${IDLE_PORT:-2652}
PF_PORT=${PF_PORT:-2654}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-300}

cd "$ROOT"
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p ringrelay -p loadgen
RR=${RINGRELAY:-$ROOT/target/release/ringrelay}
LG=${LOADGEN:-$ROOT/target/release/loadgen}

# The shared relay harness: cgroup CPU (cg_new, cg_join, cg_cpu_ticks, cg_remove), the
# RSS/PSS sampler (relay_sampler, over relay_pids). It makes a work directory of its own,
# which this script does not use.
. "$SHARED/lib_relay.sh"
rmdir "$WORK"
relay_pids() { cg_pids; }

WORK=$(mktemp -d "$QBASE/tlscmp.XXXXXX")
chmod 755 "$WORK"   # Postfix's processes (user postfix) reach their queue through it
PF_BASE="$WORK/pf"
PF_CONF="$PF_BASE/etc"
SINK_PID=""
RELAY_PID=""   # ringrelay's PID, or "postfix"
QDIR=""
SAMPLER_PID=""
IDLE_PID=""
PROBE_PID=""

wait_free() { # PORT: an io_uring listener is released asynchronously
    for _ in $(seq 100); do port_free "$1" && return 0; sleep 0.1; done
    echo "127.0.0.1:$1 still busy" >&2; exit 1
}
relay_stop_any() {
    [ -n "$RELAY_PID" ] || return 0
    if [ "$RELAY_PID" = postfix ]; then
        local m
        m=$(head -1 "$PF_BASE/spool/pid/master.pid" 2>/dev/null | tr -d ' ' || true)
        postfix -c "$PF_CONF" stop >/dev/null 2>&1 || true
        if [ -n "$m" ]; then
            for _ in $(seq 100); do kill -0 "$m" 2>/dev/null || break; sleep 0.1; done
        fi
    else
        stop_pid "$RELAY_PID"
    fi
    RELAY_PID=""
    cg_remove
    [ -n "$QDIR" ] && rm -rf "$QDIR"
    QDIR=""
}
cleanup() {
    set +e
    [ -n "$SAMPLER_PID" ] && stop_pid "$SAMPLER_PID"
    [ -n "$PROBE_PID" ] && stop_pid "$PROBE_PID"
    [ -n "$IDLE_PID" ] && stop_pid "$IDLE_PID"
    relay_stop_any
    [ -n "$SINK_PID" ] && stop_pid "$SINK_PID"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for p in "$RR_PORT" "$SINK_PORT" "$IDLE_PORT" "$PF_PORT"; do
    port_free "$p" || { echo "127.0.0.1:$p is busy" >&2; exit 1; }
done
ulimit -n "$(ulimit -Hn)"

# ---------------------------------------------------------------- certificate, configs
CERT="$WORK/cert.pem"
KEYF="$WORK/key.pem"
if [ "$KEY" = ec ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=relay.test -addext "subjectAltName=DNS:relay.test,IP:127.0.0.1" \
        -keyout "$KEYF" -out "$CERT" 2>/dev/null
else
    openssl req -x509 -newkey "$KEY" -nodes -days 2 \
        -subj /CN=relay.test -addext "subjectAltName=DNS:relay.test,IP:127.0.0.1" \
        -keyout "$KEYF" -out "$CERT" 2>/dev/null
fi
chmod 644 "$CERT" "$KEYF"   # a throwaway key; Postfix's smtpd must read it

cat >"$WORK/rr-tls.toml" <<TOML
[tls]
cert_file = "$CERT"
key_file = "$KEYF"
[delivery]
tls = "may"
TOML
cat >"$WORK/rr-plain.toml" <<TOML
[delivery]
tls = "none"
TOML
cat >"$WORK/idle-tls.toml" <<TOML
[limits]
max_connections = $((IDLE_N * 2))
max_connections_per_ip = $((IDLE_N * 2))
[tls]
cert_file = "$CERT"
key_file = "$KEYF"
TOML
cat >"$WORK/idle-plain.toml" <<TOML
[limits]
max_connections = $((IDLE_N * 2))
max_connections_per_ip = $((IDLE_N * 2))
TOML
"$RR" check-config --config "$WORK/rr-tls.toml" >/dev/null

# Postfix as ../shared/bench/postfix_relay.sh sets it up (no chroot, own queue, relayhost to
# the sink, fsynced queue), plus TLS on both legs for `tls` (and tlsmgr, which TLS needs).
pf_write_config() { # tls|plain
    local level=none
    [ "$1" = tls ] && level=may
    rm -rf "$PF_BASE"
    mkdir -p "$PF_CONF" "$PF_BASE/spool" "$PF_BASE/data"
    chown postfix "$PF_BASE/data"
    cat >"$PF_CONF/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF_BASE/spool
data_directory = $PF_BASE/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = $PF_BASE/maillog
myhostname = relay.anchors.invalid
mydomain = anchors.invalid
myorigin = \$myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions =
smtpd_peername_lookup = no
smtpd_client_connection_rate_limit = 0
relayhost = [127.0.0.1]:$SINK_PORT
smtp_dns_support_level = disabled
smtp_host_lookup = native
default_process_limit = 200
default_destination_concurrency_limit = 50
smtp_destination_concurrency_limit = 50
initial_destination_concurrency = 5
smtp_connection_cache_on_demand = yes
notify_classes =
biff = no
smtpd_tls_security_level = $level
smtpd_tls_cert_file = $CERT
smtpd_tls_key_file = $KEYF
smtpd_tls_loglevel = 1
smtp_tls_security_level = $level
smtp_tls_loglevel = 1
EOF
    cat >"$PF_CONF/master.cf" <<EOF
127.0.0.1:$PF_PORT inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
    postfix -c "$PF_CONF" check
}

pf_start() { # tls|plain
    pf_write_config "$1"
    cg_new
    RELAY_PID=postfix
    (cg_join; exec postfix -c "$PF_CONF" start) >/dev/null 2>&1 ||
        { echo "postfix start failed" >&2; tail "$PF_BASE/maillog" >&2; exit 1; }
    wait_port 127.0.0.1 "$PF_PORT" 200 || { echo "postfix did not listen" >&2; exit 1; }
}

rr_start() { # CONFIG_FILE [ROUTE_PORT]
    QDIR=$(mktemp -d "$QBASE/tlscmp.q.XXXXXX")
    cg_new
    (cg_join; exec "$RR" serve --config "$1" --listen "127.0.0.1:$RR_PORT" --spool "$QDIR" \
        --route "example.test=127.0.0.1:${2:-$SINK_PORT}") >"$WORK/rr.log" 2>&1 &
    RELAY_PID=$!
    wait_port 127.0.0.1 "$RR_PORT" 200 || { cat "$WORK/rr.log" >&2; exit 1; }
}

sink_start() { # tls|plain EXPECT(0: none)
    local a=(sink --listen "127.0.0.1:$SINK_PORT" --json "$WORK/sink.json")
    [ "$1" = tls ] && a+=(--tls-cert "$CERT" --tls-key "$KEYF")
    [ "$2" != 0 ] && a+=(--expect "$2" --timeout "$DRAIN_TIMEOUT")
    rm -f "$WORK/sink.json"
    "$LG" "${a[@]}" >"$WORK/sink.out" 2>&1 &
    SINK_PID=$!
    wait_port 127.0.0.1 "$SINK_PORT" || { cat "$WORK/sink.out" >&2; exit 1; }
}
sink_stop() { stop_pid "$SINK_PID"; SINK_PID=""; wait_free "$SINK_PORT"; }

cpu_us() { # TICKS0 TICKS1 COUNT -> µs per item
    awk -v a="$1" -v b="$2" -v n="$3" -v hz="$CLK_TCK" 'BEGIN {printf "%.1f", (b - a) / hz * 1e6 / n}'
}
j() { jq -r "$1" "$2" 2>/dev/null || echo "?"; }

# ---------------------------------------------------------------- 1. relays
# run VARIANT: one run, one line on stdout and in $WORK/runs
run() {
    local v=$1 msgs target tls_in sink_tls
    case "$v" in
    pf-tls) msgs=$MSGS_PF; target=$PF_PORT; tls_in=1; sink_tls=tls ;;
    pf-plain) msgs=$MSGS_PF; target=$PF_PORT; tls_in=0; sink_tls=plain ;;
    rr-tls) msgs=$MSGS_RR; target=$RR_PORT; tls_in=1; sink_tls=tls ;;
    rr-plain) msgs=$MSGS_RR; target=$RR_PORT; tls_in=0; sink_tls=plain ;;
    rr-plain-tlsconf) msgs=$MSGS_RR; target=$RR_PORT; tls_in=0; sink_tls=plain ;;
    esac
    sink_start "$sink_tls" "$msgs"
    case "$v" in
    pf-tls) pf_start tls ;;
    pf-plain) pf_start plain ;;
    rr-tls | rr-plain-tlsconf) rr_start "$WORK/rr-tls.toml" ;;
    rr-plain) rr_start "$WORK/rr-plain.toml" ;;
    esac
    sleep 1
    relay_sampler >"$WORK/mem" &
    SAMPLER_PID=$!
    local send=("$LG" send --no-progress --target "127.0.0.1:$target" --connections "$CONNS"
        --messages "$msgs" --size "$SIZE" --json "$WORK/send.json")
    [ "$tls_in" = 1 ] && send+=(--starttls)
    local c0 c1 t0 t1 t2 rc=0
    c0=$(cg_cpu_ticks)
    stat_snap "$WORK/stat0"
    t0=$(now)
    "${send[@]}" >"$WORK/send.out" 2>&1 || { echo "WARN $v: loadgen send failed" >&2; tail -5 "$WORK/send.out" >&2; }
    t1=$(now)
    wait "$SINK_PID" || rc=$?
    t2=$(now)
    c1=$(cg_cpu_ticks)
    stat_snap "$WORK/stat1"
    SINK_PID=""
    stop_pid "$SAMPLER_PID"; SAMPLER_PID=""
    local out_tls="-"
    if [ "$RELAY_PID" = postfix ]; then
        out_tls=$(grep -c 'TLS connection established to' "$PF_BASE/maillog" || true)
    else
        out_tls=$(grep -c 'TLS connection established to' "$WORK/rr.log" || true)
    fi
    relay_stop_any
    wait_free "$SINK_PORT"; wait_free "$target"
    local got busy prss ppss
    got=$(j '.messages.unique' "$WORK/sink.json")
    [ "$rc" = 0 ] && [ "$got" = "$msgs" ] || echo "WARN $v: sink exit $rc, saw $got of $msgs" >&2
    read -r busy _ <<<"$(stat_delta "$WORK/stat0" "$WORK/stat1")"
    read -r prss ppss <<<"$(awk '$1 > r {r = $1} $2 > s {s = $2} END {print r + 0, s + 0}' "$WORK/mem")"
    # variant msgs accepted/s delivered/s cpu_us/msg peakRSS_MB peakPSS_MB busy% tls_in tls_out(sink) hs_in_p50 hs_out_p50 out_tls_log
    printf "%-17s %6s %9.0f %9.0f %9s %7.1f %7.1f %5s %7s %7s %9s %9s %6s\n" "$v" "$msgs" \
        "$(j '.throughput.accepted_per_s' "$WORK/send.json")" \
        "$(awk -v m="$got" -v a="$t0" -v b="$t2" 'BEGIN {print m / (b - a)}')" \
        "$(cpu_us "$c0" "$c1" "$msgs")" \
        "$(awk -v k="$prss" 'BEGIN {print k / 1024}')" "$(awk -v k="$ppss" 'BEGIN {print k / 1024}')" \
        "$busy" "$(j '.tls.sessions // "-"' "$WORK/send.json")" "$(j '.tls.sessions // "-"' "$WORK/sink.json")" \
        "$(j '.tls.handshake_us.p50 // "-"' "$WORK/send.json")" "$(j '.tls.handshake_us.p50 // "-"' "$WORK/sink.json")" \
        "$out_tls" | tee -a "$WORK/runs"
}

echo "# tls_compare on $(hostname) ($(nproc) vCPUs), $(date -u +%Y-%m-%dT%H:%M:%SZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# checkout $(git rev-parse --short HEAD) ($(git status --porcelain -- src loadgen Cargo.toml Cargo.lock | wc -l) files in src/, loadgen/ or Cargo.* differ from it); $RR built $(date -u -r "$RR" +%H:%M:%SZ), sha256 $(sha256sum "$RR" | cut -c1-12)"
echo "# postfix $(postconf -d -h mail_version), $(openssl version | cut -d' ' -f1-2), key $KEY, ${SIZE} B messages, $CONNS connections, spool/queue under $QBASE ($(df --output=fstype "$QBASE" | tail -1))"
if on 1; then
echo
echo "## 1. relays, $REPS reps interleaved: Postfix $MSGS_PF msgs per run, ringrelay $MSGS_RR"
echo "# delivered/s: msgs / (send start -> sink has all); cpu: the relay's cgroup; RSS/PSS: peak of its processes' sum"
echo "# tls_in/tls_out: TLS sessions loadgen send / loadgen sink counted; hs p50 in µs; out_log: the relay's 'TLS connection established to' lines"
printf "%-17s %6s %9s %9s %9s %7s %7s %5s %7s %7s %9s %9s %6s\n" variant msgs "accept/s" "deliv/s" "cpu_us/m" \
    "RSS_MB" "PSS_MB" "busy%" tls_in tls_out hs_in_p50 hs_out_p50 out_log
: >"$WORK/runs"
RRV=(rr-tls rr-plain rr-plain-tlsconf)
for rep in $(seq 1 "$REPS"); do
    [ "$PF" = 1 ] && run pf-tls
    # ringrelay's variants in a rotated order each rep, so none always runs first
    for k in 0 1 2; do run "${RRV[$(((rep - 1 + k) % 3))]}"; done
    [ "$PF_PLAIN" = 1 ] && run pf-plain
done

med() { awk -v v="$1" -v c="$2" '$1 == v {print $c}' "$WORK/runs" | median; }
echo
echo "# medians of $REPS runs"
printf "%-17s %9s %11s %9s %9s %13s %13s %14s\n" variant "deliv/s" "cpu_us/msg" "PSS_MB" "RSS_MB" \
    "deliv/s_ratio" "cpu_ratio" "PSS_ratio"
row() { # VARIANT BASE (ratios: VARIANT / BASE)
    printf "%-17s %9.0f %11.1f %9.1f %9.1f" "$1" "$(med "$1" 4)" "$(med "$1" 5)" "$(med "$1" 7)" "$(med "$1" 6)"
    if [ -n "${2:-}" ]; then
        awk -v a="$(med "$1" 4)" -v b="$(med "$2" 4)" -v c="$(med "$1" 5)" -v d="$(med "$2" 5)" \
            -v e="$(med "$1" 7)" -v f="$(med "$2" 7)" -v base="$2" \
            'BEGIN {printf " %12.2fx %12.3fx %13.3fx  (÷ %s)\n", a / b, c / d, e / f, base}'
    else
        echo
    fi
}
[ "$PF" = 1 ] && row pf-tls
[ "$PF_PLAIN" = 1 ] && row pf-plain pf-tls
[ "$PF" = 1 ] && row rr-tls pf-tls
row rr-plain
row rr-plain-tlsconf rr-plain
[ "$PF_PLAIN" = 1 ] && row rr-plain pf-plain
row rr-tls rr-plain
echo "# targets (issue 14): rr-tls ÷ pf-tls delivered/s >= 10x, cpu <= 0.1x; rr-plain-tlsconf ÷ rr-plain: not slower"
echo "# per-run A/B pairs (same rep), delivered/s and cpu: rr-plain-tlsconf ÷ rr-plain"
paste <(awk '$1 == "rr-plain" {print $4, $5}' "$WORK/runs") <(awk '$1 == "rr-plain-tlsconf" {print $4, $5}' "$WORK/runs") |
    awk '{printf "  rep %d: %.3fx msgs/s, %.3fx cpu\n", NR, $3 / $1, $4 / $2}'
fi

# ---------------------------------------------------------------- 2. handshakes
if on 2; then
echo
echo "## 2. handshake cost against ringrelay (rr-tls config, delivering to a TLS sink)"
sink_start tls 0
rr_start "$WORK/rr-tls.toml"
sleep 1
echo "# tls_probe.py: $HS_N connections one after another per line; cpu = ringrelay's per connection"
echo "# (plain: greeting, EHLO, QUIT; full/resumed add STARTTLS, the handshake and EHLO); hs = client-side handshake time"
for round in $(seq 1 "$HS_ROUNDS"); do
    for mode in plain full resumed; do
        c0=$(cg_cpu_ticks)
        line=$(python3 "$ROOT/benches/tls_probe.py" connect "$RR_PORT" "$HS_N" "$mode")
        c1=$(cg_cpu_ticks)
        cpu=$(cpu_us "$c0" "$c1" "$HS_N")
        echo "round=$round $line relay_cpu_us_per_conn=$cpu" | tee -a "$WORK/hs"
    done
done
for mode in plain full resumed; do
    eval "hs_$mode=$(grep " mode=$mode " "$WORK/hs" | sed 's/.*relay_cpu_us_per_conn=//' | median)"
done
awk -v p="$hs_plain" -v f="$hs_full" -v r="$hs_resumed" 'BEGIN {
    printf "# medians, relay CPU per connection: plain %.0f µs, full TLS %.0f µs, resumed %.0f µs\n", p, f, r
    printf "# so a handshake costs ringrelay %.0f µs in full and %.0f µs resumed (%.2fx)\n", f - p, r - p, (r - p) / (f - p)}'

echo "# loadgen, one connection at a time: $HS_COLD separate processes (empty session cache each) against one process with --new-connection-per-message"
: >"$WORK/cold"
for i in $(seq 1 "$HS_COLD"); do
    "$LG" send --no-progress --starttls --target "127.0.0.1:$RR_PORT" --connections 1 --messages 1 \
        --size "$SIZE" --json "$WORK/c.json" >/dev/null 2>&1 || true
    j '.tls.handshake_us.p50' "$WORK/c.json" >>"$WORK/cold"
done
"$LG" send --no-progress --starttls --new-connection-per-message --target "127.0.0.1:$RR_PORT" \
    --connections 1 --messages "$HS_WARM" --size "$SIZE" --json "$WORK/w.json" >/dev/null 2>&1 || true
sort -g "$WORK/cold" | awk '{a[NR] = $1} END {i = int(NR * 0.99) + 1; if (i > NR) i = NR
    printf "loadgen cold (new process each): n=%d handshake_us p50=%d p99=%d min=%d max=%d\n", NR, a[int(NR * 0.5) + 1], a[i], a[1], a[NR]}'
echo "loadgen --new-connection-per-message --connections 1: n=$(j '.tls.sessions' "$WORK/w.json") handshake_us p50=$(j '.tls.handshake_us.p50' "$WORK/w.json") p99=$(j '.tls.handshake_us.p99' "$WORK/w.json") min=$(j '.tls.handshake_us.min' "$WORK/w.json") max=$(j '.tls.handshake_us.max' "$WORK/w.json")"
relay_stop_any
sink_stop
wait_free "$RR_PORT"

echo "# loadgen --new-connection-per-message --connections $CONNS, $NEWCONN_MSGS msgs per run, TLS and plain alternating (relay: rr-tls config)"
printf "%-10s %5s %9s %9s %10s %9s %9s %9s\n" client round "accept/s" "deliv/s" "cpu_us/m" sessions hs_p50 hs_p99
for round in $(seq 1 "$HS_ROUNDS"); do
    for client in tls plain; do
        sink_start tls "$NEWCONN_MSGS"
        rr_start "$WORK/rr-tls.toml"
        sleep 1
        send=("$LG" send --no-progress --new-connection-per-message --target "127.0.0.1:$RR_PORT"
            --connections "$CONNS" --messages "$NEWCONN_MSGS" --size "$SIZE" --json "$WORK/send.json")
        [ "$client" = tls ] && send+=(--starttls)
        c0=$(cg_cpu_ticks); t0=$(now)
        "${send[@]}" >"$WORK/send.out" 2>&1 || { echo "WARN newconn $client: send failed" >&2; tail -3 "$WORK/send.out" >&2; }
        wait "$SINK_PID" || echo "WARN newconn $client: sink did not get all" >&2
        SINK_PID=""
        t2=$(now); c1=$(cg_cpu_ticks)
        relay_stop_any
        wait_free "$SINK_PORT"; wait_free "$RR_PORT"
        printf "%-10s %5s %9.0f %9.0f %10s %9s %9s %9s\n" "$client" "$round" \
            "$(j '.throughput.accepted_per_s' "$WORK/send.json")" \
            "$(awk -v m="$(j '.messages.unique' "$WORK/sink.json")" -v a="$t0" -v b="$t2" 'BEGIN {print m / (b - a)}')" \
            "$(cpu_us "$c0" "$c1" "$NEWCONN_MSGS")" "$(j '.tls.sessions // "-"' "$WORK/send.json")" \
            "$(j '.tls.handshake_us.p50 // "-"' "$WORK/send.json")" "$(j '.tls.handshake_us.p99 // "-"' "$WORK/send.json")"
    done
done

echo "# outbound: ringrelay -> tls_probe.py sink that closes after every message (a new TLS connection per delivery)"
python3 "$ROOT/benches/tls_probe.py" sink "$SINK_PORT" "$CERT" "$KEYF" 40 30 >"$WORK/probe.out" 2>&1 &
PROBE_PID=$!
for _ in $(seq 50); do grep -q listening "$WORK/probe.out" && break; sleep 0.1; done
grep -q listening "$WORK/probe.out" || { cat "$WORK/probe.out" >&2; exit 1; }
rr_start "$WORK/rr-tls.toml"
sleep 1
"$LG" send --no-progress --target "127.0.0.1:$RR_PORT" --connections 1 --messages 40 --rate 10 \
    --size "$SIZE" >/dev/null 2>&1 || echo "WARN outbound probe: send failed" >&2
wait "$PROBE_PID" || true
PROBE_PID=""
grep 'probe-sink' "$WORK/probe.out" || cat "$WORK/probe.out"
echo "ringrelay logged $(grep -c 'TLS connection established to' "$WORK/rr.log" || true) 'TLS connection established' lines; resumption is not in them:"
grep -m1 'TLS connection established to' "$WORK/rr.log" | sed 's/^[^ ]* *//' || true
relay_stop_any
wait_free "$SINK_PORT"; wait_free "$RR_PORT"
fi

# ---------------------------------------------------------------- 3. idle connections
on 3 || exit 0
echo
echo "## 3. $IDLE_N idle connections, \`ringrelay serve --sink\`, a fresh server per run"
echo "# greet: idle_connections.py (greeting only, no [tls]); ehlo: idle_tls.py plain ([tls] configured); starttls: idle_tls.py starttls"
printf "%-6s %-9s %4s %10s %10s %10s %9s %s\n" io client rep empty_MiB idle_MiB HWM_MiB KiB_conn detail
: >"$WORK/idle"
for rep in $(seq 1 "$IDLE_REPS"); do
    for io in $IDLE_IO; do
        for client in greet ehlo starttls; do
            conf="$WORK/idle-tls.toml"
            [ "$client" = greet ] && conf="$WORK/idle-plain.toml"
            "$RR" serve --sink --io "$io" --config "$conf" --listen "127.0.0.1:$IDLE_PORT" 2>"$WORK/idle.out" &
            IDLE_PID=$!
            wait_port 127.0.0.1 "$IDLE_PORT" || { cat "$WORK/idle.out" >&2; exit 1; }
            sleep 0.5
            empty=$(awk '/^VmRSS/ {print $2}' "/proc/$IDLE_PID/status")
            case "$client" in
            greet) line=$(python3 "$ROOT/benches/idle_connections.py" "$IDLE_N" "$IDLE_PORT" "$IDLE_PID") ;;
            ehlo) line=$(python3 "$ROOT/benches/idle_tls.py" "$IDLE_N" "$IDLE_PORT" "$IDLE_PID" plain) ;;
            starttls) line=$(python3 "$ROOT/benches/idle_tls.py" "$IDLE_N" "$IDLE_PORT" "$IDLE_PID" starttls) ;;
            esac
            stop_pid "$IDLE_PID"; IDLE_PID=""
            wait_free "$IDLE_PORT"
            rss=$(sed -n 's/.*VmRSS:\([0-9]*\).*/\1/p' <<<"$line")
            hwm=$(sed -n 's/.*VmHWM:\([0-9]*\).*/\1/p' <<<"$line")
            echo "$io $client $rss $empty" >>"$WORK/idle"
            awk -v io="$io" -v c="$client" -v r="$rep" -v e="$empty" -v s="$rss" -v h="$hwm" -v n="$IDLE_N" -v d="$line" \
                'BEGIN {printf "%-6s %-9s %4s %10.1f %10.1f %10.1f %9.2f %s\n", io, c, r, e / 1024, s / 1024, h / 1024, (s - e) / n, d}'
            sleep 1
        done
    done
done
echo "# medians: KiB per idle connection, and what STARTTLS adds to one"
for io in $IDLE_IO; do
    for client in greet ehlo starttls; do
        eval "k_$client=$(awk -v io="$io" -v c="$client" -v n="$IDLE_N" '$1 == io && $2 == c {print ($3 - $4) / n}' "$WORK/idle" | median)"
        eval "m_$client=$(awk -v io="$io" -v c="$client" '$1 == io && $2 == c {print $3 / 1024}' "$WORK/idle" | median)"
    done
    # shellcheck disable=SC2154
    awk -v io="$io" -v g="$k_greet" -v e="$k_ehlo" -v s="$k_starttls" -v mg="$m_greet" -v me="$m_ehlo" -v ms="$m_starttls" -v n="$IDLE_N" \
        'BEGIN {printf "%-6s greet %.2f KiB/conn (%.1f MiB), ehlo %.2f KiB/conn (%.1f MiB), starttls %.2f KiB/conn (%.1f MiB): TLS adds %.2f KiB per idle connection (%.1fx ehlo)\n",
            io, g, mg, e, me, s, ms, s - e, s / e}'
done
