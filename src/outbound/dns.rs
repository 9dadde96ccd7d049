//! MX routing over DNS: hickory-resolver asks, [`super::mx`] decides, and each shard keeps
//! the answers in its own caches.
//!
//! [`MxResolver::resolve`] turns a recipient domain into an [`mx::Route`]. It asks for the
//! domain's MX records, then for the A and AAAA records of the hosts [`mx::Rules`] picks,
//! all at once; it maps hickory's answers and errors into the rules' inputs ([`mx::Answer`]:
//! found, no data, no such name with its SOA minimum, or a temporary failure with what
//! failed: SERVFAIL, REFUSED, a timeout, a network error). It asks for nothing the rules can
//! settle alone (address literals, names DNS cannot take).
//!
//! Two caches per shard, neither shared: the final route per domain, for as long as the
//! rules say ([`SingleFlight`], so concurrent calls for one domain share one lookup), and
//! each MX host's addresses, so that domains sharing hosts share their lookups.
//! [`SingleFlight`] also serves [`super::route::HopCache`]. hickory's own cache is turned
//! off so that these are the only ones. Nothing here is `Send`.

use std::borrow::Borrow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig as DnsConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use tokio::sync::watch;

use super::mx::{self, Addr, Answer, Decision, HostAddrs, MinTtl, Mx, Route, Rules, Xorshift64};
use crate::config::Config;

/// Expired cache entries are swept once a cache has grown past this many entries.
const SWEEP_FLOOR: usize = 1024;

/// How a shard resolves mail domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// DNS servers (ip:port); empty = the system's resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// Port SMTP is delivered to on MX hosts (25; tests use another).
    pub smtp_port: u16,
    /// Cache TTL floor applied to every answer.
    pub min_ttl: Duration,
    /// Cache TTL ceiling applied to every answer.
    pub max_ttl: Duration,
    /// Per-query timeout (then it is a temporary failure).
    pub timeout: Duration,
    /// Our own host names: an MX host with one of them is a loop.
    pub our_names: Vec<String>,
    /// Our listen addresses: an MX address equal to one of them is a loop.
    pub our_addrs: Vec<SocketAddr>,
}

impl Default for ResolverConfig {
    /// The system resolver, port 25, TTLs clamped to 1 s ..= 1 day, 10 s per query, and no
    /// names or addresses of our own.
    fn default() -> Self {
        ResolverConfig {
            nameservers: Vec::new(),
            smtp_port: 25,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(86_400),
            timeout: Duration::from_secs(10),
            our_names: Vec::new(),
            our_addrs: Vec::new(),
        }
    }
}

impl ResolverConfig {
    /// From the validated configuration: `[delivery]`'s name servers, SMTP port and DNS
    /// limits; our host name; our listen addresses.
    pub fn from_config(config: &Config) -> Self {
        let d = &config.delivery;
        let hostname = config.effective_hostname();
        ResolverConfig {
            nameservers: d.nameservers.clone(),
            smtp_port: d.smtp_port,
            min_ttl: Duration::from_secs(d.dns_min_ttl_secs),
            max_ttl: Duration::from_secs(d.dns_max_ttl_secs),
            timeout: Duration::from_secs(d.dns_timeout_secs.max(1)),
            our_names: if hostname.is_empty() {
                Vec::new()
            } else {
                vec![hostname]
            },
            our_addrs: config.listen.clone(),
        }
    }
}

/// Counters of one resolver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResolverStats {
    /// Calls to [`MxResolver::resolve`].
    pub lookups: u64,
    /// Calls answered from the cache, or by joining a lookup already in progress.
    pub cache_hits: u64,
    /// DNS queries sent (MX, A, AAAA; hickory's own retransmissions not counted).
    pub queries: u64,
}

/// One shard's resolver and caches (single-threaded: `RefCell`s inside, never shared).
pub struct MxResolver {
    config: ResolverConfig,
    rules: Rules,
    dns: TokioResolver,
    /// The final route per domain.
    cache: SingleFlight<String, Route>,
    /// Address answers per MX host name, so domains sharing hosts share lookups.
    hosts: RefCell<HashMap<Name, (HostAddrs, Instant)>>,
    /// Orders MX hosts of equal preference.
    rng: Cell<Xorshift64>,
    lookups: Cell<u64>,
    queries: Cell<u64>,
}

impl fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MxResolver")
            .field("config", &self.config)
            .field("cached", &self.cache.len())
            .field("stats", &self.stats())
            .finish()
    }
}

