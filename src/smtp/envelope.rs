//! The envelope of one accepted message: what the seed's `Client` yielded as FROM, TO and
//! MSG, plus who sent it, the queue ID it was given, and its SMTPUTF8 and DSN parameters.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use super::command::BodyType;
use super::ext::DsnEnvelope;
use super::path::{Mailbox, ReversePath};
use crate::id::QueueId;

/// One message as received: envelope, content (with our `Received:` header prepended) and
/// the client it came from.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Queue ID, unique across shards and restarts; also in the `Received:` header.
    pub id: QueueId,
    /// The reverse path (`MAIL FROM`); [`ReversePath::Null`] for bounces.
    pub from: ReversePath,
    /// The accepted forward paths (`RCPT TO`), in the order given.
    pub to: Vec<Mailbox>,
    /// The message: headers and body, CRLF line endings, dot-stuffing removed.
    pub data: Bytes,
    /// The client's address.
    pub peer: SocketAddr,
    /// The name the client gave in EHLO or HELO, shared by the messages of one session.
    pub helo: Arc<str>,
    /// The `BODY=` the client declared.
    pub body_type: BodyType,
    /// The client declared SMTPUTF8 (RFC 6531): addresses and headers may be UTF-8.
    pub smtputf8: bool,
    /// The DSN parameters (RFC 3461), when the client gave any.
    pub dsn: Option<Arc<DsnEnvelope>>,
}
