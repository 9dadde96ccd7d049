//! `ringrelay queue list|stats`: what waits in a spool, read from the segments without
//! changing anything, so it works the same on a running server and on a stopped spool.
//!
//! Like Postfix's `mailq`, a message shows its size, arrival, sender and each pending
//! recipient with the delivery state its records hold: attempts counted, the last reply,
//! the next attempt, and whether it is on hold. Times come as Unix seconds and as ISO 8601
//! UTC text ([`iso8601`]).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::lock;
use super::scan;
use super::segment::{self, SegmentId};
use crate::id::QueueId;

/// One queued message.
#[derive(Debug, Clone, Serialize)]
pub struct Queued {
    /// Queue ID.
    pub id: String,
    /// Arrival, seconds since the Unix epoch.
    pub arrival_unix: u64,
    /// Arrival, ISO 8601 UTC (`2026-12-01T09:30:00Z`).
    pub arrival: String,
    /// Reverse path ("" for `<>`).
    pub from: String,
    /// Recipients not yet finished.
    pub pending: Vec<String>,
    /// Size of the stored record in bytes.
    pub size: u64,
    /// Segment file holding it.
    pub segment: String,
    /// On hold (`queue hold`): not attempted until released.
    pub held: bool,
    /// Attempts the retry schedule has counted (those made at a flush or release are not).
    pub attempts: u32,
    /// The last attempt's reply, or why it had none.
    pub last_error: Option<String>,
    /// When the next attempt is due, seconds since the Unix epoch; `None` when it is due
    /// now (never tried, or released) or the message is on hold.
    pub next_attempt_unix: Option<u64>,
    /// The same, ISO 8601 UTC.
    pub next_attempt: Option<String>,
    /// Each pending recipient with its delivery state (one attempt covers all of a
    /// message's pending recipients, so today they share the message's values).
    pub recipients: Vec<PendingRecipient>,
}

/// A recipient still to deliver, and its delivery state.
#[derive(Debug, Clone, Serialize)]
pub struct PendingRecipient {
    /// The forward path.
    pub address: String,
    /// Attempts counted.
    pub attempts: u32,
    /// The last reply, or why there was none.
    pub last_error: Option<String>,
    /// Next attempt, seconds since the Unix epoch (`None`: due now, or on hold).
    pub next_attempt_unix: Option<u64>,
    /// Next attempt, ISO 8601 UTC.
    pub next_attempt: Option<String>,
    /// On hold.
    pub held: bool,
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
    /// Messages on hold.
    pub held: usize,
}

/// The queue of a spool as `queue list|stats` show it: the messages sorted by arrival (then
/// ID), kept compactly (strings in one buffer, the last replies shared) so a million fit in
/// some tens of megabytes, and each turned into a [`Queued`] only as it is written out.
#[derive(Debug, Default)]
pub struct Queue {
    entries: Vec<Entry>,
    /// Pending recipients (each entry's run of them, in order) and senders.
    text: Strings,
    /// Distinct last replies.
    replies: Strings,
    segments: Vec<String>,
    /// The totals.
    pub stats: Stats,
}

/// One listed message, without its strings.
#[derive(Debug)]
struct Entry {
    id: QueueId,
    arrival: u64,
    size: u64,
    next_attempt: Option<u64>,
    /// Index in `text` of the sender; the pending recipients follow it.
    from: u32,
    pending: u32,
    /// Index in `replies`, or `NO_REPLY`.
    reply: u32,
    attempts: u32,
    segment: u32,
    held: bool,
}

const NO_REPLY: u32 = u32::MAX;

/// Strings one after the other in one buffer.
#[derive(Debug, Default)]
struct Strings {
    text: String,
    ends: Vec<usize>,
}

impl Strings {
    fn push(&mut self, s: &str) -> u32 {
        self.text.push_str(s);
        self.ends.push(self.text.len());
        (self.ends.len() - 1) as u32
    }

    fn get(&self, i: u32) -> &str {
        let i = i as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }
}

