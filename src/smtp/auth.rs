//! The server side of SMTP AUTH's SASL exchange, PLAIN and LOGIN, without I/O: the
//! `AUTH` command's arguments and the client's response lines in, `334` challenges, the
//! credentials or an error reply out.
//!
//! Follows RFC 4954 (SMTP AUTH: the `AUTH mechanism [initial-response]` command, `=` for
//! an empty initial response, `334` challenges, `*` to cancel, responses up to 12288
//! octets, the `5.5.2`/`5.5.4`/`5.5.6`/`5.7.0` replies), RFC 4616 (PLAIN:
//! `[authzid] NUL authcid NUL passwd`, no NUL inside a field) and the LOGIN mechanism as
//! clients speak it (draft-murchison-sasl-login: the challenges `Username:` and
//! `Password:`, base64-encoded; an initial response is the user name). Base64 is RFC 4648
//! §4, strictly: padding required, no whitespace, no stray bits.
//!
//! What is *not* here, and belongs to the session: whether AUTH is offered at all (only
//! after TLS: `538 5.7.11` / `530 5.7.0` before it), checking the credentials (`235
//! 2.7.0` or `535 5.7.8`), and counting failures. An [`AuthExchange`] only turns lines into
//! a user name and password, so it can be driven byte by byte from a test.
//!
//! The client side of PLAIN, for AUTH to a smarthost, is [`plain_initial_response`].

use std::fmt;

use super::reply::Reply;

/// The longest client response line, CRLF not counted (RFC 4954 §4: a server must accept
/// 12288 octets). The initial response on the `AUTH` line is held to it too.
pub const MAX_RESPONSE_LINE: usize = 12288;

/// LOGIN's first challenge, `Username:` in base64.
pub const LOGIN_USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6";

/// LOGIN's second challenge, `Password:` in base64.
pub const LOGIN_PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

/// A SASL mechanism this exchange speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// PLAIN (RFC 4616): one message holding both names and the password.
    Plain,
    /// LOGIN: user name and password in two steps.
    Login,
}

impl Mechanism {
    /// The mechanism named `name` (SASL names are case-insensitive), if we speak it.
    pub fn from_name(name: &str) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case("PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case("LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }

    /// The registered name, as advertised in `250-AUTH PLAIN LOGIN`.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// What a client claimed to be, for the caller to check. The password is never shown by
/// `Debug`, so a stray log line cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The mechanism that carried them (for the log and the Received: header).
    pub mechanism: Mechanism,
    /// The user name (PLAIN's authcid): UTF-8, not empty, no control characters.
    pub user: String,
    /// The password as sent: no NUL; usually UTF-8, but LOGIN clients may send any octets.
    pub password: Vec<u8>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("mechanism", &self.mechanism)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What the session does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send `334 ` followed by this text (base64; empty for PLAIN's "go ahead"), then read
    /// one line and pass it to [`AuthExchange::respond`]. The line is a SASL response, not
    /// a command, and may be up to [`MAX_RESPONSE_LINE`] octets long.
    Challenge(String),
    /// The exchange is over: check these and answer `235 2.7.0` or `535 5.7.8`.
    Credentials(Credentials),
    /// The exchange is over and failed: send this reply. The session is not authenticated.
    Error(Reply),
}

/// Where an exchange stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum State {
    /// No exchange under way.
    #[default]
    Idle,
    /// PLAIN sent its empty challenge.
    PlainWaiting,
    /// LOGIN asked for the user name.
    LoginWaitingUser,
    /// LOGIN asked for the password of this user.
    LoginWaitingPassword(String),
}

/// One SMTP AUTH exchange, from the `AUTH` command to its end, as a state machine.
///
/// ```
/// use ringrelay::smtp::auth::{AuthExchange, Step};
/// let mut auth = AuthExchange::new();
/// assert_eq!(auth.start_command(b"LOGIN"), Step::Challenge("VXNlcm5hbWU6".into()));
/// assert!(auth.is_waiting());
/// assert_eq!(auth.respond(b"dXNlcg=="), Step::Challenge("UGFzc3dvcmQ6".into()));
/// match auth.respond(b"c2VjcmV0") {
///     Step::Credentials(c) => assert_eq!((c.user.as_str(), c.password.as_slice()), ("user", &b"secret"[..])),
///     other => panic!("{other:?}"),
/// }
/// assert!(!auth.is_waiting());
/// ```
#[derive(Debug, Default)]
pub struct AuthExchange {
    state: State,
}

