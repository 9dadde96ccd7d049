//! Message generation and identity: the `X-Loadgen-Id` / `X-Loadgen-Checksum` headers, the
//! CRC-32C body checksum, message sizes, and building a message's wire form (CRLF lines,
//! dot-stuffed, terminated by `.`) into a reused buffer.

use std::fmt;

/// Header carrying `<run>-<seq>`; the sink looks for it anywhere in the header block.
pub const ID_HEADER: &str = "X-Loadgen-Id";
/// Header carrying the CRC-32C of the body, as 8 lowercase hex digits.
pub const CHECKSUM_HEADER: &str = "X-Loadgen-Checksum";

/// A message identity: the run that generated it plus its sequence number in that run.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct MsgId {
    pub run: u64,
    pub seq: u64,
}

impl MsgId {
    /// Parses `<1-16 hex digits>-<decimal>`, ignoring surrounding whitespace.
    pub fn parse(s: &[u8]) -> Option<MsgId> {
        let s = s.trim_ascii();
        let dash = memchr::memchr(b'-', s)?;
        let (run, seq) = (&s[..dash], &s[dash + 1..]);
        if run.is_empty() || run.len() > 16 || seq.is_empty() || seq.len() > 19 {
            return None;
        }
        let mut r = 0u64;
        for &c in run {
            r = (r << 4) | u64::from(hex_val(c)?);
        }
        let mut q = 0u64;
        for &c in seq {
            if !c.is_ascii_digit() {
                return None;
            }
            q = q.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        }
        Some(MsgId { run: r, seq: q })
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{}", self.run, self.seq)
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Parses the checksum header value: exactly 8 hex digits.
pub fn parse_checksum(v: &[u8]) -> Option<u32> {
    let v = v.trim_ascii();
    if v.len() != 8 {
        return None;
    }
    let mut r = 0u32;
    for &c in v {
        r = (r << 4) | u32::from(hex_val(c)?);
    }
    Some(r)
}

/// Appends the decimal form of `n` without going through `fmt` (hot path).
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

fn push_hex32(out: &mut [u8], v: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in out.iter_mut().enumerate().take(8) {
        *b = HEX[((v >> (28 - 4 * i)) & 0xf) as usize];
    }
}

/// Parses a byte count such as `1024`, `1k`, `64K`, `2m` (k = 1024, m = 1024²).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let lower = lower.strip_suffix('b').unwrap_or(&lower);
    let (num, mult) = if let Some(n) = lower.strip_suffix('k') {
        (n, 1024)
    } else if let Some(n) = lower.strip_suffix('m') {
        (n, 1024 * 1024)
    } else {
        (lower, 1)
    };
    let n: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size '{s}' (expected e.g. 1024, 1k, 2m)"))?;
    n.checked_mul(mult)
        .filter(|&v| v <= 1 << 30)
        .ok_or_else(|| format!("size '{s}' is too large (max 1 GiB)"))
}

/// Message size: fixed (`1k`) or uniformly drawn from a range (`1k-100k`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeRange {
    pub min: usize,
    pub max: usize,
}

impl SizeRange {
    pub fn parse(s: &str) -> Result<SizeRange, String> {
        let r = match s.split_once('-') {
            Some((a, b)) => SizeRange {
                min: parse_bytes(a)?,
                max: parse_bytes(b)?,
            },
            None => {
                let v = parse_bytes(s)?;
                SizeRange { min: v, max: v }
            }
        };
        if r.min > r.max {
            return Err(format!("invalid size range '{s}' (min > max)"));
        }
        if r.min == 0 {
            return Err(format!("invalid size '{s}' (must be at least 1 byte)"));
        }
        Ok(r)
    }
}

/// Everything about a message that is fixed for the whole run.
#[derive(Clone, Debug)]
pub struct MessageSpec {
    pub run: u64,
    pub from: String,
    pub domains: Vec<String>,
    pub rcpts: usize,
    pub size: SizeRange,
    /// RFC 5322 date of the run start; one date for all messages keeps building cheap.
    pub date: String,
}

/// Length of a full body line: 76 characters + CRLF.
const LINE: usize = 78;
/// Printable text the body lines are cut from. It has no '.', so the only lines that start
/// with a dot are the ones deliberately made to exercise dot-stuffing.
const POOL_LEN: usize = 1024;

/// Builds messages into reused buffers. One per connection (it owns a PRNG for sizes).
pub struct MessageBuilder {
    spec: MessageSpec,
    pool: Vec<u8>,
    id_prefix: Vec<u8>,
    rng: fastrand::Rng,
}

