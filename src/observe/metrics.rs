//! The server's counters, and their rendering in the Prometheus text exposition format
//! (version 0.0.4).
//!
//! Each shard owns one [`ShardMetrics`] and is the only thread that writes it: an update
//! is a relaxed load and store on memory no other shard writes (no lock prefix, no shared
//! cache line bouncing between cores on the per-message path). A scrape reads every
//! shard's counters and sums them, so a scrape may see one shard a moment later than
//! another; counters never go backwards.
//!
//! Names follow the contract in DESIGN.md (`ringrelay_messages_received_total`,
//! `ringrelay_recipients_delivered_total`, …) and Prometheus' conventions (`_total` for
//! counters, base units: seconds, bytes).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why a connection, a command or a message was refused (a bounded label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `550 5.7.1 Relay access denied`.
    RelayDenied,
    /// Over `max_connections` or `max_connections_per_ip`.
    ConnectionCap,
    /// A handler refused MAIL, RCPT or DATA.
    Policy,
    /// A message over the size limit.
    Size,
    /// Bare CR or LF in DATA (SMTP smuggling).
    BareLineEnding,
    /// The spool could not take the message (451).
    Spool,
    /// Wrong AUTH credentials.
    Auth,
}

impl Rejection {
    const ALL: [Rejection; 7] = [
        Rejection::RelayDenied,
        Rejection::ConnectionCap,
        Rejection::Policy,
        Rejection::Size,
        Rejection::BareLineEnding,
        Rejection::Spool,
        Rejection::Auth,
    ];

    fn label(self) -> &'static str {
        match self {
            Rejection::RelayDenied => "relay_denied",
            Rejection::ConnectionCap => "connection_cap",
            Rejection::Policy => "policy",
            Rejection::Size => "size",
            Rejection::BareLineEnding => "bare_line_ending",
            Rejection::Spool => "spool",
            Rejection::Auth => "auth",
        }
    }
}

/// Upper bounds (seconds) of the delivery-duration buckets: from a fast local next hop to
/// a slow remote one.
const DELIVERY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];
/// Upper bounds (seconds) of the spool-sync buckets.
const SYNC_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];
/// Upper bounds (messages) of the group-commit batch buckets.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0];

/// Destination domains counted by name, per shard; the rest count as `other` (a bounded
/// label set, whatever the traffic).
pub const MAX_DOMAINS: usize = 50;

/// A counter written by one thread.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n` (only the owning shard calls this).
    #[inline]
    pub fn add(&self, n: u64) {
        // One writer: a plain load and store, no read-modify-write instruction.
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Sets a gauge's value.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed buckets, written by one thread. Sums are kept in microseconds
/// (or units) as integers.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<Counter>,
    count: Counter,
    /// Sum in millionths of the unit.
    sum_micros: Counter,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..bounds.len()).map(|_| Counter::default()).collect(),
            count: Counter::default(),
            sum_micros: Counter::default(),
        }
    }

    /// Records one observation of `value` (seconds, or units).
    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.buckets[i].inc();
        }
        self.count.inc();
        self.sum_micros.add((value.max(0.0) * 1e6) as u64);
    }
}

/// One shard's counters.
#[derive(Debug)]
pub struct ShardMetrics {
    /// Messages accepted (250 after DATA).
    pub messages_received: Counter,
    /// Recipients delivered to a next hop.
    pub recipients_delivered: Counter,
    /// Recipient delivery attempts deferred.
    pub recipients_deferred: Counter,
    /// Recipients bounced.
    pub recipients_bounced: Counter,
    /// Open client connections (gauge).
    pub connections_open: Counter,
    /// Connections accepted.
    pub connections_total: Counter,
    /// Messages waiting in this shard's queue (gauge).
    pub queue_messages: Counter,
    /// Arrival (unix seconds) of the oldest message in this shard's queue; 0 if none.
    pub oldest_queued_unix: Counter,
    /// DNS answers served from the cache.
    pub dns_cache_hits: Counter,
    /// DNS lookups that had to ask.
    pub dns_cache_misses: Counter,
    /// Next hops' "too many connections/messages" replies (reactive throttling).
    pub throttle_events: Counter,
    rejections: [Counter; Rejection::ALL.len()],
    /// Time from the start of an attempt to a recipient's outcome.
    pub delivery_duration: Histogram,
    /// Time one spool sync took.
    pub spool_sync_duration: Histogram,
    /// Messages one group commit made durable.
    pub commit_batch: Histogram,
    /// Delivered recipients per destination domain (at most [`MAX_DOMAINS`] names).
    domains: Mutex<Vec<(String, u64)>>,
    domains_other: Counter,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            messages_received: Counter::default(),
            recipients_delivered: Counter::default(),
            recipients_deferred: Counter::default(),
            recipients_bounced: Counter::default(),
            connections_open: Counter::default(),
            connections_total: Counter::default(),
            queue_messages: Counter::default(),
            oldest_queued_unix: Counter::default(),
            dns_cache_hits: Counter::default(),
            dns_cache_misses: Counter::default(),
            throttle_events: Counter::default(),
            rejections: Default::default(),
            delivery_duration: Histogram::new(&DELIVERY_BUCKETS),
            spool_sync_duration: Histogram::new(&SYNC_BUCKETS),
            commit_batch: Histogram::new(&BATCH_BUCKETS),
            domains: Mutex::new(Vec::new()),
            domains_other: Counter::default(),
        }
    }
}

