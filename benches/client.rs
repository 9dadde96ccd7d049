//! Criterion bench of the sans-IO SMTP client: one 1 KiB message through a scripted
//! pipelining server on a pooled connection (Ready → start → replies → Delivered),
//! reported per message. Every measured message is a second-or-later one, so it includes
//! the RSET.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringrelay::smtp::client::{Client, ClientEvent, Outgoing};
use ringrelay::smtp::{Mailbox, ReversePath};

/// A 1 KiB message: a few headers, 76-character lines, one line-leading dot to stuff.
fn message_1kib() -> Bytes {
    let mut data = Vec::with_capacity(1100);
    data.extend_from_slice(b"From: a@src.example\r\nTo: b@dst.example\r\nSubject: bench\r\n\r\n");
    let mut n = 0u32;
    while data.len() < 1024 - 78 {
        n += 1;
        if n == 5 {
            data.push(b'.');
        }
        for k in 0..76u32 {
            data.push(b'!' + ((n * 31 + k) % 94) as u8);
        }
        data.extend_from_slice(b"\r\n");
    }
    Bytes::from(data)
}

/// Drives one message from `start` to `Delivered` + `Ready`; returns bytes written.
fn one_message(client: &mut Client, msg: Outgoing) -> usize {
    let mut written = 0;
    client.start(msg).expect("client is ready");
    while let Some(chunk) = client.poll_transmit() {
        written += black_box(chunk).len();
    }
    const REPLIES: &[u8] =
        b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n";
    let used = client.receive(REPLIES);
    debug_assert_eq!(used, REPLIES.len());
    while let Some(chunk) = client.poll_transmit() {
        written += black_box(chunk).len();
    }
    client.receive(b"250 2.0.0 Ok: queued as 0123456789ABCDEFGHIJ\r\n");
    let mut delivered = false;
    while let Some(event) = client.poll_event() {
        delivered |= matches!(black_box(event), ClientEvent::Delivered(_));
    }
    assert!(delivered && client.is_ready());
    written
}

fn bench_client(c: &mut Criterion) {
    let mut g = c.benchmark_group("client");
    g.measurement_time(Duration::from_secs(3)).sample_size(30);
    g.throughput(Throughput::Elements(1));

    let msg = Outgoing {
        from: ReversePath::Mailbox(Mailbox::parse("sender@src.example").unwrap()),
        rcpts: vec![Mailbox::parse("rcpt@dst.example").unwrap()],
        data: message_1kib(),
        eight_bit: false,
        smtputf8: false,
        needs_smtputf8: false,
        dsn: None,
    };
    let mut client = Client::new("relay.example");
    client.receive(b"220 mx.dst.example ESMTP\r\n");
    while client.poll_transmit().is_some() {}
    client.receive(
        b"250-mx.dst.example\r\n250-PIPELINING\r\n250-SIZE 36700160\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n",
    );
    assert_eq!(client.poll_event(), Some(ClientEvent::Ready));
    assert!(client.pipelining());
    // The first message has no RSET: send it outside the measurement.
    client.start(msg.clone()).unwrap();
    while client.poll_transmit().is_some() {}
    client.receive(b"250 Ok\r\n250 Ok\r\n354 go\r\n");
    while client.poll_transmit().is_some() {}
    client.receive(b"250 Ok\r\n");
    while client.poll_event().is_some() {}

    g.bench_function("pipelined_1KiB_message", |b| {
        b.iter(|| one_message(&mut client, msg.clone()))
    });
    g.finish();
}

criterion_group!(benches, bench_client);
criterion_main!(benches);
