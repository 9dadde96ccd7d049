//! The envelope parameters of two SMTP extensions, parsed and checked without I/O:
//! SMTPUTF8 (RFC 6531: internationalized addresses) and DSN (RFC 3461: `RET` and `ENVID`
//! on MAIL, `NOTIFY` and `ORCPT` on RCPT), with the `xtext` encoding their values use
//! (RFC 3461 §4). Also the U-label domain helpers that let routing and relay checks see
//! one ASCII (A-label) form of a domain, whatever form the client wrote it in.
//!
//! Values are decoded once, here, and kept decoded (printable US-ASCII, as RFC 3461 §4.2
//! and §4.4 require): the spool stores them so, our reports print them, and the outbound
//! client encodes them again for a next hop that offers DSN.

use std::borrow::Cow;
use std::sync::Arc;

/// Longest ENVID value, decoded (RFC 3461 §4.4: 100 characters).
pub const MAX_ENVID: usize = 100;
/// Longest ORCPT parameter value, as sent (RFC 3461 §4.2: 500 characters).
pub const MAX_ORCPT: usize = 500;

/// What `RET=` asks a failure report to return (RFC 3461 §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    /// `RET=FULL`: the whole message.
    Full,
    /// `RET=HDRS`: its header section only.
    Hdrs,
}

/// The `NOTIFY=` of one recipient (RFC 3461 §4.1), as bits; all clear when none was given
/// (then the relay's default applies: a failure report, no success or delay report).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Notify(u8);

impl Notify {
    /// `NOTIFY=NEVER`.
    pub const NEVER: Notify = Notify(1);
    /// `SUCCESS` in the list.
    pub const SUCCESS: Notify = Notify(2);
    /// `FAILURE` in the list.
    pub const FAILURE: Notify = Notify(4);
    /// `DELAY` in the list.
    pub const DELAY: Notify = Notify(8);

    /// As stored in the spool.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// From the spool; `None` for bits no parse could have made.
    pub fn from_bits(bits: u8) -> Option<Notify> {
        let n = Notify(bits);
        let valid = bits & !15 == 0 && !(n.has(Notify::NEVER) && bits != Notify::NEVER.0);
        valid.then_some(n)
    }

    /// True when no NOTIFY was given.
    pub fn is_default(self) -> bool {
        self.0 == 0
    }

    /// True when `flag` is in the list.
    pub fn has(self, flag: Notify) -> bool {
        self.0 & flag.0 != 0
    }

    /// A failure is reported: FAILURE asked for, or no NOTIFY (RFC 3461 §4.1 leaves the
    /// default to us; we report failures, as every MTA does).
    pub fn wants_failure(self) -> bool {
        self.is_default() || self.has(Notify::FAILURE)
    }

    /// `NEVER` or `SUCCESS,FAILURE,DELAY` (in that order), for a next hop.
    pub fn to_param(self) -> String {
        if self.has(Notify::NEVER) {
            return "NEVER".into();
        }
        let names = [
            (Notify::SUCCESS, "SUCCESS"),
            (Notify::FAILURE, "FAILURE"),
            (Notify::DELAY, "DELAY"),
        ];
        let list: Vec<&str> = names
            .iter()
            .filter(|(f, _)| self.has(*f))
            .map(|(_, n)| *n)
            .collect();
        list.join(",")
    }
}

/// One recipient's DSN parameters.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RcptDsn {
    /// `NOTIFY=`.
    pub notify: Notify,
    /// `ORCPT=`: the address type (e.g. `rfc822`) and the address, decoded from xtext.
    pub orcpt: Option<Orcpt>,
}

impl RcptDsn {
    /// True when the client gave neither NOTIFY nor ORCPT.
    pub fn is_default(&self) -> bool {
        self.notify.is_default() && self.orcpt.is_none()
    }
}

/// An `ORCPT=addr-type;xtext` value, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Orcpt {
    /// The address type, e.g. `rfc822` (an atom, RFC 3461 §4.2).
    pub addr_type: Box<str>,
    /// The original address, decoded: printable ASCII.
    pub addr: Box<str>,
}

impl Orcpt {
    /// `addr-type;xtext` for a next hop.
    pub fn to_param(&self) -> String {
        format!("{};{}", self.addr_type, xtext_encode(&self.addr))
    }
}

