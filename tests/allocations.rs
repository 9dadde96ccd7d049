//! Heap allocations of the sans-IO SMTP server session, counted.
//!
//! A counting global allocator (a thin wrapper around the system allocator) tallies
//! allocations per thread. A [`Session`] is driven through its public API the way the
//! connection loop (`src/runtime/conn.rs`) drives it: bytes in with `receive`, replies out
//! with `take_output` (and dropped once "sent"), each finished message taken with
//! `take_message` and answered with `message_result`. After a few warm-up transactions
//! the tests count what each command costs on its own, and what a whole 1 KiB message
//! costs, print the counts (`--nocapture` shows them), and hold the session to them: no
//! allocation for any command, and a small fixed number per message, listed at
//! [`PER_MESSAGE`] and [`PER_KEPT_MESSAGE`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
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
const HELO: &[u8] = b"HELO client.example.org\r\n";
const MAIL: &[u8] = b"MAIL FROM:<sender.name@example.org> SIZE=1400 BODY=8BITMIME\r\n";
const RCPT: &[u8] = b"RCPT TO:<recipient.name@destination.example>\r\n";
const RCPT2: &[u8] = b"RCPT TO:<second@destination.example>\r\n";
const DATA: &[u8] = b"DATA\r\n";
const RSET: &[u8] = b"RSET\r\n";
const NOOP: &[u8] = b"NOOP\r\n";
const QUIT: &[u8] = b"QUIT\r\n";

/// Allocations per message when the handler lets go of each message at once (as the sink
/// does), whatever the number of recipients; both are the envelope's owned parts, made
/// at the end of DATA:
/// 1. one string holding all the envelope's addresses, which its `Mailbox`es share;
/// 2. the envelope's `Vec<Mailbox>` of recipients.
///
/// (The HELO name is shared by the session's messages, and the body buffer comes back to
/// the session when the handler drops the message.)
const PER_MESSAGE: u64 = 2;

/// Allocations per 1 KiB message when the handler keeps every message (as the relay's
/// in-memory queue does), so that the session never gets a body buffer back:
/// 1. and 2. as in [`PER_MESSAGE`];
/// 3. a new body buffer, at DATA (1 KiB to start with);
/// 4. its growth to hold the `Received:` header and 1 KiB of content (a larger message
///    grows it a few more times, doubling);
/// 5. the shared header `bytes` adds when a fresh buffer is first split into a `Bytes`.
const PER_KEPT_MESSAGE: u64 = 5;

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
struct Counts {
    ehlo: u64,
    helo: u64,
    mail: u64,
    rcpt: u64,
    rset: u64,
    noop: u64,
    data: u64,
    /// The content and its terminator: the envelope is made.
    content: u64,
    /// The handler's `Ok` to the `250 … queued as` reply, sent.
    result: u64,
    quit: u64,
    /// MAIL, RCPT, DATA, content and result, one read each.
    message: u64,
    /// The same, pipelined in one read.
    message_pipelined: u64,
}

impl Counts {
    /// Prints the counts, to be quoted.
    fn report(&self, label: &str) {
        eprintln!(
            "allocations, {label}: EHLO {}, HELO {}, MAIL {}, RCPT {}, RSET {}, NOOP {}, \
             DATA {}, content {}, result to queued-as {}, QUIT {}; \
             whole 1 KiB message {} (pipelined: {})",
            self.ehlo,
            self.helo,
            self.mail,
            self.rcpt,
            self.rset,
            self.noop,
            self.data,
            self.content,
            self.result,
            self.quit,
            self.message,
            self.message_pipelined
        );
    }

    /// The commands that never allocate once the session is warm, whatever the handler
    /// does with its messages.
    fn commands(&self) -> [(&'static str, u64); 8] {
        [
            ("EHLO", self.ehlo),
            ("HELO", self.helo),
            ("MAIL", self.mail),
            ("RCPT", self.rcpt),
            ("RSET", self.rset),
            ("NOOP", self.noop),
            ("result to queued-as", self.result),
            ("QUIT", self.quit),
        ]
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
        d.feed(HELO);
        d.feed(EHLO);
    }
    let ehlo = d.count(EHLO);
    let helo = d.count(HELO);
    d.feed(EHLO);
    let mail = d.count(MAIL);
    let rcpt = d.count(RCPT);
    let rset = d.count(RSET);
    let noop = d.count(NOOP);
    d.feed(MAIL);
    d.feed(RCPT);
    let data = d.count(DATA);
    // The content, and then the result, each on its own.
    let (content_count, used) = allocations(|| d.session.receive(&content, d.now, &mut d.hooks));
    assert_eq!(used, content.len());
    let message = d.session.take_message().expect("the message");
    if handling == Handling::Keep {
        d.kept.push(message);
    } else {
        drop(message);
    }
    let (result, ()) = allocations(|| {
        d.session.message_result(Ok(()));
        d.flush();
    });
    let (message, ()) = allocations(|| transaction(&mut d, &content));
    let mut pipelined = [MAIL, RCPT, DATA].concat();
    pipelined.extend_from_slice(&content);
    let message_pipelined = d.count(&pipelined);
    let quit = d.count(QUIT);
    assert!(d.session.is_closed());
    Counts {
        ehlo,
        helo,
        mail,
        rcpt,
        rset,
        noop,
        data,
        content: content_count,
        result,
        quit,
        message,
        message_pipelined,
    }
}

#[test]
fn commands_allocate_nothing_once_the_session_is_warm() {
    for handling in [Handling::Drop, Handling::Keep] {
        let c = measure(handling);
        c.report(&format!("handler {handling:?}"));
        for (command, n) in c.commands() {
            assert_eq!(n, 0, "{command}, handler {handling:?}");
        }
        match handling {
            Handling::Drop => {
                assert_eq!(c.data, 0, "DATA reuses the body buffer that came back");
                assert!(c.content <= PER_MESSAGE, "content: {}", c.content);
                assert!(c.message <= PER_MESSAGE, "message: {}", c.message);
                assert!(c.message_pipelined <= PER_MESSAGE);
            }
            Handling::Keep => {
                assert!(c.data <= 1, "DATA: only a new body buffer, {}", c.data);
                assert!(c.message <= PER_KEPT_MESSAGE, "message: {}", c.message);
                assert!(c.message_pipelined <= PER_KEPT_MESSAGE);
            }
        }
    }
}

#[test]
fn allocations_per_message_do_not_grow_with_recipients() {
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
    assert!(one <= PER_MESSAGE, "1 recipient: {one}");
    assert_eq!(twenty, one, "20 recipients cost what 1 does");
}

/// The counter sees what it should: a test that cannot fail proves nothing.
#[test]
fn the_counter_counts() {
    let (n, v) = allocations(|| black_box(Vec::<u8>::with_capacity(10)));
    assert_eq!(n, 1);
    let (n, _) = allocations(|| black_box(Box::new(v)));
    assert_eq!(n, 1);
}
