//! Asynchronous completion through the device: a test module that completes I/O only after an
//! eventfd wake-up, in reverse order. If the poller did not register the channel's `wait_fd` on its
//! worker's epoll, these requests would never complete.

use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blkio::{Blkio, Completion as BlkioCompletion, ReqFlags};
use vblkd::bdev::malloc::MallocBdev;
use vblkd::bdev::{Bdev, BdevError, BdevInfo, BdevIo, Completion, ModuleChannel, Registry, Rejected};
use vblkd::vhost::{serve, EventFd, ExportConfig};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const SIZE: u64 = 8 << 20;

/// Wraps malloc; completions are held back until a timer thread writes the channel's eventfd.
struct Delayed {
    inner: MallocBdev,
}

struct DelayedChannel {
    inner: Box<dyn ModuleChannel>,
    held: Vec<Completion>,
    fd: Arc<EventFd>,
    stop: Arc<AtomicBool>,
}

impl Bdev for Delayed {
    fn info(&self) -> &BdevInfo {
        self.inner.info()
    }
    fn create_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError> {
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| BdevError::io("eventfd", e))?);
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (fd.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(2));
                let _ = f.write(1);
            }
        });
        Ok(Box::new(DelayedChannel { inner: self.inner.create_channel()?, held: Vec::new(), fd, stop }))
    }
}

impl ModuleChannel for DelayedChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        self.inner.submit(io)
    }
    fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        self.inner.poll(&mut self.held);
        if self.fd.read().is_err() {
            return 0; // not woken yet
        }
        let n = self.held.len();
        done.extend(self.held.drain(..).rev());
        n
    }
    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}

impl Drop for DelayedChannel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn async_out_of_order_completion() {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir().expect("tmp");
    let reg = Registry::new();
    let inner = MallocBdev::new("d0", SIZE, 4096).expect("malloc");
    reg.register(Arc::new(Delayed { inner })).expect("register");
    let desc = Arc::new(reg.open("d0", true).expect("open"));
    let sock = dir.path().join("d0.sock");
    let mut cfg = ExportConfig::new(&sock, "async");
    cfg.queues = 2;
    cfg.queue_size = 128;
    let stop = Arc::new(EventFd::new(0).expect("eventfd"));
    let handle = serve(desc, cfg, stop.clone()).expect("serve");

    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", sock.to_str().expect("utf8")).expect("path");
    b.connect().expect("connect");
    b.set_i32("num-queues", 2).expect("num-queues");
    b.set_i32("queue-size", 128).expect("queue-size");
    let mut qs = b.start().expect("start").queues;
    assert_eq!(b.get_i32("request-alignment").expect("alignment"), 4096);
    let region = b.alloc_mem_region(2 << 20).expect("alloc");
    b.map_mem_region(&region).expect("map");
    let buf = region.addr as *mut u8;
    // SAFETY: 2 MiB mapped region owned by this test.
    let mem = unsafe { std::slice::from_raw_parts_mut(buf, 2 << 20) };
    for (i, x) in mem[..1 << 20].iter_mut().enumerate() {
        *x = (i % 241) as u8;
    }
    let mut c: Vec<MaybeUninit<BlkioCompletion>> = (0..64).map(|_| MaybeUninit::uninit()).collect();
    for (qi, q) in qs.iter_mut().enumerate() {
        for i in 0..32u64 {
            let off = (qi as u64 * 32 + i) * 16384;
            // SAFETY: in-bounds offset within the region.
            q.write(off, unsafe { buf.add(off as usize) }, 16384, i as usize, ReqFlags::empty());
        }
    }
    for q in qs.iter_mut() {
        let mut t = Duration::from_secs(10);
        let n = q.do_io(&mut c, 32, Some(&mut t), None).expect("do_io");
        assert_eq!(n, 32);
        for x in &c[..n] {
            // SAFETY: initialised by do_io.
            assert_eq!(unsafe { x.assume_init_ref() }.ret, 0);
        }
    }
    // Read everything back through queue 1 in 64 concurrent requests.
    // SAFETY: in-bounds offset.
    let rd = unsafe { buf.add(1 << 20) };
    for i in 0..64u64 {
        // SAFETY: in-bounds offset.
        qs[1].read(i * 16384, unsafe { rd.add((i * 16384) as usize) }, 16384, i as usize, ReqFlags::empty());
    }
    let mut got = 0;
    let mut order = Vec::new();
    while got < 64 {
        let mut t = Duration::from_secs(10);
        let n = qs[1].do_io(&mut c[..], 1, Some(&mut t), None).expect("do_io");
        assert!(n > 0, "timed out");
        for x in &c[..n] {
            // SAFETY: initialised by do_io.
            let x = unsafe { x.assume_init_ref() };
            assert_eq!(x.ret, 0);
            order.push(x.user_data);
        }
        got += n;
    }
    assert!(mem[1 << 20..] == mem[..1 << 20], "data mismatch");
    assert!(order.windows(2).any(|w| w[0] > w[1]), "expected some out-of-order completions: {order:?}");
    stop.write(1).expect("stop");
    handle.join().expect("join").expect("ok");
    drop(qs);
    drop(b);
}
