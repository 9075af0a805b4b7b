//! Bdev conformance suite and generic-layer tests.
//!
//! ```text
//!  conformance(bdev) ── run against malloc, file/io_uring, file/threads, file direct, file zero-write fallback
//!  StubBdev (wraps malloc) ── deterministic NOMEM, child recording, failures, no native write_zeroes
//! ```
//!
//! # Design
//! Everything completes through `Channel::poll`; `drive` polls (sleeping on `wait_fd` when there is one)
//! until nothing is outstanding, so no test depends on timing.
//!
//! # Limitations
//! Block devices are not exercised (no privileged device in CI).

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use super::file::{Engine, FileBdev};
use super::malloc::MallocBdev;
use super::null::NullBdev;
use super::qos::QosLimits;
use super::{
    AlignedBuf, Bdev, BdevError, BdevInfo, BdevIo, Channel, Completion, IoError, IoKind, IoVecs,
    ModuleChannel, Registry, Rejected,
};

/// Polls until nothing is outstanding; returns completions in arrival order.
/// xorshift64 for the module tests' random workloads: reproducible per seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub(crate) fn drive(ch: &mut Channel) -> Vec<Completion> {
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while ch.outstanding() > 0 {
        if ch.poll(&mut done) == 0 {
            assert!(std::time::Instant::now() < deadline, "I/O never completed");
            if let Some(fd) = ch.wait_fd() {
                poll_in(fd, 100);
            } else {
                std::thread::yield_now();
            }
        }
    }
    done
}

/// poll(2) for input on `fd`, waiting at most `ms`: 1 when readable, 0 when not, -1 on an error.
pub(crate) fn poll_in(fd: RawFd, ms: i32) -> i32 {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd on the stack, for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) }
}

/// Submits `ios` and returns each tag's result, asserting every tag completes exactly once.
pub(crate) fn run(ch: &mut Channel, ios: Vec<BdevIo>) -> HashMap<u64, Result<(), IoError>> {
    let n = ios.len();
    for io in ios {
        ch.submit(io);
    }
    let mut out = HashMap::new();
    for c in drive(ch) {
        assert!(out.insert(c.tag, c.result).is_none(), "tag {} completed twice", c.tag);
    }
    assert_eq!(out.len(), n);
    out
}

/// Submits one I/O (any tag) and returns its result.
pub(crate) fn run1(ch: &mut Channel, io: BdevIo) -> Result<(), IoError> {
    let tag = io.tag;
    run(ch, vec![io])[&tag]
}

/// Deterministic content: each block carries its number and a seed.
pub(crate) fn pattern(off: u64, n: u64, bs: u64, seed: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity((n * bs) as usize);
    for b in off..off + n {
        for i in 0..bs {
            v.push((b.wrapping_mul(31) as u8) ^ (i as u8).wrapping_mul(7) ^ seed ^ ((i >> 8) as u8));
        }
    }
    v
}

/// Byte comparison that reports the first difference instead of dumping both buffers.
#[track_caller]
fn same(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("first difference at byte {i} (block {}): got {} want {}", i / 512, got[i], want[i]);
    }
}

/// `len` bytes spread over several unaligned segments of one heap buffer.
fn scattered(len: usize) -> IoVecs {
    let sizes = [7usize, 500, 1029, 3, 2000];
    let buf = Arc::new(AlignedBuf::zeroed(len + 64 * (len / 7 + 2)));
    let mut iovs = Vec::new();
    let (mut pos, mut left, mut k) = (3usize, len, 0usize);
    while left > 0 {
        let n = sizes[k % sizes.len()].min(left);
        iovs.push(libc::iovec { iov_base: buf.as_ptr().wrapping_add(pos).cast(), iov_len: n });
        pos += n + 5;
        left -= n;
        k += 1;
    }
    let keep: Arc<dyn std::any::Any + Send + Sync> = buf;
    // SAFETY: all segments lie inside `buf`, kept alive by `keep`.
    unsafe { IoVecs::from_raw_parts(iovs, Some(keep)) }
}

fn read_back(ch: &mut Channel, off: u64, n: u64, bs: u64, scatter: bool) -> Vec<u8> {
    let len = (n * bs) as usize;
    let bufs = if scatter { scattered(len) } else { IoVecs::alloc(len) };
    let view = bufs.slice(0, len as u64).expect("view");
    assert_eq!(run1(ch, BdevIo::read(off, n, bufs, 0)), Ok(()));
    view.to_vec()
}

fn write_pat(ch: &mut Channel, off: u64, n: u64, bs: u64, seed: u8, scatter: bool) {
    let data = pattern(off, n, bs, seed);
    let bufs = if scatter { scattered(data.len()) } else { IoVecs::alloc(data.len()) };
    bufs.copy_from_slice(0, &data);
    assert_eq!(run1(ch, BdevIo::write(off, n, bufs, 0)), Ok(()));
}

/// The shared suite: every data-storing bdev must pass it.
pub(crate) fn conformance(bdev: Arc<dyn Bdev>) {
    conformance_with(Registry::new(), bdev)
}

/// The suite on a registry that already holds what `bdev` stacks on (delay, FTL, cache).
pub(crate) fn conformance_with(reg: Registry, bdev: Arc<dyn Bdev>) {
    let name = bdev.info().name.clone();
    reg.register(bdev).expect("register");
    let desc = reg.open(&name, true).expect("open");
    let mut ch = desc.channel().expect("channel");
    let bs = u64::from(desc.info().block_size);
    let nb = desc.info().num_blocks;
    assert!(nb >= 1024, "conformance needs at least 1024 blocks");

    // Patterns at various offsets, scattered and plain buffers in both directions.
    let cases = [(0u64, 1u64), (1, 5), (7, 3), (100, 64), (nb - 9, 9)];
    for (k, &(off, n)) in cases.iter().enumerate() {
        write_pat(&mut ch, off, n, bs, k as u8, k % 2 == 0);
    }
    for (k, &(off, n)) in cases.iter().enumerate() {
        let want = pattern(off, n, bs, k as u8);
        same(&read_back(&mut ch, off, n, bs, true), &want);
        same(&read_back(&mut ch, off, n, bs, false), &want);
    }
    assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::Flush, 0, 0, 0)), Ok(()));

    // Unmap reads back zeros; neighbours intact.
    write_pat(&mut ch, 200, 32, bs, 9, false);
    assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::Unmap, 208, 8, 0)), Ok(()));
    if desc.info().unmap_reads_zeroes {
        same(&read_back(&mut ch, 208, 8, bs, true), &vec![0u8; (8 * bs) as usize]);
    }
    same(&read_back(&mut ch, 200, 8, bs, false), &pattern(200, 8, bs, 9));
    same(&read_back(&mut ch, 216, 16, bs, false), &pattern(216, 16, bs, 9));

    // write_zeroes.
    write_pat(&mut ch, 300, 40, bs, 3, false);
    assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::WriteZeroes, 305, 30, 0)), Ok(()));
    same(&read_back(&mut ch, 305, 30, bs, false), &vec![0u8; (30 * bs) as usize]);
    same(&read_back(&mut ch, 300, 5, bs, false), &pattern(300, 5, bs, 3));
    same(&read_back(&mut ch, 335, 5, bs, false), &pattern(335, 5, bs, 3));

    // Range checks.
    let r = run(
        &mut ch,
        vec![
            BdevIo::read(nb, 1, IoVecs::alloc(bs as usize), 1),
            BdevIo::write(nb - 1, 2, IoVecs::alloc(2 * bs as usize), 2),
            BdevIo::no_data(IoKind::Unmap, 0, 0, 3),
            BdevIo::no_data(IoKind::WriteZeroes, u64::MAX, 2, 4),
            BdevIo::read(0, 2, IoVecs::alloc(bs as usize), 5),
        ],
    );
    assert!(r.values().all(|v| *v == Err(IoError::InvalidRange)), "{r:?}");

    // Read-only descriptor.
    let ro = reg.open(&name, false).expect("open ro");
    let mut rch = ro.channel().expect("channel");
    let r = run(
        &mut rch,
        vec![
            BdevIo::write(0, 1, IoVecs::alloc(bs as usize), 1),
            BdevIo::no_data(IoKind::Unmap, 0, 1, 2),
            BdevIo::no_data(IoKind::WriteZeroes, 0, 1, 3),
        ],
    );
    assert!(r.values().all(|v| *v == Err(IoError::ReadOnly)), "{r:?}");
    same(&read_back(&mut rch, 1, 5, bs, false), &pattern(1, 5, bs, 1));
    drop(rch);

    // Many I/O in flight (more than any module's queue), completions in any order.
    let many = 300u64.min(nb / 2);
    let ios = (0..many)
        .map(|i| BdevIo::write(400 + i, 1, IoVecs::from_slice(&pattern(400 + i, 1, bs, 0x5a)), i))
        .collect();
    assert!(run(&mut ch, ios).values().all(|v| v.is_ok()));
    let views: Vec<IoVecs> = (0..many).map(|_| IoVecs::alloc(bs as usize)).collect();
    let ios = views
        .iter()
        .enumerate()
        .map(|(i, v)| BdevIo::read(400 + i as u64, 1, v.slice(0, bs).expect("view"), i as u64))
        .collect();
    assert!(run(&mut ch, ios).values().all(|v| v.is_ok()));
    for (i, v) in views.iter().enumerate() {
        assert_eq!(v.to_vec(), pattern(400 + i as u64, 1, bs, 0x5a), "block {}", 400 + i);
    }

    // Statistics survive the channel.
    drop(ch);
    let s = desc.stats();
    assert!(s.write_ops >= many && s.read_ops >= many, "{s:?}");
    assert!(s.errors >= 8);
    assert_eq!(s.unmap_ops, 1);
    assert_eq!(s.write_zeroes_ops, 1);
    assert!(s.read_latency_ns_max > 0 && s.read_latency_ns_sum >= s.read_latency_ns_max);
    let json = reg.stats_json();
    assert_eq!(json[&name]["unmap_ops"], 1);
    drop(desc);
    let bdev = reg.unregister(&name).expect("unregister");
    bdev.shutdown().expect("shutdown");
}