impl Queue {
    /// The messages, oldest first, each built as it is asked for.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Queued> + '_ {
        self.entries.iter().map(|e| self.queued(e))
    }

    /// The list as `queue list --json` prints it: serialised one message at a time.
    pub fn json_list(&self) -> impl Serialize + '_ {
        struct List<'a>(&'a Queue);
        impl Serialize for List<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter())
            }
        }
        List(self)
    }

    fn queued(&self, e: &Entry) -> Queued {
        let last_error = (e.reply != NO_REPLY).then(|| self.replies.get(e.reply).to_string());
        let recipients: Vec<PendingRecipient> = (1..=e.pending)
            .map(|k| PendingRecipient {
                address: self.text.get(e.from + k).to_string(),
                attempts: e.attempts,
                last_error: last_error.clone(),
                next_attempt_unix: e.next_attempt,
                next_attempt: e.next_attempt.map(iso8601),
                held: e.held,
            })
            .collect();
        Queued {
            id: e.id.to_string(),
            arrival_unix: e.arrival,
            arrival: iso8601(e.arrival),
            from: self.text.get(e.from).to_string(),
            pending: recipients.iter().map(|r| r.address.clone()).collect(),
            size: e.size,
            segment: self.segments[e.segment as usize].clone(),
            held: e.held,
            attempts: e.attempts,
            last_error,
            next_attempt_unix: e.next_attempt,
            next_attempt: e.next_attempt.map(iso8601),
            recipients,
        }
    }

    /// Writes the list as `queue list` prints it: Postfix's `mailq` shape, one line per
    /// message (ID, `!` when on hold, size, arrival, sender), then one per pending
    /// recipient with its delivery state, then the totals.
    pub fn write_text(&self, out: &mut impl Write) -> io::Result<()> {
        write_text(out, self.iter(), &self.stats)
    }
}

/// Writes `list` as `queue list` prints it (see [`Queue::write_text`]).
pub fn write_text(
    out: &mut impl Write,
    list: impl ExactSizeIterator<Item = Queued>,
    stats: &Stats,
) -> io::Result<()> {
    if list.len() > 0 {
        writeln!(
            out,
            "{:<25} {:>10}  {:<23}  SENDER / RECIPIENTS",
            "QUEUE ID", "SIZE", "ARRIVAL"
        )?;
    }
    for q in list {
        let mark = if q.held { "!" } else { "" };
        writeln!(
            out,
            "{:<25} {:>10}  {:<23}  <{}>",
            format!("{}{mark}", q.id),
            q.size,
            human_time(q.arrival_unix),
            q.from
        )?;
        for r in &q.recipients {
            let next = match (r.held, r.next_attempt_unix) {
                (true, _) => "on hold".to_string(),
                (false, Some(t)) => format!("next attempt {}", human_time(t)),
                (false, None) if stats.running => "next attempt now".to_string(),
                (false, None) => "next attempt at start".to_string(),
            };
            let last = r
                .last_error
                .as_deref()
                .filter(|e| !e.is_empty())
                .map_or(String::new(), |e| format!("; last reply: {e}"));
            writeln!(
                out,
                "{:>39}<{}>  attempts {}; {next}{last}",
                "", r.address, r.attempts
            )?;
        }
    }
    writeln!(
        out,
        "-- {} message(s), {} recipient(s) pending, {} on hold{}",
        stats.messages,
        stats.recipients,
        stats.held,
        if stats.running {
            " (server running)"
        } else {
            ""
        }
    )
}

/// Reads the queue of `spool` (which must exist: nothing is created), segment by segment
/// with the `scan` module's reader: no segment is held whole, no content kept. With
/// `list = false` only the totals are kept (`queue stats`).
pub fn scan(spool: &Path, list: bool) -> io::Result<Queue> {
    super::require_existing(spool)?;
    let mut ids: Vec<SegmentId> = fs::read_dir(spool)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(SegmentId::parse))
        .collect();
    ids.sort();
    let mut queue = Queue::default();
    let mut replies: HashMap<String, u32> = HashMap::new();
    let mut oldest = None::<u64>;
    for id in ids {
        let found = scan::live_messages(spool, id)?;
        if found.is_empty() {
            continue;
        }
        queue.stats.segments += 1;
        let segment = queue.segments.len() as u32;
        if list {
            queue.segments.push(id.file_name());
        }
        for m in found {
            let state = m.state;
            let arrival = unix_secs(m.message.arrival);
            let stats = &mut queue.stats;
            stats.messages += 1;
            stats.recipients += m.pending.len();
            stats.bytes += m.location.len;
            stats.held += usize::from(state.held);
            oldest = Some(oldest.map_or(arrival, |o| o.min(arrival)));
            if !list {
                continue;
            }
            let from = queue.text.push(&m.message.from.to_string());
            let mut pending = 0;
            for r in m
                .pending
                .iter()
                .filter_map(|&i| m.message.rcpts.get(i as usize))
            {
                queue.text.push(r.as_str());
                pending += 1;
            }
            let reply = match state.last_reply {
                None => NO_REPLY,
                Some(r) => match replies.get(&r) {
                    Some(&k) => k,
                    None => {
                        let k = queue.replies.push(&r);
                        replies.insert(r, k);
                        k
                    }
                },
            };
            queue.entries.push(Entry {
                id: m.message.id,
                arrival,
                size: m.location.len,
                next_attempt: state.next_attempt.filter(|_| !state.held).map(unix_secs),
                from,
                pending,
                reply,
                attempts: state.attempts,
                segment,
                held: state.held,
            });
        }
    }
    // Queue IDs print as fixed-width base 32, most significant digit first: sorting them
    // as numbers sorts them as `queue list` prints them.
    queue.entries.sort_by_key(|e| (e.arrival, e.id));
    let now = unix_secs(SystemTime::now());
    queue.stats.running = lock::is_locked(spool);
    queue.stats.oldest_age_secs = oldest.map_or(0, |o| now.saturating_sub(o));
    Ok(queue)
}

