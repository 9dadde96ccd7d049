//! The `ringrelay` command line (DESIGN.md's contract): `serve`, `queue`, `check-config`.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 usage or configuration error, with a
//! one-line reason on stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use ringrelay::config::{Config, IoMode};
use ringrelay::observe::http::MetricsServer;
use ringrelay::observe::metrics::Registry;
use ringrelay::qmgr::{RelayConfig, RelayService};
use ringrelay::server::ConfigSource;
use ringrelay::server::Lifecycle;
use ringrelay::sink::{SinkHandler, SinkTotals};
use ringrelay::spool::control::{self, Outcome};
use ringrelay::spool::inspect;
use ringrelay::Server;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ringrelay",
    version,
    about = "An SMTP relay on a thread-per-core io_uring runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the SMTP server.
    Serve(ServeArgs),
    /// Inspect or act on the spool's queue.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Make a line for auth.users_file: reads the password on standard input (one line;
    /// never echoed or logged) and prints `NAME:HASH` (Argon2id).
    Passwd {
        /// The user name.
        name: String,
    },
    /// Validate a configuration file and print the effective settings.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (every key optional).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable; replaces `listen` from the config).
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Shard threads (0 = one per available core).
    #[arg(long)]
    shards: Option<usize>,
    /// I/O driver: auto, uring or epoll.
    #[arg(long, value_name = "auto|uring|epoll")]
    io: Option<IoMode>,
    /// Spool directory.
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
    /// Accept and discard every message, with no spool (measures the front end alone).
    #[arg(long)]
    sink: bool,
    /// Static route DOMAIN=HOST:PORT (repeatable).
    #[arg(long = "route", value_name = "DOMAIN=HOST:PORT")]
    route: Vec<String>,
    /// Send everything to HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    smarthost: Option<String>,
    /// DNS server IP:PORT (repeatable).
    #[arg(long = "nameserver", value_name = "IP:PORT")]
    nameserver: Vec<SocketAddr>,
    /// Log format on stderr: text (Postfix-shaped delivery lines) or json (one JSON object
    /// per line, the same fields).
    #[arg(long = "log-format", value_name = "text|json", default_value = "text")]
    log_format: LogFormat,
    /// TLS certificate chain (PEM): STARTTLS is offered (with --tls-key).
    #[arg(long = "tls-cert", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long = "tls-key", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// The queue commands. None of them creates a spool; all work on a running server and,
/// but `flush`, on a stopped spool.
/// `serve --log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum QueueAction {
    /// List queued messages: size, arrival, sender, and each pending recipient with its
    /// attempts, last reply and next attempt (held messages marked `!`).
    List(QueueArgs),
    /// Queue statistics.
    Stats(QueueArgs),
    /// Retry every deferred message not on hold now (a running server only), without
    /// moving it along the retry schedule.
    Flush(QueueArgs),
    /// Remove one message (no bounce).
    Remove {
        /// Queue ID.
        id: String,
        #[command(flatten)]
        args: QueueArgs,
    },
    /// Put one message on hold: it stays queued and is not attempted until released.
    Hold {
        /// Queue ID.
        id: String,
        #[command(flatten)]
        args: QueueArgs,
    },
    /// Release one message from hold: it is attempted now.
    Release {
        /// Queue ID.
        id: String,
        #[command(flatten)]
        args: QueueArgs,
    },
}

#[derive(Args)]
struct QueueArgs {
    /// TOML configuration file: its `spool.dir` is the spool (unless --spool is given).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Spool directory (default: the config's `spool.dir`, else ./spool).
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
    /// JSON output on standard output (errors still go to standard error).
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // One line, as the contract asks: clap's first line without its "error: ".
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid usage");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            return fail(2, &format!("{first} (see --help)"));
        }
    };
    // Our own lines at info; dependencies' (the resolver's internals, rustls) only from
    // warn up, unless RUST_LOG asks for more.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,hickory_proto=warn,hickory_resolver=warn,rustls=warn",
        )
    });
    let json = matches!(&cli.command, Command::Serve(a) if a.log_format == LogFormat::Json);
    if json {
        ringrelay::observe::log::set_json(true);
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(filter)
            .init();
    }
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Passwd { name } => passwd(&name),
        Command::CheckConfig { config } => check_config(config.as_deref()),
        Command::Queue { action } => queue(action),
    }
}

