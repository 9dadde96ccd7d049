//! Configuration: the TOML file of DESIGN.md's config contract, its defaults, and the
//! validation that turns a mistake into one clear line naming the file and the key.
//!
//! Every key is optional. Unknown keys are errors, so a typo never silently falls back to a
//! default. Command-line flags are applied on top with the `apply_*` methods.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::{IpNet, RelayPolicy};
use crate::smtp::command::valid_domain;
use crate::smtp::Mailbox;
use crate::tls::TlsLevel;

/// Which I/O driver runs the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// io_uring when the kernel allows it, else epoll (with one log line saying why).
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// Plain tokio (epoll).
    Epoll,
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" => Ok(IoMode::Uring),
            "epoll" => Ok(IoMode::Epoll),
            _ => Err(format!(
                "unknown io mode {s:?} (expected auto, uring or epoll)"
            )),
        }
    }
}

/// How connections are spread over the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Spread {
    /// Connections over loopback go to the shard on the CPU they arrive on (the client's
    /// own), so one local client's connections share one shard; the rest by the kernel's
    /// hash. Applies when the shards are pinned one per CPU.
    #[default]
    LocalCpu,
    /// Every connection by the kernel's hash of its addresses.
    Hash,
}

impl std::str::FromStr for Spread {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local-cpu" => Ok(Spread::LocalCpu),
            "hash" => Ok(Spread::Hash),
            _ => Err(format!("unknown spread {s:?} (expected local-cpu or hash)")),
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Our host name; empty means the system host name.
    pub hostname: String,
    /// This node's number in a farm (0–65535), part of every queue ID so that IDs stay
    /// unique across nodes; unset: derived from the host name.
    pub node_id: Option<u16>,
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Shard threads; 0 = one per available core.
    pub shards: usize,
    /// I/O driver.
    pub io: IoMode,
    /// How connections are spread over the shards.
    pub spread: Spread,
    /// Limits.
    pub limits: Limits,
    /// Relay access.
    pub relay: Relay,
    /// Spool.
    pub spool: Spool,
    /// Outbound delivery.
    pub delivery: Delivery,
    /// Inbound TLS (STARTTLS and implicit-TLS listeners).
    pub tls: Tls,
    /// SMTP AUTH for clients.
    pub auth: Auth,
    /// Listeners behind a load balancer (PROXY protocol).
    pub proxy: Proxy,
    /// The Prometheus endpoint.
    pub metrics: Metrics,
    /// `[dkim."example.com"]`: DKIM keys by `From:` domain (see [`crate::dkim`]).
    pub dkim: BTreeMap<String, crate::dkim::DkimDomain>,
    /// Switches for A/B measurements; not in the file (see [`Config::apply_env`]).
    #[serde(skip)]
    pub ab: AbSwitches,
}

/// Switches the benches flip to measure one design choice against another. They are read
/// from the environment once, by [`Config::apply_env`] (the command line calls it), and
/// passed down with the configuration: library code reads no environment variables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AbSwitches {
    /// `RINGRELAY_URING_SETUP=plain`: a ring without `IORING_SETUP_COOP_TASKRUN`.
    pub plain_ring: bool,
    /// `RINGRELAY_GROUP_COMMIT=off`: one sync per message instead of one per batch.
    pub one_sync_per_message: bool,
    /// `RINGRELAY_COMMIT_WINDOW=on`: hold syncs open for the adaptive commit window.
    pub commit_window: bool,
    /// `RINGRELAY_OUTBOUND=tokio`: outbound connections of io_uring shards through tokio's
    /// epoll reactor, as before they moved onto the ring.
    pub outbound_tokio: bool,
}

/// `[tls]`: inbound TLS. With a certificate and key, STARTTLS is offered on every listener.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain (leaf first); empty for no TLS.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// Listeners that speak TLS from the first byte (RFC 8314, usually port 465).
    pub implicit_listen: Vec<SocketAddr>,
}

impl Tls {
    /// True when a certificate and key are configured.
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}

/// `[metrics]`: where `GET /metrics` is served (Prometheus text format).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// `host:port` to listen on; empty for no endpoint.
    pub listen: String,
}

impl Metrics {
    /// The address to listen on, if any (validated).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

/// `[proxy]`: listeners that take a PROXY protocol header (v1 or v2) before SMTP, from a
/// load balancer such as HAProxy (`send-proxy-v2`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Proxy {
    /// Listeners that require the header first (plain SMTP after it).
    pub listen: Vec<SocketAddr>,
    /// Who may send a header (CIDR); connections from anywhere else are closed unanswered.
    pub trusted: Vec<String>,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy {
            listen: Vec::new(),
            trusted: vec!["127.0.0.0/8".into(), "::1/128".into()],
        }
    }
}

impl Proxy {
    /// The trusted networks, parsed (the configuration was validated).
    pub fn trusted_nets(&self) -> Vec<IpNet> {
        self.trusted.iter().filter_map(|n| n.parse().ok()).collect()
    }
}

/// `[auth]`: SMTP AUTH (PLAIN, LOGIN) for clients, offered only over TLS.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// `name:HASH` lines (`ringrelay passwd NAME`); empty for no AUTH.
    pub users_file: PathBuf,
}

impl Auth {
    /// True when a users file is configured.
    pub fn enabled(&self) -> bool {
        !self.users_file.as_os_str().is_empty()
    }
}

