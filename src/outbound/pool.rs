//! Each shard's pool of open outbound connections, per next hop: at most
//! `max_connections_per_destination` per address and security (see below), shared by every
//! domain whose mail goes there; a connection carries message after message (the client
//! sends RSET between them) and is closed after sitting idle.
//!
//! Connections run on the shard's own driver (io_uring, or epoll under the fallback:
//! `driver::outbound::Stream`), with the inbound side's rule for timeouts: an operation that
//! runs out of time is ended by shutting the socket down, never dropped in flight. The
//! protocol is the sans-IO [`Client`].
//!
//! STARTTLS (RFC 3207) at Postfix's levels ([`TlsLevel`]): when the client reports
//! [`ClientEvent::StartTls`], the connection gets a TLS layer ([`TlsSession`], sans-IO, so
//! io_uring still moves the bytes): socket bytes go through it before the client sees them,
//! and the client's bytes through it before they are written. The handshake has its own
//! time limit. A plaintext connection carries no layer at all (an empty `Option<Box<_>>`),
//! so its per-message path is what it was without TLS.
//!
//! - Certificates: `may` and `encrypt` take any (opportunistic TLS, RFC 7435); `verify`
//!   checks the chain against the bundled roots plus `delivery.tls_ca_file` and the name
//!   against the next hop's host name (the MX host, the route's host), or its IP address
//!   for an address route.
//! - A failed handshake at `may` makes the shard deliver to that address in plaintext for
//!   [`PoolConfig::tls_fallback`] (logged once at warn), as Postfix does; at `encrypt` and
//!   `verify` it defers.
//! - Session resumption: each shard builds its client configs once, each with its own
//!   in-memory session cache (rustls' `ClientSessionMemoryCache`, tickets and TLS 1.2
//!   session IDs), so a reconnect to a next hop resumes instead of a full handshake. The
//!   `verify` config has a cache apart from the opportunistic one: a session made without
//!   checking the certificate must never be resumed as if it had been checked.
//!
//! Connections are keyed by address *and* what was asked of them (level, the verified name,
//! AUTH), so a plaintext connection never carries mail that must go encrypted, nor an
//! unauthenticated one mail for the smarthost.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use rustls::client::Resumption;
use rustls::ClientConfig;
use tokio::sync::Notify;

use super::health::{self, Health, Verdict};
use super::shaping::{is_throttle_reply, Budget, Slot, BUDGET_POLL};
use crate::driver::outbound::{Stream, Timed};
use crate::smtp::client::{Client, ClientEvent, Credentials};
use crate::smtp::Reply;
use crate::tls::{client_config, TlsError, TlsLevel, TlsSession};

/// Sessions each of a shard's TLS client configs remembers for resumption.
const SESSION_CACHE_SIZE: usize = 256;

/// Plaintext handed to TLS before its ciphertext is written: bounds what a large message
/// holds encrypted in memory at once.
const TLS_WRITE_BATCH: usize = 256 * 1024;

/// How long a TLS alert may take to leave before the connection is dropped anyway.
const ALERT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Timeouts and limits of a pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Name sent in EHLO.
    pub helo: String,
    /// Open connections per next hop.
    pub max_per_destination: usize,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
    /// Time to connect and be greeted (and again, after STARTTLS, for the second EHLO and
    /// AUTH).
    pub connect_timeout: Duration,
    /// Time to wait for any one reply (or to write).
    pub reply_timeout: Duration,
    /// Time for a TLS handshake, first byte to last.
    pub tls_handshake_timeout: Duration,
    /// After a failed handshake at `may`, the address gets plaintext for this long.
    pub tls_fallback: Duration,
    /// More trust anchors for `verify` (`delivery.tls_ca_file`).
    pub tls_ca_file: Option<PathBuf>,
    /// An address that refused, timed out or failed its greeting is not connected to for
    /// this long (see [`health`]).
    pub down_for: Duration,
}

/// One address of a next hop, and what delivery there asks for.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The next hop's host name (an MX host, a route's host; `[192.0.2.1]` for an address
    /// literal): what `verify` checks the certificate against, and the SNI sent.
    pub host: &'a str,
    /// How much TLS to insist on.
    pub level: TlsLevel,
    /// AUTH with these (the smarthost's), only over TLS.
    pub auth: Option<&'a Arc<Credentials>>,
    /// The shaped destination domain's budget (`delivery.shaping`): a connection opened
    /// under it carries only that domain's mail.
    pub budget: Option<&'a Arc<Budget>>,
}

