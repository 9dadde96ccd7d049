//! The epoll fallback driver: each shard thread runs a current-thread tokio runtime with a
//! `LocalSet`, and the very same connection loop as the io_uring driver.
//!
//! Reads and writes use the readiness API (`readable` + `try_read`) on `&self`, so one
//! stream can have a read pending while a reply is written, as with io_uring.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};

use super::conn::{Acceptor, Transport};
use super::shard::{self, Shard};
use crate::handler::Handler;

/// Runs one shard on plain tokio until it has drained.
pub(crate) fn run<H: Handler>(
    shard_state: impl FnOnce() -> Rc<Shard<H>>,
    listeners: Vec<std::net::TcpListener>,
    kinds: &[super::ListenerKind],
) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    super::outbound::enter(super::IoDriver::Epoll);
    local.block_on(&runtime, async move {
        let shard = shard_state();
        let mut acceptors = Vec::new();
        for (l, &kind) in listeners.into_iter().zip(kinds) {
            // The socket was made non-blocking when bound, as tokio requires.
            acceptors.push((TcpListener::from_std(l)?, kind));
        }
        shard::run::<H, TcpListener>(shard, acceptors).await;
        Ok(())
    })
}

impl Acceptor for TcpListener {
    type Conn = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }

    fn stop(&self) {
        let _ = socket2::SockRef::from(self).shutdown(Shutdown::Both);
    }
}

impl Transport for TcpStream {
    async fn read_more(&self, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        loop {
            if let Err(e) = self.readable().await {
                return (Err(e), buf);
            }
            match self.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return (result, buf),
            }
        }
    }

    async fn send_all(&self, buf: BytesMut) -> (io::Result<()>, BytesMut) {
        let mut sent = 0;
        while sent < buf.len() {
            if let Err(e) = self.writable().await {
                return (Err(e), buf);
            }
            match self.try_write(&buf[sent..]) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    fn close_both(&self) {
        let _ = socket2::SockRef::from(self).shutdown(Shutdown::Both);
    }
}
