//! The owner thread of a cache instance: metadata writer, cleaner (alru / acp / nop) and flush.
//!
//! ```text
//!  requests (Persist, Flush, CoreAttached, Shutdown) + eventfd ─┐
//!  timer (epoll timeout: alru wake-up, acp 10 ms, lazy records) ─┼─► loop:
//!                                                               │   metadata round: snapshot every line marked
//!                                                               │     for persisting into the page image, write
//!                                                               │     the touched pages, answer the waiters
//!                                                               │   clean round: lock ≤ batch dirty lines, read
//!                                                               │     them from the cache device, soften the locks
//!                                                               │     (note each line's write generation), write
//!                                                               │     the dirty runs to the core, flush the core,
//!                                                               │     clear the dirty bits of lines not rewritten
//!                                                               │     since, unlock
//!                                                               └   flush jobs: lines dirty at the request, cleaned
//! ```
//!
//! # Design
//! * Group commit: at most one metadata round in flight, so a page is never written twice at once
//!   and records never go backwards; requests that arrive during a round join the next one.
//! * Cleaning works in rounds of at most `clean_batch` lines. A round locks its lines exclusively
//!   only while it reads them from the cache device; for its write-back to the core it holds soft
//!   locks, which stop only requests that may write the core (wt/wa/pt/wi writes, unmap, cut-off
//!   writes: their core write would race the round's older copy). Reads and write-back writes go
//!   ahead; a line written meanwhile has a new write generation (`LineMap::wgen`) and stays dirty
//!   (the next round writes the newer data). So guest I/O on a line being cleaned waits for at
//!   most one batch, and write-back writes only for its read from the cache device.
//!   Flush jobs come first (oldest first), then the policy: `alru` cleans lines dirty for
//!   `alru_stale_ms`, every `alru_wake_ms` (at once again while batches come back full); `acp`
//!   cleans the oldest dirty lines every 10 ms; `nop` never cleans in the background. A write that
//!   found no clean line to evict sets `pressure`, which runs a batch now (except with `nop`).
//! * A flush job snapshots the keys dirty when it arrives, so a steady stream of new writes cannot
//!   starve it; it ends with a flush of the core. A key is done for the job once a round that
//!   *started after the job arrived* wrote it back, even if the line was rewritten since (that
//!   round read every write acknowledged before the flush), or once an earlier round cleaned it.
//! * Shutdown waits for rounds in flight, rewrites every record, flushes the cache device and marks
//!   the superblock clean.
//!
//! # Limitations
//! Choosing lines scans the whole map (fine for the map sizes a cache device gives at 4 KiB lines
//! and up: a 1 GiB cache has 256 Ki lines; a scan is well under a millisecond).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::bdev::waitset::{epoll_add, epoll_set};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::engine::NEXT_OWNER;
use super::map::Key;
use super::{layout, lock, rlock, wlock, CleanerPolicy, Mailbox, OwnerReq, Shared};
use crate::bdev::{BdevIo, Channel, Completion, IoError, IoKind, IoVecs};
use crate::tagmap::TagMap;

enum Purpose {
    Md,
    CleanRead,
    CleanWrite,
    CleanFlush,
    JobFlush(u64),
    CacheFlush,
}

