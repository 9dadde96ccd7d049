//! The SMTP conversation over real sockets, on both I/O drivers: a real client (lettre)
//! gets its messages queued; a fully pipelined raw session gets every reply, in order,
//! with exact codes and enhanced codes (whether the body arrives in the same write as the
//! commands or after the `354`, or one byte per write); commands out of sequence are
//! refused; a client that half-closes after its last command still gets every reply;
//! many concurrent clients pipelining many transactions each get every message
//! queued and counted; a client that pipelines more than the socket buffers hold and reads
//! only later gets every reply, in order (the server's writes wait for room meanwhile); and
//! without `--sink` (no spool yet) DATA is answered `451 4.3.0`.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::thread::sleep;
use std::time::Duration;

use common::{assert_ehlo, assert_sequence, message, wires, Relay, DEFAULT_MAX_SIZE, HOST};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport, Transport};

io_tests!(
    lettre_sends_two_messages,
    pipelined_in_one_write,
    pipelined_body_after_354,
    out_of_sequence_commands,
    byte_at_a_time,
    many_clients_many_transactions,
    half_close_gets_every_reply,
    long_pipeline_read_late,
);

fn lettre_sends_two_messages(io: &str) {
    let mut relay = Relay::start(io, "");
    let transport = SmtpTransport::builder_dangerous("127.0.0.1")
        .port(relay.addr.port())
        .hello_name(ClientId::Domain("client.test".into()))
        .timeout(Some(Duration::from_secs(5)))
        .build();
    let mut ids = Vec::new();
    for i in 0..2 {
        let msg = Message::builder()
            .from("Alice <alice@example.org>".parse().unwrap())
            .to("bob@example.org".parse().unwrap())
            .subject(format!("lettre test {i}"))
            .body(format!("Hello number {i}.\r\n"))
            .unwrap();
        let resp = transport
            .send(&msg)
            .unwrap_or_else(|e| panic!("lettre send {i}: {e}"));
        assert_eq!(u16::from(resp.code()), 250);
        let line = resp.first_line().unwrap_or_default().to_string();
        let id = line
            .strip_prefix("2.0.0 Ok: queued as ")
            .unwrap_or_else(|| panic!("final reply {line:?}"));
        assert_eq!(id.len(), 20, "queue id in {line:?}");
        ids.push(id.to_string());
    }
    assert_ne!(ids[0], ids[1], "two messages, one queue id");
    let totals = relay.stop();
    assert_eq!((totals.messages, totals.recipients), (2, 2), "{totals:?}");
}

/// The commands of the pipelined session, up to and including DATA.
const HEAD: &str = "EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n\
                    RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n";
/// What follows the message's terminator.
const TAIL: &str = "NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\nEXPN x\r\nFOO\r\nQUIT\r\n";

/// A message of about 20 KB (so the pipeline spans several reads), with a dot-stuffed line.
fn big_message() -> String {
    let mut body = String::from("..a line that starts with a dot\r\n");
    for i in 0..250 {
        body.push_str(&format!("line {i:04} {}\r\n", "x".repeat(70)));
    }
    message("pipelined", &body)
}

fn expected_after_ehlo() -> Vec<(u16, &'static str)> {
    vec![
        (250, "2.1.0 Ok"),
        (250, "2.1.5 Ok"),
        (250, "2.1.5 Ok"),
        (354, "End data with <CR><LF>.<CR><LF>"),
        (250, "2.0.0 Ok: queued as "),
        (250, "2.0.0 Ok"),
        (250, "2.0.0 Ok"),
        (252, "2.0.0 Cannot VRFY user"),
        (214, "2.0.0 Commands:"),
        (502, "5.5.1 Error: command not implemented"),
        (500, "5.5.2 Error: command not recognized"),
        (221, "2.0.0 Bye"),
    ]
}

fn check_totals(relay: &mut Relay, msg: &str) {
    let totals = relay.stop();
    assert_eq!((totals.messages, totals.recipients), (1, 2), "{totals:?}");
    // The bytes are the message (unstuffed: one dot less) plus our Received header.
    let content = msg.len() as u64 - 1;
    assert!(
        totals.bytes > content + 50 && totals.bytes < content + 600,
        "{totals:?} for {content} content bytes"
    );
}

