//! Shared helpers for the black-box tests: spawn `ringrelay serve` on a free loopback port
//! with a given configuration (and kill it on drop), talk SMTP over raw sockets with
//! bounded reads, signal the process and read its log.
//!
//! For store and forward (`tests/relay_*.rs`): the relay with a spool and routes
//! ([`Opts::relay`], restartable on the same port), `loadgen sink`/`send` as real peers
//! ([`Sink`], [`SendRun`]; the binary is found next to `ringrelay`, or built once),
//! `ringrelay queue` and the spool's segment files, messages the sink can verify
//! ([`verifiable_message`], [`write_manifest`]), and an in-process capturing server built
//! on the library API ([`Capture`]).
//!
//! Every read has a timeout and every wait a deadline, so no test can hang.

#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The host name every test configuration sets, so replies are predictable.
pub const HOST: &str = "relay.test";

/// How long any single read may block before the test fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a server may take to start listening.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// Generates one `#[test]` per I/O driver for a function `fn name(io: &str)`:
/// `name::uring` and `name::epoll`.
#[macro_export]
macro_rules! io_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn uring() {
                    super::$name("uring");
                }
                #[test]
                fn epoll() {
                    super::$name("epoll");
                }
            }
        )*
    };
}

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

/// One SMTP reply: a code and its text lines (without `NNN-` / `NNN `).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The reply as it was on the wire, lines joined with `\n`, without CRLF.
    pub fn wire(&self) -> String {
        let last = self.lines.len() - 1;
        self.lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{}{}{}", self.code, if i == last { ' ' } else { '-' }, l))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The first text line.
    pub fn text(&self) -> &str {
        &self.lines[0]
    }

    /// The enhanced status code (first word of the first line).
    pub fn enhanced(&self) -> &str {
        self.text().split(' ').next().unwrap_or("")
    }

    /// Asserts the code and the enhanced status code.
    #[track_caller]
    pub fn assert(&self, code: u16, enhanced: &str) {
        assert!(
            self.code == code && self.enhanced() == enhanced,
            "expected {code} {enhanced}, got {:?}",
            self.wire()
        );
    }

    /// Asserts the reply is exactly `wire` (one line, no CRLF).
    #[track_caller]
    pub fn assert_is(&self, wire: &str) {
        assert_eq!(self.wire(), wire);
    }

    /// The queue ID of a `250 2.0.0 Ok: queued as ID` reply, checked to be 20 characters
    /// of Crockford base 32.
    #[track_caller]
    pub fn queued_id(&self) -> String {
        let id = self
            .text()
            .strip_prefix("2.0.0 Ok: queued as ")
            .filter(|_| self.code == 250 && self.lines.len() == 1)
            .unwrap_or_else(|| {
                panic!(
                    "expected `250 2.0.0 Ok: queued as ID`, got {:?}",
                    self.wire()
                )
            });
        assert!(
            id.len() == 20
                && id
                    .bytes()
                    .all(|b| b"0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(&b)),
            "bad queue id {id:?}"
        );
        id.to_string()
    }

    /// True for `250 2.0.0 Ok: queued as …`.
    pub fn is_queued(&self) -> bool {
        self.code == 250 && self.text().starts_with("2.0.0 Ok: queued as ")
    }
}

/// A raw SMTP client over a `TcpStream`, reading whole (multi-line) replies.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

/// Why reading a reply failed.
#[derive(Debug)]
pub enum ReadError {
    /// The server closed (cleanly or by reset) with no partial reply pending.
    Eof,
    /// Nothing complete within the read timeout.
    Timeout(String),
    /// Bytes that are not a well-formed reply line, or a partial line at EOF.
    Malformed(String),
}

impl Client {
    /// Connects (no banner read).
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, READ_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Client::from_stream(stream)
    }

    /// Connects from the local address `source` (e.g. 127.0.0.2, to act as a client
    /// outside `relay.mynetworks`); no banner read.
    pub fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Client {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        socket
            .bind(&SocketAddr::new(source, 0).into())
            .unwrap_or_else(|e| panic!("bind {source}: {e}"));
        socket
            .connect_timeout(&addr.into(), READ_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr} from {source}: {e}"));
        Client::from_stream(socket.into())
    }

    /// Wraps a connected stream; sets the read timeout and TCP_NODELAY.
    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Changes the read timeout.
    pub fn set_read_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    /// Writes raw bytes.
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream
            .write_all(bytes.as_ref())
            .unwrap_or_else(|e| panic!("write: {e}"));
    }

    /// Writes raw bytes, reporting a failure instead of panicking.
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes `line` plus CRLF.
    pub fn line(&mut self, line: &str) {
        self.send(format!("{line}\r\n"));
    }

    /// Writes `line` plus CRLF and reads one reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.line(line);
        self.reply()
    }

    /// Sends `line` and asserts the reply's code and enhanced code.
    #[track_caller]
    pub fn expect(&mut self, line: &str, code: u16, enhanced: &str) -> Reply {
        let r = self.cmd(line);
        assert!(
            r.code == code && r.enhanced() == enhanced,
            "{line:?}: expected {code} {enhanced}, got {:?}",
            r.wire()
        );
        r
    }

    /// `EHLO client.test`; asserts the exact capability list for `max_size`.
    #[track_caller]
    pub fn ehlo(&mut self, max_size: usize) {
        let r = self.cmd("EHLO client.test");
        assert_ehlo(&r, max_size);
    }

    /// Reads one reply; panics on EOF, timeout or garbage.
    #[track_caller]
    pub fn reply(&mut self) -> Reply {
        match self.try_reply() {
            Ok(r) => r,
            Err(e) => panic!("reading a reply: {e:?}"),
        }
    }

    /// Reads one complete reply, checking every line's form (`NNN-text` CRLF … `NNN text`
    /// CRLF, one code throughout).
    pub fn try_reply(&mut self) -> Result<Reply, ReadError> {
        let mut code = None;
        let mut lines = Vec::new();
        loop {
            let line = self.read_line()?;
            let bad = || ReadError::Malformed(line.clone());
            if line.len() < 3 || !line.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
                return Err(bad());
            }
            let c: u16 = line[..3].parse().map_err(|_| bad())?;
            if code.is_some_and(|k| k != c) {
                return Err(bad());
            }
            code = Some(c);
            let (sep, text) = match line.as_bytes().get(3) {
                None => (b' ', ""),
                Some(&s) => (s, &line[4..]),
            };
            lines.push(text.to_string());
            match sep {
                b' ' => return Ok(Reply { code: c, lines }),
                b'-' => continue,
                _ => return Err(bad()),
            }
        }
    }

    /// Reads one CRLF-terminated line (CRLF stripped); a bare LF is malformed.
    fn read_line(&mut self) -> Result<String, ReadError> {
        loop {
            if let Some(lf) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=lf).collect();
                let text = String::from_utf8_lossy(&raw).into_owned();
                return match raw.strip_suffix(b"\r\n") {
                    Some(line) => Ok(String::from_utf8_lossy(line).into_owned()),
                    None => Err(ReadError::Malformed(text)),
                };
            }
            if self.eof {
                return if self.buf.is_empty() {
                    Err(ReadError::Eof)
                } else {
                    Err(ReadError::Malformed(format!(
                        "partial line at EOF: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    )))
                };
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> Result<(), ReadError> {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => self.eof = true,
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => self.eof = true,
            // A signal (SIGCHLD from the `kill` we ran) interrupted the read: read again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::Timeout(format!(
                    "no complete reply; buffered: {:?}",
                    String::from_utf8_lossy(&self.buf)
                )))
            }
            Err(e) => return Err(ReadError::Malformed(format!("read error: {e}"))),
        }
        Ok(())
    }

    /// Reads replies until the server closes; panics on timeout or garbage.
    #[track_caller]
    pub fn replies_to_eof(&mut self) -> Vec<Reply> {
        let mut out = Vec::new();
        loop {
            match self.try_reply() {
                Ok(r) => out.push(r),
                Err(ReadError::Eof) => return out,
                Err(e) => panic!("after {:?}: {e:?}", wires(&out)),
            }
        }
    }

    /// Asserts the server closes with nothing more to say.
    #[track_caller]
    pub fn expect_eof(&mut self) {
        match self.try_reply() {
            Err(ReadError::Eof) => {}
            Ok(r) => panic!("expected EOF, got reply {:?}", r.wire()),
            Err(e) => panic!("expected EOF, got {e:?}"),
        }
    }

    /// Half-closes our side (no more data from us).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

