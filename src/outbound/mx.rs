//! The rules of MX routing (RFC 5321 §5.1, RFC 7505), as values in and values out: no DNS,
//! no clock, no hidden randomness. [`super::dns`] asks DNS and feeds the answers here;
//! [`super::route`] turns the [`Route`] that comes out into an SMTP reply.
//!
//! - Order: MX hosts by preference, each run of equal preferences shuffled with a random
//!   source the caller passes in ([`order`]); each host's addresses (A first, then AAAA) all
//!   before the next host's. At most [`MAX_MX_HOSTS`] hosts and [`MAX_TARGETS`] addresses.
//! - Null MX (`0 .`, RFC 7505): when every MX host is `.`, the domain takes no mail; a `.`
//!   among real hosts is ignored.
//! - Implicit MX: no MX records, so the domain itself at preference 0.
//! - Loops: when we are one of the MX hosts (by name, or by address and port, a wildcard
//!   listen address standing for every loopback address), only hosts more preferred than we
//!   are remain; if none does, the mail would loop.
//! - Address literals: `[192.0.2.1]`, `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3).
//! - Cache lifetimes: the smallest TTL of the records an answer came from (negative answers:
//!   the SOA minimum), clamped to a floor and a ceiling; temporary failures at most
//!   [`MAX_TEMP_TTL`].
//!
//! A lookup runs in two steps around the address queries: [`Rules::exchanges`] reads the
//! MX answer and says which hosts to ask for addresses, in order; [`Rules::decide`] reads
//! their answers and gives the [`Decision`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// At most this many MX hosts are looked at (a hostile zone could list hundreds).
pub const MAX_MX_HOSTS: usize = 16;
/// At most this many addresses are returned.
pub const MAX_TARGETS: usize = 32;
/// Temporary failures are cached no longer than this.
pub const MAX_TEMP_TTL: Duration = Duration::from_secs(5);

/// One address to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The MX host's name (for logs and `Remote-MTA:`), without the trailing dot.
    pub host: String,
    /// Its MX preference (0 for the implicit MX and address literals).
    pub preference: u16,
    /// Where to connect.
    pub addr: SocketAddr,
}

/// Where mail for a domain goes, in mail-routing terms (the replies are
/// [`super::route`]'s business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Addresses in the order to try them (never empty).
    Deliver(Vec<Target>),
    /// The domain does not exist (NXDOMAIN).
    NoSuchDomain,
    /// The domain exists but has neither MX nor address records.
    NoMxNoAddress,
    /// The domain says it takes no mail (RFC 7505).
    NullMx,
    /// Every usable MX host is us, or less preferred than us: mail would loop.
    Loop,
    /// Bracketed, but neither an IPv4 nor an `IPv6:` address.
    BadLiteral,
    /// Not something DNS can be asked about.
    BadName,
    /// There are MX hosts, but none has an address: each host with why, comma-separated.
    NoAddressForMx {
        /// `host (why)` for each host, joined by `, `.
        missing: String,
    },
    /// DNS failed for now (SERVFAIL, timeout, refusal, network): what failed.
    TempFail(String),
}

/// A [`Route`] and how long it may be cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Where the mail goes.
    pub route: Route,
    /// How long this holds (zero: do not keep it).
    pub ttl: Duration,
}

/// What one DNS query gave, in the terms the rules need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    /// Records of the type asked for (possibly none).
    Found(Vec<T>),
    /// The name exists but has no records of the type; the negative TTL if an SOA came.
    NoData(Option<Duration>),
    /// The name does not exist; the negative TTL if an SOA came.
    NxDomain(Option<Duration>),
    /// A temporary failure, described.
    Failed(String),
}

impl<T> Answer<T> {
    /// The same answer with the found records mapped by `f`.
    pub fn map<U>(self, f: impl FnOnce(Vec<T>) -> Vec<U>) -> Answer<U> {
        match self {
            Answer::Found(records) => Answer::Found(f(records)),
            Answer::NoData(t) => Answer::NoData(t),
            Answer::NxDomain(t) => Answer::NxDomain(t),
            Answer::Failed(why) => Answer::Failed(why),
        }
    }
}

/// One MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mx {
    /// Its preference (lower is tried first).
    pub preference: u16,
    /// The exchange's name without the trailing dot; the root (null MX) is `.`.
    pub host: String,
    /// The record's TTL.
    pub ttl: Duration,
}

