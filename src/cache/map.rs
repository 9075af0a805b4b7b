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

/// Takes a read hit's pin on a line and sets its reference bit (second chance).
fn pin(h: &Hot) {
    if h.pins.fetch_add(1, Ordering::AcqRel) & REFERENCED == 0 {
        h.pins.fetch_or(REFERENCED, Ordering::Relaxed);
    }
}

/// Lines examined from the LRU tail when looking for a victim.
pub const EVICT_SCAN: usize = 512;

/// The index (core line → cache line): open addressing with linear probing over `u32` cache line
/// numbers, the key itself read from the line's `Hot` record (which a hit reads anyway), so a look-up
/// costs one memory miss in the table instead of a hash map's control bytes plus bucket. At most half full;
/// removal shifts the rest of the probe run back (no tombstones).
struct Index {
    slots: Vec<u32>,
    mask: usize,
    shift: u32,
}

impl Index {
    fn new(num_lines: u32) -> Self {
        let size = (2 * num_lines as usize).next_power_of_two().max(2);
        Self { slots: vec![NIL; size], mask: size - 1, shift: 64 - size.trailing_zeros() }
    }

    fn home(&self, key: Key) -> usize {
        let x = (u64::from(key.0) << 48) ^ key.1;
        (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize & self.mask
    }

    fn find(&self, key: Key, hot: &[Hot]) -> Option<u32> {
        let mut i = self.home(key);
        loop {
            let s = self.slots[i];
            if s == NIL {
                return None;
            }
            if hot.get(s as usize).is_some_and(|h| h.holds(key)) {
                return Some(s);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Adds `key` (absent) → `line`.
    fn insert(&mut self, key: Key, line: u32) {
        let mut i = self.home(key);
        while self.slots[i] != NIL {
            i = (i + 1) & self.mask;
        }
        self.slots[i] = line;
    }

    /// Removes `key` (held by `line`); every other entry's line must still hold its key.
    fn remove(&mut self, key: Key, line: u32, lines: &[Line]) {
        let mut i = self.home(key);
        loop {
            match self.slots[i] {
                NIL => return,
                s if s == line => break,
                _ => i = (i + 1) & self.mask,
            }
        }
        self.slots[i] = NIL;
        let mut j = i;
        loop {
            j = (j + 1) & self.mask;
            let s = self.slots[j];
            if s == NIL {
                return;
            }
            let Some(k) = lines[s as usize].key else { continue };
            let h = self.home(k);
            // Entry at j may move to the hole at i unless its home lies cyclically in (i, j].
            let stays = if i <= j { i < h && h <= j } else { i < h || h <= j };
            if !stays {
                self.slots[i] = s;
                self.slots[j] = NIL;
                i = j;
            }
        }
    }
}

/// What a read hit needs of one cache line, in 32 bytes (two per 64-byte cache line, never split):
/// the key it holds and its valid sectors (copies of its [`Line`]'s, written with them under the
/// map's write lock, read under its read lock), and the pin word: read hits in flight and the
/// reference bit (taken under the read lock, dropped without any lock). Atomics, so the array can be
/// shared with the channels for the unpin; the map's lock orders every access but the pin's, so the
/// copies use relaxed loads and stores.
#[derive(Debug)]
#[repr(C, align(32))]
pub struct Hot {
    valid: [AtomicU64; 2],
    /// The core line held; `NO_LINE` when none.
    line: AtomicU64,
    core: AtomicU32,
    pins: AtomicU32,
}

/// `Hot::line` of a cache line that holds nothing (core lines are block numbers divided by the line's
/// block count, so never this).
const NO_LINE: u64 = u64::MAX;

impl Hot {
    fn empty() -> Self {
        Self {
            valid: [AtomicU64::new(0), AtomicU64::new(0)],
            line: AtomicU64::new(NO_LINE),
            core: AtomicU32::new(0),
            pins: AtomicU32::new(0),
        }
    }

    /// True when the line holds `key`.
    fn holds(&self, key: Key) -> bool {
        self.line.load(Ordering::Relaxed) == key.1 && self.core.load(Ordering::Relaxed) == u32::from(key.0)
    }

    /// The line's valid sectors.
    fn valid(&self) -> u128 {
        u128::from(self.valid[0].load(Ordering::Relaxed))
            | u128::from(self.valid[1].load(Ordering::Relaxed)) << 64
    }

    fn set(&self, key: Option<Key>, valid: u128) {
        let (core, line) = key.map_or((0, NO_LINE), |(c, l)| (u32::from(c), l));
        self.core.store(core, Ordering::Relaxed);
        self.line.store(line, Ordering::Relaxed);
        self.valid[0].store(valid as u64, Ordering::Relaxed);
        self.valid[1].store((valid >> 64) as u64, Ordering::Relaxed);
    }

    /// Ends a read hit on this line (see [`LineMap::pin_for_hit`]).
    pub fn unpin(&self) {
        self.pins.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One cache line at run time: what the owner (misses, writes, cleaning, metadata, LRU) works with.
/// Its key and valid bits are private: every change goes through the map, which copies them into
/// the line's [`Hot`] record.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
pub struct Line {
    /// The core line held, if any.
    key: Option<Key>,
    in_lru: bool,
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
    /// Runtime state differs from the persisted record.
    pub md_dirty: bool,
    /// Sequence number of the last persisted record.
    pub seq: u64,
    /// When the line became dirty (ms since the instance started).
    pub dirty_since_ms: u64,
    prev: u32,
    next: u32,
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
    /// Per cache line, what a read hit reads and its pin word: read hits in flight (taken under the
    /// map's lock, released without it: a pinned line is never evicted, dropped or reused, so a hit
    /// reads its data without a range lock); the top bit is the line's reference bit (`REFERENCED`).
    pub hot: Arc<[Hot]>,
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
            hot: (0..num_lines).map(|_| Hot::empty()).collect(),
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
        self.index.find(key, &self.hot)
    }

    /// Valid sectors of cache line `i` (read from its `Hot` record: a read hit's look-up has it).
    pub fn valid(&self, i: u32) -> u128 {
        self.hot.get(i as usize).map_or(0, Hot::valid)
    }

    /// A read hit within one line: the cache line holding `key` when every sector of `want` is
    /// valid there, pinned (see [`Self::pin_for_hit`]). Touches the index slot and the line's `Hot`
    /// record only.
    pub fn pin_if_valid(&self, key: Key, want: u128) -> Option<u32> {
        let s = self.index.find(key, &self.hot)?;
        let h = &self.hot[s as usize];
        if h.valid() & want != want {
            return None;
        }
        pin(h);
        Some(s)
    }

    /// Sets line `i`'s key and valid bits, in the line and in its `Hot` record.
    fn set_key_valid(&mut self, i: u32, key: Option<Key>, valid: u128) {
        let l = &mut self.lines[i as usize];
        l.key = key;
        l.valid = valid;
        self.hot[i as usize].set(key, valid);
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
        self.hot[i as usize].pins.load(Ordering::Acquire) & PIN_COUNT != 0
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
        self.hot[i as usize].pins.fetch_and(PIN_COUNT, Ordering::Relaxed);
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

    /// A read hit on line `i` (under the map's read lock): pins the line until the hit completes (the
    /// hit's completion unpins it without the map lock) and marks it referenced (second chance).
    pub fn pin_for_hit(&self, i: u32) {
        pin(&self.hot[i as usize]);
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
        let i = match self.free.pop() {
            Some(i) => i,
            None => self.evict()?,
        };
        self.wgen[i as usize] += 1;
        self.set_key_valid(i, Some(key), 0);
        self.lines[i as usize].dirty = 0;
        self.index.insert(key, i);
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
            if self.hot[i as usize].pins.load(Ordering::Relaxed) & REFERENCED != 0 {
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
            // While every line of the probe run still has its key (the index compares keys).
            self.index.remove(key, i, &self.lines);
        }
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
    pub fn load(&mut self, i: u32, key: Key, valid: u128, dirty: u128, seq: u64) {
        self.free.retain(|&f| f != i);
        self.set_key_valid(i, Some(key), valid);
        let l = &mut self.lines[i as usize];
        l.dirty = dirty;
        l.disk_dirty = dirty;
        l.disk_sure = dirty;
        l.seq = seq;
        if dirty != 0 {
            self.dirty_order.insert((l.dirty_since_ms, i));
        }
        self.index.insert(key, i);
        self.lru_push_front(i);
        let c = self.counters(key.0);
        c.occupancy_lines += 1;
        if dirty != 0 {
            c.dirty_lines += 1;
        }
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
        m.pin_for_hit(a);
        assert_eq!(m.alloc((0, 3)), Some(b), "the pinned LRU tail is skipped");
        m.set_bits(a, 0, 0, 0);
        assert_eq!(m.lookup((0, 1)), Some(a), "an emptied pinned line keeps its slot until unpinned");
        assert_eq!(m.forget_clean(0), 1, "only the unpinned line is forgotten");
        assert_eq!(m.lookup((0, 1)), Some(a));
        m.hot[a as usize].unpin();
        assert_eq!(m.forget_clean(0), 1);
        assert_eq!(m.lookup((0, 1)), None);
    }

    /// The reference bit shares the pin word: a line a hit referenced and released is not pinned.
    #[test]
    fn a_referenced_line_is_not_pinned() {
        let mut m = LineMap::new(2);
        let a = m.alloc((0, 1)).unwrap();
        m.set_bits(a, 1, 0, 0);
        m.pin_for_hit(a);
        assert!(m.pinned(a));
        m.hot[a as usize].unpin();
        assert!(!m.pinned(a), "referenced only");
        assert_eq!(m.forget_clean(0), 1, "a referenced, unpinned line is forgotten");
    }
}

#[cfg(test)]
mod layout_tests {
    #[test]
    fn a_line_is_two_cache_lines_with_the_hit_fields_in_the_first() {
        assert_eq!(std::mem::size_of::<super::Line>(), 128);
        assert_eq!(std::mem::offset_of!(super::Line, valid), 32);
    }
}

#[cfg(test)]
mod index_tests {
    use super::*;

    /// Random inserts and removals against a std HashMap: look-ups agree after every step (probe runs
    /// that wrap around the table end and backward-shift deletion included).
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
mod hot_tests {
    use super::*;

    /// A read hit reads only the `Hot` records: they follow every change of a line's key and valid
    /// bits (take, set, drop, load), and a hit is pinned only when every wanted sector is valid.
    #[test]
    fn the_hit_records_follow_every_change_of_key_and_valid_bits() {
        let mut m = LineMap::new(2);
        let a = m.alloc((3, 7)).unwrap();
        assert_eq!((m.lookup((3, 7)), m.valid(a)), (Some(a), 0), "taken: held, nothing valid");
        assert_eq!(m.pin_if_valid((3, 7), 1), None, "nothing valid: no hit");
        m.set_bits(a, 0b0110, 0, 0);
        assert_eq!(m.valid(a), 0b0110);
        assert_eq!(m.pin_if_valid((3, 7), 0b0111), None, "sector 0 is not valid");
        assert!(!m.pinned(a), "a refused hit pins nothing");
        assert_eq!(m.pin_if_valid((3, 7), 0b0100), Some(a));
        assert!(m.pinned(a));
        m.hot[a as usize].unpin();
        assert_eq!(m.pin_if_valid((4, 7), 0b0100), None, "another core's line 7");
        assert_eq!(m.pin_if_valid((3, 6), 0b0100), None, "another line of the core");
        // The high half of a 128-sector line.
        m.set_bits(a, 1 << 127 | 1, 0, 0);
        assert_eq!(m.valid(a), 1 << 127 | 1);
        assert_eq!(m.pin_if_valid((3, 7), 1 << 127), Some(a));
        m.hot[a as usize].unpin();
        m.set_bits(a, 0, 0, 0);
        assert_eq!((m.lookup((3, 7)), m.valid(a)), (None, 0), "emptied: dropped");
        m.load(1, (5, 9), 0b1000, 0, 1);
        assert_eq!((m.lookup((5, 9)), m.valid(1)), (Some(1), 0b1000), "loaded");
        assert_eq!(m.pin_if_valid((5, 9), 0b1000), Some(1));
    }
}
