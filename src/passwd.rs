//! The users file (`auth.users_file`): who may authenticate with SMTP AUTH, and checking
//! a password against it.
//!
//! Format, one user a line: `name:HASH`, where HASH is an Argon2id hash in the PHC string
//! format (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`, as `ringrelay passwd NAME` prints
//! it). Blank lines and lines whose first non-blank character is `#` are ignored; trailing
//! whitespace (and a CRLF line end) is dropped. A name is any UTF-8 without `:`,
//! whitespace or control characters, and is compared exactly (case matters). Errors name
//! the file and line, and never echo a hash.
//!
//! Argon2id (RFC 9106) through RustCrypto's `argon2` crate, with its default parameters
//! for new hashes: m = 19 MiB, t = 2, p = 1 (OWASP's recommended minimum). A hash keeps
//! its own parameters, so stronger ones can be set per user; on loading, parameters past
//! [`MAX_M_COST_KIB`], [`MAX_T_COST`] or [`MAX_P_COST`] are refused, since every login
//! attempt, an attacker's included, would pay them.
//!
//! **Verification is deliberately slow**: [`Users::verify`] takes tens of milliseconds of
//! CPU and 19 MiB of memory per call (with the default parameters, in a release build).
//! The caller must not run it on a shard's event loop thread, where it would stall every
//! other connection of that shard: hand it to a thread made for it, and bound how many
//! run at once (memory) and how often one client may try (rate).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{
    Output, PasswordHash, PasswordHasher, PasswordVerifier, Salt, SaltString,
};
use argon2::{Algorithm, Argon2, Params, Version};

/// The largest memory cost a stored hash may ask for, in KiB (256 MiB).
pub const MAX_M_COST_KIB: u32 = 256 * 1024;

/// The largest number of passes a stored hash may ask for.
pub const MAX_T_COST: u32 = 64;

/// The largest parallelism a stored hash may ask for (computed serially here, so it is
/// more work, not more threads).
pub const MAX_P_COST: u32 = 16;

/// Hashing a new password failed (the system's random source, or the hasher itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashError(String);

impl fmt::Display for HashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot hash the password: {}", self.0)
    }
}

impl std::error::Error for HashError {}

/// A hash of `password` for the users file: Argon2id with the default parameters and a
/// fresh 16-byte salt from the operating system's random source, as a PHC string.
///
/// Slow on purpose (see the module doc); not for an event loop thread.
pub fn hash_password(password: &[u8]) -> Result<String, HashError> {
    hash_password_with(password, Params::default())
}

/// [`hash_password`] with other Argon2id parameters.
fn hash_password_with(password: &[u8], params: Params) -> Result<String, HashError> {
    let mut salt = [0u8; 16];
    OsRng
        .try_fill_bytes(&mut salt)
        .map_err(|e| HashError(format!("no random salt: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| HashError(e.to_string()))?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// Checks a user name for the users file: not empty, no `:`, no whitespace, no control
/// characters. The error says what is wrong (for `ringrelay passwd NAME`).
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("the user name is empty")
    } else if name.contains(':') {
        Err("the user name contains ':'")
    } else if name.chars().any(char::is_whitespace) {
        Err("the user name contains whitespace")
    } else if name.chars().any(char::is_control) {
        Err("the user name contains a control character")
    } else {
        Ok(())
    }
}

/// What is wrong with a users file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersError {
    /// The file, as the caller named it.
    pub path: PathBuf,
    /// The line (from 1), or 0 when the file as a whole could not be read.
    pub line: usize,
    /// What is wrong there.
    pub reason: String,
}

impl fmt::Display for UsersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "users file {}: {}", self.path.display(), self.reason)
        } else {
            write!(
                f,
                "users file {}, line {}: {}",
                self.path.display(),
                self.line,
                self.reason
            )
        }
    }
}

impl std::error::Error for UsersError {}

/// The users file, loaded: names and their hashes.
#[derive(Clone)]
pub struct Users {
    /// Name to PHC string (checked when loaded).
    hashes: HashMap<String, String>,
    /// A hash no password matches, at the cost of the file's first hash: what an unknown
    /// name is checked against, so that it takes as long as a known one.
    dummy: String,
}

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: hashes stay out of logs.
        let mut names: Vec<&str> = self.hashes.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Users").field("names", &names).finish()
    }
}

