//! Group commit: one `fdatasync` covers every message appended since the previous one.
//!
//! Sessions append their message to the shard's store, then wait here. A committer task
//! takes everything waiting, syncs the files those appends touched (off the event loop, on
//! tokio's blocking pool), and only then releases the waiters, whose `250` follows. While a
//! sync runs, new messages gather for the next one, so the batch grows with the load: one
//! message per sync when idle (lowest latency), many under load (highest throughput).

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;

use tokio::sync::{oneshot, Notify};

use super::store::ShardStore;

/// Counters of the committer (for logs and PERF.md).
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitStats {
    /// Syncs done.
    pub syncs: u64,
    /// Messages made durable.
    pub messages: u64,
    /// Syncs that failed.
    pub failures: u64,
}

/// The shard's committer handle.
pub struct GroupCommit {
    store: Rc<RefCell<ShardStore>>,
    waiting: RefCell<Vec<oneshot::Sender<Result<(), String>>>>,
    wake: Notify,
    /// Sync every message on its own (the A/B switch `RINGRELAY_GROUP_COMMIT=off`).
    one_by_one: bool,
    stats: Cell<CommitStats>,
}

impl GroupCommit {
    /// A committer for `store`; run [`GroupCommit::run`] in a task of the same shard.
    pub fn new(store: Rc<RefCell<ShardStore>>) -> Rc<Self> {
        let one_by_one = std::env::var("RINGRELAY_GROUP_COMMIT").is_ok_and(|v| v == "off");
        Rc::new(GroupCommit {
            store,
            waiting: RefCell::new(Vec::new()),
            wake: Notify::new(),
            one_by_one,
            stats: Cell::new(CommitStats::default()),
        })
    }

    /// Waits until everything appended so far is durable. Call right after appending.
    pub async fn durable(&self) -> Result<(), String> {
        if self.one_by_one {
            let targets = self.store.borrow_mut().take_sync_targets();
            let result = sync_off_thread(targets).await;
            self.count(1, result.is_err());
            return result;
        }
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().push(tx);
        self.wake.notify_one();
        rx.await
            .unwrap_or_else(|_| Err("the committer stopped".into()))
    }

    /// The committer loop.
    pub async fn run(self: Rc<Self>) {
        loop {
            if self.waiting.borrow().is_empty() {
                self.wake.notified().await;
                continue;
            }
            let waiters = std::mem::take(&mut *self.waiting.borrow_mut());
            let targets = self.store.borrow_mut().take_sync_targets();
            let result = sync_off_thread(targets).await;
            if result.is_err() {
                // Nothing about the current segment is certain after a failed sync.
                self.store.borrow_mut().abandon_current();
            }
            self.count(waiters.len() as u64, result.is_err());
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> CommitStats {
        self.stats.get()
    }

    fn count(&self, messages: u64, failed: bool) {
        let mut s = self.stats.get();
        s.syncs += 1;
        s.messages += messages;
        s.failures += u64::from(failed);
        self.stats.set(s);
    }
}

async fn sync_off_thread(targets: super::store::SyncTargets) -> Result<(), String> {
    if targets.is_empty() {
        return Ok(());
    }
    match tokio::task::spawn_blocking(move || targets.sync()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(describe(&e)),
        Err(e) => Err(format!("sync task failed: {e}")),
    }
}

fn describe(e: &io::Error) -> String {
    format!("spool sync failed: {e}")
}
