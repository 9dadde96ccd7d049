//! The outbound half: where a recipient domain's mail goes and how it gets there. The
//! queue manager hands each attempt here one domain at a time ([`Outbound::plan`], then
//! [`Outbound::deliver`]) and gets back one outcome per recipient; nothing here touches
//! the spool or the queue.
//!
//! - [`route`]: static routes, the smarthost, and [`route::plan`] (route or MX).
//! - [`mx`]: the MX routing rules (RFC 5321 §5.1, RFC 7505), pure values in and out.
//! - [`dns`]: MX routing over DNS (hickory-resolver) with per-shard single-flight caches.
//! - [`pool`]: per-shard pools of open connections, on the shard's own I/O driver.
//! - [`dsn`]: bounce messages (RFC 3464).

pub mod dns;
pub mod dsn;
pub mod mx;
pub mod pool;
pub mod route;

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::smtp::client::{ClientEvent, Outgoing, RcptOutcome};
use crate::smtp::Reply;
use dns::{MxResolver, ResolverConfig};
use mx::Target;
use pool::{Pool, PoolConfig};
use route::{HopCache, Plan, Routes};

/// Most addresses tried for one domain in one attempt (Postfix's smtp_mx_address_limit).
const MAX_ADDRESSES_PER_ATTEMPT: usize = 5;

/// What the outbound half needs from the configuration.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Routing table.
    pub routes: Routes,
    /// Outbound pools.
    pub pool: PoolConfig,
    /// MX routing.
    pub resolver: ResolverConfig,
}

impl OutboundConfig {
    /// From the validated configuration.
    pub fn from_config(config: &Config) -> Self {
        OutboundConfig {
            routes: Routes::from_config(&config.delivery),
            pool: PoolConfig {
                helo: config.effective_hostname(),
                max_per_destination: config.delivery.max_connections_per_destination,
                idle_timeout: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(30),
                reply_timeout: Duration::from_secs(300),
            },
            resolver: ResolverConfig::from_config(config),
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
        Outbound {
            routes: config.routes.clone(),
            resolver,
            hops: HopCache::new(config.resolver.timeout),
            pool: Pool::new(config.pool.clone()),
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

    /// Tries the targets in order until one takes the transaction: connection failures and
    /// refused greetings move on to the next address (at least two are tried when there
    /// are two). Returns the host that answered (or the last one tried) and one outcome
    /// per recipient.
    pub async fn deliver(
        &self,
        targets: &[Target],
        outgoing: Outgoing,
    ) -> (String, Vec<RcptOutcome>) {
        let n = outgoing.rcpts.len();
        let deferred = |why: &str| -> Vec<RcptOutcome> {
            (0..n)
                .map(|_| RcptOutcome::Deferred(Reply::new(451, format!("4.4.1 {why}"))))
                .collect()
        };
        let mut last = ("(none)".to_string(), "no address to deliver to".to_string());
        for target in targets.iter().take(MAX_ADDRESSES_PER_ATTEMPT) {
            let mut conn = match self.pool.checkout(target.addr).await {
                Ok(c) => c,
                Err(why) => {
                    last = (target.host.clone(), why);
                    continue;
                }
            };
            if conn.client.start(outgoing).is_err() {
                self.pool.checkin(target.addr, conn);
                return (target.host.clone(), deferred("connection was not ready"));
            }
            let timeout = self.pool.reply_timeout();
            let outcomes = loop {
                match conn.run_until_event(timeout).await {
                    ClientEvent::Delivered(d) => break d.outcomes,
                    ClientEvent::Closed { reason } => break deferred(&reason),
                    ClientEvent::Ready => continue,
                }
            };
            self.pool.checkin(target.addr, conn);
            return (target.host.clone(), outcomes);
        }
        let (host, why) = last;
        (host, deferred(&why))
    }

    /// Closes outbound connections idle past their time (called once a second).
    pub fn tidy(&self) {
        self.pool.close_idle();
    }
}
