//! Running ringrelay as a service: systemd's readiness protocol (`READY=1` once the port
//! accepts, `STOPPING=1` at SIGTERM, on a socket path or in the abstract namespace),
//! `contrib/ringrelay.service` passing `systemd-analyze verify` (where it exists), and
//! `check-config` refusing what `serve` refuses (exit 2, the same line), warning on what
//! looks wrong and printing the effective configuration as TOML that reads back the same.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

io_tests!(ready_and_stopping_reach_the_notify_socket);

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
