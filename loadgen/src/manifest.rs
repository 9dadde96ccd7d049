//! The manifest: the file `send --manifest` writes (one acknowledged message ID per line) and
//! the loss accounting `sink --check-manifest` does against it.

use crate::ids::{IdMap, IdRegistry};
use crate::message::MsgId;
use serde::Serialize;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// First line of every manifest; lines starting with `#` are comments.
pub const MAGIC: &str = "# loadgen manifest v1";
/// Start of the last line, written when `send` exits normally: a reader that sees it knows
/// the manifest is complete.
pub const END: &str = "# end";

/// Appends acknowledged IDs. Shared by all sender threads; flushed periodically and at exit so
/// that the file is complete when `send` exits.
pub struct ManifestWriter {
    out: Mutex<BufWriter<File>>,
    path: PathBuf,
}

impl ManifestWriter {
    pub fn create(path: &Path, run: u64) -> io::Result<ManifestWriter> {
        let mut out = BufWriter::with_capacity(64 * 1024, File::create(path)?);
        writeln!(out, "{MAGIC} run={run:016x}")?;
        out.flush()?;
        Ok(ManifestWriter {
            out: Mutex::new(out),
            path: path.to_owned(),
        })
    }

    /// Records one message answered 250 after DATA.
    pub fn record(&self, id: MsgId) -> io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(out, "{id}")
    }

    pub fn flush(&self) -> io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.flush()?;
        out.get_ref().sync_data()
    }

    /// Writes the completion trailer. Call once, after the last `record`.
    pub fn finish(&self, accepted: u64) -> io::Result<()> {
        {
            let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
            writeln!(out, "{END} accepted={accepted}")?;
        }
        self.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a manifest; also says whether it has the completion trailer. Any line that is
/// neither a comment, blank, nor an ID is an error naming its line number: a damaged manifest
/// must not silently shrink the set being checked. A last line without its newline is a
/// write in progress and is left out.
pub fn read(path: &Path) -> Result<(Vec<MsgId>, bool), String> {
    let data =
        std::fs::read(path).map_err(|e| format!("cannot read manifest {}: {e}", path.display()))?;
    let mut ids = Vec::new();
    let mut complete = false;
    let whole = match memchr::memrchr(b'\n', &data) {
        Some(i) => &data[..=i],
        None => &[][..],
    };
    for (n, line) in whole.split(|&c| c == b'\n').enumerate() {
        let t = line.trim_ascii();
        if t.starts_with(END.as_bytes()) {
            complete = true;
        }
        if t.is_empty() || t.starts_with(b"#") {
            continue;
        }
        let id = MsgId::parse(t).ok_or_else(|| {
            format!(
                "manifest {} line {}: not a message id: {}",
                path.display(),
                n + 1,
                String::from_utf8_lossy(t)
            )
        })?;
        ids.push(id);
    }
    Ok((ids, complete))
}

/// Reads a manifest, waiting up to `wait` for its writer to finish it: the sink usually
/// stops while `send` is still closing its connections and flushing.
pub fn read_complete(path: &Path, wait: std::time::Duration) -> Result<(Vec<MsgId>, bool), String> {
    let until = std::time::Instant::now() + wait;
    loop {
        let r = if path.exists() || std::time::Instant::now() >= until {
            Some(read(path))
        } else {
            None
        };
        match r {
            Some(Ok((ids, true))) => return Ok((ids, true)),
            Some(Err(e)) if std::time::Instant::now() >= until => return Err(e),
            Some(Ok(r)) if std::time::Instant::now() >= until => return Ok(r),
            _ => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// How many IDs a report lists in full; the counts are always complete.
const LIST_MAX: usize = 1000;

/// Result of checking what arrived against a manifest.
#[derive(Serialize, Debug, Default, Clone)]
pub struct ManifestCheck {
    pub file: String,
    /// The manifest ended with the trailer `send` writes on a normal exit.
    pub complete: bool,
    /// Lines with an ID (a repeated line counts each time).
    pub entries: u64,
    /// Distinct IDs in the manifest.
    pub unique_entries: u64,
    /// In the manifest but never received, intact or not.
    pub lost: u64,
    /// In the manifest and received only damaged (checksum mismatch).
    pub corrupted: u64,
    /// Extra intact copies of manifest IDs (received n times counts n-1).
    pub duplicates: u64,
    /// Received intact but not in the manifest (e.g. accepted while the client lost the 250).
    pub unexpected: u64,
    /// First IDs of each kind, at most 1000 each, sorted.
    pub lost_ids: Vec<String>,
    pub corrupted_ids: Vec<String>,
    pub unexpected_ids: Vec<String>,
}

impl ManifestCheck {
    /// Anything the relay acknowledged that did not arrive intact.
    pub fn failed(&self) -> bool {
        self.lost > 0 || self.corrupted > 0
    }
}

pub fn check(path: &Path, ids: &[MsgId], complete: bool, seen: &IdRegistry) -> ManifestCheck {
    let mut c = ManifestCheck {
        file: path.display().to_string(),
        complete,
        entries: ids.len() as u64,
        ..ManifestCheck::default()
    };
    let mut set: IdMap<()> = IdMap::default();
    let (mut lost, mut corrupted, mut unexpected) = (Vec::new(), Vec::new(), Vec::new());
    for id in ids {
        if set.insert(*id, ()).is_some() {
            continue;
        }
        let s = seen.get(id);
        if s.intact > 0 {
            c.duplicates += u64::from(s.intact - 1);
        } else if s.corrupted > 0 {
            c.corrupted += 1;
            corrupted.push(*id);
        } else {
            c.lost += 1;
            lost.push(*id);
        }
    }
    c.unique_entries = set.len() as u64;
    seen.for_each(|id, s| {
        if s.intact > 0 && !set.contains_key(id) {
            c.unexpected += 1;
            unexpected.push(*id);
        }
    });
    let list = |mut v: Vec<MsgId>| -> Vec<String> {
        v.sort_unstable();
        v.iter().take(LIST_MAX).map(|i| i.to_string()).collect()
    };
    c.lost_ids = list(lost);
    c.corrupted_ids = list(corrupted);
    c.unexpected_ids = list(unexpected);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_check() {
        let dir = std::env::temp_dir().join(format!("loadgen-manifest-{}", std::process::id()));
        let w = ManifestWriter::create(&dir, 5).unwrap();
        for seq in 0..4 {
            w.record(MsgId { run: 5, seq }).unwrap();
        }
        w.flush().unwrap();
        let (ids, complete) = read(&dir).unwrap();
        assert_eq!(ids.len(), 4);
        assert!(!complete);
        w.finish(4).unwrap();
        assert!(
            read_complete(&dir, std::time::Duration::from_secs(5))
                .unwrap()
                .1
        );

        let seen = IdRegistry::default();
        seen.intact(MsgId { run: 5, seq: 0 });
        seen.intact(MsgId { run: 5, seq: 0 });
        seen.intact(MsgId { run: 5, seq: 1 });
        seen.corrupted(MsgId { run: 5, seq: 2 });
        seen.intact(MsgId { run: 5, seq: 9 });
        let c = check(&dir, &ids, true, &seen);
        assert_eq!(
            (c.lost, c.corrupted, c.duplicates, c.unexpected),
            (1, 1, 1, 1)
        );
        assert_eq!(c.lost_ids, vec!["0000000000000005-3".to_string()]);
        assert!(c.failed());

        std::fs::write(&dir, "# x\n5-1\nbogus\n").unwrap();
        assert!(read(&dir).unwrap_err().contains("line 3"));
        let _ = std::fs::remove_file(&dir);
    }
}
