//! The library API in-process, on both I/O drivers: `Server::new(config).start(factory)`
//! with a `Handler` whose `on_connect`, `on_mail` and `on_rcpt` refuse chosen values with
//! custom replies (sanitised on the wire), and whose `on_message` records every `Envelope`
//! and refuses one sender's content. Checks the replies clients see, the envelopes
//! (from, to, queue ID, HELO, peer, content with our `Received:` header and dot-stuffing
//! removed), and that `shutdown()` sends idle sessions `421` and `join()` returns. A handler
//! that panics in `on_connect` loses that one connection; the shard goes on accepting. One
//! that panics while storing a message gives that message's share of the DATA memory
//! budget back.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::{message, Client, DEFAULT_MAX_SIZE, HOST};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport, Transport};
use ringrelay::config::IoMode;
use ringrelay::{Config, Envelope, Handler, Mailbox, Reply, ReversePath, Server, ServerHandle};

io_tests!(
    handler_decides_and_records,
    a_panicking_handler_costs_one_connection,
    a_handler_panicking_on_a_message_gives_its_memory_back
);

type Seen = Arc<Mutex<Vec<(usize, Envelope)>>>;

struct Recorder {
    shard: usize,
    seen: Seen,
    refuse_connections: Arc<AtomicBool>,
}

impl Handler for Recorder {
    fn on_connect(&self, _peer: SocketAddr) -> Result<(), Reply> {
        if self.refuse_connections.load(Ordering::SeqCst) {
            return Err(Reply::new(554, "5.7.1 no connections now"));
        }
        Ok(())
    }

    fn on_mail(&self, _peer: SocketAddr, from: &ReversePath) -> Result<(), Reply> {
        match from.mailbox() {
            Some(m) if m.domain().eq_ignore_ascii_case("spam.test") => {
                Err(Reply::new(550, "5.7.1 sender spam.test refused"))
            }
            _ => Ok(()),
        }
    }

    fn on_rcpt(&self, _peer: SocketAddr, to: &Mailbox) -> Result<(), Reply> {
        match to.local_part() {
            "nobody" => Err(Reply::new(550, "5.1.1 no such user here")),
            // A careless handler: its line break must not reach the wire as one.
            "inject" => Err(Reply::new(550, "5.1.1 no\r\n250 2.1.5 yes")),
            _ => Ok(()),
        }
    }

    async fn on_message(&self, envelope: Envelope) -> Result<(), Reply> {
        let refuse = envelope
            .from
            .mailbox()
            .is_some_and(|m| m.as_str() == "refused@example.org");
        self.seen.lock().unwrap().push((self.shard, envelope));
        if refuse {
            Err(Reply::new(554, "5.6.0 content refused by handler"))
        } else {
            Ok(())
        }
    }
}

