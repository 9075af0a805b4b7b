//! Promises that no test used to notice breaking (issue 12): each test here fails on the mutation
//! named in its doc comment (checked by applying the mutation and running the test).
//!
//! # Design
//! Flushes cannot be seen without a power cut, so they are observed through counters the code keeps
//! for this purpose: the bdev layer's `flush_ops`, the file bdev's `syncs` (successful
//! `fdatasync`/`fsync`, in `module_stats()` and in the "synced on close" log line) and the OCSSD
//! emulator's `data_syncs()`. Requests "in flight" are made so deterministically with a bdev whose
//! completions the test holds back until it releases them.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::vring::{acked, guest_memory, negotiate, set_mem_table, start_vring, Mem, RingLayout};
use vblkd::bdev::file::{Engine, FileBdev};
use vblkd::bdev::malloc::MallocBdev;
use vblkd::bdev::{Bdev, BdevError, BdevInfo, BdevIo, Completion, ModuleChannel, Registry, Rejected};
use vblkd::vhost::EventFd;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const MEM: usize = 1 << 20;
const QSIZE: u16 = 32;
/// Guest-memory layout of the hand-built requests.
const H: u64 = 0x10000; // headers, 16 bytes apart
const D: u64 = 0x20000; // data, 4 KiB apart
const S: u64 = 0x40000; // status bytes, 1 byte apart

/// One export served in-process (1 queue), stopped on drop; its exit status is not checked (some
/// tests end it by hot-removing its bdev).
struct Export;

impl Export {
    #[allow(clippy::new_ret_no_self)]
    fn new(reg: &Registry, name: &str, dir: &std::path::Path) -> common::vring::Export {
        let mut ex = common::vring::Export::serve(reg, name, dir.join(format!("{name}.sock")), 1, 64, "ops");
        ex.check_exit = false;
        ex
    }
}

/// A frontend with guest memory and queue 0 set up.
struct Guest {
    f: Frontend,
    kick: EventFd,
    call: EventFd,
}

impl Guest {
    fn connect(sock: &std::path::Path) -> (Self, Mem) {
        let (mut f, _) = negotiate(sock, 1, VhostUserProtocolFeatures::empty());
        let mem = guest_memory(MEM);
        set_mem_table(&mut f, &mem);
        (Self { f, kick: EventFd::new(0).expect("kick"), call: EventFd::new(0).expect("call") }, mem)
    }

    /// Sets `wce` in the config space (a refusal is an error thanks to REPLY_ACK).
    fn set_wce(&mut self, wce: u8) {
        acked(&mut self.f, |f| f.set_config(32, VhostUserConfigFlags::empty(), &[wce])).expect("set wce");
    }

    fn start_queue(&mut self, mem: &Mem, q: &MockSplitQueue<'_, Mem>) {
        let host = mem.iter().next().expect("region").as_ptr() as u64;
        let ring = RingLayout { desc: q.desc_table_addr().0, avail: q.avail_addr().0, used: q.used_addr().0 };
        start_vring(&mut self.f, 0, QSIZE, 0, host, ring, &self.kick, &self.call);
    }

    /// Publishes `n` 4 KiB writes (request i: sector 8*i, data at D + 4K*i, status at S + i) as
    /// descriptors `first..` and kicks.
    fn write_requests(&self, mem: &Mem, q: &MockSplitQueue<'_, Mem>, first: u16, n: u16) {
        let mut raw = Vec::new();
        for r in 0..n {
            let i = u64::from(first / 3 + r);
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            h[8..16].copy_from_slice(&(8 * i).to_le_bytes());
            mem.write_slice(&h, GuestAddress(H + 16 * i)).expect("header");
            mem.write_slice(&[i as u8 ^ 0x5a; 4096], GuestAddress(D + 4096 * i)).expect("data");
            mem.write_obj(0xffu8, GuestAddress(S + i)).expect("status");
            let d = first + 3 * r;
            raw.push(RawDescriptor::from(Descriptor::new(H + 16 * i, 16, VRING_DESC_F_NEXT as u16, d + 1)));
            raw.push(RawDescriptor::from(Descriptor::new(
                D + 4096 * i,
                4096,
                VRING_DESC_F_NEXT as u16,
                d + 2,
            )));
            raw.push(RawDescriptor::from(Descriptor::new(S + i, 1, VRING_DESC_F_WRITE as u16, 0)));
        }
        q.add_desc_chains(&raw, first).expect("add chains");
        self.kick.write(1).expect("kick");
    }
}

fn status(mem: &Mem, i: u64) -> u8 {
    mem.read_obj::<u8>(GuestAddress(S + i)).expect("status")
}

