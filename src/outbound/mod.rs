//! The outbound half: where a recipient domain's mail goes and how it gets there. The
//! queue manager hands each attempt here one domain at a time ([`Outbound::plan`], then
//! [`Outbound::deliver`]) and gets back one outcome per recipient; nothing here touches
//! the spool or the queue.
//!
//! - [`route`]: static routes, the smarthost, and [`route::plan`] (route or MX).
//! - [`mx`]: the MX routing rules (RFC 5321 §5.1, RFC 7505), pure values in and out.
//! - [`dns`]: MX routing over DNS (hickory-resolver) with per-shard single-flight caches.
//! - [`pool`]: per-shard pools of open connections, on the shard's own I/O driver, with
//!   STARTTLS at Postfix's levels (`delivery.tls`, `delivery.tls_policy`) and AUTH to the
//!   smarthost.
//! - [`health`]: next hops that are down (refused, timed out, failed greeting), per shard:
//!   no connection to them until a probe is due.
//! - [`shaping`]: per destination domain, whole-server limits on connections and messages
//!   a second, messages per connection, and reactive throttling ("too many connections").
//! - [`dsn`]: bounce messages (RFC 3464).

pub mod dns;
pub mod dsn;
pub mod health;
pub mod mx;
pub mod pool;
pub mod route;
pub mod shaping;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::smtp::client::{ClientEvent, Credentials, Outgoing, RcptOutcome};
use crate::smtp::Reply;
use crate::tls::TlsLevel;
use dns::{MxResolver, ResolverConfig};
use mx::Target;
use pool::{Hop, Pool, PoolConfig};
use route::{HopCache, NextHop, Plan, Routes};
use shaping::{is_throttle_reply, Budget, Shaper};

/// Most addresses tried for one domain in one attempt (Postfix's smtp_mx_address_limit).
const MAX_ADDRESSES_PER_ATTEMPT: usize = 5;

/// The next hop an attempt ended at: its name, and the address when one was tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopUsed {
    /// Host name (MX host, route or smarthost), or an address literal.
    pub host: String,
    /// The address connected to (or tried last).
    pub addr: Option<std::net::SocketAddr>,
    /// It offered DSN (RFC 3461) and was given the recipients' DSN parameters: success
    /// reports for what it accepted are its to send, not ours.
    pub dsn: bool,
}

impl HopUsed {
    fn named(host: &str) -> Self {
        HopUsed {
            host: host.to_string(),
            addr: None,
            dsn: false,
        }
    }

    fn at(target: &Target) -> Self {
        HopUsed {
            host: target.host.clone(),
            addr: Some(target.addr),
            dsn: false,
        }
    }
}

/// What the outbound half needs from the configuration.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Routing table.
    pub routes: Routes,
    /// Outbound pools.
    pub pool: PoolConfig,
    /// MX routing.
    pub resolver: ResolverConfig,
    /// Outbound TLS levels.
    pub tls: TlsPolicy,
    /// The smarthost, whose connections alone carry the credentials.
    pub smarthost: Option<NextHop>,
    /// AUTH to the smarthost (`delivery.smarthost_user`): the credentials, or why the
    /// password could not be read (then mail for the smarthost is deferred).
    pub smarthost_auth: Option<Result<Arc<Credentials>, String>>,
    /// Shaping per destination domain, with the budgets every shard shares.
    pub shaping: Arc<Shaper>,
}

/// Which TLS level mail for a domain is delivered at (`delivery.tls`, `delivery.tls_policy`).
#[derive(Debug, Clone)]
pub struct TlsPolicy {
    /// For every domain not listed.
    pub default: TlsLevel,
    /// By recipient domain (lower case).
    pub by_domain: HashMap<String, TlsLevel>,
}

impl TlsPolicy {
    /// The level for `domain`.
    pub fn level(&self, domain: &str) -> TlsLevel {
        if self.by_domain.is_empty() {
            return self.default;
        }
        self.by_domain
            .get(domain)
            .or_else(|| self.by_domain.get(&domain.to_ascii_lowercase()))
            .copied()
            .unwrap_or(self.default)
    }
}

/// Longest time a next hop that failed is left alone (see [`health`]).
const MAX_DOWN_FOR: Duration = Duration::from_secs(60);