/// `[limits]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message in bytes (advertised as SIZE).
    pub max_message_size: usize,
    /// Recipients per transaction.
    pub max_recipients: usize,
    /// Connections to the whole server.
    pub max_connections: usize,
    /// Connections from one client address.
    pub max_connections_per_ip: usize,
    /// Seconds to wait for a command line.
    pub command_timeout_secs: u64,
    /// Seconds to wait for more message content.
    pub data_timeout_secs: u64,
    /// Errors a client may make before `421` and close.
    pub max_errors: u32,
    /// Seconds transactions in flight get to finish after SIGTERM/SIGINT.
    pub shutdown_timeout_secs: u64,
    /// Bytes all messages being received may hold in memory together, on all shards (a
    /// finished message counts until its 250); past it: `452 4.3.1`.
    pub max_data_memory: usize,
    /// Seconds a whole DATA phase may take, however the bytes trickle in; then `421 4.4.2`.
    pub data_total_timeout_secs: u64,
    /// NOOP/RSET/VRFY/HELP outside a transaction before `421 4.7.0`.
    pub max_junk_commands: u32,
}

/// `[relay]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Relay {
    /// Client networks that may relay anywhere (CIDR).
    pub mynetworks: Vec<String>,
    /// Domains anyone may send to (`.example.com` also covers subdomains).
    pub domains: Vec<String>,
    /// Where a bare `<postmaster>` and double bounces go; empty: `<postmaster>` is
    /// refused (`550 5.1.1`) and double bounces are dropped (logged).
    pub postmaster: String,
    /// A message still queued this long gets one delay report (RFC 3464 `Action:
    /// delayed`) for the recipients that asked with `NOTIFY=DELAY` (RFC 3461); 0: never.
    pub delay_warning_secs: u64,
}

/// `[spool]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Spool {
    /// Spool directory.
    pub dir: PathBuf,
    /// Below this much free disk space, MAIL gets `452 4.3.1` until space returns.
    pub min_free_bytes: u64,
    /// Past this many queued messages (whole server), MAIL gets `452 4.3.1`; 0 = no limit.
    pub max_queued_messages: u64,
}

/// `[delivery]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    /// Static routes: domain → `host:port`, skipping MX lookup.
    pub routes: BTreeMap<String, String>,
    /// `host:port` to send everything to; empty for none.
    pub smarthost: String,
    /// DNS servers (`ip:port`); empty for the system resolver.
    pub nameservers: Vec<SocketAddr>,
    /// Open connections per next hop, per shard.
    pub max_connections_per_destination: usize,
    /// Seconds between delivery attempts.
    pub retry_schedule_secs: Vec<u64>,
    /// Seconds after which an undeliverable message is bounced.
    pub max_queue_age_secs: u64,
    /// Port SMTP is delivered to on MX hosts and address literals.
    pub smtp_port: u16,
    /// DNS answers are cached at least this long (seconds)...
    pub dns_min_ttl_secs: u64,
    /// ...and at most this long.
    pub dns_max_ttl_secs: u64,
    /// A DNS query unanswered after this many seconds is a temporary failure.
    pub dns_timeout_secs: u64,
    /// Outbound TLS: `none`, `may`, `encrypt` or `verify` (Postfix's
    /// `smtp_tls_security_level`).
    pub tls: String,
    /// Per next-hop domain: a TLS level other than `tls`.
    pub tls_policy: BTreeMap<String, String>,
    /// More trust anchors (PEM) for `verify`, beside the bundled roots.
    pub tls_ca_file: PathBuf,
    /// AUTH user for the smarthost (only over TLS); empty for none.
    pub smarthost_user: String,
    /// File holding the smarthost password (its first line).
    pub smarthost_password_file: PathBuf,
    /// Per destination domain (`"*"` for every other): limits for the whole server.
    pub shaping: BTreeMap<String, Shaping>,
}

/// `[delivery.shaping."domain"]`: what the whole server sends to one destination domain
/// (`"*"`: to each domain not named). `delivery.max_connections_per_destination` still
/// caps each shard's connections per next-hop address.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Shaping {
    /// Connections open to the domain, all shards together (at least 1).
    pub max_connections: usize,
    /// Messages a second to the domain, all shards together; 0 for no limit.
    pub max_messages_per_sec: f64,
    /// Messages one connection carries before it is closed; 0 for no limit.
    pub max_messages_per_connection: usize,
}

impl Default for Shaping {
    fn default() -> Self {
        Shaping {
            max_connections: 16,
            max_messages_per_sec: 0.0,
            max_messages_per_connection: 0,
        }
    }
}

impl Delivery {
    /// The outbound TLS level for mail to `domain` (the per-domain policy, else `tls`).
    /// The configuration was validated, so every level parses.
    pub fn tls_level(&self, domain: &str) -> TlsLevel {
        let word = self
            .tls_policy
            .get(domain)
            .or_else(|| self.tls_policy.get(&domain.to_ascii_lowercase()))
            .unwrap_or(&self.tls);
        TlsLevel::parse(word).unwrap_or(TlsLevel::May)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: String::new(),
            node_id: None,
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            shards: 0,
            io: IoMode::Auto,
            spread: Spread::LocalCpu,
            limits: Limits::default(),
            relay: Relay::default(),
            spool: Spool::default(),
            delivery: Delivery::default(),
            tls: Tls::default(),
            auth: Auth::default(),
            proxy: Proxy::default(),
            metrics: Metrics::default(),
            dkim: BTreeMap::new(),
            ab: AbSwitches::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 36_700_160,
            max_recipients: 100,
            max_connections: 10_000,
            max_connections_per_ip: 50,
            command_timeout_secs: 300,
            data_timeout_secs: 180,
            max_errors: 10,
            shutdown_timeout_secs: 30,
            max_data_memory: 1 << 30,
            data_total_timeout_secs: 600,
            max_junk_commands: 100,
        }
    }
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            mynetworks: vec!["127.0.0.0/8".into(), "::1/128".into()],
            domains: Vec::new(),
            postmaster: String::new(),
            delay_warning_secs: 14_400,
        }
    }
}