fn pipelined_in_one_write(io: &str) {
    let mut relay = Relay::start(io, "");
    let mut c = relay.connect();
    let msg = big_message();
    c.send(format!("{HEAD}{msg}.\r\n{TAIL}"));
    let replies = c.replies_to_eof();
    assert!(!replies.is_empty(), "no replies at all");
    assert_ehlo(&replies[0], DEFAULT_MAX_SIZE);
    assert_sequence(&replies[1..], &expected_after_ehlo());
    replies[5].queued_id();
    check_totals(&mut relay, &msg);
}

fn pipelined_body_after_354(io: &str) {
    let mut relay = Relay::start(io, "");
    let mut c = relay.connect();
    c.send(HEAD);
    let mut replies = Vec::new();
    for _ in 0..5 {
        replies.push(c.reply());
    }
    assert_eq!(replies[4].code, 354, "{:?}", wires(&replies));
    let msg = big_message();
    c.send(format!("{msg}.\r\n{TAIL}"));
    replies.extend(c.replies_to_eof());
    assert_ehlo(&replies[0], DEFAULT_MAX_SIZE);
    assert_sequence(&replies[1..], &expected_after_ehlo());
    check_totals(&mut relay, &msg);
}

fn out_of_sequence_commands(io: &str) {
    let mut relay = Relay::start(io, "");
    let mut c = relay.connect();
    c.expect("MAIL FROM:<a@example.org>", 503, "5.5.1");
    c.expect("DATA", 503, "5.5.1");
    c.cmd("HELO client.test").assert_is(&format!("250 {HOST}"));
    c.expect("RCPT TO:<b@example.org>", 503, "5.5.1");
    c.expect("DATA", 503, "5.5.1");
    c.expect("MAIL FROM:<a@example.org>", 250, "2.1.0");
    c.expect("MAIL FROM:<a@example.org>", 503, "5.5.1");
    c.expect("DATA", 503, "5.5.1");
    c.expect("MAIL FROM:<a@example.org> FROB=1", 555, "5.5.4");
    c.expect("RCPT TO:<not an address>", 501, "5.5.4");
    // Eight errors so far. RSET ends the transaction, so RCPT is out of sequence again.
    c.expect("RSET", 250, "2.0.0");
    c.expect("RCPT TO:<b@example.org>", 503, "5.5.1");
    // The tenth error (limits.max_errors defaults to 10) is answered, then 421 and close.
    c.expect("FOO", 500, "5.5.2");
    c.reply()
        .assert_is(&format!("421 4.7.0 {HOST} Error: too many errors"));
    c.expect_eof();
    let totals = relay.stop();
    assert_eq!(totals.messages, 0);
}

fn byte_at_a_time(io: &str) {
    let mut relay = Relay::start(io, "");
    let mut c = relay.connect();
    let msg = message("slow", "..one dot\r\nend");
    let session = format!("{HEAD}{msg}.\r\nQUIT\r\n");
    for b in session.as_bytes() {
        c.send([*b]);
        sleep(Duration::from_millis(1));
    }
    let replies = c.replies_to_eof();
    assert!(!replies.is_empty(), "no replies at all");
    assert_ehlo(&replies[0], DEFAULT_MAX_SIZE);
    assert_sequence(
        &replies[1..],
        &[
            (250, "2.1.0"),
            (250, "2.1.5"),
            (250, "2.1.5"),
            (354, ""),
            (250, "2.0.0 Ok: queued as "),
            (221, "2.0.0"),
        ],
    );
    let totals = relay.stop();
    assert_eq!((totals.messages, totals.recipients), (1, 2), "{totals:?}");
}

