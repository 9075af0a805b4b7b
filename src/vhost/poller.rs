//! Per-queue poller: pops chains, submits bdev I/O without waiting, completes out of order.
//!
//! ```text
//!  kick / completion fd ─► handle_event ─► run_group: loop over the thread's queues {
//!        prepare (ring checks) ; pass: pop+parse+submit (≤ one ring's worth) ; reap ─► status, used ; signal }
//!                                            └─ idle for poll_us: enable notifications, re-check, return
//! ```
//!
//! # Design
//! One [`Worker`] per virtqueue; a vhost-user-backend worker thread serves one or several queues
//! (`poll-threads`, [`run_group`]). The worker lazily opens its own [`Channel`] on first use, so
//! channels are created on the thread that uses them. Requests that never reach the bdev (parse
//! errors, GET_ID, flush on a device without a volatile cache) go through the same
//! [`Worker::finish`] path as bdev completions.
//!
//! The per-request path (issue 10):
//! * in-flight records live in a slab; a request's tag is its slot (low 32 bits) plus a generation
//!   (high bits), so a completion finds its record by index and a stale tag is recognised;
//! * the head comes from the checked avail-ring read ([`avail_peek`]) and the chain is walked from it
//!   ([`ChainWalker`], virtio-queue's rules) with descriptor reads through a one-region cache
//!   ([`RegionCache`]): one region look-up per chain instead of one per access;
//! * one clock read per submission batch (the channel stamps every request of a pass with it) and one
//!   per completion batch (in `Channel::poll`);
//! * a completion batch is published under one vring lock (status bytes through one region cache)
//!   with one notification decision (`EVENT_IDX`) at the end;
//! * no heap allocation per request once warm (inline descriptor, segment and iovec lists; the
//!   completion vector is reused): `tests/alloc_free.rs` counts them.
//!
//! With `wce = 0` (write-through selected by the driver) on a bdev with a volatile cache, a write is
//! followed by a flush before it is reported.
//!
//! # The avail ring is untrusted (virtio 1.2 §2.7, QEMU `virtqueue_num_heads`/`virtqueue_get_head`)
//! Before popping, the worker reads the avail index itself: an index more than the queue size ahead
//! of what was consumed, a head index outside the queue, or an avail ring that cannot be read marks
//! the queue **broken**: logged once, never processed again (no descriptor is read, no used element
//! written, no spinning) until the frontend stops the ring (`GET_VRING_BASE` → [`Worker::drain`]) or
//! re-initialises it with other addresses or size. Other queues and the vhost-user socket are not
//! affected: the worker returns at once, so its mutex is free for `stop_vring`. Per-request warnings
//! go through a per-queue [`RateLimit`].
//!
//! virtio-queue 0.18 on its own refuses to pop when the index runs ahead (its `AvailIter::new`), while
//! `enable_notification` keeps reporting "new work": the poller used to spin forever holding this
//! worker's mutex, and `GET_VRING_BASE` (which drains through that mutex while holding the
//! vhost-user handler lock) then blocked the whole connection.
//!
//! # Limitations
//! * A bdev channel without a `wait_fd` that has I/O outstanding keeps the worker polling
//!   (yielding the CPU between polls) until that I/O completes.

use slab::Slab;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, warn};
use std::sync::atomic::{AtomicU8, Ordering};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::chain::ChainWalker;
use super::config::BlkConfig;
use super::fastmem::RegionCache;
use super::inflight::InflightRegion;
use super::ratelimit::RateLimit;
use super::request::{write_id, BadRequest, GuestMem, Request, RequestKind, ID_BYTES, SECTOR_SIZE};
use super::spin::SpinBudget;
use crate::bdev::{BdevIo, Channel, Completion, Descriptor, IoError, IoKind, IoVecs};

/// Guest memory as shared with vhost-user-backend.
pub type Gm = GuestMemoryAtomic<GuestMem>;
/// The vring type the device uses.
pub type Vring = VringRwLock<Gm>;

