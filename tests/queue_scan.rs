//! `ringrelay queue list|stats` read each segment through a window, keeping no content
//! (`spool/scan.rs`); here, on both I/O drivers, their output must be exactly what
//! recovery's own reader (every segment read whole, `inspect::read_by_recovery`) makes of
//! the same spool, and hold what the test knows it sent.
//!
//! The relay routes `dead.test` to a port where nothing listens, `tf.test` to a sink that
//! answers every message 451 and `up.test` to a working sink, with
//! `retry_schedule_secs = [300]` so nothing moves while the outputs are compared. In the
//! spool: a message partly delivered (its `up.test` recipient gone, its `dead.test` one
//! deferred), one deferred on a refused connection, one deferred on a 451, one on hold,
//! one held and released, one removed and one delivered (neither listed). `list --json`,
//! `list` (text) and `stats --json` are compared with the reference on the running
//! server; then, while a client sends message after message, the relay is SIGKILLed, and
//! half a record is appended to the newest segment as a torn write would leave it. On the
//! stopped spool the outputs again equal the reference, every acknowledged message is
//! listed and the torn one is not; then the relay restarts (recovery cuts the tail) and
//! they equal it once more.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::*;
use ringrelay::spool::inspect;

io_tests!(list_and_stats_are_what_recovery_reads);

fn list_and_stats_are_what_recovery_reads(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let dead = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut up = Sink::start(&[]);
    let mut tf = Sink::start(&["--tempfail-pct", "100"]);
    let opts = Opts::relay(
        io,
        &spool,
        &[
            ("dead.test", dead),
            ("tf.test", tf.addr),
            ("up.test", up.addr),
        ],
        &[300],
        "",
    )
    .on_port(free_port());
    let mut relay = Relay::start_with(opts.clone());

    let cases: [&[&str]; 7] = [
        &["a@dead.test", "x@up.test"], // partly delivered
        &["b@dead.test"],              // deferred: refused
        &["c@tf.test", "c2@tf.test"],  // deferred: 451
        &["d@dead.test"],              // held
        &["e@dead.test"],              // held and released
        &["f@dead.test"],              // removed
        &["y@up.test"],                // delivered
    ];
    let mut ids = Vec::new();
    for (i, to) in cases.iter().enumerate() {
        let (_, data) = verifiable_message("000000000005ca17", i as u64, "", 2000);
        ids.push(send_one(relay.addr, "sender@client.test", to, &data).queued_id());
    }
    wait_for(Duration::from_secs(10), "every first attempt", || {
        let list = queue_list(&spool);
        let attempted = |id: &str| {
            list.iter()
                .any(|m| m["id"] == id && m["attempts"].as_u64() == Some(1))
        };
        let first_done = list.iter().any(|m| {
            m["id"] == ids[0].as_str() && m["pending"] == serde_json::json!(["a@dead.test"])
        });
        if first_done && ids[..6].iter().all(|id| attempted(id)) && list.len() == 6 {
            Ok(())
        } else {
            Err(format!("{list:#?}"))
        }
    });
    for (args, id) in [
        (["hold"], &ids[3]),
        (["hold"], &ids[4]),
        (["release"], &ids[4]),
        (["remove"], &ids[5]),
    ] {
        let out = queue(&spool, &[args[0], id]);
        assert_eq!(out.code, Some(0), "queue {} {id}: {out:?}", args[0]);
    }
    // The server applies them asynchronously: wait until the list shows them.
    wait_for(
        Duration::from_secs(5),
        "hold, release and remove applied",
        || {
            let list = queue_list(&spool);
            let held: Vec<&str> = list
                .iter()
                .filter(|m| m["held"] == true)
                .map(|m| m["id"].as_str().unwrap())
                .collect();
            if held == [ids[3].as_str()] && list.len() == 5 {
                Ok(())
            } else {
                Err(format!("{list:#?}"))
            }
        },
    );
    // The released message is tried at once and deferred again: wait for that too.
    wait_for(
        Duration::from_secs(5),
        "the released message deferred again",
        || {
            let m = queue_list(&spool)
                .into_iter()
                .find(|m| m["id"] == ids[4].as_str())
                .ok_or("released message gone")?;
            if m["next_attempt_unix"].is_u64() {
                Ok(())
            } else {
                Err(format!("{m:#}"))
            }
        },
    );

    let list = compare_with_reference(&spool, "running");
    let listed: Vec<&str> = list.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(listed.len(), 5, "{list:#?}");
    for id in &ids[..5] {
        assert!(listed.contains(&id.as_str()), "{id} not listed: {list:#?}");
    }
    let by_id = |id: &str| list.iter().find(|m| m["id"] == id).unwrap().clone();
    assert_eq!(
        by_id(&ids[0])["pending"],
        serde_json::json!(["a@dead.test"])
    );
    assert_eq!(
        by_id(&ids[2])["pending"],
        serde_json::json!(["c@tf.test", "c2@tf.test"])
    );
    let reply = by_id(&ids[2])["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(reply.contains("451"), "the 451 as last reply: {reply:?}");
    assert_eq!(by_id(&ids[3])["held"], true);
    assert_eq!(by_id(&ids[3])["next_attempt_unix"], serde_json::Value::Null);
    assert_eq!(by_id(&ids[1])["held"], false);
    assert!(by_id(&ids[1])["next_attempt_unix"].as_u64().unwrap() > now_unix() + 200);

    // kill -9 while a client sends, then a torn write at the end of the newest segment.
    let addr = relay.addr;
    let sender = std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut c = Client::connect(addr);
        if c.try_reply().is_err() {
            return acked;
        }
        c.line("EHLO client.test");
        if c.try_reply().is_err() {
            return acked;
        }
        for seq in 0..100_000u64 {
            let (_, data) = verifiable_message("000000000005ca17", 100 + seq, "", 3000);
            let mut batch =
                b"MAIL FROM:<load@client.test>\r\nRCPT TO:<load@dead.test>\r\nDATA\r\n".to_vec();
            batch.extend_from_slice(&dot_stuff(&data));
            if c.try_send(&batch).is_err() {
                break;
            }
            let replies: Vec<_> = (0..4).map(|_| c.try_reply()).collect();
            match replies.last() {
                Some(Ok(r)) if r.is_queued() => acked.push(r.queued_id()),
                _ => break,
            }
        }
        acked
    });
    wait_for(Duration::from_secs(20), "messages arriving", || {
        let n = jnum(&queue_stats(&spool), "messages");
        if n >= 40 {
            Ok(())
        } else {
            Err(format!("{n} queued"))
        }
    });
    relay.kill9();
    let acked = sender.join().unwrap();
    assert!(acked.len() >= 30, "{} acknowledged", acked.len());
    let newest = segment_files(&spool).pop().unwrap();
    let first = std::fs::read(spool.join(segment_files(&spool)[0].as_str())).unwrap();
    let torn_len = u32::from_le_bytes(first[8..12].try_into().unwrap()) as usize / 2;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(spool.join(&newest))
        .unwrap();
    f.write_all(&first[..16 + torn_len]).unwrap();
    drop(f);

    let list = compare_with_reference(&spool, "after kill -9 and a torn write");
    let listed: std::collections::BTreeSet<&str> =
        list.iter().map(|m| m["id"].as_str().unwrap()).collect();
    for id in ids[..5].iter().chain(&acked) {
        assert!(listed.contains(id.as_str()), "acknowledged {id} not listed");
    }
    assert!(
        listed.len() <= 5 + acked.len() + 1,
        "{} listed, {} acknowledged",
        listed.len(),
        5 + acked.len()
    );

    eprintln!(
        "{io}: {} acknowledged before kill -9, {} listed after it",
        acked.len(),
        listed.len()
    );
    let mut relay = Relay::start_with(opts);
    // Those never attempted before the kill are now, once: then nothing moves for 300 s.
    wait_settled(&spool);
    let again = compare_with_reference(&spool, "restarted");
    let listed_again: std::collections::BTreeSet<&str> =
        again.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        listed_again, listed,
        "the restart recovered what was listed"
    );
    relay.terminate();
    up.stop();
    tf.stop();
}

