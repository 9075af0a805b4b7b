//! `file`: a bdev on a regular file or a block device (SPEC §2 modules).
//!
//! ```text
//!  Channel ─► FileChannel ─┬─ io_uring engine: one ring per channel; slab of in-flight I/O ─► CQE ─► eventfd
//!                          └─ threads engine: worker pool per channel; preadv/pwritev ─► mpsc + eventfd
//! ```
//!
//! # Design
//! * Creation: a missing file is created (size required); an existing regular file defaults to its
//!   length and is extended when smaller than the requested size; a block device gets its size from
//!   `BLKGETSIZE64` and its minimum block size from `BLKSSZGET`.
//! * `direct` opens with `O_DIRECT` and declares `buf_align` = the block size (at least 512), so the
//!   generic layer bounces unaligned guest buffers.
//! * io_uring engine: `readv`/`writev` straight on the I/O's iovecs (the `BdevIo`, which owns the
//!   iovec array and keeps the memory alive, sits in an in-flight slab until its CQE arrives — the kernel
//!   holds raw pointers into it), `fsync(DATASYNC)` for flush, `fallocate(PUNCH_HOLE|KEEP_SIZE)` for
//!   unmap, `fallocate(ZERO_RANGE|KEEP_SIZE)` for write_zeroes. `EOPNOTSUPP` from either makes the
//!   bdev fall back (from then on) to writes from the shared zero buffer, one 1 MiB write at a time.
//!   Short reads/writes (and the part beyond the first `IOV_MAX` segments) are resubmitted for the
//!   remainder. An eventfd registered with the ring is the
//!   channel's `wait_fd`. A full ring or SQ → `Rejected::NoMem`.
//! * If io_uring cannot be set up (EPERM under seccomp, ENOSYS on old kernels), the threads engine is
//!   used instead, with a warning.
//! * Threads engine: a few workers per channel do blocking `preadv`/`pwritev`/`fdatasync`/`fallocate`
//!   and send completions back through an mpsc channel, waking the eventfd.
//! * The write cache is volatile (page cache or disk cache): flush is needed; `shutdown` fsyncs.
//!
//! # Limitations
//! An I/O with more than `IOV_MAX` (1024) segments is done in several syscalls (treated like a short
//! transfer), so it is not atomic with respect to concurrent overlapping I/O. No `BLKDISCARD`/`BLKZEROOUT`
//! ioctls: block devices use `fallocate` (Linux ≥ 4.9) or the zero-write fallback. No registered
//! buffers or files, no SQPOLL.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring};

use super::channel::{zero_buf, ZERO_BUF_BYTES};
use super::file_inline::{InlineChannel, InlineState};
use super::iov::AlignedBuf;
use super::{
    Bdev, BdevError, BdevInfo, BdevIo, Completion, IoError, IoKind, IoKinds, ModuleChannel, Rejected,
};

/// How a file bdev does its I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// One io_uring per channel (falls back to `Threads` if io_uring is unavailable).
    IoUring,
    /// A small pool of worker threads per channel doing blocking syscalls.
    Threads,
}

/// `_IOR(0x12, 114, u64)`: size of a block device in bytes.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272u32 as libc::Ioctl;
/// Ring entries per channel (also the in-flight limit).
const RING_ENTRIES: u32 = 128;
/// In-flight limit of a threads channel.
const THREADS_MAX_INFLIGHT: usize = 128;
/// Most segments passed to one readv/writev (`IOV_MAX`); longer lists go in several rounds.
const IOV_MAX: usize = 1024;
/// Workers per threads channel.
const THREADS_WORKERS: usize = 4;

/// State shared by all channels of one file bdev.
struct Shared {
    file: File,
    block_size: u64,
    /// The zero buffer used by the write_zeroes/unmap fallback (kept alive while I/O uses it).
    zeros: Arc<AlignedBuf>,
    /// `fallocate(ZERO_RANGE)` returned EOPNOTSUPP: write zeros instead.
    wz_fallback: AtomicBool,
    /// `fallocate(PUNCH_HOLE)` returned EOPNOTSUPP: write zeros instead.
    unmap_fallback: AtomicBool,
    /// Successful `fdatasync`/`fsync` calls (flushes and the sync on close): the seam through which
    /// tests see that a flush reached the disk (`module_stats()["syncs"]`, the close log line).
    syncs: AtomicU64,
}

impl Shared {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Marks the fallback for `kind` and returns true if `errno` means "not supported".
    fn note_unsupported(&self, kind: IoKind, errno: i32) -> bool {
        if errno != libc::EOPNOTSUPP {
            return false;
        }
        let flag = if kind == IoKind::Unmap { &self.unmap_fallback } else { &self.wz_fallback };
        if !flag.swap(true, Ordering::Relaxed) {
            log::info!("file bdev: fallocate for {kind:?} not supported; writing zeros instead");
        }
        true
    }

    fn use_fallback(&self, kind: IoKind) -> bool {
        match kind {
            IoKind::Unmap => self.unmap_fallback.load(Ordering::Relaxed),
            IoKind::WriteZeroes => self.wz_fallback.load(Ordering::Relaxed),
            _ => false,
        }
    }
}

