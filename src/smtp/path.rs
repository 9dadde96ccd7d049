//! Envelope addresses: the reverse path (MAIL FROM) and forward paths (RCPT TO), parsed and
//! validated per RFC 5321 §4.1.2 and the size limits of §4.5.3.1.
//!
//! Accepted: dot-string or quoted-string local parts, domains of letters, digits and
//! hyphens, and IPv4 / `IPv6:` address literals. Internationalized addresses (RFC 6531
//! §3.3) parse too: UTF-8 in local parts, U-labels in domains (valid by IDNA), well-formed
//! UTF-8 without control characters. Whether one is allowed is the session's call (only
//! in a transaction that declared SMTPUTF8): [`MailboxRef::is_ascii`] tells. A source route (`<@a,@b:user@c>`) is
//! accepted and dropped, as §C of the RFC asks. Anything else is a syntax error.
//!
//! Also the storage that lets a session handle addresses without allocating per command:
//! parsing yields a borrowed [`MailboxRef`]; a transaction's addresses are kept in a
//! reusable `MailboxList` and become owned [`Mailbox`]es, all sharing one string, at the
//! end of DATA; and `MailboxSlot` lends the hooks a `&Mailbox` made in reused storage.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::sync::Arc;

/// Longest local part (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_PART: usize = 64;
/// Longest domain (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Longest path, angle brackets included (RFC 5321 §4.5.3.1.3).
pub const MAX_PATH: usize = 256;

/// A mailbox, `local-part@domain`, as it appeared in the envelope (source route removed).
///
/// Its text is shared and immutable: the mailboxes of one envelope are spans of a single
/// string (one allocation for all of a message's addresses), and a clone costs a reference
/// count, not a copy. Equality, hashing and formatting see only the mailbox's own text.
#[derive(Clone)]
pub struct Mailbox {
    text: Arc<str>,
    span: Span,
}

impl Mailbox {
    /// Parses a bare mailbox (no angle brackets), as used in tests and configuration.
    pub fn parse(s: &str) -> Result<Mailbox, PathError> {
        parse_mailbox(s.as_bytes()).map(MailboxRef::to_mailbox)
    }

    /// The local part, quotes included if it was quoted.
    pub fn local_part(&self) -> &str {
        &self.text[self.span.local_part()]
    }

    /// The domain or address literal (`[192.0.2.1]`, `[IPv6:…]`), as written.
    pub fn domain(&self) -> &str {
        &self.text[self.span.domain()]
    }

    /// The whole mailbox, `local@domain`.
    pub fn as_str(&self) -> &str {
        &self.text[self.span.whole()]
    }

    /// True unless the mailbox is internationalized (RFC 6531).
    pub fn is_ascii(&self) -> bool {
        self.as_str().is_ascii()
    }

    /// The mailbox borrowed, as the command parser yields it.
    pub(crate) fn as_mailbox_ref(&self) -> MailboxRef<'_> {
        MailboxRef {
            text: self.as_str(),
            at: usize::from(self.span.at),
        }
    }

    /// The mailbox at `span` of a string shared with others (see [`MailboxList`]).
    fn shared(text: &Arc<str>, span: Span) -> Mailbox {
        Mailbox {
            text: Arc::clone(text),
            span,
        }
    }
}

impl PartialEq for Mailbox {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Mailbox {}

impl Hash for Mailbox {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}>", self.as_str())
    }
}

/// A validated mailbox borrowed from the text it was parsed from: what a [`Mailbox`]
/// holds, before (and without) the copy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MailboxRef<'a> {
    text: &'a str,
    /// Where the last `@` is in `text`.
    at: usize,
}