fn handler_decides_and_records(io: &str) {
    let io_mode = if io == "uring" {
        IoMode::Uring
    } else {
        IoMode::Epoll
    };
    let mut config = Config {
        hostname: HOST.into(),
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        shards: 2,
        io: io_mode,
        ..Config::default()
    };
    config.limits.shutdown_timeout_secs = 5;
    config.relay.postmaster = format!("postmaster@{HOST}");
    let seen: Seen = Arc::default();
    let refuse_connections = Arc::new(AtomicBool::new(false));
    let (s, r) = (Arc::clone(&seen), Arc::clone(&refuse_connections));
    let handle = Server::new(config)
        .start(move |shard| Recorder {
            shard,
            seen: Arc::clone(&s),
            refuse_connections: Arc::clone(&r),
        })
        .expect("server starts");
    let addr = handle.local_addrs()[0];
    assert_ne!(addr.port(), 0);
    let driver = if io == "uring" { "io_uring" } else { "epoll" };
    assert_eq!(handle.io_driver(), driver);

    // 1. A real client.
    let transport = SmtpTransport::builder_dangerous("127.0.0.1")
        .port(addr.port())
        .hello_name(ClientId::Domain("client.test".into()))
        .timeout(Some(Duration::from_secs(5)))
        .build();
    let msg = Message::builder()
        .from("alice@example.org".parse().unwrap())
        .to("bob@example.org".parse().unwrap())
        .to("carol@example.org".parse().unwrap())
        .subject("library")
        .body(String::from(
            "Hello from the library test.\r\n.a line with a leading dot\r\n",
        ))
        .unwrap();
    let resp = transport.send(&msg).expect("lettre send");
    let lettre_id = resp
        .first_line()
        .and_then(|l| l.strip_prefix("2.0.0 Ok: queued as "))
        .unwrap_or_else(|| panic!("lettre got {resp:?}"))
        .to_string();

    // 2. Refusals by the handler, raw.
    let mut c = Client::connect(addr);
    c.reply().assert_is(&format!("220 {HOST} ESMTP ringrelay"));
    c.ehlo(DEFAULT_MAX_SIZE);
    c.cmd("MAIL FROM:<x@spam.test>")
        .assert_is("550 5.7.1 sender spam.test refused");
    c.expect("MAIL FROM:<refused@example.org>", 250, "2.1.0");
    c.cmd("RCPT TO:<nobody@example.org>")
        .assert_is("550 5.1.1 no such user here");
    c.cmd("RCPT TO:<inject@example.org>")
        .assert_is("550 5.1.1 no  250 2.1.5 yes");
    c.expect("RCPT TO:<dave@example.org>", 250, "2.1.5");
    c.expect("DATA", 354, "End");
    c.send(format!("{}.\r\n", message("refused", "not wanted")));
    c.reply().assert_is("554 5.6.0 content refused by handler");
    // The null sender and <Postmaster>.
    let bounce_id = c
        .transaction(
            "",
            &["Postmaster"],
            message("bounce", "a bounce").as_bytes(),
        )
        .queued_id();
    c.expect("QUIT", 221, "2.0.0");
    c.expect_eof();

    // 3. on_connect refuses, then lets in again.
    refuse_connections.store(true, Ordering::SeqCst);
    let mut c = Client::connect(addr);
    c.reply().assert_is("554 5.7.1 no connections now");
    c.expect_eof();
    refuse_connections.store(false, Ordering::SeqCst);
    let mut idle = Client::connect(addr);
    idle.reply().assert(220, HOST);
    idle.ehlo(DEFAULT_MAX_SIZE);

    // 4. The envelopes.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    let find = |from: &str| {
        seen.iter()
            .map(|(_, e)| e)
            .find(|e| e.from.to_string() == from)
            .unwrap_or_else(|| panic!("no envelope from {from:?}: {seen:#?}"))
    };
    let to = |e: &Envelope| {
        e.to.iter()
            .map(|m| m.as_str().to_string())
            .collect::<Vec<_>>()
    };
    let data = |e: &Envelope| String::from_utf8_lossy(&e.data).into_owned();

    let e = find("alice@example.org");
    assert_eq!(to(e), ["bob@example.org", "carol@example.org"]);
    assert_eq!(e.id.to_string(), lettre_id);
    assert_eq!(&*e.helo, "client.test");
    assert_eq!(e.peer.ip().to_string(), "127.0.0.1");
    let d = data(e);
    let received = format!(
        "Received: from client.test ([127.0.0.1])\r\n\tby {HOST} (ringrelay) with ESMTP id {lettre_id};\r\n\t"
    );
    assert!(d.starts_with(&received), "data: {d:?}");
    assert!(d.contains("Subject: library\r\n"), "data: {d:?}");
    assert!(
        d.contains("\r\n\r\nHello from the library test.\r\n.a line with a leading dot\r\n"),
        "body (dot-stuffing must be removed): {d:?}"
    );
    assert!(!d.ends_with(".\r\n") && d.ends_with("\r\n"), "data: {d:?}");

    let e = find("refused@example.org");
    assert_eq!(to(e), ["dave@example.org"]);
    assert!(data(e).contains("\r\n\r\nnot wanted\r\n"));

    let e = find("");
    assert_eq!(e.from, ReversePath::Null);
    assert_eq!(to(e), [format!("postmaster@{HOST}")]);
    assert_eq!(e.id.to_string(), bounce_id);
    assert!(data(e).contains(&format!("\r\n\tfor <postmaster@{HOST}>;")));

    // 5. Shutdown: the idle session hears 421, join returns, the port is closed.
    handle.shutdown();
    idle.reply().assert(421, "4.3.2");
    idle.expect_eof();
    let (done, wait) = mpsc::channel();
    std::thread::spawn(move || done.send(handle.join().map_err(|e| e.to_string())));
    let joined = wait
        .recv_timeout(Duration::from_secs(10))
        .expect("join() did not return within 10 s");
    assert_eq!(joined, Ok(()));
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening after join"
    );
}

