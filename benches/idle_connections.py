"""Opens N connections to a local SMTP server, waits for every greeting, and prints the
server's RSS (VmRSS, VmHWM from /proc/PID/status) while they are all open and idle.
Clients are spread over 127.0.1.x and 127.0.2.x source addresses, so per-IP caps are not
the limit. Used by benches/idle_connections.sh.

usage: python3 benches/idle_connections.py N PORT SERVER_PID
"""
import socket, sys, time, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
n = int(sys.argv[1]); port = int(sys.argv[2]); pid = sys.argv[3]
socks = []
for i in range(n):
    # spread over source addresses so per-IP caps are not the limit
    s = socket.socket(); s.bind((f"127.0.{1 + i // 5000}.{2 + (i % 200)}", 0))
    s.connect(("127.0.0.1", port)); socks.append(s)
time.sleep(1.0)
ok = 0
for s in socks:
    s.settimeout(2)
    try:
        if s.recv(100).startswith(b"220"): ok += 1
    except Exception: pass
rss = [l for l in open(f"/proc/{pid}/status") if l.startswith(("VmRSS", "VmHWM"))]
print(f"connections={n} greeted={ok}", " ".join(x.split()[0] + x.split()[1] for x in rss))
