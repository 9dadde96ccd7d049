//! The queue manager (Postfix's qmgr): the relay's [`Handler`], which takes each accepted
//! message into the spool, and per shard the queue of what is to be delivered when, the
//! worker that starts deliveries, and the attempt that turns outcomes into spool records,
//! deferrals and bounces.
//!
//! A message moves forward only: [`RelayHandler::on_message`] → `Spool::accept` →
//! [`queue`] → [`worker`] → [`attempt`] → `Outbound` → `Spool::settle`.
//!
//! - [`queue`]: ready, deferred and held messages, retry times.
//! - [`worker`]: starts deliveries as messages fall due, tidies once a second.
//! - `stream`: large messages streamed into the spool while they arrive.
//! - [`attempt`]: one delivery attempt of one message: recipients grouped by domain, each
//!   outcome recorded, failures bounced (RFC 3464, spooled like any message).

pub mod attempt;
pub mod queue;
mod stream;
pub mod worker;

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

use crate::config::{AbSwitches, Config};
use crate::dkim::Signers;
use crate::handler::{BodySink, Handler};
use crate::id::{IdGenerator, QueueId};
use crate::observe::metrics::{Registry, Rejection, ShardMetrics};
use crate::outbound::{Outbound, OutboundConfig};
use crate::smtp::command::BodyType;
use crate::smtp::{Envelope, Mailbox, Reply};
use crate::spool::control::{self, Answer, Request};
use crate::spool::{AcceptError, DeliveryState, NewMessage, Queued, Spool, SpoolDir};
use queue::{Entry, HoldChange, Queue};

/// Ready messages whose content a shard keeps in memory.
const MAX_READY_IN_MEMORY: usize = 1024;
/// Largest message whose content waits in memory for its first attempt.
const MAX_KEPT_SIZE: usize = 64 << 10;

/// What the relay needs from the configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Our host name (bounces).
    pub hostname: String,
    /// Seconds between attempts.
    pub retry_schedule: Vec<u64>,
    /// Give up (and bounce) after this long in the queue.
    pub max_queue_age: Duration,
    /// Where double bounces go (`relay.postmaster`); `None` drops them, with a log line.
    pub postmaster: Option<Mailbox>,
    /// A message still pending this long gets one delay report for its recipients that
    /// asked with NOTIFY=DELAY (`relay.delay_warning_secs`); zero: never.
    pub delay_warning: Duration,
    /// Routes, pools and MX routing.
    pub outbound: OutboundConfig,
    /// The benches' A/B switches (the group commit's among them).
    pub ab: AbSwitches,
    /// This node's number, in the queue IDs of bounces.
    pub node_id: u16,
    /// Below this much free space on the spool's disk, MAIL is refused (452 4.3.1).
    pub min_free_bytes: u64,
    /// Past this many queued messages, MAIL is refused (452 4.3.1); 0 = no limit.
    pub max_queued_messages: u64,
    /// Where each shard counts (shard `i` uses `metrics.shard_at(i)`, as the server does).
    pub metrics: Registry,
    /// DKIM keys: mail from their domains is signed at accept.
    pub dkim: Arc<Signers>,
}

impl RelayConfig {
    /// From the validated configuration.
    pub fn from_config(config: &Config) -> Self {
        RelayConfig {
            hostname: config.effective_hostname(),
            retry_schedule: config.delivery.retry_schedule_secs.clone(),
            max_queue_age: Duration::from_secs(config.delivery.max_queue_age_secs),
            postmaster: config.postmaster().unwrap_or(None),
            delay_warning: Duration::from_secs(config.relay.delay_warning_secs),
            outbound: OutboundConfig::from_config(config),
            ab: config.ab,
            node_id: config.effective_node_id(),
            min_free_bytes: config.spool.min_free_bytes,
            max_queued_messages: config.spool.max_queued_messages,
            metrics: Registry::new(),
            dkim: Arc::new(load_dkim(config)),
        }
    }
}

/// The DKIM keys `config` names. `serve`, `check-config` and SIGHUP have checked them
/// already ([`Config::check_files`]); a key that went bad since (or was never checked by a
/// library user) is logged and signs nothing, and a reload keeps the keys in force.
fn load_dkim(config: &Config) -> Signers {
    Signers::load(&config.dkim).unwrap_or_else(|e| {
        tracing::error!("DKIM: {e}; no key loaded");
        Signers::default()
    })
}

/// The relay for the life of the server: the spool directory (locked, recovered) and the
/// configuration, until each shard takes its part.
pub struct RelayService {
    config: Arc<RelayConfig>,
    spool: SpoolDir,
}

