"""TLS probes for benches/tls_compare.sh, on 127.0.0.1 only, with bounded counts and timeouts.

connect PORT N MODE
    N connections, one after another, to an SMTP server: greeting, EHLO, then for MODE
    `plain` QUIT; for `full` STARTTLS, a handshake with no session offered, EHLO, QUIT;
    for `resumed` the same but offering the session (ticket) the previous connection got.
    Prints one line: how many worked, how many the server resumed (OpenSSL's
    session_reused, as the client sees it), and the client-side handshake time p50/p99 in
    µs (the wrap through do_handshake; Python's own overhead included, the same in both
    TLS modes). The caller measures the server's CPU around the call.

sink PORT CERT KEY N TIMEOUT
    A minimal STARTTLS SMTP receiver that answers one message per connection and then
    closes it, so a relay must open a new connection (and handshake) for every message.
    It counts, per TLS connection, whether the handshake resumed an earlier session
    (OpenSSL's server-side session_reused; TLS 1.3 tickets), and exits after N messages
    or TIMEOUT seconds, printing one line.

usage: python3 benches/tls_probe.py connect 2650 500 full
       python3 benches/tls_probe.py sink 2653 cert.pem key.pem 40 30
"""
import socket
import ssl
import sys
import threading
import time


def pct(values, p):
    if not values:
        return 0
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100.0 * len(v)))]


def read_reply(f):
    """Reads one (possibly multi-line) SMTP reply; returns (code, last line)."""
    while True:
        line = f.readline(1024)
        if not line:
            raise ConnectionError("connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), line


def command(sock, f, text):
    sock.sendall(text + b"\r\n")
    return read_reply(f)


def connect(port, n, mode):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    session = None
    ok = reused = failed = 0
    hs = []
    for i in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            f = s.makefile("rb")
            code, _ = read_reply(f)
            assert code == 220, code
            assert command(s, f, b"EHLO probe.test")[0] == 250
            if mode != "plain":
                code, line = command(s, f, b"STARTTLS")
                assert code == 220, line
                f.close()
                offer = session if mode == "resumed" else None
                t = time.perf_counter()
                s = ctx.wrap_socket(s, server_hostname="relay.test", session=offer)
                hs.append((time.perf_counter() - t) * 1e6)
                f = s.makefile("rb")
                assert command(s, f, b"EHLO probe.test")[0] == 250
                # TLS 1.3 tickets arrive after the handshake: the EHLO reply read them.
                if s.session_reused:
                    reused += 1
                session = s.session
            command(s, f, b"QUIT")
            f.close()
            s.close()
            ok += 1
        except Exception as e:  # counted, and the first one shown
            if failed == 0:
                print(f"probe: connection {i}: {e!r}", file=sys.stderr)
            failed += 1
    print(f"mode={mode} n={n} ok={ok} failed={failed} resumed={reused} "
          f"hs_p50_us={pct(hs, 50):.0f} hs_p99_us={pct(hs, 99):.0f}")


def sink(port, cert, key, n, timeout):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    lock = threading.Lock()
    st = {"msgs": 0, "tls": 0, "resumed": 0, "plain": 0, "conns": 0}
    done = threading.Event()

    def serve(conn):
        try:
            conn.settimeout(10)
            s, f = conn, conn.makefile("rb")
            s.sendall(b"220 probe.test ESMTP\r\n")
            tls = False
            while True:
                line = f.readline(2048)
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    ext = b"" if tls else b"250-STARTTLS\r\n"
                    s.sendall(b"250-probe.test\r\n250-PIPELINING\r\n" + ext + b"250 8BITMIME\r\n")
                elif verb == b"STAR":
                    s.sendall(b"220 go ahead\r\n")
                    f.close()
                    s = ctx.wrap_socket(s, server_side=True)
                    f = s.makefile("rb")
                    tls = True
                    with lock:
                        st["tls"] += 1
                        st["resumed"] += int(s.session_reused)
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    s.sendall(b"250 ok\r\n")
                elif verb == b"DATA":
                    s.sendall(b"354 go\r\n")
                    while True:
                        l = f.readline(65536)
                        if not l or l == b".\r\n":
                            break
                    s.sendall(b"250 ok\r\n")
                    with lock:
                        st["msgs"] += 1
                        st["plain"] += int(not tls)
                        if st["msgs"] >= n:
                            done.set()
                    return  # one message per connection: the relay must reconnect
                elif verb == b"QUIT":
                    s.sendall(b"221 bye\r\n")
                    return
                else:
                    s.sendall(b"502 no\r\n")
        except Exception:
            pass
        finally:
            try:
                conn.close()
            except Exception:
                pass

    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(128)
    ls.settimeout(0.2)
    print("listening", flush=True)
    deadline = time.time() + timeout
    while not done.is_set() and time.time() < deadline:
        try:
            c, _ = ls.accept()
        except socket.timeout:
            continue
        with lock:
            st["conns"] += 1
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    ls.close()
    print(f"probe-sink: messages={st['msgs']} of {n} connections={st['conns']} "
          f"tls={st['tls']} resumed={st['resumed']} plaintext_msgs={st['plain']}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "connect":
        connect(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) == 7 and sys.argv[1] == "sink":
        sink(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
