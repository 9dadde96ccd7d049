//! The PROXY protocol header (versions 1 and 2) that a load balancer sends before the
//! client's first byte, parsed without I/O: bytes in, the client's real addresses out.
//!
//! Follows HAProxy's "The PROXY protocol, Versions 1 & 2" (haproxy.org, 2020 revision):
//! - v1 (§2.1): one text line, `PROXY TCP4|TCP6 src dst sport dport\r\n` or
//!   `PROXY UNKNOWN …\r\n`, at most 107 octets with the CRLF. Fields are separated by
//!   exactly one space; ports are decimal 0–65535 (no leading zeros, no sign).
//! - v2 (§2.2): the 12-octet signature, a version/command octet (version 2; command LOCAL
//!   or PROXY), a family/transport octet, a 16-bit big-endian length of what follows, then
//!   the address block and optional TLVs (skipped here: nothing in ringrelay reads them).
//!
//! [`parse`] is incremental: call it on everything received so far. `Ok(None)` asks for
//! more bytes; `Ok(Some((header, n)))` says the header is the first `n` bytes and whatever
//! follows belongs to SMTP; `Err` means the connection must be closed with nothing
//! processed (the spec forbids guessing: a receiver must not fall back to plain SMTP).
//! The error comes as early as the bytes allow — a first byte that is neither `P` nor
//! CR is [`ProxyError::NotProxy`] at once — so a client that talks first is not waited on.
//!
//! What the caller does with the result: [`ProxyHeader::Proxied`] replaces the
//! connection's peer and local addresses (for policy, limits per address, the Received:
//! header); [`ProxyHeader::Local`] (a health check from the proxy itself) and
//! [`ProxyHeader::Unknown`] keep the real ones. Who may send a header at all (the
//! `proxy.trusted` networks) is the caller's check, made before any byte is read.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Longest v1 header, CRLF included (spec §2.1: 107 octets).
pub const V1_MAX_LEN: usize = 107;

/// The v2 signature: the first 12 octets of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Length of v2's fixed part: signature, version/command, family, 16-bit length.
const V2_FIXED_LEN: usize = 16;

/// The largest v2 header [`parse`] accepts, fixed part included. The format allows
/// 16 + 65535 octets, but addresses take at most 216 and the TLVs that proxies send in
/// practice (ALPN, authority, unique ID, SSL details, cloud endpoint IDs) stay well under a
/// kilobyte; anything near the format's limit is a peer wasting our memory.
/// [`parse_with_limit`] takes another cap.
pub const V2_DEFAULT_MAX_LEN: usize = V2_FIXED_LEN + 4096;

const V1_PREFIX: &[u8] = b"PROXY ";

/// What a PROXY header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The proxy relayed a TCP connection: these are the client's and the address it
    /// connected to. Use them in place of the connection's own.
    Proxied {
        /// The client's address (the original connection's source).
        source: SocketAddr,
        /// The address the client connected to (the proxy's listener).
        destination: SocketAddr,
    },
    /// v2 LOCAL: the proxy speaks for itself (a health check, say). Use the connection's
    /// real addresses.
    Local,
    /// v1 `UNKNOWN`, or a v2 PROXY of a family or transport not carried here (unspecified,
    /// UNIX sockets, datagrams): the proxy does not say who the client is. Use the
    /// connection's real addresses.
    Unknown,
}

impl ProxyHeader {
    /// The client's address: the header's source when it gave one, else `real_peer`
    /// (the address the connection came from, that is, the proxy).
    pub fn client_address(&self, real_peer: SocketAddr) -> SocketAddr {
        match self {
            ProxyHeader::Proxied { source, .. } => *source,
            ProxyHeader::Local | ProxyHeader::Unknown => real_peer,
        }
    }

    /// The address the client connected to: the header's destination when it gave one,
    /// else `real_local` (the connection's own local address).
    pub fn local_address(&self, real_local: SocketAddr) -> SocketAddr {
        match self {
            ProxyHeader::Proxied { destination, .. } => *destination,
            ProxyHeader::Local | ProxyHeader::Unknown => real_local,
        }
    }
}

