//! Connections refused at the greeting (a per-IP connection limit, say) while others work:
//! counted with the server's own text, retried after a back-off, and the run succeeds; only a
//! run in which nothing gets through fails.

mod common;
use common::*;

const TOO_MANY: &str = "421 4.7.0 relay.test Error: too many connections\r\n";
const REASON: &str = "greeting 421 4.7.0 relay.test Error: too many connections";

#[test]
fn every_other_connection_refused_at_the_greeting_still_delivers_everything() {
    for per_message in [false, true] {
        let fake = FakeSmtp::start(|n, _| (n % 2 == 1).then(|| TOO_MANY.to_string()), None);
        let dir = Scratch::new(&format!("refused-half-{per_message}"));
        let (dj, mf) = (dir.path("send.json"), dir.path("manifest"));
        let mut args = vec![
            "--target",
            &fake.addr,
            "--connections",
            "6",
            "--messages",
            "40",
            "--json",
            dj.to_str().unwrap(),
            "--manifest",
            mf.to_str().unwrap(),
        ];
        if per_message {
            args.push("--new-connection-per-message");
        }
        let o = send(&args);
        assert_eq!(o.status.code(), Some(0), "{}\n{}", o.stderr, o.stdout);
        assert!(
            o.stdout.contains(REASON),
            "summary lacks the text:\n{}",
            o.stdout
        );
        let d = read_json(&dj);
        assert_eq!(d["stop_reason"], "complete", "{d}");
        assert_eq!(num(&d, "messages.sent"), 40);
        assert_eq!(num(&d, "messages.accepted"), 40);
        assert_eq!(num(&d, "messages.errors"), 0);
        let refused = fake.count(|c| &c.refused);
        assert!(refused >= 3, "only {refused} refused");
        assert_eq!(
            d["connection_failures"][REASON].as_u64(),
            Some(refused),
            "{d}"
        );
        assert_eq!(num(&d, "errors.greeting"), refused);
        assert_eq!(fake.count(|c| &c.messages), 40);
        // Every message handed back by a refused connection was sent exactly once.
        let mut ids = manifest_ids(&mf);
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 40);
    }
}

/// The case: `--connections 6` against a server that serves 3 at a time.
#[test]
fn six_connections_against_a_limit_of_three_complete() {
    let fake = FakeSmtp::start(|_, open| (open >= 3).then(|| TOO_MANY.to_string()), None);
    let dir = Scratch::new("refused-limit");
    let dj = dir.path("send.json");
    let o = send(&[
        "--target",
        &fake.addr,
        "--connections",
        "6",
        "--messages",
        "300",
        "--json",
        dj.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", o.stderr, o.stdout);
    let d = read_json(&dj);
    assert_eq!(num(&d, "messages.accepted"), 300);
    let refused = fake.count(|c| &c.refused);
    assert!(refused >= 3, "only {refused} refused");
    assert_eq!(
        d["connection_failures"][REASON].as_u64(),
        Some(refused),
        "{d}"
    );
}

#[test]
fn a_run_where_every_connection_is_refused_fails_at_once_with_the_text() {
    let fake = FakeSmtp::start(
        |_, _| Some("554 5.7.1 fake.test: your address is not welcome\r\n".into()),
        None,
    );
    let dir = Scratch::new("refused-all");
    let dj = dir.path("send.json");
    let t = std::time::Instant::now();
    let o = send(&[
        "--target",
        &fake.addr,
        "--connections",
        "3",
        "--messages",
        "10",
        "--json",
        dj.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("greeting 554 5.7.1 fake.test: your address is not welcome"),
        "{}",
        o.stderr
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    let d = read_json(&dj);
    assert_eq!(d["stop_reason"], "failed");
    assert_eq!(num(&d, "messages.sent"), 0);
    let n = d["connection_failures"]["greeting 554 5.7.1 fake.test: your address is not welcome"]
        .as_u64();
    assert!(n >= Some(3), "{d}");
}
