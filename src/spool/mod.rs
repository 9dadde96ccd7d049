//! The durable spool, and its front door: the rest of the server calls [`SpoolDir`] (once,
//! at start) and [`Spool`] (one per shard), never the records, segments or committer
//! behind them.
//!
//! A message moves forward only: inbound → [`Spool::accept`] → queue manager → outbound →
//! [`Spool::settle`] / [`Spool::finish`].
//!
//! - [`record`]: the on-disk record format, with crc32c checksums.
//! - `segment`: one shard's append-only segment files, recovery, deletion.
//! - `commit`: group commit — one `fdatasync` for every message that finished DATA since
//!   the last one (held open a little longer under load); only then is `250` sent.
//! - `lock`: one owner per spool directory.
//! - [`stream`]: large messages written while they arrive, each into a segment of its own
//!   ([`Spool::begin_streamed`], [`Spool::accept_streamed`]).
//! - [`inspect`]: `queue list|stats`, read-only; `scan`: its segment reader, which
//!   streams each segment and keeps no message content.
//! - [`control`]: `queue flush|remove|hold|release` requests to a running server (files
//!   plus SIGUSR1), and `remove|hold|release` on a stopped spool.
//!
//! Besides messages and outcomes the segments hold each deferred message's schedule
//! (attempts, next attempt, last reply) and its hold, so `queue list` shows them and a
//! restart keeps them ([`DeliveryState`]). No queue command creates a spool.
//!
//! A `250 2.0.0 Ok: queued as ID` is a promise: by then the message's record is synced.

mod commit;
pub mod control;
pub mod inspect;
mod lock;
pub mod record;
mod scan;
mod segment;
pub mod stream;

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;

use crate::config::AbSwitches;
use crate::id::QueueId;
use crate::observe::metrics::ShardMetrics;
use crate::smtp::ext::DsnEnvelope;
use crate::smtp::{Mailbox, ReversePath};
use commit::GroupCommit;
use lock::SpoolLock;
use segment::{OpenSegment, Recovered, ShardStore};

use record::MessageRecord;
pub use record::{RcptOutcome, MAX_PAYLOAD};
pub use segment::{DeliveryState, Location};
pub use stream::StreamedBody;

/// Checks that `dir` is a spool some server has used (it has a lock file), so that a queue
/// command never creates one (an error naming the directory otherwise).
pub(crate) fn require_existing(dir: &Path) -> io::Result<()> {
    if dir.join("lock").is_file() {
        return Ok(());
    }
    let why = if dir.is_dir() {
        format!(
            "spool {} does not exist (the directory has no lock file: no ringrelay server has used it)",
            dir.display()
        )
    } else {
        format!("spool {} does not exist", dir.display())
    };
    Err(io::Error::new(io::ErrorKind::NotFound, why))
}

/// A message for [`Spool::accept`]: its envelope (taken over by the [`Queued`] it
/// becomes) and its content (written from where it is, not copied).
#[derive(Debug)]
pub struct NewMessage<'a> {
    /// Queue ID.
    pub id: QueueId,
    /// When it arrived.
    pub arrival: SystemTime,
    /// Reverse path.
    pub from: ReversePath,
    /// Recipients, in envelope order.
    pub rcpts: Vec<Mailbox>,
    /// BODY=8BITMIME.
    pub eight_bit: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// The DSN parameters (RFC 3461), if the client gave any.
    pub dsn: Option<Arc<DsnEnvelope>>,
    /// The content, as it will be delivered.
    pub data: &'a [u8],
}

/// A message the spool holds with recipients still to deliver: one just accepted, or one
/// found by recovery. Its content stays on disk ([`Spool::read`]).
#[derive(Debug, Clone)]
pub struct Queued {
    /// Queue ID.
    pub id: QueueId,
    /// Where its record is (what [`Spool::settle`] and [`Spool::finish`] take).
    pub location: Location,
    /// Reverse path.
    pub from: ReversePath,
    /// All recipients, in envelope order.
    pub rcpts: Vec<Mailbox>,
    /// Indexes into `rcpts` not yet finished.
    pub pending: Vec<u32>,
    /// BODY=8BITMIME.
    pub eight_bit: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// The DSN parameters (RFC 3461), if the client gave any.
    pub dsn: Option<Arc<DsnEnvelope>>,
    /// When it arrived.
    pub arrival: SystemTime,
}