impl ShardMetrics {
    /// Counts a refusal.
    pub fn reject(&self, why: Rejection) {
        let i = Rejection::ALL.iter().position(|&r| r == why).unwrap_or(0);
        self.rejections[i].inc();
    }

    /// Counts `n` recipients delivered to `domain` (lower case). The lock is the shard's
    /// own, taken by a scrape only briefly; it is never contended on the per-message path.
    pub fn delivered_to(&self, domain: &str, n: u64) {
        let mut domains = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = domains.iter_mut().find(|(d, _)| d == domain) {
            entry.1 += n;
        } else if domains.len() < MAX_DOMAINS {
            domains.push((domain.to_string(), n));
        } else {
            self.domains_other.add(n);
        }
    }
}

/// Every shard's counters: what a scrape reads.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    shards: Arc<Mutex<Vec<Arc<ShardMetrics>>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Counters for one more shard (call once per shard; index order is shard order).
    pub fn shard(&self) -> Arc<ShardMetrics> {
        let m = Arc::new(ShardMetrics::default());
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::clone(&m));
        m
    }

    /// Messages queued on every shard together (each shard's last report).
    pub fn queued_messages(&self) -> u64 {
        let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        shards.iter().map(|s| s.queue_messages.get()).sum()
    }

    /// Shard `index`'s counters, made on first use: the driver and the relay of one shard
    /// get the same ones, whichever asks first.
    pub fn shard_at(&self, index: usize) -> Arc<ShardMetrics> {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        while shards.len() <= index {
            shards.push(Arc::new(ShardMetrics::default()));
        }
        Arc::clone(&shards[index])
    }

    /// The counters in Prometheus text format; `now_unix` for the oldest message's age.
    pub fn render(&self, now_unix: u64) -> String {
        let shards = self
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = String::with_capacity(4096);
        let sum = |f: &dyn Fn(&ShardMetrics) -> u64| shards.iter().map(|s| f(s)).sum::<u64>();
        let counter = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "ringrelay_messages_received_total",
            "Messages accepted (250 after DATA, on disk).",
            "counter",
            sum(&|s| s.messages_received.get()),
        );
        counter(
            &mut out,
            "ringrelay_recipients_delivered_total",
            "Recipients a next hop took.",
            "counter",
            sum(&|s| s.recipients_delivered.get()),
        );
        counter(
            &mut out,
            "ringrelay_recipients_deferred_total",
            "Recipient delivery attempts deferred for a retry.",
            "counter",
            sum(&|s| s.recipients_deferred.get()),
        );
        counter(
            &mut out,
            "ringrelay_recipients_bounced_total",
            "Recipients that failed for good (bounced).",
            "counter",
            sum(&|s| s.recipients_bounced.get()),
        );
        counter(
            &mut out,
            "ringrelay_queue_messages",
            "Messages waiting in the queue (ready or deferred).",
            "gauge",
            sum(&|s| s.queue_messages.get()),
        );
        counter(
            &mut out,
            "ringrelay_connections_open",
            "Client connections open now.",
            "gauge",
            sum(&|s| s.connections_open.get()),
        );
        let oldest = shards
            .iter()
            .map(|s| s.oldest_queued_unix.get())
            .filter(|&t| t > 0)
            .min();
        counter(
            &mut out,
            "ringrelay_oldest_queued_message_age_seconds",
            "Age of the oldest message in the queue (0 when empty).",
            "gauge",
            oldest.map_or(0, |t| now_unix.saturating_sub(t)),
        );
        counter(
            &mut out,
            "ringrelay_dns_cache_hits_total",
            "MX lookups answered from a shard's cache.",
            "counter",
            sum(&|s| s.dns_cache_hits.get()),
        );
        counter(
            &mut out,
            "ringrelay_dns_cache_misses_total",
            "MX lookups that asked DNS.",
            "counter",
            sum(&|s| s.dns_cache_misses.get()),
        );
        counter(
            &mut out,
            "ringrelay_throttle_events_total",
            "Next hops' \"too many connections/messages\" replies (a shaped domain's connection limit halved).",
            "counter",
            sum(&|s| s.throttle_events.get()),
        );
        let _ = writeln!(
            out,
            "# HELP ringrelay_connections_total Client connections accepted, by shard.\n# TYPE ringrelay_connections_total counter"
        );
        for (i, s) in shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringrelay_connections_total{{shard=\"{i}\"}} {}",
                s.connections_total.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringrelay_rejections_total Refusals, by reason.\n# TYPE ringrelay_rejections_total counter"
        );
        for (k, r) in Rejection::ALL.iter().enumerate() {
            let v: u64 = shards.iter().map(|s| s.rejections[k].get()).sum();
            let _ = writeln!(
                out,
                "ringrelay_rejections_total{{reason=\"{}\"}} {v}",
                r.label()
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringrelay_delivered_by_domain_total Recipients delivered, by destination domain (the first {MAX_DOMAINS} per shard by name, then \"other\").\n# TYPE ringrelay_delivered_by_domain_total counter"
        );
        let mut domains: Vec<(String, u64)> = Vec::new();
        let mut other = 0;
        for s in &shards {
            other += s.domains_other.get();
            for (d, n) in s.domains.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                match domains.iter_mut().find(|(x, _)| x == d) {
                    Some(e) => e.1 += n,
                    None => domains.push((d.clone(), *n)),
                }
            }
        }
        domains.sort();
        for (d, n) in &domains {
            let _ = writeln!(
                out,
                "ringrelay_delivered_by_domain_total{{domain=\"{}\"}} {n}",
                escape_label(d)
            );
        }
        let _ = writeln!(
            out,
            "ringrelay_delivered_by_domain_total{{domain=\"other\"}} {other}"
        );
        histogram(
            &mut out,
            "ringrelay_delivery_duration_seconds",
            "Time from the start of a delivery attempt to a recipient's outcome.",
            &shards,
            |s| &s.delivery_duration,
        );
        histogram(
            &mut out,
            "ringrelay_spool_sync_duration_seconds",
            "Time one spool sync (fdatasync of a group commit) took.",
            &shards,
            |s| &s.spool_sync_duration,
        );
        histogram(
            &mut out,
            "ringrelay_group_commit_messages",
            "Messages one group commit made durable.",
            &shards,
            |s| &s.commit_batch,
        );
        out
    }
}

