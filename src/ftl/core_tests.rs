//! Core-thread tests that drive a [`Worker`] by hand on an FTL whose own core thread is stopped:
//! which positions and commands a batch gets (merging mini-units, holes, the tail), when a stop is
//! drained, when the nv-cache ring makes the core flush, and when an idle core pads. No timing: the
//! test decides when the worker runs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::ftl::nvcache;
use crate::ftl::tests::{geometry, make_media};
use crate::ftl::wbuf::Origin;
use crate::ftl::{FtlBdev, FtlConfig};
use crate::ocssd::{
    Buffers, Completion, EmuDevice, EmuGeometry, Fault, LbaBitmap, ReadErrorKind, Rejected, Status,
};

/// An FTL on a fresh emulated device with its core thread stopped, a worker of the test's own and a
/// queue pair for it. `retired` is set on every data band first (as a restore loads it).
fn setup(
    g: EmuGeometry,
    name: &str,
    retired: u64,
) -> (tempfile::TempDir, FtlBdev, Worker, Box<dyn QueuePair>) {
    let (dir, bdev, w, qp, _) = setup_emu(g, FtlConfig::new(name), retired);
    (dir, bdev, w, qp)
}

/// [`setup`], and the emulated device (to inject faults).
fn setup_emu(
    g: EmuGeometry,
    cfg: FtlConfig,
    retired: u64,
) -> (tempfile::TempDir, FtlBdev, Worker, Box<dyn QueuePair>, EmuDevice) {
    let dir = tempfile::tempdir().expect("tmp");
    let emu = make_media(dir.path(), g, vec![]);
    let media: Arc<dyn MediaDevice> = Arc::new(emu.clone());
    let bdev = FtlBdev::open(cfg, media).expect("open");
    bdev.crash(); // the test's worker is the only one
    let sh = Arc::clone(bdev.shared());
    {
        let mut c = lock(&sh.core);
        let first = sh.geo.first_data_band() as usize;
        for b in c.bands.iter_mut().skip(first) {
            b.retired = retired;
        }
    }
    let qp = sh.media.queue_pair(64).expect("qp");
    let w = Worker { sh, pad_next: false, tail_cache: None, nv_ch: None, idle: IDLE_PERIOD };
    (dir, bdev, w, qp, emu)
}

/// Buffers `n` user blocks for LBAs `lba..` as a writer does (published); returns the first entry.
fn push(sh: &Shared, lba: u64, n: u64) -> u64 {
    let mut c = lock(&sh.core);
    let first = c.wbuf.tail;
    for i in 0..n {
        let e = c.wbuf.push(lba + i, Origin::User, |d| d.fill(i as u8 + 1));
        let old = sh.l2p.swap(lba + i, Loc::Cache(e));
        sh.invalidate(&mut c, old);
    }
    first
}

/// (chunk, first position, blocks) of every command of a batch.
fn shape(runs: &[Run]) -> Vec<(usize, u64, usize)> {
    runs.iter().map(|r| (r.chunk, r.first_pos, r.items.len())).collect()
}

/// The blocks of a command: H (head), E<n> (entry `first + n`), T<i> (tail block i), P (padding).
fn items(r: &Run, first: u64) -> Vec<String> {
    r.items
        .iter()
        .map(|it| match *it {
            Src::Head => "H".to_string(),
            Src::Entry(e) => format!("E{}", e - first),
            Src::Tail(i) => format!("T{i}"),
            Src::Pad => "P".to_string(),
        })
        .collect()
}

