//! Where a recipient's mail goes next: the static route for its domain
//! (`delivery.routes`, `--route`), else the smarthost, else MX routing ([`super::dns`]),
//! and the SMTP reply a bounce or a deferral carries when MX routing finds nowhere to
//! deliver ([`plan`]).
//! A route given as a host *name* is resolved through the system resolver, and each
//! shard keeps the answer for a minute ([`HopCache`]) instead of asking per delivery; while
//! a lookup runs, other deliveries to the same hop wait for it rather than start their own
//! ([`SingleFlight`]).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::dns::{MxResolver, SingleFlight};
use super::mx::{self, Route, Target};

use crate::config::Delivery;
use crate::smtp::Reply;

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
/// kept: a failed or empty lookup is repeated on the next attempt. One lookup per hop runs
/// at a time (single flight, as in the MX resolver): when an entry expires under load, the
/// deliveries that need it share one `getaddrinfo` instead of each sending its own to the
/// blocking pool.
#[derive(Debug)]
pub struct HopCache {
    /// Answers by hop (`host:port`); only non-empty ones are kept.
    answers: SingleFlight<String, SharedAnswer>,
    /// How long one lookup may take (`delivery.dns_timeout_secs`).
    timeout: Duration,
}

/// A lookup's answer as its waiters share it: an error as its kind and text (`io::Error`
/// is not `Clone`).
type SharedAnswer = Result<Vec<SocketAddr>, (io::ErrorKind, String)>;

impl HopCache {
    /// A cache whose lookups give up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        HopCache {
            answers: SingleFlight::new(),
            timeout,
        }
    }

    /// The addresses to connect to for `hop`: an IP address as is; a name through the
    /// system resolver (off the event loop; a lookup over the timeout fails), or from the
    /// cache while fresh.
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
        let answer = self
            .answers
            .get_or_run(hop.0.as_str(), now, || async {
                let result = match tokio::time::timeout(self.timeout, lookup(hop.0.clone())).await {
                    Ok(result) => result,
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("looking up {} took over {:?}", hop.0, self.timeout),
                    )),
                };
                let keep = match &result {
                    Ok(addrs) if !addrs.is_empty() => Some(now + HOP_CACHE_TTL),
                    _ => None,
                };
                (result.map_err(|e| (e.kind(), e.to_string())), keep)
            })
            .await;
        answer.map_err(|(kind, text)| io::Error::new(kind, text))
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

/// Where a domain's mail goes on this attempt.
#[derive(Debug)]
pub enum Plan {
    /// Addresses to try, in order.
    Targets(Vec<Target>),
    /// Fails for good (bounce) with this reply.
    Fail(Reply),
    /// Try again later, with this reason.
    Defer(Reply),
}

/// The route for `domain`: a static route or the smarthost wins; otherwise its MX hosts
/// (or implicit MX, or the address literal) from the shard's resolver.
pub async fn plan(
    routes: &Routes,
    hops: &HopCache,
    resolver: Option<&MxResolver>,
    domain: &str,
    now: Instant,
) -> Plan {
    if let Some(hop) = routes.next_hop(domain) {
        return match hops.addresses(hop, now).await {
            Ok(addrs) if !addrs.is_empty() => Plan::Targets(
                addrs
                    .into_iter()
                    .map(|addr| Target {
                        host: hop.host().to_string(),
                        preference: 0,
                        addr,
                    })
                    .collect(),
            ),
            Ok(_) => Plan::Defer(Reply::new(
                451,
                format!("4.4.3 next hop {hop} has no address"),
            )),
            Err(e) => Plan::Defer(Reply::new(
                451,
                format!("4.4.3 cannot resolve next hop {hop}: {e}"),
            )),
        };
    }
    let Some(resolver) = resolver else {
        return Plan::Defer(Reply::new(
            451,
            format!(
                "4.4.3 no route to {domain}: no static route, no smarthost, and no DNS resolver"
            ),
        ));
    };
    let route = resolver.resolve(domain).await;
    if let Route::Deliver(targets) = route {
        return Plan::Targets(targets);
    }
    // The replies name the domain as the resolver keyed it.
    mx_plan(&mx::normalize(domain), route)
}

