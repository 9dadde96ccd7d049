//! The ancestor's synopsis, in ringrelay. Net::SMTP::Server (1999) read:
//!
//! ```perl
//! $server = new Net::SMTP::Server('localhost', 25);
//! while($conn = $server->accept()) {
//!     # checks for spammers, ACLs
//!     my $client = new Net::SMTP::Server::Client($conn);
//!     $client->process || next;
//!     # save email to a file, or perform various other actions
//! }
//! ```
//!
//! Here the server accepts, checks and runs the SMTP session; the handler does the checks
//! and saves each message as `<dir>/<queue id>.eml`, with the envelope in `X-Envelope-*`
//! lines first. Run it with
//! `cargo run --example save_to_file -- 127.0.0.1:2525 ./mail`, then send it mail
//! (`swaks --server 127.0.0.1:2525 --to you@example.org`); Ctrl-C stops it.
//!
//! It writes with blocking `std::fs` calls on the shard's thread: fine for an example, not
//! for a busy server, whose spool batches and syncs its writes.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use ringrelay::smtp::{Envelope, Mailbox, Reply, ReversePath};
use ringrelay::{Config, Handler, Server};

struct SaveToDir {
    dir: PathBuf,
}

impl Handler for SaveToDir {
    // "checks for spammers, ACLs"
    fn on_connect(&self, peer: SocketAddr) -> Result<(), Reply> {
        if peer.ip().is_loopback() {
            Ok(())
        } else {
            Err(Reply::new(
                554,
                "5.7.1 this example only talks to localhost",
            ))
        }
    }

    fn on_mail(&self, _peer: SocketAddr, from: &ReversePath) -> Result<(), Reply> {
        match from.mailbox() {
            Some(m) if m.domain().eq_ignore_ascii_case("spam.example") => {
                Err(Reply::new(550, "5.7.1 no thanks"))
            }
            _ => Ok(()),
        }
    }

    fn on_rcpt(&self, _peer: SocketAddr, _to: &Mailbox) -> Result<(), Reply> {
        Ok(())
    }

    // "save email to a file, or perform various other actions"
    async fn on_message(&self, envelope: Envelope) -> Result<(), Reply> {
        let path = self.dir.join(format!("{}.eml", envelope.id));
        let save = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&path)?;
            writeln!(f, "X-Envelope-From: <{}>", envelope.from)?;
            for to in &envelope.to {
                writeln!(f, "X-Envelope-To: <{to}>")?;
            }
            f.write_all(&envelope.data)?;
            f.sync_all()
        };
        save().map_err(|e| Reply::local_error(&format!("cannot save message: {e}")))?;
        println!(
            "saved {} from <{}> to {} recipient(s)",
            path.display(),
            envelope.from,
            envelope.to.len()
        );
        Ok(())
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:2525".into())
        .parse()
        .map_err(|e| std::io::Error::other(format!("listen address: {e}")))?;
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "./mail".into()));
    std::fs::create_dir_all(&dir)?;
    let config = Config {
        listen: vec![listen],
        ..Config::default()
    };
    Server::new(config).run(move |_shard| SaveToDir { dir: dir.clone() })
}
