//! MX routing end to end: the relay looks recipients' domains up at a test DNS server
//! (`tests/dnsfix`) and delivers to `loadgen sink`s on several loopback addresses that share
//! one port (`delivery.smtp_port`).
//!
//! - Preference order: mail goes to the most preferred MX host, none to the other.
//! - Fallback: the most preferred host is down (nothing listens there); the next one gets
//!   every message within the same attempt (the retry would come only after 30 s).
//! - Implicit MX: a domain without MX records gets its mail at its own A record.
//! - Pool sharing: two domains whose MX is the same host share the pooled connections to
//!   its address (one shard, at most 2 per destination: the sink sees at most 2).

mod common;
mod dnsfix;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use dnsfix::DnsFixture;

io_tests!(preference_order, fallback_to_next_host);

const MX1: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const MX2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const MX3: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);

/// The relay: spool `spool`, DNS at `dns`, delivery on `port`, `shards` shards, retries
/// every `retry` seconds, more `[delivery]` keys in `extra`.
fn mx_relay(
    io: &str,
    spool: &Path,
    dns: &DnsFixture,
    port: u16,
    retry: u64,
    shards: usize,
    extra: &str,
) -> Relay {
    let mut opts = Opts::relay(
        io,
        spool,
        &[],
        &[retry],
        &mx_delivery(dns.addr, port, extra),
    );
    opts.shards = shards;
    Relay::start_with(opts)
}

