//! The spool's on-disk records: framing, checksums, encoding and decoding.
//!
//! Every record is `magic (4) | kind (1) | reserved (3) | payload length (4) | crc32c (4)`
//! followed by the payload; the checksum covers kind, length and payload, so a torn or
//! flipped record is recognised and never half used. Integers are little-endian.
//!
//! Kinds:
//! - `Message`: a message as accepted (queue ID, arrival time, reverse path, recipients,
//!   body type, content). Its flags byte (once only "8BITMIME") also says whether the
//!   message declared SMTPUTF8 and whether a DSN block follows the recipients: RET, ENVID
//!   and each recipient's NOTIFY and ORCPT (RFC 3461). Records written before these flags
//!   have them clear, and read as they always did.
//! - `Recipient`: one recipient's final outcome (delivered, bounced, removed).
//! - `Finished`: the whole message is done (removed by the operator, or a failed sync
//!   withdrew it).
//! - `Deferred`: an attempt left recipients pending: how many attempts the retry schedule
//!   has counted, when the next one is due, and the last reply (for `queue list`, and so a
//!   restart keeps the schedule). Written only when a message is deferred, never for one
//!   delivered at its first attempt.
//! - `Hold`: the operator put the message on hold, or released it (`queue hold|release`).
//!
//! The last two kinds came later: spools written before them read as they always did, and
//! a later record of a message overrides an earlier one of the same kind.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use std::sync::Arc;

use crate::id::QueueId;
use crate::smtp::ext::{DsnEnvelope, Notify, Orcpt, RcptDsn, Ret};
use crate::smtp::{Mailbox, ReversePath};

/// Identifies a record boundary.
pub const MAGIC: u32 = 0x5252_4C31; // "RRL1"
/// Bytes before the payload.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted when reading (anything larger is corruption).
pub const MAX_PAYLOAD: usize = 1 << 31;

const KIND_MESSAGE: u8 = 1;
const KIND_RECIPIENT: u8 = 2;
const KIND_FINISHED: u8 = 3;
const KIND_DEFERRED: u8 = 4;
const KIND_HOLD: u8 = 5;

/// The message record's flags byte.
const FLAG_EIGHT_BIT: u8 = 1;
const FLAG_SMTPUTF8: u8 = 2;
const FLAG_DSN: u8 = 4;

/// The longest last reply a deferral record keeps, in bytes (longer ones are cut at a
/// character boundary).
pub const MAX_REPLY_LEN: usize = 512;

/// A recipient's final outcome, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The next hop accepted it.
    Delivered = 1,
    /// It failed for good; a bounce was spooled (or none was due, for `<>`).
    Bounced = 2,
    /// The operator removed it.
    Removed = 3,
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Queue ID.
    pub id: QueueId,
    /// Arrival time (whole seconds).
    pub arrival: SystemTime,
    /// Reverse path.
    pub from: ReversePath,
    /// Recipients, in envelope order (their index is their identity in `Recipient` records).
    pub rcpts: Vec<Mailbox>,
    /// BODY=8BITMIME was declared.
    pub eight_bit: bool,
    /// SMTPUTF8 was declared.
    pub smtputf8: bool,
    /// The DSN parameters, if the client gave any.
    pub dsn: Option<Arc<DsnEnvelope>>,
    /// Content: headers and body, CRLF, not dot-stuffed.
    pub data: Bytes,
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A message.
    Message(StoredMessage),
    /// Recipient `index` of message `id` is finished.
    Recipient {
        /// Queue ID.
        id: QueueId,
        /// Recipient index in the message record.
        index: u32,
        /// How it ended.
        outcome: RcptOutcome,
    },
    /// Message `id` is finished as a whole.
    Finished {
        /// Queue ID.
        id: QueueId,
    },
    /// An attempt at message `id` left recipients pending.
    Deferred {
        /// Queue ID.
        id: QueueId,
        /// Attempts the retry schedule has counted so far.
        attempts: u32,
        /// When the next attempt is due (whole seconds).
        next_attempt: SystemTime,
        /// The last reply, or why there was none (at most [`MAX_REPLY_LEN`] bytes).
        last_reply: String,
    },
    /// Message `id` was put on hold (`held`) or released.
    Hold {
        /// Queue ID.
        id: QueueId,
        /// On hold from now on, or released.
        held: bool,
    },
}

