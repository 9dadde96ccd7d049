//! Criterion benches of the sans-IO SMTP core: command parsing, and a whole in-memory
//! session for one 1 KiB message (EHLO to QUIT), reported per message.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringrelay::id::{IdGenerator, QueueId};
use ringrelay::policy::RelayPolicy;
use ringrelay::smtp::command::parse;
use ringrelay::smtp::{Hooks, Session, SessionConfig};

struct BenchHooks(IdGenerator);

impl Hooks for BenchHooks {
    fn queue_id(&mut self) -> QueueId {
        self.0.next_id()
    }
}

fn command_parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.measurement_time(Duration::from_secs(3)).sample_size(30);
    let lines: [(&str, &[u8]); 5] = [
        ("ehlo", b"EHLO client.example.org"),
        (
            "mail",
            b"MAIL FROM:<sender.name@example.org> SIZE=1024 BODY=8BITMIME",
        ),
        ("rcpt", b"RCPT TO:<recipient.name@destination.example>"),
        ("data", b"DATA"),
        ("unknown", b"XYZZY plugh"),
    ];
    for (name, line) in lines {
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter(|| black_box(parse(black_box(line)).is_ok()))
        });
    }
    g.finish();
}

fn one_message_wire(body_size: usize) -> Vec<u8> {
    let mut wire = b"EHLO client.example.org\r\nMAIL FROM:<sender@example.org> SIZE=1024\r\nRCPT TO:<rcpt@destination.example>\r\nDATA\r\nSubject: bench\r\n\r\n".to_vec();
    while wire.len() < body_size {
        wire.extend_from_slice(
            b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n",
        );
    }
    wire.extend_from_slice(b".\r\nQUIT\r\n");
    wire
}

fn whole_session(c: &mut Criterion) {
    let config = Arc::new(SessionConfig::new(
        "relay.example".into(),
        36_700_160,
        100,
        RelayPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]),
    ));
    let wire = one_message_wire(1024);
    let peer = "127.0.0.1:40000".parse().unwrap();
    let mut hooks = BenchHooks(IdGenerator::new(0));
    let now = SystemTime::now();
    let mut g = c.benchmark_group("session");
    g.measurement_time(Duration::from_secs(3)).sample_size(30);
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_1KiB_message_ehlo_to_quit", |b| {
        b.iter(|| {
            let mut s = Session::new(Arc::clone(&config), peer);
            s.greet();
            let used = s.receive(&wire, now, &mut hooks);
            let msg = s.take_message().expect("a message");
            s.message_result(Ok(()));
            let rest = s.receive(&wire[used..], now, &mut hooks);
            black_box((msg.data.len(), rest, s.take_output().len()))
        })
    });
    g.finish();
}

criterion_group!(benches, command_parsing, whole_session);
criterion_main!(benches);