struct MdRound {
    pending: usize,
    error: Option<IoError>,
    snaps: Vec<(u32, u128, u64)>,
    waiters: Vec<(Arc<Mailbox>, u64)>,
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum CleanStage {
    Read,
    Write,
    Flush,
}

struct CleanLine {
    slot: u32,
    key: Key,
    dirty: u128,
    first: u64,
    buf: IoVecs,
    /// The line's write generation when it was read from the cache device.
    wgen: u64,
}

struct CleanRound {
    /// Rounds started before this one (flush jobs compare it with their `after_round`).
    no: u64,
    owner: u64,
    lines: Vec<CleanLine>,
    stage: CleanStage,
    pending: usize,
    error: Option<IoError>,
}

struct FlushJob {
    id: u64,
    /// Rounds started before the job arrived: a round numbered from here on read every write the
    /// flush must make durable.
    after_round: u64,
    core: Option<u16>,
    remaining: HashSet<Key>,
    total: usize,
    mb: Arc<Mailbox>,
    token: u64,
    flushing: usize,
    error: Option<IoError>,
    started: Instant,
    last_log: Instant,
}

struct Owner {
    sh: Arc<Shared>,
    image: Vec<u8>,
    cache_ch: Channel,
    cores: HashMap<u16, (Channel, u32)>,
    epfd: OwnedFd,
    tags: TagMap<Purpose>,
    next_tag: u64,
    md_waiting: Vec<(Arc<Mailbox>, u64)>,
    md: Option<MdRound>,
    last_md: Instant,
    clean: Option<CleanRound>,
    /// Cleaning rounds started so far.
    rounds: u64,
    jobs: Vec<FlushJob>,
    next_clean_ms: u64,
    shutdown: Option<(Arc<Mailbox>, u64)>,
    final_md_done: bool,
    final_flush: Option<FinalFlush>,
    dead: bool,
}

/// `Instant::now()` for a flush's progress and duration log lines; in tests, while the test clock
/// (`Shared::frozen_ms`) is set, that time as an `Instant`, so a test can step past the
/// once-a-second progress line.
fn log_now(sh: &Shared) -> Instant {
    #[cfg(test)]
    {
        let f = sh.frozen_ms.load(Ordering::Acquire);
        if f != u64::MAX {
            return sh.start + Duration::from_millis(f);
        }
    }
    #[cfg(not(test))]
    let _ = sh;
    Instant::now()
}

/// Runs the owner loop until shutdown.
pub(crate) fn run(sh: Arc<Shared>, image: Vec<u8>) {
    let cache_ch = match sh.cache_desc.channel() {
        Ok(c) => c,
        Err(e) => {
            log::error!("cache '{}': owner thread cannot open the cache device: {e}", sh.cache_name);
            return;
        }
    };
    let epfd = match epoll_set([]) {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("cache '{}': epoll_create1: {e}", sh.cache_name);
            return;
        }
    };
    let mut o = Owner {
        image,
        cache_ch,
        cores: HashMap::new(),
        epfd,
        tags: TagMap::default(),
        next_tag: 0,
        md_waiting: Vec::new(),
        md: None,
        last_md: Instant::now(),
        clean: None,
        rounds: 0,
        jobs: Vec::new(),
        next_clean_ms: if sh.cleaner == CleanerPolicy::Alru { sh.alru_wake_ms } else { 0 },
        shutdown: None,
        final_md_done: false,
        final_flush: None,
        dead: false,
        sh,
    };
    o.watch(o.sh.owner_efd.as_raw_fd());
    if let Some(fd) = o.cache_ch.wait_fd() {
        o.watch(fd);
    }
    o.main_loop();
}

impl Owner {
    fn watch(&self, fd: RawFd) {
        // The watched fd lives as long as the channel we keep. A failure is ignored, as before: the
        // owner loop also wakes on its timer.
        let _ = epoll_add(&self.epfd, fd);
    }

    fn tag(&mut self, p: Purpose) -> u64 {
        self.next_tag = self.next_tag.wrapping_add(1);
        self.tags.insert(self.next_tag, p);
        self.next_tag
    }

    fn attached(&self, core: u16) -> bool {
        self.cores.contains_key(&core)
            && lock(&self.sh.cores).get(&core).is_some_and(|c| !c.removed.load(Ordering::Acquire))
    }

    fn main_loop(&mut self) {
        loop {
            let mut progress = self.take_requests();
            if self.dead {
                return;
            }
            progress |= self.poll_channels();
            if self.md.is_none() {
                progress |= self.start_md();
            }
            if self.clean.is_none() {
                progress |= self.start_clean();
            }
            progress |= self.check_jobs();
            if self.shutdown.is_some() && self.try_finish() {
                return;
            }
            if !progress {
                self.sleep();
            }
        }
    }

    fn sleep(&mut self) {
        let busy = self.md.is_some() || self.clean.is_some() || !self.jobs.is_empty();
        let now = self.sh.now_ms();
        let timeout: i32 = if busy {
            20
        } else if !rlock(&self.sh.map).md_pending.is_empty() {
            100
        } else {
            match self.sh.cleaner {
                CleanerPolicy::Acp => self.next_clean_ms.saturating_sub(now).clamp(1, 10) as i32,
                CleanerPolicy::Alru => self.next_clean_ms.saturating_sub(now).clamp(1, 1000) as i32,
                CleanerPolicy::Nop => 1000,
            }
        };
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: valid epoll fd and a buffer of 8 events.
        unsafe { libc::epoll_wait(self.epfd.as_raw_fd(), evs.as_mut_ptr(), 8, timeout) };
        let _ = self.sh.owner_efd.read();
    }

