//! The thread-per-core runtime: one OS thread per shard, each with its own event loop
//! (io_uring, or epoll as a fallback), its own `SO_REUSEPORT` listeners and buffer pool.
//!
//! - [`listener`]: binding the per-shard sockets.
//! - [`probe`]: whether io_uring is usable here.
//! - [`shard`]: a shard's state, accept loops and shutdown supervision.
//! - [`conn`]: one connection's loop, shared by both drivers.
//! - [`uring`] / [`epoll`]: the two drivers.
//! - [`outbound`]: outbound connections on the shard's driver (the relay's next hops).
//! - [`file`]: spool reads on the shard's driver (a message read back for delivery).
//! - [`secure`]: inbound TLS (STARTTLS, implicit TLS) and AUTH checks.
//! - [`buffers`]: the per-shard buffer pool; [`caps`]: connection caps.

pub(crate) mod buffers;
pub(crate) mod caps;
pub(crate) mod conn;
pub(crate) mod epoll;
pub(crate) mod file;
pub(crate) mod listener;
pub(crate) mod outbound;
pub(crate) mod probe;
pub(crate) mod secure;
pub(crate) mod shard;
pub(crate) mod uring;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, IoMode, Spread};
use crate::handler::Handler;
use crate::observe::metrics::Registry;
use crate::smtp::SessionConfig;
use shard::{Shard, ShardSettings};

/// Where a server is in its life; every connection watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Accepting and serving.
    Running,
    /// Not accepting; sessions end when their transaction does.
    Draining,
    /// Every session ends now with 421.
    Closing,
}

/// What a listener expects first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenerKind {
    /// SMTP (STARTTLS when configured).
    Plain,
    /// TLS from the first byte (RFC 8314).
    ImplicitTls,
    /// A PROXY protocol header from a trusted balancer, then SMTP.
    Proxy,
}

/// The I/O driver in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoDriver {
    Uring,
    Epoll,
}

impl IoDriver {
    pub(crate) fn name(self) -> &'static str {
        match self {
            IoDriver::Uring => "io_uring",
            IoDriver::Epoll => "epoll",
        }
    }
}

/// What [`start`] hands back.
pub(crate) struct Started {
    pub(crate) phase: watch::Sender<Phase>,
    pub(crate) reload: Reloader,
    pub(crate) security: Option<Arc<secure::Security>>,
    pub(crate) threads: Vec<JoinHandle<io::Result<()>>>,
    pub(crate) local_addrs: Vec<SocketAddr>,
    pub(crate) io: IoDriver,
}

/// The session configuration a configuration gives (TLS as the server started with it).
fn session_config(config: &Config, tls_on: bool) -> SessionConfig {
    let mut s = SessionConfig::new(
        config.effective_hostname(),
        config.limits.max_message_size,
        config.limits.max_recipients,
        config.relay_policy(),
    )
    .with_tls(tls_on, tls_on && config.auth.enabled());
    s.max_errors = config.limits.max_errors;
    s.max_junk_commands = config.limits.max_junk_commands;
    s.postmaster = config.postmaster().unwrap_or(None);
    s
}

/// Applies reloaded configurations to a running server.
#[derive(Debug)]
pub(crate) struct Reloader {
    tx: watch::Sender<Option<shard::Reload>>,
    shards: usize,
    caps: Arc<caps::ConnectionCaps>,
    security: Option<Arc<secure::Security>>,
    tls_on: bool,
}

impl Reloader {
    /// Takes `new` (validated) in place of `old` for what can change in a running server:
    /// relay access, limits, timeouts, the TLS certificate and users, and (through each
    /// shard's handler) routes and delivery settings. Returns the keys that changed but
    /// need a restart. Nothing is applied if the certificate or users file is unusable.
    pub(crate) fn apply(&self, old: &Config, new: Config) -> Result<Vec<&'static str>, String> {
        let mut restart = Vec::new();
        let mut note = |changed: bool, key: &'static str| {
            if changed {
                restart.push(key);
            }
        };
        note(old.listen != new.listen, "listen");
        note(
            old.tls.implicit_listen != new.tls.implicit_listen,
            "tls.implicit_listen",
        );
        note(old.proxy.listen != new.proxy.listen, "proxy.listen");
        note(old.spool.dir != new.spool.dir, "spool.dir");
        note(old.shards != new.shards, "shards");
        note(old.io != new.io, "io");
        note(old.metrics.listen != new.metrics.listen, "metrics.listen");
        note(
            old.effective_node_id() != new.effective_node_id(),
            "node_id",
        );
        note(
            new.tls.enabled() != self.tls_on,
            "tls (turning TLS on or off)",
        );
        if let (Some(security), true) = (&self.security, new.tls.enabled()) {
            security.reload_from(&new)?;
        }
        self.caps.set_limits(
            new.limits.max_connections,
            new.limits.max_connections_per_ip,
        );
        let session = Arc::new(session_config(&new, self.tls_on));
        let applied = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        self.tx.send_replace(Some(shard::Reload {
            config: Arc::new(new),
            session,
            applied: Arc::clone(&applied),
        }));
        // Each shard takes it on its own thread; wait (briefly) until all have, so that
        // "reloaded" in the log means new connections get it.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while applied.load(std::sync::atomic::Ordering::Acquire) < self.shards
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(restart)
    }
}

