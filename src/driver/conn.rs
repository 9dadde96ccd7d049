//! One connection's life, the same for both I/O drivers: read bytes into a pooled buffer,
//! hand them to the sans-IO [`Session`], write its replies, await the handler for each
//! finished message, and enforce timeouts and graceful shutdown.
//!
//! A large message's content goes to the handler's [`BodySink`] while it arrives, when the
//! handler offers one (the relay streams it into the spool): the connection then holds
//! about [`crate::smtp::session::STREAM_ABOVE`] of it at a time, whatever its size.
//!
//! Timeouts and shutdown never drop an in-flight read (with io_uring a dropped read keeps
//! running and would swallow the next bytes): the loser of the race is completed by shutting
//! the socket down, which makes the pending read return.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use bytes::{Buf, BytesMut};

use super::caps::ConnectionSlot;
use super::secure::{self, TlsLayer};
use super::shard::{OpenGuard, Shard, ShardHooks};
use super::{ListenerKind, Phase};
use crate::handler::{BodySink, Handler};
use crate::observe::log;
use crate::proxy;
use crate::smtp::{Reply, Session};

/// Read size while reading commands: a command line is at most 512 octets, and idle
/// connections are the common case (10,000 of them fit in ~57 MB RSS with 1 KiB, measured by benches/idle_connections.sh).
const COMMAND_READ: usize = 1024;
/// Read size at the start of DATA; it grows fourfold with each read that fills the
/// buffer, up to [`DATA_READ`], so small messages never need a large buffer and large
/// ones reach full-size reads after three.
const DATA_READ_START: usize = 4 * 1024;
/// Largest read size during DATA.
const DATA_READ: usize = 64 * 1024;
/// A read buffer grown to this or more (by a large message) is swapped for a small pooled
/// one once it is empty again in the command phase, and never pooled: a connection idle
/// after a large message then holds about 1 KiB of buffer, not 64 KiB. Buffers of small
/// messages stay (no allocation per message).
const SHRINK_ABOVE: usize = 4 * DATA_READ_START;

/// A connected stream as the connection loop needs it. Buffers are owned and handed back,
/// which is what io_uring requires and what plain tokio can do too.
pub(crate) trait Transport: 'static {
    /// Reads into the spare capacity of `buf`, after its current content. `Ok(0)` is EOF.
    fn read_more(&self, buf: BytesMut) -> impl Future<Output = (io::Result<usize>, BytesMut)>;
    /// Writes all of `buf`.
    fn send_all(&self, buf: BytesMut) -> impl Future<Output = (io::Result<()>, BytesMut)>;
    /// Shuts both directions down: sends FIN and makes any pending read return.
    fn close_both(&self);
}

/// A listening socket as the accept loop needs it.
pub(crate) trait Acceptor: 'static {
    /// The connection type it yields.
    type Conn: Transport;
    /// Waits for the next connection. Never dropped while pending (see DESIGN.md).
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, SocketAddr)>>;
    /// Stops listening: new connections are refused and a pending accept fails.
    fn stop(&self);
}

/// What ended a wait for input.
enum Wake {
    Read(io::Result<usize>, BytesMut),
    TimedOut,
    ShuttingDown,
}

/// The wait for the current command line (the command timeout runs per line).
struct Line {
    /// When the wait for the current line began.
    start: Instant,
    /// The last read (and any message finished after it) consumed a complete line, so what
    /// remains in the buffer is a new line. Kept beside `start`, which lives for the whole
    /// connection: the connection task then keeps it in one place (a smaller task).
    progressed: bool,
    /// The last wait was within a message's content (DATA, or a BDAT transaction's chunks
    /// and the commands between them).
    in_body: bool,
    /// When that content began: the whole-message deadline counts from here.
    body_start: Instant,
}

