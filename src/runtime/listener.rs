//! Listening sockets: one per shard per listen address, all bound to the same port with
//! `SO_REUSEPORT` so the kernel spreads connections over the shards.
//!
//! Sockets are made on the caller's thread before any shard starts, so "address in use"
//! is an immediate, clear error. Because `SO_REUSEPORT` would also let a second instance
//! share our port silently, a plain probe bind (without it) comes first.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

const BACKLOG: i32 = 1024;

/// Binds `shards` listeners on each address. Returns, per shard, one listener per address,
/// and the addresses actually bound (a port of 0 is resolved once and shared by all shards).
pub(crate) fn bind_all(
    addrs: &[SocketAddr],
    shards: usize,
) -> io::Result<(Vec<Vec<TcpListener>>, Vec<SocketAddr>)> {
    let mut per_shard: Vec<Vec<TcpListener>> = (0..shards).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for &addr in addrs {
        let mut addr = addr;
        if addr.port() != 0 {
            probe_exclusive(addr)?;
        }
        for shard in per_shard.iter_mut() {
            let listener = bind_one(addr).map_err(|e| context(addr, e))?;
            if addr.port() == 0 {
                addr = listener.local_addr()?;
            }
            shard.push(listener);
        }
        bound.push(addr);
    }
    Ok((per_shard, bound))
}

fn context(addr: SocketAddr, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
}

/// Fails if something already listens on `addr`, even with `SO_REUSEPORT`.
fn probe_exclusive(addr: SocketAddr) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into()).map_err(|e| context(addr, e))?;
    Ok(())
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_is_shared_and_second_bind_refused() {
        let (shards, bound) = bind_all(&["127.0.0.1:0".parse().unwrap()], 3).unwrap();
        assert_eq!(shards.len(), 3);
        let port = bound[0].port();
        assert_ne!(port, 0);
        for s in &shards {
            assert_eq!(s[0].local_addr().unwrap().port(), port);
        }
        let err = bind_all(&bound, 1).unwrap_err();
        assert!(err.to_string().contains("cannot listen on"), "{err}");
    }
}
