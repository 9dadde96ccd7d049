//! MX routing's failures, end to end, with a test DNS server (`tests/dnsfix`). Senders are
//! `sender@bounces.test`, routed statically (`--route`) to an in-process capturing server
//! that collects the bounces.
//!
//! - Null MX (`0 .`): exactly one bounce, Status 5.1.10, at once (retries are 30 s apart,
//!   the queue is empty within seconds), and the domain's A record (where a sink listens)
//!   is not used.
//! - NXDOMAIN: exactly one bounce, Status 5.1.2.
//! - SERVFAIL, and a name server that does not answer: the message waits in the queue (no
//!   bounce, no delivery) and is delivered by a retry once DNS answers again.
//! - Loops: an MX whose address is the relay's own listen address, or whose name is the
//!   relay's host name: a bounce with 5.4.6 and no mail sent to ourselves.

mod common;
mod dnsfix;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use dnsfix::DnsFixture;
use ringrelay::ReversePath;

io_tests!(
    null_mx_bounces_once,
    nxdomain_bounces_once,
    servfail_defers_then_delivers,
    dns_timeout_defers_then_delivers,
    mx_pointing_at_ourselves_bounces
);

const SENDER: &str = "sender@bounces.test";

/// The relay: DNS at `dns`, delivery on `smtp_port`, bounces for `bounces.test` to
/// `capture`, retries every `retry` s, more `[delivery]` keys in `extra`.
fn mx_relay(
    io: &str,
    spool: &Path,
    dns: &DnsFixture,
    capture: &Capture,
    smtp_port: u16,
    retry: u64,
    extra: &str,
) -> Opts {
    Opts::relay(
        io,
        spool,
        &[("bounces.test", capture.addr)],
        &[retry],
        &mx_delivery(dns.addr, smtp_port, extra),
    )
}

/// A message the sink can verify, from `SENDER` to `rcpt`; returns its queue ID.
#[track_caller]
fn send_to(relay: &Relay, rcpt: &str, seq: u64) -> String {
    let (_, data) = verifiable_message("00000000000d0500", seq, "Subject: mx test\r\n", 200);
    send_one(relay.addr, SENDER, &[rcpt], &data).queued_id()
}

/// Checks one bounce: from `<>` to `SENDER`, about `rcpt` (Final-Recipient, Action:
/// failed), with exactly the status `status`, naming `original_id`, and carrying the
/// original's header (which passed through this relay once: one `Received:` of ours).
#[track_caller]
fn check_bounce(env: &ringrelay::Envelope, rcpt: &str, status: &str, original_id: &str) {
    let text = String::from_utf8_lossy(&env.data).into_owned();
    assert_eq!(
        env.from,
        ReversePath::Null,
        "a bounce comes from <>:\n{text}"
    );
    let to: Vec<&str> = env.to.iter().map(|m| m.as_str()).collect();
    assert_eq!(to, [SENDER], "a bounce goes to the sender:\n{text}");
    let squash = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .map(|s| s.replace([' ', '\t'], "").to_ascii_lowercase())
            .collect()
    };
    assert_eq!(
        squash(dsn_values(&text, "Final-Recipient")),
        [format!("rfc822;{rcpt}")],
        "{text}"
    );
    assert_eq!(squash(dsn_values(&text, "Action")), ["failed"], "{text}");
    assert_eq!(
        dsn_values(&text, "Status"),
        [status],
        "the DSN's Status for {rcpt}:\n{text}"
    );
    assert!(
        text.contains(original_id),
        "the bounce names the original {original_id}:\n{text}"
    );
    let ours = text.matches(&format!("by {HOST} (ringrelay)")).count();
    assert_eq!(
        ours, 1,
        "the original passed through the relay once (one Received: of ours), not round a loop:\n{text}"
    );
}