/// What a message record holds: an accepted message and its envelope.
#[derive(Debug, Clone, Copy)]
pub struct MessageRecord<'a> {
    /// Queue ID.
    pub id: QueueId,
    /// When it was accepted (kept in whole seconds).
    pub arrival: SystemTime,
    /// The reverse path.
    pub from: &'a ReversePath,
    /// Every recipient, in order (outcome records refer to them by index).
    pub rcpts: &'a [Mailbox],
    /// Sent with `BODY=8BITMIME`.
    pub eight_bit: bool,
    /// Sent with `SMTPUTF8`.
    pub smtputf8: bool,
    /// The DSN parameters, if any (one per recipient in `rcpts` order).
    pub dsn: Option<&'a DsnEnvelope>,
    /// The content, as it will be delivered.
    pub data: &'a [u8],
}

impl MessageRecord<'_> {
    /// Length of what [`encode_message_head`] appends (record header included).
    fn head_len(&self) -> usize {
        let from = self.from.mailbox().map_or("", Mailbox::as_str);
        HEADER_LEN
            + 16
            + 8
            + 2
            + from.len()
            + 1
            + 4
            + self
                .rcpts
                .iter()
                .map(|r| 2 + r.as_str().len())
                .sum::<usize>()
            + self.dsn.map_or(0, dsn_len)
            + 8
    }

    /// The record's payload length: envelope fields and content.
    pub fn payload_len(&self) -> usize {
        self.head_len() - HEADER_LEN + self.data.len()
    }

    /// Whether the record can be written so that recovery reads it back (its payload is
    /// at most [`MAX_PAYLOAD`]). The configuration's limits keep every message the server
    /// accepts within it; the store checks anyway before it writes.
    pub fn fits(&self) -> bool {
        self.payload_len() <= MAX_PAYLOAD
    }
}

/// Appends a message record for an accepted message to `out`: its header and fields from
/// [`encode_message_head`], then the content.
pub fn encode_message(out: &mut BytesMut, msg: &MessageRecord<'_>) {
    out.reserve(msg.head_len() + msg.data.len());
    encode_message_head(out, msg);
    out.extend_from_slice(msg.data);
}

/// Appends everything of a message record but the content itself: the record header and
/// the fields before the content. The record is complete once `msg.data` follows it; the
/// checksum in the header already covers it. This lets the store write the content
/// straight from the caller's buffer instead of copying it behind the header.
pub fn encode_message_head(out: &mut BytesMut, msg: &MessageRecord<'_>) {
    let head_len = msg.head_len();
    let from = msg.from.mailbox().map_or("", Mailbox::as_str);
    let start = begin(out, KIND_MESSAGE, head_len - HEADER_LEN, msg.data.len());
    out.put_u128_le(msg.id.as_u128());
    out.put_u64_le(unix_secs(msg.arrival));
    put_str(out, from);
    let flags = if msg.eight_bit { FLAG_EIGHT_BIT } else { 0 }
        | if msg.smtputf8 { FLAG_SMTPUTF8 } else { 0 }
        | if msg.dsn.is_some() { FLAG_DSN } else { 0 };
    out.put_u8(flags);
    out.put_u32_le(msg.rcpts.len() as u32);
    for r in msg.rcpts {
        put_str(out, r.as_str());
    }
    if let Some(dsn) = msg.dsn {
        put_dsn(out, dsn);
    }
    out.put_u64_le(msg.data.len() as u64);
    debug_assert_eq!(out.len() - start, head_len);
    finish_with(out, start, msg.data);
}

/// Appends the head of a message record whose content of `data_len` bytes (with crc32c
/// `data_crc`) was written elsewhere beforehand: a streamed message's content goes to its
/// file while it arrives, and this head is written in front of it once its length is known.
/// `msg.data` is ignored. The result equals [`encode_message_head`] for the same content
/// (a unit test holds the two together): the content's length is the head's last field.
pub fn encode_streamed_head(
    out: &mut BytesMut,
    msg: &MessageRecord<'_>,
    data_len: u64,
    data_crc: u32,
) {
    let start = out.len();
    encode_message_head(out, &MessageRecord { data: &[], ..*msg });
    let end = out.len();
    let payload = (end - start - HEADER_LEN) as u64 + data_len;
    debug_assert!(payload <= MAX_PAYLOAD as u64, "checked by the caller");
    out[start + 8..start + 12].copy_from_slice(&(payload as u32).to_le_bytes());
    out[end - 8..end].copy_from_slice(&data_len.to_le_bytes());
    let head = checksum(&out[start + 4..start + 12], &out[start + HEADER_LEN..end]);
    let crc = crc32c::crc32c_combine(head, data_crc, data_len as usize);
    out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
}

/// Bytes [`put_dsn`] writes.
fn dsn_len(dsn: &DsnEnvelope) -> usize {
    1 + 2
        + dsn.envid.as_deref().map_or(0, str::len)
        + 4
        + dsn
            .rcpts
            .iter()
            .map(|r| {
                1 + 2
                    + 2
                    + r.orcpt
                        .as_ref()
                        .map_or(0, |o| o.addr_type.len() + o.addr.len())
            })
            .sum::<usize>()
}

