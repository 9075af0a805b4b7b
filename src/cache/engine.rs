//! The cache engine: one `CacheChannel` per poller thread, running each request as a small state
//! machine over its own channels on the cache device and the core.
//!
//! ```text
//!  submit ─► all valid? ─yes─► pin lines, read the cache device ─► unpin, complete (no map lock)
//!     │ no
//!     ▼
//!  lock core lines (map) ─► plan per line (hit / miss / partial, mode, cut-off) ─► Data
//!     │ busy: wait in `blocked`                                                              │ children on
//!     ▼                                                                                      ▼ cache + core
//!  Flush ─► owner (clean + core flush) ─► mailbox        Insert (read misses: fill the cache from the data read)
//!                                                             ▼
//!                                          finalize: apply valid/dirty bits ─► Persist? (owner writes the
//!                                          records) ─► unlock, complete
//! ```
//!
//! # Design
//! * Modes (OCF): reads fill the cache in wt, wb, wa and wi; pt and wo read from the core, except
//!   sectors valid in the cache (dirty data always comes from the cache). Writes: wb/wo → cache only
//!   (dirty); wt → core and cache; wa → core, and cache lines already present; pt/wi → core, and
//!   cached sectors are invalidated. Unmap and write_zeroes go to the core and invalidate.
//! * Sequential cut-off: a stream of back-to-back requests on one core that passes the threshold is
//!   handled as pass-through (`always`), or only while the cache has no free line (`full`).
//! * Counters per request: a read is a hit when every sector came from the cache, a miss when none
//!   did, partial otherwise; a write is a hit when every line it touched was cached.
//! * Write-back acknowledgement waits for the record write unless the device *certainly* records
//!   its sectors dirty already (`disk_sure`: while a record write is in flight that is only what
//!   both the old and the new record say); invalidation of sectors that *may* be dirty on the device
//!   (`disk_dirty`) waits too. Record writes are group-committed by the owner thread: every request
//!   that asks while a round is in flight joins the next round (one write per touched page).
//! * When no clean line can be evicted, a wb write goes to the core for that line (never waits for
//!   the cleaner) and the cleaner is told that clean lines are needed.
//! * A read whose every sector is valid (a hit spanning at most `MAX_PINS` lines) takes the fast
//!   path: see `cache/mod.rs`, "Who owns the line map".
//! * A request whose lines are locked (by another request or a cleaning batch) waits in its
//!   channel; later requests on other lines pass it, later ones on the same lines queue behind it
//!   (submission order per line). Reads and write-back writes pass a cleaning batch's write-back
//!   to the core (its soft locks, see `cleaner.rs`); such a write is never cut off to the core.
//!
//! # Limitations
//! Read misses fill exactly the sectors read.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::bdev::waitset::epoll_set;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::map::{Key, LineMap, Slots};
use super::{lock, rlock, wlock, CacheBdev, Mailbox, Mode, OwnerReq, SeqCutoff, SeqState, Shared};
use crate::bdev::stats::bump;
use crate::bdev::{
    BdevError, BdevIo, Channel, Completion, IoError, IoKind, IoVecs, Lane, ModuleChannel, Rejected,
};
use slab::Slab;

/// Lock owner ids of the cleaner and of owner-thread work, unique across the process. They stay
/// below 2^63: a channel's request ids have the top bit set (see [`CacheChannel`]).
pub(crate) static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// Channel numbers: the middle bits of a channel's request ids.
static NEXT_CHANNEL: AtomicU64 = AtomicU64::new(0);

/// The top bit marks a channel's request id; the next 31 bits are the channel number; the low 32
/// bits are the request's slot in the channel's slab.
const CHANNEL_ID_BIT: u64 = 1 << 63;
const SLOT_MASK: u64 = 0xffff_ffff;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    Data,
    Insert,
    Persist,
    Flush,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Act {
    Fill,
    WriteClean,
    WriteDirty,
    Invalidate,
}

