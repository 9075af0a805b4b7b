//! The generic per-thread I/O channel: validation, NOMEM backpressure, one completion path.
//!
//! # Design
//! Every I/O enters through [`Channel::submit`] and leaves through [`Channel::poll`], errors included
//! (SPDK never completes inside `submit_request`; neither do we). Validation follows SPDK's order:
//! write on a read-only descriptor → `ReadOnly`; range overflow or beyond the end → `InvalidRange`;
//! unmap of 0 blocks → `InvalidRange`.
//!
//! # Limitations
//! First cut: no splitting, no write_zeroes emulation, no buffer bouncing yet.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;

use super::{Bdev, BdevIo, Completion, IoError, IoKind, ModuleChannel, Rejected};

/// A per-thread handle for submitting I/O to one bdev.
pub struct Channel {
    bdev: Arc<dyn Bdev>,
    module: Box<dyn ModuleChannel>,
    writable: bool,
    /// Completions produced by the generic layer itself (validation failures, rejects).
    local_done: VecDeque<Completion>,
    /// I/O the module refused with NOMEM, in submission order.
    nomem_queue: VecDeque<BdevIo>,
    /// I/O handed to the module and not yet completed.
    outstanding: usize,
}

impl Channel {
    pub(crate) fn new(bdev: Arc<dyn Bdev>, module: Box<dyn ModuleChannel>, writable: bool) -> Self {
        Self {
            bdev,
            module,
            writable,
            local_done: VecDeque::new(),
            nomem_queue: VecDeque::new(),
            outstanding: 0,
        }
    }

    /// Submits an I/O. Never blocks and never completes inline: the outcome comes from `poll`.
    pub fn submit(&mut self, io: BdevIo) {
        if let Err(e) = self.validate(&io) {
            self.local_done.push_back(Completion { tag: io.tag, result: Err(e) });
            return;
        }
        if !self.nomem_queue.is_empty() {
            // Keep order behind I/O already waiting for resources.
            self.nomem_queue.push_back(io);
            return;
        }
        self.submit_to_module(io);
    }

    fn submit_to_module(&mut self, io: BdevIo) {
        match self.module.submit(io) {
            Ok(()) => self.outstanding += 1,
            Err(Rejected::NoMem(io)) => self.nomem_queue.push_front(io),
            Err(Rejected::Failed(io, e)) => {
                self.local_done.push_back(Completion { tag: io.tag, result: Err(e) })
            }
        }
    }

    fn validate(&self, io: &BdevIo) -> Result<(), IoError> {
        let info = self.bdev.info();
        let is_write = matches!(io.kind, IoKind::Write | IoKind::Unmap | IoKind::WriteZeroes);
        if is_write && !self.writable {
            return Err(IoError::ReadOnly);
        }
        if !info.io_kind_supported(io.kind) {
            return Err(IoError::Unsupported);
        }
        if matches!(io.kind, IoKind::Flush | IoKind::Reset) {
            return Ok(());
        }
        let end = io.offset_blocks.checked_add(io.num_blocks).ok_or(IoError::InvalidRange)?;
        if end > info.num_blocks {
            return Err(IoError::InvalidRange);
        }
        if io.kind == IoKind::Unmap && io.num_blocks == 0 {
            return Err(IoError::InvalidRange);
        }
        if matches!(io.kind, IoKind::Read | IoKind::Write) {
            let want = io.num_blocks.checked_mul(u64::from(info.block_size)).ok_or(IoError::InvalidRange)?;
            if io.bufs.len_bytes() != want {
                return Err(IoError::InvalidRange);
            }
        }
        Ok(())
    }

    /// Appends finished I/O to `done`; returns how many were appended.
    pub fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        let before = done.len();
        done.extend(self.local_done.drain(..));
        let n = self.module.poll(done);
        self.outstanding = self.outstanding.saturating_sub(n);
        // Retry queued I/O once outstanding work has dropped (SPDK's nomem threshold).
        if n > 0 {
            while let Some(io) = self.nomem_queue.pop_front() {
                let queued = self.nomem_queue.len();
                self.submit_to_module(io);
                if self.nomem_queue.len() > queued {
                    break; // refused again
                }
            }
        }
        done.len() - before
    }

    /// I/O submitted and not yet returned by `poll` (including queued and locally failed ones).
    pub fn outstanding(&self) -> usize {
        self.outstanding + self.nomem_queue.len() + self.local_done.len()
    }

    /// An fd an idle poller may sleep on for this channel's completions.
    pub fn wait_fd(&self) -> Option<RawFd> {
        self.module.wait_fd()
    }

    /// The bdev.
    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }
}
