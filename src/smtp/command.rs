//! SMTP command lines: one line (without its CRLF) in, one [`Command`] or a
//! [`CommandError`] out (RFC 5321 §4.1, plus the SIZE and BODY parameters of RFC 1870 and
//! RFC 6152, BDAT of RFC 3030, SMTPUTF8 of RFC 6531, and the DSN parameters of RFC 3461).
//!
//! Verbs are case-insensitive. Parsing allocates nothing but decoded DSN values (ENVID,
//! ORCPT), and only when a client sends them: addresses are borrowed from the line. Each
//! parameter may appear once; a repeated or malformed one is a syntax error (`501 5.5.4`).

use super::ext::{self, Notify, RcptDsn, Ret};
use super::path::{is_domain, parse_path, MailboxRef, PathError};

/// The body type declared with `MAIL FROM:<…> BODY=` (RFC 6152).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BodyType {
    /// `BODY=7BIT`, or nothing declared.
    #[default]
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `EHLO domain` (the argument as sent).
    Ehlo(&'a str),
    /// `HELO domain`.
    Helo(&'a str),
    /// `MAIL FROM:<reverse-path> [SIZE=n] [BODY=…] [SMTPUTF8] [RET=…] [ENVID=…]`.
    Mail {
        /// The reverse path; `None` for the null path `<>`.
        from: Option<MailboxRef<'a>>,
        /// The declared `SIZE=`, if any.
        size: Option<u64>,
        /// The declared `BODY=`.
        body: BodyType,
        /// `SMTPUTF8` was given (RFC 6531): internationalized addresses and headers.
        smtputf8: bool,
        /// `RET=` (RFC 3461).
        ret: Option<Ret>,
        /// `ENVID=`, decoded from xtext (RFC 3461).
        envid: Option<Box<str>>,
    },
    /// `RCPT TO:<forward-path> [NOTIFY=…] [ORCPT=…]`; `to` is `None` for
    /// `RCPT TO:<Postmaster>`.
    Rcpt {
        /// The forward path (possibly internationalized: the session checks that the
        /// transaction declared SMTPUTF8).
        to: Option<MailboxRef<'a>>,
        /// The DSN parameters.
        dsn: RcptDsn,
    },
    /// `DATA`.
    Data,
    /// `RSET`.
    Rset,
    /// `NOOP [string]`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY string`.
    Vrfy,
    /// `HELP [string]`.
    Help,
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954): the arguments as sent.
    Auth(&'a [u8]),
    /// `BDAT chunk-size [LAST]` (RFC 3030): `size` octets of content follow the line.
    Bdat {
        /// The chunk's size in octets.
        size: u64,
        /// The message's last chunk.
        last: bool,
    },
    /// A command we know but do not offer (EXPN, TURN, ETRN…): answered 502.
    Unsupported,
}

/// Why a command line was refused; each maps to one reply code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// Not a command we know: `500 5.5.2`.
    Unknown,
    /// Bad arguments: `501 5.5.4`, with a hint of what was expected.
    Syntax(&'static str),
    /// An ESMTP parameter we do not support: `555 5.5.4`.
    UnknownParameter,
    /// A non-ASCII reverse path in a MAIL without SMTPUTF8: `553 5.6.7` (RFC 6531 §3.5).
    NonAscii,
}

/// Parses one command line, without the line terminator.
pub fn parse(line: &[u8]) -> Result<Command<'_>, CommandError> {
    // Trailing blanks are not arguments (clients do send `QUIT ` and `DATA\t`); Postfix
    // ignores them too.
    let end = line
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    let line = &line[..end];
    let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let verb = &line[..verb_end];
    let args = &line[verb_end..];
    // Only the verb is matched case-insensitively; arguments keep their case.
    let is = |name: &[u8]| verb.eq_ignore_ascii_case(name);
    if is(b"EHLO") || is(b"HELO") {
        let host = greeting_arg(
            args,
            if is(b"EHLO") {
                "EHLO hostname"
            } else {
                "HELO hostname"
            },
        )?;
        return Ok(if is(b"EHLO") {
            Command::Ehlo(host)
        } else {
            Command::Helo(host)
        });
    }
    if is(b"MAIL") {
        return parse_mail(args);
    }
    if is(b"RCPT") {
        return parse_rcpt(args);
    }
    if is(b"DATA") || is(b"RSET") || is(b"QUIT") {
        if !args.is_empty() {
            return Err(CommandError::Syntax("no arguments allowed"));
        }
        return Ok(if is(b"DATA") {
            Command::Data
        } else if is(b"RSET") {
            Command::Rset
        } else {
            Command::Quit
        });
    }
    if is(b"NOOP") {
        return Ok(Command::Noop);
    }
    if is(b"HELP") {
        return Ok(Command::Help);
    }
    if is(b"VRFY") {
        if args.iter().all(|&b| b == b' ') {
            return Err(CommandError::Syntax("VRFY address"));
        }
        return Ok(Command::Vrfy);
    }
    if is(b"STARTTLS") {
        if !args.is_empty() {
            return Err(CommandError::Syntax("no arguments allowed"));
        }
        return Ok(Command::StartTls);
    }
    if is(b"AUTH") {
        return Ok(Command::Auth(trim_spaces(args)));
    }
    if is(b"BDAT") {
        return parse_bdat(args);
    }
    const UNSUPPORTED: [&[u8]; 10] = [
        b"EXPN",
        b"TURN",
        b"ETRN",
        b"ATRN",
        b"SEND",
        b"SOML",
        b"SAML",
        b"XCLIENT",
        b"XFORWARD",
        b"VERB",
    ];
    if UNSUPPORTED.iter().any(|name| is(name)) {
        return Ok(Command::Unsupported);
    }
    Err(CommandError::Unknown)
}