/// 8 clients at once, each pipelining 30 transactions of about 1 KB in a single write.
fn many_clients_many_transactions(io: &str) {
    const CLIENTS: usize = 8;
    const EACH: usize = 30;
    let mut relay = Relay::start(io, "");
    let body = format!("{}\r\n", "z".repeat(1000));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let mut c = relay.connect();
            let msg = message(&format!("client {n}"), &body);
            std::thread::spawn(move || {
                let mut session = String::from("EHLO client.test\r\n");
                for i in 0..EACH {
                    session.push_str(&format!(
                        "MAIL FROM:<c{n}@example.org>\r\nRCPT TO:<r{i}@example.org>\r\nDATA\r\n{msg}.\r\n"
                    ));
                }
                session.push_str("QUIT\r\n");
                c.send(session);
                c.replies_to_eof()
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in threads {
        let replies = t.join().expect("client thread");
        assert_ehlo(&replies[0], DEFAULT_MAX_SIZE);
        let mut expected = Vec::new();
        for _ in 0..EACH {
            expected.extend([
                (250, "2.1.0"),
                (250, "2.1.5"),
                (354, ""),
                (250, "2.0.0 Ok: queued as "),
            ]);
        }
        expected.push((221, "2.0.0"));
        assert_sequence(&replies[1..], &expected);
        for r in replies.iter().filter(|r| r.is_queued()) {
            assert!(
                ids.insert(r.queued_id()),
                "queue id given twice: {}",
                r.wire()
            );
        }
    }
    let totals = relay.stop();
    let n = (CLIENTS * EACH) as u64;
    assert_eq!((totals.messages, totals.recipients), (n, n), "{totals:?}");
}

/// The client writes everything, then shuts its sending side down (no QUIT): every reply
/// still comes, and a message cut off by the EOF is not accepted.
fn half_close_gets_every_reply(io: &str) {
    let mut relay = Relay::start(io, "");
    let tx = format!(
        "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n{}.\r\n",
        message("half close", "hello")
    );
    let unfinished = "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: cut";
    for tail in ["", unfinished] {
        let mut c = relay.connect();
        c.send(format!("EHLO client.test\r\n{tx}{tail}"));
        c.shutdown_write();
        let replies = c.replies_to_eof();
        let mut expected = vec![
            (250, "2.1.0"),
            (250, "2.1.5"),
            (354, ""),
            (250, "2.0.0 Ok: queued as "),
        ];
        if !tail.is_empty() {
            expected.extend([(250, "2.1.0"), (250, "2.1.5"), (354, "")]);
        }
        assert!(!replies.is_empty(), "no replies at all");
        assert_ehlo(&replies[0], DEFAULT_MAX_SIZE);
        assert_sequence(&replies[1..], &expected);
    }
    let totals = relay.stop();
    assert_eq!((totals.messages, totals.recipients), (2, 2), "{totals:?}");
}

/// About 1.4 MB of replies to 600 KB of commands, far more than loopback's socket buffers
/// hold while the client is not reading: the server's writes wait for room (and its reads
/// stop meanwhile), and no reply may be dropped, repeated or overtaken by the next. (Short
/// writes themselves are tested in `runtime::uring`.)
fn long_pipeline_read_late(io: &str) {
    const NOOPS: usize = 100_000;
    // Far past the default junk-command limit (100), which would end the session first.
    let mut relay = Relay::start(io, "[limits]\nmax_junk_commands = 1000000\n");
    let mut c = relay.connect();
    let mut writer = c.stream.try_clone().expect("clone the client socket");
    let sender = std::thread::spawn(move || {
        let mut batch = String::from("EHLO client.test\r\n");
        for _ in 0..NOOPS {
            batch.push_str("NOOP\r\n");
        }
        batch.push_str("QUIT\r\n");
        writer.write_all(batch.as_bytes())
    });
    // Not reading yet: the server's replies fill both socket buffers, and then it stops
    // reading the commands until the client catches up.
    sleep(Duration::from_millis(500));
    let replies = c.replies_to_eof();
    sender
        .join()
        .expect("writer thread")
        .expect("every command written");
    assert_eq!(
        replies.len(),
        NOOPS + 2,
        "replies to EHLO, the NOOPs and QUIT"
    );
    assert_ehlo(&replies[0], DEFAULT_MAX_SIZE);
    for (i, r) in replies[1..=NOOPS].iter().enumerate() {
        assert_eq!(r.wire(), "250 2.0.0 Ok", "reply {} of {NOOPS}", i + 1);
    }
    replies[NOOPS + 1].assert(221, "2.0.0");
    relay.stop();
}
