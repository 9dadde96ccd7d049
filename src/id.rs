//! Queue IDs: short, unique across the nodes of a farm, their shards and restarts, and
//! cheap to make.
//!
//! An ID packs the node's number (`node_id`, 16 bits), the generator's start time in
//! milliseconds since 1970 (44 bits, good until the year 2527), the shard number (8 bits)
//! and a per-generator sequence number (32 bits): 100 bits, printed in Crockford base 32
//! (20 characters). Two generators share an ID only if they start in the same millisecond
//! on the same node and shard number; when a sequence wraps, the generator takes a later
//! start time. Restart uniqueness assumes the system clock does not step backwards across
//! a restart. IDs are stored whole in the spool, so a spool moved to another node keeps
//! its messages' IDs.
//!
//! (Spools written before node numbers held 96-bit IDs with the start time in
//! microseconds; they read back unchanged, as opaque values.)

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const LEN: usize = 20;

/// A message's queue ID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(u128);

impl QueueId {
    /// The raw 100-bit value.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Rebuilds an ID from its raw value.
    pub fn from_u128(v: u128) -> Self {
        QueueId(v & ((1u128 << 100) - 1))
    }

    /// The node number the ID was made on.
    pub fn node(self) -> u16 {
        (self.0 >> 84) as u16
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
    node: u16,
    start_millis: u64,
    shard: u8,
    seq: u32,
}

/// The start time's field: 44 bits of milliseconds.
const MILLIS_MASK: u64 = (1 << 44) - 1;

impl IdGenerator {
    /// A generator for `shard` on node 0, starting now.
    pub fn new(shard: usize) -> Self {
        Self::for_node(0, shard)
    }

    /// A generator for `shard` on node `node`, starting now.
    pub fn for_node(node: u16, shard: usize) -> Self {
        let mut g = Self::starting_at(shard, 0);
        g.node = node;
        g.start_millis = now_millis();
        g
    }

    /// A generator on node 0 with an explicit start time in microseconds (tests).
    pub fn starting_at(shard: usize, start_micros: u64) -> Self {
        IdGenerator {
            node: 0,
            start_millis: (start_micros / 1000) & MILLIS_MASK,
            shard: (shard & 0xff) as u8,
            seq: 0,
        }
    }

    /// The next ID.
    pub fn next_id(&mut self) -> QueueId {
        if self.seq == u32::MAX {
            // Sequence exhausted: move to a start time no earlier than one millisecond on.
            self.start_millis = (self.start_millis + 1).max(now_millis()) & MILLIS_MASK;
            self.seq = 0;
        }
        let id = (u128::from(self.node) << 84)
            | (u128::from(self.start_millis) << 40)
            | (u128::from(self.shard) << 32)
            | u128::from(self.seq);
        self.seq += 1;
        QueueId(id)
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        & MILLIS_MASK
}

/// A node number derived from a host name (FNV-1a folded to 16 bits): the default
/// `node_id`. Nodes of one farm should rather be numbered by hand; two names can fold to
/// the same number.
pub fn node_id_from_hostname(hostname: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in hostname.to_ascii_lowercase().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    ((h >> 16) ^ (h & 0xffff)) as u16
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
        let mut g = IdGenerator::starting_at(0, 5_000);
        g.seq = u32::MAX;
        let a = g.next_id();
        assert!((a.as_u128() >> 40) & u128::from(MILLIS_MASK) > 5);
    }

    #[test]
    fn nodes_make_distinct_ids_and_the_node_reads_back() {
        let mut a = IdGenerator::for_node(1, 0);
        let mut b = IdGenerator::for_node(2, 0);
        // Same start time and shard on two nodes: still distinct.
        b.start_millis = a.start_millis;
        let (x, y) = (a.next_id(), b.next_id());
        assert_ne!(x, y);
        assert_eq!((x.node(), y.node()), (1, 2));
        let max = IdGenerator::for_node(u16::MAX, 255).next_id();
        assert_eq!(max.to_string().parse::<QueueId>().unwrap(), max);
        assert_eq!(max.node(), u16::MAX);
        assert_eq!(
            node_id_from_hostname("Relay1.Example"),
            node_id_from_hostname("relay1.example")
        );
        assert_ne!(
            node_id_from_hostname("relay1"),
            node_id_from_hostname("relay2")
        );
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
