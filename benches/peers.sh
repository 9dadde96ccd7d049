#!/usr/bin/env bash
# Every relay on this machine side by side, in one run (issue 19): ringrelay (release build),
# Postfix 3.7, Exim 4.96, OpenSMTPD 6.8 and Haraka 3.3, on the shared harness's method
# (../shared/bench: a fresh private instance per run with an empty queue on the real disk,
# delivered msgs/s counted at the sink, the relay's CPU from a cgroup holding everything it
# forks, its PSS sampled every 0.5 s), at 50 sessions, for four cases:
#   plain   1 KiB, 1 recipient:     smtp-source -l 1024 -> relay -> smtp-sink
#   big     100 KiB, 1 recipient:   smtp-source -l 102400 -> relay -> smtp-sink
#   rcpt10  1 KiB, 10 recipients on 3 domains (all routed to the sink):
#                                   loadgen send --rcpts 10 --domain a,b,c -> relay -> loadgen sink
#   tls     1 KiB, TLS on both legs: loadgen send --starttls -> relay (STARTTLS offered, and
#                                   its client's TLS on) -> loadgen sink offering STARTTLS
# plus, in the same run, the rig's ceiling (smtp-source -> smtp-sink direct), a sweep of
# case plain over session counts (closed loop: the offered load is the number of sessions)
# for every peer and the ceiling, the front end alone (`serve --sink` against smtp-sink,
# benches/sink_compare.sh, 5 interleaved runs), and, for every goal missed, a `perf record -g`
# profile of ringrelay during one more run of that case.
# Interleaving: within each rep every case runs every peer back to back, the peers' order
# rotated rep by rep, so machine noise hits all of them alike.
# smtp-source and smtp-sink have neither STARTTLS nor several recipient domains (smtp-sink
# counts transactions, and a relay may split a message by domain), so rcpt10 and tls use
# loadgen on both ends: `loadgen sink --expect N` counts unique messages, and its JSON gives
# the recipients it accepted and the TLS sessions on each leg, which the rows check.
#
# Peers come from the shared scripts, not copies: each one's write_config (and Exim's,
# OpenSMTPD's and Haraka's start and stop) is read out of ../shared/bench/*_relay.sh at run
# time (benches/lib.sh shared_fn), with their settings and fixed ports (Postfix 25, Haraka
# 2526, ringrelay 2527, Exim 2528, OpenSMTPD 2529, the sink 2525). For case tls this script
# then switches each peer's TLS on in the generated config, with a self-signed certificate
# made under its temp dir. Every process is stopped by PID (Postfix by `postfix stop`, then
# its cgroup is emptied), the temp dirs are removed, nothing under /etc is touched, loopback
# only, and every wait is bounded (DRAIN_TIMEOUT). A peer that cannot run a case gets a row
# saying so, and why (OpenSMTPD 6.8 with TLS: see `cannot`). About 22 minutes at the defaults
# on 2 vCPUs; QUICK=1 about 4.
#
# usage: benches/peers.sh [REPS]          (default 3; QUICK=1: 1 rep, small counts, no profile)
#   Output: benches/results/peers_DATE.txt (everything printed), peers_DATE.csv (medians and
#   ratios) and benches/results/peers.svg (rate against sessions); QUICK=1 writes to /tmp
#   unless OUT is set. OUT=PREFIX sets the .txt/.csv path prefix, SVG the plot's path.
#   env PEERS ("ringrelay postfix exim opensmtpd haraka"), CASES ("plain big rcpt10 tls"),
#       SWEEP ("1 5 20": session counts beside 50), SESS (50),
#       message counts per run: N_RR_PLAIN (30000) N_PLAIN (2000) N_RR_BIG (5000) N_BIG (600)
#       N_RR_RCPT (10000) N_RCPT (800) N_RR_TLS (20000) N_TLS (800) N_RR_SWEEP (8000)
#       N_SWEEP (400) N_CEIL (100000) N_CEIL_SWEEP (30000),
#       SINK_RUNS (5) SINK_MSGS (40000): the sink comparison (0 runs: skip),
#       PROFILE (1: profile each missed goal's case), SKIP_BUILD=1, RINGRELAY, LOADGEN,
#       DRAIN_TIMEOUT (300 s per run), PLOT_ONLY=CSV (PLOT_REPS, PLOT_COMMIT): only redraw SVG
#       from that CSV
# Needs root (cgroups, private instances), postfix (smtp-source, smtp-sink), node/npm, apt-get
# download (Exim, OpenSMTPD: see ../shared/bench/README.md), openssl, jq, perf, gnuplot.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
SHARED=$(cd "$SHARED" && pwd)
. "$SHARED/lib.sh"
. "$SHARED/lib_unpacked.sh"
. "$ROOT/benches/lib.sh"
need smtp-source smtp-sink postfix postconf openssl jq node npm unshare dpkg-deb
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    REPS=${1:-1}
    : "${N_RR_PLAIN:=3000}" "${N_PLAIN:=200}" "${N_RR_BIG:=600}" "${N_BIG:=100}"
    : "${N_RR_RCPT:=1500}" "${N_RCPT:=150}" "${N_RR_TLS:=2000}" "${N_TLS:=150}"
    : "${N_RR_SWEEP:=1000}" "${N_SWEEP:=100}" "${N_CEIL:=20000}" "${N_CEIL_SWEEP:=5000}"
    : "${SWEEP=1 20}" "${SINK_RUNS:=2}" "${SINK_MSGS:=10000}" "${PROFILE:=0}"
    OUT=${OUT:-/tmp/peers_quick}
    SVG=${SVG:-/tmp/peers_quick.svg}
else
    REPS=${1:-3}