impl From<Recovered> for Queued {
    fn from(r: Recovered) -> Self {
        Queued {
            id: r.message.id,
            location: r.location,
            from: r.message.from,
            rcpts: r.message.rcpts,
            pending: r.pending,
            eight_bit: r.message.eight_bit,
            smtputf8: r.message.smtputf8,
            dsn: r.message.dsn,
            arrival: r.message.arrival,
        }
    }
}

/// Why [`Spool::accept`] could not make a message durable: nothing of it will be delivered
/// (a record that was written is withdrawn), so the client must be told to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcceptError {
    /// Writing the record failed (full disk, I/O error, a record too large).
    Write(String),
    /// The write went through but the sync did not.
    Sync(String),
}

impl std::fmt::Display for AcceptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AcceptError::Write(e) => write!(f, "spool write failed: {e}"),
            AcceptError::Sync(e) => write!(f, "{e}"),
        }
    }
}

/// What recovery left for one shard to take over.
#[derive(Debug, Default)]
struct ShardShare {
    segments: Vec<OpenSegment>,
    next_seq: u64,
    messages: Vec<Recovered>,
}

/// The spool directory for the life of the server: holds its lock, and what recovery
/// found until each shard takes its share ([`SpoolDir::shard`]).
pub struct SpoolDir {
    dir: PathBuf,
    shares: Mutex<Vec<Option<ShardShare>>>,
    _lock: SpoolLock,
}

impl SpoolDir {
    /// Locks `dir` (one server per spool), recovers it (torn tails cut, corrupt regions set
    /// aside, finished segments deleted), and splits what is left over `shards`.
    pub fn open(dir: &Path, shards: usize) -> io::Result<SpoolDir> {
        let lock = SpoolLock::acquire(dir)?;
        let shards = shards.max(1);
        control::prepare_shards(dir, shards)?;
        // Streamed messages that were still arriving when the last server stopped: no
        // client was told 250 for them.
        match stream::remove_orphans(dir) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                "spool {}: removed {n} incomplete streamed message(s)",
                dir.display()
            ),
            Err(e) => tracing::warn!(
                "spool {}: cannot remove incomplete streamed messages: {e}",
                dir.display()
            ),
        }
        let report = segment::recover(dir, true).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("spool {}: recovery failed: {e}", dir.display()),
            )
        })?;
        let mut shares: Vec<ShardShare> = (0..shards).map(|_| ShardShare::default()).collect();
        // Segments keep the number of the shard that wrote them; with another shard count
        // they are dealt out round the shards.
        let owner = |shard: u32| shard as usize % shards;
        for (i, share) in shares.iter_mut().enumerate() {
            share.next_seq = report.next_seq.get(&(i as u32)).copied().unwrap_or(0);
        }
        let n_messages = report.messages.len();
        for seg in &report.segments {
            shares[owner(seg.id.shard)].segments.push(*seg);
        }
        for m in report.messages {
            shares[owner(m.location.segment.shard)].messages.push(m);
        }
        tracing::info!(
            "spool {}: {n_messages} message(s) to deliver after recovery ({} torn tail(s) cut, {} corrupt region(s) set aside, {} finished segment(s) deleted)",
            dir.display(),
            report.torn_tails,
            report.corrupt_regions,
            report.deleted
        );
        Ok(SpoolDir {
            dir: dir.to_path_buf(),
            shares: Mutex::new(shares.into_iter().map(Some).collect()),
            _lock: lock,
        })
    }

    /// The spool directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Shard `index`'s spool and the recovered messages it is to deliver, each with what
    /// its records say of its schedule and hold. Call once per shard, on its thread, inside
    /// its runtime: it starts the shard's committer task.
    pub fn shard(
        &self,
        index: usize,
        ab: AbSwitches,
        metrics: Arc<ShardMetrics>,
    ) -> (Spool, Vec<(Queued, DeliveryState)>) {
        let share = self
            .shares
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(index)
            .and_then(Option::take)
            .unwrap_or_default();
        let store = match ShardStore::new(&self.dir, index as u32, share.segments, share.next_seq) {
            Ok(s) => s,
            Err(e) => {
                // The recovered messages stay on disk and are found again at the next
                // start; new mail is still accepted into new segments.
                tracing::error!(
                    shard = index,
                    "cannot reopen recovered segments: {e}; their messages wait for a restart"
                );
                ShardStore::empty(&self.dir, index as u32, share.next_seq)
            }
        };
        let recovered = if store.open_segments() > 0 {
            share
                .messages
                .into_iter()
                .map(|mut r| {
                    let state = std::mem::take(&mut r.state);
                    (Queued::from(r), state)
                })
                .collect()
        } else {
            Vec::new()
        };
        let store = Rc::new(RefCell::new(store));
        let commit = GroupCommit::with_metrics(
            Rc::clone(&store),
            ab.one_sync_per_message,
            ab.commit_window,
            metrics,
        );
        tokio::task::spawn_local(Rc::clone(&commit).run());
        let spool = Spool {
            index,
            dir: self.dir.clone(),
            store,
            commit,
        };
        (spool, recovered)
    }
}