/// `BDAT chunk-size [LAST]`: the size is 1 to 20 digits (RFC 3030's `1*DIGIT`, within u64).
fn parse_bdat(args: &[u8]) -> Result<Command<'_>, CommandError> {
    const HINT: &str = "BDAT chunk-size [LAST]";
    let args = args.strip_prefix(b" ").ok_or(CommandError::Syntax(HINT))?;
    let (size, rest) = match args.iter().position(|&b| b == b' ') {
        Some(i) => (&args[..i], Some(&args[i + 1..])),
        None => (args, None),
    };
    let last = match rest {
        None => false,
        Some(word) if word.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return Err(CommandError::Syntax(HINT)),
    };
    if size.is_empty() || size.len() > 20 || !size.iter().all(u8::is_ascii_digit) {
        return Err(CommandError::Syntax(HINT));
    }
    let size = std::str::from_utf8(size)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(CommandError::Syntax(HINT))?;
    Ok(Command::Bdat { size, last })
}

/// The EHLO/HELO argument: one token of printable ASCII. It ends up in a Received header,
/// so nothing that could break a header line is let through.
fn greeting_arg<'a>(args: &'a [u8], hint: &'static str) -> Result<&'a str, CommandError> {
    let arg = trim_spaces(args);
    if arg.is_empty() || !arg.iter().all(|&b| b.is_ascii_graphic()) {
        return Err(CommandError::Syntax(hint));
    }
    std::str::from_utf8(arg).map_err(|_| CommandError::Syntax(hint))
}

fn trim_spaces(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ').map_or(start, |i| i + 1);
    &s[start..end]
}

/// Strips ` KEYWORD:` (case-insensitive) and any spaces after the colon. Postfix and most
/// servers accept `MAIL FROM: <a@b>`, so we do too.
fn strip_keyword<'a>(args: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    let args = args.strip_prefix(b" ")?;
    if args.len() < keyword.len() || !args[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = &args[keyword.len()..];
    let skip = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    Some(&rest[skip..])
}

fn path_error(e: PathError, hint: &'static str) -> CommandError {
    match e {
        PathError::Syntax => CommandError::Syntax(hint),
        PathError::TooLong => CommandError::Syntax("address too long"),
    }
}

