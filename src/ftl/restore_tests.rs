//! Restore tests: `scan_band` over bands written by hand on an emulated device, the way the core
//! writes them (head at position 0, data blocks with `(lba, base_seq + pos)` in their OOB, the tail
//! at the band's data end, padding), then damaged one way or another.
//!
//! # Design
//! A band is built as a list of blocks (chunk, lbk, data, lba, seq) that a test may change before
//! they are written, chunk by chunk, from lbk 0. Geometry: 4 PUs (`(grp, pu)` = (0,0), (1,0), (0,1),
//! (1,1)), 32-block chunks, ws_opt 8, ws_min 4: 128 positions per band when every chunk is good.

use std::sync::Arc;

use super::*;
use crate::ftl::tests::{geometry, make_media};
use crate::ftl::{geo_for, FtlConfig};
use crate::ocssd::{Command, Completion, EmuDevice, Fault, LbaBitmap, Ppa, ReadErrorKind, Rejected, Status};

/// The LBAs of the tests' FTL.
const NUM_LBAS: u64 = 1000;
/// The band the tests write (the metadata areas take bands 0 and 1).
const BAND: u32 = 5;
/// The tests' heads and tails use this base sequence number.
const BASE: u64 = 5000;

struct Media {
    _dir: tempfile::TempDir,
    emu: Arc<EmuDevice>,
    geo: Geo,
    qp: Box<dyn QueuePair>,
}

fn media(clba: u32) -> Media {
    let dir = tempfile::tempdir().expect("tmp");
    let emu = Arc::new(make_media(dir.path(), geometry(20, clba), vec![]));
    let geo = geo_for(emu.as_ref(), &FtlConfig::new("restore")).expect("geo");
    let qp = emu.queue_pair(4).expect("qp");
    Media { _dir: dir, emu, geo, qp }
}

/// One block to write: range chunk index, lbk, data, OOB (lba, seq).
#[derive(Clone)]
struct Blk {
    band: u32,
    i: usize,
    lbk: u64,
    data: Vec<u8>,
    lba: u64,
    seq: u64,
}

fn data_block(lba: u64) -> Vec<u8> {
    let mut d = vec![(lba as u8) ^ 0x5a; BLOCK_BYTES];
    d[0..8].copy_from_slice(&lba.to_le_bytes());
    d
}

fn head(good: &[usize], base_seq: u64) -> BandHead {
    head_of(BAND, good, base_seq)
}

fn head_of(band: u32, good: &[usize], base_seq: u64) -> BandHead {
    BandHead { uuid: [7; 16], band, base_seq, good_mask: good.iter().fold(0, |m, i| m | 1 << i) }
}

/// The blocks of band `BAND` over chunks `good`: the head, `data[k]` at position 1 + k, then, when
/// `closed`, padding up to the data end and the tail there (padded to the band's end); an open band
/// ends with padding at the next ws_min boundary.
fn band_blocks(geo: &Geo, good: &[usize], data: &[u64], closed: bool) -> Vec<Blk> {
    band_blocks_of(geo, BAND, good, data, closed)
}

/// `band_blocks` for band `id`.
fn band_blocks_of(geo: &Geo, id: u32, good: &[usize], data: &[u64], closed: bool) -> Vec<Blk> {
    let mut band = Band::new(id);
    band.good = good.to_vec();
    let data_end = band.data_end(geo);
    assert!((data.len() as u64) < data_end, "the data fits before the tail");
    let end =
        if closed { band.positions(geo) } else { (1 + data.len() as u64).div_ceil(geo.ws_min) * geo.ws_min };
    let mut lbas = vec![layout::LBA_PAD; geo.max_positions as usize];
    let mut v = Vec::new();
    for pos in 0..end {
        let (i, lbk) = band.locate(geo, pos).expect("in band");
        let (d, lba) = match pos {
            0 => (head_of(id, good, BASE).encode(), LBA_HEAD),
            p if p <= data.len() as u64 => (data_block(data[p as usize - 1]), data[p as usize - 1]),
            p if p >= data_end => (Vec::new(), layout::LBA_TAIL),
            _ => (vec![0; BLOCK_BYTES], layout::LBA_PAD),
        };
        lbas[(i as u64 * geo.clba + lbk) as usize] = lba;
        v.push(Blk { band: id, i, lbk, data: d, lba, seq: BASE + pos });
    }
    if closed {
        let tail = layout::encode_tail(id, BASE, head(good, BASE).good_mask, &lbas);
        let mut k = 0;
        for b in v.iter_mut().filter(|b| b.lba == layout::LBA_TAIL) {
            b.data =
                tail.get(k * BLOCK_BYTES..(k + 1) * BLOCK_BYTES).map_or(vec![0; BLOCK_BYTES], <[u8]>::to_vec);
            k += 1;
        }
        assert!(k * BLOCK_BYTES >= tail.len(), "the tail fits");
    }
    v
}

