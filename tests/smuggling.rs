//! SMTP smuggling (CVE-2023-51764) over real sockets, on both I/O drivers.
//!
//! A message holds a fake end of data (`\n.\n`, `\n.\r\n`, `\r.\r`, `\r\n.\n`, `\r\n.\r`)
//! followed by a smuggled transaction (`MAIL`/`RCPT`/`DATA`/content), then the real
//! `\r\n.\r\n`. The server must take the whole thing as one message with bare line endings
//! and refuse it with `550 5.5.2` after the real terminator: no `250 2.0.0 Ok: queued` and
//! no reply to any smuggled command. The session must stay usable (a clean transaction after
//! it is queued), and the sink's count on shutdown must be exactly the clean messages.
//! Each case runs twice: everything in one write, and step by step with the payload split
//! in the middle of the fake terminator.

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::{assert_ehlo, assert_sequence, message, wires, Relay, DEFAULT_MAX_SIZE};

io_tests!(smuggled_transactions_are_refused);

const FAKES: [&str; 5] = ["\n.\n", "\n.\r\n", "\r.\r", "\r\n.\n", "\r\n.\r"];

const SMUGGLED: &str =
    "MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nsmuggled\r\n";

const BARE: (u16, &str) = (550, "5.5.2 Error: bare <CR> or <LF> in message");

fn payload(fake: &str) -> (String, String) {
    let head = "From: a@example.org\r\nSubject: smuggling\r\n\r\nhello".to_string();
    (head, format!("{fake}{SMUGGLED}\r\n.\r\n"))
}

/// The clean message that follows each attempt.
fn clean_message() -> String {
    message("clean", "a clean message")
}

/// The clean message on the wire: nothing to stuff, and the terminator.
fn clean() -> String {
    format!("{}.\r\n", clean_message())
}

fn smuggled_transactions_are_refused(io: &str) {
    let mut relay = Relay::start(io, "");
    for fake in FAKES {
        one_write(&relay, fake);
        step_by_step(&relay, fake);
    }
    let totals = relay.stop();
    let clean_messages = 2 * FAKES.len() as u64;
    assert_eq!(
        (totals.messages, totals.recipients),
        (clean_messages, clean_messages),
        "the sink took more than the clean messages: {totals:?}"
    );
}

/// The whole session, smuggling attempt and a clean transaction, in a single write.
fn one_write(relay: &Relay, fake: &str) {
    let mut c = relay.connect();
    let (head, rest) = payload(fake);
    c.send(format!(
        "EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n\
         {head}{rest}\
         MAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n{}QUIT\r\n",
        clean()
    ));
    let replies = c.replies_to_eof();
    let context = format!("fake {fake:?}, one write: {:#?}", wires(&replies));
    assert!(!replies.is_empty(), "{context}");
    assert_ehlo(&replies[0], DEFAULT_MAX_SIZE);
    let queued = replies.iter().filter(|r| r.is_queued()).count();
    assert_eq!(queued, 1, "only the clean message may be queued; {context}");
    assert_sequence(
        &replies[1..],
        &[
            (250, "2.1.0"),
            (250, "2.1.5"),
            (354, ""),
            BARE,
            (250, "2.1.0"),
            (250, "2.1.5"),
            (354, ""),
            (250, "2.0.0 Ok: queued as "),
            (221, "2.0.0"),
        ],
    );
}

/// Replies awaited one by one; the payload arrives in three writes, cut right after the
/// first byte of the fake terminator and again after the smuggled commands.
fn step_by_step(relay: &Relay, fake: &str) {
    let mut c = relay.connect();
    c.ehlo(DEFAULT_MAX_SIZE);
    c.start_data("a@example.org", &["b@example.org"]);
    let (head, rest) = payload(fake);
    let (cut1, cut2) = (1, fake.len() + SMUGGLED.len());
    c.send(format!("{head}{}", &rest[..cut1]));
    sleep(Duration::from_millis(20));
    c.send(&rest[cut1..cut2]);
    sleep(Duration::from_millis(20));
    c.send(&rest[cut2..]);
    let r = c.reply();
    assert!(
        r.code == BARE.0 && r.text().starts_with(BARE.1),
        "fake {fake:?}, step by step: expected {BARE:?}, got {:?}",
        r.wire()
    );
    // Replies are never reordered, so the next one must answer NOOP: nothing smuggled
    // produced a reply of its own.
    let r = c.cmd("NOOP");
    assert!(
        r.code == 250 && r.text() == "2.0.0 Ok",
        "fake {fake:?}: a reply after the 550 that is not NOOP's: {:?}",
        r.wire()
    );
    c.transaction(
        "c@example.org",
        &["d@example.org"],
        clean_message().as_bytes(),
    )
    .queued_id();
    c.expect("QUIT", 221, "2.0.0");
    c.expect_eof();
}
