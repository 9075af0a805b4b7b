//! Parsing of one virtio-blk descriptor chain into a [`Request`] (SPEC §1).
//!
//! ```text
//!  [header 16 B, readable] [data 0..seg_max, IN: writable / OUT, DISCARD, WZ: readable] [status >= 1 B, writable]
//! ```
//!
//! # Design
//! [`Request::parse`] is the one pure function that checks everything a guest controls: chain
//! shape, directions, guest-memory bounds, length overflow, sector range and alignment, segment
//! counts, discard/write-zeroes segments. Execution never re-checks guest input. Data buffers are
//! turned into host `iovec`s with vm-memory's checked look-ups (`get_slices`), which split a range
//! at region ends and refuse anything outside the guest's regions.
//!
//! A chain that fails is described by a [`BadRequest`]: the error (whose [`ParseError::status`] is
//! the virtio status) plus the status byte's address when that byte is usable. The caller writes the
//! status there, or returns the chain with used length 0 when there is none.
//!
//! # Limitations
//! * The 16-byte header must be in the first descriptor and the status byte in the last (the status
//!   is the last byte of the last descriptor); Linux, QEMU and libblkio all frame requests this way.
//! * One discard / write-zeroes segment per request (`max_discard_seg = max_write_zeroes_seg = 1`).
//! * Descriptor loops: virtio-queue's chain iterator stops after `queue size` descriptors (or the
//!   indirect table size) and on any unreadable descriptor; a chain whose last yielded descriptor
//!   still has `NEXT` set was cut short and is refused without a status write.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

/// Guest memory as the device maps it (no dirty-page bitmap).
pub type GuestMem = GuestMemoryMmap<()>;

/// Bytes per virtio sector.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Length of the request header.
const HEADER_LEN: u32 = 16;
/// Length of one discard / write-zeroes segment.
const DWZ_SEG_LEN: u32 = 16;

/// Device limits the parser enforces (the same values the config space advertises).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Logical block size of the bdev in bytes (512 or 4096): offsets and lengths are multiples.
    pub block_size: u32,
    /// Maximum number of data descriptors (`seg_max`).
    pub seg_max: u32,
    /// Maximum bytes in one data descriptor (`size_max`).
    pub size_max: u32,
    /// Maximum sectors in one discard (`max_discard_sectors`); discard is refused when `discard` is false.
    pub max_discard_sectors: u32,
    /// Maximum sectors in one write-zeroes (`max_write_zeroes_sectors`).
    pub max_write_zeroes_sectors: u32,
    /// DISCARD offered.
    pub discard: bool,
    /// Read-only export: OUT, DISCARD and WRITE_ZEROES fail.
    pub read_only: bool,
}

