//! Store and forward: the handler `ringrelay serve` runs without `--sink`.
//!
//! Per shard, an accepted message is appended to the shard's spool and acknowledged only
//! after the group commit has synced it; it then waits in the shard's queue, and a delivery
//! worker hands it, recipients grouped by next hop, to pooled connections. Each recipient's
//! outcome is recorded: delivered, bounced (a 5xx, or too old: an RFC 3464 DSN goes to the
//! reverse path, spooled like any message, never for `<>`), or deferred for a retry.
//!
//! - [`route`]: static routes and the smarthost.
//! - [`resolve`]: MX routing over DNS, with a per-shard cache.
//! - [`pool`]: per-shard outbound connection pools.
//! - [`dsn`]: bounce messages.
//! - [`control`]: `ringrelay queue flush|remove` requests to a running server.

pub mod control;
pub mod dsn;
pub mod pool;
pub mod resolve;
pub mod route;

use std::cell::{Cell, RefCell};
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::config::Config;
use crate::id::{IdGenerator, QueueId};
use crate::server::Handler;
use crate::smtp::client::{ClientEvent, Outgoing, RcptOutcome as ClientOutcome};
use crate::smtp::command::BodyType;
use crate::smtp::{Envelope, Mailbox, Reply, ReversePath};
use crate::spool::commit::GroupCommit;
use crate::spool::lock::SpoolLock;
use crate::spool::queue::{retry_delay, Entry, Queue};
use crate::spool::record::{MessageRecord, RcptOutcome};
use crate::spool::store::{self, Recovered, SegmentId, ShardStore};
use pool::{Pool, PoolConfig};
use resolve::Target;
use route::Routes;

/// Deliveries a shard runs at once.
const MAX_IN_FLIGHT: usize = 256;
/// Ready messages whose content a shard keeps in memory.
const MAX_READY_IN_MEMORY: usize = 1024;

/// What the relay needs from the configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Our host name (EHLO, bounces).
    pub hostname: String,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// Routing table.
    pub routes: Routes,
    /// Seconds between attempts.
    pub retry_schedule: Vec<u64>,
    /// Give up (and bounce) after this long in the queue.
    pub max_queue_age: Duration,
    /// Outbound pools.
    pub pool: PoolConfig,
    /// MX routing.
    pub resolver: resolve::ResolverConfig,
}

impl RelayConfig {
    /// From the validated configuration.
    pub fn from_config(config: &Config) -> Self {
        let hostname = config.effective_hostname();
        RelayConfig {
            spool_dir: config.spool.dir.clone(),
            routes: Routes::from_config(&config.delivery),
            retry_schedule: config.delivery.retry_schedule_secs.clone(),
            max_queue_age: Duration::from_secs(config.delivery.max_queue_age_secs),
            pool: PoolConfig {
                helo: hostname.clone(),
                max_per_destination: config.delivery.max_connections_per_destination,
                idle_timeout: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(30),
                reply_timeout: Duration::from_secs(300),
            },
            resolver: resolve::ResolverConfig::from_config(config),
            hostname,
        }
    }
}

/// What recovery handed to one shard.
#[derive(Debug, Default)]
struct ShardInit {
    segments: Vec<(SegmentId, u64, usize)>,
    next_seq: u64,
    messages: Vec<Recovered>,
}

/// The spool's owner for the life of the server: holds the lock and the recovered state
/// until each shard takes its part.
pub struct RelayService {
    config: Arc<RelayConfig>,
    shards: Mutex<Vec<Option<ShardInit>>>,
    _lock: SpoolLock,
}

