//! The next hop fails, then recovers, on both I/O drivers (`retry_schedule_secs = [1]`).
//!
//! - It answers every message `451 4.3.0` (`loadgen sink --tempfail-pct 100`); after
//!   about 1.5 s that sink is replaced by a normal one on the same port.
//! - Nothing listens on its port at first (connections refused); a sink appears later.
//!
//! Either way every one of the 20 acknowledged messages must arrive exactly once and
//! intact, and the queue must end empty. While the next hop is failing, all 20 stay queued.

mod common;

use std::time::Duration;

use common::*;

io_tests!(tempfailing_next_hop_recovers, refusing_next_hop_appears);

fn tempfailing_next_hop_recovers(io: &str) {
    let port = free_port();
    let mut failing = Sink::start_on(port, &["--tempfail-pct", "100"]);
    run(io, port, Some(&mut failing));
    let (code, report) = failing.stop();
    assert_eq!(code, Some(0), "{}", failing.output());
    assert_eq!(jnum(&report, "messages.received"), 0, "{report:#}");
    assert!(
        jnum(&report, "messages.tempfailed") >= 20,
        "the relay must have tried each message at the failing hop: {report:#}"
    );
}

fn refusing_next_hop_appears(io: &str) {
    run(io, free_port(), None);
}

/// Sends 20 messages to a relay routed to `port`; after 1.5 s stops `failing` (if any)
/// and starts a good sink on `port`; checks everything arrives once.
fn run(io: &str, port: u16, failing: Option<&mut Sink>) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let manifest = work.path().join("manifest");
    let m = manifest.to_str().unwrap();
    let hop = format!("127.0.0.1:{port}").parse().unwrap();
    let mut relay = Relay::start_with(Opts::relay(io, &spool, &[("example.test", hop)], &[1], ""));
    let sent = SendRun::run(
        relay.addr,
        &["--messages", "20", "--connections", "2", "--manifest", m],
        Duration::from_secs(30),
    );
    assert_eq!(sent.code, Some(0), "{}", sent.output);
    assert_eq!(jnum(&sent.json, "messages.accepted"), 20, "{:#}", sent.json);
    std::thread::sleep(Duration::from_millis(1500));
    let stats = queue_stats(&spool);
    assert_eq!(
        (jnum(&stats, "messages"), jnum(&stats, "recipients")),
        (20, 20),
        "while the next hop fails everything stays queued: {stats:#}"
    );
    if let Some(failing) = failing {
        failing.stop();
    }
    let mut good = Sink::start_on(port, &["--check-manifest", m]);
    if let Err(last) = try_wait_queue_empty(&spool, Duration::from_secs(15)) {
        panic!(
            "not delivered after the next hop recovered: {last}\nrelay log:\n{}",
            relay.stderr()
        );
    }
    let (code, report) = good.stop();
    assert_eq!(jnum(&report, "messages.unique"), 20, "{report:#}");
    assert_eq!(jnum(&report, "messages.duplicates"), 0, "{report:#}");
    assert_eq!(jnum(&report, "messages.corrupted"), 0, "{report:#}");
    assert_eq!(jnum(&report, "manifest.lost"), 0, "{report:#}");
    assert_eq!(jnum(&report, "manifest.unexpected"), 0, "{report:#}");
    assert_eq!(code, Some(0), "{}", good.output());
    relay.terminate();
}
