//! The library's front door, in the shape of the ancestor (Perl's Net::SMTP::Server):
//! a [`Server`] accepts connections and runs one SMTP session each, and your [`Handler`]
//! decides who may connect, send and receive, and what happens to each message.
//!
//! The handler is made once per shard by the factory given to [`Server::start`] and lives
//! on that shard's thread, so it needs no locks (it need not be `Send`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::driver::secure::Security;
use crate::driver::{self, Phase};
use crate::handler::Handler;
use crate::observe::metrics::Registry;

/// What [`Server::run_with_events`] reports on the way, for a service manager (the
/// command line turns these into systemd's `READY=1` and `STOPPING=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lifecycle<'a> {
    /// Every listener is bound and listening (on these addresses, port 0 resolved).
    Ready(&'a [SocketAddr]),
    /// SIGTERM or SIGINT arrived: no longer accepting; transactions in flight finish.
    Stopping,
}

/// Reads the configuration again for SIGHUP (the command line's: the file and its flags).
#[derive(Clone)]
pub struct ConfigSource(pub Arc<dyn Fn() -> Result<Config, String> + Send + Sync>);

impl std::fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigSource")
    }
}

/// An SMTP server: listeners, shards and sessions, run with a [`Handler`].
#[derive(Clone)]
pub struct Server {
    config: Config,
    metrics: Registry,
    source: Option<ConfigSource>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("reloadable", &self.source.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server with this (already validated) configuration.
    pub fn new(config: Config) -> Self {
        Server {
            config,
            metrics: Registry::new(),
            source: None,
        }
    }

    /// On SIGHUP, [`Server::run`] calls `source` for the configuration to reload: what
    /// can change in a running server does, for new connections and deliveries (relay
    /// access, limits, timeouts, routes and delivery settings, the TLS certificate and
    /// users); what needs a restart is logged as such; a configuration `source` refuses
    /// (it validates) changes nothing. Without a source, SIGHUP reloads the TLS files only.
    pub fn reload_from(mut self, source: ConfigSource) -> Self {
        self.source = Some(source);
        self
    }

    /// Counts into `metrics` (shard `i`'s counters are `metrics.shard_at(i)`, shared with
    /// whatever else of that shard counts: the relay's queue manager).
    pub fn with_metrics(mut self, metrics: Registry) -> Self {
        self.metrics = metrics;
        self
    }

    /// Binds the listeners and starts the shards; returns at once. `make_handler(shard)` is
    /// called once on each shard's thread.
    pub fn start<H, F>(self, make_handler: F) -> io::Result<ServerHandle>
    where
        H: Handler,
        F: Fn(usize) -> H + Send + Sync + 'static,
    {
        let shutdown_timeout = Duration::from_secs(self.config.limits.shutdown_timeout_secs);
        let config = self.config.clone();
        let started = driver::start(self.config, self.metrics, make_handler)?;
        Ok(ServerHandle {
            phase: started.phase,
            reloader: started.reload,
            config: std::sync::Mutex::new(config),
            source: self.source,
            security: started.security,
            threads: started.threads,
            local_addrs: started.local_addrs,
            io: started.io,
            shutdown_timeout,
        })
    }

    /// Starts the server and serves until SIGTERM or SIGINT; then stops accepting, lets
    /// transactions in flight finish (up to `limits.shutdown_timeout_secs`), says `421` to
    /// the rest and returns. A second signal skips the wait.
    pub fn run<H, F>(self, make_handler: F) -> io::Result<()>
    where
        H: Handler,
        F: Fn(usize) -> H + Send + Sync + 'static,
    {
        self.run_with_events(make_handler, |_| {})
    }

    /// [`Server::run`], telling `events` when the server is ready and when it begins to
    /// stop (on the calling thread, between the steps; it should not block).
    pub fn run_with_events<H, F>(
        self,
        make_handler: F,
        mut events: impl FnMut(Lifecycle<'_>),
    ) -> io::Result<()>
    where
        H: Handler,
        F: Fn(usize) -> H + Send + Sync + 'static,
    {
        let signals = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Register before the shards start, so an early signal is not the default "die"
        // (SIGHUP's default would kill the server too).
        let (mut term, mut int, mut hup) = signals.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::hangup())?,
            ))
        })?;
        let handle = self.start(make_handler)?;
        events(Lifecycle::Ready(handle.local_addrs()));
        signals.block_on(async {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => handle.sighup(),
                }
            }
        });
        tracing::info!("signal received: no longer accepting; finishing transactions in flight");
        events(Lifecycle::Stopping);
        handle.shutdown();
        let phase = handle.phase.clone();
        let grace = handle.shutdown_timeout;
        signals.spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = tokio::time::sleep(grace) => {}
            }
            phase.send_replace(Phase::Closing);
        });
        // Keep the signal runtime turning while the shards drain.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let joiner = std::thread::spawn(move || {
            let r = handle.join();
            let _ = done_tx.send(());
            r
        });
        signals.block_on(async {
            let _ = done_rx.await;
        });
        joiner
            .join()
            .map_err(|_| io::Error::other("a shard thread panicked"))?
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    phase: watch::Sender<Phase>,
    reloader: driver::Reloader,
    /// The configuration in force (the last reloaded).
    config: std::sync::Mutex<Config>,
    source: Option<ConfigSource>,
    security: Option<Arc<Security>>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    local_addrs: Vec<SocketAddr>,
    io: driver::IoDriver,
    shutdown_timeout: Duration,
}

