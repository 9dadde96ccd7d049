//! Bounces and the other delivery status notifications (RFC 3464) sent to a message's
//! reverse path: failures (`Action: failed`), and, when the sender asked for them with
//! NOTIFY (RFC 3461), delays (`delayed`) and successful relays to a next hop without DSN
//! (`relayed`).
//!
//! [`build_bounce`] turns a [`BounceInput`] into a complete message, a
//! `multipart/report; report-type=delivery-status` (RFC 6522) of three parts: a short
//! explanation for people, the `message/delivery-status` fields for programs (with the
//! sender's ENVID as `Original-Envelope-Id` and each ORCPT as `Original-Recipient`), and
//! the original header section as `text/rfc822-headers`, or, for a failure report whose
//! sender asked for `RET=FULL`, the whole message as `message/rfc822` when it is 7-bit
//! with lines of at most 998 octets and no larger than the 128 KiB cap (else the headers). It does no I/O and reads no clock. The
//! caller spools the result like any other message, with the null reverse path `<>` so that
//! a bounce can never bounce, and never builds a bounce for a message whose own reverse
//! path was `<>`.
//!
//! Whatever the input, the output is 7-bit ASCII with CRLF line endings and no line over
//! 998 octets (RFC 5322 §2.1.1), so it is valid SMTP content for any next hop. Text that
//! came from peers (reply text, next-hop names, the original headers) is distrusted: it is
//! reduced to printable ASCII and kept on its own logical line, so it cannot inject a
//! header field or end a MIME part early.
//!
//! Standards: RFC 3464 (DSN format), RFC 3463 (enhanced status codes), RFC 6522
//! (`multipart/report`), RFC 2046 (multipart boundaries), RFC 3834 (`Auto-Submitted`),
//! RFC 5322 (message format).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::id::QueueId;
use crate::smtp::received::write_rfc5322_date;
use crate::smtp::reply::is_enhanced_status;
use crate::smtp::{Mailbox, Reply};

/// Longest line the bounce may contain, CRLF excluded (RFC 5322 §2.1.1).
const MAX_LINE: usize = 998;
/// Where our own header fields and text are folded or wrapped (RFC 5322 §2.1.1 "SHOULD").
const WRAP_AT: usize = 78;
/// Longest piece of an unbreakable word on one line; the rest goes on the next line.
/// Leaves room for a field name or an indent, so no line passes [`MAX_LINE`].
const MAX_WORD: usize = 900;
/// Most characters copied from one peer-supplied value (reply, reason, next-hop name).
const MAX_VALUE: usize = 2000;
/// Most characters of an address copied (a valid path is at most 256).
const MAX_ADDRESS: usize = 512;
/// Most octets of the original header section returned; the rest is cut at a line end.
const MAX_RETURNED_HEADERS: usize = 128 * 1024;
/// Most characters of `unique` in the boundary and Message-ID (a boundary is at most 70
/// characters, RFC 2046 §5.1.1).
const MAX_TOKEN: usize = 32;
/// The per-message DSN field (an RFC 3464 extension field) carrying the original queue ID.
const QUEUE_ID_FIELD: &str = "X-Ringrelay-Queue-ID";

/// What a report says happened to a recipient (RFC 3464 §2.3.3 `Action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Action {
    /// Failed for good.
    #[default]
    Failed,
    /// Not delivered yet, still being retried.
    Delayed,
    /// Handed to a next hop that does not offer DSN, so no further report will come.
    Relayed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Relayed => "relayed",
        }
    }
}

/// A recipient a report is about (the name stays from when every report was a bounce).
#[derive(Debug, Clone)]
pub struct FailedRecipient {
    /// What happened to it.
    pub action: Action,
    /// The sender's ORCPT, `type;address` (becomes `Original-Recipient`).
    pub original_recipient: Option<String>,
    /// The original recipient.
    pub recipient: Mailbox,
    /// RFC 3463 status, e.g. "5.1.1" (taken from the remote reply's enhanced code when it
    /// has one, else derived: 5.0.0 for a 5xx, 4.4.7 for a give-up after max queue age).
    /// Anything not of the form `[245].ddd.ddd` (1–3 digits each) is reported as `5.0.0`.
    pub status: String,
    /// The remote server's reply, if one was received (becomes `Diagnostic-Code: smtp; …`).
    pub remote_reply: Option<Reply>,
    /// The next hop that gave the reply, e.g. "mx.example.net" (becomes
    /// `Remote-MTA: dns; …`).
    pub remote_mta: Option<String>,
    /// Human explanation for the text part, e.g. "the next hop refused it" / "gave up
    /// after 5 days".
    pub reason: String,
}

/// Everything a bounce is made from.
#[derive(Debug, Clone, Copy)]
pub struct BounceInput<'a> {
    /// Our host name (Reporting-MTA, the From: address's domain, Message-ID's domain).
    /// Characters other than letters, digits, `-` and `.` are dropped.
    pub reporting_mta: &'a str,
    /// The bounced message's queue ID, named in the text part and in the per-message
    /// `X-Ringrelay-Queue-ID` field of the delivery-status part.
    pub original_id: QueueId,
    /// Where the bounce goes: the original reverse path.
    pub to: &'a Mailbox,
    /// When the original message arrived (`Arrival-Date`).
    pub arrival: SystemTime,
    /// Now: the bounce's `Date:` and each recipient's `Last-Attempt-Date`.
    pub now: SystemTime,
    /// The recipients that failed (at least one; with none the report has no
    /// per-recipient fields, which RFC 3464 does not allow).
    pub failed: &'a [FailedRecipient],
    /// The original message (headers + body, CRLF). Only its header section goes into the
    /// report, as `text/rfc822-headers`, unless `return_full` and it can go whole.
    pub original: &'a [u8],
    /// The sender asked for the full message in failure reports (`RET=FULL`).
    pub return_full: bool,
    /// The sender's ENVID (becomes `Original-Envelope-Id`).
    pub envid: Option<&'a str>,
    /// A value unique to this bounce, used to make the MIME boundary and Message-ID
    /// (e.g. the bounce's own queue ID printed). Its first 32 characters are used, with
    /// anything but letters, digits and `-` hex-escaped.
    pub unique: &'a str,
}

