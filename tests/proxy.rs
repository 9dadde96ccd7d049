//! PROXY protocol listeners (v1 and v2) as a load balancer uses them: the header's source
//! address is the client for relay access and the Received: header; a client outside
//! `mynetworks` is refused relay even though the balancer's own address is inside it; a
//! v2 LOCAL health check gets the banner; nothing is sent before the header; untrusted
//! senders, malformed headers and silent balancers are closed with nothing processed.
//! Both I/O drivers.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

/// A relay (default mynetworks: loopback) with a PROXY listener; `dest.test` routed to
/// `next_hop`. `extra` is more `[proxy]` keys.
fn start(io: &str, next_hop: SocketAddr, extra: &str) -> (Relay, SocketAddr, tempfile::TempDir) {
    let spool = tempfile::tempdir().expect("spool");
    let port = free_port();
    let mut opts = Opts::relay(io, spool.path(), &[("dest.test", next_hop)], &[1], "");
    opts.config.push_str(&format!(
        "[limits]\ncommand_timeout_secs = 2\n[proxy]\nlisten = [\"127.0.0.1:{port}\"]\n{extra}\n"
    ));
    let relay = Relay::start_with(opts);
    (relay, format!("127.0.0.1:{port}").parse().unwrap(), spool)
}

/// A v2 header for a TCP4 connection from `src` to `dst`.
fn v2_tcp4(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("v4 only")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

/// Connects, sends `header`, and returns an SMTP client that has read the banner.
fn proxied(addr: SocketAddr, header: &[u8]) -> Client {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    // Nothing comes before the header.
    let mut probe = [0u8; 16];
    let early = (&stream).read(&mut probe);
    // (A timeout, or an interrupted wait: either way, no bytes and no EOF.)
    assert!(
        early.is_err(),
        "the server spoke or closed before the PROXY header: {early:?}"
    );
    (&stream).write_all(header).expect("header");
    let mut c = Client::from_stream(stream);
    c.set_read_timeout(READ_TIMEOUT);
    let banner = c.reply();
    assert_eq!(banner.code, 220, "{}", banner.wire());
    c
}

fn client_address_decides_relay_access(io: &str) {
    let capture = Capture::start(io);
    let (_relay, addr, _spool) = start(io, capture.addr, "");
    // v1 from an outside client: the balancer (127.0.0.1) is in mynetworks, the client not.
    let mut c = proxied(addr, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 25\r\n");
    assert_eq!(c.cmd("EHLO outside.test").code, 250);
    c.cmd("MAIL FROM:<a@outside.test>").assert(250, "2.1.0");
    let r = c.cmd("RCPT TO:<x@far.test>");
    r.assert(550, "5.7.1");
    // v2 from a loopback client: in mynetworks, so it may relay; Received: names it.
    let src: SocketAddr = "127.0.0.9:40001".parse().unwrap();
    let mut c = proxied(addr, &v2_tcp4(src, addr));
    assert_eq!(c.cmd("EHLO inside.test").code, 250);
    let reply = c.transaction(
        "a@inside.test",
        &["y@dest.test"],
        b"Subject: p\r\n\r\nproxied\r\n",
    );
    reply.assert(250, "2.0.0");
    let got = capture.wait_for(1, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&got[0].data).into_owned();
    assert!(
        text.contains("Received: from inside.test ([127.0.0.9])"),
        "the Received: header names the proxied client:\n{text}"
    );
    // A v2 LOCAL health check (HAProxy's check-send-proxy) gets the banner, and the
    // checker's EHLO/QUIT (option smtpchk) work.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let mut c = proxied(addr, &local);
    assert_eq!(c.cmd("EHLO checker.test").code, 250);
    c.cmd("QUIT").assert(221, "2.0.0");
}

/// Reads until EOF (or a reset); what the server sent.
fn read_to_close(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(8)))
        .expect("timeout");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

fn bad_headers_and_untrusted_senders_are_closed_unanswered(io: &str) {
    let capture = Capture::start(io);
    let (_relay, addr, _spool) = start(io, capture.addr, "");
    // Plain SMTP on a PROXY listener: closed, no banner.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"EHLO x\r\n").expect("write");
    assert!(read_to_close(s).is_empty());
    // A v1 line that is not a header.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"PROXY TCP4 1.2.3.4 nonsense\r\n")
        .expect("write");
    assert!(read_to_close(s).is_empty());
    // A truncated header and silence: closed after the header timeout.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"PROXY TCP4 1.2").expect("write");
    assert!(read_to_close(s).is_empty());
    // The listener still serves a good header afterwards.
    let mut c = proxied(addr, b"PROXY TCP4 127.0.0.3 127.0.0.1 1 25\r\n");
    c.cmd("QUIT").assert(221, "2.0.0");

    // A balancer outside proxy.trusted: closed before any byte is read.
    let (_relay, addr, _spool) = start(io, capture.addr, "trusted = [\"192.0.2.0/24\"]");
    let mut s = TcpStream::connect(addr).expect("connect");
    let _ = s.write_all(b"PROXY TCP4 127.0.0.3 127.0.0.1 1 25\r\nEHLO x\r\n");
    assert!(read_to_close(s).is_empty());
    assert!(capture.envelopes().is_empty());
}

io_tests!(
    client_address_decides_relay_access,
    bad_headers_and_untrusted_senders_are_closed_unanswered,
);