/// Waits until every message listed is on hold or deferred with a next attempt.
#[track_caller]
fn wait_settled(spool: &Path) {
    wait_for(
        Duration::from_secs(20),
        "every message deferred or held",
        || {
            let list = queue_list(spool);
            match list
                .iter()
                .find(|m| m["held"] == false && !m["next_attempt_unix"].is_u64())
            {
                None => Ok(()),
                Some(m) => Err(format!("{m:#}")),
            }
        },
    );
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Runs `queue list --json`, `queue list` and `queue stats --json` and asserts each equals
/// what the reference reader makes of the spool; returns the list.
#[track_caller]
fn compare_with_reference(spool: &Path, when: &str) -> Vec<serde_json::Value> {
    let json = queue(spool, &["list", "--json"]);
    let text = queue(spool, &["list"]);
    let stats = queue(spool, &["stats", "--json"]);
    let (ref_list, ref_stats) = inspect::read_by_recovery(spool).unwrap();
    for out in [&json, &text, &stats] {
        assert_eq!(out.code, Some(0), "{when}: {out:?}");
    }
    let list: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(
        list,
        serde_json::to_value(&ref_list).unwrap(),
        "{when}: queue list --json"
    );
    let mut want = Vec::new();
    inspect::write_text(&mut want, ref_list.into_iter(), &ref_stats).unwrap();
    assert_eq!(
        text.stdout,
        String::from_utf8(want).unwrap(),
        "{when}: queue list"
    );
    let mut stats: serde_json::Value = serde_json::from_str(&stats.stdout).unwrap();
    let mut ref_stats = serde_json::to_value(&ref_stats).unwrap();
    let age = |v: &mut serde_json::Value| {
        v.as_object_mut()
            .and_then(|o| o.remove("oldest_age_secs"))
            .and_then(|a| a.as_u64())
            .unwrap()
    };
    let (a, b) = (age(&mut stats), age(&mut ref_stats));
    assert!(a.abs_diff(b) <= 2, "{when}: oldest_age_secs {a} vs {b}");
    assert_eq!(stats, ref_stats, "{when}: queue stats --json");
    match list {
        serde_json::Value::Array(a) => a,
        _ => unreachable!(),
    }
}