/// Builds the complete bounce message (headers + body, CRLF line endings, no line over 998
/// octets, 7-bit ASCII). Lines are not dot-stuffed: the spool and the SMTP client do that.
///
/// The original header section is normalised (bare LF to CRLF, control characters to
/// spaces, 8-bit bytes to `?`), folded where a line is over 998 octets, and cut at a line
/// end after 128 KiB.
pub fn build_bounce(input: &BounceInput<'_>) -> Bytes {
    let host = host_name(input.reporting_mta);
    let token = token(input.unique);
    let kind = kind_of(input.failed);
    let notification = notification_part(input, &host, kind);
    let report = report_part(input, &host);
    let full = (input.return_full && kind == Action::Failed)
        .then(|| returnable_whole(input.original))
        .flatten();
    let headers;
    let (returned_type, returned_description, returned): (&str, &str, &[u8]) = match full {
        Some(whole) => ("message/rfc822", "Undelivered message", whole),
        None => {
            headers = returned_headers(input.original);
            let description = match kind {
                Action::Failed => "Undelivered message headers",
                Action::Delayed | Action::Relayed => "Message headers",
            };
            ("text/rfc822-headers", description, &headers)
        }
    };
    let parts: [(&str, &str, &[u8]); 3] = [
        (
            "text/plain; charset=us-ascii",
            "Notification",
            notification.as_bytes(),
        ),
        (
            "message/delivery-status",
            "Delivery report",
            report.as_bytes(),
        ),
        (returned_type, returned_description, returned),
    ];
    let boundary = choose_boundary(&token, parts.iter().map(|p| p.2));

    let mut head = String::with_capacity(1024);
    let from = format!("Mail Delivery System <MAILER-DAEMON@{host}>");
    push_field(&mut head, "From", &from);
    push_field_verbatim(&mut head, "To", &format!("<{}>", address(input.to)));
    let subject = match kind {
        Action::Failed => "Undelivered Mail Returned to Sender",
        Action::Delayed => "Delayed Mail (still being retried)",
        Action::Relayed => "Successful Mail Delivery Report",
    };
    push_field(&mut head, "Subject", subject);
    push_field(&mut head, "Date", &date(input.now));
    let message_id = format!("<{}.{token}@{host}>", unix_secs(input.now));
    push_field(&mut head, "Message-ID", &message_id);
    push_field(&mut head, "Auto-Submitted", "auto-replied");
    push_field(&mut head, "MIME-Version", "1.0");
    let content_type =
        format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\"");
    push_field(&mut head, "Content-Type", &content_type);
    head.push_str("\r\nThis is a MIME-encapsulated message.\r\n");

    let body_len: usize = parts.iter().map(|p| p.2.len() + 200).sum();
    let mut out = Vec::with_capacity(head.len() + body_len);
    out.extend_from_slice(head.as_bytes());
    for (content_type, description, body) in parts {
        // Every body ends in CRLF (or is empty); the CRLF before "--" belongs to the
        // delimiter (RFC 2046 §5.1.1).
        out.extend_from_slice(b"\r\n--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"\r\nContent-Type: ");
        out.extend_from_slice(content_type.as_bytes());
        out.extend_from_slice(b"\r\nContent-Description: ");
        out.extend_from_slice(description.as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
    }
    out.extend_from_slice(b"\r\n--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
    Bytes::from(out)
}

/// The original message's header section: everything up to and including the first empty
/// line (CRLF CRLF), or the whole message if it has no body. Tolerates a message that is
/// all headers, bare LFs, or garbage; never panics.
///
/// A line ending is LF with or without a CR before it, so `"A: b\n\nbody"` gives
/// `"A: b\n\n"`.
pub fn header_section(message: &[u8]) -> &[u8] {
    let mut start = 0;
    while start < message.len() {
        let rest = &message[start..];
        if rest.starts_with(b"\n") {
            return &message[..start + 1];
        }
        if rest.starts_with(b"\r\n") {
            return &message[..start + 2];
        }
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => start += i + 1,
            None => break,
        }
    }
    message
}

/// What the report is about as a whole: a failure if any recipient failed, else a delay
/// if any is delayed, else a success.
fn kind_of(recipients: &[FailedRecipient]) -> Action {
    let any = |a| recipients.iter().any(|r| r.action == a);
    if any(Action::Failed) || recipients.is_empty() {
        Action::Failed
    } else if any(Action::Delayed) {
        Action::Delayed
    } else {
        Action::Relayed
    }
}

/// The original message whole, if it can go in a report unchanged: 7-bit, CRLF lines of at
/// most 998 octets, ending in CRLF, within [`MAX_RETURNED_HEADERS`].
fn returnable_whole(original: &[u8]) -> Option<&[u8]> {
    let fits = !original.is_empty()
        && original.len() <= MAX_RETURNED_HEADERS
        && original.is_ascii()
        && original.ends_with(b"\r\n")
        && original.split(|&b| b == b'\n').all(|line| {
            line.len() <= MAX_LINE + 1 && !line[..line.len().saturating_sub(1)].contains(&b'\r')
        })
        && original
            .iter()
            .enumerate()
            .all(|(i, &b)| b != b'\n' || (i > 0 && original[i - 1] == b'\r'));
    fits.then_some(original)
}

/// Part 1: what happened, for the person who sent the message.
fn notification_part(input: &BounceInput<'_>, host: &str, kind: Action) -> String {
    let mut s = String::with_capacity(512 + input.failed.len() * 256);
    let intro = format!("This is the mail delivery system at {host}.");
    push_wrapped(&mut s, &intro, "");
    s.push_str("\r\n");
    let what = match kind {
        Action::Failed => "Your message could not be delivered to one or more of its recipients.",
        Action::Delayed => {
            "Your message could not be delivered yet to one or more of its recipients; \
             delivery is still being tried. You need not send it again."
        }
        Action::Relayed => {
            "Your message was relayed to the next hop for the recipients below, as you asked. \
             That system does not report deliveries, so no further notice will come."
        }
    };
    let summary = format!(
        "{what} It arrived on {} and had queue ID {}. Its header section is attached below.",
        date(input.arrival),
        input.original_id
    );
    push_wrapped(&mut s, &summary, "");
    for failed in input.failed {
        s.push_str("\r\n");
        let mut reason = clean(&failed.reason);
        if reason.is_empty() {
            reason.push_str("delivery failed");
        }
        let line = format!("<{}>: {reason}", address(&failed.recipient));
        push_wrapped(&mut s, &line, "    ");
        if let Some(reply) = &failed.remote_reply {
            let said = match remote_mta(failed) {
                Some(mta) => format!("    {mta} said: {}", reply_text(reply)),
                None => format!("    The last reply was: {}", reply_text(reply)),
            };
            push_wrapped(&mut s, &said, "    ");
        }
    }
    s
}

/// Part 2: the RFC 3464 per-message and per-recipient fields.
fn report_part(input: &BounceInput<'_>, host: &str) -> String {
    let mut s = String::with_capacity(256 + input.failed.len() * 384);
    if let Some(envid) = input.envid.map(printable).filter(|e| !e.is_empty()) {
        push_field_verbatim(&mut s, "Original-Envelope-Id", &envid);
    }
    push_field(&mut s, "Reporting-MTA", &format!("dns; {host}"));
    push_field(&mut s, QUEUE_ID_FIELD, &input.original_id.to_string());
    push_field(&mut s, "Arrival-Date", &date(input.arrival));
    let last_attempt = date(input.now);
    for failed in input.failed {
        s.push_str("\r\n");
        if let Some(original) = failed.original_recipient.as_deref().map(printable) {
            push_field_verbatim(&mut s, "Original-Recipient", &original);
        }
        let recipient = format!("rfc822; {}", address(&failed.recipient));
        push_field_verbatim(&mut s, "Final-Recipient", &recipient);
        push_field(&mut s, "Action", failed.action.as_str());
        push_field(&mut s, "Status", status(&failed.status));
        if let Some(mta) = remote_mta(failed) {
            push_field(&mut s, "Remote-MTA", &format!("dns; {mta}"));
        }
        if let Some(reply) = &failed.remote_reply {
            push_field(
                &mut s,
                "Diagnostic-Code",
                &format!("smtp; {}", reply_text(reply)),
            );
        }
        push_field(&mut s, "Last-Attempt-Date", &last_attempt);
    }
    s
}

/// Part 3: the original header section, made safe to carry (see [`build_bounce`]).
fn returned_headers(original: &[u8]) -> Vec<u8> {
    let mut section = header_section(original);
    if section.len() > MAX_RETURNED_HEADERS {
        let window = &section[..MAX_RETURNED_HEADERS];
        section = match window.iter().rposition(|&b| b == b'\n') {
            Some(i) => &window[..=i],
            None => window,
        };
    }
    let mut out = Vec::with_capacity(section.len() + section.len() / 32 + 2);
    let mut line = Vec::with_capacity(256);
    let mut rest = section;
    while !rest.is_empty() {
        let (raw, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        line.clear();
        line.extend(raw.iter().map(|&b| match b {
            b'\t' | 0x20..=0x7e => b,
            0x80..=0xff => b'?',
            _ => b' ',
        }));
        push_long_line(&mut out, &line);
        rest = next;
    }
    out
}

/// Appends `line` and CRLF, folding it (RFC 5322 §2.2.3) into lines of at most
/// [`MAX_LINE`] octets: before a space or tab where there is one, else by cutting and
/// starting the next line with an added space.
fn push_long_line(out: &mut Vec<u8>, line: &[u8]) {
    let is_wsp = |b: u8| b == b' ' || b == b'\t';
    let mut rest = line;
    let mut add_space = false;
    loop {
        let room = MAX_LINE - usize::from(add_space);
        if add_space {
            out.push(b' ');
        }
        if rest.len() <= room {
            out.extend_from_slice(rest);
            out.extend_from_slice(b"\r\n");
            return;
        }
        // Break before a space that follows a non-space, so no line is all white space
        // and each line makes progress.
        let cut = (1..=room)
            .rev()
            .find(|&i| is_wsp(rest[i]) && !is_wsp(rest[i - 1]));
        let (this, next, space) = match cut {
            Some(i) => (&rest[..i], &rest[i..], false),
            None => (&rest[..room], &rest[room..], true),
        };
        out.extend_from_slice(this);
        out.extend_from_slice(b"\r\n");
        rest = next;
        add_space = space;
    }
}

/// Picks a boundary that occurs in none of `parts`.
///
/// The boundary is `=_rr_<token>_<n>=`; "=_" cannot occur in quoted-printable text
/// (RFC 2045 §6.7), and `n` is the smallest counter whose boundary is absent. Each place
/// where the prefix occurs rules out at most one `n` (the digits that follow it, which the
/// closing `=` ends), so one scan finds every `n` in use.
fn choose_boundary<'p>(token: &str, parts: impl Iterator<Item = &'p [u8]>) -> String {
    let prefix = format!("=_rr_{token}_");
    let p = prefix.as_bytes();
    let mut taken = Vec::new();
    for part in parts {
        let mut from = 0;
        while let Some(at) = find(&part[from..], p) {
            let digits = &part[from + at + p.len()..];
            let run = digits.iter().take_while(|b| b.is_ascii_digit()).count();
            // A run too long for u64 names a counter we would never reach.
            if (1..=19).contains(&run) {
                let n = digits[..run]
                    .iter()
                    .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
                taken.push(n);
            }
            from += at + 1;
        }
    }
    taken.sort_unstable();
    let mut n = 0u64;
    while taken.binary_search(&n).is_ok() {
        n += 1;
    }
    format!("{prefix}{n}=")
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Appends `name: value` CRLF, the value's words separated by single spaces and folded
/// before a word that would take the line past [`WRAP_AT`].
fn push_field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    push_words(out, name.len() + 1, value, " ");
}

/// Appends `name: value` CRLF as given, for values whose spacing matters (addresses). The
/// value must already be printable ASCII of at most [`MAX_ADDRESS`] + a few characters.
fn push_field_verbatim(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push_str(": ");
    out.push_str(value);
    out.push_str("\r\n");
}

/// Appends `text` as body text wrapped at [`WRAP_AT`], continuation lines starting with
/// `indent`, and a final CRLF.
fn push_wrapped(out: &mut String, text: &str, indent: &str) {
    // Keep a leading indent of the first line.
    let lead = text.len() - text.trim_start_matches(' ').len();
    out.push_str(&text[..lead]);
    let mut line_len = lead;
    let mut first = true;
    for word in text.split_ascii_whitespace() {
        for piece in pieces(word) {
            if !first && line_len + 1 + piece.len() > WRAP_AT {
                out.push_str("\r\n");
                out.push_str(indent);
                line_len = indent.len();
            } else if !first {
                out.push(' ');
                line_len += 1;
            }
            out.push_str(piece);
            line_len += piece.len();
            first = false;
        }
    }
    out.push_str("\r\n");
}

/// The words of `value` after `line_len` characters already on the line, each preceded by
/// a space; a word that does not fit starts a new line with `indent` (white space, so the
/// new line continues the field).
fn push_words(out: &mut String, mut line_len: usize, value: &str, indent: &str) {
    let mut on_line = 0;
    for word in value.split_ascii_whitespace() {
        for piece in pieces(word) {
            if on_line > 0 && line_len + 1 + piece.len() > WRAP_AT {
                out.push_str("\r\n");
                out.push_str(indent);
                line_len = indent.len();
            } else {
                out.push(' ');
                line_len += 1;
            }
            out.push_str(piece);
            line_len += piece.len();
            on_line += 1;
        }
    }
    out.push_str("\r\n");
}

/// `word` cut into pieces of at most [`MAX_WORD`] bytes, on character boundaries.
fn pieces(word: &str) -> impl Iterator<Item = &str> {
    let mut rest = word;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut cut = rest.len().min(MAX_WORD);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut == 0 {
            // Unreachable for MAX_WORD >= 4; take one character to make progress.
            cut = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        let (piece, next) = rest.split_at(cut);
        rest = next;
        Some(piece)
    })
}