impl Default for Spool {
    fn default() -> Self {
        Spool {
            dir: PathBuf::from("./spool"),
            min_free_bytes: 1 << 30,
            max_queued_messages: 0,
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            routes: BTreeMap::new(),
            smarthost: String::new(),
            nameservers: Vec::new(),
            max_connections_per_destination: 16,
            retry_schedule_secs: vec![60, 300, 900, 3600, 14400],
            max_queue_age_secs: 432_000,
            smtp_port: 25,
            dns_min_ttl_secs: 1,
            dns_max_ttl_secs: 86_400,
            dns_timeout_secs: 10,
            tls: "may".into(),
            tls_policy: BTreeMap::new(),
            tls_ca_file: PathBuf::new(),
            smarthost_user: String::new(),
            smarthost_password_file: PathBuf::new(),
            shaping: BTreeMap::new(),
        }
    }
}

/// A configuration error: one line an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Largest `limits.max_message_size` accepted (see [`Config::validate`]).
pub const MAX_MESSAGE_SIZE: usize = 1 << 30;
/// Largest `limits.max_recipients` accepted: 1,000,000 addresses of at most 320 octets
/// stay far below a spool record's limit beside a 1 GiB message.
pub const MAX_RECIPIENTS: usize = 1_000_000;

// The largest message with the most recipients of the longest addresses (and the record's
// own fields) fits one spool record, which recovery could read back: checked at build time,
// so raising a limit cannot silently break it.
const _: () = assert!(
    MAX_MESSAGE_SIZE + 1024 + MAX_RECIPIENTS * (2 + 320) + 2 + 320 + 64
        <= crate::spool::MAX_PAYLOAD
);

