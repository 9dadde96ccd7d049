//! Connection caps: `max_connections` for the whole server and `max_connections_per_ip`.
//!
//! These are the only counters the shards share. The total is one atomic; the per-address
//! counts sit in a mutex-guarded map, touched once at accept and once at close, never on
//! the per-message path. A [`ConnectionSlot`] gives its place back when dropped, so no exit
//! path of a connection can leak a slot.

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
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionCaps {
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnectionCaps {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a slot for a connection from `ip`, or says which cap is full.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, CapExceeded> {
        let ip = ip.to_canonical();
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(CapExceeded::Total);
        }
        // A poisoned lock only means another thread panicked mid-update; the counts are
        // still plain integers, so carry on with them.
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
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
}
