//! The limits the shards share: connection caps (`max_connections` for the whole server
//! and `max_connections_per_ip`) and the DATA memory budget (`max_data_memory`).
//!
//! These are the only counters the shards share. The connection total is one atomic; the
//! per-address counts sit in a mutex-guarded map, touched once at accept and once at
//! close, never on the per-message path. A [`ConnectionSlot`] gives its place back when
//! dropped, so no exit path of a connection can leak a slot. The [`DataBudget`] is one
//! atomic, touched when a message's buffer grows and when it is given back: at least twice
//! per message, every message (uncontended while one shard does the work, as with a local
//! client). A connection's share is given back by the shard's `OpenGuard` on drop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CapExceeded {
    Total,
    PerIp,
}

/// Shared connection counts.
#[derive(Debug)]
pub(crate) struct ConnectionCaps {
    /// The limits, changed by a reload (new connections see them).
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionCaps {
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnectionCaps {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a slot for a connection from `ip`, or says which cap is full.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, CapExceeded> {
        let ip = ip.to_canonical();
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total.load(Ordering::Relaxed) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(CapExceeded::Total);
        }
        // A poisoned lock only means another thread panicked mid-update; the counts are
        // still plain integers, so carry on with them.
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip.load(Ordering::Relaxed) {
            drop(map);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(CapExceeded::PerIp);
        }
        *n += 1;
        Ok(ConnectionSlot {
            caps: Arc::clone(self),
            ip,
        })
    }

    /// New limits (a reload); connections open beyond them stay.
    pub(crate) fn set_limits(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    /// Connections open now.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// One connection's place under the caps; released on drop.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    caps: Arc<ConnectionCaps>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut map = self.caps.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
        drop(map);
        self.caps.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Bytes all messages being received hold at once, server-wide, and the most they may
/// (`limits.max_data_memory`). One budget for all shards: a shard's share would depend on
/// how connections happen to be spread, and local clients all go to one shard
/// (`listener::steer_local_by_cpu`).
#[derive(Debug)]
pub(crate) struct DataBudget {
    max: usize,
    used: AtomicUsize,
}

impl DataBudget {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(DataBudget {
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// The budget, in bytes.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Moves one connection's share from `*held` bytes to `now`. Giving back always
    /// succeeds. Growing fails, leaving `*held` as it was, when it would take the server
    /// past the budget while other messages hold memory too: a message alone is always
    /// taken (it is bounded by `max_message_size`, and the config keeps that within the
    /// budget). A refused attempt is never counted, not even for a moment, so it cannot
    /// make another shard's message look crowded. The caller must give its share back on
    /// every exit path (`shard::OpenGuard` does, on drop).
    pub(crate) fn update(&self, held: &mut usize, now: usize) -> bool {
        if now == *held {
            return true;
        }
        if now < *held {
            self.used.fetch_sub(*held - now, Ordering::Relaxed);
            *held = now;
            return true;
        }
        let grow = now - *held;
        let mut current = self.used.load(Ordering::Relaxed);
        loop {
            // `current` includes this share's own bytes.
            let others = current.saturating_sub(*held);
            if others > 0 && current.saturating_add(grow) > self.max {
                return false;
            }
            match self.used.compare_exchange_weak(
                current,
                current + grow,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        *held = now;
        true
    }

    /// Moves one connection's share from `*held` bytes to `now` whatever the budget says:
    /// for memory already taken that cannot be refused any more (a message that ended in
    /// the read that grew it), so that the count stays what is really held.
    pub(crate) fn force(&self, held: &mut usize, now: usize) {
        if now >= *held {
            self.used.fetch_add(now - *held, Ordering::Relaxed);
        } else {
            self.used.fetch_sub(*held - now, Ordering::Relaxed);
        }
        *held = now;
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total_caps() {
        let caps = ConnectionCaps::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = caps.acquire(a).unwrap();
        let _s2 = caps.acquire(a).unwrap();
        assert_eq!(caps.acquire(a).unwrap_err(), CapExceeded::PerIp);
        let _s3 = caps.acquire(b).unwrap();
        assert_eq!(caps.acquire(b).unwrap_err(), CapExceeded::Total);
        drop(s1);
        assert_eq!(caps.open(), 2);
        assert!(caps.acquire(a).is_ok());
        assert_eq!(caps.open(), 2, "the temporary slot was dropped again");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let _s4 = caps.acquire(mapped).unwrap();
        assert_eq!(caps.acquire(a).unwrap_err(), CapExceeded::Total);
    }

    #[test]
    fn data_budget_takes_a_lone_message_and_refuses_a_second_past_it() {
        let budget = DataBudget::new(100);
        let (mut a, mut b) = (0, 0);
        // Alone, a message may grow past the budget (max_message_size bounds it).
        assert!(budget.update(&mut a, 60));
        assert!(budget.update(&mut a, 150));
        assert_eq!((a, budget.used()), (150, 150));
        // A second one may not grow while the first holds memory; nothing changes.
        assert!(!budget.update(&mut b, 10));
        assert_eq!((b, budget.used()), (0, 150));
        // Giving back always works, and then the second fits.
        assert!(budget.update(&mut a, 40));
        assert!(budget.update(&mut b, 60));
        assert!(!budget.update(&mut b, 61));
        assert_eq!((a, b, budget.used()), (40, 60, 100));
        assert!(budget.update(&mut a, 0));
        assert!(budget.update(&mut b, 0));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn data_budget_under_two_threads_never_leaks_or_passes_the_limit_with_company() {
        let budget = DataBudget::new(1000);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let mut held = 0;
                    for i in 0..20_000 {
                        let _ = budget.update(&mut held, (i * 37) % 700);
                        // Two shares over the budget together never both hold: the
                        // second to grow is refused (a lone one of 700 fits anyway).
                        assert!(budget.used() <= 1000, "{}", budget.used());
                    }
                    budget.update(&mut held, 0);
                });
            }
        });
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_forced_share_counts_whatever_the_budget() {
        let budget = DataBudget::new(100);
        let (mut a, mut b) = (0, 0);
        assert!(budget.update(&mut a, 90));
        assert!(!budget.update(&mut b, 50));
        budget.force(&mut b, 50);
        assert_eq!((b, budget.used()), (50, 140));
        budget.force(&mut b, 0);
        assert!(budget.update(&mut a, 0));
        assert_eq!(budget.used(), 0);
    }
}
