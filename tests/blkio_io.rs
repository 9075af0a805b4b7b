//! Data path through a real frontend: libblkio (`virtio-blk-vhost-user`) against the vblkd binary.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Daemon;
use vblkd::client::BlkClient;

const MIB: u64 = 1 << 20;

fn start(bdev: &str, export_extra: &str, dir: &Path) -> (Daemon, std::path::PathBuf) {
    let sock = dir.join("v.sock");
    let args = vec![
        "--log-level".to_string(),
        "warn".to_string(),
        "--bdev".to_string(),
        bdev.to_string(),
        "--export".to_string(),
        format!("bdev=d0,socket={}{export_extra}", sock.display()),
    ];
    (Daemon::start(&args, &sock), sock)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn basic_io(bdev: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bdev = bdev.replace("DIR", &dir.path().display().to_string());
    let (mut d, sock) = start(&bdev, ",queues=2", dir.path());
    let mut c = BlkClient::connect(&sock, 1, 64, 4 * MIB as usize).expect("connect");
    assert_eq!(c.get_u64("capacity").expect("capacity"), 64 * MIB);

    // write + read back
    let data = pattern(1, 128 * 1024);
    c.mem()[..data.len()].copy_from_slice(&data);
    assert_eq!(c.sync(0, |c, u| c.write(0, 4096, 0, data.len(), u)).expect("write"), 0);
    c.mem()[MIB as usize..MIB as usize + data.len()].fill(0);
    assert_eq!(c.sync(0, |c, u| c.read(0, 4096, MIB as usize, data.len(), u)).expect("read"), 0);
    assert!(c.mem()[MIB as usize..MIB as usize + data.len()] == data[..], "read back differs");

    // writev of 3 odd-sized segments, readv back with a different split
    let v = pattern(2, 12 * 1024);
    c.mem()[2 * MIB as usize..2 * MIB as usize + v.len()].copy_from_slice(&v);
    let base = 2 * MIB as usize;
    let segs = [(base, 512), (base + 512, 7 * 1024 + 512), (base + 8 * 1024, 4096)];
    assert_eq!(
        c.sync(0, |c, u| {
            let _iov = c.writev(0, 10 * MIB, &segs, u);
        })
        .expect("writev"),
        0
    );
    let rb = 3 * MIB as usize;
    c.mem()[rb..rb + v.len()].fill(0);
    let rsegs = [(rb, 4096), (rb + 4096, 8192)];
    assert_eq!(
        c.sync(0, |c, u| {
            let _iov = c.readv(0, 10 * MIB, &rsegs, u);
        })
        .expect("readv"),
        0
    );
    assert!(c.mem()[rb..rb + v.len()] == v[..], "readv data differs");

    // flush
    assert_eq!(c.sync(0, |c, u| c.flush(0, u)).expect("flush"), 0);

    // discard and write_zeroes read back as zeros
    assert_eq!(c.sync(0, |c, u| c.discard(0, 4096, 64 * 1024, u)).expect("discard"), 0);
    assert_eq!(c.sync(0, |c, u| c.write_zeroes(0, 10 * MIB, 8192, true, u)).expect("write_zeroes"), 0);
    c.mem()[..64 * 1024].fill(0xaa);
    assert_eq!(c.sync(0, |c, u| c.read(0, 4096, 0, 64 * 1024, u)).expect("read"), 0);
    assert!(c.mem()[..64 * 1024].iter().all(|&b| b == 0), "discarded range must read zeros");
    c.mem()[..8192].fill(0xaa);
    assert_eq!(c.sync(0, |c, u| c.read(0, 10 * MIB, 0, 8192, u)).expect("read"), 0);
    assert!(c.mem()[..8192].iter().all(|&b| b == 0), "write_zeroes range must read zeros");
    // the part of the writev after the zeroed range is intact
    assert_eq!(c.sync(0, |c, u| c.read(0, 10 * MIB + 8192, 0, 4096, u)).expect("read"), 0);
    assert!(c.mem()[..4096] == v[8192..], "data after write_zeroes changed");

    // out of range → -EIO, the device keeps working
    let ret = c.sync(0, |c, u| c.read(0, 64 * MIB, 0, 4096, u)).expect("completion");
    assert_eq!(ret, -libc::EIO);
    assert_eq!(c.sync(0, |c, u| c.read(0, 0, 0, 4096, u)).expect("read"), 0);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn malloc_read_write_vectored_flush_discard_write_zeroes() {
    basic_io("driver=malloc,name=d0,size=64M");
}

#[test]
fn file_read_write_vectored_flush_discard_write_zeroes() {
    basic_io("driver=file,name=d0,path=DIR/disk.img,size=64M");
}

#[test]
fn file_direct_threads_read_write_vectored_flush_discard_write_zeroes() {
    basic_io("driver=file,name=d0,path=DIR/disk.img,size=64M,direct=on,engine=threads");
}

/// Two queues driven from two threads at queue depth 32, each verifying its own region.
fn two_queues_qd32(bdev: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bdev = bdev.replace("DIR", &dir.path().display().to_string());
    let (mut d, sock) = start(&bdev, ",queues=2,queue-size=128", dir.path());
    const QD: usize = 32;
    const BS: usize = 16 * 1024;
    const ROUNDS: usize = 20;
    let c = BlkClient::connect(&sock, 2, 128, 2 * QD * BS).expect("connect");
    let queues = c.into_queue_clients(QD * BS);
    std::thread::scope(|s| {
        for (qi, mut q) in queues.into_iter().enumerate() {
            s.spawn(move || {
                let region = qi as u64 * 32 * MIB;
                for round in 0..ROUNDS {
                    // write QD blocks at once
                    for slot in 0..QD {
                        let p = pattern((qi * 1000 + round * QD + slot) as u64, BS);
                        write_slot(&mut q, slot, &p);
                        q.write(region + ((round * QD + slot) * BS) as u64 % (32 * MIB), slot * BS, BS, slot);
                    }
                    wait_all(&mut q, QD);
                    for slot in 0..QD {
                        q.read(region + ((round * QD + slot) * BS) as u64 % (32 * MIB), slot * BS, BS, slot);
                    }
                    wait_all(&mut q, QD);
                    for slot in 0..QD {
                        let p = pattern((qi * 1000 + round * QD + slot) as u64, BS);
                        assert!(read_slot(&q, slot, BS) == p, "queue {qi} round {round} slot {slot} differs");
                    }
                }
            });
        }
    });
    assert!(d.stop().success());
}

fn write_slot(q: &mut vblkd::client::QueueClient, slot: usize, data: &[u8]) {
    q.mem_mut()[slot * data.len()..(slot + 1) * data.len()].copy_from_slice(data);
}

fn read_slot(q: &vblkd::client::QueueClient, slot: usize, len: usize) -> Vec<u8> {
    q.mem()[slot * len..(slot + 1) * len].to_vec()
}

fn wait_all(q: &mut vblkd::client::QueueClient, n: usize) {
    let mut seen = vec![false; n];
    let mut got = 0;
    let mut out = Vec::with_capacity(n);
    while got < n {
        out.clear();
        q.wait(1, &mut out, Duration::from_secs(30)).expect("do_io");
        assert!(!out.is_empty(), "no completion within 30 s");
        for c in &out {
            assert_eq!(c.ret, 0, "request {} failed", c.user_data);
            assert!(!seen[c.user_data], "double completion of {}", c.user_data);
            seen[c.user_data] = true;
            got += 1;
        }
    }
}

#[test]
fn malloc_two_queues_in_parallel_qd32_verified() {
    two_queues_qd32("driver=malloc,name=d0,size=64M");
}

#[test]
fn file_two_queues_in_parallel_qd32_verified() {
    two_queues_qd32("driver=file,name=d0,path=DIR/disk.img,size=64M");
}

#[test]
fn read_only_export_rejects_writes_and_reports_read_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut d, sock) = start("driver=malloc,name=d0,size=8M", ",queues=1,readonly=on", dir.path());
    // The device offers VIRTIO_BLK_F_RO: libblkio refuses a read-write start.
    let e = BlkClient::connect(&sock, 1, 64, MIB as usize).err().expect("read-write open must fail");
    assert!(e.to_string().contains("read-only"), "{e}");
    let mut c = BlkClient::connect_with(&sock, 1, 64, MIB as usize, true).expect("connect read-only");
    assert!(c.get_bool("read-only").expect("prop"));
    assert_eq!(c.sync(0, |c, u| c.read(0, 0, 0, 4096, u)).expect("read"), 0);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn a_frontend_can_reconnect_after_disconnect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut d, sock) = start("driver=malloc,name=d0,size=8M", ",queues=2", dir.path());
    for i in 0..3u8 {
        let mut c = BlkClient::connect(&sock, 1, 64, MIB as usize).expect("connect");
        if i > 0 {
            assert_eq!(c.sync(0, |c, u| c.read(0, 0, 0, 4096, u)).expect("read"), 0);
            assert!(c.mem()[..4096].iter().all(|&b| b == i - 1), "data from the previous connection");
        }
        c.mem()[..4096].fill(i);
        assert_eq!(c.sync(0, |c, u| c.write(0, 0, 0, 4096, u)).expect("write"), 0);
    }
    assert!(d.stop().success());
}

#[test]
fn rbd_read_write_vectored_flush_discard_write_zeroes() {
    basic_io(&common::rbd_bdev("d0", "blkio-basic", "64M"));
}

#[test]
fn rbd_two_queues_qd32_verify() {
    two_queues_qd32(&common::rbd_bdev("d0", "blkio-2q", "64M"));
}