/// Why no connection could be had.
#[derive(Debug)]
pub struct ConnectError {
    /// What the recipients are deferred with if no other address takes the mail: `451
    /// 4.4.1` for an unusable address, `4.7.x` when TLS or AUTH could not be had.
    pub reply: Reply,
    /// The TLS handshake failed at `may`: the address now gets plaintext (for a while), and
    /// the caller may try it again at once.
    pub retry_in_plaintext: bool,
    /// No connection was attempted: the address is down (see [`health`]).
    pub down: bool,
    /// The next hop said "too many" connections or messages
    /// ([`super::shaping::is_throttle_reply`]).
    pub throttled: bool,
    /// What the attempt says about the address's health.
    outcome: health::Outcome,
}

impl ConnectError {
    /// An attempt that says nothing about the address being up or down.
    fn inconclusive(reply: Reply) -> ConnectError {
        ConnectError {
            reply,
            retry_in_plaintext: false,
            down: false,
            throttled: false,
            outcome: health::Outcome::Inconclusive,
        }
    }

    /// The address refused, timed out or failed its greeting: `why` says which.
    fn failed(addr: SocketAddr, why: String) -> ConnectError {
        ConnectError {
            reply: Reply::new(451, format!("4.4.1 {addr}: {why}")),
            retry_in_plaintext: false,
            down: false,
            throttled: false,
            outcome: health::Outcome::Failed(why),
        }
    }
}

/// What a pooled connection was opened for: connections are shared only between
/// deliveries that ask the same of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    /// The level's word (`TlsLevel` is not `Hash`).
    level: &'static str,
    /// At `verify`: the name the certificate was checked against.
    verified_name: Option<Box<str>>,
    /// Authenticated as the smarthost's user.
    auth: bool,
    /// The shaped domain whose budget it was opened under.
    shaped: Option<Box<str>>,
}

impl Key {
    fn of(hop: &Hop<'_>) -> Key {
        Key {
            addr: hop.addr,
            level: hop.level.name(),
            verified_name: (hop.level == TlsLevel::Verify).then(|| server_name(hop).into()),
            auth: hop.auth.is_some(),
            shaped: hop.budget.map(|b| b.domain().into()),
        }
    }
}

/// The name given to TLS for `hop`: its host name, or the address for an address literal.
fn server_name(hop: &Hop<'_>) -> String {
    if hop.host.starts_with('[') {
        hop.addr.ip().to_string()
    } else {
        hop.host.to_string()
    }
}

/// The shard's TLS client configs, built once.
struct TlsConfigs {
    /// `may` and `encrypt`: any certificate.
    opportunistic: Option<Arc<ClientConfig>>,
    /// `verify`: the bundled roots plus the extra CA file; or why it could not be built.
    verify: Result<Arc<ClientConfig>, String>,
}

impl TlsConfigs {
    fn new(ca_file: Option<&std::path::Path>) -> TlsConfigs {
        let opportunistic = match client_config(TlsLevel::May, None) {
            Ok(config) => config.map(with_resumption),
            Err(e) => {
                tracing::error!("no outbound TLS: {e}; mail that requires TLS is deferred");
                None
            }
        };
        let verify = match client_config(TlsLevel::Verify, ca_file) {
            Ok(Some(config)) => Ok(with_resumption(config)),
            Ok(None) => Err("no TLS configuration for verify".to_string()),
            Err(e) => {
                tracing::error!(
                    "no outbound TLS at verify: {e}; mail for verify destinations is deferred"
                );
                Err(e.to_string())
            }
        };
        TlsConfigs {
            opportunistic,
            verify,
        }
    }

    /// The config for `level`; `Ok(None)` for `none`.
    fn for_level(&self, level: TlsLevel) -> Result<Option<Arc<ClientConfig>>, String> {
        match level {
            TlsLevel::None => Ok(None),
            TlsLevel::May | TlsLevel::Encrypt => match &self.opportunistic {
                Some(config) => Ok(Some(Arc::clone(config))),
                None => Err("no TLS client configuration".into()),
            },
            TlsLevel::Verify => self.verify.clone().map(Some),
        }
    }
}