/// What a build produced besides the wire bytes.
#[derive(Clone, Copy, Debug)]
pub struct Built {
    /// Size of the message before dot-stuffing (header + blank line + body); the SIZE= value.
    pub size: usize,
    /// The body's CRC-32C, as written into the checksum header.
    #[cfg_attr(not(test), allow(dead_code))]
    pub checksum: u32,
}

impl MessageBuilder {
    pub fn new(spec: MessageSpec, seed: u64) -> MessageBuilder {
        const ALPHA: &[u8] =
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,;:!?-";
        let mut g = fastrand::Rng::with_seed(0x5eed_10ad_9e4e_0001);
        let pool = (0..POOL_LEN + LINE)
            .map(|_| ALPHA[g.usize(..ALPHA.len())])
            .collect();
        let id_prefix = format!("{:016x}-", spec.run).into_bytes();
        MessageBuilder {
            spec,
            pool,
            id_prefix,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    pub fn spec(&self) -> &MessageSpec {
        &self.spec
    }

    /// Domain of recipient `j` (0-based) of message `seq`: recipients are spread round-robin
    /// over the domains so every domain gets its share.
    pub fn rcpt_domain(&self, seq: u64, j: usize) -> &str {
        let d = &self.spec.domains;
        let k = (seq as usize).wrapping_mul(self.spec.rcpts).wrapping_add(j);
        &d[k % d.len()]
    }

    /// Appends `rcpt<j+1>@<domain>` for recipient `j` of message `seq`.
    pub fn push_rcpt(&self, seq: u64, j: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(b"rcpt");
        push_u64(out, j as u64 + 1);
        out.push(b'@');
        out.extend_from_slice(self.rcpt_domain(seq, j).as_bytes());
    }

    fn push_id(&self, seq: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id_prefix);
        push_u64(out, seq);
    }

    /// Writes message `seq` to `out` (cleared first) in wire form: dot-stuffed CRLF lines
    /// followed by the `.` terminator line.
    pub fn build(&mut self, seq: u64, out: &mut Vec<u8>) -> Built {
        out.clear();
        let target = if self.spec.size.min == self.spec.size.max {
            self.spec.size.min
        } else {
            self.rng.usize(self.spec.size.min..=self.spec.size.max)
        };

        out.extend_from_slice(b"From: <");
        out.extend_from_slice(self.spec.from.as_bytes());
        out.extend_from_slice(b">\r\nTo: <");
        self.push_rcpt(seq, 0, out);
        out.extend_from_slice(b">\r\nSubject: loadgen message ");
        self.push_id(seq, out);
        out.extend_from_slice(b"\r\nDate: ");
        out.extend_from_slice(self.spec.date.as_bytes());
        out.extend_from_slice(b"\r\nMessage-ID: <");
        self.push_id(seq, out);
        out.extend_from_slice(b"@loadgen.invalid>\r\n");
        out.extend_from_slice(ID_HEADER.as_bytes());
        out.extend_from_slice(b": ");
        self.push_id(seq, out);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(CHECKSUM_HEADER.as_bytes());
        out.extend_from_slice(b": ");
        let sum_at = out.len();
        out.extend_from_slice(b"00000000\r\n\r\n");
        let header_len = out.len();

        // The body is at least one CRLF so it always ends with a line break.
        let mut left = target.saturating_sub(header_len).max(2);
        let body_len = left;
        let mut crc = 0u32;
        let mut i = 0usize;
        let off0 = (seq as usize).wrapping_mul(131) % POOL_LEN;
        while left > 0 {
            // The first line carries the id so that bodies of equal size still differ;
            // line 47 mod 64 is a lone "." and line 15 mod 16 starts with "." (stuffing tests).
            let want = if i == 0 {
                self.id_prefix.len() + 22
            } else if i % 64 == 47 {
                3
            } else {
                LINE
            };
            // Never leave a single byte: a line needs at least its CRLF.
            let len = if left <= want {
                left
            } else if left - want == 1 {
                want - 1
            } else {
                want
            };
            let text = len - 2;
            let line_start = out.len();
            if text > 0 {
                if i == 0 {
                    self.push_id(seq, out);
                    out.resize(line_start + text, b' ');
                } else if i % 16 == 15 || i % 64 == 47 {
                    out.push(b'.');
                    let o = (off0 + i * 77) % POOL_LEN;
                    out.extend_from_slice(&self.pool[o..o + text - 1]);
                } else {
                    let o = (off0 + i * 77) % POOL_LEN;
                    out.extend_from_slice(&self.pool[o..o + text]);
                }
            }
            out.extend_from_slice(b"\r\n");
            crc = crc32c::crc32c_append(crc, &out[line_start..]);
            if out[line_start] == b'.' {
                out.insert(line_start, b'.');
            }
            left -= len;
            i += 1;
        }
        push_hex32(&mut out[sum_at..sum_at + 8], crc);
        out.extend_from_slice(b".\r\n");
        Built {
            size: header_len + body_len,
            checksum: crc,
        }
    }
}

/// Formats a Unix time as an RFC 5322 date in UTC, e.g. `Sat, 21 Nov 2026 20:40:00 +0000`.
pub fn rfc5322_date(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    // Civil-from-days (proleptic Gregorian), after Howard Hinnant's well-known algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MO: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WD[days.rem_euclid(7) as usize],
        d,
        MO[(m - 1) as usize],
        y,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: SizeRange, rcpts: usize) -> MessageSpec {
        MessageSpec {
            run: 0xabc,
            from: "loadgen@loadgen.test".into(),
            domains: vec!["a.test".into(), "b.test".into()],
            rcpts,
            size,
            date: rfc5322_date(0),
        }
    }