fi
N_RR_PLAIN=${N_RR_PLAIN:-30000}; N_PLAIN=${N_PLAIN:-2000}
N_RR_BIG=${N_RR_BIG:-5000}; N_BIG=${N_BIG:-600}
N_RR_RCPT=${N_RR_RCPT:-10000}; N_RCPT=${N_RCPT:-800}
N_RR_TLS=${N_RR_TLS:-20000}; N_TLS=${N_TLS:-800}
N_RR_SWEEP=${N_RR_SWEEP:-8000}; N_SWEEP=${N_SWEEP:-400}
N_CEIL=${N_CEIL:-100000}; N_CEIL_SWEEP=${N_CEIL_SWEEP:-30000}
SWEEP=${SWEEP-1 5 20}
SESS=${SESS:-50}
SINK_RUNS=${SINK_RUNS:-5}
SINK_MSGS=${SINK_MSGS:-40000}
PROFILE=${PROFILE:-1}
PEERS=${PEERS:-ringrelay postfix exim opensmtpd haraka}
CASES=${CASES:-plain big rcpt10 tls}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-300}
OUT=${OUT:-$ROOT/benches/results/peers_$(date -u +%F)}
SVG=${SVG:-$ROOT/benches/results/peers.svg}

# the shared scripts' fixed ports
SINK_PORT=2525
PF_PORT=25
HARAKA_PORT=2526
RR_PORT=2527
EXIM_PORT=2528
OS_PORT=2529
# the shared scripts' settings (their defaults)
CONC=50
RMP=4; QRUN=5; QINT=1m; DROP_PRIV=true
SYNC=0; MTA_LIMITS=tuned
NODES=1; LOGLEVEL=notice
SINK_USER=nobody

# plot_svg CSV SVG REPS COMMIT: delivered/s against sessions, case plain, every peer and the
# ceiling, from the CSV's medians (gnuplot; nothing without it)
plot_svg() {
    command -v gnuplot >/dev/null || { echo "# no gnuplot: no plot"; return 0; }
    local csv=$1 svg=$2 dat plot="" p t xt
    dat=$(mktemp /tmp/peers.plot.XXXXXX)
    awk -F, 'NR > 1 && $1 == "plain" && $5 != "nan" {print $3, $2, $5}' "$csv" | sort -k1,1 -k2,2n >"$dat"
    xt=$(awk '{print $2}' "$dat" | sort -n | uniq | awk '{printf "%s\"%s\" %s", (NR > 1 ? ", " : ""), $1, $1}')
    for p in ceiling ringrelay postfix exim opensmtpd haraka; do
        grep -q "^$p " "$dat" || continue
        case $p in
        ceiling) t="smtp-source → smtp-sink direct (the rig's ceiling)" ;;
        ringrelay) t="ringrelay" ;;
        postfix) t="Postfix 3.7" ;; exim) t="Exim 4.96" ;;
        opensmtpd) t="OpenSMTPD 6.8 (no fsync on accept)" ;; haraka) t="Haraka 3.3" ;; *) t=$p ;;
        esac
        plot="$plot${plot:+, }\"< awk '\$1 == \\\"$p\\\"' $dat\" using 2:3 with linespoints lw 2 pt 7 ps 0.7 title \"$t\""
    done
    gnuplot <<GP
set terminal svg size 860,560 font "sans,11"
set output "$svg"
set title "Relays on one 2-vCPU VM, one interleaved run (benches/peers.sh), $(date -u +%Y-%m-%d), commit $4\n1 KiB, 1 recipient, smtp-source → relay (queue fsynced on disk) → smtp-sink; medians of $3"
set logscale x 2; set logscale y; set grid
set xlabel "concurrent sessions (smtp-source -s; closed loop)"; set ylabel "delivered msgs/s (counted at the sink)"
set key below maxrows 2 width -4 spacing 1.2
set xtics ($xt)
set yrange [10:*]
plot $plot
GP
    rm -f "$dat"
    echo "# plot: $svg"
}
if [ -n "${PLOT_ONLY:-}" ]; then   # PLOT_ONLY=CSV: redraw the plot from a run's CSV, nothing else
    plot_svg "$PLOT_ONLY" "$SVG" "${PLOT_REPS:-?}" "${PLOT_COMMIT:-?}"
    exit 0
fi

TGT=${CARGO_TARGET_DIR:-$ROOT/target}
cd "$ROOT"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release -q -p ringrelay -p loadgen || { echo "build failed" >&2; exit 1; }
fi
RR=${RINGRELAY:-$TGT/release/ringrelay}
LG=${LOADGEN:-$TGT/release/loadgen}
[ -x "$RR" ] && [ -x "$LG" ] || { echo "missing $RR or $LG" >&2; exit 2; }

# The peers' binaries, unpacked / installed once as the shared scripts do (kept for later runs).
EDIR=${EDIR:-/var/tmp/anchors-exim}
ODIR=${ODIR:-/var/tmp/anchors-opensmtpd}
HDIR=${HDIR:-/var/tmp/anchors-haraka}
deb_unpack "$EDIR" exim4-daemon-light libidn12 || exit 1
deb_unpack "$ODIR" opensmtpd || exit 1
EXIM=$EDIR/root/usr/sbin/exim4
SMTPD=$ODIR/root/usr/sbin/smtpd
if [ ! -x "$HDIR/node_modules/.bin/haraka" ]; then
    # as ../shared/bench/haraka_relay.sh installs it
    "$SHARED/haraka_relay.sh" 1 10 1 >/dev/null 2>&1 || { echo "Haraka install failed: see $HDIR" >&2; exit 1; }
fi

# cgroup CPU (cg_*), the PSS sampler (relay_sampler over relay_pids), sink_count over
# $WORK/sink.out; it makes $WORK (/tmp), used for logs. Queues go under $RUN (real disk).
. "$SHARED/lib_relay.sh"
relay_pids() { cg_pids; }
RUN=$(mktemp -d /var/tmp/peers.XXXXXX)
chmod 755 "$RUN"   # Postfix's and Exim's unprivileged processes reach their queues through it
self_signed_cert "$RUN" || { echo "openssl failed" >&2; exit 1; }
CERT=$RUN/cert.pem
KEYF=$RUN/key.pem

