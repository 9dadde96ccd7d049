//! `loadgen`: SMTP load generator (`send`), verifying sink (`sink`) and the combiner of send
//! reports from several machines (`merge`). This file owns the entry point: argument
//! parsing, the one-line error convention and the exit codes.

mod base64;
mod cli;
mod data_scan;
mod ids;
mod manifest;
mod merge;
mod message;
mod report;
mod send;
mod sink;
mod smtp_client;
mod smtp_server;
mod source;
mod tls;

use clap::Parser;
use std::path::Path;

// Per-message buffers and histograms churn the allocator; mimalloc keeps that cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status: bad command line.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: runtime failure (unreachable target, unwritable file, ...).
pub const EXIT_RUNTIME: i32 = 1;
/// Exit status of `sink --check-manifest` when acknowledged messages were lost or corrupted.
pub const EXIT_LOSS: i32 = 3;

/// Why a subcommand could not do its job; each maps to an exit status and a one-line message.
#[derive(Debug)]
pub enum Failure {
    Usage(String),
    Runtime(String),
}

/// Handlers for SIGINT and SIGTERM, registered in `rt` (before anything is printed, so a
/// caller that signals as soon as it reads our first line never hits the default action).
pub fn termination_signals(
    rt: &tokio::runtime::Runtime,
) -> Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal), Failure> {
    use tokio::signal::unix::{signal, SignalKind};
    let _g = rt.enter();
    let i = signal(SignalKind::interrupt())
        .map_err(|e| Failure::Runtime(format!("cannot handle SIGINT: {e}")))?;
    let t = signal(SignalKind::terminate())
        .map_err(|e| Failure::Runtime(format!("cannot handle SIGTERM: {e}")))?;
    Ok((i, t))
}

/// Makes sure an output file can be written before any work starts, so that a run is never
/// wasted on a typo in a path: opens it for writing (creating it if needed, truncating
/// nothing) and removes it again if it did not exist before. `flag` names the option in the
/// error message.
pub fn check_writable(flag: &str, path: &Path) -> Result<(), Failure> {
    let existed = path.symlink_metadata().is_ok();
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Failure::Runtime(format!("cannot write {flag} {}: {e}", path.display())))?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Writes a report as pretty JSON.
pub fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<(), Failure> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| Failure::Runtime(format!("cannot encode JSON: {e}")))?;
    s.push('\n');
    std::fs::write(path, s)
        .map_err(|e| Failure::Runtime(format!("cannot write {}: {e}", path.display())))
}

fn main() {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            // clap's message spans several lines (usage, hints); keep only the reason, with
            // the indented lines that complete it ("not provided:\n  <REPORT>...").
            let text = e.render().to_string();
            let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
            let first = lines.next().unwrap_or("invalid arguments");
            let mut reason = first.strip_prefix("error: ").unwrap_or(first).to_string();
            if reason.ends_with(':') {
                for l in lines.take_while(|l| l.starts_with("  ")) {
                    reason.push(' ');
                    reason.push_str(l.trim());
                }
            }
            eprintln!("loadgen: {reason} (see --help)");
            std::process::exit(EXIT_USAGE);
        }
    };
    let r = match cli.cmd {
        cli::Cmd::Send(a) => send::run(a),
        cli::Cmd::Sink(a) => sink::run(a),
        cli::Cmd::Merge(a) => merge::run(a),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(Failure::Usage(m)) => {
            eprintln!("loadgen: {m}");
            std::process::exit(EXIT_USAGE);
        }
        Err(Failure::Runtime(m)) => {
            eprintln!("loadgen: {m}");
            std::process::exit(EXIT_RUNTIME);
        }
    }
}
