//! The process's life: graceful shutdown on both I/O drivers (idle sessions get
//! `421 4.3.2` at once, transactions in flight finish and are queued, new connections are
//! refused, exit status 0; after `limits.shutdown_timeout_secs`, or at a second signal,
//! the rest get `421` too; a connection racing the shutdown is answered or closed, never
//! left hanging), and the command line (`check-config` exit codes and its one-line
//! errors, `serve` on a port in use exits 1, usage errors exit 2).

mod common;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{free_port, message, Client, ReadError, Relay, DEFAULT_MAX_SIZE, HOST};

io_tests!(
    shutdown_lets_transactions_finish,
    shutdown_grace_period_ends,
    second_signal_skips_the_wait,
    connection_racing_shutdown_is_answered,
    serve_on_a_port_in_use,
);

fn shutting_down() -> String {
    format!("421 4.3.2 {HOST} Service shutting down, closing transmission channel")
}

/// A session in the middle of DATA: content started, not finished.
fn mid_data(relay: &Relay) -> Client {
    let mut c = relay.connect();
    c.ehlo(DEFAULT_MAX_SIZE);
    c.start_data("a@example.org", &["b@example.org"]);
    c.send("From: a@example.org\r\nSubject: in flight\r\n\r\nfirst half\r\n");
    c
}

/// An idle session: greeted, EHLO done, no transaction.
fn idle(relay: &Relay) -> Client {
    let mut c = relay.connect();
    c.ehlo(DEFAULT_MAX_SIZE);
    c
}

/// Asserts `c` gets the shutdown 421 within `within` and then EOF.
#[track_caller]
fn expect_shutdown_421(c: &mut Client, since: Instant, within: Duration, who: &str) {
    let r = c.reply();
    let waited = since.elapsed();
    assert_eq!(r.wire(), shutting_down(), "{who}");
    assert!(waited < within, "{who}: 421 after {waited:?}");
    c.expect_eof();
}

/// After shutdown began, new connections are refused. A connection that raced the
/// listener's shutdown (already in the kernel's queue, or sent to a shard that had not yet
/// stopped listening) may be answered with the shutdown 421 or reset by the kernel, but is
/// never greeted with 220.
fn expect_refused(relay: &Relay) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match TcpStream::connect(relay.addr) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect during shutdown: {e}"),
            Ok(stream) => {
                let local = stream.local_addr().unwrap();
                match Client::from_stream(stream).try_reply() {
                    Ok(r) => assert_eq!(r.wire(), shutting_down(), "new connection in shutdown"),
                    Err(ReadError::Eof) => {}
                    Err(e) => panic!(
                        "new connection in shutdown (from {local}): {e:?}; log:\n{}",
                        relay.stderr()
                    ),
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "still accepting connections 2 s after SIGTERM"
        );
        sleep(Duration::from_millis(20));
    }
}

fn shutdown_lets_transactions_finish(io: &str) {
    let mut relay = Relay::start(io, "[limits]\nshutdown_timeout_secs = 10");
    let mut a = idle(&relay);
    let mut b = mid_data(&relay);
    // C has begun a transaction (MAIL) but not yet DATA: busy too.
    let mut c = idle(&relay);
    c.expect("MAIL FROM:<a@example.org>", 250, "2.1.0");

    relay.signal("TERM");
    let t0 = Instant::now();
    expect_shutdown_421(&mut a, t0, Duration::from_secs(2), "idle session A");
    // Give every shard time to stop listening (connecting at the very moment they stop is
    // `connection_racing_shutdown_is_answered`'s business).
    sleep(Duration::from_millis(300));
    expect_refused(&relay);

    b.send("second half\r\n.\r\n");
    b.reply().queued_id();
    expect_shutdown_421(&mut b, t0, Duration::from_secs(5), "B after its message");

    c.expect("RCPT TO:<b@example.org>", 250, "2.1.5");
    c.expect("DATA", 354, "End");
    // QUIT pipelined behind the message is answered before the server would say 421.
    c.send(format!(
        "{}.\r\nQUIT\r\n",
        message("during shutdown", "hello")
    ));
    c.reply().queued_id();
    c.reply().assert(221, "2.0.0");
    c.expect_eof();

    // Nothing is left in flight: the server exits at once, not after the 10 s grace.
    let status = relay.wait_exit(Duration::from_secs(5));
    let log = relay.stderr();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    let totals = common::sink_totals(&log).expect("sink totals");
    assert_eq!((totals.messages, totals.recipients), (2, 2), "{totals:?}");
}