#[test]
fn conformance_malloc() {
    conformance(Arc::new(MallocBdev::new("m", 4 << 20, 512).expect("malloc")));
    conformance(Arc::new(MallocBdev::new("m4k", 8 << 20, 4096).expect("malloc")));
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn conformance_file_io_uring() {
    let d = tmp();
    let f = FileBdev::open("fu", d.path().join("img"), Some(4 << 20), false, Engine::IoUring).expect("file");
    // No silent fallback: a test labelled io_uring must run on io_uring (CI machines have it).
    assert_eq!(f.engine(), Engine::IoUring, "io_uring unavailable: the io_uring run would use threads");
    conformance(Arc::new(f));
}

#[test]
fn conformance_file_threads() {
    let d = tmp();
    let f = FileBdev::open("ft", d.path().join("img"), Some(4 << 20), false, Engine::Threads).expect("file");
    assert_eq!(f.engine(), Engine::Threads);
    conformance(Arc::new(f));
}

#[test]
fn conformance_file_direct() {
    let d = tmp();
    for (engine, bs) in [(Engine::IoUring, 512), (Engine::Threads, 512), (Engine::IoUring, 4096)] {
        let path = d.path().join(format!("img-{engine:?}-{bs}"));
        match FileBdev::open_with_block_size("fd", &path, Some(8 << 20), true, engine, bs) {
            Ok(f) => {
                assert_eq!(f.info().buf_align, bs);
                assert_eq!(f.engine(), engine, "engine label");
                conformance(Arc::new(f));
            }
            // No silent skip: a filesystem without O_DIRECT (e.g. an old tmpfs as TMPDIR) fails here.
            Err(e) => panic!("open {} with O_DIRECT: {e} (set TMPDIR to a disk filesystem)", path.display()),
        }
    }
}

#[test]
fn conformance_ftl() {
    let d = tmp();
    conformance(crate::ftl::tests::small_ftl(d.path()));
}

#[test]
fn conformance_file_zero_write_fallback() {
    let d = tmp();
    for engine in [Engine::IoUring, Engine::Threads] {
        let f = FileBdev::open("fz", d.path().join(format!("{engine:?}")), Some(4 << 20), false, engine)
            .expect("file");
        f.force_zero_write_fallback();
        assert_eq!(f.engine(), engine, "engine label");
        conformance(Arc::new(f));
    }
}

#[test]
fn file_open_rules() {
    let d = tmp();
    let p = d.path().join("a");
    assert!(matches!(
        FileBdev::open("a", &p, None, false, Engine::Threads),
        Err(BdevError::InvalidConfig(_))
    ));
    let f = FileBdev::open("a", &p, Some(1 << 20), false, Engine::Threads).expect("create");
    assert_eq!(f.info().num_blocks, 2048);
    assert!(f.info().volatile_write_cache);
    assert_eq!(f.info().buf_align, 1);
    drop(f);
    // Existing file: size defaults to its length; a larger size extends it.
    let f = FileBdev::open("a", &p, None, false, Engine::Threads).expect("reopen");
    assert_eq!(f.info().num_blocks, 2048);
    drop(f);
    let f = FileBdev::open("a", &p, Some(2 << 20), false, Engine::Threads).expect("extend");
    assert_eq!(f.info().num_blocks, 4096);
    assert_eq!(std::fs::metadata(&p).expect("stat").len(), 2 << 20);
    assert!(f.module_stats().is_some());
    drop(f);
    std::fs::write(d.path().join("odd"), [0u8; 1000]).expect("write");
    assert!(FileBdev::open("o", d.path().join("odd"), None, false, Engine::Threads).is_err());
    assert!(FileBdev::open("dir", d.path(), None, false, Engine::Threads).is_err());
    assert!(FileBdev::open_with_block_size("b", &p, None, false, Engine::Threads, 1024).is_err());
}

#[test]
fn null_validation_and_zeros() {
    let reg = Registry::new();
    reg.register(Arc::new(NullBdev::new("n", 1 << 20, 4096).expect("null"))).expect("register");
    let desc = reg.open("n", true).expect("open");
    let mut ch = desc.channel().expect("channel");
    write_pat(&mut ch, 3, 5, 4096, 1, true);
    same(&read_back(&mut ch, 3, 5, 4096, true), &vec![0u8; 5 * 4096]);
    let r = run(
        &mut ch,
        vec![BdevIo::read(256, 1, IoVecs::alloc(4096), 1), BdevIo::no_data(IoKind::Unmap, 0, 0, 2)],
    );
    assert!(r.values().all(|v| *v == Err(IoError::InvalidRange)));
}

// ---------------------------------------------------------------------------------------------
// A deterministic stub module wrapping malloc.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    /// Accepted (kind, offset, blocks, module in-flight count before accepting, buffers aligned to 4096).
    Accept(IoKind, u64, u64, usize, bool),
    /// Refused with NOMEM at this in-flight count.
    NoMem(usize),
}