impl AuthExchange {
    /// An exchange with nothing under way.
    pub fn new() -> Self {
        Self::default()
    }

    /// True while a `334` challenge is outstanding: the next line from the client is a
    /// response for [`respond`](Self::respond), not a command.
    pub fn is_waiting(&self) -> bool {
        self.state != State::Idle
    }

    /// Starts an exchange from the `AUTH` command's arguments (everything after `AUTH `,
    /// without the CRLF): a mechanism name, then optionally one space and an initial
    /// response (base64, or `=` for an empty one). An exchange already under way is
    /// abandoned.
    pub fn start_command(&mut self, args: &[u8]) -> Step {
        self.state = State::Idle;
        let (name, initial) = match args.iter().position(|&b| b == b' ') {
            Some(i) => (&args[..i], Some(&args[i + 1..])),
            None => (args, None),
        };
        let Ok(name) = std::str::from_utf8(name) else {
            return Step::Error(unknown_mechanism());
        };
        if name.is_empty() {
            return Step::Error(syntax_error("a mechanism name is required"));
        }
        let Some(mechanism) = Mechanism::from_name(name) else {
            // A well-formed but unknown name, or garbage: either way not one of ours.
            return Step::Error(unknown_mechanism());
        };
        if let Some(ir) = initial {
            if ir.is_empty() || ir.contains(&b' ') {
                return Step::Error(syntax_error(
                    "one initial response at most, after one space",
                ));
            }
        }
        self.start(mechanism, initial)
    }

    /// Starts an exchange of `mechanism`, with the initial response from the `AUTH` line
    /// if it had one (still base64-encoded; `=` means empty). An exchange already under
    /// way is abandoned.
    pub fn start(&mut self, mechanism: Mechanism, initial_response: Option<&[u8]>) -> Step {
        self.state = State::Idle;
        match (mechanism, initial_response) {
            (Mechanism::Plain, None) => {
                self.state = State::PlainWaiting;
                Step::Challenge(String::new())
            }
            (Mechanism::Login, None) => {
                self.state = State::LoginWaitingUser;
                Step::Challenge(LOGIN_USERNAME_CHALLENGE.to_string())
            }
            (mechanism, Some(ir)) => {
                // `*` here is no cancel (there is nothing to cancel yet): it fails as
                // base64. `=` is the empty response (RFC 4954 §4).
                let decoded = match decode_response(ir, true) {
                    Ok(d) => d,
                    Err(reply) => return Step::Error(reply),
                };
                match mechanism {
                    Mechanism::Plain => finish_plain(&decoded),
                    Mechanism::Login => self.login_user(&decoded),
                }
            }
        }
    }

    /// Takes the client's response to the last challenge: one line, without its CRLF (a
    /// trailing CRLF is tolerated and dropped). `*` cancels the exchange.
    pub fn respond(&mut self, line: &[u8]) -> Step {
        let line = line.strip_suffix(b"\r\n").unwrap_or(line);
        let state = std::mem::take(&mut self.state);
        if state == State::Idle {
            return Step::Error(no_exchange());
        }
        if line == b"*" {
            return Step::Error(Reply::new(501, "5.7.0 Authentication cancelled"));
        }
        let decoded = match decode_response(line, false) {
            Ok(d) => d,
            Err(reply) => return Step::Error(reply),
        };
        match state {
            State::Idle => Step::Error(no_exchange()),
            State::PlainWaiting => finish_plain(&decoded),
            State::LoginWaitingUser => self.login_user(&decoded),
            State::LoginWaitingPassword(user) => finish_login(user, decoded),
        }
    }

