//! Where a recipient's mail goes next: the static route for its domain
//! (`delivery.routes`, `--route`), else the smarthost, else — until MX routing lands —
//! nowhere yet (the message is deferred, never lost).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;

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

    /// The addresses to connect to (an IP address as is; a name through the system
    /// resolver, off the event loop).
    pub async fn addresses(&self) -> io::Result<Vec<SocketAddr>> {
        if let Ok(addr) = self.0.parse::<SocketAddr>() {
            return Ok(vec![addr]);
        }
        Ok(tokio::net::lookup_host(self.0.as_str()).await?.collect())
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
}
