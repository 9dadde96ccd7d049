//! The sink's SMTP server side: one connection's ESMTP dialogue (PIPELINING, SIZE, 8BITMIME,
//! ENHANCEDSTATUSCODES, and STARTTLS per RFC 3207 when given a certificate), fault injection,
//! and handing each message's verdict to the counters. Replies are batched until the input is
//! exhausted, which is what makes pipelining cheap.

use crate::data_scan::{DataScan, Verdict};
use crate::ids::IdRegistry;
use crate::message::push_u64;
use crate::report::SinkStats;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

/// Where injected failures are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailStage {
    /// Every RCPT of the message gets 4xx/5xx (DATA then gets 554: no valid recipients).
    Rcpt,
    /// The end of DATA gets 4xx/5xx.
    Data,
}

impl FailStage {
    pub fn name(self) -> &'static str {
        match self {
            FailStage::Rcpt => "rcpt",
            FailStage::Data => "data",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub hostname: String,
    /// Shares of messages to fail, as fractions (0..=1).
    pub tempfail: f64,
    pub permfail: f64,
    pub stage: FailStage,
    pub delay: Option<Duration>,
    pub max_size: u64,
    pub expect: Option<u64>,
    /// With a certificate: STARTTLS is offered.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// State shared by every sink thread.
pub struct ServerShared {
    pub cfg: ServerConfig,
    pub ids: IdRegistry,
    fates: AtomicU64,
    /// Numbers the `queued as` replies, across all threads, so no two repeat.
    queued: AtomicU64,
    pub expect_reached: Notify,
    banner: Vec<u8>,
    ehlo: Vec<u8>,
    /// The EHLO reply inside TLS: STARTTLS is no longer offered.
    ehlo_tls: Vec<u8>,
    helo: Vec<u8>,
    tls: Option<TlsAcceptor>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Ok,
    Temp,
    Perm,
}

impl ServerShared {
    pub fn new(cfg: ServerConfig) -> ServerShared {
        let h = &cfg.hostname;
        let banner = format!("220 {h} ESMTP loadgen sink\r\n").into_bytes();
        let ehlo_with = |starttls: &str| {
            format!(
                "250-{h}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n{starttls}250 ENHANCEDSTATUSCODES\r\n",
                cfg.max_size
            )
            .into_bytes()
        };
        let ehlo_tls = ehlo_with("");
        let ehlo = if cfg.tls.is_some() {
            ehlo_with("250-STARTTLS\r\n")
        } else {
            ehlo_tls.clone()
        };
        let helo = format!("250 {h}\r\n").into_bytes();
        let tls = cfg.tls.clone().map(TlsAcceptor::from);
        ServerShared {
            cfg,
            ids: IdRegistry::default(),
            fates: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            expect_reached: Notify::new(),
            banner,
            ehlo,
            ehlo_tls,
            helo,
            tls,
        }
    }

    /// Decides a message's fate. Message k fails when frac(k·φ) falls in the failure band: a
    /// low-discrepancy sequence, so the shares are exact within a message or two at any count
    /// and across threads, without randomness making tests flaky.
    fn fate(&self) -> Fate {
        let (t, p) = (self.cfg.tempfail, self.cfg.permfail);
        if t <= 0.0 && p <= 0.0 {
            return Fate::Ok;
        }
        let k = self.fates.fetch_add(1, Ordering::Relaxed);
        let x = (k as f64 * 0.618_033_988_749_894_9).fract();
        if x < t {
            Fate::Temp
        } else if x < t + p {
            Fate::Perm
        } else {
            Fate::Ok
        }
    }
}

/// Read buffer per connection. Large enough that a 1 KiB pipelined transaction, or a good
/// chunk of a large message, arrives in one read.
const BUF: usize = 64 * 1024;

#[derive(PartialEq, Eq)]
enum Mode {
    Command,
    Data,
}

struct Txn {
    active: bool,
    fate: Fate,
    rcpts: u64,
}

/// Records a connection's end even if its task is cancelled at shutdown.
struct ConnGuard {
    stats: Rc<RefCell<SinkStats>>,
    active: Rc<Cell<usize>>,
    msgs: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.active.set(self.active.get().saturating_sub(1));
        if let Ok(mut s) = self.stats.try_borrow_mut() {
            s.open = s.open.saturating_sub(1);
            s.msgs_per_conn.record_value(self.msgs);
        }
    }
}

struct Conn<'a> {
    sh: &'a ServerShared,
    out: Vec<u8>,
    mode: Mode,
    txn: Txn,
    scan: DataScan,
    /// In command mode, an overlong line is being discarded up to its newline.
    skip_line: bool,
    quit: bool,
    tls: TlsState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TlsState {
    Plain,
    /// STARTTLS was answered 220: the handshake comes next, nothing else is read.
    Starting,
    Active,
}

/// Serves one connection until the client quits or the connection fails. Nothing the client
/// sends can make this panic: every malformed input gets an SMTP error reply.
pub async fn serve(
    mut stream: TcpStream,
    sh: &ServerShared,
    stats: Rc<RefCell<SinkStats>>,
    active: Rc<Cell<usize>>,
) {
    active.set(active.get() + 1);
    stats.borrow_mut().open += 1;
    let mut guard = ConnGuard {
        stats: stats.clone(),
        active,
        msgs: 0,
    };
    let mut c = Conn {
        sh,
        out: Vec::with_capacity(1024),
        mode: Mode::Command,
        txn: Txn {
            active: false,
            fate: Fate::Ok,
            rcpts: 0,
        },
        scan: DataScan::default(),
        skip_line: false,
        quit: false,
        tls: TlsState::Plain,
    };
    c.out.extend_from_slice(&sh.banner);
    let mut buf = vec![0u8; BUF];
    session(&mut stream, &mut c, &mut buf, &stats, &mut guard).await;
    if c.tls != TlsState::Starting {
        return;
    }
    // STARTTLS was answered 220. Whatever the client sent after the command is still in
    // `buf` and is dropped with it: only bytes read through TLS count (CVE-2011-0411).
    let Some(acceptor) = sh.tls.clone() else {
        return;
    };
    let t = Instant::now();
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
    let mut tls = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(_)) | Err(_) => {
            stats.borrow_mut().tls_failures += 1;
            return;
        }
    };
    {
        let mut st = stats.borrow_mut();
        st.tls_sessions += 1;
        st.tls_handshake.record(t.elapsed());
    }
    // A fresh SMTP session: the client must say EHLO again (RFC 3207 section 4.2).
    c.tls = TlsState::Active;
    c.mode = Mode::Command;
    c.skip_line = false;
    c.reset_txn();
    session(&mut tls, &mut c, &mut buf, &stats, &mut guard).await;
    let _ = tls.shutdown().await;
}

