//! The SMTP DATA phase scanner (sans-IO).
//!
//! This file owns everything that happens to message bytes between the server's `354` reply and
//! the end-of-data terminator: finding the terminator `CRLF . CRLF` (RFC 5321 §4.1.1.4) in input
//! that arrives in arbitrary chunks, removing dot-stuffing (RFC 5321 §4.5.2), detecting bare CR
//! and bare LF (the SMTP smuggling fix for CVE-2023-51764) and enforcing the message size limit
//! with bounded memory; and the same checks for BDAT chunks ([`ChunkScanner`], RFC 3030). It
//! performs no I/O, reads no clock and never panics on any input.
//!
//! Only a genuine `CR LF . CR LF` ends a message (the first CRLF may also be the implicit line
//! start at the beginning of the DATA phase). Look-alikes such as `LF . LF`, `LF . CR LF`,
//! `CR . CR`, `CR LF . LF` or `CR LF . CR x` never end the message; they mark it as containing a
//! bare line ending (so it must be rejected) and scanning continues to the real terminator.

use bytes::BytesMut;

/// How a message ended. Returned once, when the terminator has been consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOutcome {
    /// Unstuffed message size in bytes, counted even past the limit (saturating).
    pub size: u64,
    /// The message exceeded `max_size`; the body holds only a truncated prefix.
    pub too_large: bool,
    /// A bare CR or bare LF was seen; the message must be rejected.
    pub bare_line_ending: bool,
}

/// Where the scanner is, relative to line structure, between two input bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside a line; the previous byte was not a CR.
    Text,
    /// The previous byte was a CR (already part of the body); an LF must follow.
    Cr,
    /// At the start of a line that began after a genuine CRLF (or at the start of DATA).
    LineStart,
    /// Saw `.` at a line start. The dot is never part of the body.
    Dot,
    /// Saw `.` CR at a line start. The CR is held back: it is either part of the terminator
    /// (if LF follows) or a bare CR of the body.
    DotCr,
    /// The terminator has been consumed.
    Done,
}

/// Incremental DATA-phase scanner. Create one per message (or `reset` it).
///
/// Feed it the client's bytes with [`DataScanner::scan`] as they arrive, split anywhere.
/// After the terminator has been consumed, further calls consume nothing and return the same
/// outcome again until [`DataScanner::reset`] is called.
#[derive(Debug)]
pub struct DataScanner {
    max_size: usize,
    state: State,
    /// Unstuffed message bytes seen so far (including those dropped past the limit).
    size: u64,
    /// Bytes this scanner has appended to the caller's body (never more than `max_size`).
    stored: usize,
    bare_line_ending: bool,
    /// Bytes are still appended to the body (see [`DataScanner::stop_storing`]).
    storing: bool,
}

impl DataScanner {
    /// A scanner at the start of the DATA phase for messages of at most `max_size` bytes.
    pub fn new(max_size: usize) -> Self {
        Self {
            max_size,
            state: State::LineStart,
            size: 0,
            stored: 0,
            bare_line_ending: false,
            storing: true,
        }
    }

    /// Appends nothing more to the body for the rest of this message, but keeps scanning to
    /// its terminator (the caller refuses the message when it ends, e.g. for lack of memory).
    pub fn stop_storing(&mut self) {
        self.storing = false;
    }

    /// Room left for body bytes: up to the limit while storing, none after `stop_storing`.
    fn room(&self) -> usize {
        if self.storing {
            self.max_size - self.stored
        } else {
            0
        }
    }

