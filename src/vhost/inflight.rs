//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`: the shared in-flight table that lets a restarted vblkd
//! resubmit the requests its previous incarnation had taken but not completed.
//!
//! ```text
//!  memfd (one slice per queue, each align_up(16 * queue_size + 2, 64) bytes — libvhost-user's size)
//!  ┌ queue 0 ───────────────────────────────────────────────────────────────────────────────┐
//!  │ u64 features │ u16 version │ u16 desc_num │ u16 last_batch_head │ u16 used_idx │        │
//!  │ desc[i]: u8 inflight │ 5 pad │ u16 next │ u64 counter      (16 bytes, i < queue_size) │
//!  └────────────────────────────────────────────────────────────────────────────────────────┘
//!  pop:        desc[head] = { inflight 1, counter++ }                    (before submission)
//!  complete:   last_batch_head = head ; used element + used idx published ;
//!              desc[head].inflight = 0 ; used_idx = device's used idx
//!  restart:    version 0 → set 1 (fresh table); otherwise fix the last batch when used_idx lags the
//!              ring, resubmit every inflight head in counter order, next avail = used idx + inuse
//! ```
//!
//! # Design
//! The layout and the order of updates are those of QEMU's libvhost-user (`vu_get_inflight_fd`,
//! `vu_queue_inflight_get/pre_put/post_put`, `vu_check_queue_inflights`), which QEMU's
//! vhost-user-blk expects: QEMU only keeps the fd and hands it back with `SET_INFLIGHT_FD` when the
//! backend reconnects. The table's contents come from a frontend-supplied fd, so nothing read from it
//! is trusted: the queue size and count are ours, every index is bounds-checked, and the mapping is
//! checked against the fd's size before it is made (a short fd would SIGBUS the daemon).
//!
//! # Limitations
//! Split rings only (the device offers no packed rings).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};

/// Table version written on first use.
pub const INFLIGHT_VERSION: u16 = 1;
/// Alignment of each queue's slice.
const ALIGN: u64 = 64;
/// Size of one descriptor state.
const DESC: usize = 16;
/// Size of the per-queue header.
const HDR: usize = 16;

/// Bytes of one queue's slice (libvhost-user's `vu_inflight_queue_size`).
pub fn queue_region_size(queue_size: u16) -> u64 {
    (DESC as u64 * u64::from(queue_size) + 2).div_ceil(ALIGN) * ALIGN
}

/// Why a table could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// Bad parameters from the frontend.
    #[error("{0}")]
    Invalid(String),
    /// An OS call failed.
    #[error("{0}: {1}")]
    Os(&'static str, io::Error),
}

/// What a queue must do after a (re)connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Heads to resubmit, in their original order.
    pub resubmit: Vec<u16>,
    /// Next avail index to use (used idx + in-flight count); `None` for a fresh table.
    pub next_avail: Option<u16>,
    /// Next counter value.
    pub next_counter: u64,
}

/// One mapped in-flight table.
pub struct InflightRegion {
    ptr: *mut u8,
    len: usize,
    mmap_size: u64,
    num_queues: u16,
    queue_size: u16,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory; each queue's slice is touched by that queue's worker
// only (plus the connection thread before any worker runs), through volatile accesses.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// A fresh, zeroed table in a new memfd (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        Self::check_geometry(num_queues, queue_size)?;
        let size = queue_region_size(queue_size) * u64::from(num_queues);
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
        let raw = unsafe { libc::memfd_create(c"vblkd-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(InflightError::Os("memfd_create", io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(InflightError::Os("ftruncate", io::Error::last_os_error()));
        }
        Self::map(fd, size, 0, num_queues, queue_size)
    }

