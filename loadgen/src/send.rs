//! `loadgen send`: the load plan (closed loop, or an open-loop schedule that measures from each
//! message's intended start), the connection workers that survive resets and refusals by
//! reconnecting, connection set-up (greeting, EHLO, STARTTLS, AUTH), sender threads, the
//! progress bar and the final report.

use crate::cli::SendArgs;
use crate::manifest::ManifestWriter;
use crate::message::{rfc5322_date, MessageBuilder, MessageSpec, MsgId};
use crate::report::{ManifestInfo, Schedule, SendConfigReport, SendReport, SendStats};
use crate::smtp_client::{auth_plain_blob, ClientError, RcptTally, SmtpClient, TxnResult};
use crate::source::Sources;
use crate::Failure;
use std::cell::RefCell;
use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Default message count when neither --messages nor --duration is given.
const DEFAULT_MESSAGES: u64 = 1000;

/// One message to send: its sequence number and, in open loop, when it is due.
type Ticket = (u64, Option<Instant>);

/// How a connection slot's first attempt ended; the run fails at once only when every slot's
/// first attempt failed.
enum First {
    Connected,
    Failed(String),
    /// The slot ended without trying: no message was left for it.
    NotTried,
}

/// The work to do, shared by every connection: a ticket counter handing out sequence
/// numbers, and for open loop the schedule each ticket's intended start comes from.
struct Plan {
    limit: u64,
    deadline: Option<Instant>,
    t0: Instant,
    rate: Option<f64>,
    next: AtomicU64,
    started: AtomicU64,
    /// Tickets handed back by connections that could not open; claimed before new ones, so
    /// a refused connection never strands its message.
    returned: Mutex<Vec<Ticket>>,
    returned_n: AtomicUsize,
    stop: AtomicBool,
    signalled: AtomicBool,
    fatal: Mutex<Option<String>>,
    ever_connected: AtomicBool,
    /// Connection slots whose first attempt has not ended yet.
    first_pending: AtomicUsize,
    /// The latest first-attempt failure, reported if every first attempt fails.
    first_failure: Mutex<Option<String>>,
    /// Milliseconds after `t0` of the last sign of life: a connection got through or a
    /// message got a reply. Reconnecting gives up only after `--give-up-after` without one.
    alive_ms: AtomicU64,
    // Live counters for the progress bar only; the report uses per-thread stats.
    sent: AtomicU64,
    accepted: AtomicU64,
    errors: AtomicU64,
}

