//! `ringrelay serve` as a child process: its options ([`Opts`]: a `--sink` server or the
//! relay with a spool and routes, on a free loopback port or a fixed one for a restart),
//! the running process ([`Relay`]: ready once it logs that it listens, signalled, stopped,
//! killed on drop, its log and the sink's totals), and running other commands with a
//! deadline ([`run_bounded`]).

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{Client, HOST, START_DEADLINE};

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A configuration file body: `hostname = "relay.test"` plus `extra` (TOML).
pub fn config(extra: &str) -> String {
    format!("hostname = \"{HOST}\"\n{extra}\n")
}

/// How to run `ringrelay serve`.
#[derive(Clone, Debug)]
pub struct Opts {
    /// `uring` or `epoll`.
    pub io: String,
    /// TOML text of the config file.
    pub config: String,
    /// Pass `--sink`.
    pub sink: bool,
    /// `--shards`.
    pub shards: usize,
    /// `--spool DIR` (the relay; `sink` should then be false).
    pub spool: Option<PathBuf>,
    /// `--route DOMAIN=HOST:PORT`, each.
    pub routes: Vec<String>,
    /// Listen on this port instead of a free one (a restart on the same address).
    pub port: Option<u16>,
    /// Start the server with this soft open-file limit (the hard one unchanged).
    pub nofile: Option<u64>,
}

impl Opts {
    /// `--sink`, two shards, `hostname = "relay.test"` plus `extra`.
    pub fn new(io: &str, extra: &str) -> Self {
        Opts {
            io: io.to_string(),
            config: config(extra),
            sink: true,
            shards: 2,
            spool: None,
            routes: Vec::new(),
            port: None,
            nofile: None,
        }
    }

    /// The relay (no `--sink`): two shards, spool `spool`, `--route` for each
    /// `(domain, next hop)`, and `[delivery] retry_schedule_secs = retry` plus
    /// `delivery_extra` (more `[delivery]` keys).
    pub fn relay(
        io: &str,
        spool: &Path,
        routes: &[(&str, SocketAddr)],
        retry: &[u64],
        delivery_extra: &str,
    ) -> Self {
        let retry: Vec<String> = retry.iter().map(u64::to_string).collect();
        Opts {
            io: io.to_string(),
            config: config(&format!(
                "[delivery]\nretry_schedule_secs = [{}]\n{delivery_extra}",
                retry.join(", ")
            )),
            sink: false,
            shards: 2,
            spool: Some(spool.to_path_buf()),
            routes: routes.iter().map(|(d, a)| format!("{d}={a}")).collect(),
            port: None,
            nofile: None,
        }
    }

    /// The same, on a fixed port.
    pub fn on_port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
}

/// What the sink says on exit: `sink: accepted N messages, R recipients, B bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkTotals {
    pub messages: u64,
    pub recipients: u64,
    pub bytes: u64,
}

/// Lifts this test process's soft open-file limit (to at most 8192, within the hard one)
/// once: tests that hold hundreds of client sockets run in parallel threads, and a soft
/// limit of 1024 would make their connects fail with EMFILE.
fn raise_own_fd_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ringrelay::raise_open_file_limit(8192);
    });
}

/// A running `ringrelay serve` process; killed (SIGKILL) on drop if still alive.
pub struct Relay {
    child: Child,
    pub addr: SocketAddr,
    pub io: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
    status: Option<ExitStatus>,
}

impl Relay {
    /// Starts a sink server (2 shards) with `extra` config on `io`.
    pub fn start(io: &str, extra: &str) -> Relay {
        Relay::start_with(Opts::new(io, extra))
    }

