//! One shard's segment files: appending records, reading a message back, recovery after a
//! crash, and deleting segments whose messages are all finished.
//!
//! A segment is an append-only file of records (see [`super::record`]). A message's outcome
//! records are appended to the message's own segment, so every segment is self-contained:
//! once all of its messages are finished it is deleted, whatever other segments hold.
//!
//! A message record is appended with one `writev`: its header and envelope fields from a
//! small reusable buffer, its content straight from the session's buffer (not copied).
//!
//! Writes go to the page cache here; durability comes from the group commit
//! ([`super::commit`]), which syncs every segment that got a new message since the last
//! sync (and the directory, after a new segment was created) before any of those messages
//! is acknowledged.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};

use super::record::{self, Decoded, MessageRecord, RcptOutcome, Record, StoredMessage};
use crate::id::QueueId;

/// A segment's identity: the shard that created it and its sequence number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId {
    /// Shard that created it (segments survive restarts with other shard counts).
    pub shard: u32,
    /// Sequence number within that shard.
    pub seq: u64,
}

impl SegmentId {
    /// The file name, `seg-SSS-QQQQQQQQQQQQ.rrs`.
    pub fn file_name(self) -> String {
        format!("seg-{:03}-{:012}.rrs", self.shard, self.seq)
    }

    /// Parses a file name made by [`SegmentId::file_name`].
    pub fn parse(name: &str) -> Option<SegmentId> {
        let rest = name.strip_prefix("seg-")?.strip_suffix(".rrs")?;
        let (shard, seq) = rest.split_once('-')?;
        Some(SegmentId {
            shard: shard.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// Where a message record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Its segment.
    pub segment: SegmentId,
    /// Byte offset of the record.
    pub offset: u64,
    /// Record length, header included.
    pub len: u64,
}

/// A segment recovery found with live messages in it, for the shard that takes it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenSegment {
    /// Which segment.
    pub id: SegmentId,
    /// Its valid length (a torn tail already cut off).
    pub len: u64,
    /// Messages in it not yet finished.
    pub live: usize,
}

#[cfg(test)]
impl Location {
    /// A location for tests that never reach the disk.
    pub(crate) fn for_tests() -> Location {
        Location {
            segment: SegmentId { shard: 0, seq: 0 },
            offset: 0,
            len: 0,
        }
    }
}

/// What a message's deferral and hold records say about its delivery so far (the latest
/// of each kind counts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryState {
    /// Attempts the retry schedule has counted (0: never deferred).
    pub attempts: u32,
    /// When the next attempt is due; `None` when it is due now (never deferred, or
    /// released from hold since).
    pub next_attempt: Option<SystemTime>,
    /// The last attempt's reply, or why it had none.
    pub last_reply: Option<String>,
    /// On hold: not to be attempted until released.
    pub held: bool,
}

impl DeliveryState {
    /// Takes in one of the message's records (only deferral and hold records change it).
    pub(super) fn apply(&mut self, record: Record) {
        match record {
            Record::Deferred {
                attempts,
                next_attempt,
                last_reply,
                ..
            } => {
                self.attempts = attempts;
                self.next_attempt = Some(next_attempt);
                self.last_reply = Some(last_reply);
            }
            Record::Hold { held, .. } => {
                self.held = held;
                if !held {
                    // Released: due at once, whatever the schedule said.
                    self.next_attempt = None;
                }
            }
            Record::Message(_) | Record::Recipient { .. } | Record::Finished { .. } => {}
        }
    }
}

/// A message found by recovery that still has recipients to deliver.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The message (content not loaded: read it with [`ShardStore::read_message`]).
    pub message: StoredMessage,
    /// Where it is.
    pub location: Location,
    /// Recipient indexes not yet finished.
    pub pending: Vec<u32>,
    /// Attempts, next attempt, last reply, hold.
    pub state: DeliveryState,
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    len: u64,
    /// Messages in it not yet finished.
    live: usize,
    /// Cannot be appended to any more (a write failed and could not be undone).
    broken: bool,
}

/// Segments rotate at this size.
const ROTATE_BYTES: u64 = 64 << 20;

/// Files the next group commit must sync.
#[derive(Debug, Default)]
pub struct SyncTargets {
    /// Segments that received new messages.
    pub files: Vec<Arc<File>>,
    /// The spool directory, when a segment was created since the last sync.
    pub dir: Option<PathBuf>,
}

