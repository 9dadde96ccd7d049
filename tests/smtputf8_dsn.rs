//! SMTPUTF8 (RFC 6531) and the DSN extension (RFC 3461, reports per RFC 3464) end to end,
//! on both I/O drivers, with peers nobody here wrote: Python's `smtplib` is the client, and
//! every next hop is an `aiosmtpd` server (one JSON line per message taken, with the MAIL
//! parameters and each recipient's RCPT parameters as they arrived). aiosmtpd has no DSN
//! of its own: the DSN-offering next hop is a small subclass that advertises `DSN` and
//! accepts its parameters (only logging them). Our reports go to the sender's domain, a
//! plain aiosmtpd, and are parsed there with Python's `email` package (Action, Status,
//! Original-Recipient, Original-Envelope-Id, the returned part's type).
//!
//! - `smtputf8_end_to_end`: a UTF-8 sender, recipient and Subject go through to a next hop
//!   that offers SMTPUTF8, with the parameter and a `UTF8SMTP` Received: header; a U-label
//!   domain is routed by its A-label route; the same message to a next hop without
//!   SMTPUTF8 bounces with `5.6.7`; a message that declared SMTPUTF8 but is all ASCII goes
//!   to that hop without it; a UTF-8 recipient without SMTPUTF8 gets `553 5.6.7`.
//! - `dsn_end_to_end`: RET/ENVID/NOTIFY/ORCPT reach a next hop that offers DSN (and no
//!   report of ours follows); past a next hop without DSN: a "relayed" report for
//!   NOTIFY=SUCCESS, a failure report for NOTIFY=FAILURE (headers only for RET=HDRS, the
//!   ENVID and ORCPT carried), none for NEVER nor for a NOTIFY without FAILURE, the whole
//!   message for RET=FULL, and exactly one delay report for NOTIFY=DELAY after
//!   `relay.delay_warning_secs`. Malformed parameters get `501 5.5.4`.
//! - `smtputf8_and_dsn_survive_a_restart`: a message queued for a dead next hop, with
//!   SMTPUTF8 and every DSN parameter, is delivered after a restart (the spool kept them)
//!   with all of them to a next hop that offers both.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

io_tests!(
    smtputf8_end_to_end,
    dsn_end_to_end,
    smtputf8_and_dsn_survive_a_restart
);

/// A next hop: aiosmtpd, with SMTPUTF8 and/or DSN offered as asked. Recipients whose local
/// part starts with `reject` get `550 5.1.1`, with `later` `450 4.2.0`. Reports (content
/// type multipart/report) are parsed with the `email` package into the record.
const NEXT_HOP: &str = r#"
import argparse, asyncio, email, email.policy, json
from aiosmtpd.smtp import SMTP

p = argparse.ArgumentParser()
p.add_argument("--records", required=True)
p.add_argument("--smtputf8", action="store_true")
p.add_argument("--dsn", action="store_true")
a = p.parse_args()
DSN_PARAMS = ("RET", "ENVID", "NOTIFY", "ORCPT")

class DsnSMTP(SMTP):
    # aiosmtpd refuses parameters it does not know; this hop takes the DSN ones (and only
    # logs them) when it offers DSN.
    def _getparams(self, params):
        result = super()._getparams(params)
        if result is not None and a.dsn:
            for k in DSN_PARAMS:
                result.pop(k, None)
        return result

def report_of(content):
    msg = email.message_from_bytes(content, policy=email.policy.default)
    if msg.get_content_type() != "multipart/report":
        return None
    parts = list(msg.iter_parts())
    groups = [{k: str(v) for k, v in g.items()} for g in parts[1].get_payload()]
    return {
        "subject": str(msg["Subject"]),
        "report_type": msg.get_param("report-type"),
        "parts": [q.get_content_type() for q in parts],
        "groups": groups,
        "returned": parts[2].as_bytes().decode("utf-8", "replace"),
    }

