//! One shard: everything a core owns (handler, queue-ID generator, buffer pool, the count
//! of its open connections) and the tasks that run there: an accept loop per listener and a
//! supervisor that stops accepting on shutdown and waits for the last connection.
//!
//! Nothing here is shared with other shards except the read-only session configuration,
//! the connection caps, the DATA memory budget and the shutdown signal.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::buffers::BufferPool;
use super::caps::{CapExceeded, ConnectionCaps, ConnectionSlot, DataBudget};
use super::conn::{self, Acceptor, Transport};
use super::secure::Security;
use super::{ListenerKind, Phase};
use crate::config::Config;
use crate::handler::Handler;
use crate::id::{IdGenerator, QueueId};
use crate::observe::metrics::{Rejection, ShardMetrics};
use crate::policy::IpNet;
use crate::smtp::{Hooks, Mailbox, Reply, ReversePath, SessionConfig};
use bytes::BytesMut;

/// How long a handler's shutdown work may take once the last session has ended.
const HANDLER_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A shard's state, shared by its tasks through `Rc` (never across threads).
pub(crate) struct Shard<H> {
    pub(crate) index: usize,
    pub(crate) handler: H,
    /// Replaced by a reload: new sessions get the new one.
    session_config: RefCell<Arc<SessionConfig>>,
    pub(crate) pool: BufferPool,
    pub(crate) caps: Arc<ConnectionCaps>,
    pub(crate) phase: watch::Receiver<Phase>,
    pub(crate) command_timeout: Cell<Duration>,
    pub(crate) data_timeout: Cell<Duration>,
    /// A whole DATA phase's deadline.
    pub(crate) data_total_timeout: Cell<Duration>,
    /// Bytes the messages being received hold, server-wide, and the most they may.
    pub(crate) data_budget: Arc<DataBudget>,
    /// TLS certificate and AUTH users, when TLS is configured.
    pub(crate) security: Option<Arc<Security>>,
    /// Who may send a PROXY header (`proxy.trusted`).
    pub(crate) proxy_trusted: Arc<Vec<IpNet>>,
    /// This shard's counters (read by the metrics endpoint).
    pub(crate) metrics: Arc<ShardMetrics>,
    ids: RefCell<IdGenerator>,
    /// Reloads to watch (taken by [`run`]).
    reloads: RefCell<Option<watch::Receiver<Option<Reload>>>>,
    open: Cell<usize>,
    all_closed: Notify,
}

/// A reloaded configuration as the shards take it.
#[derive(Clone, Debug)]
pub(crate) struct Reload {
    pub(crate) config: Arc<Config>,
    pub(crate) session: Arc<SessionConfig>,
    /// Shards that have taken it.
    pub(crate) applied: Arc<std::sync::atomic::AtomicUsize>,
}

/// What a shard is built from (all `Send`, made on the starting thread).
pub(crate) struct ShardSettings {
    pub(crate) index: usize,
    pub(crate) session_config: Arc<SessionConfig>,
    pub(crate) caps: Arc<ConnectionCaps>,
    pub(crate) phase: watch::Receiver<Phase>,
    pub(crate) command_timeout: Duration,
    pub(crate) data_timeout: Duration,
    pub(crate) data_total_timeout: Duration,
    pub(crate) data_budget: Arc<DataBudget>,
    pub(crate) security: Option<Arc<Security>>,
    pub(crate) proxy_trusted: Arc<Vec<IpNet>>,
    /// Reloaded configurations, with the session configuration made from each.
    pub(crate) reload: watch::Receiver<Option<Reload>>,
    /// This node's number, in queue IDs.
    pub(crate) node_id: u16,
    /// This shard's counters.
    pub(crate) metrics: Arc<ShardMetrics>,
}

impl<H: Handler> Shard<H> {
    pub(crate) fn new(settings: ShardSettings, handler: H) -> Rc<Self> {
        Rc::new(Shard {
            index: settings.index,
            handler,
            session_config: RefCell::new(settings.session_config),
            // Command-sized buffers only: one grown by DATA is dropped, not pooled, so
            // a new (often idle) connection never inherits 64 KiB.
            pool: BufferPool::new(1024, 4096, 4 * 1024),
            caps: settings.caps,
            phase: settings.phase,
            command_timeout: Cell::new(settings.command_timeout),
            data_timeout: Cell::new(settings.data_timeout),
            data_total_timeout: Cell::new(settings.data_total_timeout),
            data_budget: settings.data_budget,
            security: settings.security,
            proxy_trusted: settings.proxy_trusted,
            metrics: settings.metrics,
            ids: RefCell::new(IdGenerator::for_node(settings.node_id, settings.index)),
            reloads: RefCell::new(Some(settings.reload)),
            open: Cell::new(0),
            all_closed: Notify::new(),
        })
    }