/// Wire forms of `replies`, for messages and comparisons.
pub fn wires(replies: &[Reply]) -> Vec<String> {
    replies.iter().map(Reply::wire).collect()
}

/// Asserts `r` is our exact EHLO reply.
#[track_caller]
pub fn assert_ehlo(r: &Reply, max_size: usize) {
    let want = [
        HOST.to_string(),
        "PIPELINING".into(),
        format!("SIZE {max_size}"),
        "8BITMIME".into(),
        "ENHANCEDSTATUSCODES".into(),
    ];
    assert!(
        r.code == 250 && r.lines == want,
        "EHLO reply: {:?}",
        r.wire()
    );
}

/// Asserts `replies` match `expected`, one `(code, prefix)` each, where `prefix` must
/// begin the first text line (usually the enhanced code, possibly more text).
#[track_caller]
pub fn assert_sequence(replies: &[Reply], expected: &[(u16, &str)]) {
    let got: Vec<(u16, &str)> = replies.iter().map(|r| (r.code, r.text())).collect();
    let ok = got.len() == expected.len()
        && got
            .iter()
            .zip(expected)
            .all(|((c, t), (ec, ep))| c == ec && t.starts_with(ep));
    assert!(
        ok,
        "reply sequence differs\n  expected: {expected:?}\n  got:      {:#?}",
        wires(replies)
    );
}

