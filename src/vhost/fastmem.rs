//! A one-region look-up cache over guest memory, for the poller's hot path.
//!
//! ```text
//!  RegionCache::host(addr, len) ─ hit: addr..addr+len inside the cached region ─► host pointer
//!                               └ miss: GuestMemoryMmap::find_region, cache that region, check again
//! ```
//!
//! # Design
//! vm-memory resolves every access (`read_obj`, `write_obj`, `get_slices`) with a region search and a
//! chain of bounds checks; a request touches guest memory a dozen times, almost always in the same
//! region. A `RegionCache` lives for one chain or one completion batch and remembers the last region
//! found. It only ever hands out a pointer for a range that lies entirely inside one region of the
//! memory it borrows, so it is exactly as strict as vm-memory's checked accessors; anything else
//! (a range across regions, an unaligned descriptor) falls back to those accessors.
//!
//! # Limitations
//! One region remembered; a chain whose buffers alternate between regions looks regions up again.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::request::GuestMem;

/// The last region found in `mem` (see the module doc).
pub struct RegionCache<'a> {
    mem: &'a GuestMem,
    start: u64,
    len: u64,
    host: *mut u8,
}

impl<'a> RegionCache<'a> {
    /// An empty cache over `mem`.
    pub fn new(mem: &'a GuestMem) -> Self {
        Self { mem, start: 0, len: 0, host: std::ptr::null_mut() }
    }

    /// The memory behind the cache.
    pub fn mem(&self) -> &'a GuestMem {
        self.mem
    }

    fn inside(&self, addr: u64, end: u64) -> bool {
        addr >= self.start && end <= self.start + self.len
    }

    /// Host address of `[addr, addr + len)` when the whole range lies in one region of the memory.
    pub fn host(&mut self, addr: GuestAddress, len: usize) -> Option<*mut u8> {
        let end = addr.0.checked_add(u64::try_from(len).ok()?)?;
        if !self.inside(addr.0, end) {
            let r = self.mem.find_region(addr)?;
            let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
            self.start = r.start_addr().0;
            self.len = r.len();
            self.host = host;
            if !self.inside(addr.0, end) {
                return None;
            }
        }
        // In bounds of the region's mapping by the check above; pointer arithmetic only.
        Some(self.host.wrapping_add(usize::try_from(addr.0 - self.start).ok()?))
    }

    /// Reads the descriptor at `addr` (`None`: not in guest memory).
    pub fn read_desc(&mut self, addr: GuestAddress) -> Option<Descriptor> {
        match self.host(addr, std::mem::size_of::<Descriptor>()) {
            Some(p) if p as usize % std::mem::align_of::<Descriptor>() == 0 => {
                // SAFETY: `p..p+16` lies inside one mapped region of guest memory (checked by `host`;
                // the mapping lives as long as `self.mem` is borrowed) and is aligned for
                // `Descriptor`, a plain `repr(C)` struct valid for any bits (`ByteValued`). Volatile:
                // the guest may write it concurrently.
                Some(unsafe { std::ptr::read_volatile(p.cast::<Descriptor>()) })
            }
            _ => self.mem.read_obj(addr).ok(),
        }
    }

    /// Writes one byte at `addr`; false when `addr` is not in guest memory.
    pub fn write_u8(&mut self, addr: GuestAddress, v: u8) -> bool {
        match self.host(addr, 1) {
            Some(p) => {
                // SAFETY: `p` is inside one mapped region of guest memory (checked by `host`), which
                // stays mapped while `self.mem` is borrowed; a byte has no alignment.
                unsafe { std::ptr::write_volatile(p, v) };
                true
            }
            None => self.mem.write_obj(v, addr).is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_misses_and_bounds() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0x1000), 0x1000), (GuestAddress(0x4000), 0x1000)])
            .expect("mem");
        let mut c = RegionCache::new(&mem);
        assert!(c.host(GuestAddress(0x1000), 0x1000).is_some());
        assert!(c.host(GuestAddress(0x1fff), 2).is_none(), "past the region's end");
        assert!(c.host(GuestAddress(0x3000), 1).is_none(), "a hole");
        assert!(c.host(GuestAddress(0x4ff0), 16).is_some());
        assert!(c.host(GuestAddress(u64::MAX), 2).is_none(), "overflow");
        let d = Descriptor::new(0xdead_0000, 512, 3, 7);
        mem.write_obj(d, GuestAddress(0x4010)).expect("w");
        let r = c.read_desc(GuestAddress(0x4010)).expect("desc");
        assert_eq!((r.addr().0, r.len(), r.flags(), r.next()), (0xdead_0000, 512, 3, 7));
        mem.write_obj(d, GuestAddress(0x1003)).expect("w");
        let r = c.read_desc(GuestAddress(0x1003)).expect("unaligned, through vm-memory");
        assert_eq!(r.next(), 7);
        assert!(c.read_desc(GuestAddress(0x1ff8)).is_none());
        assert!(c.write_u8(GuestAddress(0x4fff), 9));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4fff)).expect("r"), 9);
        assert!(!c.write_u8(GuestAddress(0x5000), 9));
    }
}