    /// Counts a connection as open until the returned guard drops.
    pub(crate) fn connection_opened(self: &Rc<Self>) -> OpenGuard<H> {
        self.open.set(self.open.get() + 1);
        self.metrics.connections_open.set(self.open.get() as u64);
        OpenGuard {
            shard: Rc::clone(self),
            data_held: 0,
        }
    }

    /// The session configuration new connections get.
    pub(crate) fn session_config(&self) -> Arc<SessionConfig> {
        Arc::clone(&self.session_config.borrow())
    }

    /// A reload, on this shard's own thread: new sessions get `session`, every wait the
    /// new timeouts, and the handler its say.
    fn reload(&self, config: &Config, session: Arc<SessionConfig>) {
        *self.session_config.borrow_mut() = session;
        self.command_timeout
            .set(Duration::from_secs(config.limits.command_timeout_secs));
        self.data_timeout
            .set(Duration::from_secs(config.limits.data_timeout_secs));
        self.data_total_timeout
            .set(Duration::from_secs(config.limits.data_total_timeout_secs));
        self.handler.on_reload(config);
    }

    fn phase_now(&self) -> Phase {
        *self.phase.borrow()
    }
}

/// Marks one connection of a shard as open, and holds its message's share of the server's
/// DATA memory budget. Dropping it gives both back, so no exit path of a connection, a
/// panicking handler's included, can leak either (a leaked share would be the whole
/// server's, and would end in every large message being refused). One guard for both:
/// each field in the connection's task costs every idle connection.
pub(crate) struct OpenGuard<H: Handler> {
    shard: Rc<Shard<H>>,
    data_held: usize,
}

impl<H: Handler> OpenGuard<H> {
    /// Moves this connection's share of the DATA memory budget to `now` bytes; false,
    /// holding what it held, when the budget refuses (`DataBudget::update`).
    pub(crate) fn hold_data(&mut self, now: usize) -> bool {
        self.shard.data_budget.update(&mut self.data_held, now)
    }

    /// Moves this connection's share to `now` bytes even past the budget
    /// (`DataBudget::force`).
    pub(crate) fn hold_data_anyway(&mut self, now: usize) {
        self.shard.data_budget.force(&mut self.data_held, now);
    }
}

impl<H: Handler> Drop for OpenGuard<H> {
    fn drop(&mut self) {
        self.shard.data_budget.update(&mut self.data_held, 0);
        let n = self.shard.open.get().saturating_sub(1);
        self.shard.open.set(n);
        self.shard.metrics.connections_open.set(n as u64);
        if n == 0 {
            self.shard.all_closed.notify_one();
        }
    }
}

/// The session's hooks on this shard: IDs from the shard's generator, checks from the
/// handler.
pub(crate) struct ShardHooks<'a, H> {
    shard: &'a Shard<H>,
    peer: SocketAddr,
}

impl<'a, H> ShardHooks<'a, H> {
    pub(crate) fn new(shard: &'a Shard<H>, peer: SocketAddr) -> Self {
        ShardHooks { shard, peer }
    }
}

impl<H: Handler> Hooks for ShardHooks<'_, H> {
    fn queue_id(&mut self) -> QueueId {
        self.shard.ids.borrow_mut().next_id()
    }
    fn check_mail(&mut self, from: &ReversePath) -> Result<(), Reply> {
        self.shard.handler.on_mail(self.peer, from)
    }
    fn check_rcpt(&mut self, to: &Mailbox) -> Result<(), Reply> {
        self.shard.handler.on_rcpt(self.peer, to)
    }
    fn check_data(&mut self) -> Result<(), Reply> {
        self.shard.handler.on_data()
    }
    fn rcpt_refused(&mut self, helo: &str, reply: &str, from: &str, to: &str) {
        if reply.contains(" 5.7.1 ") {
            self.shard.metrics.reject(Rejection::RelayDenied);
        } else {
            self.shard.metrics.reject(Rejection::Policy);
        }
        crate::observe::log::rejected(helo, self.peer.ip().to_canonical(), reply, from, to);
    }
}

