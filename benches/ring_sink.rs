//! A measuring prototype, not part of the server: the `serve --sink` front end driven by
//! one hand-written io_uring event loop (the `io-uring` crate) instead of the
//! `tokio_uring` runtime. It answers two questions of issue 6 that tokio-uring 0.5 cannot:
//! what registered files and one-submit-per-operation cost or save, and how much of the
//! front end's CPU the async runtime costs (benches/results/LAB_LOG.md §11.8).
//!
//! The SMTP work is the real one: the same sans-IO [`Session`], configuration and reply
//! buffers as `serve --sink`. What the prototype leaves out (and the server pays for):
//! timeouts, graceful shutdown, connection caps and the DATA memory budget. It serves
//! one thread on 127.0.0.1 until killed.
//!
//! usage: `ring_sink --listen 127.0.0.1:PORT` (build with `cargo build --release --bench
//! ring_sink`; `benches/sink_compare.sh` runs it as the `ring-proto*` variants). Switches:
//! - `RING_FILES=fixed`: connections are registered files (`IOSQE_FIXED_FILE`);
//! - `RING_SUBMIT=each`: one `io_uring_enter` per operation instead of one per loop turn;
//! - `RING_SETUP=coop|defer|plain`: `COOP_TASKRUN` (default, as the server),
//!   `SINGLE_ISSUER|DEFER_TASKRUN`, or neither;
//! - `RING_OPS=rw`: `READ`/`WRITE` operations (what tokio-uring 0.5's `TcpStream` uses)
//!   instead of `RECV`/`SEND`;
//! - `RING_RECV=pollfirst`: receives carry `IORING_RECVSEND_POLL_FIRST` (wait for data
//!   before trying, since a request rarely has arrived when the read is queued);
//! - `RING_HOST=tokio`: the loop runs as one task in a tokio current-thread runtime, as a
//!   driver inside the server's shards would have to: it submits without waiting, waits
//!   for completions through tokio's epoll on the ring's fd, and yields to the runtime
//!   whenever its cooperative budget runs out, so that other tasks could run. (Not with `RING_SETUP=defer`, whose
//!   completions are only posted by a thread waiting in `io_uring_enter`.)
//!
//! Run by `cargo bench` without arguments it only says what it is.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Buf, BytesMut};
use io_uring::{opcode, squeue, types, IoUring};
use ringrelay::id::{IdGenerator, QueueId};
use ringrelay::policy::RelayPolicy;
use ringrelay::smtp::{Hooks, Session, SessionConfig};

/// Read sizes, as in the server's connection loop.
const COMMAND_READ: usize = 1024;
const DATA_READ: usize = 64 * 1024;
/// Registered-file table size, and so the most connections at once.
const MAX_CONNS: u32 = 4096;
/// user_data: the low 2 bits say which operation, the rest is the connection's index.
const OP_ACCEPT: u64 = 0;
const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;
/// From the kernel's `io_uring.h` (io-uring 0.6 keeps its copy private).
const IORING_RECVSEND_POLL_FIRST: u16 = 1;

struct SinkHooks(IdGenerator);

impl Hooks for SinkHooks {
    fn queue_id(&mut self) -> QueueId {
        self.0.next_id()
    }
}

/// One connection: its socket, session, read buffer and the reply being written.
struct Conn {
    fd: RawFd,
    session: Box<Session>,
    rbuf: BytesMut,
    out: BytesMut,
}

struct Options {
    fixed_files: bool,
    submit_each: bool,
    read_write: bool,
    poll_first: bool,
}

struct Loop {
    ring: IoUring,
    opts: Options,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    hooks: SinkHooks,
    messages: u64,
}

