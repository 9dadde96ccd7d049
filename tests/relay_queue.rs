//! `ringrelay queue list|stats|flush|remove|hold|release`, on a running relay and on a
//! stopped spool, on both I/O drivers.
//!
//! The relay routes `example.test` to a port where nothing listens (so messages stay
//! deferred, with a long `retry_schedule_secs = [300]`) and `up.test` to a working sink.
//! Three messages go in; the first has recipients in both domains, so after its first
//! attempt only its `example.test` recipients are pending. Then:
//! - `list --json` shows the three with exactly their pending recipients, `stats --json`
//!   the totals; `remove ID` takes one out (`list` shows 2; a second `remove` fails);
//! - `flush` reports how many deferred messages it rescheduled; with a sink started on
//!   the dead port, `flush` gets the two delivered at once (not in 300 s), exactly once,
//!   and the removed message never arrives;
//! - on the stopped spool (SIGTERM with one more deferred message in it), `list` still
//!   shows it, `flush` fails (nothing runs to flush), `remove ID --json` removes it, and a
//!   restarted relay does not deliver it.
//!
//! The schedule: with a next hop that answers every message 451 and
//! `retry_schedule_secs = [60, 900]`, `list` shows each pending recipient with one attempt,
//! the 451 as last reply and the next attempt about 60 s ahead (Unix and ISO 8601 times);
//! two flushes retry at once but leave it at the first step (still one attempt counted,
//! the next about 60 s ahead, not 900).
//!
//! Hold and release (the queue commands given `--config` instead of `--spool`): a message
//! held on a running server is not attempted (its attempts stay put while another one's
//! climb, with `retry_schedule_secs = [1]`); on the stopped spool another is held and
//! released; after a restart with the next hop up the released one is delivered at once
//! and the held one is not, until `release` on the running server delivers it, each once.
//!
//! And no queue command creates a spool: each, on a missing directory (the default
//! `./spool`, `--spool`, or the config's `spool.dir`) or one without a lock file, fails
//! with exit status 1 and `ringrelay: spool DIR does not exist`, and leaves nothing
//! behind.
//!
//! And `queue stats` keeps working while the server deletes finished segments: one shard,
//! a first segment filled past its 64 MiB rotation with deferred messages (so reading it
//! takes a while), and a few times a message delivered from a second segment, which the
//! server deletes about a second later while `queue stats` runs in a loop.

mod common;

use std::time::Duration;

use common::*;

io_tests!(
    queue_commands_on_a_running_and_a_stopped_spool,
    queue_stats_while_the_server_deletes_segments,
    list_shows_the_schedule_and_flush_keeps_it,
    hold_and_release_on_a_running_and_a_stopped_spool
);

const RUN: &str = "00000000000c0ffe";

fn pending(m: &serde_json::Value) -> Vec<String> {
    m["pending"]
        .as_array()
        .unwrap_or_else(|| panic!("no pending array: {m:#}"))
        .iter()
        .map(|r| r.as_str().unwrap().trim_matches(['<', '>']).to_string())
        .collect()
}

fn flushed(out: &Output) -> u64 {
    assert_eq!(out.code, Some(0), "queue flush: {out:?}");
    out.stdout
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("queue flush should start with the count: {out:?}"))
}