    /// LOGIN has its user name (from the initial response or the first challenge).
    fn login_user(&mut self, decoded: &[u8]) -> Step {
        match user_name(decoded) {
            Ok(user) => {
                self.state = State::LoginWaitingPassword(user);
                Step::Challenge(LOGIN_PASSWORD_CHALLENGE.to_string())
            }
            Err(reply) => Step::Error(reply),
        }
    }
}

/// The base64 text of a response, decoded; `=` is empty only where `equals_is_empty`.
fn decode_response(text: &[u8], equals_is_empty: bool) -> Result<Vec<u8>, Reply> {
    if text.len() > MAX_RESPONSE_LINE {
        return Err(Reply::new(
            500,
            "5.5.6 Authentication Exchange line is too long",
        ));
    }
    if equals_is_empty && text == b"=" {
        return Ok(Vec::new());
    }
    base64_decode(text)
        .ok_or_else(|| Reply::new(501, "5.5.2 Cannot decode response (invalid base64)"))
}

/// PLAIN's message (RFC 4616 §2): `[authzid] NUL authcid NUL passwd`.
fn finish_plain(message: &[u8]) -> Step {
    let mut fields = message.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Step::Error(malformed(
            "PLAIN response is not authzid NUL authcid NUL password",
        ));
    };
    let user = match user_name(authcid) {
        Ok(u) => u,
        Err(reply) => return Step::Error(reply),
    };
    if passwd.is_empty() {
        return Step::Error(malformed("empty password"));
    }
    // We authenticate users, we do not let one act for another: an authorization identity
    // must be absent or the user's own.
    if !authzid.is_empty() && authzid != authcid {
        return Step::Error(Reply::new(
            535,
            "5.7.8 Authentication credentials invalid (authorization identity differs)",
        ));
    }
    Step::Credentials(Credentials {
        mechanism: Mechanism::Plain,
        user,
        password: passwd.to_vec(),
    })
}

/// LOGIN's password arrived for `user`.
fn finish_login(user: String, password: Vec<u8>) -> Step {
    if password.contains(&0) {
        return Step::Error(malformed("NUL in the password"));
    }
    if password.is_empty() {
        return Step::Error(malformed("empty password"));
    }
    Step::Credentials(Credentials {
        mechanism: Mechanism::Login,
        user,
        password,
    })
}

/// A user name as we take it: UTF-8, not empty, no control characters (NUL included: a
/// name with a line break could forge log lines later).
fn user_name(raw: &[u8]) -> Result<String, Reply> {
    let name = std::str::from_utf8(raw).map_err(|_| malformed("user name is not UTF-8"))?;
    if name.is_empty() {
        return Err(malformed("empty user name"));
    }
    if name.chars().any(char::is_control) {
        return Err(malformed("control character in the user name"));
    }
    Ok(name.to_string())
}

fn malformed(what: &str) -> Reply {
    Reply::new(
        501,
        format!("5.5.2 Invalid authentication response: {what}"),
    )
}

fn syntax_error(what: &str) -> Reply {
    Reply::new(
        501,
        format!("5.5.4 Syntax error in AUTH parameters: {what}"),
    )
}

fn no_exchange() -> Reply {
    Reply::new(503, "5.5.1 Error: no authentication in progress")
}

fn unknown_mechanism() -> Reply {
    Reply::new(504, "5.5.4 Unrecognized authentication type")
}

