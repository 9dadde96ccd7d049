//! The client side of one outbound SMTP connection as a deterministic state machine
//! (sans-IO): RFC 5321, with PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152),
//! STARTTLS (RFC 3207), AUTH PLAIN / LOGIN to a smarthost (RFC 4954, RFC 4616), SMTPUTF8
//! (RFC 6531) and DSN (RFC 3461).
//!
//! SMTPUTF8 and DSN: a message that declared SMTPUTF8 goes out with it to a server that
//! offers it; one that needs it (UTF-8 in its envelope or headers) and a server that does
//! not offer it fail at once with `553 5.6.7`, nothing sent (RFC 6531 §3.2). The DSN
//! parameters (RET, ENVID, NOTIFY, ORCPT) go to a server that offers DSN and are left off
//! for one that does not; [`Client::offers_dsn`] tells the caller which, since then the
//! success reports a sender asked for are ours to send (RFC 3461 §5.2.2).
//!
//! Bytes from the next hop go in through [`Client::receive`]; bytes to write come out of
//! [`Client::poll_transmit`]; what happened comes out of [`Client::poll_event`]: the
//! connection became [`ClientEvent::Ready`], a message's [`Delivery`] (one
//! [`RcptOutcome`] per recipient, in order), or [`ClientEvent::Closed`]. There are no
//! sockets and no clock: the driver owns both, and reports a broken or timed-out connection
//! with [`Client::abort`].
//!
//! STARTTLS, by Postfix's `smtp_tls_security_level` words ([`Client::with_tls`]): after the
//! EHLO reply, when the level is not `none` and the server offers STARTTLS, the client sends
//! it; on `220` it reports [`ClientEvent::StartTls`] and waits. The driver wraps the
//! connection in TLS, runs the handshake and calls [`Client::tls_established`]; the client
//! then forgets what the server said before (RFC 3207 §4.2: bytes received after the `220`
//! are discarded, the capabilities too) and sends EHLO again. At `encrypt` and `verify` (or
//! with credentials, which go only over TLS) a server that does not offer STARTTLS, or
//! refuses it, gets QUIT, and the connection closes with `4.7.4`. Which certificate is
//! acceptable is the driver's business (the TLS layer's config); this machine only sees
//! that the handshake succeeded.
//!
//! AUTH ([`Client::with_auth`]): once in TLS, PLAIN with an initial response (one round
//! trip), else LOGIN; `235` makes the connection ready. Any refusal closes it with every
//! recipient deferred (see [`Client::close_reply`]).
//!
//! One connection carries message after message (the delivery code pools them): every
//! message after the first starts with `RSET`, so whatever state the previous transaction
//! left behind on the server is gone. With PIPELINING, `RSET`, `MAIL`, every `RCPT` and
//! `DATA` go out in one buffer and the replies are matched in order; without it, one
//! command per round trip.
//!
//! Message content goes out dot-stuffed (RFC 5321 §4.5.2) without copying: the chunks are
//! slices of [`Outgoing::data`], with a one-byte `.` chunk before each line-leading dot.
//!
//! Nothing the server sends is trusted: reply lines are checked (three digits, then space
//! or hyphen, one code per reply, at most [`MAX_REPLY_LINE`] octets and
//! [`MAX_REPLY_LINES`] lines), and anything unusable, or a reply nobody asked for, closes
//! the connection with every undecided recipient deferred. No input makes it panic.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use memchr::memmem;

use crate::smtp::auth::{base64_encode, plain_initial_response};
use crate::smtp::ext::{xtext_encode, DsnEnvelope, RcptDsn, Ret};
use crate::smtp::{Mailbox, Reply, ReversePath};
use crate::tls::TlsLevel;

/// Longest reply line accepted, CRLF included (RFC 5321 §4.5.3.1.5).
pub const MAX_REPLY_LINE: usize = 512;

/// Most lines accepted in one reply. With [`MAX_REPLY_LINE`], this bounds what a server can
/// make us hold to about 50 KiB, however long its multi-line reply goes on.
pub const MAX_REPLY_LINES: usize = 100;

/// One message to deliver over a connection.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The reverse path, sent as `MAIL FROM:<…>` (`<>` for bounces).
    pub from: ReversePath,
    /// The forward paths, one `RCPT TO:<…>` each, in this order.
    pub rcpts: Vec<Mailbox>,
    /// The message as stored: headers + body, CRLF line endings, NOT dot-stuffed.
    pub data: Bytes,
    /// Needs 8BITMIME (declare BODY=8BITMIME when the server offers it).
    pub eight_bit: bool,
    /// Declared SMTPUTF8 when received: declare it when the server offers it.
    pub smtputf8: bool,
    /// Cannot go without SMTPUTF8 (UTF-8 in the envelope or headers): to a server that
    /// does not offer it, every recipient fails with `553 5.6.7`.
    pub needs_smtputf8: bool,
    /// The DSN parameters, `rcpts` in the order of [`Outgoing::rcpts`]; sent only to a
    /// server that offers DSN.
    pub dsn: Option<Box<DsnEnvelope>>,
}

/// The fate of one recipient, with the reply that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The next hop took responsibility for the message (2xx after the data).
    Delivered(Reply),
    /// Try again later: a 4xx reply, or the connection failed before the end.
    Deferred(Reply),
    /// Do not try again: a 5xx reply (bounce).
    Failed(Reply),
}

impl RcptOutcome {
    /// The reply that decided this outcome.
    pub fn reply(&self) -> &Reply {
        match self {
            RcptOutcome::Delivered(r) | RcptOutcome::Deferred(r) | RcptOutcome::Failed(r) => r,
        }
    }
}

/// What happened to one message: one outcome per recipient, in `rcpts` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// `outcomes[i]` is the fate of `Outgoing::rcpts[i]`.
    pub outcomes: Vec<RcptOutcome>,
}

/// A user name and password for AUTH to a smarthost. `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: String,
    password: String,
}

impl Credentials {
    /// `user` and `password`, as given to the next hop.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            user: user.into(),
            password: password.into(),
        }
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"(hidden)")
            .finish()
    }
}

/// What the driver learns from [`Client::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Greeting and EHLO (or HELO fallback) done, and STARTTLS and AUTH where they apply;
    /// or the previous transaction finished: a new message may be started.
    Ready,
    /// The server said `220` to STARTTLS. The driver throws away whatever else it has read
    /// (it came before the handshake and cannot be trusted), runs the TLS handshake over
    /// the connection, and then calls [`Client::tls_established`], or
    /// [`Client::abort`] if the handshake failed. Until then nothing is transmitted, and
    /// bytes given to [`Client::receive`] are discarded.
    StartTls,
    /// A message's transaction finished (successfully or not).
    Delivered(Delivery),
    /// The connection is finished (QUIT answered, 421, protocol error, or the server's
    /// reply was unusable). If a message was in flight, a `Delivered` with every pending
    /// recipient `Deferred` comes first. The driver closes the socket.
    Closed {
        /// Why, for the log: the server's reply or what was wrong with it.
        reason: String,
    },
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the greeting, or for the EHLO / HELO, STARTTLS or AUTH replies.
    Opening,
    /// STARTTLS answered `220`: waiting for the driver's TLS handshake.
    StartingTls,
    /// Idle: a message may be started.
    Ready,
    /// A transaction is in flight.
    Busy,
    /// QUIT sent; waiting for its reply.
    Quitting,
    /// Finished; nothing more is read or written.
    Closed,
}

/// A command whose reply is awaited; replies are matched to these in order (RFC 2920).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Await {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    /// `AUTH LOGIN` sent: the `334` asking for the user name.
    AuthLoginUser,
    /// The user name sent: the `334` asking for the password.
    AuthLoginPassword,
    /// The credentials sent (PLAIN's initial response, or LOGIN's password): `235`.
    Auth,
    Rset,
    Mail,
    Rcpt(usize),
    Data,
    /// The end of the message content (`.` after the data).
    Dot,
    /// A `.` sent only to end a DATA the server wrongly opened with no recipient accepted.
    StrayDot,
    Quit,
}

/// What the server offered in its EHLO reply.
#[derive(Debug, Clone, Copy, Default)]
struct Capabilities {
    pipelining: bool,
    /// SIZE was offered (with or without a limit).
    size: bool,
    /// The advertised limit; `None` for `SIZE` alone or `SIZE 0` (no fixed limit).
    size_limit: Option<u64>,
    eight_bit_mime: bool,
    starttls: bool,
    auth_plain: bool,
    auth_login: bool,
    /// AUTH was offered, whatever the mechanisms.
    auth: bool,
    smtputf8: bool,
    dsn: bool,
}

/// One recipient while its transaction runs.
#[derive(Debug)]
enum RcptState {
    /// No reply yet.
    Pending,
    /// RCPT got 2xx: its fate depends on DATA.
    Accepted,
    /// Decided.
    Done(RcptOutcome),
}

/// The message in flight.
#[derive(Debug)]
struct Transaction {
    msg: Outgoing,
    rcpts: Vec<RcptState>,
    /// MAIL was refused: every recipient is decided, later replies are only consumed.
    mail_refused: bool,
}

impl Transaction {
    fn accepted(&self) -> bool {
        !self.mail_refused && self.rcpts.iter().any(|r| matches!(r, RcptState::Accepted))
    }

    /// Decides every recipient not decided yet.
    fn settle(&mut self, outcome: impl Fn() -> RcptOutcome) {
        for r in &mut self.rcpts {
            if !matches!(r, RcptState::Done(_)) {
                *r = RcptState::Done(outcome());
            }
        }
    }

    fn into_delivery(self) -> Delivery {
        let outcomes = self
            .rcpts
            .into_iter()
            .map(|r| match r {
                RcptState::Done(o) => o,
                // Every path settles before finishing; fail safe (retry), not silent.
                RcptState::Pending | RcptState::Accepted => RcptOutcome::Deferred(Reply::new(
                    451,
                    "4.3.0 internal error: recipient left undecided",
                )),
            })
            .collect();
        Delivery { outcomes }
    }
}

/// The client side of one outbound SMTP connection. See the [module docs](self).
#[derive(Debug)]
pub struct Client {
    helo: Box<str>,
    phase: Phase,
    caps: Capabilities,
    /// Commands sent (or queued) whose replies have not arrived, oldest first.
    awaiting: VecDeque<Await>,
    /// The code and text lines of a multi-line reply being read.
    reply_code: u16,
    reply_lines: Vec<String>,
    tx: Option<Transaction>,
    /// A transaction ran on this connection: the next one begins with RSET.
    need_rset: bool,
    /// `quit` was called while busy or opening: QUIT instead of the next `Ready`.
    quit_requested: bool,
    transmit: VecDeque<Bytes>,
    events: VecDeque<ClientEvent>,
    /// Finds line-leading dots (after the first byte) in message content.
    line_dot: memmem::Finder<'static>,
    /// How much TLS to ask for ([`Client::with_tls`]).
    tls_level: TlsLevel,
    /// Credentials for AUTH, used only over TLS ([`Client::with_auth`]).
    auth: Option<Arc<Credentials>>,
    /// The TLS handshake completed: the session runs inside TLS.
    tls_active: bool,
    /// Gave up on the connection on our own terms (TLS or AUTH could not be had): QUIT went
    /// out, and the close reports this reply and reason whatever happens to the QUIT.
    give_up: Option<(Reply, String)>,
    /// The reply undecided recipients were deferred with when the connection closed.
    close_reply: Option<Reply>,
}