fn shutdown_grace_period_ends(io: &str) {
    let mut relay = Relay::start(io, "[limits]\nshutdown_timeout_secs = 2");
    let mut a = idle(&relay);
    let mut b = mid_data(&relay);
    // SIGINT is handled like SIGTERM.
    relay.signal("INT");
    let t0 = Instant::now();
    expect_shutdown_421(&mut a, t0, Duration::from_millis(1500), "idle session A");
    // B never finishes: it gets the 421 when the 2 s grace period is over.
    expect_shutdown_421(&mut b, t0, Duration::from_secs(5), "B stuck in DATA");
    assert!(
        t0.elapsed() >= Duration::from_millis(1900),
        "B cut off before the grace period"
    );
    let status = relay.wait_exit(Duration::from_secs(3));
    let log = relay.stderr();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert_eq!(common::sink_totals(&log).expect("sink totals").messages, 0);
}

fn second_signal_skips_the_wait(io: &str) {
    let mut relay = Relay::start(io, "[limits]\nshutdown_timeout_secs = 60");
    let mut a = idle(&relay);
    let mut b = mid_data(&relay);
    relay.signal("TERM");
    expect_shutdown_421(
        &mut a,
        Instant::now(),
        Duration::from_secs(2),
        "idle session A",
    );
    relay.signal("TERM");
    expect_shutdown_421(
        &mut b,
        Instant::now(),
        Duration::from_secs(3),
        "B after a second signal",
    );
    let status = relay.wait_exit(Duration::from_secs(3));
    assert_eq!(status.code(), Some(0), "log:\n{}", relay.stderr());
}

/// A connection made just as the shards stop listening must be answered (`421`) or
/// refused or reset, never accepted and then left hanging. The race is narrow, so the
/// scenario is repeated, with CPU hogs running around the critical moment to widen it:
/// one idle session A and one session B mid-DATA (which keeps the process alive), SIGTERM,
/// and a new connection as soon as A has its 421.
fn connection_racing_shutdown_is_answered(io: &str) {
    const ROUNDS: usize = 12;
    let mut hangs = Vec::new();
    let mut answered = 0;
    for round in 0..ROUNDS {
        let mut relay = Relay::start(io, "[limits]\nshutdown_timeout_secs = 10");
        let mut a = idle(&relay);
        let mut b = mid_data(&relay);
        let hog = CpuHogs::start(3);
        relay.signal("TERM");
        a.reply().assert(421, "4.3.2");
        match TcpStream::connect(relay.addr) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect during shutdown: {e}"),
            Ok(stream) => {
                let local = stream.local_addr().unwrap();
                let mut c = Client::from_stream(stream);
                c.set_read_timeout(Duration::from_secs(2));
                match c.try_reply() {
                    Ok(r) => {
                        assert_eq!(r.wire(), shutting_down(), "round {round}");
                        answered += 1;
                    }
                    Err(ReadError::Eof) => answered += 1,
                    Err(ReadError::Timeout(_)) => {
                        hangs.push(format!("round {round}: from {local}"));
                    }
                    Err(e) => panic!("round {round}: {e:?}"),
                }
            }
        }
        drop(hog);
        b.send("second half\r\n.\r\n");
        b.reply().queued_id();
        b.reply().assert(421, "4.3.2");
        assert_eq!(relay.wait_exit(Duration::from_secs(5)).code(), Some(0));
        if !hangs.is_empty() {
            break; // one is enough, and each costs 2 s
        }
    }
    assert!(
        hangs.is_empty(),
        "a connection made during shutdown was accepted, then got neither a reply nor a \
         close for 2 s ({answered} earlier ones were answered or closed): {hangs:?}"
    );
}