/// The DSN block: RET (0 none, 1 FULL, 2 HDRS), ENVID (empty: none), then per recipient
/// NOTIFY's bits and ORCPT's type and address (empty type: none). Values were checked at
/// RCPT (ORCPT at most 500 octets, ENVID 100), so each fits its u16 length.
fn put_dsn(out: &mut BytesMut, dsn: &DsnEnvelope) {
    out.put_u8(match dsn.ret {
        None => 0,
        Some(Ret::Full) => 1,
        Some(Ret::Hdrs) => 2,
    });
    put_str(out, dsn.envid.as_deref().unwrap_or(""));
    out.put_u32_le(dsn.rcpts.len() as u32);
    for r in &dsn.rcpts {
        out.put_u8(r.notify.bits());
        match &r.orcpt {
            Some(o) => {
                put_str(out, &o.addr_type);
                put_str(out, &o.addr);
            }
            None => {
                put_str(out, "");
                put_str(out, "");
            }
        }
    }
}

fn get_dsn(r: &mut Reader<'_>, rcpts: usize) -> Option<DsnEnvelope> {
    let ret = match r.u8()? {
        0 => None,
        1 => Some(Ret::Full),
        2 => Some(Ret::Hdrs),
        _ => return None,
    };
    let envid = Some(r.str()?).filter(|e| !e.is_empty()).map(Box::from);
    let n = r.u32()? as usize;
    if n != rcpts {
        return None;
    }
    let mut list = Vec::with_capacity(n);
    for _ in 0..n {
        let notify = Notify::from_bits(r.u8()?)?;
        let (addr_type, addr) = (r.str()?, r.str()?);
        let orcpt = (!addr_type.is_empty()).then(|| Orcpt {
            addr_type: addr_type.into(),
            addr: addr.into(),
        });
        list.push(RcptDsn { notify, orcpt });
    }
    Some(DsnEnvelope {
        ret,
        envid,
        rcpts: list,
    })
}

/// Appends a recipient outcome record.
pub fn encode_recipient(out: &mut BytesMut, id: QueueId, index: u32, outcome: RcptOutcome) {
    let start = begin(out, KIND_RECIPIENT, 16 + 4 + 1, 0);
    out.put_u128_le(id.as_u128());
    out.put_u32_le(index);
    out.put_u8(outcome as u8);
    finish(out, start);
}

/// Appends a "message finished" record.
pub fn encode_finished(out: &mut BytesMut, id: QueueId) {
    let start = begin(out, KIND_FINISHED, 16, 0);
    out.put_u128_le(id.as_u128());
    finish(out, start);
}

/// Appends a deferral record: `attempts` counted so far, the next one due at
/// `next_attempt`, and the last reply (made one line and cut to [`MAX_REPLY_LEN`] bytes).
pub fn encode_deferred(
    out: &mut BytesMut,
    id: QueueId,
    attempts: u32,
    next_attempt: SystemTime,
    last_reply: &str,
) {
    let reply = one_line(last_reply, MAX_REPLY_LEN);
    let start = begin(out, KIND_DEFERRED, 16 + 4 + 8 + 2 + reply.len(), 0);
    out.put_u128_le(id.as_u128());
    out.put_u32_le(attempts);
    out.put_u64_le(unix_secs(next_attempt));
    put_str(out, &reply);
    finish(out, start);
}

/// Appends a hold record: the message is on hold from now on (`held`), or released.
pub fn encode_hold(out: &mut BytesMut, id: QueueId, held: bool) {
    let start = begin(out, KIND_HOLD, 16 + 1, 0);
    out.put_u128_le(id.as_u128());
    out.put_u8(u8::from(held));
    finish(out, start);
}

/// `text` on one line (control characters become spaces), at most `max` bytes, cut at a
/// character boundary.
fn one_line(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Starts a record of `kind` whose payload is `in_out` bytes appended to `out` after this
/// header, then `after` bytes that the caller writes elsewhere (the content of a message).
fn begin(out: &mut BytesMut, kind: u8, in_out: usize, after: usize) -> usize {
    out.reserve(HEADER_LEN + in_out);
    let start = out.len();
    out.put_u32_le(MAGIC);
    out.put_u8(kind);
    out.put_slice(&[0, 0, 0]);
    debug_assert!(
        in_out + after <= MAX_PAYLOAD,
        "checked by MessageRecord::fits"
    );
    out.put_u32_le((in_out + after) as u32);
    out.put_u32_le(0); // checksum, filled in by `finish` or `finish_with`
    start
}

/// Fills in the checksum of the record that starts at `start` and ends at the end of `out`.
fn finish(out: &mut BytesMut, start: usize) {
    finish_with(out, start, &[]);
}

/// Fills in the checksum of the record that starts at `start` in `out` and continues with
/// `rest` (not in `out`).
fn finish_with(out: &mut BytesMut, start: usize, rest: &[u8]) {
    let crc = crc32c::crc32c_append(
        checksum(&out[start + 4..start + 12], &out[start + HEADER_LEN..]),
        rest,
    );
    out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
}

fn checksum(kind_and_len: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(kind_and_len), payload)
}