/// Writes one histogram summed over the shards.
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    shards: &[Arc<ShardMetrics>],
    pick: impl Fn(&ShardMetrics) -> &Histogram,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let Some(first) = shards.first() else {
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} 0\n{name}_sum 0\n{name}_count 0"
        );
        return;
    };
    let bounds = pick(first).bounds;
    let mut cumulative = 0;
    for (i, bound) in bounds.iter().enumerate() {
        cumulative += shards.iter().map(|s| pick(s).buckets[i].get()).sum::<u64>();
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let count: u64 = shards.iter().map(|s| pick(s).count.get()).sum();
    let sum: u64 = shards.iter().map(|s| pick(s).sum_micros.get()).sum();
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {}\n{name}_count {count}",
        sum as f64 / 1e6
    );
}

/// A label value with `\`, `"` and line feeds escaped (the text format's rule).
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_summed_and_histograms_are_cumulative() {
        let r = Registry::new();
        let a = r.shard();
        let b = r.shard();
        a.messages_received.add(3);
        b.messages_received.add(4);
        a.delivery_duration.observe(0.002);
        b.delivery_duration.observe(0.2);
        b.delivery_duration.observe(100.0);
        a.reject(Rejection::RelayDenied);
        b.connections_total.add(2);
        b.oldest_queued_unix.set(1000);
        a.throttle_events.inc();
        let text = r.render(1060);
        assert!(
            text.contains("\nringrelay_messages_received_total 7\n"),
            "{text}"
        );
        assert!(text.contains("ringrelay_delivery_duration_seconds_bucket{le=\"0.0025\"} 1\n"));
        assert!(text.contains("ringrelay_delivery_duration_seconds_bucket{le=\"0.25\"} 2\n"));
        assert!(text.contains("ringrelay_delivery_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("ringrelay_delivery_duration_seconds_count 3\n"));
        assert!(text.contains("ringrelay_rejections_total{reason=\"relay_denied\"} 1\n"));
        assert!(text.contains("ringrelay_connections_total{shard=\"1\"} 2\n"));
        assert!(text.contains("ringrelay_oldest_queued_message_age_seconds 60\n"));
        assert!(text.contains("\nringrelay_throttle_events_total 1\n"));
    }

    #[test]
    fn domain_labels_are_bounded_and_escaped() {
        let r = Registry::new();
        let s = r.shard();
        for i in 0..(MAX_DOMAINS + 10) {
            s.delivered_to(&format!("d{i}.test"), 1);
        }
        s.delivered_to("d0.test", 5);
        s.delivered_to("we\"ird\\.test", 1);
        let text = r.render(0);
        assert!(text.contains("ringrelay_delivered_by_domain_total{domain=\"d0.test\"} 6\n"));
        assert!(text.contains("ringrelay_delivered_by_domain_total{domain=\"other\"} 11\n"));
        assert_eq!(
            text.matches("ringrelay_delivered_by_domain_total{").count(),
            MAX_DOMAINS + 1
        );
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