/// How long the sink waits for a client's TLS handshake after its 220 to STARTTLS.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the SMTP dialogue over one stream (plain, or TLS after STARTTLS) until the client
/// quits, the connection fails, or STARTTLS was accepted (then `c.tls` is `Starting` and the
/// 220 has been written). Generic, so the plain path is compiled as if TLS did not exist.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    c: &mut Conn<'_>,
    buf: &mut [u8],
    stats: &RefCell<SinkStats>,
    guard: &mut ConnGuard,
) {
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        let mut cmds = 0u32;
        {
            let mut st = stats.borrow_mut();
            while !c.quit && c.tls != TlsState::Starting {
                if c.mode == Mode::Data {
                    let (n, done) = c.scan.feed(&buf[start..end], end - start == BUF);
                    start += n;
                    if !done {
                        break;
                    }
                    c.end_of_data(&mut st, &mut guard.msgs);
                    continue;
                }
                let rest = &buf[start..end];
                match memchr::memchr(b'\n', rest) {
                    Some(i) => {
                        start += i + 1;
                        if std::mem::take(&mut c.skip_line) {
                            continue;
                        }
                        cmds += 1;
                        c.command(&rest[..=i], &mut st);
                    }
                    None => {
                        if end - start == BUF {
                            // A command line longer than the whole buffer.
                            if !c.skip_line {
                                st.bad_commands += 1;
                                c.out
                                    .extend_from_slice(b"500 5.5.0 Error: line too long\r\n");
                            }
                            c.skip_line = true;
                            start = end;
                        }
                        break;
                    }
                }
            }
            if cmds > 1 {
                st.pipelined_groups += 1;
            }
        }
        if !c.out.is_empty() {
            if let Some(d) = c.sh.cfg.delay {
                tokio::time::sleep(d).await;
            }
            if stream.write_all(&c.out).await.is_err() {
                return;
            }
            c.out.clear();
        }
        if c.quit || c.tls == TlsState::Starting {
            if c.quit {
                // Over TLS this sends close_notify; over TCP it is a no-op flush.
                let _ = stream.flush().await;
            }
            return;
        }
        if start == end {
            start = 0;
            end = 0;
        } else if end == BUF || start > BUF / 2 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        match stream.read(&mut buf[end..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => end += n,
        }
    }
}