fn put_str(out: &mut BytesMut, s: &str) {
    // Paths are at most 256 octets (RFC 5321), far below u16::MAX.
    out.put_u16_le(s.len() as u16);
    out.extend_from_slice(s.as_bytes());
}

/// What reading a record at some offset found.
#[derive(Debug)]
pub enum Decoded {
    /// A whole, valid record of `len` bytes (header included).
    Record(Record, usize),
    /// The bytes end before the record does (a torn tail, or more to read).
    Incomplete,
    /// Not a valid record here.
    Corrupt(&'static str),
}

/// A record's fixed header: what a reader that streams a segment (rather than holding it
/// whole) needs before the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The record kind.
    pub kind: u8,
    /// Payload length in bytes (at most [`MAX_PAYLOAD`]).
    pub payload_len: usize,
    /// The checksum the header carries.
    pub checksum: u32,
    /// The checksum of the header fields it covers (kind and length): continue it over
    /// the payload with `crc32c::crc32c_append` and compare with `checksum`.
    pub checksum_seed: u32,
}

impl Header {
    /// A message record (the only kind with content, so the only large one).
    pub fn is_message(&self) -> bool {
        self.kind == KIND_MESSAGE
    }
}

/// Why [`decode_header`] found no header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than [`HEADER_LEN`] bytes.
    Incomplete,
    /// No magic, or an implausible length.
    Corrupt(&'static str),
}

/// Reads a record header from the start of `buf`. The payload is not looked at.
pub fn decode_header(buf: &[u8]) -> Result<Header, HeaderError> {
    if buf.len() < HEADER_LEN {
        return Err(HeaderError::Incomplete);
    }
    let u32_at = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    if u32_at(0) != MAGIC {
        return Err(HeaderError::Corrupt("bad magic"));
    }
    let payload_len = u32_at(8) as usize;
    if payload_len > MAX_PAYLOAD {
        return Err(HeaderError::Corrupt("implausible length"));
    }
    Ok(Header {
        kind: buf[4],
        payload_len,
        checksum: u32_at(12),
        checksum_seed: crc32c::crc32c(&buf[4..12]),
    })
}

/// Reads the record at the start of `buf`. `content` is a shared handle to the same bytes
/// so message contents are sliced rather than copied.
pub fn decode(buf: &Bytes) -> Decoded {
    let header = match decode_header(buf) {
        Ok(h) => h,
        Err(HeaderError::Incomplete) => return Decoded::Incomplete,
        Err(HeaderError::Corrupt(why)) => return Decoded::Corrupt(why),
    };
    let len = header.payload_len;
    if buf.len() < HEADER_LEN + len {
        return Decoded::Incomplete;
    }
    let payload = buf.slice(HEADER_LEN..HEADER_LEN + len);
    if checksum(&buf[4..12], &payload) != header.checksum {
        return Decoded::Corrupt("checksum mismatch");
    }
    let record = match header.kind {
        KIND_MESSAGE => decode_message(payload).map(Record::Message),
        KIND_RECIPIENT => decode_recipient(&payload),
        KIND_FINISHED => Reader::new(&payload).u128().map(|v| Record::Finished {
            id: QueueId::from_u128(v),
        }),
        KIND_DEFERRED => decode_deferred(&payload),
        KIND_HOLD => decode_hold(&payload),
        _ => None,
    };
    match record {
        Some(r) => Decoded::Record(r, HEADER_LEN + len),
        None => Decoded::Corrupt("malformed payload"),
    }
}

fn decode_recipient(payload: &[u8]) -> Option<Record> {
    let mut r = Reader::new(payload);
    let id = QueueId::from_u128(r.u128()?);
    let index = r.u32()?;
    let outcome = match r.u8()? {
        1 => RcptOutcome::Delivered,
        2 => RcptOutcome::Bounced,
        3 => RcptOutcome::Removed,
        _ => return None,
    };
    r.end()?;
    Some(Record::Recipient { id, index, outcome })
}

fn decode_deferred(payload: &[u8]) -> Option<Record> {
    let mut r = Reader::new(payload);
    let id = QueueId::from_u128(r.u128()?);
    let attempts = r.u32()?;
    let next_attempt = UNIX_EPOCH.checked_add(Duration::from_secs(r.u64()?))?;
    let last_reply = r.str()?.to_string();
    r.end()?;
    Some(Record::Deferred {
        id,
        attempts,
        next_attempt,
        last_reply,
    })
}

