//! One owner per spool directory: an exclusive `flock` on `DIR/lock`, held for the life of
//! the server. The file also records the owner's PID, so `ringrelay queue flush|remove`
//! can signal a running server.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The held lock; released when dropped (or when the process dies, even by SIGKILL).
#[derive(Debug)]
pub struct SpoolLock {
    _file: File,
}

impl SpoolLock {
    /// Creates `dir` if needed and locks it, or explains who holds it.
    pub fn acquire(dir: &Path) -> io::Result<SpoolLock> {
        std::fs::create_dir_all(dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("spool {}: cannot create: {e}", dir.display()),
            )
        })?;
        let path = dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("spool {}: {e}", path.display())))?;
        if !try_flock(&file)? {
            let holder = owner_pid(dir).map_or_else(String::new, |p| format!(" (pid {p})"));
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "spool {} is in use by another ringrelay{holder}",
                    dir.display()
                ),
            ));
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(SpoolLock { _file: file })
    }
}

/// True when a running server holds the lock on `dir`.
pub fn is_locked(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join("lock")) else {
        return false;
    };
    matches!(try_flock(&file), Ok(false))
}

/// The PID written by the lock's holder, if any.
pub fn owner_pid(dir: &Path) -> Option<u32> {
    let mut s = String::new();
    File::open(dir.join("lock"))
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    s.trim().parse().ok()
}

fn try_flock(file: &File) -> io::Result<bool> {
    // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_owner_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = SpoolLock::acquire(dir.path()).unwrap();
        assert!(is_locked(dir.path()));
        let err = SpoolLock::acquire(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("in use by another ringrelay"),
            "{err}"
        );
        assert_eq!(owner_pid(dir.path()), Some(std::process::id()));
        drop(first);
        assert!(!is_locked(dir.path()));
        assert!(SpoolLock::acquire(dir.path()).is_ok());
    }
}
