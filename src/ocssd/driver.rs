//! The transport-neutral media driver interface: one [`MediaDevice`], one [`QueuePair`]
//! per polling thread.
//!
//! ```text
//!   FTL thread 0          FTL thread 1
//!   QueuePair ──┐         QueuePair ──┐          submit(Command)  non-blocking
//!               ▼                     ▼          poll(&mut Vec<Completion>)
//!          ┌──────────── MediaDevice ────────────┐   info() / chunk_info() / report_chunks()
//!          │ emulator (file)  │  NVMe (OCSSD/ZNS) │   take_notifications()
//!          └─────────────────────────────────────┘
//! ```
//!
//! # Design
//! * **Queue pairs.** `MediaDevice::queue_pair` creates one per thread; a queue pair is
//!   `Send` but not shared (`&mut self` everywhere), like an NVMe SQ/CQ pair. `submit` never
//!   blocks and never completes the command itself: every outcome, including a media error,
//!   comes out of `poll` as a [`Completion`] tagged with the caller's `tag`. A full queue
//!   hands the command back in [`Rejected`] ("retry later", not a failure).
//!   `wait_fd` is an fd that is readable while completions are pending, for a poller that
//!   wants to sleep.
//! * **Buffers (zero copy).** Data travels in an [`SgList`] of [`IoBuf`] segments and the
//!   per-block out-of-band metadata in one [`IoBuf`] (`num_blocks × oob_bytes`). An `IoBuf`
//!   either owns heap memory (`IoBuf::from_vec`) or wraps caller memory
//!   (`unsafe IoBuf::from_raw`, optionally holding an `Arc` that keeps it alive). The
//!   command *moves* its buffers into the queue pair and the completion *moves them back*
//!   ([`Completion::buffers`]), so the transport reads and writes the caller's memory
//!   directly (the NVMe transport will DMA into it) and the caller cannot touch it while the
//!   command is in flight.
//! * **Addresses.** Commands carry unpacked [`Ppa`]s in a [`PpaList`] (1..=64 entries, the
//!   OCSSD vector limit); the transport packs them with the device's [`PpaFormat`].
//! * **Zoned namespaces.** A ZNS zone maps to a chunk with a write pointer:
//!   [`Op::Reset`] = zone reset, [`MediaDevice::report_chunks`] = zone report,
//!   [`Op::Append`] = zone append (the device picks the address and returns it in
//!   [`Completion::appended_at`]). A ZNS transport accepts PPA lists that are contiguous
//!   within one zone; [`MediaInfo::capabilities`] tells what is supported so the FTL
//!   never needs to know which transport it runs on.
//!
//! # Limitations
//! Data buffers are not checked for DMA alignment here; the NVMe transport will bounce or
//! refuse misaligned ones.

use std::any::Any;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use thiserror::Error;

use super::ppa::{Ppa, PpaFormat};
use super::spec::{ChunkInfo, ChunkNotification, Geometry, Status, MAX_VECTOR_LBAS};
use super::vector::LbaBitmap;

