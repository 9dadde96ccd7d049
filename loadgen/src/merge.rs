//! `loadgen merge`: combines the `send --json` reports of runs made at the same time (from
//! several machines, say) into one. Counters are added; the HDR histograms every report
//! carries are added too, so the percentiles are those of all samples together (averaging
//! percentiles would not be); the wall time is the longest input's, since the runs
//! overlapped, and rates are the totals over it. The result is itself a send report.

use crate::cli::MergeArgs;
use crate::report::{
    AuthReport, ErrorCounts, ManifestInfo, MergedInput, Recipients, Schedule, SendConfigReport,
    SendConnections, SendHistograms, SendMessages, SendReport, SendStats, TlsReport,
};
use crate::Failure;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// The fields of a send report that merging needs.
#[derive(Deserialize)]
struct SendInput {
    run_id: String,
    target: String,
    stop_reason: String,
    config: SendConfigReport,
    elapsed_s: f64,
    messages: SendMessages,
    reply_codes: BTreeMap<String, u64>,
    errors: ErrorCounts,
    connection_failures: BTreeMap<String, u64>,
    connections: SendConnections,
    recipients: Recipients,
    bytes_accepted: u64,
    schedule: Option<Schedule>,
    manifest: Option<ManifestInfo>,
    tls: Option<TlsReport>,
    auth: Option<AuthReport>,
    histograms: SendHistograms,
}

/// A report read and checked, with its counters back in the form `send` keeps them.
struct Input {
    file: String,
    report: SendInput,
    stats: SendStats,
}

/// Stop reasons from the least to the most telling: the merged run has the worst of its
/// inputs' (one failed machine makes a failed run).
const STOP_REASONS: [&str; 4] = ["complete", "duration", "signal", "failed"];

/// Reads one report. An error is one line naming the file and what is wrong with it.
fn read(path: &Path) -> Result<Input, String> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {file}: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{file} is not JSON: {e}"))?;
    match v.get("tool").and_then(|t| t.as_str()) {
        Some("loadgen send") => {}
        Some(other) => {
            return Err(format!(
                "{file} is not a loadgen send report (it is from {other:?})"
            ))
        }
        None => return Err(format!("{file} is not a loadgen send report (no \"tool\")")),
    }
    if v.get("version").and_then(|n| n.as_u64()) != Some(1) {
        return Err(format!(
            "{file}: send report version {} is not 1",
            v.get("version").unwrap_or(&serde_json::Value::Null)
        ));
    }
    if v.get("histograms").is_none() {
        return Err(format!(
            "{file} has no histograms (written by a loadgen from before merge); \
             run send again with this one"
        ));
    }
    let report: SendInput = serde_json::from_value(v)
        .map_err(|e| format!("{file} is not a valid loadgen send report: {e}"))?;
    let stats = stats(&report).map_err(|e| format!("{file}: {e}"))?;
    Ok(Input {
        file,
        report,
        stats,
    })
}

/// Puts a report's counters and histograms back into `SendStats`, checking that they agree.
fn stats(r: &SendInput) -> Result<SendStats, String> {
    if !STOP_REASONS.contains(&r.stop_reason.as_str()) {
        return Err(format!("unknown stop_reason {:?}", r.stop_reason));
    }
    if !(r.elapsed_s.is_finite() && r.elapsed_s >= 0.0) {
        return Err(format!("elapsed_s {} is not a duration", r.elapsed_s));
    }
    let mut s = SendStats::default();
    let m = &r.messages;
    s.sent = m.sent;
    s.accepted = m.accepted;
    s.tempfail = m.tempfail;
    s.permfail = m.permfail;
    s.failed = m.errors;
    for (code, &n) in &r.reply_codes {
        let c = code
            .parse::<u16>()
            .ok()
            .filter(|c| (200..600).contains(c))
            .ok_or_else(|| format!("reply_codes: {code:?} is not an SMTP reply code"))?;
        s.codes[usize::from(c)] = n;
    }
    s.errors = r.errors;
    s.conns_opened = r.connections.opened;
    s.conns_without_pipelining = r.connections.without_pipelining;
    s.rcpt_accepted = r.recipients.accepted;
    s.rcpt_rejected = r.recipients.rejected;
    s.bytes_accepted = r.bytes_accepted;
    s.conn_failures = r.connection_failures.clone();
    if let Some(t) = &r.tls {
        s.tls_sessions = t.sessions;
        s.tls_failures = t.handshake_failures;
    }
    if let Some(a) = &r.auth {
        s.auth_ok = a.succeeded;
        s.auth_failed = a.failed;
    }
    r.histograms.decode_into(&mut s)?;
    // The transaction histogram has one sample per accepted message: a cheap check that the
    // histograms belong to the counters beside them.
    if s.txn.len() != s.accepted {
        return Err(format!(
            "histograms.transaction_us holds {} samples but messages.accepted is {}",
            s.txn.len(),
            s.accepted
        ));
    }
    Ok(s)
}

