//! Bounces, on both I/O drivers: the next hop for `example.test` answers every message
//! `554 5.3.0` (`loadgen sink --permfail-pct 100`); the route for `bounces.test` goes to
//! an in-process capturing server (the library API).
//!
//! - A message from `sender@bounces.test` to `rcpt@example.test` is tried once (a 5xx is
//!   not retried) and produces exactly one bounce: from `<>` to the sender, an RFC 3464 /
//!   RFC 6522 `multipart/report; report-type=delivery-status` with a human-readable part,
//!   a `message/delivery-status` part (Reporting-MTA, Final-Recipient, `Action: failed`, a
//!   5.x.x Status) and a `text/rfc822-headers` part with the original's header (its
//!   distinctive Subject and Message-ID) but not its body.
//! - A message from `<>` that permfails produces no bounce at all.
//! - A message that outlives `max_queue_age_secs` (2 s, next hop refusing connections) is
//!   given up with exactly one bounce of the same form (Action: failed).
//!
//! Several retry periods pass after each, so a second bounce would be seen.

mod common;

use std::time::Duration;

use common::*;
use ringrelay::ReversePath;

io_tests!(permanent_failure_bounces_once, expired_message_bounces_once);

const BODY_MARKER: &str = "BODY-MARKER-not-in-the-headers";

/// An original with a distinctive Subject and Message-ID, and a body line to look for.
fn original(subject: &str, message_id: &str) -> String {
    format!(
        "From: <sender@bounces.test>\r\nTo: <rcpt@example.test>\r\nSubject: {subject}\r\n\
         Message-ID: {message_id}\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n\
         {BODY_MARKER}\r\n.a stuffed line\r\n"
    )
}

fn permanent_failure_bounces_once(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let mut refusing = Sink::start(&["--permfail-pct", "100"]);
    let capture = Capture::start(io);
    let mut relay = Relay::start_with(Opts::relay(
        io,
        &spool,
        &[
            ("example.test", refusing.addr),
            ("bounces.test", capture.addr),
        ],
        &[1],
        "",
    ));
    let subject = format!("Distinctive subject 7f3a9 ({io})");
    let message_id = format!("<original-7f3a9-{io}@client.test>");
    let body_marker = BODY_MARKER;
    let original = original(&subject, &message_id);
    let reply = send_one(
        relay.addr,
        "sender@bounces.test",
        &["rcpt@example.test"],
        original.as_bytes(),
    );
    let original_id = reply.queued_id();

    let seen = capture.wait_for(1, Duration::from_secs(10));
    let bounce = &seen[0];
    assert_eq!(bounce.from, ReversePath::Null, "a bounce comes from <>");
    let to: Vec<&str> = bounce.to.iter().map(|m| m.as_str()).collect();
    assert_eq!(
        to,
        ["sender@bounces.test"],
        "a bounce goes to the reverse path"
    );
    let text = String::from_utf8_lossy(&bounce.data).into_owned();
    check_dsn(
        &text,
        &subject,
        &message_id,
        body_marker,
        &original_id,
        &Expect {
            status_classes: &["5"],
            diagnostic: Some("554"),
        },
    );

    // A message from <> that fails for good: no bounce.
    let (_, null_msg) = verifiable_message("00000000000b0c0e", 1, "Subject: from null\r\n", 100);
    send_one(relay.addr, "", &["rcpt2@example.test"], &null_msg).queued_id();

    wait_queue_empty(&spool, Duration::from_secs(10));
    // Several retry periods: no second bounce, nothing for <>.
    std::thread::sleep(Duration::from_millis(3500));
    let seen = capture.envelopes();
    assert_eq!(
        seen.len(),
        1,
        "exactly one bounce expected (none for the <> sender); got {}:\n{}",
        seen.len(),
        seen.iter()
            .map(|e| format!(
                "from <{}> to {:?}:\n{}",
                e.from,
                e.to,
                String::from_utf8_lossy(&e.data)
            ))
            .collect::<Vec<_>>()
            .join("\n-----\n")
    );
    wait_no_segments(&spool, Duration::from_secs(5));
    let (code, report) = refusing.stop();
    assert_eq!(code, Some(0));
    assert_eq!(
        (
            jnum(&report, "messages.permfailed"),
            jnum(&report, "messages.received")
        ),
        (2, 0),
        "each message tried once at the refusing hop (a 5xx is final): {report:#}"
    );
    relay.terminate();
}

/// `max_queue_age_secs = 2` and a next hop that refuses connections: after about 2 s of
/// retries (every second) the message is given up, with exactly one bounce (Action: failed),
/// and the queue ends empty.
fn expired_message_bounces_once(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let capture = Capture::start(io);
    let dead = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut relay = Relay::start_with(Opts::relay(
        io,
        &spool,
        &[("example.test", dead), ("bounces.test", capture.addr)],
        &[1],
        "max_queue_age_secs = 2",
    ));
    let subject = format!("Expiring subject 51c2e ({io})");
    let message_id = format!("<expiring-51c2e-{io}@client.test>");
    let original_id = send_one(
        relay.addr,
        "sender@bounces.test",
        &["rcpt@example.test"],
        original(&subject, &message_id).as_bytes(),
    )
    .queued_id();
    let seen = capture.wait_for(1, Duration::from_secs(10));
    assert_eq!(seen[0].from, ReversePath::Null);
    let text = String::from_utf8_lossy(&seen[0].data).into_owned();
    check_dsn(
        &text,
        &subject,
        &message_id,
        BODY_MARKER,
        &original_id,
        &Expect {
            status_classes: &["4", "5"],
            diagnostic: None,
        },
    );
    wait_queue_empty(&spool, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        capture.envelopes().len(),
        1,
        "one bounce for an expired message"
    );
    relay.terminate();
}

