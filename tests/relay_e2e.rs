//! End to end through the relay (store and forward), on both I/O drivers.
//!
//! - `loadgen send` pushes 500 messages (2 recipients each, 10 pipelined connections) into
//!   `ringrelay serve` with its spool on disk; the relay forwards them to `loadgen sink`
//!   (`--route example.test=SINK`). The sink must see every acknowledged message exactly
//!   once and intact (checksums), both recipients in one transaction, over pooled and
//!   pipelined connections; afterwards `queue stats` shows an empty queue and the spool
//!   holds no segment file.
//! - One message sent with lettre reaches an in-process capturing server whole, carrying
//!   the relay's `Received:` line with the queue ID lettre was given.

mod common;

use std::time::{Duration, Instant};

use common::*;
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport, Transport};

io_tests!(loadgen_through_the_relay, lettre_through_the_relay);

const N: u64 = 500;

fn loadgen_through_the_relay(io: &str) {
    let t0 = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let manifest = work.path().join("manifest");
    let m = manifest.to_str().unwrap();
    let mut sink = Sink::start(&[
        "--expect",
        &N.to_string(),
        "--check-manifest",
        m,
        "--timeout",
        "90",
    ]);
    let mut relay = Relay::start_with(Opts::relay(
        io,
        &spool,
        &[("example.test", sink.addr)],
        &[1],
        "",
    ));
    let sent = SendRun::run(
        relay.addr,
        &[
            "--messages",
            &N.to_string(),
            "--connections",
            "10",
            "--domain",
            "example.test",
            "--rcpts",
            "2",
            "--pipelining",
            "--manifest",
            m,
            "--timeout",
            "30",
            "--give-up-after",
            "10",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(sent.code, Some(0), "loadgen send: {}", sent.output);
    assert_eq!(
        jnum(&sent.json, "messages.accepted"),
        N,
        "every message must get 250 from the relay: {:#}",
        sent.json
    );
    let accepted_at = t0.elapsed();

    let Some(status) = sink.try_wait_exit(Duration::from_secs(60)) else {
        panic!(
            "the sink did not get {N} unique messages within 60 s; queue: {:#}\nrelay log:\n{}\nsink:\n{}",
            queue_stats(&spool),
            relay.stderr(),
            sink.output()
        );
    };
    let report = sink.report();
    assert_eq!(
        status.code(),
        Some(0),
        "sink: {}\n{report:#}",
        sink.output()
    );
    assert_eq!(jnum(&report, "messages.unique"), N, "{report:#}");
    assert_eq!(jnum(&report, "messages.duplicates"), 0, "{report:#}");
    assert_eq!(jnum(&report, "messages.corrupted"), 0, "{report:#}");
    assert_eq!(jnum(&report, "messages.foreign"), 0, "{report:#}");
    assert_eq!(
        jnum(&report, "recipients.accepted"),
        2 * N,
        "both recipients of each message, in one transaction: {report:#}"
    );
    assert_eq!(jnum(&report, "manifest.lost"), 0, "{report:#}");
    assert_eq!(jnum(&report, "manifest.corrupted"), 0, "{report:#}");
    // Pooling: at most max_connections_per_destination (16) per shard (2), each carrying
    // message after message; pipelining: MAIL, RCPTs and DATA arrive in one write.
    let conns = jnum(&report, "connections.accepted");
    assert!(
        (1..=32).contains(&conns),
        "{conns} connections for {N} messages: the pool should keep at most 16 per shard; {report:#}"
    );
    assert!(
        jnum(&report, "pipelined_groups") > 0,
        "the sink advertises PIPELINING but saw no pipelined group: {report:#}"
    );
    let delivered_at = t0.elapsed();

    let stats = wait_queue_empty(&spool, Duration::from_secs(5));
    assert_eq!(jnum(&stats, "recipients"), 0, "{stats:#}");
    wait_no_segments(&spool, Duration::from_secs(5));
    relay.terminate();
    eprintln!(
        "e2e ({io}): {N} accepted in {accepted_at:.1?}, delivered by {delivered_at:.1?} over {conns} connection(s), spool empty by {:.1?}",
        t0.elapsed()
    );
}

fn lettre_through_the_relay(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let capture = Capture::start(io);
    let mut relay = Relay::start_with(Opts::relay(
        io,
        &spool,
        &[("lettre.test", capture.addr)],
        &[1],
        "",
    ));
    let transport = SmtpTransport::builder_dangerous("127.0.0.1")
        .port(relay.addr.port())
        .hello_name(ClientId::Domain("client.test".into()))
        .timeout(Some(Duration::from_secs(10)))
        .build();
    let subject = format!("lettre through ringrelay {io}");
    let msg = Message::builder()
        .from("Sender <sender@client.test>".parse().unwrap())
        .to("dest@lettre.test".parse().unwrap())
        .subject(subject.clone())
        .body(String::from(
            "First line.\r\n.a line with a leading dot\r\n.\r\nLast line.\r\n",
        ))
        .unwrap();
    let resp = transport.send(&msg).expect("lettre send to the relay");
    let id = resp
        .first_line()
        .and_then(|l| l.strip_prefix("2.0.0 Ok: queued as "))
        .unwrap_or_else(|| panic!("lettre got {resp:?}"))
        .to_string();

    let seen = capture.wait_for(1, Duration::from_secs(10));
    let e = &seen[0];
    assert_eq!(e.from.to_string(), "sender@client.test");
    let to: Vec<String> = e.to.iter().map(|m| m.as_str().to_string()).collect();
    assert_eq!(to, ["dest@lettre.test"]);
    assert_eq!(&*e.helo, HOST, "the relay's EHLO name is its host name");
    let data = String::from_utf8_lossy(&e.data);
    assert!(
        data.contains(&format!(
            "Received: from client.test ([127.0.0.1])\r\n\tby {HOST} (ringrelay) with ESMTP id {id}\r\n"
        )),
        "the relay's Received: line with queue id {id}: {data}"
    );
    assert!(data.contains(&format!("Subject: {subject}\r\n")), "{data}");
    assert!(
        data.contains("\r\n\r\nFirst line.\r\n.a line with a leading dot\r\n.\r\nLast line.\r\n"),
        "body changed on the way (dot-stuffing?): {data:?}"
    );

    wait_queue_empty(&spool, Duration::from_secs(5));
    wait_no_segments(&spool, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        capture.envelopes().len(),
        1,
        "delivered more than once: {:#?}",
        capture.envelopes()
    );
    relay.terminate();
}