    fn take_requests(&mut self) -> bool {
        let reqs: Vec<OwnerReq> = lock(&self.sh.requests).drain(..).collect();
        let any = !reqs.is_empty();
        for r in reqs {
            match r {
                OwnerReq::Persist(mb, t) => self.md_waiting.push((mb, t)),
                OwnerReq::Flush(core, mb, t) => self.new_job(core, mb, t),
                OwnerReq::CoreAttached(id) => {
                    let desc = lock(&self.sh.cores).get(&id).map(|c| (c.desc.clone(), c.block_size));
                    if let Some((d, bs)) = desc {
                        match d.channel() {
                            Ok(ch) => {
                                if let Some(fd) = ch.wait_fd() {
                                    self.watch(fd);
                                }
                                self.cores.insert(id, (ch, bs));
                            }
                            Err(e) => {
                                log::error!("cache '{}': channel on core id {id}: {e}", self.sh.cache_name)
                            }
                        }
                    }
                }
                OwnerReq::Shutdown(mb, t) if self.sh.simulate_crash.load(Ordering::Acquire) => {
                    // Tests: die like `kill -9` (no final records, no clean superblock).
                    self.sh.stopped.store(true, Ordering::Release);
                    mb.post(t, Ok(()));
                    self.dead = true;
                }
                OwnerReq::Shutdown(mb, t) => self.shutdown = Some((mb, t)),
            }
        }
        // Forget detached cores (their channels hold the core bdev alive).
        let live: HashSet<u16> = lock(&self.sh.cores).keys().copied().collect();
        if self.clean.is_none() && self.jobs.iter().all(|j| j.flushing == 0) {
            self.cores.retain(|id, _| live.contains(id));
        }
        any
    }

    fn new_job(&mut self, core: Option<u16>, mb: Arc<Mailbox>, token: u64) {
        let map = rlock(&self.sh.map);
        let remaining: HashSet<Key> = map
            .lines
            .iter()
            .filter_map(|l| l.key().filter(|k| l.dirty != 0 && core.map_or(true, |c| c == k.0)))
            .collect();
        drop(map);
        let remaining: HashSet<Key> = remaining.into_iter().filter(|k| self.attached(k.0)).collect();
        if remaining.len() > 1000 {
            log::info!("cache '{}': flush: cleaning {} dirty lines", self.sh.cache_name, remaining.len());
        }
        let now = log_now(&self.sh);
        self.jobs.push(FlushJob {
            id: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            after_round: self.rounds,
            core,
            total: remaining.len(),
            remaining,
            mb,
            token,
            flushing: 0,
            error: None,
            started: now,
            last_log: now,
        });
    }

    fn poll_channels(&mut self) -> bool {
        let mut done: Vec<Completion> = Vec::new();
        self.cache_ch.poll(&mut done);
        for (ch, _) in self.cores.values_mut() {
            ch.poll(&mut done);
        }
        let any = !done.is_empty();
        for c in done {
            let Some(p) = self.tags.remove(&c.tag) else { continue };
            match p {
                Purpose::Md => self.md_done(c.result),
                Purpose::CleanRead | Purpose::CleanWrite | Purpose::CleanFlush => self.clean_done(c.result),
                Purpose::JobFlush(id) => self.job_flush_done(id, c.result),
                Purpose::CacheFlush => self.final_flush = Some(FinalFlush::Done(c.result.is_ok())),
            }
        }
        any
    }

    // ---- metadata rounds ----

