//! `delay` bdev: completes each I/O a set time after its base bdev did (as SPDK's `vbdev_delay`).
//!
//! ```text
//!  submit ─► base Channel.submit (own tag) ─► base completes ─► due = now + delay ± jitter ─► heap
//!  poll   ─► base.poll (move completions to the heap) ─► pop every due entry ─► done
//!  wait_fd = epoll { base channel's wait_fd, timerfd armed at the earliest due time }
//! ```
//!
//! # Design
//! * Reads wait `read-us`; every other kind (write, flush, unmap, write_zeroes, reset) `write-us`.
//!   With `jitter-us = J`, each delay is drawn uniformly from `[d - J, d + J]` (clamped at 0), so
//!   completions come out in another order than the base produced them.
//! * The base is opened through the registry and claimed (`delay`), so nothing else writes it.
//! * Each channel owns a base channel (same thread). An idle poller sleeps on an epoll fd holding the
//!   base channel's completion fd and a timerfd armed for the earliest pending completion.
//!
//! # Limitations
//! * Delays are measured from the base completion, not from submission (like SPDK's average mode).
//! * No per-I/O-kind p99 ("tail") latencies as SPDK has; one delay per direction.

use std::collections::{BinaryHeap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::waitset::epoll_set;
use std::time::{Duration, Instant};

use super::{
    random_uuid, Bdev, BdevError, BdevInfo, BdevIo, Channel, Completion, Descriptor, IoKind, ModuleChannel,
    Registry, Rejected,
};

/// Options of one delay bdev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayOptions {
    /// Name of the new bdev.
    pub name: String,
    /// Base bdev.
    pub base: String,
    /// Delay of reads.
    pub read: Duration,
    /// Delay of writes and every other kind.
    pub write: Duration,
    /// Maximum deviation either way.
    pub jitter: Duration,
}

/// A bdev that delays its base's completions.
pub struct DelayBdev {
    info: BdevInfo,
    base: Descriptor,
    opts: DelayOptions,
}

impl DelayBdev {
    /// Opens `opts.base` read-write from `registry`, claims it and wraps it.
    pub fn new(opts: DelayOptions, registry: &Registry) -> Result<Self, BdevError> {
        let mut base = registry.open(&opts.base, true)?;
        base.claim("delay")?;
        let b = base.info();
        let mut info = BdevInfo::new(&opts.name, "delay", b.block_size, b.num_blocks);
        info.uuid = random_uuid();
        info.optimal_io_boundary_blocks = b.optimal_io_boundary_blocks;
        info.split_on_optimal_io_boundary = false;
        info.buf_align = b.buf_align;
        info.max_io_blocks = b.max_io_blocks;
        info.max_unmap_blocks = b.max_unmap_blocks;
        info.max_write_zeroes_blocks = b.max_write_zeroes_blocks;
        info.volatile_write_cache = b.volatile_write_cache;
        info.unmap_reads_zeroes = b.unmap_reads_zeroes;
        info.supports = b.supports;
        log::info!(
            "delay bdev '{}' on '{}': read {:?}, write {:?}, jitter {:?}",
            opts.name,
            opts.base,
            opts.read,
            opts.write,
            opts.jitter
        );
        Ok(Self { info, base, opts })
    }
}

impl Bdev for DelayBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError> {
        let base = self.base.channel()?;
        Ok(Box::new(DelayChannel::new(base, self.opts.clone())?))
    }

    fn module_stats(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "base": self.opts.base,
            "read_us": self.opts.read.as_micros() as u64,
            "write_us": self.opts.write.as_micros() as u64,
            "jitter_us": self.opts.jitter.as_micros() as u64,
        }))
    }
}

/// A completion waiting for its due time (min-heap by `due`, then arrival).
#[derive(Debug, PartialEq, Eq)]
struct Pending {
    due: Instant,
    seq: u64,
    done: Completion,
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.due.cmp(&self.due).then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

struct DelayChannel {
    base: Channel,
    opts: DelayOptions,
    /// Our tag → (caller's tag, kind).
    inflight: HashMap<u64, (u64, IoKind)>,
    next_tag: u64,
    heap: BinaryHeap<Pending>,
    seq: u64,
    rng: u64,
    base_done: Vec<Completion>,
    epoll: OwnedFd,
    timer: OwnedFd,
    armed: Option<Instant>,
}

fn os_err(what: &str) -> BdevError {
    BdevError::io(format!("delay channel: {what}"), std::io::Error::last_os_error())
}

impl DelayChannel {
    fn new(base: Channel, opts: DelayOptions) -> Result<Self, BdevError> {
        // SAFETY: plain syscall creating an fd we take ownership of at once.
        let tfd =
            unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if tfd < 0 {
            return Err(os_err("timerfd_create"));
        }
        // SAFETY: tfd is a fresh fd owned by nobody else.
        let timer = unsafe { OwnedFd::from_raw_fd(tfd) };
        let epoll = epoll_set([Some(timer.as_raw_fd()), base.wait_fd()].into_iter().flatten())
            .map_err(|e| BdevError::io("delay channel: epoll set", e))?;
        let seed = u64::from_le_bytes(random_uuid()[0..8].try_into().unwrap_or([7; 8])) | 1;
        Ok(Self {
            base,
            opts,
            inflight: HashMap::new(),
            next_tag: 0,
            heap: BinaryHeap::new(),
            seq: 0,
            rng: seed,
            base_done: Vec::new(),
            epoll,
            timer,
            armed: None,
        })
    }