/// `config` with a session cache of its own. rustls' default is the same kind of cache;
/// it is set here so that resumption being on is visible, and so that each config (built
/// per shard) surely has its own.
fn with_resumption(config: Arc<ClientConfig>) -> Arc<ClientConfig> {
    let mut config = Arc::unwrap_or_clone(config);
    config.resumption = Resumption::in_memory_sessions(SESSION_CACHE_SIZE);
    Arc::new(config)
}

/// A connection's TLS: the session and its buffers.
struct TlsLayer {
    session: TlsSession,
    /// Decrypted bytes the client has not consumed yet (a partial reply line).
    plain: BytesMut,
    /// Ciphertext to write.
    out: BytesMut,
}

impl TlsLayer {
    /// Encrypts what the client wants sent into `chunks`, up to about [`TLS_WRITE_BATCH`]
    /// bytes of it; true if it stopped there with more perhaps to come.
    fn seal(&mut self, client: &mut Client, chunks: &mut VecDeque<Bytes>) -> Result<bool, String> {
        let mut taken = 0;
        let mut more = false;
        while let Some(chunk) = client.poll_transmit() {
            self.session
                .send_plaintext(&chunk)
                .map_err(|e| e.to_string())?;
            taken += chunk.len();
            if taken >= TLS_WRITE_BATCH {
                more = true;
                break;
            }
        }
        self.session.take_tls_output(&mut self.out);
        if !self.out.is_empty() {
            chunks.push_back(self.out.split().freeze());
        }
        Ok(more)
    }

    /// Decrypts `ciphertext` (all of it is taken) and gives the plaintext to the client.
    fn open(&mut self, ciphertext: &mut BytesMut, client: &mut Client) -> Result<(), String> {
        let received = self.session.receive_tls(ciphertext);
        ciphertext.clear();
        received.map_err(|e| e.to_string())?;
        self.session.take_plaintext(&mut self.plain);
        let used = client.receive(&self.plain);
        self.plain.advance(used);
        if self.session.peer_closed() {
            // Harmless once the client is finished (after QUIT's reply): abort is then a
            // no-op.
            return Err("TLS closed by the next hop".into());
        }
        Ok(())
    }
}

/// One open connection and its protocol state.
pub struct Conn {
    stream: Stream,
    /// The TLS layer, after STARTTLS.
    tls: Option<Box<TlsLayer>>,
    /// The protocol state machine.
    pub client: Client,
    /// Bytes read from the socket (ciphertext under TLS).
    buf: BytesMut,
    /// What goes out next, written with one `writev` (no gathering copy); kept between
    /// writes so its allocation is reused.
    chunks: VecDeque<Bytes>,
    last_used: Instant,
    key: Key,
    /// Its share of a shaped domain's budget.
    slot: Option<Slot>,
    /// Messages started on it.
    messages: usize,
}

#[derive(Default)]
struct Destination {
    idle: Vec<Conn>,
    open: usize,
    freed: Rc<Notify>,
    /// Checkouts of this shard waiting for one of these connections.
    waiting: usize,
}

/// What a checkout waits for before it looks again.
enum Wait {
    /// A trial connection's outcome.
    Trial(Rc<Notify>),
    /// A connection of this shard's to be freed.
    Freed(Rc<Notify>),
    /// The same, or a slot in the domain's budget (polled: other shards free them).
    Budget(Rc<Notify>, Arc<Budget>),
}

/// The shard's pool.
pub struct Pool {
    config: PoolConfig,
    tls: TlsConfigs,
    destinations: RefCell<HashMap<Key, Destination>>,
    /// Addresses whose TLS handshake failed at `may`: plaintext for them until then.
    plaintext_until: RefCell<HashMap<SocketAddr, Instant>>,
    /// Which addresses are down, and trials under way.
    health: RefCell<Health>,
}

/// Ends a trial connection on every path: with its outcome, or abandoned if dropped.
struct TrialGuard<'a> {
    health: &'a RefCell<Health>,
    addr: SocketAddr,
    active: bool,
}

impl TrialGuard<'_> {
    fn end(mut self, outcome: health::Outcome, host: &str) {
        self.active = false;
        let reason = match &outcome {
            health::Outcome::Failed(why) => Some(why.clone()),
            _ => None,
        };
        let newly_down = self
            .health
            .borrow_mut()
            .ended(self.addr, outcome, Instant::now());
        if let (true, Some(why)) = (newly_down, reason) {
            tracing::warn!(
                "{} ({host}) is down: {why}; no connections to it for the next {} s but one probe then",
                self.addr,
                self.health.borrow().down_for().as_secs()
            );
        }
    }
}

