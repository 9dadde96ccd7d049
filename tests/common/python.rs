//! Next hops written in Python: an `aiosmtpd` server as a child process ([`Aiosmtpd`],
//! [`AiosmtpdOpts`]): plaintext, or offering STARTTLS with a certificate the test made
//! (optionally requiring it, or with a TLS setup no modern client can meet), optionally
//! demanding AUTH with one user and password. Every message it takes is written as one
//! JSON line (envelope, content, whether the session was in TLS, the TLS version, whether
//! the TLS session was resumed, the authenticated user), which [`Aiosmtpd::received`] reads.
//!
//! The interpreter is the first of `$RINGRELAY_PYTHON`, `python3` and `/usr/bin/python3`
//! that can import `aiosmtpd` ([`aiosmtpd_python`]); tests skip with a note when none can
//! ([`skip_without_aiosmtpd`]). CI installs Debian's `python3-aiosmtpd`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::wait_for;

/// The server: one asyncio SMTP server on 127.0.0.1, port chosen by the kernel and printed
/// as `ready PORT` once it listens.
const SCRIPT: &str = r#"
import argparse, asyncio, json, ssl
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

p = argparse.ArgumentParser()
p.add_argument("--records", required=True)
p.add_argument("--cert")
p.add_argument("--key")
p.add_argument("--require-starttls", action="store_true")
p.add_argument("--max-tls")
p.add_argument("--user")
p.add_argument("--password")
p.add_argument("--close-after-message", action="store_true")
a = p.parse_args()

class Handler:
    async def handle_DATA(self, server, session, envelope):
        tls = session.ssl is not None
        obj = session.ssl.get("ssl_object") if tls else None
        user = None
        if session.authenticated and isinstance(session.auth_data, LoginPassword):
            user = session.auth_data.login.decode()
        record = {
            "from": envelope.mail_from,
            "rcpts": envelope.rcpt_tos,
            "tls": tls,
            "version": obj.version() if obj else None,
            "resumed": obj.session_reused if obj else None,
            "user": user,
            "data": envelope.content.decode("utf-8", "replace"),
        }
        with open(a.records, "a") as f:
            f.write(json.dumps(record) + "\n")
        if a.close_after_message:
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
        return "250 2.0.0 Ok: queued"

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == a.user.encode()
        and auth_data.password == a.password.encode()
    )
    # handled=False: aiosmtpd itself answers a failure (535 5.7.8).
    return AuthResult(success=ok, handled=False, auth_data=auth_data)

async def main():
    context = None
    if a.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(a.cert, a.key)
        if a.max_tls:
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = getattr(ssl.TLSVersion, a.max_tls)
    kwargs = {"hostname": "mx.python.test", "tls_context": context}
    if context is not None and a.require_starttls:
        kwargs["require_starttls"] = True
    if a.user:
        kwargs["authenticator"] = authenticator
        kwargs["auth_required"] = True
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Handler(), **kwargs), "127.0.0.1", 0)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"#;

/// The first interpreter that can import `aiosmtpd`, looked for once.
pub fn aiosmtpd_python() -> Option<&'static Path> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let candidates = std::env::var_os("RINGRELAY_PYTHON")
                .map(PathBuf::from)
                .into_iter()
                .chain(["python3", "/usr/bin/python3"].map(PathBuf::from));
            candidates.into_iter().find(|python| {
                Command::new(python)
                    .args(["-c", "import aiosmtpd.smtp"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
        })
        .as_deref()
}

/// True (with a note on stderr) when no Python with `aiosmtpd` is at hand: the caller
/// returns, skipping.
pub fn skip_without_aiosmtpd(test: &str) -> bool {
    if aiosmtpd_python().is_some() {
        return false;
    }
    eprintln!(
        "SKIPPED {test}: no python3 with the aiosmtpd module (apt-get install python3-aiosmtpd, \
         or set RINGRELAY_PYTHON)"
    );
    true
}

/// How the Python next hop behaves.
#[derive(Debug, Clone, Default)]
pub struct AiosmtpdOpts {
    /// Certificate chain and key (PEM): STARTTLS offered.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With `tls`: nothing but EHLO, NOOP, STARTTLS and QUIT before STARTTLS.
    pub require_starttls: bool,
    /// With `tls`: the highest TLS version it speaks (`"TLSv1_1"`: no modern client can
    /// finish a handshake with it).
    pub max_tls: Option<&'static str>,
    /// AUTH (after STARTTLS only) required, with this user and password.
    pub auth: Option<(String, String)>,
    /// Close each connection just after taking a message.
    pub close_after_message: bool,
}

/// A running `aiosmtpd` next hop; killed on drop.
pub struct Aiosmtpd {
    child: Child,
    pub addr: SocketAddr,
    records: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Aiosmtpd {
    /// Starts it and waits until it listens. Call only when [`aiosmtpd_python`] found one.
    #[track_caller]
    pub fn start(opts: &AiosmtpdOpts) -> Aiosmtpd {
        let python = aiosmtpd_python().expect("a python3 with aiosmtpd");
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("next_hop.py");
        std::fs::write(&script, SCRIPT).expect("write the script");
        let records = dir.path().join("received.jsonl");
        let stderr = dir.path().join("stderr.log");
        let mut cmd = Command::new(python);
        cmd.arg("-u")
            .arg(&script)
            .arg("--records")
            .arg(&records)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        if let Some((cert, key)) = &opts.tls {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            if opts.require_starttls {
                cmd.arg("--require-starttls");
            }
            if let Some(max) = opts.max_tls {
                cmd.args(["--max-tls", max]);
            }
        }
        if let Some((user, password)) = &opts.auth {
            cmd.args(["--user", user, "--password", password]);
        }
        if opts.close_after_message {
            cmd.arg("--close-after-message");
        }
        let mut child = cmd.spawn().expect("spawn the aiosmtpd next hop");
        // The first line says where it listens; read it off the test's thread so that a
        // server that never says it cannot hang the test.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(15)).unwrap_or_default();
        let port: Option<u16> = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok());
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the aiosmtpd next hop did not start (said {line:?}); stderr:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        Aiosmtpd {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            records,
            stderr,
            _dir: dir,
        }
    }

    /// The messages taken so far, one JSON object each, in order. A last line without its
    /// newline is a record still being written (a large message's): not yet taken.
    pub fn received(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.records).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON record"))
            .collect()
    }

    /// Waits until at least `n` messages were taken; returns them.
    #[track_caller]
    pub fn wait_received(&self, n: usize, limit: Duration) -> Vec<serde_json::Value> {
        wait_for(limit, "messages at the aiosmtpd next hop", || {
            let got = self.received();
            if got.len() >= n {
                Ok(got)
            } else {
                Err(format!(
                    "{} of {n}: {got:#?}\nits stderr:\n{}",
                    got.len(),
                    self.stderr()
                ))
            }
        })
    }

    /// What the Python side wrote on stderr (aiosmtpd's warnings, tracebacks).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
