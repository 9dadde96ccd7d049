//! send ↔ sink over loopback: counts, IDs, checksums, recipients, connections, pipelining on
//! and off, duplicates, and the sink's handling of foreign, corrupted and garbage input.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn round_trip_counts_ids_and_checksums() {
    let dir = Scratch::new("roundtrip");
    let (sj, dj, mf) = (
        dir.path("sink.json"),
        dir.path("send.json"),
        dir.path("manifest"),
    );
    let sink = Sink::start(&[
        "--expect",
        "300",
        "--json",
        sj.to_str().unwrap(),
        "--check-manifest",
        mf.to_str().unwrap(),
    ]);
    let o = send(&[
        "--target",
        &sink.target(),
        "--messages",
        "300",
        "--connections",
        "4",
        "--rcpts",
        "2",
        "--domain",
        "a.test",
        "--domain",
        "b.test",
        "--size",
        "1k-20k",
        "--manifest",
        mf.to_str().unwrap(),
        "--json",
        dj.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "send failed: {}", o.stderr);
    let (st, _) = sink.finish();
    assert!(st.success(), "sink exit {st:?}");

    let s = read_json(&sj);
    assert_eq!(s["stop_reason"], "expect");
    assert_eq!(num(&s, "messages.received"), 300);
    assert_eq!(num(&s, "messages.unique"), 300);
    assert_eq!(num(&s, "messages.duplicates"), 0);
    assert_eq!(num(&s, "messages.corrupted"), 0);
    assert_eq!(num(&s, "messages.foreign"), 0);
    assert_eq!(num(&s, "recipients.accepted"), 600);
    assert_eq!(num(&s, "connections.accepted"), 4);
    assert_eq!(
        s["connections"]["messages_per_connection"]["mean"].as_f64(),
        Some(75.0)
    );
    assert_eq!(num(&s, "manifest.lost"), 0);
    assert_eq!(num(&s, "manifest.entries"), 300);
    assert_eq!(s["manifest"]["complete"], true);

    let d = read_json(&dj);
    assert_eq!(num(&d, "messages.sent"), 300);
    assert_eq!(num(&d, "messages.accepted"), 300);
    assert_eq!(num(&d, "reply_codes.250"), 300);
    assert_eq!(num(&d, "recipients.accepted"), 600);
    assert_eq!(num(&d, "latency_us.transaction.count"), 300);
    assert_eq!(num(&d, "latency_us.connect.count"), 4);
    assert!(num(&d, "latency_us.transaction.p50") > 0);

    let ids = manifest_ids(&mf);
    assert_eq!(ids.len(), 300);
    let run = d["run_id"].as_str().unwrap();
    let mut seqs: Vec<u64> = ids
        .iter()
        .map(|i| {
            let (r, q) = i.split_once('-').expect("id has a dash");
            assert_eq!(r, run);
            q.parse().expect("sequence number")
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..300).collect::<Vec<u64>>());
}