    fn start_md(&mut self) -> bool {
        let lazy_due = self.last_md.elapsed() > Duration::from_millis(self.sh.md_lazy_ms);
        let final_round =
            self.shutdown.is_some() && self.clean.is_none() && self.jobs.is_empty() && !self.final_md_done;
        let sh = self.sh.clone();
        let mut map = wlock(&sh.map);
        let lazy = lazy_due && !map.md_pending.is_empty() && !sh.cache_removed.load(Ordering::Acquire);
        if self.md_waiting.is_empty() && !final_round && !lazy {
            return false;
        }
        if final_round {
            for i in 0..sh.num_lines {
                map.mark_md(i);
            }
            self.final_md_done = true;
        }
        let pending = std::mem::take(&mut map.md_pending);
        let mut pages = BTreeSet::new();
        let mut snaps = Vec::with_capacity(pending.len());
        for i in pending {
            let l = &mut map.lines[i as usize];
            l.md_dirty = false;
            l.seq += 1;
            let (core_id, core_line) = l.key().unwrap_or((0, 0));
            let rec = layout::LineRecord {
                seq: l.seq,
                used: l.key().is_some(),
                core_id,
                core_line,
                valid: l.valid(),
                dirty: l.dirty,
            };
            // Until the write completes the device holds the old or the new record.
            l.disk_dirty |= l.dirty;
            l.disk_sure &= l.dirty;
            snaps.push((i, l.dirty, l.seq));
            let page = i / layout::LINES_PER_PAGE;
            let base = page as usize * layout::PAGE_BYTES as usize;
            layout::put_record(
                &mut self.image[base..base + layout::PAGE_BYTES as usize],
                i % layout::LINES_PER_PAGE,
                &rec,
            );
            pages.insert(page);
        }
        drop(map);
        self.last_md = Instant::now();
        let waiters = std::mem::take(&mut self.md_waiting);
        let cbs = u64::from(sh.cache_block);
        sh.md_rounds.fetch_add(1, Ordering::Relaxed);
        sh.md_pages.fetch_add(pages.len() as u64, Ordering::Relaxed);
        sh.md_waiters.fetch_add(waiters.len() as u64, Ordering::Relaxed);
        let mut round = MdRound { pending: 0, error: None, snaps, waiters };
        for p in pages {
            let base = p as usize * layout::PAGE_BYTES as usize;
            let buf = IoVecs::from_slice(&self.image[base..base + layout::PAGE_BYTES as usize]);
            let t = self.tag(Purpose::Md);
            self.cache_ch.submit(BdevIo::write(
                layout::page_offset(p) / cbs,
                layout::PAGE_BYTES / cbs,
                buf,
                t,
            ));
            round.pending += 1;
        }
        self.md = Some(round);
        if self.md.as_ref().is_some_and(|r| r.pending == 0) {
            self.finish_md();
        }
        true
    }

    fn md_done(&mut self, r: Result<(), IoError>) {
        let Some(round) = self.md.as_mut() else { return };
        if let Err(e) = r {
            round.error.get_or_insert(e);
        }
        round.pending -= 1;
        if round.pending == 0 {
            self.finish_md();
        }
    }

    fn finish_md(&mut self) {
        let Some(round) = self.md.take() else { return };
        let res = match round.error {
            Some(e) => {
                log::error!("cache '{}': metadata write failed: {e}", self.sh.cache_name);
                Err(e)
            }
            None => Ok(()),
        };
        if res.is_ok() {
            let mut map = wlock(&self.sh.map);
            for (i, d, seq) in round.snaps {
                if map.lines[i as usize].seq == seq {
                    map.lines[i as usize].disk_dirty = d;
                    map.lines[i as usize].disk_sure = d;
                    map.drop_if_empty(i);
                }
            }
        }
        for (mb, t) in round.waiters {
            mb.post(t, res);
        }
    }

    // ---- cleaning ----