fn parse_mail(args: &[u8]) -> Result<Command<'_>, CommandError> {
    const HINT: &str = "MAIL FROM:<address>";
    const RET: &str = "RET=FULL or RET=HDRS";
    const ENVID: &str = "ENVID=xtext (at most 100 characters)";
    let rest = strip_keyword(args, b"FROM:").ok_or(CommandError::Syntax(HINT))?;
    let (from, params) = parse_path(rest, true).map_err(|e| path_error(e, HINT))?;
    let mut size = None;
    let mut body = None;
    let mut smtputf8 = false;
    let mut ret = None;
    let mut envid = None;
    for (key, value) in params_of(params)? {
        if key.eq_ignore_ascii_case(b"SIZE") {
            let value = value.ok_or(CommandError::Syntax("SIZE=number"))?;
            if size.is_some() || value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err(CommandError::Syntax("SIZE=number"));
            }
            // A number too large for u64 is certainly over any limit.
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            size = Some(n);
        } else if key.eq_ignore_ascii_case(b"BODY") {
            let value = value.ok_or(CommandError::Syntax("BODY=7BIT or BODY=8BITMIME"))?;
            if body.is_some() {
                return Err(CommandError::Syntax("BODY=7BIT or BODY=8BITMIME"));
            }
            body = Some(if value.eq_ignore_ascii_case(b"7BIT") {
                BodyType::SevenBit
            } else if value.eq_ignore_ascii_case(b"8BITMIME") {
                BodyType::EightBitMime
            } else {
                return Err(CommandError::Syntax("BODY=7BIT or BODY=8BITMIME"));
            });
        } else if key.eq_ignore_ascii_case(b"SMTPUTF8") {
            // RFC 6531 §3.4: a keyword without a value, once.
            if value.is_some() || smtputf8 {
                return Err(CommandError::Syntax("SMTPUTF8 takes no value"));
            }
            smtputf8 = true;
        } else if key.eq_ignore_ascii_case(b"RET") {
            let value = value.ok_or(CommandError::Syntax(RET))?;
            if ret.is_some() {
                return Err(CommandError::Syntax(RET));
            }
            ret = Some(if value.eq_ignore_ascii_case(b"FULL") {
                Ret::Full
            } else if value.eq_ignore_ascii_case(b"HDRS") {
                Ret::Hdrs
            } else {
                return Err(CommandError::Syntax(RET));
            });
        } else if key.eq_ignore_ascii_case(b"ENVID") {
            let value = value.ok_or(CommandError::Syntax(ENVID))?;
            if envid.is_some() {
                return Err(CommandError::Syntax(ENVID));
            }
            envid = Some(ext::parse_envid(value).ok_or(CommandError::Syntax(ENVID))?);
        } else {
            return Err(CommandError::UnknownParameter);
        }
    }
    if from.is_some_and(|m| !m.is_ascii()) && !smtputf8 {
        return Err(CommandError::NonAscii);
    }
    Ok(Command::Mail {
        from,
        size,
        body: body.unwrap_or_default(),
        smtputf8,
        ret,
        envid,
    })
}

fn parse_rcpt(args: &[u8]) -> Result<Command<'_>, CommandError> {
    const HINT: &str = "RCPT TO:<address>";
    let rest = strip_keyword(args, b"TO:").ok_or(CommandError::Syntax(HINT))?;
    // RFC 5321 §4.1.1.3: "<Postmaster>" without a domain must be accepted.
    if rest.len() >= 12 && rest[..12].eq_ignore_ascii_case(b"<postmaster>") {
        let dsn = rcpt_params(&rest[12..])?;
        return Ok(Command::Rcpt { to: None, dsn });
    }
    let (mailbox, params) = parse_path(rest, false).map_err(|e| path_error(e, HINT))?;
    let mailbox = mailbox.ok_or(CommandError::Syntax(HINT))?;
    let dsn = rcpt_params(params)?;
    Ok(Command::Rcpt {
        to: Some(mailbox),
        dsn,
    })
}