impl MxResolver {
    /// A resolver for one shard. It may be built outside a runtime, but must then be used
    /// inside one single runtime (hickory runs its connections as tasks of that runtime).
    ///
    /// Fails if `nameservers` is empty and the system configuration cannot be read.
    pub fn new(config: ResolverConfig) -> io::Result<MxResolver> {
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| {
                io::Error::other(format!(
                    "cannot read the system resolver configuration (/etc/resolv.conf): {e}; \
                     set delivery.nameservers or --nameserver"
                ))
            })?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|ns| {
                    // UDP first; TCP when an answer comes back truncated.
                    let mut udp = ConnectionConfig::udp();
                    udp.port = ns.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = ns.port();
                    NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                DnsConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        // Our cache is the one that counts; hickory's would hide TTL expiry from it.
        opts.cache_size = 0;
        opts.timeout = config.timeout;
        opts.attempts = 2;
        // Mail routing is DNS only: /etc/hosts must not redirect an MX host.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = false;
        let dns = builder
            .build()
            .map_err(|e| io::Error::other(format!("cannot set up the DNS resolver: {e}")))?;
        let rules = Rules::new(
            config.smtp_port,
            config.min_ttl,
            config.max_ttl,
            &config.our_names,
            &config.our_addrs,
        );
        Ok(MxResolver {
            config,
            rules,
            dns,
            cache: SingleFlight::new(),
            hosts: RefCell::new(HashMap::new()),
            rng: Cell::new(Xorshift64::new(seed())),
            lookups: Cell::new(0),
            queries: Cell::new(0),
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &ResolverConfig {
        &self.config
    }

    /// Where mail for `domain` goes now (cached; concurrent calls for the same domain
    /// share one lookup — single flight within the shard).
    ///
    /// `domain` is the part after `@`: a domain name (any case, trailing dot or not), or an
    /// address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`), which is answered without DNS.
    pub async fn resolve(&self, domain: &str) -> Route {
        bump(&self.lookups);
        let key = mx::normalize(domain);
        if key.starts_with('[') {
            return self.rules.literal(&key);
        }
        self.cache
            .get_or_run(&key, Instant::now(), || async {
                let Decision { route, ttl } = self.lookup(&key).await;
                let keep = (!ttl.is_zero()).then(|| Instant::now() + ttl);
                (route, keep)
            })
            .await
    }

    /// Counters so far.
    pub fn stats(&self) -> ResolverStats {
        ResolverStats {
            lookups: self.lookups.get(),
            cache_hits: self.cache.hits(),
            queries: self.queries.get(),
        }
    }

    /// The uncached lookup: the MX query, then the address queries of the hosts the rules
    /// pick, all at once.
    async fn lookup(&self, domain: &str) -> Decision {
        let Some(name) = dns_name(domain) else {
            return self.rules.bad_name();
        };
        let (mx, additionals) = self.query(&name, RecordType::MX).await;
        // The names behind the host names the rules get, to ask DNS about them: the MX
        // exchanges, and the domain itself as its implicit MX.
        let mut names: HashMap<String, Name> = HashMap::new();
        let mx = mx.map(|records| {
            records
                .into_iter()
                .filter_map(|r| match r.data {
                    RData::MX(record) => {
                        let exchange = record.exchange;
                        let host = if exchange.is_root() {
                            ".".to_string()
                        } else {
                            display(&exchange)
                        };
                        names.entry(host.clone()).or_insert(exchange);
                        Some(Mx {
                            preference: record.preference,
                            host,
                            ttl: secs(r.ttl),
                        })
                    }
                    _ => None,
                })
                .collect()
        });
        let implicit = display(&name);
        names.entry(implicit.clone()).or_insert(name);
        let mut rng = self.rng.get();
        let exchanges = self.rules.exchanges(&implicit, mx, &mut || rng.next_u64());
        self.rng.set(rng);
        let exchanges = match exchanges {
            Ok(exchanges) => exchanges,
            Err(decision) => return decision,
        };
        let answers = join_all(exchanges.hosts().iter().map(|(_, host)| async {
            match names.get(host) {
                Some(name) => self.addresses(name, &additionals).await,
                // Every host the rules return is one they were given.
                None => HostAddrs::default(),
            }
        }))
        .await;
        self.rules.decide(exchanges, answers)
    }

    /// A and AAAA of one host: from the host cache while fresh, else asked at once, with
    /// glue as the fallback when DNS fails. Answers without a temporary failure are cached
    /// for their TTL (clamped like every answer).
    async fn addresses(&self, host: &Name, glue: &[Record]) -> HostAddrs {
        let now = Instant::now();
        if let Some((answer, expires)) = self.hosts.borrow().get(host) {
            if *expires > now {
                let mut answer = answer.clone();
                // What is left of its lifetime bounds the domain's cache time.
                answer.ttl = MinTtl::from(*expires - now);
                return answer;
            }
        }
        let answer = self.addresses_uncached(host, glue).await;
        if answer.temp.is_none() {
            let mut hosts = self.hosts.borrow_mut();
            if hosts.len() >= SWEEP_FLOOR {
                hosts.retain(|_, (_, expires)| *expires > now);
            }
            hosts.insert(
                host.clone(),
                (answer.clone(), now + self.rules.cache_ttl(answer.ttl)),
            );
        }
        answer
    }

    async fn addresses_uncached(&self, host: &Name, glue: &[Record]) -> HostAddrs {
        let ((a, _), (aaaa, _)) = tokio::join!(
            self.query(host, RecordType::A),
            self.query(host, RecordType::AAAA)
        );
        let glue: Vec<Addr> = glue
            .iter()
            .filter(|r| r.name == *host)
            .filter_map(addr)
            .collect();
        HostAddrs::new(a.map(addrs), aaaa.map(addrs), &glue)
    }

    /// One DNS query, bounded by the configured timeout: the answer section as the rules
    /// read it, and the additional section (glue).
    async fn query(&self, name: &Name, rtype: RecordType) -> (Answer<Record>, Vec<Record>) {
        bump(&self.queries);
        let what = format!("{rtype} {}", display(name));
        let result =
            tokio::time::timeout(self.config.timeout, self.dns.lookup(name.clone(), rtype)).await;
        let answer = match result {
            Err(_) => Answer::Failed(format!("{what}: timed out")),
            Ok(Ok(lookup)) => {
                return (
                    Answer::Found(lookup.answers().to_vec()),
                    lookup.additionals().to_vec(),
                )
            }
            Ok(Err(NetError::Dns(DnsError::NoRecordsFound(no)))) => {
                let ttl = no.negative_ttl.map(secs);
                match no.response_code {
                    ResponseCode::NXDomain => Answer::NxDomain(ttl),
                    ResponseCode::NoError => Answer::NoData(ttl),
                    code => Answer::Failed(format!("{what}: {}", rcode(code))),
                }
            }
            Ok(Err(NetError::Dns(DnsError::ResponseCode(code)))) => {
                Answer::Failed(format!("{what}: {}", rcode(code)))
            }
            Ok(Err(NetError::Timeout)) => Answer::Failed(format!("{what}: timed out")),
            Ok(Err(e)) => Answer::Failed(format!("{what}: {e}")),
        };
        (answer, Vec::new())
    }
}

/// A per-shard cache in which one lookup per key runs at a time (single flight): a value
/// is served while fresh; a caller that finds a lookup for its key in flight waits for that
/// lookup's answer instead of starting its own; otherwise it runs the lookup itself and
/// the others wait for it. The lookup says how long its answer may be served.
///
/// Single-threaded (`RefCell` inside, no borrow held across an `.await`): each shard owns
/// its own. If the caller running a lookup is dropped before it answers (a timeout, a
/// shutdown), its pending slot is taken away, and its waiters start over, one of them
/// running the lookup anew.
pub struct SingleFlight<K, V> {
    slots: RefCell<HashMap<K, Slot<V>>>,
    /// Expired entries are swept once the map has grown to this size.
    sweep_at: Cell<usize>,
    hits: Cell<u64>,
}

/// A value and until when it may be served, or a lookup in flight that others may wait
/// for (the sender is dropped without a value if that lookup is abandoned).
enum Slot<V> {
    Ready { value: V, expires: Instant },
    Pending(watch::Receiver<Option<V>>),
}

impl<K, V> fmt::Debug for SingleFlight<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFlight")
            .field("entries", &self.len())
            .field("hits", &self.hits.get())
            .finish()
    }
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            slots: RefCell::new(HashMap::new()),
            sweep_at: Cell::new(SWEEP_FLOOR),
            hits: Cell::new(0),
        }
    }
}

