//! Command-line definitions for `loadgen send`, `loadgen sink` and `loadgen merge`. The flag names listed in
//! the README are a contract: tests outside this repository drive them.

use crate::message::SizeRange;
use crate::smtp_server::FailStage;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    version,
    about = "SMTP load generator and verifying sink for capacity testing"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Send generated messages to an SMTP server and report rates, reply codes and latencies.
    Send(SendArgs),
    /// Run an SMTP sink that verifies and counts what loadgen sent.
    Sink(SinkArgs),
    /// Combine the --json reports of send runs made at the same time (say, from several
    /// machines) into one report, percentiles from all samples.
    Merge(MergeArgs),
}

fn size_range(s: &str) -> Result<SizeRange, String> {
    SizeRange::parse(s)
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a positive number")),
    }
}

fn pct(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a percentage between 0 and 100")),
    }
}

fn nonzero(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(format!("'{s}' is not a positive integer")),
    }
}

#[derive(Args, Debug, Clone)]
pub struct SendArgs {
    /// Server to send to, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub target: String,
    /// Concurrent SMTP connections.
    #[arg(long, default_value_t = 10, value_parser = nonzero)]
    pub connections: u64,
    /// Stop after this many messages in total (default 1000 unless --duration is given).
    #[arg(long, value_name = "M", conflicts_with = "duration", value_parser = nonzero)]
    pub messages: Option<u64>,
    /// Stop starting messages after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = positive_f64)]
    pub duration: Option<f64>,
    /// Message size in bytes (header + body), fixed or a range: 1024, 1k, 1k-100k.
    #[arg(long, value_name = "BYTES", default_value = "1k", value_parser = size_range)]
    pub size: SizeRange,
    /// Recipients per message.
    #[arg(long, default_value_t = 1, value_parser = nonzero)]
    pub rcpts: u64,
    /// Recipient domain; repeat (or separate with commas) to spread recipients over several.
    #[arg(
        long = "domain",
        value_name = "D",
        value_delimiter = ',',
        default_value = "example.test"
    )]
    pub domains: Vec<String>,
    /// Envelope sender and From: address.
    #[arg(long, default_value = "loadgen@loadgen.test")]
    pub from: String,
    /// Name given in EHLO/HELO.
    #[arg(long, default_value = "loadgen.test")]
    pub helo: String,
    /// Open loop: start this many messages per second on a fixed schedule.
    #[arg(long, value_name = "MSGS_PER_S", value_parser = positive_f64)]
    pub rate: Option<f64>,
    /// Send MAIL, RCPT... and DATA in one write when the server advertises PIPELINING.
    #[arg(long)]
    pub pipelining: bool,
    /// Open a new connection for every message instead of reusing connections.
    #[arg(long)]
    pub new_connection_per_message: bool,
    /// Write the ID of every message answered 250 after DATA to FILE, one per line.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Sender threads, each running its share of the connections.
    #[arg(long, default_value_t = 1, value_parser = nonzero)]
    pub threads: u64,
    /// Time limit for connecting, the greeting, EHLO and each transaction, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = positive_f64)]
    pub timeout: f64,
    /// Give up (exit 1) when connections keep failing for this long after having worked.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = positive_f64)]
    pub give_up_after: f64,
    /// Run id (up to 16 hex digits) for the message IDs; random by default.
    #[arg(long, value_name = "HEX")]
    pub run_id: Option<String>,
    /// Never show the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// After EHLO, STARTTLS and EHLO again; certificates are not checked unless --tls-verify.
    #[arg(long)]
    pub starttls: bool,
    /// With --starttls: check the server certificate against the Mozilla roots (and --tls-ca)
    /// and the host name of --target.
    #[arg(long, requires = "starttls")]
    pub tls_verify: bool,
    /// With --starttls: PEM file of more trusted certificates; implies --tls-verify.
    #[arg(long, value_name = "FILE", requires = "starttls")]
    pub tls_ca: Option<PathBuf>,
    /// Authenticate every connection with AUTH PLAIN (after TLS with --starttls).
    #[arg(long, value_name = "USER:PASS")]
    pub auth: Option<String>,
    /// Bind every connection to this local address (e.g. 127.0.0.2).
    #[arg(long, value_name = "IP", conflicts_with = "source_range")]
    pub source_addr: Option<String>,
    /// Spread connections round-robin over the addresses of this range, e.g. 127.0.0.0/24
    /// (IPv4 network and broadcast addresses left out; at most 65536 addresses).
    #[arg(long, value_name = "CIDR")]
    pub source_range: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct SinkArgs {
    /// Address to listen on, HOST:PORT; port 0 picks a free port (printed on stdout).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:2525")]
    pub listen: String,
    /// Share of messages answered with a 4xx, percent.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = pct)]
    pub tempfail_pct: f64,
    /// Share of messages answered with a 5xx, percent.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = pct)]
    pub permfail_pct: f64,
    /// Where injected failures are answered: every RCPT, or the end of DATA.
    #[arg(long, value_enum, default_value_t = FailStage::Data)]
    pub fail_stage: FailStage,
    /// Delay every reply (a pipelined group of replies counts once) by MS milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub delay_ms: u64,
    /// Write the report as JSON to FILE when the sink stops.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Stop (exit 0) once this many unique loadgen messages have arrived.
    #[arg(long, value_name = "N")]
    pub expect: Option<u64>,
    /// When stopping, check arrivals against this manifest; exit 3 if anything was lost.
    #[arg(long, value_name = "FILE")]
    pub check_manifest: Option<PathBuf>,
    /// How long --check-manifest waits for the manifest's completion trailer, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = positive_f64)]
    pub manifest_wait: f64,
    /// Stop after this many seconds even if --expect was not reached (then exit 1).
    #[arg(long, value_name = "SECS", value_parser = positive_f64)]
    pub timeout: Option<f64>,
    /// Server threads, each with its own SO_REUSEPORT listener (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Host name in the greeting and EHLO reply.
    #[arg(long, default_value = "loadgen-sink.test")]
    pub hostname: String,
    /// Advertised SIZE limit; larger messages get 552 (default 100m).
    #[arg(long, value_name = "BYTES")]
    pub max_size: Option<String>,
    /// PEM certificate chain (leaf first); with --tls-key, STARTTLS is offered.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// Reports written by `loadgen send --json`.
    #[arg(value_name = "REPORT", required = true)]
    pub reports: Vec<PathBuf>,
    /// Write the merged report as JSON to FILE (a send report, so it can be merged again).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}