/// Why the bytes are not a valid PROXY header. Every one of these means: close the
/// connection without answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The first bytes can start neither a v1 nor a v2 header (typically: the client
    /// talked SMTP, or TLS, straight to a listener that requires a PROXY header).
    NotProxy,
    /// v1: no CRLF within the first 107 octets.
    V1TooLong,
    /// v1: the line does not follow the grammar; the text says where.
    V1Malformed(&'static str),
    /// v2: a version other than 2 (the high nibble of octet 13).
    V2Version(u8),
    /// v2: a command other than LOCAL (0) or PROXY (1) (the low nibble of octet 13).
    V2Command(u8),
    /// v2: a family/transport octet the spec does not define (octet 14).
    V2Family(u8),
    /// v2: the stated length cannot hold the address block of the stated family.
    V2TooShort {
        /// The family/transport octet.
        family: u8,
        /// The length the header stated (octets after the fixed 16).
        length: usize,
    },
    /// v2: the header would be longer than the cap (fixed part included).
    V2TooLong {
        /// The header's total length as stated.
        length: usize,
        /// The cap in force.
        max: usize,
    },
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NotProxy => f.write_str("the connection did not start with a PROXY header"),
            ProxyError::V1TooLong => write!(f, "PROXY v1 header: no CRLF within {V1_MAX_LEN} octets"),
            ProxyError::V1Malformed(what) => write!(f, "PROXY v1 header: {what}"),
            ProxyError::V2Version(v) => write!(f, "PROXY v2 header: version {v}, expected 2"),
            ProxyError::V2Command(c) => {
                write!(f, "PROXY v2 header: command {c}, expected LOCAL (0) or PROXY (1)")
            }
            ProxyError::V2Family(b) => {
                write!(f, "PROXY v2 header: undefined family/transport octet 0x{b:02x}")
            }
            ProxyError::V2TooShort { family, length } => write!(
                f,
                "PROXY v2 header: length {length} is shorter than the address block of family/transport 0x{family:02x}"
            ),
            ProxyError::V2TooLong { length, max } => write!(
                f,
                "PROXY v2 header: {length} octets, more than the {max} accepted"
            ),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Parses a PROXY header (v1 or v2) at the start of `buf`, with v2 headers capped at
/// [`V2_DEFAULT_MAX_LEN`].
///
/// `Ok(None)`: the bytes so far are a valid beginning; call again with more.
/// `Ok(Some((header, consumed)))`: the header is `buf[..consumed]`; the rest is SMTP.
/// `Err(_)`: not a valid header; close the connection.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    parse_with_limit(buf, V2_DEFAULT_MAX_LEN)
}

/// [`parse`] with another cap on a v2 header's total length (fixed part included). A v1
/// header is always capped at [`V1_MAX_LEN`].
pub fn parse_with_limit(
    buf: &[u8],
    v2_max_len: usize,
) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf, v2_max_len),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// True when `buf` may still be the beginning of a PROXY header (checks the v1 prefix
/// `PROXY ` or the v2 signature, as far as `buf` goes). An empty `buf` may.
///
/// [`parse`] already fails with [`ProxyError::NotProxy`] as soon as this is false; this is
/// for a caller that wants to decide before collecting a whole header.
pub fn may_be_header(buf: &[u8]) -> bool {
    let prefix_of = |whole: &[u8]| {
        let n = buf.len().min(whole.len());
        buf[..n] == whole[..n]
    };
    prefix_of(V1_PREFIX) || prefix_of(&V2_SIGNATURE)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(ProxyError::NotProxy);
    }
    // Look for the CRLF within the allowed length, rejecting anything a v1 line cannot
    // contain as soon as it arrives.
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let mut end = None;
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\r' => match window.get(i + 1) {
                Some(b'\n') => {
                    end = Some(i);
                    break;
                }
                Some(_) => return Err(ProxyError::V1Malformed("CR not followed by LF")),
                None if i + 1 == V1_MAX_LEN => return Err(ProxyError::V1TooLong),
                None => return Ok(None),
            },
            b'\n' => return Err(ProxyError::V1Malformed("LF without CR")),
            0x20..=0x7e => {}
            _ => {
                return Err(ProxyError::V1Malformed(
                    "a character that is not printable ASCII",
                ))
            }
        }
    }
    let Some(end) = end else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(None)
        };
    };
    let consumed = end + 2;
    // Printable ASCII only (checked above), so this is valid UTF-8.
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end])
        .map_err(|_| ProxyError::V1Malformed("not ASCII"))?;
    let header = parse_v1_fields(line)?;
    Ok(Some((header, consumed)))
}

