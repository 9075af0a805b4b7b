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
    pub iovecs: crate::bdev::IovList,
    /// Data segments as guest ranges (for GET_ID, written through checked accessors).
    pub segments: smallvec::SmallVec<[(GuestAddress, u32); 4]>,
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
        Self::parse_descs(head, chain, mem, capacity_sectors, limits)
    }

    /// [`Request::parse`] over any sequence of descriptors (a popped chain, or a chain walked again
    /// from its head when an in-flight request is resubmitted).
    pub fn parse_descs(
        head: u16,
        chain: impl IntoIterator<Item = Descriptor>,
        mem: &GuestMem,
        capacity_sectors: u64,
        limits: &Limits,
    ) -> Result<Request, BadRequest> {
        let fail = |error, status_addr| BadRequest { head, error, status_addr };

        // Keep the header, at most seg_max + 1 data descriptors, and always the last one.
        let keep = usize::try_from(limits.seg_max).unwrap_or(usize::MAX).saturating_add(2);
        // Inline up to 8 (no heap allocation for the common request).
        let mut descs: smallvec::SmallVec<[Descriptor; 8]> = smallvec::SmallVec::new();
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
        let mut segments = smallvec::SmallVec::<[(GuestAddress, u32); 4]>::new();
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
        let mut iovecs = crate::bdev::IovList::new();
        if matches!(kind, RequestKind::Read { .. } | RequestKind::Write { .. } | RequestKind::GetId) {
            iovecs.reserve(segments.len());
            for &(addr, len) in &segments {
                push_iovecs(mem, addr, len, &mut iovecs).map_err(fail_s)?;
            }
        } else if segments.iter().any(|&(a, l)| !GuestMemoryBackend::check_range(mem, a, l as usize)) {
            // Data a flush or discard never uses must still lie in guest memory (found by the
            // chain_parser fuzz target: a flush with a data descriptor outside memory was accepted).
            return Err(fail_s(ParseError::DataOutOfMemory));
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
    out: &mut crate::bdev::IovList,
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

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x8000;
    const REGION: u64 = 0x10_0000;
    const CAP: u64 = 1000;

    fn mem() -> GuestMem {
        // Two adjacent regions, then a hole.
        GuestMem::from_ranges(&[(GuestAddress(0), REGION as usize), (GuestAddress(REGION), REGION as usize)])
            .expect("guest memory")
    }

    fn limits() -> Limits {
        Limits {
            block_size: 512,
            seg_max: 4,
            size_max: 1 << 20,
            max_discard_sectors: 1 << 16,
            max_write_zeroes_sectors: 1 << 16,
            discard: true,
            read_only: false,
        }
    }

    fn header(m: &GuestMem, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).expect("header");
    }

    /// (addr, len, device-writable) descriptors, chained in order.
    fn parse_with(m: &GuestMem, descs: &[(u64, u32, bool)], l: &Limits) -> Result<Request, BadRequest> {
        let q = MockSplitQueue::create(m, GuestAddress(0x10_000), 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, len, w)| {
                RawDescriptor::from(Descriptor::new(a, len, if w { VRING_DESC_F_WRITE as u16 } else { 0 }, 0))
            })
            .collect();
        let chain = q.build_desc_chain(&raw).expect("chain");
        Request::parse(chain, m, CAP, l)
    }

    fn parse(m: &GuestMem, descs: &[(u64, u32, bool)]) -> Result<Request, BadRequest> {
        parse_with(m, descs, &limits())
    }

    fn err(r: Result<Request, BadRequest>) -> BadRequest {
        r.expect_err("should be refused")
    }

    #[test]
    fn good_read() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 8);
        let r = parse(&m, &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)]).expect("ok");
        assert_eq!(r.kind, RequestKind::Read { sector: 8 });
        assert_eq!(r.data_len, 4096);
        assert_eq!(r.iovecs.len(), 1);
        assert_eq!(r.iovecs[0].iov_len, 4096);
        assert_eq!(r.status_addr, GuestAddress(STATUS));
    }

    #[test]
    fn good_write_split_at_region_end() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let r = parse(
            &m,
            &[(HDR, 16, false), (REGION - 512, 1024, false), (DATA, 512, false), (STATUS, 1, true)],
        )
        .expect("ok");
        assert_eq!(r.kind, RequestKind::Write { sector: 0 });
        assert_eq!(r.data_len, 1536);
        assert_eq!(r.iovecs.len(), 3);
        assert!(r.iovecs.iter().all(|v| v.iov_len == 512));
    }

    #[test]
    fn status_is_last_byte_of_last_descriptor() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let r = parse(&m, &[(HDR, 16, false), (STATUS, 4, true)]).expect("ok");
        assert_eq!(r.kind, RequestKind::Flush);
        assert_eq!(r.status_addr, GuestAddress(STATUS + 3));
    }

    #[test]
    fn wrong_data_direction() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::WrongDirection);
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::WrongDirection);
    }

    #[test]
    fn status_not_writable_or_missing() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)]));
        assert_eq!((e.error, e.status_addr), (ParseError::BadStatus, None));
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 0, true)]));
        assert_eq!((e.error, e.status_addr), (ParseError::BadStatus, None));
        // Status outside guest memory.
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 512, true), (0x40_0000, 1, true)]));
        assert_eq!((e.error, e.status_addr), (ParseError::BadStatus, None));
        // Status length overflowing the address space.
        let e = err(parse(&m, &[(HDR, 16, false), (u64::MAX, 2, true)]));
        assert_eq!((e.error, e.status_addr), (ParseError::BadStatus, None));
    }

    #[test]
    fn header_problems() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(err(parse(&m, &[(STATUS, 1, true)])).error, ParseError::MissingHeader);
        assert_eq!(err(parse(&m, &[(HDR, 16, true), (STATUS, 1, true)])).error, ParseError::HeaderWritable);
        assert_eq!(err(parse(&m, &[(HDR, 8, false), (STATUS, 1, true)])).error, ParseError::HeaderTooShort);
        let e = err(parse(&m, &[(0x30_0000, 16, false), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::HeaderOutOfMemory);
        assert_eq!(e.error.status(), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn data_outside_guest_memory() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = err(parse(&m, &[(HDR, 16, false), (0x30_0000, 512, true), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::DataOutOfMemory);
        // Starts inside, runs past the last region.
        let e = err(parse(&m, &[(HDR, 16, false), (2 * REGION - 512, 1024, true), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::DataOutOfMemory);
    }

    #[test]
    fn too_many_segments() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let mut d = vec![(HDR, 16, false)];
        d.extend((0..5).map(|i| (DATA + i * 512, 512, true)));
        d.push((STATUS, 1, true));
        let e = err(parse(&m, &d));
        assert_eq!(e.error, ParseError::TooManySegments);
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
        d.remove(1);
        assert!(parse(&m, &d).is_ok());
    }

    #[test]
    fn segment_larger_than_size_max() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let l = Limits { size_max: 1024, ..limits() };
        let e = err(parse_with(&m, &[(HDR, 16, false), (DATA, 2048, true), (STATUS, 1, true)], &l));
        assert_eq!(e.error, ParseError::SegmentTooLarge);
        // size_max itself is allowed.
        let r = parse_with(&m, &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)], &l);
        assert_eq!(r.expect("a segment of exactly size_max is taken").data_len, 1024);
    }

    /// A zero-length data descriptor carries nothing: it is skipped (no iovec, no segment), wherever
    /// its address points.
    #[test]
    fn zero_length_data_descriptors_are_skipped() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let r = parse(&m, &[(HDR, 16, false), (0x30_0000, 0, true), (DATA, 512, true), (STATUS, 1, true)])
            .expect("ok");
        assert_eq!((r.data_len, r.iovecs.len(), r.segments.len()), (512, 1, 1));
        assert_eq!(r.segments[0], (GuestAddress(DATA), 512));
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let r = parse(&m, &[(HDR, 16, false), (0x30_0000, 0, false), (STATUS, 1, true)]).expect("flush");
        assert_eq!(r.kind, RequestKind::Flush);
        assert!(r.segments.is_empty());
    }

    #[test]
    fn length_overflow() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let l = Limits { size_max: u32::MAX, ..limits() };
        let e = err(parse_with(
            &m,
            &[(HDR, 16, false), (DATA, 0x8000_0000, true), (DATA, 0x8000_0000, true), (STATUS, 1, true)],
            &l,
        ));
        // virtio-queue stops a chain longer than 4 GiB; either way it is refused without a crash.
        assert!(matches!(e.error, ParseError::Truncated | ParseError::LengthOverflow), "{e:?}");
    }

    #[test]
    fn sector_range_and_alignment() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, CAP - 1);
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::OutOfRange);
        header(&m, VIRTIO_BLK_T_IN, u64::MAX);
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::OutOfRange);
        header(&m, VIRTIO_BLK_T_IN, CAP - 1);
        assert!(parse(&m, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]).is_ok());
        // Length not a multiple of the block size.
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::Misaligned);
        // 4 KiB blocks: sector and length multiples of 8 sectors.
        let l = Limits { block_size: 4096, ..limits() };
        header(&m, VIRTIO_BLK_T_IN, 1);
        let e = err(parse_with(&m, &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)], &l));
        assert_eq!(e.error, ParseError::Misaligned);
        header(&m, VIRTIO_BLK_T_IN, 8);
        let e = err(parse_with(&m, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)], &l));
        assert_eq!(e.error, ParseError::Misaligned);
        assert!(parse_with(&m, &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)], &l).is_ok());
        // No data at all.
        let e = err(parse(&m, &[(HDR, 16, false), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::NoData);
    }

    #[test]
    fn descriptor_loop_is_cut() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::create(&m, GuestAddress(0x10_000), 16);
        let next = VRING_DESC_F_NEXT as u16;
        let raw = [
            RawDescriptor::from(Descriptor::new(HDR, 16, next, 1)),
            RawDescriptor::from(Descriptor::new(DATA, 512, next | VRING_DESC_F_WRITE as u16, 0)),
        ];
        let chain = q.build_multiple_desc_chains(&raw).expect("chain");
        let e = err(Request::parse(chain, &m, CAP, &limits()));
        assert_eq!((e.error, e.status_addr), (ParseError::Truncated, None));
    }

    #[test]
    fn unsupported_type() {
        let m = mem();
        header(&m, 99, 0);
        let e = err(parse(&m, &[(HDR, 16, false), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::Unsupported(99));
        assert_eq!(e.error.status(), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn get_id() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let r = parse(&m, &[(HDR, 16, false), (DATA, 8, true), (DATA + 100, 64, true), (STATUS, 1, true)])
            .expect("ok");
        assert_eq!(r.kind, RequestKind::GetId);
        let id = *b"0123456789abcdefghij";
        assert_eq!(write_id(&m, &r.segments, &id), Ok(20));
        let mut got = [0u8; 12];
        m.read_slice(&mut got, GuestAddress(DATA + 100)).expect("read");
        assert_eq!(&got, b"89abcdefghij");
        let short = parse(&m, &[(HDR, 16, false), (DATA, 8, true), (STATUS, 1, true)]).expect("ok");
        assert_eq!(write_id(&m, &short.segments, &id), Ok(8));
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 20, false), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::WrongDirection);
        let e = err(parse(&m, &[(HDR, 16, false), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::NoData);
    }

    fn dwz(m: &GuestMem, addr: u64, sector: u64, n: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&s, GuestAddress(addr)).expect("segment");
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        let chain = [(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)];
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        dwz(&m, DATA, 16, 32, 0);
        let r = parse(&m, &chain).expect("ok");
        assert_eq!(r.kind, RequestKind::Discard { sector: 16, num_sectors: 32 });
        dwz(&m, DATA, 16, 32, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(err(parse(&m, &chain)).error, ParseError::UnknownFlags(1));
        let e = err(parse_with(&m, &chain, &Limits { discard: false, ..limits() }));
        assert_eq!(e.error, ParseError::DiscardUnsupported);
        assert_eq!(e.error.status(), VIRTIO_BLK_S_UNSUPP as u8);

        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let r = parse(&m, &chain).expect("ok");
        assert_eq!(r.kind, RequestKind::WriteZeroes { sector: 16, num_sectors: 32, unmap: true });
        dwz(&m, DATA, 16, 32, 0);
        let r = parse(&m, &chain).expect("ok");
        assert_eq!(r.kind, RequestKind::WriteZeroes { sector: 16, num_sectors: 32, unmap: false });
        dwz(&m, DATA, 16, 32, 2);
        assert_eq!(err(parse(&m, &chain)).error, ParseError::UnknownFlags(2));
        dwz(&m, DATA, CAP - 8, 16, 0);
        assert_eq!(err(parse(&m, &chain)).error, ParseError::OutOfRange);
        dwz(&m, DATA, 0, 0, 0);
        assert_eq!(err(parse(&m, &chain)).error, ParseError::DwzTooLarge);
        dwz(&m, DATA, 0, (1 << 16) + 1, 0);
        assert_eq!(err(parse(&m, &chain)).error, ParseError::DwzTooLarge);
        // Segment framing.
        dwz(&m, DATA, 0, 8, 0);
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 15, false), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::BadSegmentLength);
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::TooManyDwzSegments);
        // A segment split over two descriptors is fine.
        let r = parse(&m, &[(HDR, 16, false), (DATA, 8, false), (DATA + 8, 8, false), (STATUS, 1, true)])
            .expect("ok");
        assert_eq!(r.kind, RequestKind::WriteZeroes { sector: 0, num_sectors: 8, unmap: false });
        // Writable payload.
        let e = err(parse(&m, &[(HDR, 16, false), (DATA, 16, true), (STATUS, 1, true)]));
        assert_eq!(e.error, ParseError::WrongDirection);
    }

    #[test]
    fn read_only_refuses_writes() {
        let m = mem();
        let l = Limits { read_only: true, ..limits() };
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = err(parse_with(&m, &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)], &l));
        assert_eq!(e.error, ParseError::ReadOnly);
        assert_eq!(e.error.status(), VIRTIO_BLK_S_IOERR as u8);
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert!(parse_with(&m, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)], &l).is_ok());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        use vm_memory::GuestMemoryRegion;

        fn kind() -> impl Strategy<Value = u32> {
            prop_oneof![
                Just(VIRTIO_BLK_T_IN),
                Just(VIRTIO_BLK_T_OUT),
                Just(VIRTIO_BLK_T_FLUSH),
                Just(VIRTIO_BLK_T_GET_ID),
                Just(VIRTIO_BLK_T_DISCARD),
                Just(VIRTIO_BLK_T_WRITE_ZEROES),
                any::<u32>(),
            ]
        }

        fn addr() -> impl Strategy<Value = u64> {
            prop_oneof![0..3 * REGION, Just(REGION - 1), Just(2 * REGION - 1), any::<u64>()]
        }

        fn len() -> impl Strategy<Value = u32> {
            prop_oneof![
                0u32..5000,
                Just(16),
                Just(1),
                Just(512),
                Just(4096),
                (1u32..16).prop_map(|n| n * 512),
                any::<u32>()
            ]
        }

        /// Mostly well-formed shapes (header first, status last) so valid requests occur too,
        /// with random data descriptors in between and random replacements at either end.
        fn chain() -> impl Strategy<Value = Vec<(u64, u32, bool)>> {
            let desc = || (addr(), len(), any::<bool>());
            let head = prop_oneof![3 => Just((HDR, 16, false)), 1 => desc()];
            let tail = prop_oneof![3 => Just((STATUS, 1, true)), 1 => desc()];
            (head, proptest::collection::vec(desc(), 0..6), tail).prop_map(|(h, mid, t)| {
                let mut v = vec![h];
                v.extend(mid);
                v.push(t);
                v
            })
        }

        /// True when `[ptr, ptr+len)` lies inside one host mapping of `m`.
        fn inside_host_memory(m: &GuestMem, ptr: usize, len: usize) -> bool {
            m.iter().any(|r| {
                let base = r.get_host_address(vm_memory::MemoryRegionAddress(0)).map_or(0, |p| p as usize);
                let size = r.len() as usize;
                ptr >= base && ptr.checked_add(len).is_some_and(|end| end <= base + size)
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Any chain, however malformed, parses to an error or to a request whose every byte is
            /// inside guest memory and inside the device — never a panic.
            #[test]
            fn random_chains_never_escape(
                k in kind(),
                sector in prop_oneof![0u64..2 * CAP, any::<u64>()],
                descs in chain(),
            ) {
                let m = mem();
                header(&m, k, sector);
                match parse(&m, &descs) {
                    Err(bad) => {
                        // A status address, when given, is a writable byte inside guest memory.
                        if let Some(a) = bad.status_addr {
                            prop_assert!(m.check_address(a).is_some());
                        }
                        let _ = bad.error.status();
                    }
                    Ok(r) => {
                        prop_assert!(m.check_address(r.status_addr).is_some());
                        let mut total = 0u64;
                        for v in &r.iovecs {
                            prop_assert!(inside_host_memory(&m, v.iov_base as usize, v.iov_len));
                            total += v.iov_len as u64;
                        }
                        match r.kind {
                            RequestKind::Read { sector } | RequestKind::Write { sector } => {
                                prop_assert_eq!(total, u64::from(r.data_len));
                                // At most seg_max (4) data descriptors, each split at most once
                                // (two adjacent regions): a descriptor across the boundary is two iovecs.
                                prop_assert!(r.data_len % 512 == 0 && r.iovecs.len() <= 2 * 4);
                                prop_assert!(sector + u64::from(r.data_len) / 512 <= CAP);
                            }
                            RequestKind::Discard { sector, num_sectors }
                            | RequestKind::WriteZeroes { sector, num_sectors, .. } => {
                                prop_assert!(sector + u64::from(num_sectors) <= CAP);
                            }
                            RequestKind::Flush | RequestKind::GetId => {}
                        }
                    }
                }
            }
        }
    }
}
