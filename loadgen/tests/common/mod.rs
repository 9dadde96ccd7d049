//! Helpers shared by the integration tests: running `loadgen send`/`sink` as child processes
//! with hard time limits, reading the sink's bound address, JSON reports and scratch dirs.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
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