impl<K, V> SingleFlight<K, V> {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many calls were answered from the cache, or by joining a lookup in flight.
    pub fn hits(&self) -> u64 {
        self.hits.get()
    }

    /// Entries held (fresh, expired but not yet swept, or in flight).
    pub fn len(&self) -> usize {
        self.slots.try_borrow().map_or(0, |slots| slots.len())
    }

    /// No entries held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Clone + Eq + Hash, V: Clone> SingleFlight<K, V> {
    /// The value for `key`: the cached one if it is still fresh at `now`; else the answer
    /// of the lookup for `key` already in flight; else the answer of `run()`, which this
    /// call runs while later calls for `key` wait for it. `run` gives its value and until
    /// when the value may be served (`None`: not kept, the next call runs a lookup again).
    pub async fn get_or_run<Q, F, Fut>(&self, key: &Q, now: Instant, run: F) -> V
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = (V, Option<Instant>)>,
    {
        loop {
            let waiting = match self.slots.borrow().get(key) {
                Some(Slot::Ready { value, expires }) if *expires > now => {
                    bump(&self.hits);
                    return value.clone();
                }
                Some(Slot::Pending(rx)) => Some(rx.clone()),
                _ => None,
            };
            let Some(rx) = waiting else { break };
            if let Some(value) = await_flight(rx).await {
                bump(&self.hits);
                return value;
            }
            // The lookup we waited for was abandoned (its caller went away): start again.
        }
        self.lead(key.to_owned(), now, run).await
    }

