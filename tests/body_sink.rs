//! The library's streaming API in-process, on both drivers: a `Handler` whose `body_sink`
//! collects a large message's pieces gets every byte (our `Received:` header first, then
//! the unstuffed content) in pieces while it arrives, then `finish` with the last bytes,
//! and never `on_message` for it; small messages still come whole to `on_message`. A sink
//! that fails a write gets the client `451` at the real end of the message, and is dropped
//! unfinished, as is the sink of a message over the size limit.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{dot_stuff, Client};
use ringrelay::config::IoMode;
use ringrelay::handler::LocalFuture;
use ringrelay::{BodySink, Config, Envelope, Handler, Reply, Server};

io_tests!(large_messages_come_in_pieces_small_ones_whole);

/// What the handler saw: whole messages, streamed ones (pieces, content), and sinks
/// dropped without `finish`.
#[derive(Default)]
struct Seen {
    whole: Vec<Envelope>,
    streamed: Vec<(usize, Vec<u8>)>,
    abandoned: usize,
}

struct Streaming {
    seen: Arc<Mutex<Seen>>,
}

struct Collect {
    seen: Arc<Mutex<Seen>>,
    pieces: usize,
    content: Vec<u8>,
    fail: bool,
    finished: bool,
}

impl BodySink for Collect {
    fn write(&mut self, piece: Bytes) -> LocalFuture<'_, Result<(), Reply>> {
        self.pieces += 1;
        self.content.extend_from_slice(&piece);
        let result = if self.fail {
            Err(Reply::new(451, "4.3.0 Error: the sink failed"))
        } else {
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }

    fn finish(mut self: Box<Self>, envelope: Envelope) -> LocalFuture<'static, Result<(), Reply>> {
        self.finished = true;
        self.content.extend_from_slice(&envelope.data);
        let content = std::mem::take(&mut self.content);
        self.seen
            .lock()
            .unwrap()
            .streamed
            .push((self.pieces, content));
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Drop for Collect {
    fn drop(&mut self) {
        if !self.finished {
            self.seen.lock().unwrap().abandoned += 1;
        }
    }
}

impl Handler for Streaming {
    fn body_sink(&self, envelope: &Envelope, _head: &[u8]) -> Option<Box<dyn BodySink>> {
        let fail = envelope
            .from
            .mailbox()
            .is_some_and(|m| m.local_part() == "fail");
        Some(Box::new(Collect {
            seen: Arc::clone(&self.seen),
            pieces: 0,
            content: Vec::new(),
            fail,
            finished: false,
        }))
    }

    async fn on_message(&self, envelope: Envelope) -> Result<(), Reply> {
        self.seen.lock().unwrap().whole.push(envelope);
        Ok(())
    }
}

/// `lines` lines of 100 bytes, some starting with a dot.
fn content(lines: usize) -> Vec<u8> {
    let mut c = b"Subject: streamed\r\n\r\n".to_vec();
    for i in 0..lines {
        let lead = if i % 7 == 0 { "." } else { "x" };
        c.extend_from_slice(format!("{lead}{i:07} {}\r\n", "z".repeat(90)).as_bytes());
    }
    c
}

fn large_messages_come_in_pieces_small_ones_whole(io: &str) {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let mut config = Config {
        hostname: "lib.test".into(),
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        shards: 1,
        io: if io == "uring" {
            IoMode::Uring
        } else {
            IoMode::Epoll
        },
        ..Config::default()
    };
    config.limits.max_message_size = 4 << 20;
    config.limits.shutdown_timeout_secs = 2;
    let s = Arc::clone(&seen);
    let handle = Server::new(config)
        .start(move |_| Streaming {
            seen: Arc::clone(&s),
        })
        .expect("server starts");
    let mut c = Client::connect(handle.local_addrs()[0]);
    c.reply();
    c.cmd("EHLO client.test");
    let big = content(20_000); // about 2 MB
    let small = content(5);
    for data in [&big, &small] {
        c.start_data("a@client.test", &["b@example.test"]);
        c.send(dot_stuff(data));
        assert!(c.reply().is_queued());
    }
    // In BDAT chunks too.
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0");
    c.expect("RCPT TO:<b@example.test>", 250, "2.1.5");
    let pieces: Vec<&[u8]> = big.chunks(700_001).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let last = if i + 1 == pieces.len() { " LAST" } else { "" };
        c.send(format!("BDAT {}{last}\r\n", piece.len()));
        c.send(piece);
    }
    for _ in 1..pieces.len() {
        c.reply().assert(250, "2.0.0");
    }
    assert!(c.reply().is_queued());
    // A failing sink: 451 after the real end; over the limit: 552. Both dropped unfinished.
    c.start_data("fail@client.test", &["b@example.test"]);
    c.send(dot_stuff(&big));
    c.reply().assert(451, "4.3.0");
    c.start_data("a@client.test", &["b@example.test"]);
    c.send(dot_stuff(&content(50_000)));
    c.reply().assert(552, "5.3.4");
    c.expect("QUIT", 221, "2.0.0");

    let seen = common::wait_for(Duration::from_secs(5), "the handler's view", || {
        let s = seen.lock().unwrap();
        if s.abandoned == 2 {
            Ok((s.whole.clone(), s.streamed.clone()))
        } else {
            Err(format!("{} sinks abandoned", s.abandoned))
        }
    });
    let (whole, streamed) = seen;
    assert_eq!(whole.len(), 1, "only the small message comes whole");
    assert!(whole[0].data.ends_with(&small));
    assert_eq!(streamed.len(), 2);
    for (pieces, got) in &streamed {
        assert!(*pieces >= 4, "{pieces} pieces");
        assert!(got.starts_with(b"Received: "));
        assert!(got.ends_with(&big), "every byte, in order, unstuffed");
        assert!(got.len() < big.len() + 1000);
    }
    handle.close_now();
    handle.join().expect("join");
}