impl Client {
    /// A client that will greet with `EHLO helo` once the server's 220 arrives. Characters
    /// outside printable ASCII in `helo` become `-`, so a bad host name cannot inject a
    /// command; an empty one becomes `localhost`.
    pub fn new(helo: &str) -> Client {
        let helo: String = helo
            .trim()
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '-' })
            .collect();
        let helo = if helo.is_empty() {
            "localhost".into()
        } else {
            helo.into_boxed_str()
        };
        Client {
            helo,
            phase: Phase::Opening,
            caps: Capabilities::default(),
            awaiting: VecDeque::from([Await::Greeting]),
            reply_code: 0,
            reply_lines: Vec::new(),
            tx: None,
            need_rset: false,
            quit_requested: false,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            line_dot: memmem::Finder::new(b"\n.").into_owned(),
            tls_level: TlsLevel::None,
            auth: None,
            tls_active: false,
            give_up: None,
            close_reply: None,
        }
    }

    /// The same client asking for TLS at `level` (Postfix's words): `none` never sends
    /// STARTTLS; `may` sends it when offered and goes on in plaintext when it is not offered
    /// or is refused; `encrypt` and `verify` require it (here they are the same: the
    /// certificate check is the TLS layer's). Call before the greeting arrives.
    pub fn with_tls(mut self, level: TlsLevel) -> Client {
        self.tls_level = level;
        self
    }

    /// The same client authenticating with `credentials` once in TLS. Credentials make TLS
    /// required whatever the level, `none` included (a password never goes out in
    /// plaintext), and AUTH required too: a next hop offering neither PLAIN nor LOGIN gets QUIT. Call before the
    /// greeting arrives.
    pub fn with_auth(mut self, credentials: Arc<Credentials>) -> Client {
        self.auth = Some(credentials);
        self
    }

    /// The driver's TLS handshake (after [`ClientEvent::StartTls`]) succeeded: from now on
    /// the session runs inside TLS. What the server said before is forgotten (RFC 3207
    /// §4.2) and EHLO goes out again. Ignored at any other time.
    pub fn tls_established(&mut self) {
        if self.phase != Phase::StartingTls {
            return;
        }
        self.tls_active = true;
        self.caps = Capabilities::default();
        self.phase = Phase::Opening;
        let cmd = format!("EHLO {}\r\n", self.helo);
        self.send(Bytes::from(cmd), Await::Ehlo);
    }

    /// True once the TLS handshake has completed on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Once closed: the reply undecided recipients were (or would have been) deferred
    /// with: the server's reply that ended the session, one made here (`421 4.4.2` for
    /// [`Client::abort`], `451 4.5.0` for a protocol error), or, when the client gave up on
    /// its own terms, `451 4.7.4` (TLS required but not offered or refused) or `454 4.7.0`
    /// (AUTH refused or impossible). `None` while open.
    pub fn close_reply(&self) -> Option<&Reply> {
        self.close_reply.as_ref()
    }

    /// Feeds bytes received from the server; returns how many were consumed (a partial
    /// reply line stays unconsumed; the caller offers it again with more bytes). Complete
    /// lines of an unfinished multi-line reply are consumed and kept here. Once the
    /// connection is closed, and from STARTTLS's `220` until [`Client::tls_established`],
    /// everything is consumed and ignored.
    pub fn receive(&mut self, input: &[u8]) -> usize {
        let mut pos = 0;
        // Once STARTTLS is accepted, whatever follows the 220 in plaintext is discarded
        // (RFC 3207 §4.2): it can only be an attacker's injection.
        while !matches!(self.phase, Phase::Closed | Phase::StartingTls) {
            let rest = &input[pos..];
            let Some(lf) = memchr::memchr(b'\n', rest) else {
                if rest.len() >= MAX_REPLY_LINE {
                    // No line end where one must have been: stop buffering now.
                    self.protocol_error("reply line too long".into());
                    break;
                }
                return pos;
            };
            pos += lf + 1;
            // Bare LF ends a reply line too: servers are not always strict, and a line end
            // cannot smuggle anything into replies.
            let line = &rest[..lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            self.line(line);
        }
        input.len()
    }

    /// Next chunk to write, if any. Commands come out as small buffers (with PIPELINING,
    /// a whole transaction's commands in one); message data is handed out as `Bytes` slices
    /// of `Outgoing::data` where no dot-stuffing is needed (zero copy), plus the stuffed
    /// pieces and the final `.\r\n`. Write the chunks in order.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.transmit.pop_front()
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Starts a message. Only valid after `Ready` ([`Client::is_ready`] is the authority;
    /// a `Ready` event not yet polled is dropped here, as it is no longer true); returns
    /// the message back if not ready.
    ///
    /// A message over the server's SIZE limit is not sent at all: its recipients all fail
    /// with `552 5.3.4` at once (a `Delivered` event, then `Ready` again). So does a
    /// message without recipients, with an empty `Delivery`.
    pub fn start(&mut self, msg: Outgoing) -> Result<(), Outgoing> {
        if !self.is_ready() {
            return Err(msg);
        }
        self.events.retain(|e| !matches!(e, ClientEvent::Ready));
        let size = wire_size(&msg.data);
        if self.caps.size_limit.is_some_and(|limit| size > limit) {
            let reply = Reply::new(552, "5.3.4 message size exceeds next hop's limit");
            let outcomes = msg
                .rcpts
                .iter()
                .map(|_| RcptOutcome::Failed(reply.clone()))
                .collect();
            self.events
                .push_back(ClientEvent::Delivered(Delivery { outcomes }));
            self.events.push_back(ClientEvent::Ready);
            return Ok(());
        }
        if msg.needs_smtputf8 && !self.caps.smtputf8 {
            let reply = Reply::new(
                553,
                "5.6.7 SMTPUTF8 is required, but was not offered by the next hop",
            );
            let outcomes = msg
                .rcpts
                .iter()
                .map(|_| RcptOutcome::Failed(reply.clone()))
                .collect();
            self.events
                .push_back(ClientEvent::Delivered(Delivery { outcomes }));
            self.events.push_back(ClientEvent::Ready);
            return Ok(());
        }
        if msg.rcpts.is_empty() {
            self.events.push_back(ClientEvent::Delivered(Delivery {
                outcomes: Vec::new(),
            }));
            self.events.push_back(ClientEvent::Ready);
            return Ok(());
        }
        let rcpts = msg.rcpts.iter().map(|_| RcptState::Pending).collect();
        let tx = Transaction {
            msg,
            rcpts,
            mail_refused: false,
        };
        self.phase = Phase::Busy;
        if self.caps.pipelining {
            // RFC 2920: the whole group in one write; DATA ends it.
            let mut cmds = BytesMut::with_capacity(64 + 48 * (tx.msg.rcpts.len() + 1));
            if self.need_rset {
                cmds.extend_from_slice(b"RSET\r\n");
                self.awaiting.push_back(Await::Rset);
            }
            self.write_mail(&mut cmds, &tx.msg);
            self.awaiting.push_back(Await::Mail);
            for (i, rcpt) in tx.msg.rcpts.iter().enumerate() {
                self.write_rcpt(&mut cmds, rcpt, rcpt_dsn(&tx.msg, i));
                self.awaiting.push_back(Await::Rcpt(i));
            }
            cmds.extend_from_slice(b"DATA\r\n");
            self.awaiting.push_back(Await::Data);
            self.transmit.push_back(cmds.freeze());
            self.tx = Some(tx);
        } else {
            self.tx = Some(tx);
            if self.need_rset {
                self.send(Bytes::from_static(b"RSET\r\n"), Await::Rset);
            } else {
                self.send_mail();
            }
        }
        Ok(())
    }

    /// Ends the session politely (QUIT), e.g. when idle too long. When idle, QUIT goes out
    /// now; when a transaction is in flight (or the greeting is not done), after it: the
    /// `Delivered` comes as usual, but no `Ready`. `Closed` follows the server's reply.
    pub fn quit(&mut self) {
        match self.phase {
            Phase::Ready => {
                self.events.retain(|e| !matches!(e, ClientEvent::Ready));
                self.send_quit();
            }
            Phase::Opening | Phase::StartingTls | Phase::Busy => self.quit_requested = true,
            Phase::Quitting | Phase::Closed => {}
        }
    }

    /// The connection broke or timed out (the driver saw EOF, an error or its timer fired):
    /// every pending recipient becomes `Deferred` (with a `421 4.4.2` reply made here from
    /// `why`) and `Closed` follows. Nothing more is transmitted.
    pub fn abort(&mut self, why: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        let reply = Reply::new(421, format!("4.4.2 connection with next hop lost: {why}"));
        self.close(&reply, why.to_string());
    }

    /// Whether the server advertised PIPELINING (after Ready).
    pub fn pipelining(&self) -> bool {
        self.caps.pipelining
    }

    /// Whether the server advertised DSN (after Ready): it was given the DSN parameters,
    /// and reports on the recipients it accepted are its business from now on.
    pub fn offers_dsn(&self) -> bool {
        self.caps.dsn
    }

    /// The server's SIZE limit (after Ready); `None` if it gave none, or `SIZE 0`.
    pub fn size_limit(&self) -> Option<u64> {
        self.caps.size_limit
    }

    /// True when no transaction is in flight and the connection can take a message.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// One complete reply line, without its line end.
    fn line(&mut self, line: &[u8]) {
        if self.awaiting.is_empty() {
            return self.protocol_error(format!("unexpected reply: {}", excerpt(line)));
        }
        if line.len() + 2 > MAX_REPLY_LINE {
            return self.protocol_error("reply line too long".into());
        }
        let Some((code, last, text)) = parse_line(line) else {
            return self.protocol_error(format!("malformed reply: {}", excerpt(line)));
        };
        if !self.reply_lines.is_empty() && code != self.reply_code {
            return self.protocol_error(format!(
                "reply lines with different codes: {} then {code}",
                self.reply_code
            ));
        }
        if self.reply_lines.len() >= MAX_REPLY_LINES {
            return self.protocol_error(format!("reply longer than {MAX_REPLY_LINES} lines"));
        }
        self.reply_code = code;
        self.reply_lines
            .push(String::from_utf8_lossy(text).into_owned());
        if last {
            let lines = std::mem::take(&mut self.reply_lines);
            self.reply(Reply::multiline(code, lines));
        }
    }

    /// One complete reply, matched to the oldest command awaiting one.
    fn reply(&mut self, reply: Reply) {
        let Some(what) = self.awaiting.pop_front() else {
            // `line` checked that a reply was awaited; stay panic-free regardless.
            return self.protocol_error(format!("unexpected reply: {}", reply.one_line()));
        };
        if reply.code() == 421 && what != Await::Quit {
            // The server is going away (RFC 5321 §3.8), whatever we asked.
            let reason = format!("next hop closing: {}", reply.one_line());
            return self.close(&reply, reason);
        }
        match what {
            Await::Greeting => {
                if reply.code() == 220 {
                    let cmd = format!("EHLO {}\r\n", self.helo);
                    self.send(Bytes::from(cmd), Await::Ehlo);
                } else {
                    let reason = format!("greeting refused: {}", reply.one_line());
                    self.close(&reply, reason);
                }
            }
            Await::Ehlo => {
                if reply.is_positive() {
                    self.caps = parse_ehlo(&reply);
                    self.after_hello();
                } else if reply.is_permanent() {
                    // An old server without ESMTP (500/502): plain SMTP, no extensions.
                    let cmd = format!("HELO {}\r\n", self.helo);
                    self.send(Bytes::from(cmd), Await::Helo);
                } else {
                    let reason = format!("EHLO refused: {}", reply.one_line());
                    self.close(&reply, reason);
                }
            }
            Await::Helo => {
                if reply.is_positive() {
                    self.caps = Capabilities::default();
                    self.after_hello();
                } else {
                    let reason = format!("HELO refused: {}", reply.one_line());
                    self.close(&reply, reason);
                }
            }
            Await::StartTls => self.starttls_reply(reply),
            Await::AuthLoginUser | Await::AuthLoginPassword if reply.code() == 334 => {
                let Some(credentials) = self.auth.clone() else {
                    return self.unexpected("AUTH", &reply);
                };
                // LOGIN's challenges are always "Username:" then "Password:"; they are
                // not read, only counted.
                let (field, next) = if what == Await::AuthLoginUser {
                    (credentials.user.as_str(), Await::AuthLoginPassword)
                } else {
                    (credentials.password.as_str(), Await::Auth)
                };
                let mut cmd = base64_encode(field.as_bytes());
                cmd.push_str("\r\n");
                self.send(Bytes::from(cmd), next);
            }
            Await::AuthLoginUser | Await::AuthLoginPassword | Await::Auth => {
                if reply.is_positive() && what == Await::Auth {
                    self.become_ready();
                } else {
                    // Even a 5xx (535 5.7.8: bad credentials) only defers: the fault is in
                    // our configuration, which the operator can mend, not in the mail;
                    // bouncing would lose it for good (Postfix's
                    // smtp_sasl_auth_soft_bounce, on by default, does the same).
                    self.give_up(
                        Reply::new(
                            454,
                            format!("4.7.0 the next hop refused our AUTH: {}", reply.one_line()),
                        ),
                        format!("AUTH refused: {}", reply.one_line()),
                    );
                }
            }
            Await::Rset => {
                if !reply.is_positive() {
                    return self.unexpected("RSET", &reply);
                }
                if !self.caps.pipelining {
                    self.send_mail();
                }
            }
            Await::Mail => self.mail_reply(reply),
            Await::Rcpt(i) => self.rcpt_reply(i, reply),
            Await::Data => self.data_reply(reply),
            Await::Dot => self.dot_reply(reply),
            Await::StrayDot => self.finish(),
            Await::Quit => {
                let reason = format!("QUIT answered: {}", reply.one_line());
                self.close(&reply, reason);
            }
        }
    }

    /// TLS required: by the level, or by credentials that must not go out in plaintext.
    fn tls_required(&self) -> bool {
        self.tls_level.requires_tls() || self.auth.is_some()
    }

    /// The EHLO (or HELO) reply was positive: STARTTLS, AUTH, or ready.
    fn after_hello(&mut self) {
        if !self.tls_active {
            if (self.tls_level != TlsLevel::None || self.auth.is_some()) && self.caps.starttls {
                return self.send(Bytes::from_static(b"STARTTLS\r\n"), Await::StartTls);
            }
            if self.tls_required() {
                return self.give_up(
                    Reply::new(
                        451,
                        "4.7.4 TLS is required, but was not offered by the next hop",
                    ),
                    "TLS is required, but was not offered".into(),
                );
            }
        }
        if let Some(credentials) = self.auth.clone() {
            if self.caps.auth_plain {
                let cmd = format!(
                    "AUTH PLAIN {}\r\n",
                    plain_initial_response(&credentials.user, credentials.password.as_bytes())
                );
                return self.send(Bytes::from(cmd), Await::Auth);
            }
            if self.caps.auth_login {
                return self.send(Bytes::from_static(b"AUTH LOGIN\r\n"), Await::AuthLoginUser);
            }
            let why = if self.caps.auth {
                "AUTH is configured, but the next hop offers neither PLAIN nor LOGIN"
            } else {
                "AUTH is configured, but the next hop does not offer AUTH"
            };
            return self.give_up(Reply::new(454, format!("4.7.0 {why}")), why.into());
        }
        self.become_ready();
    }

    fn starttls_reply(&mut self, reply: Reply) {
        if reply.code() == 220 {
            self.phase = Phase::StartingTls;
            self.events.push_back(ClientEvent::StartTls);
        } else if self.tls_required() {
            self.give_up(
                Reply::new(
                    451,
                    format!(
                        "4.7.4 TLS is required, but the next hop refused STARTTLS: {}",
                        reply.one_line()
                    ),
                ),
                format!(
                    "TLS is required, but STARTTLS was refused: {}",
                    reply.one_line()
                ),
            );
        } else if reply.is_transient() || reply.is_permanent() {
            // `may`: on in plaintext, as RFC 3207 §4 allows after a refusal; the
            // capabilities from before still hold (nothing changed).
            self.caps.starttls = false;
            self.after_hello();
        } else {
            self.unexpected("STARTTLS", &reply);
        }
    }

    /// Ends the session on our own terms: QUIT goes out, and the close that follows (the
    /// QUIT's reply, or whatever breaks first) reports `reply` and `reason`.
    fn give_up(&mut self, reply: Reply, reason: String) {
        self.give_up = Some((reply, reason));
        self.quit_requested = false;
        self.send_quit();
    }

    fn mail_reply(&mut self, reply: Reply) {
        let Some(tx) = self.tx.as_mut() else {
            return self.unexpected("MAIL", &reply);
        };
        if reply.is_positive() {
            if !self.caps.pipelining {
                self.send_rcpt(0);
            }
        } else if reply.is_transient() || reply.is_permanent() {
            tx.settle(|| outcome(&reply));
            tx.mail_refused = true;
            // With PIPELINING, the RCPT and DATA replies are still coming: consume them.
            if !self.caps.pipelining {
                self.finish();
            }
        } else {
            self.unexpected("MAIL", &reply);
        }
    }

    fn rcpt_reply(&mut self, i: usize, reply: Reply) {
        let Some(tx) = self.tx.as_mut() else {
            return self.unexpected("RCPT", &reply);
        };
        if tx.mail_refused {
            // Pipelined after a refused MAIL (likely 503): the recipient is already decided.
            return;
        }
        let state = if reply.is_positive() {
            RcptState::Accepted
        } else if reply.is_transient() || reply.is_permanent() {
            RcptState::Done(outcome(&reply))
        } else {
            return self.unexpected("RCPT", &reply);
        };
        if let Some(r) = tx.rcpts.get_mut(i) {
            *r = state;
        }
        if self.caps.pipelining {
            return;
        }
        if i + 1 < tx.rcpts.len() {
            self.send_rcpt(i + 1);
        } else if tx.accepted() {
            self.send(Bytes::from_static(b"DATA\r\n"), Await::Data);
        } else {
            self.finish();
        }
    }

    fn data_reply(&mut self, reply: Reply) {
        let Some(tx) = self.tx.as_mut() else {
            return self.unexpected("DATA", &reply);
        };
        if !tx.accepted() {
            // Only with PIPELINING: DATA went out before the refusals came back.
            if reply.code() == 354 {
                // The server opened a DATA it should not have: end it empty. Its reply
                // is only consumed, and the next message starts with RSET anyway.
                self.send(Bytes::from_static(b".\r\n"), Await::StrayDot);
            } else {
                // 503 / 554 expected.
                self.finish();
            }
        } else if reply.code() == 354 {
            let data = tx.msg.data.clone();
            self.queue_data(&data);
            self.awaiting.push_back(Await::Dot);
        } else if reply.is_transient() || reply.is_permanent() {
            tx.settle(|| outcome(&reply));
            self.finish();
        } else {
            self.unexpected("DATA", &reply);
        }
    }

    fn dot_reply(&mut self, reply: Reply) {
        // Content chunks still queued: the server answered before it had the whole message.
        let early = !self.transmit.is_empty();
        let Some(tx) = self.tx.as_mut() else {
            return self.unexpected("end of data", &reply);
        };
        if (reply.is_transient() || reply.is_permanent()) || (reply.is_positive() && !early) {
            tx.settle(|| outcome(&reply));
        } else {
            return self.unexpected("end of data", &reply);
        }
        if early {
            // The rest of the content would now be read as commands: this connection is
            // out of step for good.
            let reason = format!("reply before end of data: {}", reply.one_line());
            return self.close(&reply, reason);
        }
        self.finish();
    }

    /// The transaction is over: report it, and take the next message (or QUIT).
    fn finish(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.events
                .push_back(ClientEvent::Delivered(tx.into_delivery()));
        }
        self.need_rset = true;
        self.become_ready();
    }

    fn become_ready(&mut self) {
        if self.quit_requested {
            self.send_quit();
        } else {
            self.phase = Phase::Ready;
            self.events.push_back(ClientEvent::Ready);
        }
    }

    fn send_quit(&mut self) {
        self.phase = Phase::Quitting;
        self.send(Bytes::from_static(b"QUIT\r\n"), Await::Quit);
    }

    fn send(&mut self, bytes: Bytes, what: Await) {
        self.transmit.push_back(bytes);
        self.awaiting.push_back(what);
    }

    fn send_mail(&mut self) {
        let Some(tx) = self.tx.as_ref() else { return };
        let mut cmd = BytesMut::with_capacity(64);
        self.write_mail(&mut cmd, &tx.msg);
        self.send(cmd.freeze(), Await::Mail);
    }

    fn send_rcpt(&mut self, i: usize) {
        let Some(tx) = self.tx.as_ref() else { return };
        let Some(rcpt) = tx.msg.rcpts.get(i) else {
            return;
        };
        let mut cmd = BytesMut::with_capacity(16 + rcpt.as_str().len());
        self.write_rcpt(&mut cmd, rcpt, rcpt_dsn(&tx.msg, i));
        self.send(cmd.freeze(), Await::Rcpt(i));
    }

    /// `RCPT TO:<…>`, with NOTIFY and ORCPT to a server that offers DSN.
    fn write_rcpt(&self, out: &mut BytesMut, rcpt: &Mailbox, dsn: Option<&RcptDsn>) {
        out.extend_from_slice(b"RCPT TO:<");
        out.extend_from_slice(rcpt.as_str().as_bytes());
        out.put_u8(b'>');
        if let Some(dsn) = dsn.filter(|_| self.caps.dsn) {
            if !dsn.notify.is_default() {
                out.extend_from_slice(b" NOTIFY=");
                out.extend_from_slice(dsn.notify.to_param().as_bytes());
            }
            if let Some(orcpt) = &dsn.orcpt {
                out.extend_from_slice(b" ORCPT=");
                out.extend_from_slice(orcpt.to_param().as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
    }

    fn write_mail(&self, out: &mut BytesMut, msg: &Outgoing) {
        out.extend_from_slice(b"MAIL FROM:<");
        if let Some(m) = msg.from.mailbox() {
            out.extend_from_slice(m.as_str().as_bytes());
        }
        out.put_u8(b'>');
        if self.caps.size {
            // Infallible: writing to a BytesMut.
            let _ = write!(BytesWriter(out), " SIZE={}", wire_size(&msg.data));
        }
        let smtputf8 = msg.smtputf8 && self.caps.smtputf8;
        // Without 8BITMIME offered, 8-bit content goes out as it is: most servers take it,
        // and downgrading to 7 bit (RFC 6152 §3) is out of scope. An SMTPUTF8 message is
        // 8-bit by nature (RFC 6531 §3.1 requires 8BITMIME beside it).
        if (msg.eight_bit || smtputf8) && self.caps.eight_bit_mime {
            out.extend_from_slice(b" BODY=8BITMIME");
        }
        if smtputf8 {
            out.extend_from_slice(b" SMTPUTF8");
        }
        if let Some(dsn) = msg.dsn.as_ref().filter(|_| self.caps.dsn) {
            match dsn.ret {
                Some(Ret::Full) => out.extend_from_slice(b" RET=FULL"),
                Some(Ret::Hdrs) => out.extend_from_slice(b" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &dsn.envid {
                out.extend_from_slice(b" ENVID=");
                out.extend_from_slice(xtext_encode(envid).as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Queues the content dot-stuffed: slices of `data`, a `.` before every line-leading
    /// dot, CRLF if the last line lacks one, and the terminating `.\r\n`.
    fn queue_data(&mut self, data: &Bytes) {
        let mut start = 0;
        if data.first() == Some(&b'.') {
            self.transmit.push_back(Bytes::from_static(b"."));
        }
        for at in self.line_dot.find_iter(data) {
            // `at` is the LF; the dot after it stays in the next slice.
            let dot = at + 1;
            self.transmit.push_back(data.slice(start..dot));
            self.transmit.push_back(Bytes::from_static(b"."));
            start = dot;
        }
        if start < data.len() {
            self.transmit.push_back(data.slice(start..));
        }
        let end: &'static [u8] = if data.is_empty() || data.ends_with(b"\r\n") {
            b".\r\n"
        } else {
            b"\r\n.\r\n"
        };
        self.transmit.push_back(Bytes::from_static(end));
    }

    /// A reply that makes no sense for `cmd`: the conversation is out of step.
    fn unexpected(&mut self, cmd: &str, reply: &Reply) {
        self.protocol_error(format!("unexpected reply to {cmd}: {}", reply.one_line()));
    }

    /// The server's bytes are unusable: defer what is pending and close.
    fn protocol_error(&mut self, reason: String) {
        let reply = Reply::new(451, format!("4.5.0 next hop protocol error: {reason}"));
        self.close(&reply, reason);
    }

    /// Ends the connection: undecided recipients are deferred with `why`, a `Delivered`
    /// reports them, then `Closed`.
    fn close(&mut self, why: &Reply, reason: String) {
        let (why, reason) = match self.give_up.take() {
            Some((reply, reason)) => (reply, reason),
            None => (why.clone(), reason),
        };
        if let Some(mut tx) = self.tx.take() {
            tx.settle(|| RcptOutcome::Deferred(why.clone()));
            self.events
                .push_back(ClientEvent::Delivered(tx.into_delivery()));
        }
        self.close_reply = Some(why);
        self.events.retain(|e| !matches!(e, ClientEvent::Ready));
        self.events.push_back(ClientEvent::Closed { reason });
        self.phase = Phase::Closed;
        self.transmit.clear();
        self.awaiting.clear();
        self.reply_lines = Vec::new();
    }
}

/// `fmt::Write` into a `BytesMut`, to format numbers without a temporary `String`.
struct BytesWriter<'a>(&'a mut BytesMut);

impl std::fmt::Write for BytesWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Recipient `i`'s DSN parameters, if the message has any.
fn rcpt_dsn(msg: &Outgoing, i: usize) -> Option<&RcptDsn> {
    msg.dsn.as_ref()?.rcpts.get(i)
}

/// The size declared with SIZE (RFC 1870): the content as sent, without the stuffing dots
/// and the terminator, so a CRLF we add to an unterminated last line counts.
fn wire_size(data: &[u8]) -> u64 {
    let added = if data.is_empty() || data.ends_with(b"\r\n") {
        0
    } else {
        2
    };
    data.len() as u64 + added
}

/// The recipient outcome a 2xx / 4xx / 5xx reply stands for.
fn outcome(reply: &Reply) -> RcptOutcome {
    if reply.is_positive() {
        RcptOutcome::Delivered(reply.clone())
    } else if reply.is_transient() {
        RcptOutcome::Deferred(reply.clone())
    } else {
        RcptOutcome::Failed(reply.clone())
    }
}

/// Splits a reply line into code, whether it is the last line, and text. `None` unless it
/// is three digits (a code from 200 to 599) then a space, a hyphen or nothing.
fn parse_line(line: &[u8]) -> Option<(u16, bool, &[u8])> {
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if !(200..=599).contains(&code) {
        return None;
    }
    match line.get(3) {
        None => Some((code, true, &[])),
        Some(b' ') => Some((code, true, &line[4..])),
        Some(b'-') => Some((code, false, &line[4..])),
        Some(_) => None,
    }
}

/// The extensions we use from an EHLO reply; its first line is the server's name.
fn parse_ehlo(reply: &Reply) -> Capabilities {
    let mut caps = Capabilities::default();
    for line in reply.lines().iter().skip(1) {
        let mut words = line.split_ascii_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        if keyword.eq_ignore_ascii_case("PIPELINING") {
            caps.pipelining = true;
        } else if keyword.eq_ignore_ascii_case("8BITMIME") {
            caps.eight_bit_mime = true;
        } else if keyword.eq_ignore_ascii_case("STARTTLS") {
            caps.starttls = true;
        } else if keyword.eq_ignore_ascii_case("SMTPUTF8") {
            caps.smtputf8 = true;
        } else if keyword.eq_ignore_ascii_case("DSN") {
            caps.dsn = true;
        } else if keyword.eq_ignore_ascii_case("AUTH")
            || keyword
                .get(..5)
                .is_some_and(|p| p.eq_ignore_ascii_case("AUTH="))
        {
            // `AUTH PLAIN LOGIN`, or the pre-standard `AUTH=PLAIN LOGIN` some servers
            // still send.
            caps.auth = true;
            let first = keyword.get(5..).filter(|m| !m.is_empty());
            for mechanism in first.into_iter().chain(words.by_ref()) {
                if mechanism.eq_ignore_ascii_case("PLAIN") {
                    caps.auth_plain = true;
                } else if mechanism.eq_ignore_ascii_case("LOGIN") {
                    caps.auth_login = true;
                }
            }
        } else if keyword.eq_ignore_ascii_case("SIZE") {
            caps.size = true;
            // RFC 1870: no number or 0 means no fixed limit; a garbled one, the same.
            caps.size_limit = words
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|&n| n > 0);
        }
    }
    caps
}

/// The start of a bad line, printable, for a log reason.
fn excerpt(line: &[u8]) -> String {
    const MAX: usize = 64;
    let mut s: String = line
        .iter()
        .take(MAX)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    if line.len() > MAX {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::data::DataScanner;
    use proptest::prelude::*;

    const GREETING: &[u8] = b"220 mx.test ESMTP\r\n";
    const EHLO_PIPELINING: &[u8] =
        b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250 8BITMIME\r\n";
    const EHLO_PLAIN: &[u8] = b"250-mx.test\r\n250 SIZE 10000\r\n";

    /// A scripted driver: keeps unconsumed input as a real driver would, and collects
    /// what the client transmits and reports.
    struct Harness {
        client: Client,
        pending: Vec<u8>,
    }

    impl Harness {
        fn new() -> Self {
            Harness {
                client: Client::new("relay.test"),
                pending: Vec::new(),
            }
        }

        /// Greeted and past EHLO with `ehlo_reply`; the `Ready` event is checked and taken.
        fn ready(ehlo_reply: &[u8]) -> Self {
            let mut h = Harness::new();
            h.feed(GREETING);
            assert_eq!(h.sent(), "EHLO relay.test\r\n");
            h.feed(ehlo_reply);
            assert_eq!(h.events(), [ClientEvent::Ready]);
            assert!(h.client.is_ready());
            h
        }

        fn feed(&mut self, bytes: &[u8]) {
            self.pending.extend_from_slice(bytes);
            let used = self.client.receive(&self.pending);
            assert!(used <= self.pending.len());
            self.pending.drain(..used);
        }

        fn chunks(&mut self) -> Vec<Bytes> {
            std::iter::from_fn(|| self.client.poll_transmit()).collect()
        }

        fn sent(&mut self) -> String {
            let bytes: Vec<u8> = self.chunks().concat();
            String::from_utf8(bytes).unwrap()
        }

        fn events(&mut self) -> Vec<ClientEvent> {
            std::iter::from_fn(|| self.client.poll_event()).collect()
        }
    }

    fn mailbox(s: &str) -> Mailbox {
        Mailbox::parse(s).unwrap()
    }

    fn message(rcpts: &[&str], data: &'static [u8]) -> Outgoing {
        Outgoing {
            from: ReversePath::Mailbox(mailbox("a@src.test")),
            rcpts: rcpts.iter().map(|r| mailbox(r)).collect(),
            data: Bytes::from_static(data),
            eight_bit: false,
            smtputf8: false,
            needs_smtputf8: false,
            dsn: None,
        }
    }

    fn r(code: u16, text: &str) -> Reply {
        Reply::new(code, text)
    }

    fn delivered(outcomes: Vec<RcptOutcome>) -> ClientEvent {
        ClientEvent::Delivered(Delivery { outcomes })
    }

    fn closed(reason: &str) -> ClientEvent {
        ClientEvent::Closed {
            reason: reason.into(),
        }
    }

    use RcptOutcome::{Deferred, Delivered, Failed};

    #[test]
    fn greeting_gets_ehlo_and_extensions_are_read() {
        let mut h = Harness::new();
        assert!(!h.client.is_ready());
        assert_eq!(h.sent(), "", "nothing before the greeting");
        // A multi-line greeting, bare LF line ends.
        h.feed(b"220-mx.test ESMTP\n220 welcome\n");
        assert_eq!(h.sent(), "EHLO relay.test\r\n");
        assert_eq!(h.events(), []);
        h.feed(b"250-mx.test hello\r\n250-size 2000\r\n250-pipelining\r\n250-8bitmime\r\n");
        assert_eq!(h.events(), [], "the reply is not finished");
        assert!(!h.client.is_ready());
        h.feed(b"250 ENHANCEDSTATUSCODES\r\n");
        assert_eq!(h.events(), [ClientEvent::Ready]);
        assert!(h.client.is_ready());
        assert!(h.client.pipelining());
        assert_eq!(h.client.size_limit(), Some(2000));
        assert_eq!(h.sent(), "");
    }

    #[test]
    fn ehlo_5xx_falls_back_to_helo_without_extensions() {
        let mut h = Harness::new();
        h.feed(GREETING);
        assert_eq!(h.sent(), "EHLO relay.test\r\n");
        h.feed(b"502 5.5.1 command not implemented\r\n");
        assert_eq!(h.sent(), "HELO relay.test\r\n");
        assert_eq!(h.events(), []);
        h.feed(b"250 mx.test\r\n");
        assert_eq!(h.events(), [ClientEvent::Ready]);
        assert!(!h.client.pipelining());
        assert_eq!(h.client.size_limit(), None);
        let mut m = message(&["b@dst.test"], b"x\r\n");
        m.eight_bit = true;
        h.client.start(m).unwrap();
        // No SIZE, no BODY: the server offered neither.
        assert_eq!(h.sent(), "MAIL FROM:<a@src.test>\r\n");
    }

    #[test]
    fn refused_greeting_or_hello_closes() {
        for (script, reason) in [
            (
                &b"554 5.7.1 go away\r\n"[..],
                "greeting refused: 554 5.7.1 go away",
            ),
            (b"421 4.3.2 busy\r\n", "next hop closing: 421 4.3.2 busy"),
            (
                b"220 hi\r\n451 4.3.0 later\r\n",
                "EHLO refused: 451 4.3.0 later",
            ),
            (b"220 hi\r\n500 what\r\n550 no\r\n", "HELO refused: 550 no"),
        ] {
            let mut h = Harness::new();
            h.feed(script);
            assert_eq!(h.events(), [closed(reason)]);
            assert_eq!(h.chunks().len(), 0);
            assert!(h.client.start(message(&["b@dst.test"], b"x\r\n")).is_err());
        }
    }

    #[test]
    fn pipelined_transaction_goes_out_in_one_burst_with_per_recipient_outcomes() {
        let mut h = Harness::ready(EHLO_PIPELINING);
        let mut m = message(&["b@dst.test", "c@dst.test", "d@dst.test"], b"Hi\r\n");
        m.eight_bit = true;
        h.client.start(m).unwrap();
        assert!(!h.client.is_ready());
        let burst = h.chunks();
        assert_eq!(burst.len(), 1, "one write for the whole group");
        assert_eq!(
            &burst[0][..],
            b"MAIL FROM:<a@src.test> SIZE=4 BODY=8BITMIME\r\nRCPT TO:<b@dst.test>\r\nRCPT TO:<c@dst.test>\r\nRCPT TO:<d@dst.test>\r\nDATA\r\n"
        );
        h.feed(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n450 4.2.0 busy\r\n550 5.1.1 unknown\r\n");
        assert_eq!(h.sent(), "", "no data before 354");
        h.feed(b"354 go ahead\r\n");
        assert_eq!(h.sent(), "Hi\r\n.\r\n");
        assert_eq!(h.events(), []);
        h.feed(b"250 2.0.0 queued as 1\r\n");
        assert_eq!(
            h.events(),
            [
                delivered(vec![
                    Delivered(r(250, "2.0.0 queued as 1")),
                    Deferred(r(450, "4.2.0 busy")),
                    Failed(r(550, "5.1.1 unknown")),
                ]),
                ClientEvent::Ready
            ]
        );
        assert!(h.client.is_ready());
    }

    fn dsn_message(rcpts: &[&str]) -> Outgoing {
        use crate::smtp::ext::{parse_notify, parse_orcpt};
        let mut m = message(rcpts, b"Hi\r\n");
        m.dsn = Some(Box::new(DsnEnvelope {
            ret: Some(Ret::Hdrs),
            envid: Some("id 1+x".into()),
            rcpts: vec![
                RcptDsn {
                    notify: parse_notify(b"SUCCESS,FAILURE").unwrap(),
                    orcpt: parse_orcpt(b"rfc822;b@dst.test"),
                },
                RcptDsn::default(),
            ],
        }));
        m
    }

    #[test]
    fn dsn_parameters_go_only_to_a_server_that_offers_dsn() {
        let mut h = Harness::ready(b"250-mx.test\r\n250-PIPELINING\r\n250 DSN\r\n");
        assert!(h.client.offers_dsn());
        h.client
            .start(dsn_message(&["b@dst.test", "c@dst.test"]))
            .unwrap();
        assert_eq!(
            h.sent(),
            "MAIL FROM:<a@src.test> RET=HDRS ENVID=id+201+2Bx\r\n\
             RCPT TO:<b@dst.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@dst.test\r\n\
             RCPT TO:<c@dst.test>\r\nDATA\r\n"
        );
        let mut h = Harness::ready(EHLO_PIPELINING);
        assert!(!h.client.offers_dsn());
        h.client
            .start(dsn_message(&["b@dst.test", "c@dst.test"]))
            .unwrap();
        assert_eq!(
            h.sent(),
            "MAIL FROM:<a@src.test> SIZE=4\r\nRCPT TO:<b@dst.test>\r\nRCPT TO:<c@dst.test>\r\nDATA\r\n"
        );
    }

    #[test]
    fn smtputf8_goes_where_offered_and_a_message_needing_it_fails_elsewhere() {
        let utf8 = |needs: bool| {
            let mut m = message(&["用户@例子.test"], b"Hi\r\n");
            m.smtputf8 = true;
            m.needs_smtputf8 = needs;
            m
        };
        let mut h =
            Harness::ready(b"250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n");
        h.client.start(utf8(true)).unwrap();
        assert_eq!(
            h.sent(),
            "MAIL FROM:<a@src.test> BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<用户@例子.test>\r\nDATA\r\n"
        );
        // Not offered: nothing is sent, the recipient fails with 5.6.7 (RFC 6531 §3.2).
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client.start(utf8(true)).unwrap();
        assert_eq!(h.sent(), "");
        assert_eq!(
            h.events(),
            [
                delivered(vec![Failed(r(
                    553,
                    "5.6.7 SMTPUTF8 is required, but was not offered by the next hop"
                ))]),
                ClientEvent::Ready
            ]
        );
        // Declared but not needed (all ASCII after all): it goes without.
        let mut h = Harness::ready(EHLO_PIPELINING);
        let mut m = utf8(false);
        m.rcpts = vec![mailbox("b@dst.test")];
        h.client.start(m).unwrap();
        assert_eq!(
            h.sent(),
            "MAIL FROM:<a@src.test> SIZE=4\r\nRCPT TO:<b@dst.test>\r\nDATA\r\n"
        );
    }

    #[test]
    fn second_message_on_a_connection_starts_with_rset() {
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client.start(message(&["b@dst.test"], b"1\r\n")).unwrap();
        h.sent();
        h.feed(b"250 ok\r\n250 ok\r\n354 go\r\n");
        assert_eq!(h.sent(), "1\r\n.\r\n");
        h.feed(b"250 done\r\n");
        assert_eq!(h.events().len(), 2);
        h.client.start(message(&["c@dst.test"], b"2\r\n")).unwrap();
        assert_eq!(
            h.sent(),
            "RSET\r\nMAIL FROM:<a@src.test> SIZE=3\r\nRCPT TO:<c@dst.test>\r\nDATA\r\n"
        );
        h.feed(b"250 2.0.0 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n");
        assert_eq!(h.sent(), "2\r\n.\r\n");
        h.feed(b"250 done\r\n");
        assert_eq!(
            h.events(),
            [
                delivered(vec![Delivered(r(250, "done"))]),
                ClientEvent::Ready
            ]
        );
    }

    #[test]
    fn refused_rset_closes_and_defers() {
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client.start(message(&["b@dst.test"], b"1\r\n")).unwrap();
        h.sent();
        h.feed(b"250 ok\r\n250 ok\r\n354 go\r\n");
        h.sent();
        h.feed(b"250 done\r\n");
        h.events();
        h.client.start(message(&["c@dst.test"], b"2\r\n")).unwrap();
        h.feed(b"500 what\r\n");
        let reason = "unexpected reply to RSET: 500 what";
        let defer = r(451, &format!("4.5.0 next hop protocol error: {reason}"));
        assert_eq!(
            h.events(),
            [delivered(vec![Deferred(defer)]), closed(reason)]
        );
    }

    #[test]
    fn mail_refused_decides_every_recipient() {
        for (code, text) in [(451, "4.3.0 try later"), (553, "5.7.1 sender refused")] {
            let mut h = Harness::ready(EHLO_PIPELINING);
            h.client
                .start(message(&["b@dst.test", "c@dst.test"], b"x\r\n"))
                .unwrap();
            h.sent();
            h.feed(
                format!("{code} {text}\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
                    .as_bytes(),
            );
            assert_eq!(h.events(), [], "the DATA reply is still to come");
            h.feed(b"503 5.5.1 need MAIL\r\n");
            let o = if code == 451 {
                Deferred(r(code, text))
            } else {
                Failed(r(code, text))
            };
            assert_eq!(
                h.events(),
                [delivered(vec![o.clone(), o]), ClientEvent::Ready]
            );
            assert_eq!(h.sent(), "", "no data");
        }
    }

    #[test]
    fn no_accepted_recipient_sends_no_data() {
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client
            .start(message(&["b@dst.test", "c@dst.test"], b"x\r\n"))
            .unwrap();
        h.sent();
        h.feed(
            b"250 ok\r\n450 4.2.1 later\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n",
        );
        assert_eq!(h.sent(), "");
        assert_eq!(
            h.events(),
            [
                delivered(vec![
                    Deferred(r(450, "4.2.1 later")),
                    Failed(r(550, "5.1.1 unknown"))
                ]),
                ClientEvent::Ready
            ]
        );
        h.client.start(message(&["d@dst.test"], b"y\r\n")).unwrap();
        assert!(h.sent().starts_with("RSET\r\nMAIL FROM:"));
    }

    #[test]
    fn stray_354_without_recipients_is_ended_empty() {
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client.start(message(&["b@dst.test"], b"x\r\n")).unwrap();
        h.sent();
        h.feed(b"250 ok\r\n550 5.1.1 unknown\r\n354 go ahead anyway\r\n");
        assert_eq!(h.sent(), ".\r\n", "only the end, no content");
        assert_eq!(h.events(), []);
        h.feed(b"554 5.6.0 empty message\r\n");
        assert_eq!(
            h.events(),
            [
                delivered(vec![Failed(r(550, "5.1.1 unknown"))]),
                ClientEvent::Ready
            ]
        );
        h.client.start(message(&["d@dst.test"], b"y\r\n")).unwrap();
        assert!(h.sent().starts_with("RSET\r\n"));
    }

    #[test]
    fn without_pipelining_one_command_per_round_trip() {
        let mut h = Harness::ready(EHLO_PLAIN);
        assert!(!h.client.pipelining());
        h.client
            .start(message(&["b@dst.test", "c@dst.test"], b"x\r\n"))
            .unwrap();
        assert_eq!(h.sent(), "MAIL FROM:<a@src.test> SIZE=3\r\n");
        assert_eq!(h.sent(), "");
        h.feed(b"250 2.1.0 Ok\r\n");
        assert_eq!(h.sent(), "RCPT TO:<b@dst.test>\r\n");
        h.feed(b"550 5.1.1 unknown\r\n");
        assert_eq!(h.sent(), "RCPT TO:<c@dst.test>\r\n");
        h.feed(b"250 2.1.5 Ok\r\n");
        assert_eq!(h.sent(), "DATA\r\n");
        h.feed(b"354 go\r\n");
        assert_eq!(h.sent(), "x\r\n.\r\n");
        h.feed(b"250 2.0.0 queued\r\n");
        assert_eq!(
            h.events(),
            [
                delivered(vec![
                    Failed(r(550, "5.1.1 unknown")),
                    Delivered(r(250, "2.0.0 queued"))
                ]),
                ClientEvent::Ready
            ]
        );
        // Second message: RSET alone first; a refused MAIL ends it there.
        h.client.start(message(&["d@dst.test"], b"y\r\n")).unwrap();
        assert_eq!(h.sent(), "RSET\r\n");
        h.feed(b"250 2.0.0 Ok\r\n");
        assert_eq!(h.sent(), "MAIL FROM:<a@src.test> SIZE=3\r\n");
        h.feed(b"452 4.3.1 full\r\n");
        assert_eq!(h.sent(), "");
        assert_eq!(
            h.events(),
            [
                delivered(vec![Deferred(r(452, "4.3.1 full"))]),
                ClientEvent::Ready
            ]
        );
        // Third: every recipient refused: no DATA at all.
        h.client.start(message(&["e@dst.test"], b"z\r\n")).unwrap();
        assert_eq!(h.sent(), "RSET\r\n");
        h.feed(b"250 Ok\r\n");
        assert_eq!(h.sent(), "MAIL FROM:<a@src.test> SIZE=3\r\n");
        h.feed(b"250 Ok\r\n");
        assert_eq!(h.sent(), "RCPT TO:<e@dst.test>\r\n");
        h.feed(b"550 no\r\n");
        assert_eq!(h.sent(), "");
        assert_eq!(
            h.events(),
            [delivered(vec![Failed(r(550, "no"))]), ClientEvent::Ready]
        );
    }

    #[test]
    fn data_command_refused_decides_accepted_recipients() {
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client
            .start(message(&["b@dst.test", "c@dst.test"], b"x\r\n"))
            .unwrap();
        h.sent();
        h.feed(b"250 ok\r\n250 ok\r\n550 no\r\n451 4.3.0 no spool\r\n");
        assert_eq!(h.sent(), "");
        assert_eq!(
            h.events(),
            [
                delivered(vec![
                    Deferred(r(451, "4.3.0 no spool")),
                    Failed(r(550, "no"))
                ]),
                ClientEvent::Ready
            ]
        );
    }

    /// What a message's content looks like on the wire, driven through a client.
    fn wire_of(data: Bytes) -> (Vec<Bytes>, Vec<u8>) {
        let mut h = Harness::ready(EHLO_PIPELINING);
        let msg = Outgoing {
            data,
            ..message(&["b@dst.test"], b"")
        };
        h.client.start(msg).unwrap();
        h.sent();
        h.feed(b"250 ok\r\n250 ok\r\n354 go\r\n");
        let chunks = h.chunks();
        let wire = chunks.concat();
        (chunks, wire)
    }

    #[test]
    fn content_is_dot_stuffed() {
        for (data, wire) in [
            (&b".a\r\nb\r\n"[..], &b"..a\r\nb\r\n.\r\n"[..]),
            (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\n..b\r\n", b"a\r\n...b\r\n.\r\n"),
            (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
            (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b"", b".\r\n"),
            (b"a.b\r\n .c\r\n", b"a.b\r\n .c\r\n.\r\n"),
            (b"\r\n.\r\n.\r\n", b"\r\n..\r\n..\r\n.\r\n"),
        ] {
            let (_, got) = wire_of(Bytes::from_static(data));
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(wire),
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn content_goes_out_as_slices_of_the_stored_message() {
        let data = Bytes::from(b".first\r\nmiddle\r\n..two\r\nlast\r\n".to_vec());
        let base = data.as_ptr() as usize;
        let (chunks, wire) = wire_of(data.clone());
        assert_eq!(wire, b"..first\r\nmiddle\r\n...two\r\nlast\r\n.\r\n");
        let mut next = 0;
        let mut copied = Vec::new();
        for c in &chunks {
            let at = c.as_ptr() as usize;
            if (base..base + data.len()).contains(&at) {
                assert_eq!(at - base, next, "slices in order, nothing skipped");
                assert!(at - base + c.len() <= data.len());
                next += c.len();
            } else {
                copied.push(c.clone());
            }
        }
        assert_eq!(next, data.len(), "every content byte by reference");
        assert_eq!(copied, [&b"."[..], b".", b".\r\n"]);
    }

    #[test]
    fn size_over_the_limit_fails_without_sending() {
        let mut h = Harness::ready(b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
        let big: &'static [u8] = b"0123456789\r\n";
        h.client
            .start(message(&["b@dst.test", "c@dst.test"], big))
            .unwrap();
        assert_eq!(h.sent(), "");
        let fail = Failed(r(552, "5.3.4 message size exceeds next hop's limit"));
        assert_eq!(
            h.events(),
            [delivered(vec![fail.clone(), fail]), ClientEvent::Ready]
        );
        assert!(h.client.is_ready());
        // Exactly at the limit goes out (the CRLF we add to an unterminated line counts).
        h.client
            .start(message(&["b@dst.test"], b"01234567"))
            .unwrap();
        assert_eq!(
            h.sent(),
            "MAIL FROM:<a@src.test> SIZE=10\r\nRCPT TO:<b@dst.test>\r\nDATA\r\n"
        );
    }

    #[test]
    fn start_only_when_ready() {
        let mut h = Harness::new();
        let m = message(&["b@dst.test"], b"x\r\n");
        let back = h.client.start(m).unwrap_err();
        assert_eq!(back.rcpts.len(), 1);
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client.start(message(&["b@dst.test"], b"x\r\n")).unwrap();
        assert!(h.client.start(message(&["c@dst.test"], b"x\r\n")).is_err());
        // A message without recipients is done at once.
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client.start(message(&[], b"x\r\n")).unwrap();
        assert_eq!(h.sent(), "");
        assert_eq!(h.events(), [delivered(Vec::new()), ClientEvent::Ready]);
    }

    #[test]
    fn reply_421_mid_transaction_defers_everything_pending() {
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client
            .start(message(
                &["b@dst.test", "c@dst.test", "d@dst.test"],
                b"x\r\n",
            ))
            .unwrap();
        h.sent();
        h.feed(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n421 4.3.2 shutting down\r\n");
        let d = Deferred(r(421, "4.3.2 shutting down"));
        assert_eq!(
            h.events(),
            [
                delivered(vec![d.clone(), Failed(r(550, "5.1.1 unknown")), d]),
                closed("next hop closing: 421 4.3.2 shutting down")
            ]
        );
        assert!(!h.client.is_ready());
        assert_eq!(h.client.receive(b"250 late\r\n"), 10, "ignored once closed");
        assert_eq!(h.events(), []);
    }

    #[test]
    fn abort_mid_data_defers_the_accepted() {
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client
            .start(message(&["b@dst.test", "c@dst.test"], b".x\r\ny\r\n"))
            .unwrap();
        h.sent();
        h.feed(b"250 ok\r\n450 4.2.0 busy\r\n250 ok\r\n354 go\r\n");
        assert!(h.client.poll_transmit().is_some());
        h.client.abort("connection timed out");
        assert_eq!(h.client.poll_transmit(), None, "nothing more to write");
        assert_eq!(
            h.events(),
            [
                delivered(vec![
                    Deferred(r(450, "4.2.0 busy")),
                    Deferred(r(
                        421,
                        "4.4.2 connection with next hop lost: connection timed out"
                    )),
                ]),
                closed("connection timed out")
            ]
        );
        h.client.abort("again");
        assert_eq!(h.events(), [], "one Closed only");
    }

    #[test]
    fn quit_when_idle_or_after_the_transaction() {
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client.quit();
        assert_eq!(h.sent(), "QUIT\r\n");
        assert!(!h.client.is_ready());
        h.client.quit();
        assert_eq!(h.sent(), "", "one QUIT");
        h.feed(b"221 2.0.0 Bye\r\n");
        assert_eq!(h.events(), [closed("QUIT answered: 221 2.0.0 Bye")]);

        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client.start(message(&["b@dst.test"], b"x\r\n")).unwrap();
        h.sent();
        h.client.quit();
        assert_eq!(h.sent(), "", "not in the middle of a transaction");
        h.feed(b"250 ok\r\n250 ok\r\n354 go\r\n");
        assert_eq!(h.sent(), "x\r\n.\r\n");
        h.feed(b"250 queued\r\n");
        assert_eq!(h.sent(), "QUIT\r\n");
        assert_eq!(
            h.events(),
            [delivered(vec![Delivered(r(250, "queued"))])],
            "no Ready"
        );
        h.feed(b"221 Bye\r\n");
        assert_eq!(h.events(), [closed("QUIT answered: 221 Bye")]);
    }

    #[test]
    fn unusable_replies_close_without_panic() {
        let long = format!("250 {}\r\n", "x".repeat(600));
        let endless = "250-more\r\n".repeat(MAX_REPLY_LINES + 1);
        for (reply, reason) in [
            (&b"hello there\r\n"[..], "malformed reply: hello there"),
            (b"25 short\r\n", "malformed reply: 25 short"),
            (b"250x\r\n", "malformed reply: 250x"),
            (b"199 low\r\n", "malformed reply: 199 low"),
            (b"650 high\r\n", "malformed reply: 650 high"),
            (
                b"250-a\r\n251 b\r\n",
                "reply lines with different codes: 250 then 251",
            ),
            (long.as_bytes(), "reply line too long"),
            (&long.as_bytes()[..520], "reply line too long"),
            (endless.as_bytes(), "reply longer than 100 lines"),
            (
                b"250 ok\r\n250 ok\r\n250 ok\r\n",
                "unexpected reply to DATA: 250 ok",
            ),
            (b"250 ok\r\n350 ok\r\n", "unexpected reply to RCPT: 350 ok"),
        ] {
            let mut h = Harness::ready(EHLO_PIPELINING);
            h.client.start(message(&["b@dst.test"], b"x\r\n")).unwrap();
            h.sent();
            h.feed(reply);
            let defer = r(451, &format!("4.5.0 next hop protocol error: {reason}"));
            assert_eq!(
                h.events(),
                [delivered(vec![Deferred(defer)]), closed(reason)],
                "{reason}"
            );
            assert!(h.pending.len() < MAX_REPLY_LINE);
            assert!(h.client.reply_lines.is_empty());
            assert_eq!(h.sent(), "");
        }
    }

    #[test]
    fn a_reply_nobody_asked_for_closes() {
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.feed(b"421 4.4.2 idle timeout\r\n");
        assert_eq!(
            h.events(),
            [closed("unexpected reply: 421 4.4.2 idle timeout")]
        );
    }

    #[test]
    fn a_reply_before_the_end_of_data_closes() {
        let mut h = Harness::ready(EHLO_PIPELINING);
        h.client.start(message(&["b@dst.test"], b"x\r\n")).unwrap();
        h.sent();
        h.feed(b"250 ok\r\n250 ok\r\n354 go\r\n552 5.3.4 too big\r\n");
        assert_eq!(
            h.events(),
            [
                delivered(vec![Failed(r(552, "5.3.4 too big"))]),
                closed("reply before end of data: 552 5.3.4 too big")
            ]
        );
        assert_eq!(h.sent(), "");
    }

    // ---- STARTTLS and AUTH ----

    const EHLO_STARTTLS: &[u8] =
        b"250-mx.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 SIZE 10000\r\n";

    fn credentials() -> Arc<Credentials> {
        Arc::new(Credentials::new("user", "secret"))
    }

    impl Harness {
        fn with(client: Client) -> Self {
            Harness {
                client,
                pending: Vec::new(),
            }
        }

        /// Greeted, EHLO answered with `ehlo_reply` (which offers STARTTLS), STARTTLS
        /// accepted and the handshake reported done: EHLO has gone out again.
        fn in_tls(client: Client, ehlo_reply: &[u8]) -> Self {
            let mut h = Harness::with(client);
            h.feed(GREETING);
            assert_eq!(h.sent(), "EHLO relay.test\r\n");
            h.feed(ehlo_reply);
            assert_eq!(h.sent(), "STARTTLS\r\n");
            assert_eq!(h.events(), []);
            h.feed(b"220 2.0.0 Ready to start TLS\r\n");
            assert_eq!(h.events(), [ClientEvent::StartTls]);
            assert!(h.pending.is_empty());
            h.client.tls_established();
            assert!(h.client.tls_active());
            assert_eq!(h.sent(), "EHLO relay.test\r\n");
            h
        }
    }

    #[test]
    fn starttls_when_offered_then_ehlo_again_with_capabilities_forgotten() {
        for level in [TlsLevel::May, TlsLevel::Encrypt, TlsLevel::Verify] {
            let mut h = Harness::with(Client::new("relay.test").with_tls(level));
            h.feed(GREETING);
            assert_eq!(h.sent(), "EHLO relay.test\r\n");
            h.feed(EHLO_STARTTLS);
            assert_eq!(h.sent(), "STARTTLS\r\n", "{level:?}");
            assert!(!h.client.is_ready());
            // Bytes behind the 220 in the same read were sent before the handshake: an
            // attacker's, perhaps (RFC 3207 §4.2). Consumed and thrown away.
            let input = b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n";
            assert_eq!(h.client.receive(input), input.len());
            assert_eq!(h.events(), [ClientEvent::StartTls]);
            assert_eq!(h.sent(), "", "nothing while the handshake runs");
            assert_eq!(h.client.receive(b"250 more\r\n"), 10, "discarded");
            assert!(!h.client.tls_active());
            assert!(h.client.start(message(&["b@dst.test"], b"x\r\n")).is_err());
            h.client.tls_established();
            assert!(h.client.tls_active());
            assert_eq!(h.sent(), "EHLO relay.test\r\n");
            // The old PIPELINING and SIZE are forgotten; STARTTLS offered again is not
            // taken up a second time.
            h.feed(b"250-mx.test\r\n250 STARTTLS\r\n");
            assert_eq!(h.events(), [ClientEvent::Ready]);
            assert!(!h.client.pipelining());
            assert_eq!(h.client.size_limit(), None);
            h.client.start(message(&["b@dst.test"], b"x\r\n")).unwrap();
            assert_eq!(h.sent(), "MAIL FROM:<a@src.test>\r\n");
            // Ignored out of place.
            h.client.tls_established();
            assert_eq!(h.sent(), "");
        }
    }

    #[test]
    fn none_never_sends_starttls() {
        for client in [
            Client::new("relay.test"),
            Client::new("relay.test").with_tls(TlsLevel::None),
        ] {
            let mut h = Harness::with(client);
            h.feed(GREETING);
            h.sent();
            h.feed(EHLO_STARTTLS);
            assert_eq!(h.events(), [ClientEvent::Ready]);
            assert_eq!(h.sent(), "");
            assert!(!h.client.tls_active());
        }
    }

    #[test]
    fn may_goes_on_in_plaintext_when_not_offered_or_refused() {
        let mut h = Harness::with(Client::new("relay.test").with_tls(TlsLevel::May));
        h.feed(GREETING);
        h.sent();
        h.feed(EHLO_PIPELINING);
        assert_eq!(h.events(), [ClientEvent::Ready]);
        assert_eq!(h.sent(), "");

        let mut h = Harness::with(Client::new("relay.test").with_tls(TlsLevel::May));
        h.feed(GREETING);
        h.sent();
        h.feed(EHLO_STARTTLS);
        assert_eq!(h.sent(), "STARTTLS\r\n");
        h.feed(b"454 4.7.0 TLS not available due to temporary reason\r\n");
        assert_eq!(h.events(), [ClientEvent::Ready]);
        assert_eq!(h.sent(), "", "no second STARTTLS");
        // The capabilities from before the refusal still hold.
        assert!(h.client.pipelining());
        assert_eq!(h.client.size_limit(), Some(10000));
        assert!(!h.client.tls_active());
    }

    #[test]
    fn required_tls_not_offered_quits_and_defers() {
        for level in [TlsLevel::Encrypt, TlsLevel::Verify] {
            let mut h = Harness::with(Client::new("relay.test").with_tls(level));
            h.feed(GREETING);
            h.sent();
            h.feed(EHLO_PIPELINING);
            assert_eq!(h.events(), [], "no Ready: never plaintext");
            assert_eq!(h.sent(), "QUIT\r\n");
            assert!(h.client.close_reply().is_none());
            h.feed(b"221 2.0.0 Bye\r\n");
            assert_eq!(h.events(), [closed("TLS is required, but was not offered")]);
            assert_eq!(
                h.client.close_reply(),
                Some(&r(
                    451,
                    "4.7.4 TLS is required, but was not offered by the next hop"
                ))
            );
        }
        // The same when the server is gone before answering QUIT, and after HELO (an old
        // server has no extensions at all).
        let mut h = Harness::with(Client::new("relay.test").with_tls(TlsLevel::Encrypt));
        h.feed(GREETING);
        h.sent();
        h.feed(b"500 what\r\n");
        assert_eq!(h.sent(), "HELO relay.test\r\n");
        h.feed(b"250 mx.test\r\n");
        assert_eq!(h.sent(), "QUIT\r\n");
        h.client.abort("connection closed by the next hop");
        assert_eq!(h.events(), [closed("TLS is required, but was not offered")]);
        assert_eq!(
            h.client.close_reply().map(Reply::code),
            Some(451),
            "{:?}",
            h.client.close_reply()
        );
    }

    #[test]
    fn required_tls_refused_quits_and_defers() {
        let mut h = Harness::with(Client::new("relay.test").with_tls(TlsLevel::Encrypt));
        h.feed(GREETING);
        h.sent();
        h.feed(EHLO_STARTTLS);
        assert_eq!(h.sent(), "STARTTLS\r\n");
        h.feed(b"454 4.7.0 TLS not available\r\n");
        assert_eq!(h.sent(), "QUIT\r\n");
        h.feed(b"221 Bye\r\n");
        assert_eq!(
            h.events(),
            [closed(
                "TLS is required, but STARTTLS was refused: 454 4.7.0 TLS not available"
            )]
        );
        assert_eq!(
            h.client.close_reply(),
            Some(&r(
                451,
                "4.7.4 TLS is required, but the next hop refused STARTTLS: 454 4.7.0 TLS not available"
            ))
        );
    }

    #[test]
    fn a_failed_handshake_is_an_abort() {
        let mut h = Harness::in_tls(
            Client::new("relay.test").with_tls(TlsLevel::Verify),
            EHLO_STARTTLS,
        );
        h.feed(b"250 mx.test\r\n");
        assert_eq!(h.events(), [ClientEvent::Ready]);

        let mut h = Harness::with(Client::new("relay.test").with_tls(TlsLevel::Verify));
        h.feed(GREETING);
        h.feed(EHLO_STARTTLS);
        h.feed(b"220 go\r\n");
        h.sent();
        assert_eq!(h.events(), [ClientEvent::StartTls]);
        h.client.quit();
        h.client
            .abort("TLS handshake failed: invalid peer certificate: UnknownIssuer");
        assert_eq!(
            h.events(),
            [closed(
                "TLS handshake failed: invalid peer certificate: UnknownIssuer"
            )]
        );
        assert_eq!(h.sent(), "");
        assert_eq!(h.client.close_reply().map(Reply::code), Some(421));
    }

    #[test]
    fn auth_plain_after_tls_in_one_round_trip() {
        let client = Client::new("relay.test")
            .with_tls(TlsLevel::May)
            .with_auth(credentials());
        let mut h = Harness::in_tls(client, EHLO_STARTTLS);
        h.feed(b"250-mx.test\r\n250-PIPELINING\r\n250 AUTH LOGIN PLAIN CRAM-MD5\r\n");
        // base64("\0user\0secret")
        assert_eq!(h.sent(), "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n");
        assert_eq!(h.events(), []);
        assert!(!h.client.is_ready());
        h.feed(b"235 2.7.0 Authentication successful\r\n");
        assert_eq!(h.events(), [ClientEvent::Ready]);
        assert!(h.client.pipelining());
        h.client.start(message(&["b@dst.test"], b"x\r\n")).unwrap();
        assert!(h.sent().starts_with("MAIL FROM:<a@src.test>\r\n"));
    }

    #[test]
    fn auth_login_when_plain_is_not_offered() {
        let client = Client::new("relay.test")
            .with_tls(TlsLevel::Encrypt)
            .with_auth(credentials());
        let mut h = Harness::in_tls(client, EHLO_STARTTLS);
        // The pre-standard form some servers still send.
        h.feed(b"250-mx.test\r\n250 AUTH=LOGIN\r\n");
        assert_eq!(h.sent(), "AUTH LOGIN\r\n");
        h.feed(b"334 VXNlcm5hbWU6\r\n");
        assert_eq!(h.sent(), "dXNlcg==\r\n");
        h.feed(b"334 UGFzc3dvcmQ6\r\n");
        assert_eq!(h.sent(), "c2VjcmV0\r\n");
        assert_eq!(h.events(), []);
        h.feed(b"235 2.7.0 ok\r\n");
        assert_eq!(h.events(), [ClientEvent::Ready]);
    }

    #[test]
    fn refused_credentials_defer_and_never_bounce() {
        for (script, sent) in [
            (
                &[&b"535 5.7.8 Authentication credentials invalid\r\n"[..]][..],
                "AUTH PLAIN AHVzZXIAc2VjcmV0\r\nQUIT\r\n",
            ),
            (
                &[&b"334 \r\n"[..]],
                "AUTH PLAIN AHVzZXIAc2VjcmV0\r\nQUIT\r\n",
            ),
        ] {
            let client = Client::new("relay.test")
                .with_tls(TlsLevel::May)
                .with_auth(credentials());
            let mut h = Harness::in_tls(client, EHLO_STARTTLS);
            h.feed(b"250-mx.test\r\n250 AUTH PLAIN\r\n");
            for s in script {
                h.feed(s);
            }
            assert_eq!(h.sent(), sent);
            h.feed(b"221 Bye\r\n");
            let events = h.events();
            assert!(
                matches!(&events[..], [ClientEvent::Closed { reason }] if reason.starts_with("AUTH refused: ")),
                "{events:?}"
            );
            let reply = h.client.close_reply().unwrap();
            assert!(reply.is_transient(), "{reply}");
            assert_eq!(reply.enhanced_status(), Some("4.7.0"));
        }
        // LOGIN refusing the user name.
        let client = Client::new("relay.test")
            .with_tls(TlsLevel::May)
            .with_auth(credentials());
        let mut h = Harness::in_tls(client, EHLO_STARTTLS);
        h.feed(b"250-mx.test\r\n250 AUTH LOGIN\r\n");
        h.feed(b"334 VXNlcm5hbWU6\r\n535 5.7.8 no\r\n");
        assert_eq!(h.sent(), "AUTH LOGIN\r\ndXNlcg==\r\nQUIT\r\n");
        h.feed(b"221 Bye\r\n");
        assert_eq!(h.events(), [closed("AUTH refused: 535 5.7.8 no")]);
        assert_eq!(
            h.client.close_reply(),
            Some(&r(454, "4.7.0 the next hop refused our AUTH: 535 5.7.8 no"))
        );
    }

    #[test]
    fn credentials_go_only_over_tls_and_only_by_plain_or_login() {
        // AUTH offered in plaintext, no STARTTLS: not used; QUIT instead.
        let client = Client::new("relay.test")
            .with_tls(TlsLevel::May)
            .with_auth(credentials());
        let mut h = Harness::with(client);
        h.feed(GREETING);
        h.sent();
        h.feed(b"250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n");
        assert_eq!(h.sent(), "QUIT\r\n");
        h.feed(b"221 Bye\r\n");
        assert_eq!(h.events(), [closed("TLS is required, but was not offered")]);
        // A refused STARTTLS: the same, even at may.
        let client = Client::new("relay.test")
            .with_tls(TlsLevel::May)
            .with_auth(credentials());
        let mut h = Harness::with(client);
        h.feed(GREETING);
        h.feed(EHLO_STARTTLS);
        h.feed(b"454 4.7.0 no\r\n");
        assert_eq!(h.sent(), "EHLO relay.test\r\nSTARTTLS\r\nQUIT\r\n");
        // Over TLS, but no mechanism we speak, or no AUTH at all.
        for (ehlo, reason) in [
            (
                &b"250-mx.test\r\n250 AUTH CRAM-MD5 XOAUTH2\r\n"[..],
                "AUTH is configured, but the next hop offers neither PLAIN nor LOGIN",
            ),
            (
                b"250 mx.test\r\n",
                "AUTH is configured, but the next hop does not offer AUTH",
            ),
        ] {
            let client = Client::new("relay.test")
                .with_tls(TlsLevel::May)
                .with_auth(credentials());
            let mut h = Harness::in_tls(client, EHLO_STARTTLS);
            h.feed(ehlo);
            assert_eq!(h.sent(), "QUIT\r\n");
            h.feed(b"221 Bye\r\n");
            assert_eq!(h.events(), [closed(reason)]);
            assert_eq!(
                h.client.close_reply(),
                Some(&r(454, &format!("4.7.0 {reason}")))
            );
        }
    }

    #[test]
    fn a_421_while_giving_up_keeps_our_reason() {
        let mut h = Harness::with(Client::new("relay.test").with_tls(TlsLevel::Encrypt));
        h.feed(GREETING);
        h.feed(EHLO_PIPELINING);
        assert_eq!(h.sent(), "EHLO relay.test\r\nQUIT\r\n");
        h.feed(b"421 4.3.2 going away\r\n");
        assert_eq!(h.events(), [closed("TLS is required, but was not offered")]);
    }

    #[test]
    fn quit_asked_during_the_opening_waits_for_tls_and_auth() {
        let client = Client::new("relay.test")
            .with_tls(TlsLevel::May)
            .with_auth(credentials());
        let mut h = Harness::with(client);
        h.feed(GREETING);
        h.feed(EHLO_STARTTLS);
        h.feed(b"220 go\r\n");
        h.client.quit();
        h.client.tls_established();
        h.feed(b"250-mx.test\r\n250 AUTH PLAIN\r\n235 ok\r\n");
        assert_eq!(
            h.sent(),
            "EHLO relay.test\r\nSTARTTLS\r\nEHLO relay.test\r\nAUTH PLAIN AHVzZXIAc2VjcmV0\r\nQUIT\r\n"
        );
        assert_eq!(h.events(), [ClientEvent::StartTls], "no Ready");
    }

    #[test]
    fn credentials_make_tls_required_even_at_none() {
        let client = Client::new("relay.test")
            .with_tls(TlsLevel::None)
            .with_auth(credentials());
        let mut h = Harness::in_tls(client, EHLO_STARTTLS);
        h.feed(b"250-mx.test\r\n250 AUTH PLAIN\r\n");
        assert_eq!(h.sent(), "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n");
    }

    #[test]
    fn credentials_do_not_show_the_password() {
        let c = Credentials::new("user", "secret");
        let shown = format!("{c:?}");
        assert!(
            shown.contains("user") && !shown.contains("secret"),
            "{shown}"
        );
        assert_eq!(c.user(), "user");
        let client = Client::new("relay.test").with_auth(Arc::new(c));
        assert!(!format!("{client:?}").contains("secret"));
    }

    /// A whole TLS + AUTH opening and one message, the server's bytes cut at `split` (or
    /// byte by byte): the client's bytes and events are the same whatever the cut.
    fn tls_script(split: Option<usize>) -> (String, Vec<ClientEvent>) {
        let client = Client::new("relay.test")
            .with_tls(TlsLevel::Verify)
            .with_auth(credentials());
        let mut h = Harness::with(client);
        let phases: [&[u8]; 7] = [
            b"220-mx.test ESMTP\r\n220 hi\r\n",
            b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n",
            b"220 2.0.0 Ready to start TLS\r\n",
            b"250-mx.test\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 SIZE 1000\r\n",
            b"235 2.7.0 ok\r\n",
            b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n",
            b"250 2.0.0 queued\r\n",
        ];
        let mut sent = String::new();
        let mut events = Vec::new();
        let react = |h: &mut Harness, sent: &mut String, events: &mut Vec<ClientEvent>| {
            for e in h.events() {
                match e {
                    ClientEvent::StartTls => {
                        // What a driver does: drop what it holds, then the handshake.
                        h.pending.clear();
                        h.client.tls_established();
                    }
                    ClientEvent::Ready if h.client.is_ready() && events.len() < 3 => {
                        h.client.start(message(&["b@dst.test"], b"x\r\n")).unwrap();
                    }
                    _ => {}
                }
                events.push(e);
            }
            sent.push_str(&h.sent());
        };
        for phase in phases {
            match split {
                Some(at) => {
                    let at = at.min(phase.len());
                    h.feed(&phase[..at]);
                    react(&mut h, &mut sent, &mut events);
                    h.feed(&phase[at..]);
                }
                None => {
                    for b in phase {
                        h.feed(std::slice::from_ref(b));
                        react(&mut h, &mut sent, &mut events);
                    }
                }
            }
            react(&mut h, &mut sent, &mut events);
        }
        (sent, events)
    }

    #[test]
    fn tls_and_auth_opening_split_anywhere_gives_the_same_conversation() {
        let expected = tls_script(Some(0));
        assert_eq!(
            expected.0,
            "EHLO relay.test\r\nSTARTTLS\r\nEHLO relay.test\r\nAUTH PLAIN AHVzZXIAc2VjcmV0\r\n\
             MAIL FROM:<a@src.test> SIZE=3\r\nRCPT TO:<b@dst.test>\r\nDATA\r\nx\r\n.\r\n"
        );
        assert_eq!(
            expected.1,
            [
                ClientEvent::StartTls,
                ClientEvent::Ready,
                delivered(vec![Delivered(r(250, "2.0.0 queued"))]),
                ClientEvent::Ready,
            ]
        );
        for split in 1..80 {
            assert_eq!(tls_script(Some(split)), expected, "split at {split}");
        }
        assert_eq!(tls_script(None), expected, "byte by byte");
    }

    /// A whole connection in phases of server bytes; each phase is fed in two pieces cut
    /// at `split` (or byte by byte). The driver starts two messages, then quits.
    fn run_script(phases: &[&[u8]], split: Option<usize>) -> (String, Vec<ClientEvent>) {
        let mut h = Harness::new();
        let mut sent = String::new();
        let mut events = Vec::new();
        let mut started = 0;
        let mut react = |h: &mut Harness, sent: &mut String, events: &mut Vec<ClientEvent>| {
            for e in h.events() {
                if e == ClientEvent::Ready {
                    if started < 2 {
                        let rcpts: &[&str] = if started == 0 {
                            &["b@dst.test", "c@dst.test"]
                        } else {
                            &["d@dst.test"]
                        };
                        h.client.start(message(rcpts, b".hi\r\n")).unwrap();
                        started += 1;
                    } else {
                        h.client.quit();
                    }
                }
                events.push(e);
            }
            sent.push_str(&h.sent());
        };
        for phase in phases {
            match split {
                Some(at) => {
                    let at = at.min(phase.len());
                    h.feed(&phase[..at]);
                    react(&mut h, &mut sent, &mut events);
                    h.feed(&phase[at..]);
                }
                None => {
                    for b in phase.iter() {
                        h.feed(std::slice::from_ref(b));
                        react(&mut h, &mut sent, &mut events);
                    }
                }
            }
            react(&mut h, &mut sent, &mut events);
        }
        assert!(h.pending.is_empty());
        (sent, events)
    }

    #[test]
    fn replies_split_anywhere_give_the_same_conversation() {
        let phases: [&[u8]; 6] = [
            b"220-mx.test ESMTP\r\n220 hi\r\n",
            b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250 8BITMIME\r\n",
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n450 4.2.0 busy\r\n354 go\r\n",
            b"250-2.0.0 Ok\r\n250 queued as X\r\n",
            b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n550 5.1.1 no\n554 5.5.1 no valid recipients\r\n",
            b"221 2.0.0 Bye\r\n",
        ];
        let expected = run_script(&phases, Some(0));
        assert_eq!(
            expected.0,
            "EHLO relay.test\r\n\
             MAIL FROM:<a@src.test> SIZE=5\r\nRCPT TO:<b@dst.test>\r\nRCPT TO:<c@dst.test>\r\nDATA\r\n\
             ..hi\r\n.\r\n\
             RSET\r\nMAIL FROM:<a@src.test> SIZE=5\r\nRCPT TO:<d@dst.test>\r\nDATA\r\n\
             QUIT\r\n"
        );
        assert_eq!(
            expected.1,
            [
                ClientEvent::Ready,
                delivered(vec![
                    Delivered(Reply::multiline(
                        250,
                        ["2.0.0 Ok".to_string(), "queued as X".to_string()]
                    )),
                    Deferred(r(450, "4.2.0 busy")),
                ]),
                ClientEvent::Ready,
                delivered(vec![Failed(r(550, "5.1.1 no"))]),
                ClientEvent::Ready,
                closed("QUIT answered: 221 2.0.0 Bye"),
            ]
        );
        let longest = phases.iter().map(|p| p.len()).max().unwrap();
        for split in 1..=longest {
            assert_eq!(
                run_script(&phases, Some(split)),
                expected,
                "split at {split}"
            );
        }
        assert_eq!(run_script(&phases, None), expected, "byte by byte");
    }

    /// Lines of message content: any bytes but CR and LF, dots likely at the start.
    fn content() -> impl Strategy<Value = Vec<u8>> {
        let line = proptest::collection::vec(
            prop_oneof![
                3 => Just(b'.'),
                1 => any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
                1 => Just(b'a'),
            ],
            0..12,
        );
        (proptest::collection::vec(line, 0..12), any::<bool>()).prop_map(|(lines, crlf_end)| {
            let mut data = lines.join(&b"\r\n"[..]);
            if crlf_end && !lines.is_empty() {
                data.extend_from_slice(b"\r\n");
            }
            data
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Whatever the stored content, the server's DATA scanner gets it back byte for
        /// byte (with CRLF added to an unterminated last line), and the terminator is the
        /// very end of what was sent.
        #[test]
        fn content_round_trips_through_the_server_scanner(data in content()) {
            let (_, wire) = wire_of(Bytes::from(data.clone()));
            let mut body = BytesMut::new();
            let (used, outcome) = DataScanner::new(1 << 20).scan(&wire, &mut body);
            let outcome = outcome.expect("the terminator was found");
            prop_assert_eq!(used, wire.len());
            prop_assert!(!outcome.bare_line_ending);
            let mut expected = data.clone();
            if !expected.is_empty() && !expected.ends_with(b"\r\n") {
                expected.extend_from_slice(b"\r\n");
            }
            prop_assert_eq!(&body[..], &expected[..]);
            prop_assert_eq!(outcome.size, wire_size(&data));
        }

        /// Well-formed replies with random codes, in random pieces, to a driver that
        /// starts messages on `Ready`: every message started gets exactly one `Delivery`
        /// (unless still in flight), with one outcome per recipient, and `Closed` is last.
        #[test]
        fn random_reply_codes_keep_the_books(
            replies in proptest::collection::vec(
                (
                    proptest::sample::select(
                        vec![220u16, 221, 250, 251, 354, 421, 450, 451, 500, 502, 503, 550, 554],
                    ),
                    1..3usize,
                    any::<usize>(),
                ),
                0..40,
            ),
            pipelining in any::<bool>(),
            abort_at in proptest::option::of(0..40usize),
        ) {
            let mut h = Harness::ready(if pipelining { EHLO_PIPELINING } else { EHLO_PLAIN });
            let rcpts = ["b@dst.test", "c@dst.test", "d@dst.test"];
            let mut started = 0;
            let mut events = vec![ClientEvent::Ready];
            let mut wire = Vec::new();
            for (i, &(code, lines, cut)) in replies.iter().enumerate() {
                if h.client.is_ready() {
                    if started < 3 {
                        h.client.start(message(&rcpts[..=started], b".x\r\n")).unwrap();
                        started += 1;
                    } else {
                        h.client.quit();
                    }
                }
                if abort_at == Some(i) {
                    h.client.abort("timeout");
                }
                wire.extend(h.chunks().concat());
                let mut reply = Vec::new();
                for l in 1..lines {
                    reply.extend_from_slice(format!("{code}-line {l}\r\n").as_bytes());
                }
                reply.extend_from_slice(format!("{code} last\r\n").as_bytes());
                let cut = cut % (reply.len() + 1);
                h.feed(&reply[..cut]);
                h.feed(&reply[cut..]);
                wire.extend(h.chunks().concat());
                events.extend(h.events());
            }
            let closed_at = events.iter().position(|e| matches!(e, ClientEvent::Closed { .. }));
            if let Some(at) = closed_at {
                prop_assert_eq!(at, events.len() - 1, "Closed comes last");
                prop_assert!(h.client.tx.is_none());
            }
            let deliveries: Vec<&Delivery> = events
                .iter()
                .filter_map(|e| match e {
                    ClientEvent::Delivered(d) => Some(d),
                    _ => None,
                })
                .collect();
            let in_flight = usize::from(h.client.tx.is_some());
            prop_assert_eq!(deliveries.len() + in_flight, started);
            for (k, d) in deliveries.iter().enumerate() {
                prop_assert_eq!(d.outcomes.len(), k + 1);
            }
            // Every content that went out was complete and properly ended.
            let wire = String::from_utf8(wire).unwrap();
            prop_assert_eq!(wire.matches("..x\r\n").count(), wire.matches("..x\r\n.\r\n").count());
        }

        /// Random server bytes in random pieces, at any point of a conversation: no panic,
        /// bounded memory, and a coherent event stream.
        #[test]
        fn random_replies_never_panic(
            chunks in proptest::collection::vec(
                // Biased towards what reply lines are made of (a plain mapping: prop_oneof
                // per byte makes generation slow in debug builds).
                proptest::collection::vec(any::<u16>(), 0..300).prop_map(|v| {
                    const LIKELY: &[u8] = b"22222554000--  \r\n\n\n";
                    v.iter()
                        .map(|&x| {
                            let [hi, lo] = x.to_be_bytes();
                            if hi < 160 { LIKELY[usize::from(lo) % LIKELY.len()] } else { lo }
                        })
                        .collect::<Vec<u8>>()
                }),
                0..20,
            ),
            prefix in 0..4usize,
            secure in any::<bool>(),
        ) {
            let mut h = if secure {
                // STARTTLS and AUTH on the way: the random bytes meet those states too.
                Harness::with(
                    Client::new("relay.test")
                        .with_tls(TlsLevel::May)
                        .with_auth(credentials()),
                )
            } else {
                Harness::new()
            };
            let rcpts = ["b@dst.test", "c@dst.test"];
            if prefix >= 1 {
                h.feed(GREETING);
            }
            if prefix >= 2 && !secure {
                h.feed(EHLO_PIPELINING);
            }
            if prefix >= 3 && !secure {
                h.client.start(message(&rcpts, b".x\r\n")).unwrap();
            }
            let mut events = h.events();
            for c in &chunks {
                h.feed(c);
                h.chunks();
                for e in h.events() {
                    if e == ClientEvent::StartTls {
                        h.pending.clear();
                        h.client.tls_established();
                    }
                    events.push(e);
                }
                prop_assert!(h.pending.len() < MAX_REPLY_LINE);
                prop_assert!(h.client.reply_lines.len() <= MAX_REPLY_LINES);
                prop_assert!(h.client.awaiting.len() <= rcpts.len() + 4);
            }
            let closes = events.iter().filter(|e| matches!(e, ClientEvent::Closed { .. })).count();
            prop_assert!(closes <= 1);
            if closes == 1 {
                let last_is_closed = matches!(events.last(), Some(ClientEvent::Closed { .. }));
                prop_assert!(last_is_closed, "Closed comes last");
                prop_assert_eq!(h.client.poll_transmit(), None);
            }
            for e in &events {
                if let ClientEvent::Delivered(d) = e {
                    prop_assert_eq!(d.outcomes.len(), rcpts.len());
                }
            }
        }
    }
}
