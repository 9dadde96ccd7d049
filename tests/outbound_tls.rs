//! Outbound STARTTLS at Postfix's levels and AUTH to a smarthost, end to end, on both I/O
//! drivers, against Python `aiosmtpd` next hops (`tests/common/python.rs`) with
//! certificates made here (rcgen). Each test skips with a note when no python3 with
//! aiosmtpd is at hand.
//!
//! - `may`: TLS when offered (also by a hop that requires STARTTLS); plaintext when not
//!   offered; plaintext at once when the handshake fails (a hop speaking TLS 1.1 at most).
//! - `encrypt`: a plaintext-only hop never gets the mail: it stays queued, retried; any
//!   certificate is fine (a self-signed one), and `tls_policy` sets it per domain.
//! - `verify`: a self-signed certificate defers; a chain to `delivery.tls_ca_file` is
//!   delivered when the name matches the MX host's name or, for an address route, the IP,
//!   and defers when it does not.
//! - The smarthost: AUTH over TLS with the password file's password is delivered, a wrong
//!   password defers.
//! - Resumption: a second connection to the same hop resumes the first one's TLS session.

mod common;
mod dnsfix;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use dnsfix::DnsFixture;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

io_tests!(
    may_delivers_over_tls_when_offered,
    may_delivers_in_plaintext_without_starttls,
    may_falls_back_to_plaintext_when_the_handshake_fails,
    encrypt_never_delivers_in_plaintext,
    encrypt_takes_any_certificate_per_domain_policy,
    verify_refuses_a_self_signed_certificate,
    verify_checks_the_chain_and_the_next_hops_name,
    smarthost_auth_over_tls,
    smarthost_wrong_password_defers,
    tls_sessions_are_resumed,
);

const SENDER: &str = "sender@src.test";
const WAIT: Duration = Duration::from_secs(15);

/// The names every test certificate carries.
const NAMES: [&str; 3] = ["mx.verified.test", "localhost", "127.0.0.1"];

/// Certificates as PEM files in a temporary directory: a CA, a leaf for [`NAMES`] signed by
/// it, and the same names self-signed.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, pem: String| {
            std::fs::write(dir.path().join(name), pem).expect("write a PEM file");
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ringrelay outbound test CA");
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
        write("ca.pem", ca.pem());
        let names: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
        let key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(names.clone())
            .expect("leaf params")
            .signed_by(&key, &*ca)
            .expect("leaf");
        write("leaf.pem", leaf.pem());
        write("leaf.key", key.serialize_pem());
        let key = KeyPair::generate().expect("key");
        let own = CertificateParams::new(names)
            .expect("self-signed params")
            .self_signed(&key)
            .expect("self-signed");
        write("self.pem", own.pem());
        write("self.key", key.serialize_pem());
        Certs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA-signed leaf, for [`AiosmtpdOpts::tls`].
    fn signed(&self) -> Option<(PathBuf, PathBuf)> {
        Some((self.path("leaf.pem"), self.path("leaf.key")))
    }

    /// The self-signed certificate.
    fn self_signed(&self) -> Option<(PathBuf, PathBuf)> {
        Some((self.path("self.pem"), self.path("self.key")))
    }
}

/// A relay (two shards, retries every second) routing each `(domain, next hop)`, with
/// more `[delivery]` keys in `extra`; and its spool's directory.
fn relay(io: &str, routes: &[(&str, SocketAddr)], extra: &str) -> (Relay, tempfile::TempDir) {
    let work = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start_with(Opts::relay(
        io,
        &work.path().join("spool"),
        routes,
        &[1],
        extra,
    ));
    (relay, work)
}

fn spool(work: &tempfile::TempDir) -> PathBuf {
    work.path().join("spool")
}

/// One message to `rcpt` through the relay; its queue ID.
#[track_caller]
fn send(relay: &Relay, rcpt: &str) -> String {
    let data = message("outbound tls", &format!("for {rcpt}"));
    send_one(relay.addr, SENDER, &[rcpt], data.as_bytes()).queued_id()
}

