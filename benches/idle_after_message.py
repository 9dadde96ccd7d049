#!/usr/bin/env python3
"""Memory held by connections left idle after one message (benches/results/LAB_LOG.md §6).

Opens N connections to a running `ringrelay serve --sink`, sends one message of SIZE
bytes on each (EHLO, MAIL, RCPT, DATA, content, then waits for the 250), keeps them all
open and idle, and prints how much the server's RSS grew per connection.

usage: benches/idle_after_message.py PORT N SERVER_PID [SIZE]    (SIZE default 1000)
The server needs limits.max_connections_per_ip >= N, and this process a nofile limit
above N (it raises its own soft limit).
"""
import resource
import socket
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    port, n, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 200, hard))
    body = b"Subject: x\r\n\r\n" + (b"a" * 70 + b"\r\n") * (size // 72) + b".\r\n"
    before = rss_kib(pid)
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(10)
        s.recv(512)
        s.sendall(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        got = b""
        while b"354 " not in got:
            got += s.recv(4096)
        s.sendall(body)
        got = b""
        while b"250 2.0.0" not in got:
            got += s.recv(4096)
        conns.append(s)
    time.sleep(0.5)
    after = rss_kib(pid)
    print(f"{n} connections idle after one {size}-byte message: RSS {before / 1024:.1f} -> "
          f"{after / 1024:.1f} MiB, {(after - before) / n:.1f} KiB per connection")


if __name__ == "__main__":
    main()
