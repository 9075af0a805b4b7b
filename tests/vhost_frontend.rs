//! The vhost-user-blk device driven by the `vhost` crate's frontend: negotiation, config space,
//! memory-table validation and hand-built (good and malformed) chains on a real vring.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vblkd::bdev::malloc::MallocBdev;
use vblkd::bdev::Registry;
use vblkd::vhost::{serve, EventFd, ExportConfig, VhostError};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const SIZE: u64 = 4 << 20;
const MEM: usize = 1 << 20;
const QSIZE: u16 = 32;

struct Export {
    stop: Arc<EventFd>,
    handle: Option<std::thread::JoinHandle<Result<(), VhostError>>>,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Export {
    fn new() -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().expect("tmp");
        let reg = Registry::new();
        reg.register(Arc::new(MallocBdev::new("m0", SIZE, 512).expect("malloc"))).expect("register");
        let desc = Arc::new(reg.open("m0", true).expect("open"));
        let sock = dir.path().join("m0.sock");
        let mut cfg = ExportConfig::new(&sock, "serial-0");
        cfg.queues = 2;
        cfg.queue_size = 64;
        let stop = Arc::new(EventFd::new(0).expect("eventfd"));
        let handle = Some(serve(desc, cfg, stop.clone()).expect("serve"));
        Self { stop, handle, sock, _dir: dir }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let r = h.join().expect("join");
            assert!(r.is_ok(), "{r:?}");
        }
    }
}

/// Shuts the frontend socket down if the test hangs (the crate would otherwise wait forever).
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn new(fd: i32, limit: Duration) -> Self {
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
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn negotiate(sock: &PathBuf) -> (Frontend, u64) {
    let mut f = Frontend::connect(sock, 2).expect("connect");
    f.set_owner().expect("owner");
    let features = f.get_features().expect("features");
    f.set_features(features).expect("set features");
    let pf = f.get_protocol_features().expect("protocol features");
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(pf.contains(want), "{pf:?}");
    f.set_protocol_features(want).expect("set protocol features");
    (f, features)
}

/// Sends one message with NEED_REPLY (REPLY_ACK is negotiated) so a refusal comes back as an error.
fn acked<T>(f: &mut Frontend, op: impl FnOnce(&mut Frontend) -> T) -> T {
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let r = op(f);
    f.set_hdr_flags(VhostUserHeaderFlag::empty());
    r
}

fn memfd(len: usize) -> File {
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"vblkd-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh, owned descriptor.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len as u64).expect("set_len");
    f
}

fn config(f: &mut Frontend) -> Vec<u8> {
    let (_, buf) = f.get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60]).expect("get_config");
    buf
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[test]
fn negotiation_and_config_space() {
    let ex = Export::new();
    let (mut f, features) = negotiate(&ex.sock);
    let _w = Watchdog::new(f.as_raw_fd(), Duration::from_secs(20));
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert!(features & (1 << bit) != 0, "feature bit {bit} missing");
    }
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
    assert_eq!(f.get_queue_num().expect("queue num"), 2);

    let c = config(&mut f);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().expect("8")), SIZE / 512);
    assert_eq!(le32(&c, 12), 62, "seg_max");
    assert_eq!(le32(&c, 20), 512, "blk_size");
    assert_eq!(c[32], 0, "wce");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2, "num_queues");
    assert_eq!(le32(&c, 40), 1, "max_discard_seg");
    assert_eq!(le32(&c, 52), 1, "max_write_zeroes_seg");
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");

    // wce is writable; nothing else is.
    acked(&mut f, |f| f.set_config(32, VhostUserConfigFlags::empty(), &[1])).expect("wce");
    assert_eq!(config(&mut f)[32], 1);
    drop(f);
    // Each refusal on a fresh frontend (a refused message keeps the connection since the front door;
    // `tests/hostile_ring.rs` checks that).
    for (offset, buf) in [(32u32, vec![2u8]), (0, vec![0; 8]), (20, vec![0; 4]), (33, vec![1])] {
        let (mut f, _) = negotiate(&ex.sock);
        let r = acked(&mut f, |f| f.set_config(offset, VhostUserConfigFlags::empty(), &buf));
        assert!(r.is_err(), "config write at {offset} must be refused");
    }
    // wce is per connection; a new frontend sees the default again.
    let (mut f, _) = negotiate(&ex.sock);
    assert_eq!(config(&mut f)[32], 0);
}