impl Drop for TrialGuard<'_> {
    fn drop(&mut self) {
        if self.active {
            self.health.borrow_mut().abandon_trial(self.addr);
        }
    }
}

impl Pool {
    /// An empty pool, with this shard's TLS client configs (and session caches).
    pub fn new(config: PoolConfig) -> Self {
        let tls = TlsConfigs::new(config.tls_ca_file.as_deref());
        Pool {
            health: RefCell::new(Health::new(config.down_for)),
            config,
            tls,
            destinations: RefCell::new(HashMap::new()),
            plaintext_until: RefCell::new(HashMap::new()),
        }
    }

    /// The reply timeout (for the delivery code's own waits).
    pub fn reply_timeout(&self) -> Duration {
        self.config.reply_timeout
    }

    /// A ready connection to `hop`: an idle one, a new one if under the cap, or the next
    /// one freed. Connections are keyed by address and security, so domains whose mail
    /// goes to the same host the same way share them. `Err` says why none could be made
    /// (the caller tries the next address, or defers).
    ///
    /// No connection is made to an address that is down ([`health`]): `Err` with `down`
    /// set at once. While nothing is known of an address, one connection at a time is
    /// made to it (a trial); other checkouts wait for its outcome.
    pub async fn checkout(&self, hop: &Hop<'_>) -> Result<Conn, ConnectError> {
        let key = Key::of(hop);
        let (trial, slot) = loop {
            let wait = {
                let mut dests = self.destinations.borrow_mut();
                let d = dests.entry(key.clone()).or_default();
                while let Some(conn) = d.idle.pop() {
                    if conn.last_used.elapsed() < self.config.idle_timeout && conn.is_alive() {
                        return Ok(conn);
                    }
                    d.open -= 1;
                }
                let now = Instant::now();
                let verdict = self.health.borrow().peek(hop.addr, now);
                match verdict {
                    Verdict::Down(down) => {
                        return Err(ConnectError {
                            reply: down.reply(),
                            retry_in_plaintext: false,
                            down: true,
                            throttled: false,
                            outcome: health::Outcome::Inconclusive,
                        })
                    }
                    Verdict::Wait(trial) => Wait::Trial(trial),
                    Verdict::Connect | Verdict::Trial => {
                        if d.open < self.config.max_per_destination {
                            let slot = hop.budget.map(|b| (b, b.try_open()));
                            match slot {
                                Some((budget, None)) => {
                                    d.waiting += 1;
                                    Wait::Budget(Rc::clone(&d.freed), Arc::clone(budget))
                                }
                                Some((_, Some(slot))) => {
                                    d.open += 1;
                                    break (self.begin(hop.addr, now), Some(slot));
                                }
                                None => {
                                    d.open += 1;
                                    break (self.begin(hop.addr, now), None);
                                }
                            }
                        } else {
                            d.waiting += 1;
                            Wait::Freed(Rc::clone(&d.freed))
                        }
                    }
                }
            };
            match wait {
                Wait::Trial(trial) => trial.notified().await,
                Wait::Freed(freed) => {
                    freed.notified().await;
                    self.stop_waiting(&key);
                }
                Wait::Budget(freed, budget) => {
                    let _waiter = budget.waiter();
                    tokio::select! {
                        _ = freed.notified() => {}
                        _ = tokio::time::sleep(BUDGET_POLL) => {}
                    }
                    self.stop_waiting(&key);
                }
            }
        };
        let guard = TrialGuard {
            health: &self.health,
            addr: hop.addr,
            active: trial,
        };
        let mut result = self.connect(hop, key.clone()).await;
        if let Ok(conn) = &mut result {
            conn.slot = slot;
        }
        let outcome = match &result {
            Ok(_) => health::Outcome::Up,
            Err(e) => e.outcome.clone(),
        };
        if trial || !matches!(outcome, health::Outcome::Inconclusive) {
            guard.end(outcome, hop.host);
        }
        if result.is_err() {
            self.release(&key);
        }
        result
    }

