//! Store and forward's side: `ringrelay queue` ([`queue`], [`queue_stats`],
//! [`queue_list`], [`wait_queue_empty`]), the spool's segment files ([`segment_files`]),
//! and the messages that go through it: ones `loadgen sink` can verify
//! ([`verifiable_message`], [`write_manifest`]) and the fields of a bounce
//! ([`dsn_values`]).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{jnum, run_bounded, wait_for, Output};

/// `ringrelay ARGS`, at most 30 s.
pub fn ringrelay_cmd(args: &[&std::ffi::OsStr]) -> Output {
    run_bounded(
        Command::new(env!("CARGO_BIN_EXE_ringrelay"))
            .args(args)
            .env("RUST_LOG", "warn"),
        Duration::from_secs(30),
    )
}

/// `ringrelay queue ARGS --spool SPOOL`.
pub fn queue(spool: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&std::ffi::OsStr> = vec!["queue".as_ref()];
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    all.push("--spool".as_ref());
    all.push(spool.as_os_str());
    ringrelay_cmd(&all)
}

/// `queue ARGS --json`, which must succeed with JSON on stdout.
#[track_caller]
fn queue_json(spool: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = queue(spool, &a);
    assert_eq!(out.code, Some(0), "ringrelay queue {a:?}: {out:?}");
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("ringrelay queue {a:?}: not JSON ({e}): {out:?}"))
}

/// `ringrelay queue stats --json`.
#[track_caller]
pub fn queue_stats(spool: &Path) -> serde_json::Value {
    queue_json(spool, &["stats"])
}

/// `ringrelay queue list --json`: one object per message.
#[track_caller]
pub fn queue_list(spool: &Path) -> Vec<serde_json::Value> {
    match queue_json(spool, &["list"]) {
        serde_json::Value::Array(a) => a,
        other => panic!("queue list --json is not an array: {other:#}"),
    }
}

/// The `id`s of `queue list --json`.
#[track_caller]
pub fn queue_ids(spool: &Path) -> std::collections::BTreeSet<String> {
    queue_list(spool)
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_string())
        .collect()
}

/// Waits until `queue stats` shows no message; returns the stats.
#[track_caller]
pub fn wait_queue_empty(spool: &Path, limit: Duration) -> serde_json::Value {
    try_wait_queue_empty(spool, limit)
        .unwrap_or_else(|last| panic!("the queue did not drain within {limit:?}:\n{last}"))
}

/// Waits until `queue stats` shows no message; `Err` (the last stats and list) after
/// `limit`.
pub fn try_wait_queue_empty(spool: &Path, limit: Duration) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + limit;
    loop {
        let stats = queue_stats(spool);
        if jnum(&stats, "messages") == 0 {
            return Ok(stats);
        }
        if Instant::now() > deadline {
            let list = queue_list(spool);
            let shown: Vec<_> = list.iter().take(10).collect();
            return Err(format!("{stats:#}\nfirst of {}: {shown:#?}", list.len()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `seg-*` files in a spool.
pub fn segment_files(spool: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(spool)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("seg-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits until the spool holds no segment file.
#[track_caller]
pub fn wait_no_segments(spool: &Path, limit: Duration) {
    wait_for(limit, "the spool's segment files to be deleted", || {
        let segs = segment_files(spool);
        if segs.is_empty() {
            Ok(())
        } else {
            Err(format!("{segs:?}"))
        }
    })
}

/// A message `loadgen sink` verifies: `X-Loadgen-Id: RUN-SEQ` and the body's CRC-32C in
/// `X-Loadgen-Checksum`, with `extra_headers` (CRLF-terminated lines) and some lines that
/// start with a dot. Returns the loadgen ID and the unstuffed content (CRLF at the end).
pub fn verifiable_message(
    run: &str,
    seq: u64,
    extra_headers: &str,
    body_bytes: usize,
) -> (String, Vec<u8>) {
    let id = format!("{run}-{seq}");
    let mut body = format!("{id}\r\n.a line that starts with a dot\r\n.\r\n");
    let mut n = 0;
    while body.len() < body_bytes {
        body.push_str(&format!(
            "line {n} of the body of {id}, some filler text to make it longer\r\n"
        ));
        n += 1;
    }
    let sum = crc32c::crc32c(body.as_bytes());
    let data = format!(
        "From: <sender@client.test>\r\nTo: <rcpt@example.test>\r\n{extra_headers}\
         X-Loadgen-Id: {id}\r\nX-Loadgen-Checksum: {sum:08x}\r\n\r\n{body}"
    );
    (id, data.into_bytes())
}

/// Writes a complete loadgen manifest of `ids` for `sink --check-manifest`.
pub fn write_manifest(path: &Path, run: &str, ids: &[String]) {
    let mut text = format!("# loadgen manifest v1 run={run}\n");
    for id in ids {
        text.push_str(id);
        text.push('\n');
    }
    text.push_str(&format!("# end accepted={}\n", ids.len()));
    std::fs::write(path, text).expect("write manifest");
}

/// The values of every `Name: value` line (case-insensitive name, value trimmed) anywhere
/// in `text`: e.g. `Status` or `Final-Recipient` of a bounce's delivery-status part.
pub fn dsn_values(text: &str, name: &str) -> Vec<String> {
    text.split("\r\n")
        .filter_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
        .collect()
}
