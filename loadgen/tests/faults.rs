//! Fault injection: the sink's tempfail/permfail shares come back as reply codes in send's
//! report, at the end of DATA or at RCPT; --delay-ms slows every reply.

mod common;
use common::*;

fn run_faults(stage: &str, pipelining: bool) -> (serde_json::Value, serde_json::Value) {
    let dir = Scratch::new(&format!("faults-{stage}-{pipelining}"));
    let (sj, dj) = (dir.path("sink.json"), dir.path("send.json"));
    let sink = Sink::start(&[
        "--tempfail-pct",
        "20",
        "--permfail-pct",
        "10",
        "--fail-stage",
        stage,
        "--json",
        sj.to_str().unwrap(),
    ]);
    let mut args = vec![
        "--target".to_string(),
        sink.target(),
        "--messages".into(),
        "200".into(),
        "--connections".into(),
        "3".into(),
        "--rcpts".into(),
        "2".into(),
        "--json".into(),
        dj.to_str().unwrap().into(),
    ];
    if pipelining {
        args.push("--pipelining".into());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(send(&a).status.success());
    let (st, _) = sink.stop();
    assert!(st.success());
    (read_json(&dj), read_json(&sj))
}

fn near(v: u64, want: u64, tol: u64) -> bool {
    v + tol >= want && v <= want + tol
}

#[test]
fn data_stage_faults_are_reported_as_reply_codes() {
    let (d, s) = run_faults("data", false);
    let (t, p, ok) = (
        num(&d, "reply_codes.451"),
        num(&d, "reply_codes.554"),
        num(&d, "reply_codes.250"),
    );
    assert!(near(t, 40, 4), "451 x{t}");
    assert!(near(p, 20, 4), "554 x{p}");
    assert_eq!(t + p + ok, 200);
    assert_eq!(num(&d, "messages.tempfail"), t);
    assert_eq!(num(&d, "messages.permfail"), p);
    assert_eq!(num(&s, "messages.tempfailed"), t);
    assert_eq!(num(&s, "messages.permfailed"), p);
    assert_eq!(num(&s, "messages.unique"), ok);
}

#[test]
fn rcpt_stage_faults_are_reported_as_reply_codes() {
    let (d, s) = run_faults("rcpt", true);
    let (t, p, ok) = (
        num(&d, "reply_codes.450"),
        num(&d, "reply_codes.550"),
        num(&d, "reply_codes.250"),
    );
    assert!(near(t, 40, 4), "450 x{t}");
    assert!(near(p, 20, 4), "550 x{p}");
    assert_eq!(t + p + ok, 200);
    assert_eq!(num(&d, "recipients.rejected"), 2 * (t + p));
    assert_eq!(num(&s, "messages.unique"), ok);
    assert_eq!(num(&s, "recipients.rejected"), 2 * (t + p));
}

#[test]
fn delay_slows_every_reply() {
    let dir = Scratch::new("delay");
    let dj = dir.path("send.json");
    let sink = Sink::start(&["--delay-ms", "50"]);
    let o = send(&[
        "--target",
        &sink.target(),
        "--messages",
        "5",
        "--connections",
        "1",
        "--json",
        dj.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let d = read_json(&dj);
    // MAIL, RCPT, DATA and the final reply: four delayed round trips per transaction.
    assert!(num(&d, "latency_us.transaction.min") >= 200_000, "{d}");
    // The sink's delay starts when it accepts, which can be before the client takes its
    // "connected" time (a busy machine schedules the client late): allow for that, while
    // an undelayed banner (a fraction of a millisecond) still fails.
    assert!(num(&d, "latency_us.banner.min") >= 25_000, "{d}");
}
