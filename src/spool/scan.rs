//! Reading one segment's unfinished messages for `queue list|stats` without holding the
//! segment, or any message's content, in memory: the file is read front to back through a
//! small window, each message record's envelope is decoded from its first bytes and its
//! content only streamed through the checksum.
//!
//! Nothing here is trusted that the records do not say: every record's checksum is checked
//! over its whole payload, as recovery checks it, before anything of it is used. The fast
//! path only handles a segment of whole, valid records back to back; at the first thing
//! that is not (a torn tail after `kill -9`, a corrupt region, an unknown record kind), the
//! segment is read again by recovery's own reader ([`segment::recover_segment`], changing
//! nothing on disk), so what is listed is always exactly what a restart would recover. That
//! happens to the segment being written and to damaged ones, which are few.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use bytes::Bytes;

use super::record::{self, Decoded, Header, MessageHead, Record, StoredMessage, HEADER_LEN};
use super::segment::{self, DeliveryState, Location, Recovered, RecoveryReport, SegmentId};
use crate::id::QueueId;

/// Bytes read at a time.
const WINDOW: usize = 1 << 20;
/// Records other than messages are small (a deferral is under 600 bytes); a larger one is
/// left to recovery's reader.
const MAX_SMALL: usize = 64 << 10;
/// The most of a message record read to find its envelope (recipient lists are far
/// shorter); past that, recovery's reader takes the segment.
const MAX_HEAD: usize = 16 << 20;

/// The unfinished messages in segment `id` of `dir`, exactly as recovery (without repair)
/// finds them, contents not loaded. A segment deleted meanwhile (a running server deletes
/// finished ones) has none.
pub(super) fn live_messages(dir: &Path, id: SegmentId) -> io::Result<Vec<Recovered>> {
    if let Some(found) = scan(dir, id)? {
        return Ok(found);
    }
    let mut report = RecoveryReport::default();
    segment::recover_segment(dir, id, false, &mut report)?;
    Ok(report.messages)
}

/// The fast path: `None` as soon as anything is not a whole, valid record.
fn scan(dir: &Path, id: SegmentId) -> io::Result<Option<Vec<Recovered>>> {
    let path = dir.join(id.file_name());
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(Vec::new())),
        Err(e) => return Err(with_path(e)),
    };
    let mut input = Input::new(file);
    let mut found = Found::default();
    loop {
        let offset = input.offset;
        if !input.fill(HEADER_LEN).map_err(with_path)? {
            if input.available() == 0 {
                break;
            }
            return Ok(None);
        }
        let Ok(header) = record::decode_header(input.bytes()) else {
            return Ok(None);
        };
        let total = HEADER_LEN + header.payload_len;
        if header.is_message() {
            let Some(head) = read_head(&mut input, &header).map_err(with_path)? else {
                return Ok(None);
            };
            if !head.fills(header.payload_len) || !input.skip_checked(&header).map_err(with_path)? {
                return Ok(None);
            }
            found.message(head, id, offset, total as u64);
        } else {
            if header.payload_len > MAX_SMALL || !input.fill(total).map_err(with_path)? {
                return Ok(None);
            }
            match record::decode(&Bytes::copy_from_slice(&input.bytes()[..total])) {
                Decoded::Record(rec, n) if n == total => found.other(rec),
                _ => return Ok(None),
            }
            input.consume(total);
        }
    }
    Ok(Some(found.unfinished()))
}

/// Decodes a message record's envelope from as few of its first bytes as hold it.
fn read_head(input: &mut Input, header: &Header) -> io::Result<Option<MessageHead>> {
    let mut want = header.payload_len.min(4096);
    loop {
        if !input.fill(HEADER_LEN + want)? {
            return Ok(None);
        }
        if let Some(head) =
            record::decode_message_head(&input.bytes()[HEADER_LEN..HEADER_LEN + want])
        {
            return Ok(Some(head));
        }
        if want >= header.payload_len || want >= MAX_HEAD {
            return Ok(None);
        }
        want = (want * 8).min(header.payload_len).min(MAX_HEAD);
    }
}

/// A file read front to back through a window.
struct Input {
    file: File,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// File offset of `buf[start]`.
    offset: u64,
}

impl Input {
    fn new(file: File) -> Self {
        Input {
            file,
            buf: vec![0; WINDOW],
            start: 0,
            end: 0,
            offset: 0,
        }
    }

    fn available(&self) -> usize {
        self.end - self.start
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }

