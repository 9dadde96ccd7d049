//! The `Received:` trace header we prepend to every message (RFC 5321 §4.4) and the RFC 5322
//! date it carries.

use std::fmt::{self, Write};
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};

use crate::id::QueueId;

/// What a `Received:` header records about one message.
#[derive(Debug, Clone, Copy)]
pub struct Trace<'a> {
    /// The EHLO/HELO name: printable ASCII without spaces (the command parser ensures it).
    pub helo: &'a str,
    /// The client's address.
    pub ip: IpAddr,
    /// Our host name.
    pub hostname: &'a str,
    /// EHLO (ESMTP) or HELO (SMTP).
    pub esmtp: bool,
    /// The TLS protocol version and cipher suite, when the session ran over TLS.
    pub tls: Option<(&'a str, &'a str)>,
    /// The client authenticated (SMTP AUTH): `ESMTPA`/`ESMTPSA` (RFC 3848). Who it was
    /// goes to the log, never into the header.
    pub authenticated: bool,
    /// The transaction declared SMTPUTF8: the protocol is `UTF8SMTP`, `UTF8SMTPS`,
    /// `UTF8SMTPA` or `UTF8SMTPSA` (RFC 6531 §3.7.3).
    pub smtputf8: bool,
    /// The message's queue ID.
    pub id: QueueId,
    /// The recipient, when there is exactly one (RFC 5321 §4.4 `for` clause).
    pub single_rcpt: Option<&'a str>,
}

/// Appends `Received: from HELO ([IP]) [(using TLS… with cipher …)] by HOST (ringrelay) with
/// PROTOCOL id ID [for <RCPT>]; DATE` to `out`, folded over several lines. PROTOCOL is
/// `SMTP`, `ESMTP`, `ESMTPS` (TLS), `ESMTPA` (AUTH) or `ESMTPSA` (both), per RFC 3848, or
/// `UTF8SMTP`… likewise for an SMTPUTF8 transaction (RFC 6531 §3.7.3). Written straight into `out`: nothing is allocated
/// but `out`'s own growth.
pub fn write_received(out: &mut BytesMut, trace: &Trace<'_>, now: SystemTime) {
    let Trace {
        helo,
        ip,
        hostname,
        esmtp,
        tls,
        authenticated,
        smtputf8,
        id,
        single_rcpt,
    } = *trace;
    // Room for the whole header, so that it is written without regrowing: the fixed text,
    // the longest IP literal, the ID and the date come to less than 170 bytes.
    out.reserve(helo.len() + hostname.len() + single_rcpt.map_or(0, str::len) + 170);
    out.extend_from_slice(b"Received: from ");
    // The HELO name is the client's word: keep only what cannot unbalance the header's
    // comment or structure (Postfix is similarly careful); any other character becomes `_`.
    for c in helo.chars() {
        match u8::try_from(c) {
            Ok(b) if b.is_ascii_alphanumeric() || b"-._:[]".contains(&b) => out.put_u8(b),
            _ => out.put_u8(b'_'),
        }
    }
    // Writing to a BytesMut cannot fail (it grows as needed).
    let _ = match ip {
        IpAddr::V4(v4) => write!(out, " ([{v4}])"),
        IpAddr::V6(v6) => write!(out, " ([IPv6:{v6}])"),
    };
    if let Some((version, cipher)) = tls {
        // Both come from rustls' own tables (printable ASCII names), never from the peer.
        out.reserve(version.len() + cipher.len() + 32);
        out.extend_from_slice(b"\r\n\t(using ");
        out.extend_from_slice(version.as_bytes());
        out.extend_from_slice(b" with cipher ");
        out.extend_from_slice(cipher.as_bytes());
        out.put_u8(b')');
    }
    out.extend_from_slice(b"\r\n\tby ");
    out.extend_from_slice(hostname.as_bytes());
    out.extend_from_slice(match (esmtp, tls.is_some(), authenticated) {
        (true, tls, auth) if smtputf8 => match (tls, auth) {
            (false, false) => b" (ringrelay) with UTF8SMTP id ",
            (true, false) => b" (ringrelay) with UTF8SMTPS id ",
            (false, true) => b" (ringrelay) with UTF8SMTPA id ",
            (true, true) => b" (ringrelay) with UTF8SMTPSA id ",
        },
        (false, _, _) => b" (ringrelay) with SMTP id ",
        (true, false, false) => b" (ringrelay) with ESMTP id ",
        (true, true, false) => b" (ringrelay) with ESMTPS id ",
        (true, false, true) => b" (ringrelay) with ESMTPA id ",
        (true, true, true) => b" (ringrelay) with ESMTPSA id ",
    });
    out.extend_from_slice(&id.encode());
    if let Some(rcpt) = single_rcpt {
        out.extend_from_slice(b"\r\n\tfor <");
        out.extend_from_slice(rcpt.as_bytes());
        out.put_u8(b'>');
    }
    out.extend_from_slice(b";\r\n\t");
    let _ = write_rfc5322_date(out, now);
    out.extend_from_slice(b"\r\n");
}

