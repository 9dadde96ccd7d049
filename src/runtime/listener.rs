//! Listening sockets: one per shard per listen address, all bound to the same port with
//! `SO_REUSEPORT` so the kernel spreads connections over the shards.
//!
//! Sockets are made on the caller's thread before any shard starts, so "address in use"
//! is an immediate, clear error. Because `SO_REUSEPORT` would also let a second instance
//! share our port silently, a plain probe bind (without it) comes first.
//!
//! Which shard gets a connection: by default the kernel's hash of the 4-tuple. When each
//! shard is pinned to its own CPU, [`steer_local_by_cpu`] attaches a classic BPF program
//! that sends connections arriving over the loopback device to the shard on the CPU the
//! client connected from (on loopback the client's own CPU does the receive work), so a
//! local client and its shard share caches and need no cross-CPU wakeup. Connections from
//! the network keep the hash: the CPU a NIC delivers on says little about load (a
//! single-queue NIC delivers everything on one CPU).

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

/// `ifindex` of the loopback device, the same in every network namespace (the kernel's
/// `LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;

/// A BPF return value past the end of any reuseport group: the kernel then falls back to
/// its hash of the 4-tuple.
const USE_HASH: u32 = u32::MAX;

/// Makes connections that arrive over loopback go to the shard pinned to the CPU they
/// arrive on. `listeners[shard]` holds that shard's sockets, one per address, made by
/// [`bind_all`] (which joins them to each address's reuseport group in shard order, so a
/// group's index `i` is shard `i`); `cpus[shard]` is the CPU that shard is pinned to.
/// Steering is an optimisation: if the kernel refuses the program, the hash stays.
pub(crate) fn steer_local_by_cpu(listeners: &[Vec<TcpListener>], cpus: &[usize]) -> io::Result<()> {
    let mut program = local_by_cpu_program(cpus);
    let Some(first) = listeners.first() else {
        return Ok(());
    };
    for listener in first {
        attach_reuseport_program(listener, &mut program)?;
    }
    Ok(())
}

/// The classic BPF program for [`steer_local_by_cpu`]: the shard's index for a connection
/// that arrived over loopback on one of `cpus`, [`USE_HASH`] otherwise. A program over
/// `BPF_MAXINSNS` (4096) would be refused, so past 2,000 shards it is all hash.
fn local_by_cpu_program(cpus: &[usize]) -> Vec<libc::sock_filter> {
    const LD_ABS_W: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    // Ancillary loads: offsets into the kernel's SKF_AD_OFF area (negative, as u32).
    let ancillary = |field: libc::c_int| (libc::SKF_AD_OFF + field) as u32;
    if cpus.len() > 2000 {
        return vec![op(RET_K, 0, 0, USE_HASH)];
    }
    let mut p = vec![
        op(LD_ABS_W, 0, 0, ancillary(libc::SKF_AD_IFINDEX)),
        // Over loopback: go on to the CPU table; otherwise return the hash.
        op(JEQ_K, 1, 0, LOOPBACK_IFINDEX),
        op(RET_K, 0, 0, USE_HASH),
        op(LD_ABS_W, 0, 0, ancillary(libc::SKF_AD_CPU)),
    ];
    for (shard, &cpu) in cpus.iter().enumerate() {
        // On this shard's CPU: return its index; otherwise skip that return.
        p.push(op(JEQ_K, 0, 1, cpu as u32));
        p.push(op(RET_K, 0, 0, shard as u32));
    }
    p.push(op(RET_K, 0, 0, USE_HASH));
    p
}

fn attach_reuseport_program(
    listener: &TcpListener,
    program: &mut [libc::sock_filter],
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| io::Error::other("BPF program too long"))?,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies the
    // instructions during setsockopt and keeps no pointer to them.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

    /// Which of `listeners` holds the connection just made (each is non-blocking).
    fn accepted_by(listeners: &[Vec<TcpListener>]) -> usize {
        for _ in 0..500 {
            for (shard, l) in listeners.iter().enumerate() {
                if l[0].accept().is_ok() {
                    return shard;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("no listener got the connection");
    }

    #[test]
    fn local_connections_go_to_the_shard_on_their_cpu() {
        let cpus = crate::runtime::allowed_cpus();
        if cpus.len() < 2 {
            eprintln!("skipped: needs two CPUs");
            return;
        }
        // Shard 0 on the second CPU and shard 1 on the first, so a program that returned
        // the CPU number instead of the shard's index would fail too.
        let order = [cpus[1], cpus[0]];
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok((shards, bound)) = bind_all(&[addr.parse().unwrap()], 2) else {
                eprintln!("skipped {addr}: cannot bind");
                continue;
            };
            steer_local_by_cpu(&shards, &order).unwrap();
            let target = bound[0];
            // Pinning is per thread: do it on a thread of our own, not the test harness's.
            std::thread::scope(|s| {
                s.spawn(|| {
                    for round in 0..20 {
                        for (shard, &cpu) in order.iter().enumerate() {
                            crate::runtime::pin_to_cpu(cpu);
                            let _client = std::net::TcpStream::connect(target).unwrap();
                            assert_eq!(
                                accepted_by(&shards),
                                shard,
                                "{addr}, round {round}: a connection from CPU {cpu}"
                            );
                        }
                    }
                });
            });
        }
    }
}