/// The client's initial response for `AUTH PLAIN` (no authorization identity): the
/// base64 of `NUL user NUL password`.
pub fn plain_initial_response(user: &str, password: &[u8]) -> String {
    let mut message = Vec::with_capacity(user.len() + password.len() + 2);
    message.push(0);
    message.extend_from_slice(user.as_bytes());
    message.push(0);
    message.extend_from_slice(password);
    base64_encode(&message)
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 (RFC 4648 §4, with padding) of `data`.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// The value of one base64 character, or `None` outside the alphabet.
fn sextet_value(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Strict base64 (RFC 4648 §4): length a multiple of 4, `=` only as one or two final
/// characters, no whitespace, and the bits that padding leaves over must be zero (so that
/// every byte string has exactly one encoding). `None` for anything else. The empty
/// string decodes to nothing.
pub fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let quads = text.len() / 4;
    for (i, quad) in text.chunks_exact(4).enumerate() {
        let last = i + 1 == quads;
        let pad = match (quad[2], quad[3]) {
            (b'=', b'=') if last => 2,
            (_, b'=') if last => 1,
            _ => 0,
        };
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | sextet_value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        match pad {
            0 => out.extend_from_slice(&bytes),
            1 if n & 0xff == 0 => out.extend_from_slice(&bytes[..2]),
            2 if n & 0xffff == 0 => out.push(bytes[0]),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn creds(step: Step) -> Credentials {
        match step {
            Step::Credentials(c) => c,
            other => panic!("expected credentials, got {other:?}"),
        }
    }

    fn error(step: Step) -> (u16, String) {
        match step {
            Step::Error(r) => (r.code(), r.lines()[0].clone()),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn b64(s: &[u8]) -> Vec<u8> {
        base64_encode(s).into_bytes()
    }

    #[test]
    fn base64_known_vectors() {
        // RFC 4648 §10.
        let vectors: &[(&str, &str)] = &[
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain.as_bytes()), *encoded);
            assert_eq!(
                base64_decode(encoded.as_bytes()).as_deref(),
                Some(plain.as_bytes())
            );
        }
        assert_eq!(base64_encode(b"Username:"), LOGIN_USERNAME_CHALLENGE);
        assert_eq!(base64_encode(b"Password:"), LOGIN_PASSWORD_CHALLENGE);
        assert_eq!(base64_decode(b"+/+/").unwrap(), vec![0xfb, 0xff, 0xbf]);
    }

    #[test]
    fn base64_rejects_everything_not_canonical() {
        let bad: &[&[u8]] = &[
            b"Zg",       // no padding
            b"Zg=",      // short padding
            b"Zm9",      // length not a multiple of 4
            b"Zg==Zg==", // padding in the middle
            b"Z===",     // three pads
            b"====",
            b"Zh==", // stray bits under the padding
            b"Zm9=", // ditto, one pad
            b"Zm 9v",
            b"Zm9v\r\n",
            b" Zm9v",
            b"Zm9v ",
            b"Zm-v", // URL-safe alphabet
            b"Zm_v",
            b"Zm\0v",
            b"Zm9v=",
            b"=Zm9",
            b"Z=9v",
            b"\xff\xff\xff\xff",
        ];
        for text in bad {
            assert_eq!(
                base64_decode(text),
                None,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn plain_with_initial_response() {
        let mut auth = AuthExchange::new();
        let c = creds(auth.start_command(b"PLAIN AHRpbQB0YW5zdGFhZnRhbmRlbmRlbg=="));
        assert_eq!(c.mechanism, Mechanism::Plain);
        assert_eq!(c.user, "tim");
        assert_eq!(c.password, b"tanstaaftandenden");
        assert!(!auth.is_waiting());
    }

    #[test]
    fn plain_after_empty_challenge() {
        let mut auth = AuthExchange::new();
        assert_eq!(auth.start_command(b"PLAIN"), Step::Challenge(String::new()));
        assert!(auth.is_waiting());
        let c = creds(auth.respond(&b64(b"\0alice\0wonder land")));
        assert_eq!(
            (c.user.as_str(), c.password.as_slice()),
            ("alice", &b"wonder land"[..])
        );
        assert!(!auth.is_waiting());
    }

    #[test]
    fn mechanism_names_are_case_insensitive() {
        let mut auth = AuthExchange::new();
        assert_eq!(auth.start_command(b"plain"), Step::Challenge(String::new()));
        assert_eq!(
            auth.start_command(b"LoGiN"),
            Step::Challenge(LOGIN_USERNAME_CHALLENGE.into())
        );
        assert_eq!(Mechanism::from_name("Plain"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::Login.name(), "LOGIN");
    }

    #[test]
    fn plain_authzid_must_be_empty_or_the_user() {
        let mut auth = AuthExchange::new();
        let c = creds(auth.start_command(&[b"PLAIN ".as_slice(), &b64(b"bob\0bob\0pw")].concat()));
        assert_eq!(c.user, "bob");
        let (code, text) =
            error(auth.start_command(&[b"PLAIN ".as_slice(), &b64(b"admin\0bob\0pw")].concat()));
        assert_eq!(code, 535);
        assert!(text.starts_with("5.7.8 "), "{text}");
    }

    #[test]
    fn plain_structure_is_checked() {
        let bad: &[&[u8]] = &[
            b"",               // nothing
            b"bob",            // no NUL
            b"\0bob",          // no password
            b"\0bob\0",        // empty password
            b"\0\0pw",         // empty user
            b"\0bob\0pw\0",    // a NUL too many
            b"\0bob\0p\0w",    // NUL inside the password
            b"\0b\xffob\0pw",  // user not UTF-8
            b"\0bob\r\nX\0pw", // control characters in the user
        ];
        for message in bad {
            // As an initial response (`=` when empty)…
            let mut auth = AuthExchange::new();
            let encoded = if message.is_empty() {
                b"=".to_vec()
            } else {
                b64(message)
            };
            let ir = [b"PLAIN ".as_slice(), &encoded].concat();
            let (code, text) = error(auth.start_command(&ir));
            assert_eq!(code, 501, "{message:?}");
            assert!(text.starts_with("5.5.2 "), "{text}");
            assert!(!auth.is_waiting());
            // …and after the challenge (where empty is an empty line).
            assert_eq!(auth.start_command(b"PLAIN"), Step::Challenge(String::new()));
            let (code, text) = error(auth.respond(&b64(message)));
            assert_eq!(code, 501, "{message:?}");
            assert!(text.starts_with("5.5.2 "), "{text}");
            assert!(!auth.is_waiting());
        }
        // A non-ASCII but valid UTF-8 user is fine.
        let c = creds(
            AuthExchange::new()
                .start_command(&[b"PLAIN ".as_slice(), &b64("\0jürgen\0pw".as_bytes())].concat()),
        );
        assert_eq!(c.user, "jürgen");
    }

    #[test]
    fn equals_is_an_empty_initial_response() {
        // PLAIN with an empty message: malformed, not a challenge.
        let (code, _) = error(AuthExchange::new().start_command(b"PLAIN ="));
        assert_eq!(code, 501);
        // LOGIN with an empty user name: likewise.
        let (code, _) = error(AuthExchange::new().start_command(b"LOGIN ="));
        assert_eq!(code, 501);
        // But `=` as a response to a challenge is just bad base64.
        let mut auth = AuthExchange::new();
        auth.start_command(b"PLAIN");
        let (code, text) = error(auth.respond(b"="));
        assert_eq!((code, &text[..6]), (501, "5.5.2 "));
    }

    #[test]
    fn login_two_steps() {
        let mut auth = AuthExchange::new();
        assert_eq!(
            auth.start(Mechanism::Login, None),
            Step::Challenge("VXNlcm5hbWU6".into())
        );
        assert_eq!(
            auth.respond(b"dGlt\r\n"),
            Step::Challenge("UGFzc3dvcmQ6".into())
        );
        assert!(auth.is_waiting());
        let c = creds(auth.respond(b"dGFuc3RhYWZ0YW5kZW5kZW4="));
        assert_eq!(c.mechanism, Mechanism::Login);
        assert_eq!(
            (c.user.as_str(), c.password.as_slice()),
            ("tim", &b"tanstaaftandenden"[..])
        );
    }

    #[test]
    fn login_initial_response_is_the_user_name() {
        let mut auth = AuthExchange::new();
        assert_eq!(
            auth.start_command(b"LOGIN dGlt"),
            Step::Challenge("UGFzc3dvcmQ6".into())
        );
        let c = creds(auth.respond(&b64(b"pw")));
        assert_eq!(c.user, "tim");
    }

    #[test]
    fn login_rejects_nul_and_empties() {
        let mut auth = AuthExchange::new();
        auth.start_command(b"LOGIN");
        assert_eq!(error(auth.respond(&b64(b"ti\0m"))).0, 501);
        auth.start_command(b"LOGIN");
        assert_eq!(error(auth.respond(b"")).0, 501); // empty user
        auth.start_command(b"LOGIN");
        auth.respond(&b64(b"tim"));
        assert_eq!(error(auth.respond(&b64(b"p\0w"))).0, 501);
        auth.start_command(b"LOGIN");
        auth.respond(&b64(b"tim"));
        assert_eq!(error(auth.respond(b"")).0, 501); // empty password
                                                     // Non-UTF-8 passwords pass through for the caller to check.
        auth.start_command(b"LOGIN");
        auth.respond(&b64(b"tim"));
        assert_eq!(
            creds(auth.respond(&b64(b"\xe9t\xe9"))).password,
            b"\xe9t\xe9"
        );
    }

    #[test]
    fn star_cancels_at_any_challenge() {
        for steps in [&[][..], &[b"dGlt".as_slice()][..]] {
            let mut auth = AuthExchange::new();
            auth.start_command(b"LOGIN");
            for s in steps {
                auth.respond(s);
            }
            assert_eq!(
                error(auth.respond(b"*")),
                (501, "5.7.0 Authentication cancelled".into())
            );
            assert!(!auth.is_waiting());
        }
        let mut auth = AuthExchange::new();
        auth.start_command(b"PLAIN");
        assert_eq!(error(auth.respond(b"*\r\n")).0, 501);
        // `*` as an initial response is not a cancel, just bad base64.
        assert!(error(AuthExchange::new().start_command(b"PLAIN *"))
            .1
            .starts_with("5.5.2"));
    }

    #[test]
    fn unknown_mechanisms_and_bad_arguments() {
        let mut auth = AuthExchange::new();
        let unknown = (504, "5.5.4 Unrecognized authentication type".to_string());
        assert_eq!(error(auth.start_command(b"CRAM-MD5")), unknown);
        assert_eq!(error(auth.start_command(b"XOAUTH2 dGVzdA==")), unknown);
        assert_eq!(error(auth.start_command(b"PLAINX")), unknown);
        assert_eq!(error(auth.start_command(b"\xffPLAIN")), unknown);
        assert_eq!(error(auth.start_command(b"")).0, 501);
        assert_eq!(error(auth.start_command(b" PLAIN")).0, 501);
        assert_eq!(error(auth.start_command(b"PLAIN ")).0, 501);
        assert_eq!(error(auth.start_command(b"PLAIN  AHRpbQB4")).0, 501);
        assert_eq!(error(auth.start_command(b"PLAIN AHRpbQB4 extra")).0, 501);
        assert!(!auth.is_waiting());
    }

    #[test]
    fn bad_base64_in_a_response() {
        let mut auth = AuthExchange::new();
        auth.start_command(b"LOGIN");
        let (code, text) = error(auth.respond(b"not base64!"));
        assert_eq!(code, 501);
        assert!(text.starts_with("5.5.2 "));
        assert!(!auth.is_waiting());
        let (code, _) = error(AuthExchange::new().start_command(b"PLAIN AHRpbQB4\0"));
        assert_eq!(code, 501);
    }

    #[test]
    fn response_line_limit() {
        // The longest allowed response decodes (to a long password, here).
        let password = vec![b'p'; MAX_RESPONSE_LINE / 4 * 3 - 8];
        let mut message = b"\0tim\0".to_vec();
        message.extend_from_slice(&password);
        let text = b64(&message);
        assert!(text.len() <= MAX_RESPONSE_LINE);
        let mut auth = AuthExchange::new();
        auth.start_command(b"PLAIN");
        assert_eq!(creds(auth.respond(&text)).password, password);
        // One octet more than the limit: 500 5.5.6, whatever it holds.
        let long = vec![b'A'; MAX_RESPONSE_LINE + 4];
        auth.start_command(b"PLAIN");
        let (code, text) = error(auth.respond(&long));
        assert_eq!((code, &text[..6]), (500, "5.5.6 "));
        let (code, _) =
            error(AuthExchange::new().start_command(&[b"PLAIN ".as_slice(), &long].concat()));
        assert_eq!(code, 500);
        let mut auth = AuthExchange::new();
        auth.start_command(b"LOGIN");
        assert_eq!(error(auth.respond(&vec![b'x'; 100_000])).0, 500);
    }

    #[test]
    fn respond_without_an_exchange() {
        let mut auth = AuthExchange::new();
        assert_eq!(error(auth.respond(b"dGlt")).0, 503);
        let _ = creds(auth.start_command(&[b"PLAIN ".as_slice(), &b64(b"\0a\0b")].concat()));
        assert_eq!(error(auth.respond(b"dGlt")).0, 503);
    }

    #[test]
    fn a_new_auth_abandons_the_old_exchange() {
        let mut auth = AuthExchange::new();
        auth.start_command(b"LOGIN");
        auth.respond(b"dGlt");
        assert_eq!(auth.start_command(b"PLAIN"), Step::Challenge(String::new()));
        let c = creds(auth.respond(&b64(b"\0ann\0x")));
        assert_eq!((c.mechanism, c.user.as_str()), (Mechanism::Plain, "ann"));
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = creds(
            AuthExchange::new()
                .start_command(&[b"PLAIN ".as_slice(), &b64(b"\0tim\0hunter2")].concat()),
        );
        let shown = format!("{c:?} {:?}", Step::Credentials(c.clone()));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("tim"));
    }

    #[test]
    fn client_side_plain_response_round_trips() {
        let ir = plain_initial_response("smart", b"p@ss word");
        let c = creds(AuthExchange::new().start(Mechanism::Plain, Some(ir.as_bytes())));
        assert_eq!(
            (c.user.as_str(), c.password.as_slice()),
            ("smart", &b"p@ss word"[..])
        );
    }

    #[test]
    fn replies_write_as_smtp_lines() {
        let mut out = bytes::BytesMut::new();
        match AuthExchange::new().start_command(b"NTLM") {
            Step::Error(r) => r.write_to(&mut out),
            other => panic!("{other:?}"),
        }
        assert_eq!(&out[..], b"504 5.5.4 Unrecognized authentication type\r\n");
    }

    proptest! {
        #[test]
        fn base64_round_trips(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let text = base64_encode(&data);
            prop_assert_eq!(text.len() % 4, 0);
            prop_assert_eq!(base64_decode(text.as_bytes()), Some(data));
        }

        /// Whatever decodes re-encodes to the very same text (one encoding per value).
        #[test]
        fn base64_decoding_is_canonical(text in proptest::collection::vec(
            prop_oneof![Just(b'='), Just(b'A'), Just(b'/'), Just(b'z'), any::<u8>()], 0..40)
        ) {
            if let Some(data) = base64_decode(&text) {
                prop_assert_eq!(base64_encode(&data).into_bytes(), text);
            }
        }

        /// Arbitrary lines through a whole exchange: never a panic, and every exchange
        /// ends within two lines.
        #[test]
        fn hostile_lines_never_panic(
            args in proptest::collection::vec(any::<u8>(), 0..40),
            lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..60), 0..4),
            login in any::<bool>(),
        ) {
            let mut auth = AuthExchange::new();
            let _ = auth.start_command(&args);
            auth.start_command(if login { b"LOGIN" } else { b"PLAIN" });
            for line in &lines {
                let _ = auth.respond(line);
            }
            prop_assert!(lines.len() < 2 || !auth.is_waiting());
        }

        /// PLAIN carries any user and password without NUL (user without controls).
        #[test]
        fn plain_round_trips(
            user in "[^\\x00-\\x1f\\x7f\\u{80}-\\u{9f}]{1,40}",
            password in proptest::collection::vec(1u8..=255, 1..80),
        ) {
            let ir = plain_initial_response(&user, &password);
            let c = creds(AuthExchange::new().start(Mechanism::Plain, Some(ir.as_bytes())));
            prop_assert_eq!(c.user, user);
            prop_assert_eq!(c.password, password);
        }
    }
}