#[derive(Default)]
pub(crate) struct StubCtl {
    events: Vec<Ev>,
    /// Refuse with NOMEM while this many are in flight.
    pub(crate) cap: Option<usize>,
    /// Completions released per poll (0 = all).
    per_poll: usize,
    /// Fail children starting at this block.
    pub(crate) fail_at: Option<u64>,
    /// Release no completion at all while set.
    pub(crate) hold_all: bool,
    /// A buggy module: every completion is delivered again on the next poll.
    echo: bool,
    /// Address of the first buffer segment of every accepted I/O that has one.
    ptrs: Vec<usize>,
    /// What the channel's `completion_stamp` says (a stacked module's clock reading).
    stamp: Option<u64>,
}

pub(crate) struct StubBdev {
    info: BdevInfo,
    inner: MallocBdev,
    ctl: Arc<Mutex<StubCtl>>,
}

impl StubBdev {
    pub(crate) fn new(adjust: impl FnOnce(&mut BdevInfo)) -> (Arc<Self>, Arc<Mutex<StubCtl>>) {
        let inner = MallocBdev::new("stub", 8 << 20, 512).expect("malloc");
        let mut info = inner.info().clone();
        adjust(&mut info);
        let ctl = Arc::new(Mutex::new(StubCtl::default()));
        (Arc::new(Self { info, inner, ctl: ctl.clone() }), ctl)
    }
}

impl Bdev for StubBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn create_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError> {
        Ok(Box::new(StubChannel {
            inner: self.inner.create_channel()?,
            ctl: self.ctl.clone(),
            held: VecDeque::new(),
            inflight: 0,
            echoes: Vec::new(),
        }))
    }
}

struct StubChannel {
    inner: Box<dyn ModuleChannel>,
    ctl: Arc<Mutex<StubCtl>>,
    held: VecDeque<Completion>,
    inflight: usize,
    /// Completions to deliver again on the next poll (`StubCtl::echo`).
    echoes: Vec<Completion>,
}

impl ModuleChannel for StubChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        let mut ctl = self.ctl.lock().expect("ctl");
        if ctl.cap.is_some_and(|c| self.inflight >= c) {
            ctl.events.push(Ev::NoMem(self.inflight));
            return Err(Rejected::NoMem(io));
        }
        let aligned = io.bufs.is_aligned(4096);
        if let Some(v) = io.bufs.as_iovecs().first() {
            ctl.ptrs.push(v.iov_base as usize);
        }
        ctl.events.push(Ev::Accept(io.kind, io.offset_blocks, io.num_blocks, self.inflight, aligned));
        self.inflight += 1;
        if ctl.fail_at == Some(io.offset_blocks) {
            self.held.push_back(Completion { tag: io.tag, result: Err(IoError::Errno(libc::EIO)) });
            return Ok(());
        }
        drop(ctl);
        self.inner.submit(io)
    }

    fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        let mut tmp = Vec::new();
        self.inner.poll(&mut tmp);
        self.held.extend(tmp);
        let (per, hold, echo) = {
            let c = self.ctl.lock().expect("ctl");
            (c.per_poll, c.hold_all, c.echo)
        };
        let echoed = self.echoes.len();
        done.append(&mut self.echoes);
        if hold {
            return echoed;
        }
        let n = if per == 0 { self.held.len() } else { per.min(self.held.len()) };
        let start = done.len();
        done.extend(self.held.drain(..n));
        if echo {
            self.echoes.extend_from_slice(&done[start..]);
        }
        self.inflight -= n;
        n + echoed
    }

    fn completion_stamp(&self) -> Option<u64> {
        self.ctl.lock().expect("ctl").stamp
    }
}

pub(crate) fn open_stub(bdev: Arc<StubBdev>) -> (Registry, super::Descriptor, Channel) {
    let reg = Registry::new();
    reg.register(bdev).expect("register");
    let desc = reg.open("stub", true).expect("open");
    let ch = desc.channel().expect("channel");
    (reg, desc, ch)
}

pub(crate) fn accepts(ctl: &Mutex<StubCtl>) -> Vec<(IoKind, u64, u64)> {
    ctl.lock()
        .expect("ctl")
        .events
        .iter()
        .filter_map(|e| match *e {
            Ev::Accept(k, o, n, _, _) => Some((k, o, n)),
            Ev::NoMem(_) => None,
        })
        .collect()
}

#[test]
fn nomem_backpressure_keeps_order_and_threshold() {
    for (cap, threshold) in [(16usize, 8usize), (4, 2), (20, 12)] {
        let (bdev, ctl) = StubBdev::new(|_| {});
        {
            let mut c = ctl.lock().expect("ctl");
            c.cap = Some(cap);
            c.per_poll = 1;
        }
        let (_reg, _desc, mut ch) = open_stub(bdev);
        let ios: Vec<BdevIo> = (0..100u64)
            .map(|i| BdevIo::write(i, 1, IoVecs::from_slice(&pattern(i, 1, 512, 1)), 1000 + i))
            .collect();
        let r = run(&mut ch, ios);
        assert!(r.values().all(|v| v.is_ok()), "no error may reach the caller");
        let order: Vec<u64> = accepts(&ctl).iter().map(|a| a.1).collect();
        assert_eq!(order, (0..100).collect::<Vec<_>>(), "module saw I/O out of order");
        let ev = ctl.lock().expect("ctl").events.clone();
        let mut saw_nomem = false;
        for w in ev.windows(2) {
            if let [Ev::NoMem(at), Ev::Accept(_, _, _, inflight, _)] = *w {
                saw_nomem = true;
                assert_eq!(at, cap);
                assert_eq!(inflight, threshold, "retried before outstanding fell to the threshold");
            }
        }
        assert!(saw_nomem);
        same(&read_back(&mut ch, 0, 100, 512, true), &pattern(0, 100, 512, 1));
    }
}

#[test]
fn nomem_with_nothing_outstanding_retries_on_poll() {
    let (bdev, ctl) = StubBdev::new(|_| {});
    ctl.lock().expect("ctl").cap = Some(0);
    let (_reg, _desc, mut ch) = open_stub(bdev);
    ch.submit(BdevIo::write(0, 1, IoVecs::alloc(512), 7));
    let mut done = Vec::new();
    for _ in 0..3 {
        assert_eq!(ch.poll(&mut done), 0);
    }
    assert_eq!(ch.outstanding(), 1);
    ctl.lock().expect("ctl").cap = None;
    assert_eq!(drive(&mut ch), vec![Completion { tag: 7, result: Ok(()) }]);
}

/// A module that completes a child twice never completes a parent twice, and a late repeat never
/// completes the parent that took its slot since (unsplit reads and writes: a direct record;
/// split ones: the children slab).
#[test]
fn repeated_module_completions_are_ignored() {
    let (bdev, ctl) = StubBdev::new(|i| i.max_io_blocks = 8);
    ctl.lock().expect("ctl").echo = true;
    let (_reg, _desc, mut ch) = open_stub(bdev);
    // Unsplit and split parents together: every tag exactly once (`run` asserts it).
    let ios = (0..6u64)
        .map(|t| {
            let nb = if t % 2 == 0 { 1 } else { 20 };
            BdevIo::write(t * 32, nb, IoVecs::alloc(nb as usize * 512), t)
        })
        .collect();
    assert!(run(&mut ch, ios).values().all(|r| r.is_ok()));
    let mut done = Vec::new();
    ch.poll(&mut done);
    done.clear();
    for nb in [1u64, 20] {
        // A completes; its repeat arrives while B sits in the slot A had.
        ch.submit(BdevIo::read(0, nb, IoVecs::alloc(nb as usize * 512), 100));
        while ch.outstanding() > 0 {
            ch.poll(&mut done);
        }
        assert_eq!(done, vec![Completion { tag: 100, result: Ok(()) }]);
        done.clear();
        ctl.lock().expect("ctl").hold_all = true;
        ch.submit(BdevIo::read(0, nb, IoVecs::alloc(nb as usize * 512), 200));
        ch.poll(&mut done);
        assert!(done.is_empty(), "a repeated completion completed another parent: {done:?}");
        assert_eq!(ch.outstanding(), 1);
        ctl.lock().expect("ctl").hold_all = false;
        while ch.outstanding() > 0 {
            ch.poll(&mut done);
        }
        ch.poll(&mut done);
        assert_eq!(done, vec![Completion { tag: 200, result: Ok(()) }]);
        done.clear();
    }
}

