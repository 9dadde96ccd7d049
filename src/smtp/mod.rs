//! The SMTP protocol without I/O (sans-IO): bytes in, replies and events out.
//!
//! Nothing here touches a socket or reads a clock, so every byte of a conversation can be
//! driven and checked from a test, and fuzzed.
//!
//! - [`command`]: one command line to a [`command::Command`].
//! - [`path`]: reverse and forward paths, validated per RFC 5321, and the storage that
//!   keeps a session's handling of them free of allocations.
//! - [`data`]: the DATA scanner (end of message, dot-stuffing, bare CR/LF).
//! - [`session`]: the server state machine that ties them together.
//! - [`client`]: the outbound (delivery) state machine.
//! - [`reply`]: reply codes and text; [`received`]: our trace header;
//!   [`envelope`]: what a finished transaction yields.
//! - [`ext`]: the SMTPUTF8 and DSN envelope parameters (RFC 6531, RFC 3461).
//! - [`auth`]: SASL PLAIN and LOGIN exchanges for SMTP AUTH (RFC 4954, RFC 4616).

pub mod auth;
pub mod client;
pub mod command;
pub mod data;
pub mod envelope;
pub mod ext;
pub mod path;
pub mod received;
pub mod reply;
pub mod session;

pub use envelope::Envelope;
pub use path::{Mailbox, ReversePath};
pub use reply::Reply;
pub use session::{Hooks, Session, SessionConfig};