/// The parameters of RCPT: `NOTIFY=` and `ORCPT=` (RFC 3461 §4.1, §4.2), once each.
fn rcpt_params(params: &[u8]) -> Result<RcptDsn, CommandError> {
    const NOTIFY: &str = "NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY";
    const ORCPT: &str = "ORCPT=addr-type;xtext (at most 500 characters)";
    let mut dsn = RcptDsn::default();
    let mut notify_seen = false;
    for (key, value) in params_of(params)? {
        if key.eq_ignore_ascii_case(b"NOTIFY") {
            let value = value.ok_or(CommandError::Syntax(NOTIFY))?;
            if notify_seen {
                return Err(CommandError::Syntax(NOTIFY));
            }
            notify_seen = true;
            dsn.notify = ext::parse_notify(value).ok_or(CommandError::Syntax(NOTIFY))?;
        } else if key.eq_ignore_ascii_case(b"ORCPT") {
            let value = value.ok_or(CommandError::Syntax(ORCPT))?;
            if dsn.orcpt.is_some() {
                return Err(CommandError::Syntax(ORCPT));
            }
            dsn.orcpt = Some(ext::parse_orcpt(value).ok_or(CommandError::Syntax(ORCPT))?);
        } else {
            return Err(CommandError::UnknownParameter);
        }
    }
    debug_assert!(notify_seen || dsn.notify == Notify::default());
    Ok(dsn)
}

/// Splits ` KEY[=VALUE] KEY[=VALUE]…` after a path. Keywords are `(ALPHA/DIGIT)
/// *(ALPHA/DIGIT/"-")` and values printable ASCII except `=` (RFC 5321 §4.1.2); anything else
/// is a syntax error, checked for the whole list before the first pair is returned.
fn params_of(s: &[u8]) -> Result<impl Iterator<Item = (&[u8], Option<&[u8]>)>, CommandError> {
    const HINT: &str = "bad parameter syntax";
    if !s.is_empty() && s[0] != b' ' {
        return Err(CommandError::Syntax(HINT));
    }
    for p in s.split(|&b| b == b' ').filter(|p| !p.is_empty()) {
        let (key, value) = split_param(p);
        let key_ok = key.first().is_some_and(u8::is_ascii_alphanumeric)
            && key.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-');
        let value_ok = value.is_none_or(|v| {
            !v.is_empty() && v.iter().all(|&b| (33..=126).contains(&b) && b != b'=')
        });
        if !key_ok || !value_ok {
            return Err(CommandError::Syntax(HINT));
        }
    }
    Ok(s.split(|&b| b == b' ')
        .filter(|p| !p.is_empty())
        .map(split_param))
}

fn split_param(p: &[u8]) -> (&[u8], Option<&[u8]>) {
    match p.iter().position(|&b| b == b'=') {
        Some(eq) => (&p[..eq], Some(&p[eq + 1..])),
        None => (p, None),
    }
}