impl Loop {
    fn push(&mut self, sqe: squeue::Entry) {
        // SAFETY: every buffer a queued operation points into lives in a `Conn` (or, for
        // accept, nowhere) that stays in `conns`, unmoved on the heap and untouched, until
        // that operation's completion has been reaped.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            enter(&self.ring, 0);
        }
        if self.opts.submit_each {
            enter(&self.ring, 0);
        }
    }

    fn target(&self, i: usize) -> Target {
        let c = self.conns[i].as_ref().expect("live connection");
        Target {
            fd: c.fd,
            fixed: self.opts.fixed_files.then_some(i as u32),
            read_write: self.opts.read_write,
            poll_first: self.opts.poll_first,
        }
    }

    /// Moves a connection forward until it waits for the network: a write, a read, or
    /// the end.
    fn drive(&mut self, i: usize) {
        let target = self.target(i);
        let c = self.conns[i].as_mut().expect("live connection");
        loop {
            if c.session.has_output() {
                c.out = c.session.take_output();
                let sqe = target
                    .send(c.out.as_ptr(), c.out.len() as u32)
                    .user_data(((i as u64) << 2) | OP_SEND);
                return self.push(sqe);
            }
            if c.session.is_closed() {
                return self.close(i);
            }
            if let Some(envelope) = c.session.take_message() {
                drop(envelope);
                self.messages += 1;
                c.session.message_result(Ok(()));
                let used = c
                    .session
                    .receive(&c.rbuf, SystemTime::now(), &mut self.hooks);
                c.rbuf.advance(used);
                continue;
            }
            let want = if c.session.in_data() {
                DATA_READ
            } else {
                COMMAND_READ
            };
            if c.rbuf.capacity() - c.rbuf.len() < want / 2 {
                c.rbuf.reserve(want);
            }
            let spare = c.rbuf.spare_capacity_mut();
            let sqe = target
                .recv(spare.as_mut_ptr().cast(), spare.len() as u32)
                .user_data(((i as u64) << 2) | OP_RECV);
            return self.push(sqe);
        }
    }

    fn close(&mut self, i: usize) {
        if let Some(c) = self.conns[i].take() {
            if self.opts.fixed_files {
                if let Err(e) = self.ring.submitter().register_files_update(i as u32, &[-1]) {
                    // The slot would keep the socket open (no FIN): stop rather than mislead.
                    die(&format!("cannot unregister file slot {i}: {e}"));
                }
            }
            // SAFETY: `c.fd` came from accept and is closed exactly once, here; no
            // operation on it is in flight (the connection was waiting for none).
            unsafe { libc::close(c.fd) };
            self.free.push(i);
        }
    }

    fn accepted(&mut self, fd: RawFd, config: &Arc<SessionConfig>) {
        let Some(i) = self.free.pop() else {
            // SAFETY: a fresh fd from accept, closed once.
            unsafe { libc::close(fd) };
            return;
        };
        let one: libc::c_int = 1;
        // SAFETY: a valid socket and a c_int option value of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if self.opts.fixed_files
            && self
                .ring
                .submitter()
                .register_files_update(i as u32, &[fd])
                .is_err()
        {
            // SAFETY: a fresh fd from accept, closed once.
            unsafe { libc::close(fd) };
            self.free.push(i);
            return;
        }
        let peer: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut session = Box::new(Session::new(Arc::clone(config), peer));
        session.greet();
        self.conns[i] = Some(Conn {
            fd,
            session,
            rbuf: BytesMut::with_capacity(COMMAND_READ),
            out: BytesMut::new(),
        });
        self.drive(i);
    }

    fn completed(&mut self, i: usize, op: u64, res: i32) {
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        match op {
            OP_RECV if res > 0 => {
                // SAFETY: the kernel wrote `res` bytes into the spare capacity we passed.
                unsafe { c.rbuf.set_len(c.rbuf.len() + res as usize) };
                let used = c
                    .session
                    .receive(&c.rbuf, SystemTime::now(), &mut self.hooks);
                c.rbuf.advance(used);
                if c.rbuf.is_empty() {
                    c.rbuf.clear();
                }
                self.drive(i);
            }
            OP_SEND if res >= 0 && (res as usize) < c.out.len() => {
                c.out.advance(res as usize);
                let target = self.target(i);
                let c = self.conns[i].as_ref().expect("live connection");
                let sqe = target
                    .send(c.out.as_ptr(), c.out.len() as u32)
                    .user_data(((i as u64) << 2) | OP_SEND);
                self.push(sqe);
            }
            OP_SEND if res >= 0 => self.drive(i),
            _ => self.close(i),
        }
    }
}