#[derive(Debug)]
struct Plan {
    slot: u32,
    key: Key,
    mask: u128,
    act: Act,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dev {
    Cache,
    Core,
}

/// One child I/O: `len` bytes at `buf_off` in the request's memory ↔ `dev_off` (bytes) on `dev`.
#[derive(Debug)]
struct Seg {
    dev: Dev,
    dev_off: u64,
    buf_off: u64,
    len: u64,
}

struct Req {
    /// Lock owner id and mailbox token: channel id | slab slot.
    id: u64,
    /// Generation, in the high bits of the children's tags (a stale child completion is ignored).
    gen: u32,
    tag: u64,
    kind: IoKind,
    off: u64,
    nb: u64,
    bufs: IoVecs,
    pending: usize,
    error: Option<IoError>,
    stage: Stage,
    plans: Vec<Plan>,
    inserts: Vec<Seg>,
    locked: bool,
}

/// A read hit in flight: its lines are pinned (the first `npins` of `pins`) until its children on
/// the cache device complete.
struct Hit {
    tag: u64,
    /// Start stamp of its one read, when that went through the lane (for the cache device's
    /// statistics); `lane_bytes` its size (0: it went through the channel, which counts it).
    start: u64,
    lane_bytes: u32,
    gen: u32,
    /// The index slots it pinned (see `LineMap::pin_if_valid`).
    pins: [u32; MAX_PINS],
    npins: u8,
    pending: u8,
    error: Option<IoError>,
}

/// Tag bit of a read hit's children: bits 32..63 the hit's generation, the low 32 bits its slot.
const HIT_CHILD: u64 = 1 << 63;

/// Lines a read hit may span to take the fast path.
const MAX_PINS: usize = 4;

/// A per-thread channel of a cache bdev.
///
/// Requests in flight live in a slab (no hashing, no allocation once warm). A request's id (its
/// range-lock owner and mailbox token) is the channel's id with the slot in the low 32 bits; a
/// child's tag is the slot with the request's generation in the high 32 bits, so a child's
/// completion finds its request without a map.
pub struct CacheChannel {
    sh: Arc<Shared>,
    core_id: u16,
    bs: u64,
    /// log2(bs) and log2(the cache device's block size) (both powers of two: no division on a hit).
    bs_shift: u32,
    cache_shift: u32,
    lb: u64,
    /// log2(lb): blocks per line is a power of two (line size and block size are).
    lb_shift: u32,
    core_removed: Arc<AtomicBool>,
    /// This channel's sequential stream (a guest stream comes through one queue).
    seq: std::cell::Cell<SeqState>,
    seq_cutoff: SeqCutoff,
    seq_cutoff_bytes: u64,
    cache_ch: Channel,
    /// The cache device's fast lane: a hit within one line reads through it.
    lane: Lane,
    core_ch: Channel,
    mailbox: Arc<Mailbox>,
    epfd: OwnedFd,
    /// CHANNEL_ID_BIT | channel number << 32.
    uid: u64,
    reqs: Slab<Req>,
    hits: Slab<Hit>,
    next_gen: u32,
    /// Children submitted to the cache device / the core and not yet completed: a channel with none
    /// is not polled.
    cache_out: usize,
    core_out: usize,
    blocked: VecDeque<BdevIo>,
    /// Reads within one line submitted since the last poll, served there as a batch (see
    /// [`CacheChannel::serve_pending`]).
    pending: Vec<BdevIo>,
    /// What `serve_pending` found for each pending read: (cache line, slot) of a hit.
    found: Vec<Option<(u32, u32)>>,
    /// Between a batch time (a poller's pass starts: `set_batch_stamp`) and the next poll, which
    /// that pass makes after its submissions: only then may reads wait for the poll. Whoever else
    /// submits (a channel releasing what QoS held, in its poll; an owner thread; tests) gets them
    /// started at once, as before.
    batch_open: bool,
    done: Vec<Completion>,
    scratch: Vec<Completion>,
    /// The lane's clock reading for its completions in the last `poll`, if it had any: the owner's
    /// stamp for this poll's completions too ([`ModuleChannel::completion_stamp`]).
    done_stamp: Option<u64>,
    seg_pool: Vec<Seg>,
    /// The map's index slots: a hit's completion unpins its slots there, and a batch of reads
    /// touches theirs ahead (`serve_pending`), without the lock.
    slots: Slots,
    /// Read hits of this channel (one writer, this channel: counted with `bump`; see
    /// `Shared::hit_shards`).
    hit_count: Arc<AtomicU64>,
}

fn mask(a: u64, b: u64) -> u128 {
    // Sectors a..b of a line (none past 128): the low b - a bits, moved up to a.
    let b = b.min(128);
    if a >= b {
        return 0;
    }
    (u128::MAX >> (128 - (b - a))) << a
}

fn push_seg(segs: &mut Vec<Seg>, s: Seg) {
    if let Some(l) = segs.last_mut() {
        if l.dev == s.dev && l.dev_off + l.len == s.dev_off && l.buf_off + l.len == s.buf_off {
            l.len += s.len;
            return;
        }
    }
    segs.push(s);
}

impl CacheChannel {
    pub(crate) fn new(b: &CacheBdev) -> Result<Self, BdevError> {
        let sh = b.inst.sh.clone();
        let slots = rlock(&sh.map).slots();
        let cache_ch = sh.cache_desc.channel()?;
        let lane = sh.cache_desc.lane()?;
        let core_ch = b.core.channel()?;
        let mailbox = Mailbox::new()?;
        lock(&sh.mailboxes).push(Arc::downgrade(&mailbox));
        let hit_count = Arc::new(AtomicU64::new(0));
        lock(&sh.hit_shards).push((b.core_id, hit_count.clone()));
        let fds = [Some(mailbox.efd.as_raw_fd()), cache_ch.wait_fd(), lane.wait_fd(), core_ch.wait_fd()];
        let epfd = epoll_set(fds.into_iter().flatten())
            .map_err(|e| BdevError::io("cache: setting up the channel's epoll set", e))?;
        let bs = u64::from(b.info.block_size);
        let lb = sh.line_blocks(b.info.block_size);
        if !lb.is_power_of_two() {
            return Err(BdevError::InvalidConfig(format!(
                "cache: {lb} blocks per line is not a power of two"
            )));
        }
        for (what, b) in [("block size", bs), ("cache device's block size", u64::from(sh.cache_block))] {
            if !b.is_power_of_two() {
                return Err(BdevError::InvalidConfig(format!(
                    "cache: the {what} ({b}) is not a power of two"
                )));
            }
        }
        Ok(Self {
            lb,
            lb_shift: lb.trailing_zeros(),
            bs_shift: bs.trailing_zeros(),
            cache_shift: sh.cache_block.trailing_zeros(),
            sh,
            core_id: b.core_id,
            bs,
            core_removed: b.core_removed.clone(),
            seq: std::cell::Cell::new(SeqState::default()),
            seq_cutoff: b.seq_cutoff,
            seq_cutoff_bytes: b.seq_cutoff_bytes,
            cache_ch,
            lane,
            core_ch,
            mailbox,
            epfd,
            uid: CHANNEL_ID_BIT | (NEXT_CHANNEL.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff) << 32,
            reqs: Slab::new(),
            hits: Slab::new(),
            next_gen: 0,
            cache_out: 0,
            core_out: 0,
            blocked: VecDeque::new(),
            pending: Vec::new(),
            found: Vec::new(),
            batch_open: false,
            done: Vec::new(),
            scratch: Vec::new(),
            done_stamp: None,
            seg_pool: Vec::new(),
            slots,
            hit_count,
        })
    }

