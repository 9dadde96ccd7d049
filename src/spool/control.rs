//! `ringrelay queue flush|remove|hold|release` against a running server, and
//! `remove|hold|release` on a stopped spool.
//!
//! The protocol is files plus a signal, so it needs no listening socket: the command writes
//! `control/REQ.req` (`flush`, `remove ID`, `hold ID` or `release ID`), then sends SIGUSR1
//! to the PID in the spool's lock file. Every shard reads each request and answers in
//! `control/REQ.SHARD.done`; the command waits for all shards (their number is in
//! `control/shards`), prints the result and removes the files. On a stopped spool,
//! `remove`, `hold` and `release` take the lock themselves and append their records to the
//! message's segment (synced), where the next start finds them; `flush` there fails, as
//! Postfix's `postqueue -f` does with the mail system down: nothing runs to flush, and every
//! message not on hold is tried when the server starts.
//!
//! None of them creates a spool: a directory without a lock file is refused.

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
    /// Make every deferred message (not on hold) ready now, without moving it along the
    /// retry schedule.
    Flush,
    /// Take this message out of the queue and the spool.
    Remove(QueueId),
    /// Attempt this message no more until it is released.
    Hold(QueueId),
    /// Take this message off hold: ready now.
    Release(QueueId),
}

impl Request {
    fn parse(text: &str) -> Result<Request, String> {
        let id = |s: &str| s.parse::<QueueId>();
        match text.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["flush"] => Ok(Request::Flush),
            ["remove", s] => id(s).map(Request::Remove),
            ["hold", s] => id(s).map(Request::Hold),
            ["release", s] => id(s).map(Request::Release),
            _ => Err("unknown request".to_string()),
        }
    }
}

/// A shard's answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// This many messages made ready.
    Flushed(usize),
    /// The message was this shard's and is removed.
    Removed,
    /// The message is this shard's and now on hold (if an attempt is under way, from its
    /// end on).
    Held,
    /// The message is this shard's and was on hold already.
    AlreadyHeld,
    /// The message was this shard's and on hold; it is ready now.
    Released,
    /// The message is this shard's and was not on hold.
    NotHeld,
    /// The message is this shard's but being delivered right now (it cannot be removed).
    Delivering,
    /// Not this shard's (or finished).
    Absent,
}

impl Answer {
    /// The answer as written in a `.done` file.
    fn word(self) -> String {
        let word = match self {
            Answer::Flushed(n) => return format!("flushed {n}"),
            Answer::Removed => "removed",
            Answer::Held => "held",
            Answer::AlreadyHeld => "already-held",
            Answer::Released => "released",
            Answer::NotHeld => "not-held",
            Answer::Delivering => "delivering",
            Answer::Absent => "absent",
        };
        word.to_string()
    }

    /// Reads what [`Answer::word`] wrote.
    fn from_word(text: &str) -> Option<Answer> {
        Some(match text.trim() {
            "removed" => Answer::Removed,
            "held" => Answer::Held,
            "already-held" => Answer::AlreadyHeld,
            "released" => Answer::Released,
            "not-held" => Answer::NotHeld,
            "delivering" => Answer::Delivering,
            "absent" => Answer::Absent,
            other => Answer::Flushed(other.strip_prefix("flushed ")?.parse().ok()?),
        })
    }
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
        let answer = match Request::parse(&text).map(act) {
            Ok(answer) => answer.word(),
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
    /// The message is on hold now.
    Held,
    /// The message was on hold already (nothing changed).
    AlreadyHeld,
    /// The message was on hold and is released (ready now).
    Released,
    /// The message was not on hold (nothing changed).
    NotHeld,
    /// The message is being delivered right now and cannot be removed; try again.
    Delivering,
    /// No such message waits in the queue (maybe it is done).
    Absent,
    /// No server runs on the spool: nothing to flush (every message not on hold is tried
    /// when it starts).
    NotRunning,
}

/// An operator's action on one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Remove,
    Hold,
    Release,
}

