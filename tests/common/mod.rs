//! Shared helpers for the black-box tests, one module per job:
//!
//! - [`server`]: `ringrelay serve` as a child process on a free loopback port ([`Opts`],
//!   [`Relay`], killed on drop), signals and its log, other commands run with a deadline
//!   ([`run_bounded`]).
//! - [`smtp`]: the raw SMTP client ([`Client`], [`Reply`]) with bounded reads, the
//!   assertions on replies ([`assert_ehlo`], [`assert_sequence`]), and a whole mail
//!   transaction in one call ([`Client::transaction`], [`send_one`]).
//! - [`peers`]: the relay's next hops and clients: `loadgen sink`/`send` ([`Sink`],
//!   [`SendRun`]; the binary is found next to `ringrelay`, or built once), an in-process
//!   capturing server built on the library API ([`Capture`]), sinks on several loopback
//!   addresses sharing one port for MX routing ([`sinks_sharing_port`], [`mx_delivery`]).
//! - [`spool`]: store and forward's side: `ringrelay queue`, the spool's segment files,
//!   messages the sink can verify ([`verifiable_message`], [`write_manifest`]) and the
//!   fields of a bounce ([`dsn_values`]).
//! - [`python`]: Python next hops: `aiosmtpd` with STARTTLS and AUTH ([`Aiosmtpd`]).
//!
//! This file keeps what all of them share: the host name, timeouts, [`wait_for`],
//! [`jnum`], [`Rng`] and the [`io_tests!`] macro. Everything is re-exported here, so a
//! test says `mod common;` and `use common::*;` (or names what it takes).
//!
//! Every read has a timeout and every wait a deadline, so no test can hang.

// Each test crate includes all of this and uses only part of it.
#![allow(dead_code)]

mod peers;
mod python;
mod server;
mod smtp;
mod spool;

// A test crate that takes nothing from one of them would call its re-export unused.
#[allow(unused_imports)]
pub use self::{peers::*, python::*, server::*, smtp::*, spool::*};

use std::time::{Duration, Instant};

/// The host name every test configuration sets, so replies are predictable.
pub const HOST: &str = "relay.test";

/// How long any single read may block before the test fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a server may take to start listening.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// Generates one `#[test]` per I/O driver for a function `fn name(io: &str)`:
/// `name::uring` and `name::epoll`.
#[macro_export]
macro_rules! io_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn uring() {
                    super::$name("uring");
                }
                #[test]
                fn epoll() {
                    super::$name("epoll");
                }
            }
        )*
    };
}

/// Polls `f` every 50 ms until it gives `Ok`; panics with its last `Err` after `limit`.
#[track_caller]
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not within {limit:?}; last state:\n{last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The number at a dotted path (`"messages.unique"`) of a JSON report.
#[track_caller]
pub fn jnum(v: &serde_json::Value, path: &str) -> u64 {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {path} in {v:#}"))
}

/// A small PRNG (splitmix64): seeded from `RINGRELAY_TEST_SEED` or the clock, and the seed
/// printed, so a failing random schedule can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn seeded(what: &str) -> Rng {
        let seed = std::env::var("RINGRELAY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{what}: seed {seed} (replay with RINGRELAY_TEST_SEED={seed})");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
}
