//! A small authoritative DNS server for tests: UDP and TCP on 127.0.0.1 at a random port,
//! answering from a table of records the test builds and changes while it runs.
//!
//! It is built on hickory-proto's message encoding over `std::net` sockets, in threads of its
//! own, so it works under any async runtime of the code under test (or none). Besides plain
//! answers it can be told to fail on purpose: answer SERVFAIL for a name, or never answer
//! (the resolver times out). Every query is counted by name and type, so a test can check how
//! many queries a cache let through.
//!
//! Answers follow RFC 1034/2308: a name with records of the asked type gets them; a name with
//! only other records gets NOERROR and no answers (NODATA); an unknown name gets NXDOMAIN.
//! Both negative answers carry an SOA in the authority section whose TTL and MINIMUM are the
//! fixture's negative TTL ([`DnsFixture::negative_ttl`], 60 s unless set), so resolvers can
//! cache them. A UDP answer larger than the query allows is sent truncated (TC set), and the
//! full answer is served over TCP on the same port.
//!
//! Use it from an integration test with `mod dnsfix;` (from `tests/*.rs`), or from the
//! library's unit tests with `#[path = "../../tests/dnsfix/mod.rs"] mod dnsfix;`.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// How often the server threads look at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// One record in the table (the owner is the table key).
#[derive(Debug, Clone)]
struct Entry {
    ttl: u32,
    data: RData,
}

#[derive(Debug)]
struct State {
    /// Records by owner name (lower case, no trailing dot).
    records: HashMap<String, Vec<Entry>>,
    servfail: HashSet<String>,
    dropped: HashSet<String>,
    /// Queries by (owner, type mnemonic in upper case).
    counts: HashMap<(String, String), usize>,
    total: usize,
    negative_ttl: u32,
    glue: bool,
}

impl State {
    fn new() -> Self {
        State {
            records: HashMap::new(),
            servfail: HashSet::new(),
            dropped: HashSet::new(),
            counts: HashMap::new(),
            total: 0,
            negative_ttl: 60,
            glue: false,
        }
    }
}

