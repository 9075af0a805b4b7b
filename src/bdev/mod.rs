//! The block-device ("bdev") layer: what every storage module plugs into (SPEC §2).
//!
//! ```text
//!  user (vhost queue poller, FTL, cache) ──► Descriptor ──► Channel (generic: checks, split, retry, stats)
//!                                                               │ ModuleChannel (per thread, non-blocking)
//!                                                               ▼
//!                                              module: malloc / null / file / ftl / cache
//! ```
//!
//! # Design
//! * A module implements [`Bdev`] (static facts in [`BdevInfo`], one [`ModuleChannel`] per thread).
//! * Users never talk to a module directly: they open a [`Descriptor`] from the [`Registry`] and get a
//!   generic [`Channel`] per thread. The generic channel validates requests (SPDK's order), emulates
//!   missing I/O types, splits on the optimal boundary, queues on NOMEM and keeps statistics, so each
//!   module stays small.
//! * Submission never completes inline: every outcome, errors included, comes out of `poll`.
//! * Completion order may differ from submission order; completions carry the caller's `tag`.
//! * Statistics per bdev ([`BdevStats`]) live with the registry entry and outlive channels.
//!
//! * QoS limits and the reset freeze are per bdev ([`BdevControl`], shared by its channels).
//!
//! # Limitations
//! No shared backpressure queue between bdevs on one underlying channel, no internal buffer pools.

pub mod channel;
pub mod delay;
pub mod file;
mod file_inline;
pub mod iov;
pub mod malloc;
pub mod null;
pub mod qos;
#[cfg(test)]
mod qos_reset_tests;
pub mod rbd;
pub mod registry;
pub mod stats;
#[cfg(test)]
pub(crate) mod tests;
pub(crate) mod waitset;

pub use channel::{BdevControl, Channel, Lane};
pub use iov::{AlignedBuf, IoVecs, IovList};
pub use registry::{Descriptor, Registry, RemoveCallback};
pub use stats::{BdevStats, BdevStatsSnapshot};

use std::os::fd::RawFd;

/// The kinds of bdev I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoKind {
    /// Read `num_blocks` at `offset_blocks` into the buffers.
    Read,
    /// Write the buffers at `offset_blocks`.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Deallocate a range; it reads back as zeros afterwards when the module says so.
    Unmap,
    /// Write zeros over a range (may deallocate).
    WriteZeroes,
    /// Abort everything outstanding on the module.
    Reset,
}

/// Which I/O kinds a module supports natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct IoKinds {
    /// `IoKind::Flush`.
    pub flush: bool,
    /// `IoKind::Unmap`.
    pub unmap: bool,
    /// `IoKind::WriteZeroes` natively (otherwise the generic layer emulates it with writes).
    pub write_zeroes: bool,
    /// `IoKind::Reset`.
    pub reset: bool,
}

/// Static facts about a bdev, declared by its module.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BdevInfo {
    /// Unique name.
    pub name: String,
    /// Module that created it (`malloc`, `file`, ...).
    pub module: &'static str,
    /// UUID (random unless the module persists one).
    pub uuid: [u8; 16],
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Number of logical blocks.
    pub num_blocks: u64,
    /// Optimal I/O boundary in blocks (0 = none).
    pub optimal_io_boundary_blocks: u32,
    /// Split reads/writes that cross `optimal_io_boundary_blocks` into children.
    pub split_on_optimal_io_boundary: bool,
    /// Required buffer alignment in bytes (1 = any); the generic layer bounces unaligned buffers.
    pub buf_align: u32,
    /// Largest read/write in blocks the module accepts in one I/O (0 = no limit); the generic layer splits.
    pub max_io_blocks: u32,
    /// Largest unmap in blocks (0 = no limit).
    pub max_unmap_blocks: u64,
    /// Largest write_zeroes in blocks (0 = no limit).
    pub max_write_zeroes_blocks: u64,
    /// The module has a volatile write cache: writes need a flush to be durable.
    pub volatile_write_cache: bool,
    /// Unmapped blocks read back as zeros.
    pub unmap_reads_zeroes: bool,
    /// Natively supported optional I/O kinds.
    pub supports: IoKinds,
}

