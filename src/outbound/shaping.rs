//! Shaping per destination domain (`[delivery.shaping."domain"]`, `"*"` for every domain
//! not named): how many connections the whole server keeps open to it, how many messages
//! a second it sends there, and how many messages one connection carries. Plus reactive
//! throttling: a `421` or `4.7.x` reply that says "too many connections" (or messages)
//! halves the domain's connection limit, which then grows back.
//!
//! The budgets are for the whole server, so the shards share them: one [`Budget`] per
//! shaped domain, in a table every shard holds an `Arc` of ([`Shaper`]), made of atomics.
//! Cross-shard atomics are acceptable here, against the rule that shards share nothing on
//! the per-message path, because they are touched only on the outbound path, a few times
//! per connection opened or message sent (never per byte or per reply), and only for
//! domains that are shaped; an unshaped domain costs one lookup in the shard's own cache.
//! The table of budgets itself is behind a mutex taken once per domain per shard (each
//! shard caches the `Arc` it got, see `Outbound`).
//!
//! - Connections: a [`Slot`] is taken from the budget before connecting and given back
//!   when the connection is dropped. A shard that finds the budget full waits, polling it
//!   every [`BUDGET_POLL`] (the other shards' releases cannot wake it), while shards
//!   holding idle connections to the domain close them when someone waits.
//! - Rate: a virtual schedule (the generic cell rate algorithm): each message reserves the
//!   next free instant, one interval after the last reservation, and sleeps until it comes.
//!   So a shaped queue drains at its rate, without bursts and without stalls. A message
//!   whose instant would be more than [`MAX_PACING_WAIT`] away reserves nothing and is
//!   deferred (only a queue far larger than the rate can carry meets this).
//! - Reactive throttling: the limit is halved (at least 1), unless more connections are
//!   open than the limit already allows: those were opened under an older, higher limit,
//!   their "too many" is the same burst's, and halving again for each of them would drop
//!   a limit of 16 to 1 on one burst. It grows back by one after as many successful
//!   deliveries as the limit then is (additive increase, roughly one per round of
//!   connections), at most one step per [`GROW_EVERY`], up to `max_connections`; so a
//!   next hop that takes 2 connections is probed with a third every few seconds, not
//!   every few messages. Logged at warn; every signal counted.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Shaping;
use crate::smtp::Reply;

/// How often a checkout waiting for a full connection budget looks again.
pub const BUDGET_POLL: Duration = Duration::from_millis(10);

/// Longest a message waits for its turn under `max_messages_per_sec` before being deferred
/// instead.
pub const MAX_PACING_WAIT: Duration = Duration::from_secs(30);

/// The limit grows back at most one step in this long.
pub const GROW_EVERY: Duration = Duration::from_secs(5);

/// True for a reply that says the next hop wants fewer of our connections or messages:
/// a transient `421`, or a `4.7.x`, whose text says "too many" connections or messages
/// (or sessions, mails). A `421` without those words is a server going away, not a signal
/// about our rate.
pub fn is_throttle_reply(reply: &Reply) -> bool {
    if !reply.is_transient() {
        return false;
    }
    let is_policy = reply.code() == 421
        || reply
            .enhanced_status()
            .is_some_and(|s| s.starts_with("4.7."));
    if !is_policy {
        return false;
    }
    let text = reply.one_line().to_ascii_lowercase();
    text.contains("too many")
        && ["connection", "message", "session", "mail"]
            .iter()
            .any(|w| text.contains(w))
}

/// The shaping of every domain, for the whole server: the configuration and the budgets.
pub struct Shaper {
    /// By domain (lower case).
    by_domain: HashMap<String, Shaping>,
    /// `"*"`.
    default: Option<Shaping>,
    budgets: Mutex<HashMap<String, Arc<Budget>>>,
}

impl fmt::Debug for Shaper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shaper")
            .field("by_domain", &self.by_domain)
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

/// The shaper the shards share, for the shaping configuration it was made from: every
/// shard's `OutboundConfig` (at start, and each shard again on a reload) asks here, so
/// they all get the same budgets whichever asks first.
type SharedShaper = (
    std::collections::BTreeMap<String, Shaping>,
    std::sync::Weak<Shaper>,
);
static SHARED: Mutex<Option<SharedShaper>> = Mutex::new(None);

