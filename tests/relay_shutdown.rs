//! A graceful shutdown lets deliveries in flight finish (both I/O drivers): a message that
//! is being delivered when SIGTERM arrives is delivered, its outcome recorded, and so it is
//! not in the stopped spool and not delivered again after a restart.

mod common;

use std::time::Duration;

use common::*;

io_tests!(delivery_in_flight_finishes_at_sigterm);

fn delivery_in_flight_finishes_at_sigterm(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let port = free_port();
    // Every reply of the next hop takes 300 ms, so one delivery lasts well over a second.
    let mut sink = Sink::start_on(port, &["--delay-ms", "300"]);
    let hop = format!("127.0.0.1:{port}").parse().unwrap();
    let mut relay = Relay::start_with(Opts::relay(io, &spool, &[("example.test", hop)], &[1], ""));
    let sent = SendRun::run(
        relay.addr,
        &["--messages", "1", "--connections", "1"],
        Duration::from_secs(30),
    );
    assert_eq!(jnum(&sent.json, "messages.accepted"), 1, "{:#}", sent.json);
    // The delivery is under way (greeting and EHLO alone take 600 ms at the next hop).
    std::thread::sleep(Duration::from_millis(400));
    relay.terminate();
    let stats = queue_stats(&spool);
    assert_eq!(
        jnum(&stats, "messages"),
        0,
        "the delivery in flight at SIGTERM must finish and be recorded: {stats:#}\nlog:\n{}",
        relay.stderr()
    );
    // A restart on the same spool finds nothing to deliver.
    let mut again = Relay::start_with(Opts::relay(io, &spool, &[("example.test", hop)], &[1], ""));
    std::thread::sleep(Duration::from_millis(1500));
    again.terminate();
    let (_, report) = sink.stop();
    assert_eq!(jnum(&report, "messages.unique"), 1, "{report:#}");
    assert_eq!(jnum(&report, "messages.duplicates"), 0, "{report:#}");
}