/// Peer-supplied text as one line of printable ASCII: white space and control characters
/// become single spaces, anything else outside ASCII becomes `?`, and the result is cut at
/// [`MAX_VALUE`] characters.
fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_VALUE));
    for c in text.chars() {
        if out.len() >= MAX_VALUE {
            break;
        }
        let c = match c {
            ' '..='~' => c,
            c if c.is_whitespace() || c.is_control() => ' ',
            _ => '?',
        };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        out.push(c);
    }
    if out.ends_with(' ') {
        out.pop();
    }
    out
}

/// An address as printable ASCII, spacing kept (a quoted local part may hold spaces).
fn address(mailbox: &Mailbox) -> String {
    mailbox
        .as_str()
        .chars()
        .take(MAX_ADDRESS)
        .map(|c| match c {
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

/// A value checked when it was received (ENVID, ORCPT: printable ASCII), kept so on the
/// way out whatever the spool held: anything else becomes `?`, and it is cut at
/// [`MAX_ADDRESS`] characters.
fn printable(value: &str) -> String {
    value
        .chars()
        .take(MAX_ADDRESS)
        .map(|c| match c {
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

/// Our host name reduced to letters, digits, `-` and `.`; `localhost` if nothing is left.
fn host_name(name: &str) -> String {
    let host: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(255)
        .collect();
    if host.is_empty() {
        "localhost".to_string()
    } else {
        host
    }
}

/// The next hop's name, cleaned; `None` when absent or empty.
fn remote_mta(failed: &FailedRecipient) -> Option<String> {
    failed
        .remote_mta
        .as_deref()
        .map(clean)
        .filter(|m| !m.is_empty())
}

/// `unique` made safe for a boundary and a Message-ID local part: letters, digits and `-`
/// kept, other bytes as `=XX`, at most [`MAX_TOKEN`] characters.
fn token(unique: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(MAX_TOKEN);
    for b in unique.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            if out.len() + 1 > MAX_TOKEN {
                break;
            }
            out.push(char::from(b));
        } else {
            if out.len() + 3 > MAX_TOKEN {
                break;
            }
            out.push('=');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    if out.is_empty() {
        out.push_str("bounce");
    }
    out
}

/// A reply as one line: the code, then the text lines joined with spaces, cleaned.
fn reply_text(reply: &Reply) -> String {
    clean(&reply.one_line())
}

/// `status` if it is an RFC 3463 code `[245].ddd.ddd` (1–3 digits each), else `5.0.0`.
fn status(status: &str) -> &str {
    if is_enhanced_status(status) {
        status
    } else {
        "5.0.0"
    }
}

fn date(t: SystemTime) -> String {
    let mut s = String::with_capacity(32);
    // Writing to a String cannot fail.
    let _ = write_rfc5322_date(&mut s, t);
    s
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdGenerator;
    use proptest::prelude::*;
    use std::time::Duration;

    // --- A small MIME reader, enough to check what build_bounce writes. ---

    /// Header fields, unfolded, names as written, values trimmed.
    fn fields(head: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for line in head.split("\r\n").filter(|l| !l.is_empty()) {
            if line.starts_with([' ', '\t']) {
                out.last_mut().expect("continuation without a field").1 += line;
            } else {
                let (name, value) = line.split_once(':').expect("a header field");
                out.push((name.to_string(), value.trim_start().to_string()));
            }
        }
        out
    }

    fn only<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
        let found: Vec<_> = fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .collect();
        assert_eq!(found.len(), 1, "{name} should occur exactly once");
        &found[0].1
    }

    fn has(fields: &[(String, String)], name: &str) -> bool {
        fields.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// `value; k=v; k="v"` to its main value and parameters.
    fn params(value: &str) -> (String, Vec<(String, String)>) {
        let mut it = value.split(';').map(str::trim);
        let main = it.next().unwrap_or("").to_string();
        let ps = it
            .map(|p| {
                let (k, v) = p.split_once('=').expect("a parameter");
                (k.to_ascii_lowercase(), v.trim_matches('"').to_string())
            })
            .collect();
        (main, ps)
    }

    struct Part {
        fields: Vec<(String, String)>,
        body: String,
    }

    struct Parsed {
        fields: Vec<(String, String)>,
        boundary: String,
        parts: Vec<Part>,
    }

    fn parse(msg: &[u8]) -> Parsed {
        let msg = std::str::from_utf8(msg).expect("ASCII");
        let (head, body) = msg.split_once("\r\n\r\n").expect("header/body separator");
        let fields = fields(head);
        let (ctype, ps) = params(only(&fields, "Content-Type"));
        assert_eq!(ctype, "multipart/report");
        let boundary = ps
            .iter()
            .find(|(k, _)| k == "boundary")
            .expect("boundary parameter")
            .1
            .clone();
        let delimiter = format!("\r\n--{boundary}");
        let mut pieces = body.split(delimiter.as_str());
        pieces.next().expect("preamble");
        let mut parts = Vec::new();
        let mut closed = false;
        for piece in pieces {
            assert!(!closed, "content after the close delimiter");
            if let Some(epilogue) = piece.strip_prefix("--") {
                assert_eq!(epilogue, "\r\n");
                closed = true;
                continue;
            }
            let piece = piece.strip_prefix("\r\n").expect("CRLF after delimiter");
            let (head, body) = piece.split_once("\r\n\r\n").expect("part headers");
            parts.push(Part {
                fields: self::fields(head),
                body: body.to_string(),
            });
        }
        assert!(closed, "no close delimiter");
        Parsed {
            fields,
            boundary,
            parts,
        }
    }

    /// CRLF only, 7-bit, no line over 998, the boundary only in its delimiters; returns the
    /// parsed message.
    fn check_wire(msg: &[u8]) -> Parsed {
        assert!(msg.is_ascii(), "8-bit byte in the bounce");
        assert!(msg.ends_with(b"\r\n"));
        for (i, &b) in msg.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(msg.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
            if b == b'\n' {
                assert!(i > 0 && msg[i - 1] == b'\r', "bare LF at {i}");
            }
        }
        for line in msg.split(|&b| b == b'\n') {
            assert!(line.len() <= MAX_LINE + 1, "line of {} octets", line.len());
        }
        let parsed = parse(msg);
        assert_eq!(parsed.parts.len(), 3);
        let b = parsed.boundary.as_bytes();
        assert!(!b.is_empty() && b.len() <= 70);
        for part in &parsed.parts {
            assert!(find(part.body.as_bytes(), b).is_none());
        }
        // Once in Content-Type, three part delimiters and the close delimiter.
        assert_eq!(msg.windows(b.len()).filter(|w| *w == b).count(), 5);
        parsed
    }

    // --- Inputs ---

    const ORIGINAL: &[u8] = b"Received: from a.example\r\n\tby relay.example\r\n\
        From: Sender <sender@origin.example>\r\nTo: rcpt@dest.example\r\n\
        Subject: quarterly figures\r\n\r\nSECRET BODY LINE\r\nmore body\r\n";

    fn mbox(s: &str) -> Mailbox {
        Mailbox::parse(s).unwrap()
    }

    fn id() -> QueueId {
        IdGenerator::starting_at(2, 1_700_000_000_000_000).next_id()
    }

    fn refused() -> FailedRecipient {
        FailedRecipient {
            recipient: mbox("nobody@dest.example"),
            status: "5.1.1".into(),
            remote_reply: Some(Reply::new(550, "5.1.1 <nobody@dest.example>: user unknown")),
            remote_mta: Some("mx.dest.example".into()),
            reason: "the next hop refused it".into(),
            action: Action::Failed,
            original_recipient: None,
        }
    }

    fn expired() -> FailedRecipient {
        FailedRecipient {
            recipient: mbox("slow@far.example"),
            status: "4.4.7".into(),
            remote_reply: None,
            remote_mta: None,
            reason: "gave up after 5 days".into(),
            action: Action::Failed,
            original_recipient: None,
        }
    }

    fn bounce_with(failed: &[FailedRecipient], original: &[u8], unique: &str) -> Bytes {
        let to = mbox("sender@origin.example");
        build_bounce(&BounceInput {
            reporting_mta: "relay.example",
            original_id: id(),
            to: &to,
            arrival: UNIX_EPOCH + Duration::from_secs(1_795_000_000),
            now: UNIX_EPOCH + Duration::from_secs(1_795_293_558),
            failed,
            original,
            unique,
            return_full: false,
            envid: None,
        })
    }

    fn bounce() -> Parsed {
        check_wire(&bounce_with(&[refused(), expired()], ORIGINAL, "B0NCE"))
    }

    /// The groups of a delivery-status body: per-message first, then per-recipient.
    fn groups(body: &str) -> Vec<Vec<(String, String)>> {
        body.split("\r\n\r\n").map(fields).collect()
    }

    fn words(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    // --- Tests ---

    #[test]
    fn top_level_headers_present_once() {
        let p = bounce();
        assert_eq!(
            only(&p.fields, "From"),
            "Mail Delivery System <MAILER-DAEMON@relay.example>"
        );
        assert_eq!(only(&p.fields, "To"), "<sender@origin.example>");
        assert_eq!(
            only(&p.fields, "Subject"),
            "Undelivered Mail Returned to Sender"
        );
        assert_eq!(only(&p.fields, "Date"), "Sat, 21 Nov 2026 20:39:18 +0000");
        let mid = only(&p.fields, "Message-ID");
        assert!(
            mid.starts_with('<') && mid.ends_with("@relay.example>"),
            "{mid}"
        );
        assert!(mid.contains("B0NCE"), "{mid}");
        assert_eq!(only(&p.fields, "Auto-Submitted"), "auto-replied");
        assert_eq!(only(&p.fields, "MIME-Version"), "1.0");
        only(&p.fields, "Content-Type");
        assert_eq!(p.fields.len(), 8, "unexpected extra fields: {:?}", p.fields);
    }

    #[test]
    fn content_type_parameters() {
        let p = bounce();
        let (main, ps) = params(only(&p.fields, "Content-Type"));
        assert_eq!(main, "multipart/report");
        let get = |k: &str| ps.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("report-type"), Some("delivery-status"));
        assert_eq!(get("boundary"), Some(p.boundary.as_str()));
        assert_eq!(ps.len(), 2);
        // '=' is a tspecial, so the boundary must be quoted.
        assert!(only(&p.fields, "Content-Type").contains(&format!("\"{}\"", p.boundary)));
    }

    #[test]
    fn three_parts_in_order() {
        let p = bounce();
        let types: Vec<_> = p
            .parts
            .iter()
            .map(|part| only(&part.fields, "Content-Type").to_string())
            .collect();
        assert_eq!(
            types,
            [
                "text/plain; charset=us-ascii",
                "message/delivery-status",
                "text/rfc822-headers"
            ]
        );
    }

    #[test]
    fn notification_names_queue_id_recipients_and_replies() {
        let p = bounce();
        let text = words(&p.parts[0].body);
        assert!(text.contains(&format!("queue ID {}", id())), "{text}");
        assert!(text.contains("<nobody@dest.example>: the next hop refused it"));
        assert!(
            text.contains("mx.dest.example said: 550 5.1.1 <nobody@dest.example>: user unknown")
        );
        assert!(text.contains("<slow@far.example>: gave up after 5 days"));
        for line in p.parts[0].body.split("\r\n") {
            assert!(line.len() <= WRAP_AT, "unwrapped line {line:?}");
        }
    }

    #[test]
    fn delivery_status_fields_per_recipient() {
        let p = bounce();
        let g = groups(&p.parts[1].body);
        assert_eq!(g.len(), 3, "{:?}", p.parts[1].body);
        assert_eq!(only(&g[0], "Reporting-MTA"), "dns; relay.example");
        assert_eq!(only(&g[0], "X-Ringrelay-Queue-ID"), id().to_string());
        assert_eq!(
            only(&g[0], "Arrival-Date"),
            "Wed, 18 Nov 2026 11:06:40 +0000"
        );

        let first = &g[1];
        assert_eq!(
            only(first, "Final-Recipient"),
            "rfc822; nobody@dest.example"
        );
        assert_eq!(only(first, "Action"), "failed");
        assert_eq!(only(first, "Status"), "5.1.1");
        assert_eq!(only(first, "Remote-MTA"), "dns; mx.dest.example");
        assert_eq!(
            only(first, "Diagnostic-Code"),
            "smtp; 550 5.1.1 <nobody@dest.example>: user unknown"
        );
        assert_eq!(
            only(first, "Last-Attempt-Date"),
            "Sat, 21 Nov 2026 20:39:18 +0000"
        );

        let second = &g[2];
        assert_eq!(only(second, "Final-Recipient"), "rfc822; slow@far.example");
        assert_eq!(only(second, "Action"), "failed");
        assert_eq!(only(second, "Status"), "4.4.7");
        assert!(!has(second, "Remote-MTA"));
        assert!(!has(second, "Diagnostic-Code"));
        only(second, "Last-Attempt-Date");
    }

    #[test]
    fn diagnostic_code_joins_multiline_reply() {
        let mut r = refused();
        r.remote_reply = Some(Reply::multiline(
            550,
            [
                "5.1.1 <nobody@dest.example>: Recipient address rejected:".to_string(),
                "User unknown in virtual mailbox table; see".to_string(),
                "https://dest.example/help/550-5.1.1 for more about this error".to_string(),
            ],
        ));
        let p = check_wire(&bounce_with(&[r], ORIGINAL, "B"));
        let body = &p.parts[1].body;
        let g = groups(body);
        assert_eq!(
            only(&g[1], "Diagnostic-Code"),
            "smtp; 550 5.1.1 <nobody@dest.example>: Recipient address rejected: User \
             unknown in virtual mailbox table; see https://dest.example/help/550-5.1.1 for \
             more about this error"
        );
        // Long enough to be folded, and folded lines continue with white space.
        let line = body
            .split("\r\n")
            .position(|l| l.starts_with("Diagnostic-Code:"))
            .unwrap();
        let next = body.split("\r\n").nth(line + 1).unwrap();
        assert!(next.starts_with(' '), "{body}");
    }

    #[test]
    fn invalid_status_becomes_5_0_0() {
        for (given, want) in [
            ("5.1.1", "5.1.1"),
            ("4.4.7", "4.4.7"),
            ("2.0.0", "2.0.0"),
            ("5.123.123", "5.123.123"),
            ("6.0.0", "5.0.0"),
            ("5.1", "5.0.0"),
            ("5.1.1.1", "5.0.0"),
            ("5.1.1234", "5.0.0"),
            ("5..1", "5.0.0"),
            (" 5.1.1", "5.0.0"),
            ("5.1.1\r\nBcc: x", "5.0.0"),
            ("", "5.0.0"),
            ("5.a.1", "5.0.0"),
        ] {
            let mut r = expired();
            r.status = given.to_string();
            let p = check_wire(&bounce_with(&[r], ORIGINAL, "B"));
            assert_eq!(
                only(&groups(&p.parts[1].body)[1], "Status"),
                want,
                "{given}"
            );
        }
    }

    #[test]
    fn original_headers_included_body_not() {
        let p = bounce();
        let part = &p.parts[2].body;
        assert_eq!(part.as_bytes(), header_section(ORIGINAL));
        assert!(part.contains("Subject: quarterly figures\r\n"));
        let msg = bounce_with(&[refused()], ORIGINAL, "B");
        assert!(find(&msg, b"SECRET BODY").is_none());
    }

    #[test]
    fn crlf_everywhere_and_lines_within_998() {
        let mut original = b"Subject: bare\nX-Long: ".to_vec();
        original.extend(std::iter::repeat_n(b'a', 5000));
        original.extend_from_slice(b"\nX-Spaced:");
        for _ in 0..600 {
            original.extend_from_slice(b" word");
        }
        original.extend_from_slice(b"\r\nX-Cr: a\rb\r\r\n\nbody\n");
        let mut r = refused();
        r.remote_reply = Some(Reply::multiline(550, vec!["y".repeat(499); 6]));
        r.reason = "z".repeat(3000);
        let msg = bounce_with(&[r], &original, "B");
        let p = check_wire(&msg);
        let part = &p.parts[2].body;
        assert!(
            part.starts_with("Subject: bare\r\nX-Long:\r\n aaa"),
            "{part}"
        );
        assert!(part.contains("X-Cr: a b \r\n"), "{part}");
        // The folded lines unfold to the original fields.
        let f = fields(part);
        assert_eq!(only(&f, "X-Spaced").len(), "word".len() * 600 + 599);
        assert_eq!(
            only(&f, "X-Long").bytes().filter(|&b| b == b'a').count(),
            5000
        );
        assert!(!part.contains("body"));
    }

    #[test]
    fn eight_bit_and_controls_become_ascii() {
        let mut r = refused();
        r.remote_reply = Some(Reply::new(550, "5.1.1 caf\u{e9} \u{2028} unknown"));
        r.reason = "r\u{e9}fus\u{0}\u{7}".into();
        let original = b"Subject: caf\xc3\xa9\x00\x1b\r\n\r\n";
        let p = check_wire(&bounce_with(&[r], original, "\u{e9}"));
        assert_eq!(p.parts[2].body, "Subject: caf??  \r\n\r\n");
        let g = groups(&p.parts[1].body);
        assert_eq!(
            only(&g[1], "Diagnostic-Code"),
            "smtp; 550 5.1.1 caf? unknown"
        );
        assert!(words(&p.parts[0].body).contains("r?fus"));
    }

    #[test]
    fn boundary_absent_from_hostile_content() {
        // The original predicts the first boundaries (token "U", counters 0 and 1, and one
        // with a longer run of digits that must not hide counter 2).
        let original = b"Subject: x\r\nX-A: --=_rr_U_0=\r\nX-B: =_rr_U_1=--\r\n\
            X-C: =_rr_U_2\r\nX-D: =_rr_U_=\r\n\r\nbody --=_rr_U_3=\r\n";
        let mut r = refused();
        // A peer can try the same through its reply text.
        r.remote_reply = Some(Reply::new(550, "5.0.0 =_rr_U_2= =_rr_U_4="));
        let msg = bounce_with(&[r], original, "U");
        let p = check_wire(&msg);
        assert_eq!(p.boundary, "=_rr_U_3=");
        assert!(p.parts[2].body.contains("X-A: --=_rr_U_0=\r\n"));
    }

    fn report_with(
        recipients: &[FailedRecipient],
        original: &[u8],
        return_full: bool,
        envid: Option<&str>,
    ) -> Parsed {
        let to = mbox("sender@origin.example");
        check_wire(&build_bounce(&BounceInput {
            reporting_mta: "relay.example",
            original_id: id(),
            to: &to,
            arrival: UNIX_EPOCH,
            now: UNIX_EPOCH,
            failed: recipients,
            original,
            unique: "R1",
            return_full,
            envid,
        }))
    }

    #[test]
    fn envid_and_orcpt_are_carried() {
        let mut r = refused();
        r.original_recipient = Some("rfc822;orig@dest.example".into());
        let p = report_with(&[r, expired()], ORIGINAL, false, Some("QQ314159"));
        let g = groups(&p.parts[1].body);
        assert_eq!(only(&g[0], "Original-Envelope-Id"), "QQ314159");
        assert_eq!(
            only(&g[1], "Original-Recipient"),
            "rfc822;orig@dest.example"
        );
        assert!(!has(&g[2], "Original-Recipient"));
    }

    #[test]
    fn success_and_delay_reports_say_so() {
        let mut relayed = refused();
        relayed.action = Action::Relayed;
        relayed.status = "2.0.0".into();
        relayed.remote_reply = Some(Reply::new(250, "2.0.0 Ok"));
        let p = report_with(&[relayed], ORIGINAL, true, None);
        assert_eq!(
            only(&p.fields, "Subject"),
            "Successful Mail Delivery Report"
        );
        let g = groups(&p.parts[1].body);
        assert_eq!(only(&g[1], "Action"), "relayed");
        assert_eq!(only(&g[1], "Status"), "2.0.0");
        // RET=FULL is for failures: a success report returns the headers.
        assert_eq!(
            params(only(&p.parts[2].fields, "Content-Type")).0,
            "text/rfc822-headers"
        );
        let mut delayed = expired();
        delayed.action = Action::Delayed;
        let p = report_with(&[delayed], ORIGINAL, false, None);
        assert_eq!(
            only(&p.fields, "Subject"),
            "Delayed Mail (still being retried)"
        );
        assert_eq!(only(&groups(&p.parts[1].body)[1], "Action"), "delayed");
        assert!(words(&p.parts[0].body).contains("still being tried"));
    }

    #[test]
    fn ret_full_returns_the_whole_message_when_it_can_go_unchanged() {
        let p = report_with(&[refused()], ORIGINAL, true, None);
        assert_eq!(
            params(only(&p.parts[2].fields, "Content-Type")).0,
            "message/rfc822"
        );
        assert_eq!(p.parts[2].body.as_bytes(), ORIGINAL);
        // 8-bit, or a line too long, or too large: the headers instead.
        let eight_bit = "Subject: é\r\n\r\nbody\r\n".as_bytes();
        let long = format!("Subject: x\r\n\r\n{}\r\n", "x".repeat(1200));
        let large = format!("Subject: x\r\n\r\n{}", "line\r\n".repeat(30_000));
        for original in [
            eight_bit,
            long.as_bytes(),
            large.as_bytes(),
            b"Subject: x\n\nbare\n",
        ] {
            let p = report_with(&[refused()], original, true, None);
            assert_eq!(
                params(only(&p.parts[2].fields, "Content-Type")).0,
                "text/rfc822-headers"
            );
            assert!(!p.parts[2].body.contains("body"));
        }
    }

    #[test]
    fn choose_boundary_skips_every_counter_in_use() {
        let content = b"=_rr_T_0= =_rr_T_1= =_rr_T_10= =_rr_T_2= =_rr_T_99999999999999999999=";
        assert_eq!(
            choose_boundary("T", [&content[..]].into_iter()),
            "=_rr_T_3="
        );
        assert_eq!(choose_boundary("T", [&b""[..]].into_iter()), "=_rr_T_0=");
    }

    #[test]
    fn header_injection_is_neutralised() {
        let mut r = refused();
        r.remote_reply = Some(Reply::new(550, "5.1.1 x\r\nBcc: evil@x"));
        r.remote_mta = Some("mx.example\r\nBcc: evil2@x".into());
        r.reason = "nope\r\nBcc: evil3@x\nBcc: evil4@x".into();
        let to = mbox("sender@origin.example");
        let failed = [r];
        let msg = build_bounce(&BounceInput {
            reporting_mta: "relay.example\r\nBcc: evil5@x",
            original_id: id(),
            to: &to,
            arrival: UNIX_EPOCH,
            now: UNIX_EPOCH,
            failed: &failed,
            original: ORIGINAL,
            unique: "U\r\nBcc: evil6@x",
            return_full: false,
            envid: Some("E\r\nBcc: evil7@x"),
        });
        let p = check_wire(&msg);
        assert!(!has(&p.fields, "Bcc"));
        let text = std::str::from_utf8(&msg).unwrap();
        for line in text.split("\r\n") {
            assert!(!line.to_ascii_lowercase().starts_with("bcc"), "{line:?}");
        }
        let g = groups(&p.parts[1].body);
        assert_eq!(
            only(&g[1], "Diagnostic-Code"),
            "smtp; 550 5.1.1 x Bcc: evil@x"
        );
        assert_eq!(only(&g[1], "Remote-MTA"), "dns; mx.example Bcc: evil2@x");
        assert_eq!(only(&g[0], "Reporting-MTA"), "dns; relay.exampleBccevil5x");
    }

    #[test]
    fn header_section_cases() {
        assert_eq!(header_section(b""), b"");
        assert_eq!(header_section(b"A: b\r\nC: d\r\n"), b"A: b\r\nC: d\r\n");
        assert_eq!(header_section(b"A: b"), b"A: b");
        assert_eq!(header_section(b"A: b\r\n\r\nbody\r\n\r\n"), b"A: b\r\n\r\n");
        assert_eq!(header_section(b"A: b\nC: d\n\nbody\n"), b"A: b\nC: d\n\n");
        assert_eq!(header_section(b"A: b\n\r\nbody"), b"A: b\n\r\n");
        assert_eq!(header_section(b"\r\nbody"), b"\r\n");
        assert_eq!(
            header_section(b"A: b\r\r\nC\r\n\r\n"),
            b"A: b\r\r\nC\r\n\r\n"
        );
        assert_eq!(header_section(b"\xff\x00\r"), b"\xff\x00\r");
    }

    #[test]
    fn empty_original_still_gives_three_parts() {
        let p = check_wire(&bounce_with(&[expired()], b"", "B"));
        assert_eq!(p.parts[2].body, "");
        let p = check_wire(&bounce_with(&[expired()], b"Subject: no end", "B"));
        assert_eq!(p.parts[2].body, "Subject: no end\r\n");
    }

    #[test]
    fn returned_headers_are_capped_at_a_line_end() {
        let line = b"X-Filler: 0123456789012345678901234567890123456789\r\n";
        let original = line.repeat(MAX_RETURNED_HEADERS / line.len() + 10);
        let p = check_wire(&bounce_with(&[expired()], &original, "B"));
        let part = p.parts[2].body.as_bytes();
        assert!(part.len() <= MAX_RETURNED_HEADERS);
        assert!(part.len() > MAX_RETURNED_HEADERS - line.len());
        assert!(part.ends_with(line));
    }

    fn chunk() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            Just(b"\r\n".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"Subject: hi\r\n".to_vec()),
            Just(b"--=_rr_U_0=".to_vec()),
            Just(b"=_rr_U_1=\r\n".to_vec()),
            (0usize..2500).prop_map(|n| vec![b'x'; n]),
            (0usize..400).prop_map(|n| b" ab".repeat(n)),
            (0usize..1200).prop_map(|n| vec![b' '; n]),
        ]
    }

    proptest! {
        #[test]
        fn any_input_gives_a_valid_message(
            original in proptest::collection::vec(chunk(), 0..12),
            replies in proptest::collection::vec(
                (0u16..1000, proptest::collection::vec(any::<String>(), 0..4)),
                1..4,
            ),
            mta in proptest::option::of(any::<String>()),
            reason in any::<String>(),
            status in prop_oneof![Just("5.1.1".to_string()), any::<String>()],
            unique in prop_oneof![Just("U".to_string()), any::<String>()],
            host in prop_oneof![Just("relay.example".to_string()), any::<String>()],
        ) {
            let original = original.concat();
            let failed: Vec<FailedRecipient> = replies
                .into_iter()
                .enumerate()
                .map(|(i, (code, lines))| FailedRecipient {
                    recipient: mbox(&format!("\"r {i}\"@dest.example")),
                    status: status.clone(),
                    remote_reply: (i != 1).then(|| Reply::multiline(code, lines)),
                    remote_mta: mta.clone(),
                    reason: reason.clone(),
                    action: Action::Failed,
            original_recipient: None,
                })
                .collect();
            let to = mbox("sender@origin.example");
            let msg = build_bounce(&BounceInput {
                reporting_mta: &host,
                original_id: id(),
                to: &to,
                arrival: UNIX_EPOCH,
                now: UNIX_EPOCH + Duration::from_secs(86_400),
                failed: &failed,
                original: &original,
                unique: &unique,
                return_full: unique.len() % 2 == 0,
                envid: None,
            });
            let p = check_wire(&msg);
            prop_assert_eq!(groups(&p.parts[1].body).len(), failed.len() + 1);
            prop_assert!(!has(&p.fields, "Bcc"));
        }
    }
}