# Peer set-ups read from the shared scripts (renamed; `write_config` calls go to wrappers
# below that add TLS for case tls). They run with the shared dir as the working directory.
shared_fn "$SHARED/postfix_relay.sh" write_config pf_write_config
shared_fn "$SHARED/postfix_relay.sh" relay_stop pf_stop_shared
shared_fn "$SHARED/exim_relay.sh" write_config exim_write_config
shared_fn "$SHARED/exim_relay.sh" relay_start exim_start_shared write_config=exim_config
shared_fn "$SHARED/exim_relay.sh" relay_stop exim_stop
shared_fn "$SHARED/opensmtpd_relay.sh" write_config os_write_config
shared_fn "$SHARED/opensmtpd_relay.sh" relay_start os_start_shared write_config=os_config
shared_fn "$SHARED/opensmtpd_relay.sh" relay_stop os_stop
shared_fn "$SHARED/haraka_relay.sh" write_config hk_write_config
shared_fn "$SHARED/haraka_relay.sh" relay_stop hk_stop_shared
cd "$SHARED"

PEER_UP=""   # the peer now running
RPID=""      # ringrelay's PID
QDIR=""      # its spool
EXIM_PID=""; SMTPD_PID=""; HARAKA_PID=""
PERF_PID=""
CASE=""
TLS=0        # 1 while case tls runs: the config wrappers switch TLS on

wait_free() { # PORT: an io_uring listener is released asynchronously
    for _ in $(seq 100); do port_free "$1" && return 0; sleep 0.1; done
    echo "127.0.0.1:$1 still busy" >&2
    return 1
}

# ---------------------------------------------------------------- peers
# Postfix: postfix_relay.sh's config; TLS as benches/tls_compare.sh sets it (may, both legs).
pf_config() {
    BASE=$RUN/pf CONF=$RUN/pf/etc
    pf_write_config >/dev/null || return 1
    if [ "$TLS" = 1 ]; then
        postconf -c "$CONF" -e "smtpd_tls_security_level = may" "smtpd_tls_cert_file = $CERT" \
            "smtpd_tls_key_file = $KEYF" "smtp_tls_security_level = may" \
            "smtpd_tls_loglevel = 1" "smtp_tls_loglevel = 1" || return 1
        echo "tlsmgr    unix  -       -       n       1000?   1       tlsmgr" >>"$CONF/master.cf"
    fi
}
pf_start() {
    pf_config || return 1
    cg_new
    (cg_join; exec postfix -c "$CONF" start) >/dev/null 2>&1 ||
        { echo "postfix start failed" >&2; tail -5 "$BASE/maillog" >&2; return 1; }
}
pf_stop() {
    BASE=$RUN/pf CONF=$RUN/pf/etc
    pf_stop_shared
    local m
    m=$(head -1 "$BASE/spool/pid/master.pid" 2>/dev/null | tr -d ' ' || true)
    if [ -n "$m" ]; then for _ in $(seq 100); do kill -0 "$m" 2>/dev/null || break; sleep 0.1; done; fi
    cg_remove
    rm -rf "$BASE"
}
# Exim: its smtp transport tries STARTTLS whenever the server offers it (the shared config
# avoids it with hosts_avoid_tls); the daemon offers it with tls_advertise_hosts = *.
exim_config() {
    BASE=$RUN/exim
    exim_write_config || return 1
    if [ "$TLS" = 1 ]; then
        sed -i -e "s|^tls_advertise_hosts =\$|tls_advertise_hosts = *\ntls_certificate = $CERT\ntls_privatekey = $KEYF|" \
            -e '/^ *hosts_avoid_tls = \*$/d' "$BASE/exim.conf" || return 1
        grep -q '^tls_certificate' "$BASE/exim.conf" || { echo "exim TLS patch did not apply" >&2; return 1; }
    fi
}
# (libidn12, unpacked beside it, is the one library exim4 lacks here: only Exim's environment gets it)
exim_start() { BASE=$RUN/exim; LD_LIBRARY_PATH=$EDIR/root/usr/lib/x86_64-linux-gnu exim_start_shared; }
# OpenSMTPD: STARTTLS offered on the listener (tls pki), and the relay action requires
# STARTTLS to the sink without checking its self-signed certificate (tls no-verify).
os_config() {
    BASE=$RUN/os
    os_write_config || return 1
    if [ "$TLS" = 1 ]; then
        sed -i -e "s|^listen on 127.0.0.1 port $OS_PORT\$|pki relay.test cert \"$CERT\"\npki relay.test key \"$RUN/key600.pem\"\nlisten on 127.0.0.1 port $OS_PORT tls pki relay.test|" \
            -e "s|smtp+notls://127.0.0.1:$SINK_PORT\$|smtp+tls://127.0.0.1:$SINK_PORT tls no-verify|" \
            "$BASE/smtpd.conf" || return 1
        grep -q 'smtp+tls' "$BASE/smtpd.conf" || { echo "opensmtpd TLS patch did not apply" >&2; return 1; }
    fi
}
os_start() { BASE=$RUN/os; os_start_shared; }
# Haraka: the tls plugin (config/tls_cert.pem, tls_key.pem) offers STARTTLS; outbound.ini
# enable_tls=true makes its client use STARTTLS when the next hop offers it.
hk_config() {
    INST=$RUN/haraka
    hk_write_config || return 1
    if [ "$TLS" = 1 ]; then
        cp "$CERT" "$INST/config/tls_cert.pem"
        cp "$KEYF" "$INST/config/tls_key.pem"
        printf 'tls\nanchors_relay\n' >"$INST/config/plugins"
        sed -i 's/^enable_tls=false$/enable_tls=true/' "$INST/config/outbound.ini"
    fi
}
hk_start() {
    hk_config || return 1
    cg_new
    (cg_join; exec "$HDIR/node_modules/.bin/haraka" -c "$INST") >"$WORK/haraka.log" 2>&1 &
    HARAKA_PID=$!
}
hk_stop() { INST=$RUN/haraka; hk_stop_shared; cg_remove; rm -rf "$INST"; }
# ringrelay: the README's any_relay.sh command line; for tls, [tls] and delivery.tls = "may".
rr_start() {
    QDIR=$(mktemp -d "$RUN/rr.q.XXXXXX")
    local conf=()
    if [ "$TLS" = 1 ]; then
        printf '[tls]\ncert_file = "%s"\nkey_file = "%s"\n[delivery]\ntls = "may"\n' "$CERT" "$KEYF" >"$RUN/rr-tls.toml"
        conf=(--config "$RUN/rr-tls.toml")
    fi
    cg_new
    (cg_join; exec "$RR" serve "${conf[@]}" --listen "127.0.0.1:$RR_PORT" --smarthost "127.0.0.1:$SINK_PORT" \
        --spool "$QDIR") >"$WORK/rr.log" 2>&1 &
    RPID=$!
}
rr_stop() { stop_pid "$RPID"; RPID=""; cg_remove; rm -rf "$QDIR"; }

