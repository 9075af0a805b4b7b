//! The generic per-thread I/O channel: validation, splitting, bouncing, emulation, NOMEM backpressure,
//! statistics and one completion path.
//!
//! ```text
//!  submit(parent) ─► validate ─► bounce? ─► split / emulate ─► children ─► queue ─► ModuleChannel
//!                        │ error                                 (internal tags)  │ NoMem: push_front,
//!                        ▼                                                        │ retry at threshold
//!  poll() ◄── local_done ◄── parent done (all children done; copy-out; stats) ◄──┘ module poll
//! ```
//!
//! # Design
//! * Every I/O enters through [`Channel::submit`] and leaves through [`Channel::poll`], errors included
//!   (SPDK never completes inside `submit_request`; neither do we). Validation follows SPDK's order:
//!   write on a read-only descriptor → `ReadOnly`; range overflow or beyond the end → `InvalidRange`;
//!   unmap of 0 blocks → `InvalidRange`.
//! * The caller's I/O becomes a *parent*; the module only ever sees *children* carrying internal tags,
//!   so the caller's tag comes back exactly once, when the last child is done. A parent fails with the
//!   first error any child reports.
//! * Reads and writes are split where they cross `optimal_io_boundary_blocks` (when
//!   `split_on_optimal_io_boundary`) and at `max_io_blocks`; native write_zeroes at
//!   `max_write_zeroes_blocks`; unmap, flush and reset are never split.
//! * Buffers that are not aligned to `buf_align` are bounced through an aligned heap buffer (copied in
//!   before a write, copied out after a successful read).
//! * write_zeroes on a module without it is emulated by sequential writes (one child at a time) from a
//!   shared, process-wide 1 MiB zero buffer.
//! * NOMEM (SPDK's `nomem_io`): the refused child goes back to the head of the queue and the retry
//!   threshold is recorded at that moment as `max(outstanding/2, outstanding-8)`; the queue is retried
//!   from `poll` once the module's outstanding count falls to it. While anything is queued, new children
//!   queue behind it, so the order in which the module sees I/O is the submission order.
//! * Statistics are recorded per parent at completion, into the bdev's shared atomics and this
//!   channel's own counters. Latency is completion time minus start time, with at most one clock
//!   read per batch: an owner that calls [`Channel::set_batch_time`] (the vhost poller, once per
//!   pass) stamps every parent it submits in that pass with that instant, and `poll` reads the clock
//!   once for all the completions it processes. A latency is therefore early by at most the time the
//!   poller spent on earlier requests of the same pass before submitting this one (well under a
//!   microsecond per request, a few µs for a QD32 batch) and late by at most the time spent on earlier
//!   completions of the same poll — below the histogram's first bucket (1 µs) at QD1 and a small part
//!   of the latency at QD32. Owners that never call it (stacked modules) get a clock read per parent.
//! * Parents and children in flight live in slabs (index = id; a child's tag adds a generation in its
//!   high bits so a repeated completion is refused). An unsplit, unbounced read or write (the common
//!   case) is neither: it goes to the module as it came, tagged `DIRECT`, with a light record (the
//!   caller's tag, start time, size) in a third slab. No heap allocation per I/O once warm.
//! * [`Channel::submit_direct`] is that common case without the general path's validation pass, for
//!   stacked modules on the bdev under them (a cache's read hits): it checks in one step that the I/O
//!   is in range, plain, unsplit, aligned and that no QoS limit, reset or queued work applies, and
//!   gives anything else back for [`Channel::submit`].
//! * [`Lane`] is a stacked module's fast lane to the bdev under it: a module channel of its own,
//!   taking only what `submit_direct` would, with no record at all (the caller's record carries the
//!   start and size it reports back for the statistics). A cache's hit reads go through it.
//!
//! * QoS ([`super::qos`]): between validation and splitting, a parent is admitted by the bdev's shared
//!   token buckets or parked in this channel's FIFO `parked` queue (new parents queue behind parked
//!   ones, so submission order holds); `poll` releases parked parents as each 1 ms slice refills, and
//!   [`Channel::parked_until`] tells an idle poller when to look again.
//! * Reset (SPEC §2, SPDK's freeze/unfreeze): a reset parent sets the bdev-wide `frozen` flag and bumps
//!   the reset epoch. Every channel of the bdev fails new parents with `Aborted` while frozen, and on
//!   its next `submit`/`poll` after the epoch moved it fails its queued work (NOMEM-queued children,
//!   QoS-parked parents) with `Aborted`. The reset then goes to the module when it supports resets
//!   (I/O already in the module completes or fails there), and the bdev unfreezes when the reset
//!   parent completes. A reset never waits for other threads, so it cannot deadlock a poller.
//!
//! # Limitations
//! The NOMEM queue is per channel (not shared between bdevs on one underlying channel). No buffer
//! pools for I/O without caller buffers.