    /// Maps a table handed back by the frontend (SET_INFLIGHT_FD), checking it fits in its fd.
    pub fn open(
        fd: OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        Self::check_geometry(num_queues, queue_size)?;
        let need = queue_region_size(queue_size) * u64::from(num_queues);
        if mmap_size < need {
            return Err(InflightError::Invalid(format!(
                "inflight area of {mmap_size} bytes is smaller than {need} for {num_queues} queues of {queue_size}"
            )));
        }
        // SAFETY: fstat into a zeroed struct on an fd we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(InflightError::Os("fstat", io::Error::last_os_error()));
        }
        let end = mmap_offset.checked_add(mmap_size);
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || end.map_or(true, |e| e > st.st_size as u64) {
            return Err(InflightError::Invalid(format!(
                "inflight area {mmap_offset}+{mmap_size} does not fit in its fd ({} bytes)",
                st.st_size
            )));
        }
        if mmap_offset % 4096 != 0 {
            return Err(InflightError::Invalid(format!("inflight offset {mmap_offset} is not page-aligned")));
        }
        Self::map(fd, mmap_size, mmap_offset, num_queues, queue_size)
    }

    fn check_geometry(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
        if num_queues == 0 || num_queues > super::MAX_QUEUES {
            return Err(InflightError::Invalid(format!("inflight num_queues {num_queues}")));
        }
        if queue_size == 0 || queue_size > super::MAX_QUEUE_SIZE {
            return Err(InflightError::Invalid(format!("inflight queue_size {queue_size}")));
        }
        Ok(())
    }

    fn map(
        fd: OwnedFd,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let len =
            usize::try_from(size).map_err(|_| InflightError::Invalid(format!("inflight size {size}")))?;
        // SAFETY: a shared read-write mapping of `len` bytes of our fd at `offset`, which was
        // checked to lie within the file; the pointer is only used within `len`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(InflightError::Os("mmap", io::Error::last_os_error()));
        }
        Ok(Self { ptr: ptr.cast(), len, mmap_size: size, num_queues, queue_size, fd })
    }

    /// The GET_INFLIGHT_FD reply payload (mmap_size, mmap_offset 0, num_queues, queue_size).
    pub fn reply(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.mmap_size.to_le_bytes());
        b[16..18].copy_from_slice(&self.num_queues.to_le_bytes());
        b[18..20].copy_from_slice(&self.queue_size.to_le_bytes());
        b
    }

    /// The memfd.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Queue size the table was laid out for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Offset of byte `off` of queue `q`'s slice, if `off + width` lies within the mapping.
    fn at(&self, q: u16, off: usize, width: usize) -> Option<*mut u8> {
        if q >= self.num_queues {
            return None;
        }
        let base = usize::try_from(queue_region_size(self.queue_size)).ok()?.checked_mul(usize::from(q))?;
        let start = base.checked_add(off)?;
        if start.checked_add(width)? > self.len {
            return None;
        }
        // SAFETY: start + width <= len, within the mapping.
        Some(unsafe { self.ptr.add(start) })
    }

    fn r16(&self, q: u16, off: usize) -> u16 {
        // SAFETY: `at` checked the bounds; fields are naturally aligned in a page-aligned mapping.
        self.at(q, off, 2).map_or(0, |p| u16::from_le(unsafe { std::ptr::read_volatile(p.cast::<u16>()) }))
    }
    fn w16(&self, q: u16, off: usize, v: u16) {
        if let Some(p) = self.at(q, off, 2) {
            // SAFETY: as in `r16`.
            unsafe { std::ptr::write_volatile(p.cast::<u16>(), v.to_le()) }
        }
    }
    fn r8(&self, q: u16, off: usize) -> u8 {
        // SAFETY: as in `r16`.
        self.at(q, off, 1).map_or(0, |p| unsafe { std::ptr::read_volatile(p) })
    }
    fn w8(&self, q: u16, off: usize, v: u8) {
        if let Some(p) = self.at(q, off, 1) {
            // SAFETY: as in `r16`.
            unsafe { std::ptr::write_volatile(p, v) }
        }
    }
    fn r64(&self, q: u16, off: usize) -> u64 {
        // SAFETY: as in `r16`.
        self.at(q, off, 8).map_or(0, |p| u64::from_le(unsafe { std::ptr::read_volatile(p.cast::<u64>()) }))
    }
    fn w64(&self, q: u16, off: usize, v: u64) {
        if let Some(p) = self.at(q, off, 8) {
            // SAFETY: as in `r16`.
            unsafe { std::ptr::write_volatile(p.cast::<u64>(), v.to_le()) }
        }
    }

    fn desc_off(head: u16) -> usize {
        HDR + DESC * usize::from(head)
    }

    /// Marks `head` in flight with `counter` (before it is submitted).
    pub fn get(&self, q: u16, head: u16, counter: u64) {
        if head >= self.queue_size {
            return;
        }
        let d = Self::desc_off(head);
        self.w64(q, d + 8, counter);
        fence(Ordering::SeqCst);
        self.w8(q, d, 1);
    }

    /// Before the used element of `head` is published.
    pub fn pre_put(&self, q: u16, head: u16) {
        self.w16(q, 12, head);
        fence(Ordering::SeqCst);
    }

    /// After the used element and used index (`used_idx`) are published.
    pub fn post_put(&self, q: u16, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if head < self.queue_size {
            self.w8(q, Self::desc_off(head), 0);
        }
        fence(Ordering::SeqCst);
        self.w16(q, 14, used_idx);
    }

    /// At a ring start: initialises a fresh table, or works out what to resubmit. `guest_used_idx` is
    /// the used index in the guest's ring now.
    pub fn recover(&self, q: u16, guest_used_idx: u16) -> Recovery {
        if self.r16(q, 8) == 0 {
            self.w16(q, 8, INFLIGHT_VERSION);
            self.w16(q, 10, self.queue_size);
            return Recovery::default();
        }
        self.w16(q, 10, self.queue_size);
        if self.r16(q, 14) != guest_used_idx {
            // Died between publishing the last used element and clearing its in-flight mark.
            let last = self.r16(q, 12);
            if last < self.queue_size {
                self.w8(q, Self::desc_off(last), 0);
            }
            fence(Ordering::SeqCst);
            self.w16(q, 14, guest_used_idx);
        }
        let mut list: Vec<(u64, u16)> = (0..self.queue_size)
            .filter(|&i| self.r8(q, Self::desc_off(i)) == 1)
            .map(|i| (self.r64(q, Self::desc_off(i) + 8), i))
            .collect();
        list.sort_unstable();
        let inuse = list.len() as u16;
        let next_counter = list.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Recovery {
            resubmit: list.into_iter().map(|(_, h)| h).collect(),
            next_avail: Some(guest_used_idx.wrapping_add(inuse)),
            next_counter,
        }
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_matches_libvhost_user() {
        // ALIGN_UP(16 * qs + 2, 64)
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1), 64);
    }

    #[test]
    fn fresh_table_then_resubmit_in_order() {
        let r = InflightRegion::create(2, 8).expect("create");
        assert_eq!(r.recover(1, 0), Recovery::default(), "fresh table");
        // Pop 3, 5, 1 (counters 0, 1, 2); complete 5 (used idx 1).
        for (c, h) in [(0, 3u16), (1, 5), (2, 1)] {
            r.get(1, h, c);
        }
        r.pre_put(1, 5);
        r.post_put(1, 5, 1);
        // A new incarnation maps the same fd.
        let fd = r.fd().try_clone().expect("dup");
        let again = InflightRegion::open(fd, queue_region_size(8) * 2, 0, 2, 8).expect("open");
        let rec = again.recover(1, 1);
        assert_eq!(rec.resubmit, vec![3, 1]);
        assert_eq!(rec.next_avail, Some(3));
        assert_eq!(rec.next_counter, 3);
        // Queue 0 untouched (fresh).
        assert_eq!(again.recover(0, 0), Recovery::default());
    }

    #[test]
    fn died_between_used_and_clear() {
        let r = InflightRegion::create(1, 8).expect("create");
        r.recover(0, 0);
        r.get(0, 2, 0);
        r.get(0, 4, 1);
        // Used element for 2 published (guest used idx 1) but not cleared.
        r.pre_put(0, 2);
        let rec = r.recover(0, 1);
        assert_eq!(rec.resubmit, vec![4]);
        assert_eq!(rec.next_avail, Some(2));
    }

    #[test]
    fn short_fd_is_refused() {
        let r = InflightRegion::create(1, 8).expect("create");
        let fd = r.fd().try_clone().expect("dup");
        assert!(InflightRegion::open(fd, 1 << 20, 0, 1, 8).is_err());
        let fd = r.fd().try_clone().expect("dup");
        assert!(InflightRegion::open(fd, 64, 0, 1, 8).is_err(), "smaller than the layout");
    }
}
