//! The sending side of one SMTP connection: greeting, EHLO (with HELO fallback), STARTTLS
//! (RFC 3207) and AUTH PLAIN (RFC 4616, RFC 4954), one message transaction either one command
//! per round trip or pipelined, RSET and QUIT. Replies are parsed strictly; anything that is
//! not SMTP is a `ClientError`, never a panic.

use crate::message::{push_u64, Built, MessageBuilder};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    /// The server closed the connection.
    Closed,
    Protocol(&'static str),
    Timeout,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Closed => write!(f, "connection closed by server"),
            ClientError::Protocol(p) => write!(f, "protocol error: {p}"),
            ClientError::Timeout => write!(f, "timed out"),
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// How a transaction ended when the server answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnResult {
    /// 2xx after the data; carries the code.
    Accepted(u16),
    /// A 4xx/5xx (or otherwise unusable) reply ended the transaction. `closing` is set after
    /// 421, when the server is about to drop the connection.
    Rejected { code: u16, closing: bool },
}

/// Recipient replies of one transaction.
#[derive(Default, Debug, Clone, Copy)]
pub struct RcptTally {
    pub accepted: u64,
    pub rejected: u64,
    /// The first refusal's code.
    pub first_refusal: Option<u16>,
}

impl RcptTally {
    /// Counts one RCPT reply.
    fn record(&mut self, code: u16) {
        if is_2xx(code) {
            self.accepted += 1;
        } else {
            self.rejected += 1;
            self.first_refusal.get_or_insert(code);
        }
    }
}

/// Read buffer: replies are short, but a multi-line EHLO can be a few hundred bytes.
const RBUF: usize = 8 * 1024;

/// One client connection over a plain TCP stream or, after STARTTLS, a TLS one; generic so
/// that the plain path compiles to exactly what it would be without TLS.
pub struct SmtpClient<S> {
    stream: S,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    /// The server advertised PIPELINING.
    pub pipelining: bool,
    /// The server advertised SIZE, so MAIL carries SIZE=.
    pub size_ext: bool,
    /// The server advertised STARTTLS.
    pub starttls: bool,
    /// Of the last transaction that got a reply to its content: the time from the end of
    /// the content (terminator written) to that reply.
    pub end_of_data_to_reply: Option<std::time::Duration>,
}

fn is_2xx(c: u16) -> bool {
    (200..300).contains(&c)
}

/// The AUTH PLAIN initial response for `user` and `pass` (RFC 4616): base64 of
/// `NUL user NUL pass`, with no authorization identity.
pub fn auth_plain_blob(user: &str, pass: &str) -> String {
    let mut raw = Vec::with_capacity(user.len() + pass.len() + 2);
    raw.push(0);
    raw.extend_from_slice(user.as_bytes());
    raw.push(0);
    raw.extend_from_slice(pass.as_bytes());
    crate::base64::encode(&raw)
}

/// Longest reply text kept for a report: enough for any real server's explanation, and a
/// bound on what a hostile one can make us store.
pub const TEXT_MAX: usize = 200;

