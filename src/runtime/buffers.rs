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

    /// Returns a buffer to the pool (its content is discarded).
    pub(crate) fn give(&self, mut buf: BytesMut) {
        buf.clear();
        if buf.capacity() < self.buffer_size || buf.capacity() > self.max_keep {
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
        for _ in 0..5 {
            pool.give(BytesMut::with_capacity(2048));
        }
        assert_eq!(pool.pooled(), 2);
    }
}
