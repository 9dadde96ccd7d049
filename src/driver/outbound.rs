//! Outbound sockets on the shard's own driver: a connection to a next hop is made, read
//! and written through io_uring on an io_uring shard, and through tokio's epoll reactor on
//! an epoll shard (or outside any shard, as in unit tests).
//!
//! The rules are the inbound side's (see [`super::conn`]): a read or write that runs out
//! of time is never dropped while in flight (with io_uring a dropped read keeps running and
//! would swallow the next bytes); the socket is shut down instead, which makes the pending
//! operation return, and only then is its buffer taken back.
//!
//! One exception: a connect that times out is dropped. tokio-uring makes the socket inside
//! its connect operation and lends it to no one, so it cannot be shut down; the kernel
//! keeps the half-open socket until its own SYN retries give up (about two minutes), then
//! closes it. Nothing reads from it, so nothing is lost.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};

use super::conn::Transport;
use super::uring::BorrowedSocket;
use super::IoDriver;

thread_local! {
    /// The driver of the shard running on this thread; epoll (plain tokio) elsewhere.
    static CURRENT: Cell<IoDriver> = const { Cell::new(IoDriver::Epoll) };
}

/// Marks this thread as a shard running `driver`: outbound connections made here use it.
pub(crate) fn enter(driver: IoDriver) {
    CURRENT.with(|c| c.set(driver));
}

/// The driver of the shard running on this thread (epoll outside any shard).
pub(crate) fn current_driver() -> IoDriver {
    CURRENT.with(Cell::get)
}

/// Slices per vectored write (well under `IOV_MAX`, 1024 on Linux).
const SLICES: usize = 64;

/// An outbound connection on the shard's driver.
pub enum Stream {
    /// io_uring (tokio-uring).
    Uring(tokio_uring::net::TcpStream),
    /// epoll (tokio).
    Tokio(tokio::net::TcpStream),
}

/// What a timed read or write gave.
#[derive(Debug)]
pub enum Timed<T> {
    /// It finished (successfully or not).
    Done(io::Result<T>),
    /// It ran out of time; the socket has been shut down and is unusable.
    TimedOut,
}

impl Stream {
    /// Connects to `addr` on this thread's driver, with Nagle off (a pipelined command
    /// group is written at once).
    pub async fn connect(addr: SocketAddr) -> io::Result<Stream> {
        match CURRENT.with(Cell::get) {
            IoDriver::Uring => {
                let s = tokio_uring::net::TcpStream::connect(addr).await?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Uring(s))
            }
            IoDriver::Epoll => {
                let s = tokio::net::TcpStream::connect(addr).await?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tokio(s))
            }
        }
    }

    /// Which driver carries it: `"io_uring"` or `"epoll"`.
    pub fn driver(&self) -> &'static str {
        match self {
            Stream::Uring(_) => IoDriver::Uring.name(),
            Stream::Tokio(_) => IoDriver::Epoll.name(),
        }
    }

    /// Without blocking: is the peer still there (no EOF, no unsolicited bytes)? For a
    /// pooled connection about to carry another message.
    pub fn is_alive(&self) -> bool {
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
        let result = match self {
            Stream::Uring(s) => socket2::SockRef::from(&BorrowedSocket(s.as_raw_fd()))
                .recv_with_flags(&mut probe, flags),
            Stream::Tokio(s) => socket2::SockRef::from(s).recv_with_flags(&mut probe, flags),
        };
        matches!(result, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Shuts both directions down: sends FIN and makes any pending operation return.
    pub fn close(&self) {
        match self {
            Stream::Uring(s) => s.close_both(),
            Stream::Tokio(s) => s.close_both(),
        }
    }

    /// Reads into the spare capacity of `buf` within `timeout`. `Done(Ok(0))` is EOF.
    pub async fn read_timed(&self, buf: BytesMut, timeout: Duration) -> (Timed<usize>, BytesMut) {
        match self {
            Stream::Uring(s) => timed(self, s.read_more(buf), timeout).await,
            Stream::Tokio(s) => timed(self, s.read_more(buf), timeout).await,
        }
    }

    /// Writes every chunk within `timeout` (vectored: a pipelined RSET, MAIL, RCPTs and
    /// DATA leave in one segment, and a message's slices go out straight from the spool's
    /// buffer, with no gathering copy). On error or timeout what is left of `chunks` is
    /// unspecified.
    pub async fn send_timed(&self, chunks: &mut VecDeque<Bytes>, timeout: Duration) -> Timed<()> {
        let write = async {
            let result = match self {
                Stream::Uring(s) => send_uring(s, chunks).await,
                Stream::Tokio(s) => send_tokio(s, chunks).await,
            };
            (result, ())
        };
        timed(self, write, timeout).await.0
    }
}

/// Runs `op` for at most `timeout`; when the time is up, shuts the socket down so that the
/// operation returns, and waits for it (it is never dropped in flight).
async fn timed<T, B>(
    stream: &Stream,
    op: impl Future<Output = (io::Result<T>, B)>,
    timeout: Duration,
) -> (Timed<T>, B) {
    let mut op = pin!(op);
    tokio::select! {
        biased;
        (result, b) = op.as_mut() => (Timed::Done(result), b),
        _ = tokio::time::sleep(timeout) => {
            stream.close();
            let (_, b) = op.await;
            (Timed::TimedOut, b)
        }
    }
}

/// Drops what `written` bytes covered from the front of `chunks`; the first chunk left is
/// cut where the write ended.
fn consume(chunks: &mut VecDeque<Bytes>, mut written: usize) {
    while let Some(front) = chunks.front_mut() {
        if written < front.len() {
            front.advance(written);
            return;
        }
        written -= front.len();
        chunks.pop_front();
    }
}

/// `writev` through the ring, up to [`SLICES`] chunks at a time. The ring takes owned
/// buffers, so the chunks (reference-counted, not copied) go in and come back.
async fn send_uring(
    stream: &tokio_uring::net::TcpStream,
    chunks: &mut VecDeque<Bytes>,
) -> io::Result<()> {
    while !chunks.is_empty() {
        let batch: Vec<Bytes> = chunks.iter().take(SLICES).cloned().collect();
        let (result, _) = stream.writev(batch).await;
        match result? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the next hop accepts no more bytes",
                ))
            }
            n => consume(chunks, n),
        }
    }
    Ok(())
}

