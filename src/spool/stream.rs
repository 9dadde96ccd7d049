//! Streamed messages: a large message's content goes to disk while it arrives, so the
//! server's memory does not grow with message size.
//!
//! Such a message gets a segment of its own. Its content is appended, piece by piece, to
//! `seg-SSS-QQQQQQQQQQQQ.rrs.part` behind room left for the record's head. When the message
//! has ended and been checked, the head (envelope fields, length, crc32c over all of it) is
//! written into that room and the file is renamed to its segment name: from then on it is
//! an ordinary segment holding one message record, which the group commit syncs (file and
//! directory) before the `250`, outcome records are appended to, and which is deleted once
//! its message is finished. Recovery needs nothing new for it.
//!
//! A message that never completes (the client left, the message was refused, the server
//! was killed) leaves at most a `.part` file: removed when the stream is dropped, and at
//! start by [`remove_orphans`] (a `.part` file is never a message anyone was promised).
//!
//! The content is written with plain `write(2)` into the page cache, as the segments are;
//! durability comes from the group commit's `fdatasync`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::BytesMut;

use super::record::{self, MessageRecord, MAX_PAYLOAD};
use super::segment::SegmentId;

/// Suffix of a streamed message's file while its content arrives.
const PART_SUFFIX: &str = ".part";

/// The name of segment `id`'s file while its content arrives.
fn part_name(id: SegmentId) -> String {
    format!("{}{PART_SUFFIX}", id.file_name())
}

/// One streamed message on its way to disk.
#[derive(Debug)]
pub struct StreamedBody {
    dir: PathBuf,
    id: SegmentId,
    file: Option<File>,
    /// Bytes left free at the start for the record's head.
    head_len: usize,
    /// Content bytes written so far, and their crc32c.
    data_len: u64,
    data_crc: u32,
}

impl StreamedBody {
    /// Creates the `.part` file for segment `id` in `dir`, leaving room for the head of
    /// `msg`'s record (its envelope; its content is ignored).
    pub(super) fn create(dir: &Path, id: SegmentId, msg: &MessageRecord<'_>) -> io::Result<Self> {
        let mut head = BytesMut::new();
        record::encode_message_head(&mut head, &MessageRecord { data: &[], ..*msg });
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(part_name(id)))?;
        let mut body = StreamedBody {
            dir: dir.to_path_buf(),
            id,
            file: None,
            head_len: head.len(),
            data_len: 0,
            data_crc: 0,
        };
        // Zeros for now: a head that is never written reads back as no valid record.
        let written = file.write_all(&vec![0u8; head.len()]);
        body.file = Some(file);
        written?;
        Ok(body)
    }

    /// Appends the next piece of content.
    pub fn write(&mut self, piece: &[u8]) -> io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("streamed message already closed"))?;
        file.write_all(piece)?;
        self.data_len += piece.len() as u64;
        self.data_crc = crc32c::crc32c_append(self.data_crc, piece);
        Ok(())
    }

    /// Content bytes written so far.
    pub fn len(&self) -> u64 {
        self.data_len
    }

    /// True before any content was written.
    pub fn is_empty(&self) -> bool {
        self.data_len == 0
    }

    /// Appends `tail`, writes the record's head for `msg` (whose envelope must be the one
    /// given to [`StreamedBody::create`]) and renames the file to its segment name. Returns
    /// the segment, its file (opened for appending outcome records) and its length. Not
    /// yet durable: the caller hands it to the group commit.
    pub(super) fn complete(
        mut self,
        msg: &MessageRecord<'_>,
    ) -> io::Result<(SegmentId, File, u64)> {
        self.write(msg.data)?;
        let mut head = BytesMut::new();
        record::encode_streamed_head(&mut head, msg, self.data_len, self.data_crc);
        if head.len() != self.head_len {
            return Err(io::Error::other(
                "streamed message: its envelope changed while it arrived",
            ));
        }
        let payload = (head.len() - record::HEADER_LEN) as u64 + self.data_len;
        if payload > MAX_PAYLOAD as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "message record of {payload} bytes is over the spool's limit of {MAX_PAYLOAD}"
                ),
            ));
        }
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("streamed message already closed"))?;
        let result = (|| {
            file.write_all_at(&head, 0)?;
            let seg_path = self.dir.join(self.id.file_name());
            fs::rename(self.dir.join(part_name(self.id)), &seg_path)?;
            let appending = OpenOptions::new().read(true).append(true).open(&seg_path);
            if appending.is_err() {
                // Not a segment after all: nothing will deliver it, so nothing may find it.
                let _ = fs::remove_file(&seg_path);
            }
            appending
        })();
        match result {
            Ok(appending) => {
                let len = self.head_len as u64 + self.data_len;
                Ok((self.id, appending, len))
            }
            Err(e) => {
                // `Drop` removes the `.part` file if the rename did not happen.
                Err(e)
            }
        }
    }
}