class Handler:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if a.dsn:
            responses.insert(len(responses) - 1, "250-DSN")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("reject"):
            return "550 5.1.1 no such user here"
        if local.startswith("later"):
            return "450 4.2.0 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        if not hasattr(envelope, "per_rcpt"):
            envelope.per_rcpt = []
        envelope.per_rcpt.append([address, rcpt_options])
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content or envelope.content
        record = {
            "from": envelope.mail_from,
            "rcpts": envelope.rcpt_tos,
            "mail_options": envelope.mail_options,
            "per_rcpt": getattr(envelope, "per_rcpt", []),
            "data": content.decode("utf-8", "replace"),
            "report": report_of(content),
        }
        with open(a.records, "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return "250 2.0.0 Ok: queued"

async def main():
    loop = asyncio.get_running_loop()
    factory = lambda: DsnSMTP(
        Handler(), hostname="mx.python.test", enable_SMTPUTF8=a.smtputf8, decode_data=False
    )
    server = await loop.create_server(factory, "127.0.0.1", 0)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"#;

/// The client: reads a JSON list of steps on stdin and runs them over one smtplib
/// connection per step, printing one JSON result per step: the replies to MAIL, each RCPT
/// and DATA (or to raw lines).
const CLIENT: &str = r#"
import json, smtplib, sys

steps = json.load(sys.stdin)
host, port = sys.argv[1], int(sys.argv[2])
out = []
for step in steps:
    s = smtplib.SMTP(host, port, timeout=10)
    s.ehlo("client.test")
    result = {"ehlo": sorted(s.esmtp_features.keys())}
    if "raw" in step:
        replies = []
        for line in step["raw"]:
            s.send((line + "\r\n").encode("utf-8"))
            code, text = s.getreply()
            replies.append([code, text.decode("utf-8", "replace")])
        result["raw"] = replies
    else:
        code, text = s.mail(step["from"], step.get("mail_options", []))
        result["mail"] = [code, text.decode("utf-8", "replace")]
        rcpts = []
        for to, opts in step["rcpts"]:
            code, text = s.rcpt(to, opts)
            rcpts.append([code, text.decode("utf-8", "replace")])
        result["rcpts"] = rcpts
        code, text = s.data(step["data"].encode("utf-8"))
        result["data"] = [code, text.decode("utf-8", "replace")]
    s.quit()
    out.append(result)
print(json.dumps(out))
"#;

/// A running next hop (killed on drop).
struct Hop {
    child: Child,
    addr: SocketAddr,
    records: std::path::PathBuf,
    stderr: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Hop {
    fn start(args: &[&str]) -> Hop {
        use std::io::BufRead;
        let python = aiosmtpd_python().expect("python with aiosmtpd");
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hop.py");
        std::fs::write(&script, NEXT_HOP).unwrap();
        let records = dir.path().join("records.jsonl");
        let stderr = dir.path().join("stderr.log");
        let mut child = Command::new(python)
            .arg("-u")
            .arg(&script)
            .arg("--records")
            .arg(&records)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn the next hop");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(15)).unwrap_or_default();
        let Some(port) = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse::<u16>().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "next hop did not start ({line:?}): {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        Hop {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            records,
            stderr,
            _dir: dir,
        }
    }

    fn received(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.records)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON record"))
            .collect()
    }

    #[track_caller]
    fn wait_received(&self, n: usize) -> Vec<Value> {
        wait_for(Duration::from_secs(20), "messages at the next hop", || {
            let got = self.received();
            if got.len() >= n {
                Ok(got)
            } else {
                Err(format!(
                    "{} of {n}: {got:#?}\nstderr: {}",
                    got.len(),
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                ))
            }
        })
    }
}