peer_port() {
    case $1 in
    ringrelay) echo "$RR_PORT" ;; postfix) echo "$PF_PORT" ;; exim) echo "$EXIM_PORT" ;;
    opensmtpd) echo "$OS_PORT" ;; haraka) echo "$HARAKA_PORT" ;; ceiling) echo "$SINK_PORT" ;;
    esac
}
peer_start() {
    case $1 in
    ringrelay) rr_start ;; postfix) pf_start ;; exim) exim_start ;; opensmtpd) os_start ;;
    haraka) hk_start ;; ceiling) return 0 ;;
    esac
}
peer_stop() {
    case $1 in
    ringrelay) rr_stop ;; postfix) pf_stop ;;
    exim) BASE=$RUN/exim; exim_stop; rm -rf "$BASE" ;;
    opensmtpd) BASE=$RUN/os; os_stop; rm -rf "$BASE" ;;
    haraka) hk_stop ;; *) return 0 ;;
    esac
}
# What the peer's own log says about TLS to the next hop (Postfix/ringrelay log it; the
# sink's TLS session count is the measure either way).
peer_out_tls() {
    case $1 in
    postfix) grep -c 'TLS connection established to' "$RUN/pf/maillog" 2>/dev/null || true ;;
    ringrelay) grep -c 'TLS connection established to' "$WORK/rr.log" 2>/dev/null || true ;;
    *) echo "-" ;;
    esac
}