    /// Starts a server and waits until it listens (its "listening on" log line, which
    /// comes after every listener is bound; see the `ready` doc below).
    pub fn start_with(opts: Opts) -> Relay {
        // A port picked by `free_port` can be taken by someone else before the server
        // binds it; try again with another port in that (rare) case.
        // On a fixed port (a restart), wait a little for the old owner's socket instead.
        let mut last = String::new();
        let tries = if opts.port.is_some() { 20 } else { 3 };
        for _ in 0..tries {
            match Relay::try_start(&opts) {
                Ok(relay) => return relay,
                Err(log) if log.contains("cannot listen") => last = log,
                Err(log) => panic!("ringrelay serve failed to start:\n{log}"),
            }
            if opts.port.is_some() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("ringrelay serve could not bind a port:\n{last}");
    }

    fn try_start(opts: &Opts) -> Result<Relay, String> {
        raise_own_fd_limit();
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("ringrelay.toml");
        std::fs::write(&config_path, &opts.config).expect("write config");
        let log = dir.path().join("stderr.log");
        let port = opts.port.unwrap_or_else(free_port);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringrelay"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", &addr.to_string()])
            .args(["--shards", &opts.shards.to_string()])
            .args(["--io", &opts.io])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create log"));
        if opts.sink {
            cmd.arg("--sink");
        }
        if let Some(spool) = &opts.spool {
            cmd.arg("--spool").arg(spool);
        }
        for route in &opts.routes {
            cmd.args(["--route", route]);
        }
        if let Some(soft) = opts.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the forked child before exec and calls only getrlimit and
            // setrlimit, which are async-signal-safe, on a struct it owns.
            unsafe {
                cmd.pre_exec(move || {
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    lim.rlim_cur = soft.min(lim.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn ringrelay");
        let mut relay = Relay {
            child,
            addr,
            io: opts.io.clone(),
            log,
            _dir: dir,
            status: None,
        };
        relay.ready()?;
        Ok(relay)
    }

    /// Waits for the "listening on ADDR" log line. The listeners are bound and listening
    /// before that line is written, so a connect after it always reaches the server; unlike
    /// a probe connection, this takes no connection slot (which would disturb the
    /// connection-cap tests). Also checks the driver is the one asked for.
    fn ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        let want = format!("listening on {}", self.addr);
        loop {
            let log = self.stderr();
            if let Some(line) = log.lines().find(|l| l.contains(&want)) {
                let driver = if self.io == "uring" {
                    "io_uring"
                } else {
                    "epoll"
                };
                assert!(
                    line.contains(&format!("io {driver}")),
                    "asked for --io {}, server says: {line}",
                    self.io
                );
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.status = Some(status);
                return Err(format!(
                    "exited with {status} before listening; log:\n{log}"
                ));
            }
            if Instant::now() > deadline {
                panic!("server not listening after {START_DEADLINE:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident memory now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read the server's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// Everything the server has logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects and reads the banner, which must be exactly `220 relay.test ESMTP ringrelay`.
    pub fn connect(&self) -> Client {
        let mut c = Client::connect(self.addr);
        let banner = c.reply();
        assert_eq!(
            banner.wire(),
            format!("220 {HOST} ESMTP ringrelay"),
            "banner ({} driver)",
            self.io
        );
        c
    }

    /// The configuration file it was started with (rewrite it, then SIGHUP, to reload).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("ringrelay.toml")
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.status = Some(status);
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the process to exit; panics (with the log) if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.try_wait_exit(timeout) {
            Some(status) => status,
            None => panic!(
                "server still running {timeout:?} after being asked to stop; log:\n{}",
                self.stderr()
            ),
        }
    }

    /// SIGKILL, and reap it: a crash at an arbitrary moment.
    pub fn kill9(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = Some(self.child.wait().expect("wait after SIGKILL"));
        }
    }

    /// SIGTERM and expect exit status 0 within 15 s (the relay: no sink totals).
    #[track_caller]
    pub fn terminate(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(15));
        assert_eq!(
            status.code(),
            Some(0),
            "exit status after SIGTERM; log:\n{}",
            self.stderr()
        );
    }

    /// SIGTERM, expect exit status 0 within 10 s, and return the sink's totals.
    pub fn stop(&mut self) -> SinkTotals {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(10));
        let log = self.stderr();
        assert_eq!(status.code(), Some(0), "exit status; log:\n{log}");
        sink_totals(&log).unwrap_or_else(|| panic!("no sink totals in log:\n{log}"))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Parses the sink's last `sink: accepted N messages, R recipients, B bytes` line.
pub fn sink_totals(log: &str) -> Option<SinkTotals> {
    let line = log.lines().rev().find(|l| l.contains("sink: accepted "))?;
    let rest = &line[line.find("sink: accepted ")? + "sink: accepted ".len()..];
    let nums: Vec<u64> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect::<Option<_>>()?;
    match nums[..] {
        [messages, recipients, bytes] => Some(SinkTotals {
            messages,
            recipients,
            bytes,
        }),
        _ => None,
    }
}

/// A finished command.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion; kills it and panics after `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    try_run_bounded(cmd, limit).unwrap_or_else(|out| {
        panic!(
            "{cmd:?} still running after {limit:?}; stderr:\n{}",
            out.stderr
        )
    })
}

/// Runs `cmd` to completion; after `limit` kills it and gives `Err` with what it wrote.
pub fn try_run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output, Output> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out).expect("stdout file"))
        .stderr(File::create(&err).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = Output {
        code: status.and_then(|s| s.code()),
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    };
    if status.is_some() {
        Ok(output)
    } else {
        Err(output)
    }
}

/// Sends signal `sig` (a `libc::SIG*`) to `pid`.
pub fn signal_pid(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a plain pid and signal number.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
}
