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
use crate::server::Handler;

/// Submission queue entries per ring (well under the 32768 the kernel allows).
const RING_ENTRIES: u32 = 1024;

/// Runs one shard on io_uring until it has drained.
pub(crate) fn run<H: Handler>(
    shard_state: impl FnOnce() -> Rc<Shard<H>>,
    listeners: Vec<std::net::TcpListener>,
) -> io::Result<()> {
    let runtime = new_runtime()?;
    runtime.block_on(async move {
        let shard = shard_state();
        let acceptors = listeners.into_iter().map(TcpListener::from_std).collect();
        shard::run::<H, TcpListener>(shard, acceptors).await;
    });
    Ok(())
}

/// A ring with `IORING_SETUP_COOP_TASKRUN` (kernel 5.19+): completions are processed when
/// the thread next enters the kernel instead of by an interrupt, which this thread-per-core
/// design never needs. `RINGRELAY_URING_SETUP=plain` turns it off (for A/B measurements);
/// a kernel that refuses the flag gets a plain ring.
fn new_runtime() -> io::Result<tokio_uring::Runtime> {
    let plain = std::env::var("RINGRELAY_URING_SETUP").is_ok_and(|v| v == "plain");
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
        let _ =
            socket2::SockRef::from(&BorrowedListener(self.as_raw_fd())).shutdown(Shutdown::Both);
    }
}

/// Lends a listener's fd to socket2 for one call.
struct BorrowedListener(std::os::fd::RawFd);

impl std::os::fd::AsFd for BorrowedListener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the fd belongs to a TcpListener the caller borrows for the whole time
        // this value exists (`stop(&self)`), so it is open and not reused meanwhile.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0) }
    }
}

impl Transport for TcpStream {
    async fn read_more(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        let (start, end) = (buf.len(), buf.capacity());
        let (result, slice) = self.read(buf.slice(start..end)).await;
        (result, slice.into_inner())
    }

    async fn send_all(&self, buf: BytesMut) -> (io::Result<()>, BytesMut) {
        self.write_all(buf).await
    }

    fn close_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}
