//! The test suite's authoritative DNS fixture (`tests/dnsfix`) as a program, for
//! benchmarks that need MX answers on loopback (`benches/mx_compare.sh`).
//!
//! `cargo run --release --example dns_fixture -- DOMAINS MX_IP TTL SECONDS` serves
//! `d1.test` … `dDOMAINS.test`, each `MX 10 mx.bench.test`, with `mx.bench.test A MX_IP`,
//! all with the given TTL, on 127.0.0.1 at a random port. It prints `dns on ADDR` first,
//! then `queries N` (the running total of queries answered) every second, for SECONDS.

#[path = "../tests/dnsfix/mod.rs"]
mod dnsfix;

use std::net::Ipv4Addr;
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut next = |what: &str, default: &str| -> String {
        let v = args.next().unwrap_or_else(|| default.to_string());
        if v.is_empty() {
            eprintln!("dns_fixture: {what} is empty");
            std::process::exit(2);
        }
        v
    };
    let parse_or_exit = |what: &str, v: String| -> u64 {
        v.parse().unwrap_or_else(|_| {
            eprintln!("dns_fixture: {what} must be a number, not {v:?}");
            std::process::exit(2)
        })
    };
    let domains = parse_or_exit("DOMAINS", next("DOMAINS", "1"));
    let mx_ip: Ipv4Addr = next("MX_IP", "127.0.0.1").parse().unwrap_or_else(|e| {
        eprintln!("dns_fixture: MX_IP: {e}");
        std::process::exit(2)
    });
    let ttl = parse_or_exit("TTL", next("TTL", "300")) as u32;
    let seconds = parse_or_exit("SECONDS", next("SECONDS", "60"));
    let dns = dnsfix::DnsFixture::start();
    dns.a("mx.bench.test", mx_ip, ttl);
    for i in 1..=domains {
        dns.mx(&format!("d{i}.test"), 10, "mx.bench.test", ttl);
    }
    println!("dns on {}", dns.addr);
    for _ in 0..seconds {
        std::thread::sleep(Duration::from_secs(1));
        println!("queries {}", dns.total_queries());
    }
}
