//! Shared helpers for the black-box tests: spawn `ringrelay serve` on a free loopback port
//! with a given configuration (and kill it on drop), talk SMTP over raw sockets with
//! bounded reads, signal the process and read its log.
//!
//! Every read has a timeout and every wait a deadline, so no test can hang.

#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
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
}

impl Opts {
    /// `--sink`, two shards, `hostname = "relay.test"` plus `extra`.
    pub fn new(io: &str, extra: &str) -> Self {
        Opts {
            io: io.to_string(),
            config: config(extra),
            sink: true,
            shards: 2,
        }
    }
}

/// What the sink says on exit: `sink: accepted N messages, R recipients, B bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkTotals {
    pub messages: u64,
    pub recipients: u64,
    pub bytes: u64,
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
        let mut last = String::new();
        for _ in 0..3 {
            match Relay::try_start(&opts) {
                Ok(relay) => return relay,
                Err(log) if log.contains("cannot listen") => last = log,
                Err(log) => panic!("ringrelay serve failed to start:\n{log}"),
            }
        }
        panic!("ringrelay serve could not bind a port:\n{last}");
    }

    fn try_start(opts: &Opts) -> Result<Relay, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("ringrelay.toml");
        std::fs::write(&config_path, &opts.config).expect("write config");
        let log = dir.path().join("stderr.log");
        let port = free_port();
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