/// Runs a shard until shutdown has finished: one accept task per listener, then waits.
/// Each acceptor comes with what its listener expects first.
pub(crate) async fn run<H: Handler, A: Acceptor>(
    shard: Rc<Shard<H>>,
    acceptors: Vec<(A, ListenerKind)>,
) {
    let acceptors: Vec<(Rc<A>, ListenerKind)> = acceptors
        .into_iter()
        .map(|(a, kind)| (Rc::new(a), kind))
        .collect();
    // Accept lives in its own task and is never raced against anything: a dropped
    // io_uring accept would leak the next connection.
    let accept_tasks: Vec<_> = acceptors
        .iter()
        .map(|(a, kind)| {
            tokio::task::spawn_local(accept_loop(Rc::clone(&shard), Rc::clone(a), *kind))
        })
        .collect();
    if let Some(mut reloads) = shard.reloads.borrow_mut().take() {
        let shard = Rc::clone(&shard);
        tokio::task::spawn_local(async move {
            while reloads.changed().await.is_ok() {
                let reload = reloads.borrow_and_update().clone();
                if let Some(r) = reload {
                    shard.reload(&r.config, r.session);
                    r.applied.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
            }
        });
    }
    let mut phase = shard.phase.clone();
    while *phase.borrow_and_update() == Phase::Running {
        if phase.changed().await.is_err() {
            break;
        }
    }
    for (acceptor, _) in &acceptors {
        acceptor.stop();
    }
    // Wait for each accept loop to see its listener fail: an accept that completed in the
    // kernel just before the stop is still handed to us, and gets its 421.
    for task in accept_tasks {
        let _ = task.await;
    }
    while shard.open.get() > 0 {
        shard.all_closed.notified().await;
    }
    // Background work (deliveries in flight) gets a short, bounded chance to finish.
    let grace = shard.command_timeout.get().min(HANDLER_SHUTDOWN_GRACE);
    if tokio::time::timeout(grace, shard.handler.on_shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            shard = shard.index,
            "handler work still running at shutdown; dropped"
        );
    }
    tracing::debug!(shard = shard.index, "shard drained");
}

async fn accept_loop<H: Handler, A: Acceptor>(
    shard: Rc<Shard<H>>,
    acceptor: Rc<A>,
    kind: ListenerKind,
) {
    let implicit_tls = kind == ListenerKind::ImplicitTls;
    loop {
        match acceptor.accept().await {
            Ok((conn, peer)) => {
                shard.metrics.connections_total.inc();
                if kind == ListenerKind::Proxy {
                    // Only a trusted balancer may send a header; anyone else is closed
                    // unanswered (no banner: nothing is sent before the header).
                    if !shard.proxy_trusted.iter().any(|n| n.contains(peer.ip()))
                        || shard.phase_now() != Phase::Running
                    {
                        tracing::debug!(%peer, "PROXY listener: not a trusted balancer (or shutting down); closed");
                        conn.close_both();
                        continue;
                    }
                    tokio::task::spawn_local(conn::serve_proxied(Rc::clone(&shard), conn, peer));
                    continue;
                }
                if implicit_tls && shard.phase_now() != Phase::Running {
                    // A TLS client could not read a plaintext 421: it is just closed.
                    conn.close_both();
                    continue;
                }
                if shard.phase_now() != Phase::Running {
                    let reply = Reply::shutting_down(&shard.session_config().hostname);
                    refuse(&shard, conn, reply, None);
                    continue;
                }
                match shard.caps.acquire(peer.ip()) {
                    Ok(slot) => {
                        tokio::task::spawn_local(conn::serve(
                            Rc::clone(&shard),
                            conn,
                            peer,
                            slot,
                            kind,
                            BytesMut::new(),
                        ));
                    }
                    Err(which) if implicit_tls => {
                        shard.metrics.reject(Rejection::ConnectionCap);
                        tracing::info!(%peer, ?which, "connection closed: cap reached");
                        conn.close_both();
                    }
                    Err(which) => {
                        shard.metrics.reject(Rejection::ConnectionCap);
                        tracing::info!(%peer, ?which, "connection refused: cap reached");
                        let host = &shard.session_config().hostname;
                        let reply = match which {
                            CapExceeded::Total | CapExceeded::PerIp => {
                                Reply::too_many_connections(host)
                            }
                        };
                        refuse(&shard, conn, reply, None);
                    }
                }
            }
            Err(e) => {
                if shard.phase_now() != Phase::Running {
                    return;
                }
                // Out of file descriptors or memory: back off instead of spinning; a
                // connection aborted before accept is just skipped.
                if e.kind() != std::io::ErrorKind::ConnectionAborted {
                    tracing::warn!(shard = shard.index, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Answers a connection we will not serve with `reply` and closes it, in a task counted
/// as an open connection so that shutdown waits for the reply to go out. `held`, the
/// connection's slot under the caps if it took one, is kept until then.
pub(crate) fn refuse<H: Handler, T: conn::Transport>(
    shard: &Rc<Shard<H>>,
    conn: T,
    reply: Reply,
    held: Option<ConnectionSlot>,
) {
    let open = shard.connection_opened();
    let timeout = shard.command_timeout.get();
    tokio::task::spawn_local(async move {
        conn::refuse(conn, reply, timeout).await;
        drop((open, held));
    });
}
