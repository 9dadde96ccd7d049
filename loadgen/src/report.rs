//! Statistics and reports: HDR latency histograms (and their text form in `send --json`), the
//! counters `send` and `sink` keep per thread (merged at the end), their `--json` documents
//! and the human summaries.

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// A latency histogram in microseconds, 1 µs to 1 hour, 3 significant digits.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

/// The highest latency a default `Latency` records, µs: one hour.
const LATENCY_MAX: u64 = 3_600_000_000;

/// HDR histogram V2 encoding (uncompressed): the cookie, and the header before the counts
/// (cookie, payload length, normalizing offset, significant digits, lowest, highest, ratio).
const V2_COOKIE: u32 = 0x1c84_9313;
const V2_HEADER: usize = 40;

impl Default for Latency {
    fn default() -> Self {
        Latency::new(LATENCY_MAX)
    }
}

impl Latency {
    pub fn new(max: u64) -> Latency {
        // Constant, valid bounds: construction cannot fail.
        Latency(Histogram::new_with_bounds(1, max, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, d: Duration) {
        self.record_value(d.as_micros().min(u128::from(u64::MAX)) as u64);
    }

    pub fn record_value(&mut self, v: u64) {
        self.0.saturating_record(v.max(1).min(self.0.high()));
    }

    pub fn merge(&mut self, o: &Latency) {
        // Same bounds on both sides, so adding cannot fail; ignore the impossible error.
        let _ = self.0.add(&o.0);
    }

    /// The histogram in HDR's V2 encoding (the one HdrHistogram implementations share),
    /// uncompressed, as base64 text: lossless, so that runs can be merged later.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Into a Vec, with u64 counts far below i64::MAX: this cannot fail.
        V2Serializer::new()
            .serialize(&self.0, &mut buf)
            .expect("V2 encoding into memory");
        crate::base64::encode(&buf)
    }

    /// Reads what `encode` wrote into a default (1 µs to 1 hour) histogram. The header is
    /// checked before anything is allocated, so a hostile file cannot make us reserve
    /// gigabytes: one uncompressed V2 histogram, nothing after it, bounds within ours.
    pub fn decode(text: &str) -> Result<Latency, String> {
        let b = crate::base64::decode(text).map_err(|e| format!("not base64: {e}"))?;
        let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
        if b.len() < V2_HEADER || be32(0) != V2_COOKIE {
            return Err("not an uncompressed HDR histogram (V2)".into());
        }
        if be32(4) as usize != b.len() - V2_HEADER {
            return Err(format!(
                "HDR histogram says {} bytes of counts but holds {}",
                be32(4),
                b.len() - V2_HEADER
            ));
        }
        let (low, high) = (be64(16), be64(24));
        if low == 0 || low > high || high > LATENCY_MAX || be32(12) > 5 {
            return Err(format!(
                "HDR histogram bounds {low}..{high} with {} digits are not loadgen's",
                be32(12)
            ));
        }
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut &b[..])
            .map_err(|e| format!("bad HDR histogram: {e}"))?;
        let mut l = Latency::default();
        l.0.add(&h)
            .map_err(|_| "HDR histogram values out of range".to_string())?;
        Ok(l)
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn summary(&self) -> LatencySummary {
        let h = &self.0;
        let q = |p: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(p)
            }
        };
        LatencySummary {
            count: h.len(),
            min: if h.is_empty() { 0 } else { h.min() },
            mean: if h.is_empty() {
                0.0
            } else {
                (h.mean() * 10.0).round() / 10.0
            },
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: if h.is_empty() { 0 } else { h.max() },
        }
    }
}

/// Percentiles of one histogram; values in the unit the field name says (µs for latencies).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// Ways a send transaction or connection attempt can fail, as opposed to being rejected.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default)]
pub struct ErrorCounts {
    /// TCP connect failed or timed out.
    pub connect: u64,
    /// The greeting was missing, malformed or not 220; or EHLO/HELO was refused.
    pub greeting: u64,
    /// No reply within `--timeout`.
    pub timeout: u64,
    /// The server closed the connection mid-transaction.
    pub closed: u64,
    /// A read or write failed (e.g. connection reset).
    pub io: u64,
    /// A reply that is not SMTP (bad code, overlong line, inconsistent multi-line reply).
    pub protocol: u64,
    /// STARTTLS not offered or refused, or the TLS handshake failed.
    pub tls: u64,
    /// AUTH refused (or failed).
    pub auth: u64,
}