/// Why a chain was refused. [`ParseError::status`] gives the virtio status for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The chain yielded no descriptor at all.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain was cut short (loop, longer than the queue, unreadable or bad indirect table).
    #[error("descriptor chain truncated (loop or unreadable descriptor)")]
    Truncated,
    /// The last descriptor is not writable, empty, or outside guest memory.
    #[error("no usable status descriptor")]
    BadStatus,
    /// Only one descriptor: no header.
    #[error("no request header")]
    MissingHeader,
    /// The first descriptor is writable.
    #[error("request header is device-writable")]
    HeaderWritable,
    /// The first descriptor is shorter than 16 bytes.
    #[error("request header shorter than 16 bytes")]
    HeaderTooShort,
    /// The header is outside guest memory.
    #[error("request header outside guest memory")]
    HeaderOutOfMemory,
    /// More data descriptors than `seg_max`.
    #[error("more data segments than seg_max")]
    TooManySegments,
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor has the wrong direction")]
    WrongDirection,
    /// A data descriptor is (partly) outside guest memory.
    #[error("data buffer outside guest memory")]
    DataOutOfMemory,
    /// A data descriptor is longer than `size_max`.
    #[error("data segment longer than size_max")]
    SegmentTooLarge,
    /// Total data length overflowed.
    #[error("data length overflow")]
    LengthOverflow,
    /// A read/write without data, or GET_ID without a buffer.
    #[error("request without data")]
    NoData,
    /// Offset or length not a multiple of the block size.
    #[error("sector or length not aligned to the block size")]
    Misaligned,
    /// The range ends beyond the capacity (or overflows).
    #[error("sector range beyond capacity")]
    OutOfRange,
    /// A write-type request on a read-only export.
    #[error("write to a read-only device")]
    ReadOnly,
    /// Discard/write-zeroes payload not exactly one 16-byte segment.
    #[error("bad discard/write-zeroes segment length")]
    BadSegmentLength,
    /// Discard/write-zeroes with more segments than advertised.
    #[error("too many discard/write-zeroes segments")]
    TooManyDwzSegments,
    /// Discard/write-zeroes with unknown flags set.
    #[error("unknown discard/write-zeroes flags {0:#x}")]
    UnknownFlags(u32),
    /// Discard/write-zeroes longer than the advertised maximum.
    #[error("discard/write-zeroes longer than the advertised maximum")]
    DwzTooLarge,
    /// Discard on a device that does not offer it.
    #[error("discard not supported")]
    DiscardUnsupported,
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl ParseError {
    /// The `VIRTIO_BLK_S_*` status for this error (virtio 1.2 §5.2.6).
    pub fn status(&self) -> u8 {
        let s = match self {
            ParseError::EmptyChain
            | ParseError::Truncated
            | ParseError::BadStatus
            | ParseError::MissingHeader
            | ParseError::HeaderWritable
            | ParseError::HeaderTooShort
            | ParseError::HeaderOutOfMemory
            | ParseError::TooManySegments
            | ParseError::WrongDirection
            | ParseError::DataOutOfMemory
            | ParseError::SegmentTooLarge
            | ParseError::LengthOverflow
            | ParseError::NoData
            | ParseError::Misaligned
            | ParseError::OutOfRange
            | ParseError::ReadOnly
            | ParseError::BadSegmentLength
            | ParseError::DwzTooLarge => VIRTIO_BLK_S_IOERR,
            ParseError::TooManyDwzSegments
            | ParseError::UnknownFlags(_)
            | ParseError::DiscardUnsupported
            | ParseError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
        };
        // The constants are small (0..=2).
        s as u8
    }
}

/// A refused chain: the error and where its status byte goes, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRequest {
    /// Head index of the chain (for the used ring).
    pub head: u16,
    /// What was wrong.
    pub error: ParseError,
    /// The status byte's guest address when it is writable; `None` → used length 0, no write.
    pub status_addr: Option<GuestAddress>,
}

/// What a valid request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len_bytes` at `sector` into the data buffers.
    Read {
        /// First 512-byte sector.
        sector: u64,
    },
    /// Write the data buffers at `sector`.
    Write {
        /// First 512-byte sector.
        sector: u64,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the device serial (up to 20 bytes) into the data buffers.
    GetId,
    /// Deallocate `num_sectors` at `sector`.
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors.
        num_sectors: u32,
    },
    /// Zero `num_sectors` at `sector`, deallocating when `unmap` and the device can.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Sectors.
        num_sectors: u32,
        /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
        unmap: bool,
    },
}

/// A validated request.
#[derive(Debug)]
pub struct Request {
    /// Head index of the chain.
    pub head: u16,
    /// What to do.
    pub kind: RequestKind,
    /// Guest address of the status byte (checked to be inside guest memory, writable descriptor).
    pub status_addr: GuestAddress,
    /// Host iovecs of the data buffers (IN / OUT / GET_ID), validated against guest memory. They are
    /// valid as long as the guest memory mapping they were built from is kept alive.
    pub iovecs: Vec<libc::iovec>,
    /// Data segments as guest ranges (for GET_ID, written through checked accessors).
    pub segments: Vec<(GuestAddress, u32)>,
    /// Total data length in bytes.
    pub data_len: u32,
}

// SAFETY: the raw pointers in `iovecs` are plain addresses into guest memory; whoever turns them into
// an I/O keeps the mapping alive (see `IoVecs::from_raw_parts`). They carry no thread affinity.
unsafe impl Send for Request {}