    /// Gives a connection back: kept if it can take another message, else closed.
    ///
    /// Under a shaped domain's budget it is closed instead (with QUIT) when it has carried
    /// `max_messages_per_connection`, when the domain's limit was lowered below what is
    /// open, or when checkouts elsewhere wait for the budget and none here for this
    /// connection: an idle connection must not keep another shard waiting.
    pub fn checkin(&self, mut conn: Conn) {
        if !conn.client.is_ready() {
            self.release(&conn.key);
            return;
        }
        conn.last_used = Instant::now();
        let mut dests = self.destinations.borrow_mut();
        let d = dests.entry(conn.key.clone()).or_default();
        let retire = conn.slot.as_ref().is_some_and(|slot| {
            let budget = slot.budget();
            let per_conn = budget.max_messages_per_connection();
            (per_conn > 0 && conn.messages >= per_conn)
                || budget.over_limit()
                || (budget.has_waiters() && d.waiting == 0)
        });
        if retire {
            d.open = d.open.saturating_sub(1);
            d.freed.notify_one();
            drop(dests);
            self.quit_in_background(conn);
        } else {
            d.idle.push(conn);
            d.freed.notify_one();
        }
    }

    /// Ends a connection politely (QUIT, its reply awaited briefly) in a task of its own;
    /// its budget slot is given back when that ends.
    fn quit_in_background(&self, mut conn: Conn) {
        let timeout = self.config.reply_timeout;
        tokio::task::spawn_local(async move {
            conn.client.quit();
            let _ = tokio::time::timeout(timeout, conn.run_until_event(timeout)).await;
        });
    }

    /// Starts a trial connection to `addr` if nothing is known of it (see [`health`]):
    /// true if this is one.
    fn begin(&self, addr: SocketAddr, now: Instant) -> bool {
        matches!(self.health.borrow_mut().check(addr, now), Verdict::Trial)
    }

    fn stop_waiting(&self, key: &Key) {
        if let Some(d) = self.destinations.borrow_mut().get_mut(key) {
            d.waiting = d.waiting.saturating_sub(1);
        }
    }

    /// Forgets which next hops are down (`queue flush`).
    pub fn forget_down(&self) {
        self.health.borrow_mut().forget_down();
    }

    /// Closes idle connections past their idle time (politely, with QUIT), and forgets
    /// plaintext fallbacks that have run out. Called periodically by the shard.
    pub fn close_idle(&self) {
        let mut expired = Vec::new();
        for d in self.destinations.borrow_mut().values_mut() {
            let before = d.idle.len();
            // Idle connections to a shaped domain also close when its limit was lowered or
            // checkouts (on any shard) wait for its budget.
            let (keep, old): (Vec<Conn>, Vec<Conn>) = d.idle.drain(..).partition(|c| {
                c.last_used.elapsed() < self.config.idle_timeout
                    && !c
                        .slot
                        .as_ref()
                        .is_some_and(|s| s.budget().over_limit() || s.budget().has_waiters())
            });
            d.idle = keep;
            d.open -= before - d.idle.len();
            expired.extend(old);
        }
        for conn in expired {
            self.quit_in_background(conn);
        }
        let now = Instant::now();
        self.plaintext_until
            .borrow_mut()
            .retain(|_, until| *until > now);
        self.health.borrow_mut().tidy(now);
    }

    fn release(&self, key: &Key) {
        let mut dests = self.destinations.borrow_mut();
        if let Some(d) = dests.get_mut(key) {
            d.open = d.open.saturating_sub(1);
            d.freed.notify_one();
        }
    }

    /// The level a new connection to `hop` asks for: `may` goes plaintext while a failed
    /// handshake is remembered for the address; credentials need TLS, so never with them
    /// (they make even `none` an `encrypt`).
    fn effective_level(&self, hop: &Hop<'_>) -> TlsLevel {
        if hop.auth.is_some() && hop.level == TlsLevel::None {
            return TlsLevel::Encrypt;
        }
        let fallen_back = hop.level == TlsLevel::May
            && hop.auth.is_none()
            && self
                .plaintext_until
                .borrow()
                .get(&hop.addr)
                .is_some_and(|until| *until > Instant::now());
        if fallen_back {
            TlsLevel::None
        } else {
            hop.level
        }
    }

