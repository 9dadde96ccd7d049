//! What an operator sees: real mail through the relay into real next hops, then the
//! delivery log's lines (Postfix's shape; JSON with `--log-format json`) and `/metrics`
//! read by a parser written by others (Python's `prometheus_client`). Both I/O drivers.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;

/// `GET /metrics` over a plain socket.
fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

/// Parses the exposition with prometheus_client and prints `name{labels} value` per sample
/// (sorted); `None` when the parser is not installed.
fn parse_with_prometheus_client(text: &str) -> Option<String> {
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out.append(f"{s.name}{{{labels}}} {s.value}")
print("\n".join(sorted(out)))
"#;
    for py in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(py)
            .args(["-c", "import prometheus_client"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            continue;
        }
        let mut child = Command::new(py)
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write exposition");
        let out = child.wait_with_output().expect("parser");
        assert!(
            out.status.success(),
            "prometheus_client refused the exposition: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        return Some(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    eprintln!("prometheus_client is not installed: the exposition is checked by hand only");
    None
}

fn sample(parsed: &str, name: &str) -> f64 {
    parsed
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{parsed}"))
}

fn log_and_metrics_after_real_mail(io: &str) {
    let sink = Sink::start(&[]);
    let spool = tempfile::tempdir().expect("spool");
    let metrics_port = free_port();
    let mut opts = Opts::relay(
        io,
        spool.path(),
        &[
            ("example.test", sink.addr),
            ("down.test", "127.0.0.1:1".parse().unwrap()),
        ],
        &[60],
        "",
    );
    opts.config.push_str(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[relay]\nmynetworks = [\"127.0.0.1/32\"]\n"
    ));
    let relay = Relay::start_with(opts);
    let sent = SendRun::run(
        relay.addr,
        &[
            "--messages",
            "20",
            "--connections",
            "2",
            "--domain",
            "example.test",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(sent.code, Some(0), "{}", sent.output);
    // One to a next hop that refuses connections: deferred.
    send_one(
        relay.addr,
        "a@x.test",
        &["b@down.test"],
        b"Subject: d\r\n\r\nd\r\n",
    )
    .assert(250, "2.0.0");
    // One refused: a client outside mynetworks may not relay (logged as NOQUEUE).
    let mut c = Client::connect_from(relay.addr, "127.0.0.5".parse().unwrap());
    let _ = c.reply();
    assert_eq!(c.cmd("EHLO h.test").code, 250);
    c.cmd("MAIL FROM:<s@outside.test>").assert(250, "2.1.0");
    c.cmd("RCPT TO:<x@far.test>").assert(550, "5.7.1");
    let log = wait_for(Duration::from_secs(20), "the delivery log's lines", || {
        let log = relay.stderr();
        let sent = log.matches("status=sent (250").count();
        let deferred = log.matches("status=deferred (").count();
        if sent >= 20 && deferred >= 1 {
            Ok(log)
        } else {
            Err(format!("{sent} sent, {deferred} deferred so far:\n{log}"))
        }
    });
    let line = log
        .lines()
        .find(|l| l.contains("status=sent"))
        .expect("a sent line");
    assert!(
        line.contains(&format!("relay=127.0.0.1[127.0.0.1]:{}", sink.addr.port()))
            && line.contains(", attempts=1, dsn=2.0.0, status=sent (250 "),
        "{line}"
    );
    assert!(
        log.contains("to=<b@down.test>, relay=127.0.0.1[127.0.0.1]:1, "),
        "{log}"
    );
    assert_eq!(
        log.matches(": client=").count(),
        21,
        "one line per accepted message:\n{log}"
    );
    assert!(
        log.contains("NOQUEUE: reject: RCPT from h.test[127.0.0.5]: 550 5.7.1 Relay access denied; from=<s@outside.test> to=<x@far.test>"),
        "{log}"
    );
    let text = scrape(format!("127.0.0.1:{metrics_port}").parse().unwrap());
    for name in [
        "ringrelay_messages_received_total",
        "ringrelay_recipients_delivered_total",
        "ringrelay_recipients_deferred_total",
        "ringrelay_recipients_bounced_total",
        "ringrelay_queue_messages",
        "ringrelay_connections_open",
        "ringrelay_delivery_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    if let Some(parsed) = parse_with_prometheus_client(&text) {
        assert_eq!(
            sample(&parsed, "ringrelay_messages_received_total{}"),
            21.0,
            "{parsed}"
        );
        assert_eq!(
            sample(&parsed, "ringrelay_recipients_delivered_total{}"),
            20.0,
            "{parsed}"
        );
        assert!(
            sample(&parsed, "ringrelay_recipients_deferred_total{}") >= 1.0,
            "{parsed}"
        );
        assert_eq!(
            sample(&parsed, "ringrelay_delivery_duration_seconds_count{}"),
            21.0,
            "{parsed}"
        );
        assert_eq!(
            sample(
                &parsed,
                "ringrelay_delivered_by_domain_total{domain=example.test}"
            ),
            20.0,
            "{parsed}"
        );
        assert!(sample(&parsed, "ringrelay_spool_sync_duration_seconds_count{}") >= 1.0);
        assert_eq!(
            sample(&parsed, "ringrelay_rejections_total{reason=relay_denied}"),
            1.0,
            "{parsed}"
        );
    }
}

io_tests!(log_and_metrics_after_real_mail);