impl BdevInfo {
    /// A plain info record with common defaults; modules adjust fields.
    pub fn new(name: &str, module: &'static str, block_size: u32, num_blocks: u64) -> Self {
        Self {
            name: name.to_string(),
            module,
            uuid: random_uuid(),
            block_size,
            num_blocks,
            optimal_io_boundary_blocks: 0,
            split_on_optimal_io_boundary: false,
            buf_align: 1,
            max_io_blocks: 0,
            max_unmap_blocks: 0,
            max_write_zeroes_blocks: 0,
            volatile_write_cache: false,
            unmap_reads_zeroes: false,
            supports: IoKinds::default(),
        }
    }

    /// Capacity in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks.saturating_mul(u64::from(self.block_size))
    }

    /// True when `kind` can be submitted (natively or emulated by the generic layer).
    pub fn io_kind_supported(&self, kind: IoKind) -> bool {
        match kind {
            IoKind::Read | IoKind::Write => true,
            IoKind::Flush => self.supports.flush,
            IoKind::Unmap => self.supports.unmap,
            IoKind::WriteZeroes => true,
            // The generic layer freezes and aborts; the module sees the reset only if it supports it.
            IoKind::Reset => true,
        }
    }
}

/// Checks a module's size and block size: 512 or 4096-byte blocks, a non-zero whole number of them.
/// Returns the number of blocks.
pub fn check_geometry(size_bytes: u64, block_size: u32) -> Result<u64, BdevError> {
    if block_size != 512 && block_size != 4096 {
        return Err(BdevError::InvalidConfig(format!("block size {block_size} is not 512 or 4096")));
    }
    if size_bytes == 0 || size_bytes % u64::from(block_size) != 0 {
        return Err(BdevError::InvalidConfig(format!(
            "size {size_bytes} is zero or not a multiple of the block size {block_size}"
        )));
    }
    Ok(size_bytes / u64::from(block_size))
}

/// Completions of a module that finishes I/O inside `submit` and reports it at `poll`.
#[derive(Default)]
pub struct DoneQueue(std::collections::VecDeque<Completion>);

impl DoneQueue {
    /// Records a successful completion of `tag`.
    pub fn push_ok(&mut self, tag: u64) {
        self.0.push_back(Completion { tag, result: Ok(()) });
    }

    /// True when no completion is recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Moves every recorded completion to `done`; returns how many.
    pub fn drain_into(&mut self, done: &mut Vec<Completion>) -> usize {
        let n = self.0.len();
        done.extend(self.0.drain(..));
        n
    }
}

/// A random version-4 UUID from the OS RNG (falls back to time and pid).
pub fn random_uuid() -> [u8; 16] {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// One bdev I/O.
#[derive(Debug)]
pub struct BdevIo {
    /// What to do.
    pub kind: IoKind,
    /// First block.
    pub offset_blocks: u64,
    /// Number of blocks (ignored for flush and reset).
    pub num_blocks: u64,
    /// Data memory for read/write; empty otherwise.
    pub bufs: IoVecs,
    /// The submitter's tag, returned in the completion.
    pub tag: u64,
}

impl BdevIo {
    /// A read of `num_blocks` at `offset_blocks` into `bufs`.
    pub fn read(offset_blocks: u64, num_blocks: u64, bufs: IoVecs, tag: u64) -> Self {
        Self { kind: IoKind::Read, offset_blocks, num_blocks, bufs, tag }
    }
    /// A write of `bufs` at `offset_blocks`.
    pub fn write(offset_blocks: u64, num_blocks: u64, bufs: IoVecs, tag: u64) -> Self {
        Self { kind: IoKind::Write, offset_blocks, num_blocks, bufs, tag }
    }
    /// An I/O without data (flush, unmap, write_zeroes, reset).
    pub fn no_data(kind: IoKind, offset_blocks: u64, num_blocks: u64, tag: u64) -> Self {
        Self { kind, offset_blocks, num_blocks, bufs: IoVecs::empty(), tag }
    }
}

/// Why an I/O failed. Small and `Copy` so completions stay cheap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// Write-type I/O on a read-only descriptor (`EBADF`).
    #[error("write on a read-only descriptor")]
    ReadOnly,
    /// Range overflow, beyond the end, zero-length unmap, or buffer length mismatch (`EINVAL`).
    #[error("invalid range or length")]
    InvalidRange,
    /// The bdev does not support this kind of I/O.
    #[error("I/O type not supported")]
    Unsupported,
    /// The module failed the I/O with this errno.
    #[error("I/O error (errno {0})")]
    Errno(i32),
    /// Media error reported by the device (status code).
    #[error("media error (status {0:#x})")]
    Media(u16),
    /// The bdev was removed or is shutting down.
    #[error("bdev removed")]
    Removed,
    /// Aborted by a reset.
    #[error("aborted by reset")]
    Aborted,
}

