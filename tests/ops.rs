//! Running ringrelay as a service: systemd's readiness protocol (`READY=1` once the port
//! accepts, `STOPPING=1` at SIGTERM, on a socket path or in the abstract namespace),
//! `contrib/ringrelay.service` passing `systemd-analyze verify` (where it exists), and
//! `check-config` refusing what `serve` refuses (exit 2, the same line), warning on what
//! looks wrong and printing the effective configuration as TOML that reads back the same;
//! and `relay.postmaster`: a bare `<postmaster>` goes there from anyone, or is refused
//! `550 5.1.1` when none is set, and double bounces go there (never in a loop).

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ringrelay::ReversePath;

io_tests!(
    ready_and_stopping_reach_the_notify_socket,
    bare_postmaster_is_refused_without_one,
    postmaster_mail_and_double_bounces_reach_the_postmaster,
    a_double_bounce_that_fails_is_dropped,
);

/// `ringrelay serve --sink` on a free port with `NOTIFY_SOCKET=socket`; stderr to `log`.
fn serve_notifying(io: &str, dir: &Path, socket: &str, log: &Path) -> (Child, SocketAddr) {
    let config = dir.join("ringrelay.toml");
    std::fs::write(&config, common::config("")).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ringrelay"))
        .arg("serve")
        .arg("--sink")
        .arg("--config")
        .arg(&config)
        .args(["--listen", &addr.to_string(), "--shards", "1", "--io", io])
        .env("NOTIFY_SOCKET", socket)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .expect("spawn ringrelay serve");
    (child, addr)
}

/// The next notification, as its lines.
fn notification(socket: &UnixDatagram, log: &Path) -> Vec<String> {
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_string)
            .collect(),
        Err(e) => panic!(
            "no notification: {e}; server log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

/// Waits up to 15 s for `child` to exit; its exit code.
fn exit_code(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve still running 15 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `READY=1` comes once the listener accepts (a connection right after it is greeted), and
/// `STOPPING=1` when SIGTERM arrives; then the server exits 0. Each with a `STATUS=` line.
fn ready_and_stopping_reach_the_notify_socket(io: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let log = dir.path().join("stderr.log");
    let (mut child, addr) = serve_notifying(io, dir.path(), path.to_str().unwrap(), &log);

    let ready = notification(&socket, &log);
    assert_eq!(ready[0], "READY=1", "{ready:?}");
    assert!(
        ready.contains(&format!("STATUS=listening on {addr}")),
        "{ready:?}"
    );
    // Ready means ready: the port accepts at once.
    let mut c = Client::from_stream(TcpStream::connect(addr).expect("connect after READY=1"));
    c.reply().assert(220, HOST);
    c.expect("QUIT", 221, "2.0.0");

    signal_pid(child.id(), libc::SIGTERM);
    let stopping = notification(&socket, &log);
    assert_eq!(stopping[0], "STOPPING=1", "{stopping:?}");
    assert!(
        stopping.iter().any(|l| l.starts_with("STATUS=")),
        "{stopping:?}"
    );
    assert_eq!(
        exit_code(&mut child),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// `NOTIFY_SOCKET=@name` is a socket in the abstract namespace, as systemd may give.
#[test]
fn an_abstract_notify_socket_is_reached_too() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("ringrelay-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let (mut child, _) = serve_notifying("epoll", dir.path(), &format!("@{name}"), &log);
    assert_eq!(notification(&socket, &log)[0], "READY=1");
    signal_pid(child.id(), libc::SIGTERM);
    assert_eq!(notification(&socket, &log)[0], "STOPPING=1");
    assert_eq!(exit_code(&mut child), Some(0));
}

/// A notify socket that is not there costs a warning, not the server.
#[test]
fn a_missing_notify_socket_is_only_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let missing = dir.path().join("nobody-listens.sock");
    let (mut child, addr) = serve_notifying("epoll", dir.path(), missing.to_str().unwrap(), &log);
    let text = wait_for(Duration::from_secs(10), "the notify warning", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("cannot tell the service manager") {
            Ok(text)
        } else {
            Err(text)
        }
    });
    assert!(text.contains(&format!("listening on {addr}")), "{text}");
    let mut c = Client::from_stream(TcpStream::connect(addr).unwrap());
    c.reply().assert(220, HOST);
    signal_pid(child.id(), libc::SIGTERM);
    assert_eq!(exit_code(&mut child), Some(0));
}

/// The unit in `contrib/` has what the issue asks for, and `systemd-analyze verify`
/// accepts it (with `ExecStart` pointing at the binary under test, since
/// `/usr/local/bin/ringrelay` need not exist here).
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/ringrelay.service"
    ))
    .unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/ringrelay serve --config /etc/ringrelay/ringrelay.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitNOFILE=65536",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "User=ringrelay",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/spool/ringrelay",
        "RestartPreventExitStatus=2",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "{line} missing from the unit"
        );
    }
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !found.is_ok_and(|s| s.success()) {
        eprintln!("note: systemd-analyze is not installed; the unit was not verified");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("ringrelay.service");
    let mut f = File::create(&copy).unwrap();
    for line in BufReader::new(unit.as_bytes()).lines() {
        let line = line.unwrap();
        let line = line.replace("/usr/local/bin/ringrelay", env!("CARGO_BIN_EXE_ringrelay"));
        writeln!(f, "{line}").unwrap();
    }
    drop(f);
    let out = run_bounded(
        Command::new("systemd-analyze").arg("verify").arg(&copy),
        Duration::from_secs(60),
    );
    assert_eq!(
        out.code,
        Some(0),
        "systemd-analyze verify: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        !out.stderr.contains("ringrelay.service"),
        "systemd-analyze verify complains: {}",
        out.stderr
    );
}

