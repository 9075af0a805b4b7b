//! The `file` bdev's inline fast path: buffered reads and writes that the page cache can serve without
//! blocking are done right on the poller thread with `preadv2`/`pwritev2(RWF_NOWAIT)`; everything else
//! goes to the asynchronous engine (io_uring or threads) as before.
//!
//! ```text
//!  submit(read/write) ─► preadv2/pwritev2(RWF_NOWAIT) ─ whole transfer ─► inline done queue ─► poll
//!                             │ EAGAIN (not cached, would block) / short / error-free refusal
//!                             ▼
//!                        async engine (io_uring ring or worker threads) ─► its completions ─► poll
//! ```
//!
//! # Design
//! * A cache hit costs one syscall on the poller thread: no hand-off to io_uring's workers or a thread
//!   pool and no eventfd wake-up, which is what a request on a page-cache-resident file otherwise pays.
//! * `RWF_NOWAIT` never blocks: a miss returns `EAGAIN` at once and the request goes to the engine
//!   unchanged (a short transfer is redone whole by the engine: rereading or rewriting the same bytes is
//!   harmless). A kernel or file system that refuses the flag (`EOPNOTSUPP`/`EINVAL`) turns the path off
//!   for that direction, for the whole bdev, with one log line.
//! * Completions found inline are reported by the next `poll`, like every other completion (never from
//!   inside `submit`); the generic layer polls after submitting, so no wake-up is needed for them.
//! * A file on a memory file system (tmpfs, ramfs) has no device to wait for: there the calls go
//!   without the flag (tmpfs refuses `RWF_NOWAIT` with `EOPNOTSUPP`), since a copy to or from its pages
//!   never sleeps on I/O.
//! * Only for buffered files: with `direct=on` every request goes to the device anyway.
//! * Durability is unchanged: flush is still `fdatasync` through the engine.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::{BdevIo, Completion, DoneQueue, IoError, IoKind, ModuleChannel, Rejected};

/// Counters and switches shared by the bdev's channels.
#[derive(Debug)]
pub(crate) struct InlineState {
    /// `RWF_NOWAIT` reads are supported here.
    pub(crate) reads: AtomicBool,
    /// `RWF_NOWAIT` writes are supported here.
    pub(crate) writes: AtomicBool,
    /// Requests completed inline.
    pub(crate) inline_ops: AtomicU64,
    /// Requests handed to the engine after an inline attempt (cache misses).
    pub(crate) misses: AtomicU64,
    /// `preadv2`/`pwritev2` flags: `RWF_NOWAIT`, or 0 on a memory file system.
    flags: libc::c_int,
}

/// True when `fd` is on tmpfs or ramfs (reads and writes never wait for a device).
fn on_memory_fs(fd: RawFd) -> bool {
    const TMPFS_MAGIC: libc::__fsword_t = 0x0102_1994;
    const RAMFS_MAGIC: libc::__fsword_t = 0x8584_58f6;
    // SAFETY: statfs is plain data, filled by fstatfs on a valid fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a pointer to a live, writable statfs.
    let rc = unsafe { libc::fstatfs(fd, &mut st) };
    rc == 0 && matches!(st.f_type, TMPFS_MAGIC | RAMFS_MAGIC)
}

impl InlineState {
    pub(crate) fn new(fd: RawFd) -> Self {
        let flags = if on_memory_fs(fd) { 0 } else { libc::RWF_NOWAIT };
        Self {
            flags,
            reads: AtomicBool::new(true),
            writes: AtomicBool::new(true),
            inline_ops: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }
}

/// Wraps an engine channel with the inline fast path.
pub(crate) struct InlineChannel {
    fd: RawFd,
    bs: u64,
    engine: Box<dyn ModuleChannel>,
    state: Arc<InlineState>,
    done: DoneQueue,
    /// Requests handed to the engine and not yet returned by its `poll`: an idle engine is not polled
    /// (its poll reads the eventfd, a system call, and a page-cache-resident file never uses it).
    engine_out: usize,
    /// Completions an idle engine gave back in `before_sleep` (none are expected), for the next poll.
    early: Vec<Completion>,
    /// Keeps the file open while `fd` is used.
    _file: Arc<dyn AsRawFd + Send + Sync>,
}

impl InlineChannel {
    pub(crate) fn new(
        file: Arc<dyn AsRawFd + Send + Sync>,
        bs: u64,
        engine: Box<dyn ModuleChannel>,
        state: Arc<InlineState>,
    ) -> Self {
        Self {
            fd: file.as_raw_fd(),
            bs,
            engine,
            state,
            done: DoneQueue::default(),
            engine_out: 0,
            early: Vec::new(),
            _file: file,
        }
    }

