//! The write buffer: a ring of 4 KiB entries numbered by an ever-growing entry number.
//!
//! ```text
//!   head ─────────── taken ─────────────── tail        entry n lives in slot n % slots
//!   │ being written  │ waiting for a stripe │ free ... │
//! ```
//!
//! # Design
//! Writers append under the core lock and are acknowledged at once; the L2P points at the entry
//! number, so a read that finds `Cache(n)` copies slot `n % slots` while `head <= n < tail`. The core
//! thread takes entries from `taken` in order, writes them, and retires them from `head`. An entry
//! overwritten while buffered is marked dead and is never written. Entry numbers never repeat, so a
//! stale `Cache(n)` is always recognised.
//!
//! # Limitations
//! One ring for all channels (writes are copied under the core lock: a memcpy, never media I/O).

use super::layout::BLOCK_BYTES;

/// Where a buffered block comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A user write.
    User,
    /// Relocated out of this band.
    Reloc(u32),
}

/// One buffered block.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Logical block.
    pub lba: u64,
    /// Source.
    pub origin: Origin,
    /// False once overwritten or unmapped while buffered.
    pub live: bool,
}

/// The ring.
pub struct WriteBuffer {
    slots: usize,
    data: Vec<u8>,
    entries: Vec<Entry>,
    /// Oldest entry still held.
    pub head: u64,
    /// Next entry to hand to the writer.
    pub taken: u64,
    /// Next entry number.
    pub tail: u64,
    /// User entries held.
    pub user: usize,
}

impl WriteBuffer {
    /// A ring of `slots` blocks.
    pub fn new(slots: usize) -> Self {
        WriteBuffer {
            slots,
            data: vec![0u8; slots * BLOCK_BYTES],
            entries: vec![Entry { lba: 0, origin: Origin::User, live: false }; slots],
            head: 0,
            taken: 0,
            tail: 0,
            user: 0,
        }
    }

    /// Capacity in blocks.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Free slots.
    pub fn free(&self) -> usize {
        self.slots - (self.tail - self.head) as usize
    }

    /// Entries waiting to be taken.
    pub fn waiting(&self) -> u64 {
        self.tail - self.taken
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    fn slot(&self, n: u64) -> usize {
        (n % self.slots as u64) as usize
    }

    /// Appends a block (caller checked `free() > 0`); `fill` writes its 4 KiB. Returns its number.
    pub fn push(&mut self, lba: u64, origin: Origin, fill: impl FnOnce(&mut [u8])) -> u64 {
        let n = self.tail;
        let s = self.slot(n);
        fill(&mut self.data[s * BLOCK_BYTES..(s + 1) * BLOCK_BYTES]);
        self.entries[s] = Entry { lba, origin, live: true };
        if origin == Origin::User {
            self.user += 1;
        }
        self.tail += 1;
        n
    }

    /// The entry `n` and its data, if still held.
    pub fn get(&self, n: u64) -> Option<(&Entry, &[u8])> {
        if n < self.head || n >= self.tail {
            return None;
        }
        let s = self.slot(n);
        Some((&self.entries[s], &self.data[s * BLOCK_BYTES..(s + 1) * BLOCK_BYTES]))
    }

    /// Marks entry `n` dead (overwritten or unmapped); returns its origin if it was live.
    pub fn kill(&mut self, n: u64) -> Option<Origin> {
        if n >= self.head && n < self.tail {
            let s = self.slot(n);
            let was = self.entries[s].live;
            self.entries[s].live = false;
            return was.then_some(self.entries[s].origin);
        }
        None
    }

    /// Drops every entry below `n` (they are on media).
    pub fn retire_to(&mut self, n: u64) {
        while self.head < n.min(self.taken) {
            let s = self.slot(self.head);
            if self.entries[s].origin == Origin::User {
                self.user -= 1;
            }
            self.head += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_numbers_and_retire() {
        let mut w = WriteBuffer::new(4);
        let a = w.push(10, Origin::User, |b| b.fill(1));
        let b = w.push(11, Origin::Reloc(3), |b| b.fill(2));
        assert_eq!((a, b, w.free(), w.user), (0, 1, 2, 1));
        assert_eq!(w.get(1).map(|(e, d)| (e.lba, d[0])), Some((11, 2)));
        w.kill(0);
        assert!(!w.get(0).expect("held").0.live);
        w.taken = 2;
        w.retire_to(2);
        assert!(w.get(0).is_none() && w.is_empty());
        assert_eq!((w.free(), w.user), (4, 0));
        for i in 0..4 {
            w.push(i, Origin::User, |_| {});
        }
        assert_eq!(w.free(), 0);
        assert_eq!(w.get(5).map(|e| e.0.lba), Some(3));
    }
}
