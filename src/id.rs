//! Queue IDs: short, unique across shards and restarts, and cheap to make.
//!
//! An ID packs the generator's start time in microseconds (56 bits), the shard number
//! (8 bits) and a per-generator sequence number (32 bits), printed in Crockford base 32
//! (20 characters). Two generators share an ID only if they start in the same microsecond
//! on the same shard number; when a sequence wraps, the generator takes a later start time.
//! Restart uniqueness assumes the system clock does not step backwards across a restart.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const LEN: usize = 20;

/// A message's queue ID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(u128);

impl QueueId {
    /// The raw 96-bit value.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Rebuilds an ID from its raw value.
    pub fn from_u128(v: u128) -> Self {
        QueueId(v & ((1u128 << 96) - 1))
    }

    /// The ID's printed form, without allocating.
    pub fn encode(self) -> [u8; LEN] {
        let mut out = [b'0'; LEN];
        let mut v = self.0;
        for slot in out.iter_mut().rev() {
            *slot = ALPHABET[(v & 31) as usize];
            v >>= 5;
        }
        out
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let enc = self.encode();
        // The alphabet is ASCII, so this never fails.
        f.write_str(std::str::from_utf8(&enc).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for QueueId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != LEN {
            return Err(format!("queue ID {s:?} must be {LEN} characters"));
        }
        let mut v: u128 = 0;
        for c in s.bytes() {
            let d = ALPHABET
                .iter()
                .position(|&a| a == c.to_ascii_uppercase())
                .ok_or_else(|| format!("queue ID {s:?} has an invalid character"))?;
            v = (v << 5) | d as u128;
        }
        Ok(QueueId::from_u128(v))
    }
}

/// Makes the IDs of one shard. Not shared: each shard owns one.
#[derive(Debug)]
pub struct IdGenerator {
    start_micros: u64,
    shard: u8,
    seq: u32,
}

impl IdGenerator {
    /// A generator for `shard`, starting now.
    pub fn new(shard: usize) -> Self {
        Self::starting_at(shard, now_micros())
    }

    /// A generator with an explicit start time (tests).
    pub fn starting_at(shard: usize, start_micros: u64) -> Self {
        IdGenerator {
            start_micros: start_micros & ((1 << 56) - 1),
            shard: (shard & 0xff) as u8,
            seq: 0,
        }
    }

    /// The next ID.
    pub fn next_id(&mut self) -> QueueId {
        if self.seq == u32::MAX {
            // Sequence exhausted: move to a start time no earlier than one microsecond on.
            self.start_micros = (self.start_micros + 1).max(now_micros()) & ((1 << 56) - 1);
            self.seq = 0;
        }
        let id = (u128::from(self.start_micros) << 40)
            | (u128::from(self.shard) << 32)
            | u128::from(self.seq);
        self.seq += 1;
        QueueId(id)
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_unique_across_shards_and_sequence() {
        let mut seen = HashSet::new();
        for shard in 0..4 {
            let mut g = IdGenerator::starting_at(shard, 1_700_000_000_000_000);
            for _ in 0..1000 {
                assert!(seen.insert(g.next_id()));
            }
        }
    }

    #[test]
    fn wrap_moves_start_time_forward() {
        let mut g = IdGenerator::starting_at(0, 5);
        g.seq = u32::MAX;
        let a = g.next_id();
        assert!(a.as_u128() >> 40 > 5);
    }

    #[test]
    fn display_round_trips() {
        let id = IdGenerator::new(3).next_id();
        let s = id.to_string();
        assert_eq!(s.len(), 20);
        assert_eq!(s.parse::<QueueId>().unwrap(), id);
        assert!("short".parse::<QueueId>().is_err());
        assert!("IIIIIIIIIIIIIIIIIIII".parse::<QueueId>().is_err());
    }
}
