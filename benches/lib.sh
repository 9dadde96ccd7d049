# Helpers of this repo's single-server bench scripts (sink_compare, sink_instructions,
# loadgen_compare, segments). Source it after ../shared/bench/lib.sh (it uses port_free).

# one_server_setup NAME: a fresh work directory in $WORK (removed at exit), $SRV for the
# server under test (stopped at exit), the exit and signal traps, and a check that
# 127.0.0.1:$PORT is free.
one_server_setup() {
    WORK=$(mktemp -d "/tmp/$1.XXXXXX")
    SRV=""
    trap one_server_cleanup EXIT
    trap 'exit 130' INT TERM
    port_free "$PORT" || { echo "127.0.0.1:$PORT is busy" >&2; exit 1; }
}

one_server_cleanup() {
    [ -n "$SRV" ] && kill "$SRV" 2>/dev/null && wait "$SRV" 2>/dev/null
    rm -rf "$WORK"
}

# stop_server: SIGTERM to $SRV, wait for it, then for its port: a killed io_uring process
# releases its listener asynchronously. Exits if the port is still busy after 10 s.
stop_server() {
    kill -TERM "$SRV" 2>/dev/null || true
    wait "$SRV" 2>/dev/null || true
    SRV=""
    for _ in $(seq 100); do port_free "$PORT" && return 0; sleep 0.1; done
    echo "127.0.0.1:$PORT still busy 10 s after stopping the server" >&2
    exit 1
}

# shared_fn SCRIPT FN NEW [OLD=NEW...]: define the function NEW as the multi-line function FN
# of the shared harness script SCRIPT (e.g. ../shared/bench/exim_relay.sh), with every word OLD
# in its body renamed to NEW. Lets peers.sh run the shared scripts' relay set-ups (config,
# start, stop) without copying them, and without running their benchmark loops.
shared_fn() {
    local src=$1 fn=$2 new=$3 body r
    shift 3
    # from "FN() {" to the last "}" line before the next top-level definition or command
    # (a "}" line alone can sit inside a here-document, e.g. Haraka's plugin)
    body=$(awk -v f="$fn() {" '$0 == f {on = 1; print; next}
        on && (/^[A-Za-z_][A-Za-z0-9_]*\(\) \{/ || /^[a-z_]+ "\$/) {exit}
        on {print}' "$src" | sed -n '1h;1!H;${g;s/\(.*\n}\)\n.*/\1/;p}')
    [ -n "$body" ] || { echo "no multi-line $fn() in $src" >&2; return 1; }
    body="$new() {${body#"$fn() {"}"
    for r in "$@"; do body=$(sed "s/\\b${r%%=*}\\b/${r#*=}/g" <<<"$body"); done
    eval "$body"
}

# self_signed_cert DIR: DIR/cert.pem and DIR/key.pem, an RSA-2048 self-signed certificate for
# relay.test and 127.0.0.1 valid 2 days (a throwaway: world-readable, the relays' unprivileged
# processes must read it), and DIR/key600.pem, the same key readable by root only (OpenSMTPD
# refuses a key that others may read).
self_signed_cert() {
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=relay.test \
        -addext "subjectAltName=DNS:relay.test,IP:127.0.0.1" \
        -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null || return 1
    chmod 644 "$1/cert.pem" "$1/key.pem"
    install -m 600 "$1/key.pem" "$1/key600.pem"
}

# stop_pid PID: SIGTERM, wait up to 10 s for it to exit, then SIGKILL (for servers a script
# started in the background; `wait` reaps it when it is the script's child).
stop_pid() { # PID: SIGTERM, wait up to 10 s, then SIGKILL
    [ -n "${1:-}" ] || return 0
    kill "$1" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