    /// Makes at least `need` bytes available; false when the file ends first.
    fn fill(&mut self, need: usize) -> io::Result<bool> {
        while self.available() < need {
            if self.buf.len() - self.start < need || self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.len() < need {
                    self.buf.resize(need, 0);
                }
            }
            match self.file.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Passes over the record `header` starts (header included), checking its checksum over
    /// the whole payload on the way; false when it does not match or the file ends first.
    fn skip_checked(&mut self, header: &Header) -> io::Result<bool> {
        self.consume(HEADER_LEN);
        let mut left = header.payload_len;
        let mut crc = header.checksum_seed;
        while left > 0 {
            if self.available() == 0 && !self.fill(1)? {
                return Ok(false);
            }
            let n = left.min(self.available());
            crc = crc32c::crc32c_append(crc, &self.bytes()[..n]);
            self.consume(n);
            left -= n;
        }
        Ok(crc == header.checksum)
    }
}

/// What the records of one segment say so far, as recovery keeps it.
#[derive(Default)]
struct Found {
    messages: Vec<Message>,
    index: HashMap<QueueId, usize>,
}

struct Message {
    message: StoredMessage,
    location: Location,
    done: Vec<bool>,
    finished: bool,
    state: DeliveryState,
}

impl Found {
    fn message(&mut self, head: MessageHead, segment: SegmentId, offset: u64, len: u64) {
        self.index.insert(head.id, self.messages.len());
        self.messages.push(Message {
            done: vec![false; head.rcpts.len()],
            message: StoredMessage {
                id: head.id,
                arrival: head.arrival,
                from: head.from,
                rcpts: head.rcpts,
                eight_bit: head.eight_bit,
                smtputf8: head.smtputf8,
                dsn: head.dsn,
                data: Bytes::new(),
            },
            location: Location {
                segment,
                offset,
                len,
            },
            finished: false,
            state: DeliveryState::default(),
        });
    }

    fn other(&mut self, rec: Record) {
        let id = match &rec {
            Record::Recipient { id, .. }
            | Record::Finished { id }
            | Record::Deferred { id, .. }
            | Record::Hold { id, .. } => *id,
            // Decoded by the head reader; a whole one here would come from `decode` only.
            Record::Message(m) => m.id,
        };
        let Some(m) = self.index.get(&id).map(|&k| &mut self.messages[k]) else {
            return;
        };
        match rec {
            Record::Recipient { index, .. } => {
                if let Some(flag) = m.done.get_mut(index as usize) {
                    *flag = true;
                }
            }
            Record::Finished { .. } => m.finished = true,
            Record::Deferred { .. } | Record::Hold { .. } => m.state.apply(rec),
            Record::Message(_) => {}
        }
    }