impl Users {
    /// Reads and parses the users file at `path`.
    pub fn load(path: &Path) -> Result<Users, UsersError> {
        let text = std::fs::read_to_string(path).map_err(|e| UsersError {
            path: path.to_path_buf(),
            line: 0,
            reason: format!("cannot read it: {e}"),
        })?;
        Users::parse(&text, path)
    }

    /// Parses the text of a users file; `path` is only for the errors.
    pub fn parse(text: &str, path: &Path) -> Result<Users, UsersError> {
        let error = |line: usize, reason: String| UsersError {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let mut hashes = HashMap::new();
        let mut first_line: HashMap<String, usize> = HashMap::new();
        let mut template: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let number = i + 1;
            let line = raw.trim_end();
            let content = line.trim_start();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let Some((name, hash)) = line.split_once(':') else {
                return Err(error(number, "expected name:HASH (no ':' found)".into()));
            };
            check_name(name).map_err(|why| error(number, why.into()))?;
            if let Some(first) = first_line.get(name) {
                return Err(error(
                    number,
                    format!("user {name:?} again (first on line {first})"),
                ));
            }
            check_hash(hash).map_err(|why| error(number, format!("user {name:?}: {why}")))?;
            template.get_or_insert_with(|| hash.to_string());
            first_line.insert(name.to_string(), number);
            hashes.insert(name.to_string(), hash.to_string());
        }
        let dummy = template
            .as_deref()
            .and_then(dummy_like)
            .unwrap_or_else(default_dummy);
        Ok(Users { hashes, dummy })
    }

    /// How many users the file names.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// True when the file names no user (then no AUTH can succeed).
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// True when `name` is in the file.
    pub fn contains(&self, name: &str) -> bool {
        self.hashes.contains_key(name)
    }

    /// True when `password` is `name`'s. An unknown name costs as much as a known one (it
    /// is checked against a hash no password matches, with the file's parameters), so the
    /// time taken does not tell which names exist.
    ///
    /// Slow on purpose (see the module doc): never call it on a shard's event loop thread.
    pub fn verify(&self, name: &str, password: &[u8]) -> bool {
        match self.hashes.get(name) {
            Some(hash) => verify_hash(hash, password),
            None => {
                std::hint::black_box(verify_hash(&self.dummy, password));
                false
            }
        }
    }
}

/// Checks `password` against a PHC string (its own algorithm and parameters).
fn verify_hash(hash: &str, password: &[u8]) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

/// Is this a usable Argon2id PHC string, with parameters within our caps?
fn check_hash(hash: &str) -> Result<(), String> {
    if hash.is_empty() {
        return Err("empty hash".into());
    }
    let parsed = PasswordHash::new(hash).map_err(|e| format!("hash is not a PHC string ({e})"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "hash is {}, expected argon2id",
            parsed.algorithm.as_str()
        ));
    }
    if let Some(version) = parsed.version {
        Version::try_from(version).map_err(|e| format!("argon2 version {version}: {e}"))?;
    }
    let params = Params::try_from(&parsed).map_err(|e| format!("bad argon2id parameters ({e})"))?;
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("hash has no salt or no output".into());
    }
    if params.m_cost() > MAX_M_COST_KIB
        || params.t_cost() > MAX_T_COST
        || params.p_cost() > MAX_P_COST
    {
        return Err(format!(
            "argon2id parameters m={} t={} p={} cost more than the limits m={MAX_M_COST_KIB} t={MAX_T_COST} p={MAX_P_COST}",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        ));
    }
    Ok(())
}

/// The salt of every dummy hash (any fixed value does; it is never a user's).
const DUMMY_SALT: &str = "cmluZ3JlbGF5ZHVtbXlzYWx0";