impl RelayService {
    /// Locks the spool in `dir`, recovers it, and splits what is left to deliver over
    /// `shards`.
    pub fn open(
        config: RelayConfig,
        dir: &std::path::Path,
        shards: usize,
    ) -> io::Result<Arc<RelayService>> {
        ignore_sigusr1();
        let spool = SpoolDir::open(dir, shards)?;
        if !config.dkim.is_empty() {
            tracing::info!("DKIM signing: {}", config.dkim.describe().join(", "));
        }
        Ok(Arc::new(RelayService {
            config: Arc::new(config),
            spool,
        }))
    }

    /// The handler for `shard`; call once per shard, on its thread, inside its runtime
    /// (it starts the shard's committer, delivery and control tasks).
    pub fn handler(&self, shard: usize) -> RelayHandler {
        let (spool, recovered) =
            self.spool
                .shard(shard, self.config.ab, self.config.metrics.shard_at(shard));
        let mut queue = Queue::default();
        for (msg, state) in recovered {
            requeue(&mut queue, msg, state, &self.config.retry_schedule);
        }
        if queue.held_len() + queue.deferred_len() > 0 {
            tracing::info!(
                shard,
                "{} recovered message(s) on hold, {} waiting for their next retry, {} ready",
                queue.held_len(),
                queue.deferred_len(),
                queue.ready_len()
            );
        }
        let shard = Rc::new(Shard {
            index: shard,
            outbound: RefCell::new(Rc::new(Outbound::new(shard, &self.config.outbound))),
            config: RefCell::new(Arc::clone(&self.config)),
            spool,
            queue: RefCell::new(queue),
            wake: Notify::new(),
            in_flight: Cell::new(0),
            in_flight_bytes: Cell::new(0),
            stopping: Cell::new(false),
            delivered: Notify::new(),
            bounce_ids: RefCell::new(IdGenerator::for_node(self.config.node_id, shard | 0x80)),
            metrics: self.config.metrics.shard_at(shard),
            dns_seen: Cell::new((0, 0)),
            refusing: RefCell::new(None),
        });
        tokio::task::spawn_local(worker::run(Rc::clone(&shard)));
        let answering = Rc::clone(&shard);
        tokio::task::spawn_local(control::watch(
            self.spool.path().to_path_buf(),
            shard.index,
            move |request| answering.control(request),
        ));
        RelayHandler { shard }
    }
}

/// One shard's relay state, shared by its sessions and its delivery tasks.
pub(crate) struct Shard {
    index: usize,
    /// Replaced by a reload; an attempt keeps the one it started with.
    config: RefCell<Arc<RelayConfig>>,
    spool: Spool,
    /// Replaced by a reload (routes, TLS policy, pools); an attempt keeps its own.
    outbound: RefCell<Rc<Outbound>>,
    queue: RefCell<Queue>,
    wake: Notify,
    in_flight: Cell<usize>,
    /// Bytes of content the deliveries in flight hold (see `worker`).
    in_flight_bytes: Cell<u64>,
    /// Shutting down: start no new deliveries.
    stopping: Cell<bool>,
    /// Signalled whenever a delivery ends (shutdown waits on it).
    delivered: Notify,
    /// IDs for bounces: a generator apart from the sessions' (shard number + 128, so the
    /// two never make the same ID).
    bounce_ids: RefCell<IdGenerator>,
    /// This shard's counters.
    metrics: Arc<ShardMetrics>,
    /// The MX cache's counts last added to the metrics (lookups, hits), per resolver.
    dns_seen: Cell<(u64, u64)>,
    /// Why new mail is refused now (full disk, full queue), checked once a second.
    refusing: RefCell<Option<String>>,
}

impl Shard {
    /// A message the spool could not take: counted, logged, answered 451.
    fn spool_refused(&self, e: AcceptError) -> Reply {
        self.metrics.reject(Rejection::Spool);
        tracing::warn!(shard = self.index, "{e}; answering 451");
        Reply::local_error(match e {
            AcceptError::Write(_) => "cannot write to the spool; try again later",
            AcceptError::Sync(_) => "cannot sync the spool; try again later",
        })
    }

    /// Adds what the MX cache did since last time to the metrics (once a second, and
    /// before a reload replaces the resolver).
    fn count_dns(&self) {
        let (lookups, hits) = self.outbound().dns_counts();
        let (seen_lookups, seen_hits) = self.dns_seen.get();
        let new_hits = hits.saturating_sub(seen_hits);
        let new_misses = lookups
            .saturating_sub(seen_lookups)
            .saturating_sub(new_hits);
        self.metrics.dns_cache_hits.add(new_hits);
        self.metrics.dns_cache_misses.add(new_misses);
        self.dns_seen.set((lookups, hits));
    }