    fn delay_for(&mut self, kind: IoKind) -> Duration {
        let d = if kind == IoKind::Read { self.opts.read } else { self.opts.write };
        let j = self.opts.jitter.as_nanos() as u64;
        if j == 0 {
            return d;
        }
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % (2 * j + 1);
        let base = d.as_nanos() as u64;
        Duration::from_nanos((base + r).saturating_sub(j))
    }

    /// Arms the timerfd for the earliest pending completion (or disarms it).
    fn arm(&mut self) {
        let next = self.heap.peek().map(|p| p.due);
        if next == self.armed {
            return;
        }
        self.armed = next;
        // Drain a stale expiry so the fd is not readable for an old deadline.
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes from our non-blocking timerfd into a local buffer.
        let _ = unsafe { libc::read(self.timer.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        let mut spec: libc::itimerspec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: 0, tv_nsec: 0 },
        };
        if let Some(due) = next {
            let left = due.saturating_duration_since(Instant::now()).max(Duration::from_nanos(1));
            spec.it_value.tv_sec = left.as_secs() as libc::time_t;
            spec.it_value.tv_nsec = left.subsec_nanos() as libc::c_long;
        }
        // SAFETY: valid timerfd and itimerspec; relative timer.
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }
}

impl ModuleChannel for DelayChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        self.inflight.insert(tag, (io.tag, io.kind));
        self.base.submit(BdevIo { tag, ..io });
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        self.base_done.clear();
        self.base.poll(&mut self.base_done);
        let now = Instant::now();
        for c in std::mem::take(&mut self.base_done) {
            let Some((tag, kind)) = self.inflight.remove(&c.tag) else {
                log::warn!("delay '{}': completion for unknown tag {}", self.opts.name, c.tag);
                continue;
            };
            let due = now + self.delay_for(kind);
            self.seq += 1;
            self.heap.push(Pending { due, seq: self.seq, done: Completion { tag, result: c.result } });
        }
        let mut n = 0;
        let now = Instant::now();
        while self.heap.peek().is_some_and(|p| p.due <= now) {
            if let Some(p) = self.heap.pop() {
                done.push(p.done);
                n += 1;
            }
        }
        self.arm();
        n
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }
}

impl Drop for DelayChannel {
    fn drop(&mut self) {
        // Let the base finish what it has; results are dropped with the channel.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.base.outstanding() > 0 && Instant::now() < deadline {
            self.base_done.clear();
            if self.base.poll(&mut self.base_done) == 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        if !self.inflight.is_empty() {
            log::warn!("delay '{}': {} I/O dropped with the channel", self.opts.name, self.inflight.len());
        }
    }
}

/// Registers a delay bdev in `registry` (convenience for tests and the CLI).
pub fn create(opts: DelayOptions, registry: &Registry) -> Result<Arc<DelayBdev>, BdevError> {
    Ok(Arc::new(DelayBdev::new(opts, registry)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::malloc::MallocBdev;
    use crate::bdev::tests::{conformance_with, drive};
    use crate::bdev::IoVecs;

    fn opts(name: &str, base: &str, read: u64, write: u64, jitter: u64) -> DelayOptions {
        DelayOptions {
            name: name.into(),
            base: base.into(),
            read: Duration::from_micros(read),
            write: Duration::from_micros(write),
            jitter: Duration::from_micros(jitter),
        }
    }

    #[test]
    fn conformance_delay_on_malloc() {
        let reg = Registry::new();
        reg.register(Arc::new(MallocBdev::new("base", 4 << 20, 512).expect("malloc"))).expect("register");
        let d = DelayBdev::new(opts("d0", "base", 200, 300, 150), &reg).expect("delay");
        conformance_with(reg, Arc::new(d));
    }

    #[test]
    fn delays_and_reorders_completions() {
        let reg = Registry::new();
        reg.register(Arc::new(MallocBdev::new("base", 4 << 20, 512).expect("malloc"))).expect("register");
        // The base is claimed: nobody else may claim it.
        let d = DelayBdev::new(opts("d1", "base", 2000, 5000, 1500), &reg).expect("delay");
        assert!(DelayBdev::new(opts("d2", "base", 0, 0, 0), &reg).is_err(), "base must be claimed");
        reg.register(Arc::new(d)).expect("register");
        let desc = reg.open("d1", true).expect("open");
        let mut ch = desc.channel().expect("channel");
        let t = Instant::now();
        for i in 0..64u64 {
            ch.submit(BdevIo::write(i, 1, IoVecs::alloc(512), i));
        }
        let order: Vec<u64> = drive(&mut ch).iter().map(|c| c.tag).collect();
        let took = t.elapsed();
        assert!(took >= Duration::from_micros(3500), "writes completed after {took:?}");
        assert_eq!(order.len(), 64);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_ne!(order, sorted, "jitter must reorder completions");
        let t = Instant::now();
        ch.submit(BdevIo::read(0, 1, IoVecs::alloc(512), 99));
        drive(&mut ch);
        assert!(t.elapsed() >= Duration::from_micros(500), "read completed after {:?}", t.elapsed());
    }
}
