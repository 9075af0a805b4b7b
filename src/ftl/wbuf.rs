//! The write buffer: a ring of 4 KiB entries numbered by an ever-growing entry number.
//!
//! ```text
//!   head ─────────── taken ─────────────── tail        entry n lives in slot n % slots
//!   │ being written  │ waiting for a stripe │ free ... │
//! ```
//!
//! # Design
//! The ring's bookkeeping (entries, counters) lives under the core lock; the 4 KiB slots live
//! beside it in [`Slots`], one small mutex each, so data is copied *outside* the core lock. A writer
//! *reserves* entries under the lock (not ready), copies its data into their slots without it, then
//! re-locks to mark them ready and point the L2P at them (acknowledged at once). The L2P points at the
//! entry number, so a read that finds `Cache(n)` copies slot `n % slots` while `head <= n < tail`.
//! The core thread takes entries from `taken` in order, never past one that is not ready yet, copies
//! their slots into a media command outside the lock (a taken slot is not reused before it is
//! retired), writes them, and retires them from `head`. An entry overwritten while buffered is marked
//! dead and is never written. Entry numbers never repeat, so a stale `Cache(n)` is always recognised.
//!
//! # Limitations
//! One ring for all channels: reserving and publishing entries is serialised by the core lock
//! (bookkeeping only; no memcpy, no media I/O).

use std::sync::{Mutex, MutexGuard};

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
    /// The slot holds the data (false between a writer's reservation and its publication).
    pub ready: bool,
}

/// The data slots of the ring, each behind its own mutex (copies happen outside the core lock).
pub struct Slots(Vec<Mutex<Box<[u8]>>>);

impl Slots {
    fn new(n: usize) -> Self {
        Slots((0..n).map(|_| Mutex::new(vec![0u8; BLOCK_BYTES].into_boxed_slice())).collect())
    }

    /// The slot of entry `n`.
    pub fn at(&self, n: u64) -> MutexGuard<'_, Box<[u8]>> {
        let s = (n % self.0.len() as u64) as usize;
        self.0[s].lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The ring.
pub struct WriteBuffer {
    slots: usize,
    data: std::sync::Arc<Slots>,
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
            data: std::sync::Arc::new(Slots::new(slots)),
            entries: vec![Entry { lba: 0, origin: Origin::User, live: false, ready: false }; slots],
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

    fn slot(&self, n: u64) -> usize {
        (n % self.slots as u64) as usize
    }

    /// The data slots (shared with the channels, which copy into them without the core lock).
    pub fn data(&self) -> &std::sync::Arc<Slots> {
        &self.data
    }

    /// Appends a block (caller checked `free() > 0`); `fill` writes its 4 KiB. Returns its number.
    pub fn push(&mut self, lba: u64, origin: Origin, fill: impl FnOnce(&mut [u8])) -> u64 {
        let n = self.reserve(lba, origin);
        fill(&mut self.data.at(n));
        self.set_ready(n);
        n
    }

    /// Reserves an entry whose data the caller copies into `data().at(n)` and then publishes with
    /// [`WriteBuffer::set_ready`] (caller checked `free() > 0`). Returns its number.
    pub fn reserve(&mut self, lba: u64, origin: Origin) -> u64 {
        let n = self.tail;
        let s = self.slot(n);
        self.entries[s] = Entry { lba, origin, live: true, ready: false };
        if origin == Origin::User {
            self.user += 1;
        }
        self.tail += 1;
        n
    }

    /// Marks a reserved entry's data as written. A number the ring does not hold (retired, or not
    /// given out yet) is ignored: its slot belongs to another entry.
    pub fn set_ready(&mut self, n: u64) {
        if n >= self.head && n < self.tail {
            let s = self.slot(n);
            self.entries[s].ready = true;
        }
    }

    /// The entry `n`, if still held.
    pub fn get(&self, n: u64) -> Option<&Entry> {
        if n < self.head || n >= self.tail {
            return None;
        }
        Some(&self.entries[self.slot(n)])
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
        assert_eq!(w.get(1).map(|e| (e.lba, w.data().at(1)[0])), Some((11, 2)));
        w.kill(0);
        assert!(!w.get(0).expect("held").live);
        w.taken = 2;
        w.retire_to(2);
        assert!(w.get(0).is_none() && w.head == w.tail);
        assert_eq!((w.free(), w.user), (4, 0));
        for i in 0..4 {
            w.push(i, Origin::User, |_| {});
        }
        assert_eq!(w.free(), 0);
        assert_eq!(w.get(5).map(|e| e.lba), Some(3));
        w.taken = w.tail;
        w.retire_to(w.tail);
        let r = w.reserve(9, Origin::User);
        assert!(w.get(r).is_some_and(|e| e.live && !e.ready));
        w.data().at(r).fill(7);
        w.set_ready(r);
        assert!(w.get(r).is_some_and(|e| e.ready) && w.data().at(r)[0] == 7);
    }