/// A message's DSN parameters: the per-message ones and every recipient's, in envelope
/// order. Present only when the client gave at least one DSN parameter.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DsnEnvelope {
    /// `RET=`.
    pub ret: Option<Ret>,
    /// `ENVID=`, decoded.
    pub envid: Option<Box<str>>,
    /// One per recipient, in envelope order.
    pub rcpts: Vec<RcptDsn>,
}

impl DsnEnvelope {
    /// Recipient `index`'s parameters (the defaults when it has none).
    pub fn rcpt(dsn: Option<&Arc<DsnEnvelope>>, index: usize) -> RcptDsn {
        dsn.and_then(|d| d.rcpts.get(index))
            .cloned()
            .unwrap_or_default()
    }
}

/// Decodes an xtext value (RFC 3461 §4): `+XX` (two upper-case hex digits) for an octet,
/// any other character from `!` to `~` but `+` and `=` as itself. The decoded value must be
/// printable ASCII (space included): a control character could break a report's fields.
pub fn xtext_decode(value: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        let b = value[i];
        let decoded = match b {
            b'+' => {
                let hex = value.get(i + 1..i + 3)?;
                let digit = |d: u8| match d {
                    b'0'..=b'9' => Some(d - b'0'),
                    b'A'..=b'F' => Some(d - b'A' + 10),
                    _ => None,
                };
                i += 3;
                digit(hex[0])? << 4 | digit(hex[1])?
            }
            b'!'..=b'~' if b != b'=' => {
                i += 1;
                b
            }
            _ => return None,
        };
        if !(0x20..=0x7e).contains(&decoded) {
            return None;
        }
        out.push(char::from(decoded));
    }
    Some(out)
}

/// Encodes `value` as xtext: `+`, `=`, space and anything outside `!`..`~` as `+XX`.
pub fn xtext_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Parses `NEVER` or a comma list of `SUCCESS`, `FAILURE`, `DELAY` (case-insensitive, each
/// at most once; NEVER alone).
pub fn parse_notify(value: &[u8]) -> Option<Notify> {
    let mut bits = 0u8;
    for word in value.split(|&b| b == b',') {
        let flag = if word.eq_ignore_ascii_case(b"NEVER") {
            Notify::NEVER
        } else if word.eq_ignore_ascii_case(b"SUCCESS") {
            Notify::SUCCESS
        } else if word.eq_ignore_ascii_case(b"FAILURE") {
            Notify::FAILURE
        } else if word.eq_ignore_ascii_case(b"DELAY") {
            Notify::DELAY
        } else {
            return None;
        };
        if bits & flag.0 != 0 {
            return None;
        }
        bits |= flag.0;
    }
    Notify::from_bits(bits).filter(|n| !n.is_default())
}

/// Parses `addr-type;xtext` (RFC 3461 §4.2): the type an atom of letters, digits and `-`,
/// the address non-empty xtext, the whole at most [`MAX_ORCPT`] characters.
pub fn parse_orcpt(value: &[u8]) -> Option<Orcpt> {
    if value.len() > MAX_ORCPT {
        return None;
    }
    let semi = value.iter().position(|&b| b == b';')?;
    let (addr_type, addr) = (&value[..semi], &value[semi + 1..]);
    if addr_type.is_empty()
        || !addr_type
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
        || addr.is_empty()
    {
        return None;
    }
    let addr = xtext_decode(addr)?;
    let addr_type = std::str::from_utf8(addr_type).ok()?;
    Some(Orcpt {
        addr_type: addr_type.into(),
        addr: addr.into(),
    })
}

/// Parses an `ENVID=` value: xtext of at most [`MAX_ENVID`] characters once decoded.
pub fn parse_envid(value: &[u8]) -> Option<Box<str>> {
    let decoded = xtext_decode(value)?;
    (!decoded.is_empty() && decoded.len() <= MAX_ENVID).then(|| decoded.into())
}

/// A domain as routing and relay checks compare it: the A-label (ASCII) form, lower
/// case. An ASCII domain is only lower-cased; a U-label domain is converted by IDNA
/// (UTS #46); one that does not convert is returned lower-cased as it is, and will match
/// nothing configured in ASCII.
pub fn ascii_domain(domain: &str) -> Cow<'_, str> {
    if domain.is_ascii() {
        if domain.bytes().any(|b| b.is_ascii_uppercase()) {
            return Cow::Owned(domain.to_ascii_lowercase());
        }
        return Cow::Borrowed(domain);
    }
    match idna::domain_to_ascii_strict(domain) {
        Ok(a) => Cow::Owned(a),
        Err(_) => Cow::Owned(domain.to_lowercase()),
    }
}

