//! `ringrelay queue list|stats`: what waits in a spool, read from the segments without
//! changing anything, so it works the same on a running server and on a stopped spool.

use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::lock;
use super::segment;

/// One queued message.
#[derive(Debug, Clone, Serialize)]
pub struct Queued {
    /// Queue ID.
    pub id: String,
    /// Arrival, seconds since the Unix epoch.
    pub arrival_unix: u64,
    /// Reverse path ("" for `<>`).
    pub from: String,
    /// Recipients not yet finished.
    pub pending: Vec<String>,
    /// Size of the stored record in bytes.
    pub size: u64,
    /// Segment file holding it.
    pub segment: String,
}

/// Totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// True when a server holds the spool.
    pub running: bool,
    /// Messages with recipients still to deliver.
    pub messages: usize,
    /// Recipients still to deliver.
    pub recipients: usize,
    /// Bytes of those messages' records.
    pub bytes: u64,
    /// Segment files holding them.
    pub segments: usize,
    /// Age in seconds of the oldest message (0 when empty).
    pub oldest_age_secs: u64,
}

/// Reads the queue of `spool`.
pub fn read(spool: &Path) -> io::Result<(Vec<Queued>, Stats)> {
    if !spool.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("spool {} does not exist", spool.display()),
        ));
    }
    let report = segment::recover(spool, false)?;
    let now = SystemTime::now();
    let mut stats = Stats {
        running: lock::is_locked(spool),
        segments: report.segments.len(),
        ..Stats::default()
    };
    let mut list: Vec<Queued> = report
        .messages
        .into_iter()
        .map(|m| {
            let pending: Vec<String> = m
                .pending
                .iter()
                .filter_map(|&i| m.message.rcpts.get(i as usize).map(|r| r.to_string()))
                .collect();
            Queued {
                id: m.message.id.to_string(),
                arrival_unix: m
                    .message
                    .arrival
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                from: m.message.from.to_string(),
                pending,
                size: m.location.len,
                segment: m.location.segment.file_name(),
            }
        })
        .collect();
    list.sort_by(|a, b| (a.arrival_unix, &a.id).cmp(&(b.arrival_unix, &b.id)));
    stats.messages = list.len();
    stats.recipients = list.iter().map(|q| q.pending.len()).sum();
    stats.bytes = list.iter().map(|q| q.size).sum();
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    stats.oldest_age_secs = list
        .iter()
        .map(|q| now_secs.saturating_sub(q.arrival_unix))
        .max()
        .unwrap_or(0);
    Ok((list, stats))
}