    fn cache_off(&self, slot: u32, sector: u64) -> u64 {
        self.sh.data_offset + u64::from(slot) * u64::from(self.sh.line_size) + sector * self.bs
    }

    /// True when this request is part of a sequential stream that must bypass the cache.
    fn cut_off(&self, io: &BdevIo, map: &LineMap) -> bool {
        if self.seq_cutoff == SeqCutoff::Off || !matches!(io.kind, IoKind::Read | IoKind::Write) {
            return false;
        }
        let len = io.num_blocks * self.bs;
        let mut s = self.seq.get();
        if io.offset_blocks == s.last_end {
            s.bytes = s.bytes.saturating_add(len);
        } else {
            s.bytes = len;
        }
        s.last_end = io.offset_blocks + io.num_blocks;
        self.seq.set(s);
        let over = s.bytes >= self.seq_cutoff_bytes;
        match self.seq_cutoff {
            SeqCutoff::Always => over,
            SeqCutoff::Full => over && map.free_lines() == 0,
            SeqCutoff::Off => false,
        }
    }

    /// True when two requests touch a common core line (requests without a range never wait).
    fn overlap(&self, a: &BdevIo, b: &BdevIo) -> bool {
        let range = |io: &BdevIo| {
            (matches!(io.kind, IoKind::Read | IoKind::Write | IoKind::Unmap | IoKind::WriteZeroes)
                && io.num_blocks > 0)
                .then(|| {
                    (
                        io.offset_blocks >> self.lb_shift,
                        (io.offset_blocks + io.num_blocks - 1) >> self.lb_shift,
                    )
                })
        };
        match (range(a), range(b)) {
            (Some((f1, l1)), Some((f2, l2))) => f1 <= l2 && f2 <= l1,
            _ => false,
        }
    }

    /// The core line of a non-empty request that lies within one line.
    fn one_line(&self, io: &BdevIo) -> Option<u64> {
        let first = io.offset_blocks >> self.lb_shift;
        (io.num_blocks > 0 && (io.offset_blocks + io.num_blocks - 1) >> self.lb_shift == first)
            .then_some(first)
    }

    /// A read hit within one line (the common case), served from the cache device at once: look up,
    /// check, pin and count under the read lock, then read through the lane. Gives `io` back as it
    /// was when it is not one, for [`Self::start`].
    fn hit_in_line(&mut self, io: BdevIo) -> Result<(), BdevIo> {
        let Some(first) = self.one_line(&io).filter(|_| io.kind == IoKind::Read) else { return Err(io) };
        if self.removed() {
            return Err(io);
        }
        // A read hit needs only the read lock: queues hitting the cache do not wait for each other.
        let map = rlock(&self.sh.map);
        let Some(found) = self.pin_line_hit(&map, &io, first) else { return Err(io) };
        drop(map);
        self.issue_line_hit(io, first, found);
        Ok(())
    }

    /// True when the core or the cache device is gone (no hit is served then).
    fn removed(&self) -> bool {
        self.core_removed.load(Ordering::Acquire) || self.sh.cache_removed.load(Ordering::Acquire)
    }

    /// Under the map's read lock: when every sector a read within line `first` reads is valid in the
    /// cache, pins the line and returns (cache line, slot) for [`Self::issue_line_hit`].
    #[inline]
    fn pin_line_hit(&self, map: &LineMap, io: &BdevIo, first: u64) -> Option<(u32, u32)> {
        let a = io.offset_blocks - (first << self.lb_shift);
        let found = map.pin_if_valid((self.core_id, first), mask(a, a + io.num_blocks))?;
        // Keep the stream detection going (a hit never fills, so the answer is moot).
        let _ = self.cut_off(io, map);
        Some(found)
    }

    /// Reads a pinned hit within line `first` (cache line `s`, slot `pos`) from the cache device.
    #[inline]
    fn issue_line_hit(&mut self, mut io: BdevIo, first: u64, (s, pos): (u32, u32)) {
        let a = io.offset_blocks - (first << self.lb_shift);
        bump(&self.hit_count, 1);
        let mut pins = [0u32; MAX_PINS];
        pins[0] = pos;
        let bytes = io.num_blocks << self.bs_shift;
        // The request becomes the cache device's read, in place (same memory, its own tag).
        io.tag = self.new_hit(io.tag, pins, 1, 1, u32::try_from(bytes).unwrap_or(0));
        io.offset_blocks = self.cache_off(s, a) >> self.cache_shift;
        io.num_blocks = bytes >> self.cache_shift;
        let ct = io.tag;
        if let Err(read) = self.lane.submit(io) {
            // Given back (e.g. a QoS limit on the cache device): the channel counts it.
            if let Some(h) = self.hits.get_mut(slot(ct)) {
                h.lane_bytes = 0;
            }
            self.cache_out += 1;
            self.submit_cache(read);
        }
    }