impl Config {
    /// Reads and validates `path`, or gives the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            let config = Config::default();
            config.validate()?;
            return Ok(config);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        let config = Config::from_toml(&text)
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // toml's message spans several lines (with a source excerpt); keep it to one.
            let msg = e.message().replace('\n', " ");
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    ConfigError(format!("line {line}: {msg}"))
                }
                None => ConfigError(msg),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; the first problem found is returned, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: String| Err(ConfigError(format!("{key}: {why}")));
        if !self.hostname.is_empty() && !valid_domain(&self.hostname) {
            return err(
                "hostname",
                format!("{:?} is not a valid host name", self.hostname),
            );
        }
        if self.listen.is_empty() {
            return err("listen", "at least one address is needed".into());
        }
        self.validate_listeners()?;
        if self.spool.dir.as_os_str().is_empty() {
            return err(
                "spool.dir",
                "is empty; the spool needs a directory of its own".into(),
            );
        }
        if self.shards > 128 {
            // Queue IDs carry the shard number in 8 bits, half of them for bounces.
            return err("shards", format!("{} is more than 128", self.shards));
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_message_size", l.max_message_size as u64),
            ("limits.max_recipients", l.max_recipients as u64),
            ("limits.max_connections", l.max_connections as u64),
            (
                "limits.max_connections_per_ip",
                l.max_connections_per_ip as u64,
            ),
            ("limits.command_timeout_secs", l.command_timeout_secs),
            ("limits.data_timeout_secs", l.data_timeout_secs),
            ("limits.max_errors", u64::from(l.max_errors)),
            ("limits.data_total_timeout_secs", l.data_total_timeout_secs),
            ("limits.max_junk_commands", u64::from(l.max_junk_commands)),
            (
                "delivery.max_connections_per_destination",
                self.delivery.max_connections_per_destination as u64,
            ),
        ] {
            if value == 0 {
                return err(key, "must be at least 1".into());
            }
        }
        if l.max_data_memory < l.max_message_size {
            return err(
                "limits.max_data_memory",
                format!(
                    "{} is smaller than limits.max_message_size ({})",
                    l.max_data_memory, l.max_message_size
                ),
            );
        }
        // A spool record holds at most 2 GiB (`spool::MAX_PAYLOAD`) for the message
        // and its envelope; these bounds keep every message the server can accept within it,
        // so a 250 is never given for a message that recovery would refuse to read.
        if l.max_message_size > MAX_MESSAGE_SIZE {
            return err(
                "limits.max_message_size",
                format!(
                    "{} is more than {MAX_MESSAGE_SIZE} (1 GiB): a spool record holds at most 2 GiB with its envelope",
                    l.max_message_size
                ),
            );
        }
        if l.max_recipients > MAX_RECIPIENTS {
            return err(
                "limits.max_recipients",
                format!(
                    "{} is more than {MAX_RECIPIENTS}: a spool record holds at most 2 GiB with its envelope",
                    l.max_recipients
                ),
            );
        }
        for (i, net) in self.relay.mynetworks.iter().enumerate() {
            if let Err(why) = net.parse::<IpNet>() {
                return err(&format!("relay.mynetworks[{i}]"), why);
            }
        }
        for (i, d) in self.relay.domains.iter().enumerate() {
            if !valid_domain(d.strip_prefix('.').unwrap_or(d)) {
                return err(
                    &format!("relay.domains[{i}]"),
                    format!("{d:?} is not a domain"),
                );
            }
        }
        if let Err(why) = self.postmaster() {
            return err("relay.postmaster", why);
        }
        let mut route_domains = std::collections::BTreeSet::new();
        for (domain, target) in &self.delivery.routes {
            if !valid_domain(domain) {
                return err("delivery.routes", format!("{domain:?} is not a domain"));
            }
            // Domains are matched without regard to case: two keys for one domain would
            // leave which route wins to chance.
            if !route_domains.insert(domain.to_ascii_lowercase()) {
                return err(
                    "delivery.routes",
                    format!("{domain:?} is given twice (domains ignore case)"),
                );
            }
            if let Err(why) = check_host_port(target) {
                return err(&format!("delivery.routes.{domain}"), why);
            }
        }
        if !self.delivery.smarthost.is_empty() {
            if let Err(why) = check_host_port(&self.delivery.smarthost) {
                return err("delivery.smarthost", why);
            }
        }
        for (i, ns) in self.delivery.nameservers.iter().enumerate() {
            if ns.port() == 0 || ns.ip().is_unspecified() {
                return err(
                    &format!("delivery.nameservers[{i}]"),
                    format!("{ns} is not an address a query can be sent to"),
                );
            }
        }
        if self.delivery.smtp_port == 0 {
            return err("delivery.smtp_port", "must be 1..=65535".into());
        }
        if self.delivery.dns_timeout_secs == 0 {
            return err("delivery.dns_timeout_secs", "must be at least 1".into());
        }
        if self.delivery.dns_min_ttl_secs > self.delivery.dns_max_ttl_secs {
            return err(
                "delivery.dns_min_ttl_secs",
                "is larger than delivery.dns_max_ttl_secs".into(),
            );
        }
        if self.delivery.retry_schedule_secs.is_empty()
            || self.delivery.retry_schedule_secs.contains(&0)
        {
            return err(
                "delivery.retry_schedule_secs",
                "needs at least one interval, each at least 1".into(),
            );
        }
        self.validate_shaping()?;
        self.validate_dkim()?;
        self.validate_tls()
    }

    /// `[dkim."domain"]`: a domain name, a selector (a dot-atom of letters, digits and
    /// hyphens, RFC 6376 §3.1) and a key file (read by [`Config::check_files`]).
    fn validate_dkim(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::BTreeSet::new();
        for (domain, d) in &self.dkim {
            let key = format!("dkim.{domain:?}");
            if !valid_domain(domain) {
                return Err(ConfigError(format!("{key}: not a valid domain name")));
            }
            if !seen.insert(domain.to_ascii_lowercase()) {
                return Err(ConfigError(format!(
                    "{key}: the domain is configured twice (names are compared without case)"
                )));
            }
            let selector_ok = !d.selector.is_empty()
                && d.selector.split('.').all(|label| {
                    !label.is_empty()
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !selector_ok {
                return Err(ConfigError(format!(
                    "{key}.selector: {:?} is not a selector (letters, digits, hyphens, dots)",
                    d.selector
                )));
            }
            if d.key_file.as_os_str().is_empty() {
                return Err(ConfigError(format!("{key}.key_file: is required")));
            }
        }
        Ok(())
    }

    /// `listen` and `tls.implicit_listen` together: no address twice, and no two that the
    /// kernel would refuse to bind side by side (a wildcard and an address it covers, on
    /// one port), so `serve` never fails with "Address already in use" on its own
    /// configuration. Port 0 (any free port) never conflicts.
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let all: Vec<(String, SocketAddr)> = (self.listen.iter().enumerate())
            .map(|(i, a)| (format!("listen[{i}]"), *a))
            .chain(
                (self.tls.implicit_listen.iter().enumerate())
                    .map(|(i, a)| (format!("tls.implicit_listen[{i}]"), *a)),
            )
            .collect();
        for (j, (key, addr)) in all.iter().enumerate() {
            for (earlier_key, earlier) in &all[..j] {
                if addr.port() == 0 || addr.port() != earlier.port() {
                    continue;
                }
                let (a, b) = (earlier.ip().to_canonical(), addr.ip().to_canonical());
                let why = if a == b {
                    format!("{addr} is also {earlier_key} (one address, one listener)")
                } else if covers(a, b) || covers(b, a) {
                    format!(
                        "{addr} overlaps {earlier_key} ({earlier}): a wildcard address \
                         already takes every connection to its port (on Linux [::] \
                         takes IPv4 too); keep one of them"
                    )
                } else {
                    continue;
                };
                return Err(ConfigError(format!("{key}: {why}")));
            }
        }
        Ok(())
    }

    /// `[delivery.shaping."domain"]`: each key a domain or `"*"`, each limit in range.
    fn validate_shaping(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: String| Err(ConfigError(format!("{key}: {why}")));
        for (domain, s) in &self.delivery.shaping {
            let key = format!("delivery.shaping.{domain:?}");
            if domain != "*" && !valid_domain(domain) {
                return err(&key, format!("{domain:?} is not a domain (nor \"*\")"));
            }
            if s.max_connections == 0 {
                return err(
                    &format!("{key}.max_connections"),
                    "must be at least 1".into(),
                );
            }
            let rate = s.max_messages_per_sec;
            if !rate.is_finite() || rate < 0.0 {
                return err(
                    &format!("{key}.max_messages_per_sec"),
                    format!("{rate} is not 0 (no limit) or a positive number"),
                );
            }
            if rate > 0.0 && rate < 0.001 {
                return err(
                    &format!("{key}.max_messages_per_sec"),
                    format!("{rate} is below 0.001 (one message in 1000 s)"),
                );
            }
        }
        Ok(())
    }

    /// The TLS and AUTH keys, without reading any file (see [`Config::check_files`]).
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: String| Err(ConfigError(format!("{key}: {why}")));
        let t = &self.tls;
        match (
            t.cert_file.as_os_str().is_empty(),
            t.key_file.as_os_str().is_empty(),
        ) {
            (true, false) => return err("tls.cert_file", "is needed with tls.key_file".into()),
            (false, true) => return err("tls.key_file", "is needed with tls.cert_file".into()),
            _ => {}
        }
        if !t.implicit_listen.is_empty() && !t.enabled() {
            return err(
                "tls.implicit_listen",
                "needs tls.cert_file and tls.key_file".into(),
            );
        }
        if !self.metrics.listen.is_empty() {
            match self.metrics.listen.parse::<SocketAddr>() {
                Ok(a) if a.port() == 0 => {
                    return err("metrics.listen", "needs a port (1-65535)".into())
                }
                Ok(a) if self.listen.contains(&a) => {
                    return err("metrics.listen", format!("{a} is also an SMTP listener"))
                }
                Ok(_) => {}
                Err(_) => {
                    return err(
                        "metrics.listen",
                        format!("{:?} is not an ip:port address", self.metrics.listen),
                    )
                }
            }
        }
        for (i, net) in self.proxy.trusted.iter().enumerate() {
            if let Err(why) = net.parse::<IpNet>() {
                return err(&format!("proxy.trusted[{i}]"), why);
            }
        }
        for addr in &self.proxy.listen {
            if self.listen.contains(addr) || t.implicit_listen.contains(addr) {
                return err(
                    "proxy.listen",
                    format!("{addr} is also in listen or tls.implicit_listen (one address, one kind of listener)"),
                );
            }
        }
        if self.auth.enabled() && !t.enabled() {
            return err(
                "auth.users_file",
                "needs [tls] cert_file and key_file: AUTH is offered only over TLS".into(),
            );
        }
        let d = &self.delivery;
        if TlsLevel::parse(&d.tls).is_none() {
            return err(
                "delivery.tls",
                format!("{:?} is not a level (none, may, encrypt or verify)", d.tls),
            );
        }
        for (domain, level) in &d.tls_policy {
            if !valid_domain(domain) {
                return err("delivery.tls_policy", format!("{domain:?} is not a domain"));
            }
            if TlsLevel::parse(level).is_none() {
                return err(
                    &format!("delivery.tls_policy.{domain}"),
                    format!("{level:?} is not a level (none, may, encrypt or verify)"),
                );
            }
        }
        if !d.smarthost_user.is_empty() {
            if d.smarthost.is_empty() {
                return err("delivery.smarthost_user", "needs delivery.smarthost".into());
            }
            if d.smarthost_password_file.as_os_str().is_empty() {
                return err(
                    "delivery.smarthost_user",
                    "needs delivery.smarthost_password_file".into(),
                );
            }
            if d.tls == "none" {
                return err(
                    "delivery.smarthost_user",
                    "AUTH goes only over TLS, and delivery.tls is none".into(),
                );
            }
        }
        Ok(())
    }

    /// Reads the files the configuration names (TLS certificate and key, AUTH users, the
    /// extra CA file, the smarthost password, the DKIM keys) and checks that each is usable, as `serve`
    /// does at start and `check-config` does on request. Errors name the key and the file.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let t = &self.tls;
        if t.enabled() {
            crate::tls::server_config(&t.cert_file, &t.key_file)
                .map_err(|e| ConfigError(format!("tls.cert_file/tls.key_file: {e}")))?;
        }
        if self.auth.enabled() {
            crate::passwd::Users::load(&self.auth.users_file)
                .map_err(|e| ConfigError(format!("auth.users_file: {e}")))?;
        }
        let d = &self.delivery;
        if !d.tls_ca_file.as_os_str().is_empty() {
            crate::tls::client_config(TlsLevel::Verify, Some(&d.tls_ca_file))
                .map_err(|e| ConfigError(format!("delivery.tls_ca_file: {e}")))?;
        }
        if !d.smarthost_password_file.as_os_str().is_empty() {
            let text = std::fs::read_to_string(&d.smarthost_password_file).map_err(|e| {
                ConfigError(format!(
                    "delivery.smarthost_password_file: {}: cannot read: {e}",
                    d.smarthost_password_file.display()
                ))
            })?;
            if text.lines().next().unwrap_or("").is_empty() {
                return Err(ConfigError(format!(
                    "delivery.smarthost_password_file: {}: the first line (the password) is empty",
                    d.smarthost_password_file.display()
                )));
            }
        }
        crate::dkim::Signers::load(&self.dkim).map_err(ConfigError)?;
        Ok(())
    }

    /// `relay.postmaster` as a mailbox; `None` when it is empty.
    pub fn postmaster(&self) -> Result<Option<Mailbox>, String> {
        let p = self.relay.postmaster.trim();
        if p.is_empty() {
            return Ok(None);
        }
        let bare = p
            .strip_prefix('<')
            .and_then(|p| p.strip_suffix('>'))
            .unwrap_or(p);
        Mailbox::parse(bare).map(Some).map_err(|e| {
            let why = match e {
                crate::smtp::path::PathError::TooLong => "too long",
                crate::smtp::path::PathError::Syntax => "expected local@domain",
            };
            format!("{p:?} is not a mailbox ({why}); \"\" refuses <postmaster> instead")
        })
    }

    /// What is allowed but probably a mistake, one line each, for `check-config` to print
    /// and `serve` to log at start: a network in `relay.mynetworks` with host bits set
    /// (`10.0.0.1/8` is taken as `10.0.0.0/8`), a host name that is not fully qualified
    /// (others reject or distrust `HELO vm`, and bounces say `postmaster@vm`).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (i, net) in self.relay.mynetworks.iter().enumerate() {
            if let Ok(parsed) = net.parse::<IpNet>() {
                if parsed.has_host_bits() {
                    warnings.push(format!(
                        "relay.mynetworks[{i}]: {net:?} has host bits set; it means {}",
                        parsed.network()
                    ));
                }
            }
        }
        let hostname = self.effective_hostname();
        if !hostname.contains('.') {
            let whence = if self.hostname.is_empty() {
                "the system host name"
            } else {
                "hostname"
            };
            warnings.push(format!(
                "{whence} {hostname:?} is not fully qualified (no dot); other servers may \
                 refuse it in HELO: set hostname = \"relay.example.net\" (your own name)"
            ));
        }
        warnings
    }

    /// The whole configuration as TOML, every key with its value (defaults included), in
    /// the form `from_toml` reads back to the same configuration. The A/B switches are
    /// not configuration and are left out.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self)
            .map_err(|e| ConfigError(format!("cannot write the configuration as TOML: {e}")))
    }

    /// Reads the A/B switches of the benches from the environment, once, for the command
    /// line: `RINGRELAY_REUSEPORT=hash|local-cpu` overrides `spread`, and the switches in
    /// [`AbSwitches`]. Returns warnings to log (a value that was not understood).
    pub fn apply_env(&mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Ok(v) = std::env::var("RINGRELAY_REUSEPORT") {
            match v.parse::<Spread>() {
                Ok(spread) => self.spread = spread,
                Err(e) => warnings.push(format!("RINGRELAY_REUSEPORT ignored: {e}")),
            }
        }
        let is = |name: &str, value: &str| std::env::var(name).is_ok_and(|v| v == value);
        self.ab = AbSwitches {
            plain_ring: is("RINGRELAY_URING_SETUP", "plain"),
            one_sync_per_message: is("RINGRELAY_GROUP_COMMIT", "off"),
            commit_window: is("RINGRELAY_COMMIT_WINDOW", "on"),
            outbound_tokio: is("RINGRELAY_OUTBOUND", "tokio"),
        };
        warnings
    }

    /// The node number queue IDs carry: `node_id`, else one derived from the host name.
    pub fn effective_node_id(&self) -> u16 {
        self.node_id
            .unwrap_or_else(|| crate::id::node_id_from_hostname(&self.effective_hostname()))
    }

    /// The host name to use: the configured one, else the system's.
    pub fn effective_hostname(&self) -> String {
        if !self.hostname.is_empty() {
            return self.hostname.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| valid_domain(s))
            .unwrap_or_else(|| "localhost".to_string())
    }

    /// The number of shards to run: as configured, or one per available core.
    pub fn effective_shards(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The relay policy, from `[relay]` (already validated).
    pub fn relay_policy(&self) -> RelayPolicy {
        let nets = self
            .relay
            .mynetworks
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        RelayPolicy::new(nets, self.relay.domains.clone())
    }

    /// Adds a `--route DOMAIN=HOST:PORT`.
    pub fn apply_route(&mut self, spec: &str) -> Result<(), ConfigError> {
        let (domain, target) = spec
            .split_once('=')
            .ok_or_else(|| ConfigError(format!("--route {spec:?}: expected DOMAIN=HOST:PORT")))?;
        if !valid_domain(domain) {
            return Err(ConfigError(format!(
                "--route {spec:?}: {domain:?} is not a domain"
            )));
        }
        check_host_port(target).map_err(|why| ConfigError(format!("--route {spec:?}: {why}")))?;
        self.delivery
            .routes
            .insert(domain.to_ascii_lowercase(), target.to_string());
        Ok(())
    }
}

