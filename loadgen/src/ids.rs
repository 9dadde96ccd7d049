//! The sink's registry of message IDs it has received: unique/duplicate counting shared by all
//! sink threads, and the per-ID record the manifest check reads at the end.

use crate::message::MsgId;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// IDs are already well distributed (sequence numbers), so a multiply-xorshift is plenty and
/// much cheaper than SipHash on the per-message path.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^ (h >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(31) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub type IdMap<V> = HashMap<MsgId, V, BuildHasherDefault<IdHasher>>;

/// How often an ID arrived intact and how often damaged.
#[derive(Clone, Copy, Default, Debug)]
pub struct Seen {
    pub intact: u32,
    pub corrupted: u32,
}

const SHARDS: usize = 64;

/// Sharded by sequence number so that sink threads rarely contend on one lock.
pub struct IdRegistry {
    shards: Vec<Mutex<IdMap<Seen>>>,
    unique: AtomicU64,
}

impl Default for IdRegistry {
    fn default() -> Self {
        IdRegistry {
            shards: (0..SHARDS).map(|_| Mutex::new(IdMap::default())).collect(),
            unique: AtomicU64::new(0),
        }
    }
}

impl IdRegistry {
    fn shard(&self, id: &MsgId) -> std::sync::MutexGuard<'_, IdMap<Seen>> {
        let m = &self.shards[(id.seq as usize) % SHARDS];
        // A poisoned shard only means another thread panicked mid-insert; the map is intact.
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an intact arrival. Returns the number of unique IDs so far if this one is new,
    /// `None` for a duplicate.
    pub fn intact(&self, id: MsgId) -> Option<u64> {
        let mut s = self.shard(&id);
        let e = s.entry(id).or_default();
        e.intact = e.intact.saturating_add(1);
        if e.intact == 1 {
            drop(s);
            Some(self.unique.fetch_add(1, Ordering::Relaxed) + 1)
        } else {
            None
        }
    }

    pub fn corrupted(&self, id: MsgId) {
        let mut s = self.shard(&id);
        let e = s.entry(id).or_default();
        e.corrupted = e.corrupted.saturating_add(1);
    }

    pub fn unique(&self) -> u64 {
        self.unique.load(Ordering::Relaxed)
    }

    pub fn get(&self, id: &MsgId) -> Seen {
        self.shard(id).get(id).copied().unwrap_or_default()
    }

    /// Calls `f` for every ID seen (intact or not).
    pub fn for_each(&self, mut f: impl FnMut(&MsgId, &Seen)) {
        for m in &self.shards {
            let m = m.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in m.iter() {
                f(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_unique_and_duplicates() {
        let r = IdRegistry::default();
        let a = MsgId { run: 1, seq: 1 };
        let b = MsgId { run: 1, seq: 65 };
        assert_eq!(r.intact(a), Some(1));
        assert_eq!(r.intact(a), None);
        assert_eq!(r.intact(b), Some(2));
        r.corrupted(MsgId { run: 2, seq: 0 });
        assert_eq!(r.unique(), 2);
        assert_eq!(r.get(&a).intact, 2);
        let mut n = 0;
        r.for_each(|_, _| n += 1);
        assert_eq!(n, 3);
    }
}