/// Errors of the media layer (device creation, image handling, admin calls).
#[derive(Debug, Error)]
pub enum MediaError {
    /// An OS call on the image failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A configuration value is invalid; `field` uses the OCSSD spec's name.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// Spec field name (`num_grp`, `ws_opt`, ...).
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The file is not a vblkd OCSSD image (wrong magic).
    #[error("{path} is not a vblkd OCSSD image (bad magic)")]
    NotAnImage {
        /// Image path.
        path: String,
    },
    /// The image format version is not supported.
    #[error("{path}: image format version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion {
        /// Image path.
        path: String,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The header checksum does not match (torn or corrupted header).
    #[error("{path}: image header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): torn or corrupt header")]
    HeaderChecksum {
        /// Image path.
        path: String,
        /// Stored crc32c.
        stored: u32,
        /// Computed crc32c.
        computed: u32,
    },
    /// The header is well formed but describes an impossible layout.
    #[error("{path}: corrupt image header: {reason}")]
    CorruptHeader {
        /// Image path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file is shorter than its header says.
    #[error("{path}: image truncated: header says {expected_bytes} bytes, file has {found_bytes}")]
    Truncated {
        /// Image path.
        path: String,
        /// Length from the header.
        expected_bytes: u64,
        /// Actual length.
        found_bytes: u64,
    },
    /// A persisted chunk table entry is corrupt.
    #[error("{path}: chunk table entry {index} is corrupt: {reason}")]
    CorruptChunkEntry {
        /// Image path.
        path: String,
        /// Chunk index.
        index: u64,
        /// Why.
        reason: String,
    },
    /// The image would not fit on its file system.
    #[error("image of {needed_bytes} bytes does not fit: {available_bytes} bytes free on the file system of {path}")]
    NoSpace {
        /// Image path.
        path: String,
        /// Image size.
        needed_bytes: u64,
        /// Free space.
        available_bytes: u64,
    },
    /// A chunk address is outside the geometry.
    #[error("chunk {ppa} is outside the geometry")]
    ChunkOutOfRange {
        /// The address.
        ppa: Ppa,
    },
    /// A PPA list is empty or longer than 64 entries.
    #[error("PPA list of {0} entries; 1..=64 allowed")]
    BadPpaList(usize),
}

/// What kind of device sits behind the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    /// Open-Channel SSD 2.0 (emulated or NVMe).
    OpenChannel,
    /// NVMe Zoned Namespace: a zone is a chunk.
    Zoned,
}

/// Optional features of a transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Capabilities {
    /// PPA lists may mix chunks and be non-contiguous (OCSSD vector I/O).
    pub scattered_lists: bool,
    /// [`Op::Copy`] is supported.
    pub copy: bool,
    /// [`Op::Append`] is supported.
    pub append: bool,
    /// A free chunk may be reset again.
    pub multiple_resets: bool,
    /// An open chunk may be reset.
    pub early_reset: bool,
}

/// Static description of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaInfo {
    /// OCSSD or ZNS.
    pub kind: MediaKind,
    /// The OCSSD 2.0 geometry (for ZNS: synthesised, one chunk per zone).
    pub geometry: Geometry,
    /// How to pack addresses.
    pub ppa_format: PpaFormat,
    /// Logical block size in bytes.
    pub block_size_bytes: u32,
    /// Out-of-band metadata bytes per block.
    pub oob_bytes_per_block: u32,
    /// Largest PPA list of one command.
    pub max_lbas_per_cmd: usize,
    /// Optional features.
    pub capabilities: Capabilities,
}

impl MediaInfo {
    /// Index of a chunk in the chunk information log: `(grp*num_pu + pu)*num_chk + chk`,
    /// or `None` outside the geometry.
    pub fn chunk_index(&self, ppa: &Ppa) -> Option<u64> {
        let g = &self.geometry;
        if ppa.grp >= u64::from(g.num_grp) || ppa.pu >= u64::from(g.num_pu) || ppa.chk >= u64::from(g.num_chk)
        {
            return None;
        }
        Some((ppa.grp * u64::from(g.num_pu) + ppa.pu) * u64::from(g.num_chk) + ppa.chk)
    }

    /// The chunk address of a chunk index (inverse of [`MediaInfo::chunk_index`]).
    pub fn chunk_at(&self, index: u64) -> Option<Ppa> {
        let g = &self.geometry;
        if index >= g.total_chunks() {
            return None;
        }
        let num_chk = u64::from(g.num_chk);
        let num_pu = u64::from(g.num_pu);
        let chk = index % num_chk;
        let pu_index = index / num_chk;
        Some(Ppa::new(pu_index / num_pu, pu_index % num_pu, chk, 0))
    }
}

/// Where the memory of an [`IoBuf`] comes from.
enum Owner {
    /// Heap memory owned by the buffer.
    Heap(Vec<u8>),
    /// Caller memory, kept alive by this handle.
    Shared(#[allow(dead_code)] Arc<dyn Any + Send + Sync>),
    /// Caller memory whose lifetime the caller guarantees.
    Caller,
}

/// One contiguous I/O buffer: owned heap memory or caller memory (zero copy).
pub struct IoBuf {
    ptr: NonNull<u8>,
    len_bytes: usize,
    owner: Owner,
}

// SAFETY: an IoBuf is the unique handle to its memory (a Vec it owns, or caller memory
// whose exclusive use the caller granted in `from_raw`), so moving it to another thread
// moves that exclusive access with it.
unsafe impl Send for IoBuf {}

impl IoBuf {
    /// A zero-filled heap buffer.
    pub fn zeroed(len_bytes: usize) -> Self {
        Self::from_vec(vec![0u8; len_bytes])
    }

