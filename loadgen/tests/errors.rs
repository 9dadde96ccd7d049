//! Bad input and misbehaving servers: usage errors exit 2 and unreachable targets exit 1, each
//! with one line on stderr; resets and garbage mid-run are counted, never a panic.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

fn loadgen(args: &[&str]) -> Output {
    run(Command::new(bin()).args(args), Duration::from_secs(30))
}

fn one_line_error(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "stderr: {}", o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "stderr: {:?}", o.stderr);
    assert!(o.stderr.starts_with("loadgen: "), "stderr: {:?}", o.stderr);
    assert!(!o.stderr.contains("panicked"));
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    for args in [
        &["send", "--bogus"][..],
        &["send"],
        &[
            "send",
            "--target",
            "127.0.0.1:1",
            "--messages",
            "5",
            "--duration",
            "3",
        ],
        &["send", "--target", "127.0.0.1:1", "--size", "10k-1k"],
        &["send", "--target", "127.0.0.1:1", "--connections", "0"],
        &["send", "--target", "127.0.0.1:1", "--rate", "-3"],
        &["send", "--target", "no-port-here"],
        &["sink", "--tempfail-pct", "150"],
        &["sink", "--tempfail-pct", "60", "--permfail-pct", "60"],
        &["sink", "--listen", "not an address"],
        &["frobnicate"],
    ] {
        let o = loadgen(args);
        one_line_error(&o, 2);
    }
}

#[test]
fn unreachable_target_exits_1_with_one_line() {
    let port = free_port();
    let t = format!("127.0.0.1:{port}");
    let o = loadgen(&["send", "--target", &t, "--messages", "5"]);
    one_line_error(&o, 1);
    assert!(o.stderr.contains("cannot connect"), "{}", o.stderr);
}

#[test]
fn sink_on_a_busy_port_exits_1() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap().to_string();
    let o = loadgen(&["sink", "--listen", &a, "--timeout", "5"]);
    one_line_error(&o, 1);
}

/// A fake SMTP server that greets, answers EHLO, then misbehaves in the given way after
/// MAIL. Runs until the test process exits.
fn fake_server(banner: &'static str, after_mail: Option<&'static str>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            std::thread::spawn(move || {
                let _ = serve_fake(s, banner, after_mail);
            });
        }
    });
    addr
}

fn serve_fake(s: TcpStream, banner: &str, after_mail: Option<&str>) -> std::io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(banner.as_bytes())?;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let up = line.to_ascii_uppercase();
        if up.starts_with("EHLO") || up.starts_with("HELO") {
            w.write_all(b"250-fake\r\n250 PIPELINING\r\n")?;
        } else if up.starts_with("MAIL") {
            match after_mail {
                // Drop the connection mid-transaction.
                None => return Ok(()),
                Some(reply) => w.write_all(reply.as_bytes())?,
            }
        } else if up.starts_with("QUIT") {
            w.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"250 ok\r\n")?;
        }
    }
}

#[test]
fn resets_mid_transaction_are_counted_and_the_run_goes_on() {
    let addr = fake_server("220 fake\r\n", None);
    let dir = Scratch::new("resets");
    let (dj, mf) = (dir.path("send.json"), dir.path("manifest"));
    for pipelining in [false, true] {
        let mut args = vec![
            "--target",
            &addr,
            "--messages",
            "6",
            "--connections",
            "2",
            "--json",
            dj.to_str().unwrap(),
            "--manifest",
            mf.to_str().unwrap(),
        ];
        if pipelining {
            args.push("--pipelining");
        }
        let o = send(&args);
        // Counted and reported (the JSON is complete), but a run where not one message got
        // an answer is a failure: exit 1 with one line.
        assert_eq!(o.status.code(), Some(1), "{}", o.stderr);
        assert!(o.stderr.contains("no message got a reply"), "{}", o.stderr);
        let d = read_json(&dj);
        assert_eq!(num(&d, "messages.sent"), 6);
        assert_eq!(num(&d, "messages.errors"), 6);
        assert_eq!(num(&d, "messages.accepted"), 0);
        assert_eq!(num(&d, "errors.closed") + num(&d, "errors.io"), 6);
        // Reconnected after every failure.
        assert!(num(&d, "connections.opened") >= 6);
        assert!(manifest_ids(&mf).is_empty());
    }
}

#[test]
fn garbage_replies_are_protocol_errors() {
    let addr = fake_server("220 fake\r\n", Some("hello there\r\n"));
    let dir = Scratch::new("garbage");
    let dj = dir.path("send.json");
    let o = send(&[
        "--target",
        &addr,
        "--messages",
        "4",
        "--connections",
        "1",
        "--json",
        dj.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", o.stderr);
    let d = read_json(&dj);
    assert_eq!(num(&d, "errors.protocol"), 4);
    assert_eq!(num(&d, "messages.errors"), 4);
}

#[test]
fn rejecting_server_is_counted_by_code() {
    let addr = fake_server("220 fake\r\n", Some("421 4.3.2 shutting down\r\n"));
    let dir = Scratch::new("reject421");
    let dj = dir.path("send.json");
    let o = send(&[
        "--target",
        &addr,
        "--messages",
        "3",
        "--connections",
        "1",
        "--json",
        dj.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", o.stderr);
    let d = read_json(&dj);
    assert_eq!(num(&d, "reply_codes.421"), 3);
    assert_eq!(num(&d, "messages.tempfail"), 3);
    // 421 means the server is closing: every message needed a fresh connection.
    assert_eq!(num(&d, "connections.opened"), 3);
}

#[test]
fn a_server_that_is_not_smtp_is_a_one_line_failure() {
    let addr = fake_server("HTTP/1.1 400 Bad Request\r\n", None);
    let o = loadgen(&[
        "send",
        "--no-progress",
        "--target",
        &addr,
        "--messages",
        "3",
    ]);
    one_line_error(&o, 1);
    assert!(o.stderr.contains("protocol error"), "{}", o.stderr);
}

#[test]
fn unwritable_outputs_fail_before_any_connection() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let t = l.local_addr().unwrap().to_string();
    let dir = Scratch::new("unwritable");
    let missing = dir.path("no-such-dir/x.json");
    let missing = missing.to_str().unwrap();
    let a_dir = dir.0.to_str().unwrap();
    for (flag, path) in [
        ("--json", missing),
        ("--manifest", missing),
        ("--json", a_dir),
    ] {
        let o = loadgen(&[
            "send",
            "--no-progress",
            "--target",
            &t,
            "--messages",
            "5",
            flag,
            path,
        ]);
        one_line_error(&o, 1);
        assert!(
            o.stderr.contains(flag) && o.stderr.contains(path),
            "{}",
            o.stderr
        );
    }
    // The kernel completes a handshake even before accept(); nothing may be queued.
    match l.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("send connected before checking its outputs: {other:?}"),
    }

    let o = loadgen(&["sink", "--listen", "127.0.0.1:0", "--json", missing]);
    one_line_error(&o, 1);
    assert!(o.stdout.is_empty(), "sink started: {}", o.stdout);
    assert!(!dir.path("no-such-dir").exists());
}