/// How long a failed next hop is down: the first step of the retry schedule, at most
/// [`MAX_DOWN_FOR`]. A message deferred because the hop is down comes back after at least
/// that step, so it finds the hop ready to be probed.
fn down_for(retry_schedule_secs: &[u64]) -> Duration {
    retry_schedule_secs
        .first()
        .map_or(MAX_DOWN_FOR, |&s| Duration::from_secs(s).min(MAX_DOWN_FOR))
}

/// The smarthost password: the first line of `path`, which must not be empty.
fn read_password(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("delivery.smarthost_password_file: {}: {e}", path.display()))?;
    match text.lines().next() {
        Some(line) if !line.is_empty() => Ok(line.to_string()),
        _ => Err(format!(
            "delivery.smarthost_password_file: {}: the first line (the password) is empty",
            path.display()
        )),
    }
}

impl OutboundConfig {
    /// From the validated configuration.
    /// The smarthost password file is read here, once.
    pub fn from_config(config: &Config) -> Self {
        let d = &config.delivery;
        let by_domain = d
            .tls_policy
            .keys()
            .map(|domain| (domain.to_ascii_lowercase(), d.tls_level(domain)))
            .collect();
        OutboundConfig {
            routes: Routes::from_config(d),
            pool: PoolConfig {
                helo: config.effective_hostname(),
                max_per_destination: d.max_connections_per_destination,
                idle_timeout: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(30),
                reply_timeout: Duration::from_secs(300),
                tls_handshake_timeout: Duration::from_secs(60),
                tls_fallback: Duration::from_secs(300),
                tls_ca_file: (!d.tls_ca_file.as_os_str().is_empty()).then(|| d.tls_ca_file.clone()),
                down_for: down_for(&d.retry_schedule_secs),
            },
            resolver: ResolverConfig::from_config(config),
            tls: TlsPolicy {
                default: TlsLevel::parse(&d.tls).unwrap_or(TlsLevel::May),
                by_domain,
            },
            smarthost: (!d.smarthost.is_empty()).then(|| NextHop(d.smarthost.clone())),
            smarthost_auth: (!d.smarthost_user.is_empty()).then(|| {
                read_password(&d.smarthost_password_file)
                    .map(|password| Arc::new(Credentials::new(&d.smarthost_user, password)))
            }),
            shaping: Shaper::shared(&d.shaping),
        }
    }
}

/// One shard's outbound side: its routes, MX cache, next-hop cache and connection pool.
pub struct Outbound {
    routes: Routes,
    /// MX routing; `None` if no resolver could be made (then such mail is deferred).
    resolver: Option<MxResolver>,
    /// Addresses of static routes and the smarthost given as host names.
    hops: HopCache,
    pool: Pool,
    tls: TlsPolicy,
    smarthost: Option<NextHop>,
    smarthost_auth: Option<Result<Arc<Credentials>, String>>,
    shaping: Arc<Shaper>,
    /// This shard's copy of the budgets it has asked for (`None`: the domain is unshaped).
    budgets: RefCell<HashMap<String, Option<Arc<Budget>>>>,
    /// "Too many" replies seen since the last [`Outbound::take_throttle_events`].
    throttle_events: Cell<u64>,
}