impl Request {
    /// Parses and validates one chain.
    ///
    /// `capacity_sectors` is the device size in 512-byte sectors; `limits` the advertised limits.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMem,
        capacity_sectors: u64,
        limits: &Limits,
    ) -> Result<Request, BadRequest>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let fail = |error, status_addr| BadRequest { head, error, status_addr };

        // Keep the header, at most seg_max + 1 data descriptors, and always the last one.
        let keep = usize::try_from(limits.seg_max).unwrap_or(usize::MAX).saturating_add(2);
        let mut descs: Vec<Descriptor> = Vec::with_capacity(keep.min(8));
        let mut total = 0usize;
        let mut last: Option<Descriptor> = None;
        for d in chain {
            total += 1;
            if descs.len() < keep {
                descs.push(d);
            }
            last = Some(d);
        }
        let last = last.ok_or(fail(ParseError::EmptyChain, None))?;
        if last.has_next() {
            return Err(fail(ParseError::Truncated, None));
        }
        // Status: last byte of the last descriptor, device-writable, inside guest memory.
        if !last.is_write_only() || last.len() == 0 {
            return Err(fail(ParseError::BadStatus, None));
        }
        let status_addr = last
            .addr()
            .checked_add(u64::from(last.len()) - 1)
            .filter(|a| GuestMemoryBackend::check_range(mem, *a, 1))
            .ok_or(fail(ParseError::BadStatus, None))?;
        let fail_s = |error| BadRequest { head, error, status_addr: Some(status_addr) };

        if total < 2 {
            return Err(fail_s(ParseError::MissingHeader));
        }
        let hdr_desc = descs[0];
        if hdr_desc.is_write_only() {
            return Err(fail_s(ParseError::HeaderWritable));
        }
        if hdr_desc.len() < HEADER_LEN {
            return Err(fail_s(ParseError::HeaderTooShort));
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut hdr, hdr_desc.addr()).map_err(|_| fail_s(ParseError::HeaderOutOfMemory))?;
        let kind_raw = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        let num_data = total - 2;
        if num_data > usize::try_from(limits.seg_max).unwrap_or(usize::MAX) {
            return Err(fail_s(ParseError::TooManySegments));
        }
        let data = &descs[1..1 + num_data];

        let (want_writable, kind) = match kind_raw {
            VIRTIO_BLK_T_IN => (true, RequestKind::Read { sector }),
            VIRTIO_BLK_T_OUT => (false, RequestKind::Write { sector }),
            VIRTIO_BLK_T_FLUSH => (false, RequestKind::Flush),
            VIRTIO_BLK_T_GET_ID => (true, RequestKind::GetId),
            VIRTIO_BLK_T_DISCARD => (false, RequestKind::Discard { sector: 0, num_sectors: 0 }),
            VIRTIO_BLK_T_WRITE_ZEROES => {
                (false, RequestKind::WriteZeroes { sector: 0, num_sectors: 0, unmap: false })
            }
            other => return Err(fail_s(ParseError::Unsupported(other))),
        };
        if matches!(kind, RequestKind::Discard { .. }) && !limits.discard {
            return Err(fail_s(ParseError::DiscardUnsupported));
        }
        if limits.read_only
            && matches!(
                kind,
                RequestKind::Write { .. } | RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. }
            )
        {
            return Err(fail_s(ParseError::ReadOnly));
        }

        // Data descriptors: direction, size_max, total length, guest-memory bounds.
        let mut data_len: u32 = 0;
        let mut segments = Vec::with_capacity(data.len());
        for d in data {
            if d.is_write_only() != want_writable {
                return Err(fail_s(ParseError::WrongDirection));
            }
            if d.len() > limits.size_max {
                return Err(fail_s(ParseError::SegmentTooLarge));
            }
            data_len = data_len.checked_add(d.len()).ok_or(fail_s(ParseError::LengthOverflow))?;
            if d.len() > 0 {
                segments.push((d.addr(), d.len()));
            }
        }
        let mut iovecs = Vec::new();
        if matches!(kind, RequestKind::Read { .. } | RequestKind::Write { .. } | RequestKind::GetId) {
            iovecs.reserve(segments.len());
            for &(addr, len) in &segments {
                push_iovecs(mem, addr, len, &mut iovecs).map_err(fail_s)?;
            }
        }

        let bs = u64::from(limits.block_size.max(512));
        let sectors_per_block = bs / SECTOR_SIZE;
        let check_range = |sector: u64, num_sectors: u64| -> Result<(), ParseError> {
            if sector % sectors_per_block != 0 || num_sectors % sectors_per_block != 0 {
                return Err(ParseError::Misaligned);
            }
            let end = sector.checked_add(num_sectors).ok_or(ParseError::OutOfRange)?;
            if end > capacity_sectors {
                return Err(ParseError::OutOfRange);
            }
            Ok(())
        };

        let kind = match kind {
            RequestKind::Read { sector } | RequestKind::Write { sector } => {
                if data_len == 0 {
                    return Err(fail_s(ParseError::NoData));
                }
                if u64::from(data_len) % bs != 0 {
                    return Err(fail_s(ParseError::Misaligned));
                }
                check_range(sector, u64::from(data_len) / SECTOR_SIZE).map_err(fail_s)?;
                kind
            }
            RequestKind::Flush => kind,
            RequestKind::GetId => {
                if data_len == 0 {
                    return Err(fail_s(ParseError::NoData));
                }
                kind
            }
            RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. } => {
                if data_len == 0 || data_len % DWZ_SEG_LEN != 0 {
                    return Err(fail_s(ParseError::BadSegmentLength));
                }
                if data_len / DWZ_SEG_LEN > 1 {
                    return Err(fail_s(ParseError::TooManyDwzSegments));
                }
                let mut seg = [0u8; DWZ_SEG_LEN as usize];
                read_segments(mem, &segments, &mut seg).map_err(fail_s)?;
                let mut sb = [0u8; 8];
                sb.copy_from_slice(&seg[0..8]);
                let seg_sector = u64::from_le_bytes(sb);
                let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                let is_discard = matches!(kind, RequestKind::Discard { .. });
                let allowed = if is_discard { 0 } else { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP };
                if flags & !allowed != 0 {
                    return Err(fail_s(ParseError::UnknownFlags(flags)));
                }
                let max =
                    if is_discard { limits.max_discard_sectors } else { limits.max_write_zeroes_sectors };
                if num_sectors == 0 || num_sectors > max {
                    return Err(fail_s(ParseError::DwzTooLarge));
                }
                check_range(seg_sector, u64::from(num_sectors)).map_err(fail_s)?;
                if is_discard {
                    RequestKind::Discard { sector: seg_sector, num_sectors }
                } else {
                    RequestKind::WriteZeroes {
                        sector: seg_sector,
                        num_sectors,
                        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                    }
                }
            }
        };

        Ok(Request { head, kind, status_addr, iovecs, segments, data_len })
    }
}