/// A MIME entity: unfolded header fields (lowercase names) and the body.
struct Entity<'a> {
    headers: Vec<(String, String)>,
    body: &'a str,
}

impl Entity<'_> {
    fn parse(text: &str) -> Entity<'_> {
        let (head, body) =
            text.split_once("\r\n\r\n")
                .unwrap_or_else(|| match text.strip_prefix("\r\n") {
                    Some(rest) => ("", rest),
                    None => (text, ""),
                });
        Entity {
            headers: fields(head),
            body,
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The lowercase media type, `text/plain` by default.
    fn media_type(&self) -> String {
        self.get("content-type")
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_else(|| "text/plain".into())
    }

    /// A Content-Type parameter, unquoted.
    fn param(&self, name: &str) -> Option<String> {
        let ct = self.get("content-type")?;
        ct.split(';').skip(1).find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().trim_matches('"').to_string())
        })
    }
}

/// Every value of the field `name` (lowercase).
fn all_values<'a>(fields: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    fields
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Header fields (`Name: value` lines, folded lines joined), names lowercased.
fn fields(block: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in block.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((n, v)) = line.split_once(':') {
            out.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    out
}

/// What the delivery-status part must say about the one failed recipient.
struct Expect<'a> {
    /// Allowed first digits of `Status:`.
    status_classes: &'a [&'a str],
    /// Text the `Diagnostic-Code:`, if any, must contain.
    diagnostic: Option<&'a str>,
}

fn check_dsn(
    text: &str,
    subject: &str,
    message_id: &str,
    body_marker: &str,
    original_id: &str,
    expect: &Expect,
) {
    let top = Entity::parse(text);
    let ctx = || format!("the bounce:\n{text}");
    assert_eq!(top.media_type(), "multipart/report", "{}", ctx());
    assert_eq!(
        top.param("report-type")
            .map(|s| s.to_ascii_lowercase())
            .as_deref(),
        Some("delivery-status"),
        "{}",
        ctx()
    );
    for required in ["from", "date"] {
        assert!(
            top.get(required).is_some(),
            "RFC 5322 requires {required}: in {}",
            ctx()
        );
    }
    let boundary = top
        .param("boundary")
        .unwrap_or_else(|| panic!("no boundary: {}", ctx()));
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut closed = false;
    for piece in top.body.split(delimiter.as_str()).skip(1) {
        if piece.starts_with("--") {
            closed = true;
            break;
        }
        let piece = piece.strip_prefix("\r\n").unwrap_or(piece);
        let piece = piece.strip_suffix("\r\n").unwrap_or(piece);
        parts.push(Entity::parse(piece));
    }
    assert!(closed, "no closing delimiter {delimiter}--: {}", ctx());
    let types: Vec<String> = parts.iter().map(Entity::media_type).collect();
    assert_eq!(
        types,
        [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers"
        ],
        "RFC 6522 part order (human-readable, report, returned headers): {}",
        ctx()
    );

    // The machine-readable report: per-message fields, then one block per recipient.
    let status_fields = fields(&parts[1].body.replace("\r\n\r\n", "\r\n"));
    let squashed = |name: &str| -> Vec<String> {
        all_values(&status_fields, name)
            .into_iter()
            .map(|s| s.replace([' ', '\t'], "").to_ascii_lowercase())
            .collect()
    };
    assert_eq!(
        squashed("reporting-mta"),
        [format!("dns;{HOST}")],
        "{}",
        ctx()
    );
    assert_eq!(
        squashed("final-recipient"),
        ["rfc822;rcpt@example.test"],
        "{}",
        ctx()
    );
    assert_eq!(squashed("action"), ["failed"], "{}", ctx());
    let status = all_values(&status_fields, "status");
    let ok = status.len() == 1 && {
        let p: Vec<&str> = status[0].trim().split('.').collect();
        p.len() == 3
            && expect.status_classes.contains(&p[0])
            && p[1..]
                .iter()
                .all(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()))
    };
    assert!(
        ok,
        "Status must be one x.y.z with x in {:?}, got {status:?}: {}",
        expect.status_classes,
        ctx()
    );
    if let (Some(diag), Some(want)) = (
        all_values(&status_fields, "diagnostic-code").first(),
        expect.diagnostic,
    ) {
        assert!(
            diag.contains(want),
            "Diagnostic-Code should carry the next hop's reply ({want}): {diag}"
        );
    }

    // The returned header, without the body.
    let returned = parts[2].body;
    assert!(
        returned.contains(&format!("Subject: {subject}\r\n")),
        "the original's Subject: {}",
        ctx()
    );
    assert!(
        returned.contains(&format!("Message-ID: {message_id}\r\n")),
        "the original's Message-ID: {}",
        ctx()
    );
    assert!(
        !returned.contains(body_marker),
        "text/rfc822-headers must hold the header only, not the body: {}",
        ctx()
    );
    assert!(
        text.contains(original_id),
        "the bounce should name the original's queue ID {original_id}: {}",
        ctx()
    );
    eprintln!(
        "bounce for {original_id}: Status {}, {} bytes",
        status[0],
        text.len()
    );
}