/// Where and how a connection's operations are issued.
#[derive(Clone, Copy)]
struct Target {
    fd: RawFd,
    fixed: Option<u32>,
    read_write: bool,
    poll_first: bool,
}

impl Target {
    fn send(self, buf: *const u8, len: u32) -> squeue::Entry {
        match (self.fixed, self.read_write) {
            (None, false) => opcode::Send::new(types::Fd(self.fd), buf, len).build(),
            (Some(i), false) => opcode::Send::new(types::Fixed(i), buf, len).build(),
            (None, true) => opcode::Write::new(types::Fd(self.fd), buf, len).build(),
            (Some(i), true) => opcode::Write::new(types::Fixed(i), buf, len).build(),
        }
    }

    fn recv(self, buf: *mut u8, len: u32) -> squeue::Entry {
        let sqe = match (self.fixed, self.read_write) {
            (None, false) => opcode::Recv::new(types::Fd(self.fd), buf, len).build(),
            (Some(i), false) => opcode::Recv::new(types::Fixed(i), buf, len).build(),
            (None, true) => opcode::Read::new(types::Fd(self.fd), buf, len).build(),
            (Some(i), true) => opcode::Read::new(types::Fixed(i), buf, len).build(),
        };
        if self.poll_first && !self.read_write {
            with_ioprio(sqe, IORING_RECVSEND_POLL_FIRST)
        } else {
            sqe
        }
    }
}

/// Sets an SQE's `ioprio` field, which io-uring 0.6's `Recv` builder does not expose.
fn with_ioprio(sqe: squeue::Entry, ioprio: u16) -> squeue::Entry {
    const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
    // SAFETY: `squeue::Entry` is `repr(C)` around the kernel's 64-byte `io_uring_sqe`, plain
    // data with every bit pattern valid; `ioprio` is the u16 at byte offset 2 (after
    // `opcode: u8` and `flags: u8`) in the kernel's ABI.
    unsafe {
        let mut raw: [u8; 64] = std::mem::transmute(sqe);
        raw[2..4].copy_from_slice(&ioprio.to_ne_bytes());
        std::mem::transmute::<[u8; 64], squeue::Entry>(raw)
    }
}

/// Submits (and waits for `want` completions), retrying when a signal interrupts. Any other
/// failure ends the process at once: returning would drop buffers that operations still
/// in flight point into.
fn enter(ring: &IoUring, want: usize) {
    loop {
        match ring.submit_and_wait(want) {
            Ok(_) => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => die(&format!("io_uring_enter: {e}")),
        }
    }
}

/// Ends the process without unwinding (see [`enter`]).
fn die(why: &str) -> ! {
    eprintln!("ring_sink: {why}");
    std::process::exit(1)
}