/// The default `limits.max_message_size`.
pub const DEFAULT_MAX_SIZE: usize = 36_700_160;

/// A complete small message (headers, body, final CRLF) without the terminator.
pub fn message(subject: &str, body: &str) -> String {
    format!("From: a@example.org\r\nTo: b@example.org\r\nSubject: {subject}\r\n\r\n{body}\r\n")
}

// ---------------------------------------------------------------------------------------
// Store and forward: the relay's peers (`loadgen sink`/`send`, an in-process capturing
// server), `ringrelay queue`, spool inspection, messages the sink can verify.
// ---------------------------------------------------------------------------------------

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

/// Polls `f` every 50 ms until it gives `Ok`; panics with its last `Err` after `limit`.
#[track_caller]
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not within {limit:?}; last state:\n{last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The number at a dotted path (`"messages.unique"`) of a JSON report.
#[track_caller]
pub fn jnum(v: &serde_json::Value, path: &str) -> u64 {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {path} in {v:#}"))
}

/// A small PRNG (splitmix64): seeded from `RINGRELAY_TEST_SEED` or the clock, and the seed
/// printed, so a failing random schedule can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn seeded(what: &str) -> Rng {
        let seed = std::env::var("RINGRELAY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{what}: seed {seed} (replay with RINGRELAY_TEST_SEED={seed})");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
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

/// `ringrelay ARGS`, at most 30 s.
pub fn ringrelay_cmd(args: &[&std::ffi::OsStr]) -> Output {
    run_bounded(
        Command::new(env!("CARGO_BIN_EXE_ringrelay"))
            .args(args)
            .env("RUST_LOG", "warn"),
        Duration::from_secs(30),
    )
}

/// `ringrelay queue ARGS --spool SPOOL`.
pub fn queue(spool: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&std::ffi::OsStr> = vec!["queue".as_ref()];
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    all.push("--spool".as_ref());
    all.push(spool.as_os_str());
    ringrelay_cmd(&all)
}

/// `queue ARGS --json`, which must succeed with JSON on stdout.
#[track_caller]
fn queue_json(spool: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = queue(spool, &a);
    assert_eq!(out.code, Some(0), "ringrelay queue {a:?}: {out:?}");
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("ringrelay queue {a:?}: not JSON ({e}): {out:?}"))
}

/// `ringrelay queue stats --json`.
#[track_caller]
pub fn queue_stats(spool: &Path) -> serde_json::Value {
    queue_json(spool, &["stats"])
}

/// `ringrelay queue list --json`: one object per message.
#[track_caller]
pub fn queue_list(spool: &Path) -> Vec<serde_json::Value> {
    match queue_json(spool, &["list"]) {
        serde_json::Value::Array(a) => a,
        other => panic!("queue list --json is not an array: {other:#}"),
    }
}

/// The `id`s of `queue list --json`.
#[track_caller]
pub fn queue_ids(spool: &Path) -> std::collections::BTreeSet<String> {
    queue_list(spool)
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_string())
        .collect()
}

/// Waits until `queue stats` shows no message; returns the stats.
#[track_caller]
pub fn wait_queue_empty(spool: &Path, limit: Duration) -> serde_json::Value {
    try_wait_queue_empty(spool, limit)
        .unwrap_or_else(|last| panic!("the queue did not drain within {limit:?}:\n{last}"))
}