fn queue_commands_on_a_running_and_a_stopped_spool(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let manifest = work.path().join("manifest");
    let dead = free_port();
    let dead_addr = format!("127.0.0.1:{dead}").parse().unwrap();
    let mut up = Sink::start(&[]);
    let opts = Opts::relay(
        io,
        &spool,
        &[("example.test", dead_addr), ("up.test", up.addr)],
        &[300],
        "",
    );
    let mut relay = Relay::start_with(opts.clone());

    let rcpts: [&[&str]; 3] = [
        &["a@example.test", "x@up.test", "b@example.test"],
        &["c@example.test"],
        &["d@example.test"],
    ];
    let mut qids = Vec::new();
    let mut lids = Vec::new();
    for (i, to) in rcpts.iter().enumerate() {
        let (lid, data) =
            verifiable_message(RUN, i as u64, &format!("Subject: queue {i}\r\n"), 300);
        qids.push(send_one(relay.addr, "sender@client.test", to, &data).queued_id());
        lids.push(lid);
    }

    // After the first attempts: x@up.test delivered, the rest deferred.
    let list = wait_for(Duration::from_secs(5), "first delivery attempts", || {
        let list = queue_list(&spool);
        let first = list.iter().find(|m| m["id"] == qids[0].as_str());
        match first {
            Some(m) if pending(m) == ["a@example.test", "b@example.test"] => Ok(list),
            _ => Err(format!("{list:#?}")),
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(list.len(), 3, "{list:#?}");
    for (i, want) in [
        vec!["a@example.test", "b@example.test"],
        vec!["c@example.test"],
        vec!["d@example.test"],
    ]
    .iter()
    .enumerate()
    {
        let m = list
            .iter()
            .find(|m| m["id"] == qids[i].as_str())
            .unwrap_or_else(|| panic!("{} not listed: {list:#?}", qids[i]));
        assert_eq!(&pending(m), want, "{m:#}");
        assert_eq!(m["from"], "sender@client.test", "{m:#}");
    }
    let stats = queue_stats(&spool);
    assert_eq!(
        (jnum(&stats, "messages"), jnum(&stats, "recipients")),
        (3, 4),
        "{stats:#}"
    );
    assert_eq!(stats["running"], true, "{stats:#}");
    assert!(
        jnum(&stats, "bytes") > 0 && jnum(&stats, "segments") >= 1,
        "{stats:#}"
    );
    let text = queue(&spool, &["list"]);
    assert_eq!(text.code, Some(0), "{text:?}");
    for q in &qids {
        assert!(text.stdout.contains(q.as_str()), "{q} in {}", text.stdout);
    }

    // remove on the running server.
    let out = queue(&spool, &["remove", &qids[1]]);
    assert_eq!(out.code, Some(0), "queue remove {}: {out:?}", qids[1]);
    assert!(out.stdout.contains("removed"), "{out:?}");
    let ids = queue_ids(&spool);
    assert_eq!(
        ids,
        [qids[0].clone(), qids[2].clone()]
            .into_iter()
            .collect::<std::collections::BTreeSet<String>>(),
        "after remove"
    );
    let stats = queue_stats(&spool);
    assert_eq!(
        (jnum(&stats, "messages"), jnum(&stats, "recipients")),
        (2, 3),
        "{stats:#}"
    );
    let again = queue(&spool, &["remove", &qids[1]]);
    assert_eq!(again.code, Some(1), "removing it twice: {again:?}");

    // flush with the next hop still down: two rescheduled, still queued.
    assert_eq!(flushed(&queue(&spool, &["flush"])), 2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(jnum(&queue_stats(&spool), "messages"), 2);

    // The next hop comes up; flush delivers now, not in 300 s.
    write_manifest(&manifest, RUN, &[lids[0].clone(), lids[2].clone()]);
    let mut sink = Sink::start_on(dead, &["--check-manifest", manifest.to_str().unwrap()]);
    assert_eq!(
        json_ok(queue(&spool, &["flush", "--json"])),
        serde_json::json!({"action": "flush", "flushed": 2})
    );
    if let Err(last) = try_wait_queue_empty(&spool, Duration::from_secs(5)) {
        panic!(
            "flush did not deliver promptly: {last}\nrelay log:\n{}",
            relay.stderr()
        );
    }
    let (code, report) = sink.stop();
    assert_eq!(jnum(&report, "messages.unique"), 2, "{report:#}");
    assert_eq!(jnum(&report, "messages.duplicates"), 0, "{report:#}");
    assert_eq!(
        jnum(&report, "recipients.accepted"),
        3,
        "a, b and d: {report:#}"
    );
    assert_eq!(jnum(&report, "manifest.lost"), 0, "{report:#}");
    assert_eq!(
        jnum(&report, "manifest.unexpected"),
        0,
        "the removed message must not be delivered: {report:#}"
    );
    assert_eq!(code, Some(0));

    // A stopped spool, with one deferred message in it.
    let (_, data) = verifiable_message(RUN, 3, "Subject: queue 3\r\n", 300);
    let q4 = send_one(relay.addr, "sender@client.test", &["e@example.test"], &data).queued_id();
    std::thread::sleep(Duration::from_millis(300));
    relay.terminate();
    let stats = queue_stats(&spool);
    assert_eq!(stats["running"], false, "{stats:#}");
    let list = queue_list(&spool);
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["id"], q4.as_str(), "{list:#?}");
    assert_eq!(pending(&list[0]), ["e@example.test"]);
    let out = queue(&spool, &["flush"]);
    assert_eq!(out.code, Some(1), "flush on a stopped spool: {out:?}");
    assert!(
        out.stderr.contains("no server is running"),
        "flush on a stopped spool: {out:?}"
    );
    let out = json_ok(queue(&spool, &["remove", &q4, "--json"]));
    assert_eq!(
        out,
        serde_json::json!({"action": "remove", "id": q4, "removed": true}),
        "queue remove --json on a stopped spool"
    );
    assert!(queue_list(&spool).is_empty());

    // Restarted, with the next hop up: the removed message is not delivered.
    let mut sink = Sink::start_on(dead, &[]);
    let mut relay = Relay::start_with(opts);
    std::thread::sleep(Duration::from_millis(1500));
    let (_, report) = sink.stop();
    assert_eq!(
        jnum(&report, "messages.received"),
        0,
        "a message removed from the stopped spool was delivered: {report:#}"
    );
    relay.terminate();

    let (_, report) = up.stop();
    assert_eq!(
        (
            jnum(&report, "messages.unique"),
            jnum(&report, "recipients.accepted")
        ),
        (1, 1),
        "x@up.test got the first message once: {report:#}"
    );
}

fn queue_stats_while_the_server_deletes_segments(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dead = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut up = Sink::start(&[]);
    let relay = Relay::start_with(Opts {
        shards: 1,
        ..Opts::relay(
            io,
            &spool,
            &[("dead.test", dead), ("up.test", up.addr)],
            &[300],
            "",
        )
    });
    let mut c = relay.connect();
    c.expect("EHLO client.test", 250, HOST);
    // 64 messages of just over 1 MiB: each is streamed into a segment of its own (they are
    // past the 256 KiB streaming threshold), none of them the current segment; they stay
    // (deferred for 300 s).
    for seq in 0..64 {
        let (_, data) = verifiable_message("00000000005e6de1", seq, "", 1 << 20);
        c.transaction("sender@client.test", &["r@dead.test"], &data)
            .queued_id();
    }
    let list = queue_list(&spool);
    let segments: std::collections::BTreeSet<String> = list
        .iter()
        .map(|m| m["segment"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        list.len() == 64 && segments.len() == 64,
        "64 deferred messages in 64 segments expected: {segments:?}"
    );
    let mut runs = 0;
    for round in 0..3u64 {
        let (_, data) = verifiable_message("00000000005e6de1", 100 + round, "", 100);
        c.transaction("sender@client.test", &["x@up.test"], &data)
            .queued_id();
        // Delivered at once; its segment goes about 1 s later. Meanwhile, and until
        // then, `queue stats` must keep answering.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let out = queue(&spool, &["stats", "--json"]);
            runs += 1;
            assert_eq!(
                out.code,
                Some(0),
                "`ringrelay queue stats --json` failed on a running server (run {runs}, round {round}) \
                 while the server deleted a finished segment: {out:?}"
            );
            if segment_files(&spool).len() == 64 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the delivered message's segment was not deleted: {:?}",
                segment_files(&spool)
            );
        }
    }
    eprintln!("queue stats ran {runs} times while 3 segments were deleted ({io})");
    let stats = queue_stats(&spool);
    assert_eq!(jnum(&stats, "messages"), 64, "{stats:#}");
    let (_, report) = up.stop();
    assert_eq!(jnum(&report, "messages.received"), 3, "{report:#}");
}

/// Exit status 0 and JSON on standard output.
#[track_caller]
fn json_ok(out: Output) -> serde_json::Value {
    assert_eq!(out.code, Some(0), "{out:?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `2026-12-01T09:30:00Z`.
#[track_caller]
fn assert_iso8601(v: &serde_json::Value) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("not an ISO 8601 string: {v}"));
    let b = s.as_bytes();
    let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    assert!(
        b.len() == 20
            && digits.iter().all(|&i| b[i].is_ascii_digit())
            && (b[4], b[7], b[10], b[13], b[16], b[19]) == (b'-', b'-', b'T', b':', b':', b'Z'),
        "not ISO 8601 UTC: {s}"
    );
}

/// The message `id` in `queue list --json`.
#[track_caller]
fn listed(spool: &std::path::Path, id: &str) -> serde_json::Value {
    let list = queue_list(spool);
    list.iter()
        .find(|m| m["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} not listed: {list:#?}"))
}

fn list_shows_the_schedule_and_flush_keeps_it(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let mut hop = Sink::start(&["--tempfail-pct", "100"]);
    let mut relay = Relay::start_with(Opts::relay(
        io,
        &spool,
        &[("example.test", hop.addr)],
        &[60, 900],
        "",
    ));
    let (_, data) = verifiable_message(RUN, 10, "Subject: schedule\r\n", 300);
    let id = send_one(
        relay.addr,
        "sender@client.test",
        &["a@example.test", "b@example.test"],
        &data,
    )
    .queued_id();

    let m = wait_for(Duration::from_secs(10), "the first attempt", || {
        let m = listed(&spool, &id);
        if m["attempts"] == 1 {
            Ok(m)
        } else {
            Err(format!("{m:#}"))
        }
    });
    let now = now_unix();
    assert_eq!(m["held"], false, "{m:#}");
    assert_iso8601(&m["arrival"]);
    assert!(
        now.saturating_sub(jnum(&m, "arrival_unix")) < 30,
        "arrived just now: {m:#}"
    );
    let next = jnum(&m, "next_attempt_unix");
    assert!(
        (now + 50..=now + 61).contains(&next),
        "next attempt about 60 s ahead (now {now}): {m:#}"
    );
    assert_iso8601(&m["next_attempt"]);
    let recipients = m["recipients"].as_array().expect("recipients");
    assert_eq!(recipients.len(), 2, "{m:#}");
    for (r, address) in recipients.iter().zip(["a@example.test", "b@example.test"]) {
        assert_eq!(r["address"], address, "{m:#}");
        assert_eq!(r["attempts"], 1, "{m:#}");
        assert_eq!(r["next_attempt_unix"], next, "{m:#}");
        assert_eq!(r["next_attempt"], m["next_attempt"], "{m:#}");
        assert_eq!(r["held"], false, "{m:#}");
        let last = r["last_error"].as_str().unwrap_or_default();
        assert!(last.contains("451 4.3.0"), "the sink's reply: {m:#}");
    }
    let text = queue(&spool, &["list"]);
    assert_eq!(text.code, Some(0), "{text:?}");
    let arrival_day = &m["arrival"].as_str().unwrap()[..10];
    for want in [
        id.as_str(),
        "<sender@client.test>",
        "<a@example.test>  attempts 1; next attempt ",
        "<b@example.test>  attempts 1; next attempt ",
        "last reply: ",
        "451 4.3.0",
        arrival_day,
        " UTC",
    ] {
        assert!(text.stdout.contains(want), "{want:?} in:\n{}", text.stdout);
    }
    assert!(
        !text.stdout.contains(&jnum(&m, "arrival_unix").to_string()),
        "arrival as a date, not a number:\n{}",
        text.stdout
    );

    // Two flushes: each retries at once, and neither moves the schedule on.
    let mut before = next;
    for round in 1..=2 {
        // The retry's next attempt lands in a later second than the one before.
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            json_ok(queue(&spool, &["flush", "--json"])),
            serde_json::json!({"action": "flush", "flushed": 1}),
            "flush {round}"
        );
        let m = wait_for(Duration::from_secs(10), "the flushed attempt", || {
            let m = listed(&spool, &id);
            match m["next_attempt_unix"].as_u64() {
                Some(t) if t > before => Ok(m),
                _ => Err(format!("{m:#}")),
            }
        });
        assert_eq!(
            m["attempts"], 1,
            "flush {round} counted as an attempt: {m:#}"
        );
        let now = now_unix();
        let next = jnum(&m, "next_attempt_unix");
        assert!(
            (now + 55..=now + 61).contains(&next),
            "after flush {round} the next attempt is still the first step, about 60 s ahead \
             (now {now}), not 900: {m:#}"
        );
        before = next;
    }
    relay.terminate();
    let (_, report) = hop.stop();
    assert!(
        jnum(&report, "messages.tempfailed") >= 3,
        "the first attempt and two flushed ones reached the next hop: {report:#}"
    );
    assert_eq!(jnum(&report, "messages.received"), 0, "{report:#}");
}

/// `ringrelay queue ARGS --config CONFIG`.
fn queue_by_config(config: &std::path::Path, args: &[&str]) -> Output {
    let mut all: Vec<&std::ffi::OsStr> = vec!["queue".as_ref()];
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    all.push("--config".as_ref());
    all.push(config.as_os_str());
    ringrelay_cmd(&all)
}

fn hold_and_release_on_a_running_and_a_stopped_spool(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let manifest = work.path().join("manifest");
    let config = work.path().join("queue.toml");
    std::fs::write(
        &config,
        format!("[spool]\ndir = {:?}\n", spool.to_str().unwrap()),
    )
    .unwrap();
    let q = |args: &[&str]| queue_by_config(&config, args);
    let port = free_port();
    let hop = format!("127.0.0.1:{port}").parse().unwrap();
    let opts = Opts::relay(io, &spool, &[("example.test", hop)], &[1], "");
    let mut relay = Relay::start_with(opts.clone());
    let mut qids = Vec::new();
    let mut lids = Vec::new();
    for seq in 20..22 {
        let (lid, data) = verifiable_message(RUN, seq, "Subject: hold\r\n", 300);
        qids.push(
            send_one(relay.addr, "sender@client.test", &["h@example.test"], &data).queued_id(),
        );
        lids.push(lid);
    }
    let (m1, m2) = (qids[0].clone(), qids[1].clone());
    wait_for(Duration::from_secs(10), "both deferred", || {
        let list = queue_list(&spool);
        if list.len() == 2 && list.iter().all(|m| jnum(m, "attempts") >= 1) {
            Ok(())
        } else {
            Err(format!("{list:#?}"))
        }
    });

    // Hold m1 on the running server.
    assert_eq!(
        json_ok(q(&["hold", &m1, "--json"])),
        serde_json::json!({"action": "hold", "id": m1, "held": true, "changed": true})
    );
    let again = q(&["hold", &m1]);
    assert_eq!(again.code, Some(0), "holding it twice: {again:?}");
    assert!(again.stdout.contains("on hold already"), "{again:?}");
    std::thread::sleep(Duration::from_millis(300));
    let held = listed(&spool, &m1);
    assert_eq!(held["held"], true, "{held:#}");
    assert_eq!(
        held["next_attempt_unix"],
        serde_json::Value::Null,
        "{held:#}"
    );
    assert_eq!(held["recipients"][0]["held"], true, "{held:#}");
    let text = q(&["list"]);
    assert!(
        text.stdout.contains(&format!("{m1}!")),
        "held marked !:\n{}",
        text.stdout
    );
    assert!(text.stdout.contains("on hold"), "{}", text.stdout);
    let stats = json_ok(q(&["stats", "--json"]));
    assert_eq!(jnum(&stats, "held"), 1, "{stats:#}");
    // With a 1 s schedule, m2 is tried again and again; m1 is not tried at all.
    let (held_attempts, m2_attempts) = (
        jnum(&held, "attempts"),
        jnum(&listed(&spool, &m2), "attempts"),
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        jnum(&listed(&spool, &m1), "attempts"),
        held_attempts,
        "a held message was attempted"
    );
    assert!(
        jnum(&listed(&spool, &m2), "attempts") > m2_attempts,
        "m2 is retried meanwhile"
    );

    // Stopped: hold m2 and release it again; m1 stays held.
    relay.terminate();
    assert_eq!(
        json_ok(q(&["hold", &m2, "--json"])),
        serde_json::json!({"action": "hold", "id": m2, "held": true, "changed": true})
    );
    assert_eq!(listed(&spool, &m2)["held"], true);
    assert_eq!(
        json_ok(q(&["release", &m2, "--json"])),
        serde_json::json!({"action": "release", "id": m2, "held": false, "changed": true})
    );
    assert_eq!(
        json_ok(q(&["release", &m2, "--json"])),
        serde_json::json!({"action": "release", "id": m2, "held": false, "changed": false}),
        "releasing it twice changes nothing"
    );
    let m = listed(&spool, &m2);
    assert_eq!(
        (&m["held"], &m["next_attempt_unix"]),
        (&serde_json::json!(false), &serde_json::Value::Null),
        "released: due at start: {m:#}"
    );
    assert_eq!(listed(&spool, &m1)["held"], true);
    let out = q(&["flush", "--json"]);
    assert_eq!(out.code, Some(1), "flush with no server: {out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let out = q(&["hold", "00000000000000000000"]);
    assert_eq!(out.code, Some(1), "no such message: {out:?}");

    // Restarted with the next hop up: m2 is delivered at once, m1 stays held.
    write_manifest(&manifest, RUN, &lids);
    let mut sink = Sink::start_on(port, &["--check-manifest", manifest.to_str().unwrap()]);
    let mut relay = Relay::start_with(opts);
    wait_for(
        Duration::from_secs(5),
        "the released message delivered after the restart",
        || {
            let ids = queue_ids(&spool);
            if ids.len() == 1 && ids.contains(&m1) {
                Ok(())
            } else {
                Err(format!("{ids:?}"))
            }
        },
    );
    std::thread::sleep(Duration::from_millis(2000));
    let m = listed(&spool, &m1);
    assert_eq!(m["held"], true, "held across the restart: {m:#}");
    assert_eq!(jnum(&m, "attempts"), held_attempts, "{m:#}");

    // Released on the running server: delivered now.
    assert_eq!(
        json_ok(q(&["release", &m1, "--json"])),
        serde_json::json!({"action": "release", "id": m1, "held": false, "changed": true})
    );
    if let Err(last) = try_wait_queue_empty(&spool, Duration::from_secs(5)) {
        panic!(
            "release did not deliver promptly: {last}\nrelay log:\n{}",
            relay.stderr()
        );
    }
    relay.terminate();
    let (code, report) = sink.stop();
    assert_eq!(jnum(&report, "messages.unique"), 2, "{report:#}");
    assert_eq!(jnum(&report, "messages.duplicates"), 0, "{report:#}");
    assert_eq!(jnum(&report, "manifest.lost"), 0, "{report:#}");
    assert_eq!(jnum(&report, "manifest.unexpected"), 0, "{report:#}");
    assert_eq!(code, Some(0), "{}", sink.output());
}

#[test]
fn no_queue_command_creates_a_spool() {
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let config = work.path().join("queue.toml");
    let from_config = work.path().join("from-config");
    std::fs::write(
        &config,
        format!("[spool]\ndir = {:?}\n", from_config.to_str().unwrap()),
    )
    .unwrap();
    let bare = work.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    let missing = work.path().join("missing");
    let id = "00000000000000000000";
    let commands: [&[&str]; 6] = [
        &["list"],
        &["stats"],
        &["flush"],
        &["remove", id],
        &["hold", id],
        &["release", id],
    ];
    let places: [(Vec<&std::ffi::OsStr>, String); 4] = [
        (vec![], "./spool".to_string()),
        (
            vec!["--spool".as_ref(), missing.as_os_str()],
            missing.display().to_string(),
        ),
        (
            vec!["--config".as_ref(), config.as_os_str()],
            from_config.display().to_string(),
        ),
        (
            vec!["--spool".as_ref(), bare.as_os_str()],
            bare.display().to_string(),
        ),
    ];
    for command in commands {
        for (flags, dir) in &places {
            for json in [false, true] {
                let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ringrelay"));
                cmd.current_dir(&cwd)
                    .arg("queue")
                    .args(command)
                    .args(flags)
                    .env("RUST_LOG", "warn");
                if json {
                    cmd.arg("--json");
                }
                let out = run_bounded(&mut cmd, Duration::from_secs(30));
                let what = format!("queue {command:?} {flags:?} json={json}: {out:?}");
                assert_eq!(out.code, Some(1), "{what}");
                assert!(
                    out.stderr
                        .starts_with(&format!("ringrelay: spool {dir} does not exist")),
                    "{what}"
                );
                assert_eq!(out.stderr.lines().count(), 1, "{what}");
                assert!(out.stdout.is_empty(), "{what}");
            }
        }
    }
    assert_eq!(
        std::fs::read_dir(&cwd).unwrap().count(),
        0,
        "./spool created"
    );
    assert!(!missing.exists() && !from_config.exists());
    assert_eq!(
        std::fs::read_dir(&bare).unwrap().count(),
        0,
        "a lock file created"
    );

    // A configuration that cannot be read is a usage error; so is a bad ID.
    let bad = work.path().join("bad.toml");
    std::fs::write(&bad, "[spool]\ndirectory = \"x\"\n").unwrap();
    for args in [
        vec!["queue", "list", "--config", bad.to_str().unwrap()],
        vec![
            "queue",
            "hold",
            "not-an-id",
            "--spool",
            bare.to_str().unwrap(),
        ],
        vec!["queue", "release", "--spool", bare.to_str().unwrap()],
    ] {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        let out = ringrelay_cmd(&args);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {out:?}");
    }
}