/// Waits for `n` bounces, then for an empty queue; then, after `settle`, checks no more
/// arrived. Returns the bounces.
#[track_caller]
fn bounces(
    capture: &Capture,
    n: usize,
    spool: &Path,
    relay: &Relay,
    settle: Duration,
) -> Vec<ringrelay::Envelope> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while capture.envelopes().len() < n {
        assert!(
            Instant::now() < deadline,
            "{n} bounce(s) expected within 10 s, got {}; queue: {:#?}\nrelay log:\n{}",
            capture.envelopes().len(),
            queue_list(spool),
            relay.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(last) = try_wait_queue_empty(spool, Duration::from_secs(3)) {
        panic!(
            "after the bounce the queue must be empty at once (no retry):\n{last}\nrelay log:\n{}",
            relay.stderr()
        );
    }
    std::thread::sleep(settle);
    let seen = capture.envelopes();
    assert_eq!(
        seen.len(),
        n,
        "exactly {n} bounce(s): {:#?}",
        seen.iter()
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
            .collect::<Vec<_>>()
    );
    seen
}

/// `null.test` has `MX 0 .` and an A record 127.0.0.2 where a sink listens: one bounce
/// with 5.1.10, within the first attempt (retries are 30 s apart), the queue empty, the
/// sink untouched.
fn null_mx_bounces_once(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dns = DnsFixture::start();
    dns.mx("null.test", 0, ".", 300);
    dns.a("null.test", Ipv4Addr::new(127, 0, 0, 2), 300);
    let (port, mut sinks) = sinks_sharing_port(&[("127.0.0.2", &["--threads", "1"])], &[]);
    let capture = Capture::start(io);
    let mut relay = Relay::start_with(mx_relay(io, &spool, &dns, &capture, port, 30, ""));
    let id = send_to(&relay, "rcpt@null.test", 1);
    let seen = bounces(&capture, 1, &spool, &relay, Duration::from_millis(1500));
    check_bounce(&seen[0], "rcpt@null.test", "5.1.10", &id);
    let (_, report) = sinks[0].stop();
    assert_eq!(
        (
            jnum(&report, "messages.received"),
            jnum(&report, "connections.accepted")
        ),
        (0, 0),
        "a null MX domain's A record is not an implicit MX: {report:#}"
    );
    relay.terminate();
}

/// `nowhere.test` does not exist: one bounce with 5.1.2, the queue empty at once.
fn nxdomain_bounces_once(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dns = DnsFixture::start();
    dns.nxdomain("nowhere.test");
    let capture = Capture::start(io);
    let mut relay = Relay::start_with(mx_relay(io, &spool, &dns, &capture, 25, 30, ""));
    let id = send_to(&relay, "rcpt@nowhere.test", 2);
    let seen = bounces(&capture, 1, &spool, &relay, Duration::from_millis(1500));
    check_bounce(&seen[0], "rcpt@nowhere.test", "5.1.2", &id);
    assert!(dns.queries("nowhere.test", "MX") >= 1);
    relay.terminate();
}

/// How DNS fails for a while in [`defers_then_delivers`].
#[derive(Clone, Copy, Debug)]
enum Outage {
    ServFail,
    Silence,
}

fn servfail_defers_then_delivers(io: &str) {
    defers_then_delivers(io, Outage::ServFail);
}

fn dns_timeout_defers_then_delivers(io: &str) {
    defers_then_delivers(io, Outage::Silence);
}

/// `flaky.test` (MX → 127.0.0.2, where a sink waits for one message) fails at DNS: the
/// message stays queued for 2.5 s with nothing delivered or bounced while the relay keeps
/// asking; once DNS answers, a retry delivers it.
fn defers_then_delivers(io: &str, outage: Outage) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dns = DnsFixture::start();
    dns.mx("flaky.test", 10, "mx1.flaky.test", 300);
    dns.a("mx1.flaky.test", Ipv4Addr::new(127, 0, 0, 2), 300);
    let set = |on: bool| match outage {
        Outage::ServFail => dns.servfail("flaky.test", on),
        Outage::Silence => dns.drop_queries("flaky.test", on),
    };
    set(true);
    let (port, mut sinks) = sinks_sharing_port(
        &[(
            "127.0.0.2",
            &["--threads", "1", "--expect", "1", "--timeout", "30"],
        )],
        &[],
    );
    let capture = Capture::start(io);
    let mut relay = Relay::start_with(mx_relay(
        io,
        &spool,
        &dns,
        &capture,
        port,
        1,
        "dns_min_ttl_secs = 1\ndns_timeout_secs = 1",
    ));
    send_to(&relay, "rcpt@flaky.test", 3);
    wait_for(
        Duration::from_secs(5),
        "the relay's first MX query",
        || match dns.queries("flaky.test", "MX") {
            0 => Err("none yet".to_string()),
            _ => Ok(()),
        },
    );
    let first = dns.queries("flaky.test", "MX");
    std::thread::sleep(Duration::from_millis(2500));
    let stats = queue_stats(&spool);
    assert_eq!(
        jnum(&stats, "messages"),
        1,
        "{outage:?}: the message must wait in the queue: {stats:#}\nrelay log:\n{}",
        relay.stderr()
    );
    assert!(
        sinks[0].try_wait_exit(Duration::ZERO).is_none(),
        "{outage:?}: nothing can be delivered while DNS fails: {}",
        sinks[0].output()
    );
    assert!(
        capture.envelopes().is_empty(),
        "{outage:?} is temporary: no bounce"
    );
    let asked = dns.queries("flaky.test", "MX");
    assert!(
        asked > first,
        "{outage:?}: the relay retries (MX queries {first} at first, {asked} after 2.5 s)"
    );

    set(false);
    let t0 = Instant::now();
    match sinks[0].try_wait_exit(Duration::from_secs(10)) {
        Some(s) if s.code() == Some(0) => {}
        other => panic!(
            "{outage:?}: not delivered within 10 s after DNS recovered ({other:?}); queue: {:#?}\nrelay log:\n{}",
            queue_list(&spool),
            relay.stderr()
        ),
    }
    eprintln!(
        "{outage:?} ({io}): delivered {:?} after DNS recovered",
        t0.elapsed()
    );
    wait_queue_empty(&spool, Duration::from_secs(5));
    let (_, report) = sinks[0].stop();
    assert_eq!(jnum(&report, "messages.unique"), 1, "{report:#}");
    assert!(capture.envelopes().is_empty(), "delivered: no bounce");
    relay.terminate();
}