/// The running server. It stops (and its threads end) when dropped.
pub struct DnsFixture {
    /// Where it listens, UDP and TCP: give this to the resolver as its only name server.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsFixture {
    /// Starts a server on 127.0.0.1 at a random port (the same port for UDP and TCP).
    ///
    /// Panics if no port can be bound: a test fixture has nothing better to do.
    pub fn start() -> DnsFixture {
        let (udp, tcp) = bind_pair().expect("dnsfix: cannot bind UDP and TCP on 127.0.0.1");
        let addr = udp.local_addr().expect("dnsfix: local_addr");
        udp.set_read_timeout(Some(POLL))
            .expect("dnsfix: set_read_timeout");
        tcp.set_nonblocking(true).expect("dnsfix: set_nonblocking");
        let state = Arc::new(Mutex::new(State::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vec![
            {
                let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
                std::thread::Builder::new()
                    .name("dnsfix-udp".into())
                    .spawn(move || serve_udp(udp, &state, &stop))
                    .expect("dnsfix: spawn")
            },
            {
                let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
                std::thread::Builder::new()
                    .name("dnsfix-tcp".into())
                    .spawn(move || serve_tcp(tcp, &state, &stop))
                    .expect("dnsfix: spawn")
            },
        ];
        DnsFixture {
            addr,
            state,
            stop,
            threads,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, name: &str, ttl: u32, data: RData) {
        self.state()
            .records
            .entry(key(name))
            .or_default()
            .push(Entry { ttl, data });
    }

    /// Adds an MX record. `exchange` `"."` makes a null MX (RFC 7505).
    pub fn mx(&self, domain: &str, preference: u16, exchange: &str, ttl: u32) {
        let exchange = if key(exchange).is_empty() {
            Name::root()
        } else {
            fqdn(exchange)
        };
        self.add(domain, ttl, RData::MX(MX::new(preference, exchange)));
    }

    /// Adds an A record.
    pub fn a(&self, name: &str, ip: Ipv4Addr, ttl: u32) {
        self.add(name, ttl, RData::A(A(ip)));
    }

    /// Adds an AAAA record.
    pub fn aaaa(&self, name: &str, ip: Ipv6Addr, ttl: u32) {
        self.add(name, ttl, RData::AAAA(AAAA(ip)));
    }

    /// Makes `name` unknown: it loses its records and is answered NXDOMAIN (with an SOA whose
    /// MINIMUM is the negative TTL). Unknown names are answered that way anyway.
    pub fn nxdomain(&self, name: &str) {
        self.state().records.remove(&key(name));
    }

    /// Removes the records of one type (`"MX"`, `"A"`, `"AAAA"`) from `name`; the name stays
    /// known if it has others (then that type gets NODATA).
    pub fn remove(&self, name: &str, rtype: &str) {
        if let Some(list) = self.state().records.get_mut(&key(name)) {
            list.retain(|e| !e.data.record_type().to_string().eq_ignore_ascii_case(rtype));
        }
    }

    /// Sets the TTL and SOA MINIMUM of negative answers (NXDOMAIN and NODATA); 60 by default.
    pub fn negative_ttl(&self, secs: u32) {
        self.state().negative_ttl = secs;
    }

    /// While on, MX answers carry the exchanges' A/AAAA records in the additional section
    /// (glue), as many real servers send them. Off by default.
    pub fn glue(&self, on: bool) {
        self.state().glue = on;
    }

    /// While on, every query for `name` (any type) is answered SERVFAIL.
    pub fn servfail(&self, name: &str, on: bool) {
        let mut s = self.state();
        if on {
            s.servfail.insert(key(name));
        } else {
            s.servfail.remove(&key(name));
        }
    }

    /// While on, queries for `name` (any type) are counted but never answered.
    pub fn drop_queries(&self, name: &str, on: bool) {
        let mut s = self.state();
        if on {
            s.dropped.insert(key(name));
        } else {
            s.dropped.remove(&key(name));
        }
    }

    /// Queries received for `name` and type (`"MX"`, `"A"`, `"AAAA"`…, any case), answered
    /// or not.
    pub fn queries(&self, name: &str, rtype: &str) -> usize {
        self.state()
            .counts
            .get(&(key(name), rtype.to_ascii_uppercase()))
            .copied()
            .unwrap_or(0)
    }

    /// All queries received (including malformed ones).
    pub fn total_queries(&self) -> usize {
        self.state().total
    }

    /// Forgets all records, counters and failure modes; the negative TTL goes back to 60.
    pub fn clear(&self) {
        *self.state() = State::new();
    }
}

impl Drop for DnsFixture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Table key: lower case, without the trailing dot (the root is `""`).
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    let mut n = Name::from_ascii(name).unwrap_or_else(|e| panic!("dnsfix: bad name {name:?}: {e}"));
    n.set_fqdn(true);
    n
}

fn name_key(name: &Name) -> String {
    key(&name.to_ascii())
}

/// A UDP socket and a TCP listener on the same random loopback port.
fn bind_pair() -> io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no port")))
}

fn serve_udp(sock: UdpSocket, state: &Mutex<State>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65535];
    while !stop.load(Ordering::SeqCst) {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(_) => continue, // timeout (to look at the stop flag) or a passing error
        };
        let Some((response, limit)) = respond(&buf[..n], state) else {
            continue;
        };
        let bytes = match response.to_vec() {
            Ok(b) if b.len() <= limit => b,
            Ok(_) => match response.truncate().to_vec() {
                Ok(b) => b,
                Err(_) => continue,
            },
            Err(_) => continue,
        };
        let _ = sock.send_to(&bytes, peer);
    }
}