/// A hash with the algorithm, version, parameters and output length of `template`, a
/// fixed salt and an all-zero output: verifying any password against it costs what
/// verifying against `template` does, and fails.
fn dummy_like(template: &str) -> Option<String> {
    let mut hash = PasswordHash::new(template).ok()?;
    let len = hash.hash.as_ref()?.len();
    hash.salt = Some(Salt::from_b64(DUMMY_SALT).ok()?);
    hash.hash = Some(Output::new(&vec![0u8; len]).ok()?);
    Some(hash.to_string())
}

/// The dummy for a file with no users: the default parameters.
fn default_dummy() -> String {
    let p = Params::default();
    // 32 zero bytes in unpadded base64.
    format!(
        "$argon2id$v=19$m={},t={},p={}${DUMMY_SALT}${}",
        p.m_cost(),
        p.t_cost(),
        p.p_cost(),
        "A".repeat(43)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashes cheap enough for a debug build (verification uses the hash's own
    /// parameters, so these tests stay fast).
    fn cheap_hash(password: &[u8]) -> String {
        hash_password_with(password, Params::new(8, 1, 1, None).unwrap()).unwrap()
    }

    fn path() -> &'static Path {
        Path::new("/etc/ringrelay/users")
    }

    fn parse_err(text: &str) -> UsersError {
        Users::parse(text, path()).unwrap_err()
    }

    #[test]
    fn default_hash_is_argon2id_with_the_crate_defaults() {
        let hash = hash_password(b"correct horse").unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(check_hash(&hash).is_ok());
        assert!(verify_hash(&hash, b"correct horse"));
        assert!(!verify_hash(&hash, b"correct horse "));
    }

    #[test]
    fn salts_differ() {
        assert_ne!(cheap_hash(b"pw"), cheap_hash(b"pw"));
    }

    #[test]
    fn parse_and_verify() {
        let text = format!(
            "# ringrelay users\n\nalice:{}\n   # indented comment\nbob:{}   \r\n\t\njürgen:{}\n",
            cheap_hash(b"wonderland"),
            cheap_hash(b"builder"),
            cheap_hash("pässword".as_bytes()),
        );
        let users = Users::parse(&text, path()).unwrap();
        assert_eq!(users.len(), 3);
        assert!(users.contains("alice") && users.contains("bob") && users.contains("jürgen"));
        assert!(users.verify("alice", b"wonderland"));
        assert!(users.verify("bob", b"builder"));
        assert!(users.verify("jürgen", "pässword".as_bytes()));
        assert!(!users.verify("alice", b"builder"));
        assert!(!users.verify("Alice", b"wonderland"));
        assert!(!users.verify("carol", b"wonderland"));
        assert!(!users.verify("", b""));
        assert!(!users.verify("alice", b""));
    }

    #[test]
    fn empty_and_comment_only_files() {
        for text in ["", "\n\n", "# nobody yet\n", "   \n# x\n"] {
            let users = Users::parse(text, path()).unwrap();
            assert!(users.is_empty());
            assert!(!users.verify("anyone", b"anything"));
        }
    }

    #[test]
    fn errors_name_file_and_line() {
        let good = cheap_hash(b"x");
        let e = parse_err(&format!("# users\nalice:{good}\nalice:{good}\n"));
        assert_eq!(e.line, 3);
        assert_eq!(
            e.to_string(),
            "users file /etc/ringrelay/users, line 3: user \"alice\" again (first on line 2)"
        );
        let e = parse_err(&format!("\n:{good}\n"));
        assert_eq!((e.line, e.reason.as_str()), (2, "the user name is empty"));
        let e = parse_err(&format!("al ice:{good}\n"));
        assert_eq!(e.reason, "the user name contains whitespace");
        let e = parse_err(&format!(" alice:{good}\n"));
        assert_eq!(e.reason, "the user name contains whitespace");
        let e = parse_err(&format!("al\u{7}ice:{good}\n"));
        assert_eq!(e.reason, "the user name contains a control character");
        let e = parse_err("alice\n");
        assert_eq!(e.reason, "expected name:HASH (no ':' found)");
        assert_eq!(e.line, 1);
    }

    #[test]
    fn bad_hashes_are_refused_without_echoing_them() {
        let cases: &[(&str, &str)] = &[
            ("", "empty hash"),
            ("secret", "not a PHC string"),
            ("$argon2id$v=19$m=8,t=1,p=1", "no salt or no output"),
            (
                "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "hash is argon2i, expected argon2id",
            ),
            (
                "$2b$12$abcdefghijklmnopqrstuu5A5Z5Z5Z5Z5Z5Z5Z5Z5Z5Z5Z5Z5Z5Z5",
                "not a PHC string",
            ),
            (
                "$scrypt$ln=15,r=8,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "expected argon2id",
            ),
            (
                "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "bad argon2id parameters",
            ),
            (
                "$argon2id$v=17$m=8,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "argon2 version 17",
            ),
            (
                "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "cost more than the limits",
            ),
            (
                "$argon2id$v=19$m=19456,t=1000,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "cost more than the limits",
            ),
        ];
        for (hash, why) in cases {
            let e = parse_err(&format!("# x\nbob:{hash}\n"));
            assert_eq!(e.line, 2, "{hash}");
            assert!(e.reason.starts_with("user \"bob\": "), "{}", e.reason);
            assert!(e.reason.contains(why), "{hash}: {}", e.reason);
            if hash.len() > 8 {
                assert!(!e.to_string().contains(hash), "{e}");
            }
        }
    }

    #[test]
    fn unknown_users_are_checked_against_a_dummy_of_the_same_cost() {
        let hash = cheap_hash(b"pw");
        let users = Users::parse(&format!("u:{hash}\n"), path()).unwrap();
        let real = PasswordHash::new(&hash).unwrap();
        let dummy = PasswordHash::new(&users.dummy).unwrap();
        assert_eq!(real.algorithm, dummy.algorithm);
        assert_eq!(real.version, dummy.version);
        assert_eq!(real.params, dummy.params);
        assert_eq!(real.hash.unwrap().len(), dummy.hash.unwrap().len());
        assert_ne!(real.salt, dummy.salt);
        // No password opens the dummy, not even the real user's.
        assert!(!verify_hash(&users.dummy, b"pw"));
        assert!(check_hash(&users.dummy).is_ok());
        // And the dummy of an empty file is a valid hash with the defaults.
        assert!(check_hash(&default_dummy()).is_ok());
        let empty = Users::parse("", path()).unwrap();
        assert_eq!(empty.dummy, default_dummy());
    }

    #[test]
    fn debug_shows_names_not_hashes() {
        let hash = cheap_hash(b"pw");
        let users = Users::parse(&format!("zed:{hash}\namy:{hash}\n"), path()).unwrap();
        let shown = format!("{users:?}");
        assert_eq!(shown, "Users { names: [\"amy\", \"zed\"] }");
    }

    #[test]
    fn load_reads_a_file_and_says_which_one_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("users");
        std::fs::write(&file, format!("ann:{}\n", cheap_hash(b"s3cret"))).unwrap();
        assert!(Users::load(&file).unwrap().verify("ann", b"s3cret"));
        let missing = dir.path().join("nope");
        let e = Users::load(&missing).unwrap_err();
        assert_eq!(e.line, 0);
        assert!(e
            .to_string()
            .starts_with(&format!("users file {}: cannot read it", missing.display())));
    }

    #[test]
    fn check_name_for_the_passwd_command() {
        assert_eq!(check_name("alice@example.com"), Ok(()));
        assert!(check_name("").is_err());
        assert!(check_name("a:b").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("a\u{a0}b").is_err());
        assert!(check_name("a\0b").is_err());
    }

    #[test]
    fn garbage_files_give_errors_not_panics() {
        let garbage = [
            "\0\0\0",
            ":::::",
            "a:$",
            "a:$$$$$",
            "a:$argon2id$",
            "a:$argon2id$v=19$m=8,t=1,p=1$$",
            "a:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$",
            "a:$argon2id$v=19$m=8,t=1,p=1,x=9$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "a:$argon2id$v=99999999999999$m=8,t=1,p=1$c2FsdHNhbHQ$AAAA",
        ];
        for text in garbage {
            assert!(Users::parse(text, path()).is_err(), "{text:?}");
        }
    }
}
