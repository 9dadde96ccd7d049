"""Opens N connections to a local SMTP server, takes each through the greeting and EHLO and,
with `starttls`, STARTTLS, the TLS handshake and EHLO again; then leaves them all open and
idle and prints the server's RSS (VmRSS, VmHWM from /proc/PID/status) while they are.
The TLS variant of benches/idle_connections.py (which stops after the greeting); `plain`
does the same dialogue without STARTTLS, so the two differ by TLS alone.

Clients are spread over 127.0.1.x and 127.0.2.x source addresses (per-IP caps are not the
limit), set up by a few threads (OpenSSL releases the GIL during handshakes). Certificates
are not checked (a self-signed one is expected). Every socket is closed on exit.

usage: python3 benches/idle_tls.py N PORT SERVER_PID plain|starttls [THREADS]
"""
import resource
import socket
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor

resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
n, port, pid, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
threads = int(sys.argv[5]) if len(sys.argv) > 5 else 8
assert mode in ("plain", "starttls"), mode
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE


def reply(s):
    """Reads one SMTP reply (all its lines); returns its code. Replies here are small."""
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
        lines = data.split(b"\r\n")
        # complete when the last full line has a space after the code
        full = lines[:-1]
        if full and (len(full[-1]) < 4 or full[-1][3:4] == b" "):
            return int(full[-1][:3])


def open_one(i):
    s = socket.socket()
    try:
        s.bind((f"127.0.{1 + i // 5000}.{2 + (i % 200)}", 0))
        s.settimeout(30)
        s.connect(("127.0.0.1", port))
        if reply(s) != 220:
            raise RuntimeError("greeting")
        s.sendall(b"EHLO idle.test\r\n")
        if reply(s) != 250:
            raise RuntimeError("EHLO")
        if mode == "starttls":
            s.sendall(b"STARTTLS\r\n")
            if reply(s) != 220:
                raise RuntimeError("STARTTLS")
            s = ctx.wrap_socket(s, server_hostname="relay.test")
            s.sendall(b"EHLO idle.test\r\n")
            if reply(s) != 250:
                raise RuntimeError("EHLO after STARTTLS")
        return s, None
    except Exception as e:
        s.close()
        return None, repr(e)


t0 = time.time()
with ThreadPoolExecutor(max_workers=threads) as pool:
    results = list(pool.map(open_one, range(n)))
setup_s = time.time() - t0
socks = [s for s, _ in results if s is not None]
errors = [e for _, e in results if e is not None]
time.sleep(2.0)  # let the server settle (any deferred frees, shard wake-ups)
alive = 0
for s in socks:
    # a connection the server dropped shows as readable EOF; an idle one has nothing
    s.setblocking(False)
    try:
        if s.recv(1) != b"":
            alive += 1
    except (BlockingIOError, ssl.SSLWantReadError):
        alive += 1
    except Exception:
        pass
rss = [l for l in open(f"/proc/{pid}/status") if l.startswith(("VmRSS", "VmHWM"))]
print(f"mode={mode} connections={n} ready={len(socks)} alive={alive} failed={len(errors)} "
      f"setup_s={setup_s:.1f}",
      " ".join(x.split()[0] + x.split()[1] for x in rss),
      f"first_error={errors[0]!r}" if errors else "", flush=True)
for s in socks:
    s.close()
