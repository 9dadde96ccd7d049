//! Heap allocations of the sans-IO SMTP server session, counted.
//!
//! A counting global allocator (a thin wrapper around the system allocator) tallies
//! allocations per thread. A [`Session`] is driven through its public API the way the
//! connection loop (`src/runtime/conn.rs`) drives it: bytes in with `receive`, replies out
//! with `take_output` (and dropped once "sent"), each finished message taken with
//! `take_message` and answered with `message_result`. After a few warm-up transactions
//! the test counts what each command costs on its own, and what a whole 1 KiB message
//! costs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ringrelay::id::{IdGenerator, QueueId};
use ringrelay::policy::RelayPolicy;
use ringrelay::smtp::{Envelope, Hooks, Mailbox, Reply, ReversePath, Session, SessionConfig};

/// The system allocator, counting every allocation (and reallocation) made by the thread
/// that asks for it.
struct Counting;

thread_local! {
    // `const`-initialised and without a destructor: reading it never allocates, and it
    // can be used from inside the allocator.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: never panic inside the allocator, even while the thread is ending.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees (and the caller's obligations) carry over as they are; counting
// only touches a thread-local `Cell`, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: `ptr` and `layout` came from this allocator, which is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` came from this allocator, which is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this thread while `f` runs.
fn allocations<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ALLOCATIONS.with(Cell::get);
    let out = f();
    (ALLOCATIONS.with(Cell::get) - before, out)
}

/// Hooks like the shard's: queue IDs from a generator, and address checks that look at
/// the addresses (as a handler's `on_mail` / `on_rcpt` would) without allocating.
struct CheckingHooks {
    ids: IdGenerator,
}

impl Hooks for CheckingHooks {
    fn queue_id(&mut self) -> QueueId {
        self.ids.next_id()
    }
    fn check_mail(&mut self, from: &ReversePath) -> Result<(), Reply> {
        match from.mailbox() {
            Some(m) if m.domain() == "refused.test" => Err(Reply::new(550, "5.7.1 no")),
            _ => Ok(()),
        }
    }
    fn check_rcpt(&mut self, to: &Mailbox) -> Result<(), Reply> {
        if to.local_part() == "nobody" {
            return Err(Reply::new(550, "5.1.1 no such user"));
        }
        Ok(())
    }
}

/// What the handler does with each message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Handling {
    /// Drops it at once, as the sink does.
    Drop,
    /// Keeps it (envelope and content), as the relay's in-memory queue does.
    Keep,
}

/// One session and what its "connection loop" holds.
struct Driver {
    session: Session,
    hooks: CheckingHooks,
    now: SystemTime,
    handling: Handling,
    /// Messages a `Keep` handler holds; reserved up front so that keeping one does not
    /// count as an allocation of the session's.
    kept: Vec<Envelope>,
    /// Bytes of replies "sent" so far.
    sent: usize,
}

impl Driver {
    fn new(handling: Handling) -> Self {
        let config = Arc::new(SessionConfig::new(
            "relay.test".into(),
            10 << 20,
            100,
            RelayPolicy::new(
                vec!["127.0.0.0/8".parse().expect("a valid network")],
                vec!["local.test".into()],
            ),
        ));
        let mut session = Session::new(config, "127.0.0.1:40000".parse().expect("an address"));
        session.greet();
        let mut d = Driver {
            session,
            hooks: CheckingHooks {
                ids: IdGenerator::starting_at(0, 1),
            },
            now: UNIX_EPOCH + Duration::from_secs(1_795_293_558),
            handling,
            kept: Vec::with_capacity(1000),
            sent: 0,
        };
        d.flush();
        d
    }

    /// Sends the pending replies: the driver writes them out and drops the buffer.
    fn flush(&mut self) {
        let out = self.session.take_output();
        self.sent += out.len();
        drop(out);
    }

    /// Feeds `input` (which must be consumed whole), handling any finished message the
    /// way the connection loop does; returns the replies' length.
    fn feed(&mut self, input: &[u8]) -> usize {
        let sent = self.sent;
        let mut pos = 0;
        loop {
            pos += self
                .session
                .receive(&input[pos..], self.now, &mut self.hooks);
            self.flush();
            match self.session.take_message() {
                Some(message) => {
                    if self.handling == Handling::Keep {
                        self.kept.push(message);
                    } else {
                        drop(message);
                    }
                    self.session.message_result(Ok(()));
                }
                None => break,
            }
        }
        assert_eq!(pos, input.len(), "all input consumed");
        self.sent - sent
    }