impl Drop for Hop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the smtplib client's `steps` against `addr`; one result per step.
fn client(addr: SocketAddr, steps: Value) -> Vec<Value> {
    use std::io::Write;
    let python = aiosmtpd_python().expect("python");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let mut child = Command::new(python)
        .arg(&script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the smtplib client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(steps.to_string().as_bytes())
        .unwrap();
    let out = wait_output(child, Duration::from_secs(30));
    serde_json::from_str::<Vec<Value>>(&out).unwrap_or_else(|e| panic!("client said {out:?}: {e}"))
}

/// The child's stdout once it exits (killed after `limit`).
fn wait_output(mut child: Child, limit: Duration) -> String {
    use std::io::Read;
    let deadline = std::time::Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the smtplib client did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.trim().is_empty(), "client stderr: {err}");
    out
}

fn code(v: &Value) -> u64 {
    v[0].as_u64().unwrap_or(0)
}

/// Every transaction in `results` got 250 to MAIL, to each RCPT and to DATA.
#[track_caller]
fn assert_accepted(results: &[Value]) {
    for r in results {
        assert_eq!(code(&r["mail"]), 250, "{r}");
        assert!(
            r["rcpts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|x| code(x) == 250),
            "{r}"
        );
        assert_eq!(code(&r["data"]), 250, "{r}");
    }
}

fn text(v: &Value) -> &str {
    v[1].as_str().unwrap_or("")
}

/// The per-recipient groups of a report (the first group is per-message).
fn rcpt_groups(report: &Value) -> &[Value] {
    &report["groups"].as_array().expect("groups")[1..]
}

fn field<'a>(group: &'a Value, name: &str) -> &'a str {
    group[name].as_str().unwrap_or("")
}

fn relay(io: &str, spool: &Path, routes: &[(&str, SocketAddr)], extra: &str) -> Relay {
    Relay::start_with(Opts::relay(io, spool, routes, &[1], extra))
}