cleanup() {
    set +e
    [ -n "$PERF_PID" ] && { kill -INT "$PERF_PID" 2>/dev/null; wait "$PERF_PID" 2>/dev/null; }
    [ -n "$SAMPLER_PID" ] && stop_pid "$SAMPLER_PID"
    SAMPLER_PID=""
    [ -n "$PEER_UP" ] && peer_stop "$PEER_UP" >/dev/null 2>&1
    [ -n "$SINK_PID" ] && stop_pid "$SINK_PID"
    SINK_PID=""
    [ -n "$CG" ] && cg_remove
    rm -rf "$WORK" "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for p in $SINK_PORT $PF_PORT $HARAKA_PORT $RR_PORT $EXIM_PORT $OS_PORT 2640; do
    port_free "$p" || { echo "127.0.0.1:$p is busy" >&2; exit 1; }
done
ulimit -n "$(ulimit -Hn)"

# ---------------------------------------------------------------- one run
RUNS=$WORK/runs
: >"$RUNS"
j() { jq -r "$1" "$2" 2>/dev/null || echo "-"; }

# run_one PEER CASE SESSIONS MSGS: a fresh sink and peer, one load, one line in $RUNS:
#   rep case sess peer msgs got accept/s deliv/s cpu_us/msg PSS_MB RSS_MB busy% tls_in tls_out rcpts_at_sink note
# cannot PEER CASE -> why PEER cannot run CASE here (empty: it can)
cannot() {
    if [ "$1" = opensmtpd ] && [ "$2" = tls ] && [ "${OS_TLS:-0}" != 1 ]; then
        echo "OpenSMTPD 6.8.0p2 (Debian 12) fails every inbound STARTTLS handshake under OpenSSL 3 (its privsep key signing: 'SSL routines::EVP lib', OpenSMTPD issues #1171/#1239, fixed in 7.x); OS_TLS=1 tries anyway"
    fi
}

run_one() {
    local peer=$1 case=$2 sess=$3 msgs=$4 port size=1024 note="-" lg=0 why
    why=$(cannot "$peer" "$case")
    if [ -n "$why" ]; then
        echo "# $peer cannot run case $case: $why"
        printf "%s %s %s %s %s 0 0 0 - - - - - - - cannot\n" "$REP" "$case" "$sess" "$peer" "$msgs" | tee -a "$RUNS"
        return 0
    fi
    port=$(peer_port "$peer")
    CASE=$case
    TLS=0; [ "$case" = tls ] && TLS=1
    [ "$case" = big ] && size=102400
    case $case in rcpt10 | tls) lg=1 ;; esac
    wait_free "$SINK_PORT" && wait_free "$port" || { echo "WARN $peer $case: ports busy, run skipped" >&2; return 0; }
    rm -f "$WORK/sink.json" "$WORK/send.json" "$WORK/sink.out"
    if [ "$lg" = 1 ]; then
        local a=(sink --listen "127.0.0.1:$SINK_PORT" --json "$WORK/sink.json" --expect "$msgs" --timeout "$DRAIN_TIMEOUT")
        [ "$TLS" = 1 ] && a+=(--tls-cert "$CERT" --tls-key "$KEYF")
        "$LG" "${a[@]}" >"$WORK/sink.out" 2>&1 &
    else
        smtp-sink -c -u "$SINK_USER" -m 1024 "127.0.0.1:$SINK_PORT" 1024 >"$WORK/sink.out" 2>&1 &
    fi
    SINK_PID=$!
    wait_port 127.0.0.1 "$SINK_PORT" || { echo "WARN sink did not start" >&2; cat "$WORK/sink.out" >&2; stop_pid "$SINK_PID"; SINK_PID=""; return 0; }
    PEER_UP=$peer
    if ! peer_start "$peer" || ! wait_port 127.0.0.1 "$port" 300; then
        echo "WARN $peer $case: did not start" >&2
        note=no-start
    fi
    local c0=0 c1=0 t0 t1 t2 got=0
    if [ "$note" = "-" ]; then
        sleep 1
        if [ "$peer" != ceiling ]; then
            relay_sampler >"$WORK/mem" &
            SAMPLER_PID=$!
            c0=$(cg_cpu_ticks)
        else
            : >"$WORK/mem"
            c0=$(cpu_ticks "$SINK_PID")
        fi
        if [ -n "${PERF_OUT:-}" ] && [ "$peer" = ringrelay ]; then
            perf record -g -q -o "$PERF_OUT" -p "$RPID" >/dev/null 2>&1 &
            PERF_PID=$!
            sleep 0.5
        fi
        stat_snap "$WORK/stat0"
        t0=$(now)
        if [ "$lg" = 1 ]; then
            local send=("$LG" send --no-progress --target "127.0.0.1:$port" --connections "$sess" --messages "$msgs"
                --size "$size" --json "$WORK/send.json" --give-up-after 60)
            [ "$case" = rcpt10 ] && send+=(--rcpts 10 --domain a.example,b.example,c.example)
            [ "$TLS" = 1 ] && send+=(--starttls)
            local deadline=$(($(date +%s) + DRAIN_TIMEOUT))
            if ! timeout "$DRAIN_TIMEOUT" "${send[@]}" >"$WORK/send.out" 2>&1; then
                echo "WARN $peer $case: loadgen send failed:" >&2; tail -3 "$WORK/send.out" >&2
                deadline=$(($(date +%s) + 10))   # what was accepted gets 10 s to arrive
            fi
            t1=$(now)
            while kill -0 "$SINK_PID" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
            stop_pid "$SINK_PID"   # (it has exited on --expect; else SIGTERM: it writes its JSON)
            SINK_PID=""
            got=$(j '.messages.unique' "$WORK/sink.json")
        else
            timeout "$DRAIN_TIMEOUT" smtp-source -d -s "$sess" -m "$msgs" -l "$size" -f sender@example.com \
                -t rcpt@example.net "127.0.0.1:$port" >"$WORK/src.out" 2>&1 ||
                { echo "WARN $peer $case: smtp-source failed:" >&2; tail -3 "$WORK/src.out" >&2; }
            t1=$(now)
            local deadline=$(($(date +%s) + DRAIN_TIMEOUT))
            while [ "$(sink_count)" != "$msgs" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
            got=$(sink_count)
        fi
        t2=$(now)
        stat_snap "$WORK/stat1"
        if [ "$peer" != ceiling ]; then c1=$(cg_cpu_ticks); else c1=$(cpu_ticks "$SINK_PID"); fi
        if [ -n "$PERF_PID" ]; then kill -INT "$PERF_PID" 2>/dev/null; wait "$PERF_PID" 2>/dev/null; PERF_PID=""; fi
    fi
    if [ -n "$SAMPLER_PID" ]; then stop_pid "$SAMPLER_PID"; SAMPLER_PID=""; fi
    local out_log
    out_log=$(peer_out_tls "$peer")
    peer_stop "$peer" 2>>"$WORK/peer.log"
    PEER_UP=""
    if [ -n "$SINK_PID" ]; then stop_pid "$SINK_PID"; SINK_PID=""; fi
    [ -n "$CG" ] && cg_remove   # a peer whose start failed half-way
    got=${got:-0}; [ "$got" = null ] && got=0
    local tls_in="-" tls_out="-" rcpts="-"
    if [ "$lg" = 1 ]; then
        tls_in=$(j '.tls.sessions // 0' "$WORK/send.json")
        tls_out=$(j '.tls.sessions // 0' "$WORK/sink.json")
        rcpts=$(j '.recipients.accepted' "$WORK/sink.json")
    fi
    if [ "$note" = "-" ]; then
        [ "$got" != "$msgs" ] && note="sink-saw-$got-of-$msgs"
        if [ "$TLS" = 1 ] && [ "$note" = "-" ]; then
            [ "$tls_in" = 0 ] && note=inbound-not-TLS
            [ "$tls_out" = 0 ] && note=outbound-not-TLS
        fi
        [ "$case" = rcpt10 ] && [ "$note" = "-" ] && [ "$rcpts" != "$((msgs * 10))" ] && note="sink-rcpts-$rcpts-of-$((msgs * 10))"
    fi
    local busy prss ppss line
    read -r busy _ <<<"$(stat_delta "$WORK/stat0" "$WORK/stat1" 2>/dev/null || echo "- -")"
    read -r prss ppss <<<"$(awk '$1 > r {r = $1} $2 > s {s = $2} END {print r + 0, s + 0}' "$WORK/mem" 2>/dev/null || echo "0 0")"
    if [ "$note" = no-start ]; then
        line=$(printf "%s %s %s %s %s 0 0 0 - - - - - - - %s" "$REP" "$case" "$sess" "$peer" "$msgs" "$note")
    else
        line=$(awk -v rep="$REP" -v c="$case" -v s="$sess" -v p="$peer" -v m="$msgs" -v g="$got" \
            -v t0="$t0" -v t1="$t1" -v t2="$t2" -v c0="$c0" -v c1="$c1" -v hz="$CLK_TCK" \
            -v pss="$ppss" -v rss="$prss" -v b="${busy:--}" -v ti="$tls_in" -v to="$tls_out" \
            -v r="$rcpts" -v ol="$out_log" -v n="$note" \
            'BEGIN {d = (g > 0) ? g : 1
                    printf "%s %s %s %s %d %d %.0f %.0f %.1f %.1f %.1f %s %s %s %s %s %s\n", rep, c, s, p, m, g,
                        m / (t1 - t0), g / (t2 - t0), (c1 - c0) / hz * 1e6 / d, pss / 1024, rss / 1024, b,
                        ti, to "/" ol, r, n, ""}')
    fi
    echo "$line" | tee -a "$RUNS"
}

# ---------------------------------------------------------------- the run
exec > >(tee "$OUT.txt") 2>&1
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD)
DIRTY=$(git -C "$ROOT" status --porcelain -- src loadgen Cargo.toml Cargo.lock | wc -l)
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "# peers.sh on $(hostname) ($(nproc) vCPUs, $(uname -r)), start $START, load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# command: $(printf '%q ' "$0" "$@") with REPS=$REPS QUICK=$QUICK SESS=$SESS SWEEP='$SWEEP' CASES='$CASES' PEERS='$PEERS'"
echo "# msgs per run: plain rr $N_RR_PLAIN / peers $N_PLAIN; big rr $N_RR_BIG / $N_BIG; rcpt10 rr $N_RR_RCPT / $N_RCPT; tls rr $N_RR_TLS / $N_TLS; sweep rr $N_RR_SWEEP / $N_SWEEP; ceiling $N_CEIL / $N_CEIL_SWEEP"
echo "# ringrelay: commit $COMMIT ($DIRTY files in src/, loadgen/, Cargo.* differ), $RR built $(date -u -r "$RR" +%FT%H:%MZ), sha256 $(sha256sum "$RR" | cut -c1-12)"
echo "# peers: postfix $(postconf -d -h mail_version), exim $(deb_version "$EDIR" exim4-daemon-light), opensmtpd $(deb_version "$ODIR" opensmtpd), Haraka $(node -p "require('$HDIR/node_modules/Haraka/package.json').version") on node $(node --version); $(openssl version | cut -d' ' -f1-2); queues under /var/tmp ($(df --output=fstype /var/tmp | tail -1))"
echo "# peers run with the shared scripts' settings (../shared/bench/*_relay.sh headers): Postfix smtp concurrency 50; Exim deliver_drop_privilege, immediate delivery;"
echo "#   OpenSMTPD's queue does not fsync on accept (SYNC=0, its default); Haraka 1 node, outbound concurrency_max 50. ringrelay: default options (shards = cores)."
echo "# loads: plain/big: smtp-source -d -s S -m N -l SIZE (payload bytes) -> smtp-sink -c (counts transactions);"
echo "#   rcpt10/tls: loadgen send --connections S --messages N --size 1024 (header + body) [--rcpts 10 --domain a.example,b.example,c.example] [--starttls]"
echo "#   -> loadgen sink --expect N (unique messages) [--tls-cert]; ceiling: smtp-source -> smtp-sink direct"
echo
echo "## runs (interleaved: every case runs every peer back to back; the peers' order rotates per rep)"
echo "# columns: rep case sessions peer msgs got(at sink) accept/s delivered/s cpu_us/msg PSS_MB RSS_MB machine_busy% tls_in tls_out(sink)/out_log rcpts(at sink) note"
echo "# delivered/s = got / (start of load -> sink has all); cpu = the relay's cgroup (ceiling: smtp-sink's own); PSS/RSS: peak of the summed samples"
read -ra PA <<<"$PEERS"
NP=${#PA[@]}
msgs_for() { # PEER CASE [sweep]
    local rr=0 v
    [ "$1" = ringrelay ] && rr=1
    if [ "${3:-}" = sweep ]; then
        [ "$1" = ceiling ] && { echo "$N_CEIL_SWEEP"; return; }
        [ $rr = 1 ] && echo "$N_RR_SWEEP" || echo "$N_SWEEP"; return
    fi
    [ "$1" = ceiling ] && { echo "$N_CEIL"; return; }
    case $2 in
    plain) v=$([ $rr = 1 ] && echo "$N_RR_PLAIN" || echo "$N_PLAIN") ;;
    big) v=$([ $rr = 1 ] && echo "$N_RR_BIG" || echo "$N_BIG") ;;
    rcpt10) v=$([ $rr = 1 ] && echo "$N_RR_RCPT" || echo "$N_RCPT") ;;
    tls) v=$([ $rr = 1 ] && echo "$N_RR_TLS" || echo "$N_TLS") ;;
    esac
    echo "$v"
}
for REP in $(seq 1 "$REPS"); do
    order=()
    for k in $(seq 0 $((NP - 1))); do order+=("${PA[$(((REP - 1 + k) % NP))]}"); done
    echo "# rep $REP: $(date -u +%H:%M:%S), load average $(cut -d' ' -f1-3 /proc/loadavg), order: ${order[*]}"
    for c in $CASES; do
        [ "$c" = plain ] && run_one ceiling plain "$SESS" "$N_CEIL"
        for p in "${order[@]}"; do run_one "$p" "$c" "$SESS" "$(msgs_for "$p" "$c")"; done
    done
    for s in $SWEEP; do
        run_one ceiling plain "$s" "$N_CEIL_SWEEP"
        for p in "${order[@]}"; do run_one "$p" plain "$s" "$(msgs_for "$p" plain sweep)"; done
    done