impl<'a> MailboxRef<'a> {
    /// The local part, quotes included if it was quoted.
    pub fn local_part(&self) -> &'a str {
        &self.text[..self.at]
    }

    /// The domain or address literal, as written.
    pub fn domain(&self) -> &'a str {
        &self.text[self.at + 1..]
    }

    /// The whole mailbox, `local@domain`.
    pub fn as_str(&self) -> &'a str {
        self.text
    }

    /// True unless the mailbox is internationalized (RFC 6531).
    pub fn is_ascii(&self) -> bool {
        self.text.is_ascii()
    }

    /// An owned copy (one allocation).
    pub fn to_mailbox(self) -> Mailbox {
        Mailbox::shared(&Arc::from(self.text), Span::of(0, self))
    }
}

impl fmt::Display for MailboxRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text)
    }
}

/// Where a mailbox lies in a longer string.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    /// Where the last `@` is, from `start`.
    at: u16,
    len: u16,
}

impl Span {
    /// `m`, written at `start`.
    fn of(start: usize, m: MailboxRef<'_>) -> Span {
        // A parsed mailbox is at most MAX_LOCAL_PART + 1 + MAX_DOMAIN (320) bytes long.
        Span {
            start,
            at: m.at as u16,
            len: m.text.len() as u16,
        }
    }

    fn whole(self) -> Range<usize> {
        self.start..self.start + usize::from(self.len)
    }

    fn local_part(self) -> Range<usize> {
        self.start..self.start + usize::from(self.at)
    }

    fn domain(self) -> Range<usize> {
        self.start + usize::from(self.at) + 1..self.start + usize::from(self.len)
    }
}

/// Most address text a [`MailboxList`] keeps allocated between transactions: enough for
/// a sender and about a hundred typical recipients.
const KEEP_LIST_TEXT: usize = 4096;

/// The mailboxes of one mail transaction, written back to back into one string whose
/// capacity is kept from one transaction to the next: adding one allocates nothing once
/// the string has grown to its working size. [`MailboxList::share`] makes the owned
/// [`Mailbox`]es of an envelope with one allocation for all of them.
#[derive(Debug, Default)]
pub(crate) struct MailboxList {
    text: String,
}

/// A mailbox's place in a [`MailboxList`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct ListEntry(Span);

impl MailboxList {
    /// Adds `m`.
    pub(crate) fn push(&mut self, m: MailboxRef<'_>) -> ListEntry {
        let span = Span::of(self.text.len(), m);
        self.text.push_str(m.text);
        ListEntry(span)
    }

    /// The text of an entry.
    pub(crate) fn get(&self, entry: ListEntry) -> &str {
        self.text.get(entry.0.whole()).unwrap_or_default()
    }

    /// Forgets every mailbox, keeping the capacity up to [`KEEP_LIST_TEXT`] bytes: an idle
    /// connection does not go on holding what one large transaction needed.
    pub(crate) fn clear(&mut self) {
        self.text.clear();
        self.text.shrink_to(KEEP_LIST_TEXT);
    }

    /// One copy of the list's text (one allocation), from which owned mailboxes are made
    /// without another.
    pub(crate) fn share(&self) -> SharedMailboxes {
        SharedMailboxes(Arc::from(self.text.as_str()))
    }
}

/// The text of a [`MailboxList`], shared by the [`Mailbox`]es made from it.
pub(crate) struct SharedMailboxes(Arc<str>);

impl SharedMailboxes {
    /// The mailbox of `entry` (entries of the list this was shared from).
    pub(crate) fn get(&self, entry: ListEntry) -> Mailbox {
        Mailbox::shared(&self.0, entry.0)
    }
}

/// The storage of a [`MailboxSlot`]: room for the longest mailbox (local part, `@`,
/// domain), all ASCII.
const BLANK: &str = match std::str::from_utf8(&[b' '; MAX_LOCAL_PART + 1 + MAX_DOMAIN]) {
    Ok(blank) => blank,
    Err(_) => panic!("spaces are UTF-8"),
};

