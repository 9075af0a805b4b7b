//! End-to-end test of the vhost-user-blk device through libblkio's `virtio-blk-vhost-user` driver
//! (a real vhost-user frontend and real virtqueues) against a malloc bdev.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use vblkd::bdev::malloc::MallocBdev;
use vblkd::bdev::Registry;
use vblkd::vhost::{serve, EventFd, ExportConfig};

const SIZE: u64 = 16 << 20;

fn export(
    dir: &Path,
    queues: u16,
) -> (Arc<EventFd>, std::thread::JoinHandle<Result<(), vblkd::vhost::VhostError>>, std::path::PathBuf) {
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("m0", SIZE, 512).expect("malloc"))).expect("register");
    let desc = Arc::new(reg.open("m0", true).expect("open"));
    let sock = dir.join("m0.sock");
    let mut cfg = ExportConfig::new(&sock, "vblkd-serial-0123456789");
    cfg.queues = queues;
    cfg.queue_size = 128;
    let stop = Arc::new(EventFd::new(0).expect("eventfd"));
    let h = serve(desc, cfg, stop.clone()).expect("serve");
    (stop, h, sock)
}

fn connect(sock: &Path, queues: i32) -> (Blkio, Vec<Blkioq>) {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", sock.to_str().expect("utf8")).expect("path");
    b.connect().expect("connect");
    b.set_i32("num-queues", queues).expect("num-queues");
    b.set_i32("queue-size", 128).expect("queue-size");
    let out = b.start().expect("start");
    (b, out.queues)
}

fn wait(q: &mut Blkioq, n: usize) -> Vec<Completion> {
    let mut c: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    let mut timeout = Duration::from_secs(10);
    let got = q.do_io(&mut c, n, Some(&mut timeout), None).expect("do_io");
    assert_eq!(got, n, "completions");
    // SAFETY: do_io initialised the first `got` entries.
    c.into_iter().take(got).map(|x| unsafe { x.assume_init() }).collect()
}

