//! The relay's peers: `loadgen sink` as a next hop ([`Sink`]) and `loadgen send` as a
//! client ([`SendRun`]), the binary found next to `ringrelay` or built once
//! ([`loadgen_bin`]); an in-process SMTP server on the library API that records every
//! envelope ([`Capture`]); for MX routing (`tests/mx_*.rs`), sinks on several loopback
//! addresses sharing one port ([`sinks_sharing_port`]; the relay delivers to MX hosts on
//! `delivery.smtp_port`) and the `[delivery]` keys pointing the relay at a test DNS server
//! ([`mx_delivery`]; the DNS server itself is `tests/dnsfix`).

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{run_bounded, signal_pid, wait_for, START_DEADLINE};

/// `target/<profile>`: where `ringrelay` and `loadgen` are built.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// The `loadgen` binary next to `ringrelay`. `cargo test --workspace` builds it; after a
/// plain `cargo test` it is built here once (`cargo build -p loadgen`, at most 10 min).
pub fn loadgen_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = profile_dir();
        let bin = dir.join("loadgen");
        if bin.is_file() {
            return Ok(bin);
        }
        eprintln!(
            "note: {} missing; building it with cargo build -p loadgen",
            bin.display()
        );
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "loadgen"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name() == Some("release".as_ref()) {
            cmd.arg("--release");
        }
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let out = run_bounded(&mut cmd, Duration::from_secs(600));
        if out.code == Some(0) && bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "loadgen is not built at {} and `cargo build -p loadgen` failed ({:?}); \
                 run `cargo test --workspace` or `cargo build -p loadgen` first:\n{}",
                bin.display(),
                out.code,
                out.stderr
            ))
        }
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A running `loadgen sink`; SIGKILLed on drop if still running.
pub struct Sink {
    child: Child,
    pub addr: SocketAddr,
    json: PathBuf,
    out: PathBuf,
    err: PathBuf,
    status: Option<ExitStatus>,
    _dir: tempfile::TempDir,
}

impl Sink {
    /// `loadgen sink --listen 127.0.0.1:0 --json J ARGS`.
    pub fn start(args: &[&str]) -> Sink {
        Sink::try_start("127.0.0.1:0", args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// On a fixed port, waiting up to 5 s for it to be free (a sink replacing another).
    pub fn start_on(port: u16, args: &[&str]) -> Sink {
        let listen = format!("127.0.0.1:{port}");
        wait_for(Duration::from_secs(5), "loadgen sink start", || {
            Sink::try_start(&listen, args)
        })
    }

    pub fn try_start(listen: &str, args: &[&str]) -> Result<Sink, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("sink.json");
        let out = dir.path().join("stdout");
        let err = dir.path().join("stderr");
        let child = Command::new(loadgen_bin())
            .args(["sink", "--listen", listen, "--json"])
            .arg(&json)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("stdout file"))
            .stderr(File::create(&err).expect("stderr file"))
            .spawn()
            .expect("spawn loadgen sink");
        let mut sink = Sink {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            json,
            out,
            err,
            status: None,
            _dir: dir,
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let stdout = std::fs::read_to_string(&sink.out).unwrap_or_default();
            if let Some(line) = stdout.lines().next().filter(|_| stdout.contains('\n')) {
                let addr = line
                    .strip_prefix("listening on ")
                    .and_then(|a| a.trim().parse().ok())
                    .unwrap_or_else(|| panic!("loadgen sink's first line: {line:?}"));
                sink.addr = addr;
                return Ok(sink);
            }
            if let Some(status) = sink.child.try_wait().expect("try_wait") {
                sink.status = Some(status);
                return Err(format!(
                    "loadgen sink --listen {listen} exited with {status}: {}",
                    sink.output()
                ));
            }
            if Instant::now() > deadline {
                panic!("loadgen sink not listening after {START_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its stdout and stderr so far.
    pub fn output(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default()
        )
    }

    /// Waits up to `limit` for it to exit by itself (`--expect`, `--timeout`).
    pub fn try_wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
            if self.status.is_none() {
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.status
    }

    /// SIGTERM (if still running), wait up to 20 s, and return the exit code and the JSON.
    #[track_caller]
    pub fn stop(&mut self) -> (Option<i32>, serde_json::Value) {
        if self.status.is_none() && self.child.try_wait().expect("try_wait").is_none() {
            signal_pid(self.child.id(), libc::SIGTERM);
        }
        let status = self
            .try_wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("loadgen sink did not stop: {}", self.output()));
        (status.code(), self.report())
    }

    /// The JSON report written when it stopped.
    #[track_caller]
    pub fn report(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.json).unwrap_or_else(|e| {
            panic!(
                "no sink JSON {}: {e}; output:\n{}",
                self.json.display(),
                self.output()
            )
        });
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("sink JSON: {e}: {text}"))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A `loadgen send` run (in the background until [`SendRun::wait`]).
pub struct SendRun {
    child: Child,
    json: PathBuf,
    out: PathBuf,
    err: PathBuf,
    status: Option<ExitStatus>,
    _dir: tempfile::TempDir,
}

/// How a `loadgen send` run ended.
#[derive(Debug)]
pub struct SendResult {
    pub code: Option<i32>,
    /// The `--json` report (`Null` if it wrote none).
    pub json: serde_json::Value,
    /// stdout and stderr.
    pub output: String,
}

impl SendRun {
    /// `loadgen send --target TARGET --json J --no-progress ARGS`.
    pub fn spawn(target: SocketAddr, args: &[&str]) -> SendRun {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("send.json");
        let out = dir.path().join("stdout");
        let err = dir.path().join("stderr");
        let child = Command::new(loadgen_bin())
            .args([
                "send",
                "--no-progress",
                "--target",
                &target.to_string(),
                "--json",
            ])
            .arg(&json)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("stdout file"))
            .stderr(File::create(&err).expect("stderr file"))
            .spawn()
            .expect("spawn loadgen send");
        SendRun {
            child,
            json,
            out,
            err,
            status: None,
            _dir: dir,
        }
    }

    /// Runs to completion (at most `limit`).
    pub fn run(target: SocketAddr, args: &[&str], limit: Duration) -> SendResult {
        SendRun::spawn(target, args).wait(limit)
    }

    /// True once it has exited.
    pub fn finished(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status.is_some()
    }

    /// Waits for it to exit (SIGKILL and panic after `limit`).
    pub fn wait(&mut self, limit: Duration) -> SendResult {
        let deadline = Instant::now() + limit;
        while !self.finished() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "loadgen send still running after {limit:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let json = std::fs::read_to_string(&self.json)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        SendResult {
            code: self.status.and_then(|s| s.code()),
            json,
            output: self.output(),
        }
    }

