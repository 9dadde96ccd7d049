//! One shard's delivery queue, in memory: which messages are ready now, which are deferred
//! until when, which are on hold, and which are being delivered. It is rebuilt from the
//! segments at start-up, so it holds nothing that is not also on disk. No clock inside: the
//! time is always an argument.
//!
//! An operator can make messages ready before their time (`queue flush`, `queue release`);
//! the attempt that follows does not move the message along the retry schedule
//! ([`Entry::count_attempt`]), so flushing a queue whose next hop is still down does not
//! stretch every message's next retry. Held messages are never made ready but by
//! `release`.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::id::QueueId;
use crate::spool::{Location, Queued};

/// A message waiting for delivery: what the spool holds of it, and the queue manager's
/// own state.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The spooled message: envelope, pending recipients, where its record is.
    pub msg: Queued,
    /// Delivery attempts the retry schedule has counted so far (attempts made early, at an
    /// operator's flush or release, are not counted; see [`Entry::count_attempt`]).
    pub attempts: u32,
    /// Content, while it is kept in memory (fresh messages); deferred ones are read back.
    pub data: Option<Bytes>,
    /// Why the last attempt did not finish it.
    pub last_error: Option<String>,
    /// Made ready before its time by an operator (flush, release).
    pub(super) early: bool,
    /// A delay report went out for it (at most one per message; not kept across a
    /// restart, so a restarted server may send one more).
    pub delay_warned: bool,
}

impl Entry {
    /// A message not tried yet, with its content in memory or not.
    pub fn new(msg: Queued, data: Option<Bytes>) -> Entry {
        Entry {
            msg,
            attempts: 0,
            data,
            last_error: None,
            early: false,
            delay_warned: false,
        }
    }

    /// Its queue ID.
    pub fn id(&self) -> QueueId {
        self.msg.id
    }

    /// Counts the attempt that just left the message pending, unless it was made early at
    /// an operator's request: then the schedule stays where it was (a message's first
    /// attempt always counts). Call once per attempt, before computing the next delay.
    pub fn count_attempt(&mut self) {
        let early = std::mem::take(&mut self.early);
        if !early || self.attempts == 0 {
            self.attempts += 1;
        }
    }
}

/// What [`Queue::hold`] and [`Queue::release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldChange {
    /// Changed: record it in the message's segment, at this location.
    Changed(Location),
    /// Nothing to change (already on hold, or not on hold).
    Unchanged,
    /// No such message here.
    Absent,
}

/// Ready, deferred and held messages, and those being delivered.
#[derive(Debug, Default)]
pub struct Queue {
    /// Every waiting message: ready, deferred or held.
    entries: HashMap<QueueId, Entry>,
    ready: VecDeque<QueueId>,
    deferred: BTreeSet<(Instant, QueueId)>,
    deferred_at: HashMap<QueueId, Instant>,
    /// On hold: in `entries`, in neither `ready` nor `deferred`.
    held: HashSet<QueueId>,
    /// Taken out for an attempt, with where their records are.
    delivering: HashMap<QueueId, Location>,
    /// Put on hold during an attempt: held when the attempt gives them back.
    hold_after: HashSet<QueueId>,
}

impl Queue {
    /// Adds a message that is ready now.
    pub fn push_ready(&mut self, entry: Entry) {
        let id = entry.id();
        self.entries.insert(id, entry);
        self.ready.push_back(id);
    }

    /// Adds a message that is on hold (found so at start-up).
    pub fn push_held(&mut self, entry: Entry) {
        let id = entry.id();
        self.entries.insert(id, entry);
        self.held.insert(id);
    }

    /// The spool record size of the next ready message, if any (the worker's memory
    /// budget for deliveries in flight).
    pub fn next_ready_size(&mut self) -> Option<u64> {
        while let Some(&id) = self.ready.front() {
            match self.entries.get(&id) {
                Some(e) => return Some(e.msg.location.len),
                None => {
                    self.ready.pop_front();
                }
            }
        }
        None
    }

    /// Takes the next ready message out of the queue for delivery; give it back with
    /// [`Queue::defer`], and say when its attempt is over with [`Queue::attempt_ended`].
    pub fn pop_ready(&mut self) -> Option<Entry> {
        while let Some(id) = self.ready.pop_front() {
            if let Some(e) = self.entries.remove(&id) {
                self.delivering.insert(id, e.msg.location);
                return Some(e);
            }
        }
        None
    }