impl SyncTargets {
    /// True when there is nothing to sync.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dir.is_none()
    }

    /// Syncs everything (blocking): `fdatasync` each file, then `fsync` the directory.
    pub fn sync(&self) -> io::Result<()> {
        for f in &self.files {
            f.sync_data()?;
        }
        if let Some(dir) = &self.dir {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// One shard's segments.
#[derive(Debug)]
pub struct ShardStore {
    dir: PathBuf,
    shard: u32,
    next_seq: u64,
    current: Option<SegmentId>,
    segments: HashMap<SegmentId, Segment>,
    scratch: BytesMut,
    unsynced: Vec<SegmentId>,
    dir_unsynced: bool,
}

impl ShardStore {
    /// A store for `shard` in `dir`, taking over the segments recovery assigned to it.
    /// New segments get sequence numbers above every existing one of this shard.
    pub fn new(
        dir: &Path,
        shard: u32,
        inherited: Vec<OpenSegment>,
        next_seq: u64,
    ) -> io::Result<Self> {
        let mut store = ShardStore::empty(dir, shard, next_seq);
        for OpenSegment { id, len, live } in inherited {
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .open(dir.join(id.file_name()))?;
            store.segments.insert(
                id,
                Segment {
                    file: Arc::new(file),
                    len,
                    live,
                    broken: false,
                },
            );
        }
        Ok(store)
    }

    /// A store with no segments yet (no I/O, so it cannot fail).
    pub fn empty(dir: &Path, shard: u32, next_seq: u64) -> Self {
        ShardStore {
            dir: dir.to_path_buf(),
            shard,
            next_seq,
            current: None,
            segments: HashMap::new(),
            scratch: BytesMut::with_capacity(64 * 1024),
            unsynced: Vec::new(),
            dir_unsynced: false,
        }
    }

    /// Syncs every open segment (blocking; for the offline `queue remove`).
    pub fn sync_all_open(&self) -> io::Result<()> {
        for seg in self.segments.values() {
            seg.file.sync_data()?;
        }
        Ok(())
    }

    /// Appends an accepted message to the current segment (not yet durable: see
    /// [`ShardStore::take_sync_targets`]). On error nothing of it stays in the file; a
    /// record too large for recovery to read back is refused before anything is written.
    pub fn append_message(&mut self, msg: &MessageRecord<'_>) -> io::Result<Location> {
        if !msg.fits() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "message record of {} bytes is over the spool's limit of {}",
                    msg.payload_len(),
                    record::MAX_PAYLOAD
                ),
            ));
        }
        let segment = self.writable_segment()?;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        // Only the record's header and fields go through the scratch buffer; the content
        // is written from the caller's buffer in the same `writev`, not copied behind them.
        record::encode_message_head(&mut scratch, msg);
        let result = self.append(
            segment,
            &mut [IoSlice::new(&scratch), IoSlice::new(msg.data)],
        );
        // Keep a modest scratch buffer, not the largest envelope ever seen.
        if scratch.capacity() <= 1 << 20 {
            self.scratch = scratch;
        }
        let offset = result?;
        let seg = self.segment_mut(segment)?;
        seg.live += 1;
        if !self.unsynced.contains(&segment) {
            self.unsynced.push(segment);
        }
        Ok(Location {
            segment,
            offset,
            len: self.segments.get(&segment).map_or(0, |s| s.len) - offset,
        })
    }

    /// Records one recipient's outcome in the message's segment. Not synced on its own: a
    /// lost outcome record can only cause a repeated delivery after a crash, never a loss.
    pub fn record_recipient(
        &mut self,
        loc: &Location,
        id: QueueId,
        index: u32,
        outcome: RcptOutcome,
    ) -> io::Result<()> {
        self.append_small(loc.segment, |buf| {
            record::encode_recipient(buf, id, index, outcome)
        })
    }

    /// Records that an attempt left the message's recipients pending: `attempts` counted so
    /// far, the next due at `next_attempt`, and the last reply. Not synced on its own: a
    /// lost one only means the message is tried at once after a crash.
    pub fn record_deferral(
        &mut self,
        loc: &Location,
        id: QueueId,
        attempts: u32,
        next_attempt: SystemTime,
        last_reply: &str,
    ) -> io::Result<()> {
        self.append_small(loc.segment, |buf| {
            record::encode_deferred(buf, id, attempts, next_attempt, last_reply)
        })
    }

    /// Records that the message is on hold (`held`) or released.
    pub fn record_hold(&mut self, loc: &Location, id: QueueId, held: bool) -> io::Result<()> {
        self.append_small(loc.segment, |buf| record::encode_hold(buf, id, held))
    }

    /// Records that a message is finished as a whole, and lets its segment go when it was
    /// the segment's last live message.
    pub fn finish_message(
        &mut self,
        loc: &Location,
        id: QueueId,
        record_it: bool,
    ) -> io::Result<()> {
        let result = if record_it {
            self.append_small(loc.segment, |buf| record::encode_finished(buf, id))
        } else {
            Ok(())
        };
        if let Some(seg) = self.segments.get_mut(&loc.segment) {
            seg.live = seg.live.saturating_sub(1);
            if seg.live == 0 && self.current != Some(loc.segment) {
                self.delete(loc.segment);
            }
        }
        result
    }

    #[cfg(test)]
    /// Reads a message back (its content is not kept in memory while it waits).
    pub fn read_message(&self, loc: &Location) -> io::Result<StoredMessage> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; loc.len as usize];
        self.message_file(loc)?
            .read_exact_at(&mut buf, loc.offset)?;
        decode_message_at(loc, buf)
    }

    /// The segment file holding the message at `loc`, for a read outside the store
    /// (`Spool::read`, through the shard's driver).
    pub fn message_file(&self, loc: &Location) -> io::Result<&File> {
        self.segments
            .get(&loc.segment)
            .map(|seg| &*seg.file)
            .ok_or_else(|| {
                io::Error::other(format!("segment {} is not open", loc.segment.file_name()))
            })
    }

    /// A segment number for a streamed message's own segment (see `super::stream`),
    /// taken now so no other segment gets it while the content arrives.
    pub fn reserve_segment(&mut self) -> SegmentId {
        let id = SegmentId {
            shard: self.shard,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        id
    }

    /// Takes over a streamed message's segment, complete under its final name and holding
    /// that one message: it and the directory are synced by the next group commit, and
    /// outcome records go to it like to any segment (it is deleted when its message is
    /// finished, never being the current segment).
    pub fn adopt_streamed(&mut self, id: SegmentId, file: File, len: u64) {
        self.segments.insert(
            id,
            Segment {
                file: Arc::new(file),
                len,
                live: 1,
                broken: false,
            },
        );
        self.unsynced.push(id);
        self.dir_unsynced = true;
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes what the next group commit must sync.
    pub fn take_sync_targets(&mut self) -> SyncTargets {
        let files = self
            .unsynced
            .drain(..)
            .filter_map(|id| self.segments.get(&id).map(|s| Arc::clone(&s.file)))
            .collect();
        let dir = std::mem::take(&mut self.dir_unsynced).then(|| self.dir.clone());
        SyncTargets { files, dir }
    }

    /// After a failed sync nothing about the current segment's contents is certain: new
    /// messages go to a fresh segment. The old one still takes outcome records, so the
    /// caller can withdraw the messages whose sync failed (they were answered 451).
    pub fn abandon_current(&mut self) {
        if let Some(id) = self.current.take() {
            if self.segments.get(&id).is_some_and(|s| s.live == 0) {
                self.delete(id);
            }
        }
    }

    /// Deletes the current segment if nothing in it is live any more (called on an idle
    /// tick, so a quiet spool ends up empty; the next message starts a new segment).
    pub fn release_idle_current(&mut self) {
        if let Some(id) = self.current {
            if self.segments.get(&id).is_some_and(|s| s.live == 0) && !self.unsynced.contains(&id) {
                self.delete(id);
            }
        }
    }

    /// The segment new messages go to, if there is one (for the one-sync-per-message A/B
    /// mode, which syncs it even when an earlier sync already covered its messages).
    pub fn current_file(&self) -> Option<Arc<File>> {
        let id = self.current?;
        self.segments.get(&id).map(|s| Arc::clone(&s.file))
    }

    /// Segment files open now.
    pub fn open_segments(&self) -> usize {
        self.segments.len()
    }

    fn segment_mut(&mut self, id: SegmentId) -> io::Result<&mut Segment> {
        self.segments
            .get_mut(&id)
            .ok_or_else(|| io::Error::other("segment vanished"))
    }

    /// The segment to append a new message to, rotating or creating as needed.
    fn writable_segment(&mut self) -> io::Result<SegmentId> {
        if let Some(id) = self.current {
            match self.segments.get(&id) {
                Some(s) if !s.broken && s.len < ROTATE_BYTES => return Ok(id),
                Some(s) if s.live == 0 => self.delete(id),
                _ => {}
            }
            self.current = None;
        }
        let id = SegmentId {
            shard: self.shard,
            seq: self.next_seq,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(self.dir.join(id.file_name()))?;
        self.next_seq += 1;
        self.segments.insert(
            id,
            Segment {
                file: Arc::new(file),
                len: 0,
                live: 0,
                broken: false,
            },
        );
        self.current = Some(id);
        // The new name must be durable before any message in it is acknowledged.
        self.dir_unsynced = true;
        Ok(id)
    }

    /// Encodes a small record into the reusable scratch buffer and appends it (no
    /// allocation per outcome record).
    fn append_small(
        &mut self,
        segment: SegmentId,
        encode: impl FnOnce(&mut BytesMut),
    ) -> io::Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        encode(&mut scratch);
        let result = self
            .append(segment, &mut [IoSlice::new(&scratch)])
            .map(|_| ());
        self.scratch = scratch;
        result
    }

    /// Appends `parts`, one after the other, to a segment (one `writev` when the kernel
    /// takes it all); on failure cuts the file back to where it was, so no partial record
    /// remains (if even that fails, the segment takes no more appends).
    fn append(&mut self, id: SegmentId, parts: &mut [IoSlice<'_>]) -> io::Result<u64> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let seg = self.segment_mut(id)?;
        if seg.broken {
            return Err(io::Error::other("segment is broken"));
        }
        let offset = seg.len;
        match write_all_vectored(&mut &*seg.file, parts) {
            Ok(()) => {
                seg.len += len;
                Ok(offset)
            }
            Err(e) => {
                if seg.file.set_len(offset).is_err() {
                    seg.broken = true;
                }
                Err(e)
            }
        }
    }

    fn delete(&mut self, id: SegmentId) {
        if let Some(seg) = self.segments.remove(&id) {
            drop(seg);
            if let Err(e) = fs::remove_file(self.dir.join(id.file_name())) {
                tracing::warn!("cannot delete finished segment {}: {e}", id.file_name());
            }
        }
        if self.current == Some(id) {
            self.current = None;
        }
    }
}

/// Writes all of `bufs`, in order, with as few `write_vectored` calls as the writer takes
/// (std's `Write::write_all_vectored` is not stable yet). Retries on `Interrupted`; a write
/// that takes nothing while bytes remain is a `WriteZero` error. `bufs` is used up.
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    // Drops leading empty buffers, so an empty remainder never asks for a 0-byte write.
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write the whole record",
                ));
            }
            // Also drops buffers left empty behind the last byte written.
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What recovery found in a spool directory.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Messages still to deliver, with their segments.
    pub messages: Vec<Recovered>,
    /// Segments that hold live messages.
    pub segments: Vec<OpenSegment>,
    /// Per shard number, the next free segment sequence.
    pub next_seq: HashMap<u32, u64>,
    /// Corrupt regions set aside.
    pub corrupt_regions: usize,
    /// Torn tails cut off.
    pub torn_tails: usize,
    /// Segments deleted because everything in them was finished.
    pub deleted: usize,
}