impl RelayService {
    /// Locks the spool, recovers it, and splits what is left to deliver over `shards`.
    pub fn open(config: RelayConfig, shards: usize) -> io::Result<Arc<RelayService>> {
        ignore_sigusr1();
        let lock = SpoolLock::acquire(&config.spool_dir)?;
        let shards = shards.max(1);
        control::prepare_shards(&config.spool_dir, shards)?;
        let report = store::recover(&config.spool_dir, true).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("spool {}: recovery failed: {e}", config.spool_dir.display()),
            )
        })?;
        let mut inits: Vec<ShardInit> = (0..shards).map(|_| ShardInit::default()).collect();
        let owner = |seg: SegmentId| seg.shard as usize % shards;
        for (i, init) in inits.iter_mut().enumerate() {
            init.next_seq = report.next_seq.get(&(i as u32)).copied().unwrap_or(0);
        }
        let n_messages = report.messages.len();
        for seg in &report.segments {
            inits[owner(seg.0)].segments.push(*seg);
        }
        for m in report.messages {
            inits[owner(m.location.segment)].messages.push(m);
        }
        tracing::info!(
            "spool {}: {n_messages} message(s) to deliver after recovery ({} torn tail(s) cut, {} corrupt region(s) set aside, {} finished segment(s) deleted)",
            config.spool_dir.display(),
            report.torn_tails,
            report.corrupt_regions,
            report.deleted
        );
        Ok(Arc::new(RelayService {
            config: Arc::new(config),
            shards: Mutex::new(inits.into_iter().map(Some).collect()),
            _lock: lock,
        }))
    }

    /// The handler for `shard`; call once per shard, on its thread, inside its runtime
    /// (it starts the shard's committer and delivery tasks).
    pub fn handler(&self, shard: usize) -> RelayHandler {
        let init = self
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(shard)
            .and_then(Option::take)
            .unwrap_or_default();
        RelayHandler::start(shard, Arc::clone(&self.config), init)
    }
}

/// One shard's relay state, shared by its sessions and its delivery tasks.
pub(crate) struct RelayShard {
    index: usize,
    config: Arc<RelayConfig>,
    store: Rc<RefCell<ShardStore>>,
    commit: Rc<GroupCommit>,
    queue: RefCell<Queue>,
    pool: Pool,
    /// MX routing; `None` if no resolver could be made (then such mail is deferred).
    resolver: Option<resolve::MxResolver>,
    /// Addresses of static routes and the smarthost given as host names.
    hops: route::HopCache,
    wake: Notify,
    in_flight: Cell<usize>,
    /// Shutting down: start no new deliveries.
    stopping: Cell<bool>,
    /// Signalled whenever a delivery ends (shutdown waits on it).
    delivered: Notify,
    /// IDs for bounces: a generator apart from the sessions' (shard number + 128, so the
    /// two never make the same ID).
    bounce_ids: RefCell<IdGenerator>,
}

/// The store-and-forward [`Handler`] of one shard.
pub struct RelayHandler {
    shard: Rc<RelayShard>,
}

impl RelayHandler {
    fn start(index: usize, config: Arc<RelayConfig>, init: ShardInit) -> RelayHandler {
        let store = match ShardStore::new(
            &config.spool_dir,
            index as u32,
            init.segments,
            init.next_seq,
        ) {
            Ok(s) => s,
            Err(e) => {
                // The recovered messages stay on disk and are found again at the next
                // start; new mail is still accepted into new segments.
                tracing::error!(
                    shard = index,
                    "cannot reopen recovered segments: {e}; their messages wait for a restart"
                );
                ShardStore::empty(&config.spool_dir, index as u32, init.next_seq)
            }
        };
        let recovered = if store.open_segments() > 0 {
            init.messages
        } else {
            Vec::new()
        };
        let store = Rc::new(RefCell::new(store));
        let commit = GroupCommit::new(Rc::clone(&store));
        let mut queue = Queue::default();
        for r in recovered {
            queue.push_ready(Entry {
                id: r.message.id,
                location: r.location,
                from: r.message.from,
                rcpts: r.message.rcpts,
                pending: r.pending,
                eight_bit: r.message.eight_bit,
                arrival: r.message.arrival,
                attempts: 0,
                data: None,
                last_error: None,
            });
        }
        let resolver = match resolve::MxResolver::new(config.resolver.clone()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(
                    shard = index,
                    "no DNS resolver: {e}; mail without a static route is deferred"
                );
                None
            }
        };
        let shard = Rc::new(RelayShard {
            index,
            resolver,
            pool: Pool::new(config.pool.clone()),
            hops: route::HopCache::new(config.resolver.timeout),
            config,
            store,
            commit: Rc::clone(&commit),
            queue: RefCell::new(queue),
            wake: Notify::new(),
            in_flight: Cell::new(0),
            stopping: Cell::new(false),
            delivered: Notify::new(),
            bounce_ids: RefCell::new(IdGenerator::new(index | 0x80)),
        });
        tokio::task::spawn_local(commit.run());
        tokio::task::spawn_local(worker(Rc::clone(&shard)));
        tokio::task::spawn_local(control::watch(Rc::clone(&shard)));
        RelayHandler { shard }
    }
}

