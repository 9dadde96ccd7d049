//! The per-shard DNS cache, counted at a test DNS server (`tests/dnsfix`), with one shard
//! so that the counts are exact:
//!
//! - 50 messages to one domain (MX TTL 300) over 5 connections: one MX query and one A
//!   query for its host, however many deliveries ran at once (cache and single flight).
//! - MX TTL 1 and `dns_min_ttl_secs = 0`: one message, 2.5 s, another: a second MX query.

mod common;
mod dnsfix;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use dnsfix::DnsFixture;

#[test]
fn cache_holds_for_the_ttl_then_asks_again() {
    const N: u64 = 50;
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dns = DnsFixture::start();
    let mx1 = Ipv4Addr::new(127, 0, 0, 2);
    dns.mx("cache.test", 10, "mx1.cache.test", 300);
    dns.a("mx1.cache.test", mx1, 300);
    dns.mx("ttl.test", 10, "mx1.ttl.test", 1);
    dns.a("mx1.ttl.test", mx1, 300);
    let (port, mut sinks) = sinks_sharing_port(&[("127.0.0.2", &["--threads", "1"])], &[]);
    let mut opts = Opts::relay(
        "uring",
        &spool,
        &[],
        &[1],
        &mx_delivery(dns.addr, port, "dns_min_ttl_secs = 0"),
    );
    opts.shards = 1;
    let mut relay = Relay::start_with(opts);

    let sent = SendRun::run(
        relay.addr,
        &[
            "--messages",
            &N.to_string(),
            "--connections",
            "5",
            "--domain",
            "cache.test",
            "--timeout",
            "10",
            "--give-up-after",
            "5",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(sent.code, Some(0), "loadgen send: {}", sent.output);
    assert_eq!(jnum(&sent.json, "messages.accepted"), N, "{:#}", sent.json);
    assert_eq!(
        jnum(&sent.json, "connections.opened"),
        5,
        "spread over 5 connections: {:#}",
        sent.json
    );
    wait_queue_empty(&spool, Duration::from_secs(15));
    assert_eq!(
        (
            dns.queries("cache.test", "MX"),
            dns.queries("mx1.cache.test", "A")
        ),
        (1, 1),
        "{N} messages to one domain, one shard, TTL 300: one MX and one A query"
    );

    // TTL 1, no floor: cached for 1 s, then asked again.
    let one = |seq: u64| {
        let (_, data) = verifiable_message("00000000000ca0e0", seq, "", 200);
        send_one(
            relay.addr,
            "loadgen@loadgen.test",
            &["rcpt@ttl.test"],
            &data,
        )
        .queued_id();
        wait_queue_empty(&spool, Duration::from_secs(10));
    };
    one(1);
    assert_eq!(dns.queries("ttl.test", "MX"), 1);
    std::thread::sleep(Duration::from_millis(2500));
    one(2);
    assert_eq!(
        dns.queries("ttl.test", "MX"),
        2,
        "the MX record's 1 s TTL expired: a new query"
    );

    let (_, report) = sinks[0].stop();
    assert_eq!(
        (
            jnum(&report, "messages.unique"),
            jnum(&report, "messages.received")
        ),
        (N + 2, N + 2),
        "every message delivered once: {report:#}"
    );
    relay.terminate();
}
