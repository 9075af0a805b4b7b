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
    BandHead { uuid: [7; 16], band: BAND, base_seq, good_mask: good.iter().fold(0, |m, i| m | 1 << i) }
}

/// The blocks of band `BAND` over chunks `good`: the head, `data[k]` at position 1 + k, then, when
/// `closed`, padding up to the data end and the tail there (padded to the band's end); an open band
/// ends with padding at the next ws_min boundary.
fn band_blocks(geo: &Geo, good: &[usize], data: &[u64], closed: bool) -> Vec<Blk> {
    let mut band = Band::new(BAND);
    band.good = good.to_vec();
    let data_end = band.data_end(geo);
    assert!(1 + data.len() as u64 <= data_end);
    let end =
        if closed { band.positions(geo) } else { (1 + data.len() as u64).div_ceil(geo.ws_min) * geo.ws_min };
    let mut lbas = vec![layout::LBA_PAD; geo.max_positions as usize];
    let mut v = Vec::new();
    for pos in 0..end {
        let (i, lbk) = band.locate(geo, pos).expect("in band");
        let (d, lba) = match pos {
            0 => (head(good, BASE).encode(), LBA_HEAD),
            p if p <= data.len() as u64 => (data_block(data[p as usize - 1]), data[p as usize - 1]),
            p if p >= data_end => (Vec::new(), layout::LBA_TAIL),
            _ => (vec![0; BLOCK_BYTES], layout::LBA_PAD),
        };
        lbas[(i as u64 * geo.clba + lbk) as usize] = lba;
        v.push(Blk { i, lbk, data: d, lba, seq: BASE + pos });
    }
    if closed {
        let tail = layout::encode_tail(BAND, BASE, head(good, BASE).good_mask, &lbas);
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
    for i in 0..m.geo.pus.len() {
        let mut mine: Vec<&Blk> = blocks.iter().filter(|b| b.i == i).collect();
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
                PpaList::contiguous(m.geo.chunk(BAND, i).with_lbk(run[0].lbk), run.len()).expect("ppas");
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
        .map(|b| (geo.addr(BAND, b.i, b.lbk), b.lba, b.seq))
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
    geo.chunk(BAND, b.i).with_lbk(b.lbk)
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