fn decode_hold(payload: &[u8]) -> Option<Record> {
    let mut r = Reader::new(payload);
    let id = QueueId::from_u128(r.u128()?);
    let held = match r.u8()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    r.end()?;
    Some(Record::Hold { id, held })
}

/// A message record's envelope: every field before the content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageHead {
    /// Queue ID.
    pub id: QueueId,
    /// Arrival time (whole seconds).
    pub arrival: SystemTime,
    /// Reverse path.
    pub from: ReversePath,
    /// Recipients, in envelope order.
    pub rcpts: Vec<Mailbox>,
    /// BODY=8BITMIME was declared.
    pub eight_bit: bool,
    /// The client asked for SMTPUTF8.
    pub smtputf8: bool,
    /// DSN parameters, if the client gave any.
    pub dsn: Option<Arc<DsnEnvelope>>,
    /// Where the content starts in the payload.
    pub content_at: usize,
    /// The content's length.
    pub content_len: u64,
}

impl MessageHead {
    /// True when the payload of `payload_len` bytes holds exactly these fields and the
    /// content (what [`decode`] requires of a message record).
    pub fn fills(&self, payload_len: usize) -> bool {
        u64::try_from(self.content_at)
            .ok()
            .and_then(|at| at.checked_add(self.content_len))
            == u64::try_from(payload_len).ok()
    }
}

/// Decodes a message record's envelope from the start of its payload; `payload` may end
/// anywhere after the envelope (content need not be there). `None` when the fields are
/// malformed or run past the end of `payload`. The checksum is not checked here: a reader
/// that skips the content must check it over the whole payload before it trusts the head.
pub fn decode_message_head(payload: &[u8]) -> Option<MessageHead> {
    let mut r = Reader::new(payload);
    let id = QueueId::from_u128(r.u128()?);
    let arrival = UNIX_EPOCH.checked_add(Duration::from_secs(r.u64()?))?;
    let from = r.str()?;
    let from = if from.is_empty() {
        ReversePath::Null
    } else {
        ReversePath::Mailbox(Mailbox::parse(from).ok()?)
    };
    let flags = r.u8()?;
    if flags & !(FLAG_EIGHT_BIT | FLAG_SMTPUTF8 | FLAG_DSN) != 0 {
        return None;
    }
    let n = r.u32()? as usize;
    let mut rcpts = Vec::with_capacity(n.min(10_000));
    for _ in 0..n {
        rcpts.push(Mailbox::parse(r.str()?).ok()?);
    }
    let dsn = if flags & FLAG_DSN != 0 {
        Some(Arc::new(get_dsn(&mut r, n)?))
    } else {
        None
    };
    let content_len = r.u64()?;
    Some(MessageHead {
        id,
        arrival,
        from,
        rcpts,
        eight_bit: flags & FLAG_EIGHT_BIT != 0,
        smtputf8: flags & FLAG_SMTPUTF8 != 0,
        dsn,
        content_at: r.pos,
        content_len,
    })
}

fn decode_message(payload: Bytes) -> Option<StoredMessage> {
    let head = decode_message_head(&payload)?;
    if !head.fills(payload.len()) {
        return None;
    }
    Some(StoredMessage {
        id: head.id,
        arrival: head.arrival,
        from: head.from,
        rcpts: head.rcpts,
        eight_bit: head.eight_bit,
        smtputf8: head.smtputf8,
        dsn: head.dsn,
        data: payload.slice(head.content_at..),
    })
}

