//! The line map of one cache instance: which core line each cache line holds, its valid and dirty
//! sectors, LRU order, line-range locks and the per-core counters.
//!
//! ```text
//!  index: (core id, core line) ──► cache line ──► Line { key, valid, dirty, disk_dirty, seq, lru links }
//!                                              └──► Hot  { key, valid, pins }  (32 bytes: a read hit's)
//!  lru:   head (most recent) ⇄ … ⇄ tail (eviction candidates)        free: unused cache lines
//!  locks: [(core, first line, last line, owner, soft)] — one entry per request or cleaned line in flight
//!  wgen:  per cache line, a write generation (the cleaner checks it before marking a line clean)
//!  hot:   per cache line, a copy of its key and valid bits beside the pin word (read hits in flight
//!         and the reference bit)                          dirty order: (dirty since, line), oldest first
//! ```
//!
//! A read hit touches two cache lines of map memory, one after the other: the index slot and the
//! line's `Hot` record (key compare, valid check and pin in one 32-byte record). With the key and
//! valid bits only in `Line` and the pins apart, it was three dependent misses (slot, line, pin
//! word); with a working set larger than the CPU's caches each is a trip to memory.
//!
//! # Design
//! Plain data behind the instance's one `RwLock` (see `cache/mod.rs` for the locking rule: held only
//! for look-ups and bookkeeping, never across base I/O; read hits take the read lock, and what they
//! change — pins and reference bits — are atomics). Range locks make every request but a read
//! hit exclusive on the core lines it touches for its whole life (data I/O, metadata persist), so no
//! two such requests ever interleave on a line. A cleaning batch holds its lines exclusively only
//! while it reads them from the cache device; while it writes them back to the core it holds *soft*
//! locks, which stop only requests that may write the core (wt/wa/pt/wi writes, unmap, ...): reads
//! and write-back writes pass, and a line rewritten meanwhile (its `wgen` moved) stays dirty.
//! A read hit pins its lines instead: it may overlap a write in flight on the same sectors (as any two overlapping
//! requests may), but its line is never evicted or reused under it. `disk_dirty` is the dirty mask that may be on
//! the cache device: a line is only reused when it is zero, so a stale dirty record can never point
//! at another line's data (see `layout.rs`).
//!
//! # Limitations
//! The eviction scan looks at most `EVICT_SCAN` lines from the LRU tail; lock look-up is linear in
//! the number of requests in flight. LRU is approximate (second chance, as CLOCK): a read hit only
//! sets the line's reference bit; the eviction scan moves a referenced line from the tail to the head
//! (clearing the bit) instead of evicting it. Requests under the write lock (writes, misses) move
//! their lines to the head directly, skipping lines moved there within the last `num_lines / 8` moves.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// (core id, line number within the core).
pub type Key = (u16, u64);
const NIL: u32 = u32::MAX;
/// In a line's `pins` word: the reference bit (a read hit since the line was last moved to the LRU
/// head: second chance) and the count of read hits in flight.
const REFERENCED: u32 = 1 << 31;
const PIN_COUNT: u32 = !REFERENCED;

/// Takes a read hit's pin on a slot and sets its reference bit (second chance).
fn pin(h: &Slot) {
    if h.pins.fetch_add(1, Ordering::AcqRel) & REFERENCED == 0 {
        h.pins.fetch_or(REFERENCED, Ordering::Relaxed);
    }
}

/// Lines examined from the LRU tail when looking for a victim.
pub const EVICT_SCAN: usize = 512;

/// `Slot::key` of a slot that never held a key since the last rebuild (ends a probe).
const EMPTY: u64 = u64::MAX;
/// `Slot::key` of a slot whose key was removed (a probe goes on past it; an insert may reuse it).
const TOMB: u64 = u64::MAX - 1;
/// Core lines at or above this are never cached (their packed key would need more than 48 bits; a
/// core that large, 2^47 lines, is refused when it is attached).
pub const MAX_CORE_LINES: u64 = 1 << 47;

/// A key in one word: core id in the top 16 bits, core line below (None: too large to cache).
fn pack(key: Key) -> Option<u64> {
    (key.1 < MAX_CORE_LINES).then(|| u64::from(key.0) << 48 | key.1)
}

fn unpack(k: u64) -> Key {
    ((k >> 48) as u16, k & ((1 << 48) - 1))
}

/// One slot of the index: a cached core line's key, the cache line holding it, its valid sectors
/// (a copy of the line's, written with it) and its pin word, in 32 bytes (two per 64-byte cache line,
/// never split). A read hit reads, checks and pins in this one record: one memory miss for the
/// look-up, the valid check and the pin together.
///
/// Everything but the pin word is written only under the map's write lock and read under its read
/// lock (relaxed atomics: the lock orders them); the pin word is taken under the read lock and
/// dropped without any lock, by the slot's position, which is why a pinned slot never moves (see
/// [`Index`]). Atomics, so the array can be shared with the channels for that unpin.
#[derive(Debug)]
#[repr(C, align(32))]
pub struct Slot {
    /// Packed key (see `pack`), `EMPTY` or `TOMB`.
    key: AtomicU64,
    /// The cache line holding the key.
    line: AtomicU32,
    /// Read hits in flight, and the line's reference bit (`REFERENCED`).
    pins: AtomicU32,
    valid: [AtomicU64; 2],
}

