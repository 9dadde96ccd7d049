//! # ringrelay
//!
//! An SMTP relay engine for Linux: a sharded thread-per-core runtime on io_uring (with an
//! epoll fallback), a sans-IO SMTP core, a durable group-commit spool, and pooled,
//! pipelined delivery. Its ancestor is Perl's Net::SMTP::Server, whose shape it keeps: a
//! [`Server`] accepts connections, each runs one SMTP session, and a [`Handler`] gets each
//! message's [`Envelope`] (FROM, TO, MSG).
//!
//! A relayed message moves forward only: inbound session → [`spool`] (`Spool::accept`:
//! appended and synced before the 250) → [`qmgr`] (queued, attempted) → [`outbound`]
//! (routed, delivered) → [`spool`] (`Spool::settle`: each recipient's outcome recorded).
//!
//! ## Map
//! - [`smtp`]: the protocol without I/O — commands, paths, replies, the DATA scanner, the
//!   server [`Session`] and the outbound client state machines.
//! - [`handler`]: the [`Handler`] trait, what the inbound side calls, and the [`BodySink`] a
//!   handler may take large messages into while they arrive (the relay streams them to
//!   the spool).
//! - [`server`]: [`Server`] and [`ServerHandle`], the library's front door.
//! - `driver` (private): shards, listeners, the io_uring and epoll drivers, the
//!   connection loop, outbound sockets, buffer pools and connection caps.
//! - [`config`]: the TOML configuration and its validation.
//! - [`policy`]: relay access (who may relay where).
//! - [`id`]: queue IDs, unique across shards and restarts.
//! - [`spool`]: the durable spool's front door (accept, read, settle, finish, recover)
//!   over its records, segments, streamed messages, group commit and lock; `queue`
//!   command support.
//! - [`qmgr`]: the queue manager: the relay's handler, the queue, the delivery worker and
//!   the attempt (outcomes to the spool, deferrals, bounces).
//! - [`outbound`]: routing (static routes, smarthost, MX), DNS, connection pools and
//!   bounce messages.
//! - [`dkim`]: DKIM signing keys (`[dkim."domain"]`) and the signing of accepted mail
//!   whose `From:` domain has one, off the shard's thread.
//! - [`sink`]: the `serve --sink` handler, which counts and discards.
//! - [`observe`]: Prometheus metrics, their `/metrics` endpoint, and the delivery log.
//! - [`tls`]: sans-IO TLS over our own buffers (rustls), for inbound and outbound;
//!   [`proxy`]: PROXY protocol v1/v2 headers; [`passwd`]: the AUTH users file and its
//!   password hashes. (Built and unit-tested; not yet wired into the server.)
#![warn(missing_docs)]

pub mod config;
pub mod dkim;
mod driver;
pub mod handler;
pub mod id;
pub mod observe;
pub mod outbound;
pub mod passwd;
pub mod policy;
pub mod proxy;
pub mod qmgr;
pub mod server;
pub mod sink;
pub mod smtp;
pub mod spool;
pub mod tls;

pub use config::Config;
pub use driver::raise_open_file_limit;
/// The CPUs this process may run on, and pinning a thread to one: the shards' own, for
/// tests that connect from a chosen CPU (local connections reach the shard on theirs).
#[doc(hidden)]
pub use driver::{allowed_cpus, pin_to_cpu};
pub use handler::{BodySink, Handler};
pub use server::{Server, ServerHandle};
pub use smtp::{Envelope, Mailbox, Reply, ReversePath, Session};