/// Panics in `on_connect`, or in `on_message`, while told to.
struct Panicky {
    panic_next: Arc<AtomicBool>,
    in_on_message: bool,
}

impl Handler for Panicky {
    fn on_connect(&self, _peer: SocketAddr) -> Result<(), Reply> {
        if !self.in_on_message && self.panic_next.swap(false, Ordering::SeqCst) {
            panic!("a handler bug (expected by this test)");
        }
        Ok(())
    }

    async fn on_message(&self, _envelope: Envelope) -> Result<(), Reply> {
        if self.in_on_message && self.panic_next.swap(false, Ordering::SeqCst) {
            panic!("a handler bug (expected by this test)");
        }
        Ok(())
    }
}

/// The message's memory counts against `max_data_memory` until its result is in; a handler
/// that panics before giving one must not keep it counted, or every large message after
/// it would be refused.
fn a_handler_panicking_on_a_message_gives_its_memory_back(io: &str) {
    let mut config = one_shard(io);
    config.limits.max_message_size = 200_000;
    config.limits.max_data_memory = 200_000;
    let (handle, panic_next) = start_panicky(config, true);
    let addr = handle.local_addrs()[0];
    let body = format!(
        "Subject: big\r\n\r\n{}",
        format!("{}\r\n", "x".repeat(998)).repeat(150)
    );
    let send_big = |c: &mut Client| {
        c.ehlo(200_000);
        c.start_data("a@b.test", &["c@d.test"]);
        c.send(format!("{body}.\r\n"));
    };
    let mut first = Client::connect(addr);
    first.reply();
    send_big(&mut first);
    first.expect_eof();
    assert!(!panic_next.load(Ordering::SeqCst), "on_message ran");
    // The panicked message's 150,000 bytes are no longer counted: this one fits.
    let mut second = Client::connect(addr);
    second.reply();
    send_big(&mut second);
    second.reply().queued_id();
    handle.shutdown();
    handle.join().expect("the server stops cleanly");
}

/// A server whose handler panics once, in `on_message` or else in `on_connect`; the flag
/// says whether it has yet.
fn start_panicky(config: Config, in_on_message: bool) -> (ServerHandle, Arc<AtomicBool>) {
    let panic_next = Arc::new(AtomicBool::new(true));
    let p = Arc::clone(&panic_next);
    let handle = Server::new(config)
        .start(move |_| Panicky {
            panic_next: Arc::clone(&p),
            in_on_message,
        })
        .expect("server starts");
    (handle, panic_next)
}

/// A server on one shard, so that every connection goes to the same accept loop and the
/// same shard's state, on the driver `io` names.
fn one_shard(io: &str) -> Config {
    Config {
        hostname: HOST.into(),
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        shards: 1,
        io: if io == "uring" {
            IoMode::Uring
        } else {
            IoMode::Epoll
        },
        ..Config::default()
    }
}

fn a_panicking_handler_costs_one_connection(io: &str) {
    let config = one_shard(io);
    let (handle, panic_next) = start_panicky(config, false);
    let addr = handle.local_addrs()[0];
    let mut first = Client::connect(addr);
    first.expect_eof();
    assert!(!panic_next.load(Ordering::SeqCst), "on_connect ran");
    // The shard still accepts, greets and serves.
    let mut second = Client::connect(addr);
    second
        .reply()
        .assert_is(&format!("220 {HOST} ESMTP ringrelay"));
    second.ehlo(DEFAULT_MAX_SIZE);
    second.expect("QUIT", 221, "2.0.0");
    handle.shutdown();
    handle.join().expect("the server stops cleanly");
}
