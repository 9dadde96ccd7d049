//! Each shard's pool of open outbound connections, per destination address: at most
//! `max_connections_per_destination` per address, shared by every domain whose mail goes
//! there; a connection carries message after message
//! (the client sends RSET between them) and is closed after sitting idle.
//!
//! Outbound sockets are plain tokio sockets on both drivers for now (they work inside the
//! tokio-uring runtime); the protocol is the sans-IO [`Client`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use std::net::SocketAddr;

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
    stream: TcpStream,
    /// The protocol state machine.
    pub client: Client,
    buf: BytesMut,
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
        let result = tokio::time::timeout(self.config.connect_timeout, self.connect(addr))
            .await
            .unwrap_or_else(|_| Err(format!("timeout connecting to {addr}")));
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

    async fn connect(&self, addr: SocketAddr) -> Result<Conn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            stream,
            client: Client::new(&self.config.helo),
            buf: BytesMut::with_capacity(4096),
            last_used: Instant::now(),
        };
        match conn.run_until_event(self.config.reply_timeout).await {
            ClientEvent::Ready => Ok(conn),
            ClientEvent::Closed { reason } => Err(format!("{addr}: {reason}")),
            ClientEvent::Delivered(_) => Err(format!("{addr}: unexpected delivery event")),
        }
    }
}

impl Conn {
    /// Without blocking: is the peer still there (no EOF, no unsolicited bytes)?
    fn is_alive(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Writes what the client wants sent and reads replies until it reports an event. A
    /// broken or silent peer is reported to the client (`abort`), which then yields its
    /// events too, so this always returns.
    pub async fn run_until_event(&mut self, timeout: Duration) -> ClientEvent {
        loop {
            let mut chunks: Vec<Bytes> = Vec::new();
            while let Some(chunk) = self.client.poll_transmit() {
                chunks.push(chunk);
            }
            if !chunks.is_empty() {
                let write =
                    tokio::time::timeout(timeout, write_chunks(&mut self.stream, chunks)).await;
                match write {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => self.client.abort(&format!("write failed: {e}")),
                    Err(_) => self.client.abort("timeout writing to the next hop"),
                }
            }
            if let Some(event) = self.client.poll_event() {
                return event;
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            match tokio::time::timeout(timeout, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => self.client.abort("connection closed by the next hop"),
                Ok(Ok(_)) => {
                    let used = self.client.receive(&self.buf);
                    self.buf.advance(used);
                }
                Ok(Err(e)) => self.client.abort(&format!("read failed: {e}")),
                Err(_) => self
                    .client
                    .abort("timeout waiting for the next hop's reply"),
            }
        }
    }
}

/// Small chunks (commands) are gathered into one write, so a pipelined MAIL, RCPTs and
/// DATA leave in one segment; large data chunks are written as they are (no copy).
async fn write_chunks(stream: &mut TcpStream, chunks: Vec<Bytes>) -> std::io::Result<()> {
    const GATHER: usize = 64 * 1024;
    let total: usize = chunks.iter().map(Bytes::len).sum();
    if total <= GATHER {
        let mut one = BytesMut::with_capacity(total);
        for c in &chunks {
            one.extend_from_slice(c);
        }
        return stream.write_all(&one).await;
    }
    for c in chunks {
        stream.write_all(&c).await?;
    }
    Ok(())
}
