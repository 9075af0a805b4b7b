//! The FTL core: shared state and the core thread that owns every media write.
//!
//! ```text
//!  channel threads (one per export queue)            core thread (one per FTL)
//!   write  → lock, copy into wbuf, L2P=Cache, ack      loop: build a batch of mini-units from wbuf
//!   unmap  → lock, L2P=Unmapped, trims_pending               (unlock) write it on its own queue pair
//!   flush  → lock, queue FlushReq ──────────────────►        (lock) commit: L2P=Media, valid bits
//!   read   → L2P (atomic, no lock) → own queue pair         flush: pad, media flush, checkpoint if trims
//!            Cache(n) → lock, copy from wbuf                erase-ahead, relocation, limits, shutdown
//! ```
//!
//! # Design
//! One `Mutex<Core>` guards the write buffer, band table, valid map and counters; it is only held for
//! memory work (copies and bookkeeping), never across media I/O: the core thread prepares a batch
//! under the lock, releases it, writes, and re-locks to commit. Channels therefore never wait for
//! another queue's media I/O, and reads need no lock at all unless they hit the write buffer.
//! Background work (flushing a partial buffer after a flush request, erase-ahead, relocation) runs
//! on the core thread, which sleeps on a condition variable with a timeout, so it progresses
//! without guest I/O. Completions the core produces (flushes) go to the submitting channel's
//! mailbox, whose eventfd is the channel's `wait_fd`.
//!
//! Durability of trims: an unmap changes only the L2P; the next flush drains the buffer with new
//! writes held back (the *gate*), then persists a checkpoint (L2P, valid and trim maps, bands) to
//! the metadata areas before the flush completes. After a crash, restore starts from the newest
//! checkpoint and replays only media blocks with a sequence number at or above it, so a flushed
//! unmap is never undone by older data still on media.
//!
//! Progress guarantee: user writes may hold at most as many buffer slots as the free bands above
//! the CRIT reserve (plus the rest of the open band) can take, and the CRIT limit stops them
//! altogether, so relocation always has a band to write the blocks it moves; a partial mini-unit
//! left alone for one idle period (20 ms) is padded, so the last relocated blocks of a band never
//! wait for more data.
//!
//! Data copies into and out of the write buffer happen outside the core lock (see `wbuf.rs`):
//! writers reserve entries, copy, then publish; the core copies taken entries after unlocking.
//!
//! # Limitations
//! Reserving and publishing write-buffer entries still takes the one core lock per write (short,
//! bookkeeping only). A write failure on a band's tail leaves that band without tail metadata
//! (restore then reads its blocks' OOB).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bdev::{Completion as BdevCompletion, IoError};
use crate::ocssd::{Command, IoBuf, MediaDevice, Op, PpaList, QueuePair, SgList};

use super::band::{Band, BandState, Geo};
use super::l2p::{L2p, Loc};
use super::layout::{self, BLOCK_BYTES, LBA_HEAD, LBA_PAD, LBA_TAIL, UNMAPPED};
use super::md::{self, Checkpoint};
use super::stats::Stats;
use super::wbuf::{Origin, WriteBuffer};
use super::{FtlConfig, FtlError};

/// Write limits by free bands (SPDK's CRIT/HIGH/LOW/START).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Limit {
    /// Free-band threshold (at or below it the limit applies).
    pub thld: u64,
    /// Share of the write buffer user writes may use, in percent.
    pub pct: u32,
}

/// Limit names, in order.
pub const LIMIT_NAMES: [&str; 4] = ["crit", "high", "low", "start"];

/// Where a completion for a channel goes.
pub struct Mailbox {
    done: Mutex<Vec<BdevCompletion>>,
    /// Readable while the channel has something to poll.
    pub event: EventFd,
    /// The channel is waiting for write-buffer space.
    pub want_space: AtomicBool,
    /// The eventfd has been written since the channel last cleared it (saves syscalls).
    signaled: AtomicBool,
    /// `done` may be non-empty (set after a push, cleared before a take).
    posted: AtomicBool,
}

impl Mailbox {
    /// A new mailbox.
    pub fn new() -> Result<Self, FtlError> {
        Ok(Mailbox {
            done: Mutex::new(Vec::new()),
            event: EventFd::new(EFD_NONBLOCK).map_err(|e| FtlError::Media(format!("eventfd: {e}")))?,
            want_space: AtomicBool::new(false),
            signaled: AtomicBool::new(false),
            posted: AtomicBool::new(false),
        })
    }

