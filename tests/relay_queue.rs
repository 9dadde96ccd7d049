//! `ringrelay queue list|stats|flush|remove`, on a running relay and on a stopped spool,
//! on both I/O drivers.
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
//!   shows it, `remove ID` removes it, and a restarted relay does not deliver it.
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
    queue_stats_while_the_server_deletes_segments
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
    assert_eq!(flushed(&queue(&spool, &["flush"])), 2);
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
    assert_eq!(out.code, Some(0), "flush on a stopped spool: {out:?}");
    let out = queue(&spool, &["remove", &q4]);
    assert_eq!(
        out.code,
        Some(0),
        "queue remove on a stopped spool: {out:?}"
    );
    assert!(out.stdout.contains("removed"), "{out:?}");
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
    // 64 records of just over 1 MiB: the first segment passes 64 MiB and is not the
    // current one any more; they stay (deferred for 300 s).
    for seq in 0..64 {
        let (_, data) = verifiable_message("00000000005e6de1", seq, "", 1 << 20);
        c.transaction("sender@client.test", &["r@dead.test"], &data)
            .queued_id();
    }
    let list = queue_list(&spool);
    let first_segment = list[0]["segment"].clone();
    assert!(
        list.len() == 64 && list.iter().all(|m| m["segment"] == first_segment),
        "64 deferred messages in one segment expected: {:?}",
        list.iter().map(|m| &m["segment"]).collect::<Vec<_>>()
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
            if segment_files(&spool).len() == 1 {
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