/// The one message `hop` took, checked against what was sent to `rcpt`; whether it came
/// over TLS.
#[track_caller]
fn received_one(hop: &Aiosmtpd, rcpt: &str) -> serde_json::Value {
    let got = hop.wait_received(1, WAIT);
    assert_eq!(got.len(), 1, "{got:#?}");
    let m = got[0].clone();
    assert_eq!(m["from"], SENDER, "{m:#}");
    assert_eq!(m["rcpts"], serde_json::json!([rcpt]), "{m:#}");
    assert!(
        m["data"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("for {rcpt}"))),
        "{m:#}"
    );
    m
}

/// Sends one message to `rcpt` and checks it is deferred for `reason`, never delivered:
/// the relay tried at least twice and logged `reason` each time; `hop` got nothing; the
/// message is still queued for `rcpt`.
#[track_caller]
fn send_and_expect_deferred(relay: &Relay, spool: &Path, hop: &Aiosmtpd, rcpt: &str, reason: &str) {
    send(relay, rcpt);
    wait_for(WAIT, "two deferrals logged", || {
        let log = relay.stderr();
        if log.matches(reason).count() >= 2 {
            Ok(())
        } else {
            Err(format!("no two {reason:?} in the relay's log:\n{log}"))
        }
    });
    assert!(
        hop.received().is_empty(),
        "never delivered: {:#?}",
        hop.received()
    );
    let queued = queue_list(spool);
    let pending: Vec<&serde_json::Value> = queued
        .iter()
        .flat_map(|m| m["pending"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(pending, [rcpt], "still queued: {queued:#?}");
}

fn may_delivers_over_tls_when_offered(io: &str) {
    if skip_without_aiosmtpd("may_delivers_over_tls_when_offered") {
        return;
    }
    let certs = Certs::new();
    // It refuses everything but EHLO and STARTTLS in plaintext.
    let hop = Aiosmtpd::start(&AiosmtpdOpts {
        tls: certs.self_signed(),
        require_starttls: true,
        ..Default::default()
    });
    // `may` is the default.
    let (mut relay, work) = relay(io, &[("example.test", hop.addr)], "");
    send(&relay, "b@example.test");
    let m = received_one(&hop, "b@example.test");
    assert_eq!(m["tls"], true, "{m:#}");
    assert_eq!(m["version"], "TLSv1.3", "{m:#}");
    let log = relay.stderr();
    assert!(
        log.contains(&format!(
            "Untrusted TLS connection established to {}",
            hop.addr
        )),
        "{log}"
    );
    wait_queue_empty(&spool(&work), WAIT);
    relay.terminate();
}

fn may_delivers_in_plaintext_without_starttls(io: &str) {
    if skip_without_aiosmtpd("may_delivers_in_plaintext_without_starttls") {
        return;
    }
    let hop = Aiosmtpd::start(&AiosmtpdOpts::default());
    let (mut relay, work) = relay(io, &[("example.test", hop.addr)], "tls = \"may\"");
    send(&relay, "b@example.test");
    let m = received_one(&hop, "b@example.test");
    assert_eq!(m["tls"], false, "{m:#}");
    wait_queue_empty(&spool(&work), WAIT);
    relay.terminate();
}

fn may_falls_back_to_plaintext_when_the_handshake_fails(io: &str) {
    if skip_without_aiosmtpd("may_falls_back_to_plaintext_when_the_handshake_fails") {
        return;
    }
    let certs = Certs::new();
    // Offers STARTTLS, but speaks at most TLS 1.1, which we do not: every handshake fails.
    let hop = Aiosmtpd::start(&AiosmtpdOpts {
        tls: certs.self_signed(),
        max_tls: Some("TLSv1_1"),
        ..Default::default()
    });
    let (mut relay, work) = relay(io, &[("example.test", hop.addr)], "");
    send(&relay, "b@example.test");
    // In the same attempt: no wait for a retry.
    let m = received_one(&hop, "b@example.test");
    assert_eq!(m["tls"], false, "{m:#}");
    let log = relay.stderr();
    assert_eq!(
        log.matches("delivering to it in plaintext").count(),
        1,
        "the fallback is logged, once:\n{log}"
    );
    wait_queue_empty(&spool(&work), WAIT);
    relay.terminate();
}

fn encrypt_never_delivers_in_plaintext(io: &str) {
    if skip_without_aiosmtpd("encrypt_never_delivers_in_plaintext") {
        return;
    }
    let hop = Aiosmtpd::start(&AiosmtpdOpts::default());
    let (mut relay, work) = relay(io, &[("example.test", hop.addr)], "tls = \"encrypt\"");
    send_and_expect_deferred(
        &relay,
        &spool(&work),
        &hop,
        "b@example.test",
        "TLS is required, but was not offered",
    );
    relay.terminate();
}

fn encrypt_takes_any_certificate_per_domain_policy(io: &str) {
    if skip_without_aiosmtpd("encrypt_takes_any_certificate_per_domain_policy") {
        return;
    }
    let certs = Certs::new();
    let hop = Aiosmtpd::start(&AiosmtpdOpts {
        tls: certs.self_signed(),
        ..Default::default()
    });
    // Two domains to one next hop: TLS for one of them only.
    let (mut relay, work) = relay(
        io,
        &[("secure.test", hop.addr), ("plain.test", hop.addr)],
        "tls = \"none\"\ntls_policy = { \"secure.test\" = \"encrypt\" }",
    );
    send(&relay, "b@secure.test");
    send(&relay, "c@plain.test");
    let got = hop.wait_received(2, WAIT);
    let tls_of = |rcpt: &str| {
        got.iter()
            .find(|m| m["rcpts"] == serde_json::json!([rcpt]))
            .map(|m| m["tls"].clone())
            .unwrap_or_else(|| panic!("nothing for {rcpt}: {got:#?}"))
    };
    assert_eq!(tls_of("b@secure.test"), true, "{got:#?}");
    assert_eq!(tls_of("c@plain.test"), false, "{got:#?}");
    wait_queue_empty(&spool(&work), WAIT);
    relay.terminate();
}

fn verify_refuses_a_self_signed_certificate(io: &str) {
    if skip_without_aiosmtpd("verify_refuses_a_self_signed_certificate") {
        return;
    }
    let certs = Certs::new();
    let hop = Aiosmtpd::start(&AiosmtpdOpts {
        tls: certs.self_signed(),
        ..Default::default()
    });
    // The CA file names our test CA, which did not sign this certificate.
    let extra = format!(
        "tls = \"verify\"\ntls_ca_file = \"{}\"",
        certs.path("ca.pem").display()
    );
    let (mut relay, work) = relay(io, &[("example.test", hop.addr)], &extra);
    send_and_expect_deferred(
        &relay,
        &spool(&work),
        &hop,
        "b@example.test",
        "TLS handshake failed: invalid peer certificate",
    );
    assert!(
        !relay.stderr().contains("in plaintext"),
        "no plaintext fallback at verify"
    );
    relay.terminate();
}

fn verify_checks_the_chain_and_the_next_hops_name(io: &str) {
    if skip_without_aiosmtpd("verify_checks_the_chain_and_the_next_hops_name") {
        return;
    }
    let certs = Certs::new();
    let hop = Aiosmtpd::start(&AiosmtpdOpts {
        tls: certs.signed(),
        ..Default::default()
    });
    // Two MX domains at the same address: one MX host's name is on the certificate, the
    // other's is not. And an address route, checked against the IP.
    let dns = DnsFixture::start();
    dns.mx("verified.test", 10, "mx.verified.test", 300);
    dns.a("mx.verified.test", Ipv4Addr::LOCALHOST, 300);
    dns.mx("mismatch.test", 10, "mx.mismatch.test", 300);
    dns.a("mx.mismatch.test", Ipv4Addr::LOCALHOST, 300);
    let extra = mx_delivery(
        dns.addr,
        hop.addr.port(),
        &format!(
            "tls = \"verify\"\ntls_ca_file = \"{}\"",
            certs.path("ca.pem").display()
        ),
    );
    let (mut relay, work) = relay(io, &[("iproute.test", hop.addr)], &extra);
    send(&relay, "b@verified.test");
    send(&relay, "c@iproute.test");
    send(&relay, "d@mismatch.test");
    let got = hop.wait_received(2, WAIT);
    for rcpt in ["b@verified.test", "c@iproute.test"] {
        let m = got
            .iter()
            .find(|m| m["rcpts"] == serde_json::json!([rcpt]))
            .unwrap_or_else(|| panic!("nothing for {rcpt}: {got:#?}"));
        assert_eq!(m["tls"], true, "{m:#}");
    }
    wait_for(WAIT, "the name mismatch deferred twice", || {
        let log = relay.stderr();
        let n = log
            .lines()
            .filter(|l| l.contains("mx.mismatch.test") && l.contains("invalid peer certificate"))
            .count();
        if n >= 2 {
            Ok(())
        } else {
            Err(log)
        }
    });
    assert_eq!(hop.received().len(), 2, "{:#?}", hop.received());
    let log = relay.stderr();
    assert!(
        log.contains("Verified TLS connection established")
            && log.contains("(mx.verified.test): TLSv1.3"),
        "{log}"
    );
    let queued = queue_list(&spool(&work));
    assert_eq!(queued.len(), 1, "{queued:#?}");
    assert_eq!(queued[0]["pending"], serde_json::json!(["d@mismatch.test"]));
    relay.terminate();
}

/// The relay with `hop` as its smarthost, AUTH as `relay-user` with `password`.
fn smarthost_relay(io: &str, hop: &Aiosmtpd, password: &str) -> (Relay, tempfile::TempDir) {
    let secrets = tempfile::tempdir().expect("tempdir");
    let file = secrets.path().join("smarthost.password");
    std::fs::write(&file, format!("{password}\nignored second line\n")).expect("password");
    let extra = format!(
        "smarthost = \"{}\"\nsmarthost_user = \"relay-user\"\nsmarthost_password_file = \"{}\"",
        hop.addr,
        file.display()
    );
    let (relay, work) = relay(io, &[], &extra);
    // The relay read the password at start; the file may go.
    drop(secrets);
    (relay, work)
}

fn smarthost_auth_over_tls(io: &str) {
    if skip_without_aiosmtpd("smarthost_auth_over_tls") {
        return;
    }
    let certs = Certs::new();
    let hop = Aiosmtpd::start(&AiosmtpdOpts {
        tls: certs.self_signed(),
        auth: Some(("relay-user".into(), "s3cret pass".into())),
        ..Default::default()
    });
    let (mut relay, work) = smarthost_relay(io, &hop, "s3cret pass");
    send(&relay, "b@anywhere.test");
    let m = received_one(&hop, "b@anywhere.test");
    assert_eq!(m["tls"], true, "{m:#}");
    assert_eq!(m["user"], "relay-user", "{m:#}");
    wait_queue_empty(&spool(&work), WAIT);
    relay.terminate();
}

fn smarthost_wrong_password_defers(io: &str) {
    if skip_without_aiosmtpd("smarthost_wrong_password_defers") {
        return;
    }
    let certs = Certs::new();
    let hop = Aiosmtpd::start(&AiosmtpdOpts {
        tls: certs.self_signed(),
        auth: Some(("relay-user".into(), "s3cret pass".into())),
        ..Default::default()
    });
    let (mut relay, work) = smarthost_relay(io, &hop, "wrong");
    send_and_expect_deferred(
        &relay,
        &spool(&work),
        &hop,
        "b@anywhere.test",
        "AUTH refused: 535",
    );
    assert!(
        !relay.stderr().contains("bounced"),
        "a refused AUTH never bounces"
    );
    relay.terminate();
}

fn tls_sessions_are_resumed(io: &str) {
    if skip_without_aiosmtpd("tls_sessions_are_resumed") {
        return;
    }
    let certs = Certs::new();
    // It closes each connection after a message: the second needs a new one.
    let hop = Aiosmtpd::start(&AiosmtpdOpts {
        tls: certs.self_signed(),
        close_after_message: true,
        ..Default::default()
    });
    let work = tempfile::tempdir().expect("tempdir");
    // One shard: the session cache is per shard.
    let mut opts = Opts::relay(io, &spool(&work), &[("example.test", hop.addr)], &[1], "");
    opts.shards = 1;
    let mut relay = Relay::start_with(opts);
    send(&relay, "b@example.test");
    hop.wait_received(1, WAIT);
    // Let the next hop's close arrive, so the pooled connection is seen to be gone.
    std::thread::sleep(Duration::from_millis(300));
    send(&relay, "c@example.test");
    let got = hop.wait_received(2, WAIT);
    assert_eq!(got[0]["tls"], true, "{got:#?}");
    assert_eq!(got[0]["resumed"], false, "{got:#?}");
    assert_eq!(got[1]["tls"], true, "{got:#?}");
    assert_eq!(
        got[1]["resumed"], true,
        "the second session resumes: {got:#?}"
    );
    wait_queue_empty(&spool(&work), WAIT);
    relay.terminate();
}
