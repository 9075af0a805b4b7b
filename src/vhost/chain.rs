//! A descriptor-chain walker that starts from a head index (for resubmitting in-flight requests
//! after a restart: virtio-queue only builds chains while popping the avail ring).
//!
//! ```text
//!  ChainWalker::new(mem, desc_table, queue_size, head) ─► Iterator<Item = Descriptor>
//!     follows NEXT within the table, switches once to an indirect table, stops after
//!     `queue_size` (or the indirect table's size) descriptors, on an unreadable descriptor,
//!     an out-of-range index, a nested indirect table or 4 GiB of total length
//! ```
//!
//! # Design
//! The same rules as virtio-queue 0.18's `DescriptorChain` iterator, so [`super::request::Request`]
//! sees the same descriptors whether a chain was popped or resubmitted. A chain cut short leaves its
//! last descriptor with `NEXT` set, which the parser refuses.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress};

use super::fastmem::RegionCache;
use super::request::GuestMem;

/// Iterates the descriptors of the chain at `head`.
pub struct ChainWalker<'a> {
    /// Descriptor reads go through a one-region cache: one region look-up per chain, not per descriptor.
    mem: RegionCache<'a>,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    yielded: u32,
}

impl<'a> ChainWalker<'a> {
    /// A walker over the chain at `head` of the table at `table` with `size` entries.
    pub fn new(mem: &'a GuestMem, table: GuestAddress, size: u16, head: u16) -> Self {
        Self { mem: RegionCache::new(mem), table, size, next: head, ttl: size, indirect: false, yielded: 0 }
    }
}

impl Iterator for ChainWalker<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.size {
            return None;
        }
        let at = self.table.checked_add(u64::from(self.next) * 16)?;
        let d: Descriptor = self.mem.read_desc(at)?;
        if d.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
            if self.indirect || d.len() % 16 != 0 || d.len() / 16 > u32::from(u16::MAX) {
                self.ttl = 0;
                return None;
            }
            self.indirect = true;
            self.table = d.addr();
            self.size = (d.len() / 16) as u16;
            self.ttl = self.size;
            self.next = 0;
            return self.next();
        }
        self.yielded = self.yielded.checked_add(d.len())?;
        if d.flags() & VRING_DESC_F_NEXT as u16 != 0 {
            self.next = d.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(d)
    }
}