/// Picks the driver for `mode`; `auto` falls back to epoll with one log line saying why.
pub(crate) fn choose_driver(mode: IoMode) -> io::Result<IoDriver> {
    match mode {
        IoMode::Epoll => Ok(IoDriver::Epoll),
        IoMode::Uring => probe::io_uring_usable()
            .map(|()| IoDriver::Uring)
            .map_err(|why| io::Error::other(format!("--io uring: {why}"))),
        IoMode::Auto => match probe::io_uring_usable() {
            Ok(()) => Ok(IoDriver::Uring),
            Err(why) => {
                tracing::warn!("io_uring unavailable, falling back to epoll: {why}");
                Ok(IoDriver::Epoll)
            }
        },
    }
}

/// Binds the listeners and starts one thread per shard.
pub(crate) fn start<H, F>(config: Config, metrics: Registry, make_handler: F) -> io::Result<Started>
where
    H: Handler,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    let io = choose_driver(config.io)?;
    ensure_fd_limit(config.limits.max_connections);
    let shards = config.effective_shards();
    // Plain listeners, then implicit-TLS ones, then PROXY ones; `kinds[i]` says which
    // listener index is which (the same on every shard).
    let mut addrs = config.listen.clone();
    let mut kinds = vec![ListenerKind::Plain; addrs.len()];
    addrs.extend(&config.tls.implicit_listen);
    kinds.resize(addrs.len(), ListenerKind::ImplicitTls);
    addrs.extend(&config.proxy.listen);
    kinds.resize(addrs.len(), ListenerKind::Proxy);
    let proxy_trusted = Arc::new(config.proxy.trusted_nets());
    let security = secure::Security::load(&config).map_err(io::Error::other)?;
    let (listeners, local_addrs) = listener::bind_all(&addrs, shards)?;
    let session_config = Arc::new(session_config(&config, security.is_some()));
    let (reload_tx, reload_rx) = watch::channel(None);
    let caps = caps::ConnectionCaps::new(
        config.limits.max_connections,
        config.limits.max_connections_per_ip,
    );
    let data_budget = caps::DataBudget::new(config.limits.max_data_memory);
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let make_handler = Arc::new(make_handler);
    let cpus = allowed_cpus();
    let pin = shards <= cpus.len();
    // Local clients to the shard on their own CPU (see `listener`), unless configured
    // otherwise.
    let spread = config.spread;
    let steer = pin
        && shards > 1
        && spread == Spread::LocalCpu
        && match listener::steer_local_by_cpu(&listeners, &cpus[..shards]) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cannot steer local connections by CPU, using the hash: {e}");
                false
            }
        };
    let mut threads = Vec::with_capacity(shards);
    for (index, listeners) in listeners.into_iter().enumerate() {
        let settings = ShardSettings {
            index,
            session_config: Arc::clone(&session_config),
            caps: Arc::clone(&caps),
            phase: phase_rx.clone(),
            command_timeout: Duration::from_secs(config.limits.command_timeout_secs),
            data_timeout: Duration::from_secs(config.limits.data_timeout_secs),
            data_total_timeout: Duration::from_secs(config.limits.data_total_timeout_secs),
            data_budget: Arc::clone(&data_budget),
            security: security.clone(),
            proxy_trusted: Arc::clone(&proxy_trusted),
            reload: reload_rx.clone(),
            node_id: config.effective_node_id(),
            metrics: metrics.shard_at(index),
        };
        let kinds = kinds.clone();
        let make_handler = Arc::clone(&make_handler);
        let ab = config.ab;
        let cpu = if pin { cpus.get(index).copied() } else { None };
        let thread = std::thread::Builder::new()
            .name(format!("shard-{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    // Unpinned, the shard still works; only its locality is lost.
                    if let Err(e) = pin_to_cpu(cpu) {
                        tracing::warn!("could not pin shard {index} to CPU {cpu}: {e}");
                    }
                }
                // The factory may own resources for the server's whole life (the relay's
                // spool lock): keep it until this shard has finished, not just until its
                // handler is made.
                let factory = Arc::clone(&make_handler);
                let state = move || Shard::new(settings, factory(index));
                let result = match io {
                    IoDriver::Uring => uring::run(state, listeners, &kinds, ab),
                    IoDriver::Epoll => epoll::run(state, listeners, &kinds),
                };
                if let Err(e) = &result {
                    tracing::error!(shard = index, "shard failed: {e}");
                }
                drop(make_handler);
                result
            })?;
        threads.push(thread);
    }
    let addrs: Vec<String> = local_addrs.iter().map(ToString::to_string).collect();
    tracing::info!(
        "listening on {} with {shards} shard(s) as node {}, io {}{}{}",
        addrs.join(", "),
        config.effective_node_id(),
        io.name(),
        if pin { ", pinned to cores" } else { "" },
        if steer {
            ", local clients served on their own CPU"
        } else {
            ""
        }
    );
    Ok(Started {
        phase: phase_tx,
        reload: Reloader {
            tx: reload_tx,
            shards,
            caps,
            security: security.clone(),
            tls_on: security.is_some(),
        },
        security,
        threads,
        local_addrs,
        io,
    })
}