/// The path of `body` written as `name` in `dir`.
fn write(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_string()
}

fn ringrelay(args: &[&str]) -> Output {
    run_bounded(
        Command::new(env!("CARGO_BIN_EXE_ringrelay"))
            .args(args)
            .env("RUST_LOG", "info"),
        Duration::from_secs(30),
    )
}

/// What `serve` used to find out only at start (dying with exit 1, or writing into the
/// current directory) `check-config` now refuses, and `serve` refuses it the same way:
/// exit 2 and the same one line, before it listens or touches a spool.
#[test]
fn check_config_refuses_what_serve_would_fail_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let host = format!("hostname = \"{HOST}\"\n");
    let listen = format!("listen = [\"127.0.0.1:{port}\"]\n");
    for (body, starts) in [
        (
            format!("{host}{listen}[spool]\ndir = \"\"\n"),
            "spool.dir: ",
        ),
        (
            format!("{host}listen = [\"127.0.0.1:{port}\", \"127.0.0.1:{port}\"]\n"),
            "listen[1]: ",
        ),
        (
            format!("{host}listen = [\"0.0.0.0:{port}\", \"127.0.0.1:{port}\"]\n"),
            "listen[1]: ",
        ),
        (
            format!("{host}{listen}[delivery]\nroutes = {{ \"a.test\" = \"127.0.0.1:0\" }}\n"),
            "delivery.routes.a.test: ",
        ),
        (
            format!("{host}{listen}[delivery]\nsmarthost = \"smart.example.net:0\"\n"),
            "delivery.smarthost: ",
        ),
        (
            format!("{host}{listen}[relay]\npostmaster = \"ops\"\n"),
            "relay.postmaster: ",
        ),
    ] {
        let path = write(dir.path(), "bad.toml", &body);
        let check = ringrelay(&["check-config", "--config", &path]);
        assert_eq!(check.code, Some(2), "{body}: {}", check.stderr);
        assert_eq!(check.stderr.lines().count(), 1, "{body}: {}", check.stderr);
        let line = check.stderr.trim_end();
        assert!(
            line.starts_with(&format!("ringrelay: {path}: {starts}")),
            "{body}: {line}"
        );
        // serve: the same line, exit 2, no spool made in the working directory.
        let work = tempfile::tempdir().unwrap();
        let serve = run_bounded(
            Command::new(env!("CARGO_BIN_EXE_ringrelay"))
                .args(["serve", "--config", &path])
                .current_dir(work.path()),
            Duration::from_secs(30),
        );
        assert_eq!(serve.code, Some(2), "serve {body}: {}", serve.stderr);
        assert_eq!(serve.stderr.trim_end(), line, "serve {body}");
        assert_eq!(
            std::fs::read_dir(work.path()).unwrap().count(),
            0,
            "serve {body} wrote into its working directory"
        );
    }
}