impl Drop for RelayHandler {
    fn drop(&mut self) {
        let s = self.shard.commit.stats();
        if s.syncs > 0 {
            tracing::info!(
                shard = self.shard.index,
                "spool: {} message(s) made durable in {} sync(s) ({:.1} per sync, {:.0} µs each), \
                 {} failed sync(s), {} held open for a commit window ({:.1} ms in all)",
                s.messages,
                s.syncs,
                s.messages as f64 / s.syncs as f64,
                s.synced.as_secs_f64() * 1e6 / s.syncs as f64,
                s.failures,
                s.windows,
                s.waited.as_secs_f64() * 1e3
            );
        }
    }
}

impl Handler for RelayHandler {
    /// No new deliveries; those in flight finish and record their outcomes, so a restart
    /// does not deliver them again.
    async fn on_shutdown(&self) {
        let shard = &self.shard;
        shard.stopping.set(true);
        while shard.in_flight.get() > 0 {
            shard.delivered.notified().await;
        }
    }

    async fn on_message(&self, envelope: Envelope) -> Result<(), Reply> {
        let shard = &self.shard;
        let arrival = SystemTime::now();
        let eight_bit = envelope.body_type == BodyType::EightBitMime;
        let appended = shard.store.borrow_mut().append_message(&MessageRecord {
            id: envelope.id,
            arrival,
            from: &envelope.from,
            rcpts: &envelope.to,
            eight_bit,
            data: &envelope.data,
        });
        let location = appended.map_err(|e| {
            tracing::warn!(
                shard = shard.index,
                "spool write failed: {e}; answering 451"
            );
            Reply::local_error("cannot write to the spool; try again later")
        })?;
        if let Err(e) = shard.commit.durable().await {
            tracing::warn!(shard = shard.index, "{e}; answering 451");
            // Withdraw it: the client was not told 250, so a later recovery must not
            // deliver it behind the client's back.
            let _ = shard
                .store
                .borrow_mut()
                .finish_message(&location, envelope.id, true);
            return Err(Reply::local_error("cannot sync the spool; try again later"));
        }
        let pending = (0..envelope.to.len() as u32).collect();
        // A long ready queue (a slow next hop) must not pin every message in memory: past
        // this many, content is read back from the spool when its turn comes.
        let keep_in_memory = shard.queue.borrow().ready_len() < MAX_READY_IN_MEMORY;
        shard.queue.borrow_mut().push_ready(Entry {
            id: envelope.id,
            location,
            from: envelope.from,
            rcpts: envelope.to,
            pending,
            eight_bit,
            arrival,
            attempts: 0,
            data: keep_in_memory.then_some(envelope.data),
            last_error: None,
        });
        shard.wake.notify_one();
        Ok(())
    }
}

/// Starts deliveries as messages become due, and tidies the pool.
async fn worker(shard: Rc<RelayShard>) {
    let far = Duration::from_secs(3600);
    // Once a second: close idle outbound connections, let go of an empty segment.
    let mut tidy = tokio::time::interval(Duration::from_secs(1));
    loop {
        let next_due = shard.queue.borrow_mut().promote_due(Instant::now());
        while shard.in_flight.get() < MAX_IN_FLIGHT && !shard.stopping.get() {
            let Some(entry) = shard.queue.borrow_mut().pop_ready() else {
                break;
            };
            shard.in_flight.set(shard.in_flight.get() + 1);
            tokio::task::spawn_local(deliver(Rc::clone(&shard), entry));
        }
        let sleep_until = next_due.unwrap_or_else(|| Instant::now() + far);
        tokio::select! {
            _ = shard.wake.notified() => {}
            _ = tokio::time::sleep_until(sleep_until.into()) => {}
            _ = tidy.tick() => {
                shard.pool.close_idle();
                shard.store.borrow_mut().release_idle_current();
            }
        }
    }
}

/// A recipient that failed for good, for the bounce.
struct Failure {
    index: u32,
    reply: Reply,
    remote_mta: Option<String>,
    /// Why, for the bounce's human-readable part.
    reason: String,
}

async fn deliver(shard: Rc<RelayShard>, entry: Entry) {
    attempt(&shard, entry).await;
    shard.in_flight.set(shard.in_flight.get().saturating_sub(1));
    shard.wake.notify_one();
    shard.delivered.notify_one();
}

