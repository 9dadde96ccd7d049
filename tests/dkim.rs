//! DKIM signing, checked by a verifier nobody here wrote: mail relayed through ringrelay
//! (both drivers) to an `aiosmtpd` next hop is verified with Python's `dkimpy`, the public
//! key handed over directly instead of from DNS (derived from the key file by `openssl`).
//! RSA-2048, RSA-1024 and Ed25519 signatures pass; a copy with one body byte or one signed header
//! changed fails. A `From:` domain without a key and a message with two `From:` headers
//! go unsigned. `check-config` (and `serve`) refuse bad keys naming domain and file; a
//! SIGHUP with a new selector and key takes effect, and one with a bad key is refused and
//! the old key keeps signing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Verifies the message in argv[1] with dkimpy. argv[2..]: `selector=key.pem` pairs; the
/// `dnsfunc` answers `SELECTOR._domainkey.example.com` with the TXT record of that key
/// (`p=` from `openssl pkey -pubout`: the SubjectPublicKeyInfo for RSA, the raw 32 bytes
/// for Ed25519, RFC 8463). Prints `pass` or `fail`.
const VERIFY: &str = r#"
import base64, subprocess, sys
import dkim

records = {}
for pair in sys.argv[2:]:
    selector, pem = pair.split("=", 1)
    der = subprocess.run(["openssl", "pkey", "-in", pem, "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    text = subprocess.run(["openssl", "pkey", "-in", pem, "-noout", "-text"],
                          capture_output=True, text=True).stdout
    if "ED25519" in text.upper():
        record = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(der[-32:])
    else:
        record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    records[selector.encode()] = record

# Any signing domain: the key is found by its selector (tests give each key its own).
def dnsfunc(name, timeout=5):
    return records.get(name.split(b"._domainkey.")[0])

msg = open(sys.argv[1], "rb").read()
print("pass" if dkim.verify(msg, dnsfunc=dnsfunc) else "fail")
"#;

fn key(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/dkim")
        .join(name)
}

/// A python with dkimpy (and PyNaCl for Ed25519) and openssl, or a note and `true`.
fn skip_without_verifier(test: &str) -> bool {
    if skip_without_aiosmtpd(test) {
        return true;
    }
    let python = aiosmtpd_python().expect("python");
    let ok = Command::new(python)
        .args(["-c", "import dkim, nacl"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED {test}: needs python3 with dkimpy and pynacl (pip install dkimpy pynacl) and openssl");
    }
    !ok
}

/// dkimpy's verdict on `message` with these `(selector, key file)` published.
fn verify(message: &[u8], keys: &[(&str, &Path)]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("verify.py");
    std::fs::write(&script, VERIFY).unwrap();
    let msg = dir.path().join("message.eml");
    std::fs::write(&msg, message).unwrap();
    let mut cmd = Command::new(aiosmtpd_python().expect("python"));
    cmd.arg(&script).arg(&msg);
    for (selector, file) in keys {
        cmd.arg(format!("{selector}={}", file.display()));
    }
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    assert!(
        out.stdout.trim() == "pass" || out.stdout.trim() == "fail",
        "the verifier said {:?}, stderr: {}",
        out.stdout,
        out.stderr
    );
    out.stdout.trim() == "pass"
}

/// The `[dkim."example.com"]` block.
fn dkim_block(selector: &str, file: &Path) -> String {
    format!(
        "[dkim.\"example.com\"]\nselector = \"{selector}\"\nkey_file = \"{}\"\n",
        file.display()
    )
}

fn start(io: &str, hop: &Aiosmtpd, spool: &Path, dkim: &str) -> Relay {
    let mut opts = Opts::relay(io, spool, &[("dest.test", hop.addr)], &[1], "");
    opts.config.push_str(dkim);
    Relay::start_with(opts)
}

/// The message as the next hop got it (its content, CRLF line endings).
fn content(record: &serde_json::Value) -> Vec<u8> {
    let data = record["data"].as_str().expect("data").as_bytes().to_vec();
    assert!(
        !data.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
        "the next hop's copy has bare LFs"
    );
    data
}

/// The value of DKIM-Signature tag `t` (unfolded, spaces removed).
fn tag(message: &[u8], t: &str) -> String {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ");
    let sig = unfolded
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("dkim-signature:"))
        .unwrap_or_else(|| panic!("no DKIM-Signature in {text}"));
    let flat: String = sig["dkim-signature:".len()..]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    flat.split(';')
        .find_map(|kv| kv.strip_prefix(&format!("{t}=")).map(str::to_string))
        .unwrap_or_default()
}

fn replace_once(message: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8(message.to_vec()).unwrap();
    assert!(text.contains(from), "{from:?} not in the message");
    text.replacen(from, to, 1).into_bytes()
}

const SIGNED: &[u8] = b"From: Alice <alice@Example.com>\r\nTo: bob@dest.test\r\n\
Subject: quarterly report\r\nDate: Fri, 4 Dec 2026 12:00:00 +0000\r\n\
Message-ID: <q1@example.com>\r\nX-Mailer: test\r\n\r\n\
Hello Bob,\r\n\r\nthe figures are   attached.\r\n.. a dot-stuffed line\r\n\r\n";

fn signs_and_dkimpy_verifies(io: &str) {
    if skip_without_verifier("signs_and_dkimpy_verifies") {
        return;
    }
    for (selector, file, a) in [
        ("rsa1", key("rsa2048.pem"), "rsa-sha256"),
        // Under 2048 bits the key signs through another backend (see src/dkim.rs).
        ("small", key("rsa1024.pem"), "rsa-sha256"),
        ("ed1", key("ed25519.pem"), "ed25519-sha256"),
    ] {
        let hop = Aiosmtpd::start(&AiosmtpdOpts::default());
        let spool = tempfile::tempdir().unwrap();
        let relay = start(io, &hop, spool.path(), &dkim_block(selector, &file));
        send_one(relay.addr, "alice@example.com", &["bob@dest.test"], SIGNED).assert(250, "2.0.0");
        let got = content(&hop.wait_received(1, Duration::from_secs(20))[0]);
        // The signature is the first header, ours: d=, s=, a=, relaxed/relaxed, From
        // signed once more than present.
        assert!(
            got.starts_with(b"DKIM-Signature:"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(tag(&got, "d"), "example.com");
        assert_eq!(tag(&got, "s"), selector);
        assert_eq!(tag(&got, "a"), a);
        assert_eq!(tag(&got, "c"), "relaxed/relaxed");
        let h = tag(&got, "h").to_ascii_lowercase();
        assert_eq!(h.split(':').filter(|n| *n == "from").count(), 2, "h={h}");
        for n in ["to", "subject", "date", "message-id"] {
            assert!(h.split(':').any(|x| x == n), "{n} not in h={h}");
        }
        assert!(!h.contains("x-mailer") && !h.contains("received"), "h={h}");

        assert!(verify(&got, &[(selector, &file)]), "{a}: dkimpy refused it");
        // Tampered copies fail: one body byte, one signed header.
        let body = replace_once(&got, "figures", "Figures");
        assert!(
            !verify(&body, &[(selector, &file)]),
            "{a}: a changed body passed"
        );
        let header = replace_once(&got, "quarterly report", "quarterly rep0rt");
        assert!(
            !verify(&header, &[(selector, &file)]),
            "{a}: a changed Subject passed"
        );
        // A second From: added later breaks it too (From is over-signed).
        let added = replace_once(&got, "To: bob", "From: mallory@example.com\r\nTo: bob");
        assert!(
            !verify(&added, &[(selector, &file)]),
            "{a}: an added From passed"
        );
    }
}

fn unsigned_without_key_or_with_two_froms(io: &str) {
    if skip_without_aiosmtpd("unsigned_without_key_or_with_two_froms") {
        return;
    }
    let hop = Aiosmtpd::start(&AiosmtpdOpts::default());
    let spool = tempfile::tempdir().unwrap();
    let relay = start(
        io,
        &hop,
        spool.path(),
        &dkim_block("ed1", &key("ed25519.pem")),
    );
    let other = b"From: carol@other.test\r\nTo: bob@dest.test\r\nSubject: a\r\n\r\nx\r\n";
    let sub = b"From: dan@news.example.com\r\nTo: bob@dest.test\r\nSubject: b\r\n\r\nx\r\n";
    let two = b"From: alice@example.com\r\nFrom: eve@example.com\r\nTo: bob@dest.test\r\n\
Subject: c\r\n\r\nx\r\n";
    let none = b"To: bob@dest.test\r\nSubject: d\r\n\r\nx\r\n";
    for m in [&other[..], sub, two, none] {
        send_one(relay.addr, "alice@example.com", &["bob@dest.test"], m).assert(250, "2.0.0");
    }
    let got = hop.wait_received(4, Duration::from_secs(20));
    assert_eq!(got.len(), 4);
    for r in &got {
        let data = content(r);
        let text = String::from_utf8_lossy(&data).to_ascii_lowercase();
        assert!(!text.contains("dkim-signature"), "signed: {text}");
    }
    let log = relay.stderr();
    assert!(log.contains("DKIM: not signed: 2 From: headers"), "{log}");
    assert!(log.contains("DKIM: not signed: no From: header"), "{log}");
}

fn sighup_swaps_the_key(io: &str) {
    if skip_without_verifier("sighup_swaps_the_key") {
        return;
    }
    let hop = Aiosmtpd::start(&AiosmtpdOpts::default());
    let spool = tempfile::tempdir().unwrap();
    let (k1, k2) = (key("rsa2048.pem"), key("rsa2048-b.pem"));
    let relay = start(io, &hop, spool.path(), &dkim_block("old", &k1));
    let rewrite = |block: &str| {
        let mut opts = Opts::relay(io, spool.path(), &[("dest.test", hop.addr)], &[1], "");
        opts.config.push_str(block);
        // The routes come from --route, which a reload keeps.
        std::fs::write(relay.config_path(), &opts.config).unwrap();
    };
    let send = |n: usize| {
        send_one(relay.addr, "alice@example.com", &["bob@dest.test"], SIGNED).assert(250, "2.0.0");
        content(&hop.wait_received(n, Duration::from_secs(20))[n - 1])
    };
    let both: [(&str, &Path); 2] = [("old", &k1), ("new", &k2)];
    let first = send(1);
    assert_eq!(tag(&first, "s"), "old");
    assert!(verify(&first, &both));

    rewrite(&dkim_block("new", &k2));
    relay.signal("HUP");
    wait_for(Duration::from_secs(10), "the reload", || {
        let log = relay.stderr();
        if log.contains("SIGHUP: configuration reloaded") {
            Ok(())
        } else {
            Err(log)
        }
    });
    let second = send(2);
    assert_eq!(tag(&second, "s"), "new");
    assert!(verify(&second, &both));
    // Signed with the new key: the old one does not verify it under the new selector.
    assert!(!verify(&second, &[("new", &k1)]));

    // A bad key is refused: the running key stays.
    rewrite(&dkim_block("bad", &key("rsa512.pem")));
    relay.signal("HUP");
    let log = wait_for(Duration::from_secs(10), "the refusal", || {
        let log = relay.stderr();
        if log.contains("reload refused") {
            Ok(log)
        } else {
            Err(log)
        }
    });
    assert!(
        log.contains("rsa512.pem") && log.contains("dkim.\"example.com\""),
        "{log}"
    );
    let third = send(3);
    assert_eq!(tag(&third, "s"), "new");
    assert!(verify(&third, &both));
}

/// Messages past the streaming threshold (256 KiB): one from the signing domain is kept
/// whole and signed (dkimpy verifies it); one from another domain streams into the spool
/// and arrives unsigned and intact.
fn large_messages_are_signed_whole_or_streamed(io: &str) {
    if skip_without_verifier("large_messages_are_signed_whole_or_streamed") {
        return;
    }
    let hop = Aiosmtpd::start(&AiosmtpdOpts::default());
    let spool = tempfile::tempdir().unwrap();
    let file = key("ed25519.pem");
    let relay = start(io, &hop, spool.path(), &dkim_block("ed1", &file));
    let body: String = (0..10_000)
        .map(|i| format!("line {i:05} of a large report, with some padding to fill it out\r\n"))
        .collect();
    let signed = format!(
        "From: alice@example.com\r\nTo: bob@dest.test\r\nSubject: big signed\r\n\r\n{body}"
    );
    let other =
        format!("From: carol@other.test\r\nTo: bob@dest.test\r\nSubject: big other\r\n\r\n{body}");
    assert!(signed.len() > 600 << 10);
    for m in [&signed, &other] {
        send_one(
            relay.addr,
            "alice@example.com",
            &["bob@dest.test"],
            m.as_bytes(),
        )
        .assert(250, "2.0.0");
    }
    let got = hop.wait_received(2, Duration::from_secs(30));
    let by_subject = |s: &str| {
        got.iter()
            .map(content)
            .find(|c| String::from_utf8_lossy(c).contains(s))
            .unwrap_or_else(|| panic!("no message with {s}"))
    };
    let big = by_subject("Subject: big signed");
    assert!(
        big.starts_with(b"DKIM-Signature:"),
        "the large signed message"
    );
    assert!(
        verify(&big, &[("ed1", &file)]),
        "dkimpy refused the large one"
    );
    let plain = by_subject("Subject: big other");
    assert!(!String::from_utf8_lossy(&plain)
        .to_ascii_lowercase()
        .contains("dkim-signature"));
    assert!(
        plain.ends_with(other.as_bytes()),
        "the streamed message arrived changed"
    );
}

/// Our own bounce is signed when our host name's domain has a key: a next hop refusing
/// every message (`loadgen sink --permfail-pct 100`) makes one for a sender whose domain
/// routes to the capturing next hop, and dkimpy verifies it.
fn our_bounces_are_signed(io: &str) {
    if skip_without_verifier("our_bounces_are_signed") {
        return;
    }
    let hop = Aiosmtpd::start(&AiosmtpdOpts::default());
    let refusing = Sink::start(&["--permfail-pct", "100"]);
    let spool = tempfile::tempdir().unwrap();
    let file = key("ed25519.pem");
    let mut opts = Opts::relay(
        io,
        spool.path(),
        &[("dest.test", hop.addr), ("fail.test", refusing.addr)],
        &[1],
        "",
    );
    // The bounce's From: is MAILER-DAEMON@ our host name (the tests' relay.test).
    opts.config.push_str(&format!(
        "[dkim.\"relay.test\"]\nselector = \"mta\"\nkey_file = \"{}\"\n",
        file.display()
    ));
    let relay = Relay::start_with(opts);
    let m = b"From: alice@dest.test\r\nTo: x@fail.test\r\nSubject: doomed\r\n\r\nbody\r\n";
    send_one(relay.addr, "alice@dest.test", &["x@fail.test"], m).assert(250, "2.0.0");
    let got = content(&hop.wait_received(1, Duration::from_secs(30))[0]);
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("MAILER-DAEMON@relay.test"), "{text}");
    assert!(
        got.starts_with(b"DKIM-Signature:"),
        "the bounce is not signed: {text}"
    );
    assert_eq!(tag(&got, "d"), "relay.test");
    assert!(verify(&got, &[("mta", &file)]), "dkimpy refused the bounce");
}

io_tests!(
    signs_and_dkimpy_verifies,
    unsigned_without_key_or_with_two_froms,
    sighup_swaps_the_key,
    large_messages_are_signed_whole_or_streamed,
    our_bounces_are_signed
);

/// `check-config` refuses each bad key with one line naming the domain and the file (and
/// `serve` refuses the same way, exit 2, before listening).
#[test]
fn check_config_refuses_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    for (file, why) in [
        (missing.clone(), "cannot read"),
        (key("not-pem.txt"), "not a PEM private key"),
        (key("rsa1024-pkcs1.pem"), "PKCS#8 is required"),
        (key("rsa512.pem"), "an RSA key of 512 bits"),
        (key("ec-p256.pem"), "unsupported key type"),
    ] {
        let config = dir.path().join("ringrelay.toml");
        std::fs::write(&config, config_text(&dkim_block("s1", &file))).unwrap();
        for args in [
            vec!["check-config", "--config"],
            vec!["serve", "--spool", "/nonexistent/spool", "--config"],
        ] {
            let out = run_bounded(
                Command::new(env!("CARGO_BIN_EXE_ringrelay"))
                    .args(&args)
                    .arg(&config),
                Duration::from_secs(20),
            );
            assert_eq!(out.code, Some(2), "{args:?} {file:?}: {}", out.stderr);
            let line = out.stderr.trim_end();
            assert_eq!(line.lines().count(), 1, "{line}");
            let expected = format!("dkim.\"example.com\".key_file: {}: ", file.display());
            assert!(line.contains(&expected), "{line}");
            assert!(line.contains(why), "{line}");
        }
    }
    // Good keys pass (RSA 1024 is the least allowed).
    for file in ["rsa1024.pem", "rsa2048.pem", "ed25519.pem"] {
        let config = dir.path().join("ok.toml");
        std::fs::write(&config, config_text(&dkim_block("s1", &key(file)))).unwrap();
        let out = run_bounded(
            Command::new(env!("CARGO_BIN_EXE_ringrelay"))
                .args(["check-config", "--config"])
                .arg(&config),
            Duration::from_secs(20),
        );
        assert_eq!(out.code, Some(0), "{file}: {}", out.stderr);
        assert!(
            out.stdout.contains("[dkim.\"example.com\"]"),
            "{}",
            out.stdout
        );
    }
    // And a selector that cannot be one.
    let config = dir.path().join("sel.toml");
    std::fs::write(
        &config,
        config_text(&dkim_block("bad selector", &key("ed25519.pem"))),
    )
    .unwrap();
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_ringrelay"))
            .args(["check-config", "--config"])
            .arg(&config),
        Duration::from_secs(20),
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("dkim.\"example.com\".selector"),
        "{}",
        out.stderr
    );
}

fn config_text(extra: &str) -> String {
    config(extra)
}
