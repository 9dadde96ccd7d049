//! The server side of one SMTP connection as a deterministic state machine (sans-IO).
//!
//! Bytes go in through [`Session::receive`]; replies accumulate in an output buffer the
//! driver drains with [`Session::take_output`]; a finished message comes out of
//! [`Session::take_message`] and its fate goes back in with [`Session::message_result`].
//! There are no sockets and no clock: the time is an argument, and queue IDs and
//! per-address checks come from the caller's [`Hooks`]. A whole conversation can therefore
//! be driven, byte by byte, from a test.
//!
//! Message content comes with DATA (the [`DataScanner`]) or in BDAT chunks (CHUNKING, RFC
//! 3030: exact byte counts, the [`ChunkScanner`]); both end in the same checks and the same
//! envelope. Past [`STREAM_ABOVE`] bytes the content can leave the session while it arrives
//! ([`Session::take_piece`]), so a handler that streams it to disk keeps memory flat
//! whatever the message size; the size limit and the checks still see every byte.
//!
//! PIPELINING (RFC 2920): every command in the input is processed in order; the session
//! stops early only when a message awaits its result, or when the session closed. Replies
//! are only ever appended, so none is lost or reordered; the driver sends them whenever
//! the input runs dry.
//!
//! Allocation: once a session's buffers have grown to their working size, no command
//! allocates (`tests/allocations.rs` counts). Addresses are parsed in place, kept in
//! storage reused from one transaction to the next, and lent to the hooks from reused
//! storage too; replies are written straight into the output buffer. Per message, the
//! end of DATA makes the envelope's owned parts: one string holding all its addresses
//! (its [`Mailbox`]es share it) and its list of recipients. The HELO name is shared by a
//! session's messages, and the content is the body buffer itself, handed over; the next
//! message needs a new body buffer only while the handler still holds this one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};

use super::auth::{AuthExchange, Credentials, Step, MAX_RESPONSE_LINE};
use super::command::{self, BodyType, Command, CommandError};
use super::data::{ChunkScanner, DataOutcome, DataScanner};
use super::envelope::Envelope;
use super::ext::{self, DsnEnvelope, RcptDsn, Ret};
use super::path::{ListEntry, Mailbox, MailboxList, MailboxRef, MailboxSlot, ReversePath};
use super::received::{write_received, Trace};
use super::reply::Reply;
use crate::id::QueueId;
use crate::policy::RelayPolicy;

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;

/// Longest MAIL or RCPT line, CRLF included: the DSN extension adds up to 500 octets
/// (RFC 3461 §4: ORCPT on RCPT; ENVID and RET on MAIL need less).
pub const MAX_MAIL_RCPT_LINE: usize = MAX_COMMAND_LINE + 500;

/// The line limit for a command line that starts with `line`.
fn line_limit(line: &[u8]) -> usize {
    match line.get(..4) {
        Some(verb) if verb.eq_ignore_ascii_case(b"MAIL") || verb.eq_ignore_ascii_case(b"RCPT") => {
            MAX_MAIL_RCPT_LINE
        }
        _ => MAX_COMMAND_LINE,
    }
}

/// Why [`take_rcpt`] refused a recipient.
enum RcptRefusal {
    /// A fixed reply.
    Wire(&'static [u8]),
    /// The hook's reply.
    Hook(Reply),
}

/// Checks a recipient (relay policy, sender-specified routing, the hook) and, when it
/// passes, adds it to the transaction; the error says why not.
fn take_rcpt(
    config: &SessionConfig,
    may_relay: bool,
    hook_mailbox: &mut MailboxSlot,
    tx: &mut Transaction,
    to: Option<MailboxRef<'_>>,
    dsn: RcptDsn,
    hooks: &mut impl Hooks,
) -> Result<(), RcptRefusal> {
    // `<Postmaster>` with no domain is ours: it goes to the configured postmaster, from
    // anyone (RFC 5321 §4.1.1.3, §4.5.1). With none configured it is refused now, rather
    // than accepted for a mailbox that reaches no one and bounced to whoever claimed to
    // send it.
    let (to, postmaster) = match to {
        Some(to) => (to, None),
        None => match &config.postmaster {
            Some(p) => (p.as_mailbox_ref(), Some(p)),
            None => return Err(RcptRefusal::Wire(NO_POSTMASTER)),
        },
    };
    let local = postmaster.is_some();
    // RFC 6531 §3.5: an internationalized address only in a transaction that declared
    // SMTPUTF8.
    if !to.is_ascii() && !tx.smtputf8 {
        return Err(RcptRefusal::Wire(NON_ASCII_RCPT));
    }
    // A U-label domain is compared in its A-label form, as `relay.domains` is written
    // (an ASCII one as it is: the comparison ignores case, and allocates nothing).
    let relay_domain = |d: &str| {
        if d.is_ascii() {
            config.relay.is_relay_domain(d)
        } else {
            config.relay.is_relay_domain(&ext::ascii_domain(d))
        }
    };
    if !local && !may_relay && !relay_domain(to.domain()) {
        return Err(RcptRefusal::Wire(b"550 5.7.1 Relay access denied\r\n"));
    }
    // Sender-specified routing (`user%other@ours`, `host!user@ours`, `"a@b"@ours`) from
    // an outside client could make a downstream server relay for it: refuse it, as
    // Postfix does (allow_untrusted_routing = no).
    if !local
        && !may_relay
        && to
            .local_part()
            .bytes()
            .any(|b| matches!(b, b'%' | b'!' | b'@'))
    {
        return Err(RcptRefusal::Wire(
            b"550 5.7.1 Sender-specified routing is not allowed\r\n",
        ));
    }
    let checked = match postmaster {
        Some(p) => hooks.check_rcpt(p),
        None => hooks.check_rcpt(&hook_mailbox.fill(to)),
    };
    checked.map_err(RcptRefusal::Hook)?;
    let entry = tx.addresses.push(to);
    tx.to.push(entry);
    tx.any_dsn |= !dsn.is_default();
    tx.rcpt_dsn.push(dsn);
    Ok(())
}

/// The reply to a non-ASCII recipient in a transaction without SMTPUTF8 (RFC 6531 §3.5).
const NON_ASCII_RCPT: &[u8] =
    b"553 5.6.7 Error: non-ASCII addresses are not permitted without SMTPUTF8\r\n";

/// The reply to a bare `<postmaster>` when `relay.postmaster` is empty.
const NO_POSTMASTER: &[u8] =
    b"550 5.1.1 <postmaster>: no postmaster mailbox is configured here\r\n";

/// Largest body buffer a session keeps for its next message (see `take_body`).
const BODY_KEEP: usize = 16 * 1024;

/// Extra `452 4.5.3` replies tolerated past `max_recipients` before they count as errors
/// (a client may legitimately pipeline more recipients than we take).
const RCPT_OVERSHOOT_ALLOWANCE: u32 = 1000;

/// Content held in memory before a message may be streamed: smaller messages are handed
/// over whole (the fast path: one buffer, appended to the spool's shared segment), larger
/// ones leave the session in pieces of about this size while they arrive.
pub const STREAM_ABOVE: usize = 256 * 1024;

/// What a session needs to know, shared by every session of a server.
#[derive(Debug)]
pub struct SessionConfig {
    /// Our host name: in the greeting, EHLO reply and Received headers.
    pub hostname: String,
    /// Largest message accepted, in bytes (advertised as SIZE).
    pub max_message_size: usize,
    /// Most recipients per transaction; beyond: `452 4.5.3`.
    pub max_recipients: usize,
    /// Errors tolerated before `421` and close.
    pub max_errors: u32,
    /// Who may relay where.
    pub relay: RelayPolicy,
    /// NOOP, RSET, VRFY and HELP outside a transaction a session may send before `421`
    /// (Postfix's `smtpd_junk_command_limit`); counted afresh after each accepted message.
    pub max_junk_commands: u32,
    /// STARTTLS is offered (a certificate is configured).
    pub starttls: bool,
    /// AUTH PLAIN and LOGIN are offered, over TLS only (a users file is configured).
    pub auth: bool,
    /// Failed AUTH attempts a connection may make before `421` and close.
    pub max_auth_failures: u32,
    /// Where a bare `<postmaster>` goes (`relay.postmaster`); `None` refuses it with
    /// `550 5.1.1`.
    pub postmaster: Option<Mailbox>,
    /// Content held before the message is offered for streaming ([`STREAM_ABOVE`]).
    pub stream_above: usize,
    greeting: Bytes,
    /// The EHLO reply before TLS (STARTTLS offered when configured).
    ehlo_reply: Bytes,
    /// The EHLO reply over TLS (AUTH offered when configured; no STARTTLS).
    ehlo_reply_tls: Bytes,
    helo_reply: Bytes,
}

/// The EHLO reply: the fixed extensions, then STARTTLS / AUTH as asked.
fn ehlo_reply(hostname: &str, max_message_size: usize, starttls: bool, auth: bool) -> Bytes {
    let mut r = format!("250-{hostname}\r\n250-PIPELINING\r\n250-SIZE {max_message_size}\r\n");
    if starttls {
        r.push_str("250-STARTTLS\r\n");
    }
    if auth {
        r.push_str("250-AUTH PLAIN LOGIN\r\n");
    }
    // CHUNKING (RFC 3030) without BINARYMIME: most next hops could not take binary
    // content on, so BDAT content is text with CRLF line endings like DATA's.
    r.push_str(
        "250-8BITMIME\r\n250-CHUNKING\r\n250-DSN\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n",
    );
    Bytes::from(r)
}

/// What the TLS layer under a session negotiated, for the `Received:` header and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsInfo {
    /// Protocol version, e.g. `TLSv1.3`.
    pub version: &'static str,
    /// Cipher suite (IANA name), e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher: &'static str,
}

/// A session's SMTP AUTH state (boxed: most sessions never authenticate).
#[derive(Debug, Default)]
struct AuthState {
    exchange: AuthExchange,
    /// Credentials waiting for the driver's verdict ([`Session::take_credentials`]).
    credentials: Option<Credentials>,
    /// Who authenticated.
    user: Option<String>,
    failures: u32,
}

impl SessionConfig {
    /// A configuration; the fixed reply texts are built once here.
    pub fn new(
        hostname: String,
        max_message_size: usize,
        max_recipients: usize,
        relay: RelayPolicy,
    ) -> Self {
        let greeting = Bytes::from(format!("220 {hostname} ESMTP ringrelay\r\n"));
        let ehlo_reply = ehlo_reply(&hostname, max_message_size, false, false);
        let ehlo_reply_tls = ehlo_reply.clone();
        let helo_reply = Bytes::from(format!("250 {hostname}\r\n"));
        SessionConfig {
            hostname,
            max_message_size,
            max_recipients: max_recipients.max(1),
            max_errors: 10,
            max_junk_commands: 100,
            relay,
            starttls: false,
            auth: false,
            max_auth_failures: 3,
            greeting,
            ehlo_reply,
            ehlo_reply_tls,
            helo_reply,
            postmaster: None,
            stream_above: STREAM_ABOVE,
        }
    }

    /// Offers STARTTLS (`starttls`) and, over TLS, AUTH PLAIN and LOGIN (`auth`).
    pub fn with_tls(mut self, starttls: bool, auth: bool) -> Self {
        self.starttls = starttls;
        self.auth = auth;
        self.ehlo_reply = ehlo_reply(&self.hostname, self.max_message_size, starttls, false);
        self.ehlo_reply_tls = ehlo_reply(&self.hostname, self.max_message_size, false, auth);
        self
    }
}

/// The caller's side of the decisions a session cannot make alone. Implementations must
/// not block: they run in the middle of processing input.
pub trait Hooks {
    /// A fresh queue ID for a message whose DATA is about to begin.
    fn queue_id(&mut self) -> QueueId;

    /// May this reverse path send? `Err` is the reply to MAIL.
    fn check_mail(&mut self, from: &ReversePath) -> Result<(), Reply> {
        let _ = from;
        Ok(())
    }

    /// May we take this recipient? Called after the relay policy agreed. `Err` is the reply
    /// to RCPT.
    fn check_rcpt(&mut self, to: &Mailbox) -> Result<(), Reply> {
        let _ = to;
        Ok(())
    }