/// How long `drain` waits for in-flight I/O before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Facts every worker of one connection shares (read-only after creation, except atomics).
pub struct PollCtx<'a> {
    /// The exported bdev.
    pub desc: &'a Descriptor,
    /// Device configuration.
    pub cfg: &'a BlkConfig,
    /// GET_ID answer.
    pub serial: &'a [u8; ID_BYTES],
    /// The device's `wce` (1 = write-back), read per write request: a guest's config write takes
    /// effect for the next request even while this poller keeps running.
    pub wce: &'a AtomicU8,
    /// Busy-poll time before sleeping.
    pub poll: Duration,
    /// This worker's epoll fd (for registering the channel's completion fd).
    pub epoll_fd: Option<RawFd>,
    /// Epoll data value of queue 0's completion events (queue `q` uses this + `q`; all are above
    /// `num_queues`, which vhost-user-backend reserves).
    pub completion_event_base: u64,
    /// The in-flight table (INFLIGHT_SHMFD), when the frontend set one up.
    pub inflight: Option<Arc<InflightRegion>>,
}

struct InFlight {
    /// The full tag handed to the channel: slab slot in the low 32 bits, a generation above.
    tag: u64,
    head: u16,
    status_addr: GuestAddress,
    used_len: u32,
    flush_after: bool,
}

/// What identifies one set-up of a vring (a change means the frontend re-initialised it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingKey {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    ready: bool,
}

/// Why a queue was marked broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The avail index is more than the queue size ahead of the next chain to consume.
    #[error("avail index {avail} is {ahead} entries ahead of the next one ({next}), more than the queue size {size}")]
    IndexTooFarAhead {
        /// Avail index read from the ring.
        avail: u16,
        /// Next avail index the device consumes.
        next: u16,
        /// Entries ahead.
        ahead: u16,
        /// Queue size.
        size: u16,
    },
    /// A head index in the avail ring is not below the queue size.
    #[error("head index {head} in the avail ring is outside the queue (size {size})")]
    HeadOutOfRange {
        /// The head index.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// The avail ring could not be read.
    #[error("the avail ring cannot be read")]
    Unreadable,
}

/// The chains the avail ring offers beyond what was consumed and the head of the next one, checked
/// as an untrusted ring must be (virtio 1.2 §2.7; QEMU `virtqueue_num_heads` / `virtqueue_get_head`):
/// the index may run at most the queue size ahead, and the next head must lie inside the queue.
/// `None` when nothing is pending, else (chains pending, next head). Used by the poller before
/// every pop (and fuzzed: `fuzz/`, target `avail_ring`).
pub fn avail_peek<Q: QueueT>(q: &Q, mem: &GuestMem) -> Result<Option<(u16, u16)>, RingError> {
    let size = q.size();
    let next = q.next_avail();
    let avail = q.avail_idx(mem, Ordering::Acquire).map_err(|_| RingError::Unreadable)?.0;
    if avail == next {
        return Ok(None);
    }
    let ahead = avail.wrapping_sub(next);
    if ahead > size {
        return Err(RingError::IndexTooFarAhead { avail, next, ahead, size });
    }
    // The head of the next chain (virtio-queue does not check it against the queue size).
    let slot = u64::from(next % size.max(1));
    let head = GuestAddress(q.avail_ring())
        .checked_add(4 + 2 * slot)
        .and_then(|a| mem.read_obj::<u16>(a).ok())
        .map(u16::from_le)
        .ok_or(RingError::Unreadable)?;
    if head >= size {
        return Err(RingError::HeadOutOfRange { head, size });
    }
    Ok(Some((ahead, head)))
}

/// Why an idle queue keeps its poller awake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Nothing: the queue can sleep on its kick and completion fds.
    No,
    /// Completions will come without an fd to wake us: keep polling (politely).
    Poll,
    /// QoS parked requests until this instant.
    Until(Instant),
}