impl Plan {
    fn new(
        limit: u64,
        t0: Instant,
        deadline: Option<Instant>,
        rate: Option<f64>,
        slots: usize,
    ) -> Plan {
        Plan {
            limit,
            deadline,
            t0,
            rate,
            next: AtomicU64::new(0),
            started: AtomicU64::new(0),
            returned: Mutex::new(Vec::new()),
            returned_n: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            signalled: AtomicBool::new(false),
            fatal: Mutex::new(None),
            ever_connected: AtomicBool::new(false),
            first_pending: AtomicUsize::new(slots),
            first_failure: Mutex::new(None),
            alive_ms: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Hands out the next message: its sequence number and, in open loop, when it should
    /// start. `None` once the run is over.
    fn claim(&self) -> Option<Ticket> {
        if self.stopping() {
            return None;
        }
        if self.returned_n.load(Relaxed) > 0 {
            let mut r = self.returned.lock().unwrap_or_else(|e| e.into_inner());
            // The earliest first: in open loop it is the most overdue.
            let oldest = (0..r.len()).min_by_key(|&i| r[i].0);
            if let Some(i) = oldest {
                let t = r.swap_remove(i);
                self.returned_n.store(r.len(), Relaxed);
                self.started.fetch_add(1, Relaxed);
                return Some(t);
            }
        }
        let i = self.next.fetch_add(1, Relaxed);
        if i >= self.limit {
            return None;
        }
        let at = self
            .rate
            .map(|r| self.t0 + Duration::from_secs_f64(i as f64 / r));
        self.started.fetch_add(1, Relaxed);
        Some((i, at))
    }

    /// Returns a claimed message that could not be started, for any connection to take.
    fn give_back(&self, t: Ticket) {
        let mut r = self.returned.lock().unwrap_or_else(|e| e.into_inner());
        r.push(t);
        self.returned_n.store(r.len(), Relaxed);
        self.started.fetch_sub(1, Relaxed);
    }

    fn alive(&self) {
        let ms = self.t0.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        self.alive_ms.store(ms, Relaxed);
    }

    /// A connection got through (greeting, EHLO and whatever else setup asks for).
    fn connected(&self) {
        self.ever_connected.store(true, SeqCst);
        self.alive();
    }

    /// Ends one slot's first attempt. When the last one ends and none got through, nothing
    /// can: fail at once with the last failure, rather than retrying for `--give-up-after`.
    fn first_attempt_over(&self, how: First) {
        if let First::Failed(why) = how {
            *self.first_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
        if self.first_pending.fetch_sub(1, SeqCst) == 1 && !self.ever_connected.load(SeqCst) {
            let why = self
                .first_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(why) = why {
                self.fail(why);
            }
        }
    }

    /// When the last sign of life from the target was (see `alive_ms`).
    fn last_alive(&self) -> Instant {
        self.t0 + Duration::from_millis(self.alive_ms.load(Relaxed))
    }

    fn fail(&self, msg: String) {
        let mut f = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(msg);
        self.stop.store(true, Relaxed);
    }
}

/// Per-run settings every connection reads.
struct Cfg {
    addr: SocketAddr,
    target: String,
    helo: String,
    timeout: Duration,
    give_up: Duration,
    pipelining: bool,
    new_conn: bool,
    spec: MessageSpec,
    /// `--starttls`: how to connect and the name to expect in the certificate.
    tls: Option<(TlsConnector, rustls::pki_types::ServerName<'static>)>,
    /// `--auth`: the AUTH PLAIN initial response.
    auth: Option<String>,
    /// `--source-addr`/`--source-range`: the local addresses to connect from.
    source: Option<Sources>,
}

fn count_error(s: &mut SendStats, e: &ClientError) {
    match e {
        ClientError::Io(_) => s.errors.io += 1,
        ClientError::Closed => s.errors.closed += 1,
        ClientError::Protocol(_) => s.errors.protocol += 1,
        ClientError::Timeout => s.errors.timeout += 1,
    }
}

/// Sleeps for `d` but wakes early when the run stops.
async fn nap(plan: &Plan, d: Duration) {
    let end = Instant::now() + d;
    while !plan.stopping() {
        let now = Instant::now();
        if now >= end {
            return;
        }
        tokio::time::sleep((end - now).min(Duration::from_millis(50))).await;
    }
}

/// Back-off between attempts to open a connection: doubles from the first value to the
/// last, with ±25% jitter so that refused connections do not come back in step.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_millis(500));

/// Why a connection could not be opened.
struct OpenFailure {
    /// The key it is counted under in the report: the stage and the server's reply text, or
    /// the local error (`greeting 421 4.7.0 relay.test Error: too many connections`).
    reason: String,
    /// One line for stderr if this failure ends the run.
    message: String,
}

/// Where opening a connection got to: names a failure and picks the counter it goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Greeting,
    Hello,
    StartTls,
    Handshake,
    HelloTls,
    Auth,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Greeting => "greeting",
            Stage::Hello => "EHLO/HELO",
            Stage::StartTls => "STARTTLS",
            Stage::Handshake => "TLS handshake",
            Stage::HelloTls => "EHLO/HELO after STARTTLS",
            Stage::Auth => "AUTH",
        }
    }
}

/// A connection ready for transactions: plain, or inside TLS after STARTTLS.
enum Opened {
    Plain(SmtpClient<TcpStream>),
    Tls(Box<SmtpClient<TlsStream<TcpStream>>>),
}

/// Opens a connection and gets it to the point where a transaction can start.
async fn open(cfg: &Cfg, stats: &RefCell<SendStats>) -> Result<Opened, OpenFailure> {
    let t = Instant::now();
    // Plain and STARTTLS connections alike start here, from the next source address if any.
    let local = cfg.source.as_ref().map(Sources::next);
    let stream = match timeout(cfg.timeout, crate::source::connect(cfg.addr, local)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_string()),
    };
    let stream = stream.map_err(|e| {
        stats.borrow_mut().errors.connect += 1;
        let from = local.map(|ip| format!(" from {ip}")).unwrap_or_default();
        OpenFailure {
            reason: format!("connect: {e}"),
            message: format!("cannot connect to {}{from}: {e}", cfg.target),
        }
    })?;
    let connected = Instant::now();
    {
        let mut s = stats.borrow_mut();
        s.connect.record(connected - t);
        s.conns_opened += 1;
    }
    let _ = stream.set_nodelay(true);
    let mut stage = Stage::Greeting;
    let r = timeout(
        cfg.timeout,
        setup(cfg, stats, SmtpClient::new(stream), connected, &mut stage),
    )
    .await;
    let reason = match r {
        Ok(Ok(c)) => return Ok(c),
        Ok(Err(why)) => why,
        Err(_) => format!("{}: timed out", stage.name()),
    };
    let mut s = stats.borrow_mut();
    match stage {
        Stage::Greeting | Stage::Hello | Stage::HelloTls => s.errors.greeting += 1,
        Stage::StartTls => s.errors.tls += 1,
        Stage::Handshake => {
            s.errors.tls += 1;
            s.tls_failures += 1;
        }
        Stage::Auth => {
            s.errors.auth += 1;
            s.auth_failed += 1;
        }
    }
    Err(OpenFailure {
        message: format!("{}: {reason}", cfg.target),
        reason,
    })
}