/// One shard's spool: accept, read back, settle, finish.
pub struct Spool {
    index: usize,
    dir: PathBuf,
    store: Rc<RefCell<ShardStore>>,
    commit: Rc<GroupCommit>,
}

impl Spool {
    /// The spool directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Appends a message and waits for the group commit to make it durable; only then may
    /// the client be told 250. On failure nothing of it will ever be delivered: a record
    /// that was written but not synced is withdrawn (the client was not told 250, so a
    /// later recovery must not deliver it behind the client's back).
    pub async fn accept(&self, message: NewMessage<'_>) -> Result<Queued, AcceptError> {
        let appended = self
            .store
            .borrow_mut()
            .append_message(&message_record(&message));
        let location = appended.map_err(|e| AcceptError::Write(e.to_string()))?;
        self.commit_queued(message, location).await
    }

    /// Waits for the group commit to make the message at `location` durable, then hands
    /// it to the queue; a failed sync withdraws its record.
    async fn commit_queued(
        &self,
        message: NewMessage<'_>,
        location: Location,
    ) -> Result<Queued, AcceptError> {
        if let Err(e) = self.commit.durable().await {
            let _ = self
                .store
                .borrow_mut()
                .finish_message(&location, message.id, true);
            return Err(AcceptError::Sync(e));
        }
        Ok(Queued {
            id: message.id,
            location,
            from: message.from,
            pending: (0..message.rcpts.len() as u32).collect(),
            rcpts: message.rcpts,
            eight_bit: message.eight_bit,
            smtputf8: message.smtputf8,
            dsn: message.dsn,
            arrival: message.arrival,
        })
    }

    /// Starts a streamed message (see [`stream`]): its content is written with
    /// [`StreamedBody::write`] as it arrives, then [`Spool::accept_streamed`] completes it.
    /// `message.data` is ignored; the envelope must be the one given at the end.
    pub fn begin_streamed(&self, message: &NewMessage<'_>) -> io::Result<StreamedBody> {
        let mut store = self.store.borrow_mut();
        let id = store.reserve_segment();
        StreamedBody::create(store.dir(), id, &message_record(message))
    }

    /// Completes a streamed message with its last bytes (`message.data`) and waits for the
    /// group commit, as [`Spool::accept`] does; only then may the client be told 250. On
    /// failure nothing of it will ever be delivered.
    pub async fn accept_streamed(
        &self,
        body: StreamedBody,
        message: NewMessage<'_>,
    ) -> Result<Queued, AcceptError> {
        let (segment, file, len) = body
            .complete(&message_record(&message))
            .map_err(|e| AcceptError::Write(e.to_string()))?;
        self.store.borrow_mut().adopt_streamed(segment, file, len);
        let location = Location {
            segment,
            offset: 0,
            len,
        };
        self.commit_queued(message, location).await
    }