impl Shaper {
    /// The shaper for `shaping`, shared with every other caller that has the same
    /// configuration while one of them holds it.
    pub fn shared(shaping: &std::collections::BTreeMap<String, Shaping>) -> Arc<Shaper> {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((config, weak)) = shared.as_ref() {
            if config == shaping {
                if let Some(s) = weak.upgrade() {
                    return s;
                }
            }
        }
        let s = Arc::new(Shaper::new(shaping));
        *shared = Some((shaping.clone(), Arc::downgrade(&s)));
        s
    }

    /// From `delivery.shaping` (validated).
    pub fn new<'a>(shaping: impl IntoIterator<Item = (&'a String, &'a Shaping)>) -> Shaper {
        let mut by_domain = HashMap::new();
        let mut default = None;
        for (domain, s) in shaping {
            if domain == "*" {
                default = Some(s.clone());
            } else {
                by_domain.insert(domain.to_ascii_lowercase(), s.clone());
            }
        }
        Shaper {
            by_domain,
            default,
            budgets: Mutex::new(HashMap::new()),
        }
    }

    /// True when no domain is shaped.
    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty() && self.default.is_none()
    }

    /// The budget of `domain` (lower case), shared by every shard; `None` if unshaped.
    pub fn budget(&self, domain: &str) -> Option<Arc<Budget>> {
        let shaping = self.by_domain.get(domain).or(self.default.as_ref())?;
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        Some(Arc::clone(
            budgets
                .entry(domain.to_string())
                .or_insert_with(|| Arc::new(Budget::new(domain, shaping.clone(), Instant::now()))),
        ))
    }
}

/// One shaped domain's budget, for the whole server.
#[derive(Debug)]
pub struct Budget {
    domain: String,
    shaping: Shaping,
    /// Connections open to the domain, all shards.
    open: AtomicUsize,
    /// The connection limit now: `max_connections`, less after throttling.
    limit: AtomicUsize,
    /// Successful deliveries since the limit last grew.
    successes: AtomicUsize,
    /// When the limit last changed, in nanoseconds after `epoch` (0: never).
    changed: AtomicU64,
    /// Checkouts waiting for a connection slot, all shards.
    waiting: AtomicUsize,
    /// The rate's virtual schedule: the next free instant, in nanoseconds after `epoch`.
    next_send: AtomicU64,
    epoch: Instant,
}

impl Budget {
    fn new(domain: &str, shaping: Shaping, epoch: Instant) -> Budget {
        Budget {
            domain: domain.to_string(),
            limit: AtomicUsize::new(shaping.max_connections.max(1)),
            shaping,
            open: AtomicUsize::new(0),
            successes: AtomicUsize::new(0),
            changed: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            next_send: AtomicU64::new(0),
            epoch,
        }
    }

    /// The domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The connection limit now (after throttling).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Connections open now, all shards.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Messages one connection carries before it is closed; 0 for no limit.
    pub fn max_messages_per_connection(&self) -> usize {
        self.shaping.max_messages_per_connection
    }

    /// A connection slot, if the budget has one.
    pub fn try_open(self: &Arc<Self>) -> Option<Slot> {
        let limit = self.limit();
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }

    /// Over the limit (it was lowered): a connection should close rather than go idle.
    pub fn over_limit(&self) -> bool {
        self.open() > self.limit()
    }

    /// Someone, on some shard, waits for a connection slot.
    pub fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Counts a waiter until the guard is dropped.
    pub fn waiter(self: &Arc<Self>) -> Waiter {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiter(Arc::clone(self))
    }

