//! `malloc`: a RAM-backed bdev (SPEC §2 modules).
//!
//! ```text
//!  submit ─► memcpy to/from one anonymous mapping ─► done queue ─► poll
//! ```
//!
//! # Design
//! One anonymous mapping holds the data, populated by a background thread right after creation with
//! `MADV_POPULATE_WRITE` (a RAM disk owns its RAM, and first-touch page faults would otherwise dominate
//! write latency). Populating in the background keeps start-up (and so a restart) fast: 256 MiB took
//! 130–570 ms with `MAP_POPULATE`, during which the export's socket was not yet listening. Populating
//! never changes the contents, so it may race with I/O. Every channel copies between it and the I/O memory with raw
//! copies (no lock: concurrent overlapping writes give unspecified content, as on a real disk).
//! I/O completes in `submit` but is only reported by `poll` (one completion path).
//! Unmap and write_zeroes zero the range; flush is a no-op.
//!
//! # Limitations
//! Contents are lost at exit; no persistence, no NUMA placement.

use std::sync::Arc;

use super::{
    check_geometry, Bdev, BdevError, BdevInfo, BdevIo, Completion, DoneQueue, IoKind, IoKinds, ModuleChannel,
    Rejected,
};

/// Anonymous memory owned by the bdev.
struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is process memory owned by `Region`; access is by raw pointer copies only.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping created in `MallocBdev::new`, unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// A RAM disk.
pub struct MallocBdev {
    info: BdevInfo,
    region: Arc<Region>,
}

impl MallocBdev {
    /// A zeroed RAM disk of `size_bytes` (a multiple of `block_size`, which is 512 or 4096).
    pub fn new(name: &str, size_bytes: u64, block_size: u32) -> Result<Self, BdevError> {
        let num_blocks = check_geometry(size_bytes, block_size)?;
        let len = usize::try_from(size_bytes)
            .map_err(|_| BdevError::InvalidConfig(format!("size {size_bytes} does not fit in memory")))?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(BdevError::io(
                format!("malloc bdev '{name}': mmap {len} bytes"),
                std::io::Error::last_os_error(),
            ));
        }
        let mut info = BdevInfo::new(name, "malloc", block_size, num_blocks);
        info.supports = IoKinds { flush: true, unmap: true, write_zeroes: true, reset: true };
        info.unmap_reads_zeroes = true;
        let region = Arc::new(Region { ptr: ptr.cast(), len });
        populate_in_background(name, region.clone());
        Ok(Self { info, region })
    }
}

/// `MADV_POPULATE_WRITE` (Linux 5.14; not in the libc crate yet).
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Faults the whole mapping in from a background thread (the thread keeps the region alive).
/// Kernels without `MADV_POPULATE_WRITE` leave the pages to first touch.
fn populate_in_background(name: &str, region: Arc<Region>) {
    let name = name.to_string();
    let spawned = std::thread::Builder::new().name(format!("malloc-{name}-populate")).spawn(move || {
        let start = std::time::Instant::now();
        // SAFETY: the range is exactly our mapping, kept alive by `region`; populating only faults
        // pages in (contents unchanged), so concurrent I/O is unaffected.
        let rc = unsafe { libc::madvise(region.ptr.cast(), region.len, MADV_POPULATE_WRITE) };
        if rc == 0 {
            log::debug!("malloc bdev '{name}': {} MiB populated in {:?}", region.len >> 20, start.elapsed());
        } else {
            let e = std::io::Error::last_os_error();
            log::info!("malloc bdev '{name}': not pre-populated ({e}); pages fault in on first write");
        }
    });
    if let Err(e) = spawned {
        log::warn!("malloc bdev: cannot start the populate thread: {e}");
    }
}

impl Bdev for MallocBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError> {
        Ok(Box::new(MallocChannel {
            region: self.region.clone(),
            block_size: u64::from(self.info.block_size),
            done: DoneQueue::default(),
        }))
    }
}

struct MallocChannel {
    region: Arc<Region>,
    block_size: u64,
    done: DoneQueue,
}

impl ModuleChannel for MallocChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        // The generic layer checked the range against num_blocks, so offsets are inside the region.
        let off = (io.offset_blocks * self.block_size) as usize;
        let len = (io.num_blocks * self.block_size) as usize;
        debug_assert!(off + len <= self.region.len);
        match io.kind {
            IoKind::Read => {
                // SAFETY: `off..off+len` is inside the mapping (validated range); the I/O memory is
                // distinct from our private mapping.
                unsafe { io.bufs.copy_from_raw(0, self.region.ptr.add(off), len) };
            }
            IoKind::Write => {
                // SAFETY: as above, copying in the other direction.
                unsafe { io.bufs.copy_to_raw(0, self.region.ptr.add(off), len) };
            }
            IoKind::Unmap | IoKind::WriteZeroes => {
                // SAFETY: `off..off+len` is inside the mapping.
                unsafe { std::ptr::write_bytes(self.region.ptr.add(off), 0, len) };
            }
            IoKind::Flush | IoKind::Reset => {}
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
    use crate::bdev::{IoError, IoVecs, Registry};

    #[test]
    fn write_read_unmap_and_validation() {
        let reg = Registry::new();
        reg.register(Arc::new(MallocBdev::new("m0", 1 << 20, 512).expect("malloc"))).expect("register");
        let desc = reg.open("m0", true).expect("open");
        let mut ch = desc.channel().expect("channel");
        let data: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        ch.submit(BdevIo::write(10, 2, IoVecs::from_slice(&data), 1));
        let rbuf = IoVecs::alloc(1024);
        let keep = rbuf.slice(0, 1024).expect("slice");
        ch.submit(BdevIo::read(10, 2, rbuf, 2));
        ch.submit(BdevIo::no_data(IoKind::Unmap, 0, 0, 3));
        ch.submit(BdevIo::read(2047, 2, IoVecs::alloc(1024), 4));
        let mut done = Vec::new();
        ch.poll(&mut done);
        done.sort_by_key(|c| c.tag);
        assert_eq!(done.len(), 4);
        assert_eq!(done[0].result, Ok(()));
        assert_eq!(done[1].result, Ok(()));
        assert_eq!(keep.to_vec(), data);
        assert_eq!(done[2].result, Err(IoError::InvalidRange));
        assert_eq!(done[3].result, Err(IoError::InvalidRange));

        let ro = reg.open("m0", false).expect("open ro");
        let mut ch = ro.channel().expect("channel");
        ch.submit(BdevIo::write(0, 1, IoVecs::alloc(512), 9));
        let mut done = Vec::new();
        ch.poll(&mut done);
        assert_eq!(done, vec![Completion { tag: 9, result: Err(IoError::ReadOnly) }]);
    }
}