    /// Posts a completion and wakes the channel.
    pub fn post(&self, c: BdevCompletion) {
        lock(&self.done).push(c);
        self.posted.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Wakes the channel.
    pub fn wake(&self) {
        if !self.signaled.swap(true, Ordering::SeqCst) {
            // A full counter only means the fd is already readable.
            let _ = self.event.write(1);
        }
    }

    /// Clears the wakeup (the channel is about to look at everything).
    pub fn clear(&self) {
        if self.signaled.swap(false, Ordering::SeqCst) {
            // EAGAIN when already clear.
            let _ = self.event.read();
        }
    }

    /// True when completions are posted and not yet taken.
    pub fn has_posts(&self) -> bool {
        self.posted.load(Ordering::SeqCst)
    }

    /// Takes posted completions (no lock taken when nothing was posted).
    pub fn take(&self, out: &mut Vec<BdevCompletion>) -> usize {
        if !self.posted.swap(false, Ordering::SeqCst) {
            return 0;
        }
        let mut d = lock(&self.done);
        let n = d.len();
        out.append(&mut d);
        n
    }
}

/// A flush waiting for the core.
pub struct FlushReq {
    mailbox: Arc<Mailbox>,
    tag: u64,
    /// Every write buffer entry below this number must be durable.
    upto: u64,
}

/// State under the core lock.
pub struct Core {
    /// Write buffer.
    pub wbuf: WriteBuffer,
    /// Bands.
    pub bands: Vec<Band>,
    /// Valid map over the flat address space.
    pub valid: Vec<u64>,
    /// Next sequence number to give a band.
    pub next_seq: u64,
    /// Band taking writes.
    pub open: Option<u32>,
    /// Band erased ahead.
    pub next: Option<u32>,
    /// Flushes waiting.
    pub flushes: VecDeque<FlushReq>,
    /// New writes/unmaps are held back (checkpoint or shutdown drain).
    pub gate: bool,
    /// Unmaps since the last checkpoint.
    pub trims_pending: bool,
    /// User writes may hold this many buffer slots.
    pub user_limit: usize,
    /// Current limit level index (None = no limit).
    pub level: Option<usize>,
    /// Bands being relocated, with their scan cursor (address offset).
    pub relocs: Vec<(u32, u64)>,
    /// Checkpoint generation.
    pub generation: u64,
    /// Sequence of the last checkpoint.
    pub ckpt_seq: u64,
    /// Media writes since the last media flush (a band may be erased only after a flush).
    pub unflushed: bool,
    /// Fatal metadata error (reported by flushes).
    pub failed: Option<String>,
    /// The core thread is waiting on `Shared::wake` (writers notify only then: a condition
    /// variable's notify is a system call even with nobody waiting).
    pub core_idle: bool,
    /// The nv-cache ring (with `nv-cache=BDEV`, once replay is done).
    pub nv: Option<super::nvcache::NvRing>,
    /// Entries below this must be durable before nv-cache records are reclaimed (blocks re-queued
    /// after a media write failure live in newer entries than their records say).
    pub nv_requeue_mark: u64,
}

/// State shared by the bdev, its channels and the core thread.
pub struct Shared {
    /// Geometry.
    pub geo: Geo,
    /// Configuration.
    pub cfg: FtlConfig,
    /// Identity.
    pub uuid: [u8; 16],
    /// Exposed blocks.
    pub num_lbas: u64,
    /// Persisted L2P entry width.
    pub l2p_entry_bytes: u32,
    /// The media.
    pub media: Arc<dyn MediaDevice>,
    /// L2P.
    pub l2p: L2p,
    /// Everything else.
    pub core: Mutex<Core>,
    /// Wakes the core thread.
    pub wake: Condvar,
    /// Counters.
    pub stats: Stats,
    /// Channels' mailboxes (to signal buffer space).
    pub mailboxes: Mutex<Vec<Weak<Mailbox>>>,
    /// 0 run, 1 clean stop, 2 abort (tests: simulate a crash).
    pub stop: AtomicU8,
    /// Limits (scaled).
    pub limits: [Limit; 4],
    /// Blocks of one batch at most.
    pub max_batch: u64,
    /// Data positions of an average data band.
    pub band_data_avg: u64,
    /// Wall clock of the last checkpoint (ms since start), for `ftl info`.
    pub ckpt_count: AtomicU64,
    /// The nv-cache, once attached (after replay).
    pub nv: std::sync::OnceLock<Arc<super::nvcache::NvCache>>,
}

/// Locks, ignoring poisoning (a panicking core thread already failed the FTL).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Limit thresholds scaled to the band count: SPDK's values (5/10/20/40 free bands) are taken as
/// meant for a 256-band device; `t = round(spdk_t × data_bands / 256)`, clamped to `1..=max(1, spare_bands - 1)` where
/// `spare_bands` is the overprovisioned share of data bands, so relocation always starts while
/// free space remains.
pub fn scale_limits(base: &[Limit; 4], data_bands: u64, spare_bands: u64) -> [Limit; 4] {
    let cap = spare_bands.saturating_sub(1).max(1);
    let mut out = *base;
    for l in out.iter_mut() {
        let t = (l.thld * data_bands + 128) / 256;
        l.thld = t.clamp(1, cap);
    }
    out
}

impl Shared {
    /// Free bands (usable for new writes).
    pub fn free_bands(c: &Core) -> u64 {
        c.bands
            .iter()
            .filter(|b| matches!(b.state, BandState::Free | BandState::Prep) && b.reloc_pending == 0)
            .count() as u64
    }

    /// Recomputes the limit level and the user share of the buffer.
    pub fn update_limits(&self, c: &mut Core) {
        let free = Self::free_bands(c);
        let slots = c.wbuf.slots();
        c.level = None;
        c.user_limit = slots;
        for (i, l) in self.limits.iter().enumerate() {
            if free <= l.thld {
                c.level = Some(i);
                c.user_limit = slots * l.pct as usize / 100;
                if l.pct > 0 {
                    c.user_limit = c.user_limit.max(self.max_batch as usize);
                }
                break;
            }
        }
        // Never buffer more user data than the free space above the CRIT reserve can take (plus the
        // rest of the open band): relocation must always find room for the blocks it moves.
        let open_left = c.open.map_or(0, |o| {
            let b = &c.bands[o as usize];
            b.data_end(&self.geo).saturating_sub(b.next_pos)
        });
        let room = free.saturating_sub(self.limits[0].thld) * self.band_data_avg + open_left;
        c.user_limit = c.user_limit.min(usize::try_from(room).unwrap_or(usize::MAX));
    }

    /// Marks the old location of an LBA invalid.
    pub fn invalidate(&self, c: &mut Core, old: Loc) {
        match old {
            Loc::Unmapped => {}
            Loc::Cache(n) => {
                // A relocated block overwritten while buffered no longer pins its source band.
                if let Some(Origin::Reloc(src)) = c.wbuf.kill(n) {
                    if let Some(b) = c.bands.get_mut(src as usize) {
                        b.reloc_pending = b.reloc_pending.saturating_sub(1);
                    }
                }
            }
            Loc::Media(a) => {
                let (band, _, _) = self.geo.split(a);
                if clear_bit(&mut c.valid, a) {
                    if let Some(b) = c.bands.get_mut(band as usize) {
                        b.valid = b.valid.saturating_sub(1);
                    }
                }
            }
        }
    }