/// A [`Mailbox`] made over and over in the same storage, for callers that must lend out a
/// `&Mailbox` for every command but keep none of them: the hooks of MAIL and RCPT. While
/// nobody keeps the last one, making the next allocates nothing; if someone does keep one
/// (a clone, say), the slot moves on to fresh storage and the kept one stays as it was.
#[derive(Debug, Default)]
pub(crate) struct MailboxSlot {
    /// [`BLANK`] at first, then overwritten by each mailbox in turn: always all ASCII.
    text: Option<Arc<str>>,
}

impl MailboxSlot {
    /// `m` as a [`Mailbox`] in the slot's storage.
    pub(crate) fn fill(&mut self, m: MailboxRef<'_>) -> Mailbox {
        let src = m.text;
        // Parsed mailboxes are ASCII and fit; anything else gets its own allocation, so the
        // storage stays all ASCII (which the write below relies on).
        if !src.is_ascii() || src.len() > BLANK.len() {
            return m.to_mailbox();
        }
        // First use, or someone kept the last mailbox made here: move on to fresh storage.
        let text = match &mut self.text {
            Some(text) if Arc::strong_count(text) == 1 => text,
            slot => slot.insert(Arc::from(BLANK)),
        };
        let Some(storage) = Arc::get_mut(text) else {
            return m.to_mailbox();
        };
        // SAFETY: `as_bytes_mut` requires the str to be valid UTF-8 again when the borrow
        // ends. The storage holds only ASCII (it starts as BLANK, and only ASCII is ever
        // written: checked above), and ASCII written over ASCII leaves it all ASCII.
        let bytes = unsafe { storage.as_bytes_mut() };
        bytes[..src.len()].copy_from_slice(src.as_bytes());
        Mailbox::shared(text, Span::of(0, m))
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
) -> Result<(Option<MailboxRef<'_>>, &[u8]), PathError> {
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

fn parse_mailbox(s: &[u8]) -> Result<MailboxRef<'_>, PathError> {
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
    // Bytes over 0x7f passed the checks above as RFC 6531's UTF8-non-ascii: the whole
    // must be well-formed UTF-8 (no overlong forms, no surrogates: `from_utf8` refuses
    // them), with no control characters (C1 controls are UTF-8 too).
    let text = std::str::from_utf8(s).map_err(|_| PathError::Syntax)?;
    if !text.is_ascii() && text.chars().any(char::is_control) {
        return Err(PathError::Syntax);
    }
    let domain_ok = if domain.is_ascii() {
        is_domain(domain) || is_address_literal(domain)
    } else {
        super::ext::is_u_domain(&text[at + 1..])
    };
    if !domain_ok {
        return Err(PathError::Syntax);
    }
    Ok(MailboxRef { text, at })
}

/// RFC 5322 `atext`, and RFC 6531's UTF8-non-ascii (any byte over 0x7f here; the UTF-8
/// is checked as a whole).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
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
            b if (32..=126).contains(&b) || b >= 0x80 => i += 1,
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
    fn internationalized_mailboxes() {
        let m = Mailbox::parse("δοκιμή@παράδειγμα.δοκιμή").unwrap();
        assert!(!m.is_ascii());
        assert_eq!(m.domain(), "παράδειγμα.δοκιμή");
        assert!(path("<\"δο κι\"@example.org>").is_ok());
        assert!(Mailbox::parse("a@example.org").unwrap().is_ascii());
        // Broken UTF-8, C1 controls, invalid U-labels.
        for bad in [
            &b"<\xff@example.org>"[..],
            b"<a\xc0\xaf@example.org>",
            b"<a\xc2\x85@example.org>",
            b"<a@\xe4\xbe>",
        ] {
            assert_eq!(parse_path(bad, false).map(|_| ()), Err(PathError::Syntax));
        }
        assert_eq!(path("<a@-例子.test>"), Err(PathError::Syntax));
        assert_eq!(path("<a@例 子.test>"), Err(PathError::Syntax));
        // Limits are in octets: 22 three-octet characters are 66 > 64.
        let local = "例".repeat(22);
        assert_eq!(
            path(&format!("<{local}@example.org>")),
            Err(PathError::TooLong)
        );
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

    fn parsed(s: &str) -> MailboxRef<'_> {
        parse_mailbox(s.as_bytes()).unwrap()
    }