/// True when `domain` (not all ASCII) is a valid internationalized domain name: it
/// converts to an A-label form that is itself a valid DNS name (RFC 5890, UTS #46 strict).
pub fn is_u_domain(domain: &str) -> bool {
    !domain.chars().any(char::is_control)
        && idna::domain_to_ascii_strict(domain).is_ok_and(|a| super::path::is_domain(a.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_round_trips_and_rejects_bad_escapes() {
        assert_eq!(xtext_decode(b"a+2Bb+3Dc").as_deref(), Some("a+b=c"));
        assert_eq!(
            xtext_decode(b"user@example.org").as_deref(),
            Some("user@example.org")
        );
        assert_eq!(xtext_decode(b"").as_deref(), Some(""));
        for bad in [
            &b"+ZZ"[..],
            b"+2",
            b"+",
            b"+2b",    // lower-case hex is not xtext
            b"a=b",    // `=` must be encoded
            b"a b",    // so must a space
            b"+0D+0A", // decodes to controls
            b"+00",
            b"+7F",
            b"+C3+A9", // 8-bit: not printable ASCII
            "é".as_bytes(),
        ] {
            assert_eq!(
                xtext_decode(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let odd = "a+b=c d\\";
        assert_eq!(xtext_encode(odd), "a+2Bb+3Dc+20d\\");
        assert_eq!(
            xtext_decode(xtext_encode(odd).as_bytes()).as_deref(),
            Some(odd)
        );
    }

    #[test]
    fn notify_lists() {
        assert_eq!(parse_notify(b"NEVER"), Some(Notify::NEVER));
        let sf = parse_notify(b"success,Failure").unwrap();
        assert!(sf.has(Notify::SUCCESS) && sf.has(Notify::FAILURE) && !sf.has(Notify::DELAY));
        assert_eq!(sf.to_param(), "SUCCESS,FAILURE");
        assert_eq!(
            parse_notify(b"DELAY,SUCCESS,FAILURE").unwrap().to_param(),
            "SUCCESS,FAILURE,DELAY"
        );
        for bad in [
            &b""[..],
            b"NEVER,SUCCESS",
            b"FAILURE,NEVER",
            b"SUCCESS,SUCCESS",
            b"SUCCESS,",
            b",SUCCESS",
            b"ALWAYS",
            b"SUCCESS FAILURE",
        ] {
            assert_eq!(parse_notify(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert!(Notify::default().wants_failure());
        assert!(!Notify::NEVER.wants_failure());
        assert!(!Notify::SUCCESS.wants_failure());
        assert_eq!(Notify::from_bits(Notify::NEVER.bits() | 2), None);
        assert_eq!(Notify::from_bits(16), None);
    }

    #[test]
    fn orcpt_and_envid() {
        let o = parse_orcpt(b"rfc822;bob+2Bx@example.org").unwrap();
        assert_eq!((&*o.addr_type, &*o.addr), ("rfc822", "bob+x@example.org"));
        assert_eq!(o.to_param(), "rfc822;bob+2Bx@example.org");
        for bad in [
            &b"rfc822"[..],
            b";bob@example.org",
            b"rfc822;",
            b"rfc 822;x",
            b"rfc822;+ZZ",
        ] {
            assert_eq!(parse_orcpt(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let long = format!("rfc822;{}@example.org", "a".repeat(MAX_ORCPT));
        assert_eq!(parse_orcpt(long.as_bytes()), None);
        assert_eq!(parse_envid(b"QQ314159").as_deref(), Some("QQ314159"));
        assert_eq!(parse_envid(b"a+20b").as_deref(), Some("a b"));
        assert_eq!(parse_envid(b""), None);
        assert_eq!(parse_envid("x".repeat(101).as_bytes()), None);
        assert!(parse_envid("x".repeat(100).as_bytes()).is_some());
    }

    #[test]
    fn domains_compare_in_their_ascii_form() {
        assert_eq!(ascii_domain("Example.ORG"), "example.org");
        assert_eq!(ascii_domain("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(ascii_domain("BÜCHER.example"), "xn--bcher-kva.example");
        assert!(is_u_domain("bücher.example"));
        assert!(is_u_domain("例え.テスト"));
        assert!(!is_u_domain("bü cher.example"));
        assert!(!is_u_domain("bü\u{85}cher.example"));
        assert!(!is_u_domain("-bücher.example"));
    }
}