/// Warnings go to stderr as `ringrelay: warning: …` with exit 0; the printed
/// configuration is every key, and check-config reads it back to the same text.
#[test]
fn check_config_warns_and_prints_what_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "warn.toml",
        "hostname = \"vm\"\n[relay]\nmynetworks = [\"10.0.0.1/8\", \"::1/128\"]\n\
         postmaster = \"ops@example.com\"\n[delivery]\nroutes = { \"a.test\" = \"127.0.0.1:2526\" }\n",
    );
    let out = ringrelay(&["check-config", "--config", &path]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let warnings: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(warnings.len(), 2, "{}", out.stderr);
    assert!(warnings
        .iter()
        .all(|w| w.starts_with("ringrelay: warning: ")));
    assert!(warnings.iter().any(|w| w
        .contains("relay.mynetworks[0]: \"10.0.0.1/8\" has host bits set; it means 10.0.0.0/8")));
    assert!(warnings
        .iter()
        .any(|w| w.contains("hostname \"vm\" is not fully qualified")));
    for line in [
        "hostname = \"vm\"",
        "mynetworks = [\"10.0.0.1/8\", \"::1/128\"]",
        "postmaster = \"ops@example.com\"",
        "max_recipients = 100",
        "dir = \"./spool\"",
        "\"a.test\" = \"127.0.0.1:2526\"",
        "tls = \"may\"",
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "{line} not in:\n{}",
            out.stdout
        );
    }
    let printed = write(dir.path(), "printed.toml", &out.stdout);
    let again = ringrelay(&["check-config", "--config", &printed]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    let body = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(body(&again.stdout), body(&out.stdout));

    // serve logs the same warnings at start.
    let mut relay = Relay::start("epoll", "[relay]\nmynetworks = [\"127.0.0.1/8\"]");
    let log = relay.stderr();
    assert!(
        log.contains("WARN")
            && log.contains("relay.mynetworks[0]: \"127.0.0.1/8\" has host bits set"),
        "{log}"
    );
    relay.stop();
}

/// With no `relay.postmaster`, a bare `<postmaster>` is refused at RCPT, from inside and
/// outside `mynetworks`; the rest of the transaction goes on.
fn bare_postmaster_is_refused_without_one(io: &str) {
    let mut relay = Relay::start(io, "[relay]\nmynetworks = [\"127.0.0.1/32\"]");
    for source in ["127.0.0.1", "127.0.0.2"] {
        let mut c = Client::connect_from(relay.addr, source.parse().unwrap());
        c.reply().assert(220, HOST);
        c.ehlo(DEFAULT_MAX_SIZE);
        c.expect("MAIL FROM:<a@example.org>", 250, "2.1.0");
        for rcpt in ["<postmaster>", "<Postmaster>"] {
            c.cmd(&format!("RCPT TO:{rcpt}"))
                .assert_is("550 5.1.1 <postmaster>: no postmaster mailbox is configured here");
        }
        c.expect("QUIT", 221, "2.0.0");
    }
    relay.stop();
}

/// The relay's config: `extra` keys for `[delivery]`, then `[relay]` with `mynetworks`
/// 127.0.0.1 only and `postmaster`.
fn relay_with_postmaster(
    io: &str,
    spool: &Path,
    routes: &[(&str, SocketAddr)],
    postmaster: &str,
) -> Relay {
    Relay::start_with(Opts::relay(
        io,
        spool,
        routes,
        &[1],
        &format!("[relay]\nmynetworks = [\"127.0.0.1/32\"]\npostmaster = \"{postmaster}\"\n"),
    ))
}