/// Writes the blocks, chunk by chunk (each chunk's blocks from lbk 0, in order).
fn put(m: &mut Media, blocks: &[Blk]) {
    let ob = m.emu.info().oob_bytes_per_block as usize;
    let mut chunks: Vec<(u32, usize)> = blocks.iter().map(|b| (b.band, b.i)).collect();
    chunks.sort_unstable();
    chunks.dedup();
    for (band, i) in chunks {
        let mut mine: Vec<&Blk> = blocks.iter().filter(|b| (b.band, b.i) == (band, i)).collect();
        mine.sort_by_key(|b| b.lbk);
        for run in mine.chunks(64) {
            let mut data = Vec::new();
            let mut oob = vec![0u8; run.len() * ob];
            for (k, b) in run.iter().enumerate() {
                assert_eq!(b.lbk, run[0].lbk + k as u64, "chunk {i} written in order");
                data.extend_from_slice(&b.data);
                layout::encode_oob(b.lba, b.seq, &mut oob[k * ob..(k + 1) * ob]);
            }
            let ppas =
                PpaList::contiguous(m.geo.chunk(band, i).with_lbk(run[0].lbk), run.len()).expect("ppas");
            let done = md::exec(
                m.qp.as_mut(),
                Op::Write { ppas, data: SgList::from(data), oob: Some(IoBuf::from_vec(oob)) },
            );
            assert!(done.status.is_success(), "write chunk {i}: {}", done.status);
        }
    }
}

/// The (addr, lba, seq) a scan should find: the data blocks of `blocks` below `NUM_LBAS`, sorted.
fn expected(geo: &Geo, blocks: &[Blk]) -> Vec<(u64, u64, u64)> {
    let mut v: Vec<_> = blocks
        .iter()
        .filter(|b| b.lba < NUM_LBAS)
        .map(|b| (geo.addr(b.band, b.i, b.lbk), b.lba, b.seq))
        .collect();
    v.sort_unstable();
    v
}

fn scan(m: &mut Media) -> BandScan {
    let Media { emu, geo, qp, .. } = m;
    scan_band(emu.as_ref(), qp.as_mut(), geo, BAND, NUM_LBAS).expect("scan")
}

fn sorted(s: &BandScan) -> Vec<(u64, u64, u64)> {
    let mut v = s.blocks.clone();
    v.sort_unstable();
    v
}

fn ppa_of(geo: &Geo, b: &Blk) -> Ppa {
    geo.chunk(b.band, b.i).with_lbk(b.lbk)
}

#[test]
fn an_oob_scan_skips_an_unreadable_block_and_keeps_the_others_of_its_read() {
    let mut m = media(32);
    let blocks = band_blocks(&m.geo, &[0, 1, 2, 3], &(100..130).collect::<Vec<_>>(), false);
    put(&mut m, &blocks);
    // Position 3: chunk 0, lbk 3 (LBA 102); read in one command with the rest of chunk 0.
    let bad = blocks.iter().find(|b| b.lba == 102).expect("lba 102").clone();
    assert_eq!((bad.i, bad.lbk), (0, 3));
    m.emu
        .inject(Fault::ReadError { ppa: ppa_of(&m.geo, &bad), kind: ReadErrorKind::Unrecoverable })
        .expect("inject");
    let s = scan(&mut m);
    assert!(!s.has_tail);
    let mut want = expected(&m.geo, &blocks);
    want.retain(|b| b.1 != 102);
    assert_eq!(sorted(&s), want, "every readable data block, and not the unreadable one");
    // Positions 0..32 written (head, 30 data blocks, one padding block).
    assert_eq!(s.end_seq, BASE + 32);
}

