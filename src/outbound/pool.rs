//! Each shard's pool of open outbound connections, per destination address: at most
//! `max_connections_per_destination` per address, shared by every domain whose mail goes
//! there; a connection carries message after message
//! (the client sends RSET between them) and is closed after sitting idle.
//!
//! Connections run on the shard's own driver (io_uring, or epoll under the fallback:
//! `driver::outbound::Stream`), with the inbound side's rule for timeouts: an operation that runs out of
//! time is ended by shutting the socket down, never dropped in flight. The protocol is the
//! sans-IO [`Client`].

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::sync::Notify;

use std::net::SocketAddr;

use crate::driver::outbound::{Stream, Timed};
use crate::smtp::client::{Client, ClientEvent};

/// Timeouts and limits of a pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Name sent in EHLO.
    pub helo: String,
    /// Open connections per next hop.
    pub max_per_destination: usize,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
    /// Time to connect and be greeted.
    pub connect_timeout: Duration,
    /// Time to wait for any one reply (or to write).
    pub reply_timeout: Duration,
}

/// One open connection and its protocol state.
pub struct Conn {
    stream: Stream,
    /// The protocol state machine.
    pub client: Client,
    buf: BytesMut,
    /// What the client wants sent, written with one `writev` (no gathering copy); kept
    /// between writes so its allocation is reused.
    chunks: VecDeque<Bytes>,
    last_used: Instant,
}

#[derive(Default)]
struct Destination {
    idle: Vec<Conn>,
    open: usize,
    freed: Rc<Notify>,
}

/// The shard's pool.
pub struct Pool {
    config: PoolConfig,
    destinations: RefCell<HashMap<SocketAddr, Destination>>,
}

impl Pool {
    /// An empty pool.
    pub fn new(config: PoolConfig) -> Self {
        Pool {
            config,
            destinations: RefCell::new(HashMap::new()),
        }
    }

    /// The reply timeout (for the delivery code's own waits).
    pub fn reply_timeout(&self) -> Duration {
        self.config.reply_timeout
    }

    /// A ready connection to `addr`: an idle one, a new one if under the cap, or the next
    /// one freed. Connections are keyed by address, so domains whose mail goes to the
    /// same host share them. `Err` says why none could be made (the caller tries the next
    /// address, or defers).
    pub async fn checkout(&self, addr: SocketAddr) -> Result<Conn, String> {
        loop {
            let freed = {
                let mut dests = self.destinations.borrow_mut();
                let d = dests.entry(addr).or_default();
                while let Some(conn) = d.idle.pop() {
                    if conn.last_used.elapsed() < self.config.idle_timeout && conn.is_alive() {
                        return Ok(conn);
                    }
                    d.open -= 1;
                }
                if d.open < self.config.max_per_destination {
                    d.open += 1;
                    None
                } else {
                    Some(Rc::clone(&d.freed))
                }
            };
            match freed {
                Some(freed) => freed.notified().await,
                None => break,
            }
        }
        let result = self.connect(addr).await;
        if result.is_err() {
            self.release(addr);
        }
        result
    }

    /// Gives a connection back: kept if it can take another message, else closed.
    pub fn checkin(&self, addr: SocketAddr, mut conn: Conn) {
        if conn.client.is_ready() {
            conn.last_used = Instant::now();
            let mut dests = self.destinations.borrow_mut();
            let d = dests.entry(addr).or_default();
            d.idle.push(conn);
            d.freed.notify_one();
        } else {
            self.release(addr);
        }
    }

    /// Closes idle connections past their idle time (politely, with QUIT). Called
    /// periodically by the shard.
    pub fn close_idle(&self) {
        let mut expired = Vec::new();
        for d in self.destinations.borrow_mut().values_mut() {
            let before = d.idle.len();
            let (keep, old): (Vec<Conn>, Vec<Conn>) = d
                .idle
                .drain(..)
                .partition(|c| c.last_used.elapsed() < self.config.idle_timeout);
            d.idle = keep;
            d.open -= before - d.idle.len();
            expired.extend(old);
        }
        for mut conn in expired {
            let timeout = self.config.reply_timeout;
            tokio::task::spawn_local(async move {
                conn.client.quit();
                let _ = tokio::time::timeout(timeout, conn.run_until_event(timeout)).await;
            });
        }
    }

    fn release(&self, addr: SocketAddr) {
        let mut dests = self.destinations.borrow_mut();
        if let Some(d) = dests.get_mut(&addr) {
            d.open = d.open.saturating_sub(1);
            d.freed.notify_one();
        }
    }

    /// Connects and waits for the greeting and the EHLO reply, within the connect
    /// timeout. Only the TCP connect itself is cut off by dropping it (see `Stream`); the
    /// replies are waited for with the socket's own timeout rule.
    async fn connect(&self, addr: SocketAddr) -> Result<Conn, String> {
        let start = Instant::now();
        let stream = tokio::time::timeout(self.config.connect_timeout, Stream::connect(addr))
            .await
            .map_err(|_| format!("timeout connecting to {addr}"))?
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        tracing::trace!("connected to {addr} on {}", stream.driver());
        let mut conn = Conn {
            stream,
            client: Client::new(&self.config.helo),
            buf: BytesMut::with_capacity(4096),
            chunks: VecDeque::new(),
            last_used: Instant::now(),
        };
        // What is left of the connect timeout bounds each wait for the greeting and the
        // EHLO reply.
        let left = self
            .config
            .connect_timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(1));
        match conn.run_until_event(left).await {
            ClientEvent::Ready => Ok(conn),
            ClientEvent::Closed { reason } => Err(format!("{addr}: {reason}")),
            ClientEvent::Delivered(_) => Err(format!("{addr}: unexpected delivery event")),
        }
    }
}

impl Conn {
    /// Without blocking: is the peer still there (no EOF, no unsolicited bytes)?
    fn is_alive(&self) -> bool {
        self.stream.is_alive()
    }

    /// Writes what the client wants sent and reads replies until it reports an event. A
    /// broken or silent peer is reported to the client (`abort`), which then yields its
    /// events too, so this always returns.
    pub async fn run_until_event(&mut self, timeout: Duration) -> ClientEvent {
        loop {
            while let Some(chunk) = self.client.poll_transmit() {
                self.chunks.push_back(chunk);
            }
            if !self.chunks.is_empty() {
                let write = self.stream.send_timed(&mut self.chunks, timeout).await;
                // After a failed write the rest is never sent: the client is aborted.
                self.chunks.clear();
                match write {
                    Timed::Done(Ok(())) => {}
                    Timed::Done(Err(e)) => self.client.abort(&format!("write failed: {e}")),
                    Timed::TimedOut => self.client.abort("timeout writing to the next hop"),
                }
            }
            if let Some(event) = self.client.poll_event() {
                return event;
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            let (read, buf) = self
                .stream
                .read_timed(std::mem::take(&mut self.buf), timeout)
                .await;
            self.buf = buf;
            match read {
                Timed::Done(Ok(0)) => self.client.abort("connection closed by the next hop"),
                Timed::Done(Ok(_)) => {
                    let used = self.client.receive(&self.buf);
                    self.buf.advance(used);
                }
                Timed::Done(Err(e)) => self.client.abort(&format!("read failed: {e}")),
                Timed::TimedOut => self
                    .client
                    .abort("timeout waiting for the next hop's reply"),
            }
        }
    }
}