    /// Allocations made while feeding `input`.
    fn count(&mut self, input: &[u8]) -> u64 {
        allocations(|| self.feed(input)).0
    }
}

const EHLO: &[u8] = b"EHLO client.example.org\r\n";
const MAIL: &[u8] = b"MAIL FROM:<sender.name@example.org> SIZE=1400 BODY=8BITMIME\r\n";
const RCPT: &[u8] = b"RCPT TO:<recipient.name@destination.example>\r\n";
const RCPT2: &[u8] = b"RCPT TO:<second@destination.example>\r\n";
const DATA: &[u8] = b"DATA\r\n";
const RSET: &[u8] = b"RSET\r\n";
const NOOP: &[u8] = b"NOOP\r\n";
const QUIT: &[u8] = b"QUIT\r\n";

/// A 1 KiB message (headers and body) and its terminator.
fn content() -> Vec<u8> {
    let mut c = b"From: <sender.name@example.org>\r\nTo: <recipient.name@destination.example>\r\nSubject: counting\r\n\r\n".to_vec();
    while c.len() < 1024 {
        c.extend_from_slice(
            b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n",
        );
    }
    c.extend_from_slice(b".\r\n");
    c
}

/// A whole transaction, one command per read, as a pipelining-free client sends it.
fn transaction(d: &mut Driver, content: &[u8]) {
    for input in [MAIL, RCPT, DATA, content] {
        d.feed(input);
    }
}

/// Per-command and per-message counts for a warmed-up session.
#[derive(Debug)]
struct Counts {
    ehlo: u64,
    mail: u64,
    rcpt: u64,
    rset: u64,
    noop: u64,
    data: u64,
    /// The content and its terminator, through the handler to the `250 … queued as`.
    end_of_data: u64,
    /// MAIL, RCPT, DATA, content and result, one read each.
    message: u64,
    /// The same, all pipelined in one read.
    message_pipelined: u64,
    quit: u64,
}

impl Counts {
    /// Prints the counts, to be quoted.
    fn report(&self, label: &str) {
        eprintln!(
            "allocations, {label}: EHLO {}, MAIL {}, RCPT {}, RSET {}, NOOP {}, DATA {}, \
             content to queued-as {}, QUIT {}; whole 1 KiB message {} (pipelined: {})",
            self.ehlo,
            self.mail,
            self.rcpt,
            self.rset,
            self.noop,
            self.data,
            self.end_of_data,
            self.quit,
            self.message,
            self.message_pipelined
        );
    }
}

fn measure(handling: Handling) -> Counts {
    let content = content();
    let mut d = Driver::new(handling);
    d.feed(EHLO);
    for _ in 0..3 {
        transaction(&mut d, &content);
        d.feed(RSET);
        d.feed(NOOP);
    }
    let ehlo = d.count(EHLO);
    let mail = d.count(MAIL);
    let rcpt = d.count(RCPT);
    let rset = d.count(RSET);
    let noop = d.count(NOOP);
    d.feed(MAIL);
    d.feed(RCPT);
    let data = d.count(DATA);
    let end_of_data = d.count(&content);
    let (message, ()) = allocations(|| transaction(&mut d, &content));
    let mut pipelined = [MAIL, RCPT, DATA].concat();
    pipelined.extend_from_slice(&content);
    let message_pipelined = d.count(&pipelined);
    let quit = d.count(QUIT);
    assert!(d.session.is_closed());
    Counts {
        ehlo,
        mail,
        rcpt,
        rset,
        noop,
        data,
        end_of_data,
        message,
        message_pipelined,
        quit,
    }
}

#[test]
fn allocations_per_command_and_per_message() {
    for handling in [Handling::Drop, Handling::Keep] {
        measure(handling).report(&format!("handler {handling:?}"));
    }
}

/// More recipients must not mean more allocations per message.
#[test]
fn allocations_per_message_by_recipient_count() {
    let content = content();
    let mut d = Driver::new(Handling::Drop);
    d.feed(EHLO);
    let mut many = MAIL.to_vec();
    for _ in 0..10 {
        many.extend_from_slice(RCPT);
        many.extend_from_slice(RCPT2);
    }
    many.extend_from_slice(DATA);
    many.extend_from_slice(&content);
    for _ in 0..3 {
        d.feed(&many);
    }
    let one = allocations(|| transaction(&mut d, &content)).0;
    let twenty = d.count(&many);
    eprintln!("allocations per message: 1 recipient {one}, 20 recipients {twenty}");
}