/// Generations wrap: after 2^31 and 2^32 I/O on one channel, split, flush and unsplit I/O still
/// complete (a child's generation must never spill into the direct-I/O tag bit).
#[test]
fn child_tags_survive_generation_wrap() {
    let (bdev, _ctl) = StubBdev::new(|i| i.max_io_blocks = 4);
    let (_reg, _desc, mut ch) = open_stub(bdev);
    for g in [(1u64 << 31) - 2, (1 << 32) - 2, u64::MAX - 2] {
        ch.set_next_gen(g);
        let ios = vec![
            BdevIo::write(0, 12, IoVecs::alloc(12 * 512), 1),
            BdevIo::no_data(IoKind::Flush, 0, 0, 2),
            BdevIo::read(0, 2, IoVecs::alloc(2 * 512), 3),
            BdevIo::no_data(IoKind::Unmap, 0, 4, 4),
            BdevIo::read(0, 8, IoVecs::alloc(8 * 512), 5),
        ];
        let r = run(&mut ch, ios);
        assert_eq!(r.len(), 5, "generation {g:#x}: {r:?}");
        assert!(r.values().all(|v| v.is_ok()), "generation {g:#x}: {r:?}");
    }
}

/// What identifies an I/O handed back: kind, range and tag.
fn io_id(io: &BdevIo) -> (IoKind, u64, u64, u64) {
    (io.kind, io.offset_blocks, io.num_blocks, io.tag)
}

/// I/O that the plain (direct, lane) path never takes as it is, on a stub of `blocks` 512-byte blocks
/// with `max_io_blocks = 8` and `buf_align = 512`.
fn not_plain(blocks: u64) -> Vec<BdevIo> {
    let raw = IoVecs::alloc(1025);
    vec![
        BdevIo::read(0, 9, IoVecs::alloc(9 * 512), 1), // needs a split
        BdevIo::read(blocks - 1, 2, IoVecs::alloc(1024), 2), // past the end
        BdevIo::read(u64::MAX, 2, IoVecs::alloc(1024), 2), // overflowing range
        BdevIo::read(0, 2, IoVecs::alloc(512), 3),     // wrong length
        BdevIo::read(0, 0, IoVecs::alloc(0), 4),       // no blocks
        BdevIo::no_data(IoKind::Flush, 0, 0, 5),       // not a read or write
        BdevIo::read(0, 2, raw.slice(1, 1024).expect("slice"), 6), // unaligned
    ]
}

/// `submit_direct` takes only what the general path would hand the module unchanged, and gives the
/// rest back untouched; what it takes completes once, with the caller's tag, counted in the stats.
#[test]
fn direct_submission_takes_only_plain_io() {
    let (bdev, ctl) = StubBdev::new(|i| {
        i.max_io_blocks = 8;
        i.buf_align = 512;
    });
    let (reg, desc, mut ch) = open_stub(bdev);
    let given_back = |ch: &mut Channel, io: BdevIo| {
        let id = io_id(&io);
        let back = ch.submit_direct(io).expect_err("must take the general path");
        assert_eq!(io_id(&back), id);
    };
    let blocks = desc.info().num_blocks;
    for io in not_plain(blocks) {
        given_back(&mut ch, io);
    }
    reg.set_qos("stub", QosLimits { iops: 10_000, bps: 0 }).expect("qos");
    given_back(&mut ch, BdevIo::read(0, 1, IoVecs::alloc(512), 7)); // QoS limits apply
    reg.set_qos("stub", QosLimits::default()).expect("lift");
    let ro = reg.open("stub", false).expect("read-only open");
    let mut ro_ch = ro.channel().expect("channel");
    given_back(&mut ro_ch, BdevIo::write(0, 1, IoVecs::alloc(512), 8)); // write, read-only
    assert!(ro_ch.submit_direct(BdevIo::read(0, 1, IoVecs::alloc(512), 9)).is_ok());
    assert_eq!(drive(&mut ro_ch), vec![Completion { tag: 9, result: Ok(()) }]);
    assert_eq!(accepts(&ctl).len(), 1, "only the read reached the module");

    // Taken up to the last block.
    assert!(ch.submit_direct(BdevIo::read(blocks - 1, 1, IoVecs::alloc(512), 15)).is_ok());
    assert_eq!(drive(&mut ch), vec![Completion { tag: 15, result: Ok(()) }]);

    // Taken: completes with the caller's tag, data written and read back, counted like submit.
    let before = desc.stats();
    let data = pattern(3, 8, 512, 9);
    assert!(ch.submit_direct(BdevIo::write(3, 8, IoVecs::from_slice(&data), 10)).is_ok());
    assert_eq!(drive(&mut ch), vec![Completion { tag: 10, result: Ok(()) }]);
    let back = IoVecs::alloc(8 * 512);
    let view = back.slice(0, 8 * 512).expect("view");
    assert!(ch.submit_direct(BdevIo::read(3, 8, back, 11)).is_ok());
    assert_eq!(drive(&mut ch), vec![Completion { tag: 11, result: Ok(()) }]);
    same(&view.to_vec(), &data);
    let after = desc.stats();
    assert_eq!((after.write_ops - before.write_ops, after.write_bytes - before.write_bytes), (1, 4096));
    assert_eq!((after.read_ops - before.read_ops, after.read_bytes - before.read_bytes), (1, 4096));

    // A module error fails it with that error, counted as an error.
    ctl.lock().expect("ctl").fail_at = Some(20);
    assert!(ch.submit_direct(BdevIo::read(20, 1, IoVecs::alloc(512), 12)).is_ok());
    assert_eq!(drive(&mut ch), vec![Completion { tag: 12, result: Err(IoError::Errno(libc::EIO)) }]);
    assert_eq!(desc.stats().errors, before.errors + 1);
    ctl.lock().expect("ctl").fail_at = None;

    // While the general path holds queued work, direct I/O would overtake it: given back.
    ctl.lock().expect("ctl").cap = Some(0);
    ch.submit(BdevIo::write(0, 1, IoVecs::alloc(512), 13));
    given_back(&mut ch, BdevIo::read(0, 1, IoVecs::alloc(512), 14));
    ctl.lock().expect("ctl").cap = None;
    assert_eq!(drive(&mut ch), vec![Completion { tag: 13, result: Ok(()) }]);
}