#[test]
fn memory_region_past_end_of_file_is_refused() {
    let ex = Export::new();
    let (mut f, _) = negotiate(&ex.sock);
    let _w = Watchdog::new(f.as_raw_fd(), Duration::from_secs(20));
    let file = memfd(MEM);
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 2 * MEM as u64,
        userspace_addr: 0x7000_0000_0000,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    let r = acked(&mut f, |f| f.set_mem_table(&[region]));
    assert!(r.is_err(), "a region larger than its file must be refused");
    drop(f);
    // Offset pushing the region past the end.
    let (mut f, _) = negotiate(&ex.sock);
    let region = VhostUserMemoryRegionInfo { memory_size: MEM as u64, mmap_offset: 4096, ..region };
    assert!(acked(&mut f, |f| f.set_mem_table(&[region])).is_err());
    drop(f);
    // A region that fits is accepted, and the daemon is still alive to take it.
    let (mut f, _) = negotiate(&ex.sock);
    let region = VhostUserMemoryRegionInfo { memory_size: MEM as u64, mmap_offset: 0, ..region };
    acked(&mut f, |f| f.set_mem_table(&[region])).expect("valid table");
    assert_eq!(config(&mut f).len(), 60);
}

/// Writes chains (lists of (addr, len, writable)) at descriptor index `first` and publishes them.
fn add_chains(
    q: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    first: u16,
    chains: &[Vec<(u64, u32, bool)>],
) -> Vec<u16> {
    let mut raw = Vec::new();
    let mut heads = Vec::new();
    let mut i = first;
    for c in chains {
        heads.push(i);
        for (n, &(a, len, w)) in c.iter().enumerate() {
            let last = n + 1 == c.len();
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            raw.push(RawDescriptor::from(Descriptor::new(a, len, flags, if last { 0 } else { i + 1 })));
            i += 1;
        }
    }
    q.add_desc_chains(&raw, first).expect("add chains");
    heads
}

fn header(m: &GuestMemoryMmap<()>, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(at)).expect("header");
}