fn wait_used(q: &MockSplitQueue<'_, Mem>, want: u16) {
    let t = Instant::now();
    while q.used().idx().load() < want {
        assert!(t.elapsed() < Duration::from_secs(20), "used idx {} < {want}", q.used().idx().load());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `wce = 0` (write-through chosen by the driver) on a bdev with a volatile cache: every write is
/// followed by a flush that reaches the disk before the write is reported; with `wce = 1` it is not.
/// The poller busy-polls (1 s) through the config write, so the switch must reach a running poller.
/// Mutations caught: `let wt = false && …` in `src/vhost/poller.rs`; `wce` read once when the poller
/// starts instead of per request (this test failed 1 in 7 runs that way with 50 µs polling).
#[test]
fn write_through_flushes_after_every_write() {
    let dir = tempfile::tempdir().expect("tmp");
    let reg = Registry::new();
    let f = FileBdev::open("wt0", dir.path().join("wt.img"), Some(4 << 20), false, Engine::Threads)
        .expect("file");
    assert!(f.info().volatile_write_cache && f.info().supports.flush);
    let bdev: Arc<dyn Bdev> = Arc::new(f);
    reg.register(bdev.clone()).expect("register");
    let mut ex =
        common::vring::Export::serve_with(&reg, "wt0", dir.path().join("wt0.sock"), 1, 64, "ops", |c| {
            c.poll_us = 1_000_000
        });
    ex.check_exit = false;
    let syncs = || bdev.module_stats().expect("stats")["syncs"].as_u64().expect("syncs");
    let flushes = || reg.open("wt0", false).expect("open").stats().flush_ops;

    let (mut g, mem) = Guest::connect(&ex.sock);
    g.set_wce(0);
    let q = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    g.start_queue(&mem, &q);
    g.write_requests(&mem, &q, 0, 3);
    wait_used(&q, 3);
    for i in 0..3 {
        assert_eq!(status(&mem, i), VIRTIO_BLK_S_OK as u8);
    }
    assert_eq!(flushes(), 3, "wce=0: one flush per write");
    assert_eq!(syncs(), 3, "wce=0: each flush synced the file");

    g.set_wce(1);
    g.write_requests(&mem, &q, 9, 2);
    wait_used(&q, 5);
    assert_eq!((flushes(), syncs()), (3, 3), "wce=1: writes are not followed by a flush");
}

/// A bdev whose completions are held until the test releases them (requests stay in flight).
struct Held {
    inner: MallocBdev,
    release: Arc<AtomicBool>,
    wake: Arc<Mutex<Vec<Arc<EventFd>>>>,
}

struct HeldChannel {
    inner: Box<dyn ModuleChannel>,
    held: Vec<Completion>,
    release: Arc<AtomicBool>,
    fd: Arc<EventFd>,
}

impl Bdev for Held {
    fn info(&self) -> &BdevInfo {
        self.inner.info()
    }
    fn create_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError> {
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| BdevError::io("eventfd", e))?);
        self.wake.lock().expect("lock").push(fd.clone());
        Ok(Box::new(HeldChannel {
            inner: self.inner.create_channel()?,
            held: Vec::new(),
            release: self.release.clone(),
            fd,
        }))
    }
}

impl ModuleChannel for HeldChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        self.inner.submit(io)
    }
    fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        self.inner.poll(&mut self.held);
        let _ = self.fd.read();
        if !self.release.load(Ordering::Acquire) {
            return 0;
        }
        let n = self.held.len();
        done.append(&mut self.held);
        n
    }
    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}