/// `ringrelay check-config`: refuses what `serve` would refuse (exit 2, the same line),
/// warns on stderr about what is allowed but looks wrong, and prints the effective
/// configuration, defaults included, as TOML that reads back to the same configuration.
fn check_config(path: Option<&std::path::Path>) -> ExitCode {
    let config = match Config::load(path).and_then(|c| c.check_files().map(|()| c)) {
        Ok(c) => c,
        Err(e) => return fail(2, &e.to_string()),
    };
    let text = match config.to_toml() {
        Ok(t) => t,
        Err(e) => return fail(1, &e.to_string()),
    };
    for warning in config.warnings() {
        eprintln!("ringrelay: warning: {warning}");
    }
    let source = path.map_or_else(
        || "no file: the defaults".to_string(),
        |p| p.display().to_string(),
    );
    println!("# ringrelay check-config: {source}; the configuration is valid.");
    println!("# Every key with its effective value, defaults included. Resolved at start:");
    if config.hostname.is_empty() {
        println!(
            "#   hostname \"\" is the system host name: {}",
            config.effective_hostname()
        );
    }
    if config.shards == 0 {
        println!(
            "#   shards 0 is one per available core: {}",
            config.effective_shards()
        );
    }
    println!("#   spool directory: {}", config.spool.dir.display());
    print!("{text}");
    ExitCode::SUCCESS
}

/// `ringrelay passwd NAME`: one line from standard input is the password (a terminal's
/// echo is turned off while it is typed); prints `NAME:HASH`.
fn passwd(name: &str) -> ExitCode {
    if let Err(why) = ringrelay::passwd::check_name(name) {
        return fail(2, &format!("user name {name:?}: {why}"));
    }
    let password = match read_password() {
        Ok(p) => p,
        Err(e) => return fail(1, &format!("cannot read the password: {e}")),
    };
    if password.is_empty() {
        return fail(2, "the password is empty");
    }
    match ringrelay::passwd::hash_password(password.as_bytes()) {
        Ok(hash) => {
            println!("{name}:{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &format!("cannot hash the password: {e}")),
    }
}

/// One line from standard input, without its line ending; with echo off while a terminal
/// is reading it.
fn read_password() -> std::io::Result<String> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    // SAFETY: termios is plain data (all-zero is a valid value to be overwritten), and
    // tcgetattr/tcsetattr only read and write the struct we pass, for fd 0.
    let saved = tty.then(|| unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) != 0 {
            return None;
        }
        let mut quiet = t;
        quiet.c_lflag &= !libc::ECHO;
        libc::tcsetattr(0, libc::TCSANOW, &quiet);
        eprint!("password: ");
        Some(t)
    });
    let mut line = String::new();
    let result = stdin.lock().read_line(&mut line);
    if let Some(Some(t)) = saved {
        // SAFETY: as above; restores the settings read before.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &t);
        }
        eprintln!();
    }
    result?;
    let trimmed = line.strip_suffix('\n').unwrap_or(&line);
    Ok(trimmed.strip_suffix('\r').unwrap_or(trimmed).to_string())
}

fn fail(code: u8, why: &str) -> ExitCode {
    eprintln!("ringrelay: {why}");
    ExitCode::from(code)
}

/// `$NOTIFY_SOCKET`, set by systemd for a `Type=notify` service; read once, here, so the
/// library reads no environment.
fn notify_socket() -> Option<std::ffi::OsString> {
    std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())
}

/// Sends `state` (`READY=1`, `STOPPING=1`, `STATUS=…` lines) to the service manager, as
/// `sd_notify(3)` does: one datagram to a unix socket, whose name starts with `@` when it
/// is in the abstract namespace.
fn sd_notify(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let name = socket.as_bytes();
    let addr = match name.strip_prefix(b"@") {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name)?
        }
        None if name.starts_with(b"/") => SocketAddr::from_pathname(socket)?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor @abstract",
            ))
        }
    };
    let sent = UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(std::io::Error::other("the datagram was cut short"));
    }
    Ok(())
}