    /// `set_ready` of a number the ring does not hold (retired, or not given out yet) changes no
    /// entry, though that number's slot now holds (or will hold) another entry still being copied.
    #[test]
    fn set_ready_of_a_number_not_held_changes_nothing() {
        let mut w = WriteBuffer::new(4);
        for i in 0..4 {
            w.reserve(i, Origin::User);
        }
        // The ring is full of reservations; entry 4 would share entry 0's slot.
        w.set_ready(w.tail);
        assert!((0..4).all(|n| w.get(n).is_some_and(|e| !e.ready)), "an entry was published early");
        for n in 0..2 {
            w.set_ready(n);
        }
        w.taken = 2;
        w.retire_to(2);
        let (a, b) = (w.reserve(7, Origin::User), w.reserve(8, Origin::User));
        assert_eq!((a, b), (4, 5));
        // Entries 0 and 1 are gone; their slots hold entries 4 and 5, not ready.
        w.set_ready(0);
        w.set_ready(1);
        assert!(w.get(a).is_some_and(|e| !e.ready) && w.get(b).is_some_and(|e| !e.ready));
    }

    /// `get` and `kill` answer for exactly the numbers the ring holds (`head <= n < tail`): a
    /// retired number or one not given out yet shares its slot with a held entry, which they must
    /// not report or kill. `kill` gives the origin of a live entry once.
    #[test]
    fn get_and_kill_answer_only_for_held_numbers() {
        let mut w = WriteBuffer::new(4);
        for i in 0..4 {
            w.push(100 + i, Origin::User, |_| {});
        }
        w.taken = 2;
        w.retire_to(2);
        let a = w.push(104, Origin::Reloc(7), |_| {});
        let b = w.push(105, Origin::User, |_| {});
        assert_eq!((w.head, w.tail, a, b), (2, 6, 4, 5));
        // Held: 2..6, each with its own lba (4 and 5 sit in the slots of 0 and 1).
        assert_eq!(
            (2..6).map(|n| w.get(n).map(|e| e.lba)).collect::<Vec<_>>(),
            [102, 103, 104, 105].map(Some)
        );
        // Retired 0, 1 and not given out 6, 7 (the slots of 2 and 3): nothing.
        for n in [0, 1, 6, 7, 9] {
            assert!(w.get(n).is_none(), "get({n})");
            assert_eq!(w.kill(n), None, "kill({n})");
        }
        assert!((2..6).all(|n| w.get(n).is_some_and(|e| e.live)), "a number not held killed an entry");
        // A live entry's origin, once.
        assert_eq!(w.kill(a), Some(Origin::Reloc(7)));
        assert_eq!(w.kill(a), None);
        assert_eq!(w.kill(2), Some(Origin::User));
        assert!(!w.get(2).expect("held").live && w.get(3).is_some_and(|e| e.live));
    }

    /// `retire_to` drops entries from `head` up to `n`, never past `taken` (entries not taken yet are
    /// not on media), and counts down the user entries only.
    #[test]
    fn retire_to_stops_at_taken_and_counts_user_entries() {
        let mut w = WriteBuffer::new(8);
        w.push(1, Origin::User, |_| {});
        w.push(2, Origin::Reloc(3), |_| {});
        w.push(3, Origin::User, |_| {});
        w.push(4, Origin::Reloc(3), |_| {});
        w.push(5, Origin::User, |_| {});
        assert_eq!(w.user, 3);
        w.retire_to(4);
        assert_eq!((w.head, w.user), (0, 3), "nothing taken: nothing retired");
        w.taken = 3;
        w.retire_to(1);
        assert_eq!((w.head, w.user), (1, 2));
        w.retire_to(1);
        assert_eq!((w.head, w.user), (1, 2), "retiring to head again is a no-op");
        w.retire_to(5);
        assert_eq!(
            (w.head, w.user, w.free()),
            (3, 1, 6),
            "stops at taken; the reloc entry is not a user one"
        );
        w.taken = 5;
        w.retire_to(5);
        assert_eq!((w.head, w.user, w.free()), (5, 0, 8));
    }
}