    /// Decides whether new mail is refused for lack of room (Postfix's `queue_minfree`):
    /// the spool's free disk space and the queue's length, once a second. Logged when it
    /// starts and when it ends.
    fn check_room(&self) {
        let config = self.config();
        let mut why = None;
        if let Some(free) = free_bytes(self.spool.path()) {
            if free < config.min_free_bytes {
                why = Some(format!(
                    "{free} bytes free on the spool's disk, under spool.min_free_bytes ({})",
                    config.min_free_bytes
                ));
            }
        }
        if why.is_none() && config.max_queued_messages > 0 {
            let queued = config.metrics.queued_messages();
            if queued >= config.max_queued_messages {
                why = Some(format!(
                    "{queued} messages queued, at spool.max_queued_messages ({})",
                    config.max_queued_messages
                ));
            }
        }
        let mut refusing = self.refusing.borrow_mut();
        match (&*refusing, &why) {
            (None, Some(w)) => {
                tracing::warn!(shard = self.index, "refusing new mail (452 4.3.1): {w}")
            }
            (Some(_), None) => tracing::info!(shard = self.index, "accepting new mail again"),
            _ => {}
        }
        *refusing = why;
    }

    /// The relay settings in force.
    fn config(&self) -> Arc<RelayConfig> {
        Arc::clone(&self.config.borrow())
    }

    /// The outbound side in force.
    fn outbound(&self) -> Rc<Outbound> {
        Rc::clone(&self.outbound.borrow())
    }

    /// A reloaded configuration: new attempts use its routes, schedule and delivery
    /// settings (the spool, the node number and the counters stay).
    fn reload(&self, config: &Config) {
        let old = self.config();
        let mut new = RelayConfig::from_config(config);
        new.metrics = old.metrics.clone();
        new.node_id = old.node_id;
        new.ab = old.ab;
        if new.dkim.is_empty() && !config.dkim.is_empty() {
            // The keys could not be loaded (logged): keep signing with those in force.
            new.dkim = Arc::clone(&old.dkim);
        }
        self.count_dns();
        *self.outbound.borrow_mut() = Rc::new(Outbound::new(self.index, &new.outbound));
        self.dns_seen.set((0, 0));
        *self.config.borrow_mut() = Arc::new(new);
        self.wake.notify_one();
    }
    /// Queues a message the spool has just accepted, and wakes the worker.
    fn enqueue(&self, entry: Entry) {
        self.queue.borrow_mut().push_ready(entry);
        self.wake.notify_one();
    }

    /// Puts a message whose attempt left recipients pending back in the queue, due in
    /// `delay`, and records its schedule in the spool (for `queue list`, and a restart).
    fn defer(&self, entry: Entry, delay: Duration) {
        self.spool.defer(
            &entry.msg,
            entry.attempts,
            SystemTime::now() + delay,
            entry.last_error.as_deref().unwrap_or(""),
        );
        let id = entry.id();
        if self.queue.borrow_mut().defer(entry, Instant::now() + delay) {
            tracing::info!(shard = self.index, %id, "on hold after its attempt");
        }
    }

    /// `ringrelay queue flush|remove|hold|release`, as this shard sees it.
    fn control(&self, request: Request) -> Answer {
        match request {
            Request::Flush => {
                // As Postfix's flush: dead next hops are tried again too.
                self.outbound().forget_down();
                let n = self.queue.borrow_mut().flush();
                self.wake.notify_one();
                Answer::Flushed(n)
            }
            Request::Remove(id) => self.remove(id),
            Request::Hold(id) => {
                let change = self.queue.borrow_mut().hold(id);
                match change {
                    HoldChange::Changed(location) => {
                        self.spool.set_held(id, &location, true);
                        tracing::info!(shard = self.index, %id, "put on hold");
                        Answer::Held
                    }
                    HoldChange::Unchanged => Answer::AlreadyHeld,
                    HoldChange::Absent => Answer::Absent,
                }
            }
            Request::Release(id) => {
                let change = self.queue.borrow_mut().release(id);
                match change {
                    HoldChange::Changed(location) => {
                        self.spool.set_held(id, &location, false);
                        tracing::info!(shard = self.index, %id, "released from hold");
                        self.wake.notify_one();
                        Answer::Released
                    }
                    HoldChange::Unchanged => Answer::NotHeld,
                    HoldChange::Absent => Answer::Absent,
                }
            }
        }
    }