/// The configuration `serve` runs with: the file, then the command line's overrides and
/// the environment's A/B switches; validated, with the files it names checked. Also what
/// SIGHUP reads again.
fn serve_config(args: &ServeArgs) -> Result<Config, ringrelay::config::ConfigError> {
    let mut config = Config::load(args.config.as_deref())?;
    if !args.listen.is_empty() {
        config.listen = args.listen.clone();
    }
    if let Some(n) = args.shards {
        config.shards = n;
    }
    if let Some(io) = args.io {
        config.io = io;
    }
    if let Some(dir) = &args.spool {
        config.spool.dir = dir.clone();
    }
    for route in &args.route {
        config.apply_route(route)?;
    }
    if let Some(smarthost) = &args.smarthost {
        config.delivery.smarthost = smarthost.clone();
    }
    config
        .delivery
        .nameservers
        .extend(args.nameserver.iter().copied());
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls.cert_file = cert.clone();
        config.tls.key_file = key.clone();
    }
    for warning in config.apply_env() {
        tracing::warn!("{warning}");
    }
    config.validate()?;
    config.check_files()?;
    Ok(config)
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match serve_config(&args) {
        Ok(c) => c,
        Err(e) => return fail(2, &e.to_string()),
    };
    let sink_mode = args.sink;
    let reload_args = Arc::new(args);
    let source = ConfigSource(Arc::new(move || {
        serve_config(&reload_args).map_err(|e| e.to_string())
    }));
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let notify = notify_socket();
    let events = move |event: Lifecycle<'_>| {
        let Some(socket) = &notify else { return };
        let state = match event {
            Lifecycle::Ready(addrs) => {
                let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                format!("READY=1\nSTATUS=listening on {}", addrs.join(", "))
            }
            Lifecycle::Stopping => {
                "STOPPING=1\nSTATUS=stopping: finishing transactions in flight".to_string()
            }
            _ => return,
        };
        if let Err(e) = sd_notify(socket, &state) {
            tracing::warn!("cannot tell the service manager at NOTIFY_SOCKET {socket:?}: {e}");
        }
    };
    let registry = Registry::new();
    let _metrics = match config.metrics.listen_addr() {
        Some(addr) => match MetricsServer::start(addr, registry.clone()) {
            Ok(m) => {
                tracing::info!("metrics on http://{}/metrics", m.local_addr());
                Some(m)
            }
            Err(e) => return fail(1, &e.to_string()),
        },
        None => None,
    };
    let server = Server::new(config.clone())
        .with_metrics(registry.clone())
        .reload_from(source);
    let result = if sink_mode {
        let totals = Arc::new(SinkTotals::default());
        let shard_totals = Arc::clone(&totals);
        let r =
            server.run_with_events(move |_| SinkHandler::new(Arc::clone(&shard_totals)), events);
        if r.is_ok() {
            tracing::info!(
                "sink: accepted {} messages, {} recipients, {} bytes",
                totals.messages.load(Ordering::Relaxed),
                totals.recipients.load(Ordering::Relaxed),
                totals.bytes.load(Ordering::Relaxed)
            );
        }
        r
    } else {
        let relay = RelayConfig::from_config(&config);
        let mut relay = relay;
        relay.metrics = registry;
        let service = match RelayService::open(relay, &config.spool.dir, config.effective_shards())
        {
            Ok(s) => s,
            Err(e) => return fail(1, &e.to_string()),
        };
        server.run_with_events(move |shard| service.handler(shard), events)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &e.to_string()),
    }
}

/// The spool directory a queue command works on: `--spool`, else `spool.dir` from
/// `--config`, else the default. A configuration that cannot be read is a usage error,
/// even beside `--spool` (as for `serve`).
fn spool_dir(args: &QueueArgs) -> Result<PathBuf, ExitCode> {
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return Err(fail(2, &e.to_string())),
    };
    Ok(args.spool.clone().unwrap_or(config.spool.dir))
}

/// Writes `text` to standard output. A reader that stops early (`| head`) is no failure.
fn emit(text: &str) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(1, &format!("cannot write to standard output: {e}")),
    }
}

/// Writes `value` as JSON (pretty) on standard output.
fn print_json(value: &impl serde::Serialize) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(j) => emit(&format!("{j}\n")),
        Err(e) => fail(1, &e.to_string()),
    }
}

fn queue(action: QueueAction) -> ExitCode {
    match action {
        QueueAction::List(args) => queue_list(&args),
        QueueAction::Stats(args) => queue_stats(&args),
        QueueAction::Flush(args) => queue_flush(&args),
        QueueAction::Remove { id, args } => queue_on_message(&id, &args, MessageAction::Remove),
        QueueAction::Hold { id, args } => queue_on_message(&id, &args, MessageAction::Hold),
        QueueAction::Release { id, args } => queue_on_message(&id, &args, MessageAction::Release),
    }
}