    fn start_clean(&mut self) -> bool {
        if self.sh.cache_removed.load(Ordering::Acquire) {
            return false;
        }
        let now = self.sh.now_ms();
        let batch = self.sh.clean_batch as usize;
        let sh = self.sh.clone();
        let attached: HashSet<u16> = self.cores.keys().copied().filter(|c| self.attached(*c)).collect();
        let is_attached = |c: u16| attached.contains(&c);
        let mut map = wlock(&sh.map);
        // Flush jobs first.
        let mut pick: Vec<u32> = Vec::new();
        for j in &self.jobs {
            for k in &j.remaining {
                if pick.len() >= batch {
                    break;
                }
                if let Some(s) = map.lookup(*k) {
                    if !map.is_locked(*k) && !pick.contains(&s) {
                        pick.push(s);
                    }
                }
            }
        }
        if pick.is_empty() && self.shutdown.is_none() {
            let pressure = sh.pressure.swap(false, Ordering::AcqRel) && sh.cleaner != CleanerPolicy::Nop;
            if pressure {
                pick = map.dirty_lines(None, &is_attached, batch);
            } else {
                match sh.cleaner {
                    CleanerPolicy::Nop => {}
                    CleanerPolicy::Acp if now >= self.next_clean_ms => {
                        pick = map.dirty_lines(None, &is_attached, batch);
                        // Full batches back to back; otherwise every 10 ms.
                        self.next_clean_ms = if pick.len() == batch { now } else { now + 10 };
                    }
                    CleanerPolicy::Alru if now >= self.next_clean_ms => {
                        // Lines dirty for at least the staleness time: since ≤ now − stale.
                        let before = now.checked_sub(sh.alru_stale_ms).map_or(0, |t| t + 1);
                        pick = map.dirty_older_than(None, &is_attached, batch, before);
                        self.next_clean_ms = if pick.len() == batch { now } else { now + sh.alru_wake_ms };
                    }
                    CleanerPolicy::Acp | CleanerPolicy::Alru => {}
                }
            }
        }
        if pick.is_empty() {
            return false;
        }
        let owner = NEXT_OWNER.fetch_add(1, Ordering::Relaxed);
        // The cleaner retries on its own schedule: its failed try_locks must not clear (or set) the
        // flag that tells lock holders to wake waiting channels.
        let waiters = map.lock_waiters;
        let mut lines = Vec::new();
        for i in pick {
            let l = &map.lines[i as usize];
            let Some(key) = l.key() else { continue };
            let dirty = l.dirty;
            if dirty == 0 || !is_attached(key.0) || !map.try_lock(key.0, key.1, key.1, owner) {
                continue;
            }
            let Some(bs) = self.cores.get(&key.0).map(|c| u64::from(c.1)) else { continue };
            let first = u64::from(dirty.trailing_zeros());
            let last = 127 - u64::from(dirty.leading_zeros());
            let buf = IoVecs::alloc(((last + 1 - first) * bs) as usize);
            lines.push(CleanLine { slot: i, key, dirty, first, buf, wgen: 0 });
        }
        map.lock_waiters = waiters;
        drop(map);
        if lines.is_empty() {
            return false;
        }
        let cbs = u64::from(sh.cache_block);
        let mut round = CleanRound {
            no: self.rounds,
            owner,
            lines: Vec::new(),
            stage: CleanStage::Read,
            pending: 0,
            error: None,
        };
        self.rounds += 1;
        for l in lines {
            let bs = self.cores.get(&l.key.0).map_or(512, |c| u64::from(c.1));
            let off = sh.data_offset + u64::from(l.slot) * u64::from(sh.line_size) + l.first * bs;
            let t = self.tag(Purpose::CleanRead);
            let view = l.buf.slice(0, l.buf.len_bytes());
            if let Some(view) = view {
                self.cache_ch.submit(BdevIo::read(off / cbs, l.buf.len_bytes() / cbs, view, t));
                round.pending += 1;
            }
            round.lines.push(l);
        }
        self.clean = Some(round);
        true
    }

