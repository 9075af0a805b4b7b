//! INFLIGHT_SHMFD end to end with the real `vblkd` binary and the `vhost` crate's frontend: requests
//! taken by a daemon that is then killed with SIGKILL are resubmitted, in their original order, by
//! the next daemon on the same socket, and complete with the right data on disk.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::vring::{guest_memory, negotiate, set_mem_table, start_vring, RingLayout};
use common::Daemon;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const QSIZE: u16 = 32;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x80000;

fn daemon(dir: &Path) -> Daemon {
    let img = dir.join("disk.img");
    let sock = dir.join("d.sock");
    let args: Vec<String> = [
        "--bdev".to_string(),
        // On tmpfs the file engine completes every write inline, in submission order, so the delay
        // bdev (no jitter) completes in submission order too and the used ring shows the order in
        // which requests were (re)submitted. A thread pool would reorder the base's completions.
        format!("driver=file,name=f0,path={},size=4M,engine=auto", img.display()),
        "--bdev".into(),
        "driver=delay,name=d0,base=f0,read-us=1000,write-us=1500000".into(),
        "--export".into(),
        format!("bdev=d0,socket={},queues=1,queue-size={QSIZE}", sock.display()),
    ]
    .to_vec();
    Daemon::start(&args, &sock)
}

struct Conn {
    _f: Frontend,
    kick: EventFd,
    _call: EventFd,
}

/// Connects like QEMU's vhost-user-blk: features, protocol features with INFLIGHT_SHMFD, the
/// in-flight table (new, or handed back), memory, then the ring from `base`.
fn connect(
    sock: &Path,
    mem: &GuestMemoryMmap<()>,
    inflight: Option<&(VhostUserInflight, File)>,
    base: u16,
) -> (Conn, Option<(VhostUserInflight, File)>) {
    let (mut f, _) = negotiate(sock, 1, VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    let fresh = match inflight {
        None => {
            let req = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: QSIZE };
            let (info, file) = f.get_inflight_fd(&req).expect("GET_INFLIGHT_FD");
            assert!(info.mmap_size >= 16 * u64::from(QSIZE) + 16, "{}", info.mmap_size);
            f.set_inflight_fd(&info, file.as_raw_fd()).expect("SET_INFLIGHT_FD");
            Some((info, file))
        }
        Some((info, file)) => {
            f.set_inflight_fd(info, file.as_raw_fd()).expect("SET_INFLIGHT_FD");
            None
        }
    };
    let host = set_mem_table(&mut f, mem);
    let kick = EventFd::new(0).expect("kick");
    let call = EventFd::new(0).expect("call");
    start_vring(
        &mut f,
        0,
        QSIZE,
        base,
        host,
        RingLayout { desc: DESC, avail: AVAIL, used: USED },
        &kick,
        &call,
    );
    (Conn { _f: f, kick, _call: call }, fresh)
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// Request k: descriptors 3k..3k+2, header k, data buffer k, status byte k.
fn request(mem: &GuestMemoryMmap<()>, k: u16, kind: u32, sector: u64) -> u16 {
    let h = HDR + 16 * u64::from(k);
    let d = DATA + 0x1000 * u64::from(k);
    let s = STATUS + u64::from(k);
    let mut hb = [0u8; 16];
    hb[0..4].copy_from_slice(&kind.to_le_bytes());
    hb[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&hb, GuestAddress(h)).expect("header");
    mem.write_obj(0xffu8, GuestAddress(s)).expect("status");
    let w = if kind == VIRTIO_BLK_T_IN { VRING_DESC_F_WRITE as u16 } else { 0 };
    let parts = [(h, 16u32, 0u16), (d, 4096, w), (s, 1, VRING_DESC_F_WRITE as u16)];
    let first = 3 * k;
    for (n, &(a, len, fl)) in parts.iter().enumerate() {
        let i = first + n as u16;
        let last = n == 2;
        let flags = if last { fl } else { fl | VRING_DESC_F_NEXT as u16 };
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&a.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&(if last { 0 } else { i + 1 }).to_le_bytes());
        mem.write_slice(&b, GuestAddress(DESC + 16 * u64::from(i))).expect("desc");
    }
    first
}

