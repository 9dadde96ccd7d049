//! Listening sockets: one per shard per listen address, all bound to the same port with
//! `SO_REUSEPORT` so the kernel spreads connections over the shards.
//!
//! Sockets are made on the caller's thread before any shard starts, so "address in use"
//! is an immediate, clear error. Because `SO_REUSEPORT` would also let a second instance
//! share our port silently, a plain probe bind (without it) comes first.
//!
//! Which shard gets a connection: the kernel's hash of the 4-tuple, unless (`spread =
//! "local-cpu"`, the default) each shard is pinned to its own CPU. Then
//! [`steer_local_by_cpu`] attaches a classic BPF program that sends connections arriving
//! over the loopback device to the shard on the CPU the client connected from (on
//! loopback the client's own CPU does the receive work), so a local client and its shard
//! share caches and need no cross-CPU wakeup. Connections from the network keep the hash:
//! the CPU a NIC delivers on says little about load (a single-queue NIC delivers
//! everything on one CPU).

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

const BACKLOG: i32 = 1024;

/// Binds `shards` listeners on each address. Returns, per shard, one listener per address,
/// and the addresses actually bound (a port of 0 is resolved once and shared by all shards).
/// Each address's sockets are bound *and listened* in shard order, one after the other:
/// the kernel numbers a reuseport group's sockets in the order they listen, and
/// [`steer_local_by_cpu`] relies on socket `i` being shard `i`. (If a listener closes
/// early, the kernel moves the last one into its place: local clients of that CPU then
/// reach another shard, and none is lost.)
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
    let mut program = local_by_cpu_program(cpus)?;
    let Some(first) = listeners.first() else {
        return Ok(());
    };
    for (done, listener) in first.iter().enumerate() {
        if let Err(e) = attach_reuseport_program(listener, &mut program) {
            // All addresses or none: take it off the ones that have it.
            for listener in &first[..done] {
                detach_reuseport_program(listener);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// The classic BPF program for [`steer_local_by_cpu`]: the shard's index for a connection
/// that arrived over loopback on one of `cpus`, [`USE_HASH`] otherwise. Two instructions
/// per shard; the kernel takes at most `BPF_MAXINSNS` (4096), far more than the 128
/// shards the config allows.
fn local_by_cpu_program(cpus: &[usize]) -> io::Result<Vec<libc::sock_filter>> {
    const LD_ABS_W: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const MAX_INSNS: usize = 4096;
    if 2 * cpus.len() + 5 > MAX_INSNS {
        return Err(io::Error::other(format!(
            "{} shards are too many to steer",
            cpus.len()
        )));
    }
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    // Ancillary loads: offsets into the kernel's SKF_AD_OFF area (negative, as u32).
    let ancillary = |field: libc::c_int| (libc::SKF_AD_OFF + field) as u32;
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
    Ok(p)
}

/// Takes the reuseport program off `listener`'s group again. A failure is ignored: it
/// leaves that address steered, which changes only which of our own shards serves a
/// local client, never whether one does.
fn detach_reuseport_program(listener: &TcpListener) {
    // SO_DETACH_REUSEPORT_BPF (Linux 5.3+) ignores its value.
    let _ = set_socket_option(listener, libc::SO_DETACH_REUSEPORT_BPF, &0 as &libc::c_int);
}

fn attach_reuseport_program(
    listener: &TcpListener,
    program: &mut [libc::sock_filter],
) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| io::Error::other("BPF program too long"))?,
        filter: program.as_mut_ptr(),
    };
    // The kernel copies the instructions `prog` points at during the call and keeps no
    // pointer to them; `program` outlives the call.
    set_socket_option(listener, libc::SO_ATTACH_REUSEPORT_CBPF, &prog)
}

/// `setsockopt(SOL_SOCKET, name, value)` on `listener`.
fn set_socket_option<T>(listener: &TcpListener, name: libc::c_int, value: &T) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt reads size_of::<T>() bytes from `value`, a live reference, during
    // the call; whatever `value` points to (a BPF program) is valid for the call too.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
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

    /// CPUs for the steering tests: two, in reverse order (shard 0 on the second CPU, so a
    /// program that returned the CPU number instead of the shard's index would fail too);
    /// `None`, with the reason printed, where the test cannot run.
    fn two_cpus() -> Option<[usize; 2]> {
        let cpus = crate::driver::allowed_cpus();
        if cpus.len() < 2 {
            eprintln!("skipped: needs two CPUs");
            return None;
        }
        // Receive packet steering on loopback would process a packet on another CPU than
        // its sender's, which these tests assume is the same.
        let rps =
            std::fs::read_to_string("/sys/class/net/lo/queues/rx-0/rps_cpus").unwrap_or_default();
        if rps
            .trim()
            .chars()
            .any(|c| c.is_ascii_hexdigit() && c != '0')
        {
            eprintln!(
                "skipped: receive packet steering is on for lo ({})",
                rps.trim()
            );
            return None;
        }
        Some([cpus[1], cpus[0]])
    }

    /// Connects `rounds` times from each CPU of `order` (on a thread of its own: pinning
    /// is per thread) and counts the connections that reached the shard pinned there.
    fn reached_their_shard(
        listeners: &[Vec<TcpListener>],
        order: [usize; 2],
        target: SocketAddr,
        rounds: usize,
    ) -> Option<usize> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut hits = 0;
                for _ in 0..rounds {
                    for (shard, &cpu) in order.iter().enumerate() {
                        if let Err(e) = crate::driver::pin_to_cpu(cpu) {
                            eprintln!("skipped: cannot pin to CPU {cpu}: {e}");
                            return None;
                        }
                        let _client = std::net::TcpStream::connect(target).unwrap();
                        hits += usize::from(accepted_by(listeners) == shard);
                    }
                }
                Some(hits)
            })
            .join()
            .unwrap()
        })
    }

    #[test]
    fn local_connections_go_to_the_shard_on_their_cpu() {
        let Some(order) = two_cpus() else { return };
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok((shards, bound)) = bind_all(&[addr.parse().unwrap()], 2) else {
                eprintln!("skipped {addr}: cannot bind");
                continue;
            };
            if let Err(e) = steer_local_by_cpu(&shards, &order) {
                eprintln!("skipped {addr}: the kernel refused the program: {e}");
                continue;
            }
            let hits = reached_their_shard(&shards, order, bound[0], 20);
            assert!(matches!(hits, Some(40) | None), "{addr}: {hits:?} of 40");
        }
    }

    #[test]
    fn steering_goes_on_every_address_or_none() {
        let Some(order) = two_cpus() else { return };
        let (mut shards, bound) = bind_all(&["127.0.0.1:0".parse().unwrap()], 2).unwrap();
        // A second "address" whose socket is in no reuseport group: the kernel refuses the
        // program there, and it must come off the first address again.
        shards[0].push(TcpListener::bind("127.0.0.1:0").unwrap());
        assert!(steer_local_by_cpu(&shards, &order).is_err());
        // Back to the hash: 40 connections do not all reach "their" shard (the chance
        // that they would is 2^-40).
        let hits = reached_their_shard(&shards, order, bound[0], 20);
        assert!(hits.is_none_or(|h| h < 40), "still steered: {hits:?} of 40");
        // Too many shards to fit a program is an error, not a silent hash.
        let many: Vec<usize> = (0..3000).collect();
        assert!(local_by_cpu_program(&many).is_err());
        assert_eq!(local_by_cpu_program(&[0, 1]).unwrap().len(), 9);
    }
}
