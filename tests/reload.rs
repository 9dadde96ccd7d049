//! SIGHUP reloads the configuration without dropping anything: routes and relay access
//! change for new connections and deliveries, what needs a restart is logged as such, a
//! configuration that fails validation is refused with one log line and the old one kept,
//! and the server never stops. Both I/O drivers.

mod common;

use std::time::Duration;

use common::*;

fn write_config(relay: &Relay, next_hop: std::net::SocketAddr, extra: &str) {
    std::fs::write(
        relay.config_path(),
        config(&format!(
            "[delivery]\nretry_schedule_secs = [1]\nroutes = {{ \"example.test\" = \"{next_hop}\" }}\n{extra}"
        )),
    )
    .expect("rewrite the config");
}

fn wait_log(relay: &Relay, what: &str, n: usize) -> String {
    wait_for(Duration::from_secs(10), what, || {
        let log = relay.stderr();
        if log.matches(what).count() >= n {
            Ok(log)
        } else {
            Err(log)
        }
    })
}

fn sighup_reloads_routes_and_relay_access(io: &str) {
    let a = Capture::start(io);
    let b = Capture::start(io);
    let spool = tempfile::tempdir().expect("spool");
    let mut opts = Opts::relay(io, spool.path(), &[], &[1], "");
    opts.config = config(&format!(
        "[delivery]\nretry_schedule_secs = [1]\nroutes = {{ \"example.test\" = \"{}\" }}\n",
        a.addr
    ));
    let mut relay = Relay::start_with(opts);
    send_one(
        relay.addr,
        "s@x.test",
        &["one@example.test"],
        b"Subject: 1\r\n\r\n1\r\n",
    )
    .assert(250, "2.0.0");
    a.wait_for(1, Duration::from_secs(20));

    // Routes: the next message goes to b.
    write_config(&relay, b.addr, "");
    relay.signal("HUP");
    wait_log(&relay, "SIGHUP: configuration reloaded", 1);
    send_one(
        relay.addr,
        "s@x.test",
        &["two@example.test"],
        b"Subject: 2\r\n\r\n2\r\n",
    )
    .assert(250, "2.0.0");
    b.wait_for(1, Duration::from_secs(20));
    assert_eq!(
        a.envelopes().len(),
        1,
        "the old route is not used after the reload"
    );

    // Relay access: with loopback out of mynetworks, a new connection may not relay.
    write_config(&relay, b.addr, "[relay]\nmynetworks = [\"192.0.2.0/24\"]\n");
    relay.signal("HUP");
    wait_log(&relay, "SIGHUP: configuration reloaded", 2);
    let mut c = relay.connect();
    assert_eq!(c.cmd("EHLO h.test").code, 250);
    c.cmd("MAIL FROM:<s@x.test>").assert(250, "2.1.0");
    c.cmd("RCPT TO:<three@example.test>").assert(550, "5.7.1");
    drop(c);

    // A bad configuration is refused; the running one stays.
    std::fs::write(relay.config_path(), "[limits]\nmax_recipients = 0\n").expect("write");
    relay.signal("HUP");
    let log = wait_log(&relay, "SIGHUP: reload refused", 1);
    assert!(log.contains("limits.max_recipients"), "{log}");
    let mut c = relay.connect();
    assert_eq!(c.cmd("EHLO h.test").code, 250);
    c.cmd("MAIL FROM:<s@x.test>").assert(250, "2.1.0");
    c.cmd("RCPT TO:<four@example.test>").assert(550, "5.7.1");
    drop(c);

    // What needs a restart is said so; the server goes on.
    write_config(&relay, b.addr, "");
    std::fs::write(
        relay.config_path(),
        format!(
            "node_id = 7\n{}",
            std::fs::read_to_string(relay.config_path()).expect("read")
        ),
    )
    .expect("write");
    relay.signal("HUP");
    let log = wait_log(&relay, "needing a restart to take effect: node_id", 1);
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        relay.try_wait_exit(Duration::from_millis(300)).is_none(),
        "SIGHUP never stops the server"
    );
    send_one(
        relay.addr,
        "s@x.test",
        &["five@example.test"],
        b"Subject: 5\r\n\r\n5\r\n",
    )
    .assert(250, "2.0.0");
    b.wait_for(2, Duration::from_secs(20));
    relay.terminate();
}

io_tests!(sighup_reloads_routes_and_relay_access);
