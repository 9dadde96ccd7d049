//! Client addresses: `send --source-addr` and `--source-range` bind connections to local
//! addresses on 127.0.0.0/8 that the server sees as the peer, plain and with STARTTLS; bad
//! addresses and ranges are usage errors.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn source_addr_is_the_peer_the_server_sees() {
    let fake = FakeSmtp::start(|_, _| None, None);
    let dir = Scratch::new("source-addr");
    let dj = dir.path("send.json");
    let o = send(&[
        "--target",
        &fake.addr,
        "--source-addr",
        "127.0.0.2",
        "--connections",
        "2",
        "--messages",
        "6",
        "--json",
        dj.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", o.stderr);
    assert_eq!(fake.count(|c| &c.messages), 6);
    let peers = fake.peers();
    assert_eq!(peers.len(), 2);
    assert!(peers.iter().all(|&p| p == ip("127.0.0.2")), "{peers:?}");
    let d = read_json(&dj);
    assert_eq!(d["config"]["source_addr"], "127.0.0.2");
    assert!(d["config"]["source_range"].is_null());
}

#[test]
fn source_range_spreads_connections_round_robin() {
    let fake = FakeSmtp::start(|_, _| None, None);
    let o = send(&[
        "--target",
        &fake.addr,
        "--source-range",
        "127.0.0.0/29",
        "--connections",
        "3",
        "--new-connection-per-message",
        "--messages",
        "12",
    ]);
    assert!(o.status.success(), "{}", o.stderr);
    let mut seen: BTreeMap<IpAddr, u32> = BTreeMap::new();
    for p in fake.peers() {
        *seen.entry(p).or_default() += 1;
    }
    // Twelve connections over .1 to .6 (.0 is the network, .7 the broadcast address).
    let want: BTreeMap<IpAddr, u32> = (1..=6).map(|i| (ip(&format!("127.0.0.{i}")), 2)).collect();
    assert_eq!(seen, want);
}

#[test]
fn starttls_connections_come_from_the_source_address_too() {
    let dir = Scratch::new("source-tls");
    let certs = make_certs(&dir);
    let dj = dir.path("send.json");
    let sink = Sink::start(&[
        "--tls-cert",
        certs.chain.to_str().unwrap(),
        "--tls-key",
        certs.key.to_str().unwrap(),
    ]);
    // The sink does not report peers; a balancer in front of it does.
    let lb = Balancer::start(vec![sink.addr]);
    let o = send(&[
        "--target",
        &lb.addr,
        "--starttls",
        "--source-range",
        "127.0.0.8/30",
        "--connections",
        "4",
        "--messages",
        "8",
        "--json",
        dj.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", o.stderr);
    let d = read_json(&dj);
    assert_eq!(num(&d, "tls.sessions"), 4);
    assert_eq!(num(&d, "messages.accepted"), 8);
    let mut peers = lb.peers();
    peers.sort();
    let want = [
        ip("127.0.0.9"),
        ip("127.0.0.9"),
        ip("127.0.0.10"),
        ip("127.0.0.10"),
    ];
    assert_eq!(peers, want);
    let _ = sink.stop();
}

#[test]
fn bad_source_addresses_and_ranges_exit_2_before_connecting() {
    let fake = FakeSmtp::start(|_, _| None, None);
    for (args, why) in [
        (["--source-addr", "127.0.0.300"], "not an IP address"),
        (
            ["--source-addr", "0.0.0.0"],
            "not an address a connection can come from",
        ),
        (["--source-range", "127.0.0.0"], "expected ADDRESS/PREFIX"),
        (["--source-range", "127.0.0.0/33"], "is not 0 to 32"),
        (
            ["--source-range", "127.0.0.1/24"],
            "the range is 127.0.0.0/24",
        ),
        // TEST-NET-3 (RFC 5737) is on no machine.
        (
            ["--source-addr", "203.0.113.9"],
            "cannot bind to source address 203.0.113.9",
        ),
        (["--source-addr", "::1"], "has no IPv6 address"),
    ] {
        let o = run(
            Command::new(bin())
                .args([
                    "send",
                    "--no-progress",
                    "--target",
                    &fake.addr,
                    "--messages",
                    "1",
                ])
                .args(args),
            Duration::from_secs(30),
        );
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
        assert!(
            o.stderr.starts_with("loadgen: ") && o.stderr.contains(why),
            "{args:?}: {}",
            o.stderr
        );
    }
    let o = run(
        Command::new(bin()).args([
            "send",
            "--target",
            &fake.addr,
            "--source-addr",
            "127.0.0.2",
            "--source-range",
            "127.0.0.0/24",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(o.status.code(), Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("cannot be used with"), "{}", o.stderr);
    assert_eq!(fake.count(|c| &c.connections), 0);
}
