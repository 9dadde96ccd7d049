//! `ringrelay queue flush|remove` against a running server, and `remove` on a stopped
//! spool.
//!
//! The protocol is files plus a signal, so it needs no listening socket: the command writes
//! `control/REQ.req` (`flush`, or `remove ID`), then sends SIGUSR1 to the PID in the spool's
//! lock file. Every shard reads each request and answers in `control/REQ.SHARD.done`; the
//! command waits for all shards (their number is in `control/shards`), prints the result
//! and removes the files. On a stopped spool, `remove` takes the lock itself and appends the
//! "finished" record to the message's segment.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::lock::{self, SpoolLock};
use super::record::RcptOutcome;
use super::segment::{self, ShardStore};
use crate::id::QueueId;

fn control_dir(spool: &Path) -> PathBuf {
    spool.join("control")
}

/// Makes the control directory and records how many shards will answer. Called at start.
pub(crate) fn prepare_shards(spool: &Path, shards: usize) -> io::Result<()> {
    let dir = control_dir(spool);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("shards"), format!("{shards}\n"))
}

/// A request to a running server's shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Make every deferred message ready now.
    Flush,
    /// Take this message out of the queue and the spool.
    Remove(QueueId),
}

/// A shard's answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// This many messages made ready.
    Flushed(usize),
    /// The message was this shard's and is removed.
    Removed,
    /// Not this shard's (or not waiting).
    Absent,
}

/// A shard's side: whenever SIGUSR1 arrives, reads the requests in `spool`'s control
/// directory and answers each with what `act` did.
pub(crate) async fn watch(spool: PathBuf, shard: usize, act: impl Fn(Request) -> Answer) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        tracing::warn!(
            shard,
            "cannot listen for SIGUSR1: queue flush/remove will not reach this server"
        );
        return;
    };
    while usr1.recv().await.is_some() {
        answer_requests(&spool, shard, &act);
    }
}

fn answer_requests(spool: &Path, shard: usize, act: &impl Fn(Request) -> Answer) {
    let dir = control_dir(spool);
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(req) = name.strip_suffix(".req") else {
            continue;
        };
        let done = dir.join(format!("{req}.{shard}.done"));
        if done.exists() {
            continue;
        }
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let request = match text.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["flush"] => Ok(Request::Flush),
            ["remove", id] => id.parse::<QueueId>().map(Request::Remove),
            _ => Err("unknown request".to_string()),
        };
        let answer = match request.map(act) {
            Ok(Answer::Flushed(n)) => format!("flushed {n}"),
            Ok(Answer::Removed) => "removed".to_string(),
            Ok(Answer::Absent) => "absent".to_string(),
            Err(e) => format!("error {e}"),
        };
        if let Err(e) = fs::write(&done, answer) {
            tracing::warn!("cannot answer control request {name}: {e}");
        }
    }
}

/// What a queue command achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A running server made this many deferred messages ready.
    Flushed(usize),
    /// The message was removed.
    Removed,
    /// No such message waits in the queue (maybe it is being delivered right now, or done).
    Absent,
    /// The spool is not in use: nothing to flush (every message is tried at start).
    NotRunning,
}

/// `ringrelay queue flush`.
pub fn flush(spool: &Path) -> io::Result<Outcome> {
    if !lock::is_locked(spool) {
        return Ok(Outcome::NotRunning);
    }
    let answers = ask(spool, "flush")?;
    let total = answers
        .iter()
        .filter_map(|a| a.strip_prefix("flushed ")?.trim().parse::<usize>().ok())
        .sum();
    Ok(Outcome::Flushed(total))
}

/// `ringrelay queue remove ID`.
pub fn remove(spool: &Path, id: QueueId) -> io::Result<Outcome> {
    if lock::is_locked(spool) {
        let answers = ask(spool, &format!("remove {id}"))?;
        if let Some(err) = answers.iter().find_map(|a| a.strip_prefix("error ")) {
            return Err(io::Error::other(err.to_string()));
        }
        return Ok(if answers.iter().any(|a| a == "removed") {
            Outcome::Removed
        } else {
            Outcome::Absent
        });
    }
    // Stopped: take the lock so no server starts meanwhile, then record it finished.
    let _lock = SpoolLock::acquire(spool)?;
    let report = segment::recover(spool, false)?;
    let Some(found) = report.messages.into_iter().find(|m| m.message.id == id) else {
        return Ok(Outcome::Absent);
    };
    let seg = report
        .segments
        .iter()
        .find(|s| s.id == found.location.segment)
        .copied()
        .ok_or_else(|| io::Error::other("segment of the message vanished"))?;
    let mut store = ShardStore::new(spool, found.location.segment.shard, vec![seg], 0)?;
    for &i in &found.pending {
        store.record_recipient(&found.location, id, i, RcptOutcome::Removed)?;
    }
    store.finish_message(&found.location, id, true)?;
    store.sync_all_open()?;
    Ok(Outcome::Removed)
}

/// Sends a request to the running server and collects one answer per shard.
fn ask(spool: &Path, request: &str) -> io::Result<Vec<String>> {
    let dir = control_dir(spool);
    let shards: usize = fs::read_to_string(dir.join("shards"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1);
    let pid = lock::owner_pid(spool).ok_or_else(|| {
        io::Error::other("the spool is locked but its lock file names no process")
    })?;
    let name = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let req = dir.join(format!("{name}.req"));
    fs::write(&req, request)?;
    let cleanup = |dir: &Path| {
        let _ = fs::remove_file(&req);
        for s in 0..shards {
            let _ = fs::remove_file(dir.join(format!("{name}.{s}.done")));
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answers = Vec::new();
    while Instant::now() < deadline {
        signal_usr1(pid)?;
        std::thread::sleep(Duration::from_millis(100));
        answers = (0..shards)
            .filter_map(|s| fs::read_to_string(dir.join(format!("{name}.{s}.done"))).ok())
            .collect();
        if answers.len() == shards {
            cleanup(&dir);
            return Ok(answers);
        }
    }
    cleanup(&dir);
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the server (pid {pid}) answered {} of {shards} shard(s) within 10 s",
            answers.len()
        ),
    ))
}

fn signal_usr1(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("bad pid in lock file"))?;
    // SAFETY: kill(2) with a plain pid and signal number has no memory-safety concerns.
    let rc = unsafe { libc::kill(pid, libc::SIGUSR1) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
