//! The durable spool and the queue.
//!
//! - [`record`]: the on-disk record format, with crc32c checksums.
//! - [`store`]: one shard's append-only segment files, recovery, deletion.
//! - [`commit`]: group commit — one `fdatasync` for every message that finished DATA since
//!   the last one (held open a little longer under load); only then is `250` sent.
//! - [`lock`]: one owner per spool directory.
//! - [`inspect`]: `queue list|stats`, read-only.
//! - [`queue`]: what is due for delivery when (in memory; rebuilt from the segments).
//!
//! A `250 2.0.0 Ok: queued as ID` is a promise: by then the message's record is synced.

pub mod commit;
pub mod inspect;
pub mod lock;
pub mod queue;
pub mod record;
pub mod store;