fn main() -> std::io::Result<()> {
    // A panic must not unwind: dropping the loop would free buffers the kernel still
    // writes into.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("ring_sink: {info}");
        std::process::abort();
    }));
    let args: Vec<String> = std::env::args().collect();
    let Some(listen) = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|p| args.get(p + 1))
    else {
        println!("ring_sink: a measuring prototype (see benches/ring_sink.rs); run it with --listen ADDR");
        return Ok(());
    };
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| std::io::Error::other(format!("--listen {listen}: {e}")))?;
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let hosted = env("RING_HOST") == "tokio";
    if hosted && env("RING_SETUP") == "defer" {
        die("RING_HOST=tokio cannot run with RING_SETUP=defer");
    }
    let opts = Options {
        fixed_files: env("RING_FILES") == "fixed",
        submit_each: env("RING_SUBMIT") == "each",
        read_write: env("RING_OPS") == "rw",
        poll_first: env("RING_RECV") == "pollfirst",
    };
    if opts.poll_first && opts.read_write {
        die("RING_RECV=pollfirst applies to RECV, not to RING_OPS=rw");
    }
    let mut builder = IoUring::builder();
    match env("RING_SETUP").as_str() {
        "plain" => {}
        "defer" => {
            builder.setup_single_issuer().setup_defer_taskrun();
        }
        _ => {
            builder.setup_coop_taskrun();
        }
    }
    // The registered-file table counts against RLIMIT_NOFILE: lift the soft limit to
    // the hard one.
    let _ = ringrelay::raise_open_file_limit(u64::MAX);
    let ring = builder.build(4096)?;
    if opts.fixed_files {
        ring.submitter().register_files_sparse(MAX_CONNS)?;
    }
    // A killed ring releases its files asynchronously, so the previous run's listener can
    // hold the port for a moment: retry for up to 2 s.
    let mut tries = 0;
    let listener = loop {
        match std::net::TcpListener::bind(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 40 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => break other?,
        }
    };
    let config = Arc::new(SessionConfig::new(
        "ring-proto.localhost".into(),
        36_700_160,
        1000,
        RelayPolicy::new(vec!["127.0.0.0/8".parse().expect("a CIDR")], vec![]),
    ));
    let mut lp = Loop {
        ring,
        opts,
        conns: (0..MAX_CONNS).map(|_| None).collect(),
        free: (0..MAX_CONNS as usize).rev().collect(),
        hooks: SinkHooks(IdGenerator::new(0)),
        messages: 0,
    };
    let accept = opcode::Accept::new(
        types::Fd(listener.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .build()
    .user_data(OP_ACCEPT);
    lp.push(accept.clone());
    let mut done = Vec::with_capacity(256);
    if hosted {
        return hosted_loop(lp, accept, &config, done);
    }
    loop {
        enter(&lp.ring, 1);
        done.clear();
        done.extend(lp.ring.completion().map(|c| (c.user_data(), c.result())));
        lp.dispatch(&done, &accept, &config);
    }
}

impl Loop {
    /// Hands each completion to its connection (or re-arms the accept).
    fn dispatch(
        &mut self,
        done: &[(u64, i32)],
        accept: &squeue::Entry,
        config: &Arc<SessionConfig>,
    ) {
        for &(ud, res) in done {
            let (i, op) = ((ud >> 2) as usize, ud & 3);
            if op == OP_ACCEPT {
                if res >= 0 {
                    self.accepted(res, config);
                } else {
                    // Out of fds, say: do not spin on a failing accept.
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                self.push(accept.clone());
            } else {
                self.completed(i, op, res);
            }
        }
    }
}

/// The ring's fd, for tokio's reactor.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// `RING_HOST=tokio`: the same loop as one task of a tokio current-thread runtime.
fn hosted_loop(
    mut lp: Loop,
    accept: squeue::Entry,
    config: &Arc<SessionConfig>,
    mut done: Vec<(u64, i32)>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        let raw = RingFd(lp.ring.as_raw_fd());
        // SAFETY: the fd is the ring's, which `lp` owns and keeps open for as long as this
        // `AsyncFd` lives (the loop never ends; both go only when the process does).
        let ring_fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(raw, tokio::io::Interest::READABLE)
        }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        loop {
            // No system call when there is nothing to submit (the standalone loop always
            // enters, but it also waits there).
            if !lp.ring.submission().is_empty() {
                enter(&lp.ring, 0);
            }
            done.clear();
            done.extend(lp.ring.completion().map(|c| (c.user_data(), c.result())));
            if done.is_empty() {
                // Nothing yet: wait in tokio's epoll for the ring to post completions.
                let mut ready = ring_fd.readable().await?;
                ready.clear_ready();
                continue;
            }
            lp.dispatch(&done, &accept, config);
            // Let the runtime's other tasks (none here; a shard's spool and relay in a
            // server) run when this task has used its cooperative budget, as tokio's own
            // resources do.
            tokio::task::consume_budget().await;
        }
    })
}