/// Appends host iovecs for `len` bytes at `addr`, split at region ends; fails outside guest memory.
fn push_iovecs(
    mem: &GuestMem,
    addr: GuestAddress,
    len: u32,
    out: &mut Vec<libc::iovec>,
) -> Result<(), ParseError> {
    let len = usize::try_from(len).map_err(|_| ParseError::LengthOverflow)?;
    let mut covered = 0usize;
    for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
        let slice = slice.map_err(|_| ParseError::DataOutOfMemory)?;
        let base = slice.ptr_guard_mut().as_ptr();
        covered += slice.len();
        out.push(libc::iovec { iov_base: base.cast(), iov_len: slice.len() });
    }
    if covered != len {
        return Err(ParseError::DataOutOfMemory);
    }
    Ok(())
}

/// Reads `out.len()` bytes from the start of the data segments through checked accessors.
fn read_segments(mem: &GuestMem, segments: &[(GuestAddress, u32)], out: &mut [u8]) -> Result<(), ParseError> {
    let mut done = 0usize;
    for &(addr, len) in segments {
        if done == out.len() {
            break;
        }
        let n = (out.len() - done).min(usize::try_from(len).unwrap_or(usize::MAX));
        mem.read_slice(&mut out[done..done + n], addr).map_err(|_| ParseError::DataOutOfMemory)?;
        done += n;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(ParseError::BadSegmentLength)
    }
}

/// Writes up to [`ID_BYTES`] of `id` into the GET_ID segments; returns the bytes written.
pub fn write_id(
    mem: &GuestMem,
    segments: &[(GuestAddress, u32)],
    id: &[u8; ID_BYTES],
) -> Result<u32, ParseError> {
    let mut done = 0usize;
    for &(addr, len) in segments {
        if done == ID_BYTES {
            break;
        }
        let n = (ID_BYTES - done).min(usize::try_from(len).unwrap_or(usize::MAX));
        mem.write_slice(&id[done..done + n], addr).map_err(|_| ParseError::DataOutOfMemory)?;
        done += n;
    }
    // At most 20.
    Ok(done as u32)
}
