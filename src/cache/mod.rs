//! The cache bdev (SPEC §5, issue 8): Open-CAS-style caching of a slow *core* bdev on a fast *cache*
//! device, persistent and crash-safe, written in Rust (no OCF).
//!
//! ```text
//!   cache bdev c0 (core f0) ─┐                       ┌─► owner thread: metadata writer + cleaner
//!   cache bdev c1 (core f1) ─┼─► Instance (cache dev)─┤     (own channels on the cache device and cores)
//!                            │   Shared { RwLock<LineMap>, mode, cores }
//!   poller thread ─► CacheChannel (engine.rs): own channels on cache dev + core, line locks/pins, mailbox
//! ```
//!
//! # Design
//! * **One instance per cache device** (the table `INSTANCES`, keyed by the cache bdev object): the
//!   first cache bdev formats or loads the device; later ones attach their core to the same instance
//!   and must agree on mode, line size and cleaner. Each core is claimed by its cache bdev.
//! * **Who owns the line map.** The map (`map.rs`) is shared state owned by the instance, behind one
//!   `RwLock`; no thread owns it exclusively. Every poller thread takes the lock only for look-ups and
//!   bit updates (no I/O, no allocation on a hit) and submits the data I/O itself, on its own channels
//!   to the cache device and the core; the lock is *never* held across base I/O.
//!   - A **read hit** (every sector valid) takes only the *read* lock: look-up, valid bits, and a
//!     *pin* on each line (an atomic count: a pinned line is never evicted, dropped or reused; pins
//!     are checked under the write lock). All three are in the line's index slot (`map::Slot`, 32
//!     bytes: key, line, a copy of the valid bits, pin word), so a hit within one line costs one
//!     memory miss in the map; a pinned slot never moves, so the completion unpins by position. Its hit is counted in the channel's own counter (one
//!     writer; summed when read, folded into the map when the channel drops). For the LRU it only
//!     sets the line's reference bit (an atomic; the eviction scan gives a referenced line a second
//!     chance at the head). It takes no range lock, and its completion only drops the pins (atomics,
//!     no lock). Two queues hitting the cache therefore never wait for each other.
//!     Sequential cut-off streams are per channel too (as OCF keeps them per I/O queue).
//!   - **Everything else** (misses with fills, writes, unmap) takes the write lock twice: to lock its
//!     core-line range and plan, and to apply the outcome and release. The range lock makes it
//!     exclusive on its lines for its whole life (data I/O, metadata persist); a request that finds
//!     its lines locked waits in its channel (later requests on *other* lines pass it) and is woken
//!     through its mailbox.
//!   - A hit within one line (the common case) reads through the cache device's *lane*
//!     (`bdev::Lane`, one per channel): a module channel of the cache device's own with no record,
//!     queue or split of the generic channel. The lane still validates the read and the hit's own
//!     record carries its start and size, so the cache device's statistics count it like any other
//!     I/O. Whatever the lane gives back (a QoS limit or reset on the cache device) and the reads of
//!     a hit across lines go through the cache device's `Channel` (`submit_direct`, else `submit`).
//!     Why: with the hit's read on the generic channel a hit cost 1.23–1.28× a read of the cache
//!     device alone in instructions, half of the excess in that second channel layer (BENCHMARKS.md).
//!
//!   We chose this over one owner thread doing all I/O (SPDK-style message passing to the map's
//!   thread) because a hit then costs one look-up plus one read on the caller's own channel, with no
//!   cross-thread hop, and queues scale with poller threads as long as the critical section stays
//!   short (one cache-line miss: the open-addressing index slot holds what a hit needs).
//!   Measured: BENCHMARKS.md, "Cache bdev" (part C: 1 vs 2 queues on an all-hit workload).
//! * **One owner thread per instance** does what must be serialised: metadata page writes (group
//!   commit in rounds, at most one write per page in flight, so records never go backwards), the
//!   cleaner (alru / acp / nop, `cleaner.rs`) and flush (write back every dirty line, then flush the
//!   core). Channels message it through a queue + eventfd; it answers through their mailboxes.
//! * **Crash safety** (`layout.rs`): write-back writes are acknowledged only after their data is
//!   on the cache device *and* the line record with the new dirty bits is written. A line whose
//!   record may say "dirty" is never reused, and invalidating dirty sectors (pass-through writes,
//!   unmap) is persisted before the acknowledgement. After a crash only dirty sectors are loaded (clean
//!   ones are in the core anyway); after a clean shutdown everything is.
//! * **Hot remove.** Cache device removed: the instance goes pass-through; if dirty data is at risk its
//!   count and line ranges are logged as errors and reads of those sectors fail (never stale data).
//!   Core removed (the registry calls back with itself, on the remover's thread, before the core is
//!   shut down): its cache bdev fails new I/O with `Removed`, writes back that core's dirty lines
//!   (waiting at most 30 s), reports what it could not (count and line ranges, as errors), frees
//!   that core's clean lines, then unregisters itself, so its own users (an export, a bdev stacked on
//!   it) see a hot-remove in turn. Other cores of a shared instance are served on.
//!
//! # Limitations
//! Lines are filled only with the sectors a request touched (no read-ahead of whole lines). The map
//! is one lock per instance: many queues on a many-core host would want it sharded by core line.

pub mod cleaner;
pub mod engine;
pub mod info;
pub mod layout;
pub mod map;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::bdev::{
    Bdev, BdevError, BdevInfo, BdevIo, Channel, Descriptor, IoError, IoKind, IoVecs, ModuleChannel, Registry,
};
use layout::{CoreEntry, LayoutError, Superblock};
use map::{Counters, LineMap};

/// Cache modes (OCF's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Write-through: writes go to cache and core; reads fill the cache.
    Wt,
    /// Write-back: writes go to the cache only (dirty), cleaned later.
    Wb,
    /// Write-around: writes go to the core, updating lines already cached; reads fill.
    Wa,
    /// Pass-through: everything goes to the core; written lines are invalidated.
    Pt,
    /// Write-invalidate: reads fill; writes go to the core and invalidate.
    Wi,
    /// Write-only: writes as write-back; reads from the core (dirty sectors from the cache), no fill.
    Wo,
}

