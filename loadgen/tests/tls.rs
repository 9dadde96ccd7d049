//! STARTTLS and AUTH: `send --starttls` into `sink --tls-cert` with certificates made at test
//! time, certificate checks on request, plain clients beside TLS ones, AUTH PLAIN against a
//! server that checks the blob, and Python's smtplib as an independent STARTTLS client.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn starttls_send_into_a_tls_sink_counts_messages_and_sessions_on_both_sides() {
    let dir = Scratch::new("tls-roundtrip");
    let certs = make_certs(&dir);
    let (sj, dj, pj, vj) = (
        dir.path("sink.json"),
        dir.path("send.json"),
        dir.path("plain.json"),
        dir.path("verify.json"),
    );
    let sink = Sink::start(&[
        "--tls-cert",
        s(&certs.chain),
        "--tls-key",
        s(&certs.key),
        "--expect",
        "130",
        "--json",
        s(&sj),
    ]);
    let target = sink.target();

    // Checking certificates against the public roots alone fails on every connection, with
    // the reason; nothing gets through, so the run fails at once.
    let o = send(&[
        "--target",
        &target,
        "--starttls",
        "--tls-verify",
        "--connections",
        "2",
        "--messages",
        "5",
        "--json",
        s(&vj),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("TLS handshake: invalid peer certificate"),
        "{}",
        o.stderr
    );
    let v = read_json(&vj);
    assert_eq!(num(&v, "tls.sessions"), 0);
    assert_eq!(num(&v, "tls.handshake_failures"), 2);
    assert_eq!(num(&v, "errors.tls"), 2);

    // A plain client is still served by a sink that offers STARTTLS.
    let o = send(&[
        "--target",
        &target,
        "--connections",
        "2",
        "--messages",
        "30",
        "--json",
        s(&pj),
    ]);
    assert!(o.status.success(), "{}", o.stderr);
    assert!(read_json(&pj)["tls"].is_null());

    // Verified against the test CA, by the IP address in --target.
    let o = send(&[
        "--target",
        &target,
        "--starttls",
        "--tls-ca",
        s(&certs.ca),
        "--connections",
        "3",
        "--messages",
        "100",
        "--pipelining",
        "--json",
        s(&dj),
    ]);
    assert!(o.status.success(), "{}", o.stderr);
    assert!(o.stdout.contains("tls: 3 sessions"), "{}", o.stdout);
    let (st, _) = sink.finish();
    assert!(st.success(), "sink exit {st:?}");

    let d = read_json(&dj);
    assert_eq!(num(&d, "messages.accepted"), 100);
    assert_eq!(num(&d, "tls.sessions"), 3);
    assert_eq!(num(&d, "tls.handshake_failures"), 0);
    assert_eq!(num(&d, "tls.handshake_us.count"), 3);
    assert!(num(&d, "tls.handshake_us.p50") > 0);
    assert_eq!(d["config"]["starttls"], true);
    assert_eq!(d["config"]["tls_verify"], true);

    let k = read_json(&sj);
    assert_eq!(num(&k, "messages.unique"), 130);
    assert_eq!(num(&k, "messages.corrupted"), 0);
    assert_eq!(num(&k, "tls.sessions"), 3);
    assert_eq!(num(&k, "tls.handshake_failures"), 2);
    assert_eq!(num(&k, "tls.handshake_us.count"), 3);
    assert_eq!(num(&k, "connections.accepted"), 2 + 2 + 3);
}