    /// Tries the request without blocking: `Some(result)` when it finished here.
    fn try_inline(&self, io: &BdevIo) -> Option<Result<(), IoError>> {
        let write = match io.kind {
            IoKind::Read => false,
            IoKind::Write => true,
            _ => return None,
        };
        let switch = if write { &self.state.writes } else { &self.state.reads };
        if !switch.load(Ordering::Relaxed) {
            return None;
        }
        let iovs = io.bufs.as_iovecs();
        let cnt = libc::c_int::try_from(iovs.len()).ok().filter(|&n| n > 0 && n <= 1024)?;
        let off = libc::off_t::try_from(io.offset_blocks.checked_mul(self.bs)?).ok()?;
        let want = io.bufs.len_bytes();
        // SAFETY: the iovecs come from the I/O's `IoVecs`, which keeps the memory they describe alive
        // for this call; the fd is kept open by `_file`; RWF_NOWAIT (or a memory file system) keeps the
        // call from waiting for a device.
        let rc = unsafe {
            if write {
                libc::pwritev2(self.fd, iovs.as_ptr(), cnt, off, self.state.flags)
            } else {
                libc::preadv2(self.fd, iovs.as_ptr(), cnt, off, self.state.flags)
            }
        };
        if rc >= 0 {
            if u64::try_from(rc).ok() == Some(want) {
                return Some(Ok(()));
            }
            return None; // Short: the engine redoes it whole.
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => None,
            Some(e @ (libc::EOPNOTSUPP | libc::EINVAL)) => {
                if switch.swap(false, Ordering::Relaxed) {
                    log::info!(
                        "file bdev: RWF_NOWAIT {} unsupported here (errno {e}); using the async engine only",
                        if write { "writes" } else { "reads" }
                    );
                }
                None
            }
            // A real I/O error: let the engine try and report it (same errno, one code path).
            _ => None,
        }
    }
}

impl ModuleChannel for InlineChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        match self.try_inline(&io) {
            Some(Ok(())) => {
                self.state.inline_ops.fetch_add(1, Ordering::Relaxed);
                self.done.push_ok(io.tag);
                Ok(())
            }
            Some(Err(e)) => Err(Rejected::Failed(io, e)),
            None => {
                if matches!(io.kind, IoKind::Read | IoKind::Write) {
                    self.state.misses.fetch_add(1, Ordering::Relaxed);
                }
                self.engine.submit(io)?;
                self.engine_out += 1;
                Ok(())
            }
        }
    }

    fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        let mut n = self.done.drain_into(done);
        if !self.early.is_empty() {
            n += self.early.len();
            done.append(&mut self.early);
        }
        if self.engine_out > 0 {
            let m = self.engine.poll(done);
            self.engine_out = self.engine_out.saturating_sub(m);
            n += m;
        }
        n
    }

    fn wait_fd(&self) -> Option<RawFd> {
        self.engine.wait_fd()
    }

    fn before_sleep(&mut self) -> bool {
        if self.engine_out == 0 {
            // `poll` skips an idle engine: clear a signal its last completions left behind.
            self.engine.poll(&mut self.early);
        }
        self.engine.before_sleep() || !self.early.is_empty() || !self.done.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::bdev::file::tests::open;
    use crate::bdev::file::{Engine, FileBdev};
    use crate::bdev::tests::{conformance, drive, many_segments, pattern, poll_in};
    use crate::bdev::{Bdev, BdevIo, Completion, IoKind, IoVecs, Registry};

    #[test]
    fn conformance_file_inline_io_uring_and_threads() {
        for engine in [Engine::IoUring, Engine::Threads] {
            let d = tempfile::tempdir().expect("tempdir");
            let f = FileBdev::open("fi", d.path().join("img"), Some(4 << 20), false, engine)
                .expect("file")
                .with_inline(true);
            assert!(f.inline());
            let f = Arc::new(f);
            conformance(f.clone());
            let (hits, _) = f.inline_counts();
            assert!(hits > 100, "{engine:?}: the inline path was not used ({hits} hits)");
        }
    }

    #[test]
    fn tmpfs_files_go_inline_without_the_flag() {
        let d = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
        let f = Arc::new(
            FileBdev::open("ft", d.path().join("img"), Some(4 << 20), false, Engine::IoUring)
                .expect("file")
                .with_inline(true),
        );
        conformance(f.clone());
        let (hits, misses) = f.inline_counts();
        assert!(hits > 100 && misses == 0, "tmpfs: {hits} inline, {misses} to the engine");
    }

    /// An inline channel sleeps on its engine's wait fd: a request the inline path hands to the engine
    /// (a flush, a cache miss) wakes it when it completes. Without the fd the vhost poller registers no
    /// completion fd for the queue and spins while such a request is in flight.
    #[test]
    fn the_wait_fd_wakes_for_an_engine_completion() {
        for engine in [Engine::IoUring, Engine::Threads] {
            let d = tempfile::tempdir().expect("tempdir");
            let f = FileBdev::open("fw", d.path().join("img"), Some(1 << 20), false, engine)
                .expect("file")
                .with_inline(true);
            assert!(f.inline());
            let (_f, _reg, _desc, mut ch) = open(f);
            let fd = ch.wait_fd().expect("an inline channel has a wait fd");
            assert_eq!(poll_in(fd, 0), 0, "{engine:?}: the wait fd is readable with nothing in flight");
            ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 1));
            assert_eq!(poll_in(fd, 10_000), 1, "{engine:?}: the wait fd never woke for the flush");
            assert_eq!(drive(&mut ch), vec![Completion { tag: 1, result: Ok(()) }]);
        }
    }

    /// A request of more than IOV_MAX (1024) segments goes to the engine, which splits it: offered
    /// whole to `preadv2`/`pwritev2` it would fail with EINVAL, which turns the inline path off for
    /// the whole bdev. A one-block request after it still completes inline.
    #[test]
    fn more_than_iov_max_segments_go_to_the_engine_and_keep_the_inline_path() {
        // tmpfs: every request the inline path takes completes there (no RWF_NOWAIT refusals).
        let d = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
        let f = FileBdev::open("fs", d.path().join("img"), Some(4 << 20), false, Engine::IoUring)
            .expect("file")
            .with_inline(true);
        let (f, _reg, _desc, mut ch) = open(f);
        let data = pattern(10, 1500, 512, 3);
        for kind in [IoKind::Write, IoKind::Read] {
            let bufs = many_segments(1500);
            let view = bufs.slice(0, 1500 * 512).expect("view");
            if kind == IoKind::Write {
                bufs.copy_from_slice(0, &data);
            }
            let (hits, misses) = f.inline_counts();
            ch.submit(BdevIo { kind, offset_blocks: 10, num_blocks: 1500, bufs, tag: 1 });
            assert_eq!(drive(&mut ch), vec![Completion { tag: 1, result: Ok(()) }], "{kind:?}");
            assert_eq!(
                f.inline_counts(),
                (hits, misses + 1),
                "{kind:?}: 1500 segments were not left to the engine"
            );
            if kind == IoKind::Read {
                assert!(view.to_vec() == data, "the 1500-segment read returned other data");
            }
            ch.submit(BdevIo { kind, offset_blocks: 0, num_blocks: 1, bufs: IoVecs::alloc(512), tag: 2 });
            assert_eq!(drive(&mut ch), vec![Completion { tag: 2, result: Ok(()) }], "{kind:?}");
            assert_eq!(f.inline_counts(), (hits + 1, misses + 1), "{kind:?}: the inline path was turned off");
        }
    }

    #[test]
    fn direct_files_never_go_inline() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = FileBdev::open("fd", d.path().join("img"), Some(1 << 20), true, Engine::IoUring)
            .expect("file")
            .with_inline(true);
        assert!(!f.inline(), "O_DIRECT I/O must not take the page-cache fast path");
    }

    /// Pages evicted from the page cache make RWF_NOWAIT reads fail with EAGAIN: the engine serves
    /// them, with the right data.
    #[test]
    fn cache_misses_fall_back_to_the_engine() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        // A real disk file system (not tmpfs, where everything is always cached).
        let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir on disk");
        let path = d.path().join("img");
        let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
        {
            let mut f = std::fs::File::create(&path).expect("create");
            f.write_all(&data).expect("write");
            f.sync_all().expect("sync");
            // SAFETY: plain syscall on our open fd; drops its clean pages from the page cache.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0);
        }
        let f = Arc::new(
            FileBdev::open("fm", &path, None, false, Engine::IoUring).expect("file").with_inline(true),
        );
        let reg = Registry::new();
        reg.register(f.clone()).expect("register");
        let desc = reg.open("fm", false).expect("open");
        let mut ch = desc.channel().expect("channel");
        let bufs: Vec<IoVecs> = (0..16).map(|_| IoVecs::alloc(64 << 10)).collect();
        for (i, b) in bufs.iter().enumerate() {
            ch.submit(BdevIo::read(
                i as u64 * 1024 + 512,
                128,
                b.slice(0, 64 << 10).expect("view"),
                i as u64,
            ));
        }
        let done = drive(&mut ch);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        for (i, b) in bufs.iter().enumerate() {
            let off = (i * 1024 + 512) * 512;
            assert!(b.to_vec() == data[off..off + (64 << 10)], "block run {i} read wrong data");
        }
        let (_, misses) = f.inline_counts();
        assert!(misses > 0, "evicted pages must miss the inline path and go to the engine");
        let info = f.module_stats().expect("stats");
        assert_eq!(info["inline"], true);
    }
}