    /// A recipient was refused (for the delivery log's `NOQUEUE: reject` line): the
    /// reply's text on one line, the reverse path and the recipient as given. Not called
    /// for `452` (too many recipients), which is no refusal of the address.
    fn rcpt_refused(&mut self, helo: &str, reply: &str, from: &str, to: &str) {
        let _ = (helo, reply, from, to);
    }

    /// May this transaction send its content? Asked at DATA, before the `354`. `Err` is
    /// the reply (a refusal here is the server's doing, so it does not count as a client
    /// error).
    fn check_data(&mut self) -> Result<(), Reply> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading command lines.
    Command,
    /// Between `354` and the end of the message.
    Data,
    /// Reading the content of a BDAT chunk (`Session::chunk` says how much is left).
    Chunk,
    /// A message was handed out; waiting for [`Session::message_result`].
    AwaitingResult,
    /// `220 Ready to start TLS` is queued: nothing more is read until the driver has done
    /// the handshake ([`Session::tls_started`]); bytes already received are discarded.
    StartTls,
    /// In an AUTH exchange: the next line is a SASL response, not a command.
    AuthResponse,
    /// Credentials were handed out; waiting for [`Session::auth_result`].
    AwaitingAuth,
    /// QUIT, too many errors, timeout or shutdown: nothing more is read.
    Closed,
}

/// Recipient slots a transaction keeps allocated between transactions.
const KEEP_RECIPIENT_SLOTS: usize = 128;

/// One mail transaction (RFC 5321 §3.3), from MAIL to the end of DATA. Its storage is
/// kept from one transaction to the next ([`Transaction::clear`]): once grown to its
/// working size, a transaction's commands allocate nothing.
#[derive(Debug, Default)]
struct Transaction {
    /// MAIL was accepted.
    started: bool,
    /// The reverse path; `None` for `<>` (or before MAIL).
    from: Option<ListEntry>,
    /// The accepted recipients, in order.
    to: Vec<ListEntry>,
    /// The text of `from` and `to`.
    addresses: MailboxList,
    body_type: BodyType,
    /// MAIL declared SMTPUTF8 (RFC 6531).
    smtputf8: bool,
    /// MAIL's `RET=` and `ENVID=` (RFC 3461).
    ret: Option<Ret>,
    envid: Option<Box<str>>,
    /// Each accepted recipient's NOTIFY and ORCPT, in the order of `to`.
    rcpt_dsn: Vec<RcptDsn>,
    /// Some DSN parameter was given: the envelope carries them.
    any_dsn: bool,
    /// RCPT commands seen, accepted or not: tells "need RCPT" from "no valid recipients".
    rcpt_attempts: u32,
    id: Option<QueueId>,
    /// Its content is coming in BDAT chunks (so DATA is out of sequence).
    chunked: bool,
}

impl Transaction {
    /// Back to no transaction, keeping the storage.
    fn clear(&mut self) {
        self.started = false;
        self.from = None;
        self.to.clear();
        // Keep room for typical transactions, not for the largest one seen.
        self.to.shrink_to(KEEP_RECIPIENT_SLOTS);
        self.addresses.clear();
        self.body_type = BodyType::default();
        self.smtputf8 = false;
        self.ret = None;
        self.envid = None;
        self.rcpt_dsn.clear();
        self.rcpt_dsn.shrink_to(KEEP_RECIPIENT_SLOTS);
        self.any_dsn = false;
        self.rcpt_attempts = 0;
        self.id = None;
        self.chunked = false;
    }
}

/// The server side of one SMTP connection.
#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    peer: SocketAddr,
    may_relay: bool,
    state: State,
    /// The EHLO/HELO name, once given; its capacity is kept when the client greets again.
    helo: Option<String>,
    /// The HELO name as handed to envelopes: one copy shared by the session's messages
    /// until the client gives another name.
    helo_shared: Option<Arc<str>>,
    esmtp: bool,
    tx: Transaction,
    /// Where the MAIL and RCPT hooks' `&Mailbox` is made, without an allocation each.
    hook_mailbox: MailboxSlot,
    scanner: DataScanner,
    chunker: ChunkScanner,
    /// The BDAT chunk being read (boxed: most sessions never see one).
    chunk: Option<Box<ChunkState>>,
    /// How the current message's content leaves the session.
    stream: Streaming,
    /// Counts the messages whose content began (a sink belongs to one of them).
    body_serial: u32,
    body: BytesMut,
    /// The finished message's buffer capacity, counted by `data_memory` until its result.
    awaiting_memory: usize,
    out: BytesMut,
    message: Option<Envelope>,
    errors: u32,
    rcpt_overshoot: u32,
    /// Discarding the rest of an over-long command line.
    skipping_line: bool,
    /// The server could not keep this message (memory budget, or its sink failed): it is
    /// read to its end and refused with this reply.
    data_refused: Option<Box<Reply>>,
    /// What TLS negotiated, once the session runs over it.
    tls: Option<TlsInfo>,
    /// SMTP AUTH, once the client has tried it.
    auth: Option<Box<AuthState>>,
    /// Junk commands since the last accepted message.
    junk: u32,
}

impl Session {
    /// A new session for a client at `peer`. Call [`Session::greet`] to queue the banner.
    pub fn new(config: Arc<SessionConfig>, peer: SocketAddr) -> Self {
        let may_relay = config.relay.client_may_relay(peer.ip());
        let scanner = DataScanner::new(config.max_message_size);
        let chunker = ChunkScanner::new(config.max_message_size);
        Session {
            config,
            peer,
            may_relay,
            state: State::Command,
            helo: None,
            helo_shared: None,
            esmtp: false,
            tx: Transaction::default(),
            hook_mailbox: MailboxSlot::default(),
            scanner,
            chunker,
            chunk: None,
            stream: Streaming::default(),
            body_serial: 0,
            body: BytesMut::new(),
            awaiting_memory: 0,
            out: BytesMut::with_capacity(256),
            message: None,
            errors: 0,
            rcpt_overshoot: 0,
            skipping_line: false,
            data_refused: None,
            tls: None,
            auth: None,
            junk: 0,
        }
    }

    /// Queues the `220` greeting.
    pub fn greet(&mut self) {
        self.out.extend_from_slice(&self.config.greeting);
    }

    /// Processes `input` and returns how many bytes were consumed. Unconsumed bytes (a
    /// partial command line, or input after a message that awaits its result) must be
    /// offered again, followed by whatever arrives next.
    pub fn receive(&mut self, input: &[u8], now: SystemTime, hooks: &mut impl Hooks) -> usize {
        let mut pos = 0;
        loop {
            match self.state {
                State::Closed | State::AwaitingResult | State::StartTls | State::AwaitingAuth => {
                    return pos
                }
                State::AuthResponse => {
                    let rest = &input[pos..];
                    let Some(lf) = memchr::memchr(b'\n', rest) else {
                        if rest.len() >= MAX_RESPONSE_LINE + 2 {
                            self.auth_cancel(b"500 5.5.6 Error: authentication line too long\r\n");
                            self.skipping_line = true;
                            return input.len();
                        }
                        return pos;
                    };
                    pos += lf + 1;
                    let line = &rest[..lf];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    self.auth_response(line);
                }
                State::Data => {
                    let (n, outcome) = self.scanner.scan(&input[pos..], &mut self.body);
                    pos += n;
                    match outcome {
                        Some(outcome) => self.end_of_data(outcome),
                        None => return pos,
                    }
                }
                State::Chunk => {
                    let Some(chunk) = self.chunk.as_mut() else {
                        self.state = State::Command;
                        continue;
                    };
                    let rest = &input[pos..];
                    let take =
                        usize::try_from(chunk.left).map_or(rest.len(), |l| l.min(rest.len()));
                    chunk.left -= take as u64;
                    let done = chunk.left == 0;
                    if chunk.refusal.is_none() {
                        self.chunker.take(&rest[..take], &mut self.body);
                    }
                    pos += take;
                    if !done {
                        return pos;
                    }
                    self.end_of_chunk();
                }
                State::Command => {
                    let rest = &input[pos..];
                    let Some(lf) = memchr::memchr(b'\n', rest) else {
                        if self.skipping_line {
                            return input.len();
                        }
                        if rest.len() >= line_limit(rest) {
                            // No line end within the limit: refuse now, drop the rest of it.
                            self.line_too_long();
                            self.skipping_line = true;
                            return input.len();
                        }
                        return pos;
                    };
                    pos += lf + 1;
                    if self.skipping_line {
                        self.skipping_line = false;
                        continue;
                    }
                    // Bare LF ends a command line too (as in Postfix); only DATA is strict.
                    let line = &rest[..lf];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if line.len() + 2 > line_limit(line) {
                        self.line_too_long();
                    } else {
                        self.command(line, now, hooks);
                    }
                }
            }
        }
    }

    /// Pending reply bytes, to be written to the client.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Takes the pending reply bytes, leaving the output empty.
    pub fn take_output(&mut self) -> BytesMut {
        self.out.split()
    }

    /// True when replies are waiting to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The finished message, once: the session then waits for [`Session::message_result`].
    pub fn take_message(&mut self) -> Option<Envelope> {
        self.message.take()
    }

    /// The fate of the message taken with [`Session::take_message`]: `Ok` answers
    /// `250 2.0.0 Ok: queued as ID`, `Err` sends its reply. Input processing may resume.
    pub fn message_result(&mut self, result: Result<(), Reply>) {
        if self.state != State::AwaitingResult {
            return;
        }
        match result {
            Ok(()) => {
                self.junk = 0;
                let id = self.tx.id.map(QueueId::encode).unwrap_or([b'0'; 20]);
                self.out.extend_from_slice(b"250 2.0.0 Ok: queued as ");
                self.out.extend_from_slice(&id);
                self.out.extend_from_slice(b"\r\n");
            }
            Err(reply) => reply.write_to(&mut self.out),
        }
        self.tx.clear();
        self.state = State::Command;
    }

    /// The client was silent too long: queue `421 4.4.2` and close.
    pub fn timed_out(&mut self) {
        if self.state != State::Closed {
            let text = format!("4.4.2 {} Error: timeout exceeded", self.config.hostname);
            Reply::new(421, text).write_to(&mut self.out);
            self.state = State::Closed;
        }
    }

    /// The server is going down: queue `421 4.3.2` and close.
    pub fn shutting_down(&mut self) {
        if self.state != State::Closed {
            Reply::shutting_down(&self.config.hostname).write_to(&mut self.out);
            self.state = State::Closed;
        }
    }