    /// Starts a request; gives it back when its lines are locked by someone else. `try_hit`: false
    /// when [`Self::hit_in_line`] has just said no.
    fn start(&mut self, mut io: BdevIo, try_hit: bool) -> Result<(), BdevIo> {
        if self.core_removed.load(Ordering::Acquire) {
            self.done.push(Completion { tag: io.tag, result: Err(IoError::Removed) });
            return Ok(());
        }
        match io.kind {
            IoKind::Reset => {
                self.done.push(Completion { tag: io.tag, result: Ok(()) });
                return Ok(());
            }
            IoKind::Flush => {
                let id = self.insert_req(io, Stage::Flush);
                self.sh.send(OwnerReq::Flush(Some(self.core_id), self.mailbox.clone(), id));
                return Ok(());
            }
            _ => {}
        }
        if io.num_blocks == 0 {
            self.done.push(Completion { tag: io.tag, result: Ok(()) });
            return Ok(());
        }
        let first = io.offset_blocks >> self.lb_shift;
        let last = (io.offset_blocks + io.num_blocks - 1) >> self.lb_shift;
        if first == last {
            if try_hit {
                match self.hit_in_line(io) {
                    Ok(()) => return Ok(()),
                    Err(back) => io = back,
                }
            }
        } else if io.kind == IoKind::Read
            && last - first < MAX_PINS as u64
            && !self.sh.cache_removed.load(Ordering::Acquire)
        {
            // A hit across lines: the read lock too, the reads through the cache device's channel.
            let map = rlock(&self.sh.map);
            let mut segs = std::mem::take(&mut self.seg_pool);
            if let Some((pins, n)) = self.try_hit(&map, &io, &mut segs) {
                // Keep the stream detection going (a hit never fills, so the answer is moot).
                let _ = self.cut_off(&io, &map);
                drop(map);
                bump(&self.hit_count, 1);
                self.issue_hit(io, pins, n, segs);
                return Ok(());
            }
            self.seg_pool = segs;
        }
        // The slot the next insert takes (nothing is inserted in between).
        let id = self.uid | self.reqs.vacant_key() as u64;
        let mut map = wlock(&self.sh.map);
        let removed = self.sh.cache_removed.load(Ordering::Acquire);
        let mode = self.sh.mode();
        // Requests that never write the core pass a cleaning batch's write-back (its soft locks).
        let write_back = io.kind == IoKind::Write && matches!(mode, Mode::Wb | Mode::Wo);
        let pass_soft = !removed && (io.kind == IoKind::Read || write_back);
        let Some(passed) = map.try_lock_passing(self.core_id, first, last, id, pass_soft) else {
            return Err(io);
        };
        // A write let past a write-back must stay off the core: it is never cut off.
        let cut = !removed && self.cut_off(&io, &map) && !(passed && write_back);
        let mut req = self.new_req(io, Stage::Data);
        req.locked = true;
        let mut segs = std::mem::take(&mut self.seg_pool);
        let r = match req.kind {
            IoKind::Read => self.plan_read(&mut map, &mut req, &mut segs, mode, cut, removed),
            IoKind::Write => {
                self.plan_write(&mut map, &mut req, &mut segs, if removed || cut { Mode::Pt } else { mode });
                Ok(())
            }
            _ => {
                self.plan_invalidate(&map, &mut req, first, last);
                Ok(())
            }
        };
        drop(map);
        let id = self.push_req(req);
        if let Err(e) = r {
            if let Some(req) = self.reqs.get_mut(slot(id)) {
                req.error = Some(e);
            }
            self.complete(id);
            return Ok(());
        }
        let Some(req) = self.reqs.get_mut(slot(id)) else { return Ok(()) };
        if matches!(req.kind, IoKind::Unmap | IoKind::WriteZeroes) {
            req.pending = 1;
            let ct = child_tag(id, req.gen);
            let (kind, off, nb) = (req.kind, req.off, req.nb);
            self.core_out += 1;
            self.core_ch.submit(BdevIo::no_data(kind, off, nb, ct));
            return Ok(());
        }
        self.issue(id, segs, false);
        Ok(())
    }

    /// Stores a new request; returns its id.
    fn insert_req(&mut self, io: BdevIo, stage: Stage) -> u64 {
        let req = self.new_req(io, stage);
        self.push_req(req)
    }

    /// Stores `req` in the slab (its id and generation set here); returns its id.
    fn push_req(&mut self, mut req: Req) -> u64 {
        self.next_gen = self.next_gen.wrapping_add(1);
        let entry = self.reqs.vacant_entry();
        let id = self.uid | entry.key() as u64;
        req.id = id;
        // 31 bits: a child's tag keeps its top bit clear (HIT_CHILD).
        req.gen = self.next_gen & 0x7fff_ffff;
        entry.insert(req);
        id
    }

    /// The request with id `id`, if it is still in flight.
    fn req_mut(&mut self, id: u64) -> Option<&mut Req> {
        self.reqs.get_mut(slot(id)).filter(|r| r.id == id)
    }

    fn new_req(&self, io: BdevIo, stage: Stage) -> Req {
        Req {
            id: 0,
            gen: 0,
            tag: io.tag,
            kind: io.kind,
            off: io.offset_blocks,
            nb: io.num_blocks,
            bufs: io.bufs,
            pending: 0,
            error: None,
            stage,
            plans: Vec::new(),
            inserts: Vec::new(),
            locked: false,
        }
    }

    /// Reads a hit's segments from the cache device (lines already pinned); no map lock, no
    /// request record: the hit's own small record is all its completion needs.
    fn issue_hit(&mut self, io: BdevIo, pins: [u32; MAX_PINS], npins: u8, mut segs: Vec<Seg>) {
        let ct = self.new_hit(io.tag, pins, npins, 0, 0);
        let cs = self.cache_shift;
        let (mut n, mut error) = (0u8, None);
        for s in segs.drain(..) {
            let Some(buf) = io.bufs.slice(s.buf_off, s.len) else {
                error.get_or_insert(IoError::InvalidRange);
                continue;
            };
            n += 1;
            self.cache_out += 1;
            self.submit_cache(BdevIo::read(s.dev_off >> cs, s.len >> cs, buf, ct));
        }
        self.seg_pool = segs;
        // Children never complete inside submit: setting the count afterwards is safe.
        if let Some(h) = self.hits.get_mut(slot(ct)) {
            h.pending = n;
            h.error = error;
        }
        if n == 0 {
            // No child went out (every slice failed): complete it now, with its error.
            self.hit_done(ct, Ok(()));
        }
    }

    /// A hit's read from the cache device: the direct path when nothing of the general one applies.
    fn submit_cache(&mut self, io: BdevIo) {
        if let Err(io) = self.cache_ch.submit_direct(io) {
            self.cache_ch.submit(io);
        }
    }