/// Formats `now` as an RFC 5322 date in UTC, e.g. `Sat, 21 Nov 2026 20:39:18 +0000`.
/// Fails only if `out` does.
pub fn write_rfc5322_date<W: Write + ?Sized>(out: &mut W, now: SystemTime) -> fmt::Result {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    write!(
        out,
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month 1–12, day 1–31), proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each 400-year era.
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn date(secs: u64) -> String {
        let mut s = String::new();
        write_rfc5322_date(&mut s, UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
        s
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(date(1_795_293_558), "Sat, 21 Nov 2026 20:39:18 +0000");
    }

    /// The Received header written for a client that said `helo`.
    fn received_for(helo: &str) -> String {
        let mut b = BytesMut::new();
        let trace = Trace {
            helo,
            ip: "192.0.2.1".parse().unwrap(),
            hostname: "r",
            esmtp: true,
            tls: None,
            authenticated: false,
            smtputf8: false,
            id: crate::id::IdGenerator::starting_at(0, 1).next_id(),
            single_rcpt: None,
        };
        write_received(&mut b, &trace, UNIX_EPOCH);
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn a_hostile_helo_cannot_bend_the_header() {
        assert!(received_for("a(b);x<y>").starts_with("Received: from a_b__x_y_ ([192.0.2.1])"));
    }

    #[test]
    fn a_non_ascii_helo_character_becomes_one_underscore() {
        assert!(
            received_for("h\u{e9}.example").starts_with("Received: from h_.example ([192.0.2.1])")
        );
    }

    #[test]
    fn header_shape() {
        let mut b = BytesMut::new();
        let id = crate::id::IdGenerator::starting_at(0, 1).next_id();
        let trace = Trace {
            helo: "client.example",
            ip: "192.0.2.7".parse().unwrap(),
            hostname: "relay.example",
            esmtp: true,
            tls: None,
            authenticated: false,
            smtputf8: false,
            id,
            single_rcpt: Some("rcpt@dest.example"),
        };
        write_received(&mut b, &trace, UNIX_EPOCH);
        let s = String::from_utf8(b.to_vec()).unwrap();
        assert_eq!(
            s,
            format!(
                "Received: from client.example ([192.0.2.7])\r\n\tby relay.example (ringrelay) with ESMTP id {id}\r\n\tfor <rcpt@dest.example>;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"
            )
        );
        let mut b = BytesMut::new();
        let trace = Trace {
            helo: "h",
            ip: "::1".parse().unwrap(),
            hostname: "r",
            esmtp: false,
            tls: None,
            authenticated: false,
            smtputf8: false,
            id,
            single_rcpt: None,
        };
        write_received(&mut b, &trace, UNIX_EPOCH);
        let s = String::from_utf8(b.to_vec()).unwrap();
        assert!(s.contains("([IPv6:::1])") && s.contains("with SMTP id") && !s.contains("for <"));
    }

    /// RFC 3848's protocol names, and the TLS comment as Postfix writes it.
    #[test]
    fn tls_and_auth_name_the_protocol() {
        let id = crate::id::IdGenerator::starting_at(0, 1).next_id();
        let header_utf8 = |tls: Option<(&str, &str)>, authenticated: bool, smtputf8: bool| {
            let mut b = BytesMut::new();
            let trace = Trace {
                helo: "c",
                ip: "192.0.2.7".parse().unwrap(),
                hostname: "r",
                esmtp: true,
                tls,
                authenticated,
                smtputf8,
                id,
                single_rcpt: None,
            };
            write_received(&mut b, &trace, UNIX_EPOCH);
            String::from_utf8(b.to_vec()).unwrap()
        };
        let header = |tls, authenticated| header_utf8(tls, authenticated, false);
        let tls = Some(("TLSv1.3", "TLS_AES_256_GCM_SHA384"));
        assert!(header_utf8(None, false, true).contains(" with UTF8SMTP id "));
        assert!(header_utf8(tls, false, true).contains(" with UTF8SMTPS id "));
        assert!(header_utf8(None, true, true).contains(" with UTF8SMTPA id "));
        assert!(header_utf8(tls, true, true).contains(" with UTF8SMTPSA id "));
        let s = header(tls, false);
        assert!(s.starts_with(
            "Received: from c ([192.0.2.7])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n\tby r (ringrelay) with ESMTPS id "
        ), "{s}");
        assert!(header(tls, true).contains(" with ESMTPSA id "));
        assert!(header(None, true).contains(" with ESMTPA id "));
        assert!(!header(None, false).contains("using"));
    }
}