/// Reads the queue of `spool` (which must exist: nothing is created) into one list.
pub fn read(spool: &Path) -> io::Result<(Vec<Queued>, Stats)> {
    let queue = scan(spool, true)?;
    Ok((queue.iter().collect(), queue.stats))
}

/// The same as [`read`], read by recovery's own reader: every segment read whole, the list
/// built at once. Slower and larger; kept as the reference the faster reader is tested
/// against.
pub fn read_by_recovery(spool: &Path) -> io::Result<(Vec<Queued>, Stats)> {
    super::require_existing(spool)?;
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
            let state = m.state;
            let next = state.next_attempt.filter(|_| !state.held).map(unix_secs);
            let recipients: Vec<PendingRecipient> = m
                .pending
                .iter()
                .filter_map(|&i| m.message.rcpts.get(i as usize))
                .map(|r| PendingRecipient {
                    address: r.to_string(),
                    attempts: state.attempts,
                    last_error: state.last_reply.clone(),
                    next_attempt_unix: next,
                    next_attempt: next.map(iso8601),
                    held: state.held,
                })
                .collect();
            let arrival_unix = unix_secs(m.message.arrival);
            Queued {
                id: m.message.id.to_string(),
                arrival_unix,
                arrival: iso8601(arrival_unix),
                from: m.message.from.to_string(),
                pending: recipients.iter().map(|r| r.address.clone()).collect(),
                size: m.location.len,
                segment: m.location.segment.file_name(),
                held: state.held,
                attempts: state.attempts,
                last_error: state.last_reply,
                next_attempt_unix: next,
                next_attempt: next.map(iso8601),
                recipients,
            }
        })
        .collect();
    list.sort_by(|a, b| (a.arrival_unix, &a.id).cmp(&(b.arrival_unix, &b.id)));
    stats.messages = list.len();
    stats.recipients = list.iter().map(|q| q.pending.len()).sum();
    stats.bytes = list.iter().map(|q| q.size).sum();
    stats.held = list.iter().filter(|q| q.held).count();
    let now_secs = unix_secs(now);
    stats.oldest_age_secs = list
        .iter()
        .map(|q| now_secs.saturating_sub(q.arrival_unix))
        .max()
        .unwrap_or(0);
    Ok((list, stats))
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Seconds since the Unix epoch as ISO 8601 UTC: `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339).
pub fn iso8601(unix: u64) -> String {
    let (date, (h, m, s)) = civil(unix);
    format!("{date}T{h:02}:{m:02}:{s:02}Z")
}

/// Seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`, for people.
pub fn human_time(unix: u64) -> String {
    let (date, (h, m, s)) = civil(unix);
    format!("{date} {h:02}:{m:02}:{s:02} UTC")
}