    /// Records a read hit in flight (its lines already pinned); returns its children's tag.
    /// `lane_bytes`: the size of its one read when that goes through the lane (0: through the
    /// channel); its start stamp is the lane's now.
    #[inline]
    fn new_hit(&mut self, tag: u64, pins: [u32; MAX_PINS], npins: u8, pending: u8, lane_bytes: u32) -> u64 {
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen & 0x7fff_ffff;
        let start = if lane_bytes > 0 { self.lane.stamp() } else { 0 };
        let entry = self.hits.vacant_entry();
        let ct = HIT_CHILD | u64::from(gen) << 32 | entry.key() as u64;
        entry.insert(Hit { tag, start, lane_bytes, gen, pins, npins, pending, error: None });
        ct
    }

    /// One child of a read hit completed; the last one unpins the lines and completes the request.
    fn hit_done(&mut self, ctag: u64, result: Result<(), IoError>) {
        let slot = (ctag & SLOT_MASK) as usize;
        let gen = (ctag & !HIT_CHILD) >> 32;
        let Some(h) = self.hits.get_mut(slot).filter(|h| u64::from(h.gen) == gen) else { return };
        if let Err(e) = result {
            h.error.get_or_insert(e);
        }
        h.pending = h.pending.saturating_sub(1);
        if h.pending > 0 {
            return;
        }
        let h = self.hits.remove(slot);
        if h.lane_bytes > 0 {
            self.lane.account(IoKind::Read, u64::from(h.lane_bytes), h.start, h.error.is_none());
        }
        for &p in &h.pins[..usize::from(h.npins)] {
            self.slots.unpin(p);
        }
        let result = match h.error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.done.push(Completion { tag: h.tag, result });
    }

