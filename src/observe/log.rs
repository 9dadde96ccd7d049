//! The delivery log: one info line per accepted message, per recipient and attempt, per
//! refused recipient, per expiry and per removal, in Postfix's shape so that an operator's
//! tools (pflogsumm-style greps, log shippers' Postfix parsers) read it:
//!
//! ```text
//! 01K…: client=client.test[192.0.2.7], from=<a@b.test>, size=1024, nrcpt=1, tls=TLSv1.3, sasl_username=alice
//! 01K…: to=<x@dest.test>, relay=mx.dest.test[192.0.2.9]:25, delay=0.21, attempts=1, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X)
//! NOQUEUE: reject: RCPT from client.test[192.0.2.7]: 550 5.7.1 Relay access denied; from=<a@b.test> to=<x@far.test>
//! ```
//!
//! With `--log-format json` ([`set_json`]) the same facts go out as fields of JSON lines.
//! Nothing is formatted when the `ringrelay::delivery` target is not enabled at info.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::id::QueueId;

/// The target every delivery-log line has (filter it with `RUST_LOG=ringrelay::delivery=info`).
pub const TARGET: &str = "ringrelay::delivery";

static JSON: AtomicBool = AtomicBool::new(false);

/// Emit fields for JSON lines instead of one formatted message (set once at start).
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// True when delivery lines would be written: check before building their inputs.
#[inline]
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// Where a recipient went: `host[ip]:port`, or `none` when no connection was made.
#[derive(Debug, Clone, Copy)]
pub struct RelayHost<'a> {
    /// The next hop's name (MX host, route or smarthost).
    pub host: &'a str,
    /// The address connected to, if any.
    pub addr: Option<SocketAddr>,
}

impl fmt::Display for RelayHost<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(a) => write!(f, "{}[{}]:{}", self.host, a.ip(), a.port()),
            None => f.write_str("none"),
        }
    }
}

/// What happened to one recipient on one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// A next hop took it.
    Sent,
    /// Try again later.
    Deferred,
    /// Failed for good.
    Bounced,
    /// Given up after `delivery.max_queue_age_secs`.
    Expired,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Sent => "sent",
            Status::Deferred => "deferred",
            Status::Bounced => "bounced",
            Status::Expired => "expired",
        }
    }
}

/// One recipient's outcome on one attempt.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    /// Queue ID.
    pub id: QueueId,
    /// The recipient.
    pub rcpt: &'a str,
    /// Where it went.
    pub relay: RelayHost<'a>,
    /// Time since the message arrived.
    pub delay: Duration,
    /// Attempts so far, this one included.
    pub attempts: u32,
    /// RFC 3463 status.
    pub dsn: &'a str,
    /// What happened.
    pub status: Status,
    /// The reply or reason, on one line.
    pub reply: &'a str,
}

/// Writes one recipient's line.
pub fn outcome(o: &Outcome<'_>) {
    if !enabled() {
        return;
    }
    let delay = format!("{:.2}", o.delay.as_secs_f64());
    if json() {
        tracing::info!(
            target: TARGET,
            id = %o.id,
            to = o.rcpt,
            relay = %o.relay,
            delay = delay.as_str(),
            attempts = o.attempts,
            dsn = o.dsn,
            status = o.status.word(),
            reply = o.reply,
            "delivery"
        );
    } else {
        tracing::info!(
            target: TARGET,
            "{}: to=<{}>, relay={}, delay={delay}, attempts={}, dsn={}, status={} ({})",
            o.id,
            o.rcpt,
            o.relay,
            o.attempts,
            o.dsn,
            o.status.word(),
            o.reply
        );
    }
}

/// A message accepted (its 250 sent).
#[derive(Debug, Clone, Copy)]
pub struct Accepted<'a> {
    /// Queue ID.
    pub id: QueueId,
    /// The client's EHLO name.
    pub helo: &'a str,
    /// The client's address.
    pub ip: IpAddr,
    /// The reverse path (empty for `<>`).
    pub from: &'a str,
    /// Bytes stored.
    pub size: usize,
    /// Recipients.
    pub nrcpt: usize,
    /// TLS version, when the session was encrypted.
    pub tls: Option<&'a str>,
    /// The authenticated user, if any.
    pub user: Option<&'a str>,
}

/// Writes the line for an accepted message.
pub fn accepted(a: &Accepted<'_>) {
    if !enabled() {
        return;
    }
    if json() {
        tracing::info!(
            target: TARGET,
            id = %a.id,
            client = %format_args!("{}[{}]", a.helo, a.ip),
            from = a.from,
            size = a.size,
            nrcpt = a.nrcpt,
            tls = a.tls.unwrap_or(""),
            sasl_username = a.user.unwrap_or(""),
            "accepted"
        );
    } else {
        let tls = a.tls.map(|t| format!(", tls={t}")).unwrap_or_default();
        let user = a
            .user
            .map(|u| format!(", sasl_username={u}"))
            .unwrap_or_default();
        tracing::info!(
            target: TARGET,
            "{}: client={}[{}], from=<{}>, size={}, nrcpt={}{tls}{user}",
            a.id,
            a.helo,
            a.ip,
            a.from,
            a.size,
            a.nrcpt
        );
    }
}

/// A recipient refused at RCPT: `NOQUEUE: reject: RCPT from helo[ip]: REPLY; from=<…> to=<…>`.
pub fn rejected(helo: &str, ip: IpAddr, reply: &str, from: &str, to: &str) {
    if !enabled() {
        return;
    }
    if json() {
        tracing::info!(
            target: TARGET,
            client = %format_args!("{helo}[{ip}]"),
            reply,
            from,
            to,
            "reject"
        );
    } else {
        tracing::info!(
            target: TARGET,
            "NOQUEUE: reject: RCPT from {helo}[{ip}]: {reply}; from=<{from}> to=<{to}>"
        );
    }
}

/// A message taken out of the queue by an operator.
pub fn removed(id: QueueId) {
    if !enabled() {
        return;
    }
    if json() {
        tracing::info!(target: TARGET, id = %id, "removed");
    } else {
        tracing::info!(target: TARGET, "{id}: removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_host_is_written_as_postfix_does() {
        let addr: SocketAddr = "192.0.2.9:25".parse().unwrap();
        let r = RelayHost {
            host: "mx.dest.test",
            addr: Some(addr),
        };
        assert_eq!(r.to_string(), "mx.dest.test[192.0.2.9]:25");
        let v6: SocketAddr = "[2001:db8::1]:2525".parse().unwrap();
        let r = RelayHost {
            host: "h",
            addr: Some(v6),
        };
        assert_eq!(r.to_string(), "h[2001:db8::1]:2525");
        assert_eq!(
            RelayHost {
                host: "h",
                addr: None
            }
            .to_string(),
            "none"
        );
    }
}