impl Slot {
    fn empty() -> Self {
        Self {
            key: AtomicU64::new(EMPTY),
            line: AtomicU32::new(NIL),
            pins: AtomicU32::new(0),
            valid: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// The line's valid sectors.
    fn valid(&self) -> u128 {
        u128::from(self.valid[0].load(Ordering::Relaxed))
            | u128::from(self.valid[1].load(Ordering::Relaxed)) << 64
    }

    fn set_valid(&self, valid: u128) {
        self.valid[0].store(valid as u64, Ordering::Relaxed);
        self.valid[1].store((valid >> 64) as u64, Ordering::Relaxed);
    }
}

/// A channel's view of the index slots, used without the map's lock:
/// * [`Slots::unpin`]: a read hit's completion drops its pin by the slot's position (a pinned slot
///   never moves);
/// * [`Slots::touch`]: a channel with a batch of read hits reads all their home slots first, one
///   load right after the other, so the CPU overlaps their cache misses instead of taking them one
///   by one as each look-up comes. Only a hint: the value read is not used (the table's size and
///   hash never change, so the home slot is right; what it holds is checked again under the lock).
pub struct Slots {
    slots: Arc<[Slot]>,
    shift: u32,
    mask: usize,
}

impl Slots {
    /// Ends a read hit on slot `pos` (see [`LineMap::pin_if_valid`]).
    pub fn unpin(&self, pos: u32) {
        if let Some(s) = self.slots.get(pos as usize) {
            s.pins.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Loads the home slot of `key`; returns what it read (fold it into a value the caller keeps
    /// alive, e.g. through `std::hint::black_box`, so the load is not dropped).
    pub fn touch(&self, key: Key) -> u64 {
        pack(key).map_or(0, |k| {
            let home = home_of(k, self.shift, self.mask);
            self.slots.get(home).map_or(0, |s| s.key.load(Ordering::Relaxed))
        })
    }
}

/// A packed key's home slot in a table of `mask + 1` slots (`shift`: 64 - log2 of that): the index's
/// multiplicative hash.
fn home_of(packed: u64, shift: u32, mask: usize) -> usize {
    (packed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> shift) as usize & mask
}

/// The index (core line → cache line): open addressing with linear probing over [`Slot`] records
/// that hold the key, the line number and what a read hit needs, so a hit's look-up, valid check and
/// pin cost one memory miss (the line's own record is not touched). At most half full of keys.
///
/// Removal leaves a tombstone instead of shifting the probe run back: a slot never moves while its
/// key is in the index, so a hit can drop its pin by the slot's position without the lock. When
/// keys and tombstones fill three quarters of the table it is rebuilt (tombstones cleared, keys
/// moved), at an insert, under the write lock; pinned slots stay in place through it. Probes are
/// bounded by the table size.
struct Index {
    slots: Arc<[Slot]>,
    mask: usize,
    shift: u32,
    /// Keys in the table.
    used: usize,
    /// Tombstones in the table.
    tombs: usize,
}

impl Index {
    fn new(num_lines: u32) -> Self {
        let size = (2 * num_lines as usize).next_power_of_two().max(2);
        Self {
            slots: (0..size).map(|_| Slot::empty()).collect(),
            mask: size - 1,
            shift: 64 - size.trailing_zeros(),
            used: 0,
            tombs: 0,
        }
    }

    fn home(&self, packed: u64) -> usize {
        home_of(packed, self.shift, self.mask)
    }

    /// The slot holding `key`.
    fn find(&self, key: Key) -> Option<usize> {
        let k = pack(key)?;
        let mut i = self.home(k);
        for _ in 0..self.slots.len() {
            match self.slots[i].key.load(Ordering::Relaxed) {
                x if x == k => return Some(i),
                EMPTY => return None,
                _ => i = (i + 1) & self.mask,
            }
        }
        None
    }

    /// Adds `key` (absent; `pack`able) → `line` with `valid`; returns its slot, or None when the
    /// key cannot be cached.
    fn insert(&mut self, key: Key, line: u32, valid: u128) -> Option<usize> {
        let k = pack(key)?;
        let mut i = self.home(k);
        for _ in 0..self.slots.len() {
            let x = self.slots[i].key.load(Ordering::Relaxed);
            if x == EMPTY || x == TOMB {
                if x == TOMB {
                    self.tombs -= 1;
                }
                let s = &self.slots[i];
                s.key.store(k, Ordering::Relaxed);
                s.line.store(line, Ordering::Relaxed);
                s.pins.store(0, Ordering::Relaxed);
                s.set_valid(valid);
                self.used += 1;
                return Some(i);
            }
            i = (i + 1) & self.mask;
        }
        None
    }

    /// Removes the key of slot `i` (which must not be pinned).
    fn remove(&mut self, i: usize) {
        let s = &self.slots[i];
        let x = s.key.load(Ordering::Relaxed);
        if x == EMPTY || x == TOMB {
            return;
        }
        s.key.store(TOMB, Ordering::Relaxed);
        s.line.store(NIL, Ordering::Relaxed);
        s.set_valid(0);
        self.used -= 1;
        self.tombs += 1;
    }

    /// True when a rebuild is due (keys and tombstones fill three quarters of the table).
    fn crowded(&self) -> bool {
        self.tombs > 0 && (self.used + self.tombs) * 4 >= self.slots.len() * 3
    }

    /// Rebuilds the table: every key moves to its best slot and the tombstones go, except that a
    /// pinned slot stays where it is (a hit will unpin it by position), and the empty slots between
    /// its key's home and it become tombstones (its probe run must not be cut). Calls
    /// `moved(line, slot)` for every key that moved. Under the write lock: no pin can be taken
    /// meanwhile (one may be dropped: that slot just stays put).
    fn rebuild(&mut self, mut moved: impl FnMut(u32, usize)) {
        let mut keys = Vec::with_capacity(self.used);
        let mut pinned = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let k = s.key.load(Ordering::Relaxed);
            if k == EMPTY || k == TOMB {
                s.key.store(EMPTY, Ordering::Relaxed);
                continue;
            }
            let pins = s.pins.load(Ordering::Acquire);
            if pins & PIN_COUNT != 0 {
                pinned.push((i, k));
                continue;
            }
            keys.push((k, s.line.load(Ordering::Relaxed), s.valid(), pins));
            s.key.store(EMPTY, Ordering::Relaxed);
        }
        self.used = pinned.len();
        self.tombs = 0;
        for &(p, k) in &pinned {
            let mut i = self.home(k);
            while i != p {
                let s = &self.slots[i];
                if s.key.load(Ordering::Relaxed) == EMPTY {
                    s.key.store(TOMB, Ordering::Relaxed);
                    self.tombs += 1;
                }
                i = (i + 1) & self.mask;
            }
        }
        for (k, line, valid, pins) in keys {
            if let Some(i) = self.insert(unpack(k), line, valid) {
                // The reference bit moves with the key.
                self.slots[i].pins.store(pins, Ordering::Relaxed);
                moved(line, i);
            }
        }
    }
}

/// One cache line at run time: what the owner (misses, writes, cleaning, metadata, LRU) works with.
/// Its key and valid bits are private: every change goes through the map, which keeps the index
/// slot (key, valid copy) in step.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
pub struct Line {
    /// The core line held, if any.
    key: Option<Key>,
    in_lru: bool,
    /// Runtime state differs from the persisted record.
    pub md_dirty: bool,
    /// The map's touch clock when this line was last moved to the LRU head.
    touched: u32,
    /// Valid sectors.
    valid: u128,
    /// Dirty sectors (newer than the core).
    pub dirty: u128,
    /// Dirty sectors that may be recorded on the cache device (over-estimate: while a record write
    /// is in flight, the old and the new record's bits).
    pub disk_dirty: u128,
    /// Dirty sectors certainly recorded on the cache device (under-estimate: while a record write is
    /// in flight, the bits both the old and the new record have). A write-back write must wait for
    /// a record write unless its sectors are all in here.
    pub disk_sure: u128,
    /// Sequence number of the last persisted record.
    pub seq: u64,
    /// When the line became dirty (ms since the instance started).
    pub dirty_since_ms: u64,
    prev: u32,
    next: u32,
    /// The index slot of its key (`NIL` without one).
    slot: u32,
}

impl Line {
    /// The core line held, if any.
    pub fn key(&self) -> Option<Key> {
        self.key
    }

    /// Valid sectors.
    pub fn valid(&self) -> u128 {
        self.valid
    }

    fn empty() -> Self {
        Self {
            key: None,
            valid: 0,
            dirty: 0,
            disk_dirty: 0,
            disk_sure: 0,
            md_dirty: false,
            seq: 0,
            dirty_since_ms: 0,
            prev: NIL,
            next: NIL,
            slot: NIL,
            in_lru: false,
            touched: 0,
        }
    }
}

/// Counters of one core (or of the whole instance when summed).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Reads served entirely from the cache.
    pub read_hits: u64,
    /// Reads served entirely from the core.
    pub read_misses: u64,
    /// Reads served partly from each.
    pub read_partial_hits: u64,
    /// Writes to lines already cached.
    pub write_hits: u64,
    /// Writes to lines not cached.
    pub write_misses: u64,
    /// Cache lines holding this core's data.
    pub occupancy_lines: u64,
    /// Cache lines with dirty sectors.
    pub dirty_lines: u64,
    /// Lines evicted to make room.
    pub evictions: u64,
    /// Line runs written back to the core by the cleaner.
    pub cleaner_writes: u64,
}

impl Counters {
    /// Adds `o` to `self`.
    pub fn add(&mut self, o: &Counters) {
        self.read_hits += o.read_hits;
        self.read_misses += o.read_misses;
        self.read_partial_hits += o.read_partial_hits;
        self.write_hits += o.write_hits;
        self.write_misses += o.write_misses;
        self.occupancy_lines += o.occupancy_lines;
        self.dirty_lines += o.dirty_lines;
        self.evictions += o.evictions;
        self.cleaner_writes += o.cleaner_writes;
    }
}

/// The line map.
pub struct LineMap {
    /// Every cache line.
    pub lines: Vec<Line>,
    index: Index,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    /// (core, first line, last line, owner, soft): a soft lock (a cleaning batch writing back to the
    /// core) lets requests that never write the core pass (see [`LineMap::try_lock_passing`]).
    locks: Vec<(u16, u64, u64, u64, bool)>,
    /// Per cache line: bumped by every change of its data or dirty sectors by a request (and when
    /// the line is taken or dropped), so the cleaner can tell whether a line it read was rewritten
    /// before its write-back completed.
    wgen: Vec<u64>,
    /// Lines whose record must be written.
    pub md_pending: Vec<u32>,
    /// Per-core counters, indexed by core id.
    pub counters: Vec<Counters>,
    /// Someone waits for a lock.
    pub lock_waiters: bool,
    /// Dirty lines by (dirty since, line): the cleaner's order, without scanning the map.
    dirty_order: BTreeSet<(u64, u32)>,
    /// Counts moves to the LRU head.
    clock: u32,
    /// A line moved to the head fewer than this many moves ago is still among the `recent` most
    /// recently used: touching it again changes nothing that matters and is skipped.
    recent: u32,
}

impl LineMap {
    /// An empty map of `num_lines` lines.
    pub fn new(num_lines: u32) -> Self {
        Self {
            lines: vec![Line::empty(); num_lines as usize],
            index: Index::new(num_lines),
            free: (0..num_lines).rev().collect(),
            head: NIL,
            tail: NIL,
            locks: Vec::new(),
            wgen: vec![0; num_lines as usize],
            md_pending: Vec::new(),
            counters: Vec::new(),
            lock_waiters: false,
            dirty_order: BTreeSet::new(),
            clock: 0,
            recent: num_lines / 8,
        }
    }

    /// Counters of `core`.
    pub fn counters(&mut self, core: u16) -> &mut Counters {
        let i = usize::from(core);
        if self.counters.len() <= i {
            self.counters.resize(i + 1, Counters::default());
        }
        &mut self.counters[i]
    }

    /// The cache line holding `key`.
    pub fn lookup(&self, key: Key) -> Option<u32> {
        self.index.find(key).map(|i| self.index.slots[i].line.load(Ordering::Relaxed))
    }

    /// The index slots, shared with a channel (see [`Slots`]).
    pub fn slots(&self) -> Slots {
        Slots { slots: self.index.slots.clone(), shift: self.index.shift, mask: self.index.mask }
    }

    /// A read hit within one line: when every sector of `want` of `key` is valid in the cache, pins
    /// the key's slot (see [`Self::pin_slot`]) and returns (cache line, slot). Touches the slot
    /// only.
    pub fn pin_if_valid(&self, key: Key, want: u128) -> Option<(u32, u32)> {
        let (line, slot) = self.find_valid(key, want)?;
        self.pin_slot(slot);
        Some((line, slot))
    }

    /// (cache line, slot) of `key` when every sector of `want` is valid in the cache.
    pub fn find_valid(&self, key: Key, want: u128) -> Option<(u32, u32)> {
        let i = self.index.find(key)?;
        let h = &self.index.slots[i];
        (h.valid() & want == want).then(|| (h.line.load(Ordering::Relaxed), i as u32))
    }

    /// A read hit on slot `slot` (under the map's read lock): pins its line until the hit completes
    /// (the hit's completion unpins it without the map lock, [`Slots::unpin`]) and marks it
    /// referenced (second chance).
    pub fn pin_slot(&self, slot: u32) {
        if let Some(s) = self.index.slots.get(slot as usize) {
            pin(s);
        }
    }

    /// Sets line `i`'s key and valid bits, keeping its index slot in step (removed, taken, or its
    /// valid copy updated). False (nothing changed) when a new key cannot be cached (`pack`).
    fn set_key_valid(&mut self, i: u32, key: Option<Key>, valid: u128) -> bool {
        let l = &self.lines[i as usize];
        if l.key == key {
            if let Some(s) = self.index.slots.get(l.slot as usize) {
                s.set_valid(valid);
            }
            self.lines[i as usize].valid = valid;
            return true;
        }
        if l.key.is_some() {
            let slot = l.slot as usize;
            self.index.remove(slot);
        }
        let mut slot = NIL;
        if let Some(k) = key {
            if self.index.crowded() {
                let lines = &mut self.lines;
                self.index.rebuild(|line, s| lines[line as usize].slot = s as u32);
            }
            match self.index.insert(k, i, valid) {
                Some(s) => slot = s as u32,
                None => {
                    let l = &mut self.lines[i as usize];
                    (l.key, l.valid, l.slot) = (None, 0, NIL);
                    return false;
                }
            }
        }
        let l = &mut self.lines[i as usize];
        (l.key, l.valid, l.slot) = (key, valid, slot);
        true
    }

    /// The index slot of line `i` (None without a key).
    fn slot_of(&self, i: u32) -> Option<&Slot> {
        self.index.slots.get(self.lines.get(i as usize)?.slot as usize)
    }

    /// Number of free lines.
    pub fn free_lines(&self) -> usize {
        self.free.len()
    }

    /// Locks core lines `first..=last` of `core` for `owner`; false when any is held by someone else.
    pub fn try_lock(&mut self, core: u16, first: u64, last: u64, owner: u64) -> bool {
        self.try_lock_passing(core, first, last, owner, false).is_some()
    }

    /// Like `try_lock`; with `pass_soft` (a request that never writes the core: a read, a
    /// write-back write) soft locks do not stop it. `Some(true)` when it got the lock past a soft one.
    pub fn try_lock_passing(
        &mut self,
        core: u16,
        first: u64,
        last: u64,
        owner: u64,
        pass_soft: bool,
    ) -> Option<bool> {
        let mut passed = false;
        for &(c, f, l, _, soft) in &self.locks {
            if c == core && f <= last && first <= l {
                // Only past a line that is cached (a write-back write then stays in the cache).
                if !(soft && pass_soft && (f..=l).all(|x| self.lookup((c, x)).is_some())) {
                    self.lock_waiters = true;
                    return None;
                }
                passed = true;
            }
        }
        self.locks.push((core, first, last, owner, false));
        Some(passed)
    }

    /// Turns every lock of `owner` into a soft one; returns true when someone was waiting (wake them:
    /// some may pass now).
    pub fn soften(&mut self, owner: u64) -> bool {
        for e in &mut self.locks {
            if e.3 == owner {
                e.4 = true;
            }
        }
        std::mem::take(&mut self.lock_waiters)
    }

    /// The write generation of cache line `i` (see `wgen`).
    pub fn wgen(&self, i: u32) -> u64 {
        self.wgen[i as usize]
    }

    /// Records that a request changed line `i`'s data or dirty sectors.
    pub fn bump_wgen(&mut self, i: u32) {
        self.wgen[i as usize] += 1;
    }

    /// True while a read hit on cache line `i` is in flight (read under the map's lock: no new pin can
    /// appear until it is released).
    pub fn pinned(&self, i: u32) -> bool {
        self.slot_of(i).is_some_and(|s| s.pins.load(Ordering::Acquire) & PIN_COUNT != 0)
    }

    /// True when a core line is locked.
    pub fn is_locked(&self, key: Key) -> bool {
        self.locks.iter().any(|&(c, f, l, _, _)| c == key.0 && f <= key.1 && key.1 <= l)
    }

    /// Releases every lock of `owner`; returns true when someone was waiting (wake them).
    pub fn unlock(&mut self, owner: u64) -> bool {
        self.locks.retain(|&(_, _, _, o, _)| o != owner);
        std::mem::take(&mut self.lock_waiters)
    }

    fn lru_remove(&mut self, i: u32) {
        let (p, n) = {
            let l = &mut self.lines[i as usize];
            if !l.in_lru {
                return;
            }
            l.in_lru = false;
            (l.prev, l.next)
        };
        if p != NIL {
            self.lines[p as usize].next = n;
        } else {
            self.head = n;
        }
        if n != NIL {
            self.lines[n as usize].prev = p;
        } else {
            self.tail = p;
        }
    }

    fn lru_push_front(&mut self, i: u32) {
        let old = self.head;
        self.clock = self.clock.wrapping_add(1);
        if let Some(s) = self.slot_of(i) {
            s.pins.fetch_and(PIN_COUNT, Ordering::Relaxed);
        }
        {
            let l = &mut self.lines[i as usize];
            l.touched = self.clock;
            l.prev = NIL;
            l.next = old;
            l.in_lru = true;
        }
        if old != NIL {
            self.lines[old as usize].prev = i;
        } else {
            self.tail = i;
        }
        self.head = i;
    }

    /// Marks a line most recently used. Approximate: a line still among the most recent eighth of
    /// the map is left where it is (saves the cache misses of unlinking it on every hit of a hot line).
    pub fn touch(&mut self, i: u32) {
        let l = &self.lines[i as usize];
        if l.in_lru && self.clock.wrapping_sub(l.touched) < self.recent {
            return;
        }
        self.lru_remove(i);
        self.lru_push_front(i);
    }

    /// Queues the line's record for writing.
    pub fn mark_md(&mut self, i: u32) {
        let l = &mut self.lines[i as usize];
        if !l.md_dirty {
            l.md_dirty = true;
            self.md_pending.push(i);
        }
    }

    /// A cache line for `key` (which must not be present): a free one or an evicted clean one.
    pub fn alloc(&mut self, key: Key) -> Option<u32> {
        pack(key)?;
        let i = match self.free.pop() {
            Some(i) => i,
            None => self.evict()?,
        };
        self.wgen[i as usize] += 1;
        self.lines[i as usize].dirty = 0;
        if !self.set_key_valid(i, Some(key), 0) {
            self.free.push(i);
            return None;
        }
        self.lru_push_front(i);
        self.counters(key.0).occupancy_lines += 1;
        self.mark_md(i);
        Some(i)
    }

    fn evict(&mut self) -> Option<u32> {
        let mut i = self.tail;
        for _ in 0..EVICT_SCAN {
            if i == NIL {
                return None;
            }
            let l = &self.lines[i as usize];
            let prev = l.prev;
            if self.slot_of(i).is_some_and(|s| s.pins.load(Ordering::Relaxed) & REFERENCED != 0) {
                // Hit since it was last moved: a second chance at the head.
                self.lru_remove(i);
                self.lru_push_front(i);
                i = prev;
                continue;
            }
            if let Some(key) = l.key {
                if l.dirty == 0 && l.disk_dirty == 0 && !self.is_locked(key) && !self.pinned(i) {
                    self.drop_line(i);
                    self.counters(key.0).evictions += 1;
                    self.free.pop();
                    return Some(i);
                }
            }
            i = prev;
        }
        None
    }

    /// Forgets line `i` (its record becomes "free" at the next persist) and puts it on the free list.
    fn drop_line(&mut self, i: u32) {
        self.wgen[i as usize] += 1;
        self.lru_remove(i);
        if let Some(key) = self.lines[i as usize].key {
            self.set_key_valid(i, None, 0);
            let l = &mut self.lines[i as usize];
            let dirty = l.dirty != 0;
            if dirty {
                self.dirty_order.remove(&(l.dirty_since_ms, i));
            }
            l.dirty = 0;
            let c = self.counters(key.0);
            c.occupancy_lines = c.occupancy_lines.saturating_sub(1);
            if dirty {
                c.dirty_lines = c.dirty_lines.saturating_sub(1);
            }
        }
        self.free.push(i);
        self.mark_md(i);
    }

    /// Frees line `i` if it holds nothing and nothing dirty may be recorded for it (after a record write).
    pub fn drop_if_empty(&mut self, i: u32) {
        let l = &self.lines[i as usize];
        if let Some(key) = l.key {
            if l.valid == 0 && l.dirty == 0 && l.disk_dirty == 0 && !self.is_locked(key) && !self.pinned(i) {
                self.drop_line(i);
            }
        }
    }

    /// Sets the valid and dirty masks of line `i`, keeping the counters right; frees a line left empty
    /// when nothing dirty may be recorded for it on disk.
    pub fn set_bits(&mut self, i: u32, valid: u128, dirty: u128, now_ms: u64) {
        let l = &self.lines[i as usize];
        let Some(key) = l.key else { return };
        let was_dirty = l.dirty != 0;
        let changed = l.valid != valid || l.dirty != dirty;
        self.set_key_valid(i, Some(key), valid);
        let l = &mut self.lines[i as usize];
        l.dirty = dirty;
        if !was_dirty && dirty != 0 {
            l.dirty_since_ms = now_ms;
            self.dirty_order.insert((now_ms, i));
        } else if was_dirty && dirty == 0 {
            self.dirty_order.remove(&(l.dirty_since_ms, i));
        }
        let l = &self.lines[i as usize];
        let disk_dirty = l.disk_dirty;
        let c = self.counters(key.0);
        match (was_dirty, dirty != 0) {
            (false, true) => c.dirty_lines += 1,
            (true, false) => c.dirty_lines = c.dirty_lines.saturating_sub(1),
            _ => {}
        }
        if changed {
            self.mark_md(i);
        }
        if valid == 0 && dirty == 0 && disk_dirty == 0 && !self.pinned(i) {
            self.drop_line(i);
        }
    }

    /// Loads a persisted record into an empty line (at start-up).
    /// False (nothing loaded) when the key cannot be cached: a core line at or past
    /// [`MAX_CORE_LINES`], which no core attached to a cache has (corrupt metadata).
    pub fn load(&mut self, i: u32, key: Key, valid: u128, dirty: u128, seq: u64) -> bool {
        if !self.set_key_valid(i, Some(key), valid) {
            return false;
        }
        self.free.retain(|&f| f != i);
        let l = &mut self.lines[i as usize];
        l.dirty = dirty;
        l.disk_dirty = dirty;
        l.disk_sure = dirty;
        l.seq = seq;
        if dirty != 0 {
            self.dirty_order.insert((l.dirty_since_ms, i));
        }
        self.lru_push_front(i);
        let c = self.counters(key.0);
        c.occupancy_lines += 1;
        if dirty != 0 {
            c.dirty_lines += 1;
        }
        true
    }

    /// Dirty lines of `core` (all cores when `None`), oldest first, at most `max`, skipping locked ones
    /// and lines of cores not in `attached`.
    pub fn dirty_lines(&self, core: Option<u16>, attached: &dyn Fn(u16) -> bool, max: usize) -> Vec<u32> {
        self.dirty_older_than(core, attached, max, u64::MAX)
    }

    /// Like `dirty_lines`, only lines dirty since before `before_ms` (walks the dirty order, oldest
    /// first: no scan of the whole map).
    pub fn dirty_older_than(
        &self,
        core: Option<u16>,
        attached: &dyn Fn(u16) -> bool,
        max: usize,
        before_ms: u64,
    ) -> Vec<u32> {
        let mut v = Vec::new();
        for &(since, i) in &self.dirty_order {
            if v.len() >= max || since >= before_ms {
                break;
            }
            let Some(key) = self.lines[i as usize].key else { continue };
            if core.map_or(true, |c| c == key.0) && attached(key.0) && !self.is_locked(key) {
                v.push(i);
            }
        }
        v
    }

    /// Frees every clean, unlocked line of `core` whose record cannot say "dirty" (a removed core);
    /// returns how many.
    pub fn forget_clean(&mut self, core: u16) -> usize {
        let victims: Vec<u32> = (0..self.lines.len() as u32)
            .filter(|&i| {
                let l = &self.lines[i as usize];
                l.key.is_some_and(|k| k.0 == core && !self.is_locked(k))
                    && l.dirty == 0
                    && l.disk_dirty == 0
                    && !self.pinned(i)
            })
            .collect();
        for &i in &victims {
            self.drop_line(i);
        }
        victims.len()
    }

    /// Keys of every dirty line of `core`.
    pub fn dirty_keys(&self, core: u16) -> Vec<Key> {
        self.lines.iter().filter_map(|l| l.key.filter(|k| k.0 == core && l.dirty != 0)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_oldest_clean_line() {
        let mut m = LineMap::new(3);
        let a = m.alloc((0, 1)).unwrap();
        let b = m.alloc((0, 2)).unwrap();
        let c = m.alloc((0, 3)).unwrap();
        m.set_bits(a, 1, 1, 0); // dirty: not evictable
        m.set_bits(b, 1, 0, 0);
        m.set_bits(c, 1, 0, 0);
        m.touch(b);
        let d = m.alloc((0, 4)).unwrap();
        assert_eq!(d, c, "c is the least recently used clean line");
        assert_eq!(m.lookup((0, 3)), None);
        assert_eq!(m.counters(0).evictions, 1);
        assert_eq!(m.counters(0).dirty_lines, 1);
        assert!(m.try_lock(0, 2, 4, 7));
        assert!(!m.try_lock(0, 1, 5, 8));
        m.set_bits(d, 1, 0, 0);
        assert!(m.alloc((0, 9)).is_none(), "b and d are locked, a is dirty");
        assert!(m.unlock(7));
    }
}

#[cfg(test)]
mod pin_tests {
    use super::*;

    #[test]
    fn a_pinned_line_is_never_evicted_dropped_or_forgotten() {
        let mut m = LineMap::new(2);
        let a = m.alloc((0, 1)).unwrap();
        let b = m.alloc((0, 2)).unwrap();
        m.set_bits(a, 1, 0, 0);
        m.set_bits(b, 1, 0, 0);
        m.touch(b);
        m.pin_slot(m.lines[a as usize].slot);
        assert_eq!(m.alloc((0, 3)), Some(b), "the pinned LRU tail is skipped");
        m.set_bits(a, 0, 0, 0);
        assert_eq!(m.lookup((0, 1)), Some(a), "an emptied pinned line keeps its slot until unpinned");
        assert_eq!(m.forget_clean(0), 1, "only the unpinned line is forgotten");
        assert_eq!(m.lookup((0, 1)), Some(a));
        m.slots().unpin(m.lines[a as usize].slot);
        assert_eq!(m.forget_clean(0), 1);
        assert_eq!(m.lookup((0, 1)), None);
    }

    /// The reference bit shares the pin word: a line a hit referenced and released is not pinned.
    #[test]
    fn a_referenced_line_is_not_pinned() {
        let mut m = LineMap::new(2);
        let a = m.alloc((0, 1)).unwrap();
        m.set_bits(a, 1, 0, 0);
        m.pin_slot(m.lines[a as usize].slot);
        assert!(m.pinned(a));
        m.slots().unpin(m.lines[a as usize].slot);
        assert!(!m.pinned(a), "referenced only");
        assert_eq!(m.forget_clean(0), 1, "a referenced, unpinned line is forgotten");
    }
}

#[cfg(test)]
mod layout_tests {
    #[test]
    fn a_line_is_two_cache_lines_and_a_slot_half_of_one() {
        assert_eq!(std::mem::size_of::<super::Line>(), 128);
        assert_eq!(std::mem::size_of::<super::Slot>(), 32);
        assert_eq!(std::mem::align_of::<super::Slot>(), 32, "a slot never straddles two cache lines");
    }
}

#[cfg(test)]
mod index_tests {
    use super::*;

    /// Random inserts and removals against a std HashMap: look-ups agree after every step (probe runs
    /// that wrap around the table end, tombstones and rebuilds included).
    #[test]
    fn index_agrees_with_a_hash_map() {
        let n = 64u32;
        let mut m = LineMap::new(n);
        let mut reference = std::collections::HashMap::new();
        let mut x = 0x1234_5678_9abc_def1u64;
        for step in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Few distinct keys over two cores: many collisions in a 128-slot table.
            let key = ((x >> 60) as u16 & 1, (x >> 8) % 200);
            match reference.get(&key) {
                Some(&slot) if x & 1 == 0 => {
                    m.set_bits(slot, 0, 0, 0); // empties the line: dropped from the index
                    reference.remove(&key);
                }
                Some(_) => {}
                None => {
                    if let Some(slot) = m.alloc(key) {
                        m.set_bits(slot, 1, 0, 0);
                        reference.retain(|_, s| *s != slot); // an evicted line left the index
                        reference.insert(key, slot);
                    }
                }
            }
            for (k, s) in &reference {
                assert_eq!(m.lookup(*k), Some(*s), "step {step}: {k:?}");
            }
            assert_eq!(m.lookup((7, 7)), None);
        }
    }
}

#[cfg(test)]
mod soft_lock_tests {
    use super::*;

    /// A softened lock (a cleaning batch writing back) lets only `pass_soft` requests past, and only
    /// on a line that is cached; hard locks stop everyone; a dropped and re-taken line has a new
    /// write generation.
    #[test]
    fn soft_locks_pass_only_requests_that_stay_off_the_core_on_cached_lines() {
        let mut m = LineMap::new(4);
        let a = m.alloc((0, 1)).unwrap();
        m.set_bits(a, 1, 1, 0);
        assert!(m.try_lock(0, 1, 1, 7));
        assert!(m.try_lock(0, 2, 2, 7), "line 2 is not cached");
        assert_eq!(m.try_lock_passing(0, 1, 1, 8, true), None, "a hard lock stops everyone");
        assert!(m.soften(7), "the refused request is woken");
        assert_eq!(m.try_lock_passing(0, 0, 1, 8, false), None, "soft locks stop core writers");
        assert_eq!(m.try_lock_passing(0, 0, 1, 8, true), Some(true));
        assert_eq!(m.try_lock_passing(0, 3, 3, 9, true), Some(false), "no lock on line 3");
        assert_eq!(
            m.try_lock_passing(0, 2, 2, 10, true),
            None,
            "line 2 is not cached: its write goes to the core"
        );
        assert!(m.is_locked((0, 1)) && m.is_locked((0, 2)), "soft locks still keep lines from eviction");
        m.unlock(7);
        m.unlock(8);
        let g = m.wgen(a);
        m.set_bits(a, 0, 0, 0); // emptied: dropped
        assert_ne!(m.wgen(a), g);
        let g = m.wgen(a);
        assert_eq!(m.alloc((0, 1)), Some(a));
        assert_ne!(m.wgen(a), g, "taking a line moves its generation");
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    fn unpin(m: &LineMap, slot: u32) {
        m.slots().unpin(slot);
    }

    /// Two keys of core 0 with the same home slot in `m`'s index.
    fn same_home(m: &LineMap) -> (Key, Key) {
        let home = |k: Key| m.index.home(pack(k).unwrap_or(0));
        let first = (0, 1);
        (first, (2..).map(|l| (0, l)).find(|&k| home(k) == home(first)).unwrap_or(first))
    }

    /// (keys, tombstones) counted slot by slot.
    fn census(m: &LineMap) -> (usize, usize) {
        let keys = m.index.slots.iter().map(|s| s.key.load(Ordering::Relaxed));
        let tombs = keys.clone().filter(|&k| k == TOMB).count();
        (keys.filter(|&k| k != TOMB && k != EMPTY).count(), tombs)
    }

    /// A rebuild with nothing pinned leaves no tombstone (also none inside a probe run: a key
    /// displaced past a removed one moves home), every key findable and the counts right.
    #[test]
    fn a_rebuild_without_pins_leaves_no_tombstone() {
        let mut m = LineMap::new(8);
        let (first, second) = same_home(&m);
        let home = |m: &LineMap, k: Key| m.index.home(pack(k).unwrap_or(0));
        let a = m.alloc(first).unwrap();
        let b = m.alloc(second).unwrap();
        let others: Vec<(Key, u32)> = (100..104).map(|l| ((1, l), m.alloc((1, l)).unwrap())).collect();
        assert_eq!(m.lines[b as usize].slot as usize, (home(&m, first) + 1) & m.index.mask);
        m.set_bits(a, 0, 0, 0); // a tombstone in front of `second`
        assert_eq!(census(&m), (5, 1));
        let ls = &mut m.lines;
        m.index.rebuild(|line, s| ls[line as usize].slot = s as u32);
        assert_eq!(census(&m), (5, 0), "no tombstone left");
        assert_eq!((m.index.used, m.index.tombs), (5, 0));
        assert_eq!(m.lines[b as usize].slot as usize, home(&m, first), "the displaced key moved home");
        for (k, i) in others.into_iter().chain([(second, b)]) {
            assert_eq!(m.lookup(k), Some(i));
            assert_eq!(
                m.slot_of(i).map(|s| s.key.load(Ordering::Relaxed)),
                pack(k),
                "the line knows its slot"
            );
        }
    }

    /// A read hit reads only the index slot: it follows every change of a line's key and valid
    /// bits (take, set, drop, load), and a hit is pinned only when every wanted sector is valid.
    #[test]
    fn the_slots_follow_every_change_of_key_and_valid_bits() {
        let mut m = LineMap::new(2);
        let a = m.alloc((3, 7)).unwrap();
        assert_eq!(m.lookup((3, 7)), Some(a), "taken: held");
        assert_eq!(m.pin_if_valid((3, 7), 1), None, "nothing valid: no hit");
        m.set_bits(a, 0b0110, 0, 0);
        assert_eq!(m.pin_if_valid((3, 7), 0b0111), None, "sector 0 is not valid");
        assert!(!m.pinned(a), "a refused hit pins nothing");
        let (l, s) = m.pin_if_valid((3, 7), 0b0100).unwrap();
        assert_eq!(l, a);
        assert!(m.pinned(a));
        unpin(&m, s);
        assert!(!m.pinned(a));
        assert_eq!(m.pin_if_valid((4, 7), 0b0100), None, "another core's line 7");
        assert_eq!(m.pin_if_valid((3, 6), 0b0100), None, "another line of the core");
        // The high half of a 128-sector line.
        m.set_bits(a, 1 << 127 | 1, 0, 0);
        assert_eq!(m.find_valid((3, 7), 1 << 127).map(|x| x.0), Some(a));
        assert_eq!(m.find_valid((3, 7), 1 << 126), None);
        m.set_bits(a, 0, 0, 0);
        assert_eq!((m.lookup((3, 7)), m.find_valid((3, 7), 0)), (None, None), "emptied: dropped");
        assert!(m.load(1, (5, 9), 0b1000, 0, 1));
        assert_eq!(m.find_valid((5, 9), 0b1000).map(|x| x.0), Some(1), "loaded");
        assert_eq!(m.find_valid((5, 9), 0b1001), None);
    }

    /// Keys past what a slot can hold are never cached: a miss stays a miss, and a loaded record
    /// naming one is refused (the caller reports corrupt metadata).
    #[test]
    fn a_core_line_too_large_to_pack_is_never_cached() {
        let mut m = LineMap::new(2);
        assert_eq!(m.alloc((1, MAX_CORE_LINES)), None);
        assert_eq!(m.free_lines(), 2, "no line taken");
        assert!(!m.load(0, (1, MAX_CORE_LINES), 1, 0, 1));
        assert_eq!(m.free_lines(), 2);
        assert_eq!(m.lookup((1, MAX_CORE_LINES)), None);
        // The largest packable line of the largest core id is an ordinary key.
        let k = (u16::MAX, MAX_CORE_LINES - 1);
        let a = m.alloc(k).unwrap();
        assert_eq!(m.lookup(k), Some(a));
        assert_eq!(m.lookup((u16::MAX - 1, MAX_CORE_LINES - 1)), None);
        assert_eq!(unpack(pack(k).unwrap()), k);
    }

    /// Churn: lines taken and dropped over and over leave tombstones; the table is rebuilt and every
    /// key stays findable at every step, with the right line.
    #[test]
    fn churn_through_tombstones_and_rebuilds_keeps_every_key_findable() {
        let mut m = LineMap::new(8);
        let mut model: std::collections::BTreeMap<Key, u32> = Default::default();
        let mut rebuilt = false;
        for round in 0..2000u64 {
            let key = (u16::try_from(round % 3).unwrap(), round * 7919 % 101);
            if let Some(&line) = model.get(&key) {
                m.set_bits(line, 0, 0, 0); // emptied: dropped (tombstone)
                model.remove(&key);
            } else if let Some(line) = m.alloc(key) {
                m.set_bits(line, 1, 0, 0);
                model.retain(|_, &mut l| l != line); // an evicted line's key is gone
                model.insert(key, line);
            }
            rebuilt |= m.index.tombs == 0 && round > 0 && m.index.used > 0;
            for (&k, &line) in &model {
                assert_eq!(m.lookup(k), Some(line), "round {round}: {k:?}");
            }
            assert_eq!(m.index.used, model.len(), "round {round}");
            assert_eq!(
                census(&m),
                (m.index.used, m.index.tombs),
                "round {round}: the counts match the table"
            );
            assert!(m.index.used + m.index.tombs < m.index.slots.len(), "an empty slot remains");
        }
        assert!(rebuilt, "the churn rebuilt the table");
        for c in 0..3u16 {
            for l in 0..101 {
                assert_eq!(m.lookup((c, l)), model.get(&(c, l)).copied());
            }
        }
    }

    /// A pinned slot never moves: rebuilds go on around it, and the hit unpins the same slot
    /// after any amount of churn. A pinned key away from its home stays findable: the slots
    /// between stay tombstones.
    #[test]
    fn a_pinned_slot_stays_in_place_through_rebuilds() {
        let mut m = LineMap::new(4);
        // Two keys with the same home: the second lands one slot further.
        let (first, second) = same_home(&m);
        let home = |m: &LineMap, k: Key| m.index.home(pack(k).unwrap_or(0));
        let a = m.alloc(first).unwrap();
        let b = m.alloc(second).unwrap();
        m.set_bits(a, 1, 0, 0);
        m.set_bits(b, 1, 0, 0);
        let (_, pos) = m.pin_if_valid(second, 1).unwrap();
        assert_eq!(pos as usize, (home(&m, first) + 1) & m.index.mask, "displaced by one");
        m.set_bits(a, 0, 0, 0); // its home slot: a tombstone
        let mut rebuilds = 0;
        for round in 0..200u64 {
            let tombs = m.index.tombs;
            let c = m.alloc((1, round)).unwrap();
            rebuilds += usize::from(m.index.tombs < tombs.saturating_sub(1));
            assert_ne!(c, b, "the pinned line is never reused");
            m.set_bits(c, 0, 0, 0);
            assert_eq!(m.lines[b as usize].slot, pos, "round {round}: the pinned slot moved");
            assert_eq!(m.lookup(second), Some(b), "round {round}: the pinned key is lost");
            assert!(m.pinned(b));
        }
        assert!(rebuilds > 2, "rebuilt around the pin ({rebuilds} times)");
        unpin(&m, pos);
        assert!(!m.pinned(b));
        let c = m.alloc((2, 0)).unwrap();
        assert_eq!((m.lookup(second), m.lookup((2, 0))), (Some(b), Some(c)));
        assert_eq!(m.pin_if_valid(second, 1).map(|x| x.0), Some(b), "still a hit");
    }

    /// Hits on other threads (read lock, pin, unpin later without the lock) while the owner fills,
    /// evicts and drops lines under the write lock and so rebuilds the table again and again: a
    /// pinned line keeps its key until its hit unpins it, and every pin is dropped from the slot
    /// that took it.
    #[test]
    fn hits_on_other_threads_survive_eviction_and_rebuilds() {
        use std::sync::{Arc, RwLock};
        let map = Arc::new(RwLock::new(LineMap::new(16)));
        let hot: Vec<Key> = (0..6).map(|l| (0, l)).collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hitters: Vec<_> = (0..2)
            .map(|t| {
                let (map, stop, hot) = (map.clone(), stop.clone(), hot.clone());
                std::thread::spawn(move || {
                    let slots = map.read().unwrap().slots();
                    let (mut hits, mut n) = (0u64, 0usize);
                    while !stop.load(Ordering::Relaxed) || hits < 200 {
                        n += 1;
                        let k = hot[(n + t) % hot.len()];
                        let Some((line, pos)) = map.read().unwrap().pin_if_valid(k, 1) else {
                            std::thread::yield_now();
                            continue;
                        };
                        std::thread::yield_now();
                        let m = map.read().unwrap();
                        assert_eq!(m.lookup(k), Some(line), "a pinned line lost its key");
                        assert_eq!(m.lines[line as usize].slot, pos, "a pinned slot moved");
                        drop(m);
                        slots.unpin(pos);
                        hits += 1;
                    }
                    hits
                })
            })
            .collect();
        let mut rebuilds = 0;
        for round in 0..20_000u64 {
            let mut m = map.write().unwrap();
            let tombs = m.index.tombs;
            // Churn keys fill the map and push the hot ones out (when they are not pinned).
            let k = if round % 3 == 0 { hot[(round / 3) as usize % hot.len()] } else { (1, round % 64) };
            if m.lookup(k).is_none() {
                if let Some(i) = m.alloc(k) {
                    m.set_bits(i, 1, 0, 0);
                }
            } else if round % 5 == 0 && k.0 == 1 {
                let i = m.lookup(k).unwrap();
                m.set_bits(i, 0, 0, 0);
            }
            rebuilds += usize::from(m.index.tombs + 1 < tombs);
            drop(m);
            if round == 10_000 {
                stop.store(true, Ordering::Relaxed);
            }
        }
        for h in hitters {
            assert!(h.join().unwrap() >= 200);
        }
        assert!(rebuilds > 10, "{rebuilds} rebuilds");
        let m = map.read().unwrap();
        for i in 0..16 {
            assert!(!m.pinned(i), "line {i}: a pin left behind");
            if let Some(k) = m.lines[i as usize].key() {
                assert_eq!(m.lookup(k), Some(i));
            }
        }
    }

    /// The reference bit lives in the slot and moves with the key in a rebuild.
    #[test]
    fn the_reference_bit_survives_a_rebuild() {
        let mut m = LineMap::new(4);
        let a = m.alloc((0, 1)).unwrap();
        m.set_bits(a, 1, 0, 0);
        let (_, pos) = m.pin_if_valid((0, 1), 1).unwrap();
        unpin(&m, pos);
        let referenced =
            |m: &LineMap| m.slot_of(a).is_some_and(|s| s.pins.load(Ordering::Relaxed) & REFERENCED != 0);
        assert!(referenced(&m));
        // Churn until the table is rebuilt (the tombstones are gone).
        let (mut round, mut rebuilt) = (0, false);
        while !rebuilt && round < 1000 {
            let tombs = m.index.tombs;
            let b = m.alloc((1, round)).unwrap();
            rebuilt = m.index.tombs < tombs.saturating_sub(1);
            m.set_bits(b, 0, 0, 0);
            round += 1;
        }
        assert!(rebuilt, "no rebuild in {round} rounds");
        assert!(referenced(&m), "the reference bit moved with the key");
    }
}