    /// Per-line pieces of a request: (core line, first sector, end sector, byte offset in the request).
    fn pieces(&self, off: u64, nb: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> {
        let (lb, bs, end) = (self.lb, self.bs, off + nb);
        let mut b = off;
        let shift = self.lb_shift;
        std::iter::from_fn(move || {
            if b >= end {
                return None;
            }
            let line = b >> shift;
            let a = b - line * lb;
            let e = ((line + 1) * lb).min(end) - line * lb;
            let piece = (line, a, e, (b - off) * bs);
            b = line * lb + e;
            Some(piece)
        })
    }

    /// Read-hit fast path: when every sector of the request is valid in the cache, pins its lines
    /// (never evicted or reused while pinned), counts a hit and plans the reads from the cache device,
    /// all under the caller's one map lock; no range lock, and completion takes no map lock at all.
    fn try_hit(&self, map: &LineMap, io: &BdevIo, segs: &mut Vec<Seg>) -> Option<([u32; MAX_PINS], u8)> {
        let mut lines = [0u32; MAX_PINS];
        let mut slots = [0u32; MAX_PINS];
        let mut n = 0usize;
        for (line, a, e, _) in self.pieces(io.offset_blocks, io.num_blocks) {
            let (s, slot) = map.find_valid((self.core_id, line), mask(a, e))?;
            *lines.get_mut(n)? = s;
            *slots.get_mut(n)? = slot;
            n += 1;
        }
        for (k, (_, a, e, boff)) in self.pieces(io.offset_blocks, io.num_blocks).enumerate() {
            let s = lines[k];
            map.pin_slot(slots[k]);
            push_seg(
                segs,
                Seg { dev: Dev::Cache, dev_off: self.cache_off(s, a), buf_off: boff, len: (e - a) * self.bs },
            );
        }
        Some((slots, n as u8))
    }

    fn plan_read(
        &self,
        map: &mut LineMap,
        req: &mut Req,
        segs: &mut Vec<Seg>,
        mode: Mode,
        cut: bool,
        removed: bool,
    ) -> Result<(), IoError> {
        let insert_ok = !removed && !cut && matches!(mode, Mode::Wt | Mode::Wb | Mode::Wa | Mode::Wi);
        // Whether any sector came from the cache / from the core (which counter the read goes to).
        let (mut hit, mut miss) = (false, false);
        for (line, a, e, boff) in self.pieces(req.off, req.nb) {
            let key = (self.core_id, line);
            let want = mask(a, e);
            let slot = map.lookup(key);
            if removed {
                if slot.is_some_and(|s| map.lines[s as usize].dirty & want != 0) {
                    log::error!(
                        "cache bdev on core id {}: read of core line {line} needs dirty data of the removed cache device",
                        self.core_id
                    );
                    return Err(IoError::Errno(libc::EIO));
                }
                push_seg(
                    segs,
                    Seg {
                        dev: Dev::Core,
                        dev_off: (line * self.lb + a) * self.bs,
                        buf_off: boff,
                        len: (e - a) * self.bs,
                    },
                );
                miss = true;
                continue;
            }
            let valid = slot.map_or(0, |s| map.lines[s as usize].valid());
            if let Some(s) = slot {
                map.touch(s);
            }
            let ins = if valid & want != want && insert_ok { slot.or_else(|| map.alloc(key)) } else { None };
            let mut fill = 0u128;
            let mut s = a;
            while s < e {
                let v = valid >> s & 1 == 1;
                let mut t = s + 1;
                while t < e && (valid >> t & 1 == 1) == v {
                    t += 1;
                }
                let buf_off = boff + (s - a) * self.bs;
                let len = (t - s) * self.bs;
                if v {
                    let slot = slot.unwrap_or(0);
                    push_seg(segs, Seg { dev: Dev::Cache, dev_off: self.cache_off(slot, s), buf_off, len });
                    hit = true;
                } else {
                    push_seg(
                        segs,
                        Seg { dev: Dev::Core, dev_off: (line * self.lb + s) * self.bs, buf_off, len },
                    );
                    miss = true;
                    if let Some(i) = ins {
                        req.inserts.push(Seg {
                            dev: Dev::Cache,
                            dev_off: self.cache_off(i, s),
                            buf_off,
                            len,
                        });
                        fill |= mask(s, t);
                    }
                }
                s = t;
            }
            if let Some(i) = ins {
                req.plans.push(Plan { slot: i, key, mask: fill, act: Act::Fill });
            }
        }
        let c = map.counters(self.core_id);
        match (hit, miss) {
            (_, false) => c.read_hits += 1,
            (false, _) => c.read_misses += 1,
            _ => c.read_partial_hits += 1,
        }
        Ok(())
    }

    fn plan_write(&self, map: &mut LineMap, req: &mut Req, segs: &mut Vec<Seg>, mode: Mode) {
        let mut all_hit = true;
        let core_seg = Seg { dev: Dev::Core, dev_off: req.off * self.bs, buf_off: 0, len: req.nb * self.bs };
        let mut to_core = !matches!(mode, Mode::Wb | Mode::Wo);
        let mut core_segs = Vec::new();
        for (line, a, e, boff) in self.pieces(req.off, req.nb) {
            let key = (self.core_id, line);
            let m = mask(a, e);
            let slot = map.lookup(key);
            all_hit &= slot.is_some();
            if let Some(s) = slot {
                map.touch(s);
            }
            let (slot, act) = match mode {
                Mode::Wb | Mode::Wo => (slot.or_else(|| map.alloc(key)), Act::WriteDirty),
                Mode::Wt => (slot.or_else(|| map.alloc(key)), Act::WriteClean),
                Mode::Wa => (slot, Act::WriteClean),
                Mode::Pt | Mode::Wi => (slot, Act::Invalidate),
            };
            match slot {
                Some(s) => {
                    if act != Act::Invalidate {
                        let dev_off = self.cache_off(s, a);
                        push_seg(
                            segs,
                            Seg { dev: Dev::Cache, dev_off, buf_off: boff, len: (e - a) * self.bs },
                        );
                    }
                    req.plans.push(Plan { slot: s, key, mask: m, act });
                }
                None if matches!(mode, Mode::Wb | Mode::Wo) => {
                    // No clean line to evict: this piece goes to the core; ask for cleaning.
                    self.sh.pressure.store(true, Ordering::Release);
                    let _ = self.sh.owner_efd.write(1);
                    push_seg(
                        &mut core_segs,
                        Seg {
                            dev: Dev::Core,
                            dev_off: (line * self.lb + a) * self.bs,
                            buf_off: boff,
                            len: (e - a) * self.bs,
                        },
                    );
                }
                None => {}
            }
        }
        if to_core {
            segs.push(core_seg);
            to_core = false;
        }
        let _ = to_core;
        segs.extend(core_segs);
        let c = map.counters(self.core_id);
        if all_hit {
            c.write_hits += 1;
        } else {
            c.write_misses += 1;
        }
    }

    /// Unmap / write_zeroes: invalidate every cached line of the range after the core did it.
    fn plan_invalidate(&self, map: &LineMap, req: &mut Req, first: u64, last: u64) {
        let end = req.off + req.nb;
        let mut add = |slot: u32, line: u64| {
            let a = req.off.max(line * self.lb) - line * self.lb;
            let e = end.min((line + 1) * self.lb) - line * self.lb;
            req.plans.push(Plan { slot, key: (self.core_id, line), mask: mask(a, e), act: Act::Invalidate });
        };
        if last - first < 4 * u64::from(self.sh.num_lines) {
            for line in first..=last {
                if let Some(s) = map.lookup((self.core_id, line)) {
                    add(s, line);
                }
            }
        } else {
            for (i, l) in map.lines.iter().enumerate() {
                if let Some((c, line)) = l.key() {
                    if c == self.core_id && (first..=last).contains(&line) {
                        add(i as u32, line);
                    }
                }
            }
        }
    }

    /// Submits `segs` as children of request `id`.
    fn issue(&mut self, id: u64, mut segs: Vec<Seg>, writes: bool) {
        let Some(r) = self.reqs.get_mut(slot(id)).filter(|r| r.id == id) else { return };
        let (kind, ct) = (r.kind, child_tag(id, r.gen));
        let mut n = 0;
        for s in segs.drain(..) {
            let Some(buf) = r.bufs.slice(s.buf_off, s.len) else {
                r.error.get_or_insert(IoError::InvalidRange);
                continue;
            };
            let write = writes || kind == IoKind::Write;
            let (ch, bs) = match s.dev {
                Dev::Cache => {
                    self.cache_out += 1;
                    (&mut self.cache_ch, u64::from(self.sh.cache_block))
                }
                Dev::Core => {
                    self.core_out += 1;
                    (&mut self.core_ch, self.bs)
                }
            };
            let io = if write {
                BdevIo::write(s.dev_off / bs, s.len / bs, buf, ct)
            } else {
                BdevIo::read(s.dev_off / bs, s.len / bs, buf, ct)
            };
            ch.submit(io);
            n += 1;
        }
        r.pending += n;
        let idle = r.pending == 0;
        // Keep the (empty) vector for the next request: no allocation per request.
        self.seg_pool = segs;
        if idle {
            self.finalize(id);
        }
    }

    fn child_done(&mut self, ctag: u64, result: Result<(), IoError>) {
        if ctag & HIT_CHILD != 0 {
            self.hit_done(ctag, result);
            return;
        }
        let Some(r) =
            self.reqs.get_mut((ctag & SLOT_MASK) as usize).filter(|r| u64::from(r.gen) == ctag >> 32)
        else {
            return;
        };
        let id = r.id;
        if let Err(e) = result {
            r.error.get_or_insert(e);
        }
        r.pending -= 1;
        if r.pending > 0 {
            return;
        }
        if r.stage == Stage::Data && !r.inserts.is_empty() && r.error.is_none() {
            r.stage = Stage::Insert;
            let segs = std::mem::take(&mut r.inserts);
            self.issue(id, segs, true);
            return;
        }
        self.finalize(id);
    }

    /// Applies the request's outcome to the map; persists when the device's dirty state must change.
    fn finalize(&mut self, id: u64) {
        let Some(r) = self.reqs.get_mut(slot(id)).filter(|r| r.id == id) else { return };
        let sh = &self.sh;
        let removed = sh.cache_removed.load(Ordering::Acquire);
        let mut persist = false;
        let mut wake = false;
        {
            let mut map = wlock(&sh.map);
            let now = sh.now_ms();
            let ok = r.error.is_none();
            for p in &r.plans {
                let l = &map.lines[p.slot as usize];
                if l.key() != Some(p.key) {
                    continue;
                }
                if p.act != Act::Fill {
                    // Data or dirty sectors changed: a write-back of the line in flight must not
                    // mark it clean.
                    map.bump_wgen(p.slot);
                }
                let l = &map.lines[p.slot as usize];
                let (mut v, mut d, dd, sure) = (l.valid(), l.dirty, l.disk_dirty, l.disk_sure);
                match (p.act, ok) {
                    (Act::Fill, true) => v |= p.mask,
                    (Act::Fill, false) => {}
                    (Act::WriteClean, true) => {
                        v |= p.mask;
                        d &= !p.mask;
                    }
                    (Act::WriteDirty, true) => {
                        v |= p.mask;
                        d |= p.mask;
                        // Acknowledged only once the device certainly records these sectors dirty.
                        persist |= p.mask & !sure != 0;
                    }
                    (Act::WriteClean | Act::WriteDirty, false) => {
                        // The line's copy of these sectors is unknown now; dirty data there is lost.
                        if d & p.mask != 0 {
                            log::error!(
                                "cache: write to a dirty line failed: core id {} line {}",
                                p.key.0,
                                p.key.1
                            );
                        }
                        v &= !p.mask;
                        d &= !p.mask;
                        persist |= dd & p.mask != 0;
                    }
                    (Act::Invalidate, true) => {
                        v &= !p.mask;
                        d &= !p.mask;
                        persist |= dd & p.mask != 0;
                    }
                    (Act::Invalidate, false) => {}
                }
                map.set_bits(p.slot, v, d, now);
            }
            let wait_persist = persist && !removed;
            if !wait_persist && r.locked {
                // Done: release the lines in the same critical section.
                r.locked = false;
                wake = map.unlock(id);
            }
        }
        if wake {
            sh.wake_all();
        }
        if persist && !removed {
            r.stage = Stage::Persist;
            sh.send(OwnerReq::Persist(self.mailbox.clone(), id));
            return;
        }
        self.complete(id);
    }

    fn complete(&mut self, id: u64) {
        if self.req_mut(id).is_none() {
            return;
        }
        let r = self.reqs.remove(slot(id));
        if r.locked && wlock(&self.sh.map).unlock(id) {
            self.sh.wake_all();
        }
        let result = match r.error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.done.push(Completion { tag: r.tag, result });
    }

    fn on_reply(&mut self, id: u64, res: Result<(), IoError>) {
        let Some(r) = self.req_mut(id) else { return };
        if let Err(e) = res {
            r.error.get_or_insert(e);
        }
        if matches!(r.stage, Stage::Persist | Stage::Flush) {
            self.complete(id);
        }
    }
}

impl CacheChannel {
    /// Serves the reads deferred by `submit`, in order: first the home slot of each is touched, one
    /// load right after the other (their misses overlap: the slots of a batch of random hits cost
    /// about one memory latency instead of one each); then the hits among them are looked up and
    /// pinned under one read lock for the batch (one lock round trip instead of one per read), and
    /// each goes its way.
    fn serve_pending(&mut self) {
        if self.pending.len() == 1 {
            // A batch of one (a queue depth of 1): nothing to overlap or share, the plain path.
            if let Some(io) = self.pending.pop() {
                self.submit_now(io);
            }
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        let mut found = std::mem::take(&mut self.found);
        let mut seen = 0u64;
        for io in &pending {
            seen ^= self.slots.touch((self.core_id, io.offset_blocks >> self.lb_shift));
        }
        std::hint::black_box(seen);
        found.clear();
        if self.blocked.is_empty() && !self.removed() {
            let map = rlock(&self.sh.map);
            found.extend(
                pending.iter().map(|io| self.pin_line_hit(&map, io, io.offset_blocks >> self.lb_shift)),
            );
        }
        for (i, io) in pending.drain(..).enumerate() {
            match found.get(i).copied().flatten() {
                // A read on lines an earlier waiting request touches queues behind it.
                Some((_, pos))
                    if !self.blocked.is_empty() && self.blocked.iter().any(|b| self.overlap(b, &io)) =>
                {
                    self.slots.unpin(pos);
                    self.submit_now(io);
                }
                Some(hit) => {
                    let first = io.offset_blocks >> self.lb_shift;
                    self.issue_line_hit(io, first, hit);
                }
                None => self.submit_now(io),
            }
        }
        self.pending = pending;
        self.found = found;
    }

    fn submit_now(&mut self, mut io: BdevIo) {
        let tried = self.blocked.is_empty();
        if tried {
            // The common case first, without moving the request around.
            match self.hit_in_line(io) {
                Ok(()) => return,
                Err(back) => io = back,
            }
        } else if self.blocked.iter().any(|b| self.overlap(b, &io)) {
            // Only a request on lines that an earlier waiting request also touches must queue
            // behind it.
            self.blocked.push_back(io);
            return;
        }
        if let Err(io) = self.start(io, !tried) {
            self.blocked.push_back(io);
        }
    }
}

/// Reads deferred to the next poll at most (a bound on what waits there; a poller polls after every
/// round of submissions).
const MAX_PENDING: usize = 64;

impl ModuleChannel for CacheChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        // In a poller's pass, a read within one line (likely a hit) waits for the pass's poll, which
        // serves every such read submitted meanwhile as a batch (see `serve_pending`). Anything else
        // goes now, after them (in order).
        if self.batch_open
            && io.kind == IoKind::Read
            && self.one_line(&io).is_some()
            && self.pending.len() < MAX_PENDING
        {
            self.pending.push(io);
            return Ok(());
        }
        if !self.pending.is_empty() {
            self.serve_pending();
        }
        self.submit_now(io);
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        self.batch_open = false;
        self.done_stamp = None;
        if !self.pending.is_empty() {
            self.serve_pending();
        }
        if self.cache_out == 0
            && self.core_out == 0
            && self.lane.outstanding() == 0
            && self.blocked.is_empty()
            && self.done.is_empty()
            && !self.mailbox.signalled()
        {
            // Nothing in flight, waiting or posted: nothing to give back (a poller asks often).
            return 0;
        }
        loop {
            let mut progress = false;
            if self.mailbox.signalled() {
                for (id, res) in self.mailbox.take() {
                    progress = true;
                    self.on_reply(id, res);
                }
            }
            // A channel with nothing in flight has nothing to give back.
            if self.cache_out > 0 {
                self.cache_out -= self.cache_ch.poll(&mut self.scratch).min(self.cache_out);
            }
            if self.lane.poll(&mut self.scratch) > 0 {
                self.done_stamp = Some(self.lane.done_stamp());
            }
            if self.core_out > 0 {
                self.core_out -= self.core_ch.poll(&mut self.scratch).min(self.core_out);
            }
            // In order. No completion's handling polls a channel: nothing joins `scratch` meanwhile.
            let n = self.scratch.len();
            let mut hits = 0;
            for i in 0..n {
                let c = self.scratch[i];
                hits += usize::from(c.tag & HIT_CHILD != 0);
                self.child_done(c.tag, c.result);
            }
            self.scratch.clear();
            // A finished read hit only completes its request (and drops a pin, which no waiting
            // request waits for: they wait for line locks): it starts nothing, so no other round.
            progress |= hits < n;
            let mut i = 0;
            while i < self.blocked.len() {
                // Keep the order of requests on the same lines: wait behind an earlier one.
                if (0..i).any(|j| self.overlap(&self.blocked[j], &self.blocked[i])) {
                    i += 1;
                    continue;
                }
                let Some(io) = self.blocked.remove(i) else { break };
                match self.start(io, true) {
                    Ok(()) => progress = true,
                    Err(io) => {
                        self.blocked.insert(i, io);
                        i += 1;
                    }
                }
            }
            if !progress {
                break;
            }
        }
        let n = self.done.len();
        done.append(&mut self.done);
        n
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.epfd.as_raw_fd())
    }