impl ErrorCounts {
    fn merge(&mut self, o: &ErrorCounts) {
        self.connect += o.connect;
        self.greeting += o.greeting;
        self.timeout += o.timeout;
        self.closed += o.closed;
        self.io += o.io;
        self.protocol += o.protocol;
        self.tls += o.tls;
        self.auth += o.auth;
    }
}

/// What one sender thread counted.
pub struct SendStats {
    pub sent: u64,
    pub accepted: u64,
    pub tempfail: u64,
    pub permfail: u64,
    /// Messages whose transaction ended in an error (not a reply).
    pub failed: u64,
    /// Final reply code per message, indexed by code (0..=599).
    pub codes: Vec<u64>,
    pub errors: ErrorCounts,
    pub conns_opened: u64,
    pub conns_without_pipelining: u64,
    pub rcpt_accepted: u64,
    pub rcpt_rejected: u64,
    pub bytes_accepted: u64,
    pub connect: Latency,
    pub banner: Latency,
    pub txn: Latency,
    /// Accepted messages: from the end of the content to the reply (the 250).
    pub end_of_data: Latency,
    pub lag: Latency,
    /// Failed connection attempts by reason, in the server's words where it gave some
    /// (`greeting 421 4.7.0 ...`, `connect: Connection refused ...`).
    pub conn_failures: BTreeMap<String, u64>,
    pub tls_sessions: u64,
    /// TLS handshakes that failed (not STARTTLS refusals).
    pub tls_failures: u64,
    pub tls_handshake: Latency,
    pub auth_ok: u64,
    pub auth_failed: u64,
}

impl Default for SendStats {
    fn default() -> Self {
        SendStats {
            sent: 0,
            accepted: 0,
            tempfail: 0,
            permfail: 0,
            failed: 0,
            codes: vec![0; 600],
            errors: ErrorCounts::default(),
            conns_opened: 0,
            conns_without_pipelining: 0,
            rcpt_accepted: 0,
            rcpt_rejected: 0,
            bytes_accepted: 0,
            connect: Latency::default(),
            banner: Latency::default(),
            txn: Latency::default(),
            end_of_data: Latency::default(),
            lag: Latency::default(),
            conn_failures: BTreeMap::new(),
            tls_sessions: 0,
            tls_failures: 0,
            tls_handshake: Latency::default(),
            auth_ok: 0,
            auth_failed: 0,
        }
    }
}

/// Distinct connection failure reasons kept; the rest are counted under `OTHER_REASONS`, so
/// a server that puts a counter or a time in its refusals cannot grow the report without end.
const MAX_REASONS: usize = 64;
const OTHER_REASONS: &str = "(other reasons)";

fn count_reason(map: &mut BTreeMap<String, u64>, reason: &str, n: u64) {
    if let Some(c) = map.get_mut(reason) {
        *c += n;
    } else if map.len() < MAX_REASONS {
        map.insert(reason.to_string(), n);
    } else {
        *map.entry(OTHER_REASONS.to_string()).or_default() += n;
    }
}

impl SendStats {
    /// Counts one failed connection attempt under its reason.
    pub fn conn_failure(&mut self, reason: &str) {
        count_reason(&mut self.conn_failures, reason, 1);
    }

    pub fn code(&mut self, code: u16) {
        if let Some(c) = self.codes.get_mut(usize::from(code)) {
            *c += 1;
        }
    }

