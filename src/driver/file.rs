//! Reading spool files on the shard's own driver: through io_uring on an io_uring shard,
//! with a plain positioned read (`pread`) on an epoll shard or outside any shard. The
//! queue manager reads a message back this way when its content was not kept in memory
//! (deferred, large, or recovered messages).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::outbound;
use super::IoDriver;

/// Reads exactly `len` bytes at `pos` of `file` (the caller's own descriptor, closed when
/// the read is done).
pub(crate) async fn read_exact_at(file: File, pos: u64, len: usize) -> io::Result<Vec<u8>> {
    match outbound::current_driver() {
        IoDriver::Uring => {
            let f = tokio_uring::fs::File::from_std(file);
            // tokio-uring fills a Vec from its start up to its capacity.
            let (read, buf) = f.read_exact_at(Vec::with_capacity(len), pos).await;
            let closed = f.close().await;
            read?;
            closed?;
            Ok(buf)
        }
        IoDriver::Epoll => {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, pos)?;
            Ok(buf)
        }
    }
}