    /// A message's content, read back from its record through the shard's driver
    /// (io_uring on an io_uring shard) and checked.
    pub async fn read(&self, location: &Location) -> io::Result<Bytes> {
        // A descriptor of our own: the store may close the segment while the read runs.
        let file = self.store.borrow().message_file(location)?.try_clone()?;
        let buf = crate::driver::file::read_exact_at(file, location.offset, location.len as usize)
            .await?;
        Ok(segment::decode_message_at(location, buf)?.data)
    }

    /// Records one recipient's outcome. Not synced on its own: a lost outcome record can
    /// only cause a repeated delivery after a crash, never a loss.
    pub fn settle(&self, message: &Queued, index: u32, outcome: RcptOutcome) {
        if let Err(e) =
            self.store
                .borrow_mut()
                .record_recipient(&message.location, message.id, index, outcome)
        {
            tracing::warn!(id = %message.id, "cannot record a recipient's outcome: {e}");
        }
    }

    /// Records that an attempt left the message's recipients pending: the `attempts` the
    /// retry schedule has counted, when the next is due, and the last reply. Written only
    /// when a message is deferred, and not synced on its own: a lost one only means an
    /// earlier attempt after a crash.
    pub fn defer(&self, message: &Queued, attempts: u32, next_attempt: SystemTime, reply: &str) {
        if let Err(e) = self.store.borrow_mut().record_deferral(
            &message.location,
            message.id,
            attempts,
            next_attempt,
            reply,
        ) {
            tracing::warn!(id = %message.id, "cannot record a deferral: {e}");
        }
    }

    /// Records that the message at `location` is on hold (`held`) or released, so a restart
    /// keeps it so. Not synced on its own, like the outcome records.
    pub fn set_held(&self, id: QueueId, location: &Location, held: bool) {
        if let Err(e) = self.store.borrow_mut().record_hold(location, id, held) {
            tracing::warn!(%id, "cannot record a hold or release: {e}");
        }
    }

    /// Every recipient of the message is settled: its segment can go once all of its
    /// messages have.
    pub fn finish(&self, message: &Queued) {
        if let Err(e) = self
            .store
            .borrow_mut()
            .finish_message(&message.location, message.id, false)
        {
            tracing::warn!(id = %message.id, "cannot record completion: {e}");
        }
    }

    /// Takes a message out of the spool at an operator's request: its pending recipients
    /// are recorded as removed, the message as finished.
    pub fn remove(&self, message: &Queued) {
        let mut store = self.store.borrow_mut();
        for &i in &message.pending {
            let _ = store.record_recipient(&message.location, message.id, i, RcptOutcome::Removed);
        }
        let _ = store.finish_message(&message.location, message.id, true);
    }

    /// Lets go of an empty current segment (called on an idle tick, so a quiet spool ends
    /// up with no files).
    pub fn tidy(&self) {
        self.store.borrow_mut().release_idle_current();
    }
}

/// The record of `message` (for a streamed one, its envelope and its last bytes).
fn message_record<'a>(message: &'a NewMessage<'_>) -> MessageRecord<'a> {
    MessageRecord {
        id: message.id,
        arrival: message.arrival,
        from: &message.from,
        rcpts: &message.rcpts,
        eight_bit: message.eight_bit,
        smtputf8: message.smtputf8,
        dsn: message.dsn.as_deref(),
        data: message.data,
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let s = self.commit.stats();
        if s.syncs > 0 {
            tracing::info!(
                shard = self.index,
                "spool: {} message(s) made durable in {} sync(s) ({:.1} per sync, {:.0} µs each), \
                 {} failed sync(s), {} held open for a commit window ({:.1} ms in all)",
                s.messages,
                s.syncs,
                s.messages as f64 / s.syncs as f64,
                s.synced.as_secs_f64() * 1e6 / s.syncs as f64,
                s.failures,
                s.windows,
                s.waited.as_secs_f64() * 1e3
            );
        }
    }
}
