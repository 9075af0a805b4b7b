//! A hostile guest on a real vring (the `vhost` crate's frontend, rings in shared memory): an avail
//! index far ahead, head indexes outside the queue, a flood of malformed chains, and a ring size the
//! device would not honour. After each: the daemon answers a vhost-user message within 1 s, the other
//! queue still works, and the disk file is unchanged outside what was asked.

mod common;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::vring::{
    acked, guest_memory, memfd, negotiate, set_mem_table, start_vring, Mem, RingLayout, Watchdog,
};
use vblkd::bdev::file::{Engine, FileBdev};
use vblkd::bdev::Registry;
use vblkd::vhost::EventFd;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

/// Disk size (bytes).
const DISK: u64 = 1 << 20;
/// Guest memory size.
const MEM: usize = 1 << 20;
/// The ring size the frontend declares.
const QSIZE: u16 = 32;
/// Ring bases of queue 0 and 1.
const RING: [u64; 2] = [0x0, 0x8000];
/// Request headers (16 bytes each), data buffers, status bytes.
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x80000;

/// The in-process export of a file bdev over a patterned disk image.
struct Export {
    _srv: common::vring::Export,
    sock: PathBuf,
    disk: PathBuf,
    _dir: tempfile::TempDir,
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + i / 511) as u8) ^ seed).collect()
}

impl Export {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, pattern(DISK, 0x5a)).expect("disk image");
        let reg = Registry::new();
        let bdev = FileBdev::open("f0", &disk, None, false, Engine::Threads).expect("file bdev");
        reg.register(Arc::new(bdev)).expect("register");
        let sock = dir.path().join("f0.sock");
        let srv = common::vring::Export::serve(&reg, "f0", sock.clone(), 2, 64, "hostile");
        Self { _srv: srv, sock, disk, _dir: dir }
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(&self.disk).expect("read disk")
    }
}

/// The driver side of two split rings in shared memory, with a connected frontend.
struct Guest {
    f: Frontend,
    mem: Mem,
    host: u64,
    kick: [EventFd; 2],
    call: [EventFd; 2],
    next_hdr: u64,
    _w: Watchdog,
}

fn layout(q: usize, size: u16) -> RingLayout {
    RingLayout { desc: desc_addr(q), avail: avail_addr(q, size), used: used_addr(q, size) }
}
fn desc_addr(q: usize) -> u64 {
    RING[q]
}
fn avail_addr(q: usize, size: u16) -> u64 {
    RING[q] + 16 * u64::from(size)
}
fn used_addr(q: usize, size: u16) -> u64 {
    (avail_addr(q, size) + 6 + 2 * u64::from(size) + 3) & !3
}

impl Guest {
    fn connect(ex: &Export) -> Self {
        Self::connect_with(ex, QSIZE)
    }

    /// Negotiates, installs the memory table and sets both rings up with `size` entries.
    fn connect_with(ex: &Export, size: u16) -> Self {
        let (mut f, _) = negotiate(&ex.sock, 2, VhostUserProtocolFeatures::empty());
        let w = Watchdog::on(&f, Duration::from_secs(60));
        let mem = guest_memory(MEM);
        let host = set_mem_table(&mut f, &mem);
        let kick = [EventFd::new(0).expect("kick"), EventFd::new(0).expect("kick")];
        let call = [EventFd::new(0).expect("call"), EventFd::new(0).expect("call")];
        let mut g = Self { f, mem, host, kick, call, next_hdr: HDR, _w: w };
        for q in 0..2 {
            g.setup_ring(q, size);
        }
        g
    }

    fn setup_ring(&mut self, q: usize, size: u16) {
        start_vring(&mut self.f, q, size, 0, self.host, layout(q, size), &self.kick[q], &self.call[q]);
    }