/// The relay listens on 127.0.0.1:R and delivers on port R. `loop.test`'s MX host
/// resolves to 127.0.0.1 (our listen address); `byname.test`'s MX host is `relay.test`
/// (our host name), resolving to 127.0.0.5 where a sink listens on R. Each message bounces
/// once with 5.4.6; nothing reaches the sink, and nothing goes round (the queue empties).
fn mx_pointing_at_ourselves_bounces(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dns = DnsFixture::start();
    dns.mx("loop.test", 10, "self.loop.test", 300);
    dns.a("self.loop.test", Ipv4Addr::LOCALHOST, 300);
    dns.mx("byname.test", 10, HOST, 300);
    dns.a(HOST, Ipv4Addr::new(127, 0, 0, 5), 300);
    let capture = Capture::start(io);
    // A port free on 127.0.0.1 (the relay) and on 127.0.0.5 (the sink).
    let (port, mut sink) = (0..20)
        .find_map(|_| {
            let port = free_port();
            let sink = Sink::try_start(&format!("127.0.0.5:{port}"), &["--threads", "1"]).ok()?;
            Some((port, sink))
        })
        .expect("a port free on 127.0.0.1 and 127.0.0.5");
    let mut relay =
        Relay::start_with(mx_relay(io, &spool, &dns, &capture, port, 30, "").on_port(port));
    assert_eq!(relay.addr, SocketAddr::from(([127, 0, 0, 1], port)));
    let by_addr = send_to(&relay, "rcpt@loop.test", 4);
    let by_name = send_to(&relay, "rcpt@byname.test", 5);
    let seen = bounces(&capture, 2, &spool, &relay, Duration::from_millis(1500));
    for (rcpt, id) in [("rcpt@loop.test", &by_addr), ("rcpt@byname.test", &by_name)] {
        let bounce = seen
            .iter()
            .find(|e| String::from_utf8_lossy(&e.data).contains(id.as_str()))
            .unwrap_or_else(|| panic!("no bounce for {rcpt} ({id})"));
        check_bounce(bounce, rcpt, "5.4.6", id);
    }
    let (_, report) = sink.stop();
    assert_eq!(
        jnum(&report, "connections.accepted"),
        0,
        "an MX named like us is us, whatever its address: {report:#}"
    );
    relay.terminate();
}

/// The bounce for a DNS verdict (null MX) explains it as what it is: the human-readable
/// part must carry the reason and must not claim the message timed out (it failed on the
/// first attempt, seconds after it arrived).
#[test]
fn dns_bounce_text_gives_the_real_reason() {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dns = DnsFixture::start();
    dns.mx("null.test", 0, ".", 300);
    let capture = Capture::start("uring");
    let mut relay = Relay::start_with(mx_relay("uring", &spool, &dns, &capture, 25, 30, ""));
    send_to(&relay, "rcpt@null.test", 6);
    let seen = bounces(&capture, 1, &spool, &relay, Duration::ZERO);
    let text = String::from_utf8_lossy(&seen[0].data).into_owned();
    let notification = text
        .split("Content-Type: message/delivery-status")
        .next()
        .unwrap_or("");
    assert!(
        notification.contains("5.1.10") && notification.contains("null MX"),
        "the notification names the reason:\n{text}"
    );
    assert!(
        !notification.contains("in time"),
        "a null MX fails at once; the notification must not say the message could not be \
         delivered in time (that is the wording for an expired message):\n{text}"
    );
    relay.terminate();
}