done

# ---------------------------------------------------------------- medians, ratios, CSV, plot
med() { # CASE SESS PEER COL -> median over the reps' runs that delivered everything
    awk -v c="$1" -v s="$2" -v p="$3" -v k="$4" '$2 == c && $3 == s && $4 == p && $16 == "-" && $k != "-" {print $k}' "$RUNS" | median
}
notes() { # CASE SESS PEER -> the runs' notes, if any
    awk -v c="$1" -v s="$2" -v p="$3" '$2 == c && $3 == s && $4 == p && $16 != "-" {print $16}' "$RUNS" | sort | uniq -c |
        awk '{printf "%s%s x%d", (NR > 1 ? "; " : ""), $2, $1}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "nan" || b == "nan" || b + 0 == 0) print "-"; else printf "%.3f", a / b}'; }
fmt_ratio() { [ "$1" = - ] && echo - || awk -v r="$1" 'BEGIN {printf (r >= 10 ? "%.1fx" : "%.2fx"), r}'; }

echo
echo "## medians at $SESS sessions ($REPS reps; runs with a note are left out of the medians)"
CSV=$OUT.csv
echo "case,sessions,peer,runs_ok,delivered_per_s,cpu_us_per_msg,pss_mb,rr_over_peer_delivered,rr_over_peer_cpu,notes" >"$CSV"
csv_rows() { # CASE SESS PEERS...
    local c=$1 s=$2 p
    shift 2
    for p in "$@"; do
        local d cpu pss n rd rc
        d=$(med "$c" "$s" "$p" 8); cpu=$(med "$c" "$s" "$p" 9); pss=$(med "$c" "$s" "$p" 10)
        n=$(awk -v c="$c" -v s="$s" -v p="$p" '$2 == c && $3 == s && $4 == p && $16 == "-"' "$RUNS" | wc -l)
        rd=$(ratio "$(med "$c" "$s" ringrelay 8)" "$d"); rc=$(ratio "$(med "$c" "$s" ringrelay 9)" "$cpu")
        [ "$p" = ceiling ] && { cpu=nan; pss=nan; rc=-; }
        echo "$c,$s,$p,$n,$d,$cpu,$pss,$rd,$rc,$(notes "$c" "$s" "$p")" >>"$CSV"
        printf "%-7s %4s %-10s %4s %12s %12s %8s %14s %12s  %s\n" "$c" "$s" "$p" "$n" "$(printf %.0f "$d" 2>/dev/null || echo -)" \
            "$([ "$cpu" = nan ] && echo - || printf %.1f "$cpu")" "$([ "$pss" = nan ] && echo - || printf %.1f "$pss")" \
            "$(fmt_ratio "$rd")" "$(fmt_ratio "$rc")" "$(notes "$c" "$s" "$p")"
    done
}
printf "%-7s %4s %-10s %4s %12s %12s %8s %14s %12s  %s\n" case sess peer runs "deliv/s" "cpu_us/msg" "PSS_MB" "rr÷peer deliv" "rr÷peer cpu" notes
for c in $CASES; do
    if [ "$c" = plain ]; then csv_rows plain "$SESS" ceiling "${PA[@]}"; else csv_rows "$c" "$SESS" "${PA[@]}"; fi