    /// Wakes channels waiting for buffer space.
    pub fn signal_space(&self) {
        let mut boxes = lock(&self.mailboxes);
        boxes.retain(|w| w.strong_count() > 0);
        for w in boxes.iter() {
            if let Some(m) = w.upgrade() {
                if m.want_space.swap(false, Ordering::SeqCst) {
                    m.wake();
                }
            }
        }
    }
}

/// Sets a bit; true if it was clear.
pub fn set_bit(map: &mut [u64], i: u64) -> bool {
    let (w, b) = ((i / 64) as usize, i % 64);
    match map.get_mut(w) {
        Some(x) => {
            let was = *x & (1 << b) != 0;
            *x |= 1 << b;
            !was
        }
        None => false,
    }
}

/// Clears a bit; true if it was set.
pub fn clear_bit(map: &mut [u64], i: u64) -> bool {
    let (w, b) = ((i / 64) as usize, i % 64);
    match map.get_mut(w) {
        Some(x) => {
            let was = *x & (1 << b) != 0;
            *x &= !(1 << b);
            was
        }
        None => false,
    }
}

/// Tests a bit.
pub fn test_bit(map: &[u64], i: u64) -> bool {
    map.get((i / 64) as usize).is_some_and(|x| x & (1 << (i % 64)) != 0)
}

/// What goes into one position of a batch.
#[derive(Debug, Clone, Copy)]
enum Src {
    Entry(u64),
    Head,
    Tail(usize),
    Pad,
}

/// One command of a batch: consecutive positions of one chunk.
struct Run {
    band: u32,
    chunk: usize,
    first_pos: u64,
    items: Vec<Src>,
}

/// One write command of a batch, its buffered entries not yet copied in.
struct PreparedRun {
    ri: usize,
    ppas: PpaList,
    data: Vec<u8>,
    oob: Vec<u8>,
}

/// A batch prepared under the core lock.
struct Prepared {
    runs: Vec<PreparedRun>,
    /// (index into `runs`, block within the run, write-buffer entry) to copy.
    fills: Vec<(usize, usize, u64)>,
    slots: Arc<super::wbuf::Slots>,
}

/// Copies the buffered entries of a batch into its commands, outside the core lock: a taken
/// entry's slot is not reused before the core thread retires it, after this batch is written.
fn fill_entries(p: Prepared) -> Vec<(Op, usize)> {
    let mut runs = p.runs;
    let pos: std::collections::HashMap<usize, usize> =
        runs.iter().enumerate().map(|(i, r)| (r.ri, i)).collect();
    for (ri, k, e) in p.fills {
        let Some(r) = pos.get(&ri).and_then(|&i| runs.get_mut(i)) else { continue };
        if let Some(d) = r.data.get_mut(k * BLOCK_BYTES..(k + 1) * BLOCK_BYTES) {
            d.copy_from_slice(&p.slots.at(e));
        }
    }
    runs.into_iter()
        .map(|r| {
            (Op::Write { ppas: r.ppas, data: SgList::from(r.data), oob: Some(IoBuf::from_vec(r.oob)) }, r.ri)
        })
        .collect()
}

/// The core thread.
pub fn run(shared: Arc<Shared>) {
    let mut qp = match shared.media.queue_pair(64) {
        Ok(q) => q,
        Err(e) => {
            log::error!("ftl '{}': no media queue pair for the core: {e}", shared.cfg.name);
            lock(&shared.core).failed = Some(e.to_string());
            fail_flushes(&shared);
            return;
        }
    };
    let mut worker = Worker { sh: shared, pad_next: false, tail_cache: None, nv_ch: None, idle: IDLE_PERIOD };
    worker.main(qp.as_mut());
}

fn fail_flushes(sh: &Shared) {
    let reqs: Vec<FlushReq> = lock(&sh.core).flushes.drain(..).collect();
    for r in reqs {
        r.mailbox.post(BdevCompletion { tag: r.tag, result: Err(IoError::Errno(libc::EIO)) });
    }
}

/// How long the core thread sleeps with nothing to do before padding a partial mini-unit.
const IDLE_PERIOD: Duration = Duration::from_millis(20);

struct Worker {
    sh: Arc<Shared>,
    /// Pad a partial mini-unit on the next step: the core went idle with blocks waiting (nothing
    /// else will complete it soon, e.g. the last relocated blocks of a band, or a quiet writer).
    pad_next: bool,
    /// Encoded tail of the band being closed.
    tail_cache: Option<(u32, Vec<u8>)>,
    /// The core's channel on the nv-cache bdev (created on first use).
    nv_ch: Option<crate::bdev::Channel>,
    /// The idle period ([`IDLE_PERIOD`]; tests set a longer one).
    idle: Duration,
}

impl Worker {
    fn main(&mut self, qp: &mut dyn QueuePair) {
        loop {
            let stop = self.sh.stop.load(Ordering::SeqCst);
            if stop == 2 {
                fail_flushes(&self.sh);
                return;
            }
            match self.step(qp, stop == 1) {
                Ok(true) => {}
                Ok(false) => {
                    if stop == 1 {
                        // Drained: persist a clean checkpoint and leave.
                        if let Err(e) = self.checkpoint(qp, true) {
                            log::error!("ftl '{}': clean shutdown: {e}", self.sh.cfg.name);
                            lock(&self.sh.core).failed = Some(e.to_string());
                        }
                        fail_flushes(&self.sh);
                        return;
                    }
                    let c = lock(&self.sh.core);
                    if c.flushes.is_empty() && c.wbuf.waiting() < self.sh.geo.ws_min {
                        let waiting = c.wbuf.waiting();
                        let mut c = c;
                        c.core_idle = true;
                        let (mut c, timeout) =
                            self.sh.wake.wait_timeout(c, self.idle).unwrap_or_else(|e| e.into_inner());
                        c.core_idle = false;
                        // Still the same partial unit after a quiet period: pad it next time.
                        self.pad_next = timeout.timed_out() && waiting > 0 && c.wbuf.waiting() == waiting;
                    }
                }
                Err(e) => {
                    log::error!("ftl '{}': {e}", self.sh.cfg.name);
                    lock(&self.sh.core).failed = Some(e.to_string());
                    fail_flushes(&self.sh);
                    // Keep serving reads; writes that need the core will wait for space.
                    let c = lock(&self.sh.core);
                    let _ = self.sh.wake.wait_timeout(c, Duration::from_millis(100));
                    if self.sh.stop.load(Ordering::SeqCst) != 0 {
                        return;
                    }
                }
            }
        }
    }