/// `ringrelay queue flush`: only a running server can flush.
pub fn flush(spool: &Path) -> io::Result<Outcome> {
    super::require_existing(spool)?;
    if !lock::is_locked(spool) {
        return Ok(Outcome::NotRunning);
    }
    let answers = ask(spool, "flush")?;
    let total = answers
        .iter()
        .filter_map(|a| match Answer::from_word(a) {
            Some(Answer::Flushed(n)) => Some(n),
            _ => None,
        })
        .sum();
    Ok(Outcome::Flushed(total))
}

/// `ringrelay queue remove ID`.
pub fn remove(spool: &Path, id: QueueId) -> io::Result<Outcome> {
    on_message(spool, id, Action::Remove)
}

/// `ringrelay queue hold ID`.
pub fn hold(spool: &Path, id: QueueId) -> io::Result<Outcome> {
    on_message(spool, id, Action::Hold)
}

/// `ringrelay queue release ID`.
pub fn release(spool: &Path, id: QueueId) -> io::Result<Outcome> {
    on_message(spool, id, Action::Release)
}

/// Asks the running server to act on message `id`, or acts on the stopped spool itself.
fn on_message(spool: &Path, id: QueueId, action: Action) -> io::Result<Outcome> {
    super::require_existing(spool)?;
    if !lock::is_locked(spool) {
        // Stopped: take the lock so no server starts meanwhile (one that started since we
        // looked holds it: then ask that one).
        match SpoolLock::acquire(spool) {
            Ok(lock) => return on_stopped_spool(spool, id, action, lock),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let verb = match action {
        Action::Remove => "remove",
        Action::Hold => "hold",
        Action::Release => "release",
    };
    let answers = ask(spool, &format!("{verb} {id}"))?;
    if let Some(err) = answers.iter().find_map(|a| a.strip_prefix("error ")) {
        return Err(io::Error::other(format!(
            "the server could not {verb} {id}: {}",
            err.trim()
        )));
    }
    // At most one shard has the message; the others answer `absent`.
    let found = answers
        .iter()
        .filter_map(|a| Answer::from_word(a))
        .find(|a| *a != Answer::Absent);
    Ok(match found {
        Some(Answer::Removed) => Outcome::Removed,
        Some(Answer::Held) => Outcome::Held,
        Some(Answer::AlreadyHeld) => Outcome::AlreadyHeld,
        Some(Answer::Released) => Outcome::Released,
        Some(Answer::NotHeld) => Outcome::NotHeld,
        Some(Answer::Delivering) => Outcome::Delivering,
        Some(Answer::Flushed(_) | Answer::Absent) | None => Outcome::Absent,
    })
}

/// Acts on a stopped spool (its lock held): appends the records to the message's segment
/// and syncs it.
fn on_stopped_spool(
    spool: &Path,
    id: QueueId,
    action: Action,
    _lock: SpoolLock,
) -> io::Result<Outcome> {
    let report = segment::recover(spool, false)?;
    let Some(found) = report.messages.into_iter().find(|m| m.message.id == id) else {
        return Ok(Outcome::Absent);
    };
    match action {
        Action::Hold if found.state.held => return Ok(Outcome::AlreadyHeld),
        Action::Release if !found.state.held => return Ok(Outcome::NotHeld),
        _ => {}
    }
    let seg = report
        .segments
        .iter()
        .find(|s| s.id == found.location.segment)
        .copied()
        .ok_or_else(|| io::Error::other("segment of the message vanished"))?;
    let mut store = ShardStore::new(spool, found.location.segment.shard, vec![seg], 0)?;
    let outcome = match action {
        Action::Remove => {
            for &i in &found.pending {
                store.record_recipient(&found.location, id, i, RcptOutcome::Removed)?;
            }
            store.finish_message(&found.location, id, true)?;
            Outcome::Removed
        }
        Action::Hold => {
            store.record_hold(&found.location, id, true)?;
            Outcome::Held
        }
        Action::Release => {
            store.record_hold(&found.location, id, false)?;
            Outcome::Released
        }
    };
    store.sync_all_open()?;
    Ok(outcome)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdGenerator;
    use crate::smtp::{Mailbox, ReversePath};
    use crate::spool::record::MessageRecord;

    #[test]
    fn requests_and_answers_read_back_as_written() {
        let id = IdGenerator::starting_at(0, 1).next_id();
        for (text, want) in [
            ("flush".to_string(), Request::Flush),
            (format!("remove {id}"), Request::Remove(id)),
            (format!("hold {id}\n"), Request::Hold(id)),
            (format!("release {id}"), Request::Release(id)),
        ] {
            assert_eq!(Request::parse(&text), Ok(want));
        }
        assert!(Request::parse("hold").is_err());
        assert!(Request::parse("hold nonsense").is_err());
        assert!(Request::parse("defer").is_err());
        for answer in [
            Answer::Flushed(7),
            Answer::Removed,
            Answer::Held,
            Answer::AlreadyHeld,
            Answer::Released,
            Answer::NotHeld,
            Answer::Delivering,
            Answer::Absent,
        ] {
            assert_eq!(Answer::from_word(&answer.word()), Some(answer));
        }
        assert_eq!(Answer::from_word("error unknown request"), None);
    }

    /// A spool a server has used and left: a lock file, and one segment with `n`
    /// one-recipient messages.
    fn stopped_spool(dir: &Path, n: usize) -> Vec<QueueId> {
        drop(SpoolLock::acquire(dir).unwrap());
        let mut store = ShardStore::new(dir, 0, Vec::new(), 0).unwrap();
        let mut ids = IdGenerator::starting_at(0, 5);
        let from = ReversePath::Null;
        let rcpts = [Mailbox::parse("r@example.net").unwrap()];
        let out = (0..n)
            .map(|_| {
                let id = ids.next_id();
                store
                    .append_message(&MessageRecord {
                        id,
                        arrival: std::time::UNIX_EPOCH,
                        from: &from,
                        rcpts: &rcpts,
                        eight_bit: false,
                        smtputf8: false,
                        dsn: None,
                        data: b"x\r\n",
                    })
                    .unwrap();
                id
            })
            .collect();
        store.take_sync_targets().sync().unwrap();
        out
    }

    fn held(dir: &Path, id: QueueId) -> Option<bool> {
        let report = segment::recover(dir, false).unwrap();
        let m = report.messages.iter().find(|m| m.message.id == id)?;
        Some(m.state.held)
    }

    #[test]
    fn hold_release_and_remove_on_a_stopped_spool() {
        let dir = tempfile::tempdir().unwrap();
        let ids = stopped_spool(dir.path(), 2);
        let (a, b) = (ids[0], ids[1]);
        assert_eq!(held(dir.path(), a), Some(false));
        assert_eq!(hold(dir.path(), a).unwrap(), Outcome::Held);
        assert_eq!(hold(dir.path(), a).unwrap(), Outcome::AlreadyHeld);
        assert_eq!(held(dir.path(), a), Some(true));
        assert_eq!(release(dir.path(), b).unwrap(), Outcome::NotHeld);
        assert_eq!(release(dir.path(), a).unwrap(), Outcome::Released);
        assert_eq!(held(dir.path(), a), Some(false));
        assert_eq!(remove(dir.path(), a).unwrap(), Outcome::Removed);
        assert_eq!(held(dir.path(), a), None, "removed");
        assert_eq!(hold(dir.path(), a).unwrap(), Outcome::Absent);
        assert_eq!(held(dir.path(), b), Some(false), "b untouched");
        assert_eq!(flush(dir.path()).unwrap(), Outcome::NotRunning);
        assert!(!lock::is_locked(dir.path()), "the lock is let go");
    }

    #[test]
    fn no_command_creates_a_spool() {
        let dir = tempfile::tempdir().unwrap();
        let id = IdGenerator::starting_at(0, 1).next_id();
        let missing = dir.path().join("spool");
        let bare = dir.path().join("bare");
        fs::create_dir(&bare).unwrap();
        for spool in [&missing, &bare] {
            for result in [
                flush(spool),
                remove(spool, id),
                hold(spool, id),
                release(spool, id),
            ] {
                let err = result.unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::NotFound);
                assert!(
                    err.to_string()
                        .starts_with(&format!("spool {} does not exist", spool.display())),
                    "{err}"
                );
            }
        }
        assert!(!missing.exists());
        assert_eq!(fs::read_dir(&bare).unwrap().count(), 0);
    }
}