/// The inline channel over an engine double that counts its polls.
#[cfg(test)]
mod engine_poll_tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::{InlineChannel, InlineState};
    use crate::bdev::{BdevIo, Completion, IoVecs, ModuleChannel, Rejected};

    /// Completes what it was given at its next poll; counts polls; `stale` is returned by the next
    /// poll as if an earlier completion's signal were still pending.
    #[derive(Default)]
    struct Engine {
        polls: Arc<AtomicUsize>,
        held: VecDeque<u64>,
        stale: Arc<Mutex<Vec<u64>>>,
    }

    impl ModuleChannel for Engine {
        fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
            self.held.push_back(io.tag);
            Ok(())
        }
        fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
            self.polls.fetch_add(1, Ordering::Relaxed);
            let mut tags: Vec<u64> = self.held.drain(..).collect();
            tags.append(&mut self.stale.lock().expect("stale"));
            done.extend(tags.iter().map(|&tag| Completion { tag, result: Ok(()) }));
            tags.len()
        }
    }

    /// The channel, the engine's poll count, its stale completions, and the inline switches.
    type Parts = (InlineChannel, Arc<AtomicUsize>, Arc<Mutex<Vec<u64>>>, Arc<InlineState>);

    fn channel() -> Parts {
        channel_with_flags(None)
    }

    /// `channel()` on a tmpfs file, with these `preadv2`/`pwritev2` flags instead of the file's own.
    fn channel_with_flags(flags: Option<libc::c_int>) -> Parts {
        let f = tempfile::NamedTempFile::new_in("/dev/shm").expect("tmpfs file");
        f.as_file().set_len(1 << 20).expect("size");
        let file: Arc<std::fs::File> = Arc::new(f.reopen().expect("reopen"));
        let engine = Engine::default();
        let (polls, stale) = (engine.polls.clone(), engine.stale.clone());
        let mut state = InlineState::new(std::os::fd::AsRawFd::as_raw_fd(&*file));
        if let Some(flags) = flags {
            state.flags = flags;
        }
        let state = Arc::new(state);
        (InlineChannel::new(file, 512, Box::new(engine), state.clone()), polls, stale, state)
    }

    /// Flags the kernel refuses (EOPNOTSUPP, as a kernel or file system without `RWF_NOWAIT` does)
    /// turn the inline path off for that direction, with one log line: later requests of that
    /// direction go straight to the engine; the other direction keeps trying until refused itself.
    #[test]
    fn refused_flags_turn_the_direction_off_once() {
        // An unknown RWF_ bit: every kernel refuses it with EOPNOTSUPP.
        let (mut ch, _polls, _stale, state) = channel_with_flags(Some(1 << 30));
        let ((), logs) = crate::testlog::capture(|| {
            for tag in 0..2 {
                ch.submit(BdevIo::read(tag, 1, IoVecs::alloc(512), tag)).expect("to the engine");
            }
        });
        assert!(!state.reads.load(Ordering::Relaxed), "a refused read left inline reads on");
        assert!(state.writes.load(Ordering::Relaxed), "a refused read turned inline writes off");
        let said: Vec<_> = logs.iter().filter(|l| l.contains("RWF_NOWAIT")).collect();
        assert_eq!(said.len(), 1, "{logs:?}");
        assert!(said[0].contains("reads unsupported"), "{said:?}");
        let ((), logs) = crate::testlog::capture(|| {
            ch.submit(BdevIo::write(0, 1, IoVecs::alloc(512), 2)).expect("to the engine");
        });
        assert!(!state.writes.load(Ordering::Relaxed), "a refused write left inline writes on");
        assert!(logs.iter().any(|l| l.contains("RWF_NOWAIT writes unsupported")), "{logs:?}");
        assert_eq!(state.inline_ops.load(Ordering::Relaxed), 0);
        assert_eq!(state.misses.load(Ordering::Relaxed), 3);
        let mut done = Vec::new();
        assert_eq!(ch.poll(&mut done), 3, "the engine completes what the inline path declined");
    }

    #[test]
    fn an_idle_engine_is_polled_only_before_sleep() {
        let (mut ch, polls, stale, state) = channel();
        let mut done = Vec::new();
        for i in 0..4 {
            ch.submit(BdevIo::read(i, 1, IoVecs::alloc(512), i)).expect("inline read");
        }
        assert_eq!(ch.poll(&mut done), 4);
        ch.poll(&mut done);
        assert_eq!(polls.load(Ordering::Relaxed), 0, "an engine with nothing in flight was polled");
        // Before sleeping, the idle engine is polled once; what it returns comes out of the next poll.
        stale.lock().expect("stale").push(99);
        assert!(ch.before_sleep(), "a completion found before sleeping is work");
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        done.clear();
        assert_eq!(ch.poll(&mut done), 1);
        assert_eq!(done[0].tag, 99);
        assert!(!ch.before_sleep());
        // A request the inline path declines goes to the engine, which is polled until it returns.
        state.reads.store(false, Ordering::Relaxed);
        ch.submit(BdevIo::read(0, 1, IoVecs::alloc(512), 7)).expect("to the engine");
        let before = polls.load(Ordering::Relaxed);
        done.clear();
        assert_eq!(ch.poll(&mut done), 1);
        assert_eq!(done[0].tag, 7);
        assert_eq!(polls.load(Ordering::Relaxed), before + 1);
        ch.poll(&mut done);
        assert_eq!(polls.load(Ordering::Relaxed), before + 1, "polled again after it returned everything");
    }
}
