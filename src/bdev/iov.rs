//! `IoVecs`: the owning handle on the memory of one bdev I/O.
//!
//! ```text
//!   guest memory (Arc<GuestMemoryMmap>) ──keep──┐
//!   or an aligned heap buffer (Arc<AlignedBuf>) ┴─► IoVecs { iovs: [iovec], keep }
//! ```
//!
//! # Design
//! A bdev I/O reads or writes the caller's memory in place (zero copy). The memory is described by a
//! list of `iovec`s plus a reference-counted *keeper* that keeps the mapping alive for as long as the
//! `IoVecs` lives, even if the frontend replaces its memory table meanwhile. Raw addresses only leave
//! this type through [`IoVecs::as_iovecs`] (for the kernel or a device) and the copy helpers here.
//!
//! Memory behind an `IoVecs` may be written concurrently by someone else (a guest vCPU), exactly like
//! a DMA buffer: copies use raw-pointer copies, never Rust references, so no aliasing assumption is made.
//!
//! # Limitations
//! Slicing allocates a new iovec array; no inline small-vector optimisation.

use std::alloc::{self, Layout};
use std::any::Any;
use std::sync::Arc;

/// Memory alignment of [`AlignedBuf`] (good for `O_DIRECT` and DMA).
pub const BUF_ALIGN: usize = 4096;

/// A heap buffer with [`BUF_ALIGN`] alignment, zero-initialised, shared by pointer only.
pub struct AlignedBuf {
    ptr: *mut u8,
    len_bytes: usize,
}

// SAFETY: the buffer is plain memory owned by this value; all access goes through raw pointers.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; concurrent access has the semantics of a DMA buffer (documented on the module).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len_bytes` (at least 1 byte is allocated).
    pub fn zeroed(len_bytes: usize) -> Self {
        let layout = Self::layout(len_bytes);
        // SAFETY: the layout has a non-zero size (max(len, 1)) and a power-of-two alignment.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        Self { ptr, len_bytes }
    }

    fn layout(len_bytes: usize) -> Layout {
        // BUF_ALIGN is a power of two and len is bounded by isize::MAX in practice.
        Layout::from_size_align(len_bytes.max(1), BUF_ALIGN).expect("buffer layout")
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// Start of the buffer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr, Self::layout(self.len_bytes)) }
    }
}

/// Segments of one I/O: up to two inline (no heap allocation for the common request), more on the heap.
pub type IovList = smallvec::SmallVec<[libc::iovec; 2]>;

/// The memory of one I/O: iovecs plus whatever keeps them valid.
pub struct IoVecs {
    iovs: IovList,
    len_bytes: u64,
    keep: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: the iovecs point into memory kept alive by `keep` (Send + Sync) or into memory whose owner
// promised, in `from_raw_parts`, that it outlives this value; the pointers carry no thread affinity.
unsafe impl Send for IoVecs {}

impl std::fmt::Debug for IoVecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoVecs")
            .field("segments", &self.iovs.len())
            .field("len_bytes", &self.len_bytes)
            .finish()
    }
}

impl IoVecs {
    /// No memory (flush, unmap, write_zeroes, reset).
    pub fn empty() -> Self {
        Self { iovs: IovList::new(), len_bytes: 0, keep: None }
    }

    /// Wraps raw segments.
    ///
    /// # Safety
    /// Every `iovec` must describe memory that is valid for reads and writes for as long as `keep`
    /// (or, when `keep` is `None`, the caller) keeps it mapped, and that memory must stay mapped at
    /// least as long as the returned value and every slice made from it lives.
    pub unsafe fn from_raw_parts(iovs: impl Into<IovList>, keep: Option<Arc<dyn Any + Send + Sync>>) -> Self {
        let iovs = iovs.into();
        let len_bytes = iovs.iter().map(|v| v.iov_len as u64).sum();
        Self { iovs, len_bytes, keep }
    }

    /// A fresh zeroed aligned buffer of `len_bytes`, owned by the `IoVecs`.
    pub fn alloc(len_bytes: usize) -> Self {
        Self::from_aligned(Arc::new(AlignedBuf::zeroed(len_bytes)))
    }

    /// The whole of a shared aligned buffer.
    pub fn from_aligned(buf: Arc<AlignedBuf>) -> Self {
        let iov = libc::iovec { iov_base: buf.as_ptr().cast(), iov_len: buf.len_bytes() };
        Self { iovs: smallvec::smallvec![iov], len_bytes: buf.len_bytes() as u64, keep: Some(buf) }
    }

    /// A heap copy of `data` (tests and internal I/O).
    pub fn from_slice(data: &[u8]) -> Self {
        let v = Self::alloc(data.len());
        v.copy_from_slice(0, data);
        v
    }

    /// What keeps the memory mapped (`None`: the creator's promise in `from_raw_parts`). A module that
    /// hands raw pieces of this memory to a device keeps a clone with them.
    pub fn keeper(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        self.keep.clone()
    }

    /// Total length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// True when there is no memory.
    pub fn is_empty(&self) -> bool {
        self.len_bytes == 0
    }

