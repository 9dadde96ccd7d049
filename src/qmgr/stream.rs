//! The relay's [`BodySink`]: a large message's content goes into its own spool segment
//! while it arrives (`spool::stream`), and the message is accepted — synced by the group
//! commit, then queued — when it ends. Its content is then never held whole in memory on
//! the way in; a delivery reads it back from the spool like any message not kept in memory.

use std::rc::Rc;
use std::time::SystemTime;

use bytes::Bytes;

use super::queue::Entry;
use super::Shard;
use crate::handler::{BodySink, LocalFuture};
use crate::observe::metrics::Rejection;
use crate::smtp::command::BodyType;
use crate::smtp::{Envelope, Reply};
use crate::spool::{NewMessage, StreamedBody};

/// A streamed message on its way into the spool.
pub(crate) struct SpoolSink {
    shard: Rc<Shard>,
    body: StreamedBody,
}

impl SpoolSink {
    /// Starts streaming the message `envelope` begins into the shard's spool; `None` if
    /// the spool cannot take it (the message then stays in memory, within the budget).
    pub(crate) fn open(shard: &Rc<Shard>, envelope: &Envelope) -> Option<SpoolSink> {
        let started = shard.spool.begin_streamed(&new_message(envelope, &[]));
        match started {
            Ok(body) => Some(SpoolSink {
                shard: Rc::clone(shard),
                body,
            }),
            Err(e) => {
                tracing::warn!(shard = shard.index, id = %envelope.id, "cannot stream a message into the spool: {e}");
                None
            }
        }
    }
}

/// The spool's view of `envelope`, with `data` as its content.
fn new_message<'a>(envelope: &Envelope, data: &'a [u8]) -> NewMessage<'a> {
    NewMessage {
        id: envelope.id,
        arrival: SystemTime::now(),
        from: envelope.from.clone(),
        rcpts: envelope.to.clone(),
        eight_bit: envelope.body_type == BodyType::EightBitMime,
        smtputf8: envelope.smtputf8,
        dsn: envelope.dsn.clone(),
        data,
    }
}

impl BodySink for SpoolSink {
    fn write(&mut self, piece: Bytes) -> LocalFuture<'_, Result<(), Reply>> {
        let written = self.body.write(&piece).map_err(|e| {
            self.shard.metrics.reject(Rejection::Spool);
            tracing::warn!(
                shard = self.shard.index,
                "spool write failed while streaming: {e}; answering 451"
            );
            Reply::local_error("cannot write to the spool; try again later")
        });
        Box::pin(std::future::ready(written))
    }

    fn finish(self: Box<Self>, envelope: Envelope) -> LocalFuture<'static, Result<(), Reply>> {
        Box::pin(async move {
            let SpoolSink { shard, body } = *self;
            let accepted = shard
                .spool
                .accept_streamed(body, new_message(&envelope, &envelope.data))
                .await;
            let msg = accepted.map_err(|e| shard.spool_refused(e))?;
            shard.metrics.messages_received.inc();
            // Large by definition: read back from the spool when its turn comes.
            shard.enqueue(Entry::new(msg, None));
            Ok(())
        })
    }
}