/// The distinct values, in order of first appearance, joined with commas.
fn distinct<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for v in values {
        if !seen.contains(&v) {
            seen.push(v);
        }
    }
    seen.join(",")
}

/// The configuration of runs made side by side: connections, threads, message counts and
/// rates add up (a count or rate is null if any run had none), durations and sizes span the
/// inputs, domains are the union, switches are on if on anywhere, and names that differ are
/// listed.
fn config(inputs: &[Input]) -> SendConfigReport {
    let c = || inputs.iter().map(|i| &i.report.config);
    let names = |f: fn(&SendConfigReport) -> Option<&str>| {
        let all: Vec<&str> = c().filter_map(f).collect();
        (!all.is_empty()).then(|| distinct(all.into_iter()))
    };
    let mut domains: Vec<String> = Vec::new();
    for d in c().flat_map(|c| &c.domains) {
        if !domains.contains(d) {
            domains.push(d.clone());
        }
    }
    SendConfigReport {
        connections: c().map(|c| c.connections).sum(),
        threads: c().map(|c| c.threads).sum(),
        messages: c().map(|c| c.messages).sum(),
        duration_s: c().filter_map(|c| c.duration_s).reduce(f64::max),
        rate: c().map(|c| c.rate).sum(),
        size_min: c().map(|c| c.size_min).min().unwrap_or(0),
        size_max: c().map(|c| c.size_max).max().unwrap_or(0),
        rcpts: c().map(|c| c.rcpts).max().unwrap_or(0),
        domains,
        pipelining: c().any(|c| c.pipelining),
        new_connection_per_message: c().any(|c| c.new_connection_per_message),
        starttls: c().any(|c| c.starttls),
        tls_verify: c().any(|c| c.tls_verify),
        auth_user: names(|c| c.auth_user.as_deref()),
        source_addr: names(|c| c.source_addr.as_deref()),
        source_range: names(|c| c.source_range.as_deref()),
    }
}

/// Builds the merged report from checked inputs.
fn merge(inputs: &[Input]) -> SendReport {
    let mut stats = SendStats::default();
    for i in inputs {
        stats.merge(&i.stats);
    }
    let reports = || inputs.iter().map(|i| &i.report);
    let elapsed = reports().map(|r| r.elapsed_s).fold(0.0, f64::max);
    let stop_reason = reports()
        .filter_map(|r| STOP_REASONS.iter().position(|&s| s == r.stop_reason))
        .max()
        .map_or("complete", |i| STOP_REASONS[i]);
    let scheduled: Vec<&Schedule> = reports().filter_map(|r| r.schedule.as_ref()).collect();
    let schedule = (!scheduled.is_empty()).then(|| Schedule {
        rate: scheduled.iter().map(|s| s.rate).sum(),
        scheduled: scheduled.iter().map(|s| s.scheduled).sum(),
        started: scheduled.iter().map(|s| s.started).sum(),
        unstarted: scheduled.iter().map(|s| s.unstarted).sum(),
        lag_us: stats.lag.summary(),
        behind_at_end_ms: scheduled
            .iter()
            .map(|s| s.behind_at_end_ms)
            .fold(0.0, f64::max),
    });
    let manifests: Vec<&ManifestInfo> = reports().filter_map(|r| r.manifest.as_ref()).collect();
    let manifest = (!manifests.is_empty()).then(|| ManifestInfo {
        file: distinct(manifests.iter().map(|m| m.file.as_str())),
        entries: manifests.iter().map(|m| m.entries).sum(),
    });
    let mut report = SendReport::build(
        &stats,
        distinct(reports().map(|r| r.run_id.as_str())),
        distinct(reports().map(|r| r.target.as_str())),
        stop_reason.to_string(),
        config(inputs),
        Duration::from_secs_f64(elapsed),
        schedule,
        manifest,
    );
    // `build` keys these on the configuration; a merge has them when any input had them.
    if reports().all(|r| r.tls.is_none()) {
        report.tls = None;
    }
    if reports().all(|r| r.auth.is_none()) {
        report.auth = None;
    }
    report.merged_from = Some(
        inputs
            .iter()
            .map(|i| MergedInput {
                file: i.file.clone(),
                run_id: i.report.run_id.clone(),
                target: i.report.target.clone(),
                stop_reason: i.report.stop_reason.clone(),
                elapsed_s: i.report.elapsed_s,
                accepted: i.report.messages.accepted,
            })
            .collect(),
    );
    report
}

