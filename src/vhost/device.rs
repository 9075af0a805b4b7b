//! The vhost-user-blk backend: `VhostUserBackend` for one export and one frontend connection.
//!
//! ```text
//!  frontend ──vhost-user──► VhostUserDaemon ──► BlkBackend (features, config, memory checks)
//!                                  │ worker thread t (queues t, t+N, t+2N, ...) ──► handle_event
//!                                  │                                   ──► poller::run_group
//! ```
//!
//! # Design
//! * `poll-threads=N` worker threads (default: one per queue). Thread `t` serves queues `q` with
//!   `q % N == t` (`queues_per_thread` masks), round-robin, one pass each at a time
//!   ([`super::poller::run_group`]). Each queue keeps its own [`Worker`] (and so its own bdev channel)
//!   behind a mutex that only its thread and `stop_vring` (draining) take.
//! * Queue `q`'s channel completion fd is registered on its thread's epoll with data
//!   `num_queues + 1 + q`; any event of a thread runs that thread's group loop.
//! * With `--poll-cpus`, each worker thread pins itself on its first event ([`super::pin`]).
//! * `update_memory` refuses file-backed regions that extend past the end of their file (mapping
//!   them would SIGBUS on first access); the refused table is replaced by an empty one before any
//!   access.
//! * `set_config` accepts only the `wce` byte.
//!
//! # Limitations
//! * No dirty-page logging (`LOG_SHMFD` not offered).
//! * `update_memory`'s own check is a second line: the front door ([`super::frontdoor`]) refuses a
//!   bad table before vhost-user-backend installs it, so no worker ever sees an unchecked table.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{error, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use super::config::{BlkConfig, WCE_OFFSET};
use super::inflight::InflightRegion;
use super::poller::{run_group, Gm, PollCtx, Vring, Worker};
use super::request::{GuestMem, ID_BYTES};
use crate::bdev::Descriptor;

/// Largest config space a vhost-user message carries.
const MAX_CONFIG_SIZE: usize = 256;

/// Shared state of one connection's backend.
pub struct BlkInner {
    desc: Arc<Descriptor>,
    cfg: BlkConfig,
    serial: [u8; ID_BYTES],
    poll: Duration,
    wce: AtomicU8,
    event_idx: AtomicBool,
    mem: Mutex<Option<Gm>>,
    epoll_fds: Mutex<Vec<RawFd>>,
    workers: Vec<Mutex<Worker>>,
    /// Queue indexes served by each worker thread, in the order vhost-user-backend hands us the vrings.
    groups: Vec<Vec<u16>>,
    inflight: InflightSlot,
}

/// The connection's in-flight table, set by the front door (GET/SET_INFLIGHT_FD).
pub type InflightSlot = Arc<Mutex<Option<Arc<InflightRegion>>>>;

