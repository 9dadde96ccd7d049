//! Shaping per destination domain, end to end on both I/O drivers, against a next hop in
//! this test that records how many connections are open at once and when each message
//! arrives.
//!
//! 60 messages for `example.test`, shaped with `max_connections = 2`,
//! `max_messages_per_sec = 20` and `max_messages_per_connection = 10`, through a relay of
//! two shards: never more than 2 connections open (server-wide, both shards), at least 6
//! connections in all, none carrying more than 10 messages, and the 60 arrivals spread
//! over at least ~2.5 s (59 intervals of 50 ms make 2.95 s; a lower bound on the schedule,
//! the shaping's own behaviour, not a performance assertion).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

io_tests!(a_shaped_domain_gets_its_connections_and_rate);

#[derive(Default)]
struct Seen {
    open: usize,
    max_open: usize,
    connections: usize,
    /// Messages per connection.
    per_connection: Vec<usize>,
    arrivals: Vec<Instant>,
}

/// A minimal SMTP server (no pipelining, no extensions) recording into `seen`.
fn recording_next_hop(seen: Arc<Mutex<Seen>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || serve(conn, &seen));
        }
    });
    addr
}

fn serve(conn: TcpStream, seen: &Mutex<Seen>) {
    let index = {
        let mut s = seen.lock().unwrap();
        s.open += 1;
        s.max_open = s.max_open.max(s.open);
        s.connections += 1;
        s.per_connection.push(0);
        s.per_connection.len() - 1
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let mut out = conn.try_clone().unwrap();
    let mut lines = BufReader::new(conn);
    let mut line = String::new();
    let mut say = |text: &str| out.write_all(text.as_bytes()).is_ok();
    let _ = say("220 hop.test ESMTP\r\n");
    loop {
        line.clear();
        if lines.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let ok = match verb.as_str() {
            "EHLO" | "HELO" => say("250 hop.test\r\n"),
            "MAIL" | "RCPT" | "RSET" | "NOOP" => say("250 2.0.0 ok\r\n"),
            "DATA" => {
                say("354 go on\r\n");
                loop {
                    line.clear();
                    if lines.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if line == ".\r\n" {
                        break;
                    }
                }
                {
                    let mut s = seen.lock().unwrap();
                    s.arrivals.push(Instant::now());
                    s.per_connection[index] += 1;
                }
                say("250 2.0.0 queued\r\n")
            }
            "QUIT" => {
                say("221 2.0.0 bye\r\n");
                false
            }
            _ => say("500 5.5.2 what\r\n"),
        };
        if !ok {
            break;
        }
    }
    seen.lock().unwrap().open -= 1;
}

fn a_shaped_domain_gets_its_connections_and_rate(io: &str) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let hop = recording_next_hop(Arc::clone(&seen));
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let shaping = "[delivery.shaping.\"example.test\"]\n\
                   max_connections = 2\n\
                   max_messages_per_sec = 20\n\
                   max_messages_per_connection = 10\n";
    let mut relay = Relay::start_with(Opts::relay(
        io,
        &spool,
        &[("example.test", hop)],
        &[1],
        shaping,
    ));
    let sent = SendRun::run(
        relay.addr,
        &["--messages", "60", "--connections", "4"],
        Duration::from_secs(30),
    );
    assert_eq!(sent.code, Some(0), "{}", sent.output);
    assert_eq!(jnum(&sent.json, "messages.accepted"), 60, "{:#}", sent.json);
    if let Err(last) = try_wait_queue_empty(&spool, Duration::from_secs(30)) {
        panic!("not delivered: {last}\nrelay log:\n{}", relay.stderr());
    }
    relay.terminate();
    let s = seen.lock().unwrap();
    assert_eq!(s.arrivals.len(), 60, "every message once");
    assert!(
        s.max_open <= 2,
        "{} connections open at once; max_connections = 2 for the whole server",
        s.max_open
    );
    assert!(
        s.connections >= 6 && s.per_connection.iter().all(|&n| n <= 10),
        "at most 10 messages a connection: {:?}",
        s.per_connection
    );
    let first = *s.arrivals.iter().min().unwrap();
    let last = *s.arrivals.iter().max().unwrap();
    let spread = last.duration_since(first);
    eprintln!(
        "60 messages over {spread:?}, at most {} connections at once, {} in all: {:?}",
        s.max_open, s.connections, s.per_connection
    );
    assert!(
        spread >= Duration::from_millis(2500),
        "60 messages at 20 a second take at least ~2.95 s; took {spread:?}"
    );
}