    /// One unit of work; false when idle.
    fn step(&mut self, qp: &mut dyn QueuePair, stopping: bool) -> Result<bool, FtlError> {
        let sh = Arc::clone(&self.sh);
        let mut c = lock(&sh.core);
        if c.failed.is_some() {
            return Err(FtlError::Media(c.failed.clone().unwrap_or_default()));
        }
        sh.update_limits(&mut c);
        let flush_wanted = !c.flushes.is_empty() || stopping;
        if stopping || (flush_wanted && c.trims_pending) {
            c.gate = true;
        }
        // 1. An open band.
        if c.open.is_none() && (c.wbuf.waiting() > 0) {
            drop(c);
            self.open_band(qp)?;
            return Ok(true);
        }
        // 2. A batch of writes.
        let pad = flush_wanted || std::mem::take(&mut self.pad_next);
        let runs = self.build_batch(&mut c, pad);
        if !runs.is_empty() {
            let prepared = self.prepare(&c, &runs);
            drop(c);
            let results = self.write_runs(qp, fill_entries(prepared));
            let mut c = lock(&sh.core);
            self.commit(&mut c, &runs, &results);
            sh.update_limits(&mut c);
            drop(c);
            sh.signal_space();
            return Ok(true);
        }
        // 3. Flush completion.
        if flush_wanted && c.wbuf.taken == c.wbuf.tail {
            let need_ckpt = c.gate && !stopping;
            let upto = c.wbuf.tail;
            drop(c);
            let done = md::exec(qp, Op::Flush);
            if !done.status.is_success() {
                return Err(FtlError::Media(format!("media flush: {}", done.status)));
            }
            lock(&sh.core).unflushed = false;
            // Every entry below `upto` is on the media now: reclaim their nv-cache records and
            // make the nv-cache durable (before a checkpoint, so no replay undoes a flushed trim).
            self.nv_reclaim(upto)?;
            if stopping {
                return Ok(false);
            }
            if need_ckpt {
                self.checkpoint(qp, false)?;
                let mut c = lock(&sh.core);
                c.gate = false;
                c.trims_pending = false;
            }
            let mut c = lock(&sh.core);
            let mut ready = Vec::new();
            while c.flushes.front().is_some_and(|f| f.upto <= upto) {
                if let Some(f) = c.flushes.pop_front() {
                    ready.push(f);
                }
            }
            drop(c);
            sh.signal_space();
            for f in ready {
                f.mailbox.post(BdevCompletion { tag: f.tag, result: Ok(()) });
            }
            return Ok(true);
        }
        if stopping {
            // The gate is closed: wait for the batch builder to drain everything.
            return Ok(c.wbuf.waiting() > 0);
        }
        // 3b. An nv-cache ring more than half full: flush the media and reclaim what is on it.
        if let Some(r) = c.nv.as_ref() {
            let head = c.wbuf.head;
            if r.used() * 2 > r.ring_units && r.pending.front().is_some_and(|f| f.done && f.last_entry < head)
            {
                drop(c);
                let done = md::exec(qp, Op::Flush);
                if !done.status.is_success() {
                    return Err(FtlError::Media(format!("media flush: {}", done.status)));
                }
                lock(&sh.core).unflushed = false;
                self.nv_reclaim(head)?;
                return Ok(true);
            }
        }
        // 4. Erase ahead.
        if let Some(o) = c.open {
            let b = &c.bands[o as usize];
            let thld = b.positions(&sh.geo) * u64::from(sh.cfg.band_thld) / 100;
            if b.next_pos >= thld && c.next.is_none() {
                drop(c);
                if let Some(id) = self.prepare_free_band(qp)? {
                    lock(&sh.core).next = Some(id);
                    return Ok(true);
                }
                // No free band yet: relocation below makes one.
                return self.relocate(qp);
            }
        }
        // 5. Relocation.
        drop(c);
        self.relocate(qp)
    }