use std::collections::VecDeque;

use slab::Slab;
use smallvec::SmallVec;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::qos::Qos;

use super::iov::AlignedBuf;
use super::stats::{BdevStats, BdevStatsSnapshot, Sample, StatsShard};
use super::{Bdev, BdevInfo, BdevIo, Completion, IoError, IoKind, IoVecs, ModuleChannel, Rejected};

/// Size of the shared zero buffer used by write_zeroes emulation.
pub const ZERO_BUF_BYTES: usize = 1 << 20;

/// SPDK's `NOMEM_THRESHOLD_COUNT`: how many I/O must complete before queued I/O is retried
/// (or half of the outstanding ones, whichever is fewer).
pub const NOMEM_THRESHOLD_COUNT: usize = 8;

/// The process-wide zero buffer (never written: only used as the source of writes).
pub(crate) fn zero_buf() -> Arc<AlignedBuf> {
    static ZERO: OnceLock<Arc<AlignedBuf>> = OnceLock::new();
    ZERO.get_or_init(|| Arc::new(AlignedBuf::zeroed(ZERO_BUF_BYTES))).clone()
}

/// Nanoseconds from a process-wide origin to `t` (0 for instants before it): parents keep their
/// start time as a number, so a latency is one subtraction instead of `Instant` arithmetic.
pub(crate) fn nanos(t: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(t.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
}

/// Run-time controls shared by every channel of one bdev: QoS buckets and the reset freeze.
#[derive(Debug, Default)]
pub struct BdevControl {
    /// QoS limits and buckets.
    pub qos: Qos,
    /// A reset is in progress: new I/O fails with `Aborted`.
    frozen: AtomicBool,
    /// Bumped by every reset; a channel that sees it move fails its queued I/O.
    reset_epoch: AtomicU64,
}

impl BdevControl {
    /// True while a reset is in progress.
    pub fn frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }
}

/// One caller I/O in flight.
struct Parent {
    tag: u64,
    kind: IoKind,
    bytes: u64,
    /// Start time, in [`nanos`].
    start: u64,
    /// Children submitted or queued and not yet completed.
    pending: usize,
    error: Option<IoError>,
    /// Read bounce: (caller's memory, bounce buffer), copied out at successful completion.
    /// Boxed: only bounced reads have one, and it would triple the size of every parent record.
    copy_out: Option<Box<(IoVecs, IoVecs)>>,
    /// write_zeroes emulation: next block to zero and the end of the range.
    wz_next: u64,
    wz_end: u64,
}

/// Tag bit of a direct I/O: an unsplit, unbounced read or write that goes to the module as it came,
/// with a light record instead of a parent ([`Channel::submit_direct`], and the general path's
/// common case). The low 32 bits are its slot in `direct`, bits 32..62 its generation.
const DIRECT: u64 = 1 << 63;

/// Generation bits of a direct I/O's tag (bits 32..62).
const GEN31: u64 = 0x7fff_ffff;

/// A direct I/O in flight: what its completion needs (the caller's tag, statistics).
struct Direct {
    tag: u64,
    start: u64,
    bytes: u64,
    gen: u32,
    kind: IoKind,
}

/// True for the kinds QoS counts (flush and reset are never held back).
fn qos_counted(kind: IoKind) -> bool {
    matches!(kind, IoKind::Read | IoKind::Write | IoKind::Unmap | IoKind::WriteZeroes)
}

/// A per-thread handle for submitting I/O to one bdev.
pub struct Channel {
    bdev: Arc<dyn Bdev>,
    module: Box<dyn ModuleChannel>,
    writable: bool,
    stats: Arc<BdevStats>,
    /// This channel's shard of the bdev's counters (folded into `stats` when the channel drops).
    shard: Arc<StatsShard>,
    /// Finished parents (and validation failures) waiting for `poll`.
    local_done: Vec<Completion>,
    /// Children waiting for the module (refused with NOMEM, or behind one that was), in order.
    queue: VecDeque<BdevIo>,
    /// Retry `queue` once `in_module` is at or below this (recorded at the last NOMEM).
    nomem_threshold: usize,
    /// Children handed to the module and not yet completed.
    in_module: usize,
    /// Parents in flight, indexed by parent id (a slab: no hashing, no allocation once warm).
    parents: Slab<Parent>,
    /// Children in flight: slot → (parent id, full tag). A child's tag is its slot in the low 32 bits
    /// and a generation in the high bits, so a stale or repeated completion is recognised. An
    /// unsplit read or write has no parent and no child: it is a direct I/O ([`DIRECT`]).
    children: Slab<(usize, u64)>,
    /// Direct I/O in flight ([`Channel::submit_direct`]).
    direct: Slab<Direct>,
    next_gen: u64,
    scratch: Vec<Completion>,
    /// Submission time of the current batch ([`Channel::set_batch_time`]); `None`: read the clock.
    batch_now: Option<u64>,
    /// Completion time of the completions being processed by `poll` (one clock read per poll).
    done_now: Option<u64>,
    control: Arc<BdevControl>,
    /// Parents held back by QoS, in submission order.
    parked: VecDeque<BdevIo>,
    /// The reset epoch this channel has caught up with.
    seen_epoch: u64,
}