    /// Back to the start of a new DATA phase (same limit).
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// Scans `input`, appending unstuffed message bytes to `body`. Returns how many bytes of
    /// `input` were consumed and, once the terminator has been consumed, the outcome. When the
    /// terminator is found, the bytes after it are NOT consumed (they are the next commands).
    /// Otherwise all of `input` is consumed (the scanner keeps any partial CR / dot state).
    pub fn scan(&mut self, input: &[u8], body: &mut BytesMut) -> (usize, Option<DataOutcome>) {
        if self.state == State::Done {
            return (0, Some(self.outcome()));
        }
        // At most `input.len()` bytes can be appended by this call, and never past the limit.
        let want = input.len().min(self.room());
        if body.capacity() - body.len() < want {
            body.reserve(want);
        }

        let n = input.len();
        // Next byte to examine.
        let mut i = 0;
        // `input[run..i]` are body bytes that have not been appended yet: runs are appended in
        // one `extend_from_slice` each, and only split where a stuffing dot is dropped.
        let mut run = 0;
        while i < n {
            match self.state {
                State::Text => {
                    let Some(off) = memchr::memchr2(b'\r', b'\n', &input[i..]) else {
                        i = n;
                        break;
                    };
                    let p = i + off;
                    if input[p] == b'\n' {
                        // An LF not preceded by a CR.
                        self.bare_line_ending = true;
                        i = p + 1;
                    } else if input.get(p + 1) == Some(&b'\n') {
                        // CRLF: the common case, handled without a trip through `Cr`.
                        i = p + 2;
                        if input.get(i).is_none_or(|&b| b == b'.') {
                            self.state = State::LineStart;
                        }
                    } else {
                        i = p + 1;
                        self.state = State::Cr;
                    }
                }
                State::Cr => {
                    if input[i] == b'\n' {
                        i += 1;
                        self.state = State::LineStart;
                    } else {
                        // The previous CR was bare; re-examine this byte as text.
                        self.bare_line_ending = true;
                        self.state = State::Text;
                    }
                }
                State::LineStart => {
                    if input[i] == b'.' {
                        self.append(body, &input[run..i]);
                        i += 1;
                        run = i;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Dot => {
                    if input[i] == b'\r' {
                        // Hold the CR back until we know whether an LF follows.
                        i += 1;
                        run = i;
                        self.state = State::DotCr;
                    } else {
                        // A dot-stuffed line: the dot is gone, the byte is ordinary text (an LF
                        // here is bare).
                        self.state = State::Text;
                    }
                }
                State::DotCr => {
                    if input[i] == b'\n' {
                        // `run == i` here: nothing of this call is pending.
                        self.state = State::Done;
                        return (i + 1, Some(self.outcome()));
                    }
                    // `.` CR x at a line start: the dot was stuffing, the CR is bare.
                    self.append(body, b"\r");
                    self.bare_line_ending = true;
                    self.state = State::Text;
                }
                State::Done => break,
            }
        }
        self.append(body, &input[run..i]);
        (n, None)
    }

    /// Counts `bytes` as message bytes and appends what still fits under the limit.
    fn append(&mut self, body: &mut BytesMut, bytes: &[u8]) {
        self.size = self.size.saturating_add(bytes.len() as u64);
        let take = bytes.len().min(self.room());
        if take > 0 {
            body.extend_from_slice(&bytes[..take]);
            self.stored += take;
        }
    }

    fn outcome(&self) -> DataOutcome {
        DataOutcome {
            size: self.size,
            too_large: self.size > self.max_size as u64,
            bare_line_ending: self.bare_line_ending,
        }
    }
}

/// The content of BDAT chunks (RFC 3030): exact byte counts, so no terminator search and
/// no dot-stuffing, but the same size limit, bounded memory and bare CR / bare LF check as
/// DATA. Without BINARYMIME (which we do not offer) the content is 7bit or 8bitMIME text
/// whose lines end in CRLF; a bare LF or CR in it is refused like in DATA, because the
/// relay sends it on with DATA, where a next hop could read a bare line ending as part of
/// an end of data (SMTP smuggling). A CRLF may be split across chunks.
#[derive(Debug)]
pub struct ChunkScanner {
    max_size: usize,
    size: u64,
    stored: usize,
    /// The last byte taken was a CR (an LF must come next, perhaps in the next chunk).
    cr_pending: bool,
    bare_line_ending: bool,
    storing: bool,
}

impl ChunkScanner {
    /// A scanner at the start of a message of at most `max_size` bytes.
    pub fn new(max_size: usize) -> Self {
        Self {
            max_size,
            size: 0,
            stored: 0,
            cr_pending: false,
            bare_line_ending: false,
            storing: true,
        }
    }

    /// Back to the start of a new message (same limit).
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// Appends nothing more to the body for the rest of this message (see
    /// [`DataScanner::stop_storing`]).
    pub fn stop_storing(&mut self) {
        self.storing = false;
    }

    /// Takes `input`, all of it message content: counts it, checks its line endings and
    /// appends what still fits under the limit to `body`.
    pub fn take(&mut self, input: &[u8], body: &mut BytesMut) {
        if input.is_empty() {
            return;
        }
        if self.cr_pending && input[0] != b'\n' {
            self.bare_line_ending = true;
        }
        for p in memchr::memchr2_iter(b'\r', b'\n', input) {
            let genuine = if input[p] == b'\n' {
                match p.checked_sub(1) {
                    Some(before) => input[before] == b'\r',
                    None => self.cr_pending,
                }
            } else {
                // A CR at the very end is decided by the next chunk (or the end).
                input.get(p + 1).is_none_or(|&b| b == b'\n')
            };
            if !genuine {
                self.bare_line_ending = true;
            }
        }
        self.cr_pending = input.last() == Some(&b'\r');
        self.size = self.size.saturating_add(input.len() as u64);
        let room = if self.storing {
            self.max_size - self.stored
        } else {
            0
        };
        let take = input.len().min(room);
        if take > 0 {
            body.extend_from_slice(&input[..take]);
            self.stored += take;
        }
    }

    /// The message so far is over the size limit.
    pub fn too_large(&self) -> bool {
        self.size > self.max_size as u64
    }

    /// A bare CR or LF was seen so far (a CR at the very end is not yet counted).
    pub fn bare_line_ending(&self) -> bool {
        self.bare_line_ending
    }

    /// The outcome once the last chunk has been taken: a CR at the very end is bare.
    pub fn finish(&self) -> DataOutcome {
        DataOutcome {
            size: self.size,
            too_large: self.too_large(),
            bare_line_ending: self.bare_line_ending || self.cr_pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Everything a scan produced: bytes consumed, outcome and body.
    type Scanned = (usize, Option<DataOutcome>, Vec<u8>);

    /// Feeds `input` in pieces ending at each of `cuts` (then the rest), stopping at the
    /// outcome. Checks that every call before the outcome consumed its whole piece.
    fn feed_split(input: &[u8], cuts: &[usize], max: usize) -> Scanned {
        let mut scanner = DataScanner::new(max);
        let mut body = BytesMut::new();
        let mut consumed = 0;
        let mut start = 0;
        for end in cuts.iter().copied().chain([input.len()]) {
            let end = end.clamp(start, input.len());
            let (used, outcome) = scanner.scan(&input[start..end], &mut body);
            consumed += used;
            if outcome.is_some() {
                assert!(used <= end - start);
                // Further calls consume nothing and repeat the outcome.
                assert_eq!(scanner.scan(&input[consumed..], &mut body), (0, outcome));
                return (consumed, outcome, body.to_vec());
            }
            assert_eq!(used, end - start, "a call without outcome must consume all");
            start = end;
        }
        (consumed, None, body.to_vec())
    }

    fn feed(input: &[u8], max: usize) -> Scanned {
        feed_split(input, &[], max)
    }

    fn feed_bytewise(input: &[u8], max: usize) -> Scanned {
        let cuts: Vec<usize> = (1..input.len()).collect();
        feed_split(input, &cuts, max)
    }

    /// A deliberately naive byte-at-a-time restatement of the rules, on the whole input.
    fn reference(input: &[u8], max: usize) -> Scanned {
        let mut out = Vec::new();
        let mut bare = false;
        let mut line_start = true;
        let mut prev_cr = false;
        let mut i = 0;
        let end = loop {
            if i >= input.len() {
                break None;
            }
            if line_start && input[i] == b'.' {
                let rest = &input[i + 1..];
                if rest.starts_with(b"\r\n") {
                    break Some(i + 3);
                }
                if rest.is_empty() || rest == b"\r" {
                    // Undecided: dot (and CR) held back.
                    i = input.len();
                    continue;
                }
                i += 1;
                line_start = false;
                prev_cr = false;
                continue;
            }
            let b = input[i];
            if (b == b'\n' && !prev_cr) || (prev_cr && b != b'\n') {
                bare = true;
            }
            out.push(b);
            line_start = prev_cr && b == b'\n';
            prev_cr = b == b'\r';
            i += 1;
        };
        let size = out.len();
        out.truncate(max);
        match end {
            Some(consumed) => (
                consumed,
                Some(DataOutcome {
                    size: size as u64,
                    too_large: size > max,
                    bare_line_ending: bare,
                }),
                out,
            ),
            None => (input.len(), None, out),
        }
    }

    fn ok(size: usize) -> Option<DataOutcome> {
        Some(DataOutcome {
            size: size as u64,
            too_large: false,
            bare_line_ending: false,
        })
    }

    const MSG: &[u8] = b"Subject: x\r\n\r\n..dot\r\nline\r\n.\r\nMAIL FROM:<a@b>\r\n";

    #[test]
    fn terminator_split_at_every_position() {
        let end = MSG.len() - b"MAIL FROM:<a@b>\r\n".len();
        let body = b"Subject: x\r\n\r\n.dot\r\nline\r\n".to_vec();
        let expected = (end, ok(body.len()), body);
        assert_eq!(feed(MSG, 1000), expected);
        assert_eq!(feed_bytewise(MSG, 1000), expected);
        for cut in 0..=MSG.len() {
            assert_eq!(feed_split(MSG, &[cut], 1000), expected, "cut at {cut}");
        }
        for a in 0..=MSG.len() {
            for b in a..=MSG.len() {
                assert_eq!(feed_split(MSG, &[a, b], 1000), expected, "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn next_commands_are_not_consumed() {
        let mut scanner = DataScanner::new(100);
        let mut body = BytesMut::new();
        assert_eq!(scanner.scan(b"hi\r", &mut body), (3, None));
        assert_eq!(scanner.scan(b"\n.", &mut body), (2, None));
        let (used, outcome) = scanner.scan(b"\r\nQUIT\r\n", &mut body);
        assert_eq!((used, outcome), (2, ok(4)));
        assert_eq!(&body[..], b"hi\r\n");
    }

    #[test]
    fn reset_starts_a_new_message() {
        let mut scanner = DataScanner::new(100);
        let mut body = BytesMut::new();
        assert_eq!(scanner.scan(b"a\nb\r\n.\r\n", &mut body).0, 8);
        scanner.reset();
        body.clear();
        assert_eq!(scanner.scan(b".\r\nx", &mut body), (3, ok(0)));
        assert!(body.is_empty());
    }

    #[test]
    fn dot_unstuffing() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"..\r\n.\r\n", b".\r\n"),
            (b"...\r\n.\r\n", b"..\r\n"),
            (b"..x\r\n.\r\n", b".x\r\n"),
            (b".x\r\n.\r\n", b"x\r\n"),
            (b"a\r\n.x\r\n..\r\n...y\r\n.\r\n", b"a\r\nx\r\n.\r\n..y\r\n"),
            (b"a.b\r\n.\r\n", b"a.b\r\n"),
            (b"a\r\n.\r\r\n.\r\n", b"a\r\n\r\r\n"),
        ];
        for &(input, body) in cases {
            let expected_bare = input.windows(3).any(|w| w == b".\r\r");
            let got = feed(input, 1000);
            assert_eq!(got.0, input.len());
            assert_eq!(got.2, body, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(got.1.map(|o| o.bare_line_ending), Some(expected_bare));
            assert_eq!(feed_bytewise(input, 1000), got);
            for cut in 0..=input.len() {
                assert_eq!(feed_split(input, &[cut], 1000), got);
            }
        }
    }

    #[test]
    fn empty_message() {
        assert_eq!(feed(b".\r\n", 10), (3, ok(0), Vec::new()));
        assert_eq!(feed(b".\r\nDATA\r\n", 0), (3, ok(0), Vec::new()));
        assert_eq!(feed_bytewise(b".\r\n", 10), (3, ok(0), Vec::new()));
    }

    #[test]
    fn only_crlfs() {
        let input = b"\r\n\r\n\r\n.\r\n";
        assert_eq!(feed(input, 10), (9, ok(6), b"\r\n\r\n\r\n".to_vec()));
        assert_eq!(feed_bytewise(input, 10), feed(input, 10));
    }

    #[test]
    fn no_terminator_without_preceding_crlf() {
        // `x.\r\n` is not a terminator: the dot is not at a line start.
        let (used, outcome, body) = feed(b"x.\r\n", 10);
        assert_eq!((used, outcome), (4, None));
        assert_eq!(body, b"x.\r\n");
        let (used, outcome, _) = feed(b"x.\r\n.\r\n", 10);
        assert_eq!((used, outcome), (7, ok(4)));
    }

    #[test]
    fn very_long_lines() {
        let mut input = vec![b'a'; 3_000_000];
        input.extend_from_slice(b"\r\n");
        input.extend(std::iter::repeat_n(b'.', 100_000));
        input.extend_from_slice(b"\r\n.\r\n");
        let (used, outcome, body) = feed(&input, 4_000_000);
        assert_eq!(used, input.len());
        assert_eq!(outcome, ok(input.len() - 4));
        assert_eq!(body.len(), input.len() - 4);
        assert_eq!(&body[3_000_002..3_000_004], b"..");
        let cuts: Vec<usize> = (0..input.len()).step_by(4093).collect();
        assert_eq!(feed_split(&input, &cuts, 4_000_000), (used, outcome, body));
    }

    #[test]
    fn bare_lf_and_cr_anywhere() {
        let inputs: &[&[u8]] = &[
            b"\nabc\r\n.\r\n",
            b"\rabc\r\n.\r\n",
            b"ab\ncd\r\n.\r\n",
            b"ab\rcd\r\n.\r\n",
            b"abc\n\r\n.\r\n",
            b"abc\r\r\n.\r\n",
            b"abc\r\n\n.\r\n.\r\n",
            b"\r\r\n.\r\n",
            b"\n.\r\n.\r\n",
            b"x\n.\r\n.\r\n",
        ];
        for &input in inputs {
            let expected = (input.len(), input.len() - 3);
            let check = |got: Scanned| {
                let Some(outcome) = got.1 else {
                    panic!("no outcome for {input:?}");
                };
                assert!(outcome.bare_line_ending, "{input:?}");
                assert!(!outcome.too_large);
                assert_eq!((got.0, got.2.len()), expected, "{input:?}");
            };
            check(feed(input, 100));
            check(feed_bytewise(input, 100));
            for cut in 0..=input.len() {
                check(feed_split(input, &[cut], 100));
            }
        }
    }

    #[test]
    fn smuggling_lookalikes_do_not_terminate() {
        let smuggled: &[u8] = b"MAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nsmuggled\r\n";
        let lookalikes: &[&[u8]] = &[
            b"\n.\n",
            b"\n.\r\n",
            b"\r.\r",
            b"\r\n.\n",
            b"\r\n.\rX",
            b"\r\n.\r\r",
            b"\r\n.\r.",
        ];
        for &fake in lookalikes {
            let mut input = b"Subject: hi\r\n\r\nbody".to_vec();
            input.extend_from_slice(fake);
            input.extend_from_slice(smuggled);
            input.extend_from_slice(b"\r\n.\r\n");
            let real_end = input.len();
            input.extend_from_slice(b"QUIT\r\n");
            let name = String::from_utf8_lossy(fake).escape_debug().to_string();

            let whole = feed(&input, 10_000);
            let outcome = whole.1.expect("outcome");
            assert_eq!(whole.0, real_end, "{name}");
            assert!(outcome.bare_line_ending, "{name}");
            assert!(!outcome.too_large, "{name}");
            assert_eq!(whole, reference(&input, 10_000), "{name}");
            let found = String::from_utf8_lossy(&whole.2).into_owned();
            assert!(
                found.contains("RCPT TO:<z@w>\r\nDATA\r\nsmuggled\r\n"),
                "{name}"
            );

            // Byte by byte: no call before the real terminator produces an outcome.
            let mut scanner = DataScanner::new(10_000);
            let mut body = BytesMut::new();
            for (pos, byte) in input.iter().enumerate() {
                let (used, outcome) = scanner.scan(std::slice::from_ref(byte), &mut body);
                assert_eq!(used, 1);
                if pos + 1 < real_end {
                    assert_eq!(outcome, None, "{name}: ended early at {pos}");
                } else {
                    assert_eq!(outcome, Some(outcome_of(&whole)), "{name}");
                    break;
                }
            }
            for cut in 0..=input.len() {
                assert_eq!(feed_split(&input, &[cut], 10_000), whole, "{name} {cut}");
            }
        }
    }

    fn outcome_of(scanned: &Scanned) -> DataOutcome {
        scanned.1.expect("outcome")
    }

    #[test]
    fn size_limit() {
        let input = b"0123456789\r\n.\r\n";
        // Exactly at the limit.
        assert_eq!(feed(input, 12), (15, ok(12), b"0123456789\r\n".to_vec()));
        // One over.
        let (used, outcome, body) = feed(input, 11);
        assert_eq!(used, 15);
        assert_eq!(
            outcome,
            Some(DataOutcome {
                size: 12,
                too_large: true,
                bare_line_ending: false
            })
        );
        assert_eq!(body, b"0123456789\r");
        assert_eq!(feed_bytewise(input, 11), (used, outcome, body));
        // Stuffing dots do not count.
        assert_eq!(feed(b"..\r\n.\r\n", 3), (7, ok(3), b".\r\n".to_vec()));
        // A zero limit.
        let (_, outcome, body) = feed(b"a\r\n.\r\n", 0);
        assert!(outcome.expect("outcome").too_large);
        assert!(body.is_empty());
    }

    #[test]
    fn huge_message_keeps_memory_bounded() {
        let line = [b'x'; 1022];
        let mut scanner = DataScanner::new(1024);
        let mut body = BytesMut::new();
        let mut chunk = Vec::new();
        for _ in 0..64 {
            chunk.extend_from_slice(&line);
            chunk.extend_from_slice(b"\r\n");
        }
        // 160 chunks of 64 KiB: 10 MiB.
        for _ in 0..160 {
            assert_eq!(scanner.scan(&chunk, &mut body), (chunk.len(), None));
            assert!(body.len() <= 1024);
            assert!(body.capacity() <= 2048, "capacity {}", body.capacity());
        }
        let (used, outcome) = scanner.scan(b".\r\n", &mut body);
        assert_eq!(used, 3);
        let outcome = outcome.expect("outcome");
        assert!(outcome.too_large);
        assert_eq!(outcome.size, 160 * 64 * 1024);
        assert_eq!(body.len(), 1024);
    }

    #[test]
    fn reference_agrees_on_fixed_cases() {
        for input in [
            MSG,
            b".\r\n",
            b"a\r\n..\r\n.\r\n",
            b"\n.\n\r\n.\r\n",
            b"a\r",
            b"a\r\n.",
            b"a\r\n.\r",
        ] {
            assert_eq!(feed(input, 8), reference(input, 8), "{input:?}");
            assert_eq!(feed_bytewise(input, 8), reference(input, 8), "{input:?}");
        }
    }

    /// Bytes rich in line endings and dots, sometimes with whole terminators.
    fn spicy_bytes() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            4 => Just(b"\r".to_vec()),
            4 => Just(b"\n".to_vec()),
            6 => Just(b"\r\n".to_vec()),
            6 => Just(b".".to_vec()),
            2 => Just(b"\r\n.\r\n".to_vec()),
            2 => Just(b"\r\n..".to_vec()),
            3 => proptest::collection::vec(b'a'..=b'z', 1..20),
            2 => any::<u8>().prop_map(|b| vec![b]),
        ];
        proptest::collection::vec(piece, 0..60).prop_map(|v| v.concat())
    }

    fn cuts_for(len: usize, raw: &[usize]) -> Vec<usize> {
        let mut cuts: Vec<usize> = raw.iter().map(|c| c % (len + 1)).collect();
        cuts.sort_unstable();
        cuts
    }

    /// Feeds `input` in pieces ending at `cuts`, draining the body after every piece the
    /// way a streaming session hands its pieces to a sink; returns the pieces joined.
    fn feed_streaming(input: &[u8], cuts: &[usize], max: usize) -> Scanned {
        let mut scanner = DataScanner::new(max);
        let mut body = BytesMut::new();
        let mut streamed = Vec::new();
        let mut consumed = 0;
        let mut start = 0;
        for end in cuts.iter().copied().chain([input.len()]) {
            let end = end.clamp(start, input.len());
            let (used, outcome) = scanner.scan(&input[start..end], &mut body);
            consumed += used;
            streamed.extend_from_slice(&body.split().freeze());
            if outcome.is_some() {
                return (consumed, outcome, streamed);
            }
            start = end;
        }
        (consumed, None, streamed)
    }

    #[test]
    fn streamed_pieces_join_to_the_same_message_at_every_boundary() {
        // Every look-alike of the terminator, and dot-stuffing, around every cut.
        let wire: &[u8] = b"a\r\n..b\r\n.\r\r\nx\r\n.c\r\n\r\n..\r\n.\r\nNEXT";
        let whole = feed(wire, 1000);
        assert_eq!(whole.2, b"a\r\n.b\r\n\r\r\nx\r\nc\r\n\r\n.\r\n");
        assert!(
            whole.1.unwrap().bare_line_ending,
            "the CR CR LF has a bare CR"
        );
        for a in 0..=wire.len() {
            for b in a..=wire.len() {
                assert_eq!(feed_streaming(wire, &[a, b], 1000), whole, "cuts {a} {b}");
            }
        }
        // The size limit counts the whole message, not what is still in the buffer.
        let limited = feed(wire, 8);
        assert!(limited.1.unwrap().too_large);
        for a in 0..=wire.len() {
            assert_eq!(feed_streaming(wire, &[a], 8), limited, "cut {a}");
        }
    }

    /// Feeds BDAT content in pieces ending at `cuts`; returns the outcome and the body.
    fn chunks(input: &[u8], cuts: &[usize], max: usize) -> (DataOutcome, Vec<u8>) {
        let mut scanner = ChunkScanner::new(max);
        let mut body = BytesMut::new();
        let mut start = 0;
        for end in cuts.iter().copied().chain([input.len()]) {
            let end = end.clamp(start, input.len());
            scanner.take(&input[start..end], &mut body);
            start = end;
        }
        (scanner.finish(), body.to_vec())
    }

    #[test]
    fn chunk_content_is_taken_verbatim_and_checked_across_chunks() {
        let clean: &[u8] = b"Subject: x\r\n\r\n.dot stays\r\n.\r\nend\r\n";
        for a in 0..=clean.len() {
            for b in a..=clean.len() {
                let (outcome, body) = chunks(clean, &[a, b], 1000);
                assert_eq!(outcome, ok(clean.len()).unwrap(), "cuts {a} {b}");
                assert_eq!(body, clean);
            }
        }
        for bare in [&b"a\nb\r\n"[..], b"a\rb\r\n", b"a\r\n\r", b"\n", b"a\r\r\n"] {
            for a in 0..=bare.len() {
                let (outcome, _) = chunks(bare, &[a], 1000);
                assert!(
                    outcome.bare_line_ending,
                    "{:?} cut at {a}",
                    String::from_utf8_lossy(bare)
                );
            }
        }
        // Over the limit: counted in full, stored only up to it.
        let (outcome, body) = chunks(clean, &[5, 9], 10);
        assert!(outcome.too_large);
        assert_eq!(outcome.size, clean.len() as u64);
        assert_eq!(body, &clean[..10]);
    }

    proptest! {
        #[test]
        fn random_splits_match_whole_and_reference(
            input in spicy_bytes(),
            raw_cuts in proptest::collection::vec(any::<usize>(), 0..12),
            max in 0usize..64,
        ) {
            let whole = feed(&input, max);
            prop_assert_eq!(&whole, &reference(&input, max));
            let cuts = cuts_for(input.len(), &raw_cuts);
            prop_assert_eq!(&feed_split(&input, &cuts, max), &whole);
            prop_assert_eq!(&feed_bytewise(&input, max), &whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            input in proptest::collection::vec(any::<u8>(), 0..512),
            raw_cuts in proptest::collection::vec(any::<usize>(), 0..8),
            max in 0usize..1024,
        ) {
            let whole = feed(&input, max);
            prop_assert_eq!(&whole, &reference(&input, max));
            let cuts = cuts_for(input.len(), &raw_cuts);
            prop_assert_eq!(&feed_split(&input, &cuts, max), &whole);
            // Drained after every piece, as when the message streams to a sink.
            prop_assert_eq!(&feed_streaming(&input, &cuts, max), &whole);
        }

        #[test]
        fn dot_stuffing_round_trips(
            lines in proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![Just(b'.'), Just(b'a'), Just(b' '), 0x21u8..0x7f],
                    0..40,
                ),
                0..30,
            ),
            raw_cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            // A CRLF-only body (no bare CR / LF inside lines).
            let mut original = Vec::new();
            let mut wire = Vec::new();
            for line in &lines {
                if line.first() == Some(&b'.') {
                    wire.push(b'.');
                }
                wire.extend_from_slice(line);
                wire.extend_from_slice(b"\r\n");
                original.extend_from_slice(line);
                original.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b".\r\n");
            let cuts = cuts_for(wire.len(), &raw_cuts);
            let (used, outcome, body) = feed_split(&wire, &cuts, usize::MAX);
            prop_assert_eq!(used, wire.len());
            prop_assert_eq!(outcome, ok(original.len()));
            prop_assert_eq!(body, original);
        }
    }
}