/// One delivery attempt of one message: every pending recipient is delivered, deferred or
/// failed, and the outcome recorded.
async fn attempt(shard: &RelayShard, mut entry: Entry) {
    let data = match entry.data.take() {
        Some(d) => d,
        None => match shard.store.borrow().read_message(&entry.location) {
            Ok(m) => m.data,
            Err(e) => {
                tracing::error!(id = %entry.id, "cannot read the message back from the spool: {e}");
                entry.last_error = Some(format!("spool read failed: {e}"));
                return reschedule(shard, entry);
            }
        },
    };
    // One transaction per recipient domain (RFC 5321 §5: the domain decides the route).
    let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
    for &i in &entry.pending {
        let Some(rcpt) = entry.rcpts.get(i as usize) else {
            continue;
        };
        let domain = rcpt.domain().to_ascii_lowercase();
        match groups.iter_mut().find(|(d, _)| *d == domain) {
            Some((_, list)) => list.push(i),
            None => groups.push((domain, vec![i])),
        }
    }
    let mut still_pending: Vec<u32> = Vec::new();
    let mut last_error: Option<String> = None;
    let mut failed: Vec<Failure> = Vec::new();
    for (domain, indexes) in groups {
        let targets = match plan(shard, &domain).await {
            Plan::Targets(t) => t,
            Plan::Fail(reply) => {
                let reason = format!("its domain cannot receive mail ({})", one_line(&reply));
                failed.extend(indexes.iter().map(|&index| Failure {
                    index,
                    reply: reply.clone(),
                    remote_mta: None,
                    reason: reason.clone(),
                }));
                continue;
            }
            Plan::Defer(reply) => {
                still_pending.extend(&indexes);
                last_error = Some(reply.to_string());
                continue;
            }
        };
        let rcpts: Vec<Mailbox> = indexes
            .iter()
            .filter_map(|&i| entry.rcpts.get(i as usize).cloned())
            .collect();
        let outgoing = Outgoing {
            from: entry.from.clone(),
            rcpts,
            data: data.clone(),
            eight_bit: entry.eight_bit,
        };
        let (host, outcomes) = deliver_to_targets(shard, &targets, outgoing).await;
        for (k, outcome) in outcomes.into_iter().enumerate() {
            let Some(&index) = indexes.get(k) else { break };
            match outcome {
                ClientOutcome::Delivered(_) => {
                    record(shard, &entry, index, RcptOutcome::Delivered);
                }
                ClientOutcome::Deferred(reply) => {
                    still_pending.push(index);
                    last_error = Some(format!("{host}: {}", one_line(&reply)));
                }
                ClientOutcome::Failed(reply) => failed.push(Failure {
                    index,
                    reply,
                    // RFC 3464 `Remote-MTA: dns; …` wants a name; an address goes in brackets.
                    remote_mta: Some(if host.parse::<std::net::IpAddr>().is_ok() {
                        format!("[{host}]")
                    } else {
                        host.clone()
                    }),
                    reason: "the next hop refused it".into(),
                }),
            }
        }
    }
    // Too old: what is still pending fails for good.
    let age = SystemTime::now()
        .duration_since(entry.arrival)
        .unwrap_or_default();
    if !still_pending.is_empty() && age >= shard.config.max_queue_age {
        let why = last_error
            .clone()
            .unwrap_or_else(|| "no delivery attempt succeeded".into());
        for index in still_pending.drain(..) {
            let reply = Reply::new(
                451,
                format!(
                    "4.4.7 gave up after {} s in the queue: {why}",
                    age.as_secs()
                ),
            );
            failed.push(Failure {
                index,
                reason: format!("it could not be delivered in time ({})", one_line(&reply)),
                reply,
                remote_mta: None,
            });
        }
    }
    if !failed.is_empty() {
        if bounce(shard, &entry, &data, &failed).await {
            for f in &failed {
                record(shard, &entry, f.index, RcptOutcome::Bounced);
            }
        } else {
            // The bounce could not be spooled: keep the recipients, try again later.
            still_pending.extend(failed.iter().map(|f| f.index));
        }
    }
    entry.pending = still_pending;
    entry.last_error = last_error;
    if entry.pending.is_empty() {
        if let Err(e) = shard
            .store
            .borrow_mut()
            .finish_message(&entry.location, entry.id, false)
        {
            tracing::warn!(id = %entry.id, "cannot record completion: {e}");
        }
    } else {
        entry.data = Some(data);
        reschedule(shard, entry);
    }
}

