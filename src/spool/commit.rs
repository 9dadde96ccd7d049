//! Group commit: one `fdatasync` covers every message appended since the previous one.
//!
//! Sessions append their message to the shard's store, then wait here. A committer task
//! takes everything waiting, syncs the files those appends touched (off the event loop, on
//! tokio's blocking pool), and only then releases the waiters, whose `250` follows. While a
//! sync runs, new messages gather for the next one, so the batch grows with the load: one
//! message per sync when idle (lowest latency), many under load (highest throughput).
//!
//! # The commit window
//!
//! On top of that natural batching, a sync may be held open for a short *window* so that
//! messages about to arrive join it, in the spirit of PostgreSQL's `commit_delay` and
//! `commit_siblings`. [`Window`] decides its length from two running averages (EWMAs)
//! that every sync updates: messages per sync, and how long the `fdatasync`s themselves
//! took.
//!
//! - Light load: while recent syncs averaged fewer than [`BUSY_BATCH`] messages, the window
//!   is zero and a sync starts as soon as a message waits. One lone message never waits.
//! - Heavier load: the window is a share of the average sync time that grows with the
//!   average batch `b`: `sync × MAX_SHARE × (1 − 1/b)`. So it never exceeds half a sync
//!   (a message held back costs at most half of what the sync it joins costs), and it is
//!   never longer than [`MAX_WINDOW`] on a slow disk.
//! - When the load drops, batches shrink and the averages fall back below
//!   [`BUSY_BATCH`] within a few syncs, and the window closes again.
//!
//! The window is slept on the blocking pool, not with tokio's timer: the timer counts in
//! whole milliseconds, several times a typical window here.
//!
//! **The window is off by default.** Measured on a 2-vCPU VM (benches/group_commit.sh), it raised
//! messages per sync about 1.5× but not throughput, and near saturation, where the CPU and
//! not the disk is the bound, it added latency. The natural batching above already sizes
//! the batch to the load (1.1 messages per sync at 1,000 msgs/s, 5.8 at 11,000). The window
//! is for disks whose syncs, not the CPU, bound the relay: `RINGRELAY_COMMIT_WINDOW=on`.
//!
//! A/B switches: `RINGRELAY_GROUP_COMMIT=off` syncs every message on its own, one after the
//! other (no batching, no window), through the same loop and with the same failure handling;
//! `RINGRELAY_COMMIT_WINDOW=on` adds the adaptive window.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::segment::ShardStore;
use crate::observe::metrics::ShardMetrics;

/// Counters of the committer (for logs and the benches).
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitStats {
    /// Syncs done.
    pub syncs: u64,
    /// Messages made durable.
    pub messages: u64,
    /// Syncs that failed.
    pub failures: u64,
    /// Time spent in `fdatasync` (and the directory's `fsync`), in all.
    pub synced: Duration,
    /// Syncs that were held open for a window first.
    pub windows: u64,
    /// Time spent in those windows, in all.
    pub waited: Duration,
}

/// Below this average of messages per sync the load is light: no window.
pub const BUSY_BATCH: f64 = 1.5;
/// The window's largest share of the average sync time.
pub const MAX_SHARE: f64 = 0.5;
/// The window is never longer than this.
pub const MAX_WINDOW: Duration = Duration::from_millis(2);
/// Weight of the newest sync in the running averages.
const WEIGHT: f64 = 0.25;

/// The commit window's policy (see the module doc): pure, so its decisions can be tested
/// without a clock or a disk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Running average of messages per sync.
    batch: f64,
    /// Running average of a sync's duration, in seconds.
    sync: f64,
}

impl Default for Window {
    fn default() -> Self {
        Window::new()
    }
}

impl Window {
    /// No history yet: light load.
    pub fn new() -> Self {
        Window {
            batch: 1.0,
            sync: 0.0,
        }
    }

    /// How long to hold the next sync open before taking what waits.
    pub fn next(&self) -> Duration {
        if self.batch < BUSY_BATCH {
            return Duration::ZERO;
        }
        let share = MAX_SHARE * (1.0 - 1.0 / self.batch);
        Duration::from_secs_f64(self.sync * share).min(MAX_WINDOW)
    }

    /// Takes one sync into account: it covered `messages` and took `took`.
    pub fn observe(&mut self, messages: usize, took: Duration) {
        let ewma = |old: f64, new: f64| old + WEIGHT * (new - old);
        self.batch = ewma(self.batch, messages as f64);
        self.sync = if self.sync == 0.0 {
            took.as_secs_f64()
        } else {
            ewma(self.sync, took.as_secs_f64())
        };
    }

    /// Running average of messages per sync.
    #[cfg(test)]
    pub fn batch(&self) -> f64 {
        self.batch
    }
}