impl Channel {
    pub(crate) fn new(
        bdev: Arc<dyn Bdev>,
        module: Box<dyn ModuleChannel>,
        writable: bool,
        stats: Arc<BdevStats>,
        control: Arc<BdevControl>,
    ) -> Self {
        let seen_epoch = control.reset_epoch.load(Ordering::Acquire);
        let shard = stats.shard();
        Self {
            shard,
            control,
            parked: VecDeque::new(),
            seen_epoch,
            bdev,
            module,
            writable,
            stats,
            local_done: Vec::new(),
            queue: VecDeque::new(),
            nomem_threshold: 0,
            in_module: 0,
            parents: Slab::new(),
            children: Slab::new(),
            direct: Slab::new(),
            next_gen: 0,
            scratch: Vec::new(),
            batch_now: None,
            done_now: None,
        }
    }

    /// A new child of parent `id`; returns its tag.
    fn new_child(&mut self, id: usize) -> u64 {
        self.next_gen = self.next_gen.wrapping_add(1);
        let entry = self.children.vacant_entry();
        // 31 bits of generation: the top bit is `DIRECT`'s (after 2^31 I/O on this channel an
        // unmasked generation would set it, and the completion would be taken for a direct I/O's).
        let tag = ((self.next_gen & GEN31) << 32) | (entry.key() as u64 & 0xffff_ffff);
        entry.insert((id, tag));
        tag
    }

    /// Stamps the parents submitted from now on with `now` as their start time, until the next call
    /// (a poller calls it once per batch: one clock read per batch instead of one per request).
    /// Without it every parent reads the clock itself.
    pub fn set_batch_time(&mut self, now: Instant) {
        self.set_batch_stamp(nanos(now));
    }

    /// [`Channel::set_batch_time`] with the instant already converted (a stacked module's channels
    /// under it: one conversion per batch for the whole stack).
    pub(crate) fn set_batch_stamp(&mut self, now_ns: u64) {
        self.batch_now = Some(now_ns);
        self.module.set_batch_stamp(now_ns);
    }

    /// Moves the generation counter (tests: what happens after 2^31 I/O on one channel).
    #[cfg(test)]
    pub(crate) fn set_next_gen(&mut self, g: u64) {
        self.next_gen = g;
    }

    fn start_time(&self) -> u64 {
        self.batch_now.unwrap_or_else(|| nanos(Instant::now()))
    }

    /// Submits an I/O. Never blocks and never completes inline: the outcome comes from `poll`.
    pub fn submit(&mut self, io: BdevIo) {
        self.shard.submitted();
        if let Err(e) = self.validate(self.bdev.info(), &io) {
            self.fail_now(io.kind, io.tag, e);
            return;
        }
        self.catch_up_reset();
        if io.kind == IoKind::Reset {
            self.start_reset(io);
            return;
        }
        if self.control.frozen() {
            self.fail_now(io.kind, io.tag, IoError::Aborted);
            return;
        }
        if qos_counted(io.kind) && self.control.qos.enabled() {
            let bytes = if matches!(io.kind, IoKind::Read | IoKind::Write) {
                io.num_blocks * u64::from(self.bdev.info().block_size)
            } else {
                0
            };
            if !self.parked.is_empty() || !self.control.qos.try_admit(bytes, Instant::now()) {
                self.parked.push_back(io);
                return;
            }
        }
        self.start(io);
    }

    /// Submits a read or write that needs nothing of the general path straight to the module: in
    /// range, of the right length, unsplit, aligned, on a writable descriptor for a write, with no
    /// QoS limit, reset or queued work on this channel. (A reset since this channel last looked
    /// would only fail queued or parked work, and there is none.) Its completion comes out of [`Channel::poll`]
    /// with `io.tag` and is counted in the statistics like any other. For stacked modules on the
    /// bdev under them (a cache's hits): a lighter record than a parent's and no validation pass.
    /// Gives `io` back untouched when the general path is needed ([`Channel::submit`]).
    pub fn submit_direct(&mut self, io: BdevIo) -> Result<(), BdevIo> {
        let info = self.bdev.info();
        if !taken_as_is(info, self.writable, &self.control, &io)
            || !self.queue.is_empty()
            || !self.parked.is_empty()
        {
            return Err(io);
        }
        self.shard.submitted();
        self.start_direct(io);
        Ok(())
    }

