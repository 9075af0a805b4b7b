//! A small vhost-user-blk client on libblkio (the `blkio` crate), for the load generator and tests.
//!
//! ```text
//!   BlkClient ──libblkio virtio-blk-vhost-user──► unix socket ──► vblkd / qemu-storage-daemon
//! ```
//!
//! # Design
//! One `Blkio` instance, `num_queues` queues, and one shared memory region (mapped into the backend)
//! that callers carve buffers from by offset. Requests are identified by `user_data`.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

pub use blkio::Completion;

/// A connected client.
pub struct BlkClient {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

/// Errors from libblkio, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {msg} (errno {errno})")]
pub struct ClientError {
    what: &'static str,
    msg: String,
    errno: i32,
}

fn ctx(what: &'static str) -> impl FnOnce(blkio::Error) -> ClientError {
    move |e| ClientError { what, msg: e.message().to_string(), errno: e.errno().raw_os_error() }
}

impl BlkClient {
    /// Connects to `socket` with `num_queues` queues of `queue_size` and maps `mem_bytes` of buffer memory.
    pub fn connect(
        socket: &Path,
        num_queues: usize,
        queue_size: usize,
        mem_bytes: usize,
    ) -> Result<Self, ClientError> {
        Self::connect_with(socket, num_queues, queue_size, mem_bytes, false)
    }

    /// As [`connect`](Self::connect), opening the device read-only when `read_only`.
    pub fn connect_with(
        socket: &Path,
        num_queues: usize,
        queue_size: usize,
        mem_bytes: usize,
        read_only: bool,
    ) -> Result<Self, ClientError> {
        Self::connect_opts(socket, num_queues, queue_size, mem_bytes, read_only, false)
    }

    /// As [`connect_with`](Self::connect_with); with `poll`, the queues are libblkio *poll queues*
    /// (completions are busy-polled by the client instead of waited for on an eventfd).
    pub fn connect_opts(
        socket: &Path,
        num_queues: usize,
        queue_size: usize,
        mem_bytes: usize,
        read_only: bool,
        poll: bool,
    ) -> Result<Self, ClientError> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(ctx("blkio_new"))?;
        blkio.set_str("path", &socket.to_string_lossy()).map_err(ctx("set path"))?;
        blkio.set_bool("read-only", read_only).map_err(ctx("set read-only"))?;
        blkio.connect().map_err(ctx("connect"))?;
        let (irq, polled) = if poll { (0, num_queues) } else { (num_queues, 0) };
        blkio.set_i32("num-queues", irq as i32).map_err(ctx("set num-queues"))?;
        if polled > 0 {
            blkio.set_i32("num-poll-queues", polled as i32).map_err(ctx("set num-poll-queues"))?;
        }
        blkio.set_i32("queue-size", queue_size as i32).map_err(ctx("set queue-size"))?;
        let started = blkio.start().map_err(ctx("start"))?;
        let region = blkio.alloc_mem_region(mem_bytes).map_err(ctx("alloc_mem_region"))?;
        blkio.map_mem_region(&region).map_err(ctx("map_mem_region"))?;
        let queues = if poll { started.poll_queues } else { started.queues };
        Ok(Self { blkio, queues, region })
    }

    /// Property of the connected device (e.g. `capacity`).
    pub fn get_u64(&self, name: &'static str) -> Result<u64, ClientError> {
        self.blkio.get_u64(name).map_err(ctx("get property"))
    }

    /// Boolean property (e.g. `read-only`).
    pub fn get_bool(&self, name: &'static str) -> Result<bool, ClientError> {
        self.blkio.get_bool(name).map_err(ctx("get property"))
    }

    /// Integer property.
    pub fn get_i32(&self, name: &'static str) -> Result<i32, ClientError> {
        self.blkio.get_i32(name).map_err(ctx("get property"))
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The mapped buffer memory as a mutable byte slice.
    pub fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the region was allocated by libblkio for `len` bytes and stays mapped while `self`
        // lives; `&mut self` makes this the only Rust reference (the backend writes it only while a
        // read request is in flight, which callers complete before looking at the bytes).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn buf(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(offset + len <= self.region.len, "buffer outside the mapped region");
        (self.region.addr + offset) as *mut u8
    }

    /// Queues a read of `len` bytes at byte `start` into buffer memory at `mem_offset`.
    pub fn read(&mut self, q: usize, start: u64, mem_offset: usize, len: usize, user_data: usize) {
        let buf = self.buf(mem_offset, len);
        self.queues[q].read(start, buf, len, user_data, ReqFlags::empty());
    }

    /// Queues a write of `len` bytes at byte `start` from buffer memory at `mem_offset`.
    pub fn write(&mut self, q: usize, start: u64, mem_offset: usize, len: usize, user_data: usize) {
        let buf = self.buf(mem_offset, len);
        self.queues[q].write(start, buf, len, user_data, ReqFlags::empty());
    }

    /// Host iovecs for `(mem_offset, len)` segments of the buffer memory.
    fn iovecs(&self, segs: &[(usize, usize)]) -> Vec<libc::iovec> {
        segs.iter().map(|&(o, l)| libc::iovec { iov_base: self.buf(o, l).cast(), iov_len: l }).collect()
    }

    /// Queues a vectored read; `segs` are `(mem_offset, len)` pairs.
    pub fn readv(
        &mut self,
        q: usize,
        start: u64,
        segs: &[(usize, usize)],
        user_data: usize,
    ) -> Vec<libc::iovec> {
        let iovs = self.iovecs(segs);
        self.queues[q].readv(start, iovs.as_ptr(), iovs.len() as u32, user_data, ReqFlags::empty());
        iovs
    }