    /// After a failed handshake at `may`: plaintext to `hop`'s address for a while, said
    /// once at warn (not again while it lasts).
    fn fall_back_to_plaintext(&self, hop: &Hop<'_>, why: &str) {
        let now = Instant::now();
        let mut until = self.plaintext_until.borrow_mut();
        let active = until.get(&hop.addr).is_some_and(|t| *t > now);
        until.insert(hop.addr, now + self.config.tls_fallback);
        if !active {
            tracing::warn!(
                "{} ({}): {why}; delivering to it in plaintext for the next {} s (tls = may)",
                hop.addr,
                hop.host,
                self.config.tls_fallback.as_secs()
            );
        }
    }

    /// Connects and runs the opening: greeting, EHLO, and where they apply STARTTLS with
    /// the TLS handshake, EHLO again and AUTH. The connect timeout bounds the waits before
    /// STARTTLS and again those after the handshake; the handshake has its own. Only the
    /// TCP connect itself is cut off by dropping it (see `Stream`); the replies are waited
    /// for with the socket's own timeout rule.
    async fn connect(&self, hop: &Hop<'_>, key: Key) -> Result<Conn, ConnectError> {
        let addr = hop.addr;
        let level = self.effective_level(hop);
        let tls_config = self.tls.for_level(level).map_err(|why| {
            ConnectError::inconclusive(Reply::new(
                451,
                format!("4.7.5 {addr}: cannot use TLS: {why}"),
            ))
        })?;
        let start = Instant::now();
        let stream = tokio::time::timeout(self.config.connect_timeout, Stream::connect(addr))
            .await
            .map_err(|_| ConnectError::failed(addr, "timeout connecting".into()))?
            .map_err(|e| ConnectError::failed(addr, format!("cannot connect: {e}")))?;
        tracing::trace!("connected to {addr} on {}", stream.driver());
        let mut client = Client::new(&self.config.helo).with_tls(level);
        if let Some(credentials) = hop.auth {
            client = client.with_auth(Arc::clone(credentials));
        }
        let mut conn = Conn {
            stream,
            tls: None,
            client,
            buf: BytesMut::with_capacity(4096),
            chunks: VecDeque::new(),
            last_used: Instant::now(),
            key,
            slot: None,
            messages: 0,
        };
        let mut deadline = start + self.config.connect_timeout;
        loop {
            // What is left of the connect timeout bounds each wait.
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            match conn.run_until_event(left).await {
                ClientEvent::Ready => return Ok(conn),
                ClientEvent::StartTls => {
                    let Some(config) = tls_config.clone() else {
                        // The client asks for STARTTLS only at a level with a config.
                        conn.client.abort("STARTTLS without a TLS configuration");
                        continue;
                    };
                    let limit = self.config.tls_handshake_timeout;
                    if let Err(why) = conn.handshake(config, &server_name(hop), limit).await {
                        conn.client.abort(&why);
                        let fall_back = level == TlsLevel::May && hop.auth.is_none();
                        if fall_back {
                            self.fall_back_to_plaintext(hop, &why);
                        } else {
                            tracing::warn!("{addr} ({}): {why}", hop.host);
                        }
                        return Err(ConnectError {
                            retry_in_plaintext: fall_back,
                            ..ConnectError::inconclusive(Reply::new(
                                451,
                                format!("4.7.5 {addr}: {why}"),
                            ))
                        });
                    }
                    if let Some(tls) = conn.tls.as_deref() {
                        // Postfix's words: a verified chain and name, or not.
                        tracing::info!(
                            "{} TLS connection established to {addr} ({}): {} with {}",
                            if level == TlsLevel::Verify {
                                "Verified"
                            } else {
                                "Untrusted"
                            },
                            hop.host,
                            tls.session.protocol_version().unwrap_or("TLS"),
                            tls.session.cipher_suite().unwrap_or("an unknown cipher"),
                        );
                    }
                    deadline = Instant::now() + self.config.connect_timeout;
                }
                ClientEvent::Closed { reason } => {
                    // "Too many connections": the address is up, but wants fewer of ours.
                    if conn.client.close_reply().is_some_and(is_throttle_reply) {
                        return Err(ConnectError {
                            throttled: true,
                            ..ConnectError::inconclusive(Reply::new(
                                451,
                                format!("4.4.1 {addr}: {reason}"),
                            ))
                        });
                    }
                    // TLS or AUTH that could not be had keeps its own status (4.7.x), and
                    // the operator hears of it; anything else makes the address unusable.
                    let security = conn
                        .client
                        .close_reply()
                        .filter(|r| r.is_transient())
                        .and_then(|r| Some((r.code(), r.enhanced_status()?)))
                        .filter(|(_, status)| status.starts_with("4.7."));
                    return Err(match security {
                        Some((code, status)) => {
                            tracing::warn!("{addr} ({}): {reason}", hop.host);
                            ConnectError::inconclusive(Reply::new(
                                code,
                                format!("{status} {addr}: {reason}"),
                            ))
                        }
                        None => ConnectError::failed(addr, reason),
                    });
                }
                ClientEvent::Delivered(_) => {
                    return Err(ConnectError::inconclusive(Reply::new(
                        451,
                        format!("4.4.1 {addr}: unexpected delivery event"),
                    )))
                }
            }
        }
    }
}

