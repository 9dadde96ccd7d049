//! Inbound TLS and AUTH against clients no one here wrote: Python's `smtplib` (STARTTLS,
//! `SMTP_SSL` on an implicit-TLS listener, PLAIN and LOGIN), `swaks --tls --auth` and
//! `openssl s_client -starttls smtp`; plus the attacks: commands injected behind STARTTLS
//! (CVE-2011-0411), a garbage handshake, AUTH before TLS, and guessing passwords. Also the
//! `Received:` header (ESMTPSA with the TLS version and cipher, never the user), SIGHUP
//! reloading the certificate without dropping a connection, `ringrelay passwd` and
//! `check-config` on bad TLS files. Every test on both I/O drivers; tests that need a tool
//! that is not installed say so and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A self-signed certificate for `relay.test` (and `localhost`), as PEM files in `dir`,
/// named `NAME.crt` / `NAME.key`.
fn make_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["relay.test".to_string(), "localhost".into()])
            .expect("rcgen");
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    (cert, key)
}

/// A users file with `alice` / `s3cret`, made by `ringrelay passwd`.
fn make_users(dir: &Path) -> PathBuf {
    let line = passwd("alice", "s3cret\n");
    assert_eq!(line.code, Some(0), "passwd: {}", line.stderr);
    let path = dir.join("users");
    std::fs::write(&path, line.stdout).expect("write users");
    path
}