done
echo
echo "## sweep, case plain: delivered/s against sessions (closed loop; medians)"
printf "%-7s %4s %-10s %4s %12s %12s %8s %14s %12s  %s\n" case sess peer runs "deliv/s" "cpu_us/msg" "PSS_MB" "rr÷peer deliv" "rr÷peer cpu" notes
for s in $SWEEP; do csv_rows plain "$s" ceiling "${PA[@]}"; done
echo "# CSV: $CSV"

plot_svg "$CSV" "$SVG" "$REPS" "$COMMIT"

# ---------------------------------------------------------------- the sink comparison
if [ "$SINK_RUNS" -gt 0 ]; then
    echo
    echo "## front end alone: benches/sink_compare.sh $SINK_RUNS $SINK_MSGS 50 1024 (VARIANTS='smtp-sink ringrelay-uring', interleaved), $(date -u +%H:%M:%S)"
    VARIANTS="smtp-sink ringrelay-uring" RINGRELAY=$RR "$ROOT/benches/sink_compare.sh" "$SINK_RUNS" "$SINK_MSGS" 50 1024 2>"$WORK/sinkcmp.runs"
    echo "# per run (variant msgs/s cpu_us/msg peakRSS_KB user_us sys_us):"
    sed 's/^/#   /' "$WORK/sinkcmp.runs"
    paste <(awk '$1 == "smtp-sink" {print $3}' "$WORK/sinkcmp.runs") <(awk '$1 == "ringrelay-uring" {print $3}' "$WORK/sinkcmp.runs") |
        awk '{r = $2 / $1; printf "#   run %d: serve --sink cpu / smtp-sink cpu = %.3f%s\n", NR, r, (r <= 0.7 ? " (<= 0.7)" : ""); if (r <= 0.7) k++}
             END {printf "SINKGOAL %d of %d runs at or under 0.7x\n", k + 0, NR}' | tee "$WORK/sinkgoal" | grep -v '^SINKGOAL'
fi

