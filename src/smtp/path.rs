//! Envelope addresses: the reverse path (MAIL FROM) and forward paths (RCPT TO), parsed and
//! validated per RFC 5321 §4.1.2 and the size limits of §4.5.3.1.
//!
//! Accepted: dot-string or quoted-string local parts, domains of letters, digits and
//! hyphens, and IPv4 / `IPv6:` address literals. A source route (`<@a,@b:user@c>`) is
//! accepted and dropped, as §C of the RFC asks. Anything else is a syntax error.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest local part (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_PART: usize = 64;
/// Longest domain (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Longest path, angle brackets included (RFC 5321 §4.5.3.1.3).
pub const MAX_PATH: usize = 256;

/// A mailbox, `local-part@domain`, as it appeared in the envelope (source route removed).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    text: Box<str>,
    at: usize,
}

impl Mailbox {
    /// Parses a bare mailbox (no angle brackets), as used in tests and configuration.
    pub fn parse(s: &str) -> Result<Mailbox, PathError> {
        parse_mailbox(s.as_bytes())
    }

    /// The local part, quotes included if it was quoted.
    pub fn local_part(&self) -> &str {
        &self.text[..self.at]
    }

    /// The domain or address literal (`[192.0.2.1]`, `[IPv6:…]`), as written.
    pub fn domain(&self) -> &str {
        &self.text[self.at + 1..]
    }

    /// The whole mailbox, `local@domain`.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}>", self.text)
    }
}

/// The reverse path of MAIL FROM: a mailbox, or the null sender `<>` used by bounces.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum ReversePath {
    /// `<>`: no bounce may ever be sent for this message.
    Null,
    /// A mailbox to which delivery status notifications go.
    Mailbox(Mailbox),
}

impl ReversePath {
    /// The mailbox, or `None` for the null sender.
    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            ReversePath::Null => None,
            ReversePath::Mailbox(m) => Some(m),
        }
    }
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(m) => f.write_str(m.as_str()),
        }
    }
}

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// Not RFC 5321 syntax.
    Syntax,
    /// Local part, domain or path over its RFC 5321 limit.
    TooLong,
}

/// Parses `<...>` at the start of `s` (the null path `<>` only when `allow_null`).
/// Returns the path (`None` for `<>`) and the bytes after the closing `>`.
pub(crate) fn parse_path(
    s: &[u8],
    allow_null: bool,
) -> Result<(Option<Mailbox>, &[u8]), PathError> {
    if s.first() != Some(&b'<') {
        return Err(PathError::Syntax);
    }
    let close = find_path_end(s).ok_or(PathError::Syntax)?;
    if close + 1 > MAX_PATH {
        return Err(PathError::TooLong);
    }
    let inner = &s[1..close];
    let rest = &s[close + 1..];
    if inner.is_empty() {
        return if allow_null {
            Ok((None, rest))
        } else {
            Err(PathError::Syntax)
        };
    }
    let mailbox = if inner[0] == b'@' {
        let colon = inner
            .iter()
            .position(|&b| b == b':')
            .ok_or(PathError::Syntax)?;
        for hop in inner[..colon].split(|&b| b == b',') {
            match hop.split_first() {
                Some((b'@', domain)) if is_domain(domain) => {}
                _ => return Err(PathError::Syntax),
            }
        }
        &inner[colon + 1..]
    } else {
        inner
    };
    Ok((Some(parse_mailbox(mailbox)?), rest))
}

/// Finds the `>` that closes the path, skipping over a quoted local part.
fn find_path_end(s: &[u8]) -> Option<usize> {
    let mut quoted = false;
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn parse_mailbox(s: &[u8]) -> Result<Mailbox, PathError> {
    let at = s
        .iter()
        .rposition(|&b| b == b'@')
        .ok_or(PathError::Syntax)?;
    let (local, domain) = (&s[..at], &s[at + 1..]);
    if local.len() > MAX_LOCAL_PART || domain.len() > MAX_DOMAIN {
        return Err(PathError::TooLong);
    }
    if !(is_dot_string(local) || is_quoted_string(local)) {
        return Err(PathError::Syntax);
    }
    if !(is_domain(domain) || is_address_literal(domain)) {
        return Err(PathError::Syntax);
    }
    // Every byte checked above is ASCII, so this cannot fail; stay panic-free regardless.
    let text = std::str::from_utf8(s).map_err(|_| PathError::Syntax)?;
    Ok(Mailbox {
        text: text.into(),
        at,
    })
}

/// RFC 5322 `atext`.
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

fn is_dot_string(s: &[u8]) -> bool {
    !s.is_empty()
        && s.split(|&b| b == b'.')
            .all(|atom| !atom.is_empty() && atom.iter().all(|&b| is_atext(b)))
}

fn is_quoted_string(s: &[u8]) -> bool {
    if s.len() < 2 || s[0] != b'"' || s[s.len() - 1] != b'"' {
        return false;
    }
    let mut i = 1;
    let end = s.len() - 1;
    while i < end {
        match s[i] {
            b'\\' => {
                if i + 1 >= end || !(32..=126).contains(&s[i + 1]) {
                    return false;
                }
                i += 2;
            }
            b'"' => return false,
            b if (32..=126).contains(&b) => i += 1,
            _ => return false,
        }
    }
    true
}

/// A domain name: dot-separated labels of letters, digits and inner hyphens.
pub(crate) fn is_domain(s: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= MAX_DOMAIN
        && s.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
                && label[0] != b'-'
                && label[label.len() - 1] != b'-'
        })
}