/// The state of one queue's poller.
#[derive(Default)]
pub struct Worker {
    /// Guest notifications are off (we are polling this ring).
    quiet: bool,
    channel: Option<Channel>,
    channel_failed: bool,
    invalid_logged: bool,
    /// Last ring set-up checked with `is_valid` (with the memory it was checked against) and the result.
    checked: Option<(RingKey, usize, bool)>,
    /// The ring set-up that was found broken; nothing is processed while it stays in place.
    broken: Option<RingKey>,
    log: RateLimit,
    /// In-flight table of this connection and this worker's queue index in it.
    region: Option<Arc<InflightRegion>>,
    queue: u16,
    /// The ring start was handled (in-flight table initialised or recovered).
    started: bool,
    /// Next in-flight counter.
    counter: u64,
    /// Heads to resubmit (recovered from the in-flight table), in order.
    resubmit: std::collections::VecDeque<u16>,
    vring: Option<Vring>,
    /// In-flight requests, indexed by the low 32 bits of their tag (no hashing; no allocation once warm).
    inflight: Slab<InFlight>,
    next_gen: u64,
    /// The channel's batch clock was set during this pass.
    stamped: bool,
    done: Vec<Completion>,
    /// Spin budget of the poller thread whose group starts with this queue (see `super::spin`).
    spin: Option<SpinBudget>,
    /// When that thread ran out of work before it last went to sleep.
    asleep_since: Option<Instant>,
}