    /// Sends an admitted unsplit, unbounced read or write to the module with a direct record.
    fn start_direct(&mut self, io: BdevIo) {
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = (self.next_gen & GEN31) as u32;
        let start = self.start_time();
        let entry = self.direct.vacant_entry();
        let ctag = DIRECT | u64::from(gen) << 32 | (entry.key() as u64 & 0xffff_ffff);
        entry.insert(Direct { tag: io.tag, start, bytes: io.bufs.len_bytes(), gen, kind: io.kind });
        self.dispatch(BdevIo { tag: ctag, ..io });
    }

    /// A direct I/O completed.
    fn direct_done(&mut self, ctag: u64, result: Result<(), IoError>) {
        let slot = (ctag & 0xffff_ffff) as usize;
        let gen = ((ctag >> 32) & GEN31) as u32;
        if !self.direct.get(slot).is_some_and(|d| d.gen == gen) {
            log::warn!("bdev '{}': completion for unknown tag {ctag}", self.bdev.info().name);
            return;
        }
        let d = self.direct.remove(slot);
        let end = self.done_now.unwrap_or_else(|| nanos(Instant::now()));
        self.record(Sample {
            kind: d.kind,
            bytes: d.bytes,
            latency_ns: end.saturating_sub(d.start),
            ok: result.is_ok(),
        });
        self.local_done.push(Completion { tag: d.tag, result });
    }

    /// Fails a parent that never started.
    fn fail_now(&mut self, kind: IoKind, tag: u64, e: IoError) {
        self.record(Sample { kind, bytes: 0, latency_ns: 0, ok: false });
        self.local_done.push(Completion { tag, result: Err(e) });
    }

    /// Fails this channel's queued work when a reset happened since we last looked.
    fn catch_up_reset(&mut self) {
        let epoch = self.control.reset_epoch.load(Ordering::Acquire);
        if epoch == self.seen_epoch {
            return;
        }
        self.seen_epoch = epoch;
        while let Some(io) = self.parked.pop_front() {
            self.fail_now(io.kind, io.tag, IoError::Aborted);
        }
        while let Some(child) = self.queue.pop_front() {
            self.child_done(child.tag, Err(IoError::Aborted));
        }
    }

    /// A reset: freeze the bdev, abort queued work everywhere, then pass it to the module (if it
    /// resets) and unfreeze when it completes.
    fn start_reset(&mut self, io: BdevIo) {
        self.control.frozen.store(true, Ordering::Release);
        self.control.reset_epoch.fetch_add(1, Ordering::AcqRel);
        self.catch_up_reset();
        let parent = Parent {
            tag: io.tag,
            kind: IoKind::Reset,
            bytes: 0,
            start: self.start_time(),
            pending: 0,
            error: None,
            copy_out: None,
            wz_next: 0,
            wz_end: 0,
        };
        let id = self.parents.insert(parent);
        if !self.bdev.info().supports.reset {
            self.finish(id);
            return;
        }
        if let Some(p) = self.parents.get_mut(id) {
            p.pending = 1;
        }
        let child = BdevIo { tag: self.new_child(id), ..io };
        // Straight to the module: the NOMEM queue was just emptied by the abort.
        self.try_module(child);
    }

