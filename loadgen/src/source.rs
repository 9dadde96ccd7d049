//! Client addresses for `send` (`--source-addr`, `--source-range`): which local addresses a
//! range stands for, handing them out round-robin, and opening a TCP connection bound to
//! one. Many client addresses let one machine run into per-IP limits on purpose, and give
//! the PROXY-protocol tests distinct clients on 127.0.0.0/8.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::net::{TcpSocket, TcpStream};

/// A range gives at most this many addresses (its first ones): more than any per-IP test
/// needs, and few enough to check and to cycle through.
pub const MAX_SOURCES: u64 = 65_536;

/// The local addresses connections are bound to, taken in turn by every connection attempt.
#[derive(Debug)]
pub struct Sources {
    first: u128,
    v4: bool,
    count: u64,
    next: AtomicU64,
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_bits(n: u128, v4: bool) -> IpAddr {
    if v4 {
        // Callers stay inside a v4 range, so the value fits.
        IpAddr::V4(Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

impl Sources {
    /// `--source-addr`: one address, every connection from it.
    pub fn single(text: &str) -> Result<Sources, String> {
        let ip: IpAddr = text
            .parse()
            .map_err(|_| format!("invalid --source-addr '{text}': not an IP address"))?;
        let broadcast = ip == IpAddr::V4(Ipv4Addr::BROADCAST);
        if ip.is_unspecified() || ip.is_multicast() || broadcast {
            return Err(format!(
                "invalid --source-addr '{text}': not an address a connection can come from"
            ));
        }
        Ok(Sources {
            first: bits(ip),
            v4: ip.is_ipv4(),
            count: 1,
            next: AtomicU64::new(0),
        })
    }

    /// `--source-range`: `ADDRESS/PREFIX` with no host bits set. In an IPv4 range of four
    /// addresses or more, the first (network) and last (broadcast) are left out; in an IPv6
    /// one the first (subnet-router anycast). /31, /32, /127 and /128 use every address.
    pub fn range(text: &str) -> Result<Sources, String> {
        let bad = |why: String| format!("invalid --source-range '{text}': {why}");
        let (ip, len) = text
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/PREFIX, like 127.0.0.0/24".into()))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| bad(format!("'{ip}' is not an IP address")))?;
        let v4 = ip.is_ipv4();
        let width = if v4 { 32 } else { 128 };
        let len: u32 = len
            .parse()
            .ok()
            .filter(|&l| l <= width)
            .ok_or_else(|| bad(format!("prefix length '{len}' is not 0 to {width}")))?;
        let host_bits = width - len;
        let mask = u128::MAX.checked_shr(128 - host_bits).unwrap_or(0);
        let net = bits(ip);
        if host_bits > 0 && net & mask != 0 {
            return Err(bad(format!(
                "host bits are set; the range is {}/{len}",
                from_bits(net & !mask, v4)
            )));
        }
        let skip_first = u128::from(host_bits >= 2);
        let skip_last = u128::from(v4 && host_bits >= 2);
        // Beyond 2^64 addresses the cap applies anyway.
        let size = 1u128 << host_bits.min(64);
        let count = (size - skip_first - skip_last).min(u128::from(MAX_SOURCES)) as u64;
        Ok(Sources {
            first: net + skip_first,
            v4,
            count,
            next: AtomicU64::new(0),
        })
    }

    pub fn is_ipv4(&self) -> bool {
        self.v4
    }

    /// How many addresses are used.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// The `i`th address (modulo their number).
    pub fn nth(&self, i: u64) -> IpAddr {
        from_bits(self.first + u128::from(i % self.count), self.v4)
    }

    /// The address for the next connection attempt: round-robin over all of them.
    pub fn next(&self) -> IpAddr {
        self.nth(self.next.fetch_add(1, Relaxed))
    }

    /// Makes sure the first and last addresses can be bound here, so that an address this
    /// machine does not have fails at once (and not as a run of refused connections).
    pub fn check(&self) -> Result<(), String> {
        for ip in [self.nth(0), self.nth(self.len() - 1)] {
            bound_socket(ip).map_err(|e| format!("cannot bind to source address {ip}: {e}"))?;
        }
        Ok(())
    }
}

/// A TCP socket bound to `local` (any port), ready to connect.
fn bound_socket(local: IpAddr) -> io::Result<TcpSocket> {
    let addr = SocketAddr::new(local, 0);
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    bind_address_no_port(&s);
    s.bind(&addr.into())?;
    Ok(TcpSocket::from_std_stream(s.into()))
}

/// Leaves the choice of local port to `connect` (Linux 4.2+), so that ports are unique per
/// (source, target) pair as for an unbound socket, not per source address: without it a
/// bound address runs out of ports after some 28,000 connections, TIME_WAIT ones included.
#[cfg(target_os = "linux")]
fn bind_address_no_port(s: &Socket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt(2) on a socket we own, with a pointer to a live c_int and its size.
    // An older kernel refuses the option; the port is then picked at bind, which works too.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of_val(&one) as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn bind_address_no_port(_: &Socket) {}

/// Connects to `target`, from `local` if given (else from wherever the kernel routes).
pub async fn connect(target: SocketAddr, local: Option<IpAddr>) -> io::Result<TcpStream> {
    match local {
        None => TcpStream::connect(target).await,
        Some(ip) => bound_socket(ip)?.connect(target).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: &Sources) -> Vec<String> {
        (0..s.len()).map(|i| s.nth(i).to_string()).collect()
    }

    #[test]
    fn ipv4_ranges_skip_network_and_broadcast() {
        let s = Sources::range("127.0.0.0/29").unwrap();
        assert_eq!(
            all(&s),
            [
                "127.0.0.1",
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.4",
                "127.0.0.5",
                "127.0.0.6"
            ]
        );
        assert_eq!(Sources::range("127.0.0.0/24").unwrap().len(), 254);
        assert_eq!(
            all(&Sources::range("127.0.0.4/30").unwrap()),
            ["127.0.0.5", "127.0.0.6"]
        );
        assert_eq!(
            all(&Sources::range("10.0.0.0/31").unwrap()),
            ["10.0.0.0", "10.0.0.1"]
        );
        assert_eq!(all(&Sources::range("10.0.0.7/32").unwrap()), ["10.0.0.7"]);
        let big = Sources::range("10.0.0.0/8").unwrap();
        assert_eq!(big.len(), MAX_SOURCES);
        assert_eq!(big.nth(0).to_string(), "10.0.0.1");
        assert_eq!(big.nth(MAX_SOURCES - 1).to_string(), "10.1.0.0");
        assert_eq!(Sources::range("0.0.0.0/0").unwrap().len(), MAX_SOURCES);
    }

    #[test]
    fn ipv6_ranges_skip_the_anycast_address() {
        let s = Sources::range("fd00::/126").unwrap();
        assert_eq!(all(&s), ["fd00::1", "fd00::2", "fd00::3"]);
        assert_eq!(all(&Sources::range("::1/128").unwrap()), ["::1"]);
        assert_eq!(Sources::range("::/0").unwrap().len(), MAX_SOURCES);
        assert_eq!(Sources::range("fd00::/64").unwrap().len(), MAX_SOURCES);
    }

    #[test]
    fn addresses_go_round_robin() {
        let s = Sources::range("127.0.0.0/30").unwrap();
        let got: Vec<String> = (0..5).map(|_| s.next().to_string()).collect();
        assert_eq!(
            got,
            [
                "127.0.0.1",
                "127.0.0.2",
                "127.0.0.1",
                "127.0.0.2",
                "127.0.0.1"
            ]
        );
        let one = Sources::single("127.0.0.2").unwrap();
        assert_eq!(one.next(), one.next());
    }

    #[test]
    fn bad_addresses_and_ranges_are_refused_with_the_reason() {
        for (text, why) in [
            ("127.0.0.0", "expected ADDRESS/PREFIX"),
            ("127.0.0.0/33", "not 0 to 32"),
            ("fd00::/129", "not 0 to 128"),
            ("127.0.0.0/x", "prefix length 'x'"),
            ("127.0.0/24", "not an IP address"),
            ("127.0.0.5/29", "the range is 127.0.0.0/29"),
            ("fd00::1/64", "the range is fd00::/64"),
        ] {
            let e = Sources::range(text).unwrap_err();
            assert!(e.contains(why) && e.contains(text), "{text}: {e}");
        }
        for text in [
            "localhost",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "1.2.3",
        ] {
            assert!(Sources::single(text).is_err(), "{text}");
        }
    }

    #[test]
    fn loopback_addresses_bind_and_foreign_ones_do_not() {
        assert!(Sources::range("127.0.0.0/29").unwrap().check().is_ok());
        // TEST-NET-3 (RFC 5737) is on no machine.
        let e = Sources::single("203.0.113.9").unwrap().check().unwrap_err();
        assert!(e.contains("203.0.113.9"), "{e}");
    }
}