/// True when the backend closed the frontend's socket within `timeout_ms`.
fn hung_up(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd on the stack.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    n == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

/// Graceful stop: requests in flight when the stop comes are finished (status OK in the guest's
/// memory, used entries published) before the export ends; the export does not end while they are
/// held, and they complete before the connection closes. Mutation caught: removing the
/// `backend.drain_all()` before the shutdown in the stop path of `src/vhost/server.rs`.
#[test]
fn stop_finishes_requests_in_flight() {
    let dir = tempfile::tempdir().expect("tmp");
    let reg = Registry::new();
    let release = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Mutex::new(Vec::new()));
    let inner = MallocBdev::new("h0", 4 << 20, 512).expect("malloc");
    reg.register(Arc::new(Held { inner, release: release.clone(), wake: wake.clone() })).expect("register");
    let mut ex = Export::new(&reg, "h0", dir.path());
    let (mut g, mem) = Guest::connect(&ex.sock);
    let q = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    g.start_queue(&mem, &q);
    g.write_requests(&mem, &q, 0, 8);
    // All 8 reach the bdev (submitted) and stay there.
    let t = Instant::now();
    while reg.open("h0", false).expect("open").stats().write_ops == 0 && wake.lock().expect("lock").is_empty()
    {
        assert!(t.elapsed() < Duration::from_secs(10), "requests never reached the bdev");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(q.used().idx().load(), 0, "held requests must not complete yet");
    let handle = ex.stop();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!handle.is_finished(), "the export ended with requests still in flight");
    assert!(!hung_up(g.f.as_raw_fd(), 0), "the connection was closed with requests still in flight");
    release.store(true, Ordering::Release);
    for fd in wake.lock().expect("lock").iter() {
        fd.write(1).expect("wake");
    }
    // The requests complete while the frontend is still connected (so QEMU sees them as done, not as
    // requests to re-send to the next backend): at the hang-up every one is in the used ring.
    assert!(hung_up(g.f.as_raw_fd(), 10_000), "the connection was not closed after the stop");
    assert_eq!(q.used().idx().load(), 8, "every in-flight request completed before the connection closed");
    let r = handle.join().expect("join");
    assert!(r.is_ok(), "{r:?}");
    for i in 0..8 {
        assert_eq!(status(&mem, i), VIRTIO_BLK_S_OK as u8, "request {i}");
    }
    assert_eq!(reg.open("h0", false).expect("open").stats().write_ops, 8);
    drop(g);
}

/// SIGTERM with a client connected: every bdev is flushed (synced) and closed before exit 0, seen
/// through the file bdev's "synced on close" log line. Mutation caught: dropping `bdev.shutdown()`
/// from the teardown in `src/main.rs` (or the `sync_all` in the file bdev's `shutdown`).
#[test]
fn sigterm_syncs_every_file_bdev_before_exit() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("s.sock");
    let mut child = common::vblkd()
        .args(["--log-level", "info", "--control", "none", "--bdev"])
        .arg(format!("driver=file,name=fa,path={},size=8M", dir.path().join("a.img").display()))
        .arg("--bdev")
        .arg(format!(
            "driver=file,name=fb,path={},size=8M,engine=threads",
            dir.path().join("b.img").display()
        ))
        .arg("--export")
        .arg(format!("bdev=fa,socket={},queues=1", sock.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    common::wait_for_socket(&sock, &mut child);
    let mut c = vblkd::client::BlkClient::connect(&sock, 1, 64, 1 << 20).expect("connect");
    for i in 0..16u64 {
        c.write(0, i * 65536, 0, 65536, i as usize);
    }
    let mut out = Vec::with_capacity(16);
    let n = c.wait(0, 16, &mut out, Duration::from_secs(20)).expect("wait");
    assert_eq!(n, 16);
    assert!(out.iter().all(|x| x.ret == 0));
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let st = child.wait().expect("wait");
    drop(c);
    let mut log = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut log).expect("read log");
    assert!(st.success(), "exit {st}: {log}");
    for name in ["fa", "fb"] {
        assert!(log.contains(&format!("file bdev '{name}': synced on close")), "{name} not synced:\n{log}");
    }
    let stop_at = log.find("stopping").expect("stop logged");
    let synced_at = log.find("synced on close").expect("sync logged");
    let done_at = log.find("stopped cleanly").expect("clean stop logged");
    assert!(stop_at < synced_at && synced_at < done_at, "order: stop, sync, exit:\n{log}");
}

/// The OCSSD emulator's `Op::Flush` syncs the image (`fdatasync`), counted by `data_syncs()`.
/// Mutation caught: removing the `sync_data()` behind `Op::Flush` in `src/ocssd/emu.rs`.
#[test]
fn emulator_flush_syncs_the_image() {
    use vblkd::ocssd::{Command, EmuDevice, EmuGeometry, MediaDevice, Op, Status};
    let dir = tempfile::tempdir().expect("tmp");
    let g = EmuGeometry {
        num_grp: 1,
        num_pu: 1,
        num_chk: 2,
        clba: 16,
        ws_min: 4,
        ws_opt: 4,
        ..EmuGeometry::default()
    };
    let dev = EmuDevice::create(
        &dir.path().join("m.img"),
        &vblkd::ocssd::emu::EmuConfig { geometry: g, ..Default::default() },
    )
    .expect("create");
    let before = dev.data_syncs();
    let mut qp = dev.queue_pair(4).expect("qp");
    for tag in 0..2 {
        qp.submit(Command { tag, op: Op::Flush }).expect("room");
        let mut done = Vec::new();
        let t = Instant::now();
        while qp.poll(&mut done, 4) == 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "flush never completed");
        }
        assert_eq!(done[0].status, Status::SUCCESS);
    }
    assert_eq!(dev.data_syncs() - before, 2, "each flush synced the image once");
}