/// The plan for MX routing's outcome for `domain`: the addresses, or the reply to bounce
/// (`5.1.2` bad destination, `5.1.10` null MX, `5.4.6` routing loop) or defer (`4.4.3`:
/// DNS may be mended) with.
fn mx_plan(domain: &str, route: Route) -> Plan {
    let fail = |code, text: String| Plan::Fail(Reply::new(code, text));
    let defer = |text: String| Plan::Defer(Reply::new(451, text));
    match route {
        Route::Deliver(targets) => Plan::Targets(targets),
        Route::NoSuchDomain => fail(550, format!("5.1.2 {domain}: no such domain")),
        Route::NoMxNoAddress => fail(550, format!("5.1.2 {domain}: no MX and no address records")),
        Route::NullMx => fail(
            556,
            format!("5.1.10 {domain} does not accept mail (null MX)"),
        ),
        Route::Loop => fail(
            550,
            format!("5.4.6 {domain}: mail for it loops back to myself"),
        ),
        Route::BadLiteral => fail(550, format!("5.1.2 {domain}: not a valid address literal")),
        Route::BadName => fail(550, format!("5.1.2 {domain}: not a valid domain name")),
        Route::NoAddressForMx { missing } => defer(format!(
            "4.4.3 {domain}: no address for any MX host: {missing}"
        )),
        Route::TempFail(why) => defer(format!("4.4.3 {domain}: temporary DNS failure: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Notify;

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
    fn mx_outcomes_become_these_replies() {
        let reply = |route| match mx_plan("d.test", route) {
            Plan::Fail(r) => ("fail", r.code(), r.lines()[0].clone()),
            Plan::Defer(r) => ("defer", r.code(), r.lines()[0].clone()),
            Plan::Targets(t) => panic!("expected a reply, got {t:?}"),
        };
        let cases = [
            (
                Route::NoSuchDomain,
                ("fail", 550, "5.1.2 d.test: no such domain"),
            ),
            (
                Route::NoMxNoAddress,
                ("fail", 550, "5.1.2 d.test: no MX and no address records"),
            ),
            (
                Route::NullMx,
                ("fail", 556, "5.1.10 d.test does not accept mail (null MX)"),
            ),
            (
                Route::Loop,
                (
                    "fail",
                    550,
                    "5.4.6 d.test: mail for it loops back to myself",
                ),
            ),
            (
                Route::BadLiteral,
                ("fail", 550, "5.1.2 d.test: not a valid address literal"),
            ),
            (
                Route::BadName,
                ("fail", 550, "5.1.2 d.test: not a valid domain name"),
            ),
            (
                Route::NoAddressForMx {
                    missing: "a.d.test (no such host), b.d.test (no address records)".into(),
                },
                (
                    "defer",
                    451,
                    "4.4.3 d.test: no address for any MX host: a.d.test (no such host), \
                     b.d.test (no address records)",
                ),
            ),
            (
                Route::TempFail("MX d.test: SERVFAIL".into()),
                (
                    "defer",
                    451,
                    "4.4.3 d.test: temporary DNS failure: MX d.test: SERVFAIL",
                ),
            ),
        ];
        for (route, (kind, code, text)) in cases {
            assert_eq!(reply(route), (kind, code, text.to_string()));
        }
        let target = Target {
            host: "mx.d.test".into(),
            preference: 10,
            addr: "192.0.2.1:25".parse().unwrap(),
        };
        assert!(matches!(
            mx_plan("d.test", Route::Deliver(vec![target.clone()])),
            Plan::Targets(t) if t == vec![target]
        ));
    }

    #[tokio::test]
    async fn replies_name_the_domain_as_the_resolver_keyed_it() {
        // An address literal needs no DNS: nothing listens at the name server.
        let resolver = MxResolver::new(super::super::dns::ResolverConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            ..Default::default()
        })
        .unwrap();
        let hops = HopCache::new(Duration::from_secs(1));
        let got = plan(
            &Routes::default(),
            &hops,
            Some(&resolver),
            " [NONSENSE]. ",
            Instant::now(),
        )
        .await;
        let Plan::Fail(reply) = got else {
            panic!("expected Fail, got {got:?}")
        };
        assert_eq!(
            (reply.code(), reply.lines()[0].as_str()),
            (550, "5.1.2 [nonsense]: not a valid address literal")
        );
    }

    #[test]
    fn a_named_hop_is_resolved_once_a_minute() {
        let rt = timed_runtime();
        let cache = HopCache::new(Duration::from_secs(5));
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
        let rt = timed_runtime();
        let cache = HopCache::new(Duration::from_secs(5));
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

    /// A lookup that answers only when `gate` is notified, counting its calls.
    async fn gated(
        gate: &Notify,
        calls: &std::cell::Cell<u32>,
        answer: io::Result<Vec<SocketAddr>>,
    ) -> io::Result<Vec<SocketAddr>> {
        calls.set(calls.get() + 1);
        gate.notified().await;
        answer
    }

    /// A current-thread runtime with a timer, for [`bounded`].
    fn timed_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    /// `fut` within 5 s: a lost wake-up fails the test instead of hanging it.
    async fn bounded<F: Future>(fut: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .expect("a waiter was never woken")
    }

    /// The cache kept nothing for `hop`: the next delivery looks it up again.
    fn assert_asks_again(cache: &HopCache, hop: &NextHop, why: &str) {
        let addr: SocketAddr = "192.0.2.9:25".parse().unwrap();
        let again =
            timed_runtime().block_on(
                cache.addresses_with(hop, Instant::now(), |_| async move { Ok(vec![addr]) }),
            );
        assert_eq!(again.unwrap(), vec![addr], "asked again {why}");
    }

    /// `n` deliveries ask for `hop` at once; the lookup (only the first should run one)
    /// gives `answer()` once a gate opens after all of them have asked. Returns their
    /// answers, in order, and how many lookups ran.
    fn ask_together(
        n: usize,
        cache: &HopCache,
        hop: &NextHop,
        answer: impl Fn() -> io::Result<Vec<SocketAddr>>,
    ) -> (Vec<io::Result<Vec<SocketAddr>>>, u32) {
        let (gate, calls) = (Notify::new(), std::cell::Cell::new(0));
        let t0 = Instant::now();
        let mut asks: Vec<_> = (0..n)
            .map(|_| Box::pin(cache.addresses_with(hop, t0, |_| gated(&gate, &calls, answer()))))
            .collect();
        let mut answers: Vec<Option<io::Result<Vec<SocketAddr>>>> = (0..n).map(|_| None).collect();
        timed_runtime().block_on(bounded(async {
            let all_answered = std::future::poll_fn(|cx| {
                for (ask, got) in asks.iter_mut().zip(answers.iter_mut()) {
                    if got.is_none() {
                        if let std::task::Poll::Ready(a) = ask.as_mut().poll(cx) {
                            *got = Some(a);
                        }
                    }
                }
                if answers.iter().all(Option::is_some) {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            });
            let open_gate = async {
                tokio::task::yield_now().await;
                gate.notify_waiters();
            };
            tokio::join!(all_answered, open_gate);
        }));
        let answers = answers.into_iter().map(|a| a.expect("answered")).collect();
        (answers, calls.get())
    }

    #[test]
    fn deliveries_share_one_lookup_while_it_runs() {
        let cache = HopCache::new(Duration::from_secs(5));
        let hop = NextHop("relay.example.test:25".into());
        let addr: SocketAddr = "192.0.2.7:25".parse().unwrap();
        let (answers, calls) = ask_together(3, &cache, &hop, || Ok(vec![addr]));
        assert_eq!(calls, 1, "one lookup for three deliveries");
        for got in answers {
            assert_eq!(got.unwrap(), vec![addr]);
        }
        // And kept: a later delivery asks nobody.
        let later =
            timed_runtime().block_on(cache.addresses_with(&hop, Instant::now(), |_| async {
                Err(io::Error::other("must not be called"))
            }));
        assert_eq!(later.unwrap(), vec![addr]);
    }

    #[test]
    fn a_failed_lookup_fails_its_waiters_too_and_is_not_kept() {
        let cache = HopCache::new(Duration::from_secs(5));
        let hop = NextHop("down.example.test:25".into());
        let (answers, calls) = ask_together(2, &cache, &hop, || {
            Err(io::Error::new(io::ErrorKind::TimedOut, "SERVFAIL"))
        });
        assert_eq!(calls, 1, "the waiter shared the failure");
        for got in answers {
            let e = got.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(e.to_string().contains("SERVFAIL"), "{e}");
        }
        assert_asks_again(&cache, &hop, "after the failure");
    }

    #[test]
    fn a_lookup_that_never_answers_times_out_and_is_not_kept() {
        let cache = HopCache::new(Duration::from_millis(50));
        let hop = NextHop("slow.example.test:25".into());
        let hung =
            timed_runtime().block_on(bounded(
                cache.addresses_with(&hop, Instant::now(), |_| std::future::pending()),
            ));
        let e = hung.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("slow.example.test:25"), "{e}");
        assert_asks_again(&cache, &hop, "after the timeout");
    }

    #[test]
    fn a_waiter_asks_again_if_the_lookup_it_waited_for_is_dropped() {
        let rt = timed_runtime();
        let cache = HopCache::new(Duration::from_secs(5));
        let hop = NextHop("relay.example.test:25".into());
        let addr: SocketAddr = "192.0.2.7:25".parse().unwrap();
        let (gate, calls) = (Notify::new(), std::cell::Cell::new(0));
        let t0 = Instant::now();
        let got = rt.block_on(async {
            let mut leader =
                Box::pin(cache.addresses_with(&hop, t0, |_| gated(&gate, &calls, Ok(vec![addr]))));
            let waiter = cache.addresses_with(&hop, t0, |_| async move { Ok(vec![addr]) });
            tokio::pin!(waiter);
            // The leader starts its lookup, the waiter queues behind it...
            assert!(futures_poll_once(leader.as_mut()).await.is_none());
            assert!(futures_poll_once(waiter.as_mut()).await.is_none());
            // ...and the leader's delivery is dropped (say, at shutdown).
            drop(leader);
            bounded(waiter).await
        });
        assert_eq!(
            got.unwrap(),
            vec![addr],
            "the waiter ran a lookup of its own"
        );
        assert_eq!(calls.get(), 1, "the dropped lookup was started once");
    }

    /// Polls `fut` once: `Some` if it finished.
    async fn futures_poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut fut = Some(fut);
        std::future::poll_fn(|cx| {
            let f = fut.take().expect("polled once");
            std::task::Poll::Ready(match f.poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