    /// The raw segments, for handing to the kernel or a device. The pointers stay valid while `self` lives.
    pub fn as_iovecs(&self) -> &[libc::iovec] {
        &self.iovs
    }

    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.iovs.len()
    }

    /// True when every segment start and length is a multiple of `align` (a power of two).
    pub fn is_aligned(&self, align: usize) -> bool {
        let mask = align.saturating_sub(1);
        self.iovs.iter().all(|v| (v.iov_base as usize) & mask == 0 && v.iov_len & mask == 0)
    }

    /// The bytes `[offset_bytes, offset_bytes + len_bytes)` as a new `IoVecs` sharing the keeper.
    /// Returns `None` when the range is outside.
    pub fn slice(&self, offset_bytes: u64, len_bytes: u64) -> Option<IoVecs> {
        let end = offset_bytes.checked_add(len_bytes)?;
        if end > self.len_bytes {
            return None;
        }
        let mut out = IovList::new();
        let mut pos = 0u64;
        for v in &self.iovs {
            let seg_start = pos;
            let seg_end = pos + v.iov_len as u64;
            pos = seg_end;
            let lo = seg_start.max(offset_bytes);
            let hi = seg_end.min(end);
            if lo < hi {
                let skip = usize::try_from(lo - seg_start).ok()?;
                out.push(libc::iovec {
                    // Pointer arithmetic only; no dereference here.
                    iov_base: (v.iov_base as *mut u8).wrapping_add(skip).cast(),
                    iov_len: usize::try_from(hi - lo).ok()?,
                });
            }
        }
        Some(IoVecs { iovs: out, len_bytes, keep: self.keep.clone() })
    }

    /// Copies `src` into the I/O memory starting at byte `offset_bytes`. Returns bytes copied
    /// (less than `src.len()` if the memory ends first).
    pub fn copy_from_slice(&self, offset_bytes: u64, src: &[u8]) -> usize {
        self.walk(offset_bytes, src.len(), |ptr, done, n| {
            // SAFETY: `ptr..ptr+n` lies in one iovec that `self` keeps valid (see `from_raw_parts`);
            // `src[done..done+n]` is in bounds by construction of `walk`; the regions cannot overlap
            // a Rust reference to the I/O memory because none is ever created.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), ptr, n) }
        })
    }

    /// Copies I/O memory from byte `offset_bytes` into `dst`. Returns bytes copied.
    pub fn copy_to_slice(&self, offset_bytes: u64, dst: &mut [u8]) -> usize {
        let dst_ptr = dst.as_mut_ptr();
        self.walk(offset_bytes, dst.len(), |ptr, done, n| {
            // SAFETY: as in `copy_from_slice`, with the direction reversed; `dst` is exclusively borrowed.
            unsafe { std::ptr::copy_nonoverlapping(ptr, dst_ptr.add(done), n) }
        })
    }

    /// Copies from raw memory `src` (`len` bytes) into the I/O memory at `offset_bytes`.
    ///
    /// # Safety
    /// `src..src+len` must be valid for reads and not overlap the I/O memory.
    pub unsafe fn copy_from_raw(&self, offset_bytes: u64, src: *const u8, len: usize) -> usize {
        self.walk(offset_bytes, len, |ptr, done, n| {
            // SAFETY: caller guarantees `src` range; destination as in `copy_from_slice`.
            unsafe { std::ptr::copy_nonoverlapping(src.add(done), ptr, n) }
        })
    }

    /// Copies I/O memory from `offset_bytes` to raw memory `dst` (`len` bytes).
    ///
    /// # Safety
    /// `dst..dst+len` must be valid for writes and not overlap the I/O memory.
    pub unsafe fn copy_to_raw(&self, offset_bytes: u64, dst: *mut u8, len: usize) -> usize {
        self.walk(offset_bytes, len, |ptr, done, n| {
            // SAFETY: caller guarantees `dst` range; source as in `copy_to_slice`.
            unsafe { std::ptr::copy_nonoverlapping(ptr, dst.add(done), n) }
        })
    }

    /// Fills the I/O memory with zeros.
    pub fn zero(&self) {
        for v in &self.iovs {
            // SAFETY: each iovec is valid for writes while `self` lives (see `from_raw_parts`).
            unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) }
        }
    }

    /// Reads the whole I/O memory into a `Vec` (tests, small metadata).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; usize::try_from(self.len_bytes).unwrap_or(0)];
        self.copy_to_slice(0, &mut out);
        out
    }

    /// Calls `f(segment_ptr, bytes_done, n)` over the bytes `[offset, offset+len)`, clipped to the memory.
    fn walk(&self, offset_bytes: u64, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) -> usize {
        let mut skip = offset_bytes;
        let mut done = 0usize;
        for v in &self.iovs {
            if done == len {
                break;
            }
            let seg = v.iov_len as u64;
            if skip >= seg {
                skip -= seg;
                continue;
            }
            let start = skip as usize; // < iov_len, fits usize
            let n = (v.iov_len - start).min(len - done);
            f((v.iov_base as *mut u8).wrapping_add(start), done, n);
            done += n;
            skip = 0;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_and_copy_across_segments() {
        let a = Arc::new(AlignedBuf::zeroed(8));
        let b = Arc::new(AlignedBuf::zeroed(8));
        let iovs = vec![
            libc::iovec { iov_base: a.as_ptr().cast(), iov_len: 8 },
            libc::iovec { iov_base: b.as_ptr().cast(), iov_len: 8 },
        ];
        let keep: Arc<dyn Any + Send + Sync> = Arc::new((a.clone(), b.clone()));
        // SAFETY: both buffers are kept alive by `keep`.
        let v = unsafe { IoVecs::from_raw_parts(iovs, Some(keep)) };
        assert_eq!(v.len_bytes(), 16);
        let data: Vec<u8> = (0..16).collect();
        assert_eq!(v.copy_from_slice(0, &data), 16);
        let s = v.slice(6, 4).expect("in range");
        assert_eq!(s.segments(), 2);
        assert_eq!(s.to_vec(), vec![6, 7, 8, 9]);
        assert!(v.slice(10, 7).is_none());
        let mut tail = [0u8; 4];
        assert_eq!(v.copy_to_slice(14, &mut tail), 2);
        assert_eq!(&tail[..2], &[14, 15]);
    }
}
