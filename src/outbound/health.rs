//! Dead next hops, per shard: which addresses refused a connection, timed out or failed
//! their greeting, and until when no connection is made to them.
//!
//! An address is in one of three states: *unknown* (never tried, or its down time has run
//! out), *up* (a connection to it was opened), or *down* until an instant. A pure state
//! machine: the time comes in as an argument, and the pool ([`super::pool`]) does the I/O.
//!
//! - Up: connections are made as the pool's caps allow.
//! - Down, before its time: no connection is made; the caller defers its recipients with
//!   [`Down::reply`] (`451 4.4.1 next hop ADDR is down (last: REASON); not retried for N s`)
//!   and tries the next MX address, if any.
//! - Unknown: one connection at a time, a *trial* (after a down time, the probe). Others
//!   wait for its outcome instead of each connecting: success makes the address up for
//!   all of them; failure makes it down and they defer. So a burst of messages to a next
//!   hop that is down costs one connection attempt, not one each.
//!
//! How long an address stays down is [`super::pool::PoolConfig::down_for`]: the first step
//! of the retry schedule, at most 60 s. Messages deferred because of it come back after at
//! least that step, so they find the address ready for a probe, never stuck behind it.
//!
//! Per shard, with no state shared between shards: each shard learns for itself that a
//! next hop is down, which costs at most one connection attempt per shard per down time
//! (two shards: two), and no cross-thread traffic on the delivery path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::smtp::Reply;

/// Up entries not touched for this long are forgotten (the next connection is a trial).
const FORGET_UP_AFTER: Duration = Duration::from_secs(3600);

/// Why an address is not connected to, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Down {
    /// The address.
    pub addr: SocketAddr,
    /// The last failure.
    pub reason: String,
    /// How long until the next probe.
    pub left: Duration,
}

impl Down {
    /// The reply the recipients are deferred with.
    pub fn reply(&self) -> Reply {
        Reply::new(
            451,
            format!(
                "4.4.1 next hop {} is down (last: {}); not retried for {} s",
                self.addr,
                self.reason,
                self.left.as_secs().max(1)
            ),
        )
    }
}

/// What a caller that wants a new connection to an address may do now.
#[derive(Debug)]
pub enum Verdict {
    /// Connect (the address is up).
    Connect,
    /// Connect as the trial (or probe): report its outcome with [`Health::ended`].
    Trial,
    /// A trial is under way: wait for this, then ask again.
    Wait(Rc<Notify>),
    /// Do not connect.
    Down(Down),
}

/// How a connection attempt ended, as far as the address's health goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Connected and greeted: the address is up.
    Up,
    /// Refused, timed out, or the greeting (or EHLO) failed: down for a while.
    Failed(String),
    /// Neither (TLS or AUTH could not be had, a "too many connections" reply): the address
    /// answers, but says nothing about being up for other connections.
    Inconclusive,
}

#[derive(Debug)]
enum State {
    Up { since: Instant },
    Down { until: Instant, reason: String },
}

#[derive(Debug, Default)]
struct Entry {
    state: Option<State>,
    /// Set while a trial connection is being made; notified when it ends.
    trial: Option<Rc<Notify>>,
}

/// One shard's view of its next hops' health.
#[derive(Debug)]
pub struct Health {
    down_for: Duration,
    addrs: HashMap<SocketAddr, Entry>,
}

impl Health {
    /// Addresses that fail are down for `down_for`.
    pub fn new(down_for: Duration) -> Health {
        Health {
            down_for,
            addrs: HashMap::new(),
        }
    }

    /// How long a failed address stays down.
    pub fn down_for(&self) -> Duration {
        self.down_for
    }