impl Outbound {
    /// The outbound side of shard `shard`. Call on the shard's thread.
    pub fn new(shard: usize, config: &OutboundConfig) -> Outbound {
        let resolver = match MxResolver::new(config.resolver.clone()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(
                    shard,
                    "no DNS resolver: {e}; mail without a static route is deferred"
                );
                None
            }
        };
        if let Some(Err(why)) = &config.smarthost_auth {
            tracing::error!(
                shard,
                "no AUTH to the smarthost: {why}; mail for the smarthost is deferred"
            );
        }
        Outbound {
            routes: config.routes.clone(),
            resolver,
            hops: HopCache::new(config.resolver.timeout),
            // The pool builds this shard's TLS client configs, each with its own session
            // cache for resumption.
            pool: Pool::new(config.pool.clone()),
            tls: config.tls.clone(),
            smarthost: config.smarthost.clone(),
            smarthost_auth: config.smarthost_auth.clone(),
            shaping: Arc::clone(&config.shaping),
            budgets: RefCell::new(HashMap::new()),
            throttle_events: Cell::new(0),
        }
    }

    /// `domain`'s budget if it is shaped: from this shard's cache, else (once per domain)
    /// from the shared table.
    fn budget(&self, domain: &str) -> Option<Arc<Budget>> {
        if self.shaping.is_empty() {
            return None;
        }
        if let Some(b) = self.budgets.borrow().get(domain) {
            return b.clone();
        }
        let b = self.shaping.budget(domain);
        self.budgets
            .borrow_mut()
            .insert(domain.to_string(), b.clone());
        b
    }

    /// "Too many connections/messages" replies counted since the last call (for the
    /// shard's metrics).
    pub fn take_throttle_events(&self) -> u64 {
        self.throttle_events.replace(0)
    }

    /// The next hop at `addr` said "too many" (`reply`): the domain's connection limit is
    /// halved if it is shaped; logged at warn either way.
    fn throttled(&self, domain: &str, budget: Option<&Arc<Budget>>, addr: SocketAddr, reply: &str) {
        self.throttle_events.set(self.throttle_events.get() + 1);
        match budget {
            Some(b) => match b.throttle(Instant::now()) {
                Some(limit) => tracing::warn!(
                    "{domain}: next hop {addr} throttles us ({reply}); connections to {domain} now at most {limit}, growing back with deliveries"
                ),
                None => tracing::info!(
                    "{domain}: next hop {addr} throttles us ({reply}); connections to {domain} were lowered to {} just before",
                    b.limit()
                ),
            },
            None => tracing::warn!(
                "{domain}: next hop {addr} throttles us ({reply}); {domain} is not shaped (delivery.shaping), so nothing is slowed"
            ),
        }
    }

    /// Where `domain`'s mail goes on this attempt.
    pub async fn plan(&self, domain: &str) -> Plan {
        route::plan(
            &self.routes,
            &self.hops,
            self.resolver.as_ref(),
            domain,
            Instant::now(),
        )
        .await
    }

    /// Tries the targets of `domain`'s mail in order until one takes the transaction:
    /// connection failures, refused greetings and TLS or AUTH that could not be had move on
    /// to the next address (at least two are tried when there are two). An address that is
    /// down ([`health`]) is skipped without a connection, and does not count against the
    /// limit of addresses tried; if all are down, the recipients are deferred with the
    /// down reply (`451 4.4.1 next hop ADDR is down …`). The TLS level is
    /// `domain`'s; the smarthost's credentials go only to the smarthost. At `may`, an
    /// address whose TLS handshake fails is tried again at once in plaintext. Returns the
    /// host that answered (or the last one tried) and one outcome per recipient.
    pub async fn deliver(
        &self,
        domain: &str,
        targets: &[Target],
        outgoing: Outgoing,
    ) -> (HopUsed, Vec<RcptOutcome>) {
        let n = outgoing.rcpts.len();
        let deferred = |reply: &Reply| -> Vec<RcptOutcome> {
            (0..n)
                .map(|_| RcptOutcome::Deferred(reply.clone()))
                .collect()
        };
        let auth = match &self.smarthost_auth {
            Some(auth)
                if self.smarthost.is_some()
                    && self.routes.next_hop(domain) == self.smarthost.as_ref() =>
            {
                match auth {
                    Ok(credentials) => Some(credentials),
                    Err(why) => {
                        let host = self.smarthost.as_ref().map_or("(smarthost)", NextHop::host);
                        let reply =
                            Reply::new(454, format!("4.7.0 no AUTH to the smarthost: {why}"));
                        return (HopUsed::named(host), deferred(&reply));
                    }
                }
            }
            _ => None,
        };
        let level = self.tls.level(domain);
        let budget = self.budget(domain);
        if let Some(b) = &budget {
            // Pacing: wait for this message's turn under max_messages_per_sec.
            match b.reserve_send(Instant::now()) {
                Some(wait) if wait.is_zero() => {}
                Some(wait) => tokio::time::sleep(wait).await,
                None => {
                    let reply = Reply::new(
                        451,
                        format!(
                            "4.4.5 {domain}: more queued than max_messages_per_sec sends within {} s; deferred",
                            shaping::MAX_PACING_WAIT.as_secs()
                        ),
                    );
                    return (HopUsed::named("(none)"), deferred(&reply));
                }
            }
        }
        let mut last = (
            HopUsed::named("(none)"),
            Reply::new(451, "4.4.1 no address to deliver to"),
        );
        let mut tried = 0;
        for target in targets {
            if tried == MAX_ADDRESSES_PER_ATTEMPT {
                break;
            }
            let hop = Hop {
                addr: target.addr,
                host: &target.host,
                level,
                auth,
                budget: budget.as_ref(),
            };
            let mut checkout = self.pool.checkout(&hop).await;
            if matches!(&checkout, Err(e) if e.retry_in_plaintext) {
                // The pool now goes plaintext to this address.
                checkout = self.pool.checkout(&hop).await;
            }
            let mut conn = match checkout {
                Ok(c) => c,
                Err(e) => {
                    if !e.down {
                        tried += 1;
                    }
                    if e.throttled {
                        self.throttled(domain, budget.as_ref(), target.addr, &e.reply.one_line());
                    }
                    last = (HopUsed::at(target), e.reply);
                    continue;
                }
            };
            conn.count_message();
            if conn.client.start(outgoing).is_err() {
                self.pool.checkin(conn);
                let reply = Reply::new(451, "4.4.1 connection was not ready");
                return (HopUsed::at(target), deferred(&reply));
            }
            let timeout = self.pool.reply_timeout();
            let outcomes = loop {
                match conn.run_until_event(timeout).await {
                    ClientEvent::Delivered(d) => break d.outcomes,
                    ClientEvent::Closed { reason } => {
                        break deferred(&Reply::new(451, format!("4.4.1 {reason}")))
                    }
                    ClientEvent::Ready => continue,
                    // Only in the opening, which the pool has run.
                    ClientEvent::StartTls => conn.client.abort("STARTTLS out of place"),
                }
            };
            let throttle = outcomes
                .iter()
                .map(RcptOutcome::reply)
                .chain(conn.client.close_reply())
                .find(|r| is_throttle_reply(r))
                .map(Reply::one_line);
            if let Some(reply) = throttle {
                self.throttled(domain, budget.as_ref(), target.addr, &reply);
            } else if let Some(b) = &budget {
                if outcomes
                    .iter()
                    .any(|o| matches!(o, RcptOutcome::Delivered(_)))
                {
                    if let Some(limit) = b.delivered(Instant::now()) {
                        tracing::info!("{domain}: connection limit back up to {limit}");
                    }
                }
            }
            let mut hop = HopUsed::at(target);
            hop.dsn = conn.client.offers_dsn();
            self.pool.checkin(conn);
            return (hop, outcomes);
        }
        let (host, reply) = last;
        (host, deferred(&reply))
    }

    /// The MX cache's counters: (lookups, answered from the cache or a lookup in flight).
    pub fn dns_counts(&self) -> (u64, u64) {
        self.resolver.as_ref().map_or((0, 0), |r| {
            let s = r.stats();
            (s.lookups, s.cache_hits)
        })
    }

    /// Forgets which next hops are down, so that a flushed queue tries them at once.
    pub fn forget_down(&self) {
        self.pool.forget_down();
    }

    /// Closes outbound connections idle past their time (called once a second).
    pub fn tidy(&self) {
        self.pool.close_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_level_by_domain_else_the_default() {
        let mut config = Config::default();
        config.delivery.tls = "encrypt".into();
        config
            .delivery
            .tls_policy
            .insert("Bank.example".into(), "verify".into());
        config
            .delivery
            .tls_policy
            .insert("old.example".into(), "none".into());
        let tls = OutboundConfig::from_config(&config).tls;
        assert_eq!(tls.level("bank.example"), TlsLevel::Verify);
        assert_eq!(tls.level("BANK.example"), TlsLevel::Verify);
        assert_eq!(tls.level("old.example"), TlsLevel::None);
        assert_eq!(tls.level("other.example"), TlsLevel::Encrypt);
        assert_eq!(
            OutboundConfig::from_config(&Config::default())
                .tls
                .level("x.example"),
            TlsLevel::May,
            "may by default"
        );
    }

    #[test]
    fn smarthost_password_is_the_first_line_of_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        let mut config = Config::default();
        config.delivery.smarthost = "127.0.0.1:587".into();
        config.delivery.smarthost_user = "relay".into();
        config.delivery.smarthost_password_file = file.clone();
        let auth = || OutboundConfig::from_config(&config).smarthost_auth.unwrap();

        std::fs::write(&file, "pass word\r\nsecond line\n").unwrap();
        let credentials = auth().unwrap();
        assert_eq!(*credentials, Credentials::new("relay", "pass word"));
        std::fs::write(&file, "\nsecond line\n").unwrap();
        assert!(auth()
            .unwrap_err()
            .contains("the first line (the password) is empty"));
        std::fs::remove_file(&file).unwrap();
        assert!(auth()
            .unwrap_err()
            .starts_with("delivery.smarthost_password_file: "));
        config.delivery.smarthost_user.clear();
        assert!(OutboundConfig::from_config(&config)
            .smarthost_auth
            .is_none());
    }
}