    /// True once nothing more will be read: flush the output, then close.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// True while receiving message content (the data timeout applies).
    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data | State::Chunk)
    }

    /// A message's content is being received: in DATA, in a BDAT chunk, or between the
    /// chunks of a BDAT transaction.
    pub fn receiving_body(&self) -> bool {
        matches!(self.state, State::Data | State::Chunk)
            || (self.state == State::Command && self.tx.chunked)
    }

    /// The content held so far has reached the streaming threshold: the driver may offer
    /// the message to the handler's sink and take the content with [`Session::take_piece`].
    pub fn piece_ready(&self) -> bool {
        self.receiving_body()
            && !self.stream.whole
            && self.data_refused.is_none()
            && self.body.len() >= self.config.stream_above
    }

    /// The content held so far, for the handler's sink; the session keeps checking and
    /// counting what follows as before. The message's envelope then carries only the
    /// content after the last piece.
    pub fn take_piece(&mut self) -> Bytes {
        self.stream.taken += self.body.len() as u64;
        self.body.split().freeze()
    }

    /// The content held now, not yet taken as a piece (before the first piece: the
    /// message's beginning, for [`Session::envelope_so_far`]'s caller to look at).
    pub fn content_so_far(&self) -> &[u8] {
        &self.body
    }

    /// Which message's content is (or was last) being received: a sink opened for one
    /// message is never used for the next.
    pub fn body_serial(&self) -> u32 {
        self.body_serial
    }

    /// Content of the current (or just finished) message handed out by
    /// [`Session::take_piece`].
    pub fn streamed(&self) -> u64 {
        self.stream.taken
    }

    /// The handler keeps this message whole: no more pieces are offered for it.
    pub fn keep_whole(&mut self) {
        self.stream.whole = true;
    }

    /// The transaction so far as an envelope with no content (for the handler's sink), if
    /// a message is being received.
    pub fn envelope_so_far(&mut self) -> Option<Envelope> {
        if !self.receiving_body() {
            return None;
        }
        let id = self.tx.id?;
        Some(self.envelope(id, Bytes::new()))
    }

    /// The message cannot be kept (its sink failed): the rest of it is read and thrown
    /// away, and `reply` answers its end.
    pub fn refuse_data(&mut self, reply: Reply) {
        if self.receiving_body() {
            self.data_refused = Some(Box::new(reply));
            self.scanner.stop_storing();
            self.chunker.stop_storing();
            self.body = BytesMut::new();
        }
    }

    /// True while an over-long command line is being read and discarded: its bytes are
    /// consumed, but the line has not ended.
    pub fn skipping_long_line(&self) -> bool {
        self.skipping_line
    }

    /// True between transactions: no MAIL given, no message in flight. A graceful shutdown
    /// may close such a session at once.
    pub fn is_idle(&self) -> bool {
        self.state == State::Command && !self.tx.started
    }

    /// Bytes of memory the message being received holds now (its buffer's capacity), for
    /// the driver's memory budget. A finished message counts until its result is in: the
    /// handler holds its content while it stores it, and the client has no 250 yet.
    pub fn data_memory(&self) -> usize {
        match self.state {
            State::AwaitingResult => self.awaiting_memory,
            _ if self.receiving_body() => self.body.capacity(),
            _ => 0,
        }
    }

    /// The server cannot hold this message in memory: stop storing it, read it to its end,
    /// and refuse it then with `452 4.3.1`. The session goes on.
    pub fn refuse_data_for_memory(&mut self) {
        if self.receiving_body() {
            self.refuse_data(Reply::new(
                452,
                "4.3.1 Error: insufficient system storage, try again later",
            ));
        }
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// True once `220 Ready to start TLS` is queued: the driver writes it, discards every
    /// byte it has read but not yet handed in (CVE-2011-0411: nothing sent before the
    /// handshake may count after it), does the handshake, and calls
    /// [`Session::tls_started`] (or closes the connection if the handshake fails).
    pub fn wants_tls(&self) -> bool {
        self.state == State::StartTls
    }

    /// The session now runs over TLS: everything learnt before is forgotten (RFC 3207
    /// §4.2: the client must EHLO again). Also for implicit-TLS listeners, before the
    /// greeting.
    pub fn tls_started(&mut self, info: TlsInfo) {
        if self.state == State::Closed {
            return;
        }
        self.tls = Some(info);
        self.helo = None;
        self.helo_shared = None;
        self.esmtp = false;
        self.end_transaction();
        self.auth = None;
        self.may_relay = self.config.relay.client_may_relay(self.peer.ip());
        self.state = State::Command;
    }

    /// What TLS negotiated, if the session runs over it.
    pub fn tls(&self) -> Option<TlsInfo> {
        self.tls
    }

    /// The credentials of an AUTH exchange, once, to be checked off the event loop; the
    /// session waits for [`Session::auth_result`].
    pub fn take_credentials(&mut self) -> Option<Credentials> {
        self.auth.as_mut()?.credentials.take()
    }

    /// The verdict on the credentials: `235 2.7.0` (the client may then relay anywhere),
    /// or `535 5.7.8` and one failure more (at the limit: `421 4.7.0` and close).
    pub fn auth_result(&mut self, user: Option<String>) {
        if self.state != State::AwaitingAuth {
            return;
        }
        self.state = State::Command;
        let auth = self.auth.get_or_insert_with(Box::default);
        match user {
            Some(user) => {
                auth.user = Some(user);
                self.may_relay = true;
                self.reply(b"235 2.7.0 Authentication successful\r\n");
            }
            None => {
                auth.failures += 1;
                let failures = auth.failures;
                self.reply(b"535 5.7.8 Error: authentication failed\r\n");
                if failures >= self.config.max_auth_failures {
                    let text = format!(
                        "4.7.0 {} Error: too many authentication failures",
                        self.config.hostname
                    );
                    Reply::new(421, text).write_to(&mut self.out);
                    self.state = State::Closed;
                }
            }
        }
    }

    /// The authenticated user, if any (for logs; never written into a message).
    pub fn authenticated_user(&self) -> Option<&str> {
        self.auth.as_ref()?.user.as_deref()
    }

    fn starttls(&mut self) {
        if !self.config.starttls {
            return self.error(b"502 5.5.1 Error: command not implemented\r\n");
        }
        if self.tls.is_some() {
            return self.error(b"554 5.5.1 Error: TLS already active\r\n");
        }
        self.reply(b"220 2.0.0 Ready to start TLS\r\n");
        self.state = State::StartTls;
    }

    fn auth(&mut self, args: &[u8]) {
        if !self.config.auth {
            return self.error(b"502 5.5.1 Error: command not implemented\r\n");
        }
        if self.tls.is_none() {
            return self.error(
                b"538 5.7.11 Encryption required for requested authentication mechanism\r\n",
            );
        }
        if !self.esmtp {
            return self.error(b"503 5.5.1 Error: send EHLO first\r\n");
        }
        if self.authenticated_user().is_some() {
            return self.error(b"503 5.5.1 Error: already authenticated\r\n");
        }
        if self.tx.started {
            return self.error(b"503 5.5.1 Error: MAIL transaction in progress\r\n");
        }
        let auth = self.auth.get_or_insert_with(Box::default);
        let step = auth.exchange.start_command(args);
        self.auth_step(step);
    }

    fn auth_response(&mut self, line: &[u8]) {
        let Some(auth) = self.auth.as_mut() else {
            self.state = State::Command;
            return;
        };
        let step = auth.exchange.respond(line);
        self.auth_step(step);
    }

    fn auth_step(&mut self, step: Step) {
        match step {
            Step::Challenge(challenge) => {
                self.out.extend_from_slice(b"334 ");
                self.out.extend_from_slice(challenge.as_bytes());
                self.out.extend_from_slice(b"\r\n");
                self.state = State::AuthResponse;
            }
            Step::Credentials(credentials) => {
                if let Some(auth) = self.auth.as_mut() {
                    auth.credentials = Some(credentials);
                }
                self.state = State::AwaitingAuth;
            }
            Step::Error(reply) => {
                self.state = State::Command;
                self.error_reply(reply);
            }
        }
    }

    /// Ends an AUTH exchange with an error reply.
    fn auth_cancel(&mut self, wire: &[u8]) {
        if let Some(auth) = self.auth.as_mut() {
            auth.exchange = AuthExchange::new();
        }
        self.state = State::Command;
        self.error(wire);
    }

    fn reply(&mut self, wire: &[u8]) {
        self.out.extend_from_slice(wire);
    }

    /// Sends an error reply and counts it; at the limit, says `421` and closes.
    fn error(&mut self, wire: &[u8]) {
        self.reply(wire);
        self.count_error();
    }

    fn error_reply(&mut self, reply: Reply) {
        reply.write_to(&mut self.out);
        self.count_error();
    }

    fn count_error(&mut self) {
        self.errors += 1;
        if self.errors >= self.config.max_errors && self.state != State::Closed {
            let text = format!("4.7.0 {} Error: too many errors", self.config.hostname);
            Reply::new(421, text).write_to(&mut self.out);
            self.state = State::Closed;
        }
    }

    /// Counts a NOOP/RSET/VRFY/HELP outside a transaction; past the limit, `421 4.7.0` and
    /// close (true: the command is not answered otherwise).
    fn junk_limit_reached(&mut self) -> bool {
        if self.tx.started {
            return false;
        }
        self.junk = self.junk.saturating_add(1);
        if self.junk <= self.config.max_junk_commands {
            return false;
        }
        let text = format!(
            "4.7.0 {} Error: too many junk commands",
            self.config.hostname
        );
        Reply::new(421, text).write_to(&mut self.out);
        self.state = State::Closed;
        true
    }

    fn line_too_long(&mut self) {
        self.error(b"500 5.5.6 Error: line too long\r\n");
    }

    fn command(&mut self, line: &[u8], now: SystemTime, hooks: &mut impl Hooks) {
        let cmd =
            match command::parse(line) {
                Ok(cmd) => cmd,
                Err(CommandError::Unknown) => {
                    return self.error(b"500 5.5.2 Error: command not recognized\r\n")
                }
                Err(CommandError::UnknownParameter) => {
                    return self.error(b"555 5.5.4 Error: unsupported parameter\r\n")
                }
                Err(CommandError::NonAscii) => return self.error(
                    b"553 5.6.7 Error: non-ASCII addresses are not permitted without SMTPUTF8\r\n",
                ),
                Err(CommandError::Syntax(hint)) => {
                    // The hint is one of the parser's own short ASCII texts: written as it is.
                    self.out.extend_from_slice(b"501 5.5.4 Syntax: ");
                    self.out.extend_from_slice(hint.as_bytes());
                    if line
                        .get(..4)
                        .is_some_and(|v| v.eq_ignore_ascii_case(b"BDAT"))
                    {
                        // The chunk's bytes follow with no size we can trust: none of them may
                        // be read as commands (smuggling), so the connection ends here.
                        self.reply(b"\r\n");
                        self.state = State::Closed;
                        return;
                    }
                    return self.error(b"\r\n");
                }
            };
        match cmd {
            Command::Ehlo(host) | Command::Helo(host) => {
                let esmtp = matches!(cmd, Command::Ehlo(_));
                let helo = self.helo.get_or_insert_with(String::new);
                helo.clear();
                helo.push_str(host);
                self.esmtp = esmtp;
                self.end_transaction();
                self.out
                    .extend_from_slice(match (esmtp, self.tls.is_some()) {
                        (true, false) => &self.config.ehlo_reply,
                        (true, true) => &self.config.ehlo_reply_tls,
                        (false, _) => &self.config.helo_reply,
                    });
            }
            Command::StartTls => self.starttls(),
            Command::Auth(args) => self.auth(args),
            Command::Mail {
                from,
                size,
                body,
                smtputf8,
                ret,
                envid,
            } => self.mail(from, size, body, (smtputf8, ret, envid), hooks),
            Command::Rcpt { to, dsn } => self.rcpt(to, dsn, hooks),
            Command::Data => self.data(now, hooks),
            Command::Bdat { size, last } => self.bdat(size, last, now, hooks),
            Command::Rset | Command::Noop | Command::Vrfy | Command::Help
                if self.junk_limit_reached() => {}
            Command::Rset => {
                self.end_transaction();
                self.reply(b"250 2.0.0 Ok\r\n");
            }
            Command::Noop => self.reply(b"250 2.0.0 Ok\r\n"),
            Command::Quit => {
                self.reply(b"221 2.0.0 Bye\r\n");
                self.state = State::Closed;
            }
            Command::Vrfy => self.reply(
                b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n",
            ),
            Command::Help => self.reply(
                b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\r\n",
            ),
            Command::Unsupported => self.error(b"502 5.5.1 Error: command not implemented\r\n"),
        }
    }

    fn mail(
        &mut self,
        from: Option<MailboxRef<'_>>,
        size: Option<u64>,
        body: BodyType,
        (smtputf8, ret, envid): (bool, Option<Ret>, Option<Box<str>>),
        hooks: &mut impl Hooks,
    ) {
        if self.helo.is_none() {
            return self.error(b"503 5.5.1 Error: send HELO/EHLO first\r\n");
        }
        if self.tx.started {
            return self.error(b"503 5.5.1 Error: nested MAIL command\r\n");
        }
        if size.is_some_and(|s| s > self.config.max_message_size as u64) {
            return self.error(b"552 5.3.4 Error: message size exceeds fixed limit\r\n");
        }
        let path = match from {
            None => ReversePath::Null,
            Some(m) => ReversePath::Mailbox(self.hook_mailbox.fill(m)),
        };
        let checked = hooks.check_mail(&path);
        // Let go of the hook's mailbox, so that its storage can be used again.
        drop(path);
        if let Err(reply) = checked {
            return self.error_reply(reply);
        }
        self.tx.clear();
        self.tx.from = from.map(|m| self.tx.addresses.push(m));
        self.tx.started = true;
        self.tx.body_type = body;
        self.tx.smtputf8 = smtputf8;
        self.tx.any_dsn = ret.is_some() || envid.is_some();
        self.tx.ret = ret;
        self.tx.envid = envid;
        self.reply(b"250 2.1.0 Ok\r\n");
    }

    fn rcpt(&mut self, to: Option<MailboxRef<'_>>, dsn: RcptDsn, hooks: &mut impl Hooks) {
        if !self.tx.started {
            return self.error(b"503 5.5.1 Error: need MAIL command\r\n");
        }
        self.tx.rcpt_attempts = self.tx.rcpt_attempts.saturating_add(1);
        if self.tx.to.len() >= self.config.max_recipients {
            self.reply(b"452 4.5.3 Error: too many recipients\r\n");
            self.rcpt_overshoot += 1;
            if self.rcpt_overshoot > RCPT_OVERSHOOT_ALLOWANCE {
                self.count_error();
            }
            return;
        }
        // The checks borrow the session's fields one by one (the address may be the
        // shared config's postmaster), so nothing is cloned per RCPT.
        let taken = take_rcpt(
            &self.config,
            self.may_relay,
            &mut self.hook_mailbox,
            &mut self.tx,
            to,
            dsn,
            hooks,
        );
        let refused = match &taken {
            Ok(()) => None,
            Err(RcptRefusal::Wire(wire)) => {
                Some(String::from_utf8_lossy(wire).trim_end().to_string())
            }
            Err(RcptRefusal::Hook(reply)) => Some(reply.one_line()),
        };
        if let Some(text) = refused {
            let from = self.tx.from.map_or("", |e| self.tx.addresses.get(e));
            let to = to.map_or("postmaster", |m| m.as_str());
            hooks.rcpt_refused(self.helo.as_deref().unwrap_or(""), &text, from, to);
        }
        match taken {
            Ok(()) => self.reply(b"250 2.1.5 Ok\r\n"),
            Err(RcptRefusal::Wire(wire)) => self.error(wire),
            Err(RcptRefusal::Hook(reply)) => self.error_reply(reply),
        }
    }

    /// Why the transaction cannot send its content now (DATA or a first BDAT), if it cannot.
    fn content_refusal(&self) -> Option<&'static [u8]> {
        if self.helo.is_none() {
            return Some(b"503 5.5.1 Error: send HELO/EHLO first\r\n");
        }
        if !self.tx.started {
            return Some(b"503 5.5.1 Error: need MAIL command\r\n");
        }
        if self.tx.to.is_empty() {
            return Some(if self.tx.rcpt_attempts == 0 {
                b"503 5.5.1 Error: need RCPT command\r\n"
            } else {
                b"554 5.5.1 Error: no valid recipients\r\n"
            });
        }
        None
    }

    fn data(&mut self, now: SystemTime, hooks: &mut impl Hooks) {
        if self.tx.chunked {
            // RFC 3030 §4.2: DATA may not follow BDAT in one transaction.
            return self.error(b"503 5.5.1 Error: DATA after BDAT; use BDAT\r\n");
        }
        if let Some(wire) = self.content_refusal() {
            return self.error(wire);
        }
        if let Err(reply) = hooks.check_data() {
            return reply.write_to(&mut self.out);
        }
        self.start_body(now, hooks);
        self.scanner.reset();
        self.state = State::Data;
        self.reply(b"354 End data with <CR><LF>.<CR><LF>\r\n");
    }

    /// `BDAT size [LAST]`: its content is read whatever happens (the client sends it
    /// without waiting), and answered when it has all arrived ([`Session::end_of_chunk`]).
    fn bdat(&mut self, size: u64, last: bool, now: SystemTime, hooks: &mut impl Hooks) {
        let mut refusal = None;
        if !self.tx.chunked {
            if let Some(wire) = self.content_refusal() {
                refusal = Some(Box::new(wire_reply(wire)));
            } else if let Err(reply) = hooks.check_data() {
                refusal = Some(Box::new(reply));
            } else {
                self.start_body(now, hooks);
                self.chunker.reset();
                self.tx.chunked = true;
            }
        }
        self.chunk = Some(Box::new(ChunkState {
            size,
            left: size,
            last,
            refusal,
        }));
        self.state = State::Chunk;
    }

    /// A BDAT chunk's content has all arrived: answer it, and end the message after LAST.
    fn end_of_chunk(&mut self) {
        self.state = State::Command;
        let Some(chunk) = self.chunk.take() else {
            return;
        };
        if let Some(reply) = chunk.refusal {
            // The transaction did not allow content: the chunk was read and thrown away.
            return self.error_reply(*reply);
        }
        if self.data_refused.is_some()
            || self.chunker.too_large()
            || self.chunker.bare_line_ending()
        {
            // Refused at once (not only after LAST): the client stops sending, and the
            // chunks it already sent are answered 503 (no transaction), read and dropped.
            return self.end_of_data(self.chunker.finish());
        }
        if chunk.last {
            return self.end_of_data(self.chunker.finish());
        }
        self.out.extend_from_slice(b"250 2.0.0 ");
        self.out
            .extend_from_slice(chunk.size.to_string().as_bytes());
        self.out.extend_from_slice(b" octets received\r\n");
    }

    /// The start of a message's content: its queue ID, and our `Received:` header.
    fn start_body(&mut self, now: SystemTime, hooks: &mut impl Hooks) {
        let Some(helo) = self.helo.as_deref() else {
            return;
        };
        self.data_refused = None;
        self.stream = Streaming::default();
        self.body_serial = self.body_serial.wrapping_add(1);
        let id = hooks.queue_id();
        self.tx.id = Some(id);
        self.body.clear();
        self.body.reserve(1024);
        let single = match self.tx.to[..] {
            [only] => Some(self.tx.addresses.get(only)),
            _ => None,
        };
        let trace = Trace {
            helo,
            ip: self.peer.ip().to_canonical(),
            hostname: &self.config.hostname,
            esmtp: self.esmtp,
            tls: self.tls.map(|t| (t.version, t.cipher)),
            authenticated: self.auth.as_ref().is_some_and(|a| a.user.is_some()),
            smtputf8: self.tx.smtputf8,
            id,
            single_rcpt: single,
        };
        write_received(&mut self.body, &trace, now);
    }

    fn end_of_data(&mut self, outcome: DataOutcome) {
        if let Some(reply) = self.data_refused.take() {
            self.tx.clear();
            self.body.clear();
            self.state = State::Command;
            // Our shortage, not the client's error: not counted against it.
            return reply.write_to(&mut self.out);
        }
        if outcome.bare_line_ending {
            self.tx.clear();
            self.body.clear();
            self.state = State::Command;
            return self.error(
                b"550 5.5.2 Error: bare <CR> or <LF> in message; lines must end with <CR><LF>\r\n",
            );
        }
        if outcome.too_large {
            self.tx.clear();
            self.body.clear();
            self.state = State::Command;
            return self.error(b"552 5.3.4 Error: message size exceeds fixed limit\r\n");
        }
        let (true, Some(id)) = (self.tx.started, self.tx.id) else {
            // Unreachable by construction (DATA requires both); fail safe, not silent.
            self.tx.clear();
            self.state = State::Command;
            return self.reply(b"451 4.3.0 Error: internal state error\r\n");
        };
        self.awaiting_memory = self.body.capacity();
        let data = self.take_body();
        self.message = Some(self.envelope(id, data));
        self.tx.clear();
        // Keep the ID for the 250 reply; the rest of the transaction is gone.
        self.tx.id = Some(id);
        self.state = State::AwaitingResult;
    }

    /// Ends the transaction (RSET, EHLO, STARTTLS), with the content of a BDAT message
    /// that will never get its LAST chunk.
    fn end_transaction(&mut self) {
        if self.tx.chunked {
            self.body = BytesMut::new();
        }
        self.tx.clear();
    }

    /// The transaction's envelope with `data`. Its owned parts: one copy of all its
    /// addresses, one list of recipients (the HELO name is shared).
    fn envelope(&mut self, id: QueueId, data: Bytes) -> Envelope {
        let addresses = self.tx.addresses.share();
        let from = self.tx.from.map_or(ReversePath::Null, |e| {
            ReversePath::Mailbox(addresses.get(e))
        });
        let to = self.tx.to.iter().map(|&e| addresses.get(e)).collect();
        // Only a transaction that gave DSN parameters pays for carrying them. Copied, not
        // taken: a streamed message's sink gets its envelope before the content ends.
        let dsn = self.tx.any_dsn.then(|| {
            Arc::new(DsnEnvelope {
                ret: self.tx.ret,
                envid: self.tx.envid.clone(),
                rcpts: self.tx.rcpt_dsn.clone(),
            })
        });
        Envelope {
            id,
            from,
            to,
            data,
            peer: self.peer,
            helo: self.shared_helo(),
            body_type: self.tx.body_type,
            smtputf8: self.tx.smtputf8,
            dsn,
        }
    }

    /// The finished message's content. A small buffer is split off, so the session can
    /// reclaim the allocation for its next message once the handler is done with this one;
    /// a large one is handed over whole, so an idle session does not keep a big
    /// allocation alive through the tail it would otherwise retain.
    fn take_body(&mut self) -> Bytes {
        if self.body.capacity() > BODY_KEEP {
            std::mem::take(&mut self.body).freeze()
        } else {
            self.body.split().freeze()
        }
    }

    /// The HELO name for an envelope: the shared copy, made anew only when the name changed.
    fn shared_helo(&mut self) -> Arc<str> {
        let helo = self.helo.as_deref().unwrap_or_default();
        match &self.helo_shared {
            Some(shared) if **shared == *helo => Arc::clone(shared),
            _ => {
                let shared: Arc<str> = Arc::from(helo);
                self.helo_shared = Some(Arc::clone(&shared));
                shared
            }
        }
    }
}

