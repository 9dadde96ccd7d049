//! Backpressure instead of failure (Postfix's `queue_minfree`): with too little free disk
//! under the spool (`spool.min_free_bytes`) or too many queued messages
//! (`spool.max_queued_messages`), MAIL gets `452 4.3.1`; accepting resumes by itself once
//! there is room again. Both I/O drivers.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// Waits until MAIL gets `code`, trying a fresh session each time.
fn wait_mail(relay: &Relay, code: u16) {
    wait_for(
        Duration::from_secs(10),
        &format!("MAIL answered {code}"),
        || {
            let mut c = relay.connect();
            assert_eq!(c.cmd("EHLO t.test").code, 250);
            let r = c.cmd("MAIL FROM:<a@b.test>");
            if r.code == code {
                if code == 452 {
                    r.assert(452, "4.3.1");
                }
                Ok(())
            } else {
                Err(r.wire())
            }
        },
    );
}

fn full_disk_refuses_mail_until_there_is_room(io: &str) {
    let spool = tempfile::tempdir().expect("spool");
    let hop: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut opts = Opts::relay(io, spool.path(), &[("example.test", hop)], &[60], "");
    opts.config
        .push_str("[spool]\nmin_free_bytes = 1000000000000000000\n");
    let relay = Relay::start_with(opts);
    wait_mail(&relay, 452);
    assert!(
        relay.stderr().contains("refusing new mail (452 4.3.1)"),
        "{}",
        relay.stderr()
    );
    // Room again (here: a lower threshold, reloaded): accepting resumes.
    let text = std::fs::read_to_string(relay.config_path()).expect("config");
    std::fs::write(
        relay.config_path(),
        text.replace("min_free_bytes = 1000000000000000000", "min_free_bytes = 0"),
    )
    .expect("rewrite");
    relay.signal("HUP");
    wait_mail(&relay, 250);
}

fn a_full_queue_refuses_mail_until_it_drains(io: &str) {
    let spool = tempfile::tempdir().expect("spool");
    // The next hop is down: what is accepted stays queued.
    let hop: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut opts = Opts::relay(io, spool.path(), &[("example.test", hop)], &[60], "");
    opts.config.push_str("[spool]\nmax_queued_messages = 2\n");
    let relay = Relay::start_with(opts);
    let mut ids = Vec::new();
    for i in 0..2 {
        let r = send_one(
            relay.addr,
            "a@b.test",
            &["x@example.test"],
            format!("Subject: {i}\r\n\r\n{i}\r\n").as_bytes(),
        );
        ids.push(r.queued_id());
    }
    wait_mail(&relay, 452);
    for id in &ids {
        let out = queue(spool.path(), &["remove", id]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    }
    wait_mail(&relay, 250);
}

io_tests!(
    full_disk_refuses_mail_until_there_is_room,
    a_full_queue_refuses_mail_until_it_drains,
);