/// A direct I/O refused with NOMEM is queued by the general path and keeps its place; a module
/// that completes it twice completes it once; generations wrap.
#[test]
fn direct_submission_nomem_repeats_and_wrap() {
    let (bdev, ctl) = StubBdev::new(|_| {});
    ctl.lock().expect("ctl").cap = Some(2);
    let (_reg, _desc, mut ch) = open_stub(bdev);
    // 0 and 1 reach the module, 2 is refused and queued, 3 must queue behind it: given back.
    for t in 0..4u64 {
        if let Err(io) = ch.submit_direct(BdevIo::write(t, 1, IoVecs::alloc(512), t)) {
            assert_eq!(t, 3, "only what would overtake queued work is given back");
            ch.submit(io);
        }
    }
    ch.submit(BdevIo::write(4, 1, IoVecs::alloc(512), 4));
    let mut got: Vec<u64> = drive(&mut ch).iter().map(|c| c.tag).collect();
    got.sort_unstable();
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    let order: Vec<u64> = accepts(&ctl).iter().map(|a| a.1).collect();
    assert_eq!(order, vec![0, 1, 2, 3, 4], "the module saw I/O out of order");

    let mut ctl_g = ctl.lock().expect("ctl");
    ctl_g.cap = None;
    ctl_g.echo = true;
    drop(ctl_g);
    for g in [(1u64 << 30) - 1, (1 << 31) - 1, u64::MAX - 1] {
        ch.set_next_gen(g);
        assert!(ch.submit_direct(BdevIo::read(0, 1, IoVecs::alloc(512), 100)).is_ok());
        assert_eq!(drive(&mut ch), vec![Completion { tag: 100, result: Ok(()) }], "generation {g:#x}");
        // Its echo arrives while another direct I/O sits in the same slot.
        ctl.lock().expect("ctl").hold_all = true;
        assert!(ch.submit_direct(BdevIo::read(0, 1, IoVecs::alloc(512), 200)).is_ok());
        let mut done = Vec::new();
        ch.poll(&mut done);
        assert!(done.is_empty(), "a repeated completion completed another I/O: {done:?}");
        ctl.lock().expect("ctl").hold_all = false;
        let mut done = drive(&mut ch);
        ch.poll(&mut done);
        assert_eq!(done, vec![Completion { tag: 200, result: Ok(()) }]);
    }
}

#[test]
fn split_on_boundary_and_max_io() {
    let (bdev, ctl) = StubBdev::new(|i| {
        i.optimal_io_boundary_blocks = 8;
        i.split_on_optimal_io_boundary = true;
    });
    let (_reg, _desc, mut ch) = open_stub(bdev);
    let data = pattern(5, 20, 512, 4);
    let w = scattered(data.len());
    w.copy_from_slice(0, &data);
    assert_eq!(run1(&mut ch, BdevIo::write(5, 20, w, 0)), Ok(()));
    assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::Unmap, 5, 20, 0)), Ok(()));
    assert_eq!(run1(&mut ch, BdevIo::write(16, 8, IoVecs::from_slice(&pattern(16, 8, 512, 4)), 0)), Ok(()));
    use IoKind::*;
    assert_eq!(
        accepts(&ctl),
        vec![(Write, 5, 3), (Write, 8, 8), (Write, 16, 8), (Write, 24, 1), (Unmap, 5, 20), (Write, 16, 8)]
    );

    let (bdev, ctl) = StubBdev::new(|i| i.max_io_blocks = 4);
    let (_reg, _desc, mut ch) = open_stub(bdev);
    write_pat(&mut ch, 0, 10, 512, 6, true);
    ctl.lock().expect("ctl").events.clear();
    same(&read_back(&mut ch, 0, 10, 512, true), &pattern(0, 10, 512, 6));
    assert_eq!(accepts(&ctl), vec![(Read, 0, 4), (Read, 4, 4), (Read, 8, 2)]);
}

/// A split parent completes with its last child, not its first: children completing one per poll
/// leave the parent in flight until the third.
#[test]
fn a_split_parent_completes_with_its_last_child() {
    let (bdev, ctl) = StubBdev::new(|i| i.max_io_blocks = 4);
    ctl.lock().expect("ctl").per_poll = 1;
    let (_reg, _desc, mut ch) = open_stub(bdev);
    ch.submit(BdevIo::read(0, 12, IoVecs::alloc(12 * 512), 7));
    assert_eq!(accepts(&ctl).len(), 3);
    let mut done = Vec::new();
    for child in 1..=2 {
        ch.poll(&mut done);
        assert!(done.is_empty(), "the parent completed after {child} of 3 children");
    }
    ch.poll(&mut done);
    assert_eq!(done, vec![Completion { tag: 7, result: Ok(()) }]);
}

#[test]
fn child_failure_fails_parent_once() {
    let (bdev, ctl) = StubBdev::new(|i| i.max_io_blocks = 4);
    ctl.lock().expect("ctl").fail_at = Some(4);
    let (_reg, desc, mut ch) = open_stub(bdev);
    let r = run(&mut ch, vec![BdevIo::write(0, 12, IoVecs::alloc(12 * 512), 42)]);
    assert_eq!(r[&42], Err(IoError::Errno(libc::EIO)));
    assert_eq!(accepts(&ctl).len(), 3);
    assert_eq!(desc.stats().errors, 1);
    assert_eq!(ch.stats().errors, 1);
}

#[test]
fn write_zeroes_emulation_is_sequential() {
    let (bdev, ctl) = StubBdev::new(|i| i.supports.write_zeroes = false);
    let (_reg, desc, mut ch) = open_stub(bdev);
    write_pat(&mut ch, 90, 5020, 512, 8, false);
    ctl.lock().expect("ctl").events.clear();
    assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::WriteZeroes, 100, 5000, 0)), Ok(()));
    let ev = ctl.lock().expect("ctl").events.clone();
    let expect = [(100u64, 2048u64), (2148, 2048), (4196, 904)];
    assert_eq!(ev.len(), expect.len());
    for (e, (o, n)) in ev.iter().zip(expect) {
        assert_eq!(*e, Ev::Accept(IoKind::Write, o, n, 0, true), "one zero write at a time");
    }
    same(&read_back(&mut ch, 100, 5000, 512, false), &vec![0u8; 5000 * 512]);
    same(&read_back(&mut ch, 90, 10, 512, false), &pattern(90, 10, 512, 8));
    same(&read_back(&mut ch, 5100, 10, 512, false), &pattern(5100, 10, 512, 8));
    assert_eq!(desc.stats().write_zeroes_ops, 1);
    assert_eq!(desc.stats().write_zeroes_bytes, 5000 * 512);
}

#[test]
fn unaligned_buffers_are_bounced() {
    let (bdev, ctl) = StubBdev::new(|i| i.buf_align = 4096);
    let (_reg, _desc, mut ch) = open_stub(bdev);
    write_pat(&mut ch, 8, 24, 512, 2, true);
    same(&read_back(&mut ch, 8, 24, 512, true), &pattern(8, 24, 512, 2));
    write_pat(&mut ch, 40, 8, 512, 3, false);
    let ev = ctl.lock().expect("ctl").events.clone();
    assert_eq!(ev.len(), 3);
    assert!(ev.iter().all(|e| matches!(e, Ev::Accept(_, _, _, _, true))), "{ev:?}");
}

#[test]
fn hot_remove_notifies_open_descriptors() {
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("hr", 1 << 20, 512).expect("malloc"))).expect("register");
    let fired = Arc::new(Mutex::new(Vec::<String>::new()));
    let f2 = fired.clone();
    let d1 = reg
        .open_with_remove("hr", true, move |n| f2.lock().expect("lock").push(n.to_string()))
        .expect("open");
    let f3 = fired.clone();
    let d2 = reg
        .open_with_remove("hr", false, move |n| f3.lock().expect("lock").push(format!("closed-{n}")))
        .expect("second open");
    // A closed descriptor's callback is dropped with it: only d1 hears about the removal.
    drop(d2);
    let mut ch = d1.channel().expect("channel");
    reg.unregister("hr").expect("unregister");
    assert_eq!(*fired.lock().expect("lock"), vec!["hr".to_string()]);
    // The bdev stays usable until its users are gone.
    write_pat(&mut ch, 0, 1, 512, 0, false);
    assert!(reg.open("hr", false).is_err());
}