/// The shard's committer handle.
pub struct GroupCommit {
    store: Rc<RefCell<ShardStore>>,
    waiting: RefCell<VecDeque<oneshot::Sender<Result<(), String>>>>,
    wake: Notify,
    /// Serve one waiter per sync (the A/B switch `RINGRELAY_GROUP_COMMIT=off`). Syncs stay
    /// serial, so a message is never acknowledged before a directory `fsync` another
    /// message's sync started, and a failed sync fails every message it may have lost.
    one_by_one: bool,
    /// Hold syncs open for the adaptive window (`RINGRELAY_COMMIT_WINDOW=on`).
    windowed: bool,
    stats: Cell<CommitStats>,
    /// The shard's counters (sync latency, batch sizes), when it has any.
    metrics: Option<Arc<ShardMetrics>>,
}

impl GroupCommit {
    /// A committer for `store`; run [`GroupCommit::run`] in a task of the same shard.
    /// `one_by_one` and `windowed` are the benches' A/B switches ([`crate::config::AbSwitches`]).
    pub fn new(store: Rc<RefCell<ShardStore>>, one_by_one: bool, windowed: bool) -> Rc<Self> {
        Rc::new(GroupCommit {
            store,
            waiting: RefCell::new(VecDeque::new()),
            wake: Notify::new(),
            one_by_one,
            windowed,
            stats: Cell::new(CommitStats::default()),
            metrics: None,
        })
    }

    /// The same, counting its syncs into `metrics`.
    pub fn with_metrics(
        store: Rc<RefCell<ShardStore>>,
        one_by_one: bool,
        windowed: bool,
        metrics: Arc<ShardMetrics>,
    ) -> Rc<Self> {
        let mut commit = Self::new(store, one_by_one, windowed);
        if let Some(c) = Rc::get_mut(&mut commit) {
            c.metrics = Some(metrics);
        }
        commit
    }

    /// Waits until everything appended so far is durable. Call right after appending.
    pub async fn durable(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().push_back(tx);
        self.wake.notify_one();
        rx.await
            .unwrap_or_else(|_| Err("the committer stopped".into()))
    }

    /// The committer loop.
    pub async fn run(self: Rc<Self>) {
        let mut window = Window::new();
        loop {
            if self.waiting.borrow().is_empty() {
                self.wake.notified().await;
                continue;
            }
            let hold = if self.windowed && !self.one_by_one {
                window.next()
            } else {
                Duration::ZERO
            };
            if !hold.is_zero() {
                let started = Instant::now();
                let _ = tokio::task::spawn_blocking(move || std::thread::sleep(hold)).await;
                self.count_window(started.elapsed());
            }
            let mut waiters: VecDeque<_> = if self.one_by_one {
                // The oldest waiter alone; what the others appended meanwhile is synced
                // too (the sync covers whole files), but they are answered by syncs of
                // their own.
                self.waiting.borrow_mut().pop_front().into_iter().collect()
            } else {
                std::mem::take(&mut *self.waiting.borrow_mut())
            };
            let mut targets = self.store.borrow_mut().take_sync_targets();
            if self.one_by_one && targets.files.is_empty() {
                // An earlier sync already covered this message; the mode promises one
                // fdatasync per message, so it pays for one anyway.
                targets.files.extend(self.store.borrow().current_file());
            }
            let (result, took) = sync_off_thread(targets).await;
            // Zero exactly when there was nothing to sync: no sample for the window.
            if !took.is_zero() {
                window.observe(waiters.len(), took);
            }
            if result.is_err() {
                // Nothing about the current segment is certain after a failed sync.
                self.store.borrow_mut().abandon_current();
                // Messages appended while the failed sync ran went to the same files, and
                // their pages may have been in the failed write-back. Linux reports such an
                // error once per file, so the next sync of those files could succeed
                // without their data on disk: they fail with this batch (their clients get
                // a temporary failure and retry) rather than be acknowledged unsafely.
                waiters.extend(std::mem::take(&mut *self.waiting.borrow_mut()));
            }
            self.count(waiters.len() as u64, result.is_err(), took);
            if !took.is_zero() {
                if let Some(m) = &self.metrics {
                    m.spool_sync_duration.observe(took.as_secs_f64());
                    m.commit_batch.observe(waiters.len() as f64);
                }
            }
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> CommitStats {
        self.stats.get()
    }

    fn count(&self, messages: u64, failed: bool, took: Duration) {
        let mut s = self.stats.get();
        s.syncs += 1;
        s.synced += took;
        s.messages += messages;
        s.failures += u64::from(failed);
        self.stats.set(s);
    }

    fn count_window(&self, waited: Duration) {
        let mut s = self.stats.get();
        s.windows += 1;
        s.waited += waited;
        self.stats.set(s);
    }
}

/// Syncs `targets` on the blocking pool; also returns how long the syncs themselves took
/// (timed on that thread, so a busy shard thread does not inflate it).
async fn sync_off_thread(targets: super::segment::SyncTargets) -> (Result<(), String>, Duration) {
    if targets.is_empty() {
        return (Ok(()), Duration::ZERO);
    }
    let synced = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let result = targets.sync();
        (result, started.elapsed())
    });
    match synced.await {
        Ok((Ok(()), took)) => (Ok(()), took),
        Ok((Err(e), took)) => (Err(describe(&e)), took),
        Err(e) => (Err(format!("sync task failed: {e}")), Duration::ZERO),
    }
}