# ---------------------------------------------------------------- goals
echo
echo "## goals (issue 19), this run; end $(date -u +%H:%M:%S), load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
MISSED=""
goal() { # TEXT MET(1/0) CASES-to-profile
    echo "$([ "$2" = 1 ] && echo "met    " || echo "MISSED ") $1"
    [ "$2" = 1 ] || MISSED="$MISSED $3"
}
has() { [[ " $PEERS " == *" $1 "* ]] && [[ " $CASES " == *" $2 "* ]]; }
if has ringrelay plain; then
    # per rep: ringrelay ÷ the fastest other peer in the same rep
    worst=$(awk -v s="$SESS" '$2 == "plain" && $3 == s && $4 != "ceiling" && $16 == "-" {
            if ($4 == "ringrelay") rr[$1] = $8; else if ($8 > best[$1]) {best[$1] = $8; who[$1] = $4}}
        END {m = ""; for (r in rr) if (r in best) {x = rr[r] / best[r]; printf "rep %s: %.1fx (%s)\n", r, x, who[r] > "/dev/stderr"
             if (m == "" || x < m) m = x}; if (m == "") print "nan"; else printf "%.1f\n", m}' "$RUNS" 2>"$WORK/perrep")
    sed 's/^/  /' "$WORK/perrep"
    goal "plain 1 KiB: delivered/s >= 20x every peer in every rep: worst rep ${worst}x" "$(awk -v w="$worst" 'BEGIN {print (w != "nan" && w >= 20) ? 1 : 0}')" plain
    r=$(ratio "$(med plain "$SESS" ringrelay 9)" "$(med plain "$SESS" postfix 9)")
    goal "plain 1 KiB: relay CPU/msg <= 1/40 (0.025x) of Postfix's: ${r}x" "$(awk -v r="$r" 'BEGIN {print (r != "-" && r <= 0.025) ? 1 : 0}')" plain
    r=$(ratio "$(med plain "$SESS" ringrelay 8)" "$(med plain "$SESS" ceiling 8)")
    goal "plain 1 KiB: delivered/s >= 0.65x smtp-source -> smtp-sink direct: ${r}x" "$(awk -v r="$r" 'BEGIN {print (r != "-" && r >= 0.65) ? 1 : 0}')" plain
fi
for c in big rcpt10 tls; do
    has ringrelay "$c" && has postfix "$c" || continue
    r=$(ratio "$(med "$c" "$SESS" ringrelay 8)" "$(med "$c" "$SESS" postfix 8)")
    goal "$c: delivered/s >= 10x Postfix: ${r}x" "$(awk -v r="$r" 'BEGIN {print (r != "-" && r >= 10) ? 1 : 0}')" "$c"
done
if [ -s "$WORK/sinkgoal" ]; then
    read -r _ k _ n _ < <(grep '^SINKGOAL' "$WORK/sinkgoal")
    goal "serve --sink CPU/msg <= 0.7x smtp-sink's in >= 4 of 5 interleaved runs: $k of $n" "$([ "$k" -ge 4 ] && [ "$n" -ge 5 ] && echo 1 || echo 0)" sink
fi

# ---------------------------------------------------------------- profiles of missed goals
if [ "$PROFILE" = 1 ] && [ -n "$MISSED" ] && command -v perf >/dev/null; then
    echo
    echo "## profiles: perf record -g on ringrelay's process during one more run of each missed goal's case"
    echo "# (flat: self time by DSO, then the top symbols; [k] = kernel)"
    REP=profile
    for c in $(echo "$MISSED" | tr ' ' '\n' | sort -u); do
        if [ "$c" = sink ]; then
            echo "### serve --sink under smtp-source -s 50 (see also PERF.md 'What bounds the rest')"
            "$RR" serve --sink --listen 127.0.0.1:2640 2>/dev/null &
            SP=$!
            wait_port 127.0.0.1 2640
            perf record -g -q -o "$WORK/perf.sink" -p "$SP" >/dev/null 2>&1 &
            PERF_PID=$!
            sleep 0.5
            smtp-source -d -s 50 -m "$SINK_MSGS" -l 1024 -f sender@example.com -t rcpt@example.com 127.0.0.1:2640 >/dev/null 2>&1
            kill -INT "$PERF_PID"; wait "$PERF_PID" 2>/dev/null; PERF_PID=""
            stop_pid "$SP"
            f=$WORK/perf.sink
        else
            echo "### case $c, $(msgs_for ringrelay "$c") msgs, $SESS sessions (this run's line:)"
            PERF_OUT=$WORK/perf.$c run_one ringrelay "$c" "$SESS" "$(msgs_for ringrelay "$c")"
            f=$WORK/perf.$c
        fi
        perf report -i "$f" --no-children -g none --sort dso --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8
        echo "# self time by where it goes (kernel symbols grouped by name; a rough split):"
        perf report -i "$f" --no-children -g none --sort dso,sym --stdio 2>/dev/null | grep '%' | awk '
            {p = $1; sub(/%/, "", p); s = $NF; k = ($3 == "[k]")
             if (!k) g = ($2 == "ringrelay" ? "ringrelay (user space)" : "libc, vdso, other user space")
             else if (s ~ /ext4|jbd2|blk_|bio|virtblk|virtqueue|iowrite|fsync|nvme|submit_bio|filemap|folio_wait/) g = "kernel: disk and fsync"
             else if (s ~ /^io_|_io_|io_uring/) g = "kernel: io_uring"
             else if (s ~ /sched|switch|spin_unlock_irq|wake|enqueue|dequeue|pick_next|update_curr|idle|futex|hrtimer|tick|rcu|irq/) g = "kernel: scheduler, wakeups, locks"
             else if (s ~ /tcp|^ip_|_ip_|ip_rcv|ip_output|skb|net_|inet|sock|__dev_queue|netif|dst_|bbr|loopback|napi|^sk_|_sk_|rps_|__netif|process_backlog|nf_|validate_xmit/) g = "kernel: TCP/IP"
             else if (s ~ /page|alloc|kmem|memcg|clear_|slab|mm_|fault|memset|rmqueue|lru/) g = "kernel: memory (pages, slab, faults)"
             else if (s ~ /syscall|entry|copy_|_copy|fget|fput|ret_from|exit_to_user/) g = "kernel: syscall entry and copies"
             else g = "kernel: other"
             t[g] += p}
            END {for (g in t) printf "  %6.2f%%  %s\n", t[g], g}' | sort -rn
        echo "# top symbols:"
        perf report -i "$f" --no-children -g none --sort dso,sym --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -25
    done
fi
echo
echo "# done $(date -u +%Y-%m-%dT%H:%M:%SZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
