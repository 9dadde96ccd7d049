//! Inbound TLS and AUTH as the connection loop needs them: the server's certificate and
//! users (shared by every shard, replaced whole on SIGHUP), a connection's TLS layer over
//! the transport (the sans-IO [`TlsSession`] between the socket's bytes and the session's),
//! the handshake under its own deadline, and password checks off the event loop.
//!
//! The same rules as the rest of the driver: nothing in flight is dropped on a timeout (the
//! socket is shut down, which makes the pending read return), and a client that sends
//! garbage or stalls mid-handshake costs its own connection and nothing else.

use std::path::PathBuf;
use std::pin::pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rustls::ServerConfig;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::conn::{read_until, Transport};
use crate::config::Config;
use crate::passwd::Users;
use crate::smtp::auth::Credentials;
use crate::smtp::session::TlsInfo;
use crate::tls::{self, TlsSession};

/// Longest a TLS handshake may take, however the bytes trickle in (bounded by the command
/// timeout when that is shorter).
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Read size for TLS records (one full record and its header).
const RECORD_READ: usize = 17 * 1024;

/// The server's TLS certificate and AUTH users, shared by all shards.
pub(crate) struct Security {
    cert_file: PathBuf,
    key_file: PathBuf,
    users_file: Option<PathBuf>,
    server: RwLock<Arc<ServerConfig>>,
    users: RwLock<Option<Arc<Users>>>,
    /// Password checks running at once (each costs tens of milliseconds of CPU and about
    /// 19 MiB): at most one per core, so a flood of AUTH attempts cannot starve the shards.
    verifying: Semaphore,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("users_file", &self.users_file)
            .finish_non_exhaustive()
    }
}

impl Security {
    /// Loads the certificate, key and users the configuration names; `None` without TLS.
    pub(crate) fn load(config: &Config) -> Result<Option<Arc<Security>>, String> {
        if !config.tls.enabled() {
            return Ok(None);
        }
        let t = &config.tls;
        let server = tls::server_config(&t.cert_file, &t.key_file)
            .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"))?;
        let users_file = config
            .auth
            .enabled()
            .then(|| config.auth.users_file.clone());
        let users = match &users_file {
            Some(path) => Some(Arc::new(
                Users::load(path).map_err(|e| format!("auth.users_file: {e}"))?,
            )),
            None => None,
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Some(Arc::new(Security {
            cert_file: t.cert_file.clone(),
            key_file: t.key_file.clone(),
            users_file,
            server: RwLock::new(server),
            users: RwLock::new(users),
            verifying: Semaphore::new(cores.max(1)),
        })))
    }

    /// Reads the certificate, key and users file again (they were rotated in place), for
    /// new handshakes and logins; connections already open keep what they have. On any
    /// error nothing changes and the error is returned.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let server = tls::server_config(&self.cert_file, &self.key_file)
            .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"))?;
        let users = match &self.users_file {
            Some(path) => Some(Arc::new(
                Users::load(path).map_err(|e| format!("auth.users_file: {e}"))?,
            )),
            None => None,
        };
        *self.server.write().unwrap_or_else(|e| e.into_inner()) = server;
        *self.users.write().unwrap_or_else(|e| e.into_inner()) = users;
        Ok(())
    }

    /// The same as [`Security::reload`], from the files a reloaded configuration names
    /// (which may have moved).
    pub(crate) fn reload_from(&self, config: &Config) -> Result<(), String> {
        let t = &config.tls;
        let server = tls::server_config(&t.cert_file, &t.key_file)
            .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"))?;
        let users = if config.auth.enabled() {
            Some(Arc::new(
                Users::load(&config.auth.users_file)
                    .map_err(|e| format!("auth.users_file: {e}"))?,
            ))
        } else {
            None
        };
        *self.server.write().unwrap_or_else(|e| e.into_inner()) = server;
        *self.users.write().unwrap_or_else(|e| e.into_inner()) = users;
        Ok(())
    }

    fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Checks credentials on the blocking pool (the hash is memory-hard: never on a shard's
    /// event loop). The user's name when they are right.
    pub(crate) async fn verify(&self, credentials: Credentials) -> Option<String> {
        let users = self
            .users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let _permit = self.verifying.acquire().await.ok()?;
        let Credentials { user, password, .. } = credentials;
        tokio::task::spawn_blocking(move || users.verify(&user, &password).then_some(user))
            .await
            .ok()
            .flatten()
    }
}

/// One connection's TLS: the sans-IO session, and the ciphertext read but not yet taken in.
pub(crate) struct TlsLayer {
    session: TlsSession,
    /// Ciphertext from the socket (reads go here instead of into the plaintext buffer).
    pub(crate) raw: BytesMut,
}