impl Drop for StreamedBody {
    fn drop(&mut self) {
        // Never completed (or completing failed before the rename): the content is nobody's.
        let part = self.dir.join(part_name(self.id));
        match fs::remove_file(&part) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", part.display()),
        }
    }
}

/// Removes the `.part` files of streamed messages that never completed (the server
/// stopped, or was killed, while they arrived). Returns how many there were.
pub fn remove_orphans(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_part = name
            .strip_suffix(PART_SUFFIX)
            .and_then(SegmentId::parse)
            .is_some();
        if is_part {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdGenerator;
    use crate::smtp::{Mailbox, ReversePath};
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_completed_stream_is_a_segment_and_an_abandoned_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let id = IdGenerator::starting_at(1, 42).next_id();
        let from = ReversePath::Mailbox(Mailbox::parse("a@example.org").unwrap());
        let rcpts = [Mailbox::parse("b@example.net").unwrap()];
        let msg = |data| MessageRecord {
            id,
            arrival: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            from: &from,
            rcpts: &rcpts,
            eight_bit: false,
            smtputf8: false,
            dsn: None,
            data,
        };
        let seg = SegmentId { shard: 0, seq: 7 };
        let mut body = StreamedBody::create(dir.path(), seg, &msg(b"")).unwrap();
        body.write(b"Subject: x\r\n\r\n").unwrap();
        body.write(b"first\r\n").unwrap();
        let (got, _file, len) = body.complete(&msg(b"tail\r\n")).unwrap();
        assert_eq!(got, seg);
        let bytes = bytes::Bytes::from(fs::read(dir.path().join(seg.file_name())).unwrap());
        assert_eq!(bytes.len() as u64, len);
        match record::decode(&bytes) {
            record::Decoded::Record(record::Record::Message(m), n) => {
                assert_eq!(n, bytes.len());
                assert_eq!(&m.data[..], b"Subject: x\r\n\r\nfirst\r\ntail\r\n");
                assert_eq!(m.rcpts, rcpts);
            }
            other => panic!("not a message record: {other:?}"),
        }
        assert!(!dir.path().join(part_name(seg)).exists());

        // Abandoned: dropped before it completed.
        let other = SegmentId { shard: 0, seq: 8 };
        let mut body = StreamedBody::create(dir.path(), other, &msg(b"")).unwrap();
        body.write(b"half a message").unwrap();
        assert!(dir.path().join(part_name(other)).exists());
        drop(body);
        assert!(!dir.path().join(part_name(other)).exists());

        // Orphans of a killed server are removed at start; segments are not.
        fs::write(
            dir.path().join(part_name(SegmentId { shard: 1, seq: 3 })),
            b"x",
        )
        .unwrap();
        fs::write(dir.path().join("unrelated.part"), b"x").unwrap();
        assert_eq!(remove_orphans(dir.path()).unwrap(), 1);
        assert!(dir.path().join(seg.file_name()).exists());
        assert!(dir.path().join("unrelated.part").exists());
    }
}
