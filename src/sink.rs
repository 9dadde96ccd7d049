//! The `serve --sink` handler: [`SinkHandler`] accepts, counts and discards every message
//! (the front end alone, like Postfix's smtp-sink, for benchmarks).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::handler::Handler;
use crate::smtp::{Envelope, Reply};

/// Totals over all shards, added once when each shard's handler is dropped.
#[derive(Debug, Default)]
pub struct SinkTotals {
    /// Messages accepted.
    pub messages: AtomicU64,
    /// Bytes accepted (with our Received header).
    pub bytes: AtomicU64,
    /// Recipients accepted.
    pub recipients: AtomicU64,
}

/// Accepts every message and throws it away, counting per shard.
#[derive(Debug)]
pub struct SinkHandler {
    totals: Arc<SinkTotals>,
    messages: Cell<u64>,
    bytes: Cell<u64>,
    recipients: Cell<u64>,
}

impl SinkHandler {
    /// A handler for one shard, adding into `totals` when dropped.
    pub fn new(totals: Arc<SinkTotals>) -> Self {
        SinkHandler {
            totals,
            messages: Cell::new(0),
            bytes: Cell::new(0),
            recipients: Cell::new(0),
        }
    }
}

impl Drop for SinkHandler {
    fn drop(&mut self) {
        self.totals
            .messages
            .fetch_add(self.messages.get(), Ordering::Relaxed);
        self.totals
            .bytes
            .fetch_add(self.bytes.get(), Ordering::Relaxed);
        self.totals
            .recipients
            .fetch_add(self.recipients.get(), Ordering::Relaxed);
    }
}

impl Handler for SinkHandler {
    async fn on_message(&self, envelope: Envelope) -> Result<(), Reply> {
        self.messages.set(self.messages.get() + 1);
        self.bytes
            .set(self.bytes.get() + envelope.data.len() as u64);
        self.recipients
            .set(self.recipients.get() + envelope.to.len() as u64);
        Ok(())
    }
}