    /// Undoes dot-stuffing and strips the terminator, as a receiver would.
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = wire;
        while !rest.is_empty() {
            let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
            let line = &rest[..end];
            rest = &rest[end..];
            if line == b".\r\n" {
                assert!(rest.is_empty(), "terminator before the end");
                return out;
            }
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        panic!("no terminator");
    }

    #[test]
    fn ids_round_trip() {
        let id = MsgId {
            run: 0xdead_beef,
            seq: 42,
        };
        assert_eq!(id.to_string(), "00000000deadbeef-42");
        assert_eq!(MsgId::parse(id.to_string().as_bytes()), Some(id));
        assert_eq!(
            MsgId::parse(b" 1f-7\r\n"),
            Some(MsgId { run: 0x1f, seq: 7 })
        );
        assert_eq!(MsgId::parse(b"zz-1"), None);
        assert_eq!(MsgId::parse(b"12"), None);
        assert_eq!(MsgId::parse(b"1-"), None);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(
            SizeRange::parse("1k").unwrap(),
            SizeRange {
                min: 1024,
                max: 1024
            }
        );
        assert_eq!(
            SizeRange::parse("1k-100K").unwrap(),
            SizeRange {
                min: 1024,
                max: 102_400
            }
        );
        assert_eq!(SizeRange::parse("500").unwrap().max, 500);
        assert!(SizeRange::parse("10k-1k").is_err());
        assert!(SizeRange::parse("x").is_err());
        assert!(SizeRange::parse("0").is_err());
    }

    #[test]
    fn built_message_is_exact_size_stuffed_and_checksummed() {
        for size in [1, 300, 1024, 1025, 4096, 100_000] {
            let mut b = MessageBuilder::new(
                spec(
                    SizeRange {
                        min: size,
                        max: size,
                    },
                    1,
                ),
                1,
            );
            let mut wire = Vec::new();
            let built = b.build(7, &mut wire);
            let msg = unstuff(&wire);
            assert_eq!(msg.len(), built.size);
            if size > 400 {
                assert_eq!(built.size, size);
            }
            let sep = memchr::memmem::find(&msg, b"\r\n\r\n").unwrap() + 4;
            let body = &msg[sep..];
            assert_eq!(crc32c::crc32c(body), built.checksum);
            let hdr = std::str::from_utf8(&msg[..sep]).unwrap();
            assert!(hdr.contains(&format!("X-Loadgen-Checksum: {:08x}\r\n", built.checksum)));
            assert!(hdr.contains("X-Loadgen-Id: 0000000000000abc-7\r\n"));
            for line in msg.split(|&c| c == b'\n') {
                assert!(line.len() <= 998);
            }
            assert!(body.ends_with(b"\r\n"));
            if size >= 100_000 {
                // Both stuffing cases were exercised.
                assert!(memchr::memmem::find(&wire, b"\r\n..\r\n").is_some());
                assert!(memchr::memmem::find(&wire, b"\r\n..").is_some());
            }
        }
    }

    #[test]
    fn recipients_spread_over_domains() {
        let b = MessageBuilder::new(spec(SizeRange { min: 10, max: 10 }, 3), 1);
        let mut out = Vec::new();
        b.push_rcpt(0, 1, &mut out);
        assert_eq!(out, b"rcpt2@b.test");
        assert_eq!(b.rcpt_domain(1, 0), "b.test");
    }

    #[test]
    fn dates_format() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_293_600),
            "Sat, 21 Nov 2026 20:40:00 +0000"
        );
    }
}