/// Waits until `queue stats` shows no message; `Err` (the last stats and list) after
/// `limit`.
pub fn try_wait_queue_empty(spool: &Path, limit: Duration) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + limit;
    loop {
        let stats = queue_stats(spool);
        if jnum(&stats, "messages") == 0 {
            return Ok(stats);
        }
        if Instant::now() > deadline {
            let list = queue_list(spool);
            let shown: Vec<_> = list.iter().take(10).collect();
            return Err(format!("{stats:#}\nfirst of {}: {shown:#?}", list.len()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `seg-*` files in a spool.
pub fn segment_files(spool: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(spool)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("seg-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits until the spool holds no segment file.
#[track_caller]
pub fn wait_no_segments(spool: &Path, limit: Duration) {
    wait_for(limit, "the spool's segment files to be deleted", || {
        let segs = segment_files(spool);
        if segs.is_empty() {
            Ok(())
        } else {
            Err(format!("{segs:?}"))
        }
    })
}

/// A message `loadgen sink` verifies: `X-Loadgen-Id: RUN-SEQ` and the body's CRC-32C in
/// `X-Loadgen-Checksum`, with `extra_headers` (CRLF-terminated lines) and some lines that
/// start with a dot. Returns the loadgen ID and the unstuffed content (CRLF at the end).
pub fn verifiable_message(
    run: &str,
    seq: u64,
    extra_headers: &str,
    body_bytes: usize,
) -> (String, Vec<u8>) {
    let id = format!("{run}-{seq}");
    let mut body = format!("{id}\r\n.a line that starts with a dot\r\n.\r\n");
    let mut n = 0;
    while body.len() < body_bytes {
        body.push_str(&format!(
            "line {n} of the body of {id}, some filler text to make it longer\r\n"
        ));
        n += 1;
    }
    let sum = crc32c::crc32c(body.as_bytes());
    let data = format!(
        "From: <sender@client.test>\r\nTo: <rcpt@example.test>\r\n{extra_headers}\
         X-Loadgen-Id: {id}\r\nX-Loadgen-Checksum: {sum:08x}\r\n\r\n{body}"
    );
    (id, data.into_bytes())
}

/// Writes a complete loadgen manifest of `ids` for `sink --check-manifest`.
pub fn write_manifest(path: &Path, run: &str, ids: &[String]) {
    let mut text = format!("# loadgen manifest v1 run={run}\n");
    for id in ids {
        text.push_str(id);
        text.push('\n');
    }
    text.push_str(&format!("# end accepted={}\n", ids.len()));
    std::fs::write(path, text).expect("write manifest");
}

/// Dot-stuffs `data` (CRLF lines) and appends the terminator.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut line_start = true;
    for &b in data {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

impl Client {
    /// MAIL, RCPT each (all must get 250), DATA (354), the content; the final reply.
    #[track_caller]
    pub fn transaction(&mut self, from: &str, rcpts: &[&str], data: &[u8]) -> Reply {
        self.expect(&format!("MAIL FROM:<{from}>"), 250, "2.1.0");
        for r in rcpts {
            self.expect(&format!("RCPT TO:<{r}>"), 250, "2.1.5");
        }
        self.expect("DATA", 354, "End");
        self.send(dot_stuff(data));
        self.reply()
    }
}

/// Connects, EHLO, one transaction, QUIT; the reply after the data.
#[track_caller]
pub fn send_one(addr: SocketAddr, from: &str, rcpts: &[&str], data: &[u8]) -> Reply {
    let mut c = Client::connect(addr);
    let banner = c.reply();
    assert_eq!(banner.code, 220, "banner: {:?}", banner.wire());
    let ehlo = c.cmd("EHLO client.test");
    assert_eq!(ehlo.code, 250, "EHLO: {:?}", ehlo.wire());
    let r = c.transaction(from, rcpts, data);
    c.expect("QUIT", 221, "2.0.0");
    r
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

// ---------------------------------------------------------------------------------------
// MX routing (`tests/mx_*.rs`): sinks on several loopback addresses sharing one port (the
// relay delivers to MX hosts on `delivery.smtp_port`), the `[delivery]` keys pointing the
// relay at a test DNS server, and fields of a bounce.
// ---------------------------------------------------------------------------------------

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

/// The values of every `Name: value` line (case-insensitive name, value trimmed) anywhere
/// in `text`: e.g. `Status` or `Final-Recipient` of a bounce's delivery-status part.
pub fn dsn_values(text: &str, name: &str) -> Vec<String> {
    text.split("\r\n")
        .filter_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
        .collect()
}