    fn clean_done(&mut self, r: Result<(), IoError>) {
        let Some(round) = self.clean.as_mut() else { return };
        if let Err(e) = r {
            round.error.get_or_insert(e);
        }
        round.pending -= 1;
        if round.pending > 0 {
            return;
        }
        if round.error.is_some() {
            self.finish_clean();
            return;
        }
        match round.stage {
            CleanStage::Read => {
                round.stage = CleanStage::Write;
                // The lines' data is in our buffers: from now on only requests that may write the
                // core wait for this round; a line rewritten meanwhile moves its generation.
                let mut map = wlock(&self.sh.map);
                for l in &mut round.lines {
                    l.wgen = map.wgen(l.slot);
                }
                let wake = map.soften(round.owner);
                drop(map);
                if wake {
                    self.sh.wake_all();
                }
                let mut ios: Vec<(u16, BdevIo)> = Vec::new();
                for l in &round.lines {
                    let bs = self.cores.get(&l.key.0).map_or(512, |c| u64::from(c.1));
                    let lb = u64::from(self.sh.line_size) / bs;
                    let mut s = l.first;
                    while s < 128 {
                        if l.dirty >> s & 1 == 0 {
                            s += 1;
                            continue;
                        }
                        let mut e = s + 1;
                        while e < 128 && l.dirty >> e & 1 == 1 {
                            e += 1;
                        }
                        if let Some(buf) = l.buf.slice((s - l.first) * bs, (e - s) * bs) {
                            ios.push((l.key.0, BdevIo::write(l.key.1 * lb + s, e - s, buf, 0)));
                        }
                        s = e;
                    }
                }
                self.submit_core(ios, Purpose::CleanWrite);
            }
            CleanStage::Write => {
                round.stage = CleanStage::Flush;
                let cores: BTreeSet<u16> = round.lines.iter().map(|l| l.key.0).collect();
                // A core without a volatile cache to flush (no flush support) is durable as written.
                let ios: Vec<(u16, BdevIo)> = cores
                    .into_iter()
                    .filter(|c| self.cores.get(c).is_some_and(|(ch, _)| ch.bdev().info().supports.flush))
                    .map(|c| (c, BdevIo::no_data(IoKind::Flush, 0, 0, 0)))
                    .collect();
                if ios.is_empty() {
                    self.finish_clean();
                } else {
                    self.submit_core(ios, Purpose::CleanFlush);
                }
            }
            CleanStage::Flush => self.finish_clean(),
        }
    }

    fn submit_core(&mut self, ios: Vec<(u16, BdevIo)>, p: Purpose) {
        let mut n = 0;
        for (core, mut io) in ios {
            let t = self.tag(match p {
                Purpose::CleanWrite => Purpose::CleanWrite,
                _ => Purpose::CleanFlush,
            });
            io.tag = t;
            if let Some((ch, _)) = self.cores.get_mut(&core) {
                ch.submit(io);
                n += 1;
            } else {
                self.tags.remove(&t);
            }
        }
        if let Some(r) = self.clean.as_mut() {
            r.pending = n;
            if n == 0 {
                r.pending = 1;
                self.clean_done(Err(IoError::Removed));
            }
        }
    }

    fn finish_clean(&mut self) {
        let Some(round) = self.clean.take() else { return };
        let sh = self.sh.clone();
        let now = sh.now_ms();
        let mut map = wlock(&sh.map);
        // Lines now clean, and lines written back with what they held when the round read them.
        let (mut cleaned, mut written) = (Vec::new(), Vec::new());
        if let Some(e) = round.error {
            log::error!("cache '{}': cleaning failed: {e}; the lines stay dirty", sh.cache_name);
        } else {
            for l in &round.lines {
                if map.lines[l.slot as usize].key() != Some(l.key) {
                    continue;
                }
                map.counters(l.key.0).cleaner_writes += 1;
                written.push(l.key);
                if map.wgen(l.slot) != l.wgen {
                    // Rewritten (or invalidated) since the read: the core may be older than the
                    // cache; the line stays dirty for the next round.
                    continue;
                }
                let line = &map.lines[l.slot as usize];
                let (v, d) = (line.valid(), line.dirty & !l.dirty);
                map.set_bits(l.slot, v, d, now);
                cleaned.push(l.key);
            }
        }
        let wake = map.unlock(round.owner);
        drop(map);
        if wake {
            sh.wake_all();
        }
        for j in &mut self.jobs {
            if let Some(e) = round.error {
                j.error.get_or_insert(e);
                j.remaining.clear();
            }
            // A round that started after the flush arrived read every write acknowledged before
            // it: what it wrote back is what the flush promises, even if rewritten since.
            for k in if round.no >= j.after_round { &written } else { &cleaned } {
                j.remaining.remove(k);
            }
        }
    }

    // ---- flush jobs ----

