//! `null`: a bdev without storage, for benchmarks (SPEC §2 modules).
//!
//! ```text
//!  submit ─► (read: zero the buffers) ─► done queue ─► poll
//! ```
//!
//! # Design
//! Reads return zeros (the buffers are zeroed), writes are dropped, flush, unmap and write_zeroes
//! succeed at once. Every I/O is completed at the next `poll`, never inside `submit`.
//!
//! # Limitations
//! No fault injection and no artificial latency.

use super::{
    check_geometry, Bdev, BdevError, BdevInfo, BdevIo, Completion, DoneQueue, IoKind, IoKinds, ModuleChannel,
    Rejected,
};

/// A bdev that stores nothing.
pub struct NullBdev {
    info: BdevInfo,
}

impl NullBdev {
    /// A null bdev of `size_bytes` (a non-zero multiple of `block_size`, which is 512 or 4096).
    pub fn new(name: &str, size_bytes: u64, block_size: u32) -> Result<Self, BdevError> {
        let num_blocks = check_geometry(size_bytes, block_size)?;
        let mut info = BdevInfo::new(name, "null", block_size, num_blocks);
        info.supports = IoKinds { flush: true, unmap: true, write_zeroes: true, reset: true };
        info.unmap_reads_zeroes = true;
        Ok(Self { info })
    }
}

impl Bdev for NullBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError> {
        Ok(Box::new(NullChannel { done: DoneQueue::default() }))
    }
}

struct NullChannel {
    done: DoneQueue,
}

impl ModuleChannel for NullChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        if io.kind == IoKind::Read {
            io.bufs.zero();
        }
        self.done.push_ok(io.tag);
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        self.done.drain_into(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::{IoVecs, Registry};
    use std::sync::Arc;

    #[test]
    fn reads_zeros_and_drops_writes() {
        assert!(NullBdev::new("n", 1000, 512).is_err());
        assert!(NullBdev::new("n", 4096, 1024).is_err());
        let reg = Registry::new();
        reg.register(Arc::new(NullBdev::new("n0", 1 << 20, 512).expect("null"))).expect("register");
        let desc = reg.open("n0", true).expect("open");
        let mut ch = desc.channel().expect("channel");
        ch.submit(BdevIo::write(0, 1, IoVecs::from_slice(&[0xaa; 512]), 1));
        let rbuf = IoVecs::from_slice(&[0x55; 512]);
        let view = rbuf.slice(0, 512).expect("view");
        ch.submit(BdevIo::read(0, 1, rbuf, 2));
        ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 3));
        ch.submit(BdevIo::no_data(IoKind::Unmap, 0, 8, 4));
        ch.submit(BdevIo::no_data(IoKind::WriteZeroes, 0, 8, 5));
        let mut done = Vec::new();
        assert_eq!(ch.poll(&mut done), 5);
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert_eq!(view.to_vec(), vec![0u8; 512]);
        assert_eq!(desc.stats().read_ops, 1);
        assert_eq!(desc.stats().write_bytes, 512);
    }
}