/// Reads every segment in `dir`: cuts torn tails off, sets corrupt regions aside in
/// `dir/corrupt/`, deletes finished segments, and returns the unfinished messages (contents
/// not kept in memory). With `repair = false` nothing is changed on disk (for `queue list`).
pub fn recover(dir: &Path, repair: bool) -> io::Result<RecoveryReport> {
    let mut report = RecoveryReport::default();
    let mut ids: Vec<SegmentId> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(SegmentId::parse))
        .collect();
    ids.sort();
    for id in ids {
        let next = report.next_seq.entry(id.shard).or_insert(0);
        *next = (*next).max(id.seq + 1);
        recover_segment(dir, id, repair, &mut report)?;
    }
    Ok(report)
}

/// Recovers one segment into `report` (what [`recover`] does for each); also the reader
/// `queue list` falls back on when its own finds anything but whole, valid records.
pub(super) fn recover_segment(
    dir: &Path,
    id: SegmentId,
    repair: bool,
    report: &mut RecoveryReport,
) -> io::Result<()> {
    let path = dir.join(id.file_name());
    let bytes = match fs::read(&path) {
        Ok(b) => Bytes::from(b),
        // Read-only readers (`queue list`) race with a running server, which deletes a
        // segment once everything in it is finished: then there is nothing left to list.
        Err(e) if !repair && e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    let mut live: Vec<Found> = Vec::new();
    let mut index: HashMap<QueueId, usize> = HashMap::new();
    let mut at = 0usize;
    while at < bytes.len() {
        match record::decode(&bytes.slice(at..)) {
            Decoded::Record(rec, n) => {
                apply(rec, id, at as u64, n as u64, &mut live, &mut index);
                at += n;
            }
            Decoded::Incomplete | Decoded::Corrupt(_) => {
                // Is there a valid record further on? Then this is a corrupt region in the
                // middle: set it aside and resume there. If not, it is a torn tail.
                match resync(&bytes, at + 1) {
                    Some(next) => {
                        tracing::error!(
                            "spool: corrupt region in {} at bytes {at}..{next}; set aside, not delivered",
                            id.file_name()
                        );
                        if repair {
                            set_aside(dir, id, at, &bytes[at..next]);
                        }
                        report.corrupt_regions += 1;
                        at = next;
                    }
                    None => {
                        tracing::warn!(
                            "spool: {} has a torn tail of {} bytes after offset {at}; cutting it off",
                            id.file_name(),
                            bytes.len() - at
                        );
                        report.torn_tails += 1;
                        if repair {
                            OpenOptions::new()
                                .write(true)
                                .open(&path)?
                                .set_len(at as u64)?;
                        }
                        break;
                    }
                }
            }
        }
    }
    let valid_end = at.min(bytes.len()) as u64;
    let mut live_count = 0;
    for Found {
        mut message,
        location,
        done,
        finished,
        state,
    } in live
    {
        if finished {
            continue;
        }
        let pending: Vec<u32> = done
            .iter()
            .enumerate()
            .filter(|(_, d)| !**d)
            .map(|(i, _)| i as u32)
            .collect();
        if pending.is_empty() {
            continue;
        }
        // Keep metadata only: the content is read back from disk when it is delivered.
        message.data = Bytes::new();
        live_count += 1;
        report.messages.push(Recovered {
            message,
            location,
            pending,
            state,
        });
    }
    if live_count == 0 {
        if repair {
            fs::remove_file(&path)?;
        }
        report.deleted += 1;
    } else {
        report.segments.push(OpenSegment {
            id,
            len: valid_end,
            live: live_count,
        });
    }
    Ok(())
}

/// A message recovery has read so far in one segment.
struct Found {
    message: StoredMessage,
    location: Location,
    /// Per recipient: an outcome is recorded.
    done: Vec<bool>,
    /// The message is finished as a whole.
    finished: bool,
    state: DeliveryState,
}

fn apply(
    rec: Record,
    seg: SegmentId,
    offset: u64,
    len: u64,
    live: &mut Vec<Found>,
    index: &mut HashMap<QueueId, usize>,
) {
    match rec {
        Record::Message(m) => {
            let n = m.rcpts.len();
            index.insert(m.id, live.len());
            live.push(Found {
                message: m,
                location: Location {
                    segment: seg,
                    offset,
                    len,
                },
                done: vec![false; n],
                finished: false,
                state: DeliveryState::default(),
            });
        }
        Record::Recipient { id, index: i, .. } => {
            if let Some(&k) = index.get(&id) {
                if let Some(flag) = live[k].done.get_mut(i as usize) {
                    *flag = true;
                }
            }
        }
        Record::Finished { id } => {
            if let Some(&k) = index.get(&id) {
                live[k].finished = true;
            }
        }
        Record::Deferred { id, .. } | Record::Hold { id, .. } => {
            if let Some(&k) = index.get(&id) {
                live[k].state.apply(rec);
            }
        }
    }
}

/// The offset of the next valid record at or after `from`, if any.
fn resync(bytes: &Bytes, from: usize) -> Option<usize> {
    let magic = record::MAGIC.to_le_bytes();
    let mut at = from;
    while let Some(pos) = memchr::memmem::find(&bytes[at.min(bytes.len())..], &magic) {
        let cand = at + pos;
        if let Decoded::Record(_, _) = record::decode(&bytes.slice(cand..)) {
            return Some(cand);
        }
        at = cand + 1;
    }
    None
}

fn set_aside(dir: &Path, id: SegmentId, at: usize, region: &[u8]) {
    let corrupt = dir.join("corrupt");
    let name = format!("{}.{at}.bad", id.file_name());
    let result = fs::create_dir_all(&corrupt).and_then(|()| fs::write(corrupt.join(name), region));
    if let Err(e) = result {
        tracing::error!("spool: cannot set aside corrupt region: {e}");
    }
}

/// The message record read from `loc` (its whole record, `buf`), checked.
pub fn decode_message_at(loc: &Location, buf: Vec<u8>) -> io::Result<StoredMessage> {
    match record::decode(&Bytes::from(buf)) {
        Decoded::Record(Record::Message(m), _) => Ok(m),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} at {}: not a valid message record",
                loc.segment.file_name(),
                loc.offset
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdGenerator;
    use crate::smtp::{Mailbox, ReversePath};
    use std::time::UNIX_EPOCH;

    fn mb(s: &str) -> Mailbox {
        Mailbox::parse(s).unwrap()
    }

    fn fresh(dir: &Path) -> ShardStore {
        ShardStore::new(dir, 0, Vec::new(), 0).unwrap()
    }

    fn add(
        store: &mut ShardStore,
        ids: &mut IdGenerator,
        rcpts: usize,
        body: &str,
    ) -> (QueueId, Location) {
        let id = ids.next_id();
        let rcpts: Vec<Mailbox> = (0..rcpts)
            .map(|i| mb(&format!("r{i}@example.net")))
            .collect();
        let from = ReversePath::Mailbox(mb("s@example.org"));
        let loc = store
            .append_message(&MessageRecord {
                id,
                arrival: UNIX_EPOCH,
                from: &from,
                rcpts: &rcpts,
                eight_bit: false,
                smtputf8: false,
                dsn: None,
                data: body.as_bytes(),
            })
            .unwrap();
        (id, loc)
    }

    fn reopen(dir: &Path) -> (ShardStore, RecoveryReport) {
        let report = recover(dir, true).unwrap();
        let next = report.next_seq.get(&0).copied().unwrap_or(0);
        let store = ShardStore::new(dir, 0, report.segments.clone(), next).unwrap();
        (store, report)
    }

    /// A message too large for a record is refused before anything is written, so it is
    /// never answered 250 and then lost at recovery.
    #[test]
    fn a_record_recovery_could_not_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = fresh(dir.path());
        // Zeroed allocations are mapped lazily: 2 GiB here costs address space, not memory.
        let huge = vec![0u8; record::MAX_PAYLOAD];
        let e = store
            .append_message(&MessageRecord {
                id: IdGenerator::starting_at(0, 1).next_id(),
                arrival: UNIX_EPOCH,
                from: &ReversePath::Null,
                rcpts: &[mb("r@example.net")],
                eight_bit: false,
                smtputf8: false,
                dsn: None,
                data: &huge,
            })
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(store.open_segments(), 0, "no segment was even started");
    }

    #[test]
    fn a_message_is_written_exactly_as_encode_message_encodes_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = IdGenerator::starting_at(0, 5);
        let mut store = fresh(dir.path());
        let from = ReversePath::Mailbox(mb("s@example.org"));
        let rcpts = [mb("a@example.net"), mb("b@example.net")];
        let mut expected = BytesMut::new();
        let mut segment = None;
        for (i, body) in ["", "one\r\n", &"x".repeat(200_000)].iter().enumerate() {
            let id = ids.next_id();
            let arrival = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + i as u64);
            let from = if i == 1 { &ReversePath::Null } else { &from };
            let at = expected.len() as u64;
            let msg = MessageRecord {
                id,
                arrival,
                from,
                rcpts: &rcpts[..i],
                eight_bit: i == 2,
                smtputf8: false,
                dsn: None,
                data: body.as_bytes(),
            };
            let loc = store.append_message(&msg).unwrap();
            record::encode_message(&mut expected, &msg);
            assert_eq!((loc.offset, loc.len), (at, expected.len() as u64 - at));
            segment = Some(loc.segment);
        }
        let written = fs::read(dir.path().join(segment.unwrap().file_name())).unwrap();
        assert!(
            written == expected[..],
            "the segment differs from encode_message"
        );
    }

    /// A writer that takes at most `chunk` bytes per call and fails every other call with
    /// `Interrupted`.
    struct Stingy {
        out: Vec<u8>,
        chunk: usize,
        calls: usize,
    }

    impl Write for Stingy {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls % 2 == 1 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let mut room = self.chunk;
            for b in bufs {
                let n = b.len().min(room);
                self.out.extend_from_slice(&b[..n]);
                room -= n;
            }
            Ok(self.chunk - room)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn write_all_vectored_survives_partial_and_interrupted_writes() {
        let parts: [&[u8]; 4] = [b"", b"header", b"", b"content!"];
        for chunk in 1..=16 {
            let mut w = Stingy {
                out: Vec::new(),
                chunk,
                calls: 0,
            };
            let mut bufs = parts.map(IoSlice::new);
            write_all_vectored(&mut w, &mut bufs).unwrap();
            assert_eq!(w.out, b"headercontent!", "chunk {chunk}");
        }
        // Nothing to write makes no call at all.
        let mut w = Stingy {
            out: Vec::new(),
            chunk: 0,
            calls: 0,
        };
        write_all_vectored(&mut w, &mut [IoSlice::new(b""), IoSlice::new(b"")]).unwrap();
        assert_eq!(w.calls, 0);
        // A writer that takes nothing is an error, not a busy loop.
        let err = write_all_vectored(&mut w, &mut [IoSlice::new(b"x")]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }

    #[test]
    fn recovery_requeues_unfinished_recipients_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = IdGenerator::starting_at(0, 7);
        let mut store = fresh(dir.path());
        let (a, la) = add(&mut store, &mut ids, 3, "first\r\n");
        let (b, lb) = add(&mut store, &mut ids, 1, "second\r\n");
        let (c, lc) = add(&mut store, &mut ids, 1, "third\r\n");
        store.take_sync_targets().sync().unwrap();
        store
            .record_recipient(&la, a, 1, RcptOutcome::Delivered)
            .unwrap();
        store
            .record_recipient(&lb, b, 0, RcptOutcome::Delivered)
            .unwrap();
        store.finish_message(&lb, b, false).unwrap();
        store.finish_message(&lc, c, true).unwrap();
        drop(store);
        let (store, report) = reopen(dir.path());
        assert_eq!(report.messages.len(), 1);
        let m = &report.messages[0];
        assert_eq!(m.message.id, a);
        assert_eq!(m.pending, vec![0, 2]);
        assert!(m.message.data.is_empty(), "content is not kept in memory");
        let back = store.read_message(&m.location).unwrap();
        assert_eq!(&back.data[..], b"first\r\n");
    }

    #[test]
    fn a_torn_tail_is_cut_at_every_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = IdGenerator::starting_at(0, 9);
        let mut store = fresh(dir.path());
        let (first, _) = add(&mut store, &mut ids, 1, "keep me\r\n");
        let (_, last) = add(&mut store, &mut ids, 1, "torn\r\n");
        drop(store);
        let path = dir.path().join(last.segment.file_name());
        let whole = fs::read(&path).unwrap();
        for cut in last.offset as usize..whole.len() {
            fs::write(&path, &whole[..cut]).unwrap();
            let (mut store, report) = reopen(dir.path());
            let found: Vec<QueueId> = report.messages.iter().map(|m| m.message.id).collect();
            assert_eq!(found, vec![first], "cut at {cut}");
            assert_eq!(
                fs::metadata(&path).unwrap().len(),
                last.offset,
                "tail removed"
            );
            // Appending after recovery yields a readable record.
            let (again, loc) = add(&mut store, &mut ids, 1, "after\r\n");
            assert_eq!(store.read_message(&loc).unwrap().id, again);
            assert_ne!(
                loc.segment, last.segment,
                "new messages go to a new segment"
            );
            fs::remove_file(dir.path().join(loc.segment.file_name())).unwrap();
        }
    }

    #[test]
    fn a_corrupt_record_is_set_aside_and_the_rest_survives() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = IdGenerator::starting_at(0, 11);
        let mut store = fresh(dir.path());
        let (a, _) = add(&mut store, &mut ids, 1, "a\r\n");
        let (_, lb) = add(&mut store, &mut ids, 1, "bbbbbbbbbbbbbbbbbbbb\r\n");
        let (c, _) = add(&mut store, &mut ids, 1, "c\r\n");
        drop(store);
        let path = dir.path().join(lb.segment.file_name());
        let mut bytes = fs::read(&path).unwrap();
        bytes[lb.offset as usize + lb.len as usize - 5] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let (_, report) = reopen(dir.path());
        let found: Vec<QueueId> = report.messages.iter().map(|m| m.message.id).collect();
        assert_eq!(found, vec![a, c]);
        assert_eq!(report.corrupt_regions, 1);
        assert_eq!(fs::read_dir(dir.path().join("corrupt")).unwrap().count(), 1);
    }

    #[test]
    fn finished_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = IdGenerator::starting_at(0, 13);
        let mut store = fresh(dir.path());
        let (a, la) = add(&mut store, &mut ids, 1, "a\r\n");
        // The current segment stays while it is current...
        store.finish_message(&la, a, false).unwrap();
        assert_eq!(store.open_segments(), 1);
        // ...and goes once abandoned with nothing live in it.
        store.abandon_current();
        assert_eq!(store.open_segments(), 0);
        assert!(!dir.path().join(la.segment.file_name()).exists());
        // Recovery deletes segments with nothing left to deliver.
        let (b, lb) = add(&mut store, &mut ids, 1, "b\r\n");
        store
            .record_recipient(&lb, b, 0, RcptOutcome::Bounced)
            .unwrap();
        drop(store);
        let (_, report) = reopen(dir.path());
        assert!(report.messages.is_empty());
        assert_eq!(report.deleted, 1);
        assert!(!dir.path().join(lb.segment.file_name()).exists());
    }

    #[test]
    fn new_segments_never_reuse_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = IdGenerator::starting_at(0, 15);
        let mut store = fresh(dir.path());
        let (_, la) = add(&mut store, &mut ids, 1, "a\r\n");
        drop(store);
        let (mut store, _) = reopen(dir.path());
        let (_, lb) = add(&mut store, &mut ids, 1, "b\r\n");
        assert!(lb.segment.seq > la.segment.seq);
        assert_eq!(
            store.take_sync_targets().dir,
            Some(dir.path().to_path_buf())
        );
    }

    #[test]
    fn recovery_keeps_each_message_s_schedule_and_hold() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let mut ids = IdGenerator::starting_at(0, 17);
        let mut store = fresh(dir.path());
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let (a, la) = add(&mut store, &mut ids, 1, "a\r\n");
        let (b, lb) = add(&mut store, &mut ids, 1, "b\r\n");
        let (c, lc) = add(&mut store, &mut ids, 2, "c\r\n");
        let (d, _) = add(&mut store, &mut ids, 1, "d\r\n");
        // a: deferred twice; the later record counts.
        store.record_deferral(&la, a, 1, t(100), "first").unwrap();
        store.record_deferral(&la, a, 2, t(400), "second").unwrap();
        // b: deferred, then put on hold; a deferral after the hold keeps it held.
        store.record_deferral(&lb, b, 1, t(100), "451 b").unwrap();
        store.record_hold(&lb, b, true).unwrap();
        store
            .record_deferral(&lb, b, 2, t(500), "451 b again")
            .unwrap();
        // c: deferred, held, released: due at once, attempts and reply kept.
        store.record_deferral(&lc, c, 3, t(900), "451 c").unwrap();
        store.record_hold(&lc, c, true).unwrap();
        store.record_hold(&lc, c, false).unwrap();
        store
            .record_recipient(&lc, c, 0, RcptOutcome::Delivered)
            .unwrap();
        drop(store);
        let (_, report) = reopen(dir.path());
        let state = |id| {
            let m = report.messages.iter().find(|m| m.message.id == id).unwrap();
            m.state.clone()
        };
        assert_eq!(
            state(a),
            DeliveryState {
                attempts: 2,
                next_attempt: Some(t(400)),
                last_reply: Some("second".into()),
                held: false,
            }
        );
        assert_eq!(
            state(b),
            DeliveryState {
                attempts: 2,
                next_attempt: Some(t(500)),
                last_reply: Some("451 b again".into()),
                held: true,
            }
        );
        assert_eq!(
            state(c),
            DeliveryState {
                attempts: 3,
                next_attempt: None,
                last_reply: Some("451 c".into()),
                held: false,
            }
        );
        assert_eq!(state(d), DeliveryState::default(), "never deferred");
        let pending_c = &report
            .messages
            .iter()
            .find(|m| m.message.id == c)
            .unwrap()
            .pending;
        assert_eq!(pending_c, &[1]);
    }
}
