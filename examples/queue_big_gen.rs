//! Writes a big spool for `benches/queue_big.sh`: COUNT queued messages (SIZE bytes of
//! content each) in segment files, with the library's own record encoder, as two shards
//! of a relay whose next hop is down would have left them. Much faster than relaying a
//! million messages through a server, and byte for byte what the store writes
//! (`segment.rs` appends exactly what `record::encode_*` encodes, pinned by its tests).
//!
//! Every state `queue list` shows is there: every message deferred once or more (attempts,
//! next attempt, the last reply), one in ten with two recipients of which one is
//! delivered, one in fifty on hold, and besides the COUNT queued ones, one finished
//! (removed) message per fifty, which must not be listed. Segments rotate at 64 MiB, as
//! the store's do.
//!
//! usage: cargo run --release --example queue_big_gen -- DIR COUNT [SIZE]

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use ringrelay::id::IdGenerator;
use ringrelay::spool::record::{self, MessageRecord};
use ringrelay::spool::RcptOutcome;
use ringrelay::{Mailbox, ReversePath};

const SHARDS: usize = 2;
const ROTATE_BYTES: u64 = 64 << 20;

struct Shard {
    dir: PathBuf,
    index: usize,
    seq: u64,
    out: Option<BufWriter<File>>,
    len: u64,
    ids: IdGenerator,
}

impl Shard {
    fn write(&mut self, bytes: &[u8], message_starts: bool) -> std::io::Result<()> {
        if message_starts && (self.out.is_none() || self.len >= ROTATE_BYTES) {
            if let Some(mut w) = self.out.take() {
                w.flush()?;
            }
            let name = format!("seg-{:03}-{:012}.rrs", self.index, self.seq);
            self.seq += 1;
            let file = File::create(self.dir.join(name))?;
            self.out = Some(BufWriter::with_capacity(4 << 20, file));
            self.len = 0;
        }
        self.len += bytes.len() as u64;
        match self.out.as_mut() {
            Some(w) => w.write_all(bytes),
            None => Err(std::io::Error::other("no segment open")),
        }
    }
}

/// The generated addresses are all valid.
fn mailbox(s: &str) -> Mailbox {
    Mailbox::parse(s).unwrap_or_else(|e| panic!("{s}: {e:?}"))
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(dir), Some(count)) = (
        args.first(),
        args.get(1).and_then(|s| s.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: queue_big_gen DIR COUNT [SIZE]");
        std::process::exit(2)
    };
    let dir = Path::new(dir);
    let size: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024);
    fs::create_dir_all(dir)?;
    // The lock file marks a spool a server has used (queue commands require it).
    File::create(dir.join("lock"))?;

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    let mut shards: Vec<Shard> = (0..SHARDS)
        .map(|index| Shard {
            dir: dir.to_path_buf(),
            index,
            seq: 0,
            out: None,
            len: 0,
            ids: IdGenerator::new(index),
        })
        .collect();
    let mut body = Vec::with_capacity(size);
    let mut buf = BytesMut::with_capacity(size + 4096);
    let (mut queued, mut n) = (0u64, 0u64);
    while queued < count {
        let shard = &mut shards[(n % SHARDS as u64) as usize];
        let id = shard.ids.next_id();
        // Arrivals over the last count/1000 seconds, about 1000 a second.
        let arrival = now - (count - queued.min(count)) / 1000;
        let from = ReversePath::Mailbox(mailbox(&format!("sender{}@client.example", n % 100)));
        let two = n % 10 == 3;
        let mut rcpts = vec![mailbox(&format!("user{n}@down.example"))];
        if two {
            rcpts.push(mailbox(&format!("other{n}@up.example")));
        }
        body.clear();
        let _ = write!(
            body,
            "From: <sender@client.example>\r\nTo: <user{n}@down.example>\r\nSubject: queue_big {n}\r\n\r\n"
        );
        while body.len() + 2 < size {
            body.push(b'a' + (body.len() % 26) as u8);
            if body.len() % 78 == 76 {
                body.extend_from_slice(b"\r\n");
            }
        }
        body.truncate(size.saturating_sub(2));
        body.extend_from_slice(b"\r\n");
        buf.clear();
        record::encode_message(
            &mut buf,
            &MessageRecord {
                id,
                arrival: at(arrival),
                from: &from,
                rcpts: &rcpts,
                eight_bit: false,
                smtputf8: false,
                dsn: None,
                data: &body,
            },
        );
        let attempts = 1 + (n % 3) as u32;
        record::encode_deferred(
            &mut buf,
            id,
            attempts,
            at(now + 300 * u64::from(attempts) + n % 60),
            "127.0.0.1:2 connect: Connection refused (os error 111)",
        );
        if two {
            record::encode_recipient(&mut buf, id, 1, RcptOutcome::Delivered);
        }
        let finished = n % 50 == 7;
        if finished {
            record::encode_recipient(&mut buf, id, 0, RcptOutcome::Removed);
            record::encode_finished(&mut buf, id);
        } else {
            if n % 50 == 11 {
                record::encode_hold(&mut buf, id, true);
            }
            queued += 1;
        }
        shard.write(&buf, true)?;
        n += 1;
    }
    let mut bytes = 0;
    let mut segments = 0;
    for s in &mut shards {
        if let Some(mut w) = s.out.take() {
            w.flush()?;
        }
        segments += s.seq;
    }
    for e in fs::read_dir(dir)? {
        bytes += e?.metadata()?.len();
    }
    println!(
        "{queued} queued and {} finished messages of {size} bytes in {segments} segments, {bytes} bytes, in {}",
        n - queued,
        dir.display()
    );
    Ok(())
}