    /// How long a message to send at `now` must wait for its turn under
    /// `max_messages_per_sec` (zero when unlimited), its turn reserved; `None` if the
    /// turn is more than [`MAX_PACING_WAIT`] away (nothing reserved).
    pub fn reserve_send(&self, now: Instant) -> Option<Duration> {
        let rate = self.shaping.max_messages_per_sec;
        if rate <= 0.0 {
            return Some(Duration::ZERO);
        }
        let interval = (1e9 / rate).max(1.0) as u64;
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let horizon = MAX_PACING_WAIT.as_nanos() as u64;
        let mut turn = 0;
        self.next_send
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
                turn = next.max(now_ns);
                (turn - now_ns <= horizon).then_some(turn + interval)
            })
            .ok()?;
        Some(Duration::from_nanos(turn - now_ns))
    }

    /// Nanoseconds from `epoch` to `now`, at least 1 (0 means "never").
    fn since_epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_nanos() as u64).max(1)
    }

    /// The next hop said "too many" at `now`: halves the connection limit (at least 1),
    /// unless more connections are open than the limit (the refusal is from a burst
    /// opened under a higher limit, already answered). Returns the new limit when it was
    /// lowered.
    pub fn throttle(&self, now: Instant) -> Option<usize> {
        self.successes.store(0, Ordering::Relaxed);
        if self.open() > self.limit() {
            return None;
        }
        self.changed.store(self.since_epoch(now), Ordering::Release);
        let old = self
            .limit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                Some((l / 2).max(1))
            })
            .unwrap_or(1);
        Some((old / 2).max(1))
    }

    /// A message was delivered at `now`: after as many as the limit, the limit grows by
    /// one (up to `max_connections`, at most once per [`GROW_EVERY`]). Returns the new
    /// limit when it grew.
    pub fn delivered(&self, now: Instant) -> Option<usize> {
        let max = self.shaping.max_connections.max(1);
        let limit = self.limit();
        if limit >= max {
            return None;
        }
        let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
        if n < limit {
            return None;
        }
        let now_ns = self.since_epoch(now);
        let last = self.changed.load(Ordering::Acquire);
        if now_ns.saturating_sub(last) < GROW_EVERY.as_nanos() as u64 {
            return None;
        }
        self.successes.store(0, Ordering::Relaxed);
        self.limit
            .compare_exchange(limit, limit + 1, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| {
                self.changed.store(now_ns, Ordering::Release);
                limit + 1
            })
    }
}

/// One open connection's share of its domain's budget, given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<Budget>);

impl Slot {
    /// The budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A checkout waiting for a slot, counted until dropped.
#[derive(Debug)]
pub struct Waiter(Arc<Budget>);

impl Drop for Waiter {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shaping(max_connections: usize, rate: f64) -> Shaping {
        Shaping {
            max_connections,
            max_messages_per_sec: rate,
            max_messages_per_connection: 0,
        }
    }