    /// Runs the lookup others wait for, and keeps its answer as long as it says.
    async fn lead<F, Fut>(&self, key: K, now: Instant, run: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = (V, Option<Instant>)>,
    {
        let (tx, rx) = watch::channel(None);
        self.slots
            .borrow_mut()
            .insert(key.clone(), Slot::Pending(rx));
        let flight = Flight {
            slots: &self.slots,
            key: &key,
            done: false,
        };
        // No borrow is held across the lookup: other callers use the cache meanwhile.
        let (value, keep) = run().await;
        flight.land();
        {
            let mut slots = self.slots.borrow_mut();
            match keep {
                Some(expires) => {
                    slots.insert(
                        key,
                        Slot::Ready {
                            value: value.clone(),
                            expires,
                        },
                    );
                    self.maybe_sweep(&mut slots, now);
                }
                None => {
                    slots.remove(&key);
                }
            }
        }
        let _ = tx.send(Some(value.clone()));
        value
    }

    /// Drops expired entries once the map has doubled since the last sweep.
    fn maybe_sweep(&self, slots: &mut HashMap<K, Slot<V>>, now: Instant) {
        if slots.len() < self.sweep_at.get() {
            return;
        }
        slots.retain(|_, slot| match slot {
            Slot::Ready { expires, .. } => *expires > now,
            Slot::Pending(_) => true,
        });
        self.sweep_at.set((slots.len() * 2).max(SWEEP_FLOOR));
    }

    /// Forgets every entry (tests: make the next call look up again).
    #[cfg(test)]
    fn clear(&self) {
        self.slots.borrow_mut().clear();
    }
}

/// Takes the pending slot away if the leading lookup is abandoned before it finishes, so
/// that waiters (and later calls) start their own.
struct Flight<'a, K: Eq + Hash, V> {
    slots: &'a RefCell<HashMap<K, Slot<V>>>,
    key: &'a K,
    done: bool,
}

impl<K: Eq + Hash, V> Flight<'_, K, V> {
    /// The lookup finished: the slot is the leader's to fill.
    fn land(mut self) {
        self.done = true;
    }
}

impl<K: Eq + Hash, V> Drop for Flight<'_, K, V> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(mut slots) = self.slots.try_borrow_mut() {
            if matches!(slots.get(self.key), Some(Slot::Pending(_))) {
                slots.remove(self.key);
            }
        }
    }
}

/// Waits for the answer of a lookup another caller is running: `None` if that lookup was
/// abandoned before answering, and the waiter should start again.
async fn await_flight<T: Clone>(mut rx: watch::Receiver<Option<T>>) -> Option<T> {
    match rx.wait_for(Option::is_some).await {
        Ok(answer) => answer.clone(),
        Err(_) => None,
    }
}

fn bump(c: &Cell<u64>) {
    c.set(c.get().wrapping_add(1));
}

/// A record's TTL.
fn secs(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl))
}

/// The A and AAAA records among `records`.
fn addrs(records: Vec<Record>) -> Vec<Addr> {
    records.iter().filter_map(addr).collect()
}

/// An A or AAAA record's address.
fn addr(r: &Record) -> Option<Addr> {
    let ip = match r.data {
        RData::A(a) => IpAddr::V4(a.0),
        RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
        _ => return None,
    };
    Some(Addr {
        ip,
        ttl: secs(r.ttl),
    })
}

/// A host name for replies and targets: no trailing dot.
fn display(name: &Name) -> String {
    let s = name.to_ascii();
    s.strip_suffix('.').map(str::to_string).unwrap_or(s)
}

/// The fully qualified name to ask for (so no search domains apply).
fn dns_name(domain: &str) -> Option<Name> {
    if domain.is_empty() {
        return None;
    }
    let mut name = if domain.is_ascii() {
        Name::from_ascii(domain).ok()?
    } else {
        Name::from_utf8(domain).ok()?
    };
    name.set_fqdn(true);
    Some(name)
}

fn rcode(code: ResponseCode) -> String {
    match code {
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        other => other.to_string(),
    }
}

/// A seed for the shuffle: the clock, mixed, never zero.
fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    // Resolvers made in the same instant (one per shard) still differ.
    static MADE: AtomicU64 = AtomicU64::new(0);
    let n = MADE.fetch_add(1, Ordering::Relaxed);
    let mut x =
        nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    if x == 0 {
        1
    } else {
        x
    }
}

