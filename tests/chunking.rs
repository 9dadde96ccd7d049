//! CHUNKING / BDAT inbound (RFC 3030, issue 18 §4), on both drivers, with a raw socket
//! client: pipelined chunks and LAST relayed byte for byte to a capturing next hop (which
//! gets them over DATA, dot-stuffed by our client), `BDAT 0 LAST`, a chunk over the size
//! limit, BDAT out of sequence (its bytes consumed, never read as commands), DATA after
//! BDAT, a bare LF, a malformed size (the connection ends), and a large message in chunks
//! (streamed into the spool).
//!
//! No client library we could find speaks BDAT (Python's smtplib, lettre and swaks do not),
//! so the client here is raw bytes.

mod common;

use std::time::Duration;

use common::*;

io_tests!(
    pipelined_chunks_are_relayed_byte_for_byte,
    bdat_errors_keep_the_session_in_sync,
    a_large_chunked_message_is_streamed_and_relayed_whole,
);

/// `BDAT` for `chunk` (LAST or not) followed by the chunk itself.
fn bdat(chunk: &[u8], last: bool) -> Vec<u8> {
    let mut wire = format!(
        "BDAT {}{}\r\n",
        chunk.len(),
        if last { " LAST" } else { "" }
    )
    .into_bytes();
    wire.extend_from_slice(chunk);
    wire
}

/// The relay (one route to `next_hop`) with `extra` config, and a client after EHLO.
fn relay_and_client(
    io: &str,
    spool: &std::path::Path,
    next_hop: std::net::SocketAddr,
    extra: &str,
) -> (Relay, Client) {
    let relay = Relay::start_with(Opts::relay(
        io,
        spool,
        &[("example.test", next_hop)],
        &[1],
        extra,
    ));
    let mut c = relay.connect();
    let ehlo = c.cmd("EHLO client.test");
    assert!(
        ehlo.lines.iter().any(|l| l == "CHUNKING"),
        "{}",
        ehlo.wire()
    );
    assert!(
        !ehlo.lines.iter().any(|l| l == "BINARYMIME"),
        "{}",
        ehlo.wire()
    );
    (relay, c)
}

fn pipelined_chunks_are_relayed_byte_for_byte(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let capture = Capture::start(io);
    let (_relay, mut c) = relay_and_client(io, &work.path().join("spool"), capture.addr, "");
    // Lines that would end or stuff a DATA message mean nothing in BDAT content.
    let first = b"From: <a@client.test>\r\nSubject: chunked\r\n\r\n.leading dot\r\n.\r\n";
    let second = b"QUIT\r\nMAIL FROM:<evil@client.test>\r\n\r\n.\r\nlast line\r\n";
    let mut wire = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\n".to_vec();
    wire.extend(bdat(first, false));
    wire.extend(bdat(second, true));
    wire.extend_from_slice(b"NOOP\r\n");
    // All in one write: the client does not wait for the chunks' replies.
    c.send(&wire);
    let replies: Vec<Reply> = (0..5).map(|_| c.reply()).collect();
    assert_sequence(
        &replies,
        &[
            (250, "2.1.0"),
            (250, "2.1.5"),
            (250, "2.0.0"),
            (250, "2.0.0 Ok: queued as"),
            (250, "2.0.0"),
        ],
    );
    assert_eq!(
        replies[2].wire(),
        format!("250 2.0.0 {} octets received", first.len())
    );
    // BDAT 0 LAST after a chunk: the message is what came before.
    c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\n");
    c.reply().assert(250, "2.1.0");
    c.reply().assert(250, "2.1.5");
    c.send(bdat(b"Subject: zero\r\n\r\nbody\r\n", false));
    c.reply().assert(250, "2.0.0");
    assert!(c.cmd("BDAT 0 LAST").is_queued());
    c.expect("QUIT", 221, "2.0.0");

    let got = capture.wait_for(2, Duration::from_secs(20));
    let mut expected = first.to_vec();
    expected.extend_from_slice(second);
    let chunked = got
        .iter()
        .find(|e| e.data.ends_with(&expected))
        .unwrap_or_else(|| panic!("no message ends with the chunks: {got:?}"));
    assert_eq!(chunked.to[0].as_str(), "b@example.test");
    assert!(got
        .iter()
        .any(|e| e.data.ends_with(b"Subject: zero\r\n\r\nbody\r\n")));
}