/// One A or AAAA record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    /// The address.
    pub ip: IpAddr,
    /// The record's TTL.
    pub ttl: Duration,
}

/// The smallest TTL seen among the records an answer is made of (none yet: `None`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MinTtl(Option<Duration>);

impl MinTtl {
    /// A record with this TTL went into the answer.
    pub fn note(&mut self, ttl: Duration) {
        self.0 = Some(self.0.map_or(ttl, |t| t.min(ttl)));
    }

    /// A negative answer went into it, with the SOA minimum if one came.
    pub fn negative(&mut self, ttl: Option<Duration>) {
        if let Some(t) = ttl {
            self.note(t);
        }
    }

    /// Another answer went into it.
    pub fn merge(&mut self, other: MinTtl) {
        self.negative(other.0);
    }

    /// The smallest TTL, if any record came with one.
    pub fn get(self) -> Option<Duration> {
        self.0
    }
}

impl From<Duration> for MinTtl {
    fn from(ttl: Duration) -> Self {
        MinTtl(Some(ttl))
    }
}

/// What the address queries (A and AAAA) of one MX host gave.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostAddrs {
    /// Its addresses, IPv4 before IPv6, each once.
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL among them (or the SOA minimum of a negative answer).
    pub ttl: MinTtl,
    /// The host does not exist.
    pub nxdomain: bool,
    /// A query failed for now: what failed (the first failure).
    pub temp: Option<String>,
}

impl HostAddrs {
    /// From the A and the AAAA answers. `glue` (the MX answer's additional records for this
    /// host) stands in only when neither answer gave an address and one of them failed.
    pub fn new(a: Answer<Addr>, aaaa: Answer<Addr>, glue: &[Addr]) -> HostAddrs {
        let mut out = HostAddrs::default();
        for answer in [a, aaaa] {
            match answer {
                Answer::Found(records) => {
                    for r in &records {
                        out.add(r);
                    }
                }
                Answer::NoData(t) => out.ttl.negative(t),
                Answer::NxDomain(t) => {
                    out.ttl.negative(t);
                    out.nxdomain = true;
                }
                Answer::Failed(why) => {
                    out.temp.get_or_insert(why);
                }
            }
        }
        if out.addrs.is_empty() && out.temp.is_some() {
            for r in glue {
                out.add(r);
            }
        }
        // A before AAAA, whatever order the answers came in.
        out.addrs.sort_by_key(|ip| ip.is_ipv6());
        out
    }

    fn add(&mut self, r: &Addr) {
        self.ttl.note(r.ttl);
        if !self.addrs.contains(&r.ip) {
            self.addrs.push(r.ip);
        }
    }

    /// Why there is no address, for the deferral's reply.
    pub fn describe(&self) -> &str {
        match &self.temp {
            Some(why) => why,
            None if self.nxdomain => "no such host",
            None => "no address records",
        }
    }
}

/// The MX hosts to ask for addresses, from [`Rules::exchanges`], for [`Rules::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchanges {
    hosts: Vec<(u16, String)>,
    implicit: bool,
    ttl: MinTtl,
    /// Our own best preference among the hosts, if we are one of them.
    self_pref: Option<u16>,
}

impl Exchanges {
    /// `(preference, host)` in the order to try them: at most [`MAX_MX_HOSTS`], and only
    /// those more preferred than we are. Ask each for its addresses, and give
    /// [`Rules::decide`] the answers in this order.
    pub fn hosts(&self) -> &[(u16, String)] {
        &self.hosts
    }
}

/// The routing rules as one shard applies them: the SMTP port, the cache lifetimes, and
/// who we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    smtp_port: u16,
    min_ttl: Duration,
    max_ttl: Duration,
    /// Lower case, no trailing dot, none empty.
    our_names: Vec<String>,
    our_addrs: Vec<SocketAddr>,
}

impl Rules {
    /// Mail goes to `smtp_port`; answers are cached for `min_ttl ..= max_ttl`; an MX host
    /// named one of `our_names` (any case, trailing dot or not) or at one of `our_addrs` is
    /// us.
    pub fn new(
        smtp_port: u16,
        min_ttl: Duration,
        max_ttl: Duration,
        our_names: &[String],
        our_addrs: &[SocketAddr],
    ) -> Rules {
        Rules {
            smtp_port,
            min_ttl,
            max_ttl,
            our_names: our_names
                .iter()
                .map(|n| normalize(n))
                .filter(|n| !n.is_empty())
                .collect(),
            our_addrs: our_addrs.to_vec(),
        }
    }

