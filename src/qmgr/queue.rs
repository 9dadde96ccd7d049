//! One shard's delivery queue, in memory: which messages are ready now and which are
//! deferred until when. It is rebuilt from the segments at start-up, so it holds nothing
//! that is not also on disk. No clock inside: the time is always an argument.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::id::QueueId;
use crate::spool::Queued;

/// A message waiting for delivery: what the spool holds of it, and the queue manager's
/// own state.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The spooled message: envelope, pending recipients, where its record is.
    pub msg: Queued,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// Content, while it is kept in memory (fresh messages); deferred ones are read back.
    pub data: Option<Bytes>,
    /// Why the last attempt did not finish it.
    pub last_error: Option<String>,
}

impl Entry {
    /// A message not tried yet, with its content in memory or not.
    pub fn new(msg: Queued, data: Option<Bytes>) -> Entry {
        Entry {
            msg,
            attempts: 0,
            data,
            last_error: None,
        }
    }

    /// Its queue ID.
    pub fn id(&self) -> QueueId {
        self.msg.id
    }
}

/// Ready and deferred messages.
#[derive(Debug, Default)]
pub struct Queue {
    entries: HashMap<QueueId, Entry>,
    ready: VecDeque<QueueId>,
    deferred: BTreeSet<(Instant, QueueId)>,
    deferred_at: HashMap<QueueId, Instant>,
}

impl Queue {
    /// Adds a message that is ready now.
    pub fn push_ready(&mut self, entry: Entry) {
        let id = entry.id();
        self.entries.insert(id, entry);
        self.ready.push_back(id);
    }

    /// Takes the next ready message out of the queue for delivery; give it back with
    /// [`Queue::defer`] or drop it when finished.
    pub fn pop_ready(&mut self) -> Option<Entry> {
        while let Some(id) = self.ready.pop_front() {
            if let Some(e) = self.entries.remove(&id) {
                return Some(e);
            }
        }
        None
    }

    /// Puts a message back, deferred until `until` (its content is dropped from memory).
    pub fn defer(&mut self, mut entry: Entry, until: Instant) {
        entry.data = None;
        let id = entry.id();
        self.entries.insert(id, entry);
        self.deferred.insert((until, id));
        self.deferred_at.insert(id, until);
    }

    /// Moves every deferred message due by `now` to the ready list; returns when the next
    /// one falls due.
    pub fn promote_due(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&(at, id)) = self.deferred.first() {
            if at > now {
                return Some(at);
            }
            self.deferred.pop_first();
            self.deferred_at.remove(&id);
            self.ready.push_back(id);
        }
        None
    }

    /// Makes every deferred message ready now (`ringrelay queue flush`).
    pub fn flush(&mut self) -> usize {
        let n = self.deferred.len();
        for (_, id) in std::mem::take(&mut self.deferred) {
            self.ready.push_back(id);
        }
        self.deferred_at.clear();
        n
    }

    /// Removes a waiting message (not one being delivered right now).
    pub fn remove(&mut self, id: QueueId) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        if let Some(at) = self.deferred_at.remove(&id) {
            self.deferred.remove(&(at, id));
        }
        self.ready.retain(|r| *r != id);
        Some(entry)
    }

    /// Messages ready now.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Messages deferred.
    pub fn deferred_len(&self) -> usize {
        self.deferred.len()
    }

    /// Messages waiting (ready or deferred), not counting those in delivery.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The wait before attempt `attempts + 1`, from the configured schedule (its last step
/// repeats).
pub fn retry_delay(schedule: &[u64], attempts: u32) -> Duration {
    let i = (attempts.max(1) as usize - 1).min(schedule.len().saturating_sub(1));
    Duration::from_secs(schedule.get(i).copied().unwrap_or(60))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdGenerator;
    use crate::smtp::ReversePath;
    use crate::spool::Location;
    use std::time::SystemTime;

    fn entry(ids: &mut IdGenerator) -> Entry {
        Entry::new(
            Queued {
                id: ids.next_id(),
                location: Location::for_tests(),
                from: ReversePath::Null,
                rcpts: vec![],
                pending: vec![],
                eight_bit: false,
                arrival: SystemTime::UNIX_EPOCH,
            },
            Some(Bytes::from_static(b"x")),
        )
    }

    #[test]
    fn ready_deferred_flush_and_remove() {
        let mut ids = IdGenerator::starting_at(0, 1);
        let mut q = Queue::default();
        let t0 = Instant::now();
        let a = entry(&mut ids);
        let b = entry(&mut ids);
        let (ida, idb) = (a.id(), b.id());
        q.push_ready(a);
        q.push_ready(b);
        let a = q.pop_ready().unwrap();
        assert_eq!(a.id(), ida);
        q.defer(a, t0 + Duration::from_secs(10));
        assert_eq!((q.ready_len(), q.deferred_len(), q.len()), (1, 1, 2));
        assert_eq!(q.promote_due(t0), Some(t0 + Duration::from_secs(10)));
        assert_eq!(q.pop_ready().unwrap().id(), idb);
        assert!(q.pop_ready().is_none());
        assert_eq!(q.promote_due(t0 + Duration::from_secs(10)), None);
        let a = q.pop_ready().unwrap();
        assert!(a.data.is_none(), "deferred content is dropped from memory");
        q.defer(a, t0 + Duration::from_secs(99));
        assert_eq!(q.flush(), 1);
        assert_eq!(q.ready_len(), 1);
        assert!(q.remove(ida).is_some());
        assert!(
            q.pop_ready().is_none(),
            "removed messages are not delivered"
        );
        assert!(q.is_empty());
    }

    #[test]
    fn retry_schedule_repeats_its_last_step() {
        let s = [60, 300, 900];
        assert_eq!(retry_delay(&s, 1), Duration::from_secs(60));
        assert_eq!(retry_delay(&s, 3), Duration::from_secs(900));
        assert_eq!(retry_delay(&s, 30), Duration::from_secs(900));
        assert_eq!(retry_delay(&[], 1), Duration::from_secs(60));
    }
}