fn passwd(name: &str, stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringrelay"))
        .args(["passwd", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn passwd");
    use std::io::Write;
    // A refused name ends the command before it reads: a broken pipe is no failure here.
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    let out = child.wait_with_output().expect("passwd output");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The relay with TLS (STARTTLS, and an implicit-TLS listener on `implicit`), AUTH, no
/// trusted networks (so only authenticated clients may relay), and `dest.test` routed to
/// `next_hop`.
struct TlsRelay {
    relay: Relay,
    implicit: u16,
    cert: PathBuf,
    key: PathBuf,
    dir: tempfile::TempDir,
    _spool: tempfile::TempDir,
}

impl TlsRelay {
    fn start(io: &str, next_hop: std::net::SocketAddr) -> TlsRelay {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = make_cert(dir.path(), "a");
        let users = make_users(dir.path());
        let spool = tempfile::tempdir().expect("spool");
        let implicit = free_port();
        let mut opts = Opts::relay(io, spool.path(), &[("dest.test", next_hop)], &[1], "");
        opts.config.push_str(&format!(
            "[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nimplicit_listen = [\"127.0.0.1:{implicit}\"]\n\
             [auth]\nusers_file = {users:?}\n[relay]\nmynetworks = []\n"
        ));
        TlsRelay {
            relay: Relay::start_with(opts),
            implicit,
            cert,
            key,
            dir,
            _spool: spool,
        }
    }
}

/// Runs a Python script with `args`; `None` (and a note) when python3 is not installed.
fn python(script: &str, args: &[String]) -> Option<Output> {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("python3 is not installed: skipping this check");
        return None;
    }
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(script).args(args);
    Some(run_bounded(&mut cmd, Duration::from_secs(30)))
}

/// smtplib: STARTTLS + AUTH PLAIN on the plain listener, then SMTP_SSL + AUTH LOGIN on the
/// implicit one; each sends one message to dest.test. Prints the replies it got.
const SMTPLIB_SEND: &str = r#"
import smtplib, ssl, sys
port, implicit, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
s = smtplib.SMTP("127.0.0.1", port, timeout=10)
s.ehlo()
assert "auth" not in s.esmtp_features, "AUTH offered before TLS"
s.starttls(context=ctx)
s.ehlo()
assert "starttls" not in s.esmtp_features, "STARTTLS offered inside TLS"
print("login", s.login("alice", "s3cret"))
print("send", s.sendmail("a@outside.test", ["one@dest.test"], b"Subject: starttls\r\n\r\nvia STARTTLS\r\n"))
s.quit()
s = smtplib.SMTP_SSL("127.0.0.1", implicit, context=ctx, timeout=10)
s.ehlo()
s.user, s.password = "alice", "s3cret"
print("login", s.auth("LOGIN", s.auth_login))
print("send", s.sendmail("a@outside.test", ["two@dest.test"], b"Subject: implicit\r\n\r\nvia SMTPS\r\n"))
s.quit()
print("done")
"#;

fn python_starttls_and_implicit_tls(io: &str) {
    let capture = Capture::start(io);
    let t = TlsRelay::start(io, capture.addr);
    let args = [
        t.relay.addr.port().to_string(),
        t.implicit.to_string(),
        t.cert.display().to_string(),
    ];
    let Some(out) = python(SMTPLIB_SEND, &args) else {
        return;
    };
    assert_eq!(
        out.code,
        Some(0),
        "smtplib failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("login (235"), "{}", out.stdout);
    assert!(out.stdout.contains("done"), "{}", out.stdout);
    let got = capture.wait_for(2, Duration::from_secs(20));
    for env in &got {
        let text = String::from_utf8_lossy(&env.data).into_owned();
        let received = text.split("\r\n\r\n").next().unwrap_or("");
        assert!(
            received.contains("with ESMTPSA id"),
            "Received: must say ESMTPSA:\n{received}"
        );
        assert!(
            received.contains("(using TLSv1.") && received.contains(" with cipher TLS_"),
            "Received: must name the TLS version and cipher:\n{received}"
        );
        assert!(
            !text.contains("alice"),
            "the authenticated name must never reach the message:\n{text}"
        );
    }
    let rcpts: Vec<String> = got.iter().map(|e| e.to[0].to_string()).collect();
    assert!(rcpts.contains(&"one@dest.test".to_string()), "{rcpts:?}");
    assert!(rcpts.contains(&"two@dest.test".to_string()), "{rcpts:?}");
    assert!(
        t.relay.stderr().contains("user=alice") || t.relay.stderr().contains("user: alice"),
        "the log names who authenticated:\n{}",
        t.relay.stderr()
    );
}

/// Before TLS: no AUTH in EHLO, AUTH gets 538, relaying is refused; over TLS: a wrong
/// password gets 535, and the third failure ends the connection with 421.
const SMTPLIB_BAD_AUTH: &str = r#"
import smtplib, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
s = smtplib.SMTP("127.0.0.1", port, timeout=10)
s.starttls(context=ctx)
s.ehlo()
codes = []
s.user, s.password = "alice", "wrong"
for i in range(3):
    try:
        s.auth("PLAIN", s.auth_plain)
    except smtplib.SMTPAuthenticationError as e:
        codes.append(e.smtp_code)
    except smtplib.SMTPServerDisconnected:
        codes.append("closed")
        break
print("codes", codes)
try:
    print("after", s.noop())
except smtplib.SMTPServerDisconnected:
    print("after closed")
"#;

fn auth_needs_tls_and_the_right_password(io: &str) {
    let capture = Capture::start(io);
    let t = TlsRelay::start(io, capture.addr);
    let mut c = t.relay.connect();
    let ehlo = c.cmd("EHLO client.test");
    assert!(ehlo.wire().contains("STARTTLS"), "{}", ehlo.wire());
    assert!(
        !ehlo.wire().contains("AUTH"),
        "AUTH before TLS: {}",
        ehlo.wire()
    );
    let auth = c.cmd("AUTH PLAIN AGFsaWNlAHMzY3JldA==");
    assert_eq!(auth.code, 538, "{}", auth.text());
    assert!(auth.text().starts_with("5.7.11"), "{}", auth.text());
    assert_eq!(c.cmd("MAIL FROM:<a@outside.test>").code, 250);
    let rcpt = c.cmd("RCPT TO:<x@dest.test>");
    assert_eq!(
        rcpt.code,
        550,
        "an outside client may not relay: {}",
        rcpt.text()
    );
    assert!(rcpt.text().contains("5.7.1"), "{}", rcpt.text());
    let args = [
        t.relay.addr.port().to_string(),
        t.cert.display().to_string(),
    ];
    let Some(out) = python(SMTPLIB_BAD_AUTH, &args) else {
        return;
    };
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("codes [535, 535, 535]"),
        "{}",
        out.stdout
    );
    // The 421 follows the third 535 at once; the client reads it as its next reply.
    assert!(
        out.stdout
            .contains("after (421, b'4.7.0 relay.test Error: too many authentication failures')")
            || out.stdout.contains("after closed"),
        "{}",
        out.stdout
    );
    assert!(capture.envelopes().is_empty());
}

/// CVE-2011-0411: `STARTTLS` and `RSET` in one packet; the RSET must never be answered
/// (inside TLS or out). Then a garbage "handshake" costs its connection only.
const INJECTION: &str = r#"
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
def lines(f):
    out = []
    while True:
        l = f.readline().decode()
        out.append(l.strip())
        if len(l) < 4 or l[3] != "-":
            return out
raw = socket.create_connection(("127.0.0.1", port), timeout=10)
f = raw.makefile("rb")
lines(f)
raw.sendall(b"EHLO a.test\r\n")
lines(f)
raw.sendall(b"STARTTLS\r\nRSET\r\n")
print("starttls", lines(f))
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
tls = ctx.wrap_socket(raw, server_hostname="relay.test")
tf = tls.makefile("rb")
tls.sendall(b"EHLO b.test\r\n")
print("ehlo", lines(tf))
tls.sendall(b"NOOP\r\n")
print("noop", lines(tf))
tls.close()
g = socket.create_connection(("127.0.0.1", port), timeout=10)
gf = g.makefile("rb")
lines(gf)
g.sendall(b"STARTTLS\r\n")
lines(gf)
g.sendall(b"GET / HTTP/1.0\r\n\r\n" * 20)
try:
    rest = g.recv(4096)
    while rest:
        if b"250" in rest:
            print("garbage got an SMTP reply")
        rest = g.recv(4096)
    print("garbage closed")
except (ConnectionResetError, socket.timeout) as e:
    print("garbage closed", type(e).__name__)
h = socket.create_connection(("127.0.0.1", port), timeout=10)
hf = h.makefile("rb")
print("next", lines(hf))
"#;

fn starttls_injection_and_garbage(io: &str) {
    let capture = Capture::start(io);
    let t = TlsRelay::start(io, capture.addr);
    let args = [
        t.relay.addr.port().to_string(),
        t.cert.display().to_string(),
    ];
    let Some(out) = python(INJECTION, &args) else {
        return;
    };
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("starttls ['220 2.0.0 Ready to start TLS']"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ehlo ['250-relay.test'"),
        "the first reply inside TLS must answer EHLO, not the injected RSET:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("noop ['250 2.0.0 Ok']"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("garbage closed"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("garbage got an SMTP reply"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("next ['220 relay.test"),
        "{}",
        out.stdout
    );
}

/// swaks and openssl s_client, where installed.
fn swaks_and_openssl(io: &str) {
    let capture = Capture::start(io);
    let t = TlsRelay::start(io, capture.addr);
    let server = format!("127.0.0.1:{}", t.relay.addr.port());
    if Command::new("swaks").arg("--version").output().is_ok() {
        let mut cmd = Command::new("swaks");
        cmd.args([
            "--server",
            &server,
            "--from",
            "a@outside.test",
            "--to",
            "s@dest.test",
        ])
        .args(["--tls", "--auth", "PLAIN", "--auth-user", "alice"])
        .args(["--auth-password", "s3cret", "--timeout", "10"]);
        let out = run_bounded(&mut cmd, Duration::from_secs(30));
        assert_eq!(out.code, Some(0), "swaks:\n{}\n{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("235 2.7.0"), "{}", out.stdout);
        assert!(
            out.stdout.contains("250 2.0.0 Ok: queued as"),
            "{}",
            out.stdout
        );
        capture.wait_for(1, Duration::from_secs(20));
    } else {
        eprintln!("swaks is not installed: skipping it");
    }
    if Command::new("openssl").arg("version").output().is_ok() {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "printf 'EHLO o.test\\r\\nQUIT\\r\\n' | openssl s_client -starttls smtp -connect {server} -quiet -ign_eof 2>&1"
        ));
        let out = run_bounded(&mut cmd, Duration::from_secs(30));
        assert!(
            out.stdout.contains("250-AUTH PLAIN LOGIN") && out.stdout.contains("221 2.0.0 Bye"),
            "openssl s_client:\n{}",
            out.stdout
        );
    } else {
        eprintln!("openssl is not installed: skipping it");
    }
}

/// SIGHUP: a new certificate for new connections; an open TLS connection goes on.
const CERT_OF: &str = r#"
import smtplib, ssl, sys, hashlib, time
port, first, second = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def fingerprint(s):
    return hashlib.sha256(s.sock.getpeercert(binary_form=True)).hexdigest()
ctx = ssl.create_default_context(cafile=first)
ctx.check_hostname = False
old = smtplib.SMTP("127.0.0.1", port, timeout=10)
old.starttls(context=ctx)
print("before", fingerprint(old))
sys.stdout.flush()
input()  # the test swaps the files and sends SIGHUP
ctx2 = ssl.create_default_context(cafile=second)
ctx2.check_hostname = False
new = smtplib.SMTP("127.0.0.1", port, timeout=10)
new.starttls(context=ctx2)
print("after", fingerprint(new))
print("old still", old.noop()[0])
"#;

fn sighup_reloads_the_certificate(io: &str) {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("python3 is not installed: skipping");
        return;
    }
    let capture = Capture::start(io);
    let t = TlsRelay::start(io, capture.addr);
    let (cert_b, key_b) = make_cert(t.dir.path(), "b");
    let first = t.dir.path().join("first.crt");
    std::fs::copy(&t.cert, &first).expect("copy cert");
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(CERT_OF)
        .args([
            t.relay.addr.port().to_string(),
            first.display().to_string(),
            cert_b.display().to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::{BufRead, Write};
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut before = String::new();
    stdout.read_line(&mut before).expect("before line");
    assert!(before.starts_with("before "), "{before}");
    // Rotate in place, as certbot does, then SIGHUP.
    std::fs::copy(&cert_b, &t.cert).expect("rotate cert");
    std::fs::copy(&key_b, &t.key).expect("rotate key");
    t.relay.signal("HUP");
    wait_for(Duration::from_secs(10), "the reload's log line", || {
        if t.relay.stderr().contains("SIGHUP: configuration reloaded") {
            Ok(())
        } else {
            Err(t.relay.stderr())
        }
    });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"\n")
        .expect("go on");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("rest");
    let status = child.wait().expect("python3 exit");
    assert!(status.success(), "{before}{rest}");
    let after = rest.lines().find(|l| l.starts_with("after ")).unwrap_or("");
    assert!(!after.is_empty(), "{rest}");
    assert_ne!(
        before.trim()[7..],
        after[6..],
        "the new certificate is served after SIGHUP"
    );
    assert!(
        rest.contains("old still 250"),
        "the open connection survives: {rest}"
    );
    // A broken certificate is refused, and the server keeps serving with the last good one.
    std::fs::write(&t.cert, "not a certificate").expect("break cert");
    t.relay.signal("HUP");
    wait_for(
        Duration::from_secs(10),
        "the refused reload's log line",
        || {
            if t.relay.stderr().contains("reload refused") {
                Ok(())
            } else {
                Err(t.relay.stderr())
            }
        },
    );
    let mut c = t.relay.connect();
    assert!(c.cmd("EHLO x.test").wire().contains("STARTTLS"));
}

io_tests!(
    python_starttls_and_implicit_tls,
    auth_needs_tls_and_the_right_password,
    starttls_injection_and_garbage,
    swaks_and_openssl,
    sighup_reloads_the_certificate,
);

#[test]
fn passwd_makes_a_users_line_and_refuses_bad_names() {
    let out = passwd("bob", "pw with spaces\n");
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.starts_with("bob:$argon2id$"), "{}", out.stdout);
    assert!(!out.stdout.contains("pw with spaces") && !out.stderr.contains("pw with spaces"));
    assert_eq!(passwd("a:b", "x\n").code, Some(2));
    assert_eq!(passwd("bob", "\n").code, Some(2));
}

#[test]
fn check_config_names_a_bad_tls_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _) = make_cert(dir.path(), "c");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!("[tls]\ncert_file = {cert:?}\nkey_file = \"/nonexistent/key.pem\"\n"),
    )
    .expect("write config");
    let out = ringrelay_cmd(&[
        "check-config".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("tls.cert_file/tls.key_file"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("/nonexistent/key.pem"),
        "{}",
        out.stderr
    );
    std::fs::write(&config, "[auth]\nusers_file = \"/x\"\n").expect("write config");
    let out = ringrelay_cmd(&[
        "check-config".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("auth.users_file"), "{}", out.stderr);
}