/// A bdev on a file or block device.
pub struct FileBdev {
    info: BdevInfo,
    shared: Arc<Shared>,
    path: PathBuf,
    engine: Engine,
    direct: bool,
    block_device: bool,
    /// Counters and switches of the inline fast path.
    inline: Arc<InlineState>,
    /// Inline fast path in use (buffered files, `engine=auto`).
    inline_on: bool,
}

impl AsRawFd for Shared {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FileBdev {
    /// Opens (or creates) `path` with 512-byte blocks (or the device's logical block size if larger).
    /// `size`: required when the file does not exist; defaults to the current length otherwise.
    pub fn open(
        name: &str,
        path: impl AsRef<Path>,
        size: Option<u64>,
        direct: bool,
        engine: Engine,
    ) -> Result<Self, BdevError> {
        Self::open_with_block_size(name, path, size, direct, engine, 512)
    }

    /// Like [`FileBdev::open`] with an explicit block size (512 or 4096).
    pub fn open_with_block_size(
        name: &str,
        path: impl AsRef<Path>,
        size: Option<u64>,
        direct: bool,
        engine: Engine,
        block_size: u32,
    ) -> Result<Self, BdevError> {
        let path = path.as_ref();
        let ctx = |what: &str| format!("file bdev '{name}': {what} {}", path.display());
        if block_size != 512 && block_size != 4096 {
            return Err(BdevError::InvalidConfig(format!("block size {block_size} is not 512 or 4096")));
        }
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(BdevError::io(ctx("stat"), e)),
        };
        if meta.is_none() && size.is_none() {
            return Err(BdevError::InvalidConfig(format!(
                "file bdev '{name}': {} does not exist and no size was given",
                path.display()
            )));
        }
        let block_device = meta.as_ref().is_some_and(|m| m.file_type().is_block_device());
        if let Some(m) = &meta {
            if !block_device && !m.is_file() {
                return Err(BdevError::InvalidConfig(format!(
                    "file bdev '{name}': {} is neither a regular file nor a block device",
                    path.display()
                )));
            }
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(meta.is_none());
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|e| BdevError::io(ctx("open"), e))?;
        let mut bs = u64::from(block_size);
        let size = if block_device {
            let mut dev_size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut dev_size as *mut u64) };
            if rc != 0 {
                return Err(BdevError::io(ctx("BLKGETSIZE64"), std::io::Error::last_os_error()));
            }
            let mut lbs: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut lbs as *mut libc::c_int) };
            if rc == 0 && lbs > 0 && (lbs as u64) > bs {
                if lbs != 4096 {
                    return Err(BdevError::InvalidConfig(format!(
                        "{}: logical block size {lbs}",
                        ctx("device")
                    )));
                }
                bs = 4096;
            }
            match size {
                Some(s) if s > dev_size => {
                    return Err(BdevError::InvalidConfig(format!(
                        "{}: size {s} exceeds the device size {dev_size}",
                        ctx("device")
                    )))
                }
                Some(s) => s,
                None => dev_size,
            }
        } else {
            let len = file.metadata().map_err(|e| BdevError::io(ctx("stat"), e))?.len();
            let want = size.unwrap_or(len);
            if want > len {
                file.set_len(want).map_err(|e| BdevError::io(ctx("extend"), e))?;
            }
            want
        };
        // `bs` is the requested block size, raised to the device's logical block size (512 or 4096).
        let bs32 = bs as u32;
        let num_blocks = super::check_geometry(size, bs32)
            .map_err(|e| BdevError::InvalidConfig(format!("file bdev '{name}': {e}")))?;
        let mut info = BdevInfo::new(name, "file", bs32, num_blocks);
        info.supports = IoKinds { flush: true, unmap: true, write_zeroes: true, reset: false };
        info.unmap_reads_zeroes = true;
        info.volatile_write_cache = true;
        if direct {
            info.buf_align = bs.max(512) as u32;
        }
        let engine = pick_engine(name, engine, || IoUring::new(8).map(drop));
        let shared = Arc::new(Shared {
            file,
            block_size: bs,
            zeros: zero_buf(),
            wz_fallback: AtomicBool::new(false),
            unmap_fallback: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
        });
        let inline = Arc::new(InlineState::new(shared.file.as_raw_fd()));
        Ok(Self {
            info,
            shared,
            path: path.to_path_buf(),
            engine,
            direct,
            block_device,
            inline,
            inline_on: false,
        })
    }

    /// Turns the inline `RWF_NOWAIT` fast path on or off (buffered files only; see `file_inline`).
    pub fn with_inline(mut self, on: bool) -> Self {
        self.inline_on = on && !self.direct;
        self
    }

    /// True when cache-hitting reads and writes are done inline on the submitting thread.
    pub fn inline(&self) -> bool {
        self.inline_on
    }

    /// Requests completed inline and requests that fell back to the engine after trying.
    pub fn inline_counts(&self) -> (u64, u64) {
        (self.inline.inline_ops.load(Ordering::Relaxed), self.inline.misses.load(Ordering::Relaxed))
    }

    /// The engine actually in use (after any fallback).
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Forces the zero-write fallback for unmap and write_zeroes (tests; filesystems that lie).
    pub fn force_zero_write_fallback(&self) {
        self.shared.wz_fallback.store(true, Ordering::Relaxed);
        self.shared.unmap_fallback.store(true, Ordering::Relaxed);
    }
}