fn bdat_errors_keep_the_session_in_sync(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let capture = Capture::start(io);
    let limit = 100_000;
    let (_relay, mut c) = relay_and_client(
        io,
        &spool,
        capture.addr,
        &format!("[limits]\nmax_message_size = {limit}\n"),
    );
    // BDAT before MAIL: 503, and its bytes (a command look-alike) are consumed.
    c.send(bdat(b"RSET\r\nQUIT\r\n", false));
    c.reply().assert(503, "5.5.1");
    c.expect("NOOP", 250, "2.0.0");
    // Without a recipient.
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0");
    c.send(bdat(b"x\r\n", true));
    c.reply().assert(503, "5.5.1");
    c.expect("RSET", 250, "2.0.0");
    // Over the limit: 552 at that chunk, the rest of it consumed; the chunk pipelined
    // behind it finds no transaction (503), and the session goes on.
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0");
    c.expect("RCPT TO:<b@example.test>", 250, "2.1.5");
    let mut wire = bdat(&vec![b'z'; limit + 10], false);
    wire.extend(bdat(b"NOOP\r\n", true));
    wire.extend_from_slice(b"NOOP\r\n");
    c.send(&wire);
    c.reply().assert(552, "5.3.4");
    c.reply().assert(503, "5.5.1");
    c.reply().assert(250, "2.0.0");
    // DATA after BDAT in one transaction.
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0");
    c.expect("RCPT TO:<b@example.test>", 250, "2.1.5");
    c.send(bdat(b"Subject: half\r\n", false));
    c.reply().assert(250, "2.0.0");
    c.expect("DATA", 503, "5.5.1");
    // A bare LF: refused like in DATA (we relay with DATA).
    c.send(bdat(b"a bare\nLF\r\n", true));
    c.reply().assert(550, "5.5.2");
    // And a clean one still goes.
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0");
    c.expect("RCPT TO:<b@example.test>", 250, "2.1.5");
    c.send(bdat(b"Subject: fine\r\n\r\nok\r\n", true));
    assert!(c.reply().is_queued());
    // A size we cannot read: 501 and the connection ends (what follows is not commands).
    c.send(b"BDAT 12x\r\nNOOP\r\nNOOP\r\n");
    c.reply().assert(501, "5.5.4");
    c.expect_eof();
    let got = capture.wait_for(1, Duration::from_secs(20));
    assert_eq!(got.len(), 1, "only the clean message: {got:?}");
    assert!(got[0].data.ends_with(b"Subject: fine\r\n\r\nok\r\n"));
    wait_queue_empty(&spool, Duration::from_secs(20));
}

fn a_large_chunked_message_is_streamed_and_relayed_whole(io: &str) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let mut sink = Sink::start(&[]);
    let (_relay, mut c) = relay_and_client(io, &spool, sink.addr, "");
    // 3 MiB in chunks of 1 MiB that split lines (and CRLFs) anywhere.
    let (_, data) = verifiable_message("00000000000bda70", 1, "Subject: big\r\n", 3 << 20);
    c.expect("MAIL FROM:<sender@client.test>", 250, "2.1.0");
    c.expect("RCPT TO:<rcpt@example.test>", 250, "2.1.5");
    let pieces: Vec<&[u8]> = data.chunks((1 << 20) + 1).collect();
    for (i, piece) in pieces.iter().enumerate() {
        c.send(bdat(piece, i + 1 == pieces.len()));
    }
    for _ in 1..pieces.len() {
        c.reply().assert(250, "2.0.0");
    }
    assert!(c.reply().is_queued());
    c.expect("QUIT", 221, "2.0.0");
    wait_queue_empty(&spool, Duration::from_secs(30));
    let (_, report) = sink.stop();
    assert_eq!(jnum(&report, "messages.received"), 1, "{report:#}");
    assert_eq!(jnum(&report, "messages.corrupted"), 0, "{report:#}");
    assert!(jnum(&report, "bytes") >= data.len() as u64, "{report:#}");
}