/// Greeting, EHLO, and with the options STARTTLS, the handshake, EHLO again and AUTH. An
/// error is the reason in the server's words; `stage` says how far it got.
async fn setup(
    cfg: &Cfg,
    stats: &RefCell<SendStats>,
    mut c: SmtpClient<TcpStream>,
    connected: Instant,
    stage: &mut Stage,
) -> Result<Opened, String> {
    let (g, text) = c
        .greeting()
        .await
        .map_err(|e| format!("{}: {e}", Stage::Greeting.name()))?;
    stats.borrow_mut().banner.record(connected.elapsed());
    if g != 220 {
        return Err(format!("greeting {g} {text}"));
    }
    *stage = Stage::Hello;
    let (h, text) = c
        .hello(&cfg.helo)
        .await
        .map_err(|e| format!("{}: {e}", Stage::Hello.name()))?;
    if !(200..300).contains(&h) {
        return Err(format!("EHLO/HELO {h} {text}"));
    }
    let Some((connector, name)) = &cfg.tls else {
        if let Some(blob) = &cfg.auth {
            *stage = Stage::Auth;
            authenticate(&mut c, blob, stats).await?;
        }
        return Ok(Opened::Plain(c));
    };
    *stage = Stage::StartTls;
    if !c.starttls {
        let server = text.split(' ').next().unwrap_or_default();
        return Err(format!("STARTTLS not offered in EHLO by {server}"));
    }
    let (code, text) = c
        .starttls_command()
        .await
        .map_err(|e| format!("{}: {e}", Stage::StartTls.name()))?;
    if code != 220 {
        return Err(format!("STARTTLS {code} {text}"));
    }
    *stage = Stage::Handshake;
    let t = Instant::now();
    let stream = connector
        .connect(name.clone(), c.into_stream())
        .await
        .map_err(|e| format!("{}: {e}", Stage::Handshake.name()))?;
    {
        let mut s = stats.borrow_mut();
        s.tls_sessions += 1;
        s.tls_handshake.record(t.elapsed());
    }
    let mut c = SmtpClient::new(stream);
    *stage = Stage::HelloTls;
    let (h, text) = c
        .hello(&cfg.helo)
        .await
        .map_err(|e| format!("{}: {e}", Stage::HelloTls.name()))?;
    if !(200..300).contains(&h) {
        return Err(format!("EHLO/HELO after STARTTLS {h} {text}"));
    }
    if let Some(blob) = &cfg.auth {
        *stage = Stage::Auth;
        authenticate(&mut c, blob, stats).await?;
    }
    Ok(Opened::Tls(Box::new(c)))
}

