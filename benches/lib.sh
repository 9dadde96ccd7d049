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