/// Threads that spin until dropped (to make the server's threads lose their CPU).
struct CpuHogs {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuHogs {
    fn start(n: usize) -> CpuHogs {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && Instant::now() < deadline
                    {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        CpuHogs { stop, threads }
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs `ringrelay ARGS` to completion (killed, and failed, after 10 s).
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringrelay"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringrelay");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ringrelay {args:?} still running after 10 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("wait")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn serve_on_a_port_in_use(io: &str) {
    let mut first = Relay::start(io, "");
    let addr = first.addr.to_string();
    let out = run(&[
        "serve", "--sink", "--listen", &addr, "--shards", "2", "--io", io,
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("in use"),
        "stderr:\n{err}"
    );
    // The first server is untouched.
    let mut c = first.connect();
    c.expect("QUIT", 221, "2.0.0");
    first.stop();
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "good.toml",
        "hostname = \"relay.test\"\nlisten = [\"127.0.0.1:2525\"]\nshards = 2\nio = \"epoll\"\n\
         [limits]\nmax_message_size = 1000\nmax_recipients = 3\nmax_connections = 10\n\
         max_connections_per_ip = 2\ncommand_timeout_secs = 1\ndata_timeout_secs = 1\n\
         max_errors = 5\nshutdown_timeout_secs = 1\n\
         [relay]\nmynetworks = [\"127.0.0.1/32\", \"::1/128\"]\ndomains = [\"relay-ok.test\"]\n",
    );
    let out = run(&["check-config", "--config", &good]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("the configuration is valid")
            && stdout.contains("\nhostname = \"relay.test\"\n")
            && stdout.contains("\nshards = 2\n"),
        "stdout: {stdout}"
    );
    // No file at all: the defaults, which are valid.
    let out = run(&["check-config"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn check_config_names_the_bad_key_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (body, key) in [
        ("[limits]\nmax_recipients = 0\n", "limits.max_recipients"),
        ("[limits]\nmax_recipeints = 5\n", "max_recipeints"),
        (
            "[relay]\nmynetworks = [\"10.0.0.0/99\"]\n",
            "relay.mynetworks[0]",
        ),
        ("hostname = \"bad host\"\n", "hostname"),
        ("io = \"kqueue\"\n", "line 1"),
    ] {
        let path = write(dir.path(), "bad.toml", body);
        let out = run(&["check-config", "--config", &path]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{body:?}: stderr {err}");
        assert_eq!(
            err.lines().count(),
            1,
            "{body:?}: one line wanted, got {err:?}"
        );
        assert!(err.contains(key), "{body:?}: {err:?} does not name {key}");
        // serve refuses the same file the same way, before listening.
        let port = free_port().to_string();
        let listen = format!("127.0.0.1:{port}");
        let out = run(&["serve", "--sink", "--config", &path, "--listen", &listen]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "serve {body:?}: stderr {err}");
        assert!(err.contains(key), "serve {body:?}: {err:?}");
    }
    let missing = dir.path().join("missing.toml");
    let out = run(&["check-config", "--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("missing.toml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn usage_errors_exit_2() {
    let listen = format!("127.0.0.1:{}", free_port());
    let listen = listen.as_str();
    for args in [
        vec!["serve", "--sink", "--listen", listen, "--bogus"],
        vec!["serve", "--sink", "--listen", listen, "--io", "kqueue"],
        vec!["serve", "--sink", "--listen", "not-an-address"],
        vec!["frobnicate"],
        vec![],
    ] {
        let out = run(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "ringrelay {args:?}: stderr {}",
            text(&out.stderr)
        );
    }
}
