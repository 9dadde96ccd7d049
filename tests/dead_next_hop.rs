//! A next hop that is down costs a connection attempt per probe, not one per message, on
//! both I/O drivers.
//!
//! The next hop is a listener in this test that counts the connections it accepts and
//! closes each at once (a failed greeting). 30 messages are queued for it, retried every
//! 2 s (so the hop is down for 2 s after each failure): each shard makes one trial
//! connection, marks the hop down, and defers the rest without connecting; after 2 s one
//! probe per shard, and so on. Then a real sink takes the port: the next probe reopens the
//! hop and every message is delivered.

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

io_tests!(a_dead_next_hop_is_probed_not_hammered);

/// Retry step, and so how long the hop stays down after a failure.
const PERIOD_SECS: u64 = 2;
const SHARDS: usize = 2;

/// Accepts on `listener` and closes each connection at once, counting them, until `stop`.
fn closing_listener(
    listener: TcpListener,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    drop(conn);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    })
}

fn a_dead_next_hop_is_probed_not_hammered(io: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let hop = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let thread = closing_listener(listener, Arc::clone(&accepted), Arc::clone(&stop));

    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let manifest = work.path().join("manifest");
    let m = manifest.to_str().unwrap();
    let mut opts = Opts::relay(io, &spool, &[("example.test", hop)], &[PERIOD_SECS], "");
    opts.shards = SHARDS;
    let mut relay = Relay::start_with(opts);
    let started = Instant::now();
    let sent = SendRun::run(
        relay.addr,
        &["--messages", "30", "--connections", "2", "--manifest", m],
        Duration::from_secs(30),
    );
    assert_eq!(sent.code, Some(0), "{}", sent.output);
    assert_eq!(jnum(&sent.json, "messages.accepted"), 30, "{:#}", sent.json);
    std::thread::sleep(Duration::from_millis(4500));
    let elapsed = started.elapsed().as_secs_f64();
    let connects = accepted.load(Ordering::Relaxed);
    // One trial per shard, then at most one probe per shard per period (plus one period of
    // slack for timing): far fewer than one per message and attempt.
    let periods = (elapsed / PERIOD_SECS as f64).ceil() as usize + 1;
    let bound = SHARDS * periods;
    eprintln!("{connects} connection(s) to the dead next hop in {elapsed:.1} s (bound {bound})");
    assert!(
        (1..=bound).contains(&connects),
        "{connects} connections in {elapsed:.1} s for 30 messages; expected 1..={bound}\nrelay log:\n{}",
        relay.stderr()
    );
    let stats = queue_stats(&spool);
    assert_eq!(jnum(&stats, "messages"), 30, "all still queued: {stats:#}");
    let log = relay.stderr();
    assert!(
        log.contains("is down"),
        "the hop going down is logged:\n{log}"
    );
    let deferred_down = queue_list(&spool)
        .iter()
        .filter(|m| m.to_string().contains("is down"))
        .count();
    assert!(
        deferred_down > 0,
        "messages deferred say the next hop is down: {:#?}",
        queue_list(&spool)
    );

    // The hop comes back: the next probe reopens it and everything goes.
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
    let mut good = Sink::start_on(hop.port(), &["--check-manifest", m]);
    if let Err(last) = try_wait_queue_empty(&spool, Duration::from_secs(20)) {
        panic!(
            "not delivered after the next hop came back: {last}\nrelay log:\n{}",
            relay.stderr()
        );
    }
    let (code, report) = good.stop();
    assert_eq!(jnum(&report, "messages.unique"), 30, "{report:#}");
    assert_eq!(jnum(&report, "messages.duplicates"), 0, "{report:#}");
    assert_eq!(jnum(&report, "manifest.lost"), 0, "{report:#}");
    assert_eq!(code, Some(0), "{}", good.output());
    relay.terminate();
}
