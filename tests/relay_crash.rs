//! Crash test, on both I/O drivers: a `250` after DATA survives `kill -9`.
//!
//! Three rounds per driver. Each: `loadgen send --manifest` pushes 3000 messages over 20
//! pipelined connections (open loop, 2000/s) into the relay (spool on disk), which forwards them to
//! `loadgen sink --check-manifest`. At a random moment 0.2–1.5 s in (seed printed; replay
//! with `RINGRELAY_TEST_SEED`), the relay is SIGKILLed and at once restarted on the same
//! spool and port; `send` reconnects and finishes. Once `queue stats` shows an empty queue
//! the sink is stopped: no acknowledged message may be lost or corrupted. Duplicates (a
//! delivery whose completion record the crash took) are allowed and printed.

mod common;

use std::time::{Duration, Instant};

use common::*;

io_tests!(sigkill_loses_no_acknowledged_message);

const MESSAGES: &str = "3000";
/// Open loop at 2000 messages/s: sending takes 1.5 s, so the kill (0.2–1.5 s in) always
/// lands while messages are arriving, however fast the machine.
const RATE: &str = "2000";

fn sigkill_loses_no_acknowledged_message(io: &str) {
    let mut rng = Rng::seeded(&format!("crash test ({io})"));
    let mut summary = Vec::new();
    for round in 1..=3 {
        let t0 = Instant::now();
        let work = tempfile::tempdir().unwrap();
        let spool = work.path().join("spool");
        let manifest = work.path().join("manifest");
        let m = manifest.to_str().unwrap();
        let mut sink = Sink::start(&["--check-manifest", m, "--manifest-wait", "5"]);
        let opts =
            Opts::relay(io, &spool, &[("example.test", sink.addr)], &[1], "").on_port(free_port());
        let mut relay = Relay::start_with(opts.clone());
        let mut send = SendRun::spawn(
            relay.addr,
            &[
                "--messages",
                MESSAGES,
                "--connections",
                "20",
                "--pipelining",
                "--rate",
                RATE,
                "--manifest",
                m,
                "--timeout",
                "10",
                "--give-up-after",
                "20",
            ],
        );
        let delay = Duration::from_millis(rng.range(200, 1500));
        std::thread::sleep(delay);
        let send_done_before_kill = send.finished();
        relay.kill9();
        let segments_at_kill = segment_files(&spool).len();
        let killed_log = relay.stderr();
        let relay_restarted = Relay::start_with(opts.clone());
        let restart_log = relay_restarted.stderr();
        let recovery = restart_log
            .lines()
            .find(|l| l.contains("after recovery"))
            .map(|l| l.find("spool ").map_or(l, |i| &l[i..]))
            .unwrap_or("(no recovery line)")
            .to_string();
        let mut relay = relay_restarted;

        let sent = send.wait(Duration::from_secs(90));
        assert_eq!(
            sent.code,
            Some(0),
            "round {round}: loadgen send failed: {}",
            sent.output
        );
        let accepted = jnum(&sent.json, "messages.accepted");
        let send_errors = jnum(&sent.json, "messages.errors");
        if let Err(last) = try_wait_queue_empty(&spool, Duration::from_secs(30)) {
            panic!(
                "round {round} ({io}): queue not empty 30 s after send finished: {last}\nlog before the kill (tail):\n{}\nlog after restart (tail):\n{}",
                tail(&killed_log, 20),
                tail(&relay.stderr(), 40)
            );
        }
        let (code, report) = sink.stop();
        let mf = &report["manifest"];
        let line = format!(
            "round {round} ({io}): killed after {delay:?}{} with {segments_at_kill} segment(s); {recovery}; \
             send: {accepted} accepted, {send_errors} errors; sink: {} unique, lost {}, corrupted {}, duplicates {}, unexpected {}; {:.1?}",
            if send_done_before_kill { " (send had already finished)" } else { "" },
            jnum(&report, "messages.unique"),
            jnum(mf, "lost"),
            jnum(mf, "corrupted"),
            jnum(mf, "duplicates"),
            jnum(mf, "unexpected"),
            t0.elapsed()
        );
        eprintln!("{line}");
        summary.push(line);
        assert!(
            mf["complete"].as_bool() == Some(true) && jnum(mf, "entries") == accepted,
            "round {round}: manifest incomplete or not matching send's {accepted}: {report:#}"
        );
        assert_eq!(
            jnum(mf, "lost"),
            0,
            "round {round} ({io}): ACKNOWLEDGED MESSAGES LOST after SIGKILL at {delay:?}; lost ids: {}\nrelay log after restart:\n{}",
            mf["lost_ids"],
            tail(&relay.stderr(), 40)
        );
        assert_eq!(jnum(mf, "corrupted"), 0, "round {round}: {report:#}");
        assert_eq!(
            jnum(&report, "messages.corrupted"),
            0,
            "round {round}: {report:#}"
        );
        assert_eq!(code, Some(0), "round {round}: sink exit: {}", sink.output());
        relay.terminate();
    }
    eprintln!("crash test summary ({io}):\n  {}", summary.join("\n  "));
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