    fn before_sleep(&mut self) -> bool {
        // `poll` skips the channels below with nothing in flight: clear what their last completions
        // left signalled, or the channel's epoll fd stays readable and its owner never sleeps.
        let mut more = !self.done.is_empty() || !self.pending.is_empty();
        if self.cache_out == 0 && self.cache_ch.before_sleep() {
            // Work turned up in an idle channel below (not expected): poll it with the rest.
            self.cache_out += 1;
            more = true;
        }
        more |= self.lane.before_sleep();
        if self.core_out == 0 && self.core_ch.before_sleep() {
            self.core_out += 1;
            more = true;
        }
        more
    }

    fn completion_stamp(&self) -> Option<u64> {
        self.done_stamp
    }

    fn set_batch_stamp(&mut self, now_ns: u64) {
        self.batch_open = true;
        self.cache_ch.set_batch_stamp(now_ns);
        self.lane.set_batch_stamp(now_ns);
        self.core_ch.set_batch_stamp(now_ns);
    }
}

/// For tests: the base of this channel's request ids, and the top of the owner-thread ids' range.
#[cfg(test)]
pub(crate) fn id_spaces(ch: &CacheChannel) -> (u64, u64) {
    (ch.uid, CHANNEL_ID_BIT)
}

/// For tests: sets the generation counter (to run requests across its wrap points).
#[cfg(test)]
pub(crate) fn set_next_gen(ch: &mut CacheChannel, gen: u32) {
    ch.next_gen = gen;
}

/// A request's slot in its channel's slab.
fn slot(id: u64) -> usize {
    (id & SLOT_MASK) as usize
}

/// The tag of a child of request `id` with generation `gen`.
fn child_tag(id: u64, gen: u32) -> u64 {
    (u64::from(gen) << 32) | (id & SLOT_MASK)
}

impl Drop for CacheChannel {
    fn drop(&mut self) {
        // Finish what is in flight so no line stays locked and no child outlives its memory.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut sink = Vec::new();
        while (!self.reqs.is_empty()
            || !self.hits.is_empty()
            || !self.blocked.is_empty()
            || !self.pending.is_empty())
            && std::time::Instant::now() < deadline
        {
            if self.poll(&mut sink) == 0 {
                let mut p = libc::pollfd { fd: self.epfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd on the stack.
                unsafe { libc::poll(&mut p, 1, 10) };
            }
        }
        // This channel's hits stay in the core's counters.
        let mut map = wlock(&self.sh.map);
        let mut shards = lock(&self.sh.hit_shards);
        shards.retain(|(_, c)| !Arc::ptr_eq(c, &self.hit_count));
        map.counters(self.core_id).read_hits += self.hit_count.load(Ordering::Relaxed);
    }
}