fn pipelined_groups(pipelining: bool) -> (u64, serde_json::Value) {
    let dir = Scratch::new(if pipelining { "pipe-on" } else { "pipe-off" });
    let (sj, dj) = (dir.path("sink.json"), dir.path("send.json"));
    let sink = Sink::start(&["--expect", "100", "--json", sj.to_str().unwrap()]);
    let mut args = vec![
        "--target".to_string(),
        sink.target(),
        "--messages".into(),
        "100".into(),
        "--connections".into(),
        "2".into(),
        "--rcpts".into(),
        "3".into(),
        "--json".into(),
        dj.to_str().unwrap().into(),
    ];
    if pipelining {
        args.push("--pipelining".into());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(send(&a).status.success());
    let (st, _) = sink.finish();
    assert!(st.success());
    let s = read_json(&sj);
    assert_eq!(num(&s, "messages.unique"), 100);
    assert_eq!(num(&s, "recipients.accepted"), 300);
    let d = read_json(&dj);
    assert_eq!(num(&d, "messages.accepted"), 100);
    assert_eq!(d["config"]["pipelining"], pipelining);
    assert_eq!(num(&d, "connections.without_pipelining"), 0);
    (num(&s, "pipelined_groups"), d)
}

#[test]
fn pipelining_on_batches_commands() {
    // MAIL + 3 RCPT + DATA arrive in one read for (nearly) every message.
    let (groups, _) = pipelined_groups(true);
    assert!(
        groups >= 90,
        "only {groups} pipelined groups of 100 messages"
    );
}

#[test]
fn pipelining_off_is_one_command_per_round_trip() {
    let (groups, _) = pipelined_groups(false);
    assert_eq!(groups, 0);
}

#[test]
fn new_connection_per_message() {
    let dir = Scratch::new("newconn");
    let sj = dir.path("sink.json");
    let sink = Sink::start(&["--expect", "20", "--json", sj.to_str().unwrap()]);
    let o = send(&[
        "--target",
        &sink.target(),
        "--messages",
        "20",
        "--connections",
        "2",
        "--new-connection-per-message",
    ]);
    assert!(o.status.success());
    assert!(sink.finish().0.success());
    let s = read_json(&sj);
    assert_eq!(num(&s, "connections.accepted"), 20);
    assert_eq!(num(&s, "messages.unique"), 20);
    assert_eq!(num(&s, "connections.messages_per_connection.max"), 1);
}

#[test]
fn same_run_id_twice_counts_duplicates() {
    let dir = Scratch::new("dups");
    let sj = dir.path("sink.json");
    let sink = Sink::start(&["--json", sj.to_str().unwrap()]);
    for _ in 0..2 {
        let o = send(&[
            "--target",
            &sink.target(),
            "--messages",
            "50",
            "--run-id",
            "abc123",
        ]);
        assert!(o.status.success());
    }
    let (st, _) = sink.stop();
    assert!(st.success());
    let s = read_json(&sj);
    assert_eq!(s["stop_reason"], "signal");
    assert_eq!(num(&s, "messages.received"), 100);
    assert_eq!(num(&s, "messages.unique"), 50);
    assert_eq!(num(&s, "messages.duplicates"), 50);
}

/// Speaks SMTP by hand: one line out, one reply in.
struct Raw {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Raw {
    fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        };
        assert!(r.reply().starts_with("220"));
        r
    }
    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut l = String::new();
            self.r.read_line(&mut l).expect("read reply");
            assert!(l.len() >= 4, "short reply {l:?}");
            all.push_str(&l);
            if l.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }
    fn cmd(&mut self, c: &[u8]) -> String {
        self.w.write_all(c).unwrap();
        self.reply()
    }
}

#[test]
fn sink_counts_foreign_and_corrupted_and_survives_garbage() {
    let dir = Scratch::new("foreign");
    let sj = dir.path("sink.json");
    let sink = Sink::start(&["--json", sj.to_str().unwrap()]);
    let t = sink.target();
    let mut c = Raw::connect(&t);
    assert!(c.cmd(b"EHLO x\r\n").contains("PIPELINING"));
    // Out-of-order and unknown commands, an overlong line, binary junk.
    assert!(c.cmd(b"DATA\r\n").starts_with("503"));
    assert!(c.cmd(b"RCPT TO:<a@b>\r\n").starts_with("503"));
    assert!(c.cmd(b"FROB\r\n").starts_with("502"));
    let mut long = vec![b'A'; 70_000];
    long.extend_from_slice(b"\r\n");
    assert!(c.cmd(&long).starts_with("500"));
    assert!(c.cmd(b"\x00\xff\xfe\r\n").starts_with("502"));
    // A foreign message (a bounce, say).
    for cmd in [&b"MAIL FROM:<>\r\n"[..], b"RCPT TO:<x@y>\r\n"] {
        assert!(c.cmd(cmd).starts_with("250"));
    }
    assert!(c.cmd(b"DATA\r\n").starts_with("354"));
    assert!(c
        .cmd(b"Subject: bounce\r\n\r\nbody\r\n.\r\n")
        .starts_with("250"));
    // A loadgen message whose body does not match its checksum.
    for cmd in [&b"MAIL FROM:<a@b>\r\n"[..], b"RCPT TO:<x@y>\r\n"] {
        assert!(c.cmd(cmd).starts_with("250"));
    }
    assert!(c.cmd(b"DATA\r\n").starts_with("354"));
    let msg =
        b"X-Loadgen-Id: 00000000000000aa-1\r\nX-Loadgen-Checksum: 00000000\r\n\r\naltered\r\n.\r\n";
    assert!(c.cmd(msg).starts_with("250"));
    assert!(c.cmd(b"QUIT\r\n").starts_with("221"));

    // Still serving loadgen afterwards.
    let o = send(&["--target", &t, "--messages", "10"]);
    assert!(o.status.success());
    let (st, _) = sink.stop();
    assert!(st.success());
    let s = read_json(&sj);
    assert_eq!(num(&s, "messages.foreign"), 1);
    assert_eq!(num(&s, "messages.corrupted"), 1);
    assert_eq!(num(&s, "messages.unique"), 10);
    assert!(num(&s, "bad_commands") >= 5);
}