/// `queue list`: Postfix's `mailq` shape; one line per message (ID, `!` when on hold,
/// size, arrival, sender), then one per pending recipient with its delivery state. Written
/// as it is formatted, one message at a time (a million queued messages make hundreds of
/// megabytes of text, never held whole).
fn queue_list(args: &QueueArgs) -> ExitCode {
    let dir = match spool_dir(args) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let queue = match inspect::scan(&dir, true) {
        Ok(q) => q,
        Err(e) => return fail(1, &e.to_string()),
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &queue.json_list())
            .map_err(std::io::Error::from)
            .and_then(|()| std::io::Write::write_all(&mut out, b"\n"))
    } else {
        queue.write_text(&mut out)
    };
    finish_output(written.and_then(|()| std::io::Write::flush(&mut out)))
}

/// The end of streamed output. A reader that stops early (`| head`) is no failure.
fn finish_output(written: std::io::Result<()>) -> ExitCode {
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(1, &format!("cannot write to standard output: {e}")),
    }
}

/// `queue stats`: the totals only (no message is kept while the segments are read).
fn queue_stats(args: &QueueArgs) -> ExitCode {
    let dir = match spool_dir(args) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let stats = match inspect::scan(&dir, false) {
        Ok(q) => q.stats,
        Err(e) => return fail(1, &e.to_string()),
    };
    if args.json {
        return print_json(&stats);
    }
    emit(&format!(
        "messages {}\nrecipients {}\nheld {}\nbytes {}\nsegments {}\noldest_age_secs {}\nrunning {}\n",
        stats.messages,
        stats.recipients,
        stats.held,
        stats.bytes,
        stats.segments,
        stats.oldest_age_secs,
        stats.running
    ))
}

/// `queue flush`: only a running server has anything to flush; with none, it fails as
/// Postfix's `postqueue -f` does with the mail system down.
fn queue_flush(args: &QueueArgs) -> ExitCode {
    let dir = match spool_dir(args) {
        Ok(d) => d,
        Err(code) => return code,
    };
    match control::flush(&dir) {
        Ok(Outcome::Flushed(n)) if args.json => print_json(&serde_json::json!({
            "action": "flush",
            "flushed": n,
        })),
        Ok(Outcome::Flushed(n)) => emit(&format!(
            "{n} deferred message(s) scheduled for delivery now\n"
        )),
        Ok(_) => fail(
            1,
            &format!(
                "no server is running on spool {}: nothing to flush (every message not on hold is tried when it starts)",
                dir.display()
            ),
        ),
        Err(e) => fail(1, &e.to_string()),
    }
}

#[derive(Clone, Copy)]
enum MessageAction {
    Remove,
    Hold,
    Release,
}

/// `queue remove|hold|release ID`. Putting a held message on hold again, or releasing one
/// that is not held, changes nothing and succeeds (`"changed": false`).
fn queue_on_message(id: &str, args: &QueueArgs, action: MessageAction) -> ExitCode {
    let id: ringrelay::id::QueueId = match id.parse() {
        Ok(id) => id,
        Err(e) => return fail(2, &e),
    };
    let dir = match spool_dir(args) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let result = match action {
        MessageAction::Remove => control::remove(&dir, id),
        MessageAction::Hold => control::hold(&dir, id),
        MessageAction::Release => control::release(&dir, id),
    };
    let outcome = match result {
        Ok(o) => o,
        Err(e) => return fail(1, &e.to_string()),
    };
    let (json, text) = match outcome {
        Outcome::Removed => (
            serde_json::json!({"action": "remove", "id": id.to_string(), "removed": true}),
            format!("{id} removed"),
        ),
        Outcome::Held | Outcome::AlreadyHeld => {
            let changed = outcome == Outcome::Held;
            (
                serde_json::json!({"action": "hold", "id": id.to_string(), "held": true, "changed": changed}),
                if changed {
                    format!("{id} held")
                } else {
                    format!("{id} was on hold already")
                },
            )
        }
        Outcome::Released | Outcome::NotHeld => {
            let changed = outcome == Outcome::Released;
            (
                serde_json::json!({"action": "release", "id": id.to_string(), "held": false, "changed": changed}),
                if changed {
                    format!("{id} released")
                } else {
                    format!("{id} was not on hold")
                },
            )
        }
        Outcome::Delivering => {
            return fail(
                1,
                &format!("{id} is being delivered right now; try again in a moment"),
            )
        }
        Outcome::Absent | Outcome::Flushed(_) | Outcome::NotRunning => {
            return fail(1, &format!("{id}: no such message waiting in the queue"))
        }
    };
    if args.json {
        print_json(&json)
    } else {
        emit(&format!("{text}\n"))
    }
}
