//! Relay access: who may relay where (RFC 5321 §3.6.2: never an open relay).
//!
//! A client inside `relay.mynetworks` may send to any domain; anyone may send to a domain in
//! `relay.domains`. Domains match exactly, case-insensitively; an entry written `.example.com`
//! also matches every subdomain of example.com (but not example.com itself).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP network in CIDR form, such as `127.0.0.0/8` or `::1/128`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The prefix as a mask over an address of this network's family.
    fn mask(&self) -> u128 {
        let bits = if self.addr.is_ipv4() { 32 } else { 128 };
        let ones = u128::MAX
            .checked_shl(128 - u32::from(self.prefix))
            .unwrap_or(0);
        ones >> (128 - bits)
    }

    fn addr_bits(&self) -> u128 {
        match self.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        }
    }

    /// True when the address has bits set past the prefix (`10.0.0.1/8`): allowed, and
    /// meaning [`IpNet::network`], but usually a typing mistake worth a warning.
    pub fn has_host_bits(&self) -> bool {
        self.addr_bits() & !self.mask() != 0
    }

    /// The network with its host bits cleared (`10.0.0.1/8` → `10.0.0.0/8`).
    pub fn network(&self) -> IpNet {
        let bits = self.addr_bits() & self.mask();
        let addr = match self.addr {
            IpAddr::V4(_) => IpAddr::V4((bits as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(bits.into()),
        };
        IpNet {
            addr,
            prefix: self.prefix,
        }
    }

    /// True when `ip` lies inside this network. IPv4-mapped IPv6 addresses are compared as
    /// IPv4, so a dual-stack listener does not change who may relay.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length (0..={max})"))?,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Who may relay where.
#[derive(Clone, Debug, Default)]
pub struct RelayPolicy {
    mynetworks: Vec<IpNet>,
    domains: Vec<String>,
}

impl RelayPolicy {
    /// A policy from trusted networks and relay domains.
    pub fn new(mynetworks: Vec<IpNet>, domains: Vec<String>) -> Self {
        let domains = domains
            .into_iter()
            .map(|d| d.to_ascii_lowercase())
            .collect();
        RelayPolicy {
            mynetworks,
            domains,
        }
    }

    /// True when a client at `ip` may relay to any domain.
    pub fn client_may_relay(&self, ip: IpAddr) -> bool {
        self.mynetworks.iter().any(|net| net.contains(ip))
    }

    /// True when anyone may send to `domain`.
    pub fn is_relay_domain(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| {
            if let Some(parent) = d.strip_prefix('.') {
                domain.len() > parent.len() + 1
                    && domain[domain.len() - parent.len()..].eq_ignore_ascii_case(parent)
                    && domain.as_bytes()[domain.len() - parent.len() - 1] == b'.'
            } else {
                domain.eq_ignore_ascii_case(d)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks() {
        let lo: IpNet = "127.0.0.1/32".parse().unwrap();
        assert!(lo.contains(ip("127.0.0.1")));
        assert!(!lo.contains(ip("127.0.0.2")));
        assert!(lo.contains(ip("::ffff:127.0.0.1")));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        assert!(!all.contains(ip("::1")));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")));
        assert!(!v6.contains(ip("2001:db9::5")));
        assert!("::1".parse::<IpNet>().unwrap().contains(ip("::1")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(net("10.0.0.1/8").has_host_bits());
        assert_eq!(net("10.0.0.1/8").network().to_string(), "10.0.0.0/8");
        assert!(!net("10.0.0.0/8").has_host_bits());
        assert!(!net("10.0.0.1").has_host_bits());
        assert!(!net("0.0.0.0/0").has_host_bits());
        assert!(net("1.2.3.4/0").has_host_bits());
        assert!(net("2001:db8::1/32").has_host_bits());
        assert_eq!(net("2001:db8::1/32").network().to_string(), "2001:db8::/32");
        assert!(!net("::1/128").has_host_bits());
        assert!(!net("::/0").has_host_bits());
        assert!("example".parse::<IpNet>().is_err());
    }

    #[test]
    fn domains() {
        let p = RelayPolicy::new(vec![], vec!["Example.COM".into(), ".sub.test".into()]);
        assert!(p.is_relay_domain("example.com"));
        assert!(p.is_relay_domain("EXAMPLE.com"));
        assert!(!p.is_relay_domain("mail.example.com"));
        assert!(!p.is_relay_domain("badexample.com"));
        assert!(p.is_relay_domain("a.sub.test"));
        assert!(!p.is_relay_domain("sub.test"));
        assert!(!p.is_relay_domain("asub.test"));
        assert!(!p.client_may_relay(ip("127.0.0.1")));
    }
}