    /// The cache lifetime of an answer made of records with these TTLs: their smallest,
    /// within the floor and the ceiling (the floor when none came with a TTL).
    pub fn cache_ttl(&self, ttl: MinTtl) -> Duration {
        let min = self.min_ttl;
        let max = self.max_ttl.max(min);
        ttl.0.unwrap_or(min).clamp(min, max)
    }

    /// The cache lifetime of a temporary failure: the floor, at most [`MAX_TEMP_TTL`].
    pub fn temp_ttl(&self) -> Duration {
        self.min_ttl.min(MAX_TEMP_TTL)
    }

    /// `host` (any case, trailing dot or not) is one of our names.
    pub fn is_our_name(&self, host: &str) -> bool {
        self.our_names.contains(&normalize(host))
    }

    /// Same IP and port as one of our listen addresses, or a loopback address where we
    /// listen on the wildcard address at that port.
    pub fn is_our_addr(&self, addr: SocketAddr) -> bool {
        self.our_addrs.iter().any(|ours| {
            ours.port() == addr.port()
                && (ours.ip() == addr.ip()
                    || (ours.ip().is_unspecified() && addr.ip().is_loopback()))
        })
    }

    /// An address literal (`key` normalized, brackets included): that address, unless it
    /// is ours. Never cached, so no lifetime.
    pub fn literal(&self, key: &str) -> Route {
        let Some(ip) = parse_literal(key) else {
            return Route::BadLiteral;
        };
        let addr = SocketAddr::new(ip, self.smtp_port);
        if self.is_our_addr(addr) {
            return Route::Loop;
        }
        Route::Deliver(vec![Target {
            host: key.to_string(),
            preference: 0,
            addr,
        }])
    }

    /// A domain DNS cannot be asked about: kept for the floor.
    pub fn bad_name(&self) -> Decision {
        Decision {
            route: Route::BadName,
            ttl: self.cache_ttl(MinTtl::default()),
        }
    }

    /// A DNS failure for the domain itself: kept briefly.
    pub fn temp_fail(&self, why: String) -> Decision {
        Decision {
            route: Route::TempFail(why),
            ttl: self.temp_ttl(),
        }
    }

    /// The first step, from the domain's MX answer: either the final decision (no such
    /// domain, null MX, a DNS failure), or the hosts to ask for addresses. `domain` is the
    /// name as asked, without the trailing dot: it is the implicit MX host. `random` orders
    /// hosts of equal preference.
    pub fn exchanges(
        &self,
        domain: &str,
        mx: Answer<Mx>,
        random: &mut impl FnMut() -> u64,
    ) -> Result<Exchanges, Decision> {
        let mut ttl = MinTtl::default();
        let mut hosts: Vec<(u16, String)> = Vec::new();
        match mx {
            Answer::Failed(why) => return Err(self.temp_fail(why)),
            Answer::NxDomain(t) => {
                ttl.negative(t);
                return Err(Decision {
                    route: Route::NoSuchDomain,
                    ttl: self.cache_ttl(ttl),
                });
            }
            Answer::NoData(t) => ttl.negative(t),
            Answer::Found(records) => {
                for r in records {
                    ttl.note(r.ttl);
                    hosts.push((r.preference, r.host));
                }
                if !hosts.is_empty() && hosts.iter().all(|(_, h)| is_root(h)) {
                    return Err(Decision {
                        route: Route::NullMx,
                        ttl: self.cache_ttl(ttl),
                    });
                }
                hosts.retain(|(_, h)| !is_root(h));
            }
        }
        // Hosts left empty here had no MX records at all: `.` alone was answered above.
        let implicit = hosts.is_empty();
        if implicit {
            hosts = vec![(0, domain.to_string())];
        }
        order(&mut hosts, random);
        hosts.truncate(MAX_MX_HOSTS);

        // RFC 5321 §5.1: if we are an MX host, only more preferred hosts may be used.
        let mut self_pref: Option<u16> = None;
        for (pref, host) in &hosts {
            if self.is_our_name(host) {
                self_pref = Some(self_pref.map_or(*pref, |p| p.min(*pref)));
            }
        }
        if let Some(p) = self_pref {
            hosts.retain(|(pref, _)| *pref < p);
        }
        Ok(Exchanges {
            hosts,
            implicit,
            ttl,
            self_pref,
        })
    }