    fn check_jobs(&mut self) -> bool {
        if self.jobs.is_empty() {
            return false;
        }
        let sh = self.sh.clone();
        {
            // Keys no longer dirty (cleaned by another path, invalidated) or on a detached core are done.
            let map = rlock(&sh.map);
            let attached: HashSet<u16> = self.cores.keys().copied().filter(|c| self.attached(*c)).collect();
            for j in &mut self.jobs {
                j.remaining.retain(|k| {
                    attached.contains(&k.0)
                        && map.lookup(*k).is_some_and(|s| map.lines[s as usize].dirty != 0)
                });
            }
        }
        let mut progress = false;
        if sh.cache_removed.load(Ordering::Acquire) {
            // Dirty data on a removed cache device cannot be written back: the flush fails (the
            // lines were reported when the device went away).
            for j in &mut self.jobs {
                if !j.remaining.is_empty() {
                    j.error.get_or_insert(IoError::Errno(libc::EIO));
                    j.remaining.clear();
                }
            }
        }
        let mut to_flush: Vec<(u64, Vec<u16>)> = Vec::new();
        for j in &mut self.jobs {
            if j.remaining.is_empty() && j.flushing == 0 {
                let cores: Vec<u16> = match j.core {
                    Some(c) => vec![c],
                    None => self.cores.keys().copied().collect(),
                };
                to_flush.push((j.id, cores));
            } else if j.total > 1000
                && log_now(&sh).saturating_duration_since(j.last_log) > Duration::from_secs(1)
            {
                log::info!(
                    "cache '{}': flush: {}/{} dirty lines cleaned ({} s)",
                    sh.cache_name,
                    j.total - j.remaining.len(),
                    j.total,
                    log_now(&sh).saturating_duration_since(j.started).as_secs()
                );
                j.last_log = log_now(&sh);
            }
        }
        for (id, cores) in to_flush {
            let mut n = 0;
            for c in cores {
                let t = self.tag(Purpose::JobFlush(id));
                if let Some((ch, _)) =
                    self.cores.get_mut(&c).filter(|(ch, _)| ch.bdev().info().supports.flush)
                {
                    ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, t));
                    n += 1;
                } else {
                    self.tags.remove(&t);
                }
            }
            progress = true;
            if let Some(j) = self.jobs.iter_mut().find(|j| j.id == id) {
                j.flushing = n;
                if n == 0 {
                    j.flushing = 1;
                    self.job_flush_done(id, Ok(()));
                }
            }
        }
        progress
    }

    fn job_flush_done(&mut self, id: u64, r: Result<(), IoError>) {
        let Some(pos) = self.jobs.iter().position(|j| j.id == id) else { return };
        let j = &mut self.jobs[pos];
        if let Err(e) = r {
            j.error.get_or_insert(e);
        }
        j.flushing -= 1;
        if j.flushing > 0 {
            return;
        }
        let j = self.jobs.remove(pos);
        if j.total > 1000 {
            log::info!(
                "cache '{}': flush: {} lines cleaned in {} ms",
                self.sh.cache_name,
                j.total,
                log_now(&self.sh).saturating_duration_since(j.started).as_millis()
            );
        }
        j.mb.post(j.token, j.error.map_or(Ok(()), Err));
    }

    // ---- shutdown ----

    /// Drives the shutdown sequence; true when the thread may exit.
    fn try_finish(&mut self) -> bool {
        if self.clean.is_some() || !self.jobs.is_empty() || self.md.is_some() || !self.final_md_done {
            return false;
        }
        match self.final_flush {
            None => {
                let t = self.tag(Purpose::CacheFlush);
                self.cache_ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, t));
                self.final_flush = Some(FinalFlush::InFlight);
                false
            }
            Some(FinalFlush::InFlight) => false,
            Some(FinalFlush::Done(ok)) => {
                let res = if ok {
                    self.sh.write_superblock(true).map_err(|e| {
                        log::error!("cache '{}': writing the clean superblock: {e}", self.sh.cache_name);
                        IoError::Errno(libc::EIO)
                    })
                } else {
                    Err(IoError::Errno(libc::EIO))
                };
                if res.is_ok() {
                    log::info!("cache '{}': metadata saved, clean shutdown", self.sh.cache_name);
                }
                // Nobody is served after this: late requests are answered with `Removed`.
                let late: Vec<OwnerReq> = {
                    let mut q = lock(&self.sh.requests);
                    self.sh.stopped.store(true, Ordering::Release);
                    q.drain(..).collect()
                };
                for r in late {
                    super::refuse(r);
                }
                for (mb, t) in self.md_waiting.drain(..) {
                    mb.post(t, Err(IoError::Removed));
                }
                if let Some((mb, t)) = self.shutdown.take() {
                    mb.post(t, res);
                }
                true
            }
        }
    }
}

#[derive(Clone, Copy)]
enum FinalFlush {
    InFlight,
    Done(bool),
}