    fn write_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, GuestAddress(desc_addr(q) + 16 * u64::from(i))).expect("desc");
    }

    /// Writes a chain of (addr, len, device-writable) at descriptor `first`; returns the head.
    fn chain(&self, q: usize, first: u16, parts: &[(u64, u32, bool)]) -> u16 {
        for (n, &(a, len, w)) in parts.iter().enumerate() {
            let i = first + n as u16;
            let last = n + 1 == parts.len();
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(q, i, a, len, flags, if last { 0 } else { i + 1 });
        }
        first
    }

    fn avail_idx(&self, q: usize, size: u16) -> u16 {
        self.mem.read_obj(GuestAddress(avail_addr(q, size) + 2)).expect("avail idx")
    }

    fn set_avail_idx(&self, q: usize, size: u16, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(avail_addr(q, size) + 2)).expect("avail idx");
    }

    /// Puts `heads` in the avail ring (modulo `size`) and moves the index; kicks.
    fn publish(&self, q: usize, size: u16, heads: &[u16]) {
        let idx = self.avail_idx(q, size);
        for (k, &h) in heads.iter().enumerate() {
            let slot = (idx.wrapping_add(k as u16) % size) as u64;
            self.mem.write_obj(h, GuestAddress(avail_addr(q, size) + 4 + 2 * slot)).expect("avail ring");
        }
        self.set_avail_idx(q, size, idx.wrapping_add(heads.len() as u16));
        self.kick[q].write(1).expect("kick");
    }

    fn used_idx(&self, q: usize, size: u16) -> u16 {
        self.mem.read_obj(GuestAddress(used_addr(q, size) + 2)).expect("used idx")
    }

    /// (id, len) of used element `i`.
    fn used_elem(&self, q: usize, size: u16, i: u16) -> (u32, u32) {
        let at = used_addr(q, size) + 4 + 8 * u64::from(i % size);
        (
            self.mem.read_obj(GuestAddress(at)).expect("used id"),
            self.mem.read_obj(GuestAddress(at + 4)).expect("used len"),
        )
    }

    fn wait_used(&self, q: usize, size: u16, want: u16) {
        let t = Instant::now();
        while self.used_idx(q, size) != want {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "queue {q}: used idx {} != {want}",
                self.used_idx(q, size)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn header(&mut self, kind: u32, sector: u64) -> u64 {
        let at = self.next_hdr;
        self.next_hdr += 16;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).expect("header");
        at
    }

    /// A well-formed write of `data` at `sector` on queue `q` (descriptors from `first`); waits for it.
    fn write(&mut self, q: usize, first: u16, sector: u64, data: &[u8], buf: u64, status: u64) {
        self.mem.write_slice(data, GuestAddress(buf)).expect("data");
        self.mem.write_obj(0xffu8, GuestAddress(status)).expect("status");
        let h = self.header(VIRTIO_BLK_T_OUT, sector);
        let head =
            self.chain(q, first, &[(h, 16, false), (buf, data.len() as u32, false), (status, 1, true)]);
        let before = self.used_idx(q, QSIZE);
        self.publish(q, QSIZE, &[head]);
        self.wait_used(q, QSIZE, before.wrapping_add(1));
        assert_eq!(self.mem.read_obj::<u8>(GuestAddress(status)).expect("status"), VIRTIO_BLK_S_OK as u8);
    }

    /// A well-formed read of `len` bytes at `sector`; returns the data.
    fn read(&mut self, q: usize, first: u16, sector: u64, len: u32, buf: u64, status: u64) -> Vec<u8> {
        self.mem.write_obj(0xffu8, GuestAddress(status)).expect("status");
        let h = self.header(VIRTIO_BLK_T_IN, sector);
        let head = self.chain(q, first, &[(h, 16, false), (buf, len, true), (status, 1, true)]);
        let before = self.used_idx(q, QSIZE);
        self.publish(q, QSIZE, &[head]);
        self.wait_used(q, QSIZE, before.wrapping_add(1));
        assert_eq!(self.mem.read_obj::<u8>(GuestAddress(status)).expect("status"), VIRTIO_BLK_S_OK as u8);
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(buf)).expect("read back");
        out
    }

    /// The daemon must answer a vhost-user message within 5 s (a hung daemon never answers; 5 s leaves room
    /// for a loaded CI machine).
    fn assert_responsive(&mut self) {
        let t = Instant::now();
        let n = self.f.get_queue_num().expect("GET_QUEUE_NUM answered");
        assert_eq!(n, 2);
        assert!(t.elapsed() < Duration::from_secs(5), "GET_QUEUE_NUM took {:?}", t.elapsed());
    }

    /// GET_VRING_BASE (stops the ring, drains it) must be answered within 5 s.
    fn assert_ring_stops(&mut self, q: usize) -> u32 {
        let t = Instant::now();
        let base = self.f.get_vring_base(q).expect("GET_VRING_BASE answered");
        assert!(t.elapsed() < Duration::from_secs(5), "GET_VRING_BASE took {:?}", t.elapsed());
        base
    }

    fn acked<T>(&mut self, op: impl FnOnce(&mut Frontend) -> T) -> T {
        acked(&mut self.f, op)
    }
}

