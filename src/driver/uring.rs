//! The io_uring driver: each shard thread runs a `tokio_uring` runtime; accept, read and
//! write go through the ring.
//!
//! tokio-uring reads into a buffer from its start, so reads go into the buffer's spare
//! capacity through a slice, and the returned count is trusted rather than `len()`.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;

use bytes::BytesMut;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpListener, TcpStream};

use super::conn::{Acceptor, Transport};
use super::shard::{self, Shard};
use crate::config::AbSwitches;
use crate::handler::Handler;

/// Submission queue entries per ring (well under the 32768 the kernel allows).
const RING_ENTRIES: u32 = 1024;

/// Runs one shard on io_uring until it has drained.
pub(crate) fn run<H: Handler>(
    shard_state: impl FnOnce() -> Rc<Shard<H>>,
    listeners: Vec<std::net::TcpListener>,
    kinds: &[super::ListenerKind],
    ab: AbSwitches,
) -> io::Result<()> {
    let runtime = new_runtime(ab.plain_ring)?;
    // Outbound connections on the ring too, unless an A/B run asks for tokio's reactor.
    super::outbound::enter(if ab.outbound_tokio {
        super::IoDriver::Epoll
    } else {
        super::IoDriver::Uring
    });
    runtime.block_on(async move {
        let shard = shard_state();
        let acceptors = listeners
            .into_iter()
            .map(TcpListener::from_std)
            .zip(kinds.iter().copied())
            .collect();
        shard::run::<H, TcpListener>(shard, acceptors).await;
    });
    Ok(())
}

/// A ring with `IORING_SETUP_COOP_TASKRUN` (kernel 5.19+): completions are processed when
/// the thread next enters the kernel instead of by an interrupt, which this thread-per-core
/// design never needs. `plain` turns it off (`RINGRELAY_URING_SETUP=plain`, for A/B
/// measurements); a kernel that refuses the flag gets a plain ring.
fn new_runtime(plain: bool) -> io::Result<tokio_uring::Runtime> {
    if !plain {
        let mut flags = tokio_uring::uring_builder();
        flags.setup_coop_taskrun();
        if let Ok(rt) = tokio_uring::Runtime::new(
            tokio_uring::builder()
                .entries(RING_ENTRIES)
                .uring_builder(&flags),
        ) {
            return Ok(rt);
        }
    }
    tokio_uring::Runtime::new(tokio_uring::builder().entries(RING_ENTRIES))
}

impl Acceptor for TcpListener {
    type Conn = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        // Replies are written in one batch per read; Nagle would only add latency.
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }

    fn stop(&self) {
        // shutdown(2) on a listening socket refuses new connections and fails the pending
        // accept, which ends the accept task without dropping its operation.
        let _ = socket2::SockRef::from(&BorrowedSocket(self.as_raw_fd())).shutdown(Shutdown::Both);
    }
}

/// Lends a tokio-uring socket's fd (which has no `AsFd`) to socket2 for one call. Made
/// only from a listener or stream the caller borrows for as long as this value lives.
pub(crate) struct BorrowedSocket(pub(crate) std::os::fd::RawFd);

impl std::os::fd::AsFd for BorrowedSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the fd belongs to a socket the caller borrows for the whole time this
        // value exists (it is made and used within one call on `&self`), so it is open and
        // not reused meanwhile.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0) }
    }
}

impl Transport for TcpStream {
    async fn read_more(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        let (start, end) = (buf.len(), buf.capacity());
        let (result, slice) = self.read(buf.slice(start..end)).await;
        (result, slice.into_inner())
    }

    async fn send_all(&self, mut buf: BytesMut) -> (io::Result<()>, BytesMut) {
        // tokio-uring's `write_all` nests three futures that each keep the buffer; this loop
        // keeps it once, which makes every connection's task smaller.
        let mut sent = 0;
        while sent < buf.len() {
            let (result, slice) = self.write(buf.slice(sent..)).submit().await;
            buf = slice.into_inner();
            match result {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => sent += n,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    fn close_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// One `send_all` far larger than the socket's send buffer: the ring's writes come back
    /// short, and every byte must still arrive, once and in order.
    #[test]
    fn send_all_finishes_short_writes() {
        const LEN: usize = 2 << 20;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let reader = std::thread::spawn(move || {
            let (mut peer, _) = listener.accept().expect("accept");
            let mut got = Vec::with_capacity(LEN);
            peer.read_to_end(&mut got).expect("read");
            got
        });
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        tokio_uring::start(async move {
            let std_stream = std::net::TcpStream::connect(addr).expect("connect");
            socket2::SockRef::from(&std_stream)
                .set_send_buffer_size(16 * 1024)
                .expect("SO_SNDBUF");
            let stream = TcpStream::from_std(std_stream);
            let (result, back) = stream.send_all(BytesMut::from(&sent[..])).await;
            result.expect("send_all");
            assert_eq!(back.len(), LEN, "the buffer comes back whole");
            stream.close_both();
        });
        let got = reader.join().expect("reader thread");
        assert_eq!(got.len(), LEN, "bytes received");
        assert!(got == data, "bytes differ");
    }
}