/// A finished I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The tag given at submission.
    pub tag: u64,
    /// Outcome.
    pub result: Result<(), IoError>,
}

/// Why a module did not take an I/O; ownership of the I/O goes back to the caller.
#[derive(Debug)]
pub enum Rejected {
    /// Out of resources right now: retry after some I/O completes (never an error to the user).
    NoMem(BdevIo),
    /// Failed before starting; the generic layer reports it as a completion.
    Failed(BdevIo, IoError),
}

/// Errors of the bdev layer's management operations (registry, descriptors, module creation).
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// Name or alias already used (`EEXIST`).
    #[error("bdev name '{0}' already exists")]
    Exists(String),
    /// No bdev of that name or alias.
    #[error("no bdev named '{0}'")]
    NotFound(String),
    /// Claimed by a module: write opens and other claims fail (`EPERM`).
    #[error("bdev '{name}' is claimed by '{by}'")]
    Claimed {
        /// Bdev.
        name: String,
        /// The claiming module.
        by: String,
    },
    /// The bdev is being removed.
    #[error("bdev '{0}' is being removed")]
    Removing(String),
    /// Invalid parameters for a module.
    #[error("{0}")]
    InvalidConfig(String),
    /// I/O error while setting up or tearing down.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A module-specific failure.
    #[error("{0}")]
    Module(String),
}

impl BdevError {
    /// Wraps an OS error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

/// What a storage module implements.
pub trait Bdev: Send + Sync {
    /// Static facts.
    fn info(&self) -> &BdevInfo;
    /// A new per-thread channel. Called on the thread that will use it.
    fn create_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError>;
    /// Flush and release resources at teardown (after every channel is gone).
    fn shutdown(&self) -> Result<(), BdevError> {
        Ok(())
    }
    /// Module-specific statistics as JSON, if any.
    fn module_stats(&self) -> Option<serde_json::Value> {
        None
    }
    /// The module object, for management calls specific to one module (the control socket's
    /// `cache-mode-set`, ...). Modules without such calls keep the default.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// A module's per-thread I/O channel. Never shared between threads while in use.
pub trait ModuleChannel: Send {
    /// Starts an I/O without blocking. Must not complete it inline: the completion comes from `poll`.
    /// The generic layer has already validated range, direction and buffer length.
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected>;
    /// Appends finished I/O to `done`; returns how many were appended.
    fn poll(&mut self, done: &mut Vec<Completion>) -> usize;
    /// An fd that becomes readable when `poll` has work (for an idle poller to sleep on).
    fn wait_fd(&self) -> Option<RawFd> {
        None
    }
    /// The owner is about to sleep on [`ModuleChannel::wait_fd`]: clear readiness that completions
    /// already taken left behind (an eventfd signalled after its completion was collected). A stacked
    /// module that does not poll its idle channels below drains them here; otherwise a stale signal
    /// would wake its owner at once, every time it tries to sleep. Returns true when work turned up
    /// (the owner polls again instead of sleeping); nothing is lost either way.
    fn before_sleep(&mut self) -> bool {
        false
    }
    /// The owner's batch time (see [`Channel::set_batch_time`]) as a stamp (nanoseconds on the
    /// channels' clock, converted once by the top channel): a stacked module passes it on to the
    /// channels it submits to, so its children cost no clock read or conversion either.
    fn set_batch_stamp(&mut self, _now_ns: u64) {}
    /// When the last `poll` returned completions and read the clock for them (a stacked module
    /// stamping its own statistics): that reading, as a stamp on the channels' clock. The owner
    /// uses it for the same completions instead of reading the clock again.
    fn completion_stamp(&self) -> Option<u64> {
        None
    }
}