fn reschedule(shard: &RelayShard, mut entry: Entry) {
    entry.attempts += 1;
    let delay = retry_delay(&shard.config.retry_schedule, entry.attempts);
    tracing::debug!(
        id = %entry.id,
        "deferred for {} s: {}",
        delay.as_secs(),
        entry.last_error.as_deref().unwrap_or("")
    );
    shard
        .queue
        .borrow_mut()
        .defer(entry, Instant::now() + delay);
}

fn record(shard: &RelayShard, entry: &Entry, index: u32, outcome: RcptOutcome) {
    if let Err(e) =
        shard
            .store
            .borrow_mut()
            .record_recipient(&entry.location, entry.id, index, outcome)
    {
        tracing::warn!(id = %entry.id, "cannot record a recipient's outcome: {e}");
    }
}

/// Where a domain's mail goes on this attempt.
enum Plan {
    /// Addresses to try, in order.
    Targets(Vec<Target>),
    /// Fails for good (bounce) with this reply.
    Fail(Reply),
    /// Try again later, with this reason.
    Defer(Reply),
}

/// Most addresses tried for one domain in one attempt (Postfix's smtp_mx_address_limit).
const MAX_ADDRESSES_PER_ATTEMPT: usize = 5;

/// The route for `domain`: a static route or the smarthost wins; otherwise its MX hosts
/// (or implicit MX, or the address literal) from this shard's resolver.
async fn plan(shard: &RelayShard, domain: &str) -> Plan {
    if let Some(hop) = shard.config.routes.next_hop(domain) {
        return match shard.hops.addresses(hop, Instant::now()).await {
            Ok(addrs) if !addrs.is_empty() => Plan::Targets(
                addrs
                    .into_iter()
                    .map(|addr| Target {
                        host: hop.host().to_string(),
                        preference: 0,
                        addr,
                    })
                    .collect(),
            ),
            Ok(_) => Plan::Defer(Reply::new(
                451,
                format!("4.4.3 next hop {hop} has no address"),
            )),
            Err(e) => Plan::Defer(Reply::new(
                451,
                format!("4.4.3 cannot resolve next hop {hop}: {e}"),
            )),
        };
    }
    let Some(resolver) = &shard.resolver else {
        return Plan::Defer(Reply::new(
            451,
            format!(
                "4.4.3 no route to {domain}: no static route, no smarthost, and no DNS resolver"
            ),
        ));
    };
    match resolver.resolve(domain).await {
        resolve::Resolution::Deliver(targets) => Plan::Targets(targets),
        resolve::Resolution::Bounce(reply) => Plan::Fail(reply),
        resolve::Resolution::Defer(reply) => Plan::Defer(reply),
    }
}

/// Tries the targets in order until one takes the transaction: connection failures and
/// refused greetings move on to the next address (at least two are tried when there are
/// two). Returns the host that answered (or the last one tried) and one outcome per
/// recipient.
async fn deliver_to_targets(
    shard: &RelayShard,
    targets: &[Target],
    outgoing: Outgoing,
) -> (String, Vec<ClientOutcome>) {
    let n = outgoing.rcpts.len();
    let deferred = |why: &str| -> Vec<ClientOutcome> {
        (0..n)
            .map(|_| ClientOutcome::Deferred(Reply::new(451, format!("4.4.1 {why}"))))
            .collect()
    };
    let mut last = ("(none)".to_string(), "no address to deliver to".to_string());
    for target in targets.iter().take(MAX_ADDRESSES_PER_ATTEMPT) {
        let mut conn = match shard.pool.checkout(target.addr).await {
            Ok(c) => c,
            Err(why) => {
                last = (target.host.clone(), why);
                continue;
            }
        };
        if let Err(outgoing) = conn.client.start(outgoing) {
            shard.pool.checkin(target.addr, conn);
            let _ = outgoing;
            return (target.host.clone(), deferred("connection was not ready"));
        }
        let timeout = shard.pool.reply_timeout();
        let outcomes = loop {
            match conn.run_until_event(timeout).await {
                ClientEvent::Delivered(d) => break d.outcomes,
                ClientEvent::Closed { reason } => break deferred(&reason),
                ClientEvent::Ready => continue,
            }
        };
        shard.pool.checkin(target.addr, conn);
        return (target.host.clone(), outcomes);
    }
    let (host, why) = last;
    (host, deferred(&why))
}

