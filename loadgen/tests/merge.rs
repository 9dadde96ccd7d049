//! `loadgen merge`: two sends made side by side merge into one report whose totals are the
//! sums and whose percentiles come from all samples; inputs that are not send reports with
//! histograms are refused with one line naming the file.

mod common;
use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

fn merge(args: &[&str]) -> Output {
    run(
        Command::new(bin()).arg("merge").args(args),
        Duration::from_secs(30),
    )
}

fn lat(v: &Value, name: &str, field: &str) -> u64 {
    num(v, &format!("latency_us.{name}.{field}"))
}

#[test]
fn two_sends_side_by_side_merge_into_one_report() {
    let dir = Scratch::new("merge-two");
    let (aj, bj, mj) = (dir.path("a.json"), dir.path("b.json"), dir.path("m.json"));
    // Two "machines": one fast target, one that delays every reply, so the two latency
    // distributions differ and the merged percentiles must come from both.
    let fast = Sink::start(&[]);
    let slow = Sink::start(&["--delay-ms", "3"]);
    let run_send = |target: String, messages: &'static str, json: std::path::PathBuf| {
        std::thread::spawn(move || {
            send(&[
                "--target",
                &target,
                "--messages",
                messages,
                "--connections",
                "3",
                "--json",
                json.to_str().unwrap(),
            ])
        })
    };
    let a = run_send(fast.target(), "120", aj.clone());
    let b = run_send(slow.target(), "90", bj.clone());
    assert!(a.join().unwrap().status.success());
    assert!(b.join().unwrap().status.success());

    let o = merge(&[
        aj.to_str().unwrap(),
        bj.to_str().unwrap(),
        "--json",
        mj.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", o.stderr);
    assert!(
        o.stdout.starts_with("loadgen merge: 2 reports"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("loadgen send: 210 sent, 210 accepted"),
        "{}",
        o.stdout
    );
    let (a, b, m) = (read_json(&aj), read_json(&bj), read_json(&mj));
    assert_eq!(m["tool"], "loadgen send");
    for key in [
        "messages.sent",
        "messages.accepted",
        "messages.errors",
        "reply_codes.250",
        "bytes_accepted",
        "connections.opened",
        "recipients.accepted",
        "config.connections",
    ] {
        assert_eq!(num(&m, key), num(&a, key) + num(&b, key), "{key}");
    }
    assert_eq!(num(&m, "messages.accepted"), 210);
    // The merged histograms hold every sample of both runs.
    for name in ["transaction", "end_of_data", "connect", "banner"] {
        assert_eq!(
            lat(&m, name, "count"),
            lat(&a, name, "count") + lat(&b, name, "count"),
            "{name}"
        );
        assert_eq!(
            lat(&m, name, "max"),
            lat(&a, name, "max").max(lat(&b, name, "max"))
        );
        assert_eq!(
            lat(&m, name, "min"),
            lat(&a, name, "min").min(lat(&b, name, "min"))
        );
    }
    let (pa, pb, pm) = (
        lat(&a, "transaction", "p50"),
        lat(&b, "transaction", "p50"),
        lat(&m, "transaction", "p50"),
    );
    assert!(pa < pb, "the delayed run should be slower: {pa} vs {pb}");
    assert!(
        (pa..=pb).contains(&pm),
        "merged p50 {pm} outside {pa}..={pb}"
    );
    // Side by side: the wall time is the longer run's, and rates are totals over it.
    let elapsed = m["elapsed_s"].as_f64().unwrap();
    assert_eq!(
        elapsed,
        a["elapsed_s"]
            .as_f64()
            .unwrap()
            .max(b["elapsed_s"].as_f64().unwrap())
    );
    let rate = m["throughput"]["accepted_per_s"].as_f64().unwrap();
    assert!(
        (rate - 210.0 / elapsed).abs() < 0.1 + 210.0 / elapsed * 0.01,
        "{rate}"
    );
    let from = m["merged_from"].as_array().unwrap();
    assert_eq!(from.len(), 2);
    assert_eq!(from[0]["run_id"], a["run_id"]);
    assert_eq!(from[1]["accepted"], 90);
    assert!(m["histograms"]["transaction_us"].as_str().unwrap().len() > 10);

    // The merged report is a send report: it merges again (here with one of its inputs,
    // which is counted twice, with a warning).
    let o = merge(&[mj.to_str().unwrap(), aj.to_str().unwrap()]);
    assert!(o.status.success(), "{}", o.stderr);
    assert!(
        o.stdout.contains("loadgen send: 330 sent, 330 accepted"),
        "{}",
        o.stdout
    );
    let _ = (fast.stop(), slow.stop());
}

#[test]
fn inputs_that_are_not_send_reports_with_histograms_exit_2_naming_the_file() {
    let dir = Scratch::new("merge-bad");
    let good = dir.path("good.json");
    let sink = Sink::start(&[]);
    let o = send(&[
        "--target",
        &sink.target(),
        "--messages",
        "5",
        "--connections",
        "1",
        "--json",
        good.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let _ = sink.stop();
    let report = read_json(&good);

    let write = |name: &str, text: String| {
        let p = dir.path(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let mut old = report.clone();
    old.as_object_mut().unwrap().remove("histograms");
    let mut damaged = report.clone();
    damaged["histograms"]["transaction_us"] = "not base64!".into();
    let mut mismatched = report.clone();
    mismatched["messages"]["accepted"] = 6.into();
    let cases = [
        (write("text.json", "hello\n".into()), "is not JSON"),
        (
            write(
                "sink.json",
                r#"{"tool": "loadgen sink", "version": 1}"#.into(),
            ),
            "is not a loadgen send report",
        ),
        (
            write("list.json", "[1, 2]".into()),
            "is not a loadgen send report",
        ),
        (write("old.json", old.to_string()), "has no histograms"),
        (
            write("damaged.json", damaged.to_string()),
            "histograms.transaction_us: not base64",
        ),
        (
            write("mismatched.json", mismatched.to_string()),
            "messages.accepted is 6",
        ),
        (
            dir.path("missing.json").to_str().unwrap().to_string(),
            "cannot read",
        ),
    ];
    for (path, why) in &cases {
        let o = merge(&[good.to_str().unwrap(), path]);
        assert_eq!(o.status.code(), Some(2), "{path}: {}", o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
        assert!(o.stderr.starts_with("loadgen: "), "{}", o.stderr);
        assert!(o.stderr.contains(path.as_str()), "{}", o.stderr);
        assert!(o.stderr.contains(why), "{path}: {}", o.stderr);
        assert!(o.stdout.is_empty(), "{}", o.stdout);
    }

    let o = merge(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", o.stderr);
    let o = merge(&[
        good.to_str().unwrap(),
        "--json",
        dir.path("no-such-dir/m.json").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("cannot write --json"), "{}", o.stderr);
}
