//! Open-loop sending: the schedule caps the count, and a stalled server shows up as being
//! behind schedule rather than being hidden (coordinated omission). Counts only, no timing.

mod common;
use common::*;

#[test]
fn rate_is_respected_over_a_few_seconds() {
    let dir = Scratch::new("rate");
    let dj = dir.path("send.json");
    let sink = Sink::start(&[]);
    let o = send(&[
        "--target",
        &sink.target(),
        "--rate",
        "50",
        "--duration",
        "3",
        "--connections",
        "4",
        "--json",
        dj.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    drop(sink);
    let d = read_json(&dj);
    // 50/s for 3 s is 150 messages; a closed loop would have sent thousands.
    assert_eq!(num(&d, "schedule.scheduled"), 150);
    let sent = num(&d, "messages.sent");
    assert!(sent <= 150, "sent {sent} > schedule");
    assert!(sent >= 135, "sent only {sent} of 150");
    assert_eq!(num(&d, "schedule.started"), sent);
    assert_eq!(num(&d, "messages.accepted"), sent);
}

#[test]
fn closed_loop_duration_stops_by_itself() {
    let dir = Scratch::new("duration");
    let dj = dir.path("send.json");
    let sink = Sink::start(&[]);
    let o = send(&[
        "--target",
        &sink.target(),
        "--duration",
        "1",
        "--connections",
        "2",
        "--json",
        dj.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let d = read_json(&dj);
    assert_eq!(d["stop_reason"], "duration");
    assert!(num(&d, "messages.accepted") > 0);
    assert_eq!(num(&d, "messages.accepted"), num(&d, "messages.sent"));
}

#[test]
fn stalled_server_puts_the_run_behind_schedule() {
    let dir = Scratch::new("stall");
    let dj = dir.path("send.json");
    // Every reply takes 200 ms, so one connection manages about one message per second,
    // far below the 20/s asked for.
    let sink = Sink::start(&["--delay-ms", "200"]);
    let o = send(&[
        "--target",
        &sink.target(),
        "--rate",
        "20",
        "--duration",
        "2",
        "--connections",
        "1",
        "--json",
        dj.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let d = read_json(&dj);
    assert_eq!(num(&d, "schedule.scheduled"), 40);
    assert!(num(&d, "schedule.unstarted") >= 20, "{d}");
    assert!(
        d["schedule"]["behind_at_end_ms"].as_f64().unwrap_or(0.0) >= 1000.0,
        "{d}"
    );
    // Latency is measured from the intended start, so it includes the time spent waiting.
    assert!(num(&d, "schedule.lag_us.max") >= 500_000, "{d}");
    assert!(num(&d, "latency_us.transaction.max") >= num(&d, "schedule.lag_us.max"));
}