    /// Puts a message back, deferred until `until` (its content is dropped from memory);
    /// or on hold, if it was put on hold during its attempt. True when it is held.
    pub fn defer(&mut self, mut entry: Entry, until: Instant) -> bool {
        entry.data = None;
        let id = entry.id();
        self.delivering.remove(&id);
        self.entries.insert(id, entry);
        if self.hold_after.remove(&id) {
            self.held.insert(id);
            return true;
        }
        self.deferred.insert((until, id));
        self.deferred_at.insert(id, until);
        false
    }

    /// The attempt at `id` is over (the message was given back with [`Queue::defer`], or it
    /// is finished).
    pub fn attempt_ended(&mut self, id: QueueId) {
        if !self.entries.contains_key(&id) {
            self.delivering.remove(&id);
            self.hold_after.remove(&id);
        }
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

    /// Makes every deferred message ready now (`ringrelay queue flush`), without moving it
    /// along the retry schedule; held messages stay held. Returns how many.
    pub fn flush(&mut self) -> usize {
        let n = self.deferred.len();
        for (_, id) in std::mem::take(&mut self.deferred) {
            if let Some(e) = self.entries.get_mut(&id) {
                e.early = true;
            }
            self.ready.push_back(id);
        }
        self.deferred_at.clear();
        n
    }

    /// Puts a message on hold: taken off the ready or deferred list, or, if it is being
    /// delivered, held when its attempt gives it back.
    pub fn hold(&mut self, id: QueueId) -> HoldChange {
        if self.held.contains(&id) || self.hold_after.contains(&id) {
            return HoldChange::Unchanged;
        }
        if let Some(&location) = self.delivering.get(&id) {
            self.hold_after.insert(id);
            return HoldChange::Changed(location);
        }
        let Some(entry) = self.entries.get(&id) else {
            return HoldChange::Absent;
        };
        let location = entry.msg.location;
        if let Some(at) = self.deferred_at.remove(&id) {
            self.deferred.remove(&(at, id));
        }
        self.ready.retain(|r| *r != id);
        self.held.insert(id);
        HoldChange::Changed(location)
    }

    /// Takes a message off hold: ready now (an attempt under way just goes on).
    pub fn release(&mut self, id: QueueId) -> HoldChange {
        if self.hold_after.remove(&id) {
            if let Some(&location) = self.delivering.get(&id) {
                return HoldChange::Changed(location);
            }
        }
        if self.held.remove(&id) {
            if let Some(entry) = self.entries.get_mut(&id) {
                entry.early = true;
                let location = entry.msg.location;
                self.ready.push_back(id);
                return HoldChange::Changed(location);
            }
        }
        if self.entries.contains_key(&id) || self.delivering.contains_key(&id) {
            HoldChange::Unchanged
        } else {
            HoldChange::Absent
        }
    }

    /// Removes a waiting message (not one being delivered right now).
    pub fn remove(&mut self, id: QueueId) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        if let Some(at) = self.deferred_at.remove(&id) {
            self.deferred.remove(&(at, id));
        }
        self.held.remove(&id);
        self.ready.retain(|r| *r != id);
        Some(entry)
    }

    /// True while an attempt at `id` is under way.
    pub fn is_delivering(&self, id: QueueId) -> bool {
        self.delivering.contains_key(&id)
    }