    /// May a new connection to `addr` be made at `now`? A [`Verdict::Trial`] is recorded
    /// as under way at once: call this only when about to connect, and end it with
    /// [`Health::ended`].
    pub fn check(&mut self, addr: SocketAddr, now: Instant) -> Verdict {
        let entry = self.addrs.entry(addr).or_default();
        match &entry.state {
            Some(State::Up { .. }) => return Verdict::Connect,
            Some(State::Down { until, reason }) if *until > now => {
                return Verdict::Down(Down {
                    addr,
                    reason: reason.clone(),
                    left: *until - now,
                })
            }
            _ => {}
        }
        match &entry.trial {
            Some(notify) => Verdict::Wait(Rc::clone(notify)),
            None => {
                entry.trial = Some(Rc::new(Notify::new()));
                Verdict::Trial
            }
        }
    }

    /// Like [`Health::check`], without starting a trial: `Trial` means one may be started.
    pub fn peek(&self, addr: SocketAddr, now: Instant) -> Verdict {
        let Some(entry) = self.addrs.get(&addr) else {
            return Verdict::Trial;
        };
        match &entry.state {
            Some(State::Up { .. }) => Verdict::Connect,
            Some(State::Down { until, reason }) if *until > now => Verdict::Down(Down {
                addr,
                reason: reason.clone(),
                left: *until - now,
            }),
            _ => match &entry.trial {
                Some(notify) => Verdict::Wait(Rc::clone(notify)),
                None => Verdict::Trial,
            },
        }
    }

    /// Records how a connection attempt to `addr` ended (a trial's or any other's), and
    /// wakes those waiting on a trial. Returns true when this made an up (or unknown)
    /// address down: worth a log line.
    pub fn ended(&mut self, addr: SocketAddr, outcome: Outcome, now: Instant) -> bool {
        let entry = self.addrs.entry(addr).or_default();
        if let Some(notify) = entry.trial.take() {
            notify.notify_waiters();
        }
        match outcome {
            Outcome::Up => {
                entry.state = Some(State::Up { since: now });
                false
            }
            Outcome::Failed(reason) => {
                let was_down = matches!(entry.state, Some(State::Down { .. }));
                entry.state = Some(State::Down {
                    until: now + self.down_for,
                    reason,
                });
                !was_down
            }
            Outcome::Inconclusive => false,
        }
    }

    /// A trial given up without an outcome (its connection attempt was dropped): the next
    /// caller may try.
    pub fn abandon_trial(&mut self, addr: SocketAddr) {
        if let Some(notify) = self.addrs.get_mut(&addr).and_then(|e| e.trial.take()) {
            notify.notify_waiters();
        }
    }

    /// Forgets what no longer matters: down times that have run out and up states not
    /// renewed for an hour (either way the next connection is a trial).
    pub fn tidy(&mut self, now: Instant) {
        self.addrs.retain(|_, e| {
            e.trial.is_some()
                || match &e.state {
                    Some(State::Down { until, .. }) => *until > now,
                    Some(State::Up { since }) => now.duration_since(*since) < FORGET_UP_AFTER,
                    None => false,
                }
        });
    }

    /// Forgets every down time (`queue flush`, as Postfix's flush forgets dead
    /// destinations): the next connection to each address is a trial.
    pub fn forget_down(&mut self) {
        for e in self.addrs.values_mut() {
            if matches!(e.state, Some(State::Down { .. })) {
                e.state = None;
            }
        }
    }

    /// Addresses remembered (for tests).
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn a_first_connection_is_a_trial_and_others_wait_for_it() {
        let mut h = Health::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(matches!(h.peek(addr(25), t0), Verdict::Trial));
        assert!(matches!(h.check(addr(25), t0), Verdict::Trial));
        assert!(matches!(h.check(addr(25), t0), Verdict::Wait(_)));
        assert!(matches!(h.peek(addr(25), t0), Verdict::Wait(_)));
        // Another address is unaffected.
        assert!(matches!(h.check(addr(26), t0), Verdict::Trial));
        h.ended(addr(25), Outcome::Up, t0);
        assert!(matches!(h.check(addr(25), t0), Verdict::Connect));
        assert!(matches!(h.check(addr(25), t0), Verdict::Connect));
    }