    /// Takes ownership of a vector.
    pub fn from_vec(mut v: Vec<u8>) -> Self {
        let len_bytes = v.len();
        // A Vec's pointer is never null (dangling but non-null when empty), and it stays
        // put when the Vec is moved into `owner`.
        let ptr = NonNull::new(v.as_mut_ptr()).unwrap_or(NonNull::dangling());
        IoBuf { ptr, len_bytes, owner: Owner::Heap(v) }
    }

    /// Wraps caller memory without copying.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len_bytes` bytes and not be accessed
    /// by anyone else until this `IoBuf` is dropped (it comes back in the completion);
    /// if `keep_alive` is given, the memory must stay valid at least as long as it.
    pub unsafe fn from_raw(
        ptr: NonNull<u8>,
        len_bytes: usize,
        keep_alive: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Self {
        IoBuf {
            ptr,
            len_bytes,
            owner: match keep_alive {
                Some(a) => Owner::Shared(a),
                None => Owner::Caller,
            },
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len_bytes
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len_bytes == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len_bytes` bytes (owned Vec, or the `from_raw`
        // contract) and this IoBuf has exclusive access; `&self` forbids concurrent writes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len_bytes) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len_bytes) }
    }

    /// Raw address, for a DMA-capable transport.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The owned vector back, if this buffer owns heap memory.
    pub fn into_vec(self) -> Option<Vec<u8>> {
        match self.owner {
            Owner::Heap(v) => Some(v),
            Owner::Shared(_) | Owner::Caller => None,
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.owner {
            Owner::Heap(_) => "heap",
            Owner::Shared(_) => "shared",
            Owner::Caller => "caller",
        };
        write!(f, "IoBuf({kind}, {} bytes)", self.len_bytes)
    }
}

/// A scatter-gather list of [`IoBuf`] segments, viewed as one byte range.
#[derive(Debug, Default)]
pub struct SgList {
    segments: Vec<IoBuf>,
    len_bytes: usize,
}

impl SgList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a segment.
    pub fn push(&mut self, seg: IoBuf) {
        self.len_bytes += seg.len();
        self.segments.push(seg);
    }

    /// Total length in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// The segments.
    pub fn segments(&self) -> &[IoBuf] {
        &self.segments
    }

    /// The segments back, to recycle them.
    pub fn into_segments(self) -> Vec<IoBuf> {
        self.segments
    }

    /// Calls `f` with each piece of bytes `[offset, offset+len)`, in order; returns false
    /// if the range is outside the list.
    pub fn for_each_piece(&self, offset: usize, len: usize, mut f: impl FnMut(&[u8])) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        if end > self.len_bytes {
            return false;
        }
        let mut seg_start = 0usize;
        for seg in &self.segments {
            let seg_end = seg_start + seg.len();
            let lo = offset.max(seg_start);
            let hi = end.min(seg_end);
            if lo < hi {
                f(&seg.as_slice()[lo - seg_start..hi - seg_start]);
            }
            if seg_end >= end {
                break;
            }
            seg_start = seg_end;
        }
        true
    }

    /// Like [`SgList::for_each_piece`], writable; `f` may fail and stops the walk.
    pub fn try_for_each_piece_mut<E>(
        &mut self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(&mut [u8]) -> Result<(), E>,
    ) -> Option<Result<(), E>> {
        let end = offset.checked_add(len)?;
        if end > self.len_bytes {
            return None;
        }
        let mut seg_start = 0usize;
        for seg in &mut self.segments {
            let seg_end = seg_start + seg.len();
            let lo = offset.max(seg_start);
            let hi = end.min(seg_end);
            if lo < hi {
                if let Err(e) = f(&mut seg.as_mut_slice()[lo - seg_start..hi - seg_start]) {
                    return Some(Err(e));
                }
            }
            if seg_end >= end {
                break;
            }
            seg_start = seg_end;
        }
        Some(Ok(()))
    }

    /// Copies the whole list into one vector (for tests and slow paths).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len_bytes);
        for s in &self.segments {
            out.extend_from_slice(s.as_slice());
        }
        out
    }
}

impl From<IoBuf> for SgList {
    fn from(b: IoBuf) -> Self {
        let mut l = SgList::new();
        l.push(b);
        l
    }
}

impl From<Vec<u8>> for SgList {
    fn from(v: Vec<u8>) -> Self {
        IoBuf::from_vec(v).into()
    }
}

/// A list of 1..=64 addresses: one vector command's LBA list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PpaList(Vec<Ppa>);

impl PpaList {
    /// Checks the length (1..=64).
    pub fn new(ppas: Vec<Ppa>) -> Result<Self, MediaError> {
        if ppas.is_empty() || ppas.len() > MAX_VECTOR_LBAS {
            return Err(MediaError::BadPpaList(ppas.len()));
        }
        Ok(PpaList(ppas))
    }

    /// `num_blocks` consecutive blocks of one chunk from `start`.
    pub fn contiguous(start: Ppa, num_blocks: usize) -> Result<Self, MediaError> {
        if num_blocks == 0 || num_blocks > MAX_VECTOR_LBAS {
            return Err(MediaError::BadPpaList(num_blocks));
        }
        let ppas: Option<Vec<Ppa>> =
            (0..num_blocks as u64).map(|i| start.lbk.checked_add(i).map(|lbk| start.with_lbk(lbk))).collect();
        // An overflowing block number cannot address any device: refuse the list.
        Self::new(ppas.ok_or(MediaError::BadPpaList(num_blocks))?)
    }

    /// The addresses.
    pub fn as_slice(&self) -> &[Ppa] {
        &self.0
    }

    /// Number of entries (1..=64).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false (a list has at least one entry); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One media operation.
#[derive(Debug)]
pub enum Op {
    /// Vector chunk reset (0x90): each entry names a chunk (its `lbk` is ignored).
    Reset {
        /// Chunks to reset.
        chunks: PpaList,
    },
    /// Vector write (0x91): `data` holds `ppas.len()` blocks, `oob` (if any)
    /// `ppas.len() × oob_bytes` bytes; missing OOB is written as zeros.
    Write {
        /// Destination blocks, in write order.
        ppas: PpaList,
        /// Block data.
        data: SgList,
        /// Per-block out-of-band metadata.
        oob: Option<IoBuf>,
    },
    /// Vector read (0x92) into `data` (and `oob`, if given).
    Read {
        /// Source blocks.
        ppas: PpaList,
        /// Receives the block data.
        data: SgList,
        /// Receives the per-block out-of-band metadata.
        oob: Option<IoBuf>,
    },
    /// Vector copy (0x93): block `src[i]` (data and OOB) to `dst[i]`; `dst` follows the
    /// write rules.
    Copy {
        /// Source blocks.
        src: PpaList,
        /// Destination blocks.
        dst: PpaList,
    },
    /// Zone-append style write: `num_blocks` blocks at the chunk's write pointer; the
    /// address used comes back in [`Completion::appended_at`].
    Append {
        /// The chunk (`lbk` ignored).
        chunk: Ppa,
        /// Block data (`num_blocks × block_size`).
        data: SgList,
        /// Per-block out-of-band metadata.
        oob: Option<IoBuf>,
    },
    /// Make all completed writes durable.
    Flush,
}

/// A command: an operation and the caller's tag.
#[derive(Debug)]
pub struct Command {
    /// Returned unchanged in the completion.
    pub tag: u64,
    /// What to do.
    pub op: Op,
}

/// Buffers handed back by a completion.
#[derive(Debug, Default)]
pub struct Buffers {
    /// The data list of a read, write or append.
    pub data: Option<SgList>,
    /// The OOB buffer of a read, write or append.
    pub oob: Option<IoBuf>,
}

/// The outcome of one command.
#[derive(Debug)]
pub struct Completion {
    /// The command's tag.
    pub tag: u64,
    /// Overall status: success, or the first error met.
    pub status: Status,
    /// Per-LBA failures: bit `i` set when list entry `i` failed.
    pub failed: LbaBitmap,
    /// For [`Op::Append`]: address of the first block written.
    pub appended_at: Option<Ppa>,
    /// The command's buffers, returned to the caller.
    pub buffers: Buffers,
}

/// Why a submission was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The queue is full: poll, then submit again.
    QueueFull,
}

/// A refused submission: the command comes back untouched.
#[derive(Debug)]
pub struct Rejected {
    /// The command.
    pub command: Command,
    /// Why.
    pub reason: RejectReason,
}

/// One thread's submission/completion queue pair.
pub trait QueuePair: Send {
    /// Queues a command without blocking. Media errors are reported by `poll`, never here.
    fn submit(&mut self, cmd: Command) -> Result<(), Rejected>;
    /// Moves up to `max` completions into `done`; returns how many.
    fn poll(&mut self, done: &mut Vec<Completion>, max: usize) -> usize;
    /// Commands submitted and not yet returned by `poll`.
    fn in_flight(&self) -> usize;
    /// Queue depth: `submit` refuses beyond this many in flight.
    fn depth(&self) -> usize;
    /// An fd readable while completions are pending (for an idle poller's sleep).
    fn wait_fd(&self) -> Option<RawFd> {
        None
    }
}

/// A media device: geometry, chunk table, and queue pairs.
pub trait MediaDevice: Send + Sync {
    /// Static description.
    fn info(&self) -> &MediaInfo;
    /// One chunk's information entry (its `lbk` is ignored).
    fn chunk_info(&self, chunk: Ppa) -> Result<ChunkInfo, MediaError>;
    /// Chunk information entries from log index `first_index` (see
    /// [`MediaInfo::chunk_index`]), at most `max`, appended to `out`; returns how many.
    fn report_chunks(
        &self,
        first_index: u64,
        max: usize,
        out: &mut Vec<ChunkInfo>,
    ) -> Result<usize, MediaError>;
    /// Moves the pending chunk notifications (oldest first) into `out`; returns how many.
    fn take_notifications(&self, out: &mut Vec<ChunkNotification>) -> usize;
    /// A new queue pair of the given depth, for one thread.
    fn queue_pair(&self, depth: usize) -> Result<Box<dyn QueuePair>, MediaError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sglist_pieces_cross_segments() {
        let mut l = SgList::new();
        l.push(IoBuf::from_vec(vec![1, 2, 3]));
        l.push(IoBuf::from_vec(vec![4, 5]));
        l.push(IoBuf::from_vec(vec![6, 7, 8, 9]));
        let mut got = Vec::new();
        assert!(l.for_each_piece(2, 5, |p| got.push(p.to_vec())));
        assert_eq!(got, vec![vec![3], vec![4, 5], vec![6, 7]]);
        assert!(!l.for_each_piece(5, 5, |_| {}));
        assert!(!l.for_each_piece(usize::MAX, 2, |_| {}));
        let r: Option<Result<(), ()>> = l.try_for_each_piece_mut(1, 3, |p| {
            p.fill(0);
            Ok(())
        });
        assert_eq!(r, Some(Ok(())));
        assert_eq!(l.to_vec(), vec![1, 0, 0, 0, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn caller_memory_is_not_copied() {
        let mut backing = vec![0u8; 16];
        let ptr = NonNull::new(backing.as_mut_ptr()).expect("non-null");
        // SAFETY: `backing` outlives `buf` and is not touched while `buf` lives.
        let mut buf = unsafe { IoBuf::from_raw(ptr, 16, None) };
        buf.as_mut_slice()[3] = 42;
        assert!(buf.into_vec().is_none());
        assert_eq!(backing[3], 42);
    }

    #[test]
    fn ppa_list_limits() {
        assert!(matches!(PpaList::new(vec![]), Err(MediaError::BadPpaList(0))));
        assert!(PpaList::contiguous(Ppa::default(), 64).is_ok());
        assert!(matches!(PpaList::contiguous(Ppa::default(), 65), Err(MediaError::BadPpaList(65))));
        assert!(PpaList::contiguous(Ppa::new(0, 0, 0, u64::MAX), 2).is_err());
    }
}