#[test]
fn channel_is_send() {
    fn send<T: Send>() {}
    send::<Channel>();
    send::<super::Descriptor>();
}

#[test]
fn file_wait_fd_wakes_and_drop_waits_for_inflight() {
    let d = tmp();
    for engine in [Engine::IoUring, Engine::Threads] {
        let reg = Registry::new();
        let f = FileBdev::open("w", d.path().join(format!("{engine:?}")), Some(4 << 20), false, engine)
            .expect("file");
        assert_eq!(f.engine(), engine, "engine label");
        reg.register(Arc::new(f)).expect("register");
        let desc = reg.open("w", true).expect("open");
        let mut ch = desc.channel().expect("channel");
        let fd = ch.wait_fd().expect("file channels have a wait fd");
        ch.submit(BdevIo::write(0, 8, IoVecs::from_slice(&pattern(0, 8, 512, 1)), 1));
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd on the stack.
        let n = unsafe { libc::poll(&mut p, 1, 10_000) };
        assert_eq!(n, 1, "{engine:?}: wait_fd never became readable");
        assert_eq!(drive(&mut ch), vec![Completion { tag: 1, result: Ok(()) }]);
        // Dropping a channel with I/O in flight must wait for the kernel/workers (no use after free).
        for i in 0..200u64 {
            ch.submit(BdevIo::read(i, 1, IoVecs::alloc(512), i));
        }
        drop(ch);
        let mut ch = desc.channel().expect("channel");
        same(&read_back(&mut ch, 0, 8, 512, true), &pattern(0, 8, 512, 1));
    }
}

/// A loop device over a temp file, detached on drop.
struct LoopDev(String);

impl LoopDev {
    fn attach(img: &std::path::Path) -> Option<Self> {
        let out = std::process::Command::new("losetup").arg("--find").arg("--show").arg(img).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let dev = String::from_utf8(out.stdout).ok()?.trim().to_string();
        dev.starts_with("/dev/").then_some(Self(dev))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn conformance_file_block_device() {
    let d = tmp();
    let img = d.path().join("loop.img");
    std::fs::File::create(&img).and_then(|f| f.set_len(8 << 20)).expect("image");
    // No silent skip: the test command runs as root (CI does), which a loop device needs.
    let Some(dev) = LoopDev::attach(&img) else {
        panic!("cannot attach a loop device with losetup: this test needs root and util-linux");
    };
    for (engine, direct) in [(Engine::IoUring, false), (Engine::Threads, true), (Engine::IoUring, true)] {
        let f = FileBdev::open("blk", &dev.0, None, direct, engine).expect("open block device");
        assert_eq!(f.engine(), engine, "engine label");
        assert_eq!(f.info().num_blocks, (8 << 20) / 512);
        assert!(FileBdev::open("big", &dev.0, Some(16 << 20), false, engine).is_err());
        conformance(Arc::new(f));
    }
}

/// `n` single-block segments of 512 bytes, every other one taken from a second buffer.
pub(crate) fn many_segments(n: usize) -> IoVecs {
    let buf = Arc::new(AlignedBuf::zeroed(n * 1024));
    let iovs: Vec<_> = (0..n)
        .map(|i| libc::iovec { iov_base: buf.as_ptr().wrapping_add(i * 1024).cast(), iov_len: 512 })
        .collect();
    let keep: Arc<dyn std::any::Any + Send + Sync> = buf;
    // SAFETY: all segments lie inside `buf`, kept alive by `keep`.
    unsafe { IoVecs::from_raw_parts(iovs, Some(keep)) }
}

#[test]
fn file_more_than_iov_max_segments() {
    let d = tmp();
    for (engine, direct) in [(Engine::IoUring, false), (Engine::Threads, false), (Engine::IoUring, true)] {
        let reg = Registry::new();
        let path = d.path().join(format!("{engine:?}-{direct}"));
        let f = FileBdev::open("seg", path, Some(4 << 20), direct, engine).expect("file");
        assert_eq!(f.engine(), engine, "engine label");
        reg.register(Arc::new(f)).expect("register");
        let desc = reg.open("seg", true).expect("open");
        let mut ch = desc.channel().expect("channel");
        let data = pattern(10, 1500, 512, 7);
        let w = many_segments(1500);
        w.copy_from_slice(0, &data);
        assert_eq!(run1(&mut ch, BdevIo::write(10, 1500, w, 0)), Ok(()));
        let r = many_segments(1500);
        let view = r.slice(0, 1500 * 512).expect("view");
        assert_eq!(run1(&mut ch, BdevIo::read(10, 1500, r, 0)), Ok(()));
        same(&view.to_vec(), &data);
        same(&read_back(&mut ch, 10, 1500, 512, false), &data);
    }
}

/// A batch-clocked owner's requests count their latency from the batch time it set (one clock read
/// per batch), and never from anything earlier.
#[test]
fn latency_counts_from_the_batch_time() {
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("lat", 1 << 20, 512).expect("malloc"))).expect("register");
    let desc = reg.open("lat", true).expect("open");
    let mut ch = desc.channel().expect("channel");
    // A first request (its latency is tiny), then time passes before the measured batch.
    assert_eq!(run1(&mut ch, BdevIo::read(0, 1, IoVecs::alloc(512), 0)), Ok(()));
    std::thread::sleep(std::time::Duration::from_millis(30));
    let t0 = std::time::Instant::now();
    ch.set_batch_time(t0);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(run1(&mut ch, BdevIo::read(1, 1, IoVecs::alloc(512), 0)), Ok(()));
    let bound = u64::try_from(t0.elapsed().as_nanos()).expect("elapsed");
    let max = desc.stats().read_latency_ns_max;
    assert!(max >= 50_000_000, "latency {max} ns: the batch time was not the start");
    assert!(max <= bound, "latency {max} ns is longer than the {bound} ns since the batch time");
}

/// Reads, writes and write_zeroes of zero blocks complete successfully without reaching the module.
#[test]
fn zero_block_reads_and_writes_never_reach_the_module() {
    let (bdev, ctl) = StubBdev::new(|i| assert!(i.supports.write_zeroes, "native write_zeroes"));
    let (_reg, _desc, mut ch) = open_stub(bdev);
    let ios = vec![
        BdevIo::read(3, 0, IoVecs::alloc(0), 1),
        BdevIo::write(5, 0, IoVecs::alloc(0), 2),
        BdevIo::no_data(IoKind::WriteZeroes, 7, 0, 3),
    ];
    assert!(run(&mut ch, ios).values().all(|r| r.is_ok()));
    assert!(accepts(&ctl).is_empty(), "the module saw a zero-length I/O: {:?}", accepts(&ctl));
}

/// Native write_zeroes reaches the module as write_zeroes, split at `max_write_zeroes_blocks`, and
/// zeroes exactly its range.
#[test]
fn native_write_zeroes_splits_at_the_module_maximum() {
    let (bdev, ctl) = StubBdev::new(|i| i.max_write_zeroes_blocks = 8);
    let (_reg, _desc, mut ch) = open_stub(bdev);
    let data = pattern(96, 40, 512, 7);
    assert_eq!(run1(&mut ch, BdevIo::write(96, 40, IoVecs::from_slice(&data), 0)), Ok(()));
    assert_eq!(run1(&mut ch, BdevIo::no_data(IoKind::WriteZeroes, 100, 20, 0)), Ok(()));
    let wz: Vec<_> = accepts(&ctl).into_iter().filter(|a| a.0 == IoKind::WriteZeroes).collect();
    assert_eq!(
        wz,
        vec![(IoKind::WriteZeroes, 100, 8), (IoKind::WriteZeroes, 108, 8), (IoKind::WriteZeroes, 116, 4)]
    );
    let back = IoVecs::alloc(40 * 512);
    assert_eq!(run1(&mut ch, BdevIo::read(96, 40, back.slice(0, 40 * 512).expect("view"), 0)), Ok(()));
    let mut want = data;
    want[4 * 512..24 * 512].fill(0);
    assert_eq!(back.to_vec(), want);
}