/// The engine to use: `IoUring` only if `probe` (setting up a ring) succeeds, else `Threads` with a warning.
fn pick_engine(name: &str, wanted: Engine, probe: impl FnOnce() -> std::io::Result<()>) -> Engine {
    match wanted {
        Engine::IoUring => match probe() {
            Ok(()) => Engine::IoUring,
            Err(e) => {
                log::warn!("file bdev '{name}': io_uring unavailable ({e}); using the threads engine");
                Engine::Threads
            }
        },
        Engine::Threads => Engine::Threads,
    }
}

impl Bdev for FileBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError> {
        let engine = self.engine_channel()?;
        if !self.inline_on {
            return Ok(engine);
        }
        let file: Arc<dyn AsRawFd + Send + Sync> = self.shared.clone();
        Ok(Box::new(InlineChannel::new(file, self.shared.block_size, engine, self.inline.clone())))
    }

    fn shutdown(&self) -> Result<(), BdevError> {
        self.shared
            .file
            .sync_all()
            .map_err(|e| BdevError::io(format!("file bdev '{}': fsync", self.info.name), e))?;
        let n = self.shared.syncs.fetch_add(1, Ordering::Relaxed) + 1;
        log::info!("file bdev '{}': synced on close ({n} syncs since open)", self.info.name);
        Ok(())
    }

    fn module_stats(&self) -> Option<serde_json::Value> {
        let (inline_ops, inline_misses) = self.inline_counts();
        Some(serde_json::json!({
            "path": self.path.display().to_string(),
            "engine": self.engine,
            "direct": self.direct,
            "block_device": self.block_device,
            "inline": self.inline_on,
            "inline_ops": inline_ops,
            "inline_misses": inline_misses,
            "syncs": self.shared.syncs.load(Ordering::Relaxed),
        }))
    }
}

impl FileBdev {
    /// A channel of the asynchronous engine.
    fn engine_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError> {
        if self.engine == Engine::IoUring {
            match UringChannel::new(self.shared.clone()) {
                Ok(ch) => return Ok(Box::new(ch)),
                Err(e) => log::warn!(
                    "file bdev '{}': io_uring channel setup failed ({e}); using the threads engine",
                    self.info.name
                ),
            }
        }
        Ok(Box::new(ThreadsChannel::new(self.shared.clone(), &self.info.name)?))
    }
}

fn new_eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd (if any) is owned by the OwnedFd below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live local; the fd is non-blocking, errors (EAGAIN) are ignored.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

fn signal_eventfd(fd: RawFd) {
    let v: u64 = 1;
    // SAFETY: writes 8 bytes from a live local.
    unsafe { libc::write(fd, (&v as *const u64).cast(), 8) };
}

// ---------------------------------------------------------------------------------------------
// io_uring engine

/// One I/O owned by the ring until its last CQE.
struct Slot {
    io: BdevIo,
    /// Bytes of a read/write already transferred (short transfers are resubmitted).
    done_bytes: u64,
    /// The not-yet-transferred part of the buffers after a short transfer.
    rest: Option<super::IoVecs>,
    /// Zero-write fallback progress: (next byte, end byte).
    emu: Option<(u64, u64)>,
}

struct UringChannel {
    shared: Arc<Shared>,
    ring: IoUring,
    efd: OwnedFd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Slots owned by this channel (in the kernel or in `retry`).
    inflight: usize,
    /// Slots whose next SQE did not fit in the SQ.
    retry: VecDeque<usize>,
    cqes: Vec<(u64, i32)>,
    done: Vec<Completion>,
    closing: bool,
}