    #[test]
    fn a_failure_makes_it_down_until_its_time_then_one_probe() {
        let mut h = Health::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(matches!(h.check(addr(25), t0), Verdict::Trial));
        assert!(h.ended(addr(25), Outcome::Failed("connection refused".into()), t0));
        let Verdict::Down(down) = h.check(addr(25), t0 + Duration::from_secs(10)) else {
            panic!("down")
        };
        assert_eq!(down.left, Duration::from_secs(50));
        let reply = down.reply();
        assert_eq!(reply.code(), 451);
        assert_eq!(
            reply.one_line(),
            "451 4.4.1 next hop 192.0.2.1:25 is down (last: connection refused); not retried for 50 s"
        );
        // After its time: one probe, the others wait for it.
        let later = t0 + Duration::from_secs(61);
        assert!(matches!(h.check(addr(25), later), Verdict::Trial));
        assert!(matches!(h.check(addr(25), later), Verdict::Wait(_)));
        // The probe fails: down again, for another full period, not newly down.
        assert!(!h.ended(addr(25), Outcome::Failed("timeout".into()), later));
        assert!(matches!(
            h.check(addr(25), later + Duration::from_secs(59)),
            Verdict::Down(Down { ref reason, .. }) if reason == "timeout"
        ));
        // The next probe succeeds: up, for everyone.
        let later = later + Duration::from_secs(60);
        assert!(matches!(h.check(addr(25), later), Verdict::Trial));
        h.ended(addr(25), Outcome::Up, later);
        assert!(matches!(h.check(addr(25), later), Verdict::Connect));
    }

    #[test]
    fn an_up_address_goes_down_on_a_failure_and_inconclusive_changes_nothing() {
        let mut h = Health::new(Duration::from_secs(5));
        let t0 = Instant::now();
        h.ended(addr(25), Outcome::Up, t0);
        h.ended(addr(25), Outcome::Inconclusive, t0);
        assert!(matches!(h.check(addr(25), t0), Verdict::Connect));
        assert!(h.ended(addr(25), Outcome::Failed("greeting: 554".into()), t0));
        assert!(matches!(h.check(addr(25), t0), Verdict::Down(_)));
        // An inconclusive trial leaves it unknown: the next caller tries.
        let later = t0 + Duration::from_secs(6);
        assert!(matches!(h.check(addr(25), later), Verdict::Trial));
        h.ended(addr(25), Outcome::Inconclusive, later);
        assert!(matches!(h.check(addr(25), later), Verdict::Trial));
        h.abandon_trial(addr(25));
        assert!(matches!(h.check(addr(25), later), Verdict::Trial));
    }

    #[test]
    fn waiters_are_woken_when_the_trial_ends() {
        let mut h = Health::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(matches!(h.check(addr(25), t0), Verdict::Trial));
        let Verdict::Wait(notify) = h.check(addr(25), t0) else {
            panic!("wait")
        };
        let woken = notify.notified();
        tokio::pin!(woken);
        let waker = futures_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(woken.as_mut().poll(&mut cx).is_pending());
        h.ended(addr(25), Outcome::Failed("refused".into()), t0);
        assert!(woken.as_mut().poll(&mut cx).is_ready());
    }

    fn futures_waker() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }

    #[test]
    fn tidy_forgets_run_out_down_times() {
        let mut h = Health::new(Duration::from_secs(5));
        let t0 = Instant::now();
        h.ended(addr(25), Outcome::Failed("refused".into()), t0);
        h.ended(addr(26), Outcome::Up, t0);
        h.tidy(t0 + Duration::from_secs(1));
        assert_eq!(h.len(), 2);
        h.tidy(t0 + Duration::from_secs(6));
        assert_eq!(h.len(), 1);
        h.tidy(t0 + FORGET_UP_AFTER + Duration::from_secs(1));
        assert!(h.is_empty());
    }
}