fn describe(e: &io::Error) -> String {
    format!("spool sync failed: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::UNIX_EPOCH;

    use crate::id::IdGenerator;
    use crate::smtp::{Mailbox, ReversePath};
    use crate::spool::record::MessageRecord;

    /// fsyncgate: a message appended while a sync is failing must not be acknowledged by
    /// the next sync of the same file, which Linux would report as a success.
    #[test]
    fn a_message_appended_during_a_failed_sync_fails_too() {
        appended_during_a_failed_sync(false);
    }

    /// The same with one sync per message (`RINGRELAY_GROUP_COMMIT=off`), which once synced
    /// each call on its own, concurrently and with no failure handling.
    #[test]
    fn one_sync_per_message_fails_them_alike() {
        appended_during_a_failed_sync(true);
    }

    fn appended_during_a_failed_sync(one_by_one: bool) {
        let tmp = tempfile::tempdir().unwrap();
        let spool = tmp.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        let store = Rc::new(RefCell::new(
            ShardStore::new(&spool, 0, Vec::new(), 0).unwrap(),
        ));
        let commit = GroupCommit::new(Rc::clone(&store), one_by_one, false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        let (a, b) = local.block_on(&rt, async move {
            tokio::task::spawn_local(Rc::clone(&commit).run());
            let mut ids = IdGenerator::starting_at(0, 1);
            let rcpt = [Mailbox::parse("r@example.org").unwrap()];
            let mut append = {
                let store = Rc::clone(&store);
                move || {
                    store
                        .borrow_mut()
                        .append_message(&MessageRecord {
                            id: ids.next_id(),
                            arrival: UNIX_EPOCH,
                            from: &ReversePath::Null,
                            rcpts: &rcpt,
                            eight_bit: false,
                            smtputf8: false,
                            dsn: None,
                            data: b"x\r\n",
                        })
                        .unwrap();
                }
            };
            // A's segment is new, so its sync includes the spool directory: removing the
            // directory makes that sync fail (the segment file stays open and writable).
            append();
            std::fs::remove_dir_all(&spool).unwrap();
            let first = tokio::task::spawn_local({
                let commit = Rc::clone(&commit);
                async move { commit.durable().await }
            });
            // Let the committer take A and start its (failing) sync, then append B.
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            append();
            let b = commit.durable().await;
            (first.await.unwrap(), b)
        });
        assert!(a.is_err(), "A's sync failed: {a:?}");
        assert!(b.is_err(), "B was appended during the failed sync: {b:?}");
    }

    const MS: Duration = Duration::from_millis(1);

    fn after(syncs: usize, messages: usize, took: Duration) -> Window {
        let mut w = Window::new();
        for _ in 0..syncs {
            w.observe(messages, took);
        }
        w
    }

    #[test]
    fn light_load_never_waits() {
        assert_eq!(Window::new().next(), Duration::ZERO);
        assert_eq!(after(100, 1, MS).next(), Duration::ZERO);
        // An occasional pair is not load.
        let mut w = after(10, 1, MS);
        w.observe(2, MS);
        assert_eq!(w.next(), Duration::ZERO);
    }

    #[test]
    fn the_window_grows_with_the_batch_up_to_half_a_sync() {
        let sync = Duration::from_micros(800);
        let mut last = Duration::ZERO;
        for batch in [2, 3, 5, 10, 50] {
            let w = after(50, batch, sync).next();
            assert!(w > last, "batch {batch}: {w:?} after {last:?}");
            assert!(w <= sync / 2, "batch {batch}: {w:?}");
            last = w;
        }
        // Batches of 2 hold a sync for a quarter of its time.
        let w = after(50, 2, sync).next();
        assert!(w.abs_diff(sync / 4) < Duration::from_micros(1), "{w:?}");
    }

    #[test]
    fn the_window_follows_the_sync_time_up_to_the_cap() {
        let fast = after(50, 10, Duration::from_micros(200)).next();
        let slow = after(50, 10, Duration::from_micros(2000)).next();
        assert!(fast < slow, "{fast:?} {slow:?}");
        assert_eq!(after(50, 10, 100 * MS).next(), MAX_WINDOW);
    }

    #[test]
    fn the_window_closes_when_the_load_goes() {
        let mut w = after(50, 20, MS);
        assert!(w.next() > Duration::ZERO);
        let mut syncs = 0;
        while w.next() > Duration::ZERO {
            w.observe(1, MS);
            syncs += 1;
        }
        assert!(syncs <= 15, "{syncs} syncs of one message to close it");
    }

    #[test]
    fn the_first_sync_sets_the_sync_average() {
        let mut w = Window::new();
        w.observe(3, Duration::from_micros(400));
        w.observe(3, Duration::from_micros(400));
        w.observe(3, Duration::from_micros(400));
        assert!(w.batch() > BUSY_BATCH);
        let expected = 400e-6 * MAX_SHARE * (1.0 - 1.0 / w.batch());
        assert!((w.next().as_secs_f64() - expected).abs() < 1e-9);
    }
}