/// Appends one reply line's text to `out`: lines are joined with a space, bytes outside
/// printable ASCII become `?`, and the whole stops at `TEXT_MAX` bytes.
fn push_text(out: &mut String, line: &[u8]) {
    if out.len() >= TEXT_MAX {
        return;
    }
    if !out.is_empty() {
        out.push(' ');
    }
    for &b in line.iter().take(TEXT_MAX - out.len()) {
        out.push(if (0x20..0x7f).contains(&b) {
            char::from(b)
        } else {
            '?'
        });
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpClient<S> {
    pub fn new(stream: S) -> SmtpClient<S> {
        SmtpClient {
            stream,
            rbuf: vec![0u8; RBUF].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(512),
            pipelining: false,
            size_ext: false,
            starttls: false,
            end_of_data_to_reply: None,
        }
    }

    /// Reads one complete (possibly multi-line) reply and returns its code. `on_line` sees the
    /// text after the code of every line (used to collect EHLO keywords).
    async fn reply_with(&mut self, mut on_line: impl FnMut(&[u8])) -> Result<u16, ClientError> {
        let mut code: Option<u16> = None;
        loop {
            while let Some(i) = memchr::memchr(b'\n', &self.rbuf[self.rstart..self.rend]) {
                let line = &self.rbuf[self.rstart..self.rstart + i];
                self.rstart += i + 1;
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
                    return Err(ClientError::Protocol(
                        "reply does not start with a 3-digit code",
                    ));
                }
                let c = u16::from(line[0] - b'0') * 100
                    + u16::from(line[1] - b'0') * 10
                    + u16::from(line[2] - b'0');
                if !(200..600).contains(&c) {
                    return Err(ClientError::Protocol("reply code out of range"));
                }
                if code.is_some_and(|p| p != c) {
                    return Err(ClientError::Protocol("multi-line reply changes its code"));
                }
                code = Some(c);
                let more = match line.get(3) {
                    None | Some(b' ') => false,
                    Some(b'-') => true,
                    Some(_) => return Err(ClientError::Protocol("bad separator after reply code")),
                };
                on_line(line.get(4..).unwrap_or(&[]));
                if !more {
                    return Ok(c);
                }
            }
            if self.rstart == self.rend {
                self.rstart = 0;
                self.rend = 0;
            } else if self.rend == self.rbuf.len() {
                if self.rstart == 0 {
                    return Err(ClientError::Protocol("reply line too long"));
                }
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            let n = self.stream.read(&mut self.rbuf[self.rend..]).await?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.rend += n;
        }
    }

    pub async fn reply(&mut self) -> Result<u16, ClientError> {
        self.reply_with(|_| {}).await
    }

    /// Reads one reply and keeps its text (lines joined by spaces, at most `TEXT_MAX` bytes,
    /// control bytes replaced), for replies a report shows to the operator. Not for the
    /// per-message path, which only needs codes.
    pub async fn reply_text(&mut self) -> Result<(u16, String), ClientError> {
        let mut text = String::new();
        let code = self.reply_with(|l| push_text(&mut text, l)).await?;
        Ok((code, text))
    }

    async fn send(&mut self) -> Result<(), ClientError> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads the greeting. Returns its code (220 expected) and text.
    pub async fn greeting(&mut self) -> Result<(u16, String), ClientError> {
        self.reply_text().await
    }

    /// EHLO, falling back to HELO when refused. Returns the final code and its text.
    pub async fn hello(&mut self, name: &str) -> Result<(u16, String), ClientError> {
        self.wbuf.extend_from_slice(b"EHLO ");
        self.wbuf.extend_from_slice(name.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
        self.send().await?;
        let (mut pipe, mut size, mut tls) = (false, false, false);
        let mut text = String::new();
        let code = self
            .reply_with(|line| {
                push_text(&mut text, line);
                let kw = line.split(|&c| c == b' ').next().unwrap_or(&[]);
                if kw.eq_ignore_ascii_case(b"PIPELINING") {
                    pipe = true;
                } else if kw.eq_ignore_ascii_case(b"SIZE") {
                    size = true;
                } else if kw.eq_ignore_ascii_case(b"STARTTLS") {
                    tls = true;
                }
            })
            .await?;
        if is_2xx(code) {
            self.pipelining = pipe;
            self.size_ext = size;
            self.starttls = tls;
            return Ok((code, text));
        }
        self.wbuf.extend_from_slice(b"HELO ");
        self.wbuf.extend_from_slice(name.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
        self.send().await?;
        self.reply_text().await
    }

    /// Sends STARTTLS and reads the reply (220 expected). Anything the server sent after
    /// that reply is dropped: only what arrives through TLS may be believed (the client's
    /// side of CVE-2011-0411).
    pub async fn starttls_command(&mut self) -> Result<(u16, String), ClientError> {
        self.wbuf.extend_from_slice(b"STARTTLS\r\n");
        self.send().await?;
        let r = self.reply_text().await?;
        self.rstart = 0;
        self.rend = 0;
        Ok(r)
    }

    /// The stream, for the TLS handshake after a 220 to STARTTLS.
    pub fn into_stream(self) -> S {
        self.stream
    }

    /// AUTH PLAIN with an initial response (`blob`, from `auth_plain_blob`). Returns the reply
    /// (235 means authenticated).
    pub async fn auth_plain(&mut self, blob: &str) -> Result<(u16, String), ClientError> {
        self.wbuf.extend_from_slice(b"AUTH PLAIN ");
        self.wbuf.extend_from_slice(blob.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
        self.send().await?;
        let (code, text) = self.reply_text().await?;
        if code == 334 {
            // A server that ignores the initial response asks for it; cancel rather than send
            // the credentials twice in one conversation.
            self.wbuf.extend_from_slice(b"*\r\n");
            self.send().await?;
            let (c, t) = self.reply_text().await?;
            return Ok((c, format!("{t} (after an unexpected 334 {text})")));
        }
        Ok((code, text))
    }

    fn push_mail(&mut self, from: &str, size: usize) {
        self.wbuf.extend_from_slice(b"MAIL FROM:<");
        self.wbuf.extend_from_slice(from.as_bytes());
        self.wbuf.push(b'>');
        if self.size_ext {
            self.wbuf.extend_from_slice(b" SIZE=");
            push_u64(&mut self.wbuf, size as u64);
        }
        self.wbuf.extend_from_slice(b"\r\n");
    }

    fn push_rcpt(&mut self, mb: &MessageBuilder, seq: u64, j: usize) {
        self.wbuf.extend_from_slice(b"RCPT TO:<");
        mb.push_rcpt(seq, j, &mut self.wbuf);
        self.wbuf.extend_from_slice(b">\r\n");
    }

    /// Sends RSET after a failed transaction so the next one starts clean; a 421 here means
    /// the server is going away.
    async fn rset(&mut self) -> Result<bool, ClientError> {
        self.wbuf.extend_from_slice(b"RSET\r\n");
        self.send().await?;
        Ok(self.reply().await? == 421)
    }

    async fn data_content(&mut self, msg: &[u8]) -> Result<TxnResult, ClientError> {
        self.stream.write_all(msg).await?;
        let written = std::time::Instant::now();
        let code = self.reply().await?;
        self.end_of_data_to_reply = Some(written.elapsed());
        Ok(if is_2xx(code) {
            TxnResult::Accepted(code)
        } else {
            TxnResult::Rejected {
                code,
                closing: code == 421,
            }
        })
    }

    /// Runs one transaction for the message already built in `msg` (wire form, with its
    /// terminator). With `pipeline`, MAIL, every RCPT and DATA go in one write (RFC 2920).
    pub async fn transaction(
        &mut self,
        mb: &MessageBuilder,
        seq: u64,
        built: Built,
        msg: &[u8],
        pipeline: bool,
        tally: &mut RcptTally,
    ) -> Result<TxnResult, ClientError> {
        let rcpts = mb.spec().rcpts;
        let from = mb.spec().from.as_str();
        if pipeline {
            self.push_mail(from, built.size);
            for j in 0..rcpts {
                self.push_rcpt(mb, seq, j);
            }
            self.wbuf.extend_from_slice(b"DATA\r\n");
            self.send().await?;
            let mail = self.reply().await?;
            for _ in 0..rcpts {
                let c = self.reply().await?;
                tally.record(c);
            }
            let data = self.reply().await?;
            let fail = if !is_2xx(mail) {
                Some(mail)
            } else if tally.accepted == 0 {
                Some(tally.first_refusal.unwrap_or(data))
            } else {
                None
            };
            if data == 354 {
                if let Some(code) = fail {
                    // A server that says 354 without a valid transaction still needs the data
                    // phase closed; send an empty message so the dialogue stays in step.
                    self.stream.write_all(b".\r\n").await?;
                    self.reply().await?;
                    return Ok(TxnResult::Rejected {
                        code,
                        closing: code == 421,
                    });
                }
                return self.data_content(msg).await;
            }
            let code = fail.unwrap_or(data);
            let mut closing = code == 421 || data == 421;
            if is_2xx(mail) && !closing {
                closing = self.rset().await?;
            }
            return Ok(TxnResult::Rejected { code, closing });
        }

        self.push_mail(from, built.size);
        self.send().await?;
        let mail = self.reply().await?;
        if !is_2xx(mail) {
            return Ok(TxnResult::Rejected {
                code: mail,
                closing: mail == 421,
            });
        }
        for j in 0..rcpts {
            self.push_rcpt(mb, seq, j);
            self.send().await?;
            let c = self.reply().await?;
            tally.record(c);
            if c == 421 {
                return Ok(TxnResult::Rejected {
                    code: c,
                    closing: true,
                });
            }
        }
        if tally.accepted == 0 {
            let code = tally.first_refusal.unwrap_or(554);
            let closing = self.rset().await?;
            return Ok(TxnResult::Rejected { code, closing });
        }
        self.wbuf.extend_from_slice(b"DATA\r\n");
        self.send().await?;
        let data = self.reply().await?;
        if data != 354 {
            let closing = data == 421 || self.rset().await?;
            return Ok(TxnResult::Rejected {
                code: data,
                closing,
            });
        }
        self.data_content(msg).await
    }

    /// Says goodbye politely but without waiting long: the run is over either way.
    pub async fn quit(mut self) {
        self.wbuf.extend_from_slice(b"QUIT\r\n");
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            self.send().await?;
            self.reply().await
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_plain_blob_is_nul_user_nul_pass() {
        assert_eq!(auth_plain_blob("user", "pass"), "AHVzZXIAcGFzcw==");
    }

    #[test]
    fn reply_text_is_bounded_and_printable() {
        let mut t = String::new();
        push_text(&mut t, b"4.7.0 too\x01many");
        push_text(&mut t, b"second line");
        assert_eq!(t, "4.7.0 too?many second line");
        push_text(&mut t, &[b'x'; 500]);
        assert_eq!(t.len(), TEXT_MAX);
    }
}