fn publish(mem: &GuestMemoryMmap<()>, heads: &[u16]) {
    let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).expect("idx");
    for (k, &h) in heads.iter().enumerate() {
        let slot = u64::from(idx.wrapping_add(k as u16) % QSIZE);
        mem.write_obj(h, GuestAddress(AVAIL + 4 + 2 * slot)).expect("avail");
    }
    mem.write_obj(idx.wrapping_add(heads.len() as u16), GuestAddress(AVAIL + 2)).expect("idx");
}

fn used_idx(mem: &GuestMemoryMmap<()>) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).expect("used idx")
}

fn used_ids(mem: &GuestMemoryMmap<()>, n: u16) -> Vec<u32> {
    (0..n).map(|i| mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(i % QSIZE))).expect("id")).collect()
}

#[test]
fn requests_in_flight_survive_sigkill() {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
    let mem = guest_memory(MEM);
    let mut d = daemon(dir.path());
    let (c, table) = connect(&d.socket, &mem, None, 0);
    let table = table.expect("fresh table");
    // Request 1: a read (1 ms) that completes; requests 0, 2, 3, 4: writes (1.5 s) left in flight.
    // The completed request is not the first one, so restarting from the used index alone would
    // run the read again and lose write 0: only the in-flight table gets this right.
    for k in [0u16, 2, 3, 4] {
        mem.write_slice(&pattern(k as u8), GuestAddress(DATA + 0x1000 * u64::from(k))).expect("data");
    }
    let heads: Vec<u16> = (0..=4u16)
        .map(|k| {
            if k == 1 {
                request(&mem, k, VIRTIO_BLK_T_IN, 0)
            } else {
                request(&mem, k, VIRTIO_BLK_T_OUT, 8 * u64::from(k + 1))
            }
        })
        .collect();
    publish(&mem, &heads);
    c.kick.write(1).expect("kick");
    let t = Instant::now();
    while used_idx(&mem) < 1 {
        assert!(t.elapsed() < Duration::from_secs(10), "the read never completed");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_idx(&mem), 1, "the writes must still be in flight");
    // SIGKILL: nothing is drained.
    let mut child = d.child.take().expect("child");
    child.kill().expect("kill");
    child.wait().expect("wait");
    drop(c);
    let img = dir.path().join("disk.img");

    // A new daemon on the same socket; the frontend hands the table back and restarts the ring from
    // the used index, as QEMU does when GET_VRING_BASE could not be answered.
    let mut d = daemon(dir.path());
    let t = Instant::now();
    let (c, _) = connect(&d.socket, &mem, Some(&table), used_idx(&mem));
    // A new request published after the restart runs after the resubmitted ones.
    mem.write_slice(&pattern(5), GuestAddress(DATA + 0x5000)).expect("data");
    publish(&mem, &[request(&mem, 5, VIRTIO_BLK_T_OUT, 48)]);
    c.kick.write(1).expect("kick");
    while used_idx(&mem) < 6 {
        assert!(t.elapsed() < Duration::from_secs(20), "used idx {} < 6 after the restart", used_idx(&mem));
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_idx(&mem), 6, "every request completes exactly once");
    let ids = used_ids(&mem, 6);
    // The delay bdev completes in submission order here (no jitter): the resubmitted writes in
    // their original order, then the new one.
    assert_eq!(ids, vec![3, 0, 6, 9, 12, 15], "used ids");
    for k in 0..=5u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + k)).expect("status"),
            VIRTIO_BLK_S_OK as u8,
            "request {k}"
        );
    }
    d.stop();
    let disk = std::fs::read(&img).expect("disk");
    for k in [0u8, 2, 3, 4, 5] {
        let at = 8 * 512 * (usize::from(k) + 1);
        assert_eq!(&disk[at..at + 4096], &pattern(k)[..], "write {k} on disk");
    }
}