    /// When the oldest waiting message arrived (unix seconds): for the metrics, once a
    /// second (it looks at every entry).
    pub fn oldest_arrival_unix(&self) -> Option<u64> {
        self.entries
            .values()
            .filter_map(|e| e.msg.arrival.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .min()
    }

    /// Messages ready now.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Messages deferred.
    pub fn deferred_len(&self) -> usize {
        self.deferred.len()
    }

    /// Messages on hold.
    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Messages waiting (ready, deferred or held), not counting those in delivery.
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

/// `delay` shortened by 0–5%, by an amount drawn from `seed` (the message's ID and
/// attempt): messages deferred together by one failing next hop come back spread out,
/// not as one burst.
pub fn jittered(delay: Duration, seed: u128) -> Duration {
    // A 64-bit mix (splitmix64's finaliser) of the seed's halves.
    let mut x = (seed as u64) ^ ((seed >> 64) as u64);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let permille = (x % 51) as u32;
    delay - delay * permille / 1000
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
                smtputf8: false,
                dsn: None,
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

    #[test]
    fn jitter_shortens_by_at_most_five_percent_and_spreads() {
        let d = Duration::from_secs(600);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200u128 {
            let j = jittered(d, seed << 3);
            assert!(j <= d && j >= d * 95 / 100, "{j:?}");
            seen.insert(j);
        }
        assert!(
            seen.len() > 20,
            "spread out: {} distinct delays",
            seen.len()
        );
    }

    #[test]
    fn an_early_attempt_keeps_the_schedule_where_it_was() {
        let mut ids = IdGenerator::starting_at(0, 2);
        let mut q = Queue::default();
        let t0 = Instant::now();
        q.push_ready(entry(&mut ids));
        // The first attempt counts.
        let mut e = q.pop_ready().unwrap();
        e.count_attempt();
        assert_eq!(e.attempts, 1);
        q.defer(e, t0 + Duration::from_secs(60));
        // Flushed twice: neither attempt counts.
        for _ in 0..2 {
            assert_eq!(q.flush(), 1);
            let mut e = q.pop_ready().unwrap();
            e.count_attempt();
            assert_eq!(e.attempts, 1, "a flush does not advance the schedule");
            q.defer(e, t0 + Duration::from_secs(60));
        }
        // Due by the schedule: counts.
        assert_eq!(q.promote_due(t0 + Duration::from_secs(60)), None);
        let mut e = q.pop_ready().unwrap();
        e.count_attempt();
        assert_eq!(e.attempts, 2);
        // A never-tried message made ready early (released) still counts its first attempt.
        let mut fresh = entry(&mut ids);
        fresh.early = true;
        fresh.count_attempt();
        assert_eq!(fresh.attempts, 1);
    }

    #[test]
    fn held_messages_are_never_ready_until_released() {
        let mut ids = IdGenerator::starting_at(0, 3);
        let mut q = Queue::default();
        let t0 = Instant::now();
        let (a, b) = (entry(&mut ids), entry(&mut ids));
        let (ida, idb) = (a.id(), b.id());
        q.push_ready(a);
        q.defer(b, t0 + Duration::from_secs(5));
        assert!(matches!(q.hold(ida), HoldChange::Changed(_)));
        assert!(matches!(q.hold(idb), HoldChange::Changed(_)));
        assert_eq!(q.hold(ida), HoldChange::Unchanged);
        assert_eq!((q.held_len(), q.ready_len(), q.deferred_len()), (2, 0, 0));
        assert_eq!(q.flush(), 0, "a flush leaves held messages alone");
        assert_eq!(q.promote_due(t0 + Duration::from_secs(60)), None);
        assert!(q.pop_ready().is_none());
        assert_eq!(q.len(), 2, "still queued");
        // Released: ready at once.
        assert!(matches!(q.release(idb), HoldChange::Changed(_)));
        assert_eq!(q.release(idb), HoldChange::Unchanged, "not held any more");
        assert_eq!(q.pop_ready().unwrap().id(), idb);
        // A held message can be removed; unknown IDs are absent.
        assert!(q.remove(ida).is_some());
        assert_eq!(q.hold(ida), HoldChange::Absent);
        assert_eq!(q.release(ida), HoldChange::Absent);
    }

    #[test]
    fn a_message_held_during_its_attempt_is_held_when_it_comes_back() {
        let mut ids = IdGenerator::starting_at(0, 4);
        let mut q = Queue::default();
        let t0 = Instant::now();
        let (a, b) = (entry(&mut ids), entry(&mut ids));
        let (ida, idb) = (a.id(), b.id());
        q.push_ready(a);
        q.push_ready(b);
        let a = q.pop_ready().unwrap();
        let b = q.pop_ready().unwrap();
        assert!(q.is_delivering(ida));
        assert!(q.remove(ida).is_none(), "not while it is being delivered");
        assert!(matches!(q.hold(ida), HoldChange::Changed(_)));
        assert!(matches!(q.hold(idb), HoldChange::Changed(_)));
        assert_eq!(q.hold(ida), HoldChange::Unchanged);
        // b is released again before its attempt ends: deferred as usual.
        assert!(matches!(q.release(idb), HoldChange::Changed(_)));
        assert!(q.defer(a, t0), "held when its attempt gives it back");
        q.attempt_ended(ida);
        assert!(!q.defer(b, t0));
        q.attempt_ended(idb);
        assert_eq!(q.promote_due(t0), None);
        assert_eq!(q.pop_ready().unwrap().id(), idb);
        assert_eq!(q.held_len(), 1);
        // A message that finished during its attempt leaves nothing behind.
        let c = entry(&mut ids);
        let idc = c.id();
        q.push_ready(c);
        let _c = q.pop_ready().unwrap();
        assert!(matches!(q.hold(idc), HoldChange::Changed(_)));
        q.attempt_ended(idc);
        assert!(!q.is_delivering(idc));
        assert_eq!(q.hold(idc), HoldChange::Absent);
    }
}