/// A BDAT chunk being read.
#[derive(Debug)]
struct ChunkState {
    /// Its size as announced (for the `250`).
    size: u64,
    /// Bytes still to come.
    left: u64,
    /// `BDAT … LAST`.
    last: bool,
    /// The transaction did not allow content: the chunk is read, thrown away and answered
    /// with this.
    refusal: Option<Box<Reply>>,
}

/// How the current message's content leaves the session.
#[derive(Debug, Default, Clone, Copy)]
struct Streaming {
    /// The handler takes it whole: no pieces are offered.
    whole: bool,
    /// Bytes handed out as pieces so far.
    taken: u64,
}

/// A fixed reply (`code x.y.z text` CRLF) as a [`Reply`].
fn wire_reply(wire: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(wire);
    let text = text.trim_end();
    let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(451);
    Reply::new(code, text.get(4..).unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdGenerator;
    use crate::policy::IpNet;
    use proptest::prelude::*;
    use std::time::UNIX_EPOCH;

    struct TestHooks {
        ids: IdGenerator,
        refuse_sender: Option<&'static str>,
        refuse_data: bool,
        /// Every mailbox the address hooks were shown, kept.
        shown: Vec<Mailbox>,
    }

    impl Hooks for TestHooks {
        fn queue_id(&mut self) -> QueueId {
            self.ids.next_id()
        }
        fn check_mail(&mut self, from: &ReversePath) -> Result<(), Reply> {
            self.shown.extend(from.mailbox().cloned());
            match (self.refuse_sender, from.mailbox()) {
                (Some(bad), Some(m)) if m.as_str() == bad => {
                    Err(Reply::new(550, "5.7.1 sender refused"))
                }
                _ => Ok(()),
            }
        }
        fn check_rcpt(&mut self, to: &Mailbox) -> Result<(), Reply> {
            self.shown.push(to.clone());
            Ok(())
        }
        fn check_data(&mut self) -> Result<(), Reply> {
            if self.refuse_data {
                Err(Reply::new(451, "4.3.0 no spool"))
            } else {
                Ok(())
            }
        }
    }

    fn hooks() -> TestHooks {
        TestHooks {
            ids: IdGenerator::starting_at(0, 1),
            refuse_sender: None,
            refuse_data: false,
            shown: Vec::new(),
        }
    }

    fn config_with(max_size: usize, max_rcpts: usize) -> Arc<SessionConfig> {
        Arc::new(session_config(max_size, max_rcpts))
    }

    fn session_config(max_size: usize, max_rcpts: usize) -> SessionConfig {
        let policy = RelayPolicy::new(
            vec!["127.0.0.1/32".parse::<IpNet>().unwrap()],
            vec!["local.test".into()],
        );
        SessionConfig::new("relay.test".into(), max_size, max_rcpts, policy)
    }

    /// `config_with(10_000, 5)` whose bare `<postmaster>` goes to `ops@example.net`.
    fn config_with_postmaster() -> Arc<SessionConfig> {
        let mut config = session_config(10_000, 5);
        config.postmaster = Some(Mailbox::parse("ops@example.net").unwrap());
        Arc::new(config)
    }

    /// A session fed by a test: keeps unconsumed input like a driver would, answers every
    /// finished message with 250, and collects the messages.
    struct Harness {
        session: Session,
        hooks: TestHooks,
        pending: Vec<u8>,
        messages: Vec<Envelope>,
    }

    impl Harness {
        fn new(config: Arc<SessionConfig>, peer: &str) -> Self {
            let mut session = Session::new(config, peer.parse().unwrap());
            session.greet();
            Harness {
                session,
                hooks: hooks(),
                pending: Vec::new(),
                messages: Vec::new(),
            }
        }

        fn local() -> Self {
            Self::new(config_with(10_000, 5), "127.0.0.1:40000")
        }

        /// Feeds bytes; returns the replies produced (as text).
        fn feed(&mut self, bytes: &[u8]) -> String {
            self.pending.extend_from_slice(bytes);
            let mut out = Vec::new();
            loop {
                let used = self
                    .session
                    .receive(&self.pending, UNIX_EPOCH, &mut self.hooks);
                self.pending.drain(..used);
                out.extend_from_slice(&self.session.take_output());
                match self.session.take_message() {
                    Some(m) => {
                        self.messages.push(m);
                        self.session.message_result(Ok(()));
                    }
                    None => break,
                }
            }
            out.extend_from_slice(&self.session.take_output());
            String::from_utf8(out).unwrap()
        }

        fn codes(&mut self, bytes: &[u8]) -> Vec<String> {
            reply_codes(&self.feed(bytes))
        }
    }

    /// "code enhanced" of each final reply line, e.g. "250 2.1.0" (or just "220").
    fn reply_codes(text: &str) -> Vec<String> {
        text.split("\r\n")
            .filter(|l| l.len() >= 4 && l.as_bytes()[3] == b' ')
            .map(|l| {
                let mut parts = l.splitn(3, ' ');
                let code = parts.next().unwrap();
                match parts.next() {
                    Some(e)
                        if e.chars().next().is_some_and(|c| c.is_ascii_digit())
                            && e.contains('.') =>
                    {
                        format!("{code} {e}")
                    }
                    _ => code.to_string(),
                }
            })
            .collect()
    }

    const TX: &[u8] = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n";

    #[test]
    fn a_message_counts_as_memory_until_its_result() {
        let mut h = Harness::new(config_with(1_000_000, 5), "127.0.0.1:40000");
        h.feed(b"EHLO client.example\r\n");
        h.feed(TX);
        h.feed(&[b'x'; 998]);
        h.feed(b"\r\n");
        let receiving = h.session.data_memory();
        assert!(receiving >= 1000, "{receiving}");
        // Ended, handed to the handler, no result yet: still counted.
        let used = h.session.receive(b".\r\n", UNIX_EPOCH, &mut h.hooks);
        assert_eq!(used, 3);
        let message = h.session.take_message().expect("a message");
        assert!(h.session.data_memory() >= message.data.len());
        assert!(h.session.data_memory() >= receiving);
        h.session.message_result(Ok(()));
        assert_eq!(h.session.data_memory(), 0);
    }

    /// A large message's buffer goes with the message, so a session idle after it holds
    /// no part of it; a small one's allocation stays for reuse by the next message.
    #[test]
    fn an_idle_session_keeps_no_large_body_buffer() {
        let mut h = Harness::new(config_with(1_000_000, 5), "127.0.0.1:40000");
        h.feed(b"EHLO client.example\r\n");
        h.feed(TX);
        let line = [b'x'; 998];
        for _ in 0..100 {
            h.feed(&line);
            h.feed(b"\r\n");
        }
        assert!(h.feed(b".\r\n").starts_with("250 2.0.0"));
        assert!(h.messages[0].data.len() > 100_000);
        assert_eq!(
            h.session.body.capacity(),
            0,
            "nothing of the large body kept"
        );
        h.feed(TX);
        h.feed(b"small\r\n.\r\n");
        assert_eq!(h.messages.len(), 2);
        assert!(
            h.session.body.capacity() > 0,
            "a small body's buffer is kept"
        );
        assert!(h.session.body.capacity() <= BODY_KEEP);
    }

    #[test]
    fn greeting_and_ehlo_advertise_the_extensions() {
        let mut h = Harness::local();
        let text = h.feed(b"EHLO client.example\r\n");
        assert_eq!(
            text,
            "220 relay.test ESMTP ringrelay\r\n250-relay.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-DSN\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"
        );
        assert_eq!(h.feed(b"HELO other\r\n"), "250 relay.test\r\n");
    }

    #[test]
    fn a_whole_transaction_yields_the_envelope() {
        let mut h = Harness::local();
        let codes = h.codes(b"EHLO c.example\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\nSubject: x\r\n\r\n..hi\r\n.\r\nQUIT\r\n");
        assert_eq!(
            codes,
            [
                "220",
                "250",
                "250 2.1.0",
                "250 2.1.5",
                "250 2.1.5",
                "354",
                "250 2.0.0",
                "221 2.0.0"
            ]
        );
        assert_eq!(h.messages.len(), 1);
        let m = &h.messages[0];
        assert_eq!(m.from.to_string(), "a@example.org");
        assert_eq!(
            m.to.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            ["b@example.org", "c@example.org"]
        );
        assert_eq!(&*m.helo, "c.example");
        assert_eq!(m.body_type, BodyType::EightBitMime);
        let data = std::str::from_utf8(&m.data).unwrap();
        assert!(data.starts_with(
            "Received: from c.example ([127.0.0.1])\r\n\tby relay.test (ringrelay) with ESMTP id "
        ));
        assert!(!data.contains("for <"), "two recipients: no for clause");
        assert!(data.ends_with("\r\nSubject: x\r\n\r\n.hi\r\n"), "{data:?}");
        assert!(h.session.is_closed());
    }

    #[test]
    fn mailboxes_kept_by_the_hooks_stay_as_they_were_shown() {
        let mut h = Harness::new(config_with_postmaster(), "127.0.0.1:40000");
        h.feed(b"EHLO c\r\n");
        for _ in 0..2 {
            h.feed(b"MAIL FROM:<first.sender@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<Postmaster>\r\nRCPT TO:<c.longer.name@example.org>\r\nDATA\r\nx\r\n.\r\n");
        }
        let shown: Vec<&str> = h.hooks.shown.iter().map(Mailbox::as_str).collect();
        let once = [
            "first.sender@example.org",
            "b@example.org",
            "ops@example.net",
            "c.longer.name@example.org",
        ];
        assert_eq!(shown, [once, once].concat());
        for m in &h.messages {
            assert_eq!(m.from.to_string(), once[0]);
            assert_eq!(m.to, h.hooks.shown[1..4]);
        }
    }

    #[test]
    fn queued_as_carries_the_id_of_the_received_header() {
        let mut h = Harness::local();
        let text =
            h.feed(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nx\r\n.\r\n");
        let id = h.messages[0].id.to_string();
        assert!(
            text.contains(&format!("250 2.0.0 Ok: queued as {id}\r\n")),
            "{text}"
        );
        let data = std::str::from_utf8(&h.messages[0].data).unwrap();
        assert!(
            data.contains(&format!("with SMTP id {id}\r\n\tfor <b@example.org>;")),
            "{data}"
        );
        assert_eq!(h.messages[0].from, ReversePath::Null);
    }

    #[test]
    fn out_of_order_commands_get_503() {
        let mut h = Harness::local();
        let codes = h.codes(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nEHLO c\r\nRCPT TO:<b@example.org>\r\nDATA\r\nMAIL FROM:<a@example.org>\r\nMAIL FROM:<a@example.org>\r\nDATA\r\n");
        assert_eq!(
            codes,
            [
                "220",
                "503 5.5.1",
                "503 5.5.1",
                "503 5.5.1",
                "250",
                "503 5.5.1",
                "503 5.5.1",
                "250 2.1.0",
                "503 5.5.1",
                "503 5.5.1"
            ]
        );
    }

    #[test]
    fn all_recipients_refused_gives_554_at_data() {
        let mut h = Harness::new(config_with(10_000, 5), "192.0.2.1:1");
        let codes = h.codes(
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@elsewhere.test>\r\nDATA\r\n",
        );
        assert_eq!(codes, ["220", "250", "250 2.1.0", "550 5.7.1", "554 5.5.1"]);
    }

    #[test]
    fn syntax_errors_get_501_and_keep_the_state() {
        let mut h = Harness::local();
        let codes = h.codes(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<bad address>\r\nRCPT TO:<b@example.org>\r\nDATA extra\r\nDATA\r\n");
        assert_eq!(
            codes,
            [
                "220",
                "250",
                "250 2.1.0",
                "501 5.5.4",
                "250 2.1.5",
                "501 5.5.4",
                "354"
            ]
        );
        assert!(
            h.session.in_data(),
            "the transaction survived both syntax errors"
        );
    }

    #[test]
    fn a_syntax_error_reply_names_what_was_expected() {
        let mut h = Harness::local();
        h.feed(b"EHLO c\r\n");
        assert_eq!(
            h.feed(b"DATA extra\r\nMAIL FROM:a@example.org\r\n"),
            "501 5.5.4 Syntax: no arguments allowed\r\n501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
        );
    }

    #[test]
    fn unknown_parameters_get_555_and_unknown_commands_500() {
        let mut h = Harness::local();
        let codes = h.codes(b"EHLO c\r\nMAIL FROM:<a@example.org> AUTH=<>\r\nFOO\r\nEXPN list\r\nTURN\r\nVRFY x\r\nHELP\r\nNOOP\r\n");
        assert_eq!(
            codes,
            [
                "220",
                "250",
                "555 5.5.4",
                "500 5.5.2",
                "502 5.5.1",
                "502 5.5.1",
                "252 2.0.0",
                "214 2.0.0",
                "250 2.0.0"
            ]
        );
    }

    #[test]
    fn second_ehlo_and_rset_reset_the_transaction() {
        let mut h = Harness::local();
        let codes = h.codes(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nEHLO c\r\nRCPT TO:<b@example.org>\r\nMAIL FROM:<a@example.org>\r\nRSET\r\nRCPT TO:<b@example.org>\r\n");
        assert_eq!(
            codes,
            [
                "220",
                "250",
                "250 2.1.0",
                "250",
                "503 5.5.1",
                "250 2.1.0",
                "250 2.0.0",
                "503 5.5.1"
            ]
        );
    }

    #[test]
    fn relay_policy_is_checked_at_rcpt() {
        let mut outside = Harness::new(config_with_postmaster(), "127.0.0.2:5000");
        let codes = outside.codes(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.test>\r\nRCPT TO:<x@LOCAL.test>\r\nRCPT TO:<Postmaster>\r\n");
        assert_eq!(
            codes,
            [
                "220",
                "250",
                "250 2.1.0",
                "550 5.7.1",
                "250 2.1.5",
                "250 2.1.5"
            ]
        );
        assert!(outside
            .feed(b"RCPT TO:<y@elsewhere.test>\r\n")
            .starts_with("550 5.7.1 Relay access denied\r\n"));
        let mut inside = Harness::local();
        assert_eq!(
            inside.codes(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.test>\r\n")
                [3],
            "250 2.1.5"
        );
    }

    /// A bare `<postmaster>`, in any case, goes to the configured mailbox, from inside
    /// and outside `mynetworks` alike (RFC 5321 §4.5.1), and the hooks see that mailbox;
    /// `<postmaster@domain>` is an ordinary address.
    #[test]
    fn bare_postmaster_goes_to_the_configured_mailbox_from_anyone() {
        for peer in ["127.0.0.1:40000", "192.0.2.7:40000"] {
            let mut h = Harness::new(config_with_postmaster(), peer);
            let replies = h.feed(
                b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster>\r\nRCPT TO:<PostMaster>\r\nDATA\r\nhi\r\n.\r\n",
            );
            assert!(
                replies.contains("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 "),
                "{peer}: {replies:?}"
            );
            let to: Vec<&str> = h.messages[0].to.iter().map(Mailbox::as_str).collect();
            assert_eq!(to, ["ops@example.net", "ops@example.net"], "{peer}");
            let shown: Vec<&str> = h.hooks.shown.iter().map(Mailbox::as_str).collect();
            assert_eq!(shown[1..], ["ops@example.net", "ops@example.net"], "{peer}");
        }
        // With a domain it is an address like any other: outside, that is relaying.
        let mut outside = Harness::new(config_with_postmaster(), "192.0.2.7:40000");
        outside.feed(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
        assert_eq!(
            outside.feed(b"RCPT TO:<postmaster@elsewhere.test>\r\n"),
            "550 5.7.1 Relay access denied\r\n"
        );
    }

    /// With no postmaster configured, a bare `<postmaster>` is refused at RCPT (not
    /// accepted for a mailbox that reaches no one and then bounced), from anyone; the
    /// transaction goes on.
    #[test]
    fn bare_postmaster_is_refused_when_none_is_configured() {
        for peer in ["127.0.0.1:40000", "192.0.2.7:40000"] {
            let mut h = Harness::new(config_with(10_000, 5), peer);
            h.feed(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
            for rcpt in ["<Postmaster>", "<postmaster>", "<POSTMASTER>"] {
                assert_eq!(
                    h.feed(format!("RCPT TO:{rcpt}\r\n").as_bytes()),
                    "550 5.1.1 <postmaster>: no postmaster mailbox is configured here\r\n",
                    "{peer} {rcpt}"
                );
            }
            assert_eq!(
                h.feed(b"RCPT TO:<x@local.test>\r\n"),
                "250 2.1.5 Ok\r\n",
                "{peer}"
            );
            assert!(h.hooks.shown.iter().all(|m| m.local_part() != "postmaster"));
            assert_eq!(h.codes(b"DATA\r\nhi\r\n.\r\n"), ["354", "250 2.0.0"]);
            let to: Vec<&str> = h.messages[0].to.iter().map(Mailbox::as_str).collect();
            assert_eq!(to, ["x@local.test"], "{peer}");
        }
    }

    #[test]
    fn hooks_can_refuse_senders_and_data() {
        let mut h = Harness::local();
        h.hooks.refuse_sender = Some("spam@example.org");
        h.hooks.refuse_data = true;
        let codes = h.codes(b"EHLO c\r\nMAIL FROM:<spam@example.org>\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n");
        assert_eq!(
            codes,
            [
                "220",
                "250",
                "550 5.7.1",
                "250 2.1.0",
                "250 2.1.5",
                "451 4.3.0"
            ]
        );
        assert!(!h.session.in_data());
    }

    #[test]
    fn long_command_line_gets_500_5_5_6_and_the_session_goes_on() {
        let mut h = Harness::local();
        h.feed(b"EHLO c\r\n");
        // 510 octets + CRLF = 512: allowed.
        let ok = format!("NOOP {}\r\n", "x".repeat(505));
        assert_eq!(ok.len(), 512);
        assert_eq!(h.codes(ok.as_bytes()), ["250 2.0.0"]);
        let long = format!("NOOP {}\r\n", "x".repeat(506));
        assert_eq!(h.codes(long.as_bytes()), ["500 5.5.6"]);
        // A line longer than the limit arriving in pieces, without its end for a while.
        assert_eq!(h.codes("y".repeat(700).as_bytes()), ["500 5.5.6"]);
        assert_eq!(h.codes("y".repeat(5000).as_bytes()), Vec::<String>::new());
        assert_eq!(h.codes(b"yyy\r\nNOOP\r\n"), ["250 2.0.0"]);
        assert!(h.pending.is_empty());
    }

    #[test]
    fn mail_and_rcpt_lines_may_carry_dsn_parameters_past_512_octets() {
        let mut h = Harness::local();
        h.feed(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
        let orcpt = format!("rfc822;{}@example.org", "o".repeat(470));
        let line = format!("RCPT TO:<{}@example.org> ORCPT={orcpt}\r\n", "r".repeat(60));
        assert!(line.len() > MAX_COMMAND_LINE && line.len() <= MAX_MAIL_RCPT_LINE);
        // Split, so the partial line is also judged by its verb.
        assert_eq!(h.codes(&line.as_bytes()[..550]), Vec::<String>::new());
        assert_eq!(h.codes(&line.as_bytes()[550..]), ["250 2.1.5"]);
        let long = format!(
            "RCPT TO:<b@example.org> NOTIFY=NEVER{}\r\n",
            " ".repeat(1000)
        );
        assert_eq!(h.codes(long.as_bytes()), ["500 5.5.6"]);
    }

    #[test]
    fn too_many_recipients_get_452() {
        let mut h = Harness::new(config_with(10_000, 2), "127.0.0.1:1");
        let codes = h.codes(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<1@example.org>\r\nRCPT TO:<2@example.org>\r\nRCPT TO:<3@example.org>\r\nDATA\r\nx\r\n.\r\n");
        assert_eq!(
            codes,
            [
                "220",
                "250",
                "250 2.1.0",
                "250 2.1.5",
                "250 2.1.5",
                "452 4.5.3",
                "354",
                "250 2.0.0"
            ]
        );
        assert_eq!(h.messages[0].to.len(), 2);
    }

    #[test]
    fn declared_size_over_the_limit_gets_552_at_mail() {
        let mut h = Harness::new(config_with(1000, 5), "127.0.0.1:1");
        let codes = h.codes(b"EHLO c\r\nMAIL FROM:<a@example.org> SIZE=1001\r\nMAIL FROM:<a@example.org> SIZE=1000\r\n");
        assert_eq!(codes, ["220", "250", "552 5.3.4", "250 2.1.0"]);
    }

    #[test]
    fn data_over_the_limit_is_read_thrown_away_and_refused() {
        let mut h = Harness::new(config_with(1000, 5), "127.0.0.1:1");
        h.feed(b"EHLO c\r\n");
        let mut big = TX.to_vec();
        for _ in 0..100 {
            big.extend_from_slice(b"0123456789012345678901234567890123456789\r\n");
        }
        big.extend_from_slice(b".\r\nNOOP\r\n");
        assert_eq!(
            h.codes(&big),
            ["250 2.1.0", "250 2.1.5", "354", "552 5.3.4", "250 2.0.0"]
        );
        assert!(h.messages.is_empty());
        // The session goes on: a message within the limit is accepted.
        let mut small = TX.to_vec();
        small.extend_from_slice(b"small\r\n.\r\n");
        assert_eq!(
            h.codes(&small),
            ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
        );
        assert_eq!(h.messages.len(), 1);
    }

    #[test]
    fn a_message_refused_for_memory_is_read_to_its_end_and_answered_452() {
        let mut h = Harness::local();
        h.feed(b"EHLO c\r\n");
        let mut first = TX.to_vec();
        first.extend_from_slice(b"part one\r\n");
        assert_eq!(h.codes(&first), ["250 2.1.0", "250 2.1.5", "354"]);
        assert!(h.session.data_memory() > 0);
        h.session.refuse_data_for_memory();
        assert_eq!(h.session.data_memory(), 0, "the buffer is let go at once");
        // The rest, including a line that looks like a command, is still message content.
        let codes = h.codes(b"MAIL FROM:<evil@example.org>\r\npart two\r\n.\r\nNOOP\r\n");
        assert_eq!(codes, ["452 4.3.1", "250 2.0.0"]);
        assert!(h.messages.is_empty());
        // The next message is stored normally.
        let mut again = TX.to_vec();
        again.extend_from_slice(b"fine\r\n.\r\n");
        assert_eq!(
            h.codes(&again),
            ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
        );
        assert_eq!(h.messages.len(), 1);
    }

    #[test]
    fn bare_line_endings_reject_the_message_and_nothing_is_smuggled() {
        for fake_end in ["\n.\n", "\n.\r\n", "\r.\r", "\r\n.\n"] {
            let mut h = Harness::local();
            h.feed(b"EHLO c\r\n");
            let mut input = TX.to_vec();
            input.extend_from_slice(b"Subject: a\r\n\r\nfirst");
            input.extend_from_slice(fake_end.as_bytes());
            input.extend_from_slice(b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n");
            let codes = h.codes(&input);
            assert_eq!(
                codes,
                ["250 2.1.0", "250 2.1.5", "354", "550 5.5.2", "250 2.0.0"],
                "{fake_end:?}"
            );
            assert!(h.messages.is_empty(), "{fake_end:?}");
        }
    }

    #[test]
    fn too_many_errors_close_with_421() {
        let mut h = Harness::local();
        let mut input = Vec::new();
        for _ in 0..12 {
            input.extend_from_slice(b"BOGUS\r\n");
        }
        let codes = h.codes(&input);
        assert_eq!(codes.len(), 1 + 10 + 1, "{codes:?}");
        assert_eq!(codes.last().unwrap(), "421 4.7.0");
        assert!(h.session.is_closed());
        assert_eq!(
            h.codes(b"NOOP\r\n"),
            Vec::<String>::new(),
            "nothing is read after close"
        );
    }

    #[test]
    fn pipelined_replies_keep_their_order_across_a_message() {
        // The whole exchange in one input: the session must stop at the finished message,
        // and the rest must wait for the message's result.
        let mut session = Session::new(config_with(10_000, 5), "127.0.0.1:1".parse().unwrap());
        let mut hk = hooks();
        let input = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n";
        let used = session.receive(input, UNIX_EPOCH, &mut hk);
        let rest = &input[used..];
        assert_eq!(rest, b"NOOP\r\nQUIT\r\n");
        assert!(session.take_message().is_some());
        assert_eq!(
            session.receive(rest, UNIX_EPOCH, &mut hk),
            0,
            "waits for the result"
        );
        session.message_result(Err(Reply::new(554, "5.6.0 rejected by handler")));
        assert_eq!(session.receive(rest, UNIX_EPOCH, &mut hk), rest.len());
        let out = String::from_utf8(session.take_output().to_vec()).unwrap();
        assert_eq!(
            reply_codes(&out),
            [
                "250",
                "250 2.1.0",
                "250 2.1.5",
                "354",
                "554 5.6.0",
                "250 2.0.0",
                "221 2.0.0"
            ]
        );
    }

    #[test]
    fn commands_split_at_every_byte_give_the_same_replies() {
        let input: &[u8] = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nx\r\n..y\r\n.\r\nRSET\r\nQUIT\r\n";
        let mut whole = Harness::local();
        let expected = whole.feed(input);
        for split in 0..input.len() {
            let mut h = Harness::local();
            let mut got = h.feed(&input[..split]);
            got.push_str(&h.feed(&input[split..]));
            // IDs differ only if the generator does; both start equal, so replies match.
            assert_eq!(got, expected, "split at {split}");
            assert_eq!(h.messages[0].data, whole.messages[0].data);
        }
        let mut h = Harness::local();
        let mut got = String::new();
        for b in input {
            got.push_str(&h.feed(std::slice::from_ref(b)));
        }
        assert_eq!(got, expected, "byte by byte");
    }

    #[test]
    fn timeout_and_shutdown_say_421_once() {
        let mut h = Harness::local();
        h.feed(b"EHLO c\r\n");
        assert!(h.session.is_idle());
        h.session.timed_out();
        h.session.shutting_down();
        let out = String::from_utf8(h.session.take_output().to_vec()).unwrap();
        assert_eq!(reply_codes(&out), ["421 4.4.2"]);
        let mut h = Harness::local();
        h.feed(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
        assert!(!h.session.is_idle(), "a transaction is in flight");
        h.session.shutting_down();
        assert!(String::from_utf8(h.session.take_output().to_vec())
            .unwrap()
            .starts_with("421 4.3.2"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Random bytes in random pieces never panic, every reply line is well formed, and
        /// the output stays bounded by the input.
        #[test]
        fn random_input_never_panics(
            chunks in proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![
                        any::<u8>(),
                        Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b' '), Just(b':'), Just(b'<'), Just(b'>'),
                    ],
                    0..200,
                ),
                0..20,
            ),
            prefix in prop_oneof![
                Just(&b""[..]),
                Just(&b"EHLO x\r\n"[..]),
                Just(&b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"[..]),
                Just(&b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"[..]),
            ],
        ) {
            let mut h = Harness::new(config_with(500, 3), "127.0.0.1:1");
            let mut out = h.feed(prefix);
            let mut fed = prefix.len();
            for c in &chunks {
                out.push_str(&h.feed(c));
                fed += c.len();
                // A closed session reads nothing more; an open one holds at most a partial line.
                prop_assert!(h.session.is_closed() || h.pending.len() < MAX_COMMAND_LINE);
            }
            for line in out.split_terminator("\r\n") {
                prop_assert!(line.len() >= 3 && line[..3].bytes().all(|b| b.is_ascii_digit()), "{line:?}");
            }
            // At most one reply per input line, each well under 1 KiB.
            prop_assert!(out.len() <= 1024 + fed * 64);
        }
    }

    fn tls_config() -> Arc<SessionConfig> {
        let policy = RelayPolicy::new(Vec::new(), vec!["local.test".into()]);
        Arc::new(SessionConfig::new("relay.test".into(), 10_000, 5, policy).with_tls(true, true))
    }

    const TLS: TlsInfo = TlsInfo {
        version: "TLSv1.3",
        cipher: "TLS_AES_128_GCM_SHA256",
    };

    #[test]
    fn starttls_stops_reading_and_forgets_everything_before_it() {
        let mut h = Harness::new(tls_config(), "192.0.2.9:1000");
        h.feed(b"");
        let ehlo = h.feed(b"EHLO c.test\r\n");
        assert!(
            ehlo.contains("250-STARTTLS\r\n") && !ehlo.contains("AUTH"),
            "{ehlo}"
        );
        assert_eq!(
            h.feed(b"AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n"),
            "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
        );
        // STARTTLS and a command pipelined behind it: only the 220; the rest stays unread.
        assert_eq!(
            h.feed(b"MAIL FROM:<a@b.test>\r\nSTARTTLS\r\nRSET\r\n"),
            "250 2.1.0 Ok\r\n220 2.0.0 Ready to start TLS\r\n"
        );
        assert!(h.session.wants_tls());
        assert_eq!(h.pending, b"RSET\r\n", "the driver must discard this");
        h.pending.clear();
        h.session.tls_started(TLS);
        assert!(!h.session.wants_tls());
        assert_eq!(h.session.tls(), Some(TLS));
        // The transaction and the EHLO are gone.
        assert!(h
            .feed(b"MAIL FROM:<a@b.test>\r\n")
            .starts_with("503 5.5.1 Error: send HELO/EHLO first"));
        let ehlo = h.feed(b"EHLO c.test\r\n");
        assert!(
            ehlo.contains("250-AUTH PLAIN LOGIN\r\n") && !ehlo.contains("STARTTLS"),
            "{ehlo}"
        );
        assert_eq!(
            h.feed(b"STARTTLS\r\n"),
            "554 5.5.1 Error: TLS already active\r\n"
        );
    }

    #[test]
    fn auth_hands_out_credentials_and_takes_the_verdict() {
        let mut h = Harness::new(tls_config(), "192.0.2.9:1000");
        h.feed(b"");
        h.session.tls_started(TLS);
        h.feed(b"EHLO c.test\r\n");
        // Not authenticated: an outside client may not relay.
        assert!(h
            .feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\nRSET\r\n")
            .contains("550 5.7.1 Relay access denied"));
        // LOGIN in two steps; the commands behind it wait for the verdict.
        assert_eq!(h.feed(b"AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        assert_eq!(h.feed(b"YWxpY2U=\r\n"), "334 UGFzc3dvcmQ6\r\n");
        assert_eq!(h.feed(b"czNjcmV0\r\nNOOP\r\n"), "");
        let creds = h.session.take_credentials().expect("credentials");
        assert_eq!(
            (creds.user.as_str(), creds.password.as_slice()),
            ("alice", &b"s3cret"[..])
        );
        h.session.auth_result(Some("alice".into()));
        assert_eq!(
            h.feed(b""),
            "235 2.7.0 Authentication successful\r\n250 2.0.0 Ok\r\n"
        );
        assert_eq!(h.session.authenticated_user(), Some("alice"));
        assert_eq!(
            h.feed(b"AUTH PLAIN\r\n"),
            "503 5.5.1 Error: already authenticated\r\n"
        );
        // Authenticated: relaying anywhere, and the Received header says ESMTPSA.
        let replies =
            h.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\nhi\r\n.\r\n");
        assert!(
            replies.contains("250 2.1.5 Ok") && replies.contains("queued as"),
            "{replies}"
        );
        let data = String::from_utf8_lossy(&h.messages[0].data).into_owned();
        assert!(
            data.contains("(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256)"),
            "{data}"
        );
        assert!(
            data.contains("with ESMTPSA id") && !data.contains("alice"),
            "{data}"
        );
    }

    #[test]
    fn auth_failures_end_the_connection_at_the_limit() {
        let mut h = Harness::new(tls_config(), "192.0.2.9:1000");
        h.feed(b"");
        h.session.tls_started(TLS);
        h.feed(b"EHLO c.test\r\n");
        for i in 1..=3 {
            assert_eq!(h.feed(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n"), "");
            assert!(h.session.take_credentials().is_some());
            h.session.auth_result(None);
            let out = h.feed(b"");
            assert!(
                out.starts_with("535 5.7.8 Error: authentication failed\r\n"),
                "{out}"
            );
            assert_eq!(out.contains("421 4.7.0"), i == 3, "{out}");
        }
        assert!(h.session.is_closed());
        // `*` cancels; an over-long response line is refused and skipped.
        let mut h = Harness::new(tls_config(), "192.0.2.9:1000");
        h.feed(b"");
        h.session.tls_started(TLS);
        h.feed(b"EHLO c.test\r\n");
        assert_eq!(h.feed(b"AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        assert!(h.feed(b"*\r\n").starts_with("501 5.7.0"));
        assert_eq!(h.feed(b"AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        let long = vec![b'A'; MAX_RESPONSE_LINE + 10];
        assert!(h.feed(&long).starts_with("500 5.5.6"));
        assert_eq!(h.feed(b"AAAA\r\nNOOP\r\n"), "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn without_tls_configured_starttls_and_auth_are_not_offered() {
        let mut h = Harness::local();
        h.feed(b"");
        let ehlo = h.feed(b"EHLO c.test\r\n");
        assert!(!ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"));
        assert_eq!(
            h.feed(b"STARTTLS\r\n"),
            "502 5.5.1 Error: command not implemented\r\n"
        );
        assert_eq!(
            h.feed(b"AUTH PLAIN\r\n"),
            "502 5.5.1 Error: command not implemented\r\n"
        );
    }

    #[test]
    fn junk_commands_outside_a_transaction_end_the_session_at_the_limit() {
        let policy = RelayPolicy::new(vec!["127.0.0.1/32".parse::<IpNet>().unwrap()], vec![]);
        let mut config = SessionConfig::new("relay.test".into(), 10_000, 5, policy);
        config.max_junk_commands = 3;
        let mut h = Harness::new(Arc::new(config), "127.0.0.1:4000");
        h.feed(b"");
        h.feed(b"EHLO c.test\r\n");
        assert_eq!(
            h.feed(b"NOOP\r\nRSET\r\nHELP\r\n"),
            "250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\r\n"
        );
        // Inside a transaction they are not junk.
        assert!(h
            .feed(b"MAIL FROM:<a@b.test>\r\nNOOP\r\nNOOP\r\nRSET\r\n")
            .ends_with("250 2.0.0 Ok\r\n"));
        assert_eq!(
            h.feed(b"NOOP\r\nQUIT\r\n"),
            "421 4.7.0 relay.test Error: too many junk commands\r\n"
        );
        assert!(h.session.is_closed());
    }

    const MAIL_RCPT: &[u8] = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n";

    /// The content of the harness's `n`th message after our `Received:` header (the test
    /// messages begin with `Subject:`).
    fn content(h: &Harness, n: usize) -> Vec<u8> {
        let data = &h.messages[n].data;
        let at = memchr::memmem::find(data, b"Subject:").unwrap_or(0);
        data[at..].to_vec()
    }

    #[test]
    fn bdat_chunks_make_one_message_with_exact_byte_counts() {
        let mut h = Harness::local();
        h.feed(b"EHLO c.example\r\n");
        // Pipelined: MAIL, RCPT, two chunks (the second LAST) and QUIT in one go. The
        // content has a line-leading dot and a CRLF.CRLF: neither means anything in BDAT.
        let first = b"Subject: x\r\n\r\n.dot\r\n.\r\n";
        let second = b"MAIL FROM:<evil@x>\r\nend\r\n";
        let mut wire = MAIL_RCPT.to_vec();
        wire.extend_from_slice(format!("BDAT {}\r\n", first.len()).as_bytes());
        wire.extend_from_slice(first);
        wire.extend_from_slice(format!("BDAT {} LAST\r\n", second.len()).as_bytes());
        wire.extend_from_slice(second);
        wire.extend_from_slice(b"QUIT\r\n");
        let text = h.feed(&wire);
        assert_eq!(
            reply_codes(&text),
            [
                "250 2.1.0",
                "250 2.1.5",
                "250 2.0.0",
                "250 2.0.0",
                "221 2.0.0"
            ]
        );
        assert!(text.contains(&format!("250 2.0.0 {} octets received\r\n", first.len())));
        assert_eq!(h.messages.len(), 1);
        let mut expected = first.to_vec();
        expected.extend_from_slice(second);
        assert_eq!(content(&h, 0), expected);
        assert!(h.messages[0].data.starts_with(b"Received: "));
    }

    #[test]
    fn bdat_split_anywhere_gives_the_same_replies_and_message() {
        let body = b"Subject: s\r\n\r\nline\r\n";
        let mut wire = MAIL_RCPT.to_vec();
        wire.extend_from_slice(b"BDAT 5\r\n");
        wire.extend_from_slice(&body[..5]);
        wire.extend_from_slice(format!("BDAT {} LAST\r\n", body.len() - 5).as_bytes());
        wire.extend_from_slice(&body[5..]);
        wire.extend_from_slice(b"NOOP\r\n");
        for cut in 0..=wire.len() {
            let mut h = Harness::local();
            h.feed(b"EHLO c.example\r\n");
            let mut codes = h.codes(&wire[..cut]);
            codes.extend(h.codes(&wire[cut..]));
            assert_eq!(
                codes,
                [
                    "250 2.1.0",
                    "250 2.1.5",
                    "250 2.0.0",
                    "250 2.0.0",
                    "250 2.0.0"
                ],
                "cut at {cut}"
            );
            assert_eq!(content(&h, 0), body, "cut at {cut}");
        }
    }

    #[test]
    fn rset_lets_go_of_an_unfinished_bdat_message() {
        let mut h = Harness::local();
        h.feed(b"EHLO c.example\r\n");
        h.feed(MAIL_RCPT);
        let mut wire = b"BDAT 5000\r\n".to_vec();
        wire.extend_from_slice(&[b'x'; 5000]);
        assert_eq!(h.codes(&wire), ["250 2.0.0"]);
        assert!(h.session.receiving_body());
        assert!(h.session.data_memory() >= 5000);
        assert_eq!(h.codes(b"RSET\r\n"), ["250 2.0.0"]);
        assert!(!h.session.receiving_body());
        assert_eq!(h.session.body.capacity(), 0);
        // The next transaction starts afresh.
        h.feed(MAIL_RCPT);
        assert_eq!(h.codes(b"BDAT 3 LAST\r\nok\n"), ["550 5.5.2"]);
        h.feed(MAIL_RCPT);
        assert_eq!(h.codes(b"BDAT 4 LAST\r\nok\r\n"), ["250 2.0.0"]);
        assert!(!h.messages[0].data.windows(3).any(|w| w == b"xxx"));
    }

    #[test]
    fn bdat_zero_last_ends_the_message_and_bdat_zero_is_a_chunk() {
        let mut h = Harness::local();
        h.feed(b"EHLO c.example\r\n");
        h.feed(MAIL_RCPT);
        assert_eq!(h.feed(b"BDAT 0\r\n"), "250 2.0.0 0 octets received\r\n");
        assert_eq!(
            h.codes(b"BDAT 4\r\nab\r\nBDAT 0 LAST\r\n"),
            ["250 2.0.0", "250 2.0.0"]
        );
        assert_eq!(h.messages.len(), 1);
        assert!(h.messages[0].data.ends_with(b"\r\nab\r\n"));
    }

    #[test]
    fn bdat_out_of_sequence_is_refused_with_its_bytes_consumed() {
        let mut h = Harness::local();
        h.feed(b"EHLO c.example\r\n");
        // No MAIL: 503, and the chunk's bytes (a command look-alike) are not commands.
        assert_eq!(
            h.feed(b"BDAT 6\r\nQUIT\r\nNOOP\r\n"),
            "503 5.5.1 Error: need MAIL command\r\n250 2.0.0 Ok\r\n"
        );
        assert!(!h.session.is_closed());
        h.feed(b"MAIL FROM:<a@example.org>\r\n");
        assert_eq!(h.codes(b"BDAT 3 LAST\r\nabc"), ["503 5.5.1"], "no RCPT");
        // DATA after BDAT in one transaction.
        // A bare LF is refused at the end of its chunk; the transaction is gone.
        assert_eq!(
            h.codes(b"RCPT TO:<b@example.org>\r\nBDAT 3\r\nab\n"),
            ["250 2.1.5", "550 5.5.2"]
        );
        assert_eq!(h.codes(b"DATA\r\n"), ["503 5.5.1"]);
        h.feed(MAIL_RCPT);
        h.feed(b"BDAT 4\r\nab\r\n");
        assert_eq!(h.codes(b"DATA\r\n"), ["503 5.5.1"]);
        // RSET ends the BDAT transaction; a new one may use DATA.
        assert_eq!(h.codes(b"RSET\r\n"), ["250 2.0.0"]);
        h.feed(MAIL_RCPT);
        assert_eq!(h.codes(b"DATA\r\nx\r\n.\r\n"), ["354", "250 2.0.0"]);
        assert_eq!(h.messages.len(), 1);
        assert!(h.messages[0].data.ends_with(b"\r\nx\r\n"));
    }

    #[test]
    fn bdat_bare_line_endings_and_oversize_are_refused_and_the_session_stays_in_sync() {
        let mut h = Harness::local(); // 10,000-byte limit
        h.feed(b"EHLO c.example\r\n");
        h.feed(MAIL_RCPT);
        let big = vec![b'x'; 12_000];
        let mut wire = b"BDAT 12000\r\n".to_vec();
        wire.extend_from_slice(&big);
        // Already pipelined behind it: another chunk, then a command.
        wire.extend_from_slice(b"BDAT 6 LAST\r\nNOOP\r\nNOOP\r\n");
        assert_eq!(h.codes(&wire), ["552 5.3.4", "503 5.5.1", "250 2.0.0"]);
        assert!(h.messages.is_empty());
        // A bare LF; a CR left bare at the end of the last chunk, or by the next chunk.
        h.feed(MAIL_RCPT);
        assert_eq!(h.codes(b"BDAT 4 LAST\r\na\nb\r"), ["550 5.5.2"]);
        h.feed(MAIL_RCPT);
        assert_eq!(h.codes(b"BDAT 3 LAST\r\nab\r"), ["550 5.5.2"]);
        h.feed(MAIL_RCPT);
        assert_eq!(
            h.codes(b"BDAT 3\r\nab\rBDAT 1 LAST\r\nx"),
            ["250 2.0.0", "550 5.5.2"]
        );
        // A CRLF split across chunks is fine.
        h.feed(MAIL_RCPT);
        assert_eq!(
            h.codes(b"BDAT 3\r\nab\rBDAT 1 LAST\r\n\n"),
            ["250 2.0.0", "250 2.0.0"]
        );
        assert_eq!(h.messages.len(), 1);
        // A malformed size cannot be skipped: 501 and the end of the session, so nothing
        // of the chunk runs as commands.
        assert_eq!(h.codes(b"BDAT x\r\nNOOP\r\n"), ["501 5.5.4"]);
        assert!(h.session.is_closed());
    }

    #[test]
    fn large_content_leaves_in_pieces_and_every_check_still_holds() {
        for chunked in [false, true] {
            let mut config = session_config(5_000_000, 5);
            config.stream_above = 1000;
            let mut h = Harness::new(Arc::new(config), "127.0.0.1:4000");
            h.feed(b"EHLO c.example\r\n");
            h.feed(MAIL_RCPT);
            let mut sent = Vec::new();
            let mut pieces: Vec<u8> = Vec::new();
            if !chunked {
                h.feed(b"DATA\r\n");
            }
            for i in 0..50 {
                let line = format!(".{i:04} {}\r\n", "y".repeat(90));
                sent.extend_from_slice(line.as_bytes());
                if chunked {
                    h.feed(format!("BDAT {}\r\n", line.len()).as_bytes());
                    h.feed(line.as_bytes());
                } else {
                    h.feed(format!(".{line}").as_bytes());
                }
                assert!(h.session.data_memory() < 4096, "bounded while it streams");
                if h.session.piece_ready() {
                    pieces.extend_from_slice(&h.session.take_piece());
                }
            }
            assert!(
                pieces.len() > 3000,
                "pieces were offered ({})",
                pieces.len()
            );
            assert_eq!(h.session.streamed(), pieces.len() as u64);
            if chunked {
                h.feed(b"BDAT 0 LAST\r\n");
            } else {
                h.feed(b".\r\n");
            }
            assert_eq!(h.messages.len(), 1);
            pieces.extend_from_slice(&h.messages[0].data);
            assert!(pieces.starts_with(b"Received: "));
            assert!(pieces.ends_with(&sent), "chunked: {chunked}");
        }
    }

    #[test]
    fn a_streamed_message_over_the_limit_or_with_a_bare_lf_is_still_refused() {
        let mut config = session_config(3000, 5);
        config.stream_above = 500;
        let mut h = Harness::new(Arc::new(config), "127.0.0.1:4000");
        h.feed(b"EHLO c.example\r\n");
        h.feed(MAIL_RCPT);
        h.feed(b"DATA\r\n");
        for _ in 0..40 {
            h.feed(&[b'z'; 98]);
            h.feed(b"\r\n");
            if h.session.piece_ready() {
                h.session.take_piece();
            }
        }
        assert_eq!(h.codes(b".\r\n"), ["552 5.3.4"]);
        h.feed(MAIL_RCPT);
        h.feed(b"DATA\r\n");
        h.feed(&[b'z'; 700]);
        assert!(h.session.piece_ready());
        h.session.take_piece();
        assert_eq!(h.codes(b"\n\r\n.\r\n"), ["550 5.5.2"]);
        // The sink failed: the rest is read and dropped, then the sink's reply.
        h.feed(MAIL_RCPT);
        h.feed(b"DATA\r\n");
        h.feed(&[b'z'; 700]);
        h.session.take_piece();
        h.session
            .refuse_data(Reply::new(451, "4.3.0 Error: cannot write"));
        assert!(!h.session.piece_ready());
        h.feed(&[b'z'; 700]);
        assert_eq!(h.codes(b"\r\n.\r\n"), ["451 4.3.0"]);
        assert!(h.messages.is_empty());
        assert!(!h.session.receiving_body());
    }

    #[test]
    fn smtputf8_is_needed_for_internationalized_addresses() {
        let mut h = Harness::local();
        h.feed(b"EHLO client.example\r\n");
        // Without SMTPUTF8: 553 5.6.7 for the sender and for a recipient (RFC 6531 §3.5).
        assert_eq!(
            h.codes("MAIL FROM:<δοκιμή@example.org>\r\n".as_bytes()),
            ["553 5.6.7"]
        );
        assert_eq!(
            h.codes(
                "MAIL FROM:<a@example.org>\r\nRCPT TO:<用户@example.org>\r\nRSET\r\n".as_bytes()
            ),
            ["250 2.1.0", "553 5.6.7", "250 2.0.0"]
        );
        // Broken UTF-8 is a syntax error either way.
        assert_eq!(
            h.codes(b"MAIL FROM:<a\xc0\xaf@example.org> SMTPUTF8\r\n"),
            ["501 5.5.4"]
        );
        let tx = "MAIL FROM:<δοκιμή@example.org> SMTPUTF8\r\nRCPT TO:<用户@例子.test>\r\nDATA\r\n";
        assert_eq!(h.codes(tx.as_bytes()), ["250 2.1.0", "250 2.1.5", "354"]);
        assert!(h
            .feed("Subject: héllo\r\n\r\nbody\r\n.\r\n".as_bytes())
            .starts_with("250 2.0.0"));
        let m = &h.messages[0];
        assert!(m.smtputf8);
        assert_eq!(m.to[0].as_str(), "用户@例子.test");
        let text = String::from_utf8(m.data.to_vec()).unwrap();
        assert!(text.contains(" with UTF8SMTP id "), "{text}");
        assert!(text.contains("for <用户@例子.test>"), "{text}");
        assert!(m.dsn.is_none());
        // The flag belongs to one transaction.
        h.feed(b"MAIL FROM:<a@example.org>\r\n");
        assert_eq!(
            h.codes("RCPT TO:<用户@example.org>\r\n".as_bytes()),
            ["553 5.6.7"]
        );
    }

    #[test]
    fn a_u_label_relay_domain_matches_in_its_a_label_form() {
        let policy = RelayPolicy::new(vec![], vec!["xn--bcher-kva.example".into()]);
        let config = Arc::new(SessionConfig::new("relay.test".into(), 10_000, 5, policy));
        let mut h = Harness::new(config, "192.0.2.9:40000");
        h.feed(b"EHLO client.example\r\n");
        let codes = h.codes(
            "MAIL FROM:<a@example.org> SMTPUTF8\r\nRCPT TO:<b@BÜCHER.example>\r\nRCPT TO:<b@buecher.example>\r\n"
                .as_bytes(),
        );
        assert_eq!(codes, ["250 2.1.0", "250 2.1.5", "550 5.7.1"]);
    }

    #[test]
    fn dsn_parameters_reach_the_envelope() {
        let mut h = Harness::local();
        h.feed(b"EHLO client.example\r\n");
        let codes = h.codes(
            b"MAIL FROM:<a@example.org> RET=HDRS ENVID=QQ+2B1\r\n\
              RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.org\r\n\
              RCPT TO:<c@example.org> NOTIFY=NEVER NOTIFY=NEVER\r\n\
              RCPT TO:<d@example.org>\r\nDATA\r\nx\r\n.\r\n",
        );
        assert_eq!(
            codes,
            [
                "250 2.1.0",
                "250 2.1.5",
                "501 5.5.4",
                "250 2.1.5",
                "354",
                "250 2.0.0"
            ]
        );
        let dsn = h.messages[0].dsn.as_ref().expect("DSN parameters");
        assert_eq!(dsn.ret, Some(Ret::Hdrs));
        assert_eq!(dsn.envid.as_deref(), Some("QQ+1"));
        assert_eq!(dsn.rcpts.len(), 2, "one per accepted recipient");
        assert!(dsn.rcpts[0].notify.has(ext::Notify::SUCCESS));
        assert_eq!(
            dsn.rcpts[0].orcpt.as_ref().map(|o| &*o.addr),
            Some("b@example.org")
        );
        assert!(dsn.rcpts[1].is_default());
        // A transaction without DSN parameters carries none.
        h.feed(TX);
        h.feed(b"x\r\n.\r\n");
        assert!(h.messages[1].dsn.is_none());
        assert!(!h.messages[1].smtputf8);
    }
}