impl ServerHandle {
    /// The addresses actually listened on (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Reads the TLS certificate, key and AUTH users file again (rotated in place), for
    /// new connections; open ones keep theirs. On an error nothing changes. `Ok(false)`
    /// when TLS is not configured (nothing to reload).
    pub fn reload_certificates(&self) -> Result<bool, String> {
        match &self.security {
            None => Ok(false),
            Some(security) => security.reload().map(|()| true),
        }
    }

    /// Takes `new` (validated) in place of the configuration in force, for what can change
    /// in a running server (see [`Server::reload_from`]). Returns the keys that changed
    /// but need a restart; on an error nothing changes.
    pub fn reload(&self, new: Config) -> Result<Vec<&'static str>, String> {
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let restart = self.reloader.apply(&current, new.clone())?;
        *current = new;
        Ok(restart)
    }

    /// What SIGHUP does: the configuration read again and reloaded (or only the TLS files
    /// without a source), one log line saying what happened.
    fn sighup(&self) {
        let Some(source) = &self.source else {
            match self.reload_certificates() {
                Ok(true) => tracing::info!(
                    "SIGHUP: TLS certificate and AUTH users reloaded for new connections"
                ),
                Ok(false) => tracing::info!("SIGHUP: nothing to reload"),
                Err(e) => tracing::error!("SIGHUP: reload refused, the old certificate stays: {e}"),
            }
            return;
        };
        match (source.0)().and_then(|new| self.reload(new)) {
            Ok(restart) if restart.is_empty() => tracing::info!(
                "SIGHUP: configuration reloaded (relay access, limits, routes and delivery, TLS \
                 certificate and users) for new connections and deliveries"
            ),
            Ok(restart) => tracing::warn!(
                "SIGHUP: configuration reloaded for new connections and deliveries; changed but \
                 needing a restart to take effect: {}",
                restart.join(", ")
            ),
            Err(e) => {
                tracing::error!("SIGHUP: reload refused, the running configuration stays: {e}")
            }
        }
    }

    /// Which I/O driver runs the shards: `"io_uring"` or `"epoll"`.
    pub fn io_driver(&self) -> &'static str {
        self.io.name()
    }

    /// Begins a graceful shutdown: stop accepting; idle sessions get `421` now, busy ones
    /// when their transaction ends. [`ServerHandle::join`] enforces the deadline.
    pub fn shutdown(&self) {
        self.phase.send_if_modified(|p| {
            if *p == Phase::Running {
                *p = Phase::Draining;
                true
            } else {
                false
            }
        });
    }

    /// Ends every session now with `421`.
    pub fn close_now(&self) {
        self.phase.send_replace(Phase::Closing);
    }

    /// Waits for the shards to finish. After [`ServerHandle::shutdown`], sessions still
    /// busy when `limits.shutdown_timeout_secs` has passed are closed with `421`.
    pub fn join(self) -> io::Result<()> {
        let deadline_phase = self.phase.clone();
        let grace = self.shutdown_timeout;
        // A watchdog that turns Draining into Closing after the grace period.
        let watchdog = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build();
            let Ok(rt) = rt else { return };
            rt.block_on(async move {
                let mut rx = deadline_phase.subscribe();
                loop {
                    let phase = *rx.borrow_and_update();
                    match phase {
                        Phase::Closing => return,
                        Phase::Draining => {
                            // Either the grace period ends, or the shards finish first
                            // (join sends Closing once they have).
                            tokio::select! {
                                _ = tokio::time::sleep(grace) => {
                                    deadline_phase.send_replace(Phase::Closing);
                                }
                                _ = rx.changed() => {}
                            }
                            return;
                        }
                        Phase::Running => {
                            if rx.changed().await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        });
        let mut result = Ok(());
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(io::Error::other("a shard thread panicked")),
            }
        }
        // The shards are gone; wake the watchdog if it still waits on a phase change.
        self.phase.send_replace(Phase::Closing);
        drop(self.phase);
        let _ = watchdog.join();
        result
    }
}
