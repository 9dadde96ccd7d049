//! Disk full, on both I/O drivers: the spool is a 2 MiB tmpfs (mounted here; the test is
//! skipped with a note when it cannot mount, e.g. not root), and the next hop is down, so
//! nothing leaves the spool.
//!
//! Messages of about 60 KiB go in until the relay answers `451 4.3.0`. Then: the server
//! keeps serving (the open session and a new one: 220, NOOP 250); every message that got
//! `250 … queued as ID` is in `queue list` (same IDs, nothing else); when the next hop
//! comes up, every acknowledged message arrives intact and once; and once the spool has
//! drained, the relay accepts mail again.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

io_tests!(full_spool_answers_451_and_loses_nothing);

/// A tmpfs mounted on a temporary directory; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = run_bounded(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path()),
            Duration::from_secs(10),
        );
        if out.code != Some(0) {
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            eprintln!(
                "note: SKIPPING the disk-full test: cannot mount a tmpfs (euid {euid}{}): {}",
                if euid != 0 { ", not root" } else { "" },
                out.stderr.trim()
            );
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

const RUN: &str = "00000000d15cf011";

fn full_spool_answers_451_and_loses_nothing(io: &str) {
    let Some(fs) = Tmpfs::mount("2m") else {
        return;
    };
    let spool: PathBuf = fs.path().join("spool");
    let work = tempfile::tempdir().unwrap();
    let manifest = work.path().join("manifest");
    let port = free_port();
    let hop = format!("127.0.0.1:{port}").parse().unwrap();
    let mut opts = Opts::relay(io, &spool, &[("example.test", hop)], &[1], "");
    // This test is about a write that fails: keep the free-space backpressure (which
    // would refuse MAIL on a 2 MB file system long before) out of its way.
    opts.config.push_str("[spool]\nmin_free_bytes = 0\n");
    let mut relay = Relay::start_with(opts);

    let mut c = relay.connect();
    c.expect("EHLO client.test", 250, HOST);
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut refusals = Vec::new();
    for seq in 0..200 {
        let (lid, data) = verifiable_message(RUN, seq, "Subject: disk full\r\n", 60 * 1024);
        let r = c.transaction("sender@client.test", &["rcpt@example.test"], &data);
        if r.is_queued() {
            acked.push((r.queued_id(), lid));
        } else {
            r.assert(451, "4.3.0");
            refusals.push(r.wire());
            if refusals.len() == 3 {
                break;
            }
        }
    }
    assert!(
        !refusals.is_empty(),
        "12 MB into a 2 MiB spool and never a 451; {} acknowledged",
        acked.len()
    );
    assert!(!acked.is_empty(), "nothing fitted: {refusals:?}");
    eprintln!(
        "disk full ({io}): {} acknowledged, then {:?}",
        acked.len(),
        refusals[0]
    );

    // Still serving: the open session and a new one.
    c.expect("NOOP", 250, "2.0.0");
    let mut c2 = relay.connect();
    c2.expect("EHLO client.test", 250, HOST);
    c2.expect("NOOP", 250, "2.0.0");

    // Everything acknowledged is in the queue, nothing else.
    let want: BTreeSet<String> = acked.iter().map(|(q, _)| q.clone()).collect();
    let listed = queue_ids(&spool);
    assert_eq!(
        listed,
        want,
        "queue list must hold exactly the acknowledged messages (missing: {:?}, extra: {:?})",
        want.difference(&listed).collect::<Vec<_>>(),
        listed.difference(&want).collect::<Vec<_>>()
    );

    // The next hop comes up: all of it leaves, and space returns.
    let mut sink = Sink::start_on(port, &["--check-manifest", manifest.to_str().unwrap()]);
    if let Err(last) = try_wait_queue_empty(&spool, Duration::from_secs(20)) {
        panic!(
            "the full spool did not drain: {last}\nrelay log:\n{}",
            relay.stderr()
        );
    }
    wait_no_segments(&spool, Duration::from_secs(5));
    let (lid, data) = verifiable_message(RUN, 1000, "Subject: after the disk full\r\n", 60 * 1024);
    let r = c2.transaction("sender@client.test", &["rcpt@example.test"], &data);
    assert!(
        r.is_queued(),
        "accepts again once the spool drained: {:?}",
        r.wire()
    );
    acked.push((r.queued_id(), lid));
    wait_queue_empty(&spool, Duration::from_secs(10));

    let ids: Vec<String> = acked.iter().map(|(_, l)| l.clone()).collect();
    write_manifest(&manifest, RUN, &ids);
    let (code, report) = sink.stop();
    assert_eq!(
        jnum(&report, "messages.unique"),
        acked.len() as u64,
        "{report:#}"
    );
    assert_eq!(jnum(&report, "messages.duplicates"), 0, "{report:#}");
    assert_eq!(jnum(&report, "messages.corrupted"), 0, "{report:#}");
    assert_eq!(jnum(&report, "manifest.lost"), 0, "{report:#}");
    assert_eq!(jnum(&report, "manifest.unexpected"), 0, "{report:#}");
    assert_eq!(code, Some(0), "{}", sink.output());
    c.expect("QUIT", 221, "2.0.0");
    c2.expect("QUIT", 221, "2.0.0");
    relay.terminate();
    drop(relay);
    drop(fs);
}
