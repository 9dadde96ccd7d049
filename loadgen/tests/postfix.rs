//! Against Postfix's tools: `loadgen send` into `smtp-sink`, and `smtp-source` into
//! `loadgen sink` (its messages carry no loadgen headers, so they count as foreign).
//! Each test skips, saying so, when the Postfix tool is not installed.

mod common;
use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    // Debian installs them in /usr/sbin, which is not on every PATH.
    dirs.push("/usr/sbin".into());
    dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn send_into_postfix_smtp_sink() {
    let Some(tool) = which("smtp-sink") else {
        eprintln!("SKIPPED: smtp-sink is not installed (apt-get install postfix)");
        return;
    };
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(tool);
    if is_root() {
        cmd.args(["-u", "nobody"]);
    }
    let _sink = Child(
        cmd.args([addr.as_str(), "100"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn smtp-sink"),
    );
    assert!(
        wait_listening(&addr, Duration::from_secs(10)),
        "smtp-sink did not start"
    );
    let dir = Scratch::new("smtp-sink");
    let dj = dir.path("send.json");
    for pipelining in [false, true] {
        let mut args = vec![
            "--target",
            &addr,
            "--messages",
            "300",
            "--connections",
            "5",
            "--rcpts",
            "3",
            "--size",
            "1k-10k",
            "--json",
            dj.to_str().unwrap(),
        ];
        if pipelining {
            args.push("--pipelining");
        }
        let o = send(&args);
        assert!(o.status.success(), "{}", o.stderr);
        let d = read_json(&dj);
        assert_eq!(num(&d, "messages.accepted"), 300, "{d}");
        assert_eq!(num(&d, "reply_codes.250"), 300);
        assert_eq!(num(&d, "recipients.accepted"), 900);
        assert_eq!(num(&d, "connections.without_pipelining"), 0);
    }
}

#[test]
fn postfix_smtp_source_into_loadgen_sink() {
    let Some(tool) = which("smtp-source") else {
        eprintln!("SKIPPED: smtp-source is not installed (apt-get install postfix)");
        return;
    };
    let dir = Scratch::new("smtp-source");
    let sj = dir.path("sink.json");
    let sink = Sink::start(&["--json", sj.to_str().unwrap()]);
    let o = run(
        Command::new(tool).args(["-d", "-s", "5", "-m", "200", "-l", "2048", &sink.target()]),
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "smtp-source failed: {}", o.stderr);
    let (st, _) = sink.stop();
    assert!(st.success());
    let s = read_json(&sj);
    assert_eq!(num(&s, "messages.received"), 200);
    assert_eq!(num(&s, "messages.foreign"), 200);
    assert_eq!(num(&s, "messages.unique"), 0);
    assert_eq!(num(&s, "messages.corrupted"), 0);
    assert_eq!(num(&s, "connections.accepted"), 5);
}