impl Mode {
    /// All modes.
    pub const ALL: [Mode; 6] = [Mode::Wt, Mode::Wb, Mode::Wa, Mode::Pt, Mode::Wi, Mode::Wo];

    /// The flag spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Wt => "wt",
            Mode::Wb => "wb",
            Mode::Wa => "wa",
            Mode::Pt => "pt",
            Mode::Wi => "wi",
            Mode::Wo => "wo",
        }
    }

    /// Parses the flag spelling.
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s)
    }

    fn from_u8(v: u8) -> Mode {
        Mode::ALL.get(usize::from(v)).copied().unwrap_or(Mode::Pt)
    }

    fn to_u8(self) -> u8 {
        Mode::ALL.iter().position(|m| *m == self).unwrap_or(3) as u8
    }
}

/// Cleaning policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanerPolicy {
    /// Approximately-LRU: every `wake_ms`, write back up to `batch` lines dirty for `stale_ms`.
    Alru,
    /// Aggressive: every 10 ms, write back up to `batch` dirty lines.
    Acp,
    /// No background cleaning (only flush and mode switches clean).
    Nop,
}

impl CleanerPolicy {
    /// The flag spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CleanerPolicy::Alru => "alru",
            CleanerPolicy::Acp => "acp",
            CleanerPolicy::Nop => "nop",
        }
    }
}

/// Sequential cut-off policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCutoff {
    /// Never.
    Off,
    /// Only when the cache has no free line.
    Full,
    /// Always, once a stream passes the threshold.
    Always,
}

/// What to do with metadata found on the cache device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPolicy {
    /// Load this cache's metadata, attach fresh when there is none, refuse anything else.
    Auto,
    /// Load, or fail.
    On,
    /// Always format (destroys what the device held).
    Off,
}

/// Configuration of one cache bdev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Name of the cache bdev.
    pub name: String,
    /// Cache device bdev.
    pub cache: String,
    /// Core bdev.
    pub core: String,
    /// Mode.
    pub mode: Mode,
    /// Line size in bytes.
    pub line_size: u32,
    /// Cleaning policy.
    pub cleaner: CleanerPolicy,
    /// alru: wake-up interval.
    pub alru_wake_ms: u64,
    /// alru: a line must be dirty this long before it is cleaned.
    pub alru_stale_ms: u64,
    /// Lines per cleaning batch.
    pub clean_batch: u32,
    /// Sequential cut-off policy.
    pub seq_cutoff: SeqCutoff,
    /// Sequential cut-off threshold in bytes.
    pub seq_cutoff_bytes: u64,
    /// Records changed without a waiter (cleaned lines, evictions) are written within this time.
    pub md_lazy_ms: u64,
    /// Load policy.
    pub load: LoadPolicy,
}

impl CacheConfig {
    /// Defaults (OCF's): wt, 4 KiB lines, alru (20 s wake, 120 s staleness, 100 lines), cut-off full at 1 MiB.
    pub fn new(name: &str, cache: &str, core: &str) -> Self {
        Self {
            name: name.into(),
            cache: cache.into(),
            core: core.into(),
            mode: Mode::Wt,
            line_size: 4096,
            cleaner: CleanerPolicy::Alru,
            alru_wake_ms: 20_000,
            alru_stale_ms: 120_000,
            clean_batch: 100,
            seq_cutoff: SeqCutoff::Full,
            seq_cutoff_bytes: 1 << 20,
            md_lazy_ms: 100,
            load: LoadPolicy::Auto,
        }
    }
}

/// True for the supported line sizes (4–64 KiB, powers of two).
pub fn valid_line_size(b: u32) -> bool {
    b.is_power_of_two() && (4096..=65536).contains(&b)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The line map for changes (misses, writes, cleaning, metadata, deferred LRU touches).
pub(crate) fn wlock<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// The line map for read hits: look-up, valid bits, pins (atomics).
pub(crate) fn rlock<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// A reply box: the owner thread posts results here and wakes the channel through the eventfd.
pub struct Mailbox {
    pub(crate) efd: EventFd,
    items: Mutex<Vec<(u64, Result<(), IoError>)>>,
    /// Set after every eventfd write, so a busy poller checks one atomic instead of making a syscall.
    signalled: AtomicBool,
}

impl Mailbox {
    pub(crate) fn new() -> Result<Arc<Self>, BdevError> {
        let efd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BdevError::io("cache: eventfd", e))?;
        Ok(Arc::new(Self { efd, items: Mutex::new(Vec::new()), signalled: AtomicBool::new(false) }))
    }

    pub(crate) fn post(&self, token: u64, r: Result<(), IoError>) {
        lock(&self.items).push((token, r));
        self.wake();
    }

    pub(crate) fn wake(&self) {
        // Eventfd first, flag second: a reader that sees the flag finds (and drains) the eventfd;
        // one that misses it is woken again by the still-readable eventfd and sees the flag then.
        let _ = self.efd.write(1);
        self.signalled.store(true, Ordering::Release);
    }

    /// True when something was posted since the last `take` (one plain load).
    pub(crate) fn signalled(&self) -> bool {
        self.signalled.load(Ordering::Acquire)
    }

    /// Replies posted so far (empty, without a syscall, when nothing was signalled).
    pub(crate) fn take(&self) -> Vec<(u64, Result<(), IoError>)> {
        // A plain load first: a busy poller asks on every pass, and a swap is a locked instruction.
        if !self.signalled.load(Ordering::Acquire) || !self.signalled.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let _ = self.efd.read();
        std::mem::take(&mut *lock(&self.items))
    }

    /// Blocks until `token` is posted (for callers outside a poller: mode switch, shutdown).
    pub(crate) fn wait_for(&self, token: u64) -> Result<(), IoError> {
        self.wait_until(token, None).unwrap_or(Err(IoError::Removed))
    }

    /// Like `wait_for`, giving up (`None`) at `deadline`.
    pub(crate) fn wait_until(&self, token: u64, deadline: Option<Instant>) -> Option<Result<(), IoError>> {
        loop {
            let mut items = lock(&self.items);
            if let Some(p) = items.iter().position(|(t, _)| *t == token) {
                return Some(items.remove(p).1);
            }
            drop(items);
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.efd),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = self.efd.read();
        }
    }
}