/// The fields after `PROXY `, without the CRLF.
fn parse_v1_fields(line: &str) -> Result<ProxyHeader, ProxyError> {
    // UNKNOWN may be followed by anything (the receiver must ignore it), or by nothing.
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Ok(ProxyHeader::Unknown);
    }
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or("");
    let v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        _ => {
            return Err(ProxyError::V1Malformed(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let mut next = |what: &'static str| {
        fields
            .next()
            .filter(|f| !f.is_empty())
            .ok_or(ProxyError::V1Malformed(what))
    };
    let src = next("missing or empty source address")?;
    let dst = next("missing or empty destination address")?;
    let sport = next("missing or empty source port")?;
    let dport = next("missing or empty destination port")?;
    if fields.next().is_some() {
        return Err(ProxyError::V1Malformed(
            "more than four fields after the protocol",
        ));
    }
    let (src, dst) = if v6 {
        let parse = |s| Ipv6Addr::from_str(s).map(IpAddr::V6);
        (
            parse(src).map_err(|_| ProxyError::V1Malformed("source is not an IPv6 address"))?,
            parse(dst)
                .map_err(|_| ProxyError::V1Malformed("destination is not an IPv6 address"))?,
        )
    } else {
        let parse = |s| Ipv4Addr::from_str(s).map(IpAddr::V4);
        (
            parse(src).map_err(|_| ProxyError::V1Malformed("source is not an IPv4 address"))?,
            parse(dst)
                .map_err(|_| ProxyError::V1Malformed("destination is not an IPv4 address"))?,
        )
    };
    let sport = parse_port(sport).ok_or(ProxyError::V1Malformed("source port is not 0-65535"))?;
    let dport =
        parse_port(dport).ok_or(ProxyError::V1Malformed("destination port is not 0-65535"))?;
    Ok(ProxyHeader::Proxied {
        source: SocketAddr::new(src, sport),
        destination: SocketAddr::new(dst, dport),
    })
}

/// A decimal port, 0–65535, digits only, no leading zero (except `0` itself).
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(buf: &[u8], max_len: usize) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(ProxyError::NotProxy);
    }
    // Judge each fixed octet as soon as it is here.
    if let Some(&ver_cmd) = buf.get(12) {
        let version = ver_cmd >> 4;
        if version != 2 {
            return Err(ProxyError::V2Version(version));
        }
        let command = ver_cmd & 0x0f;
        if command > 1 {
            return Err(ProxyError::V2Command(command));
        }
    }
    let family = match buf.get(13) {
        Some(&f) => f,
        None => return Ok(None),
    };
    let address_len = match family {
        0x00 => 0,          // UNSPEC
        0x11 | 0x12 => 12,  // INET over STREAM / DGRAM
        0x21 | 0x22 => 36,  // INET6 over STREAM / DGRAM
        0x31 | 0x32 => 216, // UNIX over STREAM / DGRAM
        other => return Err(ProxyError::V2Family(other)),
    };
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(None);
    };
    let length = usize::from(u16::from_be_bytes([hi, lo]));
    let total = V2_FIXED_LEN + length;
    if total > max_len {
        return Err(ProxyError::V2TooLong {
            length: total,
            max: max_len,
        });
    }
    let command = buf[12] & 0x0f;
    // LOCAL: the receiver must ignore the family and the address block (spec §2.2), so a
    // short block is no error there.
    if command == 1 && length < address_len {
        return Err(ProxyError::V2TooShort { family, length });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let header = if command == 0 {
        ProxyHeader::Local
    } else {
        let block = &buf[V2_FIXED_LEN..V2_FIXED_LEN + address_len];
        match family {
            0x11 => {
                let ip = |at: usize| {
                    Ipv4Addr::new(block[at], block[at + 1], block[at + 2], block[at + 3])
                };
                let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
                ProxyHeader::Proxied {
                    source: SocketAddr::new(IpAddr::V4(ip(0)), port(8)),
                    destination: SocketAddr::new(IpAddr::V4(ip(4)), port(10)),
                }
            }
            0x21 => {
                let ip = |at: usize| {
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(&block[at..at + 16]);
                    Ipv6Addr::from(octets)
                };
                let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
                ProxyHeader::Proxied {
                    source: SocketAddr::new(IpAddr::V6(ip(0)), port(32)),
                    destination: SocketAddr::new(IpAddr::V6(ip(16)), port(34)),
                }
            }
            // UNSPEC, and the defined combinations we do not carry (datagrams, UNIX
            // sockets): the spec has a receiver fall back to UNSPEC, i.e. real addresses.
            _ => ProxyHeader::Unknown,
        }
    };
    Ok(Some((header, total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A v2 header built by hand: fixed part, `block` as the address block, `tlvs` after.
    fn v2(ver_cmd: u8, family: u8, block: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(family);
        let len = (block.len() + tlvs.len()) as u16;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(block);
        out.extend_from_slice(tlvs);
        out
    }

    fn v2_inet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut block = Vec::new();
        block.extend_from_slice(&src);
        block.extend_from_slice(&dst);
        block.extend_from_slice(&sport.to_be_bytes());
        block.extend_from_slice(&dport.to_be_bytes());
        block
    }

    /// Every strict prefix of a complete header asks for more bytes.
    fn assert_prefixes_wait(header: &[u8]) {
        for cut in 0..header.len() {
            assert_eq!(parse(&header[..cut]), Ok(None), "prefix of {cut} bytes");
        }
    }

    #[test]
    fn v1_tcp4() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n";
        let want = ProxyHeader::Proxied {
            source: sa("192.0.2.1:56324"),
            destination: sa("198.51.100.2:25"),
        };
        assert_eq!(parse(h), Ok(Some((want, h.len()))));
        assert_prefixes_wait(h);
    }

    #[test]
    fn v1_tcp6() {
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n";
        let want = ProxyHeader::Proxied {
            source: sa("[2001:db8::1]:65535"),
            destination: sa("[2001:db8::2]:0"),
        };
        assert_eq!(parse(h), Ok(Some((want, h.len()))));
        assert_prefixes_wait(h);
    }

    #[test]
    fn v1_unknown_with_and_without_fields() {
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Some((ProxyHeader::Unknown, 15)))
        );
        let h = b"PROXY UNKNOWN whatever the sender puts here 1 2\r\n";
        assert_eq!(parse(h), Ok(Some((ProxyHeader::Unknown, h.len()))));
    }

    #[test]
    fn v1_rest_of_buffer_is_left_for_smtp() {
        let mut buf = b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n".to_vec();
        let header_len = buf.len();
        buf.extend_from_slice(b"EHLO x\r\n");
        let (_, consumed) = parse(&buf).unwrap().unwrap();
        assert_eq!(consumed, header_len);
        assert_eq!(&buf[consumed..], b"EHLO x\r\n");
    }

    #[test]
    fn v1_longest_header_fits_exactly() {
        // The spec's worst case: UNKNOWN with two full IPv6 addresses and two 5-digit
        // ports is exactly 107 octets.
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let h = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n");
        assert_eq!(h.len(), V1_MAX_LEN);
        assert_eq!(parse(h.as_bytes()), Ok(Some((ProxyHeader::Unknown, 107))));
        let h = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert!(matches!(
            parse(h.as_bytes()),
            Ok(Some((ProxyHeader::Proxied { .. }, 104)))
        ));
    }

    #[test]
    fn v1_without_crlf_in_107_octets_is_an_error() {
        let mut h = b"PROXY UNKNOWN ".to_vec();
        h.resize(106, b'x');
        assert_eq!(parse(&h), Ok(None));
        h.push(b'x');
        assert_eq!(parse(&h), Err(ProxyError::V1TooLong));
        // A CR as the 107th octet has no room for its LF.
        let mut h = b"PROXY UNKNOWN ".to_vec();
        h.resize(106, b'x');
        h.push(b'\r');
        assert_eq!(parse(&h), Err(ProxyError::V1TooLong));
        // Much more than that, still an error (and not a wait).
        let h = [b"PROXY UNKNOWN ".as_slice(), &[b'y'; 5000]].concat();
        assert_eq!(parse(&h), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn v1_malformed_lines() {
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25 9\r\n",
            b"PROXY TCP4  192.0.2.1 198.51.100.2 56324 25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25 \r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 025 25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 99999999999 25\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 25\r\n",
            b"PROXY TCP6 192.0.2.1 2001:db8::2 1 25\r\n",
            b"PROXY TCP4 192.0.2.256 198.51.100.2 1 25\r\n",
            b"PROXY TCP4 192.0.2 198.51.100.2 1 25\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 25\r\n",
            b"PROXY tcp4 192.0.2.1 198.51.100.2 1 25\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY TCP4 192.0.2.1\t198.51.100.2 1 25\r\n",
        ];
        for h in bad {
            let got = parse(h);
            assert!(
                matches!(got, Err(ProxyError::V1Malformed(_))),
                "{:?} gave {got:?}",
                String::from_utf8_lossy(h)
            );
        }
    }

    #[test]
    fn v1_bad_line_endings_fail_early() {
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4\n"),
            Err(ProxyError::V1Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4\rX"),
            Err(ProxyError::V1Malformed(_))
        ));
        // A lone CR at the end may still get its LF.
        assert_eq!(parse(b"PROXY UNKNOWN\r"), Ok(None));
        // Control characters and 8-bit octets are refused before any CRLF arrives.
        assert!(matches!(
            parse(b"PROXY TCP4 \0"),
            Err(ProxyError::V1Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 \xc3\xa9"),
            Err(ProxyError::V1Malformed(_))
        ));
    }

    #[test]
    fn not_a_header_is_known_from_the_first_differing_byte() {
        assert_eq!(parse(b""), Ok(None));
        assert_eq!(parse(b"E"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"EHLO client.example\r\n"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"\x16\x03\x01"), Err(ProxyError::NotProxy)); // a TLS ClientHello
        assert_eq!(parse(b"P"), Ok(None));
        assert_eq!(parse(b"PROX"), Ok(None));
        assert_eq!(parse(b"POST / HTTP/1.1\r\n"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"PROXYTCP4"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"\r"), Ok(None));
        assert_eq!(parse(b"\r\n\r\n\0"), Ok(None));
        assert_eq!(parse(b"\r\n\r\n\x01"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"\r\nQUIT\r\n"), Err(ProxyError::NotProxy));
        assert!(may_be_header(b""));
        assert!(may_be_header(b"PRO"));
        assert!(may_be_header(b"\r\n\r"));
        assert!(!may_be_header(b"H"));
        assert!(!may_be_header(b"PROXX"));
        assert!(may_be_header(b"PROXY TCP4 garbage that parse will refuse"));
    }

    #[test]
    fn v2_proxy_inet() {
        let h = v2(
            0x21,
            0x11,
            &v2_inet([192, 0, 2, 1], [198, 51, 100, 2], 56324, 25),
            &[],
        );
        assert_eq!(h.len(), 28);
        let want = ProxyHeader::Proxied {
            source: sa("192.0.2.1:56324"),
            destination: sa("198.51.100.2:25"),
        };
        assert_eq!(parse(&h), Ok(Some((want, 28))));
        assert_prefixes_wait(&h);
    }

    #[test]
    fn v2_proxy_inet6() {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let mut block = Vec::new();
        block.extend_from_slice(&src.octets());
        block.extend_from_slice(&dst.octets());
        block.extend_from_slice(&1234u16.to_be_bytes());
        block.extend_from_slice(&587u16.to_be_bytes());
        let h = v2(0x21, 0x21, &block, &[]);
        let want = ProxyHeader::Proxied {
            source: sa("[2001:db8::1]:1234"),
            destination: sa("[2001:db8::2]:587"),
        };
        assert_eq!(parse(&h), Ok(Some((want, 52))));
        assert_prefixes_wait(&h);
    }

    #[test]
    fn v2_tlvs_are_skipped_and_counted() {
        // PP2_TYPE_ALPN "smtp" and PP2_TYPE_AUTHORITY "mx.example", then SMTP bytes.
        let mut tlvs = vec![0x01, 0x00, 0x04];
        tlvs.extend_from_slice(b"smtp");
        tlvs.extend_from_slice(&[0x02, 0x00, 0x0a]);
        tlvs.extend_from_slice(b"mx.example");
        let mut h = v2(
            0x21,
            0x11,
            &v2_inet([10, 0, 0, 1], [10, 0, 0, 2], 1, 2),
            &tlvs,
        );
        let header_len = h.len();
        assert_prefixes_wait(&h);
        h.extend_from_slice(b"EHLO x\r\n");
        let (header, consumed) = parse(&h).unwrap().unwrap();
        assert_eq!(consumed, header_len);
        assert_eq!(header.client_address(sa("127.0.0.1:9")), sa("10.0.0.1:1"));
    }

    #[test]
    fn v2_local_ignores_family_and_block() {
        let h = v2(0x20, 0x00, &[], &[]);
        assert_eq!(parse(&h), Ok(Some((ProxyHeader::Local, 16))));
        // LOCAL with an address block (HAProxy's health checks may send one): skipped.
        let h = v2(0x20, 0x11, &v2_inet([1, 2, 3, 4], [5, 6, 7, 8], 9, 10), &[]);
        assert_eq!(parse(&h), Ok(Some((ProxyHeader::Local, 28))));
        // LOCAL with a family but no block: still fine, the family is ignored.
        let h = v2(0x20, 0x21, &[], &[]);
        assert_eq!(parse(&h), Ok(Some((ProxyHeader::Local, 16))));
        let real = sa("127.0.0.1:4000");
        assert_eq!(ProxyHeader::Local.client_address(real), real);
        assert_eq!(ProxyHeader::Local.local_address(real), real);
    }

    #[test]
    fn v2_unspec_and_uncarried_families_fall_back_to_unknown() {
        assert_eq!(
            parse(&v2(0x21, 0x00, &[], &[])),
            Ok(Some((ProxyHeader::Unknown, 16)))
        );
        // UNSPEC with bytes anyway: skipped.
        assert_eq!(
            parse(&v2(0x21, 0x00, &[1, 2, 3], &[])),
            Ok(Some((ProxyHeader::Unknown, 19)))
        );
        let inet_dgram = v2(0x21, 0x12, &v2_inet([1, 2, 3, 4], [5, 6, 7, 8], 9, 10), &[]);
        assert_eq!(parse(&inet_dgram), Ok(Some((ProxyHeader::Unknown, 28))));
        let unix = v2(0x21, 0x31, &[0u8; 216], &[]);
        assert_eq!(parse(&unix), Ok(Some((ProxyHeader::Unknown, 232))));
        assert_eq!(
            parse(&v2(0x21, 0x32, &[0u8; 216], &[])),
            Ok(Some((ProxyHeader::Unknown, 232)))
        );
        assert_eq!(
            parse(&v2(0x21, 0x22, &[0u8; 36], &[])),
            Ok(Some((ProxyHeader::Unknown, 52)))
        );
        let real = sa("[::1]:25");
        assert_eq!(ProxyHeader::Unknown.client_address(real), real);
    }

    #[test]
    fn v2_bad_version_command_family_fail_at_that_octet() {
        let mut sig = V2_SIGNATURE.to_vec();
        sig.push(0x11); // version 1
        assert_eq!(parse(&sig), Err(ProxyError::V2Version(1)));
        sig[12] = 0x31;
        assert_eq!(parse(&sig), Err(ProxyError::V2Version(3)));
        sig[12] = 0x01;
        assert_eq!(parse(&sig), Err(ProxyError::V2Version(0)));
        sig[12] = 0x22; // command 2
        assert_eq!(parse(&sig), Err(ProxyError::V2Command(2)));
        sig[12] = 0x2f;
        assert_eq!(parse(&sig), Err(ProxyError::V2Command(15)));
        sig[12] = 0x21;
        assert_eq!(parse(&sig), Ok(None));
        for bad in [0x01u8, 0x10, 0x13, 0x23, 0x33, 0x41, 0xff, 0x02] {
            let mut h = sig.clone();
            h.push(bad);
            assert_eq!(
                parse(&h),
                Err(ProxyError::V2Family(bad)),
                "family 0x{bad:02x}"
            );
        }
    }

    #[test]
    fn v2_length_shorter_than_address_block() {
        let h = v2(0x21, 0x11, &[0u8; 11], &[]);
        assert_eq!(
            parse(&h),
            Err(ProxyError::V2TooShort {
                family: 0x11,
                length: 11
            })
        );
        // Known from the fixed part alone, before the block arrives.
        assert_eq!(
            parse(&h[..16]),
            Err(ProxyError::V2TooShort {
                family: 0x11,
                length: 11
            })
        );
        let h = v2(0x21, 0x21, &[0u8; 35], &[]);
        assert!(matches!(
            parse(&h),
            Err(ProxyError::V2TooShort {
                family: 0x21,
                length: 35
            })
        ));
        let h = v2(0x21, 0x31, &[0u8; 215], &[]);
        assert!(matches!(parse(&h), Err(ProxyError::V2TooShort { .. })));
        let h = v2(0x21, 0x11, &[], &[]);
        assert!(matches!(
            parse(&h),
            Err(ProxyError::V2TooShort { length: 0, .. })
        ));
    }

    #[test]
    fn v2_overlong_is_refused_from_the_length_field() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(
            parse(&h),
            Err(ProxyError::V2TooLong {
                length: 16 + 65535,
                max: V2_DEFAULT_MAX_LEN
            })
        );
        // The largest accepted, and one past it.
        let ok = v2(0x21, 0x11, &[0u8; 12], &vec![0u8; V2_DEFAULT_MAX_LEN - 28]);
        assert_eq!(ok.len(), V2_DEFAULT_MAX_LEN);
        assert!(matches!(parse(&ok), Ok(Some((_, n))) if n == V2_DEFAULT_MAX_LEN));
        let over = v2(0x21, 0x11, &[0u8; 12], &vec![0u8; V2_DEFAULT_MAX_LEN - 27]);
        assert!(matches!(parse(&over), Err(ProxyError::V2TooLong { .. })));
        // Another cap: the format's own limit is then reachable.
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse_with_limit(&h, 16 + 65535), Ok(None));
        assert!(matches!(
            parse_with_limit(&h, 100),
            Err(ProxyError::V2TooLong { max: 100, .. })
        ));
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            ProxyError::V2TooShort {
                family: 0x11,
                length: 3
            }
            .to_string(),
            "PROXY v2 header: length 3 is shorter than the address block of family/transport 0x11"
        );
        assert_eq!(
            ProxyError::NotProxy.to_string(),
            "the connection did not start with a PROXY header"
        );
        assert!(ProxyError::V1Malformed("source port is not 0-65535")
            .to_string()
            .contains("source port"));
    }

    fn arb_socket_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
        prop_oneof![
            (
                any::<[u8; 4]>(),
                any::<[u8; 4]>(),
                any::<u16>(),
                any::<u16>()
            )
                .prop_map(|(a, b, p, q)| (
                    SocketAddr::new(Ipv4Addr::from(a).into(), p),
                    SocketAddr::new(Ipv4Addr::from(b).into(), q)
                )),
            (
                any::<[u8; 16]>(),
                any::<[u8; 16]>(),
                any::<u16>(),
                any::<u16>()
            )
                .prop_map(|(a, b, p, q)| (
                    SocketAddr::new(Ipv6Addr::from(a).into(), p),
                    SocketAddr::new(Ipv6Addr::from(b).into(), q)
                )),
        ]
    }

    fn v1_text(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
        format!(
            "PROXY {proto} {} {} {} {}\r\n",
            src.ip(),
            dst.ip(),
            src.port(),
            dst.port()
        )
        .into_bytes()
    }

    fn v2_bytes(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
        let mut block = Vec::new();
        let family = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                block.extend_from_slice(&s.octets());
                block.extend_from_slice(&d.octets());
                0x11
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                block.extend_from_slice(&s.octets());
                block.extend_from_slice(&d.octets());
                0x21
            }
            _ => unreachable!("pairs are of one family"),
        };
        block.extend_from_slice(&src.port().to_be_bytes());
        block.extend_from_slice(&dst.port().to_be_bytes());
        v2(0x21, family, &block, tlvs)
    }

    proptest! {
        /// Any bytes at all: an answer, never a panic; a complete answer never claims more
        /// than it was given.
        #[test]
        fn garbage_never_panics(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, n))) = parse(&input) {
                prop_assert!(n <= input.len());
            }
        }

        /// Garbage behind a valid prefix (the likeliest hostile shape): still no panic.
        #[test]
        fn garbage_after_a_valid_start_never_panics(
            v2_start in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut input = if v2_start { V2_SIGNATURE.to_vec() } else { V1_PREFIX.to_vec() };
            input.extend_from_slice(&tail);
            if let Ok(Some((_, n))) = parse(&input) {
                prop_assert!(n <= input.len());
            }
        }

        /// Headers written from random addresses read back to those addresses, byte by
        /// byte, whatever SMTP bytes follow.
        #[test]
        fn round_trip(
            (src, dst) in arb_socket_pair(),
            version2 in any::<bool>(),
            tlvs in proptest::collection::vec(any::<u8>(), 0..64),
            after in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let header = if version2 { v2_bytes(src, dst, &tlvs) } else { v1_text(src, dst) };
            for cut in 0..header.len() {
                prop_assert_eq!(parse(&header[..cut]), Ok(None));
            }
            let mut input = header.clone();
            input.extend_from_slice(&after);
            let want = ProxyHeader::Proxied { source: src, destination: dst };
            prop_assert_eq!(parse(&input), Ok(Some((want, header.len()))));
        }
    }
}