fn lock_worker(m: &Mutex<Worker>) -> MutexGuard<'_, Worker> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One poller thread's loop over the queues of its group (`poll-threads`): `group[j]` is the queue
/// index of `vrings[j]`, `workers` is indexed by queue. Each pass gives every queue one turn (at most
/// a ring's worth of chains, then its completions), each under its own worker mutex, so `stop_vring`
/// can drain a queue between passes. While any queue makes progress the thread keeps polling them
/// all; after `poll` without progress it re-arms every queue's notifications and returns, to sleep in
/// vhost-user-backend's epoll on the kick and completion fds of the whole group.
///
/// The clock is read only when a pass made no progress (to time the idle period), never per request.
pub fn run_group(ctx: &PollCtx<'_>, group: &[u16], vrings: &[Vring], workers: &[Mutex<Worker>], mem: &Gm) {
    // The thread's adaptive spin budget lives in the worker of its first queue.
    let owner = group.first().and_then(|&q| workers.get(usize::from(q)));
    let observe = |waited: Option<Duration>| -> Duration {
        owner.map_or(ctx.poll, |w| {
            let mut w = lock_worker(w);
            let slept = w.asleep_since.take();
            let s = w.spin.get_or_insert_with(|| SpinBudget::new(ctx.poll));
            if let Some(d) = waited.or_else(|| slept.map(|t| t.elapsed())) {
                s.observe(d);
            }
            s.budget()
        })
    };
    // Woken up: the wait lasted from running out of work until now.
    let mut budget = observe(None);
    let mut idle_since: Option<Instant> = None;
    loop {
        let mut progress = false;
        for (&q, vring) in group.iter().zip(vrings) {
            let Some(w) = workers.get(usize::from(q)) else { continue };
            let mut w = lock_worker(w);
            if let Some(key) = w.prepare(ctx, q, vring, mem) {
                progress |= w.pass(ctx, vring, mem, key);
            }
        }
        if progress {
            if let Some(since) = idle_since.take() {
                budget = observe(Some(since.elapsed()));
            }
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < budget {
            if group.len() == 1 {
                // A thread per queue gives the CPU away on an empty pass if anyone wants it (a guest's
                // vCPUs, a client, its sibling pollers on a small host). A thread serving several
                // queues keeps it: measured, yielding there cost it its turn for whole time slices.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        let mut hold = Hold::No;
        for &q in group {
            if let Some(w) = workers.get(usize::from(q)) {
                hold = match (hold, lock_worker(w).hold()) {
                    (Hold::Poll, _) | (_, Hold::Poll) => Hold::Poll,
                    (Hold::Until(a), Hold::Until(b)) => Hold::Until(a.min(b)),
                    (Hold::Until(a), Hold::No) | (Hold::No, Hold::Until(a)) => Hold::Until(a),
                    (Hold::No, Hold::No) => Hold::No,
                };
            }
        }
        match hold {
            Hold::Poll => {
                std::thread::yield_now();
                continue;
            }
            Hold::Until(at) => {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                continue;
            }
            Hold::No => {}
        }
        let mut again = false;
        for (&q, vring) in group.iter().zip(vrings) {
            if let Some(w) = workers.get(usize::from(q)) {
                again |= lock_worker(w).rearm(vring);
            }
        }
        if !again {
            let mut work = false;
            for &q in group {
                if let Some(w) = workers.get(usize::from(q)) {
                    work |= lock_worker(w).before_sleep();
                }
            }
            if work {
                // Something to deliver turned up while clearing stale signals: poll on.
                idle_since = None;
                continue;
            }
            if let Some(w) = owner {
                lock_worker(w).asleep_since = Some(since);
            }
            return;
        }
        idle_since = None;
    }
}

fn io_status(r: Result<(), IoError>) -> u8 {
    let s = match r {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(IoError::Unsupported) => VIRTIO_BLK_S_UNSUPP,
        Err(
            IoError::ReadOnly
            | IoError::InvalidRange
            | IoError::Errno(_)
            | IoError::Media(_)
            | IoError::Removed
            | IoError::Aborted,
        ) => VIRTIO_BLK_S_IOERR,
    };
    // Status constants are 0..=2.
    s as u8
}

impl Worker {
    /// True when requests are in flight.
    pub fn busy(&self) -> bool {
        !self.inflight.is_empty()
    }

    fn ensure_channel(&mut self, ctx: &PollCtx<'_>) {
        if self.channel.is_some() || self.channel_failed {
            return;
        }
        match ctx.desc.channel() {
            Ok(ch) => {
                if let (Some(fd), Some(epfd)) = (ch.wait_fd(), ctx.epoll_fd) {
                    let mut ev = libc::epoll_event {
                        events: libc::EPOLLIN as u32,
                        u64: ctx.completion_event_base + u64::from(self.queue),
                    };
                    // SAFETY: plain epoll_ctl on fds we own for the connection's lifetime; `ev` is a
                    // valid, initialised epoll_event.
                    let rc = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
                    if rc != 0 {
                        warn!("cannot register completion fd: {}", std::io::Error::last_os_error());
                    }
                }
                self.channel = Some(ch);
            }
            Err(e) => {
                error!("cannot open a channel on '{}': {e}", ctx.desc.info().name);
                self.channel_failed = true;
            }
        }
    }

    /// True when the queue was marked broken and not re-initialised since.
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    fn ring_key(vring: &Vring) -> (RingKey, bool) {
        let g = vring.get_ref();
        let q = g.get_queue();
        let key = RingKey {
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            size: q.size(),
            ready: q.ready(),
        };
        (key, g.is_enabled())
    }

    /// Gets the queue ready for a pass: checks the ring set-up (broken, not ready, not valid for the
    /// current memory), takes up an in-flight table at a ring start, opens the channel and turns guest
    /// notifications off. `None` when the queue must not be processed now (quietly for a ring that is
    /// not started or not enabled: a group poller looks at every queue of its group on every pass).
    pub fn prepare(&mut self, ctx: &PollCtx<'_>, queue: u16, vring: &Vring, mem: &Gm) -> Option<RingKey> {
        let (key, enabled) = Self::ring_key(vring);
        if !key.ready || !enabled {
            return None;
        }
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        if let Some(b) = self.broken {
            if b != key {
                // Re-initialised with another set-up: start afresh.
                self.broken = None;
            } else if !self.busy() {
                // Nothing more is taken from this ring and nothing is left to reap.
                return None;
            }
        }
        // A ring that does not fit in guest memory (or whose size the frontend set to an invalid
        // value, which virtio-queue ignores) is not processed at all. `is_valid` logs on every call,
        // so it runs once per ring set-up and memory table.
        let mem_id = Arc::as_ptr(&mem.memory().into_inner()) as usize;
        let valid = match self.checked {
            Some((k, m, v)) if k == key && m == mem_id => v,
            _ => {
                let v = vring.get_ref().get_queue().is_valid(&*mem.memory());
                self.checked = Some((key, mem_id, v));
                v
            }
        };
        if !valid {
            if !self.invalid_logged {
                error!("virtqueue is not valid for the current guest memory; ignoring it");
                self.invalid_logged = true;
            }
            return None;
        }
        self.invalid_logged = false;
        if !self.started {
            self.started = true;
            self.queue = queue;
            self.region = ctx.inflight.clone();
            if let Some(r) = self.region.clone() {
                self.recover(&r, vring, mem);
            }
        }
        self.ensure_channel(ctx);
        if !self.quiet {
            if let Err(e) = vring.disable_notification() {
                warn!("disable_notification: {e}");
            }
            self.quiet = true;
        }
        Some(key)
    }

    /// One pass over a prepared queue: pops at most one ring's worth of chains (so a queue never
    /// starves the others of its group), submits them, reaps completions. True on progress.
    pub fn pass(&mut self, ctx: &PollCtx<'_>, vring: &Vring, mem: &Gm, key: RingKey) -> bool {
        self.log.flush("virtqueue");
        let snapshot: Arc<GuestMem> = mem.memory().into_inner();
        let mut progress = self.pop_and_submit(ctx, vring, &snapshot, key);
        progress |= self.reap(vring, &snapshot);
        progress
    }

    /// Why an idle queue cannot sleep on its fds yet.
    pub fn hold(&self) -> Hold {
        if let Some(at) = self.channel.as_ref().and_then(Channel::parked_until) {
            // QoS holds requests until the next 1 ms slice: nothing signals that.
            return Hold::Until(at);
        }
        let outstanding = self.channel.as_ref().map_or(0, Channel::outstanding);
        if outstanding > 0 && self.channel.as_ref().and_then(Channel::wait_fd).is_none() {
            // Nobody will wake us for these completions.
            return Hold::Poll;
        }
        Hold::No
    }

    /// The thread is about to sleep: the bdev channel clears stale completion signals; true when
    /// it has work after all.
    fn before_sleep(&mut self) -> bool {
        self.channel.as_mut().is_some_and(Channel::before_sleep)
    }

    /// Turns guest notifications back on before sleeping; true when chains arrived meanwhile
    /// (notifications are then off again and the caller keeps polling).
    pub fn rearm(&mut self, vring: &Vring) -> bool {
        if !self.quiet {
            return false;
        }
        match vring.enable_notification() {
            Ok(true) => {
                if let Err(e) = vring.disable_notification() {
                    warn!("disable_notification: {e}");
                }
                true
            }
            Ok(false) => {
                self.quiet = false;
                false
            }
            Err(e) => {
                warn!("enable_notification: {e}");
                self.quiet = false;
                false
            }
        }
    }

    /// Checks the avail ring before anything is popped: returns how many chains may be taken, or marks
    /// the queue broken.
    fn next_head(&mut self, vring: &Vring, mem: &GuestMem, key: RingKey) -> Option<u16> {
        if self.broken.is_some() {
            return None;
        }
        let r = avail_peek(vring.get_ref().get_queue(), mem);
        match r {
            Ok(Some(_)) if key.avail == 0 => {
                // virtio-queue refuses to pop from a ring at address 0 (not set up): so do we.
                self.mark_broken(key, RingError::Unreadable);
                None
            }
            Ok(Some((_, head))) => Some(head),
            Ok(None) => None,
            Err(e) => {
                self.mark_broken(key, e);
                None
            }
        }
    }

    /// At a ring start with an in-flight table: initialise it, or take up what a previous
    /// incarnation left in flight (resubmitted before anything new is popped).
    fn recover(&mut self, r: &InflightRegion, vring: &Vring, mem: &Gm) {
        let used = match vring.get_ref().get_queue().used_idx(&*mem.memory(), Ordering::Acquire) {
            Ok(u) => u.0,
            Err(e) => {
                warn!("queue {}: cannot read the used index: {e}", self.queue);
                return;
            }
        };
        let rec = r.recover(self.queue, used);
        if let Some(next) = rec.next_avail {
            let mut g = vring.get_mut();
            let q = g.get_queue_mut();
            q.set_next_avail(next);
            q.set_next_used(used);
        }
        self.counter = rec.next_counter;
        if !rec.resubmit.is_empty() {
            log::info!(
                "queue {}: resubmitting {} requests left in flight (used idx {used})",
                self.queue,
                rec.resubmit.len()
            );
        }
        self.resubmit = rec.resubmit.into();
        if rec.next_avail.is_some() {
            // The previous incarnation may have published used elements without signalling them:
            // one interrupt now (spurious at worst) so the guest does not wait for it forever.
            if let Err(e) = vring.signal_used_queue() {
                warn!("signal_used_queue: {e}");
            }
        }
    }

    fn mark_broken(&mut self, key: RingKey, why: RingError) -> u16 {
        error!(
            "virtqueue (desc {:#x}) marked broken: {why}; it is not processed until the frontend resets it",
            key.desc
        );
        self.broken = Some(key);
        0
    }

    /// Pops every available chain, parses and submits it. Returns true when anything was popped.
    fn pop_and_submit(
        &mut self,
        ctx: &PollCtx<'_>,
        vring: &Vring,
        mem: &Arc<GuestMem>,
        key: RingKey,
    ) -> bool {
        let mut any = false;
        let mut used = false;
        self.stamped = false;
        let keep = mem;
        let inf = self.region.clone();
        let inf = inf.as_deref().map(|r| (r, self.queue));
        // Requests a previous incarnation left in flight go first, in their original order (they
        // are still marked in flight; their heads are below the queue size by construction).
        while let Some(head) = self.resubmit.pop_front() {
            any = true;
            let walker = ChainWalker::new(mem, GuestAddress(key.desc), key.size, head);
            let parsed = Request::parse_descs(head, walker, mem, ctx.cfg.capacity_sectors, &ctx.cfg.limits);
            used |= self.start_or_refuse(ctx, vring, mem, keep, inf, parsed, "bad resubmitted request");
        }
        // One chain at a time: each head is checked just before it is popped. At most one ring's
        // worth per pass, so a guest that keeps adding cannot hold the thread's other queues back.
        let mut budget = key.size;
        while budget > 0 {
            let Some(head) = self.next_head(vring, mem, key) else { break };
            budget -= 1;
            // Popped: the head was read and checked by `next_head`; the chain is walked with the same
            // rules as virtio-queue's iterator, its descriptors read through a one-region cache.
            {
                let mut g = vring.get_mut();
                let q = g.get_queue_mut();
                let next = q.next_avail().wrapping_add(1);
                q.set_next_avail(next);
            }
            any = true;
            if let Some((r, q)) = inf {
                r.get(q, head, self.counter);
                self.counter = self.counter.wrapping_add(1);
            }
            let walker = ChainWalker::new(mem, GuestAddress(key.desc), key.size, head);
            let parsed = Request::parse_descs(head, walker, mem, ctx.cfg.capacity_sectors, &ctx.cfg.limits);
            used |= self.start_or_refuse(ctx, vring, mem, keep, inf, parsed, "bad request");
        }
        if used {
            Self::signal(vring);
        }
        any
    }

    /// Starts one request. Returns true when it was completed on the spot.
    /// Submits a parsed request, or completes a malformed one with its status (rate-limited warning).
    /// Returns true when a used element was published on the spot.
    #[allow(clippy::too_many_arguments)]
    fn start_or_refuse(
        &mut self,
        ctx: &PollCtx<'_>,
        vring: &Vring,
        mem: &GuestMem,
        keep: &Arc<GuestMem>,
        inf: Option<(&InflightRegion, u16)>,
        parsed: Result<Request, BadRequest>,
        what: &str,
    ) -> bool {
        match parsed {
            Ok(req) => self.submit(ctx, vring, mem, keep, req),
            Err(bad) => {
                if self.log.allow("virtqueue") {
                    warn!("{what} (head {}): {}", bad.head, bad.error);
                }
                Self::finish(
                    &mut vring.get_mut(),
                    &mut RegionCache::new(mem),
                    inf,
                    &mut self.log,
                    bad.head,
                    bad.status_addr,
                    bad.error.status(),
                    1,
                );
                true
            }
        }
    }

    fn submit(
        &mut self,
        ctx: &PollCtx<'_>,
        vring: &Vring,
        mem: &GuestMem,
        keep: &Arc<GuestMem>,
        req: Request,
    ) -> bool {
        let info = ctx.desc.info();
        let spb = u64::from(info.block_size.max(512)) / SECTOR_SIZE;
        let region = self.region.clone();
        let inf = region.as_deref().map(|r| (r, self.queue));
        let log = &mut self.log;
        let mut immediate = |status: u8, used_len: u32| {
            Self::finish(
                &mut vring.get_mut(),
                &mut RegionCache::new(mem),
                inf,
                log,
                req.head,
                Some(req.status_addr),
                status,
                used_len,
            );
            true
        };
        let ok = VIRTIO_BLK_S_OK as u8;
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let (io, used_len, flush_after) = match req.kind {
            RequestKind::GetId => {
                return match write_id(mem, &req.segments, ctx.serial) {
                    Ok(n) => immediate(ok, n + 1),
                    Err(_) => immediate(ioerr, 1),
                };
            }
            RequestKind::Flush if !info.supports.flush => return immediate(ok, 1),
            RequestKind::Flush => (BdevIo::no_data(IoKind::Flush, 0, 0, 0), 1, false),
            RequestKind::Read { sector } | RequestKind::Write { sector } => {
                let keep_any: Arc<dyn std::any::Any + Send + Sync> = keep.clone();
                // SAFETY: the iovecs were built by `Request::parse` from checked look-ups in `mem`,
                // which is the mapping behind `keep`; `keep` (an Arc of that GuestMemoryMmap) moves
                // into the IoVecs and keeps every region mapped until the I/O is dropped, even if the
                // frontend replaces the memory table meanwhile.
                let bufs = unsafe { IoVecs::from_raw_parts(req.iovecs, Some(keep_any)) };
                let offset = sector / spb;
                let blocks = u64::from(req.data_len) / u64::from(info.block_size.max(512));
                if matches!(req.kind, RequestKind::Read { .. }) {
                    (BdevIo::read(offset, blocks, bufs, 0), req.data_len.saturating_add(1), false)
                } else {
                    let wt = info.volatile_write_cache
                        && info.supports.flush
                        && ctx.wce.load(Ordering::Relaxed) == 0;
                    (BdevIo::write(offset, blocks, bufs, 0), 1, wt)
                }
            }
            RequestKind::Discard { sector, num_sectors } => {
                (BdevIo::no_data(IoKind::Unmap, sector / spb, u64::from(num_sectors) / spb, 0), 1, false)
            }
            RequestKind::WriteZeroes { sector, num_sectors, unmap } => {
                let kind = if unmap && info.supports.unmap && info.unmap_reads_zeroes {
                    IoKind::Unmap
                } else {
                    IoKind::WriteZeroes
                };
                (BdevIo::no_data(kind, sector / spb, u64::from(num_sectors) / spb, 0), 1, false)
            }
        };
        let Some(ch) = self.channel.as_mut() else {
            return immediate(ioerr, 1);
        };
        if !self.stamped {
            // One clock read per batch: every request submitted in this pass starts now.
            ch.set_batch_time(Instant::now());
            self.stamped = true;
        }
        let tag = Self::track(
            &mut self.inflight,
            &mut self.next_gen,
            InFlight { tag: 0, head: req.head, status_addr: req.status_addr, used_len, flush_after },
        );
        ch.submit(BdevIo { tag, ..io });
        false
    }

    /// Records an in-flight request; returns its tag.
    fn track(inflight: &mut Slab<InFlight>, next_gen: &mut u64, mut f: InFlight) -> u64 {
        *next_gen = next_gen.wrapping_add(1);
        let entry = inflight.vacant_entry();
        f.tag = (*next_gen << 32) | (entry.key() as u64 & 0xffff_ffff);
        entry.insert(f).tag
    }

    /// Polls the channel and completes what finished. Returns true when anything completed.
    fn reap(&mut self, vring: &Vring, mem: &GuestMem) -> bool {
        let region = self.region.clone();
        let inf = region.as_deref().map(|r| (r, self.queue));
        let Some(ch) = self.channel.as_mut() else { return false };
        self.done.clear();
        if ch.poll(&mut self.done) == 0 {
            return false;
        }
        // The whole batch under one vring lock, status bytes through one region cache; one
        // notification decision at the end.
        let mut cache = RegionCache::new(mem);
        let mut state = vring.get_mut();
        for c in self.done.drain(..) {
            let slot = (c.tag & 0xffff_ffff) as usize;
            let f = match self.inflight.get(slot) {
                Some(f) if f.tag == c.tag => self.inflight.remove(slot),
                _ => {
                    warn!("completion for unknown tag {}", c.tag);
                    continue;
                }
            };
            if f.flush_after && c.result.is_ok() {
                let tag =
                    Self::track(&mut self.inflight, &mut self.next_gen, InFlight { flush_after: false, ..f });
                ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, tag));
                continue;
            }
            Self::finish(
                &mut state,
                &mut cache,
                inf,
                &mut self.log,
                f.head,
                Some(f.status_addr),
                io_status(c.result),
                f.used_len,
            );
        }
        Self::signal_locked(&mut state);
        true
    }

    /// The one completion path: status byte, used ring, in-flight table (libvhost-user's order:
    /// `last_batch_head`, used element and index, then the in-flight mark is cleared).
    #[allow(clippy::too_many_arguments)]
    fn finish(
        used: &mut VringState<Gm>,
        mem: &mut RegionCache<'_>,
        inf: Option<(&InflightRegion, u16)>,
        log: &mut RateLimit,
        head: u16,
        status_addr: Option<GuestAddress>,
        status: u8,
        used_len: u32,
    ) {
        let used_len = match status_addr {
            Some(addr) => {
                if mem.write_u8(addr, status) {
                    used_len
                } else {
                    if log.allow("virtqueue") {
                        warn!("cannot write status of head {head}: {addr:?} is not in guest memory");
                    }
                    0
                }
            }
            None => 0,
        };
        if let Some((r, q)) = inf {
            r.pre_put(q, head);
        }
        match used.add_used(head, used_len) {
            Ok(()) => {
                if let Some((r, q)) = inf {
                    r.post_put(q, head, used.get_queue().next_used());
                }
            }
            Err(e) => {
                if log.allow("virtqueue") {
                    warn!("add_used({head}): {e}");
                }
            }
        }
    }

    /// [`Self::signal`] with the vring already locked.
    fn signal_locked(state: &mut VringState<Gm>) {
        match state.needs_notification() {
            Ok(true) => {
                if let Err(e) = state.signal_used_queue() {
                    warn!("signal_used_queue: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => warn!("needs_notification: {e}"),
        }
    }

    fn signal(vring: &Vring) {
        Self::signal_locked(&mut vring.get_mut());
    }

    /// Waits for every in-flight request and completes it (stop_vring, shutdown). A stopped ring
    /// starts afresh: a broken mark is cleared.
    pub fn drain(&mut self, mem: &Gm) {
        self.broken = None;
        self.quiet = false;
        self.checked = None;
        self.started = false;
        let Some(vring) = self.vring.clone() else { return };
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.busy() {
            let snapshot: Arc<GuestMem> = mem.memory().into_inner();
            let progress = self.reap(&vring, &snapshot);
            drop(snapshot);
            if !progress {
                if Instant::now() > deadline {
                    error!(
                        "{} requests still in flight after {:?}; giving up",
                        self.inflight.len(),
                        DRAIN_TIMEOUT
                    );
                    return;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}
