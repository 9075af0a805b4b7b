//! No heap allocation per request on a poller's steady path (issue 10), counted by a
//! `#[global_allocator]` wrapper in this dedicated test binary.
//!
//! A malloc and a null bdev are exported in-process (one queue each) and driven through libblkio, a
//! real vhost-user frontend. The allocator counts allocations made on the daemon's poller threads
//! (vhost-user-backend names them `vring_worker`) and nowhere else. After a warm-up (channel opened,
//! slabs and queues grown to the depth used), N more requests of every kind the benchmark and a
//! guest send on the steady path (4 KiB reads and writes at QD1 and QD32, 2-segment vectored
//! requests, flushes) must cause zero allocations on the poller thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vblkd::bdev::malloc::MallocBdev;
use vblkd::bdev::null::NullBdev;
use vblkd::bdev::{Bdev, Registry};
use vblkd::client::{BlkClient, Completion};
use vblkd::vhost::{serve, EventFd, ExportConfig};

/// Allocations made on poller threads.
static POLLER_ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// 1: this thread is a poller (cached once seen; other threads are asked again each time, as a
    /// thread's name is set after its first allocations).
    static IS_POLLER: Cell<bool> = const { Cell::new(false) };
}

fn on_poller_thread() -> bool {
    if IS_POLLER.with(Cell::get) {
        return true;
    }
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into the buffer we pass.
    let rc = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr() as libc::c_ulong, 0, 0, 0) };
    let yes = rc == 0 && name.starts_with(b"vring_worker\0");
    if yes {
        IS_POLLER.with(|p| p.set(true));
    }
    yes
}

struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect on the
// memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if on_poller_thread() {
            POLLER_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if on_poller_thread() {
            POLLER_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if on_poller_thread() {
            POLLER_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: `ptr` came from this allocator (i.e. from System) with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (i.e. from System) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const BS: usize = 4096;
const QD: usize = 32;

fn export(
    dir: &Path,
    bdev: Arc<dyn Bdev>,
) -> (Arc<EventFd>, std::thread::JoinHandle<Result<(), vblkd::vhost::VhostError>>, std::path::PathBuf) {
    let reg = Registry::new();
    let name = bdev.info().name.clone();
    reg.register(bdev).expect("register");
    let desc = Arc::new(reg.open(&name, true).expect("open"));
    let sock = dir.join(format!("{name}.sock"));
    let mut cfg = ExportConfig::new(&sock, "alloc");
    cfg.queues = 1;
    cfg.queue_size = 128;
    let stop = Arc::new(EventFd::new(0).expect("eventfd"));
    let h = serve(desc, cfg, stop.clone()).expect("serve");
    (stop, h, sock)
}

fn wait_all(c: &mut BlkClient, n: usize) {
    let mut got = 0;
    let mut out: Vec<Completion> = Vec::with_capacity(n);
    while got < n {
        out.clear();
        c.wait(0, 1, &mut out, Duration::from_secs(30)).expect("wait");
        assert!(!out.is_empty(), "no completion within 30 s");
        for x in &out {
            assert_eq!(x.ret, 0, "request {} failed", x.user_data);
        }
        got += out.len();
    }
}

/// One round of the steady-path mix: QD32 reads, QD32 writes, vectored requests, a flush, QD1 I/O.
fn round(c: &mut BlkClient, r: usize) {
    let span = 4 << 20;
    let at = |i: usize| ((r * 7919 + i * 104_729) % (span / BS) * BS) as u64;
    for i in 0..QD {
        c.read(0, at(i), i * BS, BS, i);
    }
    wait_all(c, QD);
    for i in 0..QD {
        c.write(0, at(i + 1), i * BS, BS, i);
    }
    wait_all(c, QD);
    let _keep_r = c.readv(0, at(3), &[(0, BS), (2 * BS, BS)], 1);
    let _keep_w = c.writev(0, at(5), &[(4 * BS, BS), (6 * BS, BS)], 2);
    c.flush(0, 3);
    wait_all(c, 3);
    for i in 0..8 {
        c.read(0, at(i + 2), 0, BS, i);
        wait_all(c, 1);
        c.write(0, at(i + 3), BS, BS, i);
        wait_all(c, 1);
    }
}

fn steady_path_allocations(bdev: Arc<dyn Bdev>) -> (u64, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (stop, handle, sock) = export(dir.path(), bdev);
    let mut c = BlkClient::connect(&sock, 1, 128, QD * BS).expect("connect");
    for r in 0..50 {
        round(&mut c, r);
    }
    let warm = POLLER_ALLOCS.load(Ordering::Relaxed);
    for r in 50..350 {
        round(&mut c, r);
    }
    let steady = POLLER_ALLOCS.load(Ordering::Relaxed) - warm;
    drop(c);
    stop.write(1).expect("stop");
    handle.join().expect("join").expect("serve");
    (warm, steady)
}

#[test]
fn no_allocation_per_request_on_the_steady_path() {
    // 300 rounds x 91 requests each, per bdev.
    for bdev in [
        Arc::new(MallocBdev::new("m0", 8 << 20, 512).expect("malloc")) as Arc<dyn Bdev>,
        Arc::new(NullBdev::new("n0", 8 << 20, 512).expect("null")) as Arc<dyn Bdev>,
    ] {
        let name = bdev.info().name.clone();
        let before = POLLER_ALLOCS.load(Ordering::Relaxed);
        let (warm, steady) = steady_path_allocations(bdev);
        eprintln!(
            "{name}: {} allocations on poller threads while warming up, {steady} in 27300 steady requests",
            warm - before
        );
        // The counter does see the poller thread (it allocates while starting: channel, slabs, epoll).
        assert!(warm > before, "{name}: no allocation counted on the poller at all: the counter is blind");
        assert_eq!(steady, 0, "{name}: {steady} heap allocations on the poller's steady path");
    }
}