    fn output(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default()
        )
    }
}

impl Drop for SendRun {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// An in-process SMTP server (the library API) that records every envelope: a next hop
/// whose received messages can be read whole.
pub struct Capture {
    handle: Option<ringrelay::ServerHandle>,
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<ringrelay::Envelope>>>,
}

struct CaptureHandler {
    seen: Arc<Mutex<Vec<ringrelay::Envelope>>>,
}

impl ringrelay::Handler for CaptureHandler {
    async fn on_message(&self, envelope: ringrelay::Envelope) -> Result<(), ringrelay::Reply> {
        self.seen.lock().unwrap().push(envelope);
        Ok(())
    }
}

impl Capture {
    /// One shard on `io`, host name `capture.test`, on a port of its own.
    pub fn start(io: &str) -> Capture {
        let mut config = ringrelay::Config {
            hostname: "capture.test".into(),
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            shards: 1,
            io: if io == "uring" {
                ringrelay::config::IoMode::Uring
            } else {
                ringrelay::config::IoMode::Epoll
            },
            ..ringrelay::Config::default()
        };
        config.limits.shutdown_timeout_secs = 2;
        let seen: Arc<Mutex<Vec<ringrelay::Envelope>>> = Arc::default();
        let s = Arc::clone(&seen);
        let handle = ringrelay::Server::new(config)
            .start(move |_| CaptureHandler {
                seen: Arc::clone(&s),
            })
            .expect("capture server starts");
        let addr = handle.local_addrs()[0];
        Capture {
            handle: Some(handle),
            addr,
            seen,
        }
    }

    /// What it received so far.
    pub fn envelopes(&self) -> Vec<ringrelay::Envelope> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages arrived; returns them all.
    #[track_caller]
    pub fn wait_for(&self, n: usize, limit: Duration) -> Vec<ringrelay::Envelope> {
        wait_for(limit, "messages at the capturing server", || {
            let seen = self.envelopes();
            if seen.len() >= n {
                Ok(seen)
            } else {
                Err(format!("{} of {n} arrived", seen.len()))
            }
        })
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.close_now();
            // Do not let a stuck join hang the test: give it 5 s.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(handle.join());
            });
            let _ = rx.recv_timeout(Duration::from_secs(5));
        }
    }
}

/// A port P free on every one of `ips` (loopback addresses such as `127.0.0.2`) right now:
/// bound on the first with port 0, then checked on the others. `None` if one is taken.
fn port_free_on(ips: &[&str]) -> Option<u16> {
    let first = TcpListener::bind((*ips.first()?, 0)).ok()?;
    let port = first.local_addr().ok()?.port();
    let others: Vec<TcpListener> = ips[1..]
        .iter()
        .map(|ip| TcpListener::bind((*ip, port)))
        .collect::<io::Result<_>>()
        .ok()?;
    drop(others);
    drop(first);
    Some(port)
}

/// Starts `loadgen sink` on each `(ip, args)` of `sinks`, all on one port P, such that P
/// was also free on every address of `free_ips` (MX hosts where nothing listens). Tries
/// other ports if one is taken meanwhile. Returns P and the sinks, in the order given.
#[track_caller]
pub fn sinks_sharing_port(sinks: &[(&str, &[&str])], free_ips: &[&str]) -> (u16, Vec<Sink>) {
    let ips: Vec<&str> = sinks
        .iter()
        .map(|(ip, _)| *ip)
        .chain(free_ips.iter().copied())
        .collect();
    let mut last = String::from("no port free on all of them");
    for _ in 0..20 {
        let Some(port) = port_free_on(&ips) else {
            continue;
        };
        let mut started = Vec::new();
        for (ip, args) in sinks {
            match Sink::try_start(&format!("{ip}:{port}"), args) {
                Ok(s) => started.push(s),
                Err(e) => {
                    last = e;
                    break;
                }
            }
        }
        if started.len() == sinks.len() {
            return (port, started);
        }
    }
    panic!("cannot start sinks on one shared port on {ips:?}: {last}");
}

/// `[delivery]` keys for MX routing: `dns` as the only name server, delivery on
/// `smtp_port`, plus `extra` (more `[delivery]` keys).
pub fn mx_delivery(dns: SocketAddr, smtp_port: u16, extra: &str) -> String {
    format!("nameservers = [\"{dns}\"]\nsmtp_port = {smtp_port}\n{extra}")
}