/// The backend object handed to `VhostUserDaemon` (cheap to clone).
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<BlkInner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlkBackend {
    /// A backend for `desc` with `cfg`; `serial` is padded/truncated to 20 bytes. `poll_threads`
    /// worker threads serve the queues (0, or more than the queues: one thread per queue).
    pub fn new(
        desc: Arc<Descriptor>,
        cfg: BlkConfig,
        serial: &str,
        poll: Duration,
        poll_threads: u16,
    ) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let wce = u8::from(desc.info().volatile_write_cache);
        let workers = (0..cfg.num_queues).map(|_| Mutex::new(Worker::default())).collect();
        let groups = queue_groups(cfg.num_queues, poll_threads);
        Self {
            inner: Arc::new(BlkInner {
                desc,
                cfg,
                serial: id,
                poll,
                wce: AtomicU8::new(wce),
                event_idx: AtomicBool::new(false),
                mem: Mutex::new(None),
                epoll_fds: Mutex::new(Vec::new()),
                workers,
                groups,
                inflight: Arc::new(Mutex::new(None)),
            }),
        }
    }

    /// Device configuration.
    pub fn config(&self) -> &BlkConfig {
        &self.inner.cfg
    }

    /// Records each worker thread's epoll fd (from `VhostUserDaemon::get_epoll_handlers`).
    pub fn set_epoll_fds(&self, fds: Vec<RawFd>) {
        *lock(&self.inner.epoll_fds) = fds;
    }

    fn ctx(&self, thread: usize) -> PollCtx<'_> {
        PollCtx {
            desc: &self.inner.desc,
            cfg: &self.inner.cfg,
            serial: &self.inner.serial,
            wce: &self.inner.wce,
            poll: self.inner.poll,
            epoll_fd: lock(&self.inner.epoll_fds).get(thread).copied(),
            completion_event_base: self.completion_event_base(),
            inflight: lock(&self.inner.inflight).clone(),
        }
    }

    /// The slot the front door puts the connection's in-flight table in.
    pub fn inflight_slot(&self) -> InflightSlot {
        self.inner.inflight.clone()
    }

    /// Epoll data value of queue 0's completion fd event (above `num_queues`, which is reserved).
    fn completion_event_base(&self) -> u64 {
        u64::from(self.inner.cfg.num_queues) + 1
    }

    /// How many worker threads serve the queues.
    pub fn poll_threads(&self) -> usize {
        self.inner.groups.len()
    }

    /// Finishes every in-flight request on every queue (graceful stop).
    pub fn drain_all(&self) {
        let Some(mem) = lock(&self.inner.mem).clone() else { return };
        for w in &self.inner.workers {
            lock(w).drain(&mem);
        }
    }

    /// Checks that every file-backed region fits in its file (vm-memory does not).
    fn check_regions(mem: &GuestMem) -> io::Result<()> {
        for region in mem.iter() {
            let Some(fo) = region.file_offset() else { continue };
            let meta = fo.file().metadata()?;
            if !meta.file_type().is_file() {
                continue;
            }
            let end = fo.start().checked_add(region.len());
            if end.map_or(true, |end| end > meta.len()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "memory region at {:#x} ({} bytes at file offset {}) extends past its file ({} bytes)",
                        region.start_addr().0,
                        region.len(),
                        fo.start(),
                        meta.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        // seg_max = queue size - 2.
        usize::try_from(self.inner.cfg.limits.seg_max).unwrap_or(0) + 2
    }

    fn features(&self) -> u64 {
        self.inner.cfg.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Fields past our layout (newer virtio_blk_config members) read as zero; vhost-user caps the
        // config space at 256 bytes. Never answer with an empty payload (frontends may hang on it).
        let bytes = self.inner.cfg.to_bytes(self.inner.wce.load(Ordering::Relaxed));
        let size = usize::try_from(size).unwrap_or(0).min(MAX_CONFIG_SIZE);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let mut out = vec![0u8; size];
        if start < bytes.len() {
            let n = (bytes.len() - start).min(size);
            out[..n].copy_from_slice(&bytes[start..start + n]);
        }
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if offset != WCE_OFFSET || buf.len() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("config write at offset {offset} ({} bytes): only wce is writable", buf.len()),
            ));
        }
        let wce = buf[0];
        if wce > 1 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("wce {wce} is not 0 or 1")));
        }
        info!(
            "{}: write cache {}",
            self.inner.desc.info().name,
            if wce == 1 { "write-back" } else { "write-through" }
        );
        self.inner.wce.store(wce, Ordering::Relaxed);
        Ok(())
    }

    fn update_memory(&self, mem: Gm) -> io::Result<()> {
        let checked = Self::check_regions(&mem.memory());
        if let Err(e) = checked {
            error!("refusing memory table: {e}");
            // Replace the unchecked table before anything touches it.
            match mem.lock() {
                Ok(guard) => guard.replace(GuestMem::new()),
                Err(p) => p.into_inner().replace(GuestMem::new()),
            }
            *lock(&self.inner.mem) = Some(mem);
            return Err(e);
        }
        *lock(&self.inner.mem) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.inner.groups.iter().map(|g| g.iter().fold(0u64, |m, &q| m | 1u64 << q)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("cannot create exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let i = usize::try_from(queue_index).unwrap_or(usize::MAX);
        let Some(w) = self.inner.workers.get(i) else { return Ok(()) };
        let Some(mem) = lock(&self.inner.mem).clone() else { return Ok(()) };
        lock(w).drain(&mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?}");
        }
        let Some(group) = self.inner.groups.get(thread_id) else { return Ok(()) };
        let ours = usize::from(device_event) < vrings.len()
            || u64::from(device_event)
                .checked_sub(self.completion_event_base())
                .is_some_and(|q| group.iter().any(|&g| u64::from(g) == q));
        if !ours {
            warn!("unknown device event {device_event}");
            return Ok(());
        }
        super::pin::pin_this_thread_once();
        let Some(mem) = lock(&self.inner.mem).clone() else { return Ok(()) };
        let ctx = self.ctx(thread_id);
        run_group(&ctx, group, vrings, &self.inner.workers, &mem);
        Ok(())
    }
}

/// The queues each of `threads` worker threads serves: thread `t` gets `t, t + n, t + 2n, ...` with
/// `n = min(threads, queues)`; 0 threads means one per queue.
pub fn queue_groups(queues: u16, threads: u16) -> Vec<Vec<u16>> {
    let n = if threads == 0 { queues } else { threads.min(queues) }.max(1);
    (0..n).map(|t| (t..queues).step_by(usize::from(n)).collect()).collect()
}

/// Re-exported so tests can check the refusal path without a frontend.
#[doc(hidden)]
pub fn check_regions_for_test(mem: &GuestMem) -> io::Result<()> {
    BlkBackend::check_regions(mem)
}

#[cfg(test)]
mod tests {
    use super::queue_groups;

    #[test]
    fn groups_cover_every_queue_once() {
        assert_eq!(queue_groups(4, 0), vec![vec![0], vec![1], vec![2], vec![3]]);
        assert_eq!(queue_groups(4, 1), vec![vec![0, 1, 2, 3]]);
        assert_eq!(queue_groups(8, 2), vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
        assert_eq!(queue_groups(3, 2), vec![vec![0, 2], vec![1]]);
        assert_eq!(queue_groups(2, 5), vec![vec![0], vec![1]]);
        for (q, t) in [(64, 3), (7, 7), (1, 1), (5, 0)] {
            let mut all: Vec<u16> = queue_groups(q, t).concat();
            all.sort_unstable();
            assert_eq!(all, (0..q).collect::<Vec<_>>());
        }
    }
}