async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut SmtpClient<S>,
    blob: &str,
    stats: &RefCell<SendStats>,
) -> Result<(), String> {
    let (code, text) = c
        .auth_plain(blob)
        .await
        .map_err(|e| format!("{}: {e}", Stage::Auth.name()))?;
    if code != 235 {
        return Err(format!("AUTH {code} {text}"));
    }
    stats.borrow_mut().auth_ok += 1;
    Ok(())
}

/// What one connection slot keeps across its connections.
struct Slot {
    plan: Arc<Plan>,
    cfg: Arc<Cfg>,
    manifest: Option<Arc<ManifestWriter>>,
    stats: Rc<RefCell<SendStats>>,
    mb: MessageBuilder,
    /// The wire form of the message being sent, reused from message to message.
    msg: Vec<u8>,
}

/// How a connection's run of messages ended.
enum Next {
    /// The connection is gone or was closed on purpose; open another.
    Reconnect,
    /// No more messages: the slot is done.
    Done,
}

/// One connection slot: connects, sends message after message, reconnects after errors,
/// until the plan runs out. Connections that cannot be opened (refused, 421 at the greeting)
/// are counted with their reason, hand their message back and try again after a short
/// back-off; the run fails only when nothing gets through.
async fn connection(
    idx: usize,
    plan: Arc<Plan>,
    cfg: Arc<Cfg>,
    manifest: Option<Arc<ManifestWriter>>,
    stats: Rc<RefCell<SendStats>>,
) {
    let seed = cfg.spec.run ^ (idx as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut slot = Slot {
        mb: MessageBuilder::new(cfg.spec.clone(), seed),
        msg: Vec::with_capacity(cfg.spec.size.max + cfg.spec.size.max / 32 + 1024),
        plan,
        cfg,
        manifest,
        stats,
    };
    let (plan, cfg) = (slot.plan.clone(), slot.cfg.clone());
    let mut first = true;
    let mut failing_since: Option<Instant> = None;
    let mut backoff = BACKOFF.0;
    loop {
        // A message is claimed before its connection is opened, so no connection is ever
        // opened for a message that another connection has meanwhile taken (one connection
        // per message means exactly that). A failed open hands it back.
        let Some(ticket) = plan.claim() else {
            if first {
                plan.first_attempt_over(First::NotTried);
            }
            return;
        };
        let client = match open(&cfg, &slot.stats).await {
            Ok(c) => c,
            Err(f) => {
                plan.give_back(ticket);
                plan.errors.fetch_add(1, Relaxed);
                slot.stats.borrow_mut().conn_failure(&f.reason);
                if std::mem::take(&mut first) {
                    plan.first_attempt_over(First::Failed(f.message));
                } else {
                    // The target may be restarting, or refusing only some connections while
                    // others work: keep trying while anything shows signs of life.
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.max(plan.last_alive()).elapsed() >= cfg.give_up {
                        plan.fail(format!(
                            "giving up after {:.0} s of failures: {}",
                            cfg.give_up.as_secs_f64(),
                            f.message
                        ));
                        return;
                    }
                }
                let jitter = 0.75 + fastrand::f64() * 0.5;
                nap(&plan, backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(BACKOFF.1);
                continue;
            }
        };
        plan.connected();
        if std::mem::take(&mut first) {
            plan.first_attempt_over(First::Connected);
        }
        failing_since = None;
        backoff = BACKOFF.0;
        let next = match client {
            Opened::Plain(c) => messages(&mut slot, c, ticket).await,
            Opened::Tls(c) => messages(&mut slot, *c, ticket).await,
        };
        match next {
            Next::Reconnect => {}
            Next::Done => return,
        }
    }
}

/// Sends message after message on one open connection, starting with `ticket`.
async fn messages<S: AsyncRead + AsyncWrite + Unpin>(
    slot: &mut Slot,
    mut client: SmtpClient<S>,
    ticket: Ticket,
) -> Next {
    let (plan, cfg, stats) = (&*slot.plan, &*slot.cfg, &*slot.stats);
    let pipeline = cfg.pipelining && client.pipelining;
    if cfg.pipelining && !client.pipelining {
        stats.borrow_mut().conns_without_pipelining += 1;
    }
    let mut carried = Some(ticket);
    loop {
        let Some((seq, intended)) = carried.take().or_else(|| plan.claim()) else {
            client.quit().await;
            return Next::Done;
        };
        if let Some(at) = intended {
            tokio::time::sleep_until(at.into()).await;
        }
        let start = Instant::now();
        let built = slot.mb.build(seq, &mut slot.msg);
        {
            let mut s = stats.borrow_mut();
            s.sent += 1;
            if let Some(at) = intended {
                s.lag.record(start.saturating_duration_since(at));
            }
        }
        plan.sent.fetch_add(1, Relaxed);
        let mut tally = RcptTally::default();
        client.end_of_data_to_reply = None;
        let r = timeout(
            cfg.timeout,
            client.transaction(&slot.mb, seq, built, &slot.msg, pipeline, &mut tally),
        )
        .await
        .unwrap_or(Err(ClientError::Timeout));
        // Count under one short borrow; nothing below awaits while it is held.
        let (accepted, reconnect, failed) = {
            let mut s = stats.borrow_mut();
            s.rcpt_accepted += tally.accepted;
            s.rcpt_rejected += tally.rejected;
            match r {
                Ok(TxnResult::Accepted(code)) => {
                    // Latency counts from the intended start so a stall shows in full.
                    s.txn.record(intended.unwrap_or(start).elapsed());
                    if let Some(d) = client.end_of_data_to_reply {
                        s.end_of_data.record(d);
                    }
                    s.accepted += 1;
                    s.code(code);
                    s.bytes_accepted += built.size as u64;
                    (true, false, false)
                }
                Ok(TxnResult::Rejected { code, closing }) => {
                    if code >= 500 {
                        s.permfail += 1;
                    } else {
                        s.tempfail += 1;
                    }
                    s.code(code);
                    (false, closing, false)
                }
                Err(e) => {
                    s.failed += 1;
                    count_error(&mut s, &e);
                    // The connection is in an unknown state: drop it and start afresh.
                    (false, true, true)
                }
            }
        };
        if failed {
            plan.errors.fetch_add(1, Relaxed);
        } else {
            plan.alive();
        }
        if accepted {
            plan.accepted.fetch_add(1, Relaxed);
            if let Some(m) = &slot.manifest {
                let id = MsgId {
                    run: cfg.spec.run,
                    seq,
                };
                if let Err(e) = m.record(id) {
                    plan.fail(format!("cannot write manifest {}: {e}", m.path().display()));
                }
            }
        }
        if reconnect {
            return Next::Reconnect;
        }
        if cfg.new_conn {
            client.quit().await;
            return Next::Reconnect;
        }
    }
}

fn thread_main(
    slots: Vec<usize>,
    plan: Arc<Plan>,
    cfg: Arc<Cfg>,
    manifest: Option<Arc<ManifestWriter>>,
) -> SendStats {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            plan.fail(format!("cannot start runtime: {e}"));
            return SendStats::default();
        }
    };
    let stats = Rc::new(RefCell::new(SendStats::default()));
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let tasks: Vec<_> = slots
            .into_iter()
            .map(|i| {
                tokio::task::spawn_local(connection(
                    i,
                    plan.clone(),
                    cfg.clone(),
                    manifest.clone(),
                    stats.clone(),
                ))
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
    drop(local);
    let s = std::mem::take(&mut *stats.borrow_mut());
    s
}

fn random_run_id() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ u64::from(std::process::id()).rotate_left(32) ^ fastrand::u64(..);
    // splitmix64 finaliser: spreads nearby seeds over the whole range.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Live progress on a terminal; `None` when stderr is not one.
fn progress_bar(a: &SendArgs, limit: u64) -> Option<indicatif::ProgressBar> {
    if a.no_progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let (len, unit) = match a.duration {
        Some(d) if a.messages.is_none() => (d.ceil() as u64, "s"),
        _ => (limit, ""),
    };
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}}{unit} {{msg}}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    Some(bar)
}