/// `relay.postmaster = "ops@bounces.test"`: a bare `<Postmaster>` from a client outside
/// `mynetworks` is taken (RFC 5321 §4.5.1) and delivered to ops@bounces.test; a message
/// from `<>` that fails for good is reported to ops@bounces.test, from `<>` (a double
/// bounce), as an RFC 3464 report naming the failed recipient.
fn postmaster_mail_and_double_bounces_reach_the_postmaster(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let mut refusing = Sink::start(&["--permfail-pct", "100"]);
    let capture = Capture::start(io);
    let mut relay = relay_with_postmaster(
        io,
        &spool,
        &[
            ("example.test", refusing.addr),
            ("bounces.test", capture.addr),
        ],
        "ops@bounces.test",
    );
    let mut c = Client::connect_from(relay.addr, "127.0.0.2".parse().unwrap());
    c.reply().assert(220, HOST);
    c.ehlo(DEFAULT_MAX_SIZE);
    c.expect("MAIL FROM:<someone@elsewhere.test>", 250, "2.1.0");
    c.cmd("RCPT TO:<x@elsewhere.test>")
        .assert_is("550 5.7.1 Relay access denied");
    c.expect("RCPT TO:<Postmaster>", 250, "2.1.5");
    c.expect("DATA", 354, "End");
    c.send(format!(
        "{}.\r\n",
        message("for the postmaster", "hello postmaster")
    ));
    c.reply().queued_id();
    c.expect("QUIT", 221, "2.0.0");

    let seen = capture.wait_for(1, Duration::from_secs(10));
    assert_eq!(seen[0].from.to_string(), "someone@elsewhere.test");
    let to: Vec<&str> = seen[0].to.iter().map(|m| m.as_str()).collect();
    assert_eq!(to, ["ops@bounces.test"]);
    assert!(String::from_utf8_lossy(&seen[0].data).contains("hello postmaster"));

    // From <> to a recipient that refuses: the report goes to the postmaster.
    let original_id = send_one(
        relay.addr,
        "",
        &["rcpt@example.test"],
        message("a bounce that bounces", "x").as_bytes(),
    )
    .queued_id();
    let seen = capture.wait_for(2, Duration::from_secs(10));
    let double = &seen[1];
    assert_eq!(
        double.from,
        ReversePath::Null,
        "a double bounce comes from <>"
    );
    let to: Vec<&str> = double.to.iter().map(|m| m.as_str()).collect();
    assert_eq!(to, ["ops@bounces.test"]);
    let text = String::from_utf8_lossy(&double.data).into_owned();
    assert!(text.contains("report-type=delivery-status"), "{text}");
    assert_eq!(
        dsn_values(&text, "Final-Recipient"),
        ["rfc822; rcpt@example.test"],
        "{text}"
    );
    assert_eq!(dsn_values(&text, "Action"), ["failed"], "{text}");
    assert!(text.contains(&original_id), "{text}");
    assert!(text.contains("Subject: a bounce that bounces"), "{text}");
    wait_queue_empty(&spool, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(capture.envelopes().len(), 2, "one double bounce, no more");
    refusing.stop();
    relay.terminate();
}

/// When the postmaster's own mail fails, nothing more is sent: a message from `<>` to a
/// refusing next hop makes one double bounce to the postmaster, whose next hop refuses it
/// too; that is dropped with a log line, and the queue empties.
fn a_double_bounce_that_fails_is_dropped(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let mut refusing = Sink::start(&["--permfail-pct", "100"]);
    let mut relay = relay_with_postmaster(
        io,
        &spool,
        &[("example.test", refusing.addr)],
        "ops@example.test",
    );
    send_one(
        relay.addr,
        "",
        &["rcpt@example.test"],
        message("from null", "x").as_bytes(),
    )
    .queued_id();
    wait_for(Duration::from_secs(10), "the dropped double bounce", || {
        let log = relay.stderr();
        if log.contains("dropping a double bounce") {
            Ok(())
        } else {
            Err(log)
        }
    });
    wait_queue_empty(&spool, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(2500));
    let (code, report) = refusing.stop();
    assert_eq!(code, Some(0));
    assert_eq!(
        jnum(&report, "messages.permfailed"),
        2,
        "the message and its double bounce, nothing after: {report:#}"
    );
    relay.terminate();
}
