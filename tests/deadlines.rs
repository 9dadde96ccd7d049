//! Limits on clients that hold a session without doing anything: a whole-DATA deadline
//! (`limits.data_total_timeout_secs`: a client trickling a byte a second inside the
//! per-read timeout is still cut off, `421 4.4.2`) and the junk-command limit
//! (`limits.max_junk_commands`: NOOP/RSET/VRFY/HELP outside a transaction, then
//! `421 4.7.0`, as Postfix's `smtpd_junk_command_limit`). Both I/O drivers.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn data_trickle_is_cut_at_the_total_deadline(io: &str) {
    let relay = Relay::start(
        io,
        "[limits]\ndata_timeout_secs = 2\ndata_total_timeout_secs = 3\n",
    );
    let mut c = relay.connect();
    assert_eq!(c.cmd("EHLO t.test").code, 250);
    c.start_data("a@b.test", &["x@example.test"]);
    let started = Instant::now();
    let mut closed_by = None;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(900));
        if c.try_send(b"x").is_err() {
            break;
        }
        c.set_read_timeout(Duration::from_millis(50));
        if let Ok(r) = c.try_reply() {
            closed_by = Some(r);
            break;
        }
    }
    let reply = closed_by.expect("the server ends the trickling DATA with a reply");
    reply.assert(421, "4.4.2");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "cut off after {took:?}, not near the 3 s deadline"
    );
}

fn junk_commands_end_the_session(io: &str) {
    let relay = Relay::start(io, "[limits]\nmax_junk_commands = 3\n");
    let mut c = relay.connect();
    assert_eq!(c.cmd("EHLO t.test").code, 250);
    for cmd in ["NOOP", "RSET", "VRFY x"] {
        assert!(c.cmd(cmd).code < 300, "{cmd}");
    }
    c.cmd("NOOP").assert(421, "4.7.0");
    c.expect_eof();
}

/// The whole-message deadline holds for BDAT too: a chunk of one byte a second, each
/// answered, is still cut off near the 3 s deadline with `421 4.4.2`.
fn bdat_trickle_is_cut_at_the_total_deadline(io: &str) {
    let relay = Relay::start(
        io,
        "[limits]\ndata_timeout_secs = 2\ndata_total_timeout_secs = 3\n",
    );
    let mut c = relay.connect();
    assert_eq!(c.cmd("EHLO t.test").code, 250);
    c.cmd("MAIL FROM:<a@b.test>").assert(250, "2.1.0");
    c.cmd("RCPT TO:<x@example.test>").assert(250, "2.1.5");
    let started = Instant::now();
    let mut closed_by = None;
    for _ in 0..10 {
        if c.try_send(b"BDAT 1\r\nx").is_err() {
            break;
        }
        let r = c.reply();
        if r.code != 250 {
            closed_by = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(900));
    }
    let reply = closed_by.unwrap_or_else(|| c.reply());
    reply.assert(421, "4.4.2");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "cut off after {took:?}, not near the 3 s deadline"
    );
}

io_tests!(
    bdat_trickle_is_cut_at_the_total_deadline,
    data_trickle_is_cut_at_the_total_deadline,
    junk_commands_end_the_session,
);