/// The disk equals the original pattern except for `writes` (byte offset, data).
fn assert_disk(ex: &Export, writes: &[(u64, &[u8])]) {
    let mut want = pattern(DISK, 0x5a);
    for &(off, data) in writes {
        want[off as usize..off as usize + data.len()].copy_from_slice(data);
    }
    let got = ex.disk();
    if got != want {
        let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        panic!("disk differs from what was asked, first at byte {first} (sector {})", first / 512);
    }
}

/// Queue 1 still serves a write and a read (descriptors 0..3 and 4..7).
fn other_queue_works(g: &mut Guest, sector: u64, seed: u8) -> Vec<u8> {
    let data = pattern(4096, seed);
    g.write(1, 0, sector, &data, DATA + 0x10000, STATUS + 0x100);
    let back = g.read(1, 4, sector, 4096, DATA + 0x20000, STATUS + 0x101);
    assert_eq!(back, data, "queue 1 read-back");
    data
}

#[test]
fn avail_index_far_ahead_never_hangs() {
    let ex = Export::new();
    let mut g = Guest::connect(&ex);
    let good = pattern(4096, 1);
    g.write(0, 0, 16, &good, DATA, STATUS);
    // The guest moves the avail index more than a queue size ahead of what the device consumed.
    let idx = g.avail_idx(0, QSIZE);
    g.set_avail_idx(0, QSIZE, idx.wrapping_add(QSIZE + 5));
    g.kick[0].write(1).expect("kick");
    std::thread::sleep(Duration::from_millis(100));
    g.assert_responsive();
    let other = other_queue_works(&mut g, 64, 2);
    g.assert_responsive();
    // Another export of the same process is not disturbed.
    let ex2 = Export::new();
    let mut g2 = Guest::connect(&ex2);
    let data2 = pattern(4096, 7);
    g2.write(0, 0, 8, &data2, DATA, STATUS);
    g2.assert_responsive();
    drop(g2);
    assert_disk(&ex2, &[(8 * 512, &data2)]);
    // Stopping the broken ring is answered at once and reports what was really consumed.
    assert_eq!(g.assert_ring_stops(0), u32::from(idx));
    drop(g);
    assert_disk(&ex, &[(16 * 512, &good), (64 * 512, &other)]);
    // The export serves a fresh frontend normally.
    let mut g = Guest::connect(&ex);
    let again = pattern(4096, 3);
    g.write(0, 0, 32, &again, DATA, STATUS);
    g.assert_responsive();
}