/// The lines printed before the merged summary: one per input.
fn header(inputs: &[Input]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "loadgen merge: {} reports, wall time the longest of them",
        inputs.len()
    );
    for i in inputs {
        let r = &i.report;
        let _ = writeln!(
            o,
            "  {}: run {} to {}, {} accepted in {:.2} s ({})",
            i.file, r.run_id, r.target, r.messages.accepted, r.elapsed_s, r.stop_reason
        );
    }
    o
}

pub fn run(a: MergeArgs) -> Result<i32, Failure> {
    if let Some(p) = &a.json {
        crate::check_writable("--json", p)?;
    }
    let inputs = a
        .reports
        .iter()
        .map(|p| read(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Failure::Usage)?;
    for (n, i) in inputs.iter().enumerate() {
        if let Some(j) = inputs[..n]
            .iter()
            .find(|j| j.report.run_id == i.report.run_id)
        {
            eprintln!(
                "loadgen: warning: {} and {} are both run {}; both are counted",
                j.file, i.file, i.report.run_id
            );
        }
    }
    let report = merge(&inputs);
    if let Some(p) = &a.json {
        crate::write_json(p, &report)?;
    }
    print!("{}{}", header(&inputs), report.human());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Latency;

    /// A send report as JSON whose transaction latencies are `samples` (µs).
    fn report(run: &str, samples: impl Iterator<Item = u64>, elapsed: f64) -> String {
        let mut s = SendStats::default();
        for v in samples {
            s.txn.record_value(v);
            s.sent += 1;
            s.accepted += 1;
            s.code(250);
            s.bytes_accepted += 1000;
        }
        s.conns_opened = 2;
        s.conn_failure("greeting 421 too many");
        let r = SendReport::build(
            &s,
            run.into(),
            "127.0.0.1:25".into(),
            "complete".into(),
            SendConfigReport {
                connections: 2,
                threads: 1,
                messages: Some(s.sent),
                duration_s: None,
                rate: None,
                size_min: 1000,
                size_max: 1000,
                rcpts: 1,
                domains: vec!["example.test".into()],
                pipelining: false,
                new_connection_per_message: false,
                starttls: false,
                tls_verify: false,
                auth_user: None,
                source_addr: None,
                source_range: None,
            },
            Duration::from_secs_f64(elapsed),
            None,
            None,
        );
        serde_json::to_string(&r).unwrap()
    }

    fn input(json: &str) -> Input {
        let report: SendInput = serde_json::from_str(json).unwrap();
        let stats = stats(&report).unwrap();
        Input {
            file: "x.json".into(),
            report,
            stats,
        }
    }

    #[test]
    fn merged_percentiles_are_those_of_all_samples() {
        let a = input(&report("a", 1..=1000, 2.0));
        let b = input(&report("b", (1..=3000).map(|v| v * 7 + 5000), 4.0));
        let m = merge(&[a, b]);
        let mut all = Latency::default();
        for v in (1..=1000).chain((1..=3000).map(|v| v * 7 + 5000)) {
            all.record_value(v);
        }
        let want = all.summary();
        let got = m.latency_us.transaction;
        assert_eq!(
            (got.count, got.min, got.p50, got.p90, got.p99, got.p999, got.max),
            (want.count, want.min, want.p50, want.p90, want.p99, want.p999, want.max)
        );
        assert_eq!(got.mean, want.mean);
        assert_eq!(m.messages.accepted, 4000);
        assert_eq!(m.reply_codes["250"], 4000);
        assert_eq!(m.bytes_accepted, 4_000_000);
        assert_eq!(m.connection_failures["greeting 421 too many"], 2);
        assert_eq!(m.connections.opened, 4);
        assert_eq!(m.config.connections, 4);
        assert_eq!(m.config.messages, Some(4000));
        // Side by side: the wall time is the longest run, and rates are over it.
        assert_eq!(m.elapsed_s, 4.0);
        assert_eq!(m.throughput.accepted_per_s, 1000.0);
        assert_eq!(m.run_id, "a,b");
        assert_eq!(m.target, "127.0.0.1:25");
    }

    #[test]
    fn a_merged_report_merges_again() {
        let ab = merge(&[
            input(&report("a", 1..=10, 1.0)),
            input(&report("b", 1..=20, 1.0)),
        ]);
        let abc = merge(&[
            input(&serde_json::to_string(&ab).unwrap()),
            input(&report("c", 1..=30, 3.0)),
        ]);
        assert_eq!(abc.latency_us.transaction.count, 60);
        assert_eq!(abc.messages.accepted, 60);
        assert_eq!(abc.run_id, "a,b,c");
        assert_eq!(abc.elapsed_s, 3.0);
    }

    #[test]
    fn histograms_that_disagree_with_the_counters_are_refused() {
        let mut v: serde_json::Value = serde_json::from_str(&report("a", 1..=10, 1.0)).unwrap();
        v["messages"]["accepted"] = 11.into();
        let r: SendInput = serde_json::from_value(v.clone()).unwrap();
        let e = stats(&r).err().unwrap();
        assert!(e.contains("transaction_us holds 10 samples"), "{e}");

        v["messages"]["accepted"] = 10.into();
        v["histograms"]["banner_us"] = "HISTO".into();
        let r: SendInput = serde_json::from_value(v.clone()).unwrap();
        let e = stats(&r).err().unwrap();
        assert!(e.starts_with("histograms.banner_us: not base64"), "{e}");

        // Valid base64, not a histogram.
        v["histograms"]["banner_us"] = crate::base64::encode(b"not a histogram at all").into();
        let r: SendInput = serde_json::from_value(v).unwrap();
        assert!(stats(&r).is_err());
    }

    #[test]
    fn histogram_headers_are_checked_before_allocating() {
        let good = crate::base64::decode(&Latency::default().encode()).unwrap();
        // A payload length of 4 GB over a short buffer.
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = Latency::decode(&crate::base64::encode(&huge))
            .err()
            .unwrap();
        assert!(e.contains("bytes of counts"), "{e}");
        // Bounds far beyond an hour (a counts array of hundreds of MB).
        let mut wide = good.clone();
        wide[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        let e = Latency::decode(&crate::base64::encode(&wide))
            .err()
            .unwrap();
        assert!(e.contains("bounds"), "{e}");
        // The compressed form is not ours.
        let mut deflated = good;
        deflated[3] = 0x14;
        assert!(Latency::decode(&crate::base64::encode(&deflated)).is_err());
    }

    #[test]
    fn histograms_round_trip_exactly() {
        let mut l = Latency::default();
        for v in [1, 2, 999, 1000, 1001, 123_456, 3_599_999_999] {
            l.record_value(v);
        }
        let back = Latency::decode(&l.encode()).unwrap();
        let (a, b) = (l.summary(), back.summary());
        assert_eq!(
            (a.count, a.min, a.p50, a.p99, a.max),
            (b.count, b.min, b.p50, b.p99, b.max)
        );
        assert_eq!(
            Latency::decode(&Latency::default().encode()).unwrap().len(),
            0
        );
    }
}
