//! SMTP replies: a three-digit code plus text (RFC 5321 §4.2), carrying an enhanced status
//! code (RFC 3463) in the text where one applies.
//!
//! Replies built from text someone else supplied (a handler, a downstream server) are
//! sanitised here so that no reply can smuggle a line break or an invalid code onto the wire.

use std::fmt;

use bytes::{BufMut, BytesMut};

/// One SMTP reply: a code (200–599) and one or more text lines.
///
/// The text of each line should begin with an enhanced status code such as `2.0.0`; the
/// constructors do not add one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    /// A one-line reply. A code outside 200–599 becomes `451`, and control characters in
    /// `text` become spaces, so a careless caller can never break the protocol stream.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Self::multiline(code, [text.into()])
    }

    /// A reply of several lines (sent as `code-line` … `code line`). An empty list gives a
    /// single empty line.
    pub fn multiline(code: u16, lines: impl IntoIterator<Item = String>) -> Self {
        let code = if (200..=599).contains(&code) {
            code
        } else {
            451
        };
        let mut lines: Vec<String> = lines.into_iter().map(sanitize).collect();
        if lines.is_empty() {
            lines.push(String::new());
        }
        Reply { code, lines }
    }

    /// The three-digit reply code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The text lines, without the code.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// True for 2xx replies.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// True for 4xx replies (try again later).
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// True for 5xx replies (do not try again).
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// Appends the reply in wire form (CRLF line endings) to `out`.
    pub fn write_to(&self, out: &mut BytesMut) {
        let last = self.lines.len() - 1;
        for (i, line) in self.lines.iter().enumerate() {
            out.reserve(line.len() + 6);
            put_code(out, self.code);
            out.put_u8(if i == last { b' ' } else { b'-' });
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The reply on one line: the code, then each text line after a space (for logs,
    /// `last_error` and a bounce's `Diagnostic-Code:`).
    pub fn one_line(&self) -> String {
        let mut s = self.code.to_string();
        for line in &self.lines {
            s.push(' ');
            s.push_str(line);
        }
        s
    }

    /// The RFC 3463 enhanced status code at the start of the first line's text, if it is
    /// one (`class.subject.detail`: class 2, 4 or 5, then one to three digits each).
    pub fn enhanced_status(&self) -> Option<&str> {
        let first = self.lines.first()?.split(' ').next()?;
        is_enhanced_status(first).then_some(first)
    }

    /// `421 4.3.2` — the server is shutting down.
    pub fn shutting_down(hostname: &str) -> Self {
        Reply::new(
            421,
            format!("4.3.2 {hostname} Service shutting down, closing transmission channel"),
        )
    }

    /// `421 4.7.0` — too many connections (in all, or from one address).
    pub fn too_many_connections(hostname: &str) -> Self {
        Reply::new(421, format!("4.7.0 {hostname} Error: too many connections"))
    }

    /// `451 4.3.0` — a local problem kept the message from being accepted.
    pub fn local_error(detail: &str) -> Self {
        Reply::new(451, format!("4.3.0 Error: {detail}"))
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.lines.len() - 1;
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            write!(f, "{}{}{}", self.code, sep, line)?;
            if i != last {
                f.write_str("\n")?;
            }
        }
        Ok(())
    }
}

/// True for an RFC 3463 enhanced status code: `[245].ddd.ddd`, one to three digits each.
pub fn is_enhanced_status(status: &str) -> bool {
    let digits = |s: &str| (1..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    let mut fields = status.split('.');
    matches!(fields.next(), Some("2" | "4" | "5"))
        && fields.next().is_some_and(digits)
        && fields.next().is_some_and(digits)
        && fields.next().is_none()
}

/// Writes a three-digit code without going through the formatter.
pub(crate) fn put_code(out: &mut BytesMut, code: u16) {
    let code = code.min(999);
    out.put_u8(b'0' + (code / 100) as u8);
    out.put_u8(b'0' + (code / 10 % 10) as u8);
    out.put_u8(b'0' + (code % 10) as u8);
}

/// Reply text may hold printable characters only; anything else (CR, LF, NUL…) becomes a
/// space, and over-long text is cut so the reply line stays within RFC 5321's 512 octets.
fn sanitize(text: String) -> String {
    const MAX_TEXT: usize = 500;
    let clean = text.bytes().all(|b| (0x20..0x7f).contains(&b)) && text.len() <= MAX_TEXT;
    if clean {
        return text;
    }
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        let mut b = BytesMut::new();
        r.write_to(&mut b);
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn single_and_multiline_wire_form() {
        assert_eq!(wire(&Reply::new(250, "2.0.0 Ok")), "250 2.0.0 Ok\r\n");
        let r = Reply::multiline(250, ["a".to_string(), "b".to_string()]);
        assert_eq!(wire(&r), "250-a\r\n250 b\r\n");
    }

    #[test]
    fn injected_line_breaks_are_neutralised() {
        let r = Reply::new(550, "5.7.1 no\r\n250 2.0.0 yes");
        assert_eq!(wire(&r), "550 5.7.1 no  250 2.0.0 yes\r\n");
    }

    #[test]
    fn invalid_codes_become_451() {
        assert_eq!(Reply::new(99, "x").code(), 451);
        assert_eq!(Reply::new(600, "x").code(), 451);
        assert!(Reply::new(421, "x").is_transient());
    }

    #[test]
    fn overlong_text_is_cut() {
        let r = Reply::new(550, "x".repeat(2000));
        assert!(wire(&r).len() <= 512);
    }
}