fn strip_eol(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

fn has_prefix_ci(s: &[u8], p: &[u8]) -> bool {
    s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p)
}

/// The SIZE= parameter of a MAIL command, if any.
fn size_param(args: &[u8]) -> Option<u64> {
    args.split(|&c| c == b' ').find_map(|t| {
        if has_prefix_ci(t, b"SIZE=") {
            std::str::from_utf8(&t[5..]).ok()?.parse().ok()
        } else {
            None
        }
    })
}

impl Conn<'_> {
    fn reply(&mut self, r: &[u8]) {
        self.out.extend_from_slice(r);
    }

    fn reset_txn(&mut self) {
        self.txn = Txn {
            active: false,
            fate: Fate::Ok,
            rcpts: 0,
        };
    }

    fn command(&mut self, line: &[u8], st: &mut SinkStats) {
        let l = strip_eol(line);
        let verb: [u8; 4] = match l.get(..4) {
            Some(v) => [v[0], v[1], v[2], v[3]].map(|c| c.to_ascii_uppercase()),
            None => [0; 4],
        };
        let args = &l[l.len().min(4)..];
        match &verb {
            b"EHLO" => {
                self.reset_txn();
                let ehlo = if self.tls == TlsState::Active {
                    &self.sh.ehlo_tls
                } else {
                    &self.sh.ehlo
                };
                self.out.extend_from_slice(ehlo);
            }
            b"HELO" => {
                self.reset_txn();
                self.out.extend_from_slice(&self.sh.helo);
            }
            b"MAIL" => {
                if self.txn.active {
                    st.bad_commands += 1;
                    self.reply(b"503 5.5.1 Error: nested MAIL command\r\n");
                } else if !has_prefix_ci(args, b" FROM:") {
                    st.bad_commands += 1;
                    self.reply(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n");
                } else if size_param(args).is_some_and(|s| s > self.sh.cfg.max_size) {
                    self.reply(b"552 5.3.4 Message size exceeds fixed limit\r\n");
                } else {
                    self.txn.active = true;
                    self.txn.fate = self.sh.fate();
                    // At the RCPT stage the fate is final now; count the message here.
                    if self.sh.cfg.stage == FailStage::Rcpt {
                        match self.txn.fate {
                            Fate::Temp => st.tempfailed += 1,
                            Fate::Perm => st.permfailed += 1,
                            Fate::Ok => {}
                        }
                    }
                    self.reply(b"250 2.1.0 Ok\r\n");
                }
            }
            b"RCPT" => {
                if !self.txn.active {
                    st.bad_commands += 1;
                    self.reply(b"503 5.5.1 Error: need MAIL command\r\n");
                } else if !has_prefix_ci(args, b" TO:") {
                    st.bad_commands += 1;
                    self.reply(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n");
                } else if self.sh.cfg.stage == FailStage::Rcpt && self.txn.fate != Fate::Ok {
                    st.rcpt_rejected += 1;
                    if self.txn.fate == Fate::Temp {
                        self.reply(
                            b"450 4.2.0 Recipient temporarily rejected (loadgen sink tempfail)\r\n",
                        );
                    } else {
                        self.reply(b"550 5.1.1 Recipient rejected (loadgen sink permfail)\r\n");
                    }
                } else {
                    self.txn.rcpts += 1;
                    self.reply(b"250 2.1.5 Ok\r\n");
                }
            }
            b"DATA" => {
                if !self.txn.active {
                    st.bad_commands += 1;
                    self.reply(b"503 5.5.1 Error: need RCPT command\r\n");
                } else if self.txn.rcpts == 0 {
                    self.reply(b"554 5.5.1 Error: no valid recipients\r\n");
                } else {
                    self.mode = Mode::Data;
                    self.scan.reset();
                    self.reply(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                }
            }
            b"RSET" => {
                self.reset_txn();
                self.reply(b"250 2.0.0 Ok\r\n");
            }
            b"NOOP" => self.reply(b"250 2.0.0 Ok\r\n"),
            b"QUIT" => {
                self.reply(b"221 2.0.0 Bye\r\n");
                self.quit = true;
            }
            b"STAR" if self.sh.tls.is_some() && has_prefix_ci(l, b"STARTTLS") => {
                if !l[8..].iter().all(|&b| b == b' ') {
                    st.bad_commands += 1;
                    self.reply(b"501 5.5.4 Syntax: STARTTLS\r\n");
                } else if self.tls == TlsState::Active {
                    st.bad_commands += 1;
                    self.reply(b"503 5.5.1 Error: TLS already active\r\n");
                } else {
                    self.reply(b"220 2.0.0 Ready to start TLS\r\n");
                    self.tls = TlsState::Starting;
                }
            }
            b"VRFY" => self.reply(b"252 2.0.0 Cannot VRFY user\r\n"),
            b"HELP" => self.reply(b"214 2.0.0 loadgen sink\r\n"),
            _ => {
                st.bad_commands += 1;
                self.reply(b"502 5.5.2 Error: command not recognized\r\n");
            }
        }
    }

    fn end_of_data(&mut self, st: &mut SinkStats, conn_msgs: &mut u64) {
        self.mode = Mode::Command;
        let fate = if self.sh.cfg.stage == FailStage::Data {
            self.txn.fate
        } else {
            Fate::Ok
        };
        let rcpts = self.txn.rcpts;
        self.reset_txn();
        if self.scan.bytes > self.sh.cfg.max_size {
            self.reply(b"552 5.3.4 Message size exceeds fixed limit\r\n");
            return;
        }
        match fate {
            Fate::Temp => {
                st.tempfailed += 1;
                self.reply(b"451 4.3.0 Temporary failure (loadgen sink tempfail)\r\n");
                return;
            }
            Fate::Perm => {
                st.permfailed += 1;
                self.reply(b"554 5.3.0 Message rejected (loadgen sink permfail)\r\n");
                return;
            }
            Fate::Ok => {}
        }
        st.received += 1;
        st.rcpt_accepted += rcpts;
        st.bytes += self.scan.bytes;
        *conn_msgs += 1;
        let now = Instant::now();
        if st.first.is_none() {
            st.first = Some(now);
        }
        st.last = Some(now);
        match self.scan.verdict() {
            Verdict::Valid(id) => match self.sh.ids.intact(id) {
                Some(n) => {
                    if self.sh.cfg.expect == Some(n) {
                        self.sh.expect_reached.notify_one();
                    }
                }
                None => st.duplicates += 1,
            },
            Verdict::Corrupted(id) => {
                st.corrupted += 1;
                if let Some(id) = id {
                    self.sh.ids.corrupted(id);
                }
            }
            Verdict::Foreign => st.foreign += 1,
        }
        self.reply(b"250 2.0.0 Ok: queued as ");
        let n = self
            .sh
            .queued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        push_u64(&mut self.out, n);
        self.reply(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    fn shared(tls: bool) -> Arc<ServerShared> {
        let tls = tls.then(|| {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
                .expect("certificate");
            let key =
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
            crate::tls::server_config_from(vec![ck.cert.der().clone()], key).expect("config")
        });
        Arc::new(ServerShared::new(ServerConfig {
            hostname: "sink.test".into(),
            tempfail: 0.0,
            permfail: 0.0,
            stage: FailStage::Data,
            delay: None,
            max_size: 1 << 20,
            expect: None,
            tls,
        }))
    }

    /// Reads one whole reply a byte at a time, so nothing after it is consumed.
    async fn reply<S: AsyncRead + Unpin>(s: &mut S) -> String {
        let mut all = Vec::new();
        let mut line_start = 0;
        loop {
            let b = s.read_u8().await.expect("reply byte");
            all.push(b);
            if b == b'\n' {
                let line = &all[line_start..];
                if line.get(3) == Some(&b' ') {
                    return String::from_utf8_lossy(&all).into_owned();
                }
                line_start = all.len();
            }
        }
    }

    /// Runs a client against one sink connection on loopback; returns what the sink counted.
    fn with_sink<F, Fut>(tls: bool, client: F) -> SinkStats
    where
        F: FnOnce(TcpStream) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        let stats = Rc::new(RefCell::new(SinkStats::default()));
        local.block_on(&rt, async {
            let sh = shared(tls);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = l.local_addr().expect("addr");
            let st = stats.clone();
            let server = tokio::task::spawn_local(async move {
                let (s, _) = l.accept().await.expect("accept");
                serve(s, &sh, st, Rc::new(Cell::new(0))).await;
            });
            client(TcpStream::connect(addr).await.expect("connect")).await;
            server.await.expect("server task");
        });
        let s = std::mem::take(&mut *stats.borrow_mut());
        s
    }

    #[test]
    fn starttls_drops_pipelined_bytes_and_starts_a_fresh_session() {
        let st = with_sink(true, |mut c| async move {
            assert!(reply(&mut c).await.starts_with("220 "));
            // A MAIL pipelined behind STARTTLS (CVE-2011-0411): it must be neither
            // answered in the clear nor taken as the first bytes of the handshake.
            c.write_all(b"EHLO t\r\nSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
                .await
                .expect("write");
            assert!(reply(&mut c).await.contains("250-STARTTLS\r\n"));
            assert_eq!(reply(&mut c).await, "220 2.0.0 Ready to start TLS\r\n");
            let cfg = crate::tls::client_config(false, None).expect("client config");
            let name = ServerName::try_from("localhost").expect("name");
            let mut t = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, c)
                .await
                .expect("handshake");
            t.write_all(b"RCPT TO:<a@b.test>\r\nEHLO t\r\nSTARTTLS\r\nQUIT\r\n")
                .await
                .expect("write");
            // No transaction survived: the pipelined MAIL was dropped.
            assert!(reply(&mut t)
                .await
                .starts_with("503 5.5.1 Error: need MAIL"));
            let ehlo = reply(&mut t).await;
            assert!(ehlo.starts_with("250-sink.test") && !ehlo.contains("STARTTLS"));
            assert!(reply(&mut t)
                .await
                .starts_with("503 5.5.1 Error: TLS already active"));
            assert!(reply(&mut t).await.starts_with("221 "));
        });
        assert_eq!((st.tls_sessions, st.tls_failures), (1, 0));
        assert_eq!(st.tls_handshake.summary().count, 1);
    }

    #[test]
    fn without_a_certificate_starttls_is_neither_offered_nor_accepted() {
        let st = with_sink(false, |mut c| async move {
            assert!(reply(&mut c).await.starts_with("220 "));
            c.write_all(b"EHLO t\r\nSTARTTLS\r\nQUIT\r\n")
                .await
                .expect("write");
            assert!(!reply(&mut c).await.contains("STARTTLS"));
            assert!(reply(&mut c).await.starts_with("502 "));
            assert!(reply(&mut c).await.starts_with("221 "));
        });
        assert_eq!(st.tls_sessions, 0);
    }

    #[test]
    fn a_failed_handshake_is_counted() {
        let st = with_sink(true, |mut c| async move {
            assert!(reply(&mut c).await.starts_with("220 "));
            c.write_all(b"STARTTLS\r\n").await.expect("write");
            assert!(reply(&mut c).await.starts_with("220 "));
            c.write_all(b"this is not a ClientHello\r\n")
                .await
                .expect("write");
            let _ = c.shutdown().await;
        });
        assert_eq!((st.tls_sessions, st.tls_failures), (0, 1));
    }
}