impl UringChannel {
    fn new(shared: Arc<Shared>) -> std::io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let efd = new_eventfd()?;
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        Ok(Self {
            shared,
            ring,
            efd,
            slots: Vec::new(),
            free: Vec::new(),
            inflight: 0,
            retry: VecDeque::new(),
            cqes: Vec::new(),
            done: Vec::new(),
            closing: false,
        })
    }

    /// The next SQE for slot `i`.
    fn sqe(&self, i: usize) -> io_uring::squeue::Entry {
        let s = self.slots[i].as_ref().expect("live slot");
        let fd = types::Fd(self.shared.fd());
        let bs = self.shared.block_size;
        let off = s.io.offset_blocks * bs;
        let len = s.io.num_blocks * bs;
        let e = if let Some((pos, end)) = s.emu {
            let n = (end - pos).min(ZERO_BUF_BYTES as u64) as u32;
            opcode::Write::new(fd, self.shared.zeros.as_ptr(), n).offset(pos).build()
        } else {
            match s.io.kind {
                IoKind::Read | IoKind::Write => {
                    let v = s.rest.as_ref().unwrap_or(&s.io.bufs);
                    let iov = &v.as_iovecs()[..v.segments().min(IOV_MAX)];
                    let at = off + s.done_bytes;
                    if s.io.kind == IoKind::Read {
                        opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32).offset(at).build()
                    } else {
                        opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32).offset(at).build()
                    }
                }
                IoKind::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
                IoKind::Unmap => opcode::Fallocate::new(fd, len)
                    .offset(off)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build(),
                IoKind::WriteZeroes => opcode::Fallocate::new(fd, len)
                    .offset(off)
                    .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                    .build(),
                IoKind::Reset => opcode::Nop::new().build(),
            }
        };
        e.user_data(i as u64)
    }

    /// Pushes slot `i`'s next SQE; false when the SQ is full.
    fn push(&mut self, i: usize) -> bool {
        let sqe = self.sqe(i);
        // SAFETY: every pointer in the SQE (iovec array, data buffers, zero buffer) is owned by slot `i`
        // (or by `shared`), and the slot stays in the slab until its CQE is reaped — `Drop` waits for
        // all CQEs before anything is freed.
        unsafe { self.ring.submission().push(&sqe).is_ok() }
    }

    fn kick(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        if let Err(e) = self.ring.submit() {
            // EBUSY/EAGAIN: the SQEs stay queued and go at the next poll.
            if !matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::EINTR)) {
                log::warn!("file bdev: io_uring submit failed: {e}");
            }
        }
    }

    fn finish(&mut self, i: usize, result: Result<(), IoError>) {
        if let Some(s) = self.slots[i].take() {
            self.free.push(i);
            self.inflight -= 1;
            let tag = s.io.tag;
            drop(s);
            self.done.push(Completion { tag, result });
        }
    }

    fn resubmit(&mut self, i: usize) {
        if self.closing {
            self.finish(i, Err(IoError::Aborted));
        } else if !self.push(i) {
            self.retry.push_back(i);
        }
    }

    fn on_cqe(&mut self, i: usize, res: i32) {
        let Some(s) = self.slots.get_mut(i).and_then(|s| s.as_mut()) else {
            log::warn!("file bdev: CQE for unknown slot {i}");
            return;
        };
        if let Some((pos, end)) = s.emu {
            match res {
                r if r < 0 => self.finish(i, Err(IoError::Errno(-r))),
                0 => self.finish(i, Err(IoError::Errno(libc::EIO))),
                r => {
                    let pos = pos + r as u64;
                    if pos >= end {
                        self.finish(i, Ok(()));
                    } else {
                        s.emu = Some((pos, end));
                        self.resubmit(i);
                    }
                }
            }
            return;
        }
        let kind = s.io.kind;
        match kind {
            IoKind::Read | IoKind::Write => {
                if res < 0 {
                    return self.finish(i, Err(IoError::Errno(-res)));
                }
                let total = s.io.bufs.len_bytes();
                s.done_bytes += res as u64;
                if s.done_bytes >= total {
                    self.finish(i, Ok(()));
                } else if res == 0 {
                    self.finish(i, Err(IoError::Errno(libc::EIO)));
                } else {
                    s.rest = s.io.bufs.slice(s.done_bytes, total - s.done_bytes);
                    self.resubmit(i);
                }
            }
            IoKind::Unmap | IoKind::WriteZeroes if res < 0 && self.shared.note_unsupported(kind, -res) => {
                let bs = self.shared.block_size;
                s.emu = Some((s.io.offset_blocks * bs, (s.io.offset_blocks + s.io.num_blocks) * bs));
                self.resubmit(i);
            }
            _ if res < 0 => self.finish(i, Err(IoError::Errno(-res))),
            IoKind::Flush => {
                self.shared.syncs.fetch_add(1, Ordering::Relaxed);
                self.finish(i, Ok(()))
            }
            _ => self.finish(i, Ok(())),
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for (ud, res) in cqes.drain(..) {
            self.on_cqe(ud as usize, res);
        }
        self.cqes = cqes;
    }
}