/// Serves one accepted connection to the end.
pub(crate) async fn serve<H: Handler, T: Transport>(
    shard: Rc<Shard<H>>,
    io: T,
    peer: SocketAddr,
    slot: ConnectionSlot,
    kind: ListenerKind,
    early: BytesMut,
) {
    // Here rather than in the accept loop: a handler that panics then ends this task, not
    // the shard's accepting. A refusal is written by a task of its own, so this task has no
    // state for it (a smaller task).
    if let Err(reply) = shard.handler.on_connect(peer) {
        super::shard::refuse(&shard, io, reply, Some(slot));
        return;
    }
    let _slot = slot;
    // Also holds the connection's share of the DATA memory budget; gives it back on drop.
    let mut open = shard.connection_opened();
    let mut phase = shard.phase.clone();
    // Boxed: the session is most of the connection task's size, and a smaller task fits a
    // smaller allocator size class (10,000 idle connections).
    let mut session = Box::new(Session::new(shard.session_config(), peer));
    let mut hooks = ShardHooks::new(&shard, peer);
    let mut buf = shard.pool.take();
    // Bytes that came behind a PROXY header, before our greeting.
    buf.extend_from_slice(&early);
    drop(early);
    // One timer for the connection's whole life, re-armed only when it fires early.
    let mut sleep = pin!(tokio::time::sleep(shard.command_timeout.get()));
    // The command timeout runs per command line, not per read (like Postfix's
    // `smtpd_per_record_deadline`): a client that dribbles a line a byte at a time gets no
    // more time than one that sends nothing.
    let mut line = Line {
        start: Instant::now(),
        progressed: false,
        in_body: false,
        body_start: Instant::now(),
    };
    // The current read size during DATA (see DATA_READ_START).
    let mut data_read = DATA_READ_START;
    // The sink taking the content of the message being received, if it is streamed, with
    // the session's serial number of that message.
    let mut sink: Option<(u32, Box<dyn BodySink>)> = None;
    // The TLS layer once the connection runs over TLS (boxed: a plaintext connection's
    // task holds one pointer for it).
    let mut tls: Option<Box<TlsLayer>> = None;
    if kind == ListenerKind::ImplicitTls {
        // RFC 8314: TLS from the first byte; the greeting goes out encrypted.
        match Box::pin(start_tls(&shard, &io, &mut buf, peer)).await {
            Some(layer) => {
                session.tls_started(layer.info());
                tls = Some(layer);
            }
            None => {
                io.close_both();
                shard.pool.give(buf);
                return;
            }
        }
    }
    session.greet();
    loop {
        if session.has_output() {
            let out = session.take_output();
            let out = match tls.as_mut() {
                None => out,
                Some(layer) => match layer.seal(&out) {
                    Ok(sealed) => sealed,
                    Err(_) => break,
                },
            };
            // The write is pinned here rather than inside `send_timed`: one level of
            // future less in every connection's task (and so every idle connection smaller).
            let due = write_due(sleep.as_mut(), shard.command_timeout.get());
            let write = pin!(io.send_all(out));
            if !finish_write(&io, write, sleep.as_mut(), due).await {
                break;
            }
        }
        if session.is_closed() {
            break;
        }
        if session.wants_tls() {
            // CVE-2011-0411: whatever the client sent after STARTTLS, before the
            // handshake, is thrown away, never read as commands inside TLS.
            buf.clear();
            // Boxed, like every rare path: plaintext connections' tasks stay small.
            match Box::pin(start_tls(&shard, &io, &mut buf, peer)).await {
                Some(layer) => {
                    session.tls_started(layer.info());
                    tls = Some(layer);
                    // A command pipelined right behind the client's Finished.
                    let used = session.receive(&buf, SystemTime::now(), &mut hooks);
                    buf.advance(used);
                    continue;
                }
                None => break,
            }
        }
        if let Some(credentials) = session.take_credentials() {
            let user = credentials.user.clone();
            let verdict = match &shard.security {
                Some(security) => Box::pin(security.verify(credentials)).await,
                None => None,
            };
            match &verdict {
                Some(_) => tracing::info!(%peer, user = %user, "authenticated"),
                None => tracing::warn!(%peer, user = %user, "authentication failed"),
            }
            session.auth_result(verdict);
            let used = session.receive(&buf, SystemTime::now(), &mut hooks);
            buf.advance(used);
            continue;
        }
        if let Some(envelope) = session.take_message() {
            // The delivery log's line for it, made only when that log is on.
            let accepted = log::enabled().then(|| Accepted::of(&envelope, session.streamed()));
            let result = match sink.take() {
                // Streamed: the sink has everything before the envelope's last bytes.
                Some((serial, s)) if serial == session.body_serial() => s.finish(envelope).await,
                _ if session.streamed() > 0 => {
                    // Cannot happen (a streamed message keeps its sink); never hand a
                    // handler a message without its beginning.
                    Err(Reply::local_error("message content lost; try again later"))
                }
                // Boxed (one allocation per message): a handler's future would otherwise
                // size every connection's task, idle ones included.
                _ => Box::pin(shard.handler.on_message(envelope)).await,
            };
            if let (Some(a), true) = (accepted, result.is_ok()) {
                a.log(&session);
            }
            session.message_result(result);
            // Commands pipelined behind the message were waiting in the buffer.
            let used = session.receive(&buf, SystemTime::now(), &mut hooks);
            line.progressed |= used > 0 && !session.skipping_long_line();
            buf.advance(used);
            account_data_memory(&shard, &mut session, &mut open);
            continue;
        }
        if sink.is_some() || session.piece_ready() {
            // Boxed: only large messages come here.
            Box::pin(pump_body(&shard, &mut session, &mut sink)).await;
            account_data_memory(&shard, &mut session, &mut open);
            if session.has_output() {
                continue;
            }
        }
        let now_phase = *phase.borrow_and_update();
        if now_phase == Phase::Closing || (now_phase == Phase::Draining && session.is_idle()) {
            session.shutting_down();
            continue;
        }
        let (want, timeout) = if session.in_data() {
            (data_read, shard.data_timeout.get())
        } else {
            if !session.receiving_body() {
                data_read = DATA_READ_START;
            }
            // `try_reclaim` sees the whole allocation (`capacity()` only what follows the
            // read position) and never allocates.
            if buf.is_empty() && buf.try_reclaim(SHRINK_ABOVE) {
                buf = shard.pool.take();
            }
            (COMMAND_READ, shard.command_timeout.get())
        };
        if buf.capacity() - buf.len() < want / 2 {
            buf.reserve(want);
        }
        let offered = buf.capacity() - buf.len();
        let now = Instant::now();
        let in_data = session.in_data();
        let in_body = session.receiving_body();
        if in_body && !line.in_body {
            // A message's content began (DATA, or a first BDAT chunk).
            line.body_start = now;
        }
        line.in_body = in_body;
        let mid_line = !in_data && (!buf.is_empty() || session.skipping_long_line());
        if !in_data && (!mid_line || line.progressed) {
            line.start = now;
        }
        // DATA keeps its per-read timeout (content arrives in arbitrary pieces), and the
        // commands between BDAT chunks their per-line one, both within the deadline of the
        // whole message, however slowly it trickles or however many chunks it takes.
        let per_wait = if in_data {
            now + timeout
        } else {
            line.start + timeout
        };
        let due = if in_body {
            per_wait.min(line.body_start + shard.data_total_timeout.get())
        } else {
            per_wait
        };
        if sleep.deadline() > due {
            // The timeout got shorter (data → command phase): bring the timer forward.
            sleep.as_mut().reset(due);
        }
        // `take` rather than a move: `buf` then needs no drop flag, which the compiler would
        // place badly in the connection task (a smaller task). Over TLS the socket's bytes
        // go to the layer's ciphertext buffer instead.
        let target = match tls.as_mut() {
            None => std::mem::take(&mut buf),
            Some(layer) => {
                layer.reserve(want);
                std::mem::take(&mut layer.raw)
            }
        };
        let mut read = pin!(io.read_more(target));
        let wake = wait_input(read.as_mut(), sleep.as_mut(), &mut phase, &session, due).await;
        // The buffer the read had goes back where it came from.
        let wake = match (wake, tls.as_mut()) {
            (Wake::Read(result, b), Some(layer)) => {
                layer.raw = b;
                match result {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let before = buf.len();
                let mut reply = BytesMut::new();
                let opened = layer.open(&mut buf, &mut reply);
                if !reply.is_empty() {
                    let due = write_due(sleep.as_mut(), shard.command_timeout.get());
                    if !finish_write(&io, pin!(io.send_all(reply)), sleep.as_mut(), due).await {
                        break;
                    }
                }
                if opened.is_err() || (layer.peer_closed() && buf.len() == before) {
                    break;
                }
                if !session.in_data() {
                    layer.shrink();
                }
                Wake::Read(Ok(buf.len() - before), BytesMut::new())
            }
            (wake, _) => wake,
        };
        match wake {
            Wake::Read(Ok(0), b) | Wake::Read(Err(_), b) => {
                if tls.is_none() {
                    buf = b;
                }
                break;
            }
            Wake::Read(Ok(n), b) => {
                if tls.is_none() {
                    buf = b;
                }
                if session.in_data() && n == offered {
                    // The client had more to send than fitted: read more at once next time.
                    data_read = (data_read * 4).min(DATA_READ);
                }
                let used = session.receive(&buf, SystemTime::now(), &mut hooks);
                // Bytes consumed while skipping an over-long line are no progress.
                line.progressed = used > 0 && !session.skipping_long_line();
                buf.advance(used);
                account_data_memory(&shard, &mut session, &mut open);
                if buf.is_empty() {
                    // Lets the next reserve reuse the whole allocation from its start.
                    buf.clear();
                }
            }
            Wake::TimedOut | Wake::ShuttingDown => {
                if matches!(wake, Wake::TimedOut) {
                    session.timed_out();
                } else {
                    session.shutting_down();
                }
                // The read is still pending: write the 421 beside it, then shut the socket
                // down so the read completes, and only then let go of the buffer. Boxed:
                // this rare path would otherwise size every connection's task for a read
                // and a write held at once (and so every idle connection smaller).
                let out = session.take_output();
                let out = match tls.as_mut() {
                    None => out,
                    Some(layer) => layer.seal(&out).unwrap_or_default(),
                };
                Box::pin(send_timed(
                    &io,
                    out,
                    sleep.as_mut(),
                    shard.command_timeout.get(),
                ))
                .await;
                io.close_both();
                let (_, b) = read.await;
                match tls.as_mut() {
                    None => buf = b,
                    Some(layer) => layer.raw = b,
                }
                break;
            }
        }
    }
    io.close_both();
    shard.pool.give(buf);
}

/// What the delivery log says of an accepted message, taken before the handler gets it.
struct Accepted {
    id: crate::id::QueueId,
    helo: Arc<str>,
    ip: std::net::IpAddr,
    from: String,
    size: usize,
    nrcpt: usize,
}

impl Accepted {
    /// `streamed`: content bytes that went to a sink before the envelope's.
    fn of(e: &crate::smtp::Envelope, streamed: u64) -> Box<Accepted> {
        Box::new(Accepted {
            id: e.id,
            helo: Arc::clone(&e.helo),
            ip: e.peer.ip().to_canonical(),
            from: e.from.to_string(),
            size: e.data.len() + streamed as usize,
            nrcpt: e.to.len(),
        })
    }

    fn log(&self, session: &Session) {
        let tls = session.tls().map(|t| t.version);
        log::accepted(&log::Accepted {
            id: self.id,
            helo: &self.helo,
            ip: self.ip,
            from: &self.from,
            size: self.size,
            nrcpt: self.nrcpt,
            tls,
            user: session.authenticated_user(),
        });
    }
}

/// Longest a balancer may take to send its PROXY header (bounded by the command timeout).
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection on a PROXY listener, from a trusted balancer: reads the header first
/// (sending nothing before it: HAProxy's `check-send-proxy` relies on that), then serves
/// the session as the client the header names, whose address also counts against the
/// per-address connection cap. A missing or malformed header closes the connection with
/// nothing processed.
pub(crate) async fn serve_proxied<H: Handler, T: Transport>(
    shard: Rc<Shard<H>>,
    io: T,
    balancer: SocketAddr,
) {
    let header = {
        // Counted as open while the header is awaited, so a shutdown waits for it.
        let _open = shard.connection_opened();
        Box::pin(read_proxy_header(&io, shard.command_timeout.get())).await
    };
    let (header, early) = match header {
        Ok(found) => found,
        Err(why) => {
            tracing::info!(%balancer, "PROXY header refused: {why}; closed");
            io.close_both();
            return;
        }
    };
    let client = header.client_address(balancer);
    if *shard.phase.borrow() != Phase::Running {
        let reply = Reply::shutting_down(&shard.session_config().hostname);
        super::shard::refuse(&shard, io, reply, None);
        return;
    }
    match shard.caps.acquire(client.ip()) {
        Ok(slot) => serve(shard, io, client, slot, ListenerKind::Proxy, early).await,
        Err(which) => {
            tracing::debug!(%client, %balancer, ?which, "connection refused: cap reached");
            let reply = Reply::too_many_connections(&shard.session_config().hostname);
            super::shard::refuse(&shard, io, reply, None);
        }
    }
}

/// Reads a PROXY v1 or v2 header; the bytes after it come back too.
async fn read_proxy_header<T: Transport>(
    io: &T,
    command_timeout: Duration,
) -> Result<(proxy::ProxyHeader, BytesMut), String> {
    let deadline = Instant::now() + command_timeout.min(PROXY_HEADER_TIMEOUT);
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match proxy::parse(&buf) {
            Ok(Some((header, used))) => {
                buf.advance(used);
                return Ok((header, buf));
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        if buf.capacity() - buf.len() < 128 {
            buf.reserve(512);
        }
        let (result, b) = read_until(io, buf, deadline).await;
        buf = b;
        match result {
            Some(Ok(0)) => return Err("closed before a complete header".into()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read failed: {e}")),
            None => return Err("no complete header in time".into()),
        }
    }
}

/// Reads into `buf` until `deadline`; `None` if it ran out (the socket is then shut down,
/// and the read awaited, never dropped in flight).
pub(crate) async fn read_until<T: Transport>(
    io: &T,
    buf: BytesMut,
    deadline: Instant,
) -> (Option<io::Result<usize>>, BytesMut) {
    let mut read = pin!(io.read_more(buf));
    tokio::select! {
        biased;
        (result, b) = read.as_mut() => (Some(result), b),
        _ = tokio::time::sleep_until(deadline) => {
            io.close_both();
            let (_, b) = read.await;
            (None, b)
        }
    }
}

/// The server side of a TLS handshake on `io` (after STARTTLS, or at once on an
/// implicit-TLS listener); `None`, logged, if it fails or TLS is not configured.
async fn start_tls<H: Handler, T: Transport>(
    shard: &Shard<H>,
    io: &T,
    buf: &mut BytesMut,
    peer: SocketAddr,
) -> Option<Box<TlsLayer>> {
    let security = shard.security.as_ref()?;
    match secure::accept_tls(io, security, shard.command_timeout.get(), buf).await {
        Ok(layer) => Some(Box::new(layer)),
        Err(why) => {
            tracing::info!(%peer, "{why}");
            None
        }
    }
}

/// Waits for the pending `read`, the timeout at `due` or a request to shut down, whichever
/// comes first. Its own function so that the connection task holds the wait's state only
/// while waiting (a smaller task).
async fn wait_input<R: Future<Output = (io::Result<usize>, BytesMut)>>(
    mut read: Pin<&mut R>,
    mut sleep: Pin<&mut Sleep>,
    phase: &mut watch::Receiver<Phase>,
    session: &Session,
    due: Instant,
) -> Wake {
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            (result, b) = read.as_mut() => return Wake::Read(result, b),
            _ = sleep.as_mut() => {
                // The timer is armed lazily (once per timeout period, not per read):
                // when it fires, check against when this wait actually began.
                if Instant::now() >= due {
                    return Wake::TimedOut;
                }
                sleep.as_mut().reset(due);
            }
            changed = phase.changed(), if watching => {
                if changed.is_err() {
                    // The server handle is gone: nobody can ask us to stop any more.
                    watching = false;
                    continue;
                }
                let p = *phase.borrow_and_update();
                if p == Phase::Closing || (p == Phase::Draining && session.is_idle()) {
                    return Wake::ShuttingDown;
                }
            }
        }
    }
}

/// Moves the content the session holds to the handler's sink once it has passed the
/// streaming threshold (asking the handler for a sink the first time), and lets go of a
/// sink whose message will not end well (refused, or another message began).
async fn pump_body<H: Handler>(
    shard: &Shard<H>,
    session: &mut Session,
    sink: &mut Option<(u32, Box<dyn BodySink>)>,
) {
    let serial = session.body_serial();
    if sink
        .as_ref()
        .is_some_and(|(s, _)| *s != serial || !session.receiving_body())
    {
        // Dropped unfinished: the handler lets go of what it wrote.
        *sink = None;
    }
    while session.piece_ready() {
        if sink.is_none() {
            let Some(envelope) = session.envelope_so_far() else {
                return;
            };
            match shard.handler.body_sink(&envelope, session.content_so_far()) {
                Some(s) => *sink = Some((serial, s)),
                None => {
                    // The handler wants messages whole: the memory budget bounds them.
                    session.keep_whole();
                    return;
                }
            }
        }
        let piece = session.take_piece();
        let Some((_, s)) = sink.as_mut() else {
            return;
        };
        if let Err(reply) = s.write(piece).await {
            tracing::warn!(peer = %session.peer(), "streamed message refused: {}", reply.one_line());
            session.refuse_data(reply);
            *sink = None;
        }
    }
}

/// Keeps the server's count of memory held by messages being received, and refuses the
/// message (read to its end, then `452 4.3.1`) when it would take the server past its
/// budget: many large messages at once can then never exhaust the machine's memory.
fn account_data_memory<H: Handler>(
    shard: &Shard<H>,
    session: &mut Session,
    open: &mut OpenGuard<H>,
) {
    let now = session.data_memory();
    if open.hold_data(now) {
        return;
    }
    // Between BDAT chunks the message is still being received (and refusable).
    if !session.receiving_body() {
        // The message ended in the read that grew it past the budget: it is the handler's
        // now, too late to refuse, and counts at what it really holds.
        open.hold_data_anyway(now);
        return;
    }
    tracing::warn!(
        peer = %session.peer(),
        "message refused: the DATA memory budget ({} bytes) is in use",
        shard.data_budget.max()
    );
    session.refuse_data_for_memory();
    // Refused, the message holds less than before: giving back always succeeds.
    open.hold_data(session.data_memory());
}

/// Refuses a connection with `reply` (over a cap, or refused by the handler's
/// `on_connect`), then closes it.
pub(crate) async fn refuse<T: Transport>(io: T, reply: Reply, timeout: Duration) {
    let mut out = BytesMut::new();
    reply.write_to(&mut out);
    send(&io, out, timeout).await;
    io.close_both();
}

/// Writes `out` within `timeout` on `sleep`, the connection's own lazy timer: no timer is
/// registered per reply; the shared one is only brought forward when its deadline is
/// later than this write's. A client that stops reading is cut off: the socket is shut
/// down, which ends the pending write. Returns false if the connection is unusable.
async fn send_timed<T: Transport>(
    io: &T,
    out: BytesMut,
    mut sleep: Pin<&mut Sleep>,
    timeout: Duration,
) -> bool {
    if out.is_empty() {
        return true;
    }
    let due = write_due(sleep.as_mut(), timeout);
    finish_write(io, pin!(io.send_all(out)), sleep, due).await
}

/// When a write starting now must be done, with `sleep` brought forward to fire by then.
fn write_due(mut sleep: Pin<&mut Sleep>, timeout: Duration) -> Instant {
    let due = Instant::now() + timeout;
    if sleep.deadline() > due {
        sleep.as_mut().reset(due);
    }
    due
}

/// Waits for `write` until `due` on `sleep` (which fires by then). A client that stops
/// reading is cut off: the socket is shut down, which ends the write. Returns false if the
/// write failed or timed out, so the connection is unusable.
async fn finish_write<T: Transport, F: Future<Output = (io::Result<()>, BytesMut)>>(
    io: &T,
    mut write: Pin<&mut F>,
    mut sleep: Pin<&mut Sleep>,
    due: Instant,
) -> bool {
    loop {
        tokio::select! {
            biased;
            (result, _) = write.as_mut() => return result.is_ok(),
            _ = sleep.as_mut() => {
                if Instant::now() >= due {
                    io.close_both();
                    let _ = write.await;
                    return false;
                }
                sleep.as_mut().reset(due);
            }
        }
    }
}

/// Writes `out` within `timeout`, on a timer of its own (for writes outside a
/// connection's loop). A client that stops reading is cut off: the socket is shut down,
/// which ends the pending write. Returns false if the connection is unusable.
async fn send<T: Transport>(io: &T, out: BytesMut, timeout: Duration) -> bool {
    send_timed(io, out, pin!(tokio::time::sleep(timeout)), timeout).await
}