pub fn run(a: SendArgs) -> Result<i32, Failure> {
    if !a.target.contains(':') {
        return Err(Failure::Usage(format!(
            "invalid --target '{}': expected HOST:PORT",
            a.target
        )));
    }
    let source = match (&a.source_addr, &a.source_range) {
        (Some(ip), _) => Some(Sources::single(ip).map_err(Failure::Usage)?),
        (None, Some(cidr)) => Some(Sources::range(cidr).map_err(Failure::Usage)?),
        (None, None) => None,
    };
    let mut addrs = a
        .target
        .to_socket_addrs()
        .map_err(|e| Failure::Runtime(format!("cannot resolve --target '{}': {e}", a.target)))?
        .peekable();
    if addrs.peek().is_none() {
        return Err(Failure::Runtime(format!(
            "cannot resolve --target '{}'",
            a.target
        )));
    }
    // With source addresses, the first target address of their family.
    let addr = match &source {
        None => addrs.next(),
        Some(s) => addrs.find(|t| t.is_ipv4() == s.is_ipv4()),
    }
    .ok_or_else(|| {
        let family = |v4| if v4 { "IPv4" } else { "IPv6" };
        let v4 = source.as_ref().is_some_and(Sources::is_ipv4);
        Failure::Usage(format!(
            "the source addresses are {} but --target '{}' has no {} address",
            family(v4),
            a.target,
            family(v4)
        ))
    })?;
    if let Some(s) = &source {
        s.check().map_err(Failure::Usage)?;
    }
    let domains: Vec<String> = a
        .domains
        .iter()
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect();
    if domains.is_empty() || domains.iter().any(|d| d.contains(['<', '>', ' ', '@'])) {
        return Err(Failure::Usage("--domain needs plain domain names".into()));
    }
    if a.from.contains(['<', '>', ' ', '\r', '\n']) || a.helo.contains(['\r', '\n', ' ']) {
        return Err(Failure::Usage(
            "--from/--helo contain invalid characters".into(),
        ));
    }
    let run = match &a.run_id {
        Some(h) => {
            if h.is_empty() || h.len() > 16 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(Failure::Usage("--run-id must be 1 to 16 hex digits".into()));
            }
            u64::from_str_radix(h, 16).map_err(|e| Failure::Usage(format!("--run-id: {e}")))?
        }
        None => random_run_id(),
    };
    let mut limit = a.messages.unwrap_or(if a.duration.is_some() {
        u64::MAX
    } else {
        DEFAULT_MESSAGES
    });
    if let (Some(r), Some(d)) = (a.rate, a.duration) {
        // The schedule only has the messages whose intended start falls inside the run.
        limit = limit.min((r * d).ceil().max(1.0) as u64);
    }
    let connections = usize::try_from(a.connections)
        .map_err(|_| Failure::Usage("--connections is too large".into()))?;
    let threads = (a.threads as usize).min(connections);
    let rcpts =
        usize::try_from(a.rcpts).map_err(|_| Failure::Usage("--rcpts is too large".into()))?;

    let auth = match &a.auth {
        Some(up) => {
            let (user, pass) = up
                .split_once(':')
                .filter(|(u, _)| !u.is_empty())
                .ok_or_else(|| Failure::Usage("--auth must be USER:PASS".into()))?;
            Some((user.to_string(), auth_plain_blob(user, pass)))
        }
        None => None,
    };
    let tls = if a.starttls {
        let config =
            crate::tls::client_config(a.tls_verify, a.tls_ca.as_deref()).map_err(Failure::Usage)?;
        let name = crate::tls::server_name(&a.target).map_err(Failure::Usage)?;
        Some((TlsConnector::from(config), name))
    } else {
        None
    };
    // Every output is checked (the manifest is even created) before the first connection, so
    // a mistyped path fails in a moment instead of after the whole load.
    if let Some(p) = &a.json {
        crate::check_writable("--json", p)?;
    }
    let manifest = match &a.manifest {
        Some(p) => Some(Arc::new(ManifestWriter::create(p, run).map_err(|e| {
            Failure::Runtime(format!("cannot write --manifest {}: {e}", p.display()))
        })?)),
        None => None,
    };
    let start_wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let cfg = Arc::new(Cfg {
        addr,
        target: a.target.clone(),
        helo: a.helo.clone(),
        timeout: Duration::from_secs_f64(a.timeout),
        give_up: Duration::from_secs_f64(a.give_up_after),
        pipelining: a.pipelining,
        new_conn: a.new_connection_per_message,
        tls,
        auth: auth.as_ref().map(|(_, blob)| blob.clone()),
        source,
        spec: MessageSpec {
            run,
            from: a.from.clone(),
            domains: domains.clone(),
            rcpts,
            size: a.size,
            date: rfc5322_date(start_wall),
        },
    });
    let t0 = Instant::now();
    let plan = Arc::new(Plan::new(
        limit,
        t0,
        a.duration.map(|d| t0 + Duration::from_secs_f64(d)),
        a.rate,
        connections,
    ));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Runtime(format!("cannot start runtime: {e}")))?;
    let (mut sigint, mut sigterm) = crate::termination_signals(&rt)?;

    let done = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for t in 0..threads {
        let slots: Vec<usize> = (t..connections).step_by(threads).collect();
        let (plan, cfg, manifest, done) =
            (plan.clone(), cfg.clone(), manifest.clone(), done.clone());
        let h = std::thread::Builder::new()
            .name(format!("send-{t}"))
            .spawn(move || {
                let s = thread_main(slots, plan, cfg, manifest);
                done.fetch_add(1, Relaxed);
                s
            })
            .map_err(|e| Failure::Runtime(format!("cannot start thread: {e}")))?;
        handles.push(h);
    }

    let bar = progress_bar(&a, limit);
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut last_flush = Instant::now();
        let mut window: std::collections::VecDeque<(Instant, u64)> = Default::default();
        while done.load(Relaxed) < threads {
            tokio::select! {
                _ = sigint.recv() => on_signal(&plan, manifest.as_deref()),
                _ = sigterm.recv() => on_signal(&plan, manifest.as_deref()),
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            if let Some(m) = &manifest {
                if now - last_flush >= Duration::from_secs(1) {
                    let _ = m.flush();
                    last_flush = now;
                }
            }
            if let Some(bar) = &bar {
                let acc = plan.accepted.load(Relaxed);
                window.push_back((now, acc));
                while window.len() > 2 && now - window[0].0 > Duration::from_secs(2) {
                    window.pop_front();
                }
                let (t_old, a_old) = window[0];
                let dt = (now - t_old).as_secs_f64();
                let rate = if dt > 0.0 {
                    (acc - a_old) as f64 / dt
                } else {
                    0.0
                };
                if a.duration.is_some() && a.messages.is_none() {
                    bar.set_position((now - t0).as_secs());
                } else {
                    bar.set_position(plan.sent.load(Relaxed));
                }
                bar.set_message(format!(
                    "{rate:.0} msg/s, {acc} accepted, {} errors",
                    plan.errors.load(Relaxed)
                ));
            }
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let mut stats = SendStats::default();
    for h in handles {
        match h.join() {
            Ok(s) => stats.merge(&s),
            Err(_) => plan.fail("a sender thread panicked".into()),
        }
    }
    let elapsed = t0.elapsed();
    if let Some(m) = &manifest {
        m.finish(stats.accepted).map_err(|e| {
            Failure::Runtime(format!("cannot write manifest {}: {e}", m.path().display()))
        })?;
    }
    let fatal = plan.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let stop_reason = if fatal.is_some() {
        "failed"
    } else if plan.signalled.load(Relaxed) {
        "signal"
    } else if plan.deadline.is_some_and(|d| Instant::now() >= d) && limit != stats.sent {
        "duration"
    } else {
        "complete"
    };
    let schedule = a.rate.map(|rate| {
        let started = plan.started.load(Relaxed).min(limit);
        let unstarted = limit.saturating_sub(started);
        Schedule {
            rate,
            scheduled: limit,
            started,
            unstarted,
            lag_us: stats.lag.summary(),
            behind_at_end_ms: crate::report::r3(unstarted as f64 / rate * 1000.0),
        }
    });
    let report = SendReport::build(
        &stats,
        format!("{run:016x}"),
        a.target.clone(),
        stop_reason.to_string(),
        SendConfigReport {
            connections,
            threads,
            messages: a.messages,
            duration_s: a.duration,
            rate: a.rate,
            size_min: a.size.min,
            size_max: a.size.max,
            rcpts,
            domains,
            pipelining: a.pipelining,
            new_connection_per_message: a.new_connection_per_message,
            starttls: a.starttls,
            tls_verify: a.tls_verify || a.tls_ca.is_some(),
            auth_user: auth.map(|(user, _)| user),
            source_addr: a.source_addr.clone(),
            source_range: a.source_range.clone(),
        },
        elapsed,
        schedule,
        manifest.as_ref().map(|m| ManifestInfo {
            file: m.path().display().to_string(),
            entries: stats.accepted,
        }),
    );
    if let Some(p) = &a.json {
        crate::write_json(p, &report)?;
    }
    if stats.sent > 0 || fatal.is_none() {
        print!("{}", report.human());
    }
    match fatal {
        Some(f) => Err(Failure::Runtime(f)),
        // Messages went out but not one got an answer: the target is not working, and a
        // script must not read that as success.
        None if stats.sent > 0 && stats.accepted + stats.tempfail + stats.permfail == 0 => {
            Err(Failure::Runtime(format!(
                "no message got a reply: all {} failed (connection or protocol errors)",
                stats.sent
            )))
        }
        // The run ended (deadline, signal) before any connection got through.
        None if stats.sent == 0 && !plan.ever_connected.load(SeqCst) => {
            let why = stats
                .conn_failures
                .iter()
                .max_by_key(|(_, &n)| n)
                .map_or("no connection was attempted".to_string(), |(r, _)| {
                    format!("no connection got through: {r}")
                });
            Err(Failure::Runtime(why))
        }
        None => Ok(0),
    }
}

/// First signal: stop starting messages and let those in flight finish. Second: leave now,
/// with the manifest flushed so that it still lists everything acknowledged.
fn on_signal(plan: &Plan, manifest: Option<&ManifestWriter>) {
    if plan.signalled.swap(true, Relaxed) {
        if let Some(m) = manifest {
            let _ = m.flush();
        }
        std::process::exit(130);
    }
    plan.stop.store(true, Relaxed);
}
