//! `loadgen sink`: runs the verifying SMTP sink — one current-thread runtime per thread, each
//! with its own SO_REUSEPORT listener so that no connection crosses threads — and stops on
//! SIGINT/SIGTERM, `--expect` or `--timeout`, then reports and checks the manifest.

use crate::cli::SinkArgs;
use crate::report::{Faults, SinkReport, SinkStats};
use crate::smtp_server::{serve, ServerConfig, ServerShared};
use crate::Failure;
use socket2::{Domain, Protocol, Socket, Type};
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long connections may go on after the stop decision, so that the last messages' 250
/// replies reach their senders before the sockets close.
const GRACE: Duration = Duration::from_millis(1000);

fn bind(addr: SocketAddr, n: usize) -> std::io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    if addr.port() != 0 {
        // SO_REUSEPORT would let us join a port someone else already listens on and
        // silently split the traffic with them; a plain bind first refuses that.
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
    }
    let mut out = Vec::with_capacity(n);
    let mut actual = addr;
    for i in 0..n {
        let s = Socket::new(
            Domain::for_address(actual),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if actual.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&actual.into())?;
        s.listen(4096)?;
        s.set_nonblocking(true)?;
        if i == 0 {
            // With port 0 the others must join the port the kernel picked for the first.
            actual = s
                .local_addr()?
                .as_socket()
                .ok_or_else(|| std::io::Error::other("listener has no socket address"))?;
        }
        out.push(s.into());
    }
    Ok((out, actual))
}

fn worker(
    listener: std::net::TcpListener,
    sh: Arc<ServerShared>,
    mut stop: watch::Receiver<bool>,
) -> Result<SinkStats, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    let stats = Rc::new(RefCell::new(SinkStats::default()));
    let active = Rc::new(Cell::new(0usize));
    let res = local.block_on(&rt, async {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| format!("cannot register listener: {e}"))?;
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        stats.borrow_mut().connections += 1;
                        let (sh, st, ac) = (sh.clone(), stats.clone(), active.clone());
                        tokio::task::spawn_local(async move { serve(s, &sh, st, ac).await });
                    }
                    // Out of descriptors or an aborted handshake: keep serving the rest.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
            }
        }
        drop(listener);
        let deadline = Instant::now() + GRACE;
        while active.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok::<(), String>(())
    });
    // Dropping the set cancels connections still open; their guards record them.
    drop(local);
    res?;
    let s = std::mem::take(&mut *stats.borrow_mut());
    Ok(s)
}

pub fn run(a: SinkArgs) -> Result<i32, Failure> {
    let addr = a
        .listen
        .to_socket_addrs()
        .map_err(|e| Failure::Usage(format!("invalid --listen '{}': {e}", a.listen)))?
        .next()
        .ok_or_else(|| Failure::Usage(format!("invalid --listen '{}': no address", a.listen)))?;
    for (name, v) in [
        ("--tempfail-pct", a.tempfail_pct),
        ("--permfail-pct", a.permfail_pct),
    ] {
        if !(0.0..=100.0).contains(&v) {
            return Err(Failure::Usage(format!("{name} must be between 0 and 100")));
        }
    }
    if a.tempfail_pct + a.permfail_pct > 100.0 {
        return Err(Failure::Usage(
            "--tempfail-pct plus --permfail-pct exceeds 100".into(),
        ));
    }
    if a.expect == Some(0) {
        return Err(Failure::Usage("--expect must be at least 1".into()));
    }
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        return Err(Failure::Usage("--threads must be at least 1".into()));
    }
    let max_size = a
        .max_size
        .as_deref()
        .map(crate::message::parse_bytes)
        .transpose()
        .map_err(Failure::Usage)?;

    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(crate::tls::server_config(c, k).map_err(Failure::Usage)?),
        _ => None,
    };
    if let Some(p) = &a.json {
        crate::check_writable("--json", p)?;
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Runtime(format!("cannot start runtime: {e}")))?;
    // Signal handlers go in before the "listening on" line, so a test that signals as soon as
    // it reads the line never hits the default action.
    let (mut sigint, mut sigterm) = crate::termination_signals(&rt)?;

    let (listeners, bound) = bind(addr, threads)
        .map_err(|e| Failure::Runtime(format!("cannot listen on {addr}: {e}")))?;
    let sh = Arc::new(ServerShared::new(ServerConfig {
        hostname: a.hostname.clone(),
        tempfail: a.tempfail_pct / 100.0,
        permfail: a.permfail_pct / 100.0,
        stage: a.fail_stage,
        delay: (a.delay_ms > 0).then(|| Duration::from_millis(a.delay_ms)),
        max_size: max_size.map_or(100 << 20, |v| v as u64),
        expect: a.expect,
        tls: tls.clone(),
    }));
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut handles = Vec::new();
    for l in listeners {
        let (sh, rx) = (sh.clone(), stop_rx.clone());
        let h = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || worker(l, sh, rx))
            .map_err(|e| Failure::Runtime(format!("cannot start thread: {e}")))?;
        handles.push(h);
    }
    println!("listening on {bound}");
    let _ = std::io::stdout().flush();

    let timeout = a.timeout.map(Duration::from_secs_f64);
    let reason = rt.block_on(async {
        let expect = async {
            if a.expect.is_some() {
                sh.expect_reached.notified().await
            } else {
                std::future::pending().await
            }
        };
        let limit = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigint.recv() => "signal",
            _ = sigterm.recv() => "signal",
            _ = expect => "expect",
            _ = limit => "timeout",
        }
    });
    let _ = stop_tx.send(true);
    let mut stats = SinkStats::default();
    for h in handles {
        match h.join() {
            Ok(Ok(s)) => stats.merge(&s),
            Ok(Err(e)) => return Err(Failure::Runtime(e)),
            Err(_) => return Err(Failure::Runtime("a sink thread panicked".into())),
        }
    }
    let elapsed = started.elapsed();

    let manifest = match &a.check_manifest {
        Some(p) => {
            let wait = Duration::from_secs_f64(a.manifest_wait);
            let (ids, complete) =
                crate::manifest::read_complete(p, wait).map_err(Failure::Runtime)?;
            Some(crate::manifest::check(p, &ids, complete, &sh.ids))
        }
        None => None,
    };
    let report = SinkReport::build(
        &stats,
        sh.ids.unique(),
        bound.to_string(),
        threads,
        reason.to_string(),
        elapsed,
        Faults {
            tempfail_pct: a.tempfail_pct,
            permfail_pct: a.permfail_pct,
            stage: a.fail_stage.name().to_string(),
            delay_ms: a.delay_ms,
        },
        tls.is_some(),
        manifest,
    );
    print!("{}", report.human());
    let _ = std::io::stdout().flush();
    if let Some(p) = &a.json {
        crate::write_json(p, &report)?;
    }
    if report.manifest.as_ref().is_some_and(|m| m.failed()) {
        return Ok(crate::EXIT_LOSS);
    }
    if reason == "timeout" && a.expect.is_some() {
        eprintln!(
            "loadgen: sink timed out with {} of {} expected messages",
            report.messages.unique,
            a.expect.unwrap_or(0)
        );
        return Ok(1);
    }
    Ok(0)
}
