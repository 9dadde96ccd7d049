//! Against `ringrelay serve --sink`, the workspace's own server: every message is accepted,
//! with and without pipelining. The binary must have been built into the same target dir
//! (`cargo build -p ringrelay`, or `cargo test --workspace`).

mod common;
use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// …/target/<profile>/deps/<test> → …/target/<profile>/ringrelay
fn ringrelay_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let p = profile_dir.join("ringrelay");
    assert!(
        p.is_file(),
        "ringrelay binary not found at {} — build it first: cargo build -p ringrelay",
        p.display()
    );
    p
}

struct Relay(std::process::Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn against_ringrelay_sink_mode() {
    let bin = ringrelay_bin();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut relay = Relay(
        Command::new(&bin)
            .args(["serve", "--sink", "--listen", &addr, "--shards", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ringrelay"),
    );
    if !wait_listening(&addr, Duration::from_secs(20)) {
        let st = relay.0.try_wait().ok().flatten();
        panic!("ringrelay did not start listening on {addr} (exit status {st:?})");
    }
    let dir = Scratch::new("ringrelay");
    let dj = dir.path("send.json");
    for pipelining in [false, true] {
        let mut args = vec![
            "--target",
            &addr,
            "--messages",
            "200",
            "--connections",
            "4",
            "--rcpts",
            "2",
            "--size",
            "1k-8k",
            "--json",
            dj.to_str().unwrap(),
        ];
        if pipelining {
            args.push("--pipelining");
        }
        let o = send(&args);
        assert!(
            o.status.success(),
            "send against ringrelay failed: {}",
            o.stderr
        );
        let d = read_json(&dj);
        assert_eq!(num(&d, "messages.accepted"), 200, "{d}");
        assert_eq!(num(&d, "reply_codes.250"), 200, "{d}");
        assert_eq!(num(&d, "messages.errors"), 0, "{d}");
        assert_eq!(
            num(&d, "connections.without_pipelining"),
            0,
            "ringrelay should advertise PIPELINING"
        );
    }
}