#[test]
fn io_through_libblkio() {
    let dir = tempfile::tempdir().expect("tmp");
    let (stop, handle, sock) = export(dir.path(), 2);
    {
        let (mut b, mut qs) = connect(&sock, 2);
        assert_eq!(b.get_u64("capacity").expect("capacity"), SIZE);
        assert_eq!(qs.len(), 2);
        let region = b.alloc_mem_region(1 << 20).expect("alloc");
        b.map_mem_region(&region).expect("map");
        let buf = region.addr as *mut u8;
        // SAFETY: the region is 1 MiB of mapped memory owned by this test.
        let mem = unsafe { std::slice::from_raw_parts_mut(buf, 1 << 20) };
        for (i, x) in mem[..256 << 10].iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }

        // 32 writes of 8 KiB in flight at once on queue 0.
        for i in 0..32u64 {
            // SAFETY: in-bounds offset within the mapped region.
            let p = unsafe { buf.add((i * 8192) as usize) };
            qs[0].write(4096 + i * 8192, p, 8192, i as usize, ReqFlags::empty());
        }
        let done = wait(&mut qs[0], 32);
        assert!(
            done.iter().all(|c| c.ret == 0),
            "write results {:?}",
            done.iter().map(|c| c.ret).collect::<Vec<_>>()
        );

        // Read back on queue 1.
        // SAFETY: in-bounds offset.
        let rd = unsafe { buf.add(512 << 10) };
        qs[1].read(4096, rd, 256 << 10, 0, ReqFlags::empty());
        let done = wait(&mut qs[1], 1);
        assert_eq!(done[0].ret, 0);
        assert!(mem[512 << 10..768 << 10] == mem[..256 << 10], "data mismatch");

        qs[0].flush(1, ReqFlags::empty());
        assert_eq!(wait(&mut qs[0], 1)[0].ret, 0);

        // write_zeroes (with and without unmap) and discard, then read zeros.
        qs[0].write_zeroes(4096, 8192, 2, ReqFlags::empty());
        qs[0].write_zeroes(4096 + 8192, 8192, 3, ReqFlags::NO_UNMAP);
        qs[0].discard(4096 + 16384, 8192, 4, ReqFlags::empty());
        let done = wait(&mut qs[0], 3);
        assert!(
            done.iter().all(|c| c.ret == 0),
            "dwz results {:?}",
            done.iter().map(|c| c.ret).collect::<Vec<_>>()
        );
        qs[1].read(4096, rd, 24576, 5, ReqFlags::empty());
        assert_eq!(wait(&mut qs[1], 1)[0].ret, 0);
        assert!(mem[512 << 10..(512 << 10) + 24576].iter().all(|&x| x == 0), "not zeroed");
        // Untouched data after the zeroed range.
        qs[1].read(4096 + 24576, rd, 8192, 6, ReqFlags::empty());
        assert_eq!(wait(&mut qs[1], 1)[0].ret, 0);
        assert!(mem[512 << 10..(512 << 10) + 8192] == mem[24576..24576 + 8192]);

        // Beyond the end: the device (or libblkio) refuses it.
        qs[0].read(SIZE, rd, 4096, 7, ReqFlags::empty());
        assert!(wait(&mut qs[0], 1)[0].ret < 0);
        drop(qs);
        drop(b);
    }
    // The export goes back to listening: a second frontend sees the data.
    {
        let (mut b, mut qs) = connect(&sock, 1);
        let region = b.alloc_mem_region(1 << 20).expect("alloc");
        b.map_mem_region(&region).expect("map");
        let buf = region.addr as *mut u8;
        qs[0].read(4096 + 32768, buf, 4096, 0, ReqFlags::empty());
        assert_eq!(wait(&mut qs[0], 1)[0].ret, 0);
        // SAFETY: mapped region of 1 MiB.
        let mem = unsafe { std::slice::from_raw_parts(buf, 4096) };
        let expect: Vec<u8> = (32768..32768 + 4096).map(|i| (i % 251) as u8).collect();
        assert_eq!(mem, &expect[..]);
        // Stop while connected.
        stop.write(1).expect("stop");
        let r = handle.join().expect("join");
        assert!(r.is_ok(), "{r:?}");
        assert!(!sock.exists(), "socket not removed");
        drop(qs);
        drop(b);
    }
}

#[test]
fn socket_in_use_and_stale() {
    let dir = tempfile::tempdir().expect("tmp");
    let (stop, handle, sock) = export(dir.path(), 1);
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("m1", SIZE, 512).expect("malloc"))).expect("register");
    let desc = Arc::new(reg.open("m1", true).expect("open"));
    let cfg = ExportConfig::new(&sock, "x");
    let stop2 = Arc::new(EventFd::new(0).expect("eventfd"));
    let e = serve(desc.clone(), cfg.clone(), stop2.clone()).expect_err("in use");
    assert!(e.to_string().contains("in use"), "{e}");
    stop.write(1).expect("stop");
    handle.join().expect("join").expect("ok");
    // A stale socket file (nobody listening) is replaced.
    let l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    drop(l);
    assert!(sock.exists());
    let h = serve(desc, cfg, stop2.clone()).expect("stale socket replaced");
    stop2.write(1).expect("stop");
    h.join().expect("join").expect("ok");
    // A regular file is not removed.
    std::fs::write(&sock, b"x").expect("file");
    let reg2 = Registry::new();
    reg2.register(Arc::new(MallocBdev::new("m2", SIZE, 512).expect("malloc"))).expect("register");
    let d2 = Arc::new(reg2.open("m2", true).expect("open"));
    let e = serve(d2, ExportConfig::new(&sock, "x"), Arc::new(EventFd::new(0).expect("e")))
        .expect_err("not a socket");
    assert!(e.to_string().contains("not a socket"), "{e}");
}