    /// Equal, hashed alike, and alike in every accessor.
    fn assert_same(a: &Mailbox, b: &Mailbox) {
        use std::hash::BuildHasher;
        let hasher = std::collections::hash_map::RandomState::new();
        assert_eq!(a, b);
        assert_eq!(hasher.hash_one(a), hasher.hash_one(b));
        assert_eq!(
            (a.as_str(), a.local_part(), a.domain()),
            (b.as_str(), b.local_part(), b.domain())
        );
        assert_eq!(
            (a.to_string(), format!("{a:?}")),
            (b.to_string(), format!("{b:?}"))
        );
    }

    #[test]
    fn mailboxes_sharing_one_string_are_each_their_own() {
        let mut list = MailboxList::default();
        let texts = [
            "a@b.example",
            "\"x@y\"@c.example",
            "long.local+part@[192.0.2.1]",
        ];
        let entries: Vec<_> = texts.iter().map(|t| list.push(parsed(t))).collect();
        assert_eq!(list.get(entries[1]), texts[1]);
        let shared = list.share();
        list.clear();
        for (text, &entry) in texts.iter().zip(&entries) {
            let m = shared.get(entry);
            assert_same(&m, &Mailbox::parse(text).unwrap());
            assert_eq!(m.as_mailbox_ref(), parsed(text));
        }
        assert_eq!(shared.get(entries[0]).local_part(), "a");
        assert_eq!(shared.get(entries[1]).local_part(), "\"x@y\"");
    }

    #[test]
    fn a_list_does_not_keep_what_one_huge_transaction_needed() {
        let mut list = MailboxList::default();
        let long = format!("{}@{}.example", "l".repeat(60), "d".repeat(60));
        for _ in 0..500 {
            list.push(parsed(&long));
        }
        assert!(list.text.capacity() > KEEP_LIST_TEXT);
        list.clear();
        assert!(list.text.capacity() <= KEEP_LIST_TEXT);
    }

    #[test]
    fn a_slot_reuses_its_storage_unless_a_mailbox_made_there_is_kept() {
        let mut slot = MailboxSlot::default();
        let first = slot.fill(parsed("first.long.name@one.example"));
        assert_same(
            &first,
            &Mailbox::parse("first.long.name@one.example").unwrap(),
        );
        let storage = Arc::as_ptr(&first.text);
        drop(first);
        let second = slot.fill(parsed("b@two.example"));
        assert_same(&second, &Mailbox::parse("b@two.example").unwrap());
        assert_eq!(Arc::as_ptr(&second.text), storage, "the storage is reused");
        // Kept (here: not dropped): the next one goes elsewhere, and this one stays as is.
        let third = slot.fill(parsed("c@three.example"));
        assert_ne!(Arc::as_ptr(&third.text), storage);
        assert_same(&second, &Mailbox::parse("b@two.example").unwrap());
        assert_same(&third, &Mailbox::parse("c@three.example").unwrap());
        let label = "d".repeat(63);
        let longest = format!(
            "{}@{label}.{label}.{label}.{label}",
            "l".repeat(MAX_LOCAL_PART)
        );
        assert_eq!(longest.len(), MAX_LOCAL_PART + 1 + MAX_DOMAIN);
        drop(third);
        assert_eq!(slot.fill(parsed(&longest)).as_str(), longest);
    }

    #[test]
    fn rest_after_path_is_returned() {
        let (_, rest) = parse_path(b"<a@b.example> SIZE=10", true).unwrap();
        assert_eq!(rest, b" SIZE=10");
    }
}