    /// Starts an admitted parent: bounce, split or emulate, hand children to the module.
    fn start(&mut self, io: BdevIo) {
        let bdev = &self.bdev;
        let info = bdev.info();
        let bs = u64::from(info.block_size);
        // The common case first: a read or write that needs no bounce and no split goes to the module
        // as it came, with a direct record instead of a parent.
        if goes_as_is(info, &io) {
            self.start_direct(io);
            return;
        }
        let mut parent = Parent {
            tag: io.tag,
            kind: io.kind,
            bytes: if matches!(io.kind, IoKind::Flush | IoKind::Reset) { 0 } else { io.num_blocks * bs },
            start: self.start_time(),
            pending: 0,
            error: None,
            copy_out: None,
            wz_next: 0,
            wz_end: 0,
        };
        // Inline for one child: no allocation.
        let mut children: SmallVec<[BdevIo; 1]> = SmallVec::new();
        match io.kind {
            IoKind::Read | IoKind::Write if io.num_blocks > 0 => {
                let mut bufs = io.bufs;
                let align = info.buf_align.max(1) as usize;
                if align > 1 && !bufs.is_aligned(align) {
                    let len = bufs.len_bytes();
                    let tmp = IoVecs::alloc(len as usize);
                    if io.kind == IoKind::Write {
                        let dst = tmp.as_iovecs()[0].iov_base.cast::<u8>();
                        // SAFETY: `tmp` is a fresh private buffer of `len` bytes, distinct from `bufs`.
                        unsafe { bufs.copy_to_raw(0, dst, len as usize) };
                    } else {
                        let tmp_view = tmp.slice(0, len).expect("whole buffer");
                        parent.copy_out = Some(Box::new((bufs, tmp_view)));
                    }
                    bufs = tmp;
                }
                let mut off = io.offset_blocks;
                let end = io.offset_blocks + io.num_blocks;
                if next_len(info, off, io.num_blocks) == io.num_blocks {
                    children.push(BdevIo {
                        kind: io.kind,
                        offset_blocks: off,
                        num_blocks: io.num_blocks,
                        bufs,
                        tag: 0,
                    });
                } else {
                    while off < end {
                        let n = next_len(info, off, end - off);
                        let b = bufs.slice((off - io.offset_blocks) * bs, n * bs).expect("validated length");
                        children.push(BdevIo {
                            kind: io.kind,
                            offset_blocks: off,
                            num_blocks: n,
                            bufs: b,
                            tag: 0,
                        });
                        off += n;
                    }
                }
            }
            IoKind::Read | IoKind::Write => {}
            IoKind::WriteZeroes if !info.supports.write_zeroes => {
                parent.wz_next = io.offset_blocks;
                parent.wz_end = io.offset_blocks + io.num_blocks;
            }
            IoKind::WriteZeroes if info.max_write_zeroes_blocks > 0 => {
                let mut off = io.offset_blocks;
                let end = io.offset_blocks + io.num_blocks;
                while off < end {
                    let n = (end - off).min(info.max_write_zeroes_blocks);
                    children.push(BdevIo::no_data(IoKind::WriteZeroes, off, n, 0));
                    off += n;
                }
            }
            IoKind::WriteZeroes if io.num_blocks == 0 => {}
            // (Its tag is set below, like every child's.)
            IoKind::WriteZeroes | IoKind::Unmap | IoKind::Flush | IoKind::Reset => children.push(io),
        }
        parent.pending = children.len();
        let emulate = parent.wz_next < parent.wz_end;
        let id = self.parents.insert(parent);
        if emulate {
            self.issue_wz_step(id);
            return;
        }
        if children.is_empty() {
            self.finish(id);
            return;
        }
        for mut child in children {
            child.tag = self.new_child(id);
            self.dispatch(child);
        }
    }

    /// Issues the next emulated write_zeroes child of parent `id`.
    fn issue_wz_step(&mut self, id: usize) {
        let bdev = self.bdev.clone();
        let info = bdev.info();
        let bs = u64::from(info.block_size);
        let Some(p) = self.parents.get_mut(id) else { return };
        let off = p.wz_next;
        let n = next_len(info, off, p.wz_end - off).min(ZERO_BUF_BYTES as u64 / bs);
        p.wz_next += n;
        p.pending = 1;
        let ctag = self.new_child(id);
        let bufs = IoVecs::from_aligned(zero_buf()).slice(0, n * bs).expect("within the zero buffer");
        self.dispatch(BdevIo::write(off, n, bufs, ctag));
    }

    /// Sends a child to the module, or queues it behind earlier refused ones.
    fn dispatch(&mut self, child: BdevIo) {
        if !self.queue.is_empty() {
            self.queue.push_back(child);
            return;
        }
        self.try_module(child);
    }

    /// Hands a child to the module; false when it was refused with NOMEM (it is then at the queue head).
    fn try_module(&mut self, child: BdevIo) -> bool {
        match self.module.submit(child) {
            Ok(()) => {
                self.in_module += 1;
                true
            }
            Err(Rejected::NoMem(child)) => {
                self.queue.push_front(child);
                self.nomem_threshold =
                    (self.in_module / 2).max(self.in_module.saturating_sub(NOMEM_THRESHOLD_COUNT));
                false
            }
            Err(Rejected::Failed(child, e)) => {
                self.child_done(child.tag, Err(e));
                true
            }
        }
    }

    /// Retries queued children once enough module I/O has completed (SPDK `_spdk_bdev_ch_retry_io`).
    fn retry_queue(&mut self) {
        if self.queue.is_empty() || self.in_module > self.nomem_threshold {
            return;
        }
        while let Some(child) = self.queue.pop_front() {
            if !self.try_module(child) {
                break;
            }
        }
    }

    /// The parent of the child with tag `ctag` (the child is forgotten); `None` for an unknown,
    /// stale or repeated tag.
    fn take_child(&mut self, ctag: u64) -> Option<usize> {
        let slot = (ctag & 0xffff_ffff) as usize;
        match self.children.get(slot) {
            Some(&(id, tag)) if tag == ctag => {
                self.children.remove(slot);
                Some(id)
            }
            _ => None,
        }
    }

    fn child_done(&mut self, ctag: u64, result: Result<(), IoError>) {
        if ctag & DIRECT != 0 {
            self.direct_done(ctag, result);
            return;
        }
        let Some(id) = self.take_child(ctag) else {
            log::warn!("bdev '{}': completion for unknown tag {ctag}", self.bdev.info().name);
            return;
        };
        let Some(p) = self.parents.get_mut(id) else { return };
        if let Err(e) = result {
            p.error.get_or_insert(e);
        }
        p.pending -= 1;
        if p.pending > 0 {
            return;
        }
        if p.error.is_none() && p.wz_next < p.wz_end {
            self.issue_wz_step(id);
        } else {
            self.finish(id);
        }
    }