/// Work for the owner thread.
pub(crate) enum OwnerReq {
    /// Write the records of every line marked for persisting, then post `token`.
    Persist(Arc<Mailbox>, u64),
    /// Write back every line dirty now (of one core, or all), flush the core(s), then post `token`.
    Flush(Option<u16>, Arc<Mailbox>, u64),
    /// A core was attached (open a channel on it).
    CoreAttached(u16),
    /// Persist everything, mark the superblock clean and exit.
    Shutdown(Arc<Mailbox>, u64),
}

/// Answers a request that can no longer be served.
pub(crate) fn refuse(r: OwnerReq) {
    match r {
        OwnerReq::Persist(mb, t) | OwnerReq::Flush(_, mb, t) | OwnerReq::Shutdown(mb, t) => {
            mb.post(t, Err(IoError::Removed))
        }
        OwnerReq::CoreAttached(_) => {}
    }
}

/// A core attached to an instance.
pub(crate) struct CoreSlot {
    pub(crate) desc: Arc<Descriptor>,
    pub(crate) removed: Arc<AtomicBool>,
    pub(crate) block_size: u32,
}

/// State shared by the channels, the owner thread and the cache bdevs of one instance.
pub struct Shared {
    pub(crate) cache_name: String,
    pub(crate) line_size: u32,
    pub(crate) num_lines: u32,
    pub(crate) data_offset: u64,
    pub(crate) cache_block: u32,
    pub(crate) cleaner: CleanerPolicy,
    pub(crate) alru_wake_ms: u64,
    pub(crate) alru_stale_ms: u64,
    pub(crate) clean_batch: u32,
    pub(crate) md_lazy_ms: u64,
    /// Tests: the next shutdown behaves like `kill -9`.
    pub(crate) simulate_crash: AtomicBool,
    mode: AtomicU8,
    pub(crate) map: RwLock<LineMap>,
    /// Read hits counted by each channel of a core (one writer each; added to the core's
    /// `read_hits` when read, folded into the map's counters when the channel drops).
    pub(crate) hit_shards: Mutex<Vec<(u16, Arc<AtomicU64>)>>,
    pub(crate) cache_desc: Arc<Descriptor>,
    pub(crate) cores: Mutex<HashMap<u16, CoreSlot>>,
    pub(crate) requests: Mutex<VecDeque<OwnerReq>>,
    pub(crate) owner_efd: EventFd,
    pub(crate) mailboxes: Mutex<Vec<Weak<Mailbox>>>,
    pub(crate) cache_removed: AtomicBool,
    /// The owner thread has exited: requests are refused.
    pub(crate) stopped: AtomicBool,
    /// Clean lines are needed (a write found none): the cleaner runs a batch now.
    pub(crate) pressure: AtomicBool,
    pub(crate) start: Instant,
    /// Tests: while not `u64::MAX`, `now_ms` answers this (the cleaner's schedule, stepped by hand).
    #[cfg(test)]
    pub(crate) frozen_ms: AtomicU64,
    pub(crate) sb: Mutex<(Superblock, u64)>,
    /// Metadata rounds written, pages written by them, and requests answered by them (group commit:
    /// waiters per round).
    pub(crate) md_rounds: AtomicU64,
    pub(crate) md_pages: AtomicU64,
    pub(crate) md_waiters: AtomicU64,
}