/// `writev` through tokio's readiness API, up to [`SLICES`] chunks at a time.
async fn send_tokio(
    stream: &tokio::net::TcpStream,
    chunks: &mut VecDeque<Bytes>,
) -> io::Result<()> {
    while !chunks.is_empty() {
        stream.writable().await?;
        let mut slices = [IoSlice::new(&[]); SLICES];
        let mut count = 0;
        for (slot, chunk) in slices.iter_mut().zip(chunks.iter()) {
            *slot = IoSlice::new(chunk);
            count += 1;
        }
        match stream.try_write_vectored(&slices[..count]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the next hop accepts no more bytes",
                ))
            }
            Ok(n) => consume(chunks, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Drop for Stream {
    fn drop(&mut self) {
        // A FIN now, not whenever the descriptor's last ring operation lets go of it.
        if let Stream::Uring(s) = self {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Runs `test` on a runtime of `driver`'s kind, as a shard would.
    fn run_on(driver: IoDriver, test: impl std::future::Future<Output = ()>) {
        match driver {
            IoDriver::Uring => tokio_uring::start(test),
            IoDriver::Epoll => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(test),
        }
    }

    /// Many chunks, more bytes than the socket buffers hold, so writes end mid-chunk:
    /// every byte must still arrive once, in order, on both drivers.
    fn chunks_arrive_whole(driver: IoDriver) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let reader = std::thread::spawn(move || {
            let (mut peer, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            peer.read_to_end(&mut got).expect("read");
            got
        });
        let mut expected = Vec::new();
        let mut chunks = VecDeque::new();
        for i in 0..300u32 {
            // Sizes from 1 byte to ~40 KiB, each chunk a distinct byte pattern.
            let len = 1 + (i as usize * 7919) % 40_000;
            let chunk: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            expected.extend_from_slice(&chunk);
            chunks.push_back(Bytes::from(chunk));
        }
        let run = async move {
            enter(driver);
            let stream = Stream::connect(addr).await.expect("connect");
            assert_eq!(stream.driver(), driver.name());
            match stream
                .send_timed(&mut chunks, Duration::from_secs(30))
                .await
            {
                Timed::Done(r) => r.expect("send"),
                Timed::TimedOut => panic!("timed out"),
            }
            assert!(chunks.is_empty());
            stream.close();
        };
        run_on(driver, run);
        let got = reader.join().expect("reader thread");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived changed or out of order");
    }

    #[test]
    fn chunks_arrive_whole_on_io_uring() {
        chunks_arrive_whole(IoDriver::Uring);
    }

    #[test]
    fn chunks_arrive_whole_on_epoll() {
        chunks_arrive_whole(IoDriver::Epoll);
    }

    /// A silent peer: the read times out, the socket is shut down (the peer sees EOF), and
    /// the buffer comes back; a peer that closed is not alive.
    fn silent_peer_times_out(driver: IoDriver) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut rest = Vec::new();
            // Returns once our side shut down after its timeout.
            s.read_to_end(&mut rest).expect("read");
            let (mut s2, _) = listener.accept().expect("accept 2");
            s2.write_all(b"x").expect("write");
            drop(s2);
            rest.len()
        });
        let run = async move {
            enter(driver);
            let stream = Stream::connect(addr).await.expect("connect");
            assert!(stream.is_alive());
            let (r, buf) = stream
                .read_timed(BytesMut::with_capacity(64), Duration::from_millis(200))
                .await;
            assert!(matches!(r, Timed::TimedOut), "{r:?}");
            assert!(buf.capacity() >= 64, "the buffer comes back");
            // The second connection sends a byte and closes: not fit for reuse.
            let second = Stream::connect(addr).await.expect("connect 2");
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!second.is_alive());
        };
        run_on(driver, run);
        assert_eq!(peer.join().expect("peer"), 0);
    }

    #[test]
    fn silent_peer_times_out_on_io_uring() {
        silent_peer_times_out(IoDriver::Uring);
    }

    #[test]
    fn silent_peer_times_out_on_epoll() {
        silent_peer_times_out(IoDriver::Epoll);
    }
}
