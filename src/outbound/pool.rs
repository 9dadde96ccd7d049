//! Each shard's pool of open outbound connections, per destination address: at most
//! `max_connections_per_destination` per address, shared by every domain whose mail goes
//! there; a connection carries message after message
//! (the client sends RSET between them) and is closed after sitting idle.
//!
//! Outbound sockets are plain tokio sockets on both drivers for now (they work inside the
//! tokio-uring runtime); the protocol is the sans-IO [`Client`].

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
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
            chunks: VecDeque::new(),
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
            while let Some(chunk) = self.client.poll_transmit() {
                self.chunks.push_back(chunk);
            }
            if !self.chunks.is_empty() {
                let write =
                    tokio::time::timeout(timeout, write_chunks(&mut self.stream, &mut self.chunks))
                        .await;
                // After a failed write the rest is never sent: the client is aborted.
                self.chunks.clear();
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

/// Writes every chunk with `writev`, up to 64 at a time: a pipelined RSET, MAIL, RCPTs
/// and DATA leave in one segment, and the message's dot-stuffed slices go out straight
/// from the spool's buffer, with no gathering copy.
async fn write_chunks(stream: &mut TcpStream, chunks: &mut VecDeque<Bytes>) -> io::Result<()> {
    /// Slices per `writev` (well under `IOV_MAX`, 1024 on Linux).
    const SLICES: usize = 64;
    while !chunks.is_empty() {
        let mut slices = [IoSlice::new(&[]); SLICES];
        let mut count = 0;
        for (slot, chunk) in slices.iter_mut().zip(chunks.iter()) {
            *slot = IoSlice::new(chunk);
            count += 1;
        }
        let mut written = stream.write_vectored(&slices[..count]).await?;
        if written == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the next hop accepts no more bytes",
            ));
        }
        // Drop what went out whole; the first chunk left is cut where the write ended.
        while let Some(front) = chunks.front_mut() {
            if written < front.len() {
                front.advance(written);
                break;
            }
            written -= front.len();
            chunks.pop_front();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More chunks than one `writev` takes, and more bytes than the socket buffers hold,
    /// so writes end mid-chunk: every byte must still arrive once, in order.
    #[test]
    fn write_chunks_survives_partial_writes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let reader = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                got
            });
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let mut expected = Vec::new();
            let mut chunks = VecDeque::new();
            for i in 0..300u32 {
                // Sizes from 1 byte to ~40 KiB, each chunk a distinct byte pattern.
                let len = 1 + (i as usize * 7919) % 40_000;
                let chunk: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
                expected.extend_from_slice(&chunk);
                chunks.push_back(Bytes::from(chunk));
            }
            write_chunks(&mut stream, &mut chunks).await.unwrap();
            assert!(chunks.is_empty());
            drop(stream);
            let got = reader.await.unwrap();
            assert_eq!(got.len(), expected.len());
            assert!(got == expected, "bytes arrived changed or out of order");
        });
    }
}