#[test]
fn head_index_outside_the_queue_is_never_followed() {
    let ex = Export::new();
    let mut g = Guest::connect(&ex);
    let good = pattern(4096, 4);
    g.write(0, 0, 16, &good, DATA, STATUS);
    let before = g.used_idx(0, QSIZE);
    // Heads at and beyond the queue size (descriptor QSIZE.. would be read past the table's end).
    g.publish(0, QSIZE, &[QSIZE, QSIZE + 1, 0x7fff, 0xffff]);
    std::thread::sleep(Duration::from_millis(200));
    g.assert_responsive();
    let other = other_queue_works(&mut g, 128, 5);
    // The broken queue takes nothing more: a later good request on it is not processed.
    let later = pattern(4096, 6);
    g.mem.write_slice(&later, GuestAddress(DATA + 0x8000)).expect("data");
    let h2 = g.header(VIRTIO_BLK_T_OUT, 200);
    let head = g.chain(0, 8, &[(h2, 16, false), (DATA + 0x8000, 4096, false), (STATUS + 8, 1, true)]);
    g.publish(0, QSIZE, &[head]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(g.used_idx(0, QSIZE), before, "no used element for out-of-range heads or after them");
    g.assert_responsive();
    g.assert_ring_stops(0);
    drop(g);
    assert_disk(&ex, &[(16 * 512, &good), (128 * 512, &other)]);
}

#[test]
fn flood_of_malformed_chains() {
    let ex = Export::new();
    let mut g = Guest::connect(&ex);
    let mut expected_used = 0u16;
    // 20 rounds of QSIZE-1 malformed chains each, every one a write aimed at sector 300 that must
    // never reach the disk: writable header, bad status, out-of-range sector, misaligned length,
    // data outside memory, descriptor loop.
    let evil = pattern(4096, 0x77);
    g.mem.write_slice(&evil, GuestAddress(DATA)).expect("data");
    let h_ok = g.header(VIRTIO_BLK_T_OUT, 300);
    let h_far = g.header(VIRTIO_BLK_T_OUT, DISK / 512 + 8);
    let t = Instant::now();
    for round in 0..20u16 {
        let mut heads = Vec::new();
        for k in 0..(QSIZE / 4) {
            let first = k * 4;
            let s = STATUS + u64::from(first);
            let head = match (round + k) % 6 {
                0 => g.chain(0, first, &[(h_ok, 16, true), (DATA, 4096, false), (s, 1, true)]),
                1 => g.chain(0, first, &[(h_ok, 16, false), (DATA, 4096, false), (s, 1, false)]),
                2 => g.chain(0, first, &[(h_far, 16, false), (DATA, 4096, false), (s, 1, true)]),
                3 => g.chain(0, first, &[(h_ok, 16, false), (DATA, 100, false), (s, 1, true)]),
                4 => g.chain(0, first, &[(h_ok, 16, false), (0x4000_0000, 4096, false), (s, 1, true)]),
                _ => {
                    g.write_desc(0, first, h_ok, 16, VRING_DESC_F_NEXT as u16, first + 1);
                    g.write_desc(0, first + 1, DATA, 4096, VRING_DESC_F_NEXT as u16, first);
                    first
                }
            };
            heads.push(head);
        }
        g.publish(0, QSIZE, &heads);
        expected_used = expected_used.wrapping_add(heads.len() as u16);
        g.wait_used(0, QSIZE, expected_used);
        for i in 0..heads.len() as u16 {
            let (id, _len) = g.used_elem(0, QSIZE, expected_used.wrapping_sub(heads.len() as u16) + i);
            assert!(heads.contains(&(id as u16)), "used id {id} is not one of the published heads");
        }
    }
    eprintln!("flood: {} malformed chains in {:?}", expected_used, t.elapsed());
    g.assert_responsive();
    let other = other_queue_works(&mut g, 400, 8);
    // Queue 0 is still usable for good requests (malformed chains do not break a queue).
    let good = pattern(4096, 9);
    g.write(0, 0, 500, &good, DATA + 0x4000, STATUS + 0x200);
    g.assert_ring_stops(0);
    drop(g);
    assert_disk(&ex, &[(400 * 512, &other), (500 * 512, &good)]);
}

#[test]
fn ring_size_the_device_cannot_honour_is_refused() {
    let ex = Export::new();
    // A size that is not a power of two: virtio-queue ignores it and would keep its own (larger)
    // size, so the device's idea of the table, avail and used rings would differ from the guest's.
    let (mut f, _) = negotiate(&ex.sock, 2, VhostUserProtocolFeatures::empty());
    let _w = Watchdog::on(&f, Duration::from_secs(20));
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert!(f.set_vring_num(0, 33).is_err(), "vring size 33 must be refused");
    // The connection stays usable after the refusal.
    f.set_hdr_flags(VhostUserHeaderFlag::empty());
    let t = Instant::now();
    assert_eq!(f.get_queue_num().expect("still answered"), 2);
    assert!(t.elapsed() < Duration::from_secs(5), "GET_QUEUE_NUM took {:?}", t.elapsed());
}

/// The guest declares a 48-entry ring (not a power of two), ignores the refusal and uses it as
/// such. virtio-queue would silently keep its own size (64 here): the device would then read avail
/// slots past the guest's ring (the used ring's bytes, taken as heads of old chains) and re-execute
/// stale write chains whose buffer now holds other data, and write used elements past the guest's
/// used ring. The ring must never be processed.
#[test]
fn ring_with_an_unhonoured_size_is_never_processed() {
    let ex = Export::new();
    let mut f = Frontend::connect(&ex.sock, 2).expect("connect");
    let _w = Watchdog::new(f.as_raw_fd(), Duration::from_secs(60));
    f.set_owner().expect("owner");
    let features = f.get_features().expect("features");
    f.set_features(features).expect("set features");
    f.get_protocol_features().expect("protocol features");
    f.set_protocol_features(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG)
        .expect("set protocol features");
    let mem = guest_memory(MEM);
    let host = set_mem_table(&mut f, &mem);
    let size = 48u16;
    let kick = EventFd::new(0).expect("kick");
    let call = EventFd::new(0).expect("call");
    // No REPLY_ACK: a hostile frontend carries on whatever the device thinks of its messages.
    let _ = f.set_vring_num(1, size);
    let _ = f.set_vring_base(1, 0);
    let _ = f.set_vring_addr(
        1,
        &VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: host + desc_addr(1),
            used_ring_addr: host + used_addr(1, size),
            avail_ring_addr: host + avail_addr(1, size),
            log_addr: None,
        },
    );
    let _ = f.set_vring_kick(1, &kick);
    let _ = f.set_vring_call(1, &call);
    let _ = f.set_vring_enable(1, true);
    let g = Guest {
        f,
        mem,
        host,
        kick: [EventFd::new(0).expect("k"), kick],
        call: [EventFd::new(0).expect("c"), call],
        next_hdr: HDR,
        _w: Watchdog::new(-1, Duration::from_secs(1)),
    };
    // 16 descriptor sets of 3; request i uses set i % 16, its own sector, and the one data buffer B.
    let buf = DATA + 0x30000;
    let mut asked = Vec::new();
    for i in 0..64u16 {
        let sector = 600 + 8 * u64::from(i);
        let data = pattern(4096, i as u8);
        g.mem.write_slice(&data, GuestAddress(buf)).expect("data");
        let h = HDR + 16 * u64::from(i % 16);
        let mut hb = [0u8; 16];
        hb[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        hb[8..16].copy_from_slice(&sector.to_le_bytes());
        g.mem.write_slice(&hb, GuestAddress(h)).expect("header");
        let head =
            g.chain(1, 3 * (i % 16), &[(h, 16, false), (buf, 4096, false), (STATUS + u64::from(i), 1, true)]);
        let before = g.used_idx(1, size);
        g.publish(1, size, &[head]);
        asked.push((sector, data));
        let t = Instant::now();
        while g.used_idx(1, size) == before && t.elapsed() < Duration::from_millis(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let used_end = used_addr(1, size) + 4 + 8 * u64::from(size) + 2;
    let mut tail = vec![0u8; 512];
    g.mem.read_slice(&mut tail, GuestAddress(used_end)).expect("tail");
    let past_used = tail.iter().any(|&b| b != 0);
    let processed = g.used_idx(1, size);
    drop(g);
    // Every sector holds its original bytes or exactly what was asked for it; nothing else changed.
    let disk = ex.disk();
    let orig = pattern(DISK, 0x5a);
    let mut bad = Vec::new();
    for (sector, data) in &asked {
        let at = *sector as usize * 512;
        let got = &disk[at..at + 4096];
        if got != &orig[at..at + 4096] && got != &data[..] {
            bad.push(*sector);
        }
    }
    let lo = 600 * 512;
    let hi = (600 + 8 * 64) * 512;
    let outside = disk[..lo] != orig[..lo] || disk[hi..] != orig[hi..];
    assert!(
        bad.is_empty() && !outside,
        "sectors written with data nobody asked for them: {bad:?} (outside: {outside})"
    );
    assert!(!past_used, "the device wrote past the guest's used ring");
    assert_eq!(processed, 0, "a ring whose size was refused must not be processed");
}

/// Refused messages are answered with an error (REPLY_ACK) and the connection keeps working:
/// config writes other than wce, bad vring sizes and indexes, and memory tables that are
/// overlapping, zero-sized, past their file or too large. No refused table is ever installed: I/O
/// keeps using the table installed before.
#[test]
fn refused_messages_keep_the_connection() {
    let ex = Export::new();
    let mut g = Guest::connect(&ex);
    let good = pattern(4096, 12);
    g.write(0, 0, 8, &good, DATA, STATUS);
    for (offset, buf) in [(32u32, vec![2u8]), (0, vec![0; 8]), (20, vec![0; 4]), (33, vec![1])] {
        let r = g
            .acked(|f| f.set_config(offset, vhost::vhost_user::message::VhostUserConfigFlags::empty(), &buf));
        assert!(r.is_err(), "config write at {offset} must be refused");
        g.assert_responsive();
    }
    for num in [0u16, 3, 33, 128, 256] {
        assert!(g.acked(|f| f.set_vring_num(0, num)).is_err(), "vring size {num} must be refused");
        g.assert_responsive();
    }
    let file = memfd(MEM);
    let fd = file.as_raw_fd();
    let region = |gpa: u64, size: u64, off: u64| VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: 0x7000_0000_0000u64.wrapping_add(gpa),
        mmap_offset: off,
        mmap_handle: fd,
    };
    let half = MEM as u64 / 2;
    let bad_tables: Vec<(&str, Vec<VhostUserMemoryRegionInfo>)> = vec![
        ("overlapping", vec![region(0, half, 0), region(half / 2, half, half)]),
        ("zero-sized", vec![region(0, half, 0), region(half, 0, 0)]),
        ("past its file", vec![region(0, 2 * MEM as u64, 0)]),
        ("offset past its file", vec![region(0, half, MEM as u64)]),
        ("offset overflow", vec![region(0, half, u64::MAX - 10)]),
        ("guest range overflow", vec![region(u64::MAX - 100, half, 0)]),
        ("too many regions", (0..33).map(|k| region(k * 4096, 4096, k * 4096)).collect()),
    ];
    for (what, table) in &bad_tables {
        assert!(g.acked(|f| f.set_mem_table(table)).is_err(), "{what} memory table must be refused");
        g.assert_responsive();
    }
    // I/O still runs on the table installed at connect time, on both queues.
    let back = g.read(0, 4, 8, 4096, DATA + 0x8000, STATUS + 1);
    assert_eq!(back, good);
    let other = other_queue_works(&mut g, 40, 13);
    drop(g);
    assert_disk(&ex, &[(8 * 512, &good), (40 * 512, &other)]);
}