/// Runs futures concurrently on the current task (no spawning: tasks here are `!Send` and
/// there may be no `LocalSet`) and returns their outputs in order.
async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *output = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(test)]
#[path = "../../tests/dnsfix/mod.rs"]
mod dnsfix;

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::super::mx::{Target, MAX_TARGETS};
    use super::super::route::{self, HopCache, Plan, Routes};
    use super::dnsfix::DnsFixture;
    use super::*;
    use crate::smtp::Reply;

    const PORT: u16 = 2999;

    fn config(fix: &DnsFixture) -> ResolverConfig {
        ResolverConfig {
            nameservers: vec![fix.addr],
            smtp_port: PORT,
            min_ttl: Duration::ZERO,
            max_ttl: Duration::from_secs(3600),
            timeout: Duration::from_secs(2),
            our_names: Vec::new(),
            our_addrs: Vec::new(),
        }
    }

    fn resolver(fix: &DnsFixture) -> MxResolver {
        MxResolver::new(config(fix)).expect("resolver")
    }

    fn v4(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, last)
    }

    fn sa(last: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(v4(last)), PORT)
    }

    /// Where mail for `domain` goes as the queue manager sees it: [`route::plan`] with no
    /// static route, so through `r` (and its reply texts).
    async fn plan(r: &MxResolver, domain: &str) -> Plan {
        let hops = HopCache::new(Duration::from_secs(1));
        route::plan(&Routes::default(), &hops, Some(r), domain, Instant::now()).await
    }

    fn targets(p: Plan) -> Vec<Target> {
        match p {
            Plan::Targets(t) => t,
            other => panic!("expected Targets, got {other:?}"),
        }
    }

    fn addrs(p: Plan) -> Vec<SocketAddr> {
        targets(p).into_iter().map(|t| t.addr).collect()
    }

    fn bounce(p: Plan) -> Reply {
        match p {
            Plan::Fail(reply) => reply,
            other => panic!("expected Fail, got {other:?}"),
        }
    }

    fn defer(p: Plan) -> Reply {
        match p {
            Plan::Defer(reply) => reply,
            other => panic!("expected Defer, got {other:?}"),
        }
    }

    fn text(reply: &Reply) -> &str {
        reply.lines()[0].as_str()
    }

    #[tokio::test]
    async fn preference_order_and_equal_preferences_shuffled() {
        let fix = DnsFixture::start();
        fix.mx("shuffle.test", 20, "b.shuffle.test", 300);
        fix.mx("shuffle.test", 10, "a1.shuffle.test", 300);
        fix.mx("shuffle.test", 10, "a2.shuffle.test", 300);
        fix.a("a1.shuffle.test", v4(11), 300);
        fix.a("a2.shuffle.test", v4(12), 300);
        fix.a("b.shuffle.test", v4(20), 300);
        let mut cfg = config(&fix);
        cfg.min_ttl = Duration::ZERO;
        let r = MxResolver::new(cfg).unwrap();
        let mut a1_first = 0;
        let mut a2_first = 0;
        for _ in 0..40 {
            // Fresh resolutions: the shuffle happens per lookup.
            r.cache.clear();
            let t = targets(plan(&r, "shuffle.test").await);
            assert_eq!(t.len(), 3, "{t:?}");
            assert_eq!(t[0].preference, 10);
            assert_eq!(t[1].preference, 10);
            assert_eq!(t[2].addr, sa(20), "lowest preference last: {t:?}");
            assert_eq!(t[2].host, "b.shuffle.test");
            match t[0].addr {
                a if a == sa(11) => a1_first += 1,
                a if a == sa(12) => a2_first += 1,
                other => panic!("unexpected first target {other}"),
            }
        }
        assert!(
            a1_first > 0 && a2_first > 0,
            "both orders must occur: {a1_first}/{a2_first}"
        );
    }

    #[tokio::test]
    async fn each_hosts_addresses_come_together() {
        let fix = DnsFixture::start();
        fix.mx("dual.test", 10, "one.dual.test", 300);
        fix.mx("dual.test", 20, "two.dual.test", 300);
        fix.aaaa("one.dual.test", Ipv6Addr::LOCALHOST, 300);
        fix.a("one.dual.test", v4(1), 300);
        fix.a("one.dual.test", v4(2), 300);
        fix.a("two.dual.test", v4(3), 300);
        fix.aaaa("two.dual.test", "::2".parse().unwrap(), 300);
        let t = targets(plan(&resolver(&fix), "dual.test").await);
        let got: Vec<(String, SocketAddr)> = t.into_iter().map(|t| (t.host, t.addr)).collect();
        let v6 = |s: &str| SocketAddr::new(s.parse().unwrap(), PORT);
        assert_eq!(
            got,
            vec![
                ("one.dual.test".into(), sa(1)),
                ("one.dual.test".into(), sa(2)),
                ("one.dual.test".into(), v6("::1")),
                ("two.dual.test".into(), sa(3)),
                ("two.dual.test".into(), v6("::2")),
            ]
        );
        assert_eq!(fix.queries("one.dual.test", "A"), 1);
        assert_eq!(fix.queries("one.dual.test", "AAAA"), 1);
    }

    #[tokio::test]
    async fn implicit_mx_uses_the_domains_own_addresses() {
        let fix = DnsFixture::start();
        fix.a("plain.test", v4(7), 300);
        fix.aaaa("plain.test", Ipv6Addr::LOCALHOST, 300);
        let t = targets(plan(&resolver(&fix), "Plain.Test.").await);
        assert_eq!(t.len(), 2);
        assert!(t
            .iter()
            .all(|t| t.preference == 0 && t.host == "plain.test"));
        assert_eq!(t[0].addr, sa(7));
        assert_eq!(fix.queries("plain.test", "MX"), 1);

        // Neither MX nor address: a permanent failure.
        fix.mx("nomail.test", 10, "x.nomail.test", 300);
        fix.remove("nomail.test", "MX");
        let reply = bounce(plan(&resolver(&fix), "nomail.test").await);
        assert_eq!(reply.code(), 550);
        assert!(text(&reply).starts_with("5.1.2 "), "{reply}");
    }

    #[tokio::test]
    async fn null_mx_bounces_556() {
        let fix = DnsFixture::start();
        fix.mx("null.test", 0, ".", 300);
        fix.a("null.test", v4(9), 300);
        let r = resolver(&fix);
        let reply = bounce(plan(&r, "null.test").await);
        assert_eq!(reply.code(), 556);
        assert_eq!(
            text(&reply),
            "5.1.10 null.test does not accept mail (null MX)"
        );
        // Cached like any answer.
        let _ = plan(&r, "null.test").await;
        assert_eq!(fix.queries("null.test", "MX"), 1);
        assert_eq!(fix.queries("null.test", "A"), 0);

        // A "." among real hosts is ignored.
        fix.mx("mixed.test", 0, ".", 300);
        fix.mx("mixed.test", 10, "mx.mixed.test", 300);
        fix.a("mx.mixed.test", v4(10), 300);
        assert_eq!(addrs(plan(&r, "mixed.test").await), vec![sa(10)]);
    }

    #[tokio::test]
    async fn nxdomain_bounces_and_bad_hosts_are_skipped() {
        let fix = DnsFixture::start();
        let r = resolver(&fix);
        let reply = bounce(plan(&r, "nowhere.test").await);
        assert_eq!(reply.code(), 550);
        assert_eq!(text(&reply), "5.1.2 nowhere.test: no such domain");

        // An MX host that does not exist is skipped…
        fix.mx("half.test", 10, "gone.half.test", 300);
        fix.mx("half.test", 20, "mx.half.test", 300);
        fix.a("mx.half.test", v4(5), 300);
        assert_eq!(addrs(plan(&r, "half.test").await), vec![sa(5)]);
        // …and when none has an address, the message waits (DNS may be mended).
        fix.mx("broken.test", 10, "gone.broken.test", 300);
        let reply = defer(plan(&r, "broken.test").await);
        assert_eq!(reply.code(), 451);
        assert!(text(&reply).starts_with("4.4.3 broken.test: "), "{reply}");
    }

    #[tokio::test]
    async fn servfail_defers_then_recovers() {
        let fix = DnsFixture::start();
        fix.mx("flaky.test", 10, "mx.flaky.test", 300);
        fix.a("mx.flaky.test", v4(3), 300);
        fix.servfail("flaky.test", true);
        let mut cfg = config(&fix);
        cfg.min_ttl = Duration::from_secs(1);
        let r = MxResolver::new(cfg).unwrap();
        let reply = defer(plan(&r, "flaky.test").await);
        assert_eq!(reply.code(), 451);
        assert!(text(&reply).starts_with("4.4.3 flaky.test: temporary DNS failure: "));
        assert!(text(&reply).contains("SERVFAIL"), "{reply}");
        fix.servfail("flaky.test", false);
        // Still the cached failure right away…
        assert!(matches!(plan(&r, "flaky.test").await, Plan::Defer(_)));
        // …then delivered once its short negative cache time has passed.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(addrs(plan(&r, "flaky.test").await), vec![sa(3)]);
    }

    #[tokio::test]
    async fn timeout_defers_within_the_timeout() {
        let fix = DnsFixture::start();
        fix.mx("slow.test", 10, "mx.slow.test", 300);
        fix.drop_queries("slow.test", true);
        let mut cfg = config(&fix);
        cfg.timeout = Duration::from_millis(500);
        let r = MxResolver::new(cfg).unwrap();
        let start = Instant::now();
        let reply = defer(plan(&r, "slow.test").await);
        let took = start.elapsed();
        assert!(text(&reply).contains("timed out"), "{reply}");
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
            "took {took:?}"
        );
        assert!(fix.queries("slow.test", "MX") >= 1);
    }

    #[tokio::test]
    async fn host_servfail_falls_back_to_glue() {
        let fix = DnsFixture::start();
        fix.glue(true);
        fix.mx("glued.test", 10, "mx.glued.test", 300);
        fix.a("mx.glued.test", v4(44), 300);
        fix.servfail("mx.glued.test", true);
        let r = resolver(&fix);
        assert_eq!(addrs(plan(&r, "glued.test").await), vec![sa(44)]);
        // Without glue the same failure defers.
        fix.glue(false);
        fix.mx("bare.test", 10, "mx.glued.test", 300);
        let reply = defer(plan(&r, "bare.test").await);
        assert!(text(&reply).contains("SERVFAIL"), "{reply}");
    }

    #[tokio::test]
    async fn large_answers_come_over_tcp() {
        let fix = DnsFixture::start();
        fix.mx("big.test", 10, "mx.big.test", 300);
        for i in 0..200u8 {
            fix.a("mx.big.test", Ipv4Addr::new(127, 0, 1, i), 300);
        }
        let t = targets(plan(&resolver(&fix), "big.test").await);
        // Too large for UDP: the truncated answer was asked again over TCP, in full, and
        // the list is capped.
        assert_eq!(t.len(), MAX_TARGETS);
        assert_eq!(
            t[0].addr,
            SocketAddr::new(Ipv4Addr::new(127, 0, 1, 0).into(), PORT)
        );
        assert!(fix.queries("mx.big.test", "A") >= 2, "UDP, then TCP");
    }

    #[tokio::test]
    async fn loops_by_name_and_by_address() {
        let fix = DnsFixture::start();
        // By name: we are the only MX.
        fix.mx("us.test", 10, "relay.us.test", 300);
        fix.a("relay.us.test", v4(50), 300);
        let mut cfg = config(&fix);
        cfg.our_names = vec!["Relay.US.test.".into()];
        cfg.our_addrs = vec![sa(60)];
        let r = MxResolver::new(cfg).unwrap();
        let reply = bounce(plan(&r, "us.test").await);
        assert_eq!(reply.code(), 550);
        assert_eq!(
            text(&reply),
            "5.4.6 us.test: mail for it loops back to myself"
        );
        assert_eq!(
            fix.queries("relay.us.test", "A"),
            0,
            "no need to look us up"
        );

        // By address: another name for one of our listen addresses.
        fix.mx("alias.test", 10, "alias-mx.test", 300);
        fix.a("alias-mx.test", v4(60), 300);
        let reply = bounce(plan(&r, "alias.test").await);
        assert!(text(&reply).starts_with("5.4.6 "), "{reply}");

        // Only hosts more preferred than we are remain.
        fix.mx("backup.test", 5, "primary.backup.test", 300);
        fix.mx("backup.test", 10, "relay.us.test", 300);
        fix.mx("backup.test", 20, "tertiary.backup.test", 300);
        fix.a("primary.backup.test", v4(5), 300);
        fix.a("tertiary.backup.test", v4(20), 300);
        assert_eq!(addrs(plan(&r, "backup.test").await), vec![sa(5)]);
        assert_eq!(fix.queries("tertiary.backup.test", "A"), 0);

        fix.mx("backup2.test", 5, "primary.backup.test", 300);
        fix.mx("backup2.test", 10, "alias-mx.test", 300);
        fix.mx("backup2.test", 20, "tertiary.backup.test", 300);
        assert_eq!(addrs(plan(&r, "backup2.test").await), vec![sa(5)]);

        // An address of ours on another port is not a loop.
        fix.mx("otherport.test", 10, "alias-mx.test", 300);
        let mut cfg = config(&fix);
        cfg.our_addrs = vec![SocketAddr::new(IpAddr::V4(v4(60)), PORT + 1)];
        let r = MxResolver::new(cfg).unwrap();
        assert_eq!(addrs(plan(&r, "otherport.test").await), vec![sa(60)]);

        // Listening on the wildcard address: any loopback address is us.
        let mut cfg = config(&fix);
        cfg.our_addrs = vec![SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT)];
        let r = MxResolver::new(cfg).unwrap();
        let reply = bounce(plan(&r, "otherport.test").await);
        assert!(text(&reply).starts_with("5.4.6 "), "{reply}");
    }

    #[tokio::test]
    async fn address_literals() {
        let fix = DnsFixture::start();
        let mut cfg = config(&fix);
        cfg.our_addrs = vec![sa(1)];
        let r = MxResolver::new(cfg).unwrap();
        assert_eq!(addrs(plan(&r, "[127.0.0.9]").await), vec![sa(9)]);
        assert_eq!(
            addrs(plan(&r, "[IPv6:::1]").await),
            vec![SocketAddr::new(Ipv6Addr::LOCALHOST.into(), PORT)]
        );
        assert!(text(&bounce(plan(&r, "[127.0.0.1]").await)).starts_with("5.4.6 "));
        assert_eq!(bounce(plan(&r, "[nonsense]").await).code(), 550);
        assert_eq!(fix.total_queries(), 0);
    }

    #[tokio::test]
    async fn domains_sharing_an_mx_host_share_its_address_lookup() {
        let fix = DnsFixture::start();
        fix.a("mx.shared.test", v4(9), 300);
        for d in ["one.test", "two.test", "three.test"] {
            fix.mx(d, 10, "mx.shared.test", 300);
        }
        let r = resolver(&fix);
        for d in ["one.test", "two.test", "three.test"] {
            assert_eq!(addrs(plan(&r, d).await), vec![sa(9)]);
        }
        assert_eq!(
            fix.queries("mx.shared.test", "A"),
            1,
            "one address lookup for the shared host"
        );
        // Once the host's answer expires it is asked again.
        fix.a("mx.expiring.test", v4(10), 1);
        fix.mx("four.test", 10, "mx.expiring.test", 300);
        fix.mx("five.test", 10, "mx.expiring.test", 300);
        let _ = plan(&r, "four.test").await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let _ = plan(&r, "five.test").await;
        assert_eq!(fix.queries("mx.expiring.test", "A"), 2);
    }

    #[tokio::test]
    async fn cache_holds_until_the_ttl_expires() {
        let fix = DnsFixture::start();
        fix.mx("cached.test", 10, "mx.cached.test", 1);
        fix.a("mx.cached.test", v4(8), 300);
        let r = resolver(&fix);
        for _ in 0..50 {
            assert_eq!(addrs(plan(&r, "cached.test").await), vec![sa(8)]);
        }
        assert_eq!(fix.queries("cached.test", "MX"), 1);
        assert_eq!(fix.queries("mx.cached.test", "A"), 1);
        let s = r.stats();
        assert_eq!((s.lookups, s.cache_hits, s.queries), (50, 49, 3));

        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(addrs(plan(&r, "cached.test").await), vec![sa(8)]);
        assert_eq!(
            fix.queries("cached.test", "MX"),
            2,
            "a new query after the TTL"
        );
        // The host's A (TTL 300) is still fresh in our per-shard address cache.
        assert_eq!(fix.queries("mx.cached.test", "A"), 1);

        // The floor holds answers longer than their TTL.
        fix.mx("floor.test", 10, "mx.cached.test", 1);
        let mut cfg = config(&fix);
        cfg.min_ttl = Duration::from_secs(3);
        let r = MxResolver::new(cfg).unwrap();
        let _ = plan(&r, "floor.test").await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let _ = plan(&r, "floor.test").await;
        assert_eq!(fix.queries("floor.test", "MX"), 1);
    }

    #[tokio::test]
    async fn negative_answers_cached_for_the_soa_minimum() {
        let fix = DnsFixture::start();
        fix.negative_ttl(1);
        let r = resolver(&fix);
        assert!(matches!(plan(&r, "later.test").await, Plan::Fail(_)));
        assert!(matches!(plan(&r, "later.test").await, Plan::Fail(_)));
        assert_eq!(fix.queries("later.test", "MX"), 1);
        fix.mx("later.test", 10, "mx.later.test", 300);
        fix.a("mx.later.test", v4(4), 300);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(addrs(plan(&r, "later.test").await), vec![sa(4)]);
        assert_eq!(fix.queries("later.test", "MX"), 2);

        // NODATA (implicit MX) is cached by the SOA minimum too, though the address
        // records live longer.
        fix.a("implicit.test", v4(6), 300);
        assert_eq!(addrs(plan(&r, "implicit.test").await), vec![sa(6)]);
        assert_eq!(addrs(plan(&r, "implicit.test").await), vec![sa(6)]);
        assert_eq!(fix.queries("implicit.test", "MX"), 1);
        fix.mx("implicit.test", 10, "mx.later.test", 300);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(addrs(plan(&r, "implicit.test").await), vec![sa(4)]);
        assert_eq!(fix.queries("implicit.test", "MX"), 2);

        // A longer SOA minimum holds the negative answer longer.
        fix.negative_ttl(30);
        assert!(matches!(plan(&r, "notyet.test").await, Plan::Fail(_)));
        fix.mx("notyet.test", 10, "mx.later.test", 300);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(matches!(plan(&r, "notyet.test").await, Plan::Fail(_)));
        assert_eq!(fix.queries("notyet.test", "MX"), 1);
    }

    #[tokio::test]
    async fn single_flight_shares_one_lookup() {
        let fix = DnsFixture::start();
        fix.mx("busy.test", 10, "mx.busy.test", 300);
        fix.a("mx.busy.test", v4(2), 300);
        let r = resolver(&fix);
        let all = join_all((0..20).map(|_| plan(&r, "busy.test"))).await;
        for res in all {
            assert_eq!(addrs(res), vec![sa(2)]);
        }
        assert_eq!(fix.queries("busy.test", "MX"), 1);
        assert_eq!(fix.queries("mx.busy.test", "A"), 1);
        // hickory also merges identical queries in flight, so count at our side too: one
        // lookup (MX, A, AAAA), 19 callers served by it.
        let s = r.stats();
        assert_eq!((s.lookups, s.cache_hits, s.queries), (20, 19, 3));
    }

    #[tokio::test]
    async fn abandoned_lookup_does_not_strand_waiters() {
        let fix = DnsFixture::start();
        fix.mx("gone.test", 10, "mx.gone.test", 300);
        fix.a("mx.gone.test", v4(2), 300);
        fix.drop_queries("gone.test", true);
        let r = resolver(&fix);
        // The first caller gives up while its lookup is in flight.
        let first = tokio::time::timeout(Duration::from_millis(100), plan(&r, "gone.test")).await;
        assert!(first.is_err());
        fix.drop_queries("gone.test", false);
        assert_eq!(addrs(plan(&r, "gone.test").await), vec![sa(2)]);
    }
}