impl ModuleChannel for UringChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        if self.inflight >= RING_ENTRIES as usize {
            return Err(Rejected::NoMem(io));
        }
        let bs = self.shared.block_size;
        let emu = self
            .shared
            .use_fallback(io.kind)
            .then(|| (io.offset_blocks * bs, (io.offset_blocks + io.num_blocks) * bs));
        let slot = Slot { io, done_bytes: 0, rest: None, emu };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        if !self.push(i) {
            let s = self.slots[i].take().expect("just stored");
            self.free.push(i);
            return Err(Rejected::NoMem(s.io));
        }
        self.inflight += 1;
        self.kick();
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        drain_eventfd(self.efd.as_raw_fd());
        self.reap();
        while let Some(&i) = self.retry.front() {
            if !self.push(i) {
                break;
            }
            self.retry.pop_front();
        }
        self.kick();
        let n = self.done.len();
        done.append(&mut self.done);
        n
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.efd.as_raw_fd())
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        // The kernel may still hold pointers into slots: wait for every CQE before freeing them.
        self.closing = true;
        while let Some(i) = self.retry.pop_front() {
            self.finish(i, Err(IoError::Aborted));
        }
        while self.inflight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.reap(),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    log::error!(
                        "file bdev: io_uring wait at teardown failed ({e}); leaking in-flight buffers"
                    );
                    std::mem::forget(std::mem::take(&mut self.slots));
                    break;
                }
            }
            while let Some(i) = self.retry.pop_front() {
                self.finish(i, Err(IoError::Aborted));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// threads engine

struct ThreadsChannel {
    tx: Option<mpsc::Sender<BdevIo>>,
    done_rx: mpsc::Receiver<Completion>,
    efd: Arc<OwnedFd>,
    workers: Vec<JoinHandle<()>>,
    inflight: usize,
}

impl ThreadsChannel {
    fn new(shared: Arc<Shared>, name: &str) -> Result<Self, BdevError> {
        let efd =
            Arc::new(new_eventfd().map_err(|e| BdevError::io(format!("file bdev '{name}': eventfd"), e))?);
        let (tx, rx) = mpsc::channel::<BdevIo>();
        let (done_tx, done_rx) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for n in 0..THREADS_WORKERS {
            let (rx, done_tx, efd, shared) = (rx.clone(), done_tx.clone(), efd.clone(), shared.clone());
            let h = std::thread::Builder::new()
                .name(format!("file-{name}-{n}"))
                .spawn(move || loop {
                    let io = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(io) => io,
                        Err(_) => break,
                    };
                    let tag = io.tag;
                    let result = blocking_io(&shared, &io);
                    drop(io);
                    if done_tx.send(Completion { tag, result }).is_err() {
                        break;
                    }
                    signal_eventfd(efd.as_raw_fd());
                })
                .map_err(|e| BdevError::io(format!("file bdev '{name}': spawn worker"), e))?;
            workers.push(h);
        }
        Ok(Self { tx: Some(tx), done_rx, efd, workers, inflight: 0 })
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// One I/O done with blocking syscalls.
fn blocking_io(shared: &Shared, io: &BdevIo) -> Result<(), IoError> {
    let fd = shared.fd();
    let bs = shared.block_size;
    let off = io.offset_blocks * bs;
    let len = io.num_blocks * bs;
    match io.kind {
        IoKind::Read | IoKind::Write => {
            let mut done = 0u64;
            while done < len {
                let rest;
                let v = if done == 0 {
                    &io.bufs
                } else {
                    rest = io.bufs.slice(done, len - done).ok_or(IoError::Errno(libc::EIO))?;
                    &rest
                };
                let iov = &v.as_iovecs()[..v.segments().min(IOV_MAX)];
                let cnt = iov.len() as libc::c_int;
                let at = (off + done) as libc::off_t;
                // SAFETY: the iovecs describe memory kept valid by `io.bufs` for this call's duration.
                let r = unsafe {
                    if io.kind == IoKind::Read {
                        libc::preadv(fd, iov.as_ptr(), cnt, at)
                    } else {
                        libc::pwritev(fd, iov.as_ptr(), cnt, at)
                    }
                };
                match r {
                    r if r < 0 => match errno() {
                        libc::EINTR => {}
                        e => return Err(IoError::Errno(e)),
                    },
                    0 => return Err(IoError::Errno(libc::EIO)),
                    r => done += r as u64,
                }
            }
            Ok(())
        }
        IoKind::Flush => {
            // SAFETY: plain syscall on an fd owned by `shared`.
            if unsafe { libc::fdatasync(fd) } != 0 {
                return Err(IoError::Errno(errno()));
            }
            shared.syncs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        IoKind::Unmap | IoKind::WriteZeroes => {
            if !shared.use_fallback(io.kind) {
                let mode = if io.kind == IoKind::Unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                // SAFETY: plain syscall on an fd owned by `shared`.
                if unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) } == 0 {
                    return Ok(());
                }
                let e = errno();
                if !shared.note_unsupported(io.kind, e) {
                    return Err(IoError::Errno(e));
                }
            }
            let mut pos = off;
            while pos < off + len {
                let n = (off + len - pos).min(ZERO_BUF_BYTES as u64) as usize;
                // SAFETY: the zero buffer is ZERO_BUF_BYTES long and kept alive by `shared`.
                let r = unsafe { libc::pwrite(fd, shared.zeros.as_ptr().cast(), n, pos as libc::off_t) };
                match r {
                    r if r < 0 => match errno() {
                        libc::EINTR => {}
                        e => return Err(IoError::Errno(e)),
                    },
                    0 => return Err(IoError::Errno(libc::EIO)),
                    r => pos += r as u64,
                }
            }
            Ok(())
        }
        IoKind::Reset => Ok(()),
    }
}

impl ModuleChannel for ThreadsChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        if self.inflight >= THREADS_MAX_INFLIGHT {
            return Err(Rejected::NoMem(io));
        }
        match self.tx.as_ref().map(|tx| tx.send(io)) {
            Some(Ok(())) => {
                self.inflight += 1;
                Ok(())
            }
            Some(Err(mpsc::SendError(io))) => Err(Rejected::Failed(io, IoError::Removed)),
            None => unreachable!("sender lives until drop"),
        }
    }

    fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        drain_eventfd(self.efd.as_raw_fd());
        let before = done.len();
        while let Ok(c) = self.done_rx.try_recv() {
            done.push(c);
        }
        let n = done.len() - before;
        self.inflight -= n;
        n
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.efd.as_raw_fd())
    }
}