    /// The second step: the decision from each host's addresses, `answers[i]` being those
    /// of `exchanges.hosts()[i]`.
    pub fn decide(&self, exchanges: Exchanges, answers: Vec<HostAddrs>) -> Decision {
        let Exchanges {
            hosts,
            implicit,
            mut ttl,
            mut self_pref,
        } = exchanges;
        let mut targets: Vec<Target> = Vec::new();
        let mut temp: Option<String> = None;
        let mut missing: Vec<String> = Vec::new();
        let mut domain_gone = false;
        for ((pref, host), answer) in hosts.into_iter().zip(answers) {
            ttl.merge(answer.ttl);
            if let Some(why) = &answer.temp {
                temp.get_or_insert_with(|| why.clone());
            }
            if answer.nxdomain && implicit {
                domain_gone = true;
            }
            if answer.addrs.is_empty() {
                missing.push(format!("{host} ({})", answer.describe()));
            }
            for ip in answer.addrs {
                let addr = SocketAddr::new(ip, self.smtp_port);
                if self.is_our_addr(addr) {
                    self_pref = Some(self_pref.map_or(pref, |p| p.min(pref)));
                }
                if targets.iter().all(|t| t.addr != addr) {
                    targets.push(Target {
                        host: host.clone(),
                        preference: pref,
                        addr,
                    });
                }
            }
        }
        if let Some(p) = self_pref {
            targets.retain(|t| t.preference < p);
        }
        targets.truncate(MAX_TARGETS);

        if !targets.is_empty() {
            let mut ttl = self.cache_ttl(ttl);
            if temp.is_some() {
                // Part of the answer is missing for now: ask again soon.
                ttl = ttl.min(self.temp_ttl());
            }
            return Decision {
                route: Route::Deliver(targets),
                ttl,
            };
        }
        if let Some(why) = temp {
            return self.temp_fail(why);
        }
        let ttl = self.cache_ttl(ttl);
        let route = if self_pref.is_some() {
            Route::Loop
        } else if implicit && domain_gone {
            Route::NoSuchDomain
        } else if implicit {
            Route::NoMxNoAddress
        } else {
            // Like every deferral, kept only briefly: the next attempt asks again.
            return Decision {
                route: Route::NoAddressForMx {
                    missing: missing.join(", "),
                },
                ttl: ttl.min(self.temp_ttl()),
            };
        };
        Decision { route, ttl }
    }
}

/// Sorts by preference and shuffles each run of equal preferences (Fisher–Yates, drawing
/// from `random`).
pub fn order<T>(hosts: &mut [(u16, T)], random: &mut impl FnMut() -> u64) {
    hosts.sort_by_key(|(pref, _)| *pref);
    let mut start = 0;
    while start < hosts.len() {
        let pref = hosts[start].0;
        let end = start + hosts[start..].iter().take_while(|h| h.0 == pref).count();
        for i in (start + 1..end).rev() {
            let j = start + (random() % (i - start + 1) as u64) as usize;
            hosts.swap(i, j);
        }
        start = end;
    }
}

/// A small seeded random source for [`order`] (xorshift64*): shuffling MX hosts spreads
/// load, it protects nothing, so it need not be strong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xorshift64(u64);