/// True when `s` is a syntactically valid domain (for configuration checks).
pub fn valid_domain(s: &str) -> bool {
    is_domain(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail(line: &str) -> Result<(String, Option<u64>, BodyType), CommandError> {
        match parse(line.as_bytes())? {
            Command::Mail {
                from, size, body, ..
            } => Ok((from.map_or(String::new(), |m| m.to_string()), size, body)),
            other => panic!("not MAIL: {other:?}"),
        }
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            parse(b"ehlo client.example"),
            Ok(Command::Ehlo("client.example"))
        );
        assert_eq!(
            parse(b"HeLo client.example"),
            Ok(Command::Helo("client.example"))
        );
        assert_eq!(parse(b"dAtA"), Ok(Command::Data));
        assert_eq!(parse(b"quit"), Ok(Command::Quit));
        assert_eq!(parse(b"noop anything at all"), Ok(Command::Noop));
        assert_eq!(parse(b"help"), Ok(Command::Help));
        assert_eq!(parse(b"Vrfy bob"), Ok(Command::Vrfy));
    }

    #[test]
    fn unsupported_and_unknown() {
        assert_eq!(parse(b"EXPN staff"), Ok(Command::Unsupported));
        assert_eq!(parse(b"TURN"), Ok(Command::Unsupported));
        assert_eq!(
            parse(b"BDAT 1000"),
            Ok(Command::Bdat {
                size: 1000,
                last: false
            })
        );
        assert_eq!(
            parse(b"bdat 0 last"),
            Ok(Command::Bdat {
                size: 0,
                last: true
            })
        );
        for bad in [
            &b"BDAT"[..],
            b"BDAT ",
            b"BDAT x",
            b"BDAT -1",
            b"BDAT 10 FIRST",
            b"BDAT 10  LAST",
            b"BDAT 99999999999999999999999",
        ] {
            assert!(
                matches!(parse(bad), Err(CommandError::Syntax(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse(b"STARTTLS"), Ok(Command::StartTls));
        assert_eq!(parse(b"starttls"), Ok(Command::StartTls));
        assert_eq!(
            parse(b"STARTTLS now"),
            Err(CommandError::Syntax("no arguments allowed"))
        );
        assert_eq!(
            parse(b"AUTH PLAIN  dGVzdA== "),
            Ok(Command::Auth(b"PLAIN  dGVzdA=="))
        );
        assert_eq!(parse(b"AUTH"), Ok(Command::Auth(b"")));
        assert_eq!(parse(b"FOO bar"), Err(CommandError::Unknown));
        assert_eq!(parse(b""), Err(CommandError::Unknown));
        assert_eq!(parse(b"MAILX FROM:<a@b>"), Err(CommandError::Unknown));
    }

    #[test]
    fn greeting_needs_an_argument() {
        assert!(matches!(parse(b"EHLO"), Err(CommandError::Syntax(_))));
        assert!(matches!(parse(b"EHLO   "), Err(CommandError::Syntax(_))));
        assert!(matches!(
            parse(b"EHLO a\x01b"),
            Err(CommandError::Syntax(_))
        ));
        assert_eq!(parse(b"EHLO [127.0.0.1]"), Ok(Command::Ehlo("[127.0.0.1]")));
    }

    #[test]
    fn mail_from_forms_and_parameters() {
        assert_eq!(mail("MAIL FROM:<a@b.example>").unwrap().0, "a@b.example");
        assert_eq!(mail("mail from:<>").unwrap().0, "");
        assert_eq!(mail("MAIL FROM: <a@b.example>").unwrap().0, "a@b.example");
        let (_, size, body) = mail("MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME").unwrap();
        assert_eq!((size, body), (Some(1000), BodyType::EightBitMime));
        assert_eq!(
            mail("MAIL FROM:<a@b.example> body=7bit").unwrap().2,
            BodyType::SevenBit
        );
        assert_eq!(
            mail("MAIL FROM:<a@b.example> SIZE=99999999999999999999999")
                .unwrap()
                .1,
            Some(u64::MAX)
        );
        assert_eq!(
            mail("MAIL FROM:<a@b.example> FOO=bar"),
            Err(CommandError::UnknownParameter)
        );
        for bad in [
            "MAIL FROM:<a@b.example> SIZE=abc",
            "MAIL FROM:<a@b.example> SIZE=",
            "MAIL FROM:<a@b.example> SIZE",
            "MAIL FROM:<a@b.example> SIZE=1 SIZE=2",
            "MAIL FROM:<a@b.example> BODY=BINARYMIME",
            "MAIL FROM:<a@b.example>SIZE=1",
            "MAIL FROM:<a@b.example> =1",
            "MAIL FROM:a@b.example",
            "MAIL TO:<a@b.example>",
            "MAIL",
            "MAIL FROM:",
        ] {
            assert!(matches!(mail(bad), Err(CommandError::Syntax(_))), "{bad}");
        }
    }

    #[test]
    fn rcpt_to_forms() {
        let Ok(Command::Rcpt { to: Some(m), dsn }) = parse(b"RCPT TO:<u@d.example>") else {
            panic!()
        };
        assert_eq!(m.domain(), "d.example");
        assert!(dsn.is_default());
        let postmaster = Ok(Command::Rcpt {
            to: None,
            dsn: RcptDsn::default(),
        });
        assert_eq!(parse(b"RCPT TO:<Postmaster>"), postmaster);
        assert_eq!(parse(b"rcpt to:<POSTMASTER>"), postmaster);
        assert!(matches!(parse(b"RCPT TO:<>"), Err(CommandError::Syntax(_))));
        assert!(matches!(
            parse(b"RCPT FROM:<a@b>"),
            Err(CommandError::Syntax(_))
        ));
        assert_eq!(
            parse(b"RCPT TO:<u@d.example> FOO=1"),
            Err(CommandError::UnknownParameter)
        );
    }

    fn mail_ext(line: &str) -> Result<(bool, Option<Ret>, Option<String>), CommandError> {
        match parse(line.as_bytes())? {
            Command::Mail {
                smtputf8,
                ret,
                envid,
                ..
            } => Ok((smtputf8, ret, envid.map(String::from))),
            other => panic!("not MAIL: {other:?}"),
        }
    }

    fn rcpt_dsn(line: &str) -> Result<RcptDsn, CommandError> {
        match parse(line.as_bytes())? {
            Command::Rcpt { dsn, .. } => Ok(dsn),
            other => panic!("not RCPT: {other:?}"),
        }
    }

    #[test]
    fn mail_smtputf8_ret_and_envid() {
        assert_eq!(
            mail_ext("MAIL FROM:<a@b.example> SMTPUTF8"),
            Ok((true, None, None))
        );
        assert_eq!(
            mail_ext("MAIL FROM:<a@b.example> ret=hdrs ENVID=QQ+2B1 smtputf8"),
            Ok((true, Some(Ret::Hdrs), Some("QQ+1".into())))
        );
        assert_eq!(
            mail_ext("MAIL FROM:<a@b.example> RET=FULL"),
            Ok((false, Some(Ret::Full), None))
        );
        let (from, ..) = mail("MAIL FROM:<δοκιμή@παράδειγμα.δοκιμή> SMTPUTF8").unwrap();
        assert_eq!(from, "δοκιμή@παράδειγμα.δοκιμή");
        assert_eq!(
            mail("MAIL FROM:<δοκιμή@example.org>"),
            Err(CommandError::NonAscii)
        );
        assert_eq!(
            mail("MAIL FROM:<a@bücher.example> BODY=8BITMIME"),
            Err(CommandError::NonAscii)
        );
        for bad in [
            "MAIL FROM:<a@b.example> SMTPUTF8=yes",
            "MAIL FROM:<a@b.example> SMTPUTF8 SMTPUTF8",
            "MAIL FROM:<a@b.example> RET=",
            "MAIL FROM:<a@b.example> RET",
            "MAIL FROM:<a@b.example> RET=BODY",
            "MAIL FROM:<a@b.example> RET=FULL RET=HDRS",
            "MAIL FROM:<a@b.example> ENVID=",
            "MAIL FROM:<a@b.example> ENVID",
            "MAIL FROM:<a@b.example> ENVID=+ZZ",
            "MAIL FROM:<a@b.example> ENVID=a+0Ab",
            "MAIL FROM:<a@b.example> ENVID=a ENVID=b",
        ] {
            assert!(
                matches!(mail_ext(bad), Err(CommandError::Syntax(_))),
                "{bad}"
            );
        }
        let envid = format!("MAIL FROM:<a@b.example> ENVID={}", "x".repeat(101));
        assert!(matches!(mail_ext(&envid), Err(CommandError::Syntax(_))));
    }

    #[test]
    fn malformed_utf8_in_a_path_is_a_syntax_error_even_with_smtputf8() {
        let bad: [&[u8]; 6] = [
            b"MAIL FROM:<\xff@b.example> SMTPUTF8",
            b"MAIL FROM:<a\xc3@b.example> SMTPUTF8",
            // Overlong encodings of `/` and of NUL.
            b"MAIL FROM:<a\xc0\xafb@b.example> SMTPUTF8",
            b"MAIL FROM:<a\xc0\x80b@b.example> SMTPUTF8",
            // A surrogate, and a C1 control (U+0085) in UTF-8.
            b"MAIL FROM:<a\xed\xa0\x80@b.example> SMTPUTF8",
            b"MAIL FROM:<a\xc2\x85@b.example> SMTPUTF8",
        ];
        for line in bad {
            assert!(
                matches!(parse(line), Err(CommandError::Syntax(_))),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert!(matches!(
            parse(b"MAIL FROM:<a\x00b@b.example> SMTPUTF8"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            parse("RCPT TO:<a@bü cher.example>".as_bytes()),
            Err(CommandError::Syntax(_))
        ));
        // A U-label domain must be valid IDNA.
        assert!(matches!(
            parse("RCPT TO:<a@-bücher.example>".as_bytes()),
            Err(CommandError::Syntax(_))
        ));
    }

    #[test]
    fn rcpt_notify_and_orcpt() {
        let dsn =
            rcpt_dsn("RCPT TO:<u@d.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+2Bx@d.example")
                .unwrap();
        assert!(dsn.notify.has(Notify::SUCCESS) && dsn.notify.has(Notify::FAILURE));
        let orcpt = dsn.orcpt.unwrap();
        assert_eq!(&*orcpt.addr, "u+x@d.example");
        assert_eq!(
            rcpt_dsn("RCPT TO:<Postmaster> NOTIFY=NEVER")
                .unwrap()
                .notify,
            Notify::NEVER
        );
        // Internationalized recipients parse; the session decides whether they may.
        assert!(rcpt_dsn("RCPT TO:<用户@例子.广告>").is_ok());
        for bad in [
            "RCPT TO:<u@d.example> NOTIFY=",
            "RCPT TO:<u@d.example> NOTIFY",
            "RCPT TO:<u@d.example> NOTIFY=NEVER,SUCCESS",
            "RCPT TO:<u@d.example> NOTIFY=SUCCESS,SUCCESS",
            "RCPT TO:<u@d.example> NOTIFY=SOMETIMES",
            "RCPT TO:<u@d.example> NOTIFY=NEVER NOTIFY=NEVER",
            "RCPT TO:<u@d.example> ORCPT=",
            "RCPT TO:<u@d.example> ORCPT=rfc822",
            "RCPT TO:<u@d.example> ORCPT=rfc822;",
            "RCPT TO:<u@d.example> ORCPT=;u@d.example",
            "RCPT TO:<u@d.example> ORCPT=rfc822;+ZZ",
            "RCPT TO:<u@d.example> ORCPT=rfc822;a ORCPT=rfc822;b",
        ] {
            assert!(
                matches!(rcpt_dsn(bad), Err(CommandError::Syntax(_))),
                "{bad}"
            );
        }
        let long = format!(
            "RCPT TO:<u@d.example> ORCPT=rfc822;{}",
            "a".repeat(ext::MAX_ORCPT)
        );
        assert!(matches!(rcpt_dsn(&long), Err(CommandError::Syntax(_))));
    }

    #[test]
    fn trailing_blanks_are_ignored() {
        assert_eq!(parse(b"QUIT "), Ok(Command::Quit));
        assert_eq!(parse(b"DATA\t"), Ok(Command::Data));
        assert!(matches!(
            parse(b"MAIL FROM:<a@b.example>\t"),
            Ok(Command::Mail { .. })
        ));
        assert_eq!(parse(b"HELO"), Err(CommandError::Syntax("HELO hostname")));
    }

    #[test]
    fn commands_without_arguments_refuse_them() {
        assert!(matches!(parse(b"DATA now"), Err(CommandError::Syntax(_))));
        assert!(matches!(parse(b"RSET x"), Err(CommandError::Syntax(_))));
        assert!(matches!(parse(b"VRFY"), Err(CommandError::Syntax(_))));
    }
}