/// With `buf_align` (segment starts and lengths), an aligned buffer goes to the module as it is (no bounce copy); an unaligned
/// one is bounced through an aligned copy, and the data still arrive.
#[test]
fn only_unaligned_buffers_are_bounced() {
    let (bdev, ctl) = StubBdev::new(|i| {
        i.buf_align = 2048;
        i.max_io_blocks = 4;
    });
    let (_reg, _desc, mut ch) = open_stub(bdev);
    // Unsplit, then split in two (the general path): the module sees the caller's memory.
    let aligned = IoVecs::alloc(2048);
    let base = aligned.as_iovecs()[0].iov_base as usize;
    assert_eq!(base % 4096, 0);
    assert_eq!(run1(&mut ch, BdevIo::write(0, 4, aligned, 0)), Ok(()));
    let aligned = IoVecs::alloc(4096);
    let base2 = aligned.as_iovecs()[0].iov_base as usize;
    assert_eq!(run1(&mut ch, BdevIo::write(0, 8, aligned, 0)), Ok(()));
    assert_eq!(
        ctl.lock().expect("ctl").ptrs,
        vec![base, base2, base2 + 2048],
        "an aligned buffer must not be bounced"
    );
    let big = IoVecs::from_slice(&pattern(0, 5, 512, 3));
    let odd = big.slice(512, 2048).expect("view");
    let odd_ptr = odd.as_iovecs()[0].iov_base as usize;
    assert_eq!(run1(&mut ch, BdevIo::write(8, 4, odd, 0)), Ok(()));
    let seen = ctl.lock().expect("ctl").ptrs[3];
    assert!(seen != odd_ptr && seen % 2048 == 0, "an unaligned buffer must be bounced");
    let back = IoVecs::alloc(2048);
    assert_eq!(run1(&mut ch, BdevIo::read(8, 4, back.slice(0, 2048).expect("view"), 0)), Ok(()));
    assert_eq!(back.to_vec(), pattern(0, 5, 512, 3)[512..].to_vec());
}

/// Submits `io` to `lane`, which must give it back untouched.
#[track_caller]
fn given_back(lane: &mut super::Lane, io: BdevIo) {
    let id = io_id(&io);
    let back = lane.submit(io).expect_err("must be given back");
    assert_eq!(io_id(&back), id);
}

/// Polls `lane` until nothing is in flight.
fn drive_lane(lane: &mut super::Lane) -> Vec<Completion> {
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while lane.outstanding() > 0 {
        if lane.poll(&mut done) == 0 {
            assert!(std::time::Instant::now() < deadline, "I/O never completed");
            std::thread::yield_now();
        }
    }
    done
}

/// A lane takes only what a channel would hand the module unchanged (in range, right length,
/// unsplit, aligned, no QoS, no reset, writable for a write), gives the rest (and what the module
/// refuses) back untouched, completes what it took with the caller's tag, and counts each I/O the
/// caller accounts for in the bdev's statistics, latency included.
#[test]
fn a_lane_takes_only_plain_io_and_counts_it() {
    let (bdev, ctl) = StubBdev::new(|i| {
        i.max_io_blocks = 8;
        i.buf_align = 512;
        i.supports.reset = true;
    });
    let (reg, desc, mut ch) = open_stub(bdev);
    let mut lane = desc.lane().expect("lane");
    let blocks = desc.info().num_blocks;
    for io in not_plain(blocks) {
        given_back(&mut lane, io);
    }
    reg.set_qos("stub", QosLimits { iops: 10_000, bps: 0 }).expect("qos");
    given_back(&mut lane, BdevIo::read(0, 1, IoVecs::alloc(512), 7)); // QoS limits apply
    reg.set_qos("stub", QosLimits::default()).expect("lift");
    let ro = reg.open("stub", false).expect("read-only open");
    let mut ro_lane = ro.lane().expect("lane");
    given_back(&mut ro_lane, BdevIo::write(0, 1, IoVecs::alloc(512), 8)); // write, read-only
    assert!(accepts(&ctl).is_empty(), "nothing given back reached the module");
    assert_eq!(lane.outstanding(), 0);

    // Taken up to the last block; completes with the caller's tag.
    assert!(lane.submit(BdevIo::read(blocks - 1, 1, IoVecs::alloc(512), 15)).is_ok());
    assert_eq!(lane.outstanding(), 1);
    assert_eq!(drive_lane(&mut lane), vec![Completion { tag: 15, result: Ok(()) }]);

    // Data written and read back; counted once each (by `account`), with a latency.
    let before = desc.stats();
    let data = pattern(3, 8, 512, 9);
    let start = lane.stamp();
    lane.submit(BdevIo::write(3, 8, IoVecs::from_slice(&data), 10)).expect("taken");
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(drive_lane(&mut lane), vec![Completion { tag: 10, result: Ok(()) }]);
    lane.account(IoKind::Write, 4096, start, true);
    let back = IoVecs::alloc(8 * 512);
    let view = back.slice(0, 8 * 512).expect("view");
    let start = lane.stamp();
    lane.submit(BdevIo::read(3, 8, back, 11)).expect("taken");
    assert_eq!(drive_lane(&mut lane), vec![Completion { tag: 11, result: Ok(()) }]);
    lane.account(IoKind::Read, 4096, start, true);
    same(&view.to_vec(), &data);
    let after = desc.stats();
    assert_eq!((after.write_ops - before.write_ops, after.write_bytes - before.write_bytes), (1, 4096));
    assert_eq!((after.read_ops - before.read_ops, after.read_bytes - before.read_bytes), (1, 4096));
    let lat = after.write_latency_ns_sum - before.write_latency_ns_sum;
    assert!(lat >= 50_000_000, "the write's latency covers its 50 ms in flight: {lat} ns");
    let read_lat = after.read_latency_ns_sum - before.read_latency_ns_sum;
    assert!(read_lat < lat, "the read, done at once, counts from its own submission: {read_lat} ns");

    // A module error comes back with that error; accounted as an error.
    ctl.lock().expect("ctl").fail_at = Some(20);
    let start = lane.stamp();
    lane.submit(BdevIo::read(20, 1, IoVecs::alloc(512), 12)).expect("taken");
    assert_eq!(drive_lane(&mut lane), vec![Completion { tag: 12, result: Err(IoError::Errno(libc::EIO)) }]);
    lane.account(IoKind::Read, 512, start, false);
    assert_eq!(desc.stats().errors, before.errors + 1);
    ctl.lock().expect("ctl").fail_at = None;

    // Refused by the module (NOMEM): given back, not counted as in flight.
    ctl.lock().expect("ctl").cap = Some(0);
    given_back(&mut lane, BdevIo::read(0, 1, IoVecs::alloc(512), 14));
    assert_eq!(lane.outstanding(), 0);
    ctl.lock().expect("ctl").cap = None;

    // While a reset is in progress: given back.
    ctl.lock().expect("ctl").hold_all = true;
    ch.submit(BdevIo::no_data(IoKind::Reset, 0, 0, 1));
    given_back(&mut lane, BdevIo::read(0, 1, IoVecs::alloc(512), 16));
    ctl.lock().expect("ctl").hold_all = false;
    assert_eq!(drive(&mut ch), vec![Completion { tag: 1, result: Ok(()) }]);
    assert!(lane.submit(BdevIo::read(0, 1, IoVecs::alloc(512), 17)).is_ok(), "taken again after the reset");
    assert_eq!(drive_lane(&mut lane), vec![Completion { tag: 17, result: Ok(()) }]);

    // What a dropped lane counted stays in the bdev's statistics; its shard is folded in.
    let counted = desc.stats();
    let stats = reg.bdev_stats("stub").expect("stats");
    let shards = stats.live_shards();
    drop(lane);
    assert_eq!(desc.stats().read_ops, counted.read_ops);
    assert_eq!(stats.live_shards(), shards - 1, "the lane's shard is retired");
    drop(ch);
    assert_eq!(stats.live_shards(), shards - 2, "and a channel's");
}