impl Conn {
    /// Counts a message started on this connection (for `max_messages_per_connection`).
    pub fn count_message(&mut self) {
        self.messages += 1;
    }

    /// Without blocking: is the peer still there (no EOF, no unsolicited bytes)?
    fn is_alive(&self) -> bool {
        self.stream.is_alive()
    }

    /// True when this connection runs inside TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Writes what the client wants sent and reads replies until it reports an event. A
    /// broken or silent peer is reported to the client (`abort`), which then yields its
    /// events too, so this always returns.
    pub async fn run_until_event(&mut self, timeout: Duration) -> ClientEvent {
        loop {
            if let Err(why) = self.flush(timeout).await {
                self.client.abort(&why);
            }
            if let Some(event) = self.client.poll_event() {
                return event;
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            let (read, buf) = self
                .stream
                .read_timed(std::mem::take(&mut self.buf), timeout)
                .await;
            self.buf = buf;
            match read {
                Timed::Done(Ok(0)) => self.client.abort("connection closed by the next hop"),
                Timed::Done(Ok(_)) => match self.tls.as_deref_mut() {
                    None => {
                        let used = self.client.receive(&self.buf);
                        self.buf.advance(used);
                    }
                    Some(tls) => {
                        if let Err(why) = tls.open(&mut self.buf, &mut self.client) {
                            self.send_alert().await;
                            self.client.abort(&why);
                        }
                    }
                },
                Timed::Done(Err(e)) => self.client.abort(&format!("read failed: {e}")),
                Timed::TimedOut => self
                    .client
                    .abort("timeout waiting for the next hop's reply"),
            }
        }
    }

    /// Writes what the client wants sent: as it is, or through TLS (with what TLS itself
    /// has to send). On failure nothing more can be written.
    async fn flush(&mut self, timeout: Duration) -> Result<(), String> {
        loop {
            let more = match self.tls.as_deref_mut() {
                None => {
                    while let Some(chunk) = self.client.poll_transmit() {
                        self.chunks.push_back(chunk);
                    }
                    false
                }
                Some(tls) => tls.seal(&mut self.client, &mut self.chunks)?,
            };
            if !self.chunks.is_empty() {
                let write = self.stream.send_timed(&mut self.chunks, timeout).await;
                // After a failed write the rest is never sent: the client is aborted.
                self.chunks.clear();
                match write {
                    Timed::Done(Ok(())) => {}
                    Timed::Done(Err(e)) => return Err(format!("write failed: {e}")),
                    Timed::TimedOut => return Err("timeout writing to the next hop".into()),
                }
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// After a TLS error: sends what TLS has queued (its alert), briefly, best effort.
    async fn send_alert(&mut self) {
        let Some(tls) = self.tls.as_deref_mut() else {
            return;
        };
        tls.session.take_tls_output(&mut tls.out);
        if tls.out.is_empty() {
            return;
        }
        self.chunks.clear();
        self.chunks.push_back(tls.out.split().freeze());
        let _ = self
            .stream
            .send_timed(&mut self.chunks, ALERT_WRITE_TIMEOUT)
            .await;
        self.chunks.clear();
    }

    /// The TLS handshake after STARTTLS's `220`, within `limit`; then the client is told
    /// (it sends EHLO again, inside TLS). Bytes read before it are dropped (RFC 3207 §4.2;
    /// the client already discarded what it saw).
    async fn handshake(
        &mut self,
        config: Arc<ClientConfig>,
        server_name: &str,
        limit: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        self.buf.clear();
        let session = TlsSession::client(config, server_name).map_err(|e| e.to_string())?;
        self.tls = Some(Box::new(TlsLayer {
            session,
            plain: BytesMut::new(),
            out: BytesMut::new(),
        }));
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timeout during the TLS handshake".into());
            }
            self.flush(left).await?;
            let Some(tls) = self.tls.as_deref_mut() else {
                return Err("TLS layer lost".into());
            };
            if !tls.session.is_handshaking() {
                self.client.tls_established();
                return Ok(());
            }
            if self.buf.capacity() < 4096 {
                self.buf.reserve(4096);
            }
            let (read, buf) = self
                .stream
                .read_timed(std::mem::take(&mut self.buf), left)
                .await;
            self.buf = buf;
            match read {
                Timed::Done(Ok(0)) => {
                    return Err(
                        "the next hop closed the connection during the TLS handshake".into(),
                    )
                }
                Timed::Done(Ok(_)) => {
                    let received = tls.session.receive_tls(&self.buf);
                    self.buf.clear();
                    if let Err(e) = received {
                        self.send_alert().await;
                        let e = match e {
                            TlsError::Protocol(e) => e.to_string(),
                            other => other.to_string(),
                        };
                        return Err(format!("TLS handshake failed: {e}"));
                    }
                }
                Timed::Done(Err(e)) => {
                    return Err(format!("read failed during the TLS handshake: {e}"))
                }
                Timed::TimedOut => return Err("timeout during the TLS handshake".into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop<'a>(host: &'a str, level: TlsLevel) -> Hop<'a> {
        Hop {
            addr: "192.0.2.7:25".parse().unwrap(),
            host,
            level,
            auth: None,
            budget: None,
        }
    }

    #[test]
    fn verify_checks_the_host_name_or_the_address_of_a_literal() {
        assert_eq!(
            server_name(&hop("mx.example", TlsLevel::Verify)),
            "mx.example"
        );
        assert_eq!(
            server_name(&hop("192.0.2.7", TlsLevel::Verify)),
            "192.0.2.7"
        );
        assert_eq!(
            server_name(&hop("[192.0.2.7]", TlsLevel::Verify)),
            "192.0.2.7"
        );
    }

    #[test]
    fn connections_are_shared_only_when_asked_the_same() {
        let credentials = Arc::new(Credentials::new("u", "p"));
        let plain = Key::of(&hop("mx.example", TlsLevel::None));
        let may = Key::of(&hop("mx.example", TlsLevel::May));
        let may_other_name = Key::of(&hop("mx2.example", TlsLevel::May));
        let verify = Key::of(&hop("mx.example", TlsLevel::Verify));
        let verify_other_name = Key::of(&hop("mx2.example", TlsLevel::Verify));
        let authenticated = Key::of(&Hop {
            auth: Some(&credentials),
            ..hop("mx.example", TlsLevel::May)
        });
        assert_ne!(plain, may);
        assert_eq!(may, may_other_name, "the name matters only at verify");
        assert_ne!(verify, verify_other_name);
        assert_ne!(may, authenticated);
    }

    #[test]
    fn resumption_caches_are_per_config_and_on() {
        let configs = TlsConfigs::new(None);
        let opportunistic = configs.for_level(TlsLevel::May).unwrap().unwrap();
        let encrypt = configs.for_level(TlsLevel::Encrypt).unwrap().unwrap();
        let verify = configs.for_level(TlsLevel::Verify).unwrap().unwrap();
        assert!(Arc::ptr_eq(&opportunistic, &encrypt));
        assert!(!Arc::ptr_eq(&opportunistic, &verify));
        assert!(configs.for_level(TlsLevel::None).unwrap().is_none());
        // Another shard's configs are other objects, with their own caches.
        let other = TlsConfigs::new(None);
        let other = other.for_level(TlsLevel::May).unwrap().unwrap();
        assert!(!Arc::ptr_eq(&opportunistic, &other));
        assert!(format!("{:?}", opportunistic.resumption).contains("SessionIdOrTickets"));
    }

    #[test]
    fn an_unreadable_ca_file_defers_verify_only() {
        let configs = TlsConfigs::new(Some(std::path::Path::new("/nonexistent/ca.pem")));
        assert!(configs.for_level(TlsLevel::May).unwrap().is_some());
        let why = configs.for_level(TlsLevel::Verify).unwrap_err();
        assert!(why.contains("/nonexistent/ca.pem"), "{why}");
    }
}