/// `loadgen send` of `n` messages over `connections` connections to `domains`
/// (comma-separated, rotating per message); all must be accepted.
#[track_caller]
fn send(relay: &Relay, n: u64, connections: u32, domains: &str) {
    let sent = SendRun::run(
        relay.addr,
        &[
            "--messages",
            &n.to_string(),
            "--connections",
            &connections.to_string(),
            "--domain",
            domains,
            "--timeout",
            "10",
            "--give-up-after",
            "5",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(sent.code, Some(0), "loadgen send: {}", sent.output);
    assert_eq!(
        jnum(&sent.json, "messages.accepted"),
        n,
        "the relay must accept every message: {:#}",
        sent.json
    );
}

/// Waits for a sink started with `--expect` to exit 0; panics with the relay's queue and
/// log otherwise.
#[track_caller]
fn wait_expected(sink: &mut Sink, limit: Duration, relay: &Relay, spool: &Path, what: &str) {
    match sink.try_wait_exit(limit) {
        Some(s) if s.code() == Some(0) => {}
        other => panic!(
            "{what}: the sink did not get its messages within {limit:?} ({other:?}); queue: {:#?}\n\
             sink: {}\nrelay log:\n{}",
            queue_list(spool),
            sink.output(),
            relay.stderr()
        ),
    }
}

/// MX 10 mx1 (127.0.0.2), MX 20 mx2 (127.0.0.3): all 20 messages at mx1, none at mx2.
fn preference_order(io: &str) {
    const N: u64 = 20;
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dns = DnsFixture::start();
    dns.mx("example.test", 10, "mx1.example.test", 300);
    dns.mx("example.test", 20, "mx2.example.test", 300);
    dns.a("mx1.example.test", MX1, 300);
    dns.a("mx2.example.test", MX2, 300);
    let expect = N.to_string();
    let (port, mut sinks) = sinks_sharing_port(
        &[
            (
                "127.0.0.2",
                &["--threads", "1", "--expect", &expect, "--timeout", "30"],
            ),
            ("127.0.0.3", &["--threads", "1"]),
        ],
        &[],
    );
    let mut relay = mx_relay(io, &spool, &dns, port, 1, 2, "");
    send(&relay, N, 2, "example.test");
    wait_expected(
        &mut sinks[0],
        Duration::from_secs(20),
        &relay,
        &spool,
        "mx1 (preference 10)",
    );
    wait_queue_empty(&spool, Duration::from_secs(5));
    let (_, mx1) = sinks[0].stop();
    let (code, mx2) = sinks[1].stop();
    assert_eq!(code, Some(0));
    assert_eq!(
        (
            jnum(&mx1, "messages.unique"),
            jnum(&mx1, "messages.received")
        ),
        (N, N),
        "every message once at mx1: {mx1:#}"
    );
    assert_eq!(
        (
            jnum(&mx2, "messages.received"),
            jnum(&mx2, "connections.accepted")
        ),
        (0, 0),
        "mx2 (preference 20) must not be used while mx1 takes mail: {mx2:#}"
    );
    assert!(dns.queries("example.test", "MX") >= 1);
    relay.terminate();
}

/// MX 10 mx1 → 127.0.0.2 where nothing listens, MX 20 mx2 → 127.0.0.3: mx2 gets all 20
/// messages, in the first attempt (`retry_schedule_secs = [30]`, so a deferral would
/// show as a 30 s wait).
fn fallback_to_next_host(io: &str) {
    const N: u64 = 20;
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dns = DnsFixture::start();
    dns.mx("example.test", 10, "mx1.example.test", 300);
    dns.mx("example.test", 20, "mx2.example.test", 300);
    dns.a("mx1.example.test", MX1, 300);
    dns.a("mx2.example.test", MX2, 300);
    let expect = N.to_string();
    let (port, mut sinks) = sinks_sharing_port(
        &[(
            "127.0.0.3",
            &["--threads", "1", "--expect", &expect, "--timeout", "30"],
        )],
        &["127.0.0.2"],
    );
    let mut relay = mx_relay(io, &spool, &dns, port, 30, 2, "");
    let t0 = Instant::now();
    send(&relay, N, 2, "example.test");
    wait_expected(
        &mut sinks[0],
        Duration::from_secs(12),
        &relay,
        &spool,
        "fallback to mx2 within the first attempt (a retry would wait 30 s)",
    );
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "fallback took {took:?}: that is a retry, not the same attempt"
    );
    wait_queue_empty(&spool, Duration::from_secs(3));
    let (_, mx2) = sinks[0].stop();
    assert_eq!(
        (
            jnum(&mx2, "messages.unique"),
            jnum(&mx2, "messages.received")
        ),
        (N, N),
        "{mx2:#}"
    );
    eprintln!("fallback ({io}): {N} messages at mx2 in {took:?}");
    relay.terminate();
}

/// `implicit.test` has no MX but an A record 127.0.0.4: its mail goes there.
#[test]
fn implicit_mx() {
    const N: u64 = 5;
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dns = DnsFixture::start();
    dns.a("implicit.test", MX3, 300);
    let expect = N.to_string();
    let (port, mut sinks) = sinks_sharing_port(
        &[(
            "127.0.0.4",
            &["--threads", "1", "--expect", &expect, "--timeout", "30"],
        )],
        &[],
    );
    let mut relay = mx_relay("uring", &spool, &dns, port, 1, 2, "");
    send(&relay, N, 1, "implicit.test");
    wait_expected(
        &mut sinks[0],
        Duration::from_secs(15),
        &relay,
        &spool,
        "implicit MX (the domain's A record)",
    );
    wait_queue_empty(&spool, Duration::from_secs(5));
    let (_, report) = sinks[0].stop();
    assert_eq!(jnum(&report, "messages.unique"), N, "{report:#}");
    assert!(
        dns.queries("implicit.test", "MX") >= 1 && dns.queries("implicit.test", "A") >= 1,
        "MX asked first, then the domain's own A"
    );
    relay.terminate();
}

/// `a.test` and `b.test` both MX → mx1 (127.0.0.2); 200 messages alternating between them,
/// one shard, `max_connections_per_destination = 2`: the sink accepts at most 2
/// connections (pooled by address, not by domain) and gets every message.
#[test]
fn pool_shared_across_domains() {
    const N: u64 = 200;
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dns = DnsFixture::start();
    dns.mx("a.test", 10, "mx1.shared.test", 300);
    dns.mx("b.test", 10, "mx1.shared.test", 300);
    dns.a("mx1.shared.test", MX1, 300);
    let expect = N.to_string();
    let (port, mut sinks) = sinks_sharing_port(
        &[(
            "127.0.0.2",
            &["--threads", "1", "--expect", &expect, "--timeout", "40"],
        )],
        &[],
    );
    let mut relay = mx_relay(
        "epoll",
        &spool,
        &dns,
        port,
        1,
        1,
        "max_connections_per_destination = 2",
    );
    send(&relay, N, 8, "a.test,b.test");
    wait_expected(
        &mut sinks[0],
        Duration::from_secs(30),
        &relay,
        &spool,
        "pool sharing",
    );
    wait_queue_empty(&spool, Duration::from_secs(5));
    let (_, report) = sinks[0].stop();
    assert_eq!(
        (
            jnum(&report, "messages.unique"),
            jnum(&report, "messages.received")
        ),
        (N, N),
        "{report:#}"
    );
    let conns = jnum(&report, "connections.accepted");
    assert!(
        (1..=2).contains(&conns),
        "a.test and b.test share mx1's address: at most 2 connections, got {conns}: {report:#}"
    );
    assert_eq!(
        (dns.queries("a.test", "MX"), dns.queries("b.test", "MX")),
        (1, 1),
        "both domains were routed by MX"
    );
    relay.terminate();
}