impl Xorshift64 {
    /// A generator from `seed` (zero, which xorshift cannot leave, is taken as one).
    pub fn new(seed: u64) -> Self {
        Xorshift64(seed.max(1))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A domain as a cache key and in replies: lower case, no trailing dot, no surrounding
/// space.
pub fn normalize(domain: &str) -> String {
    domain.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The address in an address literal: `[192.0.2.1]` or `[IPv6:2001:db8::1]` (the tag in
/// any case); `None` for anything else.
pub fn parse_literal(key: &str) -> Option<IpAddr> {
    let inner = key.strip_prefix('[')?.strip_suffix(']')?;
    match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("ipv6:") => {
            inner[5..].parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        }
        _ => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// The root name, which as an MX host means "no mail" (RFC 7505).
fn is_root(host: &str) -> bool {
    host.is_empty() || host == "."
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: u16 = 2999;

    fn rules() -> Rules {
        Rules::new(PORT, Duration::ZERO, Duration::from_secs(3600), &[], &[])
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn mx(preference: u16, host: &str) -> Mx {
        Mx {
            preference,
            host: host.into(),
            ttl: secs(300),
        }
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    fn sa(last: u8) -> SocketAddr {
        SocketAddr::new(v4(last), PORT)
    }

    fn addr(ip: IpAddr) -> Addr {
        Addr { ip, ttl: secs(300) }
    }

    /// A host with these addresses (A and AAAA answered as given).
    fn host(ips: &[IpAddr]) -> HostAddrs {
        let (v6, v4): (Vec<IpAddr>, Vec<IpAddr>) = ips.iter().partition(|ip| ip.is_ipv6());
        let found = |ips: Vec<IpAddr>| {
            if ips.is_empty() {
                Answer::NoData(None)
            } else {
                Answer::Found(ips.into_iter().map(addr).collect())
            }
        };
        HostAddrs::new(found(v4), found(v6), &[])
    }

    fn no_random() -> impl FnMut() -> u64 {
        || 0
    }

    /// Runs both steps: `addrs(host)` answers each host's address queries.
    fn route_with(
        rules: &Rules,
        domain: &str,
        mx: Answer<Mx>,
        addrs: impl Fn(&str) -> HostAddrs,
    ) -> Decision {
        match rules.exchanges(domain, mx, &mut no_random()) {
            Err(done) => done,
            Ok(ex) => {
                let answers = ex.hosts().iter().map(|(_, h)| addrs(h)).collect();
                rules.decide(ex, answers)
            }
        }
    }

    fn targets(d: Decision) -> Vec<Target> {
        match d.route {
            Route::Deliver(t) => t,
            other => panic!("expected Deliver, got {other:?}"),
        }
    }

    fn addrs_of(d: Decision) -> Vec<SocketAddr> {
        targets(d).into_iter().map(|t| t.addr).collect()
    }

    #[test]
    fn hosts_by_preference_and_equal_preferences_shuffled() {
        let records = vec![mx(20, "b"), mx(10, "a1"), mx(10, "a2"), mx(5, "first")];
        let mut seen = std::collections::HashSet::new();
        for seed in 1..40 {
            let mut rng = Xorshift64::new(seed);
            let ex = rules()
                .exchanges("d.test", Answer::Found(records.clone()), &mut || {
                    rng.next_u64()
                })
                .unwrap();
            let names: Vec<&str> = ex.hosts().iter().map(|(_, h)| h.as_str()).collect();
            assert_eq!(names[0], "first");
            assert_eq!(names[3], "b", "lowest preference last: {names:?}");
            seen.insert(names[1].to_string());
        }
        assert_eq!(seen.len(), 2, "both orders of a1 and a2 occur: {seen:?}");

        // The shuffle is the random source's: the same numbers, the same order.
        let mut hosts = vec![(10, 'a'), (10, 'b'), (10, 'c'), (1, 'z')];
        order(&mut hosts, &mut || 0);
        assert_eq!(hosts, vec![(1, 'z'), (10, 'b'), (10, 'c'), (10, 'a')]);
    }

    #[test]
    fn each_hosts_addresses_come_together_a_before_aaaa() {
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let d = route_with(
            &rules(),
            "dual.test",
            Answer::Found(vec![mx(10, "one.dual.test"), mx(20, "two.dual.test")]),
            |h| match h {
                // AAAA answered first: A still comes first.
                "one.dual.test" => HostAddrs::new(
                    Answer::Found(vec![addr(v4(1)), addr(v4(2))]),
                    Answer::Found(vec![addr(v6("::1"))]),
                    &[],
                ),
                _ => host(&[v6("::2"), v4(3)]),
            },
        );
        let got: Vec<(String, SocketAddr)> =
            targets(d).into_iter().map(|t| (t.host, t.addr)).collect();
        let v6sa = |s: &str| SocketAddr::new(s.parse().unwrap(), PORT);
        assert_eq!(
            got,
            vec![
                ("one.dual.test".into(), sa(1)),
                ("one.dual.test".into(), sa(2)),
                ("one.dual.test".into(), v6sa("::1")),
                ("two.dual.test".into(), sa(3)),
                ("two.dual.test".into(), v6sa("::2")),
            ]
        );
    }

    #[test]
    fn an_address_shared_by_two_hosts_is_tried_once() {
        let d = route_with(
            &rules(),
            "d.test",
            Answer::Found(vec![mx(10, "a"), mx(20, "b")]),
            |_| host(&[v4(1)]),
        );
        let t = targets(d);
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].host.as_str(), t[0].preference), ("a", 10));
    }

    #[test]
    fn hosts_and_targets_are_capped() {
        let records: Vec<Mx> = (0..100).map(|i| mx(i, &format!("mx{i}"))).collect();
        let ex = rules()
            .exchanges("d.test", Answer::Found(records), &mut no_random())
            .unwrap();
        assert_eq!(ex.hosts().len(), MAX_MX_HOSTS);
        assert_eq!(ex.hosts()[0], (0, "mx0".to_string()));

        let many: Vec<IpAddr> = (0..200u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
            .collect();
        let d = route_with(
            &rules(),
            "big.test",
            Answer::Found(vec![mx(10, "mx.big.test")]),
            |_| host(&many),
        );
        let t = targets(d);
        assert_eq!(t.len(), MAX_TARGETS);
        assert_eq!(
            t[0].addr,
            SocketAddr::new(Ipv4Addr::new(127, 0, 1, 0).into(), PORT)
        );
    }

    #[test]
    fn null_mx_takes_no_mail_and_a_dot_among_real_hosts_is_ignored() {
        let d = route_with(
            &rules(),
            "null.test",
            Answer::Found(vec![Mx {
                ttl: secs(60),
                ..mx(0, ".")
            }]),
            |_| panic!("no address is asked for"),
        );
        assert_eq!(d.route, Route::NullMx);
        assert_eq!(d.ttl, secs(60), "cached like any answer");

        let d = route_with(
            &rules(),
            "mixed.test",
            Answer::Found(vec![mx(0, "."), mx(10, "mx.mixed.test")]),
            |h| {
                assert_eq!(h, "mx.mixed.test");
                host(&[v4(10)])
            },
        );
        assert_eq!(addrs_of(d), vec![sa(10)]);
    }

    #[test]
    fn no_mx_records_means_the_domain_itself_at_preference_0() {
        for mx in [Answer::NoData(Some(secs(30))), Answer::Found(Vec::new())] {
            let d = route_with(&rules(), "plain.test", mx, |h| {
                assert_eq!(h, "plain.test");
                host(&[v4(7), "::1".parse().unwrap()])
            });
            let t = targets(d);
            assert_eq!(t.len(), 2);
            assert!(t
                .iter()
                .all(|t| t.preference == 0 && t.host == "plain.test"));
            assert_eq!(t[0].addr, sa(7));
        }

        // Neither MX nor address: a permanent failure; no such domain if the name is gone.
        let d = route_with(&rules(), "nomail.test", Answer::NoData(None), |_| host(&[]));
        assert_eq!(d.route, Route::NoMxNoAddress);
        let gone = HostAddrs::new(Answer::NxDomain(None), Answer::NxDomain(None), &[]);
        let d = route_with(&rules(), "gone.test", Answer::NoData(None), |_| {
            gone.clone()
        });
        assert_eq!(d.route, Route::NoSuchDomain);
    }

    #[test]
    fn nxdomain_and_dns_failures_of_the_domain() {
        let r = Rules::new(PORT, secs(1), secs(3600), &[], &[]);
        let d = route_with(&r, "nowhere.test", Answer::NxDomain(Some(secs(30))), |_| {
            panic!("no address is asked for")
        });
        assert_eq!(
            d,
            Decision {
                route: Route::NoSuchDomain,
                ttl: secs(30)
            }
        );
        let d = route_with(
            &r,
            "flaky.test",
            Answer::Failed("MX flaky.test: SERVFAIL".into()),
            |_| panic!("no address is asked for"),
        );
        assert_eq!(
            d,
            Decision {
                route: Route::TempFail("MX flaky.test: SERVFAIL".into()),
                ttl: secs(1)
            }
        );
    }

    #[test]
    fn hosts_without_addresses_are_skipped_and_all_missing_defers() {
        let r = rules();
        let mx2 = || Answer::Found(vec![mx(10, "gone.half.test"), mx(20, "mx.half.test")]);
        let d = route_with(&r, "half.test", mx2(), |h| match h {
            "mx.half.test" => host(&[v4(5)]),
            _ => HostAddrs::new(Answer::NxDomain(None), Answer::NxDomain(None), &[]),
        });
        assert_eq!(addrs_of(d), vec![sa(5)]);

        let d = route_with(&r, "broken.test", mx2(), |h| match h {
            "mx.half.test" => host(&[]),
            _ => HostAddrs::new(Answer::NxDomain(None), Answer::NxDomain(None), &[]),
        });
        assert_eq!(
            d.route,
            Route::NoAddressForMx {
                missing: "gone.half.test (no such host), mx.half.test (no address records)".into()
            }
        );

        // A host whose lookups failed for now: the deferral names the failure.
        let d = route_with(&r, "flaky.test", mx2(), |h| match h {
            "mx.half.test" => host(&[]),
            _ => HostAddrs::new(
                Answer::Failed("A gone.half.test: timed out".into()),
                Answer::NoData(None),
                &[],
            ),
        });
        assert_eq!(
            d.route,
            Route::TempFail("A gone.half.test: timed out".into())
        );
    }

    #[test]
    fn glue_stands_in_only_when_a_query_failed() {
        let glue = [addr(v4(44))];
        let failed = HostAddrs::new(
            Answer::Failed("A mx: SERVFAIL".into()),
            Answer::Failed("AAAA mx: SERVFAIL".into()),
            &glue,
        );
        assert_eq!(failed.addrs, vec![v4(44)]);
        assert_eq!(failed.temp.as_deref(), Some("A mx: SERVFAIL"));
        let empty = HostAddrs::new(Answer::NoData(None), Answer::NoData(None), &glue);
        assert!(empty.addrs.is_empty(), "a real 'no address' wins over glue");
        let found = HostAddrs::new(
            Answer::Found(vec![addr(v4(1))]),
            Answer::Failed("AAAA mx: SERVFAIL".into()),
            &glue,
        );
        assert_eq!(found.addrs, vec![v4(1)]);
    }

    #[test]
    fn loops_by_name_and_by_address() {
        let us = Rules::new(
            PORT,
            Duration::ZERO,
            secs(3600),
            &["Relay.US.test.".into()],
            &[sa(60)],
        );
        // By name: we are the only MX, and need not be looked up.
        let d = route_with(
            &us,
            "us.test",
            Answer::Found(vec![mx(10, "relay.us.test")]),
            |_| panic!("no need to look us up"),
        );
        assert_eq!(d.route, Route::Loop);

        // By address: another name for one of our listen addresses.
        let d = route_with(
            &us,
            "alias.test",
            Answer::Found(vec![mx(10, "alias-mx.test")]),
            |_| host(&[v4(60)]),
        );
        assert_eq!(d.route, Route::Loop);

        // Only hosts more preferred than we are remain.
        let backup = |ours: &str| {
            Answer::Found(vec![
                mx(5, "primary.backup.test"),
                mx(10, ours),
                mx(20, "tertiary.backup.test"),
            ])
        };
        let addrs = |h: &str| match h {
            "primary.backup.test" => host(&[v4(5)]),
            "alias-mx.test" => host(&[v4(60)]),
            "tertiary.backup.test" => host(&[v4(20)]),
            other => panic!("{other} is not asked for"),
        };
        let d = route_with(&us, "backup.test", backup("relay.us.test"), addrs);
        assert_eq!(addrs_of(d), vec![sa(5)]);
        let d = route_with(&us, "backup2.test", backup("alias-mx.test"), addrs);
        assert_eq!(addrs_of(d), vec![sa(5)]);

        // An address of ours on another port is not a loop.
        let other_port = Rules::new(
            PORT,
            Duration::ZERO,
            secs(3600),
            &[],
            &[SocketAddr::new(v4(60), PORT + 1)],
        );
        let alias = || Answer::Found(vec![mx(10, "alias-mx.test")]);
        let d = route_with(&other_port, "otherport.test", alias(), |_| host(&[v4(60)]));
        assert_eq!(addrs_of(d), vec![sa(60)]);

        // Listening on the wildcard address: any loopback address is us.
        let wildcard = Rules::new(
            PORT,
            Duration::ZERO,
            secs(3600),
            &[],
            &[SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT)],
        );
        let d = route_with(&wildcard, "otherport.test", alias(), |_| host(&[v4(60)]));
        assert_eq!(d.route, Route::Loop);
    }

    #[test]
    fn address_literals() {
        let r = Rules::new(PORT, Duration::ZERO, secs(3600), &[], &[sa(1)]);
        let deliver = |key: &str| match r.literal(key) {
            Route::Deliver(t) => t.into_iter().map(|t| t.addr).collect::<Vec<_>>(),
            other => panic!("expected Deliver, got {other:?}"),
        };
        assert_eq!(deliver("[127.0.0.9]"), vec![sa(9)]);
        assert_eq!(
            deliver("[ipv6:::1]"),
            vec![SocketAddr::new(Ipv6Addr::LOCALHOST.into(), PORT)]
        );
        assert_eq!(r.literal("[127.0.0.1]"), Route::Loop);
        for bad in [
            "[nonsense]",
            "[IPv6:127.0.0.1]",
            "[1.2.3]",
            "[]",
            "[é]",
            "127.0.0.1",
        ] {
            assert_eq!(r.literal(bad), Route::BadLiteral, "{bad}");
        }
        assert_eq!(
            parse_literal("[IPv6:2001:DB8::1]"),
            "2001:db8::1".parse().ok()
        );
    }

    #[test]
    fn cache_lifetimes() {
        let r = Rules::new(PORT, secs(2), secs(100), &[], &[]);
        // The smallest TTL of the records, within floor and ceiling.
        let short = Answer::Found(vec![Mx {
            ttl: secs(1),
            ..mx(10, "mx")
        }]);
        let ok = |_: &str| host(&[v4(1)]);
        assert_eq!(route_with(&r, "d", short, ok).ttl, secs(2), "floor");
        let long = || {
            Answer::Found(vec![Mx {
                ttl: secs(500),
                ..mx(10, "mx")
            }])
        };
        assert_eq!(route_with(&r, "d", long(), ok).ttl, secs(100), "ceiling");
        let addr_ttl = |_: &str| {
            HostAddrs::new(
                Answer::Found(vec![Addr {
                    ip: v4(1),
                    ttl: secs(50),
                }]),
                Answer::NoData(Some(secs(70))),
                &[],
            )
        };
        assert_eq!(
            route_with(&r, "d", long(), addr_ttl).ttl,
            secs(50),
            "the address's"
        );
        // Negative answers: the SOA minimum, and the floor without one.
        assert_eq!(
            route_with(&r, "d", Answer::NxDomain(Some(secs(30))), ok).ttl,
            secs(30)
        );
        assert_eq!(route_with(&r, "d", Answer::NxDomain(None), ok).ttl, secs(2));
        assert_eq!(r.bad_name().ttl, secs(2));
        // Temporary failures: at most five seconds, and a partial answer too.
        let slow = Rules::new(PORT, secs(60), secs(100), &[], &[]);
        assert_eq!(
            route_with(&slow, "d", Answer::Failed("x".into()), ok).ttl,
            MAX_TEMP_TTL
        );
        assert_eq!(r.temp_ttl(), secs(2));
        let partial = |h: &str| match h {
            "a" => host(&[v4(1)]),
            _ => HostAddrs::new(
                Answer::Failed("A b: timed out".into()),
                Answer::NoData(None),
                &[],
            ),
        };
        let two = || Answer::Found(vec![mx(10, "a"), mx(20, "b")]);
        let d = route_with(&slow, "d", two(), partial);
        assert_eq!(addrs_of(d.clone()), vec![sa(1)]);
        assert_eq!(d.ttl, MAX_TEMP_TTL, "part missing: asked again soon");
        // A ceiling below the floor: the floor wins.
        let odd = Rules::new(PORT, secs(10), secs(5), &[], &[]);
        assert_eq!(odd.cache_ttl(MinTtl::from(secs(1000))), secs(10));
    }

    #[test]
    fn names_compare_in_lower_case_without_the_trailing_dot() {
        assert_eq!(normalize(" Example.COM. "), "example.com");
        let r = Rules::new(
            PORT,
            Duration::ZERO,
            secs(1),
            &["MX.Example.com.".into(), "".into()],
            &[],
        );
        assert!(r.is_our_name("mx.example.COM"));
        assert!(!r.is_our_name(""), "an empty name of ours matches nothing");
    }

    #[test]
    fn the_seeded_source_is_deterministic_and_never_stuck_at_zero() {
        let (mut a, mut b) = (Xorshift64::new(7), Xorshift64::new(7));
        assert_eq!(a.next_u64(), b.next_u64());
        let mut z = Xorshift64::new(0);
        assert_ne!(z.next_u64(), z.next_u64());
    }
}