    fn finish(&mut self, id: usize) {
        let Some(p) = self.parents.try_remove(id) else { return };
        if p.kind == IoKind::Reset {
            self.control.frozen.store(false, Ordering::Release);
        }
        let result = match p.error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if let (Ok(()), Some((orig, tmp))) = (result, p.copy_out.as_deref()) {
            let src = tmp.as_iovecs()[0].iov_base.cast::<u8>();
            // SAFETY: `tmp` is our contiguous bounce buffer of the same length, distinct from `orig`.
            unsafe { orig.copy_from_raw(0, src, tmp.len_bytes() as usize) };
        }
        let end = self.done_now.unwrap_or_else(|| nanos(Instant::now()));
        let latency_ns = end.saturating_sub(p.start);
        self.record(Sample { kind: p.kind, bytes: p.bytes, latency_ns, ok: result.is_ok() });
        self.local_done.push(Completion { tag: p.tag, result });
    }

    fn record(&mut self, s: Sample) {
        self.shard.record(s);
    }

    fn validate(&self, info: &BdevInfo, io: &BdevIo) -> Result<(), IoError> {
        validate(info, self.writable, io)
    }

    /// Appends finished I/O to `done`; returns how many were appended.
    pub fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        let before = done.len();
        let mut scratch = std::mem::take(&mut self.scratch);
        self.module.poll(&mut scratch);
        self.in_module = self.in_module.saturating_sub(scratch.len());
        // One clock read for the whole completion batch.
        self.done_now = if scratch.is_empty() {
            None
        } else {
            Some(self.module.completion_stamp().unwrap_or_else(|| nanos(Instant::now())))
        };
        for c in scratch.drain(..) {
            self.child_done(c.tag, c.result);
        }
        if let (Some(t), Some(_)) = (self.done_now, self.batch_now) {
            // A batch-clocked owner submits from here until its next batch (e.g. a flush after a
            // write): those start now.
            self.batch_now = Some(t);
        }
        self.done_now = None;
        self.scratch = scratch;
        self.catch_up_reset();
        self.retry_queue();
        self.release_parked();
        done.append(&mut self.local_done);
        done.len() - before
    }

    /// Starts QoS-parked parents, oldest first, while the current slice admits them.
    fn release_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let bs = u64::from(self.bdev.info().block_size);
        let now = Instant::now();
        while let Some(io) = self.parked.front() {
            let bytes = if matches!(io.kind, IoKind::Read | IoKind::Write) { io.num_blocks * bs } else { 0 };
            // Limits lifted at run time release everything at once.
            if self.control.qos.enabled() && !self.control.qos.try_admit(bytes, now) {
                break;
            }
            if let Some(io) = self.parked.pop_front() {
                self.start(io);
            }
        }
    }

    /// I/O submitted and not yet returned by `poll` (including queued, parked and locally failed ones).
    pub fn outstanding(&self) -> usize {
        self.parents.len() + self.direct.len() + self.local_done.len() + self.parked.len()
    }

    /// When I/O is parked by QoS: the instant `poll` can release more (no fd signals it).
    pub fn parked_until(&self) -> Option<Instant> {
        if self.parked.is_empty() {
            None
        } else {
            Some(self.control.qos.next_slice_start(Instant::now()))
        }
    }

    /// An fd an idle poller may sleep on for this channel's completions.
    pub fn wait_fd(&self) -> Option<RawFd> {
        self.module.wait_fd()
    }

    /// The owner is about to sleep on [`Channel::wait_fd`] (see [`ModuleChannel::before_sleep`]).
    /// Only a channel with nothing in the module, queued or parked polls its module once, to clear a
    /// stale signal (a busy one keeps the signals it will act on: a module's "room again" wake-up
    /// for queued I/O must reach `poll`). Returns true when there is work after all (the owner
    /// polls again instead of sleeping).
    pub fn before_sleep(&mut self) -> bool {
        if !self.local_done.is_empty() {
            return true;
        }
        if self.in_module == 0 && self.queue.is_empty() && self.parked.is_empty() {
            let mut scratch = std::mem::take(&mut self.scratch);
            self.module.poll(&mut scratch);
            for c in scratch.drain(..) {
                self.child_done(c.tag, c.result);
            }
            self.scratch = scratch;
        }
        let more = self.module.before_sleep();
        more || !self.local_done.is_empty()
    }

    /// Submits `io` and blocks until a request of this channel completes; returns that result. For
    /// start-up and metadata paths that keep one request in flight (never a poller's hot path).
    pub fn submit_and_wait(&mut self, io: BdevIo) -> Result<(), IoError> {
        self.submit(io);
        let mut done: Vec<Completion> = Vec::new();
        loop {
            if self.poll(&mut done) > 0 {
                return done[0].result;
            }
            if let Some(fd) = self.wait_fd() {
                let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd on the stack, for the duration of the call.
                unsafe { libc::poll(&mut p, 1, 10) };
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// The bdev.
    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    /// This channel's own counters (the bdev-wide ones are in [`super::Descriptor::stats`]).
    pub fn stats(&self) -> BdevStatsSnapshot {
        self.shard.snapshot()
    }
}

/// The checks every I/O passes before it reaches a module (SPDK's order: direction, support, range,
/// length).
fn validate(info: &BdevInfo, writable: bool, io: &BdevIo) -> Result<(), IoError> {
    let is_write = matches!(io.kind, IoKind::Write | IoKind::Unmap | IoKind::WriteZeroes);
    if is_write && !writable {
        return Err(IoError::ReadOnly);
    }
    if !info.io_kind_supported(io.kind) {
        return Err(IoError::Unsupported);
    }
    if matches!(io.kind, IoKind::Flush | IoKind::Reset) {
        return Ok(());
    }
    let end = io.offset_blocks.checked_add(io.num_blocks).ok_or(IoError::InvalidRange)?;
    if end > info.num_blocks {
        return Err(IoError::InvalidRange);
    }
    if io.kind == IoKind::Unmap && io.num_blocks == 0 {
        return Err(IoError::InvalidRange);
    }
    if matches!(io.kind, IoKind::Read | IoKind::Write) {
        let want = io.num_blocks.checked_mul(u64::from(info.block_size)).ok_or(IoError::InvalidRange)?;
        if io.bufs.len_bytes() != want {
            return Err(IoError::InvalidRange);
        }
    }
    Ok(())
}

/// True when `io` may go to the module as it is, past the general path: valid on a descriptor that is
/// `writable` or not, needing no bounce or split, with no QoS limit and no reset in progress (what
/// [`Channel::submit_direct`] and [`Lane::submit`] both require).
fn taken_as_is(info: &BdevInfo, writable: bool, control: &BdevControl, io: &BdevIo) -> bool {
    goes_as_is(info, io)
        && validate(info, writable, io).is_ok()
        && !control.frozen()
        && !control.qos.enabled()
}

/// True for a read or write of at least one block that needs no bounce and no split: it can go to
/// the module as it came (a direct I/O).
fn goes_as_is(info: &BdevInfo, io: &BdevIo) -> bool {
    matches!(io.kind, IoKind::Read | IoKind::Write)
        && io.num_blocks > 0
        && (info.buf_align <= 1 || io.bufs.is_aligned(info.buf_align as usize))
        && next_len(info, io.offset_blocks, io.num_blocks) == io.num_blocks
}

/// Blocks of a read/write child starting at `off`, at most `remaining`, not crossing the optimal
/// boundary (when splitting on it) and at most `max_io_blocks`.
fn next_len(info: &BdevInfo, off: u64, remaining: u64) -> u64 {
    let mut n = remaining;
    if info.split_on_optimal_io_boundary && info.optimal_io_boundary_blocks > 0 {
        let b = u64::from(info.optimal_io_boundary_blocks);
        n = n.min(b - off % b);
    }
    if info.max_io_blocks > 0 {
        n = n.min(u64::from(info.max_io_blocks));
    }
    n
}

impl Drop for Channel {
    fn drop(&mut self) {
        // What this channel counted stays in the bdev's statistics.
        self.stats.retire(&self.shard);
    }
}

/// A stacked module's fast lane to the bdev under it (a cache's read hits): a module channel of its
/// own that takes a plain read or write as it is, with none of [`Channel`]'s machinery (no parent or
/// direct record, no split, bounce, NOMEM queue, QoS or reset handling). Whatever needs any of that
/// is given back, for the caller's [`Channel`]. Each I/O is still validated and counted in the bdev's
/// statistics, latency included: the lane keeps no record per I/O, so the caller reports each
/// completion's size and start with [`Lane::account`] (its own record of the I/O has them).
///
/// Completions come out of [`Lane::poll`] with the caller's tag. The caller polls its lane and its
/// channel, and sleeps on both `wait_fd`s.
pub struct Lane {
    bdev: Arc<dyn Bdev>,
    module: Box<dyn ModuleChannel>,
    writable: bool,
    stats: Arc<BdevStats>,
    shard: Arc<StatsShard>,
    control: Arc<BdevControl>,
    /// I/O in the module (and completions in `early`).
    out: usize,
    /// Completions a `before_sleep` found (none are expected: the lane was idle), for the next poll.
    early: Vec<Completion>,
    /// Start stamp of what is submitted now ([`Lane::set_batch_stamp`], moved on by `poll` like a
    /// [`Channel`]'s); `None`: read the clock per I/O.
    batch_now: Option<u64>,
    /// Completion time of the last `poll`'s completions (one clock read per poll).
    done_now: u64,
    /// For a bdev that takes any read as it comes (no buffer alignment, split or size limit: fixed
    /// for the bdev's life), what a read must match, checked without the general test: its size in
    /// blocks and its block size.
    plain_read: Option<(u64, u64)>,
}

impl Lane {
    pub(crate) fn new(
        bdev: Arc<dyn Bdev>,
        module: Box<dyn ModuleChannel>,
        writable: bool,
        stats: Arc<BdevStats>,
        control: Arc<BdevControl>,
    ) -> Self {
        let shard = stats.shard();
        let info = bdev.info();
        let plain_read = (info.buf_align <= 1
            && info.max_io_blocks == 0
            && !(info.split_on_optimal_io_boundary && info.optimal_io_boundary_blocks > 0))
            .then(|| (info.num_blocks, u64::from(info.block_size)));
        Self {
            bdev,
            module,
            writable,
            stats,
            shard,
            control,
            out: 0,
            early: Vec::new(),
            batch_now: None,
            done_now: 0,
            plain_read,
        }
    }

    /// True when `io` may go to the module as it is (see [`taken_as_is`]), for a read on a bdev
    /// that needs no bounce or split (`plain_read`) by a shorter test that means the same.
    fn takes(&self, io: &BdevIo) -> bool {
        match self.plain_read {
            Some((num_blocks, bs)) if io.kind == IoKind::Read => {
                io.num_blocks > 0
                    && io.offset_blocks.checked_add(io.num_blocks).is_some_and(|end| end <= num_blocks)
                    && io.num_blocks.checked_mul(bs) == Some(io.bufs.len_bytes())
                    && !self.control.frozen()
                    && !self.control.qos.enabled()
            }
            _ => taken_as_is(self.bdev.info(), self.writable, &self.control, io),
        }
    }

    /// Stamps what is submitted from now on with `now_ns` (see [`Channel::set_batch_stamp`]).
    pub(crate) fn set_batch_stamp(&mut self, now_ns: u64) {
        self.batch_now = Some(now_ns);
    }

    /// Sends `io` to the module when it is a valid, plain read or write that needs no split or bounce,
    /// no QoS limit applies and no reset is in progress; gives it back otherwise (also when the module
    /// refuses it). Never completes inline.
    pub fn submit(&mut self, io: BdevIo) -> Result<(), BdevIo> {
        if !self.takes(&io) {
            return Err(io);
        }
        match self.module.submit(io) {
            Ok(()) => {
                self.shard.submitted();
                self.out += 1;
                Ok(())
            }
            Err(Rejected::NoMem(io) | Rejected::Failed(io, _)) => Err(io),
        }
    }

    /// The start stamp of an I/O submitted now, for [`Lane::account`]: the batch time, or the clock.
    pub fn stamp(&self) -> u64 {
        self.batch_now.unwrap_or_else(|| nanos(Instant::now()))
    }

    /// Appends finished I/O to `done` (the callers' tags); returns how many.
    pub fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        if self.out == 0 {
            return 0;
        }
        let early = self.early.len();
        done.append(&mut self.early);
        let n = self.module.poll(done) + early;
        if n > 0 {
            self.out = self.out.saturating_sub(n);
            self.done_now = nanos(Instant::now());
            if self.batch_now.is_some() {
                // What the owner submits from its poll starts now.
                self.batch_now = Some(self.done_now);
            }
        }
        n
    }

    /// Records a completed lane I/O in the bdev's statistics: `bytes` of `kind`, started at `start`
    /// ([`Lane::stamp`] when it was submitted), completed by the last [`Lane::poll`].
    pub fn account(&self, kind: IoKind, bytes: u64, start: u64, ok: bool) {
        self.shard.record(Sample { kind, bytes, latency_ns: self.done_now.saturating_sub(start), ok });
    }

    /// When the last `poll` that returned completions read the clock (see [`Lane::account`]).
    pub fn done_stamp(&self) -> u64 {
        self.done_now
    }

    /// I/O submitted and not yet returned by `poll`.
    pub fn outstanding(&self) -> usize {
        self.out
    }

    /// An fd an idle poller may sleep on for this lane's completions.
    pub fn wait_fd(&self) -> Option<RawFd> {
        self.module.wait_fd()
    }

    /// The owner is about to sleep on [`Lane::wait_fd`]: with nothing in the module, one module
    /// poll clears a stale signal (see [`ModuleChannel::before_sleep`]). Anything it returns anyway
    /// is kept for the next `poll`; true then (poll again instead of sleeping).
    pub fn before_sleep(&mut self) -> bool {
        if self.out == 0 {
            let n = self.module.poll(&mut self.early);
            self.out += n;
        }
        self.module.before_sleep() || !self.early.is_empty()
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.stats.retire(&self.shard);
    }
}