    pub fn merge(&mut self, o: &SendStats) {
        self.sent += o.sent;
        self.accepted += o.accepted;
        self.tempfail += o.tempfail;
        self.permfail += o.permfail;
        self.failed += o.failed;
        for (a, b) in self.codes.iter_mut().zip(&o.codes) {
            *a += b;
        }
        self.errors.merge(&o.errors);
        self.conns_opened += o.conns_opened;
        self.conns_without_pipelining += o.conns_without_pipelining;
        self.rcpt_accepted += o.rcpt_accepted;
        self.rcpt_rejected += o.rcpt_rejected;
        self.bytes_accepted += o.bytes_accepted;
        self.connect.merge(&o.connect);
        self.banner.merge(&o.banner);
        self.txn.merge(&o.txn);
        self.end_of_data.merge(&o.end_of_data);
        self.lag.merge(&o.lag);
        for (r, &n) in &o.conn_failures {
            count_reason(&mut self.conn_failures, r, n);
        }
        self.tls_sessions += o.tls_sessions;
        self.tls_failures += o.tls_failures;
        self.tls_handshake.merge(&o.tls_handshake);
        self.auth_ok += o.auth_ok;
        self.auth_failed += o.auth_failed;
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub struct SendConfigReport {
    pub connections: usize,
    pub threads: usize,
    pub messages: Option<u64>,
    pub duration_s: Option<f64>,
    pub rate: Option<f64>,
    pub size_min: usize,
    pub size_max: usize,
    pub rcpts: usize,
    pub domains: Vec<String>,
    pub pipelining: bool,
    pub new_connection_per_message: bool,
    pub starttls: bool,
    /// Certificates checked (`--tls-verify` or `--tls-ca`).
    pub tls_verify: bool,
    pub auth_user: Option<String>,
    /// `--source-addr` and `--source-range`, as given.
    #[serde(default)]
    pub source_addr: Option<String>,
    #[serde(default)]
    pub source_range: Option<String>,
}

/// AUTH results of a `send --auth` run.
#[derive(Serialize, Deserialize, Debug)]
pub struct AuthReport {
    /// Connections that got 235.
    pub succeeded: u64,
    /// Connections whose AUTH got anything else (reasons in `connection_failures`).
    pub failed: u64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct SendMessages {
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub tempfail: u64,
    pub permfail: u64,
    pub errors: u64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct SendConnections {
    pub opened: u64,
    pub failed: u64,
    pub without_pipelining: u64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Recipients {
    pub accepted: u64,
    pub rejected: u64,
}

#[derive(Serialize, Debug)]
pub struct Throughput {
    pub sent_per_s: f64,
    pub accepted_per_s: f64,
    pub mb_per_s: f64,
}

#[derive(Serialize, Debug)]
pub struct SendLatency {
    pub connect: LatencySummary,
    pub banner: LatencySummary,
    pub transaction: LatencySummary,
    /// From the end of the content (terminator written) to the reply, accepted messages.
    pub end_of_data: LatencySummary,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Schedule {
    pub rate: f64,
    /// Messages the schedule asked for.
    pub scheduled: u64,
    /// Messages actually started.
    pub started: u64,
    /// Scheduled but never started, because the run ended first.
    pub unstarted: u64,
    /// How late messages started against their intended start, µs.
    pub lag_us: LatencySummary,
    /// `unstarted` expressed as time: how far behind schedule the run ended, ms.
    pub behind_at_end_ms: f64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ManifestInfo {
    pub file: String,
    pub entries: u64,
}

/// The `send --json` document (schema in README.md).
#[derive(Serialize, Debug)]
pub struct SendReport {
    pub tool: &'static str,
    pub version: u32,
    pub run_id: String,
    pub target: String,
    pub stop_reason: String,
    pub config: SendConfigReport,
    pub elapsed_s: f64,
    pub messages: SendMessages,
    pub reply_codes: BTreeMap<String, u64>,
    pub errors: ErrorCounts,
    /// Failed connection attempts by reason, with the server's text.
    pub connection_failures: BTreeMap<String, u64>,
    pub connections: SendConnections,
    pub recipients: Recipients,
    pub bytes_accepted: u64,
    pub throughput: Throughput,
    pub latency_us: SendLatency,
    pub schedule: Option<Schedule>,
    pub manifest: Option<ManifestInfo>,
    /// Present with `--starttls`.
    pub tls: Option<TlsReport>,
    /// Present with `--auth`.
    pub auth: Option<AuthReport>,
    /// Present in the output of `loadgen merge`: the reports that went into it.
    pub merged_from: Option<Vec<MergedInput>>,
    /// Every histogram behind the summaries above, for `loadgen merge`.
    pub histograms: SendHistograms,
}

/// The histograms of a send run, each `Latency::encode`d (HDR V2, base64), all in µs.
#[derive(Serialize, Deserialize, Debug)]
pub struct SendHistograms {
    pub connect_us: String,
    pub banner_us: String,
    pub transaction_us: String,
    pub end_of_data_us: String,
    /// Start lag against the schedule (`--rate`); empty in closed loop.
    pub lag_us: String,
    /// STARTTLS handshakes; empty without `--starttls`.
    pub tls_handshake_us: String,
}

impl SendHistograms {
    fn encode(s: &SendStats) -> SendHistograms {
        SendHistograms {
            connect_us: s.connect.encode(),
            banner_us: s.banner.encode(),
            transaction_us: s.txn.encode(),
            end_of_data_us: s.end_of_data.encode(),
            lag_us: s.lag.encode(),
            tls_handshake_us: s.tls_handshake.encode(),
        }
    }

    /// Decodes every histogram into `s`; an error names the histogram.
    pub fn decode_into(&self, s: &mut SendStats) -> Result<(), String> {
        for (name, text, into) in [
            ("connect_us", &self.connect_us, &mut s.connect),
            ("banner_us", &self.banner_us, &mut s.banner),
            ("transaction_us", &self.transaction_us, &mut s.txn),
            ("end_of_data_us", &self.end_of_data_us, &mut s.end_of_data),
            ("lag_us", &self.lag_us, &mut s.lag),
            (
                "tls_handshake_us",
                &self.tls_handshake_us,
                &mut s.tls_handshake,
            ),
        ] {
            *into = Latency::decode(text).map_err(|e| format!("histograms.{name}: {e}"))?;
        }
        Ok(())
    }
}

/// One report that went into a `loadgen merge`.
#[derive(Serialize, Debug)]
pub struct MergedInput {
    pub file: String,
    pub run_id: String,
    pub target: String,
    pub stop_reason: String,
    pub elapsed_s: f64,
    pub accepted: u64,
}

fn per_s(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        (n as f64 / secs * 10.0).round() / 10.0
    } else {
        0.0
    }
}

/// Rounds to 3 decimals so that the JSON stays readable.
pub fn r3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

impl SendReport {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        s: &SendStats,
        run_id: String,
        target: String,
        stop_reason: String,
        config: SendConfigReport,
        elapsed: Duration,
        schedule: Option<Schedule>,
        manifest: Option<ManifestInfo>,
    ) -> SendReport {
        let secs = elapsed.as_secs_f64();
        let reply_codes = s
            .codes
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(c, &n)| (c.to_string(), n))
            .collect();
        SendReport {
            tool: "loadgen send",
            version: 1,
            run_id,
            target,
            stop_reason,
            elapsed_s: r3(secs),
            messages: SendMessages {
                sent: s.sent,
                accepted: s.accepted,
                rejected: s.tempfail + s.permfail,
                tempfail: s.tempfail,
                permfail: s.permfail,
                errors: s.failed,
            },
            reply_codes,
            errors: s.errors,
            connection_failures: s.conn_failures.clone(),
            connections: SendConnections {
                opened: s.conns_opened,
                failed: s.errors.connect,
                without_pipelining: s.conns_without_pipelining,
            },
            recipients: Recipients {
                accepted: s.rcpt_accepted,
                rejected: s.rcpt_rejected,
            },
            bytes_accepted: s.bytes_accepted,
            throughput: Throughput {
                sent_per_s: per_s(s.sent, secs),
                accepted_per_s: per_s(s.accepted, secs),
                mb_per_s: r3(if secs > 0.0 {
                    s.bytes_accepted as f64 / 1e6 / secs
                } else {
                    0.0
                }),
            },
            latency_us: SendLatency {
                connect: s.connect.summary(),
                banner: s.banner.summary(),
                transaction: s.txn.summary(),
                end_of_data: s.end_of_data.summary(),
            },
            tls: config.starttls.then(|| TlsReport {
                sessions: s.tls_sessions,
                handshake_failures: s.tls_failures,
                handshake_us: s.tls_handshake.summary(),
            }),
            auth: config.auth_user.is_some().then_some(AuthReport {
                succeeded: s.auth_ok,
                failed: s.auth_failed,
            }),
            config,
            schedule,
            manifest,
            merged_from: None,
            histograms: SendHistograms::encode(s),
        }
    }

    pub fn human(&self) -> String {
        let mut o = String::new();
        let m = &self.messages;
        let _ = writeln!(
            o,
            "loadgen send: {} sent, {} accepted, {} rejected ({} temp, {} perm), {} errors in {:.2} s ({})",
            m.sent, m.accepted, m.rejected, m.tempfail, m.permfail, m.errors, self.elapsed_s, self.stop_reason
        );
        let _ = writeln!(
            o,
            "  throughput: {:.1} msgs/s sent, {:.1} msgs/s accepted, {:.3} MB/s accepted",
            self.throughput.sent_per_s, self.throughput.accepted_per_s, self.throughput.mb_per_s
        );
        let codes: Vec<String> = self
            .reply_codes
            .iter()
            .map(|(c, n)| format!("{c}={n}"))
            .collect();
        let _ = writeln!(
            o,
            "  reply codes: {}",
            if codes.is_empty() {
                "none".into()
            } else {
                codes.join(" ")
            }
        );
        let e = &self.errors;
        let _ = writeln!(
            o,
            "  errors: connect={} greeting={} tls={} auth={} timeout={} closed={} io={} protocol={}; connections opened={}",
            e.connect, e.greeting, e.tls, e.auth, e.timeout, e.closed, e.io, e.protocol, self.connections.opened
        );
        if let Some(t) = &self.tls {
            let _ = writeln!(o, "{}", t.human());
        }
        if let Some(a) = &self.auth {
            let _ = writeln!(o, "  auth: {} succeeded, {} failed", a.succeeded, a.failed);
        }
        if !self.connection_failures.is_empty() {
            let mut by_count: Vec<(&String, &u64)> = self.connection_failures.iter().collect();
            by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let _ = writeln!(o, "  connection failures:");
            for (reason, n) in by_count.iter().take(10) {
                let _ = writeln!(o, "    {n:>8} x {reason}");
            }
            if by_count.len() > 10 {
                let _ = writeln!(o, "    ... {} more reasons in --json", by_count.len() - 10);
            }
        }
        let _ = writeln!(
            o,
            "  latency ms        p50      p90      p99    p99.9      max    count"
        );
        for (name, l) in [
            ("connect", &self.latency_us.connect),
            ("banner", &self.latency_us.banner),
            ("transaction", &self.latency_us.transaction),
            ("end of data", &self.latency_us.end_of_data),
        ] {
            let _ = writeln!(o, "  {name:<12}{}", fmt_lat(l));
        }
        if let Some(s) = &self.schedule {
            let _ = writeln!(
                o,
                "  schedule: {} msgs/s, {} scheduled, {} started, {} unstarted; behind at end {:.1} ms",
                s.rate, s.scheduled, s.started, s.unstarted, s.behind_at_end_ms
            );
            let _ = writeln!(o, "  {:<12}{}", "start lag", fmt_lat(&s.lag_us));
        }
        if let Some(mf) = &self.manifest {
            let _ = writeln!(o, "  manifest: {} ids written to {}", mf.entries, mf.file);
        }
        o
    }
}

fn fmt_lat(l: &LatencySummary) -> String {
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "{:>9.3}{:>9.3}{:>9.3}{:>9.3}{:>9.3}{:>9}",
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.p999),
        ms(l.max),
        l.count
    )
}

/// What one sink thread counted.
pub struct SinkStats {
    pub connections: u64,
    pub open: u64,
    /// Messages accepted per connection, recorded when the connection ends.
    pub msgs_per_conn: Latency,
    pub received: u64,
    pub duplicates: u64,
    pub corrupted: u64,
    pub foreign: u64,
    pub tempfailed: u64,
    pub permfailed: u64,
    pub rcpt_accepted: u64,
    pub rcpt_rejected: u64,
    pub bytes: u64,
    pub pipelined_groups: u64,
    pub bad_commands: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    /// STARTTLS handshakes that completed, and those that failed or timed out.
    pub tls_sessions: u64,
    pub tls_failures: u64,
    pub tls_handshake: Latency,
}

impl Default for SinkStats {
    fn default() -> Self {
        SinkStats {
            connections: 0,
            open: 0,
            msgs_per_conn: Latency::new(1 << 40),
            received: 0,
            duplicates: 0,
            corrupted: 0,
            foreign: 0,
            tempfailed: 0,
            permfailed: 0,
            rcpt_accepted: 0,
            rcpt_rejected: 0,
            bytes: 0,
            pipelined_groups: 0,
            bad_commands: 0,
            first: None,
            last: None,
            tls_sessions: 0,
            tls_failures: 0,
            tls_handshake: Latency::default(),
        }
    }
}

impl SinkStats {
    pub fn merge(&mut self, o: &SinkStats) {
        self.connections += o.connections;
        self.open += o.open;
        self.msgs_per_conn.merge(&o.msgs_per_conn);
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.corrupted += o.corrupted;
        self.foreign += o.foreign;
        self.tempfailed += o.tempfailed;
        self.permfailed += o.permfailed;
        self.rcpt_accepted += o.rcpt_accepted;
        self.rcpt_rejected += o.rcpt_rejected;
        self.bytes += o.bytes;
        self.pipelined_groups += o.pipelined_groups;
        self.bad_commands += o.bad_commands;
        self.first = match (self.first, o.first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last = self.last.max(o.last);
        self.tls_sessions += o.tls_sessions;
        self.tls_failures += o.tls_failures;
        self.tls_handshake.merge(&o.tls_handshake);
    }
}

#[derive(Serialize, Debug)]
pub struct PerConnection {
    pub mean: f64,
    pub p50: u64,
    pub max: u64,
}

#[derive(Serialize, Debug)]
pub struct SinkConnections {
    pub accepted: u64,
    pub open_at_end: u64,
    pub messages_per_connection: PerConnection,
}

#[derive(Serialize, Debug)]
pub struct SinkMessages {
    /// Answered 250 at the end of DATA: unique + duplicates + corrupted + foreign.
    pub received: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub corrupted: u64,
    pub foreign: u64,
    pub tempfailed: u64,
    pub permfailed: u64,
}

#[derive(Serialize, Debug)]
pub struct SinkThroughput {
    /// First to last accepted message, s.
    pub active_s: f64,
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
}

#[derive(Serialize, Debug)]
pub struct Faults {
    pub tempfail_pct: f64,
    pub permfail_pct: f64,
    pub stage: String,
    pub delay_ms: u64,
}

/// TLS sessions of a run (`send --starttls`, or a sink with a certificate).
#[derive(Serialize, Deserialize, Debug)]
pub struct TlsReport {
    /// Handshakes completed.
    pub sessions: u64,
    /// Handshakes that failed or timed out.
    pub handshake_failures: u64,
    /// Handshake duration, completed handshakes only, µs.
    pub handshake_us: LatencySummary,
}

impl TlsReport {
    fn human(&self) -> String {
        let h = &self.handshake_us;
        let ms = |v: u64| v as f64 / 1000.0;
        format!(
            "  tls: {} sessions, {} handshake failures; handshake ms p50 {:.3} p99 {:.3} max {:.3}",
            self.sessions,
            self.handshake_failures,
            ms(h.p50),
            ms(h.p99),
            ms(h.max)
        )
    }
}

/// The `sink --json` document (schema in README.md).
#[derive(Serialize, Debug)]
pub struct SinkReport {
    pub tool: &'static str,
    pub version: u32,
    pub listen: String,
    pub threads: usize,
    pub stop_reason: String,
    pub elapsed_s: f64,
    pub connections: SinkConnections,
    pub messages: SinkMessages,
    pub recipients: Recipients,
    pub bytes: u64,
    pub throughput: SinkThroughput,
    pub pipelined_groups: u64,
    pub bad_commands: u64,
    pub faults: Faults,
    /// Present when the sink offers STARTTLS.
    pub tls: Option<TlsReport>,
    pub manifest: Option<crate::manifest::ManifestCheck>,
}

impl SinkReport {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        s: &SinkStats,
        unique: u64,
        listen: String,
        threads: usize,
        stop_reason: String,
        elapsed: Duration,
        faults: Faults,
        tls: bool,
        manifest: Option<crate::manifest::ManifestCheck>,
    ) -> SinkReport {
        let active = match (s.first, s.last) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        let mpc = s.msgs_per_conn.summary();
        let mpc_mean = if s.connections > 0 {
            (s.received as f64 / s.connections as f64 * 100.0).round() / 100.0
        } else {
            0.0
        };
        SinkReport {
            tool: "loadgen sink",
            version: 1,
            listen,
            threads,
            stop_reason,
            elapsed_s: r3(elapsed.as_secs_f64()),
            connections: SinkConnections {
                accepted: s.connections,
                open_at_end: s.open,
                messages_per_connection: PerConnection {
                    mean: mpc_mean,
                    // The histogram floors at 1; report 0 for connections without messages.
                    p50: if s.received == 0 { 0 } else { mpc.p50 },
                    max: if s.received == 0 { 0 } else { mpc.max },
                },
            },
            messages: SinkMessages {
                received: s.received,
                unique,
                duplicates: s.duplicates,
                corrupted: s.corrupted,
                foreign: s.foreign,
                tempfailed: s.tempfailed,
                permfailed: s.permfailed,
            },
            recipients: Recipients {
                accepted: s.rcpt_accepted,
                rejected: s.rcpt_rejected,
            },
            bytes: s.bytes,
            throughput: SinkThroughput {
                active_s: r3(active),
                msgs_per_s: per_s(s.received, active),
                mb_per_s: r3(if active > 0.0 {
                    s.bytes as f64 / 1e6 / active
                } else {
                    0.0
                }),
            },
            pipelined_groups: s.pipelined_groups,
            bad_commands: s.bad_commands,
            faults,
            tls: tls.then(|| TlsReport {
                sessions: s.tls_sessions,
                handshake_failures: s.tls_failures,
                handshake_us: s.tls_handshake.summary(),
            }),
            manifest,
        }
    }

    pub fn human(&self) -> String {
        let mut o = String::new();
        let m = &self.messages;
        let _ = writeln!(
            o,
            "loadgen sink: {} received ({} unique, {} duplicates, {} corrupted, {} foreign), {} tempfailed, {} permfailed ({})",
            m.received, m.unique, m.duplicates, m.corrupted, m.foreign, m.tempfailed, m.permfailed, self.stop_reason
        );
        let c = &self.connections;
        let _ = writeln!(
            o,
            "  connections: {} accepted, {} open at end, messages/connection mean {} max {}; recipients {} accepted, {} rejected",
            c.accepted,
            c.open_at_end,
            c.messages_per_connection.mean,
            c.messages_per_connection.max,
            self.recipients.accepted,
            self.recipients.rejected
        );
        let _ = writeln!(
            o,
            "  throughput: {:.1} msgs/s, {:.3} MB/s over {:.3} s active; {} bytes; {} pipelined groups, {} bad commands",
            self.throughput.msgs_per_s,
            self.throughput.mb_per_s,
            self.throughput.active_s,
            self.bytes,
            self.pipelined_groups,
            self.bad_commands
        );
        if let Some(t) = &self.tls {
            let _ = writeln!(o, "{}", t.human());
        }
        if let Some(mc) = &self.manifest {
            let _ = writeln!(
                o,
                "  manifest {}{}: {} entries, {} lost, {} corrupted, {} duplicates, {} unexpected => {}",
                mc.file,
                if mc.complete { "" } else { " (INCOMPLETE: no end trailer)" },
                mc.entries,
                mc.lost,
                mc.corrupted,
                mc.duplicates,
                mc.unexpected,
                if mc.failed() { "LOSS" } else { "OK" }
            );
            for id in mc.lost_ids.iter().take(10) {
                let _ = writeln!(o, "    lost {id}");
            }
            for id in mc.corrupted_ids.iter().take(10) {
                let _ = writeln!(o, "    corrupted {id}");
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_summarise_and_merge() {
        let mut a = Latency::default();
        for v in 1..=1000 {
            a.record_value(v);
        }
        let mut b = Latency::default();
        b.record(Duration::from_secs(2));
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 1001);
        assert!((495..=505).contains(&s.p50));
        assert!(s.max >= 1_999_000);
        assert_eq!(Latency::default().summary().max, 0);
    }
}