/// A reply on one line (multi-line replies joined), for logs and `last_error`.
fn one_line(reply: &Reply) -> String {
    format!("{} {}", reply.code(), reply.lines().join(" "))
}

/// Spools a bounce for the failed recipients (none for a `<>` sender). True when there is
/// nothing more to do for them.
async fn bounce(shard: &RelayShard, entry: &Entry, data: &Bytes, failed: &[Failure]) -> bool {
    let ReversePath::Mailbox(sender) = &entry.from else {
        tracing::info!(id = %entry.id, "not bouncing a message from <>: {} recipient(s) failed", failed.len());
        return true;
    };
    let id = shard.bounce_ids.borrow_mut().next_id();
    let failed_rcpts: Vec<dsn::FailedRecipient> = failed
        .iter()
        .filter_map(|f| {
            let recipient = entry.rcpts.get(f.index as usize)?.clone();
            Some(dsn::FailedRecipient {
                recipient,
                status: enhanced_status(&f.reply),
                reason: f.reason.clone(),
                // Diagnostic-Code is for a remote server's answer, not for our give-up.
                remote_reply: f.remote_mta.is_some().then(|| f.reply.clone()),
                remote_mta: f.remote_mta.clone(),
            })
        })
        .collect();
    let unique = id.to_string();
    let message = dsn::build_bounce(&dsn::BounceInput {
        reporting_mta: &shard.config.hostname,
        original_id: entry.id,
        to: sender,
        arrival: entry.arrival,
        now: SystemTime::now(),
        failed: &failed_rcpts,
        original: data,
        unique: &unique,
    });
    let arrival = SystemTime::now();
    let rcpts = vec![sender.clone()];
    let appended = shard.store.borrow_mut().append_message(&MessageRecord {
        id,
        arrival,
        from: &ReversePath::Null,
        rcpts: &rcpts,
        eight_bit: false,
        data: &message,
    });
    let location = match appended {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(id = %entry.id, "cannot spool a bounce: {e}");
            return false;
        }
    };
    if let Err(e) = shard.commit.durable().await {
        tracing::warn!(id = %entry.id, "cannot sync a bounce: {e}");
        let _ = shard.store.borrow_mut().finish_message(&location, id, true);
        return false;
    }
    tracing::info!(id = %entry.id, bounce = %id, "bounced {} recipient(s) to <{sender}>", failed.len());
    shard.queue.borrow_mut().push_ready(Entry {
        id,
        location,
        from: ReversePath::Null,
        rcpts,
        pending: vec![0],
        eight_bit: false,
        arrival,
        attempts: 0,
        data: Some(message),
        last_error: None,
    });
    true
}

/// The enhanced status code at the start of a reply's text, or one derived from its code.
fn enhanced_status(reply: &Reply) -> String {
    let text = reply.lines().first().map(String::as_str).unwrap_or("");
    let first = text.split(' ').next().unwrap_or("");
    let parts: Vec<&str> = first.split('.').collect();
    let valid = parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    if valid && reply.code() >= 500 {
        return first.to_string();
    }
    // A give-up after a 4xx history is still a permanent failure for the DSN.
    if reply.code() < 500 {
        return "4.4.7".into();
    }
    "5.0.0".into()
}

/// SIGUSR1 asks a running server to read its control requests; its default action would
/// kill the process, so it is ignored from before the lock is taken until each shard
/// listens for it.
fn ignore_sigusr1() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code; it is
    // process-wide and harmless to repeat.
    unsafe {
        libc::signal(libc::SIGUSR1, libc::SIG_IGN);
    }
}

/// Per-shard view for the control module.
impl RelayShard {
    fn flush(&self) -> usize {
        let n = self.queue.borrow_mut().flush();
        self.wake.notify_one();
        n
    }

    fn remove(&self, id: QueueId) -> bool {
        let Some(entry) = self.queue.borrow_mut().remove(id) else {
            return false;
        };
        let mut store = self.store.borrow_mut();
        for &i in &entry.pending {
            let _ = store.record_recipient(&entry.location, id, i, RcptOutcome::Removed);
        }
        let _ = store.finish_message(&entry.location, id, true);
        true
    }
}