    /// Queues a vectored write; `segs` are `(mem_offset, len)` pairs.
    pub fn writev(
        &mut self,
        q: usize,
        start: u64,
        segs: &[(usize, usize)],
        user_data: usize,
    ) -> Vec<libc::iovec> {
        let iovs = self.iovecs(segs);
        self.queues[q].writev(start, iovs.as_ptr(), iovs.len() as u32, user_data, ReqFlags::empty());
        iovs
    }

    /// Queues a flush.
    pub fn flush(&mut self, q: usize, user_data: usize) {
        self.queues[q].flush(user_data, ReqFlags::empty());
    }

    /// Queues a discard.
    pub fn discard(&mut self, q: usize, start: u64, len: u64, user_data: usize) {
        self.queues[q].discard(start, len, user_data, ReqFlags::empty());
    }

    /// Queues a write-zeroes (`unmap` allowed unless `no_unmap`).
    pub fn write_zeroes(&mut self, q: usize, start: u64, len: u64, no_unmap: bool, user_data: usize) {
        let flags = if no_unmap { ReqFlags::NO_UNMAP } else { ReqFlags::empty() };
        self.queues[q].write_zeroes(start, len, user_data, flags);
    }

    /// Submits queued requests and waits for at least `min` completions (up to `out.capacity`).
    pub fn wait(
        &mut self,
        q: usize,
        min: usize,
        out: &mut Vec<Completion>,
        timeout: Duration,
    ) -> Result<usize, ClientError> {
        do_io(&mut self.queues[q], min, out, timeout)
    }

    /// Splits into one independent client per queue, each owning `bytes_per_queue` of the buffer memory
    /// (consecutive slices), for one thread per queue. The connection stays up while any part lives.
    pub fn into_queue_clients(self, bytes_per_queue: usize) -> Vec<QueueClient> {
        assert!(bytes_per_queue * self.queues.len() <= self.region.len, "buffer memory too small");
        let shared = std::sync::Arc::new(Keep { _blkio: std::sync::Mutex::new(self.blkio) });
        let base = self.region.addr;
        self.queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| QueueClient {
                q,
                base: base + i * bytes_per_queue,
                len: bytes_per_queue,
                _keep: shared.clone(),
            })
            .collect()
    }

    /// Runs one request to completion and returns its `ret` (0 or a negative errno).
    pub fn sync(&mut self, q: usize, f: impl FnOnce(&mut Self, usize)) -> Result<i32, ClientError> {
        f(self, 0xfeed);
        let mut out = Vec::with_capacity(1);
        let n = self.wait(q, 1, &mut out, Duration::from_secs(30))?;
        match out.first() {
            Some(c) if n == 1 && c.user_data == 0xfeed => Ok(c.ret),
            _ => Err(ClientError {
                what: "sync request",
                msg: "no completion within 30 s".into(),
                errno: libc::ETIMEDOUT,
            }),
        }
    }
}

struct Keep {
    _blkio: std::sync::Mutex<Blkio>,
}

/// One queue of a [`BlkClient`] with its own slice of buffer memory, movable to a thread.
pub struct QueueClient {
    q: Blkioq,
    base: usize,
    len: usize,
    _keep: std::sync::Arc<Keep>,
}

impl QueueClient {
    fn buf(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(offset + len <= self.len, "buffer outside this queue's memory");
        (self.base + offset) as *mut u8
    }

    /// This queue's buffer memory.
    pub fn mem(&self) -> &[u8] {
        // SAFETY: `base..base+len` is this queue's disjoint slice of the mapped region, kept mapped by
        // `_keep`; callers look at it only when no request using it is in flight.
        unsafe { std::slice::from_raw_parts(self.base as *const u8, self.len) }
    }

    /// This queue's buffer memory, mutable.
    pub fn mem_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `mem`; `&mut self` makes this the only reference into this queue's slice.
        unsafe { std::slice::from_raw_parts_mut(self.base as *mut u8, self.len) }
    }

    /// Queues a read of `len` bytes at byte `start` into this queue's memory at `mem_offset`.
    pub fn read(&mut self, start: u64, mem_offset: usize, len: usize, user_data: usize) {
        let buf = self.buf(mem_offset, len);
        self.q.read(start, buf, len, user_data, ReqFlags::empty());
    }

    /// Queues a write of `len` bytes at byte `start` from this queue's memory at `mem_offset`.
    pub fn write(&mut self, start: u64, mem_offset: usize, len: usize, user_data: usize) {
        let buf = self.buf(mem_offset, len);
        self.q.write(start, buf, len, user_data, ReqFlags::empty());
    }

    /// Submits queued requests and waits for at least `min` completions.
    pub fn wait(
        &mut self,
        min: usize,
        out: &mut Vec<Completion>,
        timeout: Duration,
    ) -> Result<usize, ClientError> {
        do_io(&mut self.q, min, out, timeout)
    }
}

/// Submits what is queued on `q` and appends at least `min` completions (up to `out`'s capacity).
fn do_io(
    q: &mut Blkioq,
    min: usize,
    out: &mut Vec<Completion>,
    timeout: Duration,
) -> Result<usize, ClientError> {
    let cap = out.capacity().max(min).max(1);
    let mut raw: Vec<MaybeUninit<Completion>> = (0..cap).map(|_| MaybeUninit::uninit()).collect();
    let mut t = timeout;
    let n = q.do_io(&mut raw, min, Some(&mut t), None).map_err(ctx("do_io"))?;
    for c in raw.iter().take(n) {
        // SAFETY: libblkio initialised the first `n` entries.
        out.push(unsafe { c.assume_init_read() });
    }
    Ok(n)
}
