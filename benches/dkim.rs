//! The cost of DKIM-signing one message ([`ringrelay::dkim`]): reading its header section,
//! canonicalizing and hashing it (relaxed/relaxed, SHA-256) and the private-key operation,
//! for RSA-2048 and Ed25519 keys, on 1 KiB and 100 KiB messages. This is the work
//! `sign_off_thread` moves onto the blocking pool for each signed message.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringrelay::dkim::{DkimDomain, Signers};

/// A message of about `size` bytes as stored: our Received: header, the usual headers
/// from example.com, and a body of 76-character lines.
fn message(size: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(size + 128);
    m.extend_from_slice(
        b"Received: from client.test ([127.0.0.1]) by relay.test with ESMTP id 0A1B2C3D\r\n\
        \tfor <b@example.org>; Fri, 4 Dec 2026 12:00:00 +0000\r\n\
        From: Alice <a@example.com>\r\nTo: b@example.org\r\nSubject: bench\r\n\
        Date: Fri, 4 Dec 2026 12:00:00 +0000\r\nMessage-ID: <bench@example.com>\r\n\
        MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
    );
    let mut n = 0u32;
    while m.len() < size {
        n = n.wrapping_add(1);
        for k in 0..76u32 {
            m.push(b'!' + ((n.wrapping_mul(31).wrapping_add(k)) % 94) as u8);
        }
        m.extend_from_slice(b"\r\n");
    }
    m
}

fn signers(file: &str) -> Signers {
    let mut config = BTreeMap::new();
    config.insert(
        "example.com".to_string(),
        DkimDomain {
            selector: "s1".into(),
            key_file: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/dkim")
                .join(file),
        },
    );
    Signers::load(&config).expect("the test key loads")
}

fn bench_sign(c: &mut Criterion) {
    let mut group = c.benchmark_group("dkim_sign");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(30);
    for (name, file) in [("rsa2048", "rsa2048.pem"), ("ed25519", "ed25519.pem")] {
        let signers = signers(file);
        for size in [1024usize, 100 * 1024] {
            let msg = message(size);
            group.throughput(Throughput::Bytes(msg.len() as u64));
            group.bench_with_input(
                BenchmarkId::new(name, format!("{}KiB", size / 1024)),
                &msg,
                |b, msg| {
                    b.iter(|| {
                        let signer = signers
                            .signer_for(black_box(msg))
                            .expect("signable")
                            .expect("a key for example.com");
                        black_box(signer.sign(msg).expect("signed"))
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_sign);
criterion_main!(benches);