/// The proleptic Gregorian date (`YYYY-MM-DD`) and the time of day of a Unix time.
fn civil(unix: u64) -> (String, (u64, u64, u64)) {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Shifted to a year that starts on 1 March, so the leap day is the year's last day;
    // then 400-year eras of 146 097 days, each alike.
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (
        format!("{year:04}-{month:02}-{day:02}"),
        (secs / 3_600, secs % 3_600 / 60, secs % 60),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_8601_dates() {
        for (unix, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (59, "1970-01-01T00:00:59Z"),
            (86_399, "1970-01-01T23:59:59Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (951_868_800, "2000-03-01T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (1_709_164_800, "2024-02-29T00:00:00Z"),
            (1_735_689_599, "2024-12-31T23:59:59Z"),
            (1_796_390_180, "2026-12-04T13:16:20Z"),
            (4_107_542_400, "2100-03-01T00:00:00Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(iso8601(unix), want, "{unix}");
        }
        assert_eq!(human_time(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }

    /// Day by day over four centuries (leap years, the 100- and 400-year rules), against
    /// a plain count of month lengths.
    #[test]
    fn every_day_follows_the_calendar() {
        let leap = |y: u64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let (mut y, mut m, mut d) = (1970u64, 1u64, 1u64);
        for day in 0..(400 * 366) {
            let want = format!("{y:04}-{m:02}-{d:02}T00:00:00Z");
            assert_eq!(iso8601(day * 86_400), want);
            let len = match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > len {
                (m, d) = (m + 1, 1);
                if m > 12 {
                    (y, m) = (y + 1, 1);
                }
            }
        }
    }

    /// The streamed outputs, byte for byte, against the list recovery's reader builds
    /// whole: several segments, messages arriving out of ID order, every delivery state.
    #[test]
    fn streamed_text_and_json_equal_the_whole_list_byte_for_byte() {
        use super::super::record::{MessageRecord, RcptOutcome};
        use super::super::segment::ShardStore;
        use crate::id::IdGenerator;
        use crate::smtp::{Mailbox, ReversePath};
        use std::time::Duration;

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("lock"), b"").unwrap();
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        for shard in 0..2u32 {
            let mut store = ShardStore::new(dir.path(), shard, Vec::new(), 0).unwrap();
            let mut ids = IdGenerator::starting_at(shard as usize, 1_000 + u64::from(shard));
            for n in 0..40u64 {
                let id = ids.next_id();
                let rcpts: Vec<Mailbox> = (0..1 + n % 3)
                    .map(|i| Mailbox::parse(&format!("r{n}-{i}@example.net")).unwrap())
                    .collect();
                let from = if n % 7 == 0 {
                    ReversePath::Null
                } else {
                    ReversePath::Mailbox(
                        Mailbox::parse(&format!("s{}@example.org", n % 4)).unwrap(),
                    )
                };
                let loc = store
                    .append_message(&MessageRecord {
                        id,
                        // Out of order, and some arriving in the same second.
                        arrival: t(1_800_000_000 + (n * 7919) % 13),
                        from: &from,
                        rcpts: &rcpts,
                        eight_bit: false,
                        smtputf8: false,
                        dsn: None,
                        data: format!("message {n}\r\n").as_bytes(),
                    })
                    .unwrap();
                match n % 6 {
                    0 => {}
                    1 => store
                        .record_deferral(&loc, id, 2, t(1_800_000_900), "451 4.3.0 later")
                        .unwrap(),
                    2 => {
                        store
                            .record_deferral(&loc, id, 1, t(1_800_000_500), "")
                            .unwrap();
                        store.record_hold(&loc, id, true).unwrap();
                    }
                    3 => store
                        .record_recipient(&loc, id, 0, RcptOutcome::Delivered)
                        .unwrap(),
                    4 => store.finish_message(&loc, id, true).unwrap(),
                    _ => {
                        store.record_hold(&loc, id, true).unwrap();
                        store.record_hold(&loc, id, false).unwrap();
                    }
                }
                if n == 20 {
                    store.abandon_current();
                }
            }
        }
        let (whole, stats) = read_by_recovery(dir.path()).unwrap();
        let queue = scan(dir.path(), true).unwrap();
        assert!(whole.len() > 40 && stats.segments == 4, "{stats:?}");
        assert_eq!(
            serde_json::to_string_pretty(&queue.json_list()).unwrap(),
            serde_json::to_string_pretty(&whole).unwrap()
        );
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        queue.write_text(&mut mine).unwrap();
        write_text(&mut theirs, whole.into_iter(), &stats).unwrap();
        assert_eq!(
            String::from_utf8(mine).unwrap(),
            String::from_utf8(theirs).unwrap()
        );
        let totals = scan(dir.path(), false).unwrap().stats;
        assert_eq!(
            (
                totals.messages,
                totals.recipients,
                totals.bytes,
                totals.segments,
                totals.held
            ),
            (
                stats.messages,
                stats.recipients,
                stats.bytes,
                stats.segments,
                stats.held
            )
        );
        assert!(totals.oldest_age_secs.abs_diff(stats.oldest_age_secs) <= 1);
    }

    #[test]
    fn reading_a_spool_that_does_not_exist_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("spool");
        let err = read(&missing).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("spool {} does not exist", missing.display())
        );
        assert!(!missing.exists());
        // A directory no server has used (no lock file) is no spool either.
        let err = read(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
