//! Past one machine: two relay nodes behind HAProxy (`send-proxy-v2`, `check-send-proxy`,
//! `option smtpchk`; the deployment of `contrib/haproxy.cfg`), each with its own spool and
//! node number.
//!
//! - Load goes through the balancer; one node is SIGKILLed mid-run and restarted on its
//!   spool: the sink's manifest check finds no acknowledged message lost.
//! - A client outside `mynetworks` is refused relay through the balancer, although the
//!   balancer's own address is inside it.
//! - A node's spool copied to another node (after the first died) is recovered and
//!   delivered there, its messages keeping their queue IDs.
//!
//! Needs `haproxy` (Debian: `apt-get install haproxy`); without it the tests say so and
//! pass. Both I/O drivers.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn have_haproxy() -> bool {
    let ok = Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("haproxy is not installed: skipping (apt-get install haproxy)");
    }
    ok
}

/// HAProxy in the foreground on `front`, balancing over `nodes` (their PROXY listeners).
struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(front: SocketAddr, nodes: &[SocketAddr]) -> Haproxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let template =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/haproxy.cfg"))
                .expect("contrib/haproxy.cfg");
        // The shipped file's frontend and servers, pointed at this test's ports, with quick
        // health checks.
        let mut cfg = String::new();
        for line in template.lines() {
            let t = line.trim_start();
            if t.starts_with("bind ") {
                cfg.push_str(&format!("    bind {front}\n"));
            } else if t.starts_with("server ") {
                continue;
            } else if t.starts_with("maxconn ") {
                // Within a test process's open-file limit.
                cfg.push_str("    maxconn 1000\n");
            } else if t.starts_with("daemon")
                || t.starts_with("user ")
                || t.starts_with("group ")
                || t.starts_with("chroot ")
                || t.starts_with("log ")
                || t.starts_with("stats socket")
            {
                continue;
            } else {
                cfg.push_str(line);
                cfg.push('\n');
            }
            if t.starts_with("backend ") {
                for (i, n) in nodes.iter().enumerate() {
                    cfg.push_str(&format!(
                        "    server node{i} {n} send-proxy-v2 check check-send-proxy inter 300 fall 2 rise 1\n"
                    ));
                }
            }
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).expect("write haproxy.cfg");
        let check = Command::new("haproxy")
            .args(["-c", "-f"])
            .arg(&path)
            .output()
            .expect("haproxy -c");
        assert!(
            check.status.success(),
            "haproxy -c refused the config:\n{cfg}\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("log");
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("haproxy");
        let hp = Haproxy { child, _dir: dir };
        wait_for(Duration::from_secs(10), "haproxy's frontend", || {
            TcpStream::connect(front)
                .map(drop)
                .map_err(|e| e.to_string())
        });
        hp
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Relay options for node `n`: its own spool, node number, a PROXY listener on `proxy`,
/// mynetworks = the balancer's address only, `example.test` routed to `next_hop`.
fn node_opts(
    io: &str,
    n: u16,
    spool: &std::path::Path,
    proxy: SocketAddr,
    next_hop: SocketAddr,
) -> Opts {
    let mut opts =
        Opts::relay(io, spool, &[("example.test", next_hop)], &[1], "").on_port(free_port());
    opts.config = format!(
        "node_id = {n}\n{}\n[proxy]\nlisten = [\"{proxy}\"]\n[relay]\nmynetworks = [\"127.0.0.1/32\"]\n",
        opts.config
    );
    opts
}

/// Waits until an SMTP session through the balancer gets its banner (a node is up and
/// checked).
fn wait_banner(front: SocketAddr) {
    wait_for(Duration::from_secs(15), "a banner through haproxy", || {
        let mut c = Client::connect(front);
        c.set_read_timeout(Duration::from_secs(2));
        match c.try_reply() {
            Ok(r) if r.code == 220 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

/// HAProxy in front of two nodes (their own spools, node numbers 1 and 2), delivering to a
/// sink that checks `loadgen send`'s manifest.
struct Farm {
    _work: tempfile::TempDir,
    manifest: std::path::PathBuf,
    sink: Sink,
    spools: Vec<std::path::PathBuf>,
    opts: Vec<Opts>,
    nodes: Vec<Relay>,
    front: SocketAddr,
    _hp: Haproxy,
}

impl Farm {
    /// `None` (with a note) where haproxy is not installed.
    fn start(io: &str) -> Option<Farm> {
        if !have_haproxy() {
            return None;
        }
        let work = tempfile::tempdir().expect("tempdir");
        let manifest = work.path().join("manifest");
        let m = manifest.to_str().expect("path");
        let sink = Sink::start(&["--check-manifest", m, "--manifest-wait", "5"]);
        let proxies: Vec<SocketAddr> = (0..2)
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
            .collect();
        let spools: Vec<_> = (0..2)
            .map(|i| work.path().join(format!("spool{i}")))
            .collect();
        let opts: Vec<Opts> = (0..2)
            .map(|i| node_opts(io, i as u16 + 1, &spools[i], proxies[i], sink.addr))
            .collect();
        let nodes: Vec<Relay> = opts.iter().map(|o| Relay::start_with(o.clone())).collect();
        let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let hp = Haproxy::start(front, &proxies);
        wait_banner(front);
        Some(Farm {
            _work: work,
            manifest,
            sink,
            spools,
            opts,
            nodes,
            front,
            _hp: hp,
        })
    }

    /// 2000 messages through the balancer; `disrupt` runs 0.8 s in and must leave every
    /// node running again. Then every queue drains, and the sink's manifest check must
    /// find no acknowledged message lost or corrupted. Returns how many were accepted.
    fn load_with(mut self, io: &str, disrupt: impl FnOnce(&mut Farm)) -> u64 {
        let m = self.manifest.to_str().expect("path").to_string();
        let mut send = SendRun::spawn(
            self.front,
            &[
                "--messages",
                "2000",
                "--connections",
                "10",
                "--pipelining",
                "--rate",
                "1000",
                "--manifest",
                &m,
                "--timeout",
                "10",
                "--give-up-after",
                "20",
            ],
        );
        std::thread::sleep(Duration::from_millis(800));
        disrupt(&mut self);
        let sent = send.wait(Duration::from_secs(90));
        assert_eq!(
            sent.code,
            Some(0),
            "loadgen send through haproxy: {}",
            sent.output
        );
        let accepted = jnum(&sent.json, "messages.accepted");
        assert!(accepted > 0, "{}", sent.output);
        for spool in &self.spools {
            wait_queue_empty(spool, Duration::from_secs(30));
        }
        let (code, report) = self.sink.stop();
        let mf = &report["manifest"];
        eprintln!(
            "farm ({io}): {accepted} accepted through haproxy; sink: lost {}, corrupted {}, duplicates {}",
            jnum(mf, "lost"),
            jnum(mf, "corrupted"),
            jnum(mf, "duplicates")
        );
        assert_eq!(jnum(mf, "entries"), accepted, "{report:#}");
        assert_eq!(
            jnum(mf, "lost"),
            0,
            "ACKNOWLEDGED MESSAGES LOST: {report:#}"
        );
        assert_eq!(jnum(mf, "corrupted"), 0, "{report:#}");
        assert_eq!(code, Some(0), "{}", self.sink.output());
        accepted
    }
}

fn kill_a_node_behind_haproxy_and_lose_nothing(io: &str) {
    let Some(farm) = Farm::start(io) else {
        return;
    };
    assert!(
        farm.nodes[0].stderr().contains("as node 1"),
        "{}",
        farm.nodes[0].stderr()
    );
    // Relay access is the client's, not the balancer's: a client on 127.0.0.5 (outside
    // mynetworks) through 127.0.0.1 (inside) may not relay.
    let mut outside = Client::connect_from(farm.front, "127.0.0.5".parse().unwrap());
    let banner = outside.reply();
    assert_eq!(banner.code, 220, "{}", banner.wire());
    assert_eq!(outside.cmd("EHLO outside.test").code, 250);
    outside
        .cmd("MAIL FROM:<a@outside.test>")
        .assert(250, "2.1.0");
    outside.cmd("RCPT TO:<x@example.test>").assert(550, "5.7.1");
    farm.load_with(io, |f| {
        f.nodes[0].kill9();
        f.nodes[0] = Relay::start_with(f.opts[0].clone());
    });
}

fn a_dead_nodes_spool_is_delivered_by_another_node(io: &str) {
    let work = tempfile::tempdir().expect("tempdir");
    let spool = work.path().join("spool-a");
    // Node A's next hop is down: everything stays queued.
    let down: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy_a: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut a = Relay::start_with(node_opts(io, 1, &spool, proxy_a, down));
    let mut ids = Vec::new();
    for i in 0..3 {
        let reply = send_one(
            a.addr,
            "a@example.org",
            &["x@example.test"],
            format!("Subject: m{i}\r\n\r\nbody {i}\r\n").as_bytes(),
        );
        ids.push(reply.queued_id());
    }
    a.kill9();
    // The spool moves to node B (another node number, another directory).
    let copy = work.path().join("spool-b");
    let out = Command::new("cp")
        .arg("-a")
        .arg(&spool)
        .arg(&copy)
        .output()
        .expect("cp");
    assert!(out.status.success());
    let capture = Capture::start(io);
    let proxy_b: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let b = Relay::start_with(node_opts(io, 2, &copy, proxy_b, capture.addr));
    let got = capture.wait_for(3, Duration::from_secs(30));
    for id in &ids {
        assert!(
            got.iter()
                .any(|e| String::from_utf8_lossy(&e.data).contains(&format!(" id {id}"))),
            "message {id} from node A's spool, delivered by node B with its ID: {:?}",
            got.iter()
                .map(|e| String::from_utf8_lossy(&e.data[..200.min(e.data.len())]).into_owned())
                .collect::<Vec<_>>()
        );
    }
    wait_queue_empty(&copy, Duration::from_secs(10));
    drop(b);
}

/// SIGTERM on one node: it stops accepting at once (so HAProxy's next health check fails
/// and new connections go to the other node), finishes its transactions and exits 0; what
/// it had queued is delivered when it starts again. No acknowledged message is lost.
fn drain_a_node_behind_haproxy(io: &str) {
    let Some(farm) = Farm::start(io) else {
        return;
    };
    farm.load_with(io, |f| {
        // Exits 0 once its transactions are done (asserted inside); back, it delivers
        // its queue.
        f.nodes[0].terminate();
        f.nodes[0] = Relay::start_with(f.opts[0].clone());
    });
}

io_tests!(
    kill_a_node_behind_haproxy_and_lose_nothing,
    drain_a_node_behind_haproxy,
    a_dead_nodes_spool_is_delivered_by_another_node,
);