    #[test]
    fn named_domains_then_the_default() {
        let mut config = std::collections::BTreeMap::new();
        config.insert("Big.example".to_string(), shaping(2, 0.0));
        let shaper = Shaper::new(&config);
        assert!(shaper.budget("big.example").is_some());
        assert!(shaper.budget("other.example").is_none());
        config.insert("*".to_string(), shaping(4, 0.0));
        let shaper = Shaper::new(&config);
        let a = shaper.budget("big.example").unwrap();
        assert_eq!(a.limit(), 2);
        let b = shaper.budget("other.example").unwrap();
        assert_eq!(b.limit(), 4);
        // Every caller (every shard) gets the same budget.
        assert!(Arc::ptr_eq(&b, &shaper.budget("other.example").unwrap()));
        assert!(!Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn slots_are_capped_and_given_back() {
        let budget = Arc::new(Budget::new("d", shaping(2, 0.0), Instant::now()));
        let a = budget.try_open().unwrap();
        let b = budget.try_open().unwrap();
        assert!(budget.try_open().is_none());
        drop(a);
        assert_eq!(budget.open(), 1);
        let c = budget.try_open().unwrap();
        drop((b, c));
        assert_eq!(budget.open(), 0);
        let w = budget.waiter();
        assert!(budget.has_waiters());
        drop(w);
        assert!(!budget.has_waiters());
    }

    #[test]
    fn the_rate_is_a_schedule_of_turns() {
        let t0 = Instant::now();
        let budget = Budget::new("d", shaping(2, 20.0), t0);
        let turns: Vec<Duration> = (0..4).map(|_| budget.reserve_send(t0).unwrap()).collect();
        assert_eq!(
            turns,
            [0, 50, 100, 150].map(Duration::from_millis),
            "one turn every 50 ms"
        );
        // Later, after a gap: no credit for the idle time beyond the next turn.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(budget.reserve_send(later), Some(Duration::ZERO));
        assert_eq!(budget.reserve_send(later), Some(Duration::from_millis(50)));
        // Unlimited: never a wait.
        let free = Budget::new("d", shaping(2, 0.0), t0);
        assert_eq!(free.reserve_send(t0), Some(Duration::ZERO));
        assert_eq!(free.reserve_send(t0), Some(Duration::ZERO));
    }

    #[test]
    fn no_turn_beyond_the_horizon() {
        let t0 = Instant::now();
        let budget = Budget::new("d", shaping(2, 1.0), t0);
        for _ in 0..=MAX_PACING_WAIT.as_secs() {
            assert!(budget.reserve_send(t0).is_some());
        }
        assert_eq!(budget.reserve_send(t0), None);
        // Nothing was reserved by the refusal.
        assert_eq!(
            budget.reserve_send(t0 + Duration::from_secs(1)),
            Some(MAX_PACING_WAIT)
        );
    }

    #[test]
    fn throttling_halves_once_a_burst_and_grows_back_slowly() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let budget = Arc::new(Budget::new("d", shaping(16, 0.0), t0));
        // A burst of 10 connections; the first "too many" halves the limit.
        let burst: Vec<Slot> = (0..10).filter_map(|_| budget.try_open()).collect();
        assert_eq!(burst.len(), 10);
        assert_eq!(budget.throttle(at(10)), Some(8));
        // The rest of the burst, still open beyond the new limit: not halving again.
        assert_eq!(budget.throttle(at(20)), None);
        assert_eq!(budget.limit(), 8);
        drop(burst);
        // Connections opened under the new limit that meet "too many": halve again.
        assert_eq!(budget.throttle(at(30)), Some(4));
        assert_eq!(budget.throttle(at(40)), Some(2));
        assert_eq!(budget.throttle(at(50)), Some(1));
        assert_eq!(budget.throttle(at(60)), Some(1), "never below 1");
        // Deliveries soon after: no growth yet.
        assert_eq!(budget.delivered(at(100)), None);
        assert_eq!(budget.delivered(at(200)), None);
        assert_eq!(budget.limit(), 1);
        // GROW_EVERY later, one step per `limit` deliveries, one step per GROW_EVERY.
        assert_eq!(budget.delivered(at(5100)), Some(2));
        assert_eq!(budget.delivered(at(5200)), None);
        assert_eq!(budget.delivered(at(5300)), None, "not within GROW_EVERY");
        assert_eq!(budget.delivered(at(10200)), Some(3));
        let mut grown = 3;
        let mut ms = 10200;
        for _ in 0..1000 {
            ms += 1000;
            if let Some(l) = budget.delivered(at(ms)) {
                grown = l;
            }
        }
        assert_eq!(grown, 16, "back to max_connections, not beyond");
        assert_eq!(budget.limit(), 16);
    }

    #[test]
    fn throttle_replies() {
        let yes = [
            Reply::new(421, "4.7.0 Too many connections from your IP"),
            Reply::new(451, "4.7.1 too many messages, slow down"),
            Reply::new(421, "too many concurrent SMTP sessions"),
            Reply::new(450, "4.7.28 too many mails in this session"),
        ];
        for r in &yes {
            assert!(is_throttle_reply(r), "{r:?}");
        }
        let no = [
            Reply::new(421, "4.3.2 shutting down"),
            Reply::new(451, "4.3.0 too many connections"),
            Reply::new(550, "5.7.1 too many connections"),
            Reply::new(421, "4.4.2 connection with next hop lost: timeout"),
            Reply::new(452, "4.5.3 too many recipients"),
        ];
        for r in &no {
            assert!(!is_throttle_reply(r), "{r:?}");
        }
    }
}