    /// The messages with recipients still to deliver, in record order.
    fn unfinished(self) -> Vec<Recovered> {
        self.messages
            .into_iter()
            .filter(|m| !m.finished)
            .filter_map(|m| {
                let pending: Vec<u32> = (0..m.done.len() as u32)
                    .filter(|&i| !m.done[i as usize])
                    .collect();
                (!pending.is_empty()).then_some(Recovered {
                    message: m.message,
                    location: m.location,
                    pending,
                    state: m.state,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdGenerator;
    use crate::smtp::{Mailbox, ReversePath};
    use crate::spool::record::{MessageRecord, RcptOutcome};
    use crate::spool::segment::ShardStore;
    use std::fs;
    use std::time::{Duration, UNIX_EPOCH};

    fn mb(s: &str) -> Mailbox {
        Mailbox::parse(s).unwrap()
    }

    /// What recovery's reader (no repair) finds in each segment of `dir`.
    fn by_recovery(dir: &Path) -> Vec<String> {
        let report = segment::recover(dir, false).unwrap();
        report.messages.iter().map(|m| format!("{m:?}")).collect()
    }

    /// What this reader finds, segment by segment, and how many segments took the fast
    /// path to the end.
    fn by_scan(dir: &Path) -> (Vec<String>, usize) {
        let mut ids: Vec<SegmentId> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(SegmentId::parse))
            .collect();
        ids.sort();
        let mut out = Vec::new();
        let mut fast = 0;
        for id in ids {
            fast += usize::from(scan(dir, id).unwrap().is_some());
            out.extend(
                live_messages(dir, id)
                    .unwrap()
                    .iter()
                    .map(|m| format!("{m:?}")),
            );
        }
        (out, fast)
    }

    /// A segment with messages in every state: untouched, partly delivered, deferred
    /// (twice), held, released, finished, removed; one with a content larger than the
    /// read window (unless `small`) and one whose envelope is larger than the first read
    /// of it.
    fn every_state(dir: &Path, small: bool) -> Location {
        let mut store = ShardStore::new(dir, 0, Vec::new(), 0).unwrap();
        let mut ids = IdGenerator::starting_at(0, 77);
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let mut add = |store: &mut ShardStore, n: usize, body: &[u8]| {
            let id = ids.next_id();
            let rcpts: Vec<Mailbox> = (0..n)
                .map(|i| mb(&format!("recipient-number-{i}@example.net")))
                .collect();
            let loc = store
                .append_message(&MessageRecord {
                    id,
                    arrival: t(1_700_000_000 + n as u64),
                    from: &ReversePath::Mailbox(mb("s@example.org")),
                    rcpts: &rcpts,
                    eight_bit: n % 2 == 0,
                    smtputf8: false,
                    dsn: None,
                    data: body,
                })
                .unwrap();
            (id, loc)
        };
        let (a, la) = add(&mut store, 1, b"plain\r\n");
        let (b, lb) = add(&mut store, 3, b"partly\r\n");
        let big = if small { 100 } else { 3 * WINDOW + 7 };
        let (c, lc) = add(&mut store, 1, &vec![b'x'; big]);
        let (d, ld) = add(&mut store, 400, b"many recipients\r\n");
        let (e, le) = add(&mut store, 2, b"finished\r\n");
        let (f, lf) = add(&mut store, 1, b"removed\r\n");
        let (g, lg) = add(&mut store, 1, b"released\r\n");
        store.record_deferral(&la, a, 1, t(100), "451 a").unwrap();
        store
            .record_recipient(&lb, b, 1, RcptOutcome::Delivered)
            .unwrap();
        store.record_deferral(&lb, b, 2, t(200), "451 b").unwrap();
        store.record_hold(&lc, c, true).unwrap();
        store.record_deferral(&ld, d, 1, t(300), "").unwrap();
        store.record_deferral(&ld, d, 2, t(400), "421 d").unwrap();
        store
            .record_recipient(&le, e, 0, RcptOutcome::Delivered)
            .unwrap();
        store
            .record_recipient(&le, e, 1, RcptOutcome::Bounced)
            .unwrap();
        store
            .record_recipient(&lf, f, 0, RcptOutcome::Removed)
            .unwrap();
        store.finish_message(&lf, f, true).unwrap();
        store.record_deferral(&lg, g, 5, t(500), "451 g").unwrap();
        store.record_hold(&lg, g, true).unwrap();
        store.record_hold(&lg, g, false).unwrap();
        let (_, last) = add(&mut store, 2, b"the last one\r\n");
        last
    }

    #[test]
    fn a_clean_segment_reads_as_recovery_reads_it_on_the_fast_path() {
        let dir = tempfile::tempdir().unwrap();
        every_state(dir.path(), false);
        let (found, fast) = by_scan(dir.path());
        assert_eq!(fast, 1, "read to the end without falling back");
        assert_eq!(found.len(), 6, "{found:#?}");
        assert_eq!(found, by_recovery(dir.path()));
    }

    /// A torn tail at every length, as `kill -9` mid-write leaves it: the message is not
    /// listed, the others are, exactly as recovery has them.
    #[test]
    fn a_torn_tail_at_every_length_reads_as_recovery_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let last = every_state(dir.path(), false);
        let path = dir.path().join(last.segment.file_name());
        let whole = fs::read(&path).unwrap();
        let mut full = by_scan(dir.path()).0;
        full.pop();
        for cut in last.offset as usize..whole.len() {
            fs::write(&path, &whole[..cut]).unwrap();
            let (found, _) = by_scan(dir.path());
            assert_eq!(found, full, "cut at {cut}");
            assert_eq!(found, by_recovery(dir.path()), "cut at {cut}");
        }
    }

    /// A flipped byte anywhere (envelope, content, outcome records): the damaged record is
    /// never used, and the rest reads exactly as recovery has it.
    #[test]
    fn a_flipped_byte_anywhere_reads_as_recovery_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let last = every_state(dir.path(), true);
        let path = dir.path().join(last.segment.file_name());
        let whole = fs::read(&path).unwrap();
        // 0x80 too: a top bit set in a time field (arrival, next attempt) must not
        // overflow the clock before the checksum is looked at.
        for (at, flip) in (0..whole.len())
            .step_by(3)
            .flat_map(|at| [(at, 0x21u8), (at, 0x80)])
        {
            let mut bad = whole.clone();
            bad[at] ^= flip;
            fs::write(&path, &bad).unwrap();
            assert_eq!(
                by_scan(dir.path()).0,
                by_recovery(dir.path()),
                "flip {flip:#x} at {at}"
            );
        }
    }

    #[test]
    fn a_segment_deleted_meanwhile_has_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let id = SegmentId { shard: 0, seq: 9 };
        assert!(live_messages(dir.path(), id).unwrap().is_empty());
    }
}