/// Completes every read with an error status and no failure bitmap (the buffers as read).
struct FailReadsWithoutBitmap(Box<dyn QueuePair>);

impl QueuePair for FailReadsWithoutBitmap {
    fn submit(&mut self, cmd: Command) -> Result<(), Rejected> {
        self.0.submit(cmd)
    }
    fn poll(&mut self, done: &mut Vec<Completion>, max: usize) -> usize {
        let first = done.len();
        let n = self.0.poll(done, max);
        for c in &mut done[first..] {
            c.status = Status::INTERNAL_ERROR;
            c.failed = LbaBitmap::NONE;
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
    fn depth(&self) -> usize {
        self.0.depth()
    }
}

#[test]
fn a_failed_read_without_a_failure_bitmap_counts_every_block_as_failed() {
    let mut m = media(32);
    let blocks = band_blocks(&m.geo, &[0, 1, 2, 3], &(100..130).collect::<Vec<_>>(), true);
    put(&mut m, &blocks);
    let mut qp = FailReadsWithoutBitmap(m.emu.queue_pair(4).expect("qp"));
    let s = scan_band(m.emu.as_ref(), &mut qp, &m.geo, BAND, NUM_LBAS).expect("scan");
    assert!(s.written);
    assert!(s.head.is_none(), "the head read failed");
    assert!(!s.has_tail);
    assert!(s.blocks.is_empty(), "every OOB read failed: no block is trusted");
    assert_eq!(s.end_seq, 0);
}

#[test]
fn the_head_is_read_from_the_first_written_chunk() {
    let mut m = media(32);
    // Chunk 0 is not in this incarnation (never written): the head is block 0 of chunk 1.
    let good = [1, 2, 3];
    let blocks = band_blocks(&m.geo, &good, &(100..110).collect::<Vec<_>>(), false);
    put(&mut m, &blocks);
    let s = scan(&mut m);
    assert_eq!(s.head, Some(head(&good, BASE)));
    assert_eq!(s.good, good.to_vec());
    assert_eq!(sorted(&s), expected(&m.geo, &blocks));
}

#[test]
fn block_0_is_a_head_only_when_its_oob_says_so() {
    let mut m = media(32);
    let good = [0, 1, 2, 3];
    let mut blocks = band_blocks(&m.geo, &good, &(100..130).collect::<Vec<_>>(), true);
    // Block 0 holds a well-formed head, but its OOB says LBA 7 (a guest block that looks like one).
    blocks[0].lba = 7;
    put(&mut m, &blocks);
    let s = scan(&mut m);
    assert!(s.head.is_none());
    assert!(!s.has_tail, "no head, so the tail is not looked for");
    assert_eq!(sorted(&s), expected(&m.geo, &blocks), "the OOB scan finds LBA 7 at block 0 too");
    // Without a head, the band's sequence numbers come from its blocks (data, padding, tail): the
    // next sequence number must not go below them.
    assert_eq!(s.end_seq, BASE + 128);
}

#[test]
fn a_tail_on_the_last_chunk_is_found_when_the_chunks_between_are_unused() {
    let mut m = media(32);
    // Chunks 0 and 3 only: the tail (one block, position 60) is on chunk 3, lbk 28; chunks 1 and 2
    // (PU (1,0) and (0,1), each sharing the group or the PU number with chunk 3) are not written.
    let good = [0, 3];
    let blocks = band_blocks(&m.geo, &good, &(100..150).collect::<Vec<_>>(), true);
    let tail: Vec<_> = blocks.iter().filter(|b| b.lba == layout::LBA_TAIL).map(|b| (b.i, b.lbk)).collect();
    assert_eq!(tail[0], (3, 28));
    put(&mut m, &blocks);
    let s = scan(&mut m);
    assert!(s.has_tail, "the tail was read");
    assert_eq!(sorted(&s), expected(&m.geo, &blocks));
}

#[test]
fn a_tail_read_with_an_error_is_not_used_and_the_band_is_scanned_by_oob() {
    let mut m = media(32);
    let good = [0, 1, 2, 3];
    let blocks = band_blocks(&m.geo, &good, &(100..130).collect::<Vec<_>>(), true);
    put(&mut m, &blocks);
    // High ECC: the tail's bytes come back intact, but the read reports the block failed.
    let tail = blocks.iter().find(|b| b.lba == layout::LBA_TAIL).expect("tail").clone();
    m.emu
        .inject(Fault::ReadError { ppa: ppa_of(&m.geo, &tail), kind: ReadErrorKind::HighEcc })
        .expect("inject");
    let s = scan(&mut m);
    assert!(s.head.is_some());
    assert!(!s.has_tail, "a tail read that failed is not trusted");
    assert_eq!(sorted(&s), expected(&m.geo, &blocks), "the same blocks, from their OOB");
}

#[test]
fn a_tail_scan_ends_one_past_the_highest_sequence_of_the_band() {
    let mut m = media(32);
    let good = [0, 1, 2, 3];
    let blocks = band_blocks(&m.geo, &good, &(100..130).collect::<Vec<_>>(), true);
    put(&mut m, &blocks);
    let s = scan(&mut m);
    assert!(s.has_tail);
    // Every position of the band is listed in the tail (head, data, padding, tail): the last is 127.
    assert_eq!(s.end_seq, BASE + 128);
}

#[test]
fn a_tail_entry_at_or_past_the_lba_count_is_not_a_data_block() {
    let mut m = media(32);
    let good = [0, 1, 2, 3];
    let blocks = band_blocks(&m.geo, &good, &[100, NUM_LBAS - 1, NUM_LBAS, NUM_LBAS + 1, 101], true);
    put(&mut m, &blocks);
    let s = scan(&mut m);
    assert!(s.has_tail);
    let want = expected(&m.geo, &blocks);
    assert_eq!(want.iter().map(|b| b.1).collect::<Vec<_>>(), vec![100, NUM_LBAS - 1, 101]);
    assert_eq!(sorted(&s), want);
}

#[test]
fn an_oob_scan_reads_a_chunk_of_more_than_64_blocks_up_to_its_write_pointer_only() {
    // 128-block chunks; an open band whose chunk 0 is written up to block 100 and the others up
    // to 96: each is read in two commands (64 blocks, then the rest up to the write pointer).
    let mut m = media(128);
    let blocks = band_blocks(&m.geo, &[0, 1, 2, 3], &(0..387).collect::<Vec<_>>(), false);
    assert_eq!(blocks.iter().filter(|b| b.i == 0).map(|b| b.lbk).max(), Some(99));
    put(&mut m, &blocks);
    let (s, logs) = crate::testlog::capture(|| scan(&mut m));
    assert!(s.head.is_some() && !s.has_tail);
    assert_eq!(sorted(&s), expected(&m.geo, &blocks));
    assert_eq!(s.end_seq, BASE + 388);
    assert!(logs.is_empty(), "nothing unreadable, nothing past a write pointer read: {logs:?}");
}

#[test]
fn a_torn_open_band_without_a_head_ends_after_its_last_data_block() {
    let mut m = media(32);
    // Head and 31 data blocks (positions 0..32, no padding); the head is unreadable.
    let blocks = band_blocks(&m.geo, &[0, 1, 2, 3], &(100..131).collect::<Vec<_>>(), false);
    assert_eq!(blocks.len(), 32);
    assert!(blocks.iter().skip(1).all(|b| b.lba < NUM_LBAS));
    put(&mut m, &blocks);
    m.emu
        .inject(Fault::ReadError { ppa: ppa_of(&m.geo, &blocks[0]), kind: ReadErrorKind::Unrecoverable })
        .expect("inject");
    let s = scan(&mut m);
    assert!(s.head.is_none());
    assert_eq!(sorted(&s), expected(&m.geo, &blocks));
    // The rebuild takes the next sequence number from here: above every block of the band.
    assert_eq!(s.end_seq, BASE + 32);
}

#[test]
fn oob_blocks_with_an_lba_past_the_lba_count_are_not_data_and_do_not_raise_the_sequence() {
    let mut m = media(32);
    let mut blocks = band_blocks(&m.geo, &[0, 1, 2, 3], &(100..131).collect::<Vec<_>>(), false);
    // Two blocks whose OOB is not the FTL's (an LBA at or past the count, below the markers), with
    // sequence numbers far above the band's.
    (blocks[5].lba, blocks[5].seq) = (NUM_LBAS + 5, BASE + 1_000_000);
    (blocks[6].lba, blocks[6].seq) = (NUM_LBAS, BASE + 2_000_000);
    put(&mut m, &blocks);
    let s = scan(&mut m);
    let want = expected(&m.geo, &blocks);
    assert_eq!(want.len(), 29);
    assert_eq!(sorted(&s), want);
    assert_eq!(s.end_seq, BASE + 32);
}

/// A checkpoint of the tests' FTL: `bands` records by band, `l2p` (its valid map follows from it).
fn checkpoint(
    geo: &Geo,
    clean: bool,
    ckpt_seq: u64,
    bands: &[(u32, layout::BandRecord)],
    l2p: Vec<u64>,
) -> Checkpoint {
    let mut recs = vec![layout::BandRecord::default(); geo.num_bands as usize];
    for &(id, r) in bands {
        recs[id as usize] = r;
    }
    let mut valid = vec![0u64; geo.addr_space().div_ceil(64) as usize];
    for &a in l2p.iter().filter(|a| **a != UNMAPPED) {
        set_bit(&mut valid, a);
    }
    let sb = layout::Superblock {
        uuid: [7; 16],
        pu_begin: 0,
        pu_end: 3,
        num_lbas: NUM_LBAS,
        num_bands: geo.num_bands,
        md_bands: geo.md_bands,
        mirror: false,
        clean,
        ckpt_seq,
        generation: 3,
        l2p_entry_bytes: 8,
        lba_rsvd: 0,
        region_offsets: [0; 5],
    };
    Checkpoint { sb, bands: recs, l2p, valid, trim: vec![0; NUM_LBAS.div_ceil(64) as usize] }
}

fn rebuild_logged(m: &mut Media, ck: &Checkpoint) -> (Rebuilt, Vec<String>, Duration) {
    let Media { emu, geo, qp, .. } = m;
    let t = Instant::now();
    let (r, logs) =
        crate::testlog::capture(|| rebuild(emu.as_ref(), qp.as_mut(), geo, ck, "rb").expect("rebuild"));
    (r, logs, t.elapsed())
}

fn rec(state: BandState, base_seq: u64, retired: u64) -> layout::BandRecord {
    layout::BandRecord { state: state.code(), base_seq, retired, erase_count: 4 }
}

#[test]
fn a_clean_rebuild_takes_the_bands_from_the_checkpoint() {
    let mut m = media(32);
    let geo = m.geo.clone();
    let mut l2p = vec![UNMAPPED; NUM_LBAS as usize];
    l2p[3] = geo.addr(5, 0, 5);
    l2p[4] = geo.addr(5, 3, 9);
    // Band 5 closed, its chunk 2 retired; band 6 free with a retired chunk; band 7 erased (Prep).
    let bands = [
        (5, rec(BandState::Closed, 900, 1 << 2)),
        (6, rec(BandState::Free, 0, 1 << 1)),
        (7, rec(BandState::Prep, 0, 0)),
    ];
    let ck = checkpoint(&geo, true, 777, &bands, l2p.clone());
    let (r, _, _) = rebuild_logged(&mut m, &ck);
    assert!(r.bands[..2].iter().all(|b| b.state == BandState::Metadata), "bands 0 and 1 hold the metadata");
    let b5 = &r.bands[5];
    assert_eq!(b5.state, BandState::Closed);
    assert_eq!(b5.good, vec![0, 1, 3], "the online chunks, less the retired one");
    assert_eq!((b5.retired, b5.base_seq, b5.erase_count, b5.valid), (1 << 2, 900, 4, 2));
    assert_eq!(b5.written, 3 * 32 - 1 - geo.tail_len(3), "every data position of its chunks");
    for id in [6, 7] {
        let b = &r.bands[id];
        assert_eq!(b.state, BandState::Free, "band {id}");
        assert!(b.good.is_empty(), "band {id}: a free band has no chunk set until it is prepared");
        assert_eq!(b.written, 0, "band {id}");
    }
    assert!(r.bands[8..].iter().all(|b| b.state == BandState::Free));
    assert!(r.l2p == l2p);
    assert_eq!(r.valid, ck.valid);
    assert_eq!(r.next_seq, 777);
    assert_eq!((r.from_tail, r.from_oob), (0, 0));
}

#[test]
fn a_dirty_rebuild_replays_a_closed_band_from_its_tail() {
    let mut m = media(32);
    let geo = m.geo.clone();
    // LBA 100 is written twice: the later block (position 31) wins.
    let mut data: Vec<u64> = (100..130).collect();
    data.push(100);
    let blocks = band_blocks(&geo, &[0, 1, 2, 3], &data, true);
    put(&mut m, &blocks);
    // The checkpoint predates the band (free then, everything unmapped).
    let ck = checkpoint(&geo, false, BASE, &[], vec![UNMAPPED; NUM_LBAS as usize]);
    let (r, logs, took) = rebuild_logged(&mut m, &ck);
    let at = |lba: u64| blocks.iter().rev().find(|b| b.lba == lba).map(|b| geo.addr(b.band, b.i, b.lbk));
    for lba in 100..130 {
        assert_eq!(Some(r.l2p[lba as usize]), at(lba), "lba {lba}");
        assert!(crate::ftl::core::test_bit(&r.valid, r.l2p[lba as usize]));
    }
    assert_eq!(r.l2p.iter().filter(|v| **v != UNMAPPED).count(), 30);
    let b = &r.bands[5];
    assert_eq!(b.state, BandState::Closed);
    assert!(b.has_tail);
    assert_eq!((b.valid, b.written, b.base_seq), (30, 31, BASE));
    assert_eq!(b.good, vec![0, 1, 2, 3]);
    assert_eq!((r.from_tail, r.from_oob), (1, 0));
    assert_eq!(r.next_seq, BASE + 128, "past every position of the band");
    // Progress lines come once a second at most (18 data bands scanned: not one per band).
    let progress = logs.iter().filter(|l| l.contains("restore: scanned band")).count() as u64;
    assert!(progress <= took.as_secs(), "{progress} progress lines in {took:?}: {logs:?}");
    assert!(!logs.iter().any(|l| l.contains("checkpoint entries")), "nothing dropped: {logs:?}");
}

#[test]
fn a_dirty_rebuild_drops_checkpoint_entries_whose_block_holds_another_lba_now() {
    let mut m = media(32);
    let geo = m.geo.clone();
    // An open band (no tail): positions 1..=30 hold LBAs 100..130, sequence BASE + position.
    let blocks = band_blocks(&geo, &[0, 1, 2, 3], &(100..130).collect::<Vec<_>>(), false);
    put(&mut m, &blocks);
    let addr =
        |lba: u64| blocks.iter().find(|b| b.lba == lba).map(|b| geo.addr(b.band, b.i, b.lbk)).expect("lba");
    // Checkpoint at BASE + 10: positions below 10 are in it, the others are replayed.
    let mut l2p = vec![UNMAPPED; NUM_LBAS as usize];
    l2p[100] = addr(100); // still holds LBA 100, older than the checkpoint: kept
    l2p[50] = addr(101); // now holds LBA 101: LBA 50's block was rewritten, dropped
    let ck = checkpoint(&geo, false, BASE + 10, &[(5, rec(BandState::Open, BASE, 0))], l2p);
    let (r, logs, _) = rebuild_logged(&mut m, &ck);
    assert_eq!(r.l2p[100], addr(100));
    assert_eq!(r.l2p[50], UNMAPPED);
    assert_eq!(r.l2p[101], UNMAPPED, "older than the checkpoint, which does not map it: not replayed");
    for lba in 109..130 {
        assert_eq!(r.l2p[lba as usize], addr(lba), "lba {lba} replayed");
    }
    assert_eq!(r.bands[5].valid, 1 + 21);
    assert_eq!((r.from_tail, r.from_oob), (0, 1));
    assert!(
        logs.iter().any(|l| l == "INFO: ftl 'rb': restore: 1 checkpoint entries pointed to rewritten blocks"),
        "{logs:?}"
    );
}