#[test]
fn chains_on_a_real_vring() {
    let ex = Export::new();
    let (mut f, _) = negotiate(&ex.sock);
    let _w = Watchdog::new(f.as_raw_fd(), Duration::from_secs(30));
    let file = memfd(MEM);
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("memory");
    let region = mem.iter().next().expect("region");
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
    f.set_mem_table(&[info]).expect("mem table");
    let host = info.userspace_addr;

    let q = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    let kick = EventFd::new(0).expect("kick");
    let call = EventFd::new(0).expect("call");
    f.set_vring_num(0, QSIZE).expect("num");
    f.set_vring_base(0, 0).expect("base");
    f.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host + q.desc_table_addr().0,
            used_ring_addr: host + q.used_addr().0,
            avail_ring_addr: host + q.avail_addr().0,
            log_addr: None,
        },
    )
    .expect("addr");
    f.set_vring_kick(0, &kick).expect("kick");
    f.set_vring_call(0, &call).expect("call");
    f.set_vring_enable(0, true).expect("enable");

    const H: u64 = 0x10000; // headers, 16 bytes apart
    const D: u64 = 0x20000; // data
    const S: u64 = 0x40000; // status bytes, 1 byte apart
    for i in 0..16 {
        mem.write_obj(0xffu8, GuestAddress(S + i)).expect("status");
    }
    for (i, x) in (0..4096u32).enumerate() {
        mem.write_obj((x % 253) as u8, GuestAddress(D + i as u64)).expect("data");
    }
    header(&mem, H, VIRTIO_BLK_T_OUT, 8);
    header(&mem, H + 0x10, VIRTIO_BLK_T_IN, 8);
    header(&mem, H + 0x20, VIRTIO_BLK_T_IN, 0);
    header(&mem, H + 0x30, VIRTIO_BLK_T_IN, 0);
    header(&mem, H + 0x40, 77, 0);
    header(&mem, H + 0x50, VIRTIO_BLK_T_GET_ID, 0);
    let chains = vec![
        // 0: good write.
        vec![(H, 16, false), (D, 4096, false), (S, 1, true)],
        // 1: read it back.
        vec![(H + 0x10, 16, false), (D + 0x4000, 4096, true), (S + 1, 1, true)],
        // 2: status not writable → len 0, byte untouched.
        vec![(H + 0x20, 16, false), (D + 0x8000, 512, true), (S + 2, 1, false)],
        // 3: data outside guest memory → IOERR.
        vec![(H + 0x30, 16, false), (0x4000_0000, 512, true), (S + 3, 1, true)],
        // 4: unknown type → UNSUPP.
        vec![(H + 0x40, 16, false), (S + 4, 1, true)],
        // 5: GET_ID.
        vec![(H + 0x50, 16, false), (D + 0x9000, 20, true), (S + 5, 1, true)],
    ];
    let heads = add_chains(&q, 0, &chains);
    // 6: a descriptor loop (two descriptors pointing at each other).
    let loop_head = 30u16;
    let raw = [
        RawDescriptor::from(Descriptor::new(H + 0x60, 16, VRING_DESC_F_NEXT as u16, 31)),
        RawDescriptor::from(Descriptor::new(D, 512, (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16, 30)),
    ];
    q.add_desc_chains(&raw, loop_head).expect("loop chain");
    kick.write(1).expect("kick");

    let want = chains.len() as u16 + 1;
    let t = Instant::now();
    while q.used().idx().load() < want {
        assert!(t.elapsed() < Duration::from_secs(10), "used idx {} < {want}", q.used().idx().load());
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut used = std::collections::HashMap::new();
    for i in 0..want {
        let e = q.used().ring().ref_at(usize::from(i)).expect("used").load();
        used.insert(e.id() as u16, e.len());
    }
    let status = |i: u64| mem.read_obj::<u8>(GuestAddress(S + i)).expect("status");
    assert_eq!((status(0), used[&heads[0]]), (VIRTIO_BLK_S_OK as u8, 1));
    assert_eq!((status(1), used[&heads[1]]), (VIRTIO_BLK_S_OK as u8, 4097));
    let mut a = vec![0u8; 4096];
    let mut b = vec![0u8; 4096];
    mem.read_slice(&mut a, GuestAddress(D)).expect("read");
    mem.read_slice(&mut b, GuestAddress(D + 0x4000)).expect("read");
    assert_eq!(a, b, "read-back data");
    assert_eq!((status(2), used[&heads[2]]), (0xff, 0));
    assert_eq!((status(3), used[&heads[3]]), (VIRTIO_BLK_S_IOERR as u8, 1));
    assert_eq!((status(4), used[&heads[4]]), (VIRTIO_BLK_S_UNSUPP as u8, 1));
    assert_eq!((status(5), used[&heads[5]]), (VIRTIO_BLK_S_OK as u8, 21));
    let mut id = [0u8; 8];
    mem.read_slice(&mut id, GuestAddress(D + 0x9000)).expect("id");
    assert_eq!(&id, b"serial-0");
    assert_eq!(used[&loop_head], 0);

    // Stopping the ring drains it and reports the next avail index.
    assert_eq!(f.get_vring_base(0).expect("vring base"), u32::from(want));
}

#[test]
fn unoffered_features_and_bad_vring_sizes_are_refused() {
    let ex = Export::new();
    // Feature bits the device did not offer (SCSI passthrough, bit 7; and a high unknown bit).
    {
        let mut f = Frontend::connect(&ex.sock, 2).expect("connect");
        let _w = Watchdog::new(f.as_raw_fd(), Duration::from_secs(20));
        f.set_owner().expect("owner");
        let features = f.get_features().expect("features");
        assert_eq!(features & (1 << VIRTIO_BLK_F_SCSI), 0, "SCSI must not be offered");
        f.get_protocol_features().expect("protocol features");
        f.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK).expect("set protocol features");
        let bad = features | (1 << VIRTIO_BLK_F_SCSI) | (1 << 50);
        let r = acked(&mut f, |f| f.set_features(bad));
        assert!(r.is_err(), "features that were not offered must be refused");
    }
    // A vring size of zero, or above the export's queue-size, is refused.
    for num in [0u16, 2 * QSIZE * 2] {
        let (mut f, _) = negotiate(&ex.sock);
        let _w = Watchdog::new(f.as_raw_fd(), Duration::from_secs(20));
        let r = acked(&mut f, |f| f.set_vring_num(0, num));
        assert!(r.is_err(), "vring size {num} must be refused");
    }
    // A size that is not a power of two is not taken (virtio-queue keeps the old size); the daemon
    // carries on and serves the next frontend normally.
    {
        let (mut f, _) = negotiate(&ex.sock);
        let _w = Watchdog::new(f.as_raw_fd(), Duration::from_secs(20));
        let _ = acked(&mut f, |f| f.set_vring_num(0, 33));
    }
    let (mut f, _) = negotiate(&ex.sock);
    let _w = Watchdog::new(f.as_raw_fd(), Duration::from_secs(20));
    assert_eq!(u64::from_le_bytes(config(&mut f)[0..8].try_into().expect("8")), SIZE / 512);
}