    /// Picks a free band, erases it (after a media flush, so relocated copies are durable) and
    /// marks it Prep.
    fn prepare_free_band(&mut self, qp: &mut dyn QueuePair) -> Result<Option<u32>, FtlError> {
        let sh = Arc::clone(&self.sh);
        let (id, flush) = {
            let c = lock(&sh.core);
            let first = sh.geo.first_data_band() as usize;
            let pick = c
                .bands
                .iter()
                .skip(first)
                .filter(|b| b.state == BandState::Free && b.reloc_pending == 0 && Some(b.id) != c.next)
                .min_by_key(|b| (b.erase_count, b.id))
                .map(|b| b.id);
            match pick {
                Some(id) => (id, c.unflushed),
                None => return Ok(None),
            }
        };
        if flush {
            let done = md::exec(qp, Op::Flush);
            if !done.status.is_success() {
                return Err(FtlError::Media(format!("media flush: {}", done.status)));
            }
            lock(&sh.core).unflushed = false;
        }
        let retired = lock(&sh.core).bands[id as usize].retired;
        let mut good = Vec::new();
        for i in 0..sh.geo.pus.len() {
            if retired & (1 << i) != 0 {
                continue;
            }
            let chunk = sh.geo.chunk(id, i);
            let Ok(info) = sh.media.chunk_info(chunk) else { continue };
            match info.state {
                crate::ocssd::ChunkState::Offline => continue,
                crate::ocssd::ChunkState::Free => good.push(i),
                _ => {
                    let list = PpaList::new(vec![chunk]).map_err(|e| FtlError::Media(e.to_string()))?;
                    let done = md::exec(qp, Op::Reset { chunks: list });
                    if done.status.is_success() {
                        good.push(i);
                    } else {
                        log::warn!(
                            "ftl '{}': reset of {chunk} failed ({}); chunk retired",
                            sh.cfg.name,
                            done.status
                        );
                        lock(&sh.core).bands[id as usize].retired |= 1 << i;
                        sh.stats.retired_chunks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let mut c = lock(&sh.core);
        let b = &mut c.bands[id as usize];
        b.good = good;
        b.dirty = false;
        b.erase_count += 1;
        b.state = BandState::Prep;
        if b.good.is_empty() {
            b.state = BandState::Closed;
            return Ok(None);
        }
        Ok(Some(id))
    }

    fn open_band(&mut self, qp: &mut dyn QueuePair) -> Result<(), FtlError> {
        let sh = Arc::clone(&self.sh);
        let next = lock(&sh.core).next.take();
        let id = match next {
            Some(id) => id,
            None => match self.prepare_free_band(qp)? {
                Some(id) => id,
                None => {
                    // No free band: relocation must make one.
                    self.relocate(qp)?;
                    let c = lock(&sh.core);
                    let _ = sh.wake.wait_timeout(c, Duration::from_millis(5));
                    return Ok(());
                }
            },
        };
        let mut c = lock(&sh.core);
        let seq = c.next_seq;
        let b = &mut c.bands[id as usize];
        let positions = b.positions(&sh.geo);
        b.state = BandState::Opening;
        b.base_seq = seq;
        b.next_pos = 0;
        b.valid = 0;
        b.written = 0;
        b.has_tail = false;
        b.lba_map = vec![LBA_PAD; sh.geo.max_positions as usize];
        c.next_seq = seq + positions;
        c.open = Some(id);
        Ok(())
    }

    /// Assigns positions to buffered entries (and head/tail/pad blocks); at most one command per chunk.
    fn build_batch(&mut self, c: &mut Core, pad: bool) -> Vec<Run> {
        let geo = &self.sh.geo;
        let mut runs: Vec<Run> = Vec::new();
        let Some(id) = c.open else { return runs };
        let mut used_chunks = 0u64;
        loop {
            let b = &c.bands[id as usize];
            let positions = b.positions(geo);
            if b.next_pos >= positions {
                // Band complete.
                let b = &mut c.bands[id as usize];
                b.state = BandState::Closed;
                b.lba_map = Vec::new();
                c.open = None;
                // `tail_cache` stays: this batch may still hold the band's tail blocks.
                break;
            }
            let pos = b.next_pos;
            let Some((chunk, _)) = b.locate(geo, pos) else { break };
            // One command per chunk per batch: continue only a run that ends right here. (Every run
            // of a batch is in this band: the batch ends with it.)
            let continues = runs.last().is_some_and(|r| {
                r.chunk == chunk
                    && r.first_pos + r.items.len() as u64 == pos
                    && (r.items.len() as u64) < geo.ws_opt.min(64)
            });
            if used_chunks & (1 << chunk) != 0 && !continues {
                break;
            }
            if b.is_hole(geo, pos) {
                c.bands[id as usize].next_pos += geo.ws_min;
                continue;
            }
            let data_end = b.data_end(geo);
            let mut items = Vec::with_capacity(geo.ws_min as usize);
            if pos >= data_end {
                // Tail region: written as soon as the band is full.
                let b = &mut c.bands[id as usize];
                if b.state != BandState::Closing {
                    b.state = BandState::Closing;
                    let tail = layout::encode_tail(id, b.base_seq, b.good_mask(), &b.lba_map);
                    let fits = (data_end..positions).filter(|p| !b.is_hole(geo, *p)).count()
                        >= tail.len() / BLOCK_BYTES;
                    b.has_tail = fits;
                    self.tail_cache = Some((id, if fits { tail } else { Vec::new() }));
                }
                let tail_blocks = self.tail_cache.as_ref().map_or(0, |t| t.1.len() / BLOCK_BYTES);
                // Index of this position among the non-hole tail positions.
                let first = (data_end..pos).filter(|p| !b.is_hole(geo, *p)).count();
                for idx in first..first + geo.ws_min as usize {
                    items.push(if idx < tail_blocks { Src::Tail(idx) } else { Src::Pad });
                }
            } else {
                // Data region: need ws_min live entries (or padding).
                let mut n = c.wbuf.taken;
                let mut picked = Vec::new();
                let want = if pos == 0 { geo.ws_min - 1 } else { geo.ws_min } as usize;
                while picked.len() < want && n < c.wbuf.tail {
                    match c.wbuf.get(n) {
                        // A writer is still copying into this one: stop here (it is published soon).
                        Some(e) if !e.ready => break,
                        Some(e) if e.live => picked.push(n),
                        _ => {}
                    }
                    n += 1;
                }
                if picked.len() < want && (!pad || picked.is_empty()) {
                    // Not enough for a mini-unit. Dead entries up to `n` are dropped now when no
                    // run of this batch still refers to the buffer before them.
                    if picked.is_empty() {
                        c.wbuf.taken = n;
                        if runs.is_empty() {
                            c.wbuf.retire_to(n);
                        }
                    }
                    break;
                }
                c.wbuf.taken = n;
                if pos == 0 {
                    items.push(Src::Head);
                    c.bands[id as usize].state = BandState::Open;
                }
                items.extend(picked.iter().map(|&e| Src::Entry(e)));
                while (items.len() as u64) < geo.ws_min {
                    items.push(Src::Pad);
                }
            }
            // Record LBAs for the tail.
            let b = &mut c.bands[id as usize];
            for (k, it) in items.iter().enumerate() {
                let p = pos + k as u64;
                let lba = match *it {
                    Src::Entry(e) => c.wbuf.get(e).map_or(LBA_PAD, |en| en.lba),
                    Src::Head => LBA_HEAD,
                    Src::Tail(_) => LBA_TAIL,
                    Src::Pad => LBA_PAD,
                };
                if let Some((i, lbk)) = b.locate(geo, p) {
                    let off = (i as u64 * geo.clba + lbk) as usize;
                    if let Some(slot) = b.lba_map.get_mut(off) {
                        *slot = lba;
                    }
                }
            }
            b.next_pos += geo.ws_min;
            if pos + geo.ws_min >= data_end && pos < data_end {
                b.state = BandState::Full;
            }
            used_chunks |= 1 << chunk;
            if continues {
                if let Some(r) = runs.last_mut() {
                    r.items.extend(items);
                }
            } else {
                runs.push(Run { band: id, chunk, first_pos: pos, items });
            }
        }
        runs
    }

    /// Builds the media commands of a batch under the lock: head, tail and OOB bytes now; buffered
    /// entries are listed in the returned fills, copied by [`fill_entries`] once the lock is released.
    fn prepare(&self, c: &Core, runs: &[Run]) -> Prepared {
        let geo = &self.sh.geo;
        let oob_bytes = self.sh.media.info().oob_bytes_per_block as usize;
        let mut runs_out = Vec::with_capacity(runs.len());
        let mut fills = Vec::new();
        for (ri, r) in runs.iter().enumerate() {
            let b = &c.bands[r.band as usize];
            let n = r.items.len();
            let mut data = vec![0u8; n * BLOCK_BYTES];
            let mut oob = vec![0u8; n * oob_bytes];
            for (k, it) in r.items.iter().enumerate() {
                let d = &mut data[k * BLOCK_BYTES..(k + 1) * BLOCK_BYTES];
                let lba = match *it {
                    Src::Entry(e) => match c.wbuf.get(e) {
                        Some(en) => {
                            // Copied after the core lock is released (see `fill_entries`).
                            fills.push((ri, k, e));
                            en.lba
                        }
                        None => LBA_PAD,
                    },
                    Src::Head => {
                        let h = layout::BandHead {
                            uuid: self.sh.uuid,
                            band: r.band,
                            base_seq: b.base_seq,
                            good_mask: b.good_mask(),
                        };
                        d.copy_from_slice(&h.encode());
                        LBA_HEAD
                    }
                    Src::Tail(i) => {
                        if let Some((_, t)) = self.tail_cache.as_ref().filter(|t| t.0 == r.band) {
                            if let Some(s) = t.get(i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES) {
                                d.copy_from_slice(s);
                            }
                        }
                        LBA_TAIL
                    }
                    Src::Pad => LBA_PAD,
                };
                let seq = b.base_seq + r.first_pos + k as u64;
                layout::encode_oob(lba, seq, &mut oob[k * oob_bytes..(k + 1) * oob_bytes]);
            }
            let first = b.ppa(geo, r.first_pos).unwrap_or_default();
            match PpaList::contiguous(first, n) {
                Ok(ppas) => runs_out.push(PreparedRun { ri, ppas, data, oob }),
                Err(e) => log::error!("ftl: bad run at {first}: {e}"),
            }
        }
        Prepared { runs: runs_out, fills, slots: Arc::clone(c.wbuf.data()) }
    }

    /// Submits every command (one per chunk) and collects per-run failure bitmaps.
    fn write_runs(&self, qp: &mut dyn QueuePair, ops: Vec<(Op, usize)>) -> Vec<(usize, u64)> {
        let total = ops.len();
        let mut results = Vec::with_capacity(total);
        let mut pending: VecDeque<(Op, usize)> = ops.into();
        let mut done = Vec::new();
        let mut in_flight = 0usize;
        while results.len() < total {
            while let Some((op, ri)) = pending.pop_front() {
                match qp.submit(Command { tag: ri as u64, op }) {
                    Ok(()) => in_flight += 1,
                    Err(r) => {
                        pending.push_front((r.command.op, ri));
                        break;
                    }
                }
            }
            done.clear();
            if qp.poll(&mut done, usize::MAX) == 0 && in_flight > 0 {
                std::thread::yield_now();
            }
            for d in done.drain(..) {
                in_flight -= 1;
                let failed = if d.status.is_success() {
                    0
                } else {
                    d.failed.0 | (u64::from(d.failed.0 == 0) * u64::MAX)
                };
                results.push((d.tag as usize, failed));
            }
        }
        results
    }

    /// Applies a written batch: L2P to media, valid bits; failed blocks go back to the buffer and
    /// their chunk is retired.
    fn commit(&mut self, c: &mut Core, runs: &[Run], results: &[(usize, u64)]) {
        let sh = Arc::clone(&self.sh);
        let geo = &sh.geo;
        let mut failed_of = vec![0u64; runs.len()];
        for &(ri, f) in results {
            if let Some(x) = failed_of.get_mut(ri) {
                *x = f;
            }
        }
        let mut requeue: Vec<(u64, Origin, Vec<u8>)> = Vec::new();
        let mut media_blocks = 0u64;
        for (ri, r) in runs.iter().enumerate() {
            let failed = failed_of[ri];
            if failed != 0 {
                let band = &mut c.bands[r.band as usize];
                if let Some((i, _)) = band.locate(geo, r.first_pos) {
                    if band.retired & (1 << i) == 0 {
                        band.retired |= 1 << i;
                        sh.stats.retired_chunks.fetch_add(1, Ordering::Relaxed);
                        log::warn!(
                            "ftl '{}': write failed on band {} chunk {i}: chunk retired",
                            sh.cfg.name,
                            r.band
                        );
                    }
                }
                sh.stats.write_failures.fetch_add(1, Ordering::Relaxed);
                if r.items.iter().any(|it| matches!(it, Src::Tail(_))) {
                    band.has_tail = false;
                }
            }
            for (k, it) in r.items.iter().enumerate() {
                let ok = k >= 64 || failed & (1 << k) == 0;
                if ok {
                    media_blocks += 1;
                }
                let Src::Entry(n) = *it else { continue };
                let Some(en) = c.wbuf.get(n) else { continue };
                let (lba, origin, live) = (en.lba, en.origin, en.live);
                let pos = r.first_pos + k as u64;
                let band = &mut c.bands[r.band as usize];
                let Some(addr) = band.addr(geo, pos) else { continue };
                if ok {
                    band.written += 1;
                    if let (Origin::Reloc(src), true) = (origin, live) {
                        let s = &mut c.bands[src as usize];
                        s.reloc_pending = s.reloc_pending.saturating_sub(1);
                    }
                    if live && sh.l2p.get(lba) == Loc::Cache(n) {
                        sh.l2p.swap(lba, Loc::Media(addr));
                        if set_bit(&mut c.valid, addr) {
                            c.bands[r.band as usize].valid += 1;
                        }
                    }
                } else {
                    let band = &mut c.bands[r.band as usize];
                    let off = addr % geo.max_positions;
                    if let Some(slot) = band.lba_map.get_mut(off as usize) {
                        *slot = LBA_PAD;
                    }
                    if live && sh.l2p.get(lba) == Loc::Cache(n) {
                        // Keep the L2P on the old entry until re-queued below.
                        requeue.push((lba, origin, c.wbuf.data().at(n).to_vec()));
                    }
                }
            }
        }
        // Retire everything taken (this batch's entries and the dead ones skipped before them).
        let upto = c.wbuf.taken;
        let old_entries: Vec<(u64, u64)> = requeue
            .iter()
            .filter_map(|(lba, _, _)| match sh.l2p.get(*lba) {
                Loc::Cache(n) => Some((*lba, n)),
                _ => None,
            })
            .collect();
        c.wbuf.retire_to(upto);
        for ((lba, origin, bytes), (_, _old)) in requeue.into_iter().zip(old_entries) {
            if c.wbuf.free() == 0 {
                log::error!(
                    "ftl '{}': no buffer space to rewrite lba {lba} after a write failure",
                    sh.cfg.name
                );
                continue;
            }
            let n = c.wbuf.push(lba, origin, |d| d.copy_from_slice(&bytes));
            sh.l2p.swap(lba, Loc::Cache(n));
            c.nv_requeue_mark = n + 1;
        }
        c.unflushed = true;
        sh.stats.media_write_blocks.fetch_add(media_blocks, Ordering::Relaxed);
    }

    /// One relocation step: picks victims by merit, moves up to `reloc-qdepth` valid blocks into
    /// the write buffer. Returns true if it did something.
    fn relocate(&mut self, qp: &mut dyn QueuePair) -> Result<bool, FtlError> {
        let sh = Arc::clone(&self.sh);
        let geo = &sh.geo;
        let mut c = lock(&sh.core);
        let free = Shared::free_bands(&c);
        let start = sh.limits[3].thld;
        let crit = c.level == Some(0);
        // Finished victims become free.
        let mut still = Vec::new();
        for (id, cur) in std::mem::take(&mut c.relocs) {
            let b = &mut c.bands[id as usize];
            if b.valid == 0 {
                b.state = BandState::Free;
                b.dirty = true;
                b.written = 0;
            } else {
                still.push((id, cur));
            }
        }
        c.relocs = still;
        if free > start && c.relocs.is_empty() {
            return Ok(false);
        }
        if c.relocs.len() < sh.cfg.reloc_bands as usize && free <= start {
            let now = c.next_seq;
            let thld = sh.cfg.invalid_thld;
            let best = c
                .bands
                .iter()
                .filter(|b| b.state == BandState::Closed && b.written > 0 && Some(b.id) != c.open)
                .filter(|b| !c.relocs.iter().any(|(id, _)| *id == b.id))
                .filter(|b| crit || b.invalid() * 100 > b.written * u64::from(thld))
                .max_by(|a, b| {
                    let m = |x: &Band| {
                        (x.invalid() as f64) / (x.valid as f64 + 1.0)
                            * (now.saturating_sub(x.base_seq) as f64 + 1.0)
                    };
                    m(a).partial_cmp(&m(b)).unwrap_or(std::cmp::Ordering::Equal)
                })
                .map(|b| b.id);
            if let Some(id) = best {
                c.relocs.push((id, 0));
                sh.stats.relocated_bands.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(&(victim, cursor)) = c.relocs.first() else { return Ok(false) };
        let room = c.wbuf.free().min(sh.cfg.reloc_qdepth as usize).min(64);
        if room == 0 {
            return Ok(false);
        }
        // Collect valid addresses from the cursor.
        let base = u64::from(victim) * geo.max_positions;
        let mut addrs = Vec::with_capacity(room);
        let mut cur = cursor;
        while cur < geo.max_positions && addrs.len() < room {
            if test_bit(&c.valid, base + cur) {
                addrs.push(base + cur);
            }
            cur += 1;
        }
        if let Some(r) = c.relocs.first_mut() {
            r.1 = cur;
        }
        if addrs.is_empty() {
            if cur >= geo.max_positions {
                // Blocks skipped earlier (no buffer room) are behind the cursor: rescan from the start.
                let left = (0..geo.max_positions).filter(|o| test_bit(&c.valid, base + o)).count() as u64;
                let b = &mut c.bands[victim as usize];
                if left != b.valid {
                    log::warn!(
                        "ftl '{}': band {victim} valid count {} but {left} valid bits",
                        sh.cfg.name,
                        b.valid
                    );
                    b.valid = left;
                }
                if let Some(r) = c.relocs.first_mut() {
                    r.1 = 0;
                }
            }
            return Ok(true);
        }
        drop(c);
        let oob_bytes = sh.media.info().oob_bytes_per_block as usize;
        let n = addrs.len();
        let ppas: Vec<_> = addrs.iter().map(|a| geo.ppa_of(*a)).collect();
        let list = PpaList::new(ppas).map_err(|e| FtlError::Media(e.to_string()))?;
        let done = md::exec(
            qp,
            Op::Read {
                ppas: list,
                data: SgList::from(vec![0u8; n * BLOCK_BYTES]),
                oob: Some(IoBuf::zeroed(n * oob_bytes)),
            },
        );
        let data = done.buffers.data.map(|d| d.to_vec()).unwrap_or_default();
        let oob = done.buffers.oob.map(|o| o.as_slice().to_vec()).unwrap_or_default();
        let mut c = lock(&sh.core);
        let mut moved = 0u64;
        let mut read_failed = false;
        for (k, &addr) in addrs.iter().enumerate() {
            if !done.status.is_success() && (k >= 64 || done.failed.0 & (1 << k) != 0) {
                sh.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "ftl '{}': relocation read of {} failed: {}",
                    sh.cfg.name,
                    geo.ppa_of(addr),
                    done.status
                );
                // The block stays where it is; stop relocating this band.
                c.relocs.retain(|(id, _)| *id != victim);
                read_failed = true;
                continue;
            }
            let (lba, _) = layout::decode_oob(oob.get(k * oob_bytes..(k + 1) * oob_bytes).unwrap_or(&[]));
            if sh.l2p.get(lba) != Loc::Media(addr) {
                continue;
            }
            if c.wbuf.free() == 0 {
                // No room after all (users wrote meanwhile): resume from this block next time.
                if let Some(r) = c.relocs.iter_mut().find(|r| r.0 == victim) {
                    r.1 = r.1.min(addr - base);
                }
                break;
            }
            let src = &data[k * BLOCK_BYTES..(k + 1) * BLOCK_BYTES];
            let e = c.wbuf.push(lba, Origin::Reloc(victim), |d| d.copy_from_slice(src));
            sh.l2p.swap(lba, Loc::Cache(e));
            if clear_bit(&mut c.valid, addr) {
                let b = &mut c.bands[victim as usize];
                b.valid = b.valid.saturating_sub(1);
            }
            c.bands[victim as usize].reloc_pending += 1;
            moved += 1;
        }
        if read_failed {
            // No longer a candidate by invalid share (counted once the blocks read with the failed
            // one are moved too, or it would be picked again for the block it cannot read).
            if let Some(b) = c.bands.get_mut(victim as usize) {
                b.written = b.valid;
            }
        }
        sh.stats.relocated_blocks.fetch_add(moved, Ordering::Relaxed);
        Ok(true)
    }

    /// After a media flush that made every entry below `durable_entry` durable: reclaims the
    /// nv-cache records they cover (persisting the new `durable_seq` first) and flushes the
    /// nv-cache. No-op without an nv-cache.
    fn nv_reclaim(&mut self, durable_entry: u64) -> Result<(), FtlError> {
        let Some(nv) = self.sh.nv.get().cloned() else { return Ok(()) };
        let took = {
            let mut c = lock(&self.sh.core);
            let mark = c.nv_requeue_mark;
            match c.nv.as_mut() {
                Some(r) if durable_entry >= mark => r.take_durable(durable_entry),
                _ => None,
            }
        };
        if self.nv_ch.is_none() {
            let ch = nv.desc.channel().map_err(|e| FtlError::Media(format!("nv-cache {}: {e}", nv.name)))?;
            self.nv_ch = Some(ch);
        }
        let Some(ch) = self.nv_ch.as_mut() else { return Ok(()) };
        match took {
            Some((durable_seq, tail_u)) => {
                super::nvcache::persist_super(&nv, ch, durable_seq, false)?;
                if let Some(r) = lock(&self.sh.core).nv.as_mut() {
                    r.tail_u = tail_u;
                }
                self.sh.signal_space();
            }
            None => {
                super::nvcache::sync_io(
                    ch,
                    crate::bdev::BdevIo::no_data(crate::bdev::IoKind::Flush, 0, 0, 0),
                )
                .map_err(|e| FtlError::Media(format!("nv-cache {}: flush: {e}", nv.name)))?;
            }
        }
        Ok(())
    }

    /// Persists a checkpoint; the buffer must be empty (the gate closed) so the L2P holds only
    /// media addresses.
    pub fn checkpoint(&mut self, qp: &mut dyn QueuePair, clean: bool) -> Result<(), FtlError> {
        let ckpt = snapshot(&self.sh, clean)?;
        persist(&self.sh, qp, &ckpt)?;
        let mut c = lock(&self.sh.core);
        c.generation = ckpt.sb.generation;
        c.ckpt_seq = ckpt.sb.ckpt_seq;
        Ok(())
    }
}

/// Takes a checkpoint of the current state (under the lock).
pub fn snapshot(sh: &Shared, clean: bool) -> Result<Checkpoint, FtlError> {
    let mut c = lock(&sh.core);
    // Entries not taken yet (head <= taken <= tail: the buffer is not empty either).
    if c.wbuf.taken != c.wbuf.tail {
        return Err(FtlError::Media("checkpoint with buffered data".into()));
    }
    let l2p: Vec<u64> = sh
        .l2p
        .values()
        .into_iter()
        .map(|v| match Loc::from_raw(v) {
            Loc::Media(a) => a,
            _ => UNMAPPED,
        })
        .collect();
    let mut trim = vec![0u64; (sh.num_lbas as usize).div_ceil(64)];
    for (i, v) in l2p.iter().enumerate() {
        if *v == UNMAPPED {
            set_bit(&mut trim, i as u64);
        }
    }
    // A band open now continues after the checkpoint; bands below next_seq are all reflected.
    let ckpt_seq = match c.open {
        Some(o) => {
            let b = &c.bands[o as usize];
            b.base_seq + b.next_pos
        }
        None => c.next_seq,
    };
    c.generation += 1;
    let bands = c
        .bands
        .iter()
        .map(|b| layout::BandRecord {
            state: b.state.code(),
            base_seq: b.base_seq,
            retired: b.retired,
            erase_count: b.erase_count,
        })
        .collect();
    let sb = layout::Superblock {
        uuid: sh.uuid,
        pu_begin: sh.cfg.pu_begin,
        pu_end: sh.cfg.pu_begin + sh.geo.pus.len() as u32 - 1,
        num_lbas: sh.num_lbas,
        num_bands: sh.geo.num_bands,
        md_bands: sh.geo.md_bands,
        mirror: false,
        clean,
        ckpt_seq,
        generation: c.generation,
        l2p_entry_bytes: sh.l2p_entry_bytes,
        lba_rsvd: sh.cfg.lba_rsvd,
        region_offsets: [0; 5],
    };
    Ok(Checkpoint { sb, bands, l2p, valid: c.valid.clone(), trim })
}

/// Writes a checkpoint: mirror first, then primary.
pub fn persist(sh: &Shared, qp: &mut dyn QueuePair, ckpt: &Checkpoint) -> Result<(), FtlError> {
    let t = Instant::now();
    let k = sh.geo.md_bands;
    let mirror = ckpt.encode(true);
    let n1 = md::write_area(sh.media.as_ref(), qp, &sh.geo, k, k, &mirror, ckpt.sb.generation)?;
    let primary = ckpt.encode(false);
    let n2 = md::write_area(sh.media.as_ref(), qp, &sh.geo, 0, k, &primary, ckpt.sb.generation)?;
    sh.stats.media_write_blocks.fetch_add(n1 + n2, Ordering::Relaxed);
    sh.stats.md_write_blocks.fetch_add(n1 + n2, Ordering::Relaxed);
    sh.ckpt_count.fetch_add(1, Ordering::Relaxed);
    log::debug!(
        "ftl '{}': checkpoint {} ({} blocks, clean={}) in {:?}",
        sh.cfg.name,
        ckpt.sb.generation,
        n1 + n2,
        ckpt.sb.clean,
        t.elapsed()
    );
    Ok(())
}

/// A flush request for the core.
pub fn new_flush(mailbox: Arc<Mailbox>, tag: u64, upto: u64) -> FlushReq {
    FlushReq { mailbox, tag, upto }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