fn smtputf8_end_to_end(io: &str) {
    if skip_without_aiosmtpd("smtputf8_end_to_end") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let utf8 = Hop::start(&["--smtputf8"]);
    let ascii = Hop::start(&[]);
    let reports = Hop::start(&["--smtputf8"]);
    let mut relay = relay(
        io,
        &spool,
        &[
            ("utf8.test", utf8.addr),
            ("xn--bcher-kva.test", utf8.addr),
            ("ascii.test", ascii.addr),
            ("sender.test", reports.addr),
        ],
        "",
    );
    let utf8_message = "From: δοκιμή@sender.test\r\nSubject: Grüße, 世界\r\n\r\nHéllo body\r\n";
    let ascii_message = "From: bob@sender.test\r\nSubject: plain\r\n\r\nplain body\r\n";
    let utf8_opts = serde_json::json!(["SMTPUTF8", "BODY=8BITMIME"]);
    let results = client(
        relay.addr,
        serde_json::json!([
            {"from": "δοκιμή@sender.test", "mail_options": utf8_opts,
             "rcpts": [["用户@utf8.test", []], ["käthe@bücher.test", []]], "data": utf8_message},
            {"from": "sender@sender.test", "mail_options": utf8_opts,
             "rcpts": [["用户@ascii.test", []]], "data": utf8_message},
            {"from": "bob@sender.test", "mail_options": ["SMTPUTF8"],
             "rcpts": [["bob@ascii.test", []]], "data": ascii_message},
            {"raw": ["MAIL FROM:<bob@sender.test>", "RCPT TO:<用户@utf8.test>",
                     "RSET", "MAIL FROM:<δοκιμή@sender.test>"]},
        ]),
    );
    let ehlo: Vec<&str> = results[0]["ehlo"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        ehlo.contains(&"smtputf8") && ehlo.contains(&"dsn"),
        "{ehlo:?}"
    );
    assert_accepted(&results[..3]);
    let raw = results[3]["raw"].as_array().unwrap();
    assert_eq!(code(&raw[1]), 553, "{raw:?}");
    assert!(text(&raw[1]).starts_with("5.6.7"), "{raw:?}");
    assert_eq!(code(&raw[3]), 553, "{raw:?}");
    assert!(text(&raw[3]).starts_with("5.6.7"), "{raw:?}");

    // Through to the SMTPUTF8 next hop, with the parameter, the U-label domain routed by
    // its A-label form and kept as written.
    // (Two domains, so two transactions.)
    let got = utf8.wait_received(2);
    assert_eq!(got.len(), 2, "{got:#?}");
    let mut rcpts: Vec<&str> = got
        .iter()
        .flat_map(|m| {
            m["rcpts"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
        })
        .collect();
    rcpts.sort_unstable();
    assert_eq!(rcpts, ["käthe@bücher.test", "用户@utf8.test"]);
    for m in &got {
        assert_eq!(m["from"], "δοκιμή@sender.test");
        let opts = m["mail_options"].as_array().unwrap();
        assert!(opts.contains(&Value::from("SMTPUTF8")), "{opts:?}");
        let data = m["data"].as_str().unwrap();
        assert!(data.contains("Subject: Grüße, 世界\r\n"), "{data}");
        assert!(data.contains(" with UTF8SMTP id "), "{data}");
        assert!(data.contains("Héllo body"), "{data}");
    }

    // The all-ASCII message went to the hop without SMTPUTF8, without the parameter; the
    // UTF-8 one could not and bounced with 5.6.7.
    let got = ascii.wait_received(1);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["rcpts"], serde_json::json!(["bob@ascii.test"]));
    assert!(!got[0]["mail_options"]
        .as_array()
        .unwrap()
        .contains(&Value::from("SMTPUTF8")));
    let bounces = reports.wait_received(1);
    let b = &bounces[0];
    assert_eq!(b["from"], "<>", "a bounce comes from <>");
    assert_eq!(b["rcpts"], serde_json::json!(["sender@sender.test"]));
    let report = &b["report"];
    assert_eq!(report["report_type"], "delivery-status");
    let groups = rcpt_groups(report);
    assert_eq!(groups.len(), 1, "{report:#}");
    assert_eq!(field(&groups[0], "Action"), "failed");
    assert_eq!(field(&groups[0], "Status"), "5.6.7");
    wait_queue_empty(&spool, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(reports.received().len(), 1, "one bounce only");
    assert_eq!(utf8.received().len(), 2);
    relay.terminate();
}

fn dsn_end_to_end(io: &str) {
    if skip_without_aiosmtpd("dsn_end_to_end") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dsn_hop = Hop::start(&["--dsn"]);
    let plain = Hop::start(&[]);
    let reports = Hop::start(&[]);
    let mut relay = relay(
        io,
        &spool,
        &[
            ("dsn.test", dsn_hop.addr),
            ("plain.test", plain.addr),
            ("sender.test", reports.addr),
        ],
        "max_queue_age_secs = 600\n[relay]\ndelay_warning_secs = 1",
    );
    let marker = "BODY-MARKER-only-in-the-body";
    let message =
        |subject: &str| format!("From: s@sender.test\r\nSubject: {subject}\r\n\r\n{marker}\r\n");
    let results = client(
        relay.addr,
        serde_json::json!([
            // 1: a next hop with DSN gets the parameters; no report of ours.
            {"from": "s1@sender.test", "mail_options": ["RET=HDRS", "ENVID=QQ314159"],
             "rcpts": [["a@dsn.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig-a@example.org"]],
                       ["b@dsn.test", []]],
             "data": message("to the DSN hop")},
            // 2: past a next hop without DSN: relayed, failed, NEVER, no FAILURE asked.
            {"from": "s2@sender.test", "mail_options": ["RET=HDRS", "ENVID=ENV2"],
             "rcpts": [["ok@plain.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;orig-ok@example.org"]],
                       ["reject1@plain.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;orig-r1@example.org"]],
                       ["reject2@plain.test", ["NOTIFY=NEVER"]],
                       ["reject3@plain.test", ["NOTIFY=SUCCESS"]]],
             "data": message("mixed fates")},
            // 3: RET=FULL: the whole message comes back.
            {"from": "s3@sender.test", "mail_options": ["RET=FULL"],
             "rcpts": [["reject4@plain.test", []]], "data": message("return it all")},
            // 4: still pending after delay_warning_secs: one delay report.
            {"from": "s4@sender.test", "mail_options": [],
             "rcpts": [["later@plain.test", ["NOTIFY=DELAY"]]], "data": message("slow one")},
            // Malformed parameters.
            {"raw": ["MAIL FROM:<s@sender.test> RET=BODY",
                     "MAIL FROM:<s@sender.test> ENVID=+ZZ",
                     "MAIL FROM:<s@sender.test> RET=FULL RET=HDRS",
                     "MAIL FROM:<s@sender.test>",
                     "RCPT TO:<x@plain.test> NOTIFY=NEVER,SUCCESS",
                     "RCPT TO:<x@plain.test> ORCPT=rfc822",
                     "RCPT TO:<x@plain.test> NOTIFY=DELAY NOTIFY=DELAY",
                     "RCPT TO:<x@plain.test> NOTIFY=DELAY ORCPT=rfc822;x+40plain.test"]},
        ]),
    );
    assert_accepted(&results[..4]);
    let raw: Vec<u64> = results[4]["raw"]
        .as_array()
        .unwrap()
        .iter()
        .map(code)
        .collect();
    assert_eq!(
        raw,
        [501, 501, 501, 250, 501, 501, 501, 250],
        "{:#}",
        results[4]
    );

    // 1: the parameters as the DSN hop saw them (aiosmtpd upper-cases them).
    let got = dsn_hop.wait_received(1);
    let m = &got[0];
    let opts = m["mail_options"].as_array().unwrap();
    assert!(opts.contains(&Value::from("RET=HDRS")), "{opts:?}");
    assert!(opts.contains(&Value::from("ENVID=QQ314159")), "{opts:?}");
    assert_eq!(
        m["per_rcpt"],
        serde_json::json!([
            [
                "a@dsn.test",
                ["NOTIFY=SUCCESS,FAILURE", "ORCPT=RFC822;ORIG-A@EXAMPLE.ORG"]
            ],
            ["b@dsn.test", []]
        ])
    );

    // 2 and 3 at the hop without DSN: the parameters are not passed.
    let got = plain.wait_received(1);
    assert_eq!(got[0]["rcpts"], serde_json::json!(["ok@plain.test"]));
    assert_eq!(
        got[0]["per_rcpt"],
        serde_json::json!([["ok@plain.test", []]])
    );
    assert!(!got[0]["mail_options"].as_array().unwrap().iter().any(|o| o
        .as_str()
        .is_some_and(|o| o.starts_with("RET") || o.starts_with("ENVID"))));

    // Reports: relayed (2), failed (2), full return (3), delayed (4); nothing else.
    let got = reports.wait_received(4);
    let by_sender = |who: &str, action: &str| -> Vec<&Value> {
        got.iter()
            .filter(|m| m["rcpts"][0] == who)
            .map(|m| &m["report"])
            .filter(|r| rcpt_groups(r).iter().any(|g| field(g, "Action") == action))
            .collect()
    };
    for m in &got {
        assert_eq!(m["from"], "<>", "reports come from <>");
    }
    let relayed = by_sender("s2@sender.test", "relayed");
    assert_eq!(relayed.len(), 1, "{got:#?}");
    let groups = rcpt_groups(relayed[0]);
    assert_eq!(groups.len(), 1, "only ok@ asked for success: {groups:#?}");
    assert_eq!(
        field(&groups[0], "Final-Recipient"),
        "rfc822; ok@plain.test"
    );
    assert_eq!(
        field(&groups[0], "Original-Recipient"),
        "rfc822;orig-ok@example.org"
    );
    assert_eq!(field(&groups[0], "Status"), "2.0.0");
    assert_eq!(relayed[0]["subject"], "Successful Mail Delivery Report");

    let failed = by_sender("s2@sender.test", "failed");
    assert_eq!(failed.len(), 1, "{got:#?}");
    let report = failed[0];
    let groups = rcpt_groups(report);
    assert_eq!(
        groups.len(),
        1,
        "only reject1 asked for failures: {groups:#?}"
    );
    assert_eq!(
        field(&groups[0], "Final-Recipient"),
        "rfc822; reject1@plain.test"
    );
    assert_eq!(
        field(&groups[0], "Original-Recipient"),
        "rfc822;orig-r1@example.org"
    );
    assert_eq!(field(&groups[0], "Status"), "5.1.1");
    assert_eq!(field(&report["groups"][0], "Original-Envelope-Id"), "ENV2");
    assert_eq!(
        report["parts"],
        serde_json::json!([
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers"
        ])
    );
    let returned = report["returned"].as_str().unwrap();
    assert!(returned.contains("Subject: mixed fates"), "{returned}");
    assert!(!returned.contains(marker), "RET=HDRS: {returned}");

    let full = by_sender("s3@sender.test", "failed");
    assert_eq!(full.len(), 1, "{got:#?}");
    assert_eq!(full[0]["parts"][2], "message/rfc822");
    assert!(full[0]["returned"].as_str().unwrap().contains(marker));

    let delayed = by_sender("s4@sender.test", "delayed");
    assert_eq!(delayed.len(), 1, "{got:#?}");
    assert_eq!(field(&rcpt_groups(delayed[0])[0], "Status"), "4.2.0");
    assert_eq!(delayed[0]["subject"], "Delayed Mail (still being retried)");

    // Several more retries of later@: still one delay report; no report about reports.
    std::thread::sleep(Duration::from_millis(3500));
    let all = reports.received();
    assert_eq!(all.len(), 4, "{all:#?}");
    assert_eq!(dsn_hop.received().len(), 1);
    relay.terminate();
}