impl Drop for ThreadsChannel {
    fn drop(&mut self) {
        // Workers finish what is queued, then see the closed channel and exit.
        self.tx = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bdev::tests::{drive, pattern, poll_in, run1};
    use crate::bdev::{Channel, Descriptor, IoVecs, Registry};

    /// `f` registered in a new registry, a writable descriptor and a channel.
    pub(crate) fn open(f: FileBdev) -> (Arc<FileBdev>, Registry, Descriptor, Channel) {
        let f = Arc::new(f);
        let reg = Registry::new();
        reg.register(f.clone()).expect("register");
        let desc = reg.open(&f.info.name, true).expect("open");
        let ch = desc.channel().expect("channel");
        (f, reg, desc, ch)
    }

    fn write(ch: &mut Channel, off: u64, n: u64, seed: u8) -> Result<(), IoError> {
        run1(ch, BdevIo::write(off, n, IoVecs::from_slice(&pattern(off, n, 512, seed)), 1))
    }

    fn read(ch: &mut Channel, off: u64, n: u64) -> Vec<u8> {
        let b = IoVecs::alloc((n * 512) as usize);
        let view = b.slice(0, n * 512).expect("view");
        assert_eq!(run1(ch, BdevIo::read(off, n, b, 2)), Ok(()));
        view.to_vec()
    }

    /// True when byte `off` of `path` lies in a hole (`SEEK_HOLE` from there stays there).
    fn hole_at(path: &Path, off: u64) -> bool {
        let f = File::open(path).expect("open");
        // SAFETY: plain syscall on an fd we own.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_HOLE) };
        assert!(r >= 0, "SEEK_HOLE: {}", std::io::Error::last_os_error());
        r as u64 == off
    }

    /// Once its completions are reaped, a channel's wait fd is quiet: an idle poller sleeps.
    #[test]
    fn the_wait_fd_is_quiet_once_completions_are_reaped() {
        for engine in [Engine::IoUring, Engine::Threads] {
            let d = tempfile::tempdir().expect("tempdir");
            let f = FileBdev::open("wq", d.path().join("img"), Some(1 << 20), false, engine).expect("file");
            let (_f, _reg, _desc, mut ch) = open(f);
            let fd = ch.wait_fd().expect("wait fd");
            ch.submit(BdevIo::write(0, 8, IoVecs::from_slice(&pattern(0, 8, 512, 1)), 1));
            // One request, one signal: once the fd is readable the signal has been given.
            assert_eq!(poll_in(fd, 10_000), 1, "{engine:?}: no signal");
            assert_eq!(drive(&mut ch).len(), 1);
            assert_eq!(
                poll_in(fd, 0),
                0,
                "{engine:?}: the wait fd stays readable after the completion was reaped"
            );
        }
    }

    /// Unmap punches a hole; with the zero-write fallback (forced, or after fallocate said
    /// EOPNOTSUPP) unmap and write_zeroes write zeros instead, from block 0 on too. On tmpfs, which
    /// punches holes but refuses ZERO_RANGE.
    #[test]
    fn the_zero_write_fallback_writes_zeros_instead_of_punching_holes() {
        for engine in [Engine::IoUring, Engine::Threads] {
            let d = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
            let path = d.path().join("img");
            let f = FileBdev::open("zf", &path, Some(1 << 20), false, engine).expect("file");
            let (f, _reg, _desc, mut ch) = open(f);
            assert_eq!(write(&mut ch, 0, 512, 1), Ok(()));
            assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::Unmap, 0, 128, 3)), Ok(()));
            assert!(hole_at(&path, 0), "{engine:?}: unmap did not punch a hole");
            assert_eq!(read(&mut ch, 0, 128), vec![0; 128 * 512]);
            f.force_zero_write_fallback();
            assert_eq!(write(&mut ch, 0, 512, 2), Ok(()));
            assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::Unmap, 0, 128, 3)), Ok(()));
            assert!(!hole_at(&path, 0), "{engine:?}: unmap punched a hole despite the fallback");
            assert_eq!(read(&mut ch, 0, 128), vec![0; 128 * 512]);
            assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::WriteZeroes, 0, 256, 4)), Ok(()));
            assert_eq!(read(&mut ch, 0, 256), vec![0; 256 * 512]);
            assert_eq!(read(&mut ch, 256, 256), pattern(256, 256, 512, 2), "{engine:?}: past the range");
        }
    }

    /// With the fallback, write_zeroes writes zeros on a disk file system too, where
    /// fallocate(ZERO_RANGE) would leave unwritten extents (a hole to SEEK_HOLE on ext4).
    #[test]
    fn the_zero_write_fallback_writes_zeros_on_disk() {
        for engine in [Engine::IoUring, Engine::Threads] {
            let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir on disk");
            let path = d.path().join("img");
            let f = FileBdev::open("zd", &path, Some(1 << 20), false, engine).expect("file");
            let (f, _reg, _desc, mut ch) = open(f);
            assert_eq!(write(&mut ch, 0, 512, 1), Ok(()));
            // Allocated on disk (not delayed-allocation pages), as zero-range finds it later.
            assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::Flush, 0, 0, 3)), Ok(()));
            f.force_zero_write_fallback();
            assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::WriteZeroes, 0, 128, 4)), Ok(()));
            assert!(!hole_at(&path, 0), "{engine:?}: write_zeroes used fallocate despite the fallback");
            assert_eq!(read(&mut ch, 0, 128), vec![0; 128 * 512]);
        }
    }

    /// fallocate(ZERO_RANGE) refused (tmpfs) switches write_zeroes to zero writes, once, with one
    /// log line; unmap keeps punching holes.
    #[test]
    fn an_unsupported_zero_range_switches_only_write_zeroes() {
        for engine in [Engine::IoUring, Engine::Threads] {
            let d = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
            let path = d.path().join("img");
            let f = FileBdev::open("zr", &path, Some(1 << 20), false, engine).expect("file");
            let (_f, _reg, _desc, mut ch) = open(f);
            assert_eq!(write(&mut ch, 0, 512, 1), Ok(()));
            // The threads engine logs from its workers.
            let (_, logs) =
                crate::testlog::capture_named(&["file-zr-0", "file-zr-1", "file-zr-2", "file-zr-3"], || {
                    for off in [0, 64] {
                        let r = run1(&mut ch, BdevIo::no_data(IoKind::WriteZeroes, off, 32, 3));
                        assert_eq!(r, Ok(()), "{engine:?}");
                    }
                });
            let said: Vec<_> = logs.iter().filter(|l| l.contains("not supported")).collect();
            assert_eq!(said.len(), 1, "{engine:?}: {logs:?}");
            assert!(said[0].contains("WriteZeroes"), "{said:?}");
            assert_eq!(
                read(&mut ch, 0, 128),
                [vec![0; 32 * 512], pattern(32, 32, 512, 1), vec![0; 32 * 512], pattern(96, 32, 512, 1)]
                    .concat()
            );
            assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::Unmap, 256, 128, 3)), Ok(()));
            assert!(hole_at(&path, 256 * 512), "{engine:?}: unmap stopped punching holes");
        }
    }

    /// Errors of the medium reach the completion with their errno: a write-sealed memfd refuses
    /// writes, unmap and zero writes with EPERM.
    #[test]
    fn medium_errors_complete_with_their_errno() {
        for engine in [Engine::IoUring, Engine::Threads] {
            // SAFETY: plain syscall with a NUL-terminated name; the fd is owned by the File below.
            let fd = unsafe { libc::memfd_create(c"vblkd-sealed".as_ptr(), libc::MFD_ALLOW_SEALING) };
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh fd nobody else owns.
            let mem = unsafe { File::from_raw_fd(fd) };
            mem.set_len(1 << 20).expect("size");
            let path = format!("/proc/self/fd/{fd}");
            let f = FileBdev::open("se", &path, None, false, engine).expect("file");
            let (f, _reg, _desc, mut ch) = open(f);
            assert_eq!(write(&mut ch, 0, 8, 1), Ok(()));
            // SAFETY: plain fcntl on our fd.
            let rc = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
            assert_eq!(rc, 0, "F_SEAL_WRITE: {}", std::io::Error::last_os_error());
            let eperm = Err(IoError::Errno(libc::EPERM));
            assert_eq!(write(&mut ch, 0, 8, 2), eperm, "{engine:?}: write");
            let (r, logs) =
                crate::testlog::capture_named(&["file-se-0", "file-se-1", "file-se-2", "file-se-3"], || {
                    run1(&mut ch, BdevIo::no_data(IoKind::Unmap, 0, 8, 3))
                });
            assert_eq!(r, eperm, "{engine:?}: unmap");
            // EPERM is an error, not "fallocate unsupported": no switch to zero writes.
            assert!(!f.shared.unmap_fallback.load(Ordering::Relaxed), "{engine:?}: {logs:?}");
            assert!(!logs.iter().any(|l| l.contains("not supported")), "{engine:?}: {logs:?}");
            f.force_zero_write_fallback();
            assert_eq!(
                run1(&mut ch, BdevIo::no_data(IoKind::WriteZeroes, 0, 8, 4)),
                eperm,
                "{engine:?}: zero writes"
            );
            assert_eq!(read(&mut ch, 0, 8), pattern(0, 8, 512, 1));
        }
    }

    /// A read past the end of a file that shrank under the bdev fails with EIO.
    #[test]
    fn a_read_past_a_shrunk_file_fails_with_eio() {
        for engine in [Engine::IoUring, Engine::Threads] {
            let d = tempfile::tempdir().expect("tempdir");
            let path = d.path().join("img");
            let f = FileBdev::open("sh", &path, Some(1 << 20), false, engine).expect("file");
            let (_f, _reg, _desc, mut ch) = open(f);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(4096))
                .expect("shrink");
            let b = IoVecs::alloc(8 * 512);
            assert_eq!(
                run1(&mut ch, BdevIo::read(64, 8, b, 2)),
                Err(IoError::Errno(libc::EIO)),
                "{engine:?}"
            );
        }
    }

    /// An engine's poll counts only the completions it adds: under the inline channel it is handed
    /// a list that already holds the inline ones.
    #[test]
    fn an_engine_poll_after_inline_completions_counts_only_its_own() {
        for engine in [Engine::IoUring, Engine::Threads] {
            let d = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
            let f = FileBdev::open("ip", d.path().join("img"), Some(1 << 20), false, engine)
                .expect("file")
                .with_inline(true);
            let (_f, _reg, _desc, mut ch) = open(f);
            let fd = ch.wait_fd().expect("wait fd");
            for round in 0..3u64 {
                // A flush goes to the engine; once it has signalled, a write completes inline (tmpfs).
                ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 10 * round));
                assert_eq!(poll_in(fd, 10_000), 1, "{engine:?}: the flush never completed");
                ch.submit(BdevIo::write(
                    round,
                    1,
                    IoVecs::from_slice(&pattern(round, 1, 512, 1)),
                    10 * round + 1,
                ));
                let mut done = drive(&mut ch);
                done.sort_by_key(|c| c.tag);
                let want = vec![
                    Completion { tag: 10 * round, result: Ok(()) },
                    Completion { tag: 10 * round + 1, result: Ok(()) },
                ];
                assert_eq!(done, want, "{engine:?}");
            }
        }
    }

    /// A path that cannot be looked up (here: under a regular file) is an I/O error, not a missing
    /// file (which would be "no size was given").
    #[test]
    fn a_path_that_cannot_be_looked_up_is_an_io_error() {
        let d = tempfile::tempdir().expect("tempdir");
        let plain = d.path().join("plain");
        std::fs::write(&plain, b"x").expect("file");
        let e = FileBdev::open("nd", plain.join("img"), None, false, Engine::Threads).err().expect("refused");
        assert!(!matches!(e, BdevError::InvalidConfig(_)), "{e:?}");
        assert!(e.to_string().contains("stat"), "{e}");
    }

    /// The threads engine runs its worker threads, named after the bdev (a channel of the io_uring
    /// engine would have none).
    #[test]
    fn the_threads_engine_builds_a_threads_channel() {
        let workers = |want: &str| {
            std::fs::read_dir("/proc/self/task")
                .expect("tasks")
                .flatten()
                .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == want))
                .count()
        };
        let d = tempfile::tempdir().expect("tempdir");
        let f = FileBdev::open("thrx", d.path().join("img"), Some(1 << 20), false, Engine::Threads)
            .expect("file");
        assert_eq!(f.engine(), Engine::Threads);
        let ch = f.create_channel().expect("channel");
        // A thread names itself once it runs: wait for it (a generous bound, never reached when right).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while workers("file-thrx-0") == 0 {
            assert!(std::time::Instant::now() < deadline, "no worker thread named file-thrx-0");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(ch);
    }

    /// A block device gives its size and its logical block size (a loop device of 512- and of
    /// 4096-byte sectors); its whole size may be asked for, one block more may not.
    #[test]
    fn block_devices_give_their_size_and_logical_block_size() {
        struct Loop(String);
        impl Drop for Loop {
            fn drop(&mut self) {
                let _ = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
            }
        }
        let d = tempfile::tempdir().expect("tempdir");
        for sector in [512u32, 4096] {
            let img = d.path().join(format!("loop{sector}.img"));
            File::create(&img).and_then(|f| f.set_len(8 << 20)).expect("image");
            // No silent skip: the test command runs as root (CI does), which a loop device needs.
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show", "--sector-size", &sector.to_string()])
                .arg(&img)
                .output()
                .expect("losetup: this test needs root and util-linux");
            assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
            let dev = Loop(String::from_utf8(out.stdout).expect("utf-8").trim().to_string());
            let f =
                FileBdev::open("bd", &dev.0, Some(8 << 20), false, Engine::Threads).expect("whole device");
            assert_eq!(f.info().block_size, sector, "logical block size");
            assert_eq!(f.info().num_blocks, (8 << 20) / u64::from(sector));
            assert!(FileBdev::open("bd", &dev.0, Some((8 << 20) + 4096), false, Engine::Threads).is_err());
            let f =
                FileBdev::open_with_block_size("bd", &dev.0, None, false, Engine::Threads, 4096).expect("4k");
            assert_eq!(f.info().block_size, 4096);
        }
    }

    /// Flushes are counted (module_stats "syncs"), and the close log says how many there were.
    #[test]
    fn flushes_and_the_sync_on_close_are_counted() {
        for engine in [Engine::IoUring, Engine::Threads] {
            let d = tempfile::tempdir().expect("tempdir");
            let f = FileBdev::open("fc", d.path().join("img"), Some(1 << 20), false, engine).expect("file");
            let (f, _reg, _desc, mut ch) = open(f);
            for tag in 0..2 {
                assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::Flush, 0, 0, tag)), Ok(()));
            }
            assert_eq!(f.module_stats().expect("stats")["syncs"], 2, "{engine:?}");
            let (r, logs) = crate::testlog::capture(|| f.shutdown());
            r.expect("shutdown");
            assert!(logs.iter().any(|l| l.contains("(3 syncs since open)")), "{engine:?}: {logs:?}");
        }
    }

    #[test]
    fn io_uring_setup_failure_falls_back_to_threads() {
        let eperm = || Err(std::io::Error::from_raw_os_error(libc::EPERM));
        let enosys = || Err(std::io::Error::from_raw_os_error(libc::ENOSYS));
        assert_eq!(pick_engine("x", Engine::IoUring, eperm), Engine::Threads);
        assert_eq!(pick_engine("x", Engine::IoUring, enosys), Engine::Threads);
        assert_eq!(pick_engine("x", Engine::IoUring, || Ok(())), Engine::IoUring);
        assert_eq!(pick_engine("x", Engine::Threads, || panic!("no probe for threads")), Engine::Threads);
    }
}
