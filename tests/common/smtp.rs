//! The raw SMTP test client: [`Client`] over a `TcpStream`, reading whole multi-line
//! replies ([`Reply`]) with a timeout and checking their form; commands with an expected
//! reply ([`Client::expect`], [`Client::ehlo`]); a whole mail transaction
//! ([`Client::transaction`], and [`send_one`] for a session of one); the assertions on
//! replies ([`assert_ehlo`], [`assert_sequence`]); small messages ([`message`],
//! [`dot_stuff`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use super::{HOST, READ_TIMEOUT};

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

    /// A whole mail transaction (after EHLO): `MAIL FROM:<from>` (must get 250 2.1.0),
    /// `RCPT TO:<r>` for each of `rcpts` (250 2.1.5 each), `DATA` (354), then `data`
    /// dot-stuffed and terminated. Returns the reply to the final dot, for the caller to
    /// check (queued, refused, …).
    #[track_caller]
    pub fn transaction(&mut self, from: &str, rcpts: &[&str], data: &[u8]) -> Reply {
        self.start_data(from, rcpts);
        self.send(dot_stuff(data));
        self.reply()
    }

    /// The first half of [`Client::transaction`]: MAIL, each RCPT and DATA, answered as
    /// there; the caller sends the content next, its own way (in pieces, already stuffed,
    /// or never finished).
    #[track_caller]
    pub fn start_data(&mut self, from: &str, rcpts: &[&str]) {
        self.expect(&format!("MAIL FROM:<{from}>"), 250, "2.1.0");
        for r in rcpts {
            self.expect(&format!("RCPT TO:<{r}>"), 250, "2.1.5");
        }
        self.expect("DATA", 354, "End");
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
        "CHUNKING".into(),
        "DSN".into(),
        "SMTPUTF8".into(),
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