impl Shared {
    /// Current mode.
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    pub(crate) fn now_ms(&self) -> u64 {
        #[cfg(test)]
        if self.frozen_ms.load(Ordering::Acquire) != u64::MAX {
            return self.frozen_ms.load(Ordering::Acquire);
        }
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn send(&self, r: OwnerReq) {
        let mut q = lock(&self.requests);
        if self.stopped.load(Ordering::Acquire) {
            drop(q);
            refuse(r);
            return;
        }
        q.push_back(r);
        drop(q);
        let _ = self.owner_efd.write(1);
    }

    /// Wakes every channel (a line lock was released that someone waited for).
    pub(crate) fn wake_all(&self) {
        let mut v = lock(&self.mailboxes);
        v.retain(|w| match w.upgrade() {
            Some(m) => {
                m.wake();
                true
            }
            None => false,
        });
    }

    /// Blocks per cache line.
    pub(crate) fn line_blocks(&self, block_size: u32) -> u64 {
        u64::from(self.line_size / block_size)
    }

    /// Logs dirty lines of `core` (count and ranges); returns the count.
    pub(crate) fn report_dirty(&self, core: u16, what: &str) -> usize {
        let keys = rlock(&self.map).dirty_keys(core);
        if keys.is_empty() {
            return 0;
        }
        let mut lines: Vec<u64> = keys.iter().map(|k| k.1).collect();
        lines.sort_unstable();
        let mut ranges = Vec::new();
        let mut start = lines[0];
        let mut prev = lines[0];
        for &l in &lines[1..] {
            if l != prev + 1 {
                ranges.push(format!("{start}-{prev}"));
                start = l;
            }
            prev = l;
        }
        ranges.push(format!("{start}-{prev}"));
        log::error!(
            "cache '{}': {what}: {} dirty lines of core id {core} are at risk (line size {} B, core lines {})",
            self.cache_name,
            lines.len(),
            self.line_size,
            ranges.join(",")
        );
        lines.len()
    }

    fn counters(&self, core: Option<u16>) -> Counters {
        let map = rlock(&self.map);
        let mut c = Counters::default();
        for (i, x) in map.counters.iter().enumerate() {
            if core.map_or(true, |k| usize::from(k) == i) {
                c.add(x);
            }
        }
        for (k, n) in lock(&self.hit_shards).iter() {
            if core.map_or(true, |c| c == *k) {
                c.read_hits += n.load(Ordering::Relaxed);
            }
        }
        c
    }

    /// Writes the superblock (the other copy), synchronously on a temporary channel.
    pub(crate) fn write_superblock(&self, clean: bool) -> Result<(), BdevError> {
        let mut g = lock(&self.sb);
        g.0.clean_shutdown = clean;
        g.0.mode = self.mode().as_str().into();
        let seq = g.1 + 1;
        let bytes = layout::encode_superblock(&g.0, seq).map_err(|e| BdevError::Module(e.to_string()))?;
        let mut ch = self.cache_desc.channel()?;
        let off = (seq & 1) * layout::SB_BYTES;
        sync_io(&mut ch, IoKind::Write, off, Some(&bytes), self.cache_block)?;
        sync_io(&mut ch, IoKind::Flush, 0, None, self.cache_block)?;
        g.1 = seq;
        Ok(())
    }
}

/// One cache instance: the shared state and its owner thread.
pub struct Instance {
    pub(crate) sh: Arc<Shared>,
    owner: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Instance {
    /// Asks the owner thread to persist everything, mark the superblock clean and exit; waits.
    fn stop(&self) -> Result<(), BdevError> {
        let Some(h) = lock(&self.owner).take() else { return Ok(()) };
        let mb = Mailbox::new()?;
        self.sh.send(OwnerReq::Shutdown(mb.clone(), 1));
        let r = mb.wait_for(1);
        let _ = h.join();
        r.map_err(|e| {
            BdevError::Module(format!("cache '{}': final metadata write failed: {e}", self.sh.cache_name))
        })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::error!("{e}");
        }
    }
}

/// Instances by cache bdev object (so separate registries in one process never share).
static INSTANCES: Mutex<Vec<(usize, Weak<Instance>)>> = Mutex::new(Vec::new());

/// Sequential stream detection, per channel (each queue's stream, as OCF keeps streams per I/O
/// queue): no lock shared between queues on any request.
#[derive(Default, Clone, Copy)]
pub(crate) struct SeqState {
    pub(crate) last_end: u64,
    pub(crate) bytes: u64,
}

/// The cache bdev: one core behind a (possibly shared) cache instance.
pub struct CacheBdev {
    info: BdevInfo,
    pub(crate) inst: Arc<Instance>,
    pub(crate) core_id: u16,
    pub(crate) core: Arc<Descriptor>,
    pub(crate) core_removed: Arc<AtomicBool>,
    pub(crate) seq_cutoff: SeqCutoff,
    pub(crate) seq_cutoff_bytes: u64,
    shut: Arc<AtomicBool>,
    /// The core is detached from the instance: the cleaner no longer touches it.
    detached: Arc<AtomicBool>,
    /// Dirty lines reported at risk when the core went away.
    pub(crate) at_risk: AtomicU64,
}

/// Submits one I/O and waits for it (set-up and tear-down paths only).
pub(crate) fn sync_io(
    ch: &mut Channel,
    kind: IoKind,
    off_bytes: u64,
    data: Option<&[u8]>,
    block: u32,
) -> Result<(), BdevError> {
    let bs = u64::from(block);
    let io = match (kind, data) {
        (IoKind::Write, Some(d)) => {
            BdevIo::write(off_bytes / bs, d.len() as u64 / bs, IoVecs::from_slice(d), 0)
        }
        _ => BdevIo::no_data(kind, 0, 0, 0),
    };
    ch.submit_and_wait(io).map_err(|e| BdevError::Module(format!("cache device I/O failed: {e}")))
}

pub(crate) fn sync_read(
    ch: &mut Channel,
    off_bytes: u64,
    len: usize,
    block: u32,
) -> Result<Vec<u8>, BdevError> {
    let bs = u64::from(block);
    let buf = IoVecs::alloc(len);
    let view = buf.slice(0, len as u64).ok_or_else(|| BdevError::Module("buffer".into()))?;
    ch.submit_and_wait(BdevIo::read(off_bytes / bs, len as u64 / bs, buf, 0))
        .map_err(|e| BdevError::Module(format!("cache device read failed: {e}")))?;
    Ok(view.to_vec())
}

fn cfg_err(cfg: &CacheConfig, m: impl std::fmt::Display) -> BdevError {
    BdevError::InvalidConfig(format!("cache bdev '{}': {m}", cfg.name))
}

fn same_core(c: &CoreEntry, cfg: &CacheConfig, core_blocks: u64, core_bs: u32) -> bool {
    c.core_bdev == cfg.core && c.core_blocks == core_blocks && c.block_size == core_bs
}

fn core_mismatch(cfg: &CacheConfig, c: &CoreEntry, core_blocks: u64, core_bs: u32) -> BdevError {
    cfg_err(
        cfg,
        format!(
            "cache={} holds metadata of cache bdev '{}' over core '{}' ({} blocks of {} B), not over core={} \
             ({core_blocks} blocks of {core_bs} B); use load=off to re-create the cache",
            cfg.cache, c.cache_bdev, c.core_bdev, c.core_blocks, c.block_size, cfg.core
        ),
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Rebuilds the line map from a cache device's record area (`image`, the line records right after the
/// superblocks) as a load does: after an unclean shutdown only dirty sectors count, after a clean one
/// every valid sector; saved counters come from the superblock. Returns the map, the lines loaded and
/// the dirty lines among them; damaged metadata is an error naming it, never a panic (fuzzed:
/// `fuzz/fuzz_targets/cache_md.rs`).
pub fn load_map(
    sb: &Superblock,
    image: &[u8],
    num_lines: u32,
    dev: &str,
) -> Result<(LineMap, u64, u64), LayoutError> {
    load_map_logging(sb, image, num_lines, dev, Duration::from_secs(1))
}

/// `load_map`, logging its progress every `every` (tests: a progress line per record).
fn load_map_logging(
    sb: &Superblock,
    image: &[u8],
    num_lines: u32,
    dev: &str,
    every: Duration,
) -> Result<(LineMap, u64, u64), LayoutError> {
    let mut map = LineMap::new(num_lines);
    let known: Vec<u16> = sb.cores.iter().map(|c| c.id).collect();
    let (mut loaded_lines, mut dirty_lines) = (0u64, 0u64);
    let mut last_log = Instant::now();
    let rec_bytes = layout::LINE_MD_BYTES as usize;
    for i in 0..num_lines {
        let o = i as usize * rec_bytes;
        let bytes = image.get(o..o + rec_bytes).ok_or_else(|| {
            LayoutError::Corrupt(format!("the record area ends before line {i} of {num_lines}"))
        })?;
        let Some(r) = layout::decode_line(bytes, i)? else { continue };
        map.lines[i as usize].seq = r.seq;
        if !r.used {
            continue;
        }
        if !known.contains(&r.core_id) || map.lookup((r.core_id, r.core_line)).is_some() {
            return Err(LayoutError::Corrupt(format!(
                "line {i} names core id {} line {} twice or an unknown core",
                r.core_id, r.core_line
            )));
        }
        let valid = if sb.clean_shutdown { r.valid } else { r.dirty };
        if valid == 0 {
            continue;
        }
        if !map.load(i, (r.core_id, r.core_line), valid | r.dirty, r.dirty, r.seq) {
            return Err(LayoutError::Corrupt(format!(
                "line {i} names core line {} of core id {}, past any core a cache takes",
                r.core_line, r.core_id
            )));
        }
        loaded_lines += 1;
        dirty_lines += u64::from(r.dirty != 0);
        if last_log.elapsed() > every {
            log::info!("cache '{dev}': load: {i}/{num_lines} records read");
            last_log = Instant::now();
        }
    }
    for c in &sb.cores {
        if let Ok(saved) = serde_json::from_value::<Counters>(c.stats.clone()) {
            let k = map.counters(c.id);
            k.read_hits = saved.read_hits;
            k.read_misses = saved.read_misses;
            k.read_partial_hits = saved.read_partial_hits;
            k.write_hits = saved.write_hits;
            k.write_misses = saved.write_misses;
            k.evictions = saved.evictions;
            k.cleaner_writes = saved.cleaner_writes;
        }
    }
    Ok((map, loaded_lines, dirty_lines))
}

impl CacheBdev {
    /// Builds a cache bdev over `cfg.core`, on a new or existing instance on `cfg.cache`.
    pub fn create(cfg: &CacheConfig, registry: &Registry) -> Result<Arc<CacheBdev>, BdevError> {
        if !valid_line_size(cfg.line_size) {
            return Err(cfg_err(cfg, format!("line-size={} must be 4K, 8K, 16K, 32K or 64K", cfg.line_size)));
        }
        if cfg.cache == cfg.core {
            return Err(cfg_err(cfg, "cache and core must be different bdevs"));
        }
        let cache_bdev = registry
            .get(&cfg.cache)
            .ok_or_else(|| cfg_err(cfg, format!("cache={}: no such bdev", cfg.cache)))?;
        let key = Arc::as_ptr(&cache_bdev).cast::<()>() as usize;
        // Core first: claiming it tells a second cache bdev on the same core to go away.
        let core_removed = Arc::new(AtomicBool::new(false));
        let shut = Arc::new(AtomicBool::new(false));
        let me: Arc<Mutex<Weak<CacheBdev>>> = Arc::new(Mutex::new(Weak::new()));
        let me2 = me.clone();
        let mut core = registry
            .open_with_remove_in(&cfg.core, true, move |reg, n| {
                let this = lock(&me2).upgrade();
                if let Some(b) = this {
                    b.core_gone(reg, n);
                }
            })
            .map_err(|e| cfg_err(cfg, format!("core={}: {e}", cfg.core)))?;
        core.claim("cache").map_err(|e| cfg_err(cfg, format!("core={}: {e}", cfg.core)))?;
        let core_bs = core.info().block_size;
        if cfg.line_size / core_bs > 128 {
            return Err(cfg_err(
                cfg,
                format!("line-size={} holds more than 128 blocks of {core_bs} B", cfg.line_size),
            ));
        }
        let core_blocks = core.info().num_blocks;
        let inst = {
            let mut table = lock(&INSTANCES);
            table.retain(|(_, w)| w.strong_count() > 0);
            match table.iter().find(|(k, _)| *k == key).and_then(|(_, w)| w.upgrade()) {
                Some(inst) => {
                    let sh = &inst.sh;
                    let mut why = Vec::new();
                    if sh.mode() != cfg.mode {
                        why.push(format!(
                            "mode={} (the shared cache uses {})",
                            cfg.mode.as_str(),
                            sh.mode().as_str()
                        ));
                    }
                    if sh.line_size != cfg.line_size {
                        why.push(format!(
                            "line-size={} (the shared cache uses {})",
                            cfg.line_size, sh.line_size
                        ));
                    }
                    if sh.cleaner != cfg.cleaner {
                        why.push(format!(
                            "cleaner={} (the shared cache uses {})",
                            cfg.cleaner.as_str(),
                            sh.cleaner.as_str()
                        ));
                    }
                    if !why.is_empty() {
                        return Err(cfg_err(
                            cfg,
                            format!("cache={} is shared and must agree: {}", cfg.cache, why.join(", ")),
                        ));
                    }
                    inst
                }
                None => {
                    let inst = Self::open_instance(cfg, registry, (core_blocks, core_bs))?;
                    table.push((key, Arc::downgrade(&inst)));
                    inst
                }
            }
        };
        let sh = inst.sh.clone();
        if sh.cache_block > core_bs {
            return Err(cfg_err(
                cfg,
                format!(
                    "cache={} has {} B blocks, larger than the core's {core_bs} B",
                    cfg.cache, sh.cache_block
                ),
            ));
        }
        // Find or add this cache bdev in the core table.
        let core_id = {
            let mut g = lock(&sh.sb);
            let sb = &mut g.0;
            match sb.cores.iter().find(|c| c.cache_bdev == cfg.name) {
                Some(c) if !same_core(c, cfg, core_blocks, core_bs) => {
                    return Err(core_mismatch(cfg, c, core_blocks, core_bs));
                }
                Some(c) => c.id,
                None => {
                    let id = sb.cores.iter().map(|c| c.id + 1).max().unwrap_or(0);
                    sb.cores.push(CoreEntry {
                        id,
                        cache_bdev: cfg.name.clone(),
                        core_bdev: cfg.core.clone(),
                        core_blocks,
                        block_size: core_bs,
                        stats: serde_json::Value::Null,
                    });
                    id
                }
            }
        };
        if lock(&sh.cores).contains_key(&core_id) {
            return Err(cfg_err(
                cfg,
                format!("cache bdev '{}' is already attached to cache={}", cfg.name, cfg.cache),
            ));
        }
        sh.write_superblock(false)?;
        let core = Arc::new(core);
        let detached = Arc::new(AtomicBool::new(false));
        lock(&sh.cores)
            .insert(core_id, CoreSlot { desc: core.clone(), removed: detached.clone(), block_size: core_bs });
        sh.send(OwnerReq::CoreAttached(core_id));
        let cinfo = core.info();
        let mut info = BdevInfo::new(&cfg.name, "cache", core_bs, cinfo.num_blocks);
        info.supports.flush = true;
        info.supports.unmap = cinfo.supports.unmap;
        info.supports.write_zeroes = cinfo.supports.write_zeroes;
        info.unmap_reads_zeroes = cinfo.unmap_reads_zeroes;
        info.max_unmap_blocks = cinfo.max_unmap_blocks;
        info.max_write_zeroes_blocks = cinfo.max_write_zeroes_blocks;
        info.volatile_write_cache = true;
        info.optimal_io_boundary_blocks = cfg.line_size / core_bs;
        log::info!(
            "cache bdev '{}': core '{}' (id {core_id}) on cache '{}', mode {}, {} lines of {} B, cleaner {}",
            cfg.name,
            cfg.core,
            cfg.cache,
            sh.mode().as_str(),
            sh.num_lines,
            sh.line_size,
            sh.cleaner.as_str()
        );
        let b = Arc::new(CacheBdev {
            info,
            inst,
            core_id,
            core,
            core_removed,
            seq_cutoff: cfg.seq_cutoff,
            seq_cutoff_bytes: cfg.seq_cutoff_bytes,
            shut,
            detached,
            at_risk: AtomicU64::new(0),
        });
        *lock(&me) = Arc::downgrade(&b);
        Ok(b)
    }

    /// Opens the cache device: format, or load its metadata, per `cfg.load`; starts the owner thread.
    fn open_instance(
        cfg: &CacheConfig,
        registry: &Registry,
        (core_blocks, core_bs): (u64, u32),
    ) -> Result<Arc<Instance>, BdevError> {
        let weak_slot: Arc<Mutex<Weak<Shared>>> = Arc::new(Mutex::new(Weak::new()));
        let ws = weak_slot.clone();
        let mut desc = registry
            .open_with_remove(&cfg.cache, true, move |n| {
                if let Some(sh) = lock(&ws).upgrade() {
                    cache_removed(&sh, n);
                }
            })
            .map_err(|e| cfg_err(cfg, format!("cache={}: {e}", cfg.cache)))?;
        desc.claim("cache").map_err(|e| cfg_err(cfg, format!("cache={}: {e}", cfg.cache)))?;
        let dinfo = desc.info().clone();
        let cbs = dinfo.block_size;
        let dev_bytes = dinfo.size_bytes();
        let mut ch = desc.channel()?;
        let first = sync_read(&mut ch, 0, layout::MD_OFFSET as usize, cbs)?;
        let found = layout::decode_superblock(&first);
        let force = "use load=off to re-create the cache (this discards what the device holds)";
        let loaded = match (cfg.load, found) {
            (LoadPolicy::Off, _) => None,
            (_, Ok((sb, seq))) => {
                layout::check_superblock(&sb, dev_bytes, cbs)
                    .map_err(|e| cfg_err(cfg, format!("cache={}: {e}; {force}", cfg.cache)))?;
                if let Some(c) = sb.cores.iter().find(|c| c.cache_bdev == cfg.name) {
                    if !same_core(c, cfg, core_blocks, core_bs) {
                        return Err(core_mismatch(cfg, c, core_blocks, core_bs));
                    }
                }
                if sb.line_size != cfg.line_size {
                    return Err(cfg_err(cfg, format!(
                        "cache={} holds another cache's metadata (line size {} B, this one asks for {} B); {force}",
                        cfg.cache, sb.line_size, cfg.line_size
                    )));
                }
                Some((sb, seq))
            }
            (LoadPolicy::On, Err(LayoutError::Absent)) => {
                return Err(cfg_err(cfg, format!("load=on but cache={} holds no cache metadata", cfg.cache)))
            }
            (LoadPolicy::Auto, Err(LayoutError::Absent)) => None,
            (_, Err(e)) => return Err(cfg_err(cfg, format!("cache={}: {e}; {force}", cfg.cache))),
        };
        let (num_lines, data_offset) =
            layout::geometry(dev_bytes, u64::from(cfg.line_size)).ok_or_else(|| {
                cfg_err(cfg, format!("cache={} is too small for one {} B line", cfg.cache, cfg.line_size))
            })?;
        let md_bytes =
            (layout::page_offset(num_lines.div_ceil(layout::LINES_PER_PAGE)) - layout::MD_OFFSET) as usize;
        let mut map = LineMap::new(num_lines);
        let (sb, seq, image) = match loaded {
            Some((sb, seq)) => {
                let t = Instant::now();
                log::info!(
                    "cache '{}': loading {} line records ({} shutdown)",
                    cfg.cache,
                    num_lines,
                    if sb.clean_shutdown { "clean" } else { "after an unclean" }
                );
                let image = sync_read(&mut ch, layout::MD_OFFSET, md_bytes, cbs)?;
                let (loaded_map, loaded_lines, dirty_lines) = load_map(&sb, &image, num_lines, &cfg.cache)
                    .map_err(|e| cfg_err(cfg, format!("cache={}: {e}; {force}", cfg.cache)))?;
                map = loaded_map;
                log::info!(
                    "cache '{}': loaded {loaded_lines} lines ({dirty_lines} dirty) in {} ms",
                    cfg.cache,
                    t.elapsed().as_millis()
                );
                (sb, seq, image)
            }
            None => {
                log::info!(
                    "cache '{}': attaching fresh: formatting {num_lines} lines of {} B",
                    cfg.cache,
                    cfg.line_size
                );
                let zeros = vec![0u8; md_bytes];
                // Records first, then the superblock: until the superblock is written the old one (if
                // any) still describes the device, and its records now read as free.
                for (k, chunk) in zeros.chunks(1 << 20).enumerate() {
                    sync_io(
                        &mut ch,
                        IoKind::Write,
                        layout::MD_OFFSET + (k as u64) * (1 << 20),
                        Some(chunk),
                        cbs,
                    )?;
                }
                let sb = Superblock {
                    uuid: hex(&crate::bdev::random_uuid()),
                    line_size: cfg.line_size,
                    mode: cfg.mode.as_str().into(),
                    cleaner: cfg.cleaner.as_str().into(),
                    num_lines,
                    cache_block_size: cbs,
                    data_offset,
                    clean_shutdown: false,
                    cores: Vec::new(),
                };
                (sb, 0, zeros)
            }
        };
        drop(ch);
        let sh = Arc::new(Shared {
            cache_name: cfg.cache.clone(),
            line_size: cfg.line_size,
            num_lines,
            data_offset,
            cache_block: cbs,
            cleaner: cfg.cleaner,
            alru_wake_ms: cfg.alru_wake_ms,
            alru_stale_ms: cfg.alru_stale_ms,
            clean_batch: cfg.clean_batch.max(1),
            md_lazy_ms: cfg.md_lazy_ms,
            simulate_crash: AtomicBool::new(false),
            mode: AtomicU8::new(cfg.mode.to_u8()),
            map: RwLock::new(map),
            hit_shards: Mutex::new(Vec::new()),
            cache_desc: Arc::new(desc),
            cores: Mutex::new(HashMap::new()),
            requests: Mutex::new(VecDeque::new()),
            owner_efd: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BdevError::io("cache: eventfd", e))?,
            mailboxes: Mutex::new(Vec::new()),
            cache_removed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            pressure: AtomicBool::new(false),
            start: Instant::now(),
            #[cfg(test)]
            frozen_ms: AtomicU64::new(u64::MAX),
            sb: Mutex::new((sb, seq)),
            md_rounds: AtomicU64::new(0),
            md_pages: AtomicU64::new(0),
            md_waiters: AtomicU64::new(0),
        });
        *lock(&weak_slot) = Arc::downgrade(&sh);
        // Mark the metadata "in use" before any I/O: a crash from now on loads only dirty lines.
        sh.write_superblock(false)?;
        let sh2 = sh.clone();
        let owner = std::thread::Builder::new()
            .name(format!("cache-{}", cfg.cache))
            .spawn(move || cleaner::run(sh2, image))
            .map_err(|e| BdevError::io("cache: spawning the owner thread", e))?;
        Ok(Arc::new(Instance { sh, owner: Mutex::new(Some(owner)) }))
    }

    /// The instance's shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.inst.sh
    }

    /// Current mode of the (shared) cache.
    pub fn mode(&self) -> Mode {
        self.inst.sh.mode()
    }

    /// Switches the mode at run time. Leaving write-back (or write-only) cleans: the new mode takes
    /// effect at once, so no new dirty data appears, then every dirty line is written back before
    /// this returns. Blocks the calling thread (not a poller).
    pub fn set_mode(&self, mode: Mode) -> Result<(), BdevError> {
        let sh = &self.inst.sh;
        let old = Mode::from_u8(sh.mode.swap(mode.to_u8(), Ordering::AcqRel));
        log::info!("cache '{}': mode {} → {}", sh.cache_name, old.as_str(), mode.as_str());
        if matches!(old, Mode::Wb | Mode::Wo) && !matches!(mode, Mode::Wb | Mode::Wo) {
            self.clean_all()?;
        }
        Ok(())
    }

    /// Writes back every dirty line of the instance and flushes the cores; blocks until done.
    pub fn clean_all(&self) -> Result<(), BdevError> {
        let mb = Mailbox::new()?;
        self.inst.sh.send(OwnerReq::Flush(None, mb.clone(), 1));
        mb.wait_for(1).map_err(|e| {
            BdevError::Module(format!("cache '{}': cleaning failed: {e}", self.inst.sh.cache_name))
        })
    }

    /// Hot-remove of the core (called by the registry, without its lock, on the thread removing the
    /// core; the core still serves I/O until its remover shuts it down): new I/O fails with `Removed`,
    /// this core's dirty lines are written back (bounded wait), what could not be is reported as at
    /// risk (count and ranges), its clean lines are freed for the other cores of a shared instance,
    /// and this cache bdev unregisters itself so its own users see a hot-remove in turn.
    fn core_gone(self: &Arc<Self>, reg: &Registry, core: &str) {
        if self.shut.load(Ordering::Acquire) {
            // After this cache bdev's shutdown, removing its core is ordinary teardown.
            return;
        }
        let sh = &self.inst.sh;
        let name = &self.info.name;
        self.core_removed.store(true, Ordering::Release);
        log::error!(
            "core bdev '{core}' removed: cache bdev '{name}' fails further I/O, writes back its dirty \
             lines and removes itself"
        );
        if !sh.cache_removed.load(Ordering::Acquire) {
            let t = Instant::now();
            match self.clean_core(Duration::from_secs(30)) {
                Ok(()) => log::info!(
                    "cache bdev '{name}': dirty lines of core '{core}' written back in {} ms",
                    t.elapsed().as_millis()
                ),
                Err(e) => log::error!("cache bdev '{name}': writing back to core '{core}' failed: {e}"),
            }
        }
        let n = sh.report_dirty(self.core_id, &format!("core '{core}' of cache bdev '{name}' removed"));
        self.at_risk.store(n as u64, Ordering::Release);
        if n == 0 {
            log::warn!("cache bdev '{name}': core '{core}' removed with no dirty data at risk");
        }
        self.detached.store(true, Ordering::Release);
        let freed = wlock(&sh.map).forget_clean(self.core_id);
        if freed > 0 {
            log::info!("cache '{}': {freed} clean lines of core '{core}' freed", sh.cache_name);
        }
        sh.wake_all();
        let registered =
            reg.get(name).is_some_and(|b| Arc::as_ptr(&b).cast::<()>() == Arc::as_ptr(self).cast::<()>());
        let r = if registered { reg.unregister(name).and_then(|b| b.shutdown()) } else { self.shutdown() };
        match r {
            Ok(()) => log::warn!("cache bdev '{name}' removed (its core '{core}' went away)"),
            Err(e) => log::error!("cache bdev '{name}': removal after its core went away: {e}"),
        }
    }

    /// Writes back this core's dirty lines and flushes the core; waits at most `limit`.
    fn clean_core(&self, limit: Duration) -> Result<(), BdevError> {
        let mb = Mailbox::new()?;
        self.inst.sh.send(OwnerReq::Flush(Some(self.core_id), mb.clone(), 1));
        let deadline = Instant::now() + limit;
        let late = || BdevError::Module(format!("not done after {} s", limit.as_secs()));
        mb.wait_until(1, Some(deadline)).ok_or_else(late)?.map_err(|e| BdevError::Module(e.to_string()))?;
        // Record the cleaned lines as clean, so they can be freed.
        self.inst.sh.send(OwnerReq::Persist(mb.clone(), 2));
        mb.wait_until(2, Some(deadline)).ok_or_else(late)?.map_err(|e| BdevError::Module(e.to_string()))
    }

    /// Dirty lines that were at risk when the core went away (0 until then).
    pub fn dirty_at_risk(&self) -> u64 {
        self.at_risk.load(Ordering::Acquire)
    }

    fn stats_value(&self, c: &Counters) -> serde_json::Value {
        let mut v = serde_json::to_value(c).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("mode".into(), self.mode().as_str().into());
        }
        v
    }
}

