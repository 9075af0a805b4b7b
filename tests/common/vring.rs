//! Scaffolding for tests that drive vblkd with the `vhost` crate's frontend and hand-built split
//! rings in shared (memfd) guest memory: an in-process export, a watchdog for hung frontends,
//! negotiation, the memory table and ring set-up. What a test puts on its rings stays in the test.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vblkd::bdev::Registry;
use vblkd::vhost::{serve, EventFd, ExportConfig, VhostError};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub type Mem = GuestMemoryMmap<()>;

/// An anonymous shared-memory file of `len` bytes.
pub fn memfd(len: usize) -> File {
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"vblkd-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh, owned descriptor.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len as u64).expect("set_len");
    f
}

/// Guest memory of `len` bytes at guest address 0, backed by a memfd (so it can be shared).
pub fn guest_memory(len: usize) -> Mem {
    GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        len,
        Some(FileOffset::new(memfd(len), 0)),
    )])
    .expect("memory")
}

/// One export served in-process by `vblkd::vhost::serve`, stopped (and joined) on drop.
pub struct Export {
    stop: Arc<EventFd>,
    handle: Option<JoinHandle<Result<(), VhostError>>>,
    pub sock: PathBuf,
    /// Whether drop asserts that the export thread ended without an error.
    pub check_exit: bool,
}

impl Export {
    /// Serves bdev `name` of `reg` (opened writable) on `sock`, with serial number `serial`.
    pub fn serve(
        reg: &Registry,
        name: &str,
        sock: PathBuf,
        queues: u16,
        queue_size: u16,
        serial: &str,
    ) -> Self {
        Self::serve_with(reg, name, sock, queues, queue_size, serial, |_| {})
    }

    /// Like [`Export::serve`], with `adjust` applied to the export's configuration.
    pub fn serve_with(
        reg: &Registry,
        name: &str,
        sock: PathBuf,
        queues: u16,
        queue_size: u16,
        serial: &str,
        adjust: impl FnOnce(&mut ExportConfig),
    ) -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let desc = Arc::new(reg.open(name, true).expect("open"));
        let mut cfg = ExportConfig::new(&sock, serial);
        cfg.queues = queues;
        cfg.queue_size = queue_size;
        adjust(&mut cfg);
        let stop = Arc::new(EventFd::new(0).expect("eventfd"));
        let handle = Some(serve(desc, cfg, stop.clone()).expect("serve"));
        Self { stop, handle, sock, check_exit: true }
    }

    /// Signals the stop and returns the export thread's handle.
    pub fn stop(&mut self) -> JoinHandle<Result<(), VhostError>> {
        self.stop.write(1).expect("stop");
        self.handle.take().expect("running")
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if std::thread::panicking() {
            // A failed test may have left the export stuck; do not wait for it.
            return;
        }
        if let Some(h) = self.handle.take() {
            let r = h.join().expect("join");
            if self.check_exit {
                assert!(r.is_ok(), "{r:?}");
            }
        }
    }
}

/// Shuts the frontend socket down if the test hangs (the crate would otherwise wait forever).
pub struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    pub fn new(fd: i32, limit: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            while t.elapsed() < limit {
                if d.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("watchdog: shutting the frontend socket down");
            // SAFETY: shutdown on a socket fd; at worst the fd is already closed (EBADF).
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        });
        Self(done)
    }

    /// A watchdog on `f`'s socket.
    pub fn on(f: &Frontend, limit: Duration) -> Self {
        Self::new(f.as_raw_fd(), limit)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Sends one message with NEED_REPLY (REPLY_ACK is negotiated) so a refusal comes back as an error.
pub fn acked<T>(f: &mut Frontend, op: impl FnOnce(&mut Frontend) -> T) -> T {
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let r = op(f);
    f.set_hdr_flags(VhostUserHeaderFlag::empty());
    r
}

/// The protocol features every test negotiates.
pub fn base_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// Connects with `queues` queues, takes ownership, accepts every offered virtio feature and sets
/// [`base_protocol`] plus `extra` (which must all be offered). Returns the features.
pub fn negotiate(sock: &Path, queues: u64, extra: VhostUserProtocolFeatures) -> (Frontend, u64) {
    let mut f = Frontend::connect(sock, queues).expect("connect");
    f.set_owner().expect("owner");
    let features = f.get_features().expect("features");
    f.set_features(features).expect("set features");
    let pf = f.get_protocol_features().expect("protocol features");
    let want = base_protocol() | extra;
    assert!(pf.contains(want), "protocol features offered: {pf:?}, wanted {want:?}");
    f.set_protocol_features(want).expect("set protocol features");
    (f, features)
}

/// Installs `mem` (one region) as the memory table; returns the host address of guest address 0.
pub fn set_mem_table(f: &mut Frontend, mem: &Mem) -> u64 {
    let region = mem.iter().next().expect("region");
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
    f.set_mem_table(&[info]).expect("mem table");
    info.userspace_addr
}

/// Where a split ring's three parts lie, as guest addresses.
#[derive(Clone, Copy, Debug)]
pub struct RingLayout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Sets queue `q` up with `size` entries starting at `base` (num, base, addresses, kick, call) and
/// enables it. `host` is the host address of guest address 0 ([`set_mem_table`]).
#[allow(clippy::too_many_arguments)]
pub fn start_vring(
    f: &mut Frontend,
    q: usize,
    size: u16,
    base: u16,
    host: u64,
    ring: RingLayout,
    kick: &EventFd,
    call: &EventFd,
) {
    f.set_vring_num(q, size).expect("num");
    f.set_vring_base(q, base).expect("base");
    f.set_vring_addr(
        q,
        &VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: host + ring.desc,
            used_ring_addr: host + ring.used,
            avail_ring_addr: host + ring.avail,
            log_addr: None,
        },
    )
    .expect("addr");
    f.set_vring_kick(q, kick).expect("kick");
    f.set_vring_call(q, call).expect("call");
    f.set_vring_enable(q, true).expect("enable");
}