fn is_address_literal(s: &[u8]) -> bool {
    let Some(inner) = s.strip_prefix(b"[").and_then(|s| s.strip_suffix(b"]")) else {
        return false;
    };
    let Ok(inner) = std::str::from_utf8(inner) else {
        return false;
    };
    if let Some(v6) = inner
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("IPv6:"))
        .map(|_| &inner[5..])
    {
        return v6.parse::<Ipv6Addr>().is_ok();
    }
    inner.parse::<Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> Result<Option<String>, PathError> {
        parse_path(s.as_bytes(), true).map(|(m, _)| m.map(|m| m.to_string()))
    }

    #[test]
    fn plain_null_and_source_routed_paths() {
        assert_eq!(
            path("<a@b.example>").unwrap().as_deref(),
            Some("a@b.example")
        );
        assert_eq!(path("<>").unwrap(), None);
        assert_eq!(parse_path(b"<>", false), Err(PathError::Syntax));
        assert_eq!(
            path("<@hop1.example,@hop2.example:user@dest.example>")
                .unwrap()
                .as_deref(),
            Some("user@dest.example")
        );
    }

    #[test]
    fn local_part_forms() {
        assert!(path("<first.last+tag@x.example>").is_ok());
        assert!(path("<\"with space\"@x.example>").is_ok());
        assert!(path("<\"a\\\"b>c\"@x.example>").is_ok());
        assert_eq!(path("<.a@x.example>"), Err(PathError::Syntax));
        assert_eq!(path("<a..b@x.example>"), Err(PathError::Syntax));
        assert_eq!(path("<a b@x.example>"), Err(PathError::Syntax));
        assert_eq!(path("<@x.example>"), Err(PathError::Syntax));
    }

    #[test]
    fn domains_and_literals() {
        assert!(path("<a@[192.0.2.1]>").is_ok());
        assert!(path("<a@[IPv6:2001:db8::1]>").is_ok());
        assert_eq!(path("<a@[300.1.1.1]>"), Err(PathError::Syntax));
        assert_eq!(path("<a@[IPv6:zz]>"), Err(PathError::Syntax));
        assert_eq!(path("<a@-x.example>"), Err(PathError::Syntax));
        assert_eq!(path("<a@x..example>"), Err(PathError::Syntax));
        assert_eq!(path("<a@x_y.example>"), Err(PathError::Syntax));
        assert_eq!(path("<a>"), Err(PathError::Syntax));
        assert_eq!(path("a@b.example"), Err(PathError::Syntax));
        assert_eq!(path("<a@b.example"), Err(PathError::Syntax));
    }

    #[test]
    fn length_limits() {
        let l64 = "l".repeat(64);
        assert!(path(&format!("<{l64}@x.example>")).is_ok());
        assert_eq!(
            path(&format!("<{l64}l@x.example>")),
            Err(PathError::TooLong)
        );
        let label = "d".repeat(63);
        let d255 = format!("{label}.{label}.{label}.{}", "d".repeat(63));
        assert_eq!(d255.len(), 255);
        // 1 + 255 + 2 = 258 > 256: the path limit bites before the domain limit.
        assert_eq!(path(&format!("<a@{d255}>")), Err(PathError::TooLong));
        let d253 = &d255[2..];
        assert!(Mailbox::parse(&format!("a@{}", &d255[..])).is_ok());
        assert!(path(&format!("<a@{}>", &d253[1..])).is_ok());
        assert_eq!(
            Mailbox::parse(&format!("a@{d255}d")),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn rest_after_path_is_returned() {
        let (_, rest) = parse_path(b"<a@b.example> SIZE=10", true).unwrap();
        assert_eq!(rest, b" SIZE=10");
    }
}
