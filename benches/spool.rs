//! Criterion benches of the spool's per-message work: encoding a message record (with its
//! crc32c) and decoding it back, for 1 KiB and 64 KiB messages. `encode` builds the whole
//! record in one buffer (content copied in); `encode_head` is what the store does: header
//! and fields only, with the checksum over the content, which is then written from where
//! it is.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringrelay::id::IdGenerator;
use ringrelay::smtp::{Mailbox, ReversePath};
use ringrelay::spool::record::{
    decode, encode_message, encode_message_head, Decoded, MessageRecord,
};

fn records(c: &mut Criterion) {
    let mut ids = IdGenerator::new(0);
    let from = ReversePath::Mailbox(Mailbox::parse("sender@example.org").unwrap());
    let rcpts = vec![Mailbox::parse("rcpt@destination.example").unwrap()];
    let mut g = c.benchmark_group("spool_record");
    g.measurement_time(Duration::from_secs(3)).sample_size(30);
    for size in [1024usize, 64 * 1024] {
        let data = vec![b'x'; size];
        g.throughput(Throughput::Bytes(size as u64));
        let mut out = BytesMut::with_capacity(size + 256);
        let record = |id| MessageRecord {
            id,
            arrival: SystemTime::now(),
            from: &from,
            rcpts: &rcpts,
            eight_bit: false,
            smtputf8: false,
            dsn: None,
            data: &data,
        };
        type Encoder = fn(&mut BytesMut, &MessageRecord<'_>);
        let encoders: [(&str, Encoder); 2] = [
            ("encode", encode_message),
            ("encode_head", encode_message_head),
        ];
        for (name, encode) in encoders {
            g.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter(|| {
                    out.clear();
                    encode(&mut out, &record(ids.next_id()));
                    black_box(out.len())
                })
            });
        }
        out.clear();
        encode_message(&mut out, &record(ids.next_id()));
        let encoded = out.clone().freeze();
        g.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, encoded| {
            b.iter(|| match decode(black_box(encoded)) {
                Decoded::Record(_, n) => n,
                _ => 0,
            })
        });
    }
    g.finish();
}

criterion_group!(benches, records);
criterion_main!(benches);