/// A lane on a bdev that takes any read as it comes (no buffer alignment, split or size limit)
/// checks a read by a shorter test (`Lane::takes`): it must give back exactly what the general
/// test does (out of range, overflowing, no blocks, a buffer of the wrong length, a QoS limit, a
/// reset in progress) and take the rest, e.g. a long read into an unaligned buffer. A bdev with any
/// one of the limits keeps the general test for its reads: the long or unaligned read goes back.
#[test]
fn a_lane_on_a_plain_bdev_gives_back_exactly_what_the_general_test_would() {
    let (bdev, ctl) = StubBdev::new(|i| i.supports.reset = true);
    let (reg, desc, mut ch) = open_stub(bdev);
    let mut lane = desc.lane().expect("lane");
    let blocks = desc.info().num_blocks;
    given_back(&mut lane, BdevIo::read(blocks - 1, 2, IoVecs::alloc(1024), 1)); // past the end
    given_back(&mut lane, BdevIo::read(blocks, 1, IoVecs::alloc(512), 2)); // just past it
    given_back(&mut lane, BdevIo::read(u64::MAX, 2, IoVecs::alloc(1024), 3)); // overflowing range
    given_back(&mut lane, BdevIo::read(0, 0, IoVecs::alloc(0), 4)); // no blocks
    given_back(&mut lane, BdevIo::read(0, 2, IoVecs::alloc(512), 5)); // buffer too short
    given_back(&mut lane, BdevIo::read(0, 1, IoVecs::alloc(1024), 6)); // buffer too long
    given_back(&mut lane, BdevIo::read(0, 1 << 55, IoVecs::alloc(0), 7)); // length overflows
    reg.set_qos("stub", QosLimits { iops: 10_000, bps: 0 }).expect("qos");
    given_back(&mut lane, BdevIo::read(0, 1, IoVecs::alloc(512), 8)); // QoS limits apply
    reg.set_qos("stub", QosLimits::default()).expect("lift");
    assert!(accepts(&ctl).is_empty(), "nothing given back reached the module");
    ctl.lock().expect("ctl").hold_all = true;
    ch.submit(BdevIo::no_data(IoKind::Reset, 0, 0, 9));
    given_back(&mut lane, BdevIo::read(0, 1, IoVecs::alloc(512), 10)); // a reset in progress
    ctl.lock().expect("ctl").hold_all = false;
    assert_eq!(drive(&mut ch), vec![Completion { tag: 9, result: Ok(()) }]);
    assert_eq!(accepts(&ctl), vec![(IoKind::Reset, 0, 0)], "only the reset reached the module");
    ctl.lock().expect("ctl").events.clear();

    // Taken: the last block, and 16 blocks into an unaligned buffer (no limit forbids either).
    let raw = IoVecs::alloc(16 * 512 + 1);
    let odd = raw.slice(1, 16 * 512).expect("slice");
    lane.submit(BdevIo::read(blocks - 1, 1, IoVecs::alloc(512), 11)).expect("the last block is taken");
    lane.submit(BdevIo::read(0, 16, odd, 12)).expect("a long, unaligned read is taken");
    let mut done = drive_lane(&mut lane);
    done.sort_by_key(|c| c.tag);
    let ok = |tag| Completion { tag, result: Ok(()) };
    assert_eq!(done, vec![ok(11), ok(12)]);
    assert_eq!(accepts(&ctl), vec![(IoKind::Read, blocks - 1, 1), (IoKind::Read, 0, 16)]);

    // Any one limit: the general test, which gives the long or the unaligned read back.
    type Limit = (&'static str, fn(&mut BdevInfo));
    let limits: [Limit; 3] = [
        ("buf_align", |i| i.buf_align = 512),
        ("max_io_blocks", |i| i.max_io_blocks = 8),
        ("split on the optimal boundary", |i| {
            i.optimal_io_boundary_blocks = 8;
            i.split_on_optimal_io_boundary = true;
        }),
    ];
    for (what, limit) in limits {
        let (bdev, ctl) = StubBdev::new(limit);
        let (_reg, desc, _ch) = open_stub(bdev);
        let mut lane = desc.lane().expect("lane");
        let raw = IoVecs::alloc(16 * 512 + 1);
        let io = BdevIo::read(0, 16, raw.slice(1, 16 * 512).expect("slice"), 13);
        assert!(lane.submit(io).is_err(), "{what}: a read it limits must be given back");
        assert!(accepts(&ctl).is_empty(), "{what}");
    }
    // A write is not a read: the general test (refused on a read-only descriptor; else taken).
    let (bdev, ctl) = StubBdev::new(|_| {});
    let (reg, desc, _ch) = open_stub(bdev);
    let mut ro_lane = reg.open("stub", false).expect("read-only open").lane().expect("lane");
    assert!(ro_lane.submit(BdevIo::write(2, 1, IoVecs::alloc(512), 15)).is_err(), "read-only");
    let mut lane = desc.lane().expect("lane");
    lane.submit(BdevIo::write(2, 1, IoVecs::alloc(512), 14)).expect("a plain write is taken");
    assert_eq!(drive_lane(&mut lane), vec![ok(14)]);
    assert_eq!(accepts(&ctl), vec![(IoKind::Write, 2, 1)]);
}

/// A channel takes the completion time of a poll's completions from its module when the module read
/// the clock for them (`completion_stamp`, a stacked module's lane), instead of reading it again:
/// the latency it counts ends there. Without one, it reads the clock.
#[test]
fn a_channel_ends_the_latency_at_the_modules_clock_reading() {
    let (bdev, ctl) = StubBdev::new(|_| {});
    let (_reg, desc, mut ch) = open_stub(bdev);
    let read = |ch: &mut Channel| {
        let t = std::time::Instant::now();
        assert_eq!(run1(ch, BdevIo::read(0, 1, IoVecs::alloc(512), 0)), Ok(()));
        t.elapsed().as_nanos() as u64
    };
    let before = desc.stats();
    // The module says its completions were seen an hour from now: the latency ends there.
    let hour = 3_600_000_000_000u64;
    ctl.lock().expect("ctl").stamp = Some(super::channel::nanos(std::time::Instant::now()) + hour);
    read(&mut ch);
    let lat = desc.stats().read_latency_ns_sum - before.read_latency_ns_sum;
    let within = hour - 60_000_000_000..=hour; // submitted (started) a little after the stamp was set
    assert!(within.contains(&lat), "the module's reading ends the latency: {lat} ns");
    // No reading from the module: the channel's own clock.
    ctl.lock().expect("ctl").stamp = None;
    let mid = desc.stats();
    let took = read(&mut ch);
    let lat = desc.stats().read_latency_ns_sum - mid.read_latency_ns_sum;
    assert!(lat <= took, "the read took {took} ns, counted {lat} ns");
}