fn strs(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// Opens a band and builds one batch from what is buffered.
fn first_batch(w: &mut Worker, qp: &mut dyn QueuePair) -> Vec<Run> {
    w.open_band(qp).expect("open band");
    let sh = Arc::clone(&w.sh);
    let mut c = lock(&sh.core);
    w.build_batch(&mut c, false)
}

/// One command per chunk per batch, each the consecutive mini-units (`ws_min` = 4) of its chunk up
/// to `ws_opt` (8) blocks: with four good chunks, a batch is one 8-block command on each.
#[test]
fn a_batch_merges_the_mini_units_of_a_chunk_into_one_command_per_chunk() {
    let (_d, _bdev, mut w, mut qp) = setup(geometry(20, 32), "merge", 0);
    push(&w.sh, 0, 40);
    let runs = first_batch(&mut w, qp.as_mut());
    assert_eq!(shape(&runs), vec![(0, 0, 8), (1, 8, 8), (2, 16, 8), (3, 24, 8)]);
}

/// With one good chunk every position of the band is in that chunk: a command still stops at
/// `ws_opt` blocks and the batch at one command.
#[test]
fn a_command_stops_at_ws_opt_blocks_in_a_band_of_one_chunk() {
    let (_d, _bdev, mut w, mut qp) = setup(geometry(20, 32), "one-chunk", 0b1110);
    push(&w.sh, 0, 40);
    let runs = first_batch(&mut w, qp.as_mut());
    assert_eq!(shape(&runs), vec![(0, 0, 8)]);
}

/// A batch ends when the stripe comes back to a chunk it already has a command on, whichever chunk
/// that is (here chunk 0 is not in the band).
#[test]
fn a_batch_ends_at_the_first_chunk_it_revisits() {
    let (_d, _bdev, mut w, mut qp) = setup(geometry(20, 32), "revisit", 0b0001);
    push(&w.sh, 0, 40);
    let runs = first_batch(&mut w, qp.as_mut());
    assert_eq!(shape(&runs), vec![(1, 0, 8), (2, 8, 8), (3, 16, 8)]);
}

/// Entries overwritten or unmapped while buffered are not written: the head's mini-unit takes the
/// next live ones.
#[test]
fn a_batch_skips_dead_entries() {
    let (_d, _bdev, mut w, mut qp) = setup(geometry(20, 32), "dead", 0);
    let first = push(&w.sh, 0, 6);
    {
        let sh = Arc::clone(&w.sh);
        let mut c = lock(&sh.core);
        for lba in [1u64, 3] {
            let old = sh.l2p.swap(lba, Loc::Unmapped);
            sh.invalidate(&mut c, old);
        }
    }
    let runs = first_batch(&mut w, qp.as_mut());
    assert_eq!(runs.len(), 1);
    assert_eq!(items(&runs[0], first), strs("H E0 E2 E4"));
}

/// Positions on a chunk retired while the band is written (holes) are skipped one mini-unit at a
/// time: the batch goes on at the next good chunk of the stripe.
#[test]
fn a_batch_skips_the_positions_of_a_retired_chunk() {
    let (_d, _bdev, mut w, mut qp) = setup(geometry(20, 32), "hole", 0);
    w.open_band(qp.as_mut()).expect("open band");
    let sh = Arc::clone(&w.sh);
    let mut c = lock(&sh.core);
    let id = c.open.expect("open") as usize;
    // Positions 0..40 written; then chunk 1 failed (retired), and position 40 is on it.
    c.bands[id].state = BandState::Open;
    c.bands[id].next_pos = 40;
    c.bands[id].retired = 1 << 1;
    assert_eq!(c.bands[id].locate(&sh.geo, 40), Some((1, 8)));
    drop(c);
    push(&sh, 0, 8);
    let mut c = lock(&sh.core);
    let runs = w.build_batch(&mut c, false);
    assert_eq!(shape(&runs), vec![(2, 48, 8)]);
    assert_eq!(c.bands[id].next_pos, 56);
}

/// A band is Open until the batch that assigns its last data positions, then Full (the state a
/// checkpoint records and `vblkd ftl info` shows) until its tail is queued. With `ws_opt` =
/// `ws_min`, every mini-unit is on the next chunk of the stripe.
#[test]
fn a_band_is_full_once_its_last_data_unit_is_assigned() {
    let mut g = geometry(20, 32);
    g.ws_opt = 4;
    let (_d, _bdev, mut w, mut qp) = setup(g, "full", 0);
    push(&w.sh, 0, 60);
    let runs = first_batch(&mut w, qp.as_mut());
    assert_eq!(shape(&runs), vec![(0, 0, 4), (1, 4, 4), (2, 8, 4), (3, 12, 4)]);
    let sh = Arc::clone(&w.sh);
    let mut c = lock(&sh.core);
    let id = c.open.expect("open") as usize;
    assert_eq!(c.bands[id].state, BandState::Open);
    c.bands[id].next_pos = 64;
    let runs = w.build_batch(&mut c, false);
    assert_eq!(shape(&runs), vec![(0, 64, 4), (1, 68, 4), (2, 72, 4), (3, 76, 4)]);
    assert_eq!(c.bands[id].state, BandState::Open);
    // Up to the last data unit (120..124 on chunk 2); the tail (124..128) is on chunk 3, which
    // this batch already writes.
    assert_eq!(c.bands[id].data_end(&sh.geo), 124);
    c.bands[id].next_pos = 108;
    let runs = w.build_batch(&mut c, false);
    assert_eq!(shape(&runs), vec![(3, 108, 4), (0, 112, 4), (1, 116, 4), (2, 120, 4)]);
    assert_eq!(c.bands[id].state, BandState::Full);
}

/// A band of 4 × 1024 positions: its tail (LBA list) takes 9 blocks, 12 positions with padding:
/// 4084..4088 on chunk 2, 4088..4096 on chunk 3.
fn big_band(name: &str) -> (tempfile::TempDir, FtlBdev, Worker, Box<dyn QueuePair>, usize, u64) {
    let (d, bdev, mut w, mut qp) = setup(geometry(12, 1024), name, 0);
    w.open_band(qp.as_mut()).expect("open band");
    let sh = Arc::clone(&w.sh);
    let c = lock(&sh.core);
    let id = c.open.expect("open") as usize;
    let data_end = c.bands[id].data_end(&sh.geo);
    assert_eq!(layout::blocks_for(layout::tail_bytes(sh.geo.max_positions as usize)), 9);
    assert_eq!(data_end, 4084);
    drop(c);
    (d, bdev, w, qp, id, data_end)
}

/// The tail blocks go in order to the tail positions, the rest of the tail region is padding.
#[test]
fn a_tail_over_several_mini_units_is_written_in_order_then_padded() {
    let (_d, _bdev, mut w, _qp, id, data_end) = big_band("tail");
    let sh = Arc::clone(&w.sh);
    let mut c = lock(&sh.core);
    c.bands[id].state = BandState::Full;
    c.bands[id].next_pos = data_end;
    let runs = w.build_batch(&mut c, false);
    assert_eq!(shape(&runs), vec![(2, 4084, 4), (3, 4088, 8)]);
    assert_eq!(items(&runs[0], 0), strs("T0 T1 T2 T3"));
    assert_eq!(items(&runs[1], 0), strs("T4 T5 T6 T7 T8 P P P"));
    assert_eq!(c.bands[id].state, BandState::Closed);
    assert!(c.bands[id].has_tail);
    // The commands carry the tail's blocks in that order.
    let tail = w.tail_cache.clone().expect("tail").1;
    assert_eq!(tail.len(), 9 * BLOCK_BYTES);
    let p = w.prepare(&c, &runs);
    let data: Vec<u8> = p.runs.iter().flat_map(|r| r.data.clone()).collect();
    assert_eq!(data[..9 * BLOCK_BYTES], tail[..], "tail blocks");
    assert!(data[9 * BLOCK_BYTES..].iter().all(|x| *x == 0), "padding");
}

/// A batch that ends after the tail's first mini-unit leaves the band Closing; the next batch
/// writes the rest of the same tail (encoded once, when the band was full).
#[test]
fn a_tail_split_over_two_batches_is_one_encoding() {
    let mut g = geometry(12, 1024);
    g.ws_opt = 4;
    let (_d, _bdev, mut w, mut qp) = setup(g, "tail-split", 0);
    w.open_band(qp.as_mut()).expect("open band");
    let sh = Arc::clone(&w.sh);
    let first = push(&sh, 0, 12);
    let mut c = lock(&sh.core);
    let id = c.open.expect("open") as usize;
    assert_eq!(c.bands[id].data_end(&sh.geo), 4084);
    c.bands[id].state = BandState::Open;
    c.bands[id].next_pos = 4072;
    let runs = w.build_batch(&mut c, false);
    // The last data units, then the tail's first unit (chunk 1); its next one is on chunk 2 again.
    assert_eq!(shape(&runs), vec![(2, 4072, 4), (3, 4076, 4), (0, 4080, 4), (1, 4084, 4)]);
    assert_eq!(items(&runs[3], first), strs("T0 T1 T2 T3"));
    assert_eq!(c.bands[id].state, BandState::Closing);
    let tail = w.tail_cache.clone().expect("tail");
    let runs = w.build_batch(&mut c, false);
    assert_eq!(shape(&runs), vec![(2, 4088, 4), (3, 4092, 4)]);
    assert_eq!(items(&runs[1], first), strs("T8 P P P"));
    assert_eq!(c.bands[id].state, BandState::Closed);
    assert_eq!(w.tail_cache, Some(tail), "the tail was encoded again");
}

/// A tail that does not fit in the tail positions left by a retired chunk is not written at all
/// (a partial tail would be read as one): its positions are padding.
#[test]
fn a_tail_that_does_not_fit_around_holes_is_left_out() {
    let (_d, _bdev, mut w, _qp, id, data_end) = big_band("tail-hole");
    let sh = Arc::clone(&w.sh);
    let mut c = lock(&sh.core);
    c.bands[id].state = BandState::Full;
    c.bands[id].next_pos = data_end;
    c.bands[id].retired = 1 << 3; // 4 tail positions left for 9 blocks
    let runs = w.build_batch(&mut c, false);
    assert_eq!(shape(&runs), vec![(2, 4084, 4)]);
    assert_eq!(items(&runs[0], 0), strs("P P P P"));
    assert!(!c.bands[id].has_tail);
}

/// A stop waits for an entry a writer is still copying (the worker is not drained while it is
/// buffered), then writes it, and the clean checkpoint follows.
#[test]
fn a_stop_waits_for_an_entry_still_being_copied() {
    let (_d, _bdev, mut w, mut qp) = setup(geometry(20, 32), "stop-copy", 0);
    w.open_band(qp.as_mut()).expect("open band");
    let sh = Arc::clone(&w.sh);
    let n = lock(&sh.core).wbuf.reserve(7, Origin::User);
    assert_eq!(w.step(qp.as_mut(), true).ok(), Some(true), "drained with an entry not copied yet");
    {
        let mut c = lock(&sh.core);
        c.wbuf.data().at(n).fill(7);
        c.wbuf.set_ready(n);
        sh.l2p.swap(7, Loc::Cache(n));
    }
    let mut steps = 0;
    while w.step(qp.as_mut(), true).expect("step") {
        steps += 1;
        assert!(steps < 100, "the stop never drained");
    }
    assert!(matches!(sh.l2p.get(7), Loc::Media(_)), "the entry was not written");
    w.checkpoint(qp.as_mut(), true).expect("clean checkpoint");
}

/// A queue pair that records the kind of every command submitted.
struct Recorder {
    inner: Box<dyn QueuePair>,
    ops: Arc<Mutex<Vec<&'static str>>>,
    /// Blocks written.
    written: Arc<Mutex<u64>>,
}

impl QueuePair for Recorder {
    fn submit(&mut self, cmd: Command) -> Result<(), Rejected> {
        let kind = match &cmd.op {
            Op::Flush => "flush",
            Op::Write { .. } => "write",
            Op::Read { .. } => "read",
            Op::Reset { .. } => "reset",
            _ => "other",
        };
        let blocks = match &cmd.op {
            Op::Write { ppas, .. } => ppas.len() as u64,
            _ => 0,
        };
        self.inner.submit(cmd)?;
        lock(&self.ops).push(kind);
        *lock(&self.written) += blocks;
        Ok(())
    }
    fn poll(&mut self, done: &mut Vec<Completion>, max: usize) -> usize {
        self.inner.poll(done, max)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn depth(&self) -> usize {
        self.inner.depth()
    }
}

/// Whether an idle core flushes the media to reclaim nv-cache records, for a ring of 100 units with
/// `used` in use whose oldest record is `done` (written to the nv-cache) and covers buffer entries
/// up to `last_entry` (entry 0 is on the media, 1 is not).
fn nv_flushes(used: u64, done: bool, last_entry: u64) -> bool {
    let (_d, _bdev, mut w, qp) = setup(geometry(20, 32), "nv-half", 0);
    let sh = Arc::clone(&w.sh);
    {
        let mut c = lock(&sh.core);
        c.wbuf.push(0, Origin::User, |d| d.fill(1));
        let tail = c.wbuf.tail;
        c.wbuf.taken = tail;
        c.wbuf.retire_to(tail);
        assert_eq!(c.wbuf.head, 1);
        let mut r = nvcache::NvRing::new(100, 1);
        r.head_u = used;
        r.pending.push_back(nvcache::NvRec { seq: 1, start_u: 0, units: used, last_entry, done });
        c.nv = Some(r);
    }
    let ops = Arc::new(Mutex::new(Vec::new()));
    let mut rec = Recorder { inner: qp, ops: Arc::clone(&ops), written: Arc::default() };
    let busy = w.step(&mut rec, false).expect("step");
    let ops = lock(&ops).clone();
    assert_eq!(busy, !ops.is_empty(), "{ops:?}");
    assert!(ops.iter().all(|k| *k == "flush"), "{ops:?}");
    !ops.is_empty()
}

/// The core flushes the media for the nv-cache only when the ring is more than half full and its
/// oldest record is complete and already written to the media.
#[test]
fn an_nv_cache_over_half_full_is_flushed_once_its_oldest_record_is_on_the_media() {
    assert!(nv_flushes(60, true, 0), "over half full");
    assert!(!nv_flushes(50, true, 0), "half full");
    assert!(!nv_flushes(40, true, 0), "under half full");
    assert!(!nv_flushes(60, false, 0), "oldest record still being written to the nv-cache");
    assert!(!nv_flushes(60, true, 1), "oldest record still in the write buffer");
}

fn wait_for(sh: &Shared, what: &str, f: impl Fn(&Core) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f(&lock(&sh.core)) {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An idle core pads a partial mini-unit only after a whole idle period without news: a wake-up
/// that brings no data (here with an idle period longer than the test) does not make it pad.
#[test]
fn a_wake_up_without_data_does_not_pad() {
    let (_d, _bdev, mut w, mut qp) = setup(geometry(20, 32), "nopad-wake", 0);
    let sh = Arc::clone(&w.sh);
    w.idle = Duration::from_secs(3600);
    let first = push(&sh, 0, 1);
    sh.stop.store(0, Ordering::SeqCst);
    let t = std::thread::spawn(move || w.main(qp.as_mut()));
    wait_for(&sh, "the core never went idle", |c| c.core_idle && c.open.is_some());
    {
        let mut c = lock(&sh.core);
        c.core_idle = false;
        sh.wake.notify_all();
    }
    wait_for(&sh, "the core never went idle again", |c| c.core_idle);
    let taken = lock(&sh.core).wbuf.taken;
    sh.stop.store(2, Ordering::SeqCst);
    sh.wake.notify_all();
    t.join().expect("core thread");
    assert_eq!(taken, first, "the partial unit was padded on a wake-up that brought nothing");
}

/// A first batch on four chunks (entries 0..15 for LBAs 0..15): chunk 0 gets the head and entries
/// 0..7, chunk 1 entries 7..15 (LBAs 7..15 at lbk 0..8). Returns the band and the media blocks
/// counted for the batch.
fn write_first_batch(w: &mut Worker, qp: &mut dyn QueuePair) -> (usize, u64) {
    push(&w.sh, 0, 15);
    w.open_band(qp).expect("open band");
    let before = w.sh.stats.media_write_blocks.load(Ordering::Relaxed);
    assert_eq!(w.step(qp, false).ok(), Some(true));
    let id = lock(&w.sh.core).open.expect("open") as usize;
    (id, w.sh.stats.media_write_blocks.load(Ordering::Relaxed) - before)
}

/// A write that fails in one mini-unit of a command: only that unit's blocks go back to the buffer
/// (the rest of the command is on the media), the chunk is retired, and the media write counter
/// counts the blocks written.
#[test]
fn a_failed_unit_requeues_its_blocks_only_and_retires_its_chunk() {
    let (_d, _bdev, mut w, mut qp, emu) = setup_emu(geometry(20, 32), FtlConfig::new("unit-fail"), 0);
    let sh = Arc::clone(&w.sh);
    let band = sh.geo.first_data_band();
    emu.inject(Fault::WriteFail(sh.geo.chunk(band, 1).with_lbk(5))).expect("in range");
    let (id, written) = write_first_batch(&mut w, qp.as_mut());
    assert_eq!(id as u32, band);
    for lba in 0..15u64 {
        let requeued = (11..15).contains(&lba);
        let loc = sh.l2p.get(lba);
        assert_eq!(matches!(loc, Loc::Cache(_)), requeued, "lba {lba}: {loc:?}");
        assert_eq!(matches!(loc, Loc::Media(_)), !requeued, "lba {lba}: {loc:?}");
    }
    let c = lock(&sh.core);
    assert_eq!(c.bands[id].retired, 1 << 1);
    // The band's tail will list the blocks written, not the failed ones (a restore from the tail
    // would map those LBAs to blocks that hold nothing).
    let chunk1 = &c.bands[id].lba_map[32..40];
    assert_eq!(chunk1, [7, 8, 9, 10, LBA_PAD, LBA_PAD, LBA_PAD, LBA_PAD]);
    // The nv-cache records of the failed blocks are kept until their rewritten copies (the newest
    // entries) are on the media.
    assert_eq!(c.nv_requeue_mark, c.wbuf.tail);
    drop(c);
    assert_eq!(sh.stats.retired_chunks.load(Ordering::Relaxed), 1);
    assert_eq!(sh.stats.write_failures.load(Ordering::Relaxed), 1);
    assert_eq!(written, 12, "16 blocks, 4 of them failed");
}

/// A queue pair that fails every write to one chunk without saying which blocks failed (a device
/// that reports only a command status), and passes everything else to the emulator.
struct FailChunk {
    inner: Box<dyn QueuePair>,
    chunk: crate::ocssd::Ppa,
    failed: Vec<Completion>,
}

impl QueuePair for FailChunk {
    fn submit(&mut self, cmd: Command) -> Result<(), Rejected> {
        if let Op::Write { ppas, .. } = &cmd.op {
            if ppas.as_slice().first().is_some_and(|p| p.with_lbk(0) == self.chunk) {
                self.failed.push(Completion {
                    tag: cmd.tag,
                    status: Status::INTERNAL_ERROR,
                    failed: LbaBitmap::NONE,
                    appended_at: None,
                    buffers: Buffers::default(),
                });
                return Ok(());
            }
        }
        self.inner.submit(cmd)
    }
    fn poll(&mut self, done: &mut Vec<Completion>, max: usize) -> usize {
        let n = self.failed.len().min(max);
        done.extend(self.failed.drain(..n));
        n + self.inner.poll(done, max - n)
    }
    fn in_flight(&self) -> usize {
        self.failed.len() + self.inner.in_flight()
    }
    fn depth(&self) -> usize {
        self.inner.depth()
    }
}

/// A failed write whose completion names no block fails all of its blocks: they go back to the
/// buffer (not mapped to media blocks that were never written).
#[test]
fn a_failed_write_without_a_block_list_requeues_the_whole_command() {
    let (_d, _bdev, mut w, qp) = setup(geometry(20, 32), "cmd-fail", 0);
    let sh = Arc::clone(&w.sh);
    let chunk = sh.geo.chunk(sh.geo.first_data_band(), 1);
    let mut qp = FailChunk { inner: qp, chunk, failed: Vec::new() };
    let (id, written) = write_first_batch(&mut w, &mut qp);
    for lba in 0..15u64 {
        let requeued = lba >= 7;
        let loc = sh.l2p.get(lba);
        assert_eq!(matches!(loc, Loc::Cache(_)), requeued, "lba {lba}: {loc:?}");
    }
    let c = lock(&sh.core);
    assert_eq!(c.bands[id].retired, 1 << 1);
    assert_eq!(c.bands[id].lba_map[32..40], [LBA_PAD; 8]);
    drop(c);
    assert_eq!(written, 8, "chunk 0's blocks only");
}

/// Whether a relocation step starts relocating a band, with `free` free data bands (limits scaled
/// to CRIT 2, HIGH 4, LOW 6, START 8 free bands) and every other data band closed with `invalid`
/// of its 100 written blocks invalid.
fn relocation_starts(free: usize, invalid: u64) -> bool {
    let (started, _) = relocation_step(free, invalid, 0);
    started
}

/// [`relocation_starts`] with the first `relocating` closed bands already being relocated;
/// returns whether a band was added and the bands being relocated after the step.
fn relocation_step(free: usize, invalid: u64, relocating: usize) -> (bool, Vec<u32>) {
    relocation_step_with(free, invalid, relocating, |_| {})
}

/// [`relocation_step`], `f` changing the band table last.
fn relocation_step_with(
    free: usize,
    invalid: u64,
    relocating: usize,
    f: impl FnOnce(&mut Core),
) -> (bool, Vec<u32>) {
    let mut cfg = FtlConfig::new("reloc-start");
    cfg.lba_rsvd = 50;
    cfg.limits = [
        Limit { thld: 30, pct: 0 },
        Limit { thld: 60, pct: 3 },
        Limit { thld: 90, pct: 40 },
        Limit { thld: 120, pct: 100 },
    ];
    let (_d, _bdev, mut w, mut qp, _) = setup_emu(geometry(20, 32), cfg, 0);
    let sh = Arc::clone(&w.sh);
    assert_eq!(sh.limits.map(|l| l.thld), [2, 4, 6, 8]);
    {
        let mut c = lock(&sh.core);
        let first = sh.geo.first_data_band() as usize;
        for (i, b) in c.bands.iter_mut().enumerate().skip(first) {
            if i - first < free {
                b.state = BandState::Free;
            } else {
                b.state = BandState::Closed;
                b.written = 100;
                b.valid = 100 - invalid;
            }
        }
        sh.update_limits(&mut c);
        c.relocs = (0..relocating).map(|k| ((first + free + k) as u32, 0)).collect();
        f(&mut c);
    }
    w.relocate(qp.as_mut()).expect("relocate");
    let started = sh.stats.relocated_bands.load(Ordering::Relaxed);
    let relocs: Vec<u32> = lock(&sh.core).relocs.iter().map(|r| r.0).collect();
    assert_eq!(started as usize + relocating, relocs.len());
    (started > 0, relocs)
}

/// Relocation starts below START free bands with a band over `invalid_thld` (10 %) invalid; only at
/// CRIT does it take a band under that threshold (the last resort for room).
#[test]
fn relocation_starts_below_start_and_takes_any_band_at_crit() {
    assert!(!relocation_starts(9, 50), "above START");
    assert!(relocation_starts(5, 50), "below START");
    assert!(relocation_starts(5, 11), "over invalid_thld");
    assert!(!relocation_starts(5, 10), "at invalid_thld");
    assert!(!relocation_starts(4, 5), "HIGH, a band under the threshold");
    assert!(relocation_starts(2, 5), "CRIT, a band under the threshold");
}

/// While bands are being relocated, another one is added only below START, up to `reloc_bands`
/// (3) at a time, and never one already in the list.
#[test]
fn relocation_adds_bands_below_start_up_to_reloc_bands() {
    let (added, relocs) = relocation_step(9, 50, 1);
    assert!(!added, "above START: {relocs:?}");
    let (added, relocs) = relocation_step(5, 50, 1);
    assert!(added, "{relocs:?}");
    assert!(relocs[1] != relocs[0], "the band being relocated was added again: {relocs:?}");
    let (added, relocs) = relocation_step(5, 50, 3);
    assert!(!added, "a fourth band: {relocs:?}");
}

/// Only a closed band is relocated: a free band a restore left with a written count (its blocks
/// were all overwritten: no valid data, every written block invalid) is not, though it would have
/// the best merit.
#[test]
fn relocation_takes_closed_bands_only() {
    let mut free_band = None;
    let (added, relocs) = relocation_step_with(5, 50, 0, |c| {
        let b = c.bands.iter_mut().find(|b| b.state == BandState::Free).expect("a free band");
        (b.written, b.valid) = (100, 0);
        free_band = Some(b.id);
    });
    assert!(added);
    assert!(Some(relocs[0]) != free_band, "a free band is relocated: {relocs:?}");
}

/// The band a relocation picks among closed bands given as (written, valid, age in sequence
/// numbers), the others holding no invalid data: its index in `cands`.
fn victim_of(cands: &[(u64, u64, u64)]) -> usize {
    let mut ids = Vec::new();
    let (added, relocs) = relocation_step_with(5, 0, 0, |c| {
        c.next_seq = 100_000;
        let closed = c.bands.iter_mut().filter(|b| b.state == BandState::Closed);
        for (b, &(written, valid, age)) in closed.zip(cands) {
            (b.written, b.valid, b.base_seq) = (written, valid, 100_000 - age);
            ids.push(b.id);
        }
    });
    assert!(added);
    ids.iter().position(|id| *id == relocs[0]).expect("a candidate")
}

/// The victim has the best merit: invalid / (valid + 1) × (age + 1), the most to gain per block to
/// move, older bands first.
#[test]
fn relocation_picks_the_band_of_best_merit() {
    // By invalid share, same age; a band with no valid data left first.
    assert_eq!(victim_of(&[(100, 80, 0), (100, 10, 0)]), 1);
    assert_eq!(victim_of(&[(100, 50, 0), (100, 0, 0)]), 1);
    // 2 invalid / 2 against 10 invalid / 7.
    assert_eq!(victim_of(&[(3, 1, 0), (16, 6, 0)]), 1);
    // The age multiplies: a band written just now has (age + 1) = 1.
    assert_eq!(victim_of(&[(100, 80, 1), (100, 10, 0)]), 1);
    assert_eq!(victim_of(&[(100, 10, 0), (100, 50, 100)]), 1);
    assert_eq!(victim_of(&[(100, 89, 99), (100, 2, 0)]), 1);
}

/// A relocation step moves at most `reloc_qdepth` valid blocks of its band into the write buffer.
#[test]
fn a_relocation_step_moves_at_most_reloc_qdepth_blocks() {
    let mut cfg = FtlConfig::new("reloc-qd");
    cfg.reloc_qdepth = 8;
    let (_d, _bdev, mut w, mut qp, _) = setup_emu(geometry(20, 32), cfg, 0);
    let (id, _) = write_first_batch(&mut w, qp.as_mut());
    let sh = Arc::clone(&w.sh);
    {
        let mut c = lock(&sh.core);
        assert_eq!(c.bands[id].valid, 15);
        c.relocs = vec![(id as u32, 0)];
    }
    assert_eq!(w.relocate(qp.as_mut()).ok(), Some(true));
    assert_eq!(sh.stats.relocated_blocks.load(Ordering::Relaxed), 8);
    let c = lock(&sh.core);
    assert_eq!((c.bands[id].valid, c.bands[id].reloc_pending), (7, 8));
}

/// A relocation read that fails for one block leaves that block where it is (mapped, valid) and
/// moves the others read with it; the band is dropped from relocation and, with no invalid data
/// counted any more, is not picked again for the block it cannot read.
#[test]
fn a_failed_relocation_read_leaves_the_block_and_drops_the_band() {
    let (_d, _bdev, mut w, mut qp, emu) = setup_emu(geometry(20, 32), FtlConfig::new("reloc-rerr"), 0);
    let (id, _) = write_first_batch(&mut w, qp.as_mut());
    let sh = Arc::clone(&w.sh);
    // LBA 2 is at chunk 0, block 3 (after the head and LBAs 0 and 1).
    let bad = sh.geo.chunk(id as u32, 0).with_lbk(3);
    let Loc::Media(addr) = sh.l2p.get(2) else { panic!("lba 2 not on the media") };
    assert_eq!(sh.geo.ppa_of(addr), bad);
    emu.inject(Fault::ReadError { ppa: bad, kind: ReadErrorKind::Unrecoverable }).expect("in range");
    lock(&sh.core).relocs = vec![(id as u32, 0)];
    assert_eq!(w.relocate(qp.as_mut()).ok(), Some(true));
    assert_eq!(sh.stats.read_errors.load(Ordering::Relaxed), 1);
    assert_eq!(sh.stats.relocated_blocks.load(Ordering::Relaxed), 14);
    assert_eq!(sh.l2p.get(2), Loc::Media(addr), "the unreadable block was moved");
    for lba in (0..15u64).filter(|l| *l != 2) {
        assert!(matches!(sh.l2p.get(lba), Loc::Cache(_)), "lba {lba} not moved");
    }
    let c = lock(&sh.core);
    assert!(test_bit(&c.valid, addr));
    assert!(c.relocs.is_empty());
    assert_eq!((c.bands[id].valid, c.bands[id].invalid()), (1, 0));
}

/// A victim whose cursor reached its end with valid blocks behind it (skipped earlier) is
/// rescanned from its start, its valid count taken from its valid bits.
#[test]
fn a_victim_is_rescanned_with_its_count_from_the_valid_bits() {
    let (_d, _bdev, mut w, mut qp) = setup(geometry(20, 32), "rescan", 0);
    let sh = Arc::clone(&w.sh);
    let first = sh.geo.first_data_band();
    let (victim, before) = (first + 1, first);
    {
        let mut c = lock(&sh.core);
        let base = u64::from(victim) * sh.geo.max_positions;
        for o in [1u64, 2, 3] {
            set_bit(&mut c.valid, base + o);
        }
        // (The band before it has valid blocks too: not counted.)
        for o in 1..20u64 {
            set_bit(&mut c.valid, u64::from(before) * sh.geo.max_positions + o);
        }
        let b = &mut c.bands[victim as usize];
        (b.state, b.written, b.valid) = (BandState::Closed, 100, 5);
        c.relocs = vec![(victim, 10)];
    }
    assert_eq!(w.relocate(qp.as_mut()).ok(), Some(true));
    let c = lock(&sh.core);
    assert_eq!(c.relocs, vec![(victim, 0)]);
    assert_eq!(c.bands[victim as usize].valid, 3);
}

/// A checkpoint's trim map has the bit of every unmapped LBA set, and only those.
#[test]
fn a_checkpoint_trim_map_lists_the_unmapped_lbas() {
    let (_d, _bdev, w, _qp) = setup(geometry(20, 32), "trim-map", 0);
    let sh = Arc::clone(&w.sh);
    let first = sh.geo.first_data_band();
    sh.l2p.swap(3, Loc::Media(u64::from(first) * sh.geo.max_positions + 1));
    let ck = snapshot(&sh, false).expect("snapshot");
    for lba in 0..sh.num_lbas {
        assert_eq!(test_bit(&ck.trim, lba), lba != 3, "lba {lba}");
    }
}

/// nv-cache records are not reclaimed while blocks re-queued after a write failure (entries from
/// `nv_requeue_mark` down) are not on the media yet: their records are the only durable copy.
#[test]
fn nv_cache_records_wait_for_requeued_blocks() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(24, 64), vec![]));
    let reg = crate::bdev::Registry::new();
    let nv = crate::bdev::malloc::MallocBdev::new("nv", 2 << 20, 4096).expect("malloc");
    reg.register(Arc::new(nv)).expect("register");
    let mut cfg = FtlConfig::new("nv-mark");
    cfg.wbuf_bytes = 256 << 10;
    cfg.lba_rsvd = 30;
    let desc = reg.open("nv", true).expect("open nv");
    let bdev = FtlBdev::open_with_nv(cfg, media, Some(desc)).expect("open");
    bdev.crash();
    let sh = Arc::clone(bdev.shared());
    let mut w =
        Worker { sh: Arc::clone(&sh), pad_next: false, tail_cache: None, nv_ch: None, idle: IDLE_PERIOD };
    let pending = |sh: &Shared| lock(&sh.core).nv.as_ref().expect("ring").pending.len();
    let record = |sh: &Shared, mark: u64| {
        let mut c = lock(&sh.core);
        c.nv_requeue_mark = mark;
        let r = c.nv.as_mut().expect("ring");
        let seq = r.next_seq;
        r.alloc(1, 3).expect("room");
        r.mark_done(seq);
    };
    // A record of entry 3; entry 9 is a re-queued block: entries below 5 durable is not enough.
    record(&sh, 10);
    w.nv_reclaim(5).expect("reclaim");
    assert_eq!(pending(&sh), 1, "reclaimed before the re-queued block is durable");
    w.nv_reclaim(10).expect("reclaim");
    assert_eq!(pending(&sh), 0);
    drop(w);
    drop(bdev);
}

/// Each checkpoint has the next generation, and the blocks it writes (mirror and primary copies)
/// are counted as media and metadata writes.
#[test]
fn a_checkpoint_counts_its_blocks_under_the_next_generation() {
    let (_d, _bdev, mut w, qp) = setup(geometry(20, 32), "ckpt-count", 0);
    let sh = Arc::clone(&w.sh);
    let generation = lock(&sh.core).generation;
    let written = Arc::new(Mutex::new(0u64));
    let mut rec = Recorder { inner: qp, ops: Arc::default(), written: Arc::clone(&written) };
    let (media0, md0) = (
        sh.stats.media_write_blocks.load(Ordering::Relaxed),
        sh.stats.md_write_blocks.load(Ordering::Relaxed),
    );
    w.checkpoint(&mut rec, false).expect("checkpoint");
    assert_eq!(lock(&sh.core).generation, generation + 1);
    w.checkpoint(&mut rec, false).expect("checkpoint");
    assert_eq!(lock(&sh.core).generation, generation + 2);
    let n = *lock(&written);
    assert!(n > 4, "{n} blocks");
    assert_eq!(sh.stats.media_write_blocks.load(Ordering::Relaxed) - media0, n);
    assert_eq!(sh.stats.md_write_blocks.load(Ordering::Relaxed) - md0, n);
}

/// A queue pair that, when a read is submitted, fills the write buffer up to `leave` free slots (as
/// writers would while a relocation read is in flight).
struct FillOnRead {
    inner: Box<dyn QueuePair>,
    sh: Arc<Shared>,
    leave: usize,
}

impl QueuePair for FillOnRead {
    fn submit(&mut self, cmd: Command) -> Result<(), Rejected> {
        if let Op::Read { .. } = &cmd.op {
            let mut c = lock(&self.sh.core);
            while c.wbuf.free() > self.leave {
                c.wbuf.push(1000, Origin::User, |d| d.fill(9));
            }
        }
        self.inner.submit(cmd)
    }
    fn poll(&mut self, done: &mut Vec<Completion>, max: usize) -> usize {
        self.inner.poll(done, max)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn depth(&self) -> usize {
        self.inner.depth()
    }
}

/// When the write buffer fills while a relocation read is in flight, the blocks that no longer fit
/// stay where they are and the band's cursor goes back to the first of them.
#[test]
fn relocation_resumes_at_the_first_block_with_no_room() {
    let mut cfg = FtlConfig::new("reloc-room");
    cfg.reloc_qdepth = 8;
    let (_d, _bdev, mut w, mut qp, _) = setup_emu(geometry(20, 32), cfg, 0);
    let (id, _) = write_first_batch(&mut w, qp.as_mut());
    let sh = Arc::clone(&w.sh);
    lock(&sh.core).relocs = vec![(id as u32, 0)];
    let mut qp = FillOnRead { inner: qp, sh: Arc::clone(&sh), leave: 3 };
    assert_eq!(w.relocate(&mut qp).ok(), Some(true));
    // LBAs 0..2 (chunk 0, blocks 1..3) moved; LBA 3 (block 4) is where the cursor resumes.
    assert_eq!(sh.stats.relocated_blocks.load(Ordering::Relaxed), 3);
    assert!(matches!(sh.l2p.get(3), Loc::Media(_)));
    assert_eq!(lock(&sh.core).relocs, vec![(id as u32, 4)]);
}

// ---- mod.rs channel-path mutants (mutftl5) ----

/// A write that brings a whole optimal write unit (ws_opt blocks) into the buffer wakes an idle
/// core, with no flush pending: here the idle period is longer than the test, so only that wake-up
/// gets the blocks written (the first ones: the band's first batch also takes its head).
#[test]
fn a_write_of_ws_opt_blocks_wakes_an_idle_core() {
    let (_d, _bdev, mut w, mut qp) = setup(geometry(20, 32), "wake-opt", 0);
    let sh = Arc::clone(&w.sh);
    w.idle = Duration::from_secs(3600);
    sh.stop.store(0, Ordering::SeqCst);
    let t = std::thread::spawn(move || w.main(qp.as_mut()));
    wait_for(&sh, "the core never went idle", |c| c.core_idle);
    let mut ch = crate::ftl::new_channel(&sh).expect("channel");
    let n = sh.geo.ws_opt;
    let data = vec![3u8; n as usize * crate::ftl::layout::BLOCK_BYTES];
    let io = crate::bdev::BdevIo::write(0, n, crate::bdev::IoVecs::from_slice(&data), 1);
    assert!(ch.write(io).is_ok(), "write");
    let deadline = Instant::now() + Duration::from_secs(30);
    // (The band's first batch takes its head block and ws_opt - 1 of them.)
    while !matches!(sh.l2p.get(0), Loc::Media(_)) {
        if Instant::now() > deadline {
            sh.stop.store(2, Ordering::SeqCst);
            sh.wake.notify_all();
            let c = lock(&sh.core);
            panic!(
                "the core was not woken: the blocks are still buffered (idle {}, waiting {}, open {:?}, l2p {:?})",
                c.core_idle,
                c.wbuf.waiting(),
                c.open,
                sh.l2p.get(0)
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    sh.stop.store(2, Ordering::SeqCst);
    sh.wake.notify_all();
    t.join().expect("core thread");
}

// ---- session 9: channel I/O that never completes (mutftl6) ----

/// Submits `io` to `ch` and polls until its completion arrives, 10 s at most: a channel that drops
/// an I/O or never completes it fails here by name instead of hanging the suite. (The wait does not
/// trust the poll's return value.)
fn complete_within_10s(ch: &mut crate::ftl::FtlChannel, io: crate::bdev::BdevIo, what: &str) {
    use crate::bdev::ModuleChannel;
    let tag = io.tag;
    assert!(ch.submit(io).is_ok(), "{what}: the channel did not take the I/O");
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        ch.poll(&mut done);
        if let Some(c) = done.iter().find(|c| c.tag == tag) {
            assert_eq!(c.result, Ok(()), "{what}");
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not completed after 10 s ({done:?})");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Every kind of I/O submitted to an FTL channel completes (the core thread running, an nv-cache
/// attached): a write (acknowledged from the nv-cache), a flush, a read of unwritten blocks (no
/// media command), a read of flushed blocks (media commands), an unmap, and a read of unmapped and
/// media blocks. Named first in this module so that
/// it runs before the slower FTL tests, which otherwise hang on a channel that never completes.
#[test]
fn a_channel_completes_writes_flushes_reads_and_unmaps_within_10_s() {
    use crate::bdev::{BdevIo, IoKind, IoVecs};
    use crate::ftl::layout::BLOCK_BYTES;
    let dir = tempfile::tempdir().expect("tmp");
    let (media, reg, cfg) = crate::ftl::tests::nv_ftl_setup(dir.path(), "completes");
    let nv = reg.open("nv", true).expect("nv");
    let bdev = FtlBdev::open_with_nv(cfg, media, Some(nv)).expect("open");
    let mut ch = crate::ftl::new_channel(bdev.shared()).expect("channel");
    let data: Vec<u8> = (0..4u8).flat_map(|i| vec![i + 1; BLOCK_BYTES]).collect();
    complete_within_10s(&mut ch, BdevIo::write(0, 4, IoVecs::from_slice(&data), 1), "write");
    complete_within_10s(&mut ch, BdevIo::no_data(IoKind::Flush, 0, 0, 2), "flush");
    assert!(
        (0..4).all(|lba| matches!(bdev.shared().l2p.get(lba), Loc::Media(_))),
        "the flushed blocks are on the media"
    );
    let read_at = |ch: &mut crate::ftl::FtlChannel, lba: u64, tag: u64, what: &str| {
        let bufs = IoVecs::alloc(4 * BLOCK_BYTES);
        let view = bufs.slice(0, bufs.len_bytes()).expect("view");
        complete_within_10s(ch, BdevIo::read(lba, 4, view, tag), what);
        bufs.to_vec()
    };
    let read = |ch: &mut crate::ftl::FtlChannel, tag: u64, what: &str| read_at(ch, 0, tag, what);
    // A read with no media block (never written: zeros, no command) completes too.
    let zeros = read_at(&mut ch, 8, 6, "read of unwritten blocks");
    assert!(zeros.iter().all(|b| *b == 0), "unwritten blocks read other than zeros");
    assert!(read(&mut ch, 3, "read from the media") == data, "the media read returned other data");
    complete_within_10s(&mut ch, BdevIo::no_data(IoKind::Unmap, 0, 2, 4), "unmap");
    let mut want = vec![0u8; 2 * BLOCK_BYTES];
    want.extend_from_slice(&data[2 * BLOCK_BYTES..]);
    assert!(read(&mut ch, 5, "read after the unmap") == want, "the read after the unmap returned other data");
    drop(ch);
    drop(bdev);
}

// ---- core.rs relocate's victim filter (mutftl6) ----

/// Relocation never takes a closed band with nothing written, not even at CRIT, where any closed
/// band may be taken. Such a band has no chunk left to write: prepare_free_band closes a band whose
/// every chunk is retired or offline, and a band is closed with nothing written only when every data
/// write to it failed, which retired its chunks. Relocating it would only free it: counted as a free
/// band it cannot give (the level would leave CRIT for it), closed again by the next preparation.
/// Here the other closed bands hold no invalid data: every band's merit is 0 and the pick falls to
/// the last of them, the band with nothing written, if the filter lets it in.
#[test]
fn relocation_never_takes_a_closed_band_with_nothing_written() {
    let mut dead = None;
    let (added, relocs) = relocation_step_with(2, 0, 0, |c| {
        let b = c.bands.iter_mut().rev().find(|b| b.state == BandState::Closed).expect("a closed band");
        (b.written, b.valid, b.good, b.retired) = (0, 0, Vec::new(), 0b1111);
        dead = Some(b.id);
    });
    assert!(added, "at CRIT a band is taken");
    assert!(
        !relocs.iter().any(|id| Some(*id) == dead),
        "the band with nothing written is relocated: {relocs:?}"
    );
}
