//! Helpers shared by the integration tests: running `loadgen send`/`sink` as child processes
//! with hard time limits, reading the sink's bound address, JSON reports and scratch dirs; a
//! scriptable fake SMTP server and a TCP balancer, both recording client addresses.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_loadgen")
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("loadgen-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for a child with a deadline; kills it and panics when the deadline passes.
pub fn wait_for(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command to completion within `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t1 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_for(&mut child, limit, "command");
    Output {
        status,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    }
}

/// Runs `loadgen send` with the given arguments (bounded to 60 s).
pub fn send(args: &[&str]) -> Output {
    let o = run(
        Command::new(bin())
            .arg("send")
            .arg("--no-progress")
            .args(args),
        Duration::from_secs(60),
    );
    if !o.status.success() {
        eprintln!("send {args:?} failed: {}\n{}", o.stderr, o.stdout);
    }
    o
}

pub fn read_json(p: &Path) -> Value {
    let s = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("parse {}: {e}\n{s}", p.display()))
}

pub fn num(v: &Value, path: &str) -> u64 {
    let mut cur = v;
    for k in path.split('.') {
        cur = &cur[k];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

/// A running `loadgen sink`.
pub struct Sink {
    pub child: Child,
    pub addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl Sink {
    /// Starts a sink on 127.0.0.1:0 and reads the address it reports.
    pub fn start(args: &[&str]) -> Sink {
        let mut child = Command::new(bin())
            .args(["sink", "--listen", "127.0.0.1:0", "--timeout", "120"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sink");
        let out = child.stdout.take().expect("sink stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        let first = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("sink did not report its address");
            }
        };
        let addr = first
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from sink: {first}"));
        Sink {
            child,
            addr,
            lines: rx,
        }
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(r, 0, "kill failed");
    }

    /// Waits for the sink to exit (30 s at most); returns its status and the rest of stdout.
    pub fn finish(mut self) -> (ExitStatus, String) {
        let st = wait_for(&mut self.child, Duration::from_secs(30), "sink");
        let mut rest = String::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            rest.push_str(&l);
            rest.push('\n');
        }
        (st, rest)
    }

    /// SIGTERM, then `finish`.
    pub fn stop(self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        self.finish()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Manifest IDs (comments skipped).
pub fn manifest_ids(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .expect("read manifest")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// A port that was free a moment ago (bind port 0, read it, release it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Polls until something accepts connections on `addr`.
pub fn wait_listening(addr: &str, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// What a `FakeSmtp` counted.
#[derive(Default)]
pub struct FakeCounts {
    pub connections: AtomicU64,
    /// Sessions open now (greeted and not yet ended).
    pub open: AtomicU64,
    pub refused: AtomicU64,
    pub messages: AtomicU64,
    pub auth_ok: AtomicU64,
    pub auth_failed: AtomicU64,
    /// The client address of every connection, in order of arrival.
    pub peers: Mutex<Vec<IpAddr>>,
}

/// A tiny SMTP server on a thread per connection, for the cases the sink does not cover:
/// `refuse(n, open)` gives connection n (from 0), arriving while `open` others are being
/// served, a reply to send instead of the greeting before closing it; with `auth` set, EHLO offers AUTH PLAIN, MAIL needs a prior AUTH, and only
/// that initial response (the base64 blob) gets 235. Runs until the test process exits.
pub struct FakeSmtp {
    pub addr: String,
    pub counts: Arc<FakeCounts>,
}

impl FakeSmtp {
    pub fn start(
        refuse: impl Fn(u64, u64) -> Option<String> + Send + 'static,
        auth: Option<&'static str>,
    ) -> FakeSmtp {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let counts = Arc::new(FakeCounts::default());
        let c = counts.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                if let Ok(peer) = s.peer_addr() {
                    c.peers.lock().unwrap().push(peer.ip());
                }
                let n = c.connections.fetch_add(1, Relaxed);
                if let Some(reply) = refuse(n, c.open.load(Relaxed)) {
                    c.refused.fetch_add(1, Relaxed);
                    let mut s = s;
                    let _ = s.write_all(reply.as_bytes());
                    continue;
                }
                let c = c.clone();
                c.open.fetch_add(1, Relaxed);
                std::thread::spawn(move || {
                    let _ = fake_session(s, auth, &c);
                    c.open.fetch_sub(1, Relaxed);
                });
            }
        });
        FakeSmtp { addr, counts }
    }

    pub fn count(&self, f: impl Fn(&FakeCounts) -> &AtomicU64) -> u64 {
        f(&self.counts).load(Relaxed)
    }

    /// The client addresses seen so far.
    pub fn peers(&self) -> Vec<IpAddr> {
        self.counts.peers.lock().unwrap().clone()
    }
}

/// A TCP balancer in the manner of HAProxy's `mode tcp`, on a thread per direction of every
/// connection: connection n goes to backend n mod k, or to the next backend that accepts if
/// that one refuses. When either side of a connection ends, both are closed, as a balancer
/// does when the node behind it dies. Runs until the test process exits.
pub struct Balancer {
    pub addr: String,
    /// Client address of every connection accepted.
    pub peers: Arc<Mutex<Vec<IpAddr>>>,
    /// Connections handed to each backend.
    pub per_backend: Arc<Vec<AtomicU64>>,
}

impl Balancer {
    pub fn start(backends: Vec<SocketAddr>) -> Balancer {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let per_backend: Arc<Vec<AtomicU64>> =
            Arc::new(backends.iter().map(|_| AtomicU64::new(0)).collect());
        let (p, pb) = (peers.clone(), per_backend.clone());
        std::thread::spawn(move || {
            for (n, client) in l.incoming().enumerate() {
                let Ok(client) = client else { continue };
                if let Ok(peer) = client.peer_addr() {
                    p.lock().unwrap().push(peer.ip());
                }
                let k = backends.len();
                let backend = (0..k).map(|i| (n + i) % k).find_map(|b| {
                    let s = TcpStream::connect(backends[b]).ok()?;
                    pb[b].fetch_add(1, Relaxed);
                    Some(s)
                });
                // No backend: close the client at once, as HAProxy does.
                let Some(backend) = backend else { continue };
                let (Ok(c2), Ok(b2)) = (client.try_clone(), backend.try_clone()) else {
                    continue;
                };
                std::thread::spawn(move || pipe(client, backend));
                std::thread::spawn(move || pipe(b2, c2));
            }
        });
        Balancer {
            addr,
            peers,
            per_backend,
        }
    }

    pub fn peers(&self) -> Vec<IpAddr> {
        self.peers.lock().unwrap().clone()
    }

    pub fn connections_to(&self, backend: usize) -> u64 {
        self.per_backend[backend].load(Relaxed)
    }
}

/// Copies one direction until it ends, then closes both sockets both ways.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn fake_session(s: std::net::TcpStream, auth: Option<&str>, c: &FakeCounts) -> std::io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 fake.test ESMTP\r\n")?;
    let mut authed = auth.is_none();
    let mut line = String::new();
    let next = |r: &mut BufReader<std::net::TcpStream>, line: &mut String| {
        line.clear();
        r.read_line(line).map(|n| n > 0)
    };
    while next(&mut r, &mut line)? {
        let up = line.trim_end().to_ascii_uppercase();
        let reply: &[u8] = if up.starts_with("EHLO") {
            if auth.is_some() {
                b"250-fake.test\r\n250-AUTH PLAIN\r\n250 PIPELINING\r\n"
            } else {
                b"250-fake.test\r\n250 PIPELINING\r\n"
            }
        } else if up.starts_with("AUTH PLAIN ") {
            if Some(line.trim_end()[11..].trim()) == auth {
                authed = true;
                c.auth_ok.fetch_add(1, Relaxed);
                b"235 2.7.0 Authentication successful\r\n"
            } else {
                c.auth_failed.fetch_add(1, Relaxed);
                b"535 5.7.8 Error: authentication failed: bad credentials\r\n"
            }
        } else if up.starts_with("MAIL") && !authed {
            b"530 5.7.0 Authentication required\r\n"
        } else if up.starts_with("DATA") {
            w.write_all(b"354 go ahead\r\n")?;
            while next(&mut r, &mut line)? && line != ".\r\n" {}
            c.messages.fetch_add(1, Relaxed);
            b"250 2.0.0 Ok: queued\r\n"
        } else if up.starts_with("QUIT") {
            w.write_all(b"221 2.0.0 Bye\r\n")?;
            return Ok(());
        } else {
            b"250 2.0.0 Ok\r\n"
        };
        w.write_all(reply)?;
    }
    Ok(())
}

/// Certificates made for a test: a CA, and a leaf for `localhost` and 127.0.0.1 signed by it.
pub struct TestCerts {
    /// The CA certificate (PEM), for a client that verifies.
    pub ca: PathBuf,
    /// The leaf followed by the CA (PEM), for `sink --tls-cert`.
    pub chain: PathBuf,
    /// The leaf's private key (PKCS#8 PEM), for `sink --tls-key`.
    pub key: PathBuf,
}

/// Makes a fresh CA and leaf with rcgen and writes them into `dir`.
pub fn make_certs(dir: &Scratch) -> TestCerts {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "loadgen test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("leaf params");
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    // Strict X.509 checkers (OpenSSL's, in newer Pythons) want the issuer's key id.
    leaf.use_authority_key_identifier_extension = true;
    let leaf_cert = leaf
        .signed_by(&leaf_key, &issuer)
        .expect("leaf certificate");
    let certs = TestCerts {
        ca: dir.path("ca.pem"),
        chain: dir.path("chain.pem"),
        key: dir.path("key.pem"),
    };
    std::fs::write(&certs.ca, ca_cert.pem()).expect("write ca.pem");
    std::fs::write(&certs.chain, leaf_cert.pem() + &ca_cert.pem()).expect("write chain.pem");
    std::fs::write(&certs.key, leaf_key.serialize_pem()).expect("write key.pem");
    certs
}