/// Tests labelled io_uring must run on io_uring: the file bdev reports the engine it really uses, and
/// this machine (CI included) has io_uring, so a silent fallback to threads fails here.
#[test]
fn io_uring_file_bdevs_really_use_io_uring() {
    let dir = tempfile::tempdir().expect("tmp");
    for direct in [false, true] {
        let f = FileBdev::open(
            "u",
            dir.path().join(format!("u{direct}.img")),
            Some(1 << 20),
            direct,
            Engine::IoUring,
        )
        .expect("file");
        assert_eq!(f.engine(), Engine::IoUring, "direct={direct}: io_uring fell back to threads");
        assert_eq!(f.module_stats().expect("stats")["engine"], serde_json::json!("io_uring"));
    }
}

/// A vring size that is not a power of two (33) is not taken: the front door refuses it with an error
/// reply (the connection stays usable) and a good size set afterwards (64) is the one the queue
/// uses. Seen from the frontend: 34 chains published at once (more than 33) are all served,
/// the 34th (avail slot 33, a GET_ID) into used slot 33; a ring of 33 would refuse 34 pending chains
/// or wrap slot 33 onto slot 0, where a different (malformed) chain waits.
#[test]
fn vring_size_33_is_not_taken() {
    let dir = tempfile::tempdir().expect("tmp");
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("v0", 4 << 20, 512).expect("malloc"))).expect("register");
    let ex = Export::new(&reg, "v0", dir.path());
    let (mut g, mem) = Guest::connect(&ex.sock);
    const N: u16 = 64;
    assert!(acked(&mut g.f, |f| f.set_vring_num(0, 33)).is_err(), "a ring size of 33 must be refused");
    acked(&mut g.f, |f| f.set_vring_num(0, N)).expect("a good size after a refused one");
    g.f.set_vring_base(0, 0).expect("base");
    let q = MockSplitQueue::create(&mem, GuestAddress(0), N);
    // The mock places its used ring over the tail of its avail ring (it sizes the avail ring in
    // elements, not bytes): use a used ring of our own.
    const USED: u64 = 0x8000;
    let used_idx = || mem.read_obj::<u16>(GuestAddress(USED + 2)).expect("used idx");
    let used = |i: u64| {
        let id = mem.read_obj::<u32>(GuestAddress(USED + 4 + 8 * i)).expect("id");
        let len = mem.read_obj::<u32>(GuestAddress(USED + 8 + 8 * i)).expect("len");
        (id, len)
    };
    let host = mem.iter().next().expect("region").as_ptr() as u64;
    g.f.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: N,
            queue_size: N,
            flags: 0,
            desc_table_addr: host + q.desc_table_addr().0,
            used_ring_addr: host + USED,
            avail_ring_addr: host + q.avail_addr().0,
            log_addr: None,
        },
    )
    .expect("addr");
    // Descriptors 10..12: GET_ID, published in avail slot 33 only.
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_GET_ID.to_le_bytes());
    mem.write_slice(&h, GuestAddress(H)).expect("header");
    mem.write_obj(0xffu8, GuestAddress(S)).expect("status");
    let t = q.desc_table();
    t.store(10, RawDescriptor::from(Descriptor::new(H, 16, VRING_DESC_F_NEXT as u16, 11))).expect("d");
    t.store(
        11,
        RawDescriptor::from(Descriptor::new(D, 20, (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16, 12)),
    )
    .expect("d");
    t.store(12, RawDescriptor::from(Descriptor::new(S, 1, VRING_DESC_F_WRITE as u16, 0))).expect("d");
    // Descriptor 20: a lone read-only descriptor (refused with used length 0), in slots 0..=32.
    t.store(20, RawDescriptor::from(Descriptor::new(H, 16, 0, 0))).expect("d");
    for slot in 0..33 {
        q.avail().ring().ref_at(slot).expect("slot").store(20);
    }
    q.avail().ring().ref_at(33).expect("slot 33").store(10);
    q.avail().idx().store(34);
    g.f.set_vring_kick(0, &g.kick).expect("kick");
    g.f.set_vring_call(0, &g.call).expect("call");
    g.f.set_vring_enable(0, true).expect("enable");
    g.kick.write(1).expect("kick");
    let t = Instant::now();
    while used_idx() < 34 {
        assert!(t.elapsed() < Duration::from_secs(10), "used idx {} < 34", used_idx());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(used(33), (10, 21), "the chain in avail slot 33 was served into used slot 33");
    assert_eq!(used(0), (20, 0), "slot 0 held the malformed chain");
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 3];
    mem.read_slice(&mut id, GuestAddress(D)).expect("id");
    assert_eq!(&id, b"ops");
}
