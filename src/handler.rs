//! The [`Handler`] trait: what the inbound side asks of the code that owns the messages
//! (the relay, the sink, or a library user's). It names no runtime and no socket, so the
//! driver depends on it and not on the server's front door.
//!
//! The handler is made once per shard by the factory given to [`crate::Server::start`] and
//! lives on that shard's thread, so it needs no locks (it need not be `Send`).
//!
//! A handler that keeps messages somewhere other than memory may take a large message's
//! content while it arrives ([`Handler::body_sink`], a [`BodySink`]): the server's memory
//! then no longer grows with message size. A handler that just wants the bytes ignores
//! that and gets every message whole in [`Handler::on_message`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;

use crate::config::Config;
use crate::smtp::{Envelope, Mailbox, Reply, ReversePath};

/// What the server asks of you, mirroring the seed's "checks for spammers, ACLs" and "save
/// email to a file, or perform various other actions". Only `on_message` is required.
///
/// The checks run in the middle of protocol processing and must not block; `on_message`
/// is awaited, so it may do I/O.
pub trait Handler: 'static {
    /// A client connected. `Err` sends that reply (use a 421 or 554) and closes.
    fn on_connect(&self, peer: SocketAddr) -> Result<(), Reply> {
        let _ = peer;
        Ok(())
    }

    /// `MAIL FROM`. `Err` is the reply (for example `550 5.7.1 …`).
    fn on_mail(&self, peer: SocketAddr, from: &ReversePath) -> Result<(), Reply> {
        let _ = (peer, from);
        Ok(())
    }

    /// `RCPT TO`, after the relay policy allowed it. `Err` is the reply.
    fn on_rcpt(&self, peer: SocketAddr, to: &Mailbox) -> Result<(), Reply> {
        let _ = (peer, to);
        Ok(())
    }

    /// `DATA`, before the `354`. `Err` refuses the message before its content is sent.
    fn on_data(&self) -> Result<(), Reply> {
        Ok(())
    }

    /// A message (DATA or BDAT) has passed the server's streaming threshold (its first
    /// 256 KiB) and is still arriving: return a sink to take its content from here on, or
    /// `None` (the default) to get it whole in [`Handler::on_message`]. `envelope` is the
    /// transaction so far; its `data` is empty. `head` is the content so far (our
    /// `Received:` header, then usually the whole header section), for a handler whose
    /// choice depends on the headers; the sink gets it too, in its first piece. The sink
    /// gets every byte of the content in order, and then, instead of `on_message`, the
    /// finished envelope with the last bytes ([`BodySink::finish`]). A message that does
    /// not end well (refused, or the client left) is dropped with its sink unfinished.
    fn body_sink(&self, envelope: &Envelope, head: &[u8]) -> Option<Box<dyn BodySink>> {
        let _ = (envelope, head);
        None
    }

    /// A message arrived whole. `Ok` answers `250 2.0.0 Ok: queued as ID`; `Err` sends its
    /// reply. Answer `Ok` only once the message is safe.
    fn on_message(&self, envelope: Envelope) -> impl Future<Output = Result<(), Reply>>;

    /// The configuration was reloaded (SIGHUP): take what applies to new work (the relay:
    /// routes, retry schedule, outbound TLS policy). Called on the shard's own thread.
    fn on_reload(&self, config: &Config) {
        let _ = config;
    }

    /// The shard is stopping and its last session has ended: finish background work (the
    /// relay lets deliveries in flight complete). Bounded by the server: work still going
    /// after a few seconds is dropped with the shard.
    fn on_shutdown(&self) -> impl Future<Output = ()> {
        std::future::ready(())
    }
}

/// A boxed future that stays on the shard's thread.
pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Where a streamed message's content goes while it arrives (see [`Handler::body_sink`]).
/// Dropped without [`BodySink::finish`], the message was not accepted: let go of what was
/// written.
pub trait BodySink {
    /// Takes the next piece of the content (unstuffed, CRLF line endings). `Err` refuses
    /// the message: the rest of it is read and thrown away, and the client gets the reply.
    fn write(&mut self, piece: Bytes) -> LocalFuture<'_, Result<(), Reply>>;

    /// The message ended well: `envelope.data` holds its last bytes (possibly none). As
    /// for [`Handler::on_message`], `Ok` answers `250`, so answer `Ok` only once the whole
    /// message is safe.
    fn finish(self: Box<Self>, envelope: Envelope) -> LocalFuture<'static, Result<(), Reply>>;
}