/// Descriptors beyond the client connections: spool segments, outbound connections,
/// resolver sockets, listeners, the ring.
const FD_HEADROOM: u64 = 4096;

/// Makes room for `max_connections` clients: a shell's or a service manager's soft
/// open-file limit is often 1024, which would make accept fail with EMFILE long before
/// `limits.max_connections`. The soft limit is raised as far as needed, never past the
/// hard one; if that is still short, a warning says what to set.
fn ensure_fd_limit(max_connections: usize) {
    let want = (max_connections as u64).saturating_add(FD_HEADROOM);
    match raise_open_file_limit(want) {
        Ok((soft, _)) if soft >= want => {}
        Ok((soft, hard)) => tracing::warn!(
            "open-file limit is {soft} (hard {hard}), below limits.max_connections + {FD_HEADROOM} \
             = {want}: fewer connections than limits.max_connections will fit, and the rest \
             wait in the backlog; raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower \
             limits.max_connections"
        ),
        Err(e) => tracing::warn!("cannot read or raise the open-file limit: {e}"),
    }
}

/// Raises this process's soft open-file limit (RLIMIT_NOFILE) to `want`, capped at the
/// hard limit, if it is lower; never lowers it. Returns the soft and hard limits in force
/// afterwards. `serve` calls it for `limits.max_connections`; tests and benches that hold
/// many sockets call it too.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 here, but not on every target
pub fn raise_open_file_limit(want: u64) -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (soft, hard) = (lim.rlim_cur as u64, lim.rlim_max as u64);
    if soft >= want {
        return Ok((soft, hard));
    }
    // A hard limit of "unlimited" still stops at the kernel's per-process maximum
    // (fs.nr_open): asking past it fails with EPERM.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    let raised = want.min(hard).min(nr_open);
    if raised <= soft {
        return Ok((soft, hard));
    }
    lim.rlim_cur = raised as libc::rlim_t;
    // SAFETY: setrlimit reads the rlimit we pass; the soft value is within the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    tracing::info!("raised the open-file limit from {soft} to {raised}");
    Ok((raised, hard))
}

/// The CPUs this process may run on (respects `taskset` and cgroup cpusets).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data for which all-zero is a valid (empty) set, and
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: as above; the set is fully initialised before sched_setaffinity reads it,
    // and pid 0 means the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_raised_within_the_hard_limit() {
        let (soft, hard) = raise_open_file_limit(0).unwrap();
        assert!(soft <= hard);
        // Asking for less changes nothing.
        assert_eq!(raise_open_file_limit(soft / 2).unwrap(), (soft, hard));
        // Asking for more gets it, up to the hard limit and never past it.
        let want = soft.saturating_add(10);
        let (now, hard_now) = raise_open_file_limit(want).unwrap();
        assert_eq!(hard_now, hard);
        assert_eq!(now, want.min(hard));
        // All the way: the hard limit, or the kernel's maximum where that is lower (a hard
        // limit of "unlimited").
        let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .map_or(u64::MAX, |s| s.trim().parse().unwrap_or(u64::MAX));
        let (top, _) = raise_open_file_limit(u64::MAX).unwrap();
        assert_eq!(top, hard.min(nr_open));
    }
}