#[test]
fn starttls_not_offered_is_a_connection_failure_with_the_server_name() {
    let fake = FakeSmtp::start(|_, _| None, None);
    let dir = Scratch::new("tls-not-offered");
    let dj = dir.path("send.json");
    let o = send(&[
        "--target",
        &fake.addr,
        "--starttls",
        "--connections",
        "2",
        "--messages",
        "4",
        "--json",
        s(&dj),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", o.stderr);
    assert!(
        o.stderr
            .contains("STARTTLS not offered in EHLO by fake.test"),
        "{}",
        o.stderr
    );
    let d = read_json(&dj);
    assert_eq!(num(&d, "errors.tls"), 2);
    assert_eq!(
        d["connection_failures"]["STARTTLS not offered in EHLO by fake.test"].as_u64(),
        Some(2)
    );
    assert_eq!(fake.count(|c| &c.messages), 0);
}

/// base64("\0alice\0s3cret")
const ALICE: &str = "AGFsaWNlAHMzY3JldA==";

#[test]
fn auth_plain_sends_the_right_blob_and_a_535_is_reported_with_its_text() {
    let fake = FakeSmtp::start(|_, _| None, Some(ALICE));
    let dir = Scratch::new("auth");
    let (ok, bad) = (dir.path("ok.json"), dir.path("bad.json"));
    let o = send(&[
        "--target",
        &fake.addr,
        "--auth",
        "alice:s3cret",
        "--connections",
        "2",
        "--messages",
        "10",
        "--json",
        s(&ok),
    ]);
    assert!(o.status.success(), "{}", o.stderr);
    let d = read_json(&ok);
    assert_eq!(num(&d, "messages.accepted"), 10);
    assert_eq!(num(&d, "auth.succeeded"), 2);
    assert_eq!(num(&d, "auth.failed"), 0);
    assert_eq!(d["config"]["auth_user"], "alice");
    assert_eq!(fake.count(|c| &c.auth_ok), 2);
    assert_eq!(fake.count(|c| &c.messages), 10);

    let o = send(&[
        "--target",
        &fake.addr,
        "--auth",
        "alice:wrong",
        "--connections",
        "2",
        "--messages",
        "10",
        "--json",
        s(&bad),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", o.stderr);
    let reason = "AUTH 535 5.7.8 Error: authentication failed: bad credentials";
    assert!(o.stderr.contains(reason), "{}", o.stderr);
    let d = read_json(&bad);
    assert_eq!(num(&d, "auth.failed"), 2);
    assert_eq!(num(&d, "errors.auth"), 2);
    assert_eq!(d["connection_failures"][reason].as_u64(), Some(2));
    assert_eq!(fake.count(|c| &c.messages), 10);
}

#[test]
fn tls_usage_errors_exit_2() {
    let dir = Scratch::new("tls-usage");
    let missing = dir.path("missing.pem");
    for args in [
        &["sink", "--tls-cert", s(&missing)][..],
        &["sink", "--tls-cert", s(&missing), "--tls-key", s(&missing)],
        &["send", "--target", "127.0.0.1:1", "--tls-verify"],
        &["send", "--target", "127.0.0.1:1", "--auth", "no-colon"],
    ] {
        let o = run(Command::new(bin()).args(args), Duration::from_secs(20));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
        assert!(o.stderr.starts_with("loadgen: "), "{}", o.stderr);
    }
}

const SMTPLIB_CLIENT: &str = r#"
import smtplib, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
s = smtplib.SMTP(host, port, timeout=20)
s.ehlo("python.test")
if not s.has_extn("starttls"):
    sys.exit("sink does not offer STARTTLS")
s.starttls(context=ctx)
s.ehlo("python.test")
if s.has_extn("starttls"):
    sys.exit("STARTTLS offered again inside TLS")
s.sendmail("py@python.test", ["rcpt@example.test"],
           "From: py@python.test\r\nSubject: hello\r\n\r\nsent by smtplib over STARTTLS\r\n")
s.quit()
print("sent")
"#;

#[test]
fn python_smtplib_starttls_into_the_sink() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("note: python3 not found; skipping the smtplib STARTTLS test");
        return;
    }
    let dir = Scratch::new("tls-python");
    let certs = make_certs(&dir);
    let sj = dir.path("sink.json");
    let sink = Sink::start(&[
        "--tls-cert",
        s(&certs.chain),
        "--tls-key",
        s(&certs.key),
        "--json",
        s(&sj),
    ]);
    let port = sink.addr.port().to_string();
    let o = run(
        Command::new("python3").args(["-c", SMTPLIB_CLIENT, "127.0.0.1", &port, s(&certs.ca)]),
        Duration::from_secs(30),
    );
    assert!(
        o.status.success() && o.stdout.contains("sent"),
        "smtplib failed: {}\n{}",
        o.stderr,
        o.stdout
    );
    let (st, _) = sink.stop();
    assert!(st.success());
    let k = read_json(&sj);
    assert_eq!(num(&k, "messages.received"), 1);
    assert_eq!(num(&k, "messages.foreign"), 1);
    assert_eq!(num(&k, "tls.sessions"), 1);
    assert_eq!(num(&k, "tls.handshake_failures"), 0);
}
