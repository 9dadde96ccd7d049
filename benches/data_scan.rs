//! Throughput of the DATA-phase scanner (`DataScanner`) on realistic message bodies.

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringrelay::smtp::data::DataScanner;

/// A message of about `size` bytes as sent on the wire: 76-character lines, a dot-stuffed line
/// every 50 lines, ending in `\r\n.\r\n`.
fn wire_message(size: usize) -> Vec<u8> {
    let mut wire = Vec::with_capacity(size + 128);
    wire.extend_from_slice(b"From: a@example.com\r\nTo: b@example.org\r\nSubject: bench\r\n\r\n");
    let mut n = 0u32;
    let mut until_dot = 50;
    while wire.len() < size {
        n = n.wrapping_add(1);
        until_dot -= 1;
        if until_dot == 0 {
            until_dot = 50;
            // A line starting with a dot, stuffed by the client.
            wire.extend_from_slice(b"..");
        }
        for k in 0..76u32 {
            // Printable, deterministic, never CR / LF.
            let c = b'!' + ((n.wrapping_mul(31).wrapping_add(k)) % 94) as u8;
            wire.push(c);
        }
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b".\r\n");
    wire
}

fn bench_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_scan");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(30);
    for (name, size) in [("1KiB", 1 << 10), ("64KiB", 64 << 10), ("1MiB", 1 << 20)] {
        let wire = wire_message(size);
        let mut body = BytesMut::with_capacity(wire.len());
        let mut scanner = DataScanner::new(wire.len());
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(BenchmarkId::new("scan", name), &wire, |b, wire| {
            b.iter(|| {
                scanner.reset();
                body.clear();
                let (used, outcome) = scanner.scan(black_box(wire), &mut body);
                assert_eq!(used, wire.len());
                black_box(outcome)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_scan);
criterion_main!(benches);