impl TlsLayer {
    /// What was negotiated, for the session.
    pub(crate) fn info(&self) -> TlsInfo {
        TlsInfo {
            version: self.session.protocol_version().unwrap_or("TLS"),
            cipher: self.session.cipher_suite().unwrap_or("unknown"),
        }
    }

    /// Encrypts `plaintext` (the session's replies) into bytes for the socket.
    pub(crate) fn seal(&mut self, plaintext: &[u8]) -> Result<BytesMut, String> {
        self.session
            .send_plaintext(plaintext)
            .map_err(|e| e.to_string())?;
        let mut out = BytesMut::new();
        self.session.take_tls_output(&mut out);
        Ok(out)
    }

    /// Takes in what was read into `raw`: decrypted bytes are appended to `plain`; returns
    /// what must be written back (alerts, session tickets, key updates), possibly empty.
    /// `Err` on a protocol error (the connection is over; its alert is in the error's
    /// output, already written into `reply`).
    pub(crate) fn open(&mut self, plain: &mut BytesMut, reply: &mut BytesMut) -> Result<(), ()> {
        let result = self.session.receive_tls(&self.raw);
        let ok = match result {
            Ok(used) => {
                self.raw.advance(used);
                true
            }
            Err(_) => false,
        };
        self.session.take_plaintext(plain);
        self.session.take_tls_output(reply);
        if self.raw.is_empty() {
            self.raw.clear();
        }
        if ok {
            Ok(())
        } else {
            Err(())
        }
    }

    /// True once the peer sent close_notify (a clean end: treated as EOF).
    pub(crate) fn peer_closed(&self) -> bool {
        self.session.peer_closed()
    }

    /// Makes room for a read of about `want` bytes into `raw`. Small while commands are
    /// awaited (an idle TLS connection then holds about 1 KiB here, not a whole record);
    /// rustls takes partial records and keeps what it needs itself.
    pub(crate) fn reserve(&mut self, want: usize) {
        if self.raw.capacity() - self.raw.len() < want / 2 {
            self.raw.reserve(want);
        }
    }

    /// Lets go of a ciphertext buffer grown by a large read once it is empty, so an idle
    /// connection does not keep it.
    pub(crate) fn shrink(&mut self) {
        if self.raw.is_empty() && self.raw.capacity() > 4 * 1024 {
            self.raw = BytesMut::new();
        }
    }
}

/// Runs a server handshake on `io` within `timeout`. Plaintext the client sent right after
/// its Finished (a pipelined EHLO) is appended to `plain`. `Err` says why it failed; the
/// caller closes the connection.
pub(crate) async fn accept_tls<T: Transport>(
    io: &T,
    security: &Security,
    timeout: Duration,
    plain: &mut BytesMut,
) -> Result<TlsLayer, String> {
    let session = TlsSession::server(security.server_config()).map_err(|e| e.to_string())?;
    let mut layer = TlsLayer {
        session,
        raw: BytesMut::new(),
    };
    let deadline = Instant::now() + timeout.min(HANDSHAKE_TIMEOUT);
    loop {
        let mut out = BytesMut::new();
        let failed = match layer.open(plain, &mut out) {
            Ok(()) => None,
            Err(()) => Some("TLS handshake failed (bad or unexpected data)".to_string()),
        };
        if !out.is_empty() && !write_until(io, out, deadline).await {
            return Err(failed.unwrap_or_else(|| "TLS handshake: write failed".into()));
        }
        if let Some(why) = failed {
            return Err(why);
        }
        if !layer.session.is_handshaking() {
            layer.raw = BytesMut::new();
            return Ok(layer);
        }
        layer.reserve(RECORD_READ);
        let raw = std::mem::take(&mut layer.raw);
        let (result, raw) = read_until(io, raw, deadline).await;
        layer.raw = raw;
        match result {
            Some(Ok(0)) => return Err("connection closed during the TLS handshake".into()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("TLS handshake: read failed: {e}")),
            None => return Err("TLS handshake timed out".into()),
        }
    }
}

/// Writes `out` until `deadline`; false if the connection is unusable.
async fn write_until<T: Transport>(io: &T, out: BytesMut, deadline: Instant) -> bool {
    let mut write = pin!(io.send_all(out));
    tokio::select! {
        biased;
        (result, _) = write.as_mut() => result.is_ok(),
        _ = tokio::time::sleep_until(deadline) => {
            io.close_both();
            let _ = write.await;
            false
        }
    }
}
