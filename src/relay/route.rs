//! Where a recipient's mail goes next: the static route for its domain
//! (`delivery.routes`, `--route`), else the smarthost, else MX routing (`resolve.rs`).
//! A route given as a host *name* is resolved through the system resolver, and each
//! shard keeps the answer for a minute ([`HopCache`]) instead of asking per delivery.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::Delivery;

/// A next hop as configured: `host:port` (a name or an IP address).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NextHop(pub String);

impl fmt::Display for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl NextHop {
    /// The host part, for `Remote-MTA:` in bounces.
    pub fn host(&self) -> &str {
        let s = self.0.rsplit_once(':').map_or(self.0.as_str(), |(h, _)| h);
        s.trim_start_matches('[').trim_end_matches(']')
    }
}

/// How long a shard keeps a next hop's addresses. The system resolver reports no TTL, so
/// this is fixed: short enough that a changed address is picked up within a minute, long
/// enough that a busy relay resolves its smarthost once a minute, not once per message.
pub const HOP_CACHE_TTL: Duration = Duration::from_secs(60);

/// One shard's answers for next hops given as host names. Only non-empty answers are
/// kept: a failed or empty lookup is repeated on the next attempt.
#[derive(Debug, Default)]
pub struct HopCache {
    entries: RefCell<HashMap<String, (Instant, Vec<SocketAddr>)>>,
}

impl HopCache {
    /// The addresses to connect to for `hop`: an IP address as is; a name through the
    /// system resolver (off the event loop), or from the cache while fresh.
    pub async fn addresses(&self, hop: &NextHop, now: Instant) -> io::Result<Vec<SocketAddr>> {
        self.addresses_with(hop, now, |name| async move {
            Ok(tokio::net::lookup_host(name.as_str()).await?.collect())
        })
        .await
    }

    async fn addresses_with<F, Fut>(
        &self,
        hop: &NextHop,
        now: Instant,
        lookup: F,
    ) -> io::Result<Vec<SocketAddr>>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = io::Result<Vec<SocketAddr>>>,
    {
        if let Ok(addr) = hop.0.parse::<SocketAddr>() {
            return Ok(vec![addr]);
        }
        if let Some((expires, addrs)) = self.entries.borrow().get(&hop.0) {
            if now < *expires {
                return Ok(addrs.clone());
            }
        }
        // No borrow is held across the lookup: other deliveries may use the cache meanwhile.
        let addrs = lookup(hop.0.clone()).await?;
        if !addrs.is_empty() {
            self.entries
                .borrow_mut()
                .insert(hop.0.clone(), (now + HOP_CACHE_TTL, addrs.clone()));
        }
        Ok(addrs)
    }
}

/// The routing table.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    by_domain: HashMap<String, NextHop>,
    smarthost: Option<NextHop>,
}

impl Routes {
    /// From the (validated) `[delivery]` section.
    pub fn from_config(delivery: &Delivery) -> Self {
        Routes {
            by_domain: delivery
                .routes
                .iter()
                .map(|(d, h)| (d.to_ascii_lowercase(), NextHop(h.clone())))
                .collect(),
            smarthost: (!delivery.smarthost.is_empty())
                .then(|| NextHop(delivery.smarthost.clone())),
        }
    }

    /// The next hop for `domain`, if one is configured.
    pub fn next_hop(&self, domain: &str) -> Option<&NextHop> {
        if let Some(hop) = self.by_domain.get(domain) {
            return Some(hop);
        }
        if domain.bytes().any(|b| b.is_ascii_uppercase()) {
            if let Some(hop) = self.by_domain.get(&domain.to_ascii_lowercase()) {
                return Some(hop);
            }
        }
        self.smarthost.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_route_then_smarthost() {
        let mut d = Delivery::default();
        d.routes
            .insert("example.test".into(), "127.0.0.1:2526".into());
        let r = Routes::from_config(&d);
        assert_eq!(r.next_hop("EXAMPLE.test").unwrap().0, "127.0.0.1:2526");
        assert!(r.next_hop("other.test").is_none());
        d.smarthost = "[::1]:25".into();
        let r = Routes::from_config(&d);
        assert_eq!(r.next_hop("other.test").unwrap().host(), "::1");
        assert_eq!(r.next_hop("example.test").unwrap().host(), "127.0.0.1");
    }

    #[test]
    fn a_named_hop_is_resolved_once_a_minute() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let cache = HopCache::default();
        let lookups = std::cell::Cell::new(0);
        let hop = NextHop("relay.example.test:25".into());
        let answer: SocketAddr = "192.0.2.7:25".parse().unwrap();
        let resolve = |now: Instant, answer: Vec<SocketAddr>| {
            let lookups = &lookups;
            let cache = &cache;
            let hop = &hop;
            rt.block_on(async move {
                cache
                    .addresses_with(hop, now, |name| async move {
                        assert_eq!(name, "relay.example.test:25");
                        lookups.set(lookups.get() + 1);
                        Ok(answer)
                    })
                    .await
                    .unwrap()
            })
        };
        let t0 = Instant::now();
        assert_eq!(resolve(t0, vec![answer]), vec![answer]);
        assert_eq!(resolve(t0 + Duration::from_secs(59), vec![]), vec![answer]);
        assert_eq!(
            lookups.get(),
            1,
            "the second delivery used the cached answer"
        );
        // Expired: asked again. An empty answer is returned but not kept.
        assert_eq!(resolve(t0 + HOP_CACHE_TTL, vec![]), vec![]);
        assert_eq!(resolve(t0 + HOP_CACHE_TTL, vec![answer]), vec![answer]);
        assert_eq!(lookups.get(), 3, "an empty answer is not cached");
        // An IP address needs no lookup at all.
        let ip = NextHop("127.0.0.1:2525".into());
        let got = rt.block_on(cache.addresses_with(&ip, t0, |_| async {
            Err(io::Error::other("must not be called"))
        }));
        assert_eq!(got.unwrap(), vec!["127.0.0.1:2525".parse().unwrap()]);
    }

    #[test]
    fn a_failed_lookup_is_not_cached() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let cache = HopCache::default();
        let hop = NextHop("down.example.test:25".into());
        let t0 = Instant::now();
        let err = rt.block_on(
            cache.addresses_with(&hop, t0, |_| async { Err(io::Error::other("SERVFAIL")) }),
        );
        assert!(err.is_err());
        let addr: SocketAddr = "192.0.2.9:25".parse().unwrap();
        let ok = rt.block_on(cache.addresses_with(&hop, t0, |_| async move { Ok(vec![addr]) }));
        assert_eq!(ok.unwrap(), vec![addr], "asked again right away");
    }
}