    fn remove(&self, id: QueueId) -> Answer {
        let removed = self.queue.borrow_mut().remove(id);
        let Some(entry) = removed else {
            return if self.queue.borrow().is_delivering(id) {
                Answer::Delivering
            } else {
                Answer::Absent
            };
        };
        self.spool.remove(&entry.msg);
        crate::observe::log::removed(id);
        Answer::Removed
    }
}

/// Queues a message found at start-up as its records left it: on hold; deferred until its
/// next attempt (at most the schedule's longest step from now, whatever the clock did
/// meanwhile); or ready, when that time has passed, it was never deferred, or it was
/// released from hold (then, as after a release on a running server, its next attempt
/// does not move it along the retry schedule).
fn requeue(queue: &mut Queue, msg: Queued, state: DeliveryState, schedule: &[u64]) {
    let mut entry = Entry::new(msg, None);
    entry.attempts = state.attempts;
    entry.last_error = state.last_reply;
    entry.early = state.next_attempt.is_none();
    if state.held {
        queue.push_held(entry);
        return;
    }
    let longest = Duration::from_secs(schedule.iter().copied().max().unwrap_or(60));
    let wait = state
        .next_attempt
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .map(|w| w.min(longest));
    match wait {
        Some(w) if !w.is_zero() => {
            queue.defer(entry, Instant::now() + w);
        }
        _ => queue.push_ready(entry),
    }
}

/// The store-and-forward [`Handler`] of one shard.
pub struct RelayHandler {
    shard: Rc<Shard>,
}

impl Handler for RelayHandler {
    fn on_reload(&self, config: &Config) {
        self.shard.reload(config);
        self.shard.check_room();
    }

    fn on_mail(
        &self,
        _peer: std::net::SocketAddr,
        _from: &crate::smtp::ReversePath,
    ) -> Result<(), Reply> {
        if self.shard.refusing.borrow().is_some() {
            self.shard.metrics.reject(Rejection::Spool);
            return Err(Reply::new(
                452,
                "4.3.1 Error: insufficient system storage, try again later",
            ));
        }
        Ok(())
    }

    /// No new deliveries; those in flight finish and record their outcomes, so a restart
    /// does not deliver them again.
    async fn on_shutdown(&self) {
        let shard = &self.shard;
        shard.stopping.set(true);
        while shard.in_flight.get() > 0 {
            shard.delivered.notified().await;
        }
    }

    /// Large messages go into the spool while they arrive (`stream`).
    fn body_sink(&self, envelope: &Envelope, head: &[u8]) -> Option<Box<dyn BodySink>> {
        // DKIM signs the whole message before the spool (`on_message`): a message that
        // will be signed (or whose header section cannot be read from its first piece) is
        // kept whole, within `limits.max_data_memory`; the rest streams.
        if !matches!(self.shard.config().dkim.signer_for(head), Ok(None)) {
            return None;
        }
        let sink = stream::SpoolSink::open(&self.shard, envelope)?;
        Some(Box::new(sink))
    }

    async fn on_message(&self, envelope: Envelope) -> Result<(), Reply> {
        let shard = &self.shard;
        // Signed once, here, before the spool: retries send the stored, signed copy.
        // Without keys (the common case) this costs one look at the configuration.
        let mut envelope = envelope;
        let config = shard.config();
        if !config.dkim.is_empty() {
            let id = envelope.id.to_string();
            envelope.data = crate::dkim::sign_off_thread(&config.dkim, &id, envelope.data).await;
        }
        let accepted = shard
            .spool
            .accept(NewMessage {
                id: envelope.id,
                arrival: SystemTime::now(),
                from: envelope.from,
                rcpts: envelope.to,
                eight_bit: envelope.body_type == BodyType::EightBitMime,
                smtputf8: envelope.smtputf8,
                dsn: envelope.dsn,
                data: &envelope.data,
            })
            .await;
        let msg = accepted.map_err(|e| shard.spool_refused(e))?;
        // A long ready queue (a slow next hop) must not pin every message in memory: only
        // small messages, and only so many, wait with their content; the rest is read back
        // from the spool when its turn comes (at most 64 MiB per shard waits in memory).
        let keep_in_memory = envelope.data.len() <= MAX_KEPT_SIZE
            && shard.queue.borrow().ready_len() < MAX_READY_IN_MEMORY;
        shard.metrics.messages_received.inc();
        shard.enqueue(Entry::new(msg, keep_in_memory.then_some(envelope.data)));
        Ok(())
    }
}

/// Free bytes for unprivileged users on the file system holding `path`, if it can be asked.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs reads the NUL-terminated path and writes one statvfs struct into
    // `st`, which is plain data (all-zero is a valid value to be overwritten).
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        st
    };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Some(st.f_bavail as u64 * st.f_frsize as u64)
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
