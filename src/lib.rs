//! # ringrelay
//!
//! An SMTP relay engine for Linux: a sharded thread-per-core runtime on io_uring (with an
//! epoll fallback), a sans-IO SMTP core, and, in later stages, a durable group-commit spool
//! and pooled pipelined delivery. Its ancestor is Perl's Net::SMTP::Server, whose shape it
//! keeps: a [`Server`] accepts connections, each runs one SMTP session, and a [`Handler`]
//! gets each message's [`Envelope`] (FROM, TO, MSG).
//!
//! ## Map
//! - [`smtp`]: the protocol without I/O — commands, paths, replies, the DATA scanner and
//!   the server [`Session`] state machine.
//! - [`server`]: [`Server`], [`Handler`] and [`ServerHandle`], the library API.
//! - `runtime` (private): shards, listeners, the io_uring and epoll drivers, the
//!   connection loop, buffer pools and connection caps.
//! - [`config`]: the TOML configuration and its validation.
//! - [`policy`]: relay access (who may relay where).
//! - [`id`]: queue IDs, unique across shards and restarts.
//! - [`spool`]: the durable spool (segments, group commit, recovery) and the queue.
//! - [`relay`]: store and forward: the relay handler, routing, outbound pools, bounces.
//! - [`sink`]: the `serve --sink` handler, which counts and discards.
#![warn(missing_docs)]

pub mod config;
pub mod id;
pub mod passwd;
pub mod policy;
pub mod proxy;
pub mod relay;
mod runtime;
pub mod server;
pub mod sink;
pub mod smtp;
pub mod spool;
pub mod tls;

pub use config::Config;
pub use runtime::raise_open_file_limit;
/// The CPUs this process may run on, and pinning a thread to one: the shards' own, for
/// tests that connect from a chosen CPU (local connections reach the shard on theirs).
#[doc(hidden)]
pub use runtime::{allowed_cpus, pin_to_cpu};
pub use server::{Handler, Server, ServerHandle};
pub use smtp::{Envelope, Mailbox, Reply, ReversePath, Session};