/// Bounds-checked little-endian reader: every read returns `None` past the end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u128(&mut self) -> Option<u128> {
        Some(u128::from_le_bytes(self.take(16)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn end(&self) -> Option<()> {
        (self.pos == self.buf.len()).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdGenerator;

    fn sample() -> (QueueId, BytesMut) {
        let id = IdGenerator::starting_at(1, 42).next_id();
        let mut out = BytesMut::new();
        encode_message(
            &mut out,
            &MessageRecord {
                id,
                arrival: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                from: &ReversePath::Mailbox(Mailbox::parse("a@example.org").unwrap()),
                rcpts: &[
                    Mailbox::parse("b@example.net").unwrap(),
                    Mailbox::parse("c@example.net").unwrap(),
                ],
                eight_bit: true,
                smtputf8: false,
                dsn: None,
                data: b"Subject: x\r\n\r\nbody\r\n",
            },
        );
        encode_recipient(&mut out, id, 1, RcptOutcome::Delivered);
        encode_finished(&mut out, id);
        (id, out)
    }

    #[test]
    fn a_streamed_head_equals_the_whole_record_head() {
        let id = IdGenerator::starting_at(1, 42).next_id();
        let from = ReversePath::Mailbox(Mailbox::parse("a@example.org").unwrap());
        let rcpts = [Mailbox::parse("b@example.net").unwrap()];
        let data = b"Subject: big\r\n\r\nbody\r\nmore\r\n";
        let dsn = DsnEnvelope {
            ret: Some(Ret::Hdrs),
            envid: Some("env-1".into()),
            rcpts: vec![RcptDsn {
                notify: Notify::SUCCESS,
                orcpt: Some(Orcpt {
                    addr_type: "rfc822".into(),
                    addr: "b@example.net".into(),
                }),
            }],
        };
        // Without and with the SMTPUTF8 flag and a DSN block between the recipients and
        // the content's length.
        for (smtputf8, dsn) in [(false, None), (true, Some(&dsn))] {
            let msg = MessageRecord {
                id,
                arrival: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                from: &from,
                rcpts: &rcpts,
                eight_bit: false,
                smtputf8,
                dsn,
                data,
            };
            let mut whole = BytesMut::new();
            encode_message_head(&mut whole, &msg);
            let mut streamed = BytesMut::new();
            encode_streamed_head(&mut streamed, &msg, data.len() as u64, crc32c::crc32c(data));
            assert_eq!(streamed, whole);
            streamed.extend_from_slice(data);
            match decode(&streamed.freeze()) {
                Decoded::Record(Record::Message(m), _) => {
                    assert_eq!(&m.data[..], &data[..]);
                    assert_eq!(m.smtputf8, smtputf8);
                    assert_eq!(m.dsn.as_deref(), dsn);
                }
                other => panic!("not a message record: {other:?}"),
            }
        }
    }

    fn decode_all(buf: Bytes) -> Vec<Record> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            match decode(&buf.slice(at..)) {
                Decoded::Record(r, n) => {
                    out.push(r);
                    at += n;
                }
                other => panic!("at {at}: {other:?}"),
            }
        }
        out
    }

    #[test]
    fn records_round_trip() {
        let (id, out) = sample();
        let records = decode_all(out.freeze());
        assert_eq!(records.len(), 3);
        let Record::Message(m) = &records[0] else {
            panic!()
        };
        assert_eq!(m.id, id);
        assert_eq!(m.from.to_string(), "a@example.org");
        assert_eq!(m.rcpts.len(), 2);
        assert!(m.eight_bit);
        assert_eq!(&m.data[..], b"Subject: x\r\n\r\nbody\r\n");
        assert_eq!(m.arrival, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert_eq!(
            records[1],
            Record::Recipient {
                id,
                index: 1,
                outcome: RcptOutcome::Delivered
            }
        );
        assert_eq!(records[2], Record::Finished { id });
    }

    #[test]
    fn smtputf8_and_dsn_parameters_round_trip() {
        let id = IdGenerator::starting_at(1, 7).next_id();
        let from = ReversePath::Mailbox(Mailbox::parse("δοκιμή@παράδειγμα.δοκιμή").unwrap());
        let rcpts = [
            Mailbox::parse("用户@例子.test").unwrap(),
            Mailbox::parse("b@example.net").unwrap(),
        ];
        let dsn = DsnEnvelope {
            ret: Some(Ret::Hdrs),
            envid: Some("QQ 314".into()),
            rcpts: vec![
                RcptDsn {
                    notify: Notify::from_bits(Notify::SUCCESS.bits() | Notify::DELAY.bits())
                        .unwrap(),
                    orcpt: Some(Orcpt {
                        addr_type: "rfc822".into(),
                        addr: "x+y@example.org".into(),
                    }),
                },
                RcptDsn::default(),
            ],
        };
        let record = MessageRecord {
            id,
            arrival: UNIX_EPOCH,
            from: &from,
            rcpts: &rcpts,
            eight_bit: false,
            smtputf8: true,
            dsn: Some(&dsn),
            data: "Subject: héllo\r\n\r\nbody\r\n".as_bytes(),
        };
        let mut out = BytesMut::new();
        encode_message(&mut out, &record);
        assert_eq!(out.len(), HEADER_LEN + record.payload_len());
        let records = decode_all(out.clone().freeze());
        let Record::Message(m) = &records[0] else {
            panic!()
        };
        assert!(m.smtputf8 && !m.eight_bit);
        assert_eq!(m.from, from);
        assert_eq!(m.rcpts, rcpts);
        assert_eq!(m.dsn.as_deref(), Some(&dsn));
        // Flags nobody writes are corruption, not a guess (checksum fixed up to get there).
        let flags_at = HEADER_LEN + 16 + 8 + 2 + from.to_string().len();
        out[flags_at] |= 0x80;
        let crc = checksum(&out[4..12], &out[HEADER_LEN..]);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&out.freeze()), Decoded::Corrupt(_)));
    }

    #[test]
    fn head_and_content_make_the_whole_record() {
        let id = IdGenerator::starting_at(3, 4).next_id();
        let from = ReversePath::Mailbox(Mailbox::parse("a@example.org").unwrap());
        let rcpts = [Mailbox::parse("b@example.net").unwrap()];
        for data in [&b""[..], b"x", b"Subject: y\r\n\r\nbody\r\n"] {
            let msg = MessageRecord {
                id,
                arrival: UNIX_EPOCH,
                from: &from,
                rcpts: &rcpts,
                eight_bit: false,
                smtputf8: false,
                dsn: None,
                data,
            };
            let mut whole = BytesMut::from(&b"before"[..]);
            encode_message(&mut whole, &msg);
            let mut head = BytesMut::from(&b"before"[..]);
            encode_message_head(&mut head, &msg);
            head.extend_from_slice(data);
            assert_eq!(head, whole);
        }
    }

    /// The layout of a message record, spelled out field by field: existing spools must
    /// stay readable, so any change to the encoder that moves a byte fails here.
    #[test]
    fn the_message_layout_is_pinned() {
        // IDs are 96 bits wide; the record keeps 16 bytes.
        let id = QueueId::from_u128(0x0506_0708_090a_0b0c_0d0e_0f10);
        let mut out = BytesMut::new();
        encode_message(
            &mut out,
            &MessageRecord {
                id,
                arrival: UNIX_EPOCH + Duration::from_secs(0x1122_3344),
                from: &ReversePath::Mailbox(Mailbox::parse("a@b.c").unwrap()),
                rcpts: &[Mailbox::parse("d@e.f").unwrap()],
                eight_bit: true,
                smtputf8: false,
                dsn: None,
                data: b"hi\r\n",
            },
        );
        let mut payload = Vec::new();
        payload.extend_from_slice(&[16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 0, 0, 0, 0]);
        payload.extend_from_slice(&0x1122_3344u64.to_le_bytes());
        payload.extend_from_slice(b"\x05\x00a@b.c");
        payload.push(1);
        payload.extend_from_slice(&1u32.to_le_bytes());
        payload.extend_from_slice(b"\x05\x00d@e.f");
        payload.extend_from_slice(&4u64.to_le_bytes());
        payload.extend_from_slice(b"hi\r\n");
        let mut kind_and_len = vec![KIND_MESSAGE, 0, 0, 0];
        kind_and_len.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&kind_and_len), &payload);
        let mut expected = b"1LRR".to_vec();
        expected.extend_from_slice(&kind_and_len);
        expected.extend_from_slice(&crc.to_le_bytes());
        expected.extend_from_slice(&payload);
        assert_eq!(&out[..], &expected[..]);
    }

    #[test]
    fn a_record_over_the_payload_limit_does_not_fit() {
        let from = ReversePath::Null;
        let rcpts = [Mailbox::parse("r@example.org").unwrap()];
        let msg = |data| MessageRecord {
            id: QueueId::from_u128(1),
            arrival: UNIX_EPOCH,
            from: &from,
            rcpts: &rcpts,
            eight_bit: false,
            smtputf8: false,
            dsn: None,
            data,
        };
        let small = msg(b"x");
        assert!(small.fits());
        let envelope = small.payload_len() - 1;
        // Zeroed allocations are mapped lazily: 2 GiB here costs address space, not memory.
        let exact = vec![0u8; MAX_PAYLOAD - envelope];
        assert!(msg(&exact).fits());
        let over = vec![0u8; MAX_PAYLOAD - envelope + 1];
        assert!(!msg(&over).fits());
    }

    #[test]
    fn null_sender_round_trips() {
        let mut out = BytesMut::new();
        let id = IdGenerator::starting_at(0, 1).next_id();
        encode_message(
            &mut out,
            &MessageRecord {
                id,
                arrival: UNIX_EPOCH,
                from: &ReversePath::Null,
                rcpts: &[],
                eight_bit: false,
                smtputf8: false,
                dsn: None,
                data: b"",
            },
        );
        let Decoded::Record(Record::Message(m), _) = decode(&out.freeze()) else {
            panic!()
        };
        assert_eq!(m.from, ReversePath::Null);
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_flip_is_detected() {
        let (_, out) = sample();
        let first_len = match decode(&out.clone().freeze()) {
            Decoded::Record(_, n) => n,
            other => panic!("{other:?}"),
        };
        let whole = out.freeze();
        for cut in 0..first_len {
            assert!(
                matches!(decode(&whole.slice(..cut)), Decoded::Incomplete),
                "cut {cut}"
            );
        }
        for i in 0..first_len {
            let mut bad = BytesMut::from(&whole[..]);
            bad[i] ^= 0x40;
            match decode(&bad.freeze()) {
                Decoded::Record(_, _) => panic!("flip at {i} went unnoticed"),
                Decoded::Incomplete | Decoded::Corrupt(_) => {}
            }
        }
    }

    #[test]
    fn deferral_and_hold_records_round_trip() {
        let id = IdGenerator::starting_at(2, 7).next_id();
        let mut out = BytesMut::new();
        let next = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        encode_deferred(&mut out, id, 3, next, "127.0.0.1: 451 4.3.0 try later");
        encode_hold(&mut out, id, true);
        encode_hold(&mut out, id, false);
        assert_eq!(
            decode_all(out.freeze()),
            vec![
                Record::Deferred {
                    id,
                    attempts: 3,
                    next_attempt: next,
                    last_reply: "127.0.0.1: 451 4.3.0 try later".into(),
                },
                Record::Hold { id, held: true },
                Record::Hold { id, held: false },
            ]
        );
    }

    #[test]
    fn a_long_or_multi_line_reply_is_kept_to_one_bounded_line() {
        let id = QueueId::from_u128(9);
        // 'é' is two bytes: 511 'x' then 'é' would end at 513, so the cut comes before it.
        let long = format!("{}é{}", "x".repeat(MAX_REPLY_LEN - 1), "y".repeat(100));
        for (text, want) in [
            (
                "451-first\r\n451 second".to_string(),
                "451-first  451 second".to_string(),
            ),
            (long, "x".repeat(MAX_REPLY_LEN - 1)),
        ] {
            let mut out = BytesMut::new();
            encode_deferred(&mut out, id, 1, UNIX_EPOCH, &text);
            let Decoded::Record(Record::Deferred { last_reply, .. }, _) = decode(&out.freeze())
            else {
                panic!()
            };
            assert_eq!(last_reply, want);
        }
    }

    /// The layouts of the later record kinds, pinned like the message record's.
    #[test]
    fn the_deferral_and_hold_layouts_are_pinned() {
        let id = QueueId::from_u128(0x0102);
        let whole = |kind: u8, payload: &[u8]| {
            let mut kind_and_len = vec![kind, 0, 0, 0];
            kind_and_len.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            let crc = crc32c::crc32c_append(crc32c::crc32c(&kind_and_len), payload);
            let mut v = b"1LRR".to_vec();
            v.extend_from_slice(&kind_and_len);
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(payload);
            v
        };
        let mut id_bytes = vec![2, 1];
        id_bytes.resize(16, 0);

        let mut out = BytesMut::new();
        encode_deferred(
            &mut out,
            id,
            0x0a0b_0c0d,
            UNIX_EPOCH + Duration::from_secs(0x1122_3344),
            "451 x",
        );
        let mut payload = id_bytes.clone();
        payload.extend_from_slice(&0x0a0b_0c0du32.to_le_bytes());
        payload.extend_from_slice(&0x1122_3344u64.to_le_bytes());
        payload.extend_from_slice(b"\x05\x00451 x");
        assert_eq!(&out[..], &whole(4, &payload)[..]);

        for held in [true, false] {
            let mut out = BytesMut::new();
            encode_hold(&mut out, id, held);
            let mut payload = id_bytes.clone();
            payload.push(u8::from(held));
            assert_eq!(&out[..], &whole(5, &payload)[..]);
        }
    }

    #[test]
    fn a_damaged_deferral_or_hold_record_is_never_used() {
        let id = QueueId::from_u128(5);
        let mut out = BytesMut::new();
        encode_deferred(&mut out, id, 2, UNIX_EPOCH, "451 later");
        let deferred_len = out.len();
        encode_hold(&mut out, id, true);
        let whole = out.freeze();
        for (from, to) in [(0, deferred_len), (deferred_len, whole.len())] {
            let record = whole.slice(from..to);
            for cut in 0..record.len() {
                assert!(matches!(decode(&record.slice(..cut)), Decoded::Incomplete));
            }
            for i in 0..record.len() {
                let mut bad = BytesMut::from(&record[..]);
                bad[i] ^= 0x40;
                assert!(
                    !matches!(decode(&bad.freeze()), Decoded::Record(..)),
                    "flip at {i} of {from}..{to} went unnoticed"
                );
            }
        }
        // A hold flag other than 0 or 1 is malformed even with a good checksum.
        let mut bad = BytesMut::new();
        let start = begin(&mut bad, KIND_HOLD, 17, 0);
        bad.put_u128_le(5);
        bad.put_u8(2);
        finish(&mut bad, start);
        assert!(matches!(decode(&bad.freeze()), Decoded::Corrupt(_)));
    }
}
