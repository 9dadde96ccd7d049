//! Each shard's pool of reusable read buffers, so a connection does not allocate a fresh
//! buffer when it starts, and memory freed by closed connections is reused by new ones.
//!
//! Single-threaded by design (`RefCell`): a pool belongs to one shard and never crosses
//! threads.

use std::cell::RefCell;

use bytes::BytesMut;

/// Reusable `BytesMut` buffers of one shard.
#[derive(Debug)]
pub(crate) struct BufferPool {
    free: RefCell<Vec<BytesMut>>,
    buffer_size: usize,
    max_pooled: usize,
    max_keep: usize,
}

impl BufferPool {
    /// A pool handing out buffers of at least `buffer_size` bytes, keeping up to
    /// `max_pooled` free ones, and dropping returned buffers bigger than `max_keep` (one
    /// huge message must not pin its memory forever).
    pub(crate) fn new(buffer_size: usize, max_pooled: usize, max_keep: usize) -> Self {
        BufferPool {
            free: RefCell::new(Vec::new()),
            buffer_size,
            max_pooled,
            max_keep,
        }
    }

    /// An empty buffer with at least the pool's buffer size of capacity.
    pub(crate) fn take(&self) -> BytesMut {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(self.buffer_size))
    }

    /// Returns a buffer to the pool (its content is discarded). Only buffers whose
    /// allocation is between the pool's buffer size and `max_keep` are kept.
    pub(crate) fn give(&self, mut buf: BytesMut) {
        buf.clear();
        // `capacity()` counts only the space after the read position, so an advanced large
        // buffer can look small: `try_reclaim` (which never allocates) sees the whole
        // allocation, and moves the start back when it succeeds.
        if buf.try_reclaim(self.max_keep + 1) || !buf.try_reclaim(self.buffer_size) {
            return;
        }
        let mut free = self.free.borrow_mut();
        if free.len() < self.max_pooled {
            free.push(buf);
        }
    }

    /// Free buffers held (for tests and stats).
    #[cfg(test)]
    pub(crate) fn pooled(&self) -> usize {
        self.free.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let pool = BufferPool::new(1024, 2, 4096);
        let a = pool.take();
        assert!(a.capacity() >= 1024);
        let ptr = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.take().as_ptr(), ptr);
        pool.give(BytesMut::with_capacity(1 << 20));
        assert_eq!(pool.pooled(), 0, "oversized buffers are dropped");
        // A large buffer read almost to its end still counts as large.
        let mut advanced = BytesMut::with_capacity(1 << 16);
        advanced.resize(advanced.capacity() - 100, b'x');
        advanced.advance(advanced.len());
        assert!(
            advanced.capacity() <= 4096,
            "looks small: {}",
            advanced.capacity()
        );
        pool.give(advanced);
        assert_eq!(pool.pooled(), 0, "an advanced large buffer is dropped");
        // A small one read to its end is pooled, whole again.
        let mut small = BytesMut::with_capacity(2048);
        small.resize(2000, b'x');
        small.advance(2000);
        pool.give(small);
        assert_eq!(pool.pooled(), 1);
        assert!(pool.take().capacity() >= 2048);
        for _ in 0..5 {
            pool.give(BytesMut::with_capacity(2048));
        }
        assert_eq!(pool.pooled(), 2);
    }
}