/// Hot-remove of the cache device: go pass-through, report dirty data at risk.
fn cache_removed(sh: &Arc<Shared>, name: &str) {
    if sh.stopped.load(Ordering::Acquire) {
        // Every cache bdev is shut down and the metadata saved: ordinary teardown.
        return;
    }
    sh.cache_removed.store(true, Ordering::Release);
    let cores: Vec<u16> = lock(&sh.cores).keys().copied().collect();
    let mut n = 0;
    for c in cores {
        n += sh.report_dirty(c, &format!("cache device '{name}' removed"));
    }
    if n == 0 {
        log::warn!("cache device '{name}' removed: the cache was clean; continuing in pass-through mode");
    } else {
        log::error!(
            "cache device '{name}' removed with {n} dirty lines: continuing in pass-through mode; \
             reads of the dirty sectors fail with EIO"
        );
    }
    sh.wake_all();
}

impl Bdev for CacheBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn create_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError> {
        Ok(Box::new(engine::CacheChannel::new(self)?))
    }

    fn shutdown(&self) -> Result<(), BdevError> {
        if self.shut.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let sh = &self.inst.sh;
        // Save this core's counters in the superblock.
        let c = sh.counters(Some(self.core_id));
        if let Some(e) = lock(&sh.sb).0.cores.iter_mut().find(|e| e.id == self.core_id) {
            e.stats = serde_json::to_value(c).unwrap_or_default();
        }
        let last = {
            let mut cores = lock(&sh.cores);
            cores.remove(&self.core_id);
            cores.is_empty()
        };
        if last {
            // The last cache bdev of the instance: persist every record and mark the superblock clean.
            self.inst.stop()?;
        }
        Ok(())
    }

    fn module_stats(&self) -> Option<serde_json::Value> {
        let sh = &self.inst.sh;
        let mut v = self.stats_value(&sh.counters(Some(self.core_id)));
        let mut shared = self.stats_value(&sh.counters(None));
        if let Some(o) = shared.as_object_mut() {
            o.insert("cache_device".into(), sh.cache_name.clone().into());
            o.insert("num_lines".into(), sh.num_lines.into());
            o.insert("line_size".into(), sh.line_size.into());
            let sb = lock(&sh.sb);
            o.insert("cores".into(), sb.0.cores.iter().map(|c| c.cache_bdev.clone()).collect());
            o.insert("uuid".into(), sb.0.uuid.clone().into());
            o.insert("cleaner".into(), sh.cleaner.as_str().into());
            o.insert("cache_block_size".into(), sh.cache_block.into());
            o.insert("data_offset".into(), sh.data_offset.into());
            o.insert("superblock_seq".into(), sb.1.into());
            o.insert("cache_removed".into(), sh.cache_removed.load(Ordering::Acquire).into());
            o.insert("md_rounds".into(), sh.md_rounds.load(Ordering::Relaxed).into());
            o.insert("md_pages".into(), sh.md_pages.load(Ordering::Relaxed).into());
            o.insert("md_waiters".into(), sh.md_waiters.load(Ordering::Relaxed).into());
        }
        if let Some(o) = v.as_object_mut() {
            o.insert("shared_cache".into(), shared);
        }
        Some(v)
    }
}

pub use info::info_json;

#[cfg(test)]
mod tests;