fn serve_tcp(listener: TcpListener, state: &Arc<Mutex<State>>, stop: &Arc<AtomicBool>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (state, stop) = (Arc::clone(state), Arc::clone(stop));
                if let Ok(t) = std::thread::Builder::new()
                    .name("dnsfix-tcp-conn".into())
                    .spawn(move || serve_tcp_conn(stream, &state, &stop))
                {
                    conns.push(t);
                }
                conns.retain(|t| !t.is_finished());
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
    for t in conns {
        let _ = t.join();
    }
}

fn serve_tcp_conn(mut stream: TcpStream, state: &Mutex<State>, stop: &AtomicBool) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        }
        while pending.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([pending[0], pending[1]]));
            if pending.len() < 2 + len {
                break;
            }
            let frame: Vec<u8> = pending.drain(..2 + len).skip(2).collect();
            let Some((response, _)) = respond(&frame, state) else {
                continue;
            };
            let Ok(bytes) = response.to_vec() else {
                continue;
            };
            let Ok(len) = u16::try_from(bytes.len()) else {
                continue;
            };
            let mut out = len.to_be_bytes().to_vec();
            out.extend_from_slice(&bytes);
            if stream.write_all(&out).is_err() {
                return;
            }
        }
    }
}

/// The answer to one query and the largest UDP answer the client accepts; `None` to stay
/// silent (dropped name, or not a query at all).
fn respond(packet: &[u8], state: &Mutex<State>) -> Option<(Message, usize)> {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    s.total += 1;
    let request = Message::from_vec(packet).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let limit = usize::from(request.max_payload());
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    let query = match (request.metadata.op_code, request.queries.as_slice()) {
        (OpCode::Query, [q]) => q.clone(),
        _ => {
            response.metadata.response_code = ResponseCode::FormErr;
            return Some((response, limit));
        }
    };
    let owner = name_key(&query.name);
    let qtype = query.query_type;
    *s.counts
        .entry((owner.clone(), qtype.to_string().to_ascii_uppercase()))
        .or_default() += 1;
    if s.dropped.contains(&owner) {
        return None;
    }
    response.add_query(query.clone());
    if s.servfail.contains(&owner) {
        response.metadata.response_code = ResponseCode::ServFail;
        return Some((response, limit));
    }
    response.metadata.authoritative = true;
    let Some(entries) = s.records.get(&owner) else {
        response.metadata.response_code = ResponseCode::NXDomain;
        response.add_authority(soa(&query.name, s.negative_ttl));
        return Some((response, limit));
    };
    let matching: Vec<&Entry> = entries
        .iter()
        .filter(|e| qtype == RecordType::ANY || e.data.record_type() == qtype)
        .collect();
    if matching.is_empty() {
        response.add_authority(soa(&query.name, s.negative_ttl));
        return Some((response, limit));
    }
    for e in &matching {
        response.add_answer(Record::from_rdata(
            query.name.clone(),
            e.ttl,
            e.data.clone(),
        ));
    }
    if s.glue {
        for e in &matching {
            let RData::MX(mx) = &e.data else { continue };
            let Some(host) = s.records.get(&name_key(&mx.exchange)) else {
                continue;
            };
            for h in host {
                if matches!(h.data, RData::A(_) | RData::AAAA(_)) {
                    response.add_additional(Record::from_rdata(
                        mx.exchange.clone(),
                        h.ttl,
                        h.data.clone(),
                    ));
                }
            }
        }
    }
    Some((response, limit))
}

/// The SOA for negative answers about `name`: owned by its last label (the "zone").
fn soa(name: &Name, negative_ttl: u32) -> Record {
    let labels = name.num_labels();
    let zone = if labels > 0 {
        name.trim_to(1)
    } else {
        Name::root()
    };
    Record::from_rdata(
        zone,
        negative_ttl,
        RData::SOA(SOA::new(
            fqdn("ns.dnsfix.invalid."),
            fqdn("hostmaster.dnsfix.invalid."),
            1,
            3600,
            600,
            86400,
            negative_ttl,
        )),
    )
}
