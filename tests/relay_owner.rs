//! One owner per spool, on both I/O drivers: while a relay runs on a spool, a second
//! `ringrelay serve` on it exits 1 at once with one line naming the spool and "in use",
//! without listening and without disturbing the first (which still takes mail and still
//! owns the lock file). Once the first has stopped, a new server gets the spool.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

io_tests!(second_server_on_a_spool_refuses);

fn second_server_on_a_spool_refuses(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let config = work.path().join("ringrelay.toml");
    std::fs::write(&config, common::config("")).unwrap();
    let hop = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let opts = Opts::relay(io, &spool, &[("example.test", hop)], &[1], "");
    let mut first = Relay::start_with(opts.clone());
    let pid_before = std::fs::read_to_string(spool.join("lock")).unwrap();
    assert_eq!(
        pid_before.trim(),
        first.pid().to_string(),
        "the lock file names the owner"
    );

    // The lock must hold for the server's whole life, not only while it starts.
    std::thread::sleep(Duration::from_millis(1000));
    let stats = queue_stats(&spool);
    assert_eq!(
        stats["running"],
        true,
        "1 s after start, `queue stats` finds the spool lock free although the relay (pid {}) \
         runs: the lock was let go after start-up; {stats:#}",
        first.pid()
    );
    let second_addr = format!("127.0.0.1:{}", free_port());
    let t0 = Instant::now();
    let out = try_run_bounded(
        Command::new(env!("CARGO_BIN_EXE_ringrelay"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", &second_addr, "--shards", "1", "--io", io])
            .arg("--spool")
            .arg(&spool)
            .args(["--route", &format!("example.test={hop}")])
            .env_remove("RUST_LOG"),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|out| {
        panic!(
            "a second `ringrelay serve` on a spool in use (first server pid {}) was still running \
             after 5 s; it must refuse at once. Lock file: {:?}; queue stats says running={}; \
             second server's stderr:\n{}",
            first.pid(),
            std::fs::read_to_string(spool.join("lock")).unwrap_or_default(),
            queue_stats(&spool)["running"],
            out.stderr
        )
    });
    let took = t0.elapsed();
    assert_eq!(
        out.code,
        Some(1),
        "second server on the same spool: {out:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?} to refuse");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let spool_str = spool.display().to_string();
    assert!(
        lines.len() == 1 && lines[0].contains("in use") && lines[0].contains(&spool_str),
        "expected one line naming {spool_str} and \"in use\"; stderr:\n{}",
        out.stderr
    );
    assert!(
        std::net::TcpStream::connect(&second_addr).is_err(),
        "the refused server must not have listened"
    );

    // The first is undisturbed.
    assert_eq!(
        std::fs::read_to_string(spool.join("lock")).unwrap(),
        pid_before
    );
    let (_, data) = verifiable_message("0000000000000e1e", 0, "", 100);
    send_one(
        first.addr,
        "sender@client.test",
        &["rcpt@example.test"],
        &data,
    )
    .queued_id();
    let stats = queue_stats(&spool);
    assert_eq!(jnum(&stats, "messages"), 1, "{stats:#}");
    assert_eq!(stats["running"], true, "{stats:#}");

    // Stopped, the spool is free for the next server.
    first.terminate();
    assert_eq!(queue_stats(&spool)["running"], false);
    let mut next = Relay::start_with(opts);
    next.terminate();
}