/// True when a listener on `wide` would take connections meant for `narrow` on the same
/// port: `wide` is a wildcard of its family, or `[::]`, which takes IPv4 as well unless
/// `net.ipv6.bindv6only` is set (listeners keep the system's default).
fn covers(wide: std::net::IpAddr, narrow: std::net::IpAddr) -> bool {
    if !wide.is_unspecified() {
        return false;
    }
    match (wide.is_ipv6(), narrow.is_ipv6()) {
        (true, false) => !ipv6_only_by_default(),
        (v6_wide, v6_narrow) => v6_wide == v6_narrow,
    }
}

/// `net.ipv6.bindv6only`: an IPv6 wildcard socket takes IPv4 connections unless it is 1.
fn ipv6_only_by_default() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|s| s.trim() == "1")
}

/// `host:port` or `[v6]:port`, with a port in 1..=65535.
fn check_host_port(s: &str) -> Result<(), String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("{s:?} has no valid port (1..=65535)"));
        }
        if addr.ip().is_unspecified() {
            return Err(format!("{s:?} is not an address to connect to"));
        }
        return Ok(());
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    if !port_ok {
        return Err(format!("{s:?} has no valid port"));
    }
    if !valid_domain(host) {
        return Err(format!("{s:?}: {host:?} is not a host name or IP address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.limits.max_recipients, 100);
        assert_eq!(c.io, IoMode::Auto);
        assert_eq!(c.spread, Spread::LocalCpu);
        assert!(c
            .relay_policy()
            .client_may_relay("127.0.0.9".parse().unwrap()));
        assert!(c.relay_policy().client_may_relay("::1".parse().unwrap()));
        assert!(!c
            .relay_policy()
            .client_may_relay("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn the_contract_example_parses() {
        let text = r#"
hostname = "relay.example.net"
listen   = ["127.0.0.1:2525"]
shards   = 0
io       = "auto"
[limits]
max_message_size      = 36700160
max_recipients        = 100
max_connections       = 10000
max_connections_per_ip = 50
command_timeout_secs  = 300
data_timeout_secs     = 180
[relay]
mynetworks = ["127.0.0.0/8", "::1/128"]
domains    = []
[spool]
dir = "./spool"
[delivery]
routes      = { "example.test" = "127.0.0.1:2526" }
smarthost   = ""
nameservers = []
max_connections_per_destination = 16
retry_schedule_secs = [60, 300, 900, 3600, 14400]
max_queue_age_secs  = 432000
"#;
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.hostname, "relay.example.net");
        assert_eq!(c.delivery.routes["example.test"], "127.0.0.1:2526");
    }

    #[test]
    fn errors_name_the_key() {
        let e = |t: &str| Config::from_toml(t).unwrap_err().0;
        assert!(e("[limits]\nmax_recipients = 0").contains("limits.max_recipients"));
        assert!(e("[relay]\nmynetworks = [\"10.0.0.0/99\"]").contains("relay.mynetworks[0]"));
        assert!(e("[limits]\nmax_recipeints = 5").contains("max_recipeints"));
        assert!(e("io = \"kqueue\"").contains("line 1"));
        assert!(e("spread = \"random\"").contains("line 1"));
        assert_eq!(
            Config::from_toml("spread = \"hash\"").unwrap().spread,
            Spread::Hash
        );
        assert!(e("listen = [\"nonsense\"]").contains("line 1"));
        assert!(e("[delivery]\nsmarthost = \"mx.example\"").contains("delivery.smarthost"));
        assert!(e("hostname = \"bad host\"").contains("hostname"));
        assert!(!e("[limits]\nmax_recipients = 0").contains('\n'));
    }

    /// A message the server may accept must fit a spool record (2 GiB with its envelope),
    /// or recovery would refuse to read back what was answered 250.
    #[test]
    fn limits_keep_every_message_within_a_spool_record() {
        let e = |t: &str| Config::from_toml(t).unwrap_err().0;
        let big = format!(
            "[limits]\nmax_message_size = {}\nmax_data_memory = {}",
            MAX_MESSAGE_SIZE + 1,
            1u64 << 40
        );
        assert!(e(&big).contains("limits.max_message_size"));
        let at_limit = format!(
            "[limits]\nmax_message_size = {MAX_MESSAGE_SIZE}\nmax_data_memory = {}",
            1u64 << 40
        );
        assert!(Config::from_toml(&at_limit).is_ok());
        let many = format!("[limits]\nmax_recipients = {}", MAX_RECIPIENTS + 1);
        assert!(e(&many).contains("limits.max_recipients"));
        // The largest message with the most recipients of the longest addresses fits.
        let envelope = MAX_RECIPIENTS * (2 + 320) + 2 + 320 + 64;
        assert!(MAX_MESSAGE_SIZE + 1024 + envelope <= crate::spool::MAX_PAYLOAD);
    }

    /// What `serve` would only find out at start (and die of, with exit 1) is a
    /// configuration error here, so `check-config` refuses it too.
    #[test]
    fn what_serve_would_fail_on_is_a_config_error() {
        let e = |t: &str| Config::from_toml(t).unwrap_err().0;
        assert!(e("[spool]\ndir = \"\"").starts_with("spool.dir: "));
        let dup = e("listen = [\"127.0.0.1:2525\", \"127.0.0.1:2525\"]");
        assert!(
            dup.starts_with("listen[1]: 127.0.0.1:2525 is also listen[0]"),
            "{dup}"
        );
        let wild = e("listen = [\"0.0.0.0:25\", \"127.0.0.1:25\"]");
        assert!(
            wild.starts_with("listen[1]: ") && wild.contains("overlaps listen[0]"),
            "{wild}"
        );
        let wild = e("listen = [\"[::1]:25\", \"[::]:25\"]");
        assert!(wild.starts_with("listen[1]: "), "{wild}");
        if !ipv6_only_by_default() {
            assert!(e("listen = [\"[::]:25\", \"0.0.0.0:25\"]").starts_with("listen[1]: "));
        }
        // Different ports, different addresses, or any free port: fine.
        for ok in [
            "listen = [\"0.0.0.0:25\", \"127.0.0.1:587\"]",
            "listen = [\"127.0.0.1:25\", \"127.0.0.2:25\", \"[::1]:25\"]",
            "listen = [\"127.0.0.1:0\", \"127.0.0.1:0\"]",
            "listen = [\"0.0.0.0:25\", \"[::1]:25\"]",
        ] {
            assert!(Config::from_toml(ok).is_ok(), "{ok}");
        }
        let tls = "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n";
        let across = e(&format!(
            "listen = [\"127.0.0.1:465\"]\n{tls}implicit_listen = [\"127.0.0.1:465\"]"
        ));
        assert!(
            across.starts_with("tls.implicit_listen[0]: 127.0.0.1:465 is also listen[0]"),
            "{across}"
        );
        let within = e(&format!(
            "{tls}implicit_listen = [\"127.0.0.1:465\", \"127.0.0.1:465\"]"
        ));
        assert!(within.starts_with("tls.implicit_listen[1]: "), "{within}");
        let route = e("[delivery]\nroutes = { \"a.test\" = \"127.0.0.1:0\" }");
        assert!(
            route.starts_with("delivery.routes.a.test: ") && route.contains("port"),
            "{route}"
        );
        assert!(e("[delivery]\nroutes = { \"a.test\" = \"mx.a.test:0\" }").contains("port"));
        assert!(e("[delivery]\nroutes = { \"a.test\" = \"0.0.0.0:25\" }")
            .starts_with("delivery.routes.a.test: "));
        assert!(e("[delivery]\nsmarthost = \"[::1]:0\"").starts_with("delivery.smarthost: "));
        assert!(e(
            "[delivery]\nroutes = { \"a.test\" = \"127.0.0.1:25\", \"A.test\" = \"127.0.0.1:26\" }"
        )
        .starts_with("delivery.routes: "));
        assert!(e("[delivery]\nnameservers = [\"127.0.0.1:0\"]")
            .starts_with("delivery.nameservers[0]: "));
        let mut c = Config::default();
        assert!(c.apply_route("a.test=127.0.0.1:0").is_err());
        c.listen.push(c.listen[0]);
        assert!(
            c.validate().is_err(),
            "--listen twice is caught after the flags too"
        );
    }

    #[test]
    fn postmaster_is_a_mailbox_or_empty() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.postmaster(), Ok(None));
        let c = Config::from_toml("[relay]\npostmaster = \"ops@example.com\"").unwrap();
        assert_eq!(c.postmaster().unwrap().unwrap().as_str(), "ops@example.com");
        let e = |t: &str| Config::from_toml(t).unwrap_err().0;
        assert!(e("[relay]\npostmaster = \"ops\"")
            .starts_with("relay.postmaster: \"ops\" is not a mailbox"));
        assert!(e("[relay]\npostmaster = \"a b@example.com\"").starts_with("relay.postmaster: "));
    }

    #[test]
    fn warnings_for_host_bits_and_a_short_host_name() {
        let c = Config::from_toml(
            "hostname = \"relay.example.net\"\n[relay]\nmynetworks = [\"10.0.0.1/8\", \"192.0.2.0/24\"]",
        )
        .unwrap();
        assert_eq!(
            c.warnings(),
            ["relay.mynetworks[0]: \"10.0.0.1/8\" has host bits set; it means 10.0.0.0/8"]
        );
        let c = Config::from_toml("hostname = \"vm\"").unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("hostname \"vm\" is not fully qualified"),
            "{w:?}"
        );
        assert!(Config::from_toml("hostname = \"relay.example.net\"")
            .unwrap()
            .warnings()
            .is_empty());
    }

    /// The printed configuration reads back to the same configuration: printing that
    /// again gives the same text, and every key the printing shows is there.
    #[test]
    fn the_printed_configuration_reads_back_the_same() {
        let full = r#"
hostname = "relay.example.net"
listen = ["127.0.0.1:2525", "[::1]:2525"]
shards = 3
io = "epoll"
spread = "hash"
[limits]
max_recipients = 7
[relay]
mynetworks = ["10.0.0.0/8"]
domains = ["example.org", ".sub.example.org"]
postmaster = "ops@example.com"
[spool]
dir = "/var/spool/ringrelay"
[delivery]
routes = { "example.test" = "127.0.0.1:2526", "other.test" = "mx.other.test:25" }
smarthost = "smart.example.net:587"
nameservers = ["127.0.0.1:5353"]
retry_schedule_secs = [1, 2]
tls = "encrypt"
tls_policy = { "bank.example" = "verify" }
smarthost_user = "me"
smarthost_password_file = "/etc/ringrelay/smarthost.pw"
[tls]
cert_file = "/etc/ringrelay/cert.pem"
key_file = "/etc/ringrelay/key.pem"
implicit_listen = ["127.0.0.1:465"]
[auth]
users_file = "/etc/ringrelay/users"
"#;
        for text in ["", full] {
            let config = Config::from_toml(text).unwrap();
            let printed = config.to_toml().unwrap();
            let again = Config::from_toml(&printed)
                .unwrap_or_else(|e| panic!("{e}: the printed text:\n{printed}"));
            assert_eq!(again.to_toml().unwrap(), printed);
            assert_eq!(format!("{again:?}"), format!("{config:?}"));
            for key in [
                "hostname =",
                "[limits]",
                "max_data_memory =",
                "postmaster =",
                "[delivery]",
                "dns_timeout_secs =",
                "[tls]",
                "[auth]",
                "users_file =",
            ] {
                assert!(printed.contains(key), "{key} missing from:\n{printed}");
            }
        }
        // The A/B switches are not configuration.
        let mut c = Config::default();
        c.ab.plain_ring = true;
        assert!(!c.to_toml().unwrap().contains("plain_ring"));
    }

    #[test]
    fn shaping_per_domain_with_errors_naming_the_key() {
        let c = Config::from_toml(
            "[delivery.shaping.\"example.com\"]\nmax_connections = 2\nmax_messages_per_sec = 20\n\
             [delivery.shaping.\"*\"]\nmax_messages_per_connection = 100\n",
        )
        .unwrap();
        let s = &c.delivery.shaping["example.com"];
        assert_eq!((s.max_connections, s.max_messages_per_sec), (2, 20.0));
        assert_eq!(s.max_messages_per_connection, 0);
        assert_eq!(c.delivery.shaping["*"].max_connections, 16);
        assert_eq!(c.delivery.shaping["*"].max_messages_per_connection, 100);
        let e = |t: &str| Config::from_toml(t).unwrap_err().0;
        assert!(e("[delivery.shaping.\"a.example\"]\nmax_connections = 0")
            .starts_with("delivery.shaping.\"a.example\".max_connections: "));
        assert!(
            e("[delivery.shaping.\"a.example\"]\nmax_messages_per_sec = -1")
                .starts_with("delivery.shaping.\"a.example\".max_messages_per_sec: ")
        );
        assert!(e("[delivery.shaping.\"not a domain\"]\n")
            .starts_with("delivery.shaping.\"not a domain\": "));
        assert!(
            e("[delivery.shaping.\"a.example\"]\nmax_conections = 3").contains("max_conections")
        );
    }

    #[test]
    fn routes_from_the_command_line() {
        let mut c = Config::default();
        c.apply_route("Example.TEST=127.0.0.1:2526").unwrap();
        assert_eq!(c.delivery.routes["example.test"], "127.0.0.1:2526");
        assert!(c.apply_route("example.test").is_err());
        assert!(c.apply_route("example.test=host").is_err());
        assert!(c.apply_route("example.test=mx.example:25").is_ok());
    }
}