fn smtputf8_and_dsn_survive_a_restart(io: &str) {
    if skip_without_aiosmtpd("smtputf8_and_dsn_survive_a_restart") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut first = relay(io, &spool, &[("both.test", dead)], "");
    let results = client(
        first.addr,
        serde_json::json!([
            {"from": "δοκιμή@sender.test", "mail_options": ["SMTPUTF8", "RET=FULL", "ENVID=KEEP+2BME"],
             "rcpts": [["用户@both.test", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;orig@example.org"]],
                       ["plain@both.test", []]],
             "data": "Subject: überall\r\n\r\nbody\r\n"},
        ]),
    );
    assert_eq!(code(&results[0]["data"]), 250, "{:#}", results[0]);
    first.terminate();
    let hop = Hop::start(&["--smtputf8", "--dsn"]);
    let mut second = relay(io, &spool, &[("both.test", hop.addr)], "");
    let got = hop.wait_received(1);
    let m = &got[0];
    assert_eq!(m["from"], "δοκιμή@sender.test");
    let opts = m["mail_options"].as_array().unwrap();
    for want in ["SMTPUTF8", "RET=FULL", "ENVID=KEEP+2BME"] {
        assert!(opts.contains(&Value::from(want)), "{want} in {opts:?}");
    }
    assert_eq!(
        m["per_rcpt"],
        serde_json::json!([
            [
                "用户@both.test",
                ["NOTIFY=SUCCESS,DELAY", "ORCPT=RFC822;ORIG@EXAMPLE.ORG"]
            ],
            ["plain@both.test", []]
        ])
    );
    assert!(m["data"].as_str().unwrap().contains("Subject: überall"));
    wait_queue_empty(&spool, Duration::from_secs(15));
    second.terminate();
}
