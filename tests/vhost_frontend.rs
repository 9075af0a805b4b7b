//! The vhost-user-blk device driven by the `vhost` crate's frontend: negotiation, config space,
//! memory-table validation and hand-built (good and malformed) chains on a real vring.

mod common;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::vring::{acked, guest_memory, memfd, set_mem_table, start_vring, RingLayout, Watchdog};
use vblkd::bdev::malloc::MallocBdev;
use vblkd::bdev::Registry;
use vblkd::vhost::EventFd;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const SIZE: u64 = 4 << 20;
const MEM: usize = 1 << 20;
const QSIZE: u16 = 32;

/// The in-process export of a malloc bdev.
struct Export {
    _srv: common::vring::Export,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Export {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let reg = Registry::new();
        reg.register(Arc::new(MallocBdev::new("m0", SIZE, 512).expect("malloc"))).expect("register");
        let sock = dir.path().join("m0.sock");
        let srv = common::vring::Export::serve(&reg, "m0", sock.clone(), 2, 64, "serial-0");
        Self { _srv: srv, sock, _dir: dir }
    }
}

fn negotiate(sock: &std::path::Path) -> (Frontend, u64) {
    common::vring::negotiate(sock, 2, VhostUserProtocolFeatures::empty())
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
    let _w = Watchdog::on(&f, Duration::from_secs(20));
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
    let _w = Watchdog::on(&f, Duration::from_secs(20));
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
    let _w = Watchdog::on(&f, Duration::from_secs(30));
    let mem = guest_memory(MEM);
    let host = set_mem_table(&mut f, &mem);

    let q = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    let kick = EventFd::new(0).expect("kick");
    let call = EventFd::new(0).expect("call");
    let ring = RingLayout { desc: q.desc_table_addr().0, avail: q.avail_addr().0, used: q.used_addr().0 };
    start_vring(&mut f, 0, QSIZE, 0, host, ring, &kick, &call);

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
        let _w = Watchdog::on(&f, Duration::from_secs(20));
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
        let _w = Watchdog::on(&f, Duration::from_secs(20));
        let r = acked(&mut f, |f| f.set_vring_num(0, num));
        assert!(r.is_err(), "vring size {num} must be refused");
    }
    // A size that is not a power of two is not taken (virtio-queue keeps the old size); the daemon
    // carries on and serves the next frontend normally.
    {
        let (mut f, _) = negotiate(&ex.sock);
        let _w = Watchdog::on(&f, Duration::from_secs(20));
        let _ = acked(&mut f, |f| f.set_vring_num(0, 33));
    }
    let (mut f, _) = negotiate(&ex.sock);
    let _w = Watchdog::on(&f, Duration::from_secs(20));
    assert_eq!(u64::from_le_bytes(config(&mut f)[0..8].try_into().expect("8")), SIZE / 512);
}
