//! Emulator behaviour through the transport-neutral driver interface: every media rule and
//! status code, fault injection, persistence, image validation, and concurrency.

use std::path::{Path, PathBuf};

use vblkd::ocssd::emu::EmuConfig;
use vblkd::ocssd::spec::{
    ChunkState, Status, NOTIFY_MASK_BLOCKS, NOTIFY_MASK_CHUNK, NOTIFY_STATE_HIGH_ECC, NOTIFY_STATE_WEAR_INDEX,
};
use vblkd::ocssd::{
    Command, Completion, EmuDevice, EmuGeometry, Fault, IoBuf, LbaBitmap, MediaDevice, MediaError, Op, Ppa,
    PpaList, QueuePair, ReadErrorKind, RejectReason, SgList,
};

const BS: usize = 4096;
const OOB: usize = 16;

fn geom() -> EmuGeometry {
    EmuGeometry {
        num_grp: 2,
        num_pu: 2,
        num_chk: 4,
        clba: 32,
        ws_min: 4,
        ws_opt: 8,
        oob_bytes: OOB as u32,
        ..EmuGeometry::default()
    }
}

fn create(cfg: EmuConfig) -> (tempfile::TempDir, PathBuf, EmuDevice) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("media.img");
    let dev = EmuDevice::create(&path, &cfg).expect("create image");
    (dir, path, dev)
}

fn setup() -> (tempfile::TempDir, PathBuf, EmuDevice) {
    create(EmuConfig { geometry: geom(), ..EmuConfig::default() })
}

/// Deterministic content of a block.
fn pattern(ppa: Ppa, salt: u8) -> Vec<u8> {
    let seed = (ppa.grp * 131 + ppa.pu * 31 + ppa.chk * 7 + ppa.lbk) as u8 ^ salt;
    (0..BS).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
}

fn oob_of(ppa: Ppa) -> Vec<u8> {
    let mut v = vec![0u8; OOB];
    v[..8].copy_from_slice(&(ppa.lbk + 1000 * ppa.chk).to_le_bytes());
    v[8..16].copy_from_slice(&0xfeed_u64.to_le_bytes());
    v
}

fn run(qp: &mut dyn QueuePair, op: Op) -> Completion {
    qp.submit(Command { tag: 77, op }).expect("queue has room");
    let mut done = Vec::new();
    assert_eq!(qp.poll(&mut done, 16), 1);
    let c = done.pop().expect("one completion");
    assert_eq!(c.tag, 77);
    c
}

fn list(start: Ppa, n: usize) -> PpaList {
    PpaList::contiguous(start, n).expect("valid list")
}

fn write_list(qp: &mut dyn QueuePair, ppas: Vec<Ppa>, salt: u8) -> Completion {
    let mut data = Vec::with_capacity(ppas.len() * BS);
    let mut oob = Vec::with_capacity(ppas.len() * OOB);
    for p in &ppas {
        data.extend_from_slice(&pattern(*p, salt));
        oob.extend_from_slice(&oob_of(*p));
    }
    run(
        qp,
        Op::Write {
            ppas: PpaList::new(ppas).expect("valid list"),
            data: data.into(),
            oob: Some(IoBuf::from_vec(oob)),
        },
    )
}

fn write(qp: &mut dyn QueuePair, start: Ppa, n: usize) -> Completion {
    write_list(qp, list(start, n).as_slice().to_vec(), 0)
}

fn read_list(qp: &mut dyn QueuePair, ppas: Vec<Ppa>) -> (Completion, Vec<u8>, Vec<u8>) {
    let n = ppas.len();
    let mut c = run(
        qp,
        Op::Read {
            ppas: PpaList::new(ppas).expect("valid list"),
            data: vec![0xAAu8; n * BS].into(),
            oob: Some(IoBuf::zeroed(n * OOB)),
        },
    );
    let data = c.buffers.data.take().expect("data returned").to_vec();
    let oob = c.buffers.oob.take().expect("oob returned").into_vec().expect("owned");
    (c, data, oob)
}

fn read(qp: &mut dyn QueuePair, start: Ppa, n: usize) -> (Completion, Vec<u8>, Vec<u8>) {
    read_list(qp, list(start, n).as_slice().to_vec())
}

fn reset(qp: &mut dyn QueuePair, chunks: Vec<Ppa>) -> Completion {
    run(qp, Op::Reset { chunks: PpaList::new(chunks).expect("valid list") })
}

fn assert_block(data: &[u8], i: usize, ppa: Ppa, salt: u8) {
    assert!(data[i * BS..(i + 1) * BS] == pattern(ppa, salt)[..], "block {i} ({ppa}) differs");
}

fn chunk(grp: u64, pu: u64, chk: u64) -> Ppa {
    Ppa::new(grp, pu, chk, 0)
}

#[test]
fn write_then_read_returns_data_and_oob() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(1, 1, 2);
    let w = write(qp.as_mut(), c0, 8);
    assert_eq!(w.status, Status::SUCCESS);
    assert_eq!(w.failed, LbaBitmap::NONE);
    assert_eq!(w.buffers.data.expect("returned").len_bytes(), 8 * BS);
    let (r, data, oob) = read(qp.as_mut(), c0, 8);
    assert_eq!(r.status, Status::SUCCESS);
    for i in 0..8 {
        assert_block(&data, i, c0.with_lbk(i as u64), 0);
        assert_eq!(&oob[i * OOB..(i + 1) * OOB], &oob_of(c0.with_lbk(i as u64))[..]);
    }
    let info = dev.chunk_info(c0).expect("in range");
    assert_eq!(info.state, ChunkState::Open);
    assert_eq!(info.write_pointer_blocks, 8);
    assert_eq!(info.cnlb, 32);
}

#[test]
fn write_not_at_write_pointer_is_out_of_order() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(0, 0, 0);
    let w = write(qp.as_mut(), c0.with_lbk(4), 4);
    assert_eq!(w.status, Status::OUT_OF_ORDER_WRITE);
    assert_eq!(w.status.sc, 0xF2);
    assert_eq!(w.failed, LbaBitmap::first(4));
    assert_eq!(dev.chunk_info(c0).expect("ok").state, ChunkState::Free);
    assert_eq!(write(qp.as_mut(), c0, 4).status, Status::SUCCESS);
    // Rewriting already written blocks is also out of order.
    assert_eq!(write(qp.as_mut(), c0, 4).status, Status::OUT_OF_ORDER_WRITE);
}

#[test]
fn partial_ws_min_unit_is_refused() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(0, 1, 0);
    let w = write(qp.as_mut(), c0, 2);
    assert_eq!(w.status, Status::INVALID_FIELD);
    assert_eq!(w.failed, LbaBitmap::first(2));
    assert_eq!(dev.chunk_info(c0).expect("ok").write_pointer_blocks, 0);
    let w = write(qp.as_mut(), c0, 6);
    assert_eq!(w.status, Status::INVALID_FIELD);
    assert_eq!(write(qp.as_mut(), c0, 12).status, Status::SUCCESS);
}

#[test]
fn full_chunk_closes_and_refuses_writes() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(1, 0, 3);
    for i in 0..4 {
        assert_eq!(write(qp.as_mut(), c0.with_lbk(i * 8), 8).status, Status::SUCCESS);
    }
    let info = dev.chunk_info(c0).expect("ok");
    assert_eq!(info.state, ChunkState::Closed);
    assert_eq!(info.write_pointer_blocks, 32);
    let w = write(qp.as_mut(), c0.with_lbk(0), 4);
    assert_eq!(w.status, Status::WRITE_FAULT);
    let (r, data, _) = read(qp.as_mut(), c0.with_lbk(24), 8);
    assert_eq!(r.status, Status::SUCCESS);
    assert_block(&data, 7, c0.with_lbk(31), 0);
}

#[test]
fn read_beyond_write_pointer_fails_per_block() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(0, 0, 1);
    assert_eq!(write(qp.as_mut(), c0, 8).status, Status::SUCCESS);
    let (r, data, _) = read(qp.as_mut(), c0.with_lbk(4), 8);
    assert_eq!(r.status, Status::UNWRITTEN_BLOCK);
    assert_eq!(r.failed, LbaBitmap(0b1111_0000));
    for i in 0..4 {
        assert_block(&data, i, c0.with_lbk(4 + i as u64), 0);
    }
    let (r, _, _) = read(qp.as_mut(), chunk(0, 0, 2), 1);
    assert_eq!(r.status, Status::UNWRITTEN_BLOCK);
    assert_eq!(r.failed, LbaBitmap(1));
}

#[test]
fn offline_chunks_reject_all_io() {
    let bad = chunk(1, 1, 1);
    let (_d, _p, dev) = create(EmuConfig { geometry: geom(), bad_chunks: vec![bad], faults: vec![] });
    let mut qp = dev.queue_pair(8).expect("qp");
    assert_eq!(dev.chunk_info(bad).expect("ok").state, ChunkState::Offline);
    assert_eq!(write(qp.as_mut(), bad, 4).status, Status::OFFLINE_CHUNK);
    assert_eq!(read(qp.as_mut(), bad, 1).0.status, Status::OFFLINE_CHUNK);
    let r = reset(qp.as_mut(), vec![chunk(0, 0, 0), bad]);
    assert_eq!(r.status, Status::OFFLINE_CHUNK);
    assert_eq!(r.status.sc, 0xC0);
    assert_eq!(r.failed, LbaBitmap(0b10), "only the offline entry fails");
    assert_eq!(dev.chunk_state_counts().offline, 1);
}

#[test]
fn reset_rules_follow_mccap() {
    let (_d, _p, dev) =
        create(EmuConfig { geometry: EmuGeometry { mccap: 0, ..geom() }, ..EmuConfig::default() });
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(0, 1, 1);
    let r = reset(qp.as_mut(), vec![c0]);
    assert_eq!(r.status, Status::INVALID_RESET, "free chunk, no multiple resets");
    assert_eq!(r.status.sc, 0xC1);
    assert_eq!(write(qp.as_mut(), c0, 8).status, Status::SUCCESS);
    assert_eq!(reset(qp.as_mut(), vec![c0]).status, Status::INVALID_RESET, "open chunk, no early reset");
    for i in 1..4 {
        assert_eq!(write(qp.as_mut(), c0.with_lbk(i * 8), 8).status, Status::SUCCESS);
    }
    assert_eq!(reset(qp.as_mut(), vec![c0]).status, Status::SUCCESS);

    // With the default capabilities both are allowed.
    let (_d2, _p2, dev2) = setup();
    let mut qp2 = dev2.queue_pair(8).expect("qp");
    assert_eq!(reset(qp2.as_mut(), vec![c0]).status, Status::SUCCESS);
    assert_eq!(write(qp2.as_mut(), c0, 4).status, Status::SUCCESS);
    assert_eq!(reset(qp2.as_mut(), vec![c0]).status, Status::SUCCESS);
}

#[test]
fn reset_frees_the_chunk_and_counts_wear() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(1, 0, 0);
    assert_eq!(write(qp.as_mut(), c0, 8).status, Status::SUCCESS);
    assert_eq!(reset(qp.as_mut(), vec![c0]).status, Status::SUCCESS);
    let info = dev.chunk_info(c0).expect("ok");
    assert_eq!(info.state, ChunkState::Free);
    assert_eq!(info.write_pointer_blocks, 0);
    assert_eq!(dev.erase_count(c0).expect("ok"), 1);
    assert_eq!(read(qp.as_mut(), c0, 1).0.status, Status::UNWRITTEN_BLOCK);
    assert_eq!(write_list(qp.as_mut(), list(c0, 4).as_slice().to_vec(), 9).status, Status::SUCCESS);
    let (_, data, _) = read(qp.as_mut(), c0, 4);
    assert_block(&data, 3, c0.with_lbk(3), 9);
}

#[test]
fn chunk_wears_out_after_pe_cycles() {
    let (_d, _p, dev) =
        create(EmuConfig { geometry: EmuGeometry { pe_cycles: 3, ..geom() }, ..EmuConfig::default() });
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(0, 0, 3);
    assert_eq!(reset(qp.as_mut(), vec![c0]).status, Status::SUCCESS);
    assert_eq!(reset(qp.as_mut(), vec![c0]).status, Status::SUCCESS);
    assert_eq!(dev.chunk_info(c0).expect("ok").wear_index, 170);
    assert_eq!(reset(qp.as_mut(), vec![c0]).status, Status::OFFLINE_CHUNK);
    assert_eq!(dev.chunk_info(c0).expect("ok").state, ChunkState::Offline);
    let mut notes = Vec::new();
    dev.take_notifications(&mut notes);
    assert!(notes.iter().any(|n| n.state == NOTIFY_STATE_WEAR_INDEX && n.mask == NOTIFY_MASK_CHUNK));
}

#[test]
fn out_of_range_addresses_are_flagged() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let r = read_list(qp.as_mut(), vec![Ppa::new(0, 0, 0, 32), Ppa::new(2, 0, 0, 0)]).0;
    assert_eq!(r.status, Status::LBA_OUT_OF_RANGE);
    assert_eq!(r.failed, LbaBitmap(0b11));
    assert!(matches!(dev.chunk_info(Ppa::new(0, 2, 0, 0)), Err(MediaError::ChunkOutOfRange { .. })));
}

#[test]
fn vector_write_spans_chunks_with_per_run_results() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let a = chunk(0, 0, 0);
    let b = chunk(1, 1, 0);
    let c = chunk(0, 1, 3);
    // Entries 0..4 to a, 4..8 to b (fine), 8..12 to c at lbk 4 (out of order).
    let mut ppas: Vec<Ppa> = list(a, 4).as_slice().to_vec();
    ppas.extend_from_slice(list(b, 4).as_slice());
    ppas.extend_from_slice(list(c.with_lbk(4), 4).as_slice());
    let w = write_list(qp.as_mut(), ppas.clone(), 3);
    assert_eq!(w.status, Status::OUT_OF_ORDER_WRITE);
    assert_eq!(w.failed, LbaBitmap(0xF00));
    assert_eq!(dev.chunk_info(a).expect("ok").write_pointer_blocks, 4);
    assert_eq!(dev.chunk_info(b).expect("ok").write_pointer_blocks, 4);
    assert_eq!(dev.chunk_info(c).expect("ok").state, ChunkState::Free);
    // A scattered read across both chunks.
    let (r, data, _) = read_list(qp.as_mut(), vec![b.with_lbk(2), a.with_lbk(1), a.with_lbk(3)]);
    assert_eq!(r.status, Status::SUCCESS);
    assert_block(&data, 0, b.with_lbk(2), 3);
    assert_block(&data, 1, a.with_lbk(1), 3);
    assert_block(&data, 2, a.with_lbk(3), 3);
}

#[test]
fn scatter_gather_segments_and_missing_oob() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(0, 0, 0);
    let mut sg = SgList::new();
    for i in 0..4u64 {
        // Split each block unevenly across segments.
        let b = pattern(c0.with_lbk(i), 5);
        sg.push(IoBuf::from_vec(b[..1000].to_vec()));
        sg.push(IoBuf::from_vec(b[1000..].to_vec()));
    }
    let w = run(qp.as_mut(), Op::Write { ppas: list(c0, 4), data: sg, oob: None });
    assert_eq!(w.status, Status::SUCCESS);
    let (_, data, oob) = read(qp.as_mut(), c0, 4);
    assert_block(&data, 2, c0.with_lbk(2), 5);
    assert!(oob.iter().all(|b| *b == 0), "missing OOB is written as zeros");
}

#[test]
fn wrong_buffer_lengths_are_invalid_field() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(0, 0, 0);
    let w = run(qp.as_mut(), Op::Write { ppas: list(c0, 4), data: vec![0u8; 3 * BS].into(), oob: None });
    assert_eq!(w.status, Status::INVALID_FIELD);
    assert_eq!(w.failed, LbaBitmap::first(4));
    let r = run(
        qp.as_mut(),
        Op::Read { ppas: list(c0, 1), data: vec![0u8; BS].into(), oob: Some(IoBuf::zeroed(OOB - 1)) },
    );
    assert_eq!(r.status, Status::INVALID_FIELD);
    assert_eq!(dev.chunk_info(c0).expect("ok").state, ChunkState::Free);
}

#[test]
fn injected_write_failure_fails_its_unit_and_moves_on() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(1, 1, 3);
    dev.inject(Fault::WriteFail(c0.with_lbk(5))).expect("in range");
    let w = write(qp.as_mut(), c0, 8);
    assert_eq!(w.status, Status::WRITE_FAIL_NEXT_UNIT);
    assert_eq!(w.status.sc, 0xF0);
    assert_eq!(w.failed, LbaBitmap(0b1111_0000), "the ws_min unit 4..8 failed");
    let info = dev.chunk_info(c0).expect("ok");
    assert_eq!(info.state, ChunkState::Open);
    assert_eq!(info.write_pointer_blocks, 8);
    let (r, data, _) = read(qp.as_mut(), c0, 4);
    assert_eq!(r.status, Status::SUCCESS);
    assert_block(&data, 3, c0.with_lbk(3), 0);
    // One shot: the next unit writes fine.
    assert_eq!(write(qp.as_mut(), c0.with_lbk(8), 8).status, Status::SUCCESS);
    let mut notes = Vec::new();
    assert_eq!(dev.take_notifications(&mut notes), 1);
    assert_eq!(notes[0].mask, NOTIFY_MASK_BLOCKS);
    assert_eq!(notes[0].nlb, 4);
    let fmt = dev.info().ppa_format;
    assert_eq!(fmt.unpack(notes[0].lba), Ok(c0.with_lbk(4)));
}

/// A failed unit in the middle of a run that starts past block 0: the units before and after it
/// are written with their own data (and OOB), the failed unit's blocks hold none of it, and only
/// that unit is reported failed.
#[test]
fn injected_write_failure_mid_run_writes_the_units_around_it() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(0, 1, 1);
    assert_eq!(write(qp.as_mut(), c0, 4).status, Status::SUCCESS);
    dev.inject(Fault::WriteFail(c0.with_lbk(9))).expect("in range");
    // Blocks 4..16: units 4..8, 8..12 (fails) and 12..16.
    let w = write(qp.as_mut(), c0.with_lbk(4), 12);
    assert_eq!(w.status, Status::WRITE_FAIL_NEXT_UNIT);
    assert_eq!(w.failed, LbaBitmap(0b1111_0000), "only the unit 8..12 (run blocks 4..8) failed");
    assert_eq!(dev.chunk_info(c0).expect("ok").write_pointer_blocks, 16);
    let (r, data, oob) = read(qp.as_mut(), c0.with_lbk(4), 12);
    assert_eq!(r.status, Status::SUCCESS);
    for i in (0..4).chain(8..12) {
        let ppa = c0.with_lbk(4 + i as u64);
        assert_block(&data, i, ppa, 0);
        assert_eq!(&oob[i * OOB..(i + 1) * OOB], &oob_of(ppa)[..], "OOB of {ppa}");
    }
    for i in 4..8 {
        let ppa = c0.with_lbk(4 + i as u64);
        assert!(data[i * BS..(i + 1) * BS] != pattern(ppa, 0)[..], "the failed block {ppa} holds its data");
    }
    let mut notes = Vec::new();
    assert_eq!(dev.take_notifications(&mut notes), 1);
    assert_eq!((notes[0].mask, notes[0].nlb), (NOTIFY_MASK_BLOCKS, 4));
    assert_eq!(dev.info().ppa_format.unpack(notes[0].lba), Ok(c0.with_lbk(8)));
}

#[test]
fn injected_read_errors_report_ecc_status() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(0, 1, 2);
    assert_eq!(write(qp.as_mut(), c0, 8).status, Status::SUCCESS);
    dev.inject(Fault::ReadError { ppa: c0.with_lbk(2), kind: ReadErrorKind::HighEcc }).expect("ok");
    dev.inject(Fault::ReadError { ppa: c0.with_lbk(6), kind: ReadErrorKind::Unrecoverable }).expect("ok");
    let (r, data, _) = read(qp.as_mut(), c0, 4);
    assert_eq!(r.status, Status::HIGH_ECC);
    assert_eq!(r.status.sc, 0xD0);
    assert_eq!(r.failed, LbaBitmap(0b100));
    assert_block(&data, 2, c0.with_lbk(2), 0);
    let (r, data, _) = read(qp.as_mut(), c0.with_lbk(4), 4);
    assert_eq!(r.status, Status::UNRECOVERED_READ);
    assert_eq!(r.failed, LbaBitmap(0b100));
    assert!(data[2 * BS..3 * BS].iter().all(|b| *b == 0));
    assert_block(&data, 3, c0.with_lbk(7), 0);
    let mut notes = Vec::new();
    assert_eq!(dev.take_notifications(&mut notes), 2);
    assert_eq!(notes[0].state, NOTIFY_STATE_HIGH_ECC);
    assert!(notes[1].nc > notes[0].nc);
    // Errors are sticky until the chunk is reset.
    assert_eq!(read(qp.as_mut(), c0, 4).0.status, Status::HIGH_ECC);
    assert_eq!(reset(qp.as_mut(), vec![c0]).status, Status::SUCCESS);
    assert_eq!(write(qp.as_mut(), c0, 8).status, Status::SUCCESS);
    assert_eq!(read(qp.as_mut(), c0, 8).0.status, Status::SUCCESS);
}

#[test]
fn injected_early_close_closes_the_chunk_at_the_block() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(1, 0, 1);
    dev.inject(Fault::CloseEarly(c0.with_lbk(12))).expect("ok");
    assert_eq!(write(qp.as_mut(), c0, 8).status, Status::SUCCESS);
    let w = write(qp.as_mut(), c0.with_lbk(8), 8);
    assert_eq!(w.status, Status::CHUNK_CLOSED_EARLY);
    assert_eq!(w.status.sc, 0xF1);
    assert_eq!(w.failed, LbaBitmap(0b1111_0000));
    let info = dev.chunk_info(c0).expect("ok");
    assert_eq!(info.state, ChunkState::Closed);
    assert_eq!(info.write_pointer_blocks, 12);
    let (r, data, _) = read(qp.as_mut(), c0.with_lbk(8), 4);
    assert_eq!(r.status, Status::SUCCESS);
    assert_block(&data, 3, c0.with_lbk(11), 0);
    assert_eq!(write(qp.as_mut(), c0.with_lbk(12), 4).status, Status::WRITE_FAULT);
    let mut notes = Vec::new();
    assert_eq!(dev.take_notifications(&mut notes), 1);
    assert_eq!(notes[0].mask, NOTIFY_MASK_CHUNK);
}

#[test]
fn runtime_offline_injection() {
    let (_d, path, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(0, 0, 2);
    assert_eq!(write(qp.as_mut(), c0, 8).status, Status::SUCCESS);
    dev.inject(Fault::OfflineChunk(c0)).expect("ok");
    assert_eq!(read(qp.as_mut(), c0, 1).0.status, Status::OFFLINE_CHUNK);
    let mut notes = Vec::new();
    assert_eq!(dev.take_notifications(&mut notes), 1);
    assert_eq!(notes[0].mask, NOTIFY_MASK_CHUNK);
    assert!(dev.inject(Fault::WriteFail(Ppa::new(0, 0, 0, 32))).is_err());
    drop(qp);
    drop(dev);
    let dev = EmuDevice::open(&path).expect("reopen");
    assert_eq!(dev.chunk_info(c0).expect("ok").state, ChunkState::Offline, "persisted");
}

#[test]
fn vector_copy_moves_data_and_oob() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let src = chunk(0, 0, 0);
    let dst = chunk(1, 1, 1);
    assert_eq!(write(qp.as_mut(), src, 8).status, Status::SUCCESS);
    let c = run(qp.as_mut(), Op::Copy { src: list(src.with_lbk(4), 4), dst: list(dst, 4) });
    assert_eq!(c.status, Status::SUCCESS);
    let (_, data, oob) = read(qp.as_mut(), dst, 4);
    assert_block(&data, 0, src.with_lbk(4), 0);
    assert_eq!(&oob[..OOB], &oob_of(src.with_lbk(4))[..]);
    // Copying unwritten blocks fails without writing the destination.
    let c = run(qp.as_mut(), Op::Copy { src: list(src.with_lbk(8), 4), dst: list(dst.with_lbk(4), 4) });
    assert_eq!(c.status, Status::UNWRITTEN_BLOCK);
    assert_eq!(dev.chunk_info(dst).expect("ok").write_pointer_blocks, 4);
}

/// A copy whose source has a high-ECC block (read, corrected) still writes the destination and
/// reports that block; an unrecoverable source block fails the copy without writing anything.
#[test]
fn vector_copy_goes_on_past_high_ecc_but_not_past_unrecoverable() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let src = chunk(0, 0, 3);
    let dst = chunk(1, 0, 2);
    assert_eq!(write(qp.as_mut(), src, 8).status, Status::SUCCESS);
    dev.inject(Fault::ReadError { ppa: src.with_lbk(5), kind: ReadErrorKind::HighEcc }).expect("ok");
    let c = run(qp.as_mut(), Op::Copy { src: list(src.with_lbk(4), 4), dst: list(dst, 4) });
    assert_eq!((c.status, c.failed), (Status::HIGH_ECC, LbaBitmap(0b10)), "the high-ECC block is reported");
    assert_eq!(dev.chunk_info(dst).expect("ok").write_pointer_blocks, 4);
    let (_, data, _) = read(qp.as_mut(), dst, 4);
    for i in 0..4 {
        assert_block(&data, i, src.with_lbk(4 + i as u64), 0);
    }
    dev.inject(Fault::ReadError { ppa: src.with_lbk(2), kind: ReadErrorKind::Unrecoverable }).expect("ok");
    let c = run(qp.as_mut(), Op::Copy { src: list(src, 4), dst: list(dst.with_lbk(4), 4) });
    assert_eq!((c.status, c.failed), (Status::UNRECOVERED_READ, LbaBitmap(0b100)));
    assert_eq!(dev.chunk_info(dst).expect("ok").write_pointer_blocks, 4, "nothing written");
}

#[test]
fn append_writes_at_the_write_pointer() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(8).expect("qp");
    let c0 = chunk(0, 1, 0);
    let mut at = Vec::new();
    for salt in [1u8, 2] {
        let mut data = Vec::new();
        for i in 0..8u64 {
            data.extend_from_slice(&pattern(c0.with_lbk(i + 8 * u64::from(salt - 1)), salt));
        }
        let c = run(qp.as_mut(), Op::Append { chunk: c0.with_lbk(31), data: data.into(), oob: None });
        assert_eq!(c.status, Status::SUCCESS);
        at.push(c.appended_at.expect("address returned"));
    }
    assert_eq!(at, vec![c0, c0.with_lbk(8)]);
    let (_, data, _) = read(qp.as_mut(), c0.with_lbk(8), 8);
    assert_block(&data, 0, c0.with_lbk(8), 2);
}

#[test]
fn state_persists_across_reopen() {
    let (_d, path, dev) = setup();
    let a = chunk(0, 1, 3);
    let b = chunk(1, 0, 2);
    {
        let mut qp = dev.queue_pair(8).expect("qp");
        for i in 0..4 {
            assert_eq!(write(qp.as_mut(), b.with_lbk(i * 8), 8).status, Status::SUCCESS);
        }
        assert_eq!(write(qp.as_mut(), a, 12).status, Status::SUCCESS);
        assert_eq!(reset(qp.as_mut(), vec![chunk(1, 1, 1)]).status, Status::SUCCESS);
        assert_eq!(run(qp.as_mut(), Op::Flush).status, Status::SUCCESS, "flush syncs the image");
    }
    let before: Vec<_> = {
        let mut v = Vec::new();
        dev.report_chunks(0, 64, &mut v).expect("ok");
        v
    };
    drop(dev);
    let dev = EmuDevice::open(&path).expect("reopen");
    let mut after = Vec::new();
    assert_eq!(dev.report_chunks(0, 64, &mut after).expect("ok"), 16);
    assert_eq!(before, after);
    assert_eq!(dev.chunk_info(a).expect("ok").state, ChunkState::Open);
    assert_eq!(dev.chunk_info(a).expect("ok").write_pointer_blocks, 12);
    assert_eq!(dev.chunk_info(b).expect("ok").state, ChunkState::Closed);
    assert_eq!(dev.erase_count(chunk(1, 1, 1)).expect("ok"), 1);
    let mut qp = dev.queue_pair(8).expect("qp");
    let (r, data, oob) = read(qp.as_mut(), a, 12);
    assert_eq!(r.status, Status::SUCCESS);
    for i in 0..12 {
        assert_block(&data, i, a.with_lbk(i as u64), 0);
    }
    assert_eq!(&oob[11 * OOB..], &oob_of(a.with_lbk(11))[..]);
    let (r, data, _) = read(qp.as_mut(), b.with_lbk(31), 1);
    assert_eq!(r.status, Status::SUCCESS);
    assert_block(&data, 0, b.with_lbk(31), 0);
    // Writing continues at the persisted write pointer.
    assert_eq!(write(qp.as_mut(), a.with_lbk(8), 4).status, Status::OUT_OF_ORDER_WRITE);
    assert_eq!(write(qp.as_mut(), a.with_lbk(12), 4).status, Status::SUCCESS);
}

fn reopen_err(path: &Path) -> MediaError {
    match EmuDevice::open(path) {
        Err(e) => e,
        Ok(_) => panic!("corrupt image {} was accepted", path.display()),
    }
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open");
    f.write_all_at(bytes, off).expect("patch");
}

#[test]
fn torn_header_is_refused() {
    let (_d, path, dev) = setup();
    drop(dev);
    patch(&path, 16, &[0xff; 8]);
    let e = reopen_err(&path);
    assert!(matches!(e, MediaError::HeaderChecksum { .. }), "{e}");
    assert!(e.to_string().contains("torn or corrupt header"), "{e}");
    assert!(EmuDevice::inspect(&path).is_err());
}

#[test]
fn truncated_foreign_and_corrupt_images_are_refused() {
    let (d, path, dev) = setup();
    drop(dev);
    let len = std::fs::metadata(&path).expect("stat").len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
    f.set_len(len - 4096).expect("truncate");
    drop(f);
    assert!(matches!(reopen_err(&path), MediaError::Truncated { .. }));
    let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
    f.set_len(100).expect("truncate");
    drop(f);
    assert!(matches!(reopen_err(&path), MediaError::Truncated { .. }));

    let foreign = d.path().join("foreign");
    std::fs::write(&foreign, vec![7u8; 10_000]).expect("write");
    assert!(matches!(reopen_err(&foreign), MediaError::NotAnImage { .. }));
    let empty = d.path().join("empty");
    std::fs::write(&empty, b"").expect("write");
    assert!(matches!(reopen_err(&empty), MediaError::NotAnImage { .. }));

    let path2 = d.path().join("second.img");
    drop(EmuDevice::create(&path2, &EmuConfig { geometry: geom(), ..EmuConfig::default() }).expect("create"));
    // Flip a byte of chunk record 3's write pointer: its crc32c no longer matches.
    patch(&path2, 4096 + 3 * 64 + 24, &[1]);
    let e = reopen_err(&path2);
    assert!(matches!(e, MediaError::CorruptChunkEntry { index: 3, .. }), "{e}");
}

#[test]
fn an_open_image_is_locked() {
    let (_d, path, dev) = setup();
    assert!(matches!(EmuDevice::open(&path), Err(MediaError::Io { .. })));
    assert!(EmuDevice::inspect(&path).is_ok(), "inspect does not lock");
    drop(dev);
    assert!(EmuDevice::open(&path).is_ok());
}

#[test]
fn existing_file_is_not_overwritten() {
    let (_d, path, dev) = setup();
    drop(dev);
    let again = EmuDevice::create(&path, &EmuConfig { geometry: geom(), ..EmuConfig::default() });
    assert!(matches!(again, Err(MediaError::Io { .. })));
}

#[test]
fn chunk_report_order_and_slba() {
    let (_d, _p, dev) = setup();
    let info = *dev.info();
    let mut all = Vec::new();
    assert_eq!(dev.report_chunks(0, 1000, &mut all).expect("ok"), 16);
    let mut some = Vec::new();
    assert_eq!(dev.report_chunks(14, 10, &mut some).expect("ok"), 2);
    assert_eq!(&all[14..], &some[..]);
    for (i, ci) in all.iter().enumerate() {
        let at = info.chunk_at(i as u64).expect("in range");
        assert_eq!(info.chunk_index(&at), Some(i as u64));
        assert_eq!(i as u64, (at.grp * 2 + at.pu) * 4 + at.chk, "(grp*num_pu + pu)*num_chk + chk");
        assert_eq!(info.ppa_format.unpack(ci.slba), Ok(at));
    }
    assert!(dev.report_chunks(16, 1, &mut Vec::new()).is_err());
}

#[test]
fn full_queue_hands_the_command_back() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(2).expect("qp");
    assert_eq!(qp.depth(), 2);
    let fd = qp.wait_fd().expect("eventfd");
    let readable = |fd| {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: `p` is a valid pollfd for the duration of the call; timeout 0.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    };
    assert!(!readable(fd));
    for tag in 0..2 {
        qp.submit(Command { tag, op: Op::Flush }).expect("room");
    }
    assert!(readable(fd));
    let rej = qp.submit(Command { tag: 9, op: Op::Flush }).expect_err("full");
    assert_eq!(rej.reason, RejectReason::QueueFull);
    assert_eq!(rej.command.tag, 9);
    assert_eq!(qp.in_flight(), 2);
    let mut done = Vec::new();
    assert_eq!(qp.poll(&mut done, 1), 1);
    assert!(readable(fd), "still one pending");
    assert_eq!(qp.poll(&mut done, 8), 1);
    assert_eq!(done.iter().map(|c| c.tag).collect::<Vec<_>>(), vec![0, 1]);
    assert!(!readable(fd));
    qp.submit(rej.command).expect("room again");
    assert!(readable(fd), "a lone pending completion makes the fd readable");
    assert!(dev.queue_pair(0).is_err());
}

#[test]
fn concurrent_queue_pairs_write_disjoint_chunks() {
    let (_d, _p, dev) = create(EmuConfig {
        geometry: EmuGeometry {
            num_grp: 2,
            num_pu: 2,
            num_chk: 8,
            clba: 64,
            ws_min: 4,
            ws_opt: 16,
            ..EmuGeometry::default()
        },
        ..EmuConfig::default()
    });
    let threads = 4u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let dev = dev.clone();
            s.spawn(move || {
                let mut qp = dev.queue_pair(4).expect("qp");
                // Thread t owns PU t (grp t%2, pu t/2); all chunks, interleaved.
                let (grp, pu) = (t % 2, t / 2);
                for lbk in (0..64).step_by(16) {
                    for chk in 0..8 {
                        let c = write(qp.as_mut(), Ppa::new(grp, pu, chk, lbk), 16);
                        assert_eq!(c.status, Status::SUCCESS);
                    }
                }
                for chk in 0..8 {
                    let start = Ppa::new(grp, pu, chk, 0);
                    let (r, data, oob) = read(qp.as_mut(), start, 64);
                    assert_eq!(r.status, Status::SUCCESS);
                    for i in 0..64 {
                        assert_block(&data, i, start.with_lbk(i as u64), 0);
                    }
                    assert_eq!(&oob[63 * OOB..], &oob_of(start.with_lbk(63))[..]);
                }
            });
        }
    });
    let counts = dev.chunk_state_counts();
    assert_eq!(counts.closed, 32);
    assert_eq!(counts.free, 0);
}

#[test]
fn concurrent_writers_on_one_chunk_keep_the_write_pointer_rule() {
    let (_d, _p, dev) = setup();
    let c0 = chunk(0, 0, 0);
    // Two threads race to append into the same chunk: every block is written exactly once.
    std::thread::scope(|s| {
        for _ in 0..2 {
            let dev = dev.clone();
            s.spawn(move || {
                let mut qp = dev.queue_pair(4).expect("qp");
                for _ in 0..4 {
                    let c =
                        run(qp.as_mut(), Op::Append { chunk: c0, data: vec![1u8; 4 * BS].into(), oob: None });
                    assert_eq!(c.status, Status::SUCCESS);
                }
            });
        }
    });
    let info = dev.chunk_info(c0).expect("ok");
    assert_eq!(info.write_pointer_blocks, 32);
    assert_eq!(info.state, ChunkState::Closed);
}

/// The identify geometry reports the spec version (2.0) and the configured mccap and mw_cunits.
#[test]
fn identify_reports_version_and_configured_capabilities() {
    let g = EmuGeometry { mccap: 0x1, mw_cunits: 16, ..geom() };
    let (_d, _p, dev) = create(EmuConfig { geometry: g, ..EmuConfig::default() });
    let info = *dev.info();
    assert_eq!((info.geometry.mjr, info.geometry.mnr), (2, 0));
    assert_eq!(info.geometry.mccap, g.mccap);
    assert_eq!(info.geometry.mw_cunits, 16);
    assert_eq!((info.geometry.num_grp, info.geometry.num_pu), (2, 2));
}

/// Chunk-state counts follow a chunk from free to open to closed and back.
#[test]
fn chunk_state_counts_follow_the_chunk_lifecycle() {
    let (_d, _p, dev) = setup();
    let mut qp = dev.queue_pair(4).expect("qp");
    let total = 2 * 2 * 4;
    let c = dev.chunk_state_counts();
    assert_eq!((c.free, c.open, c.closed, c.offline), (total, 0, 0, 0));
    assert_eq!(write(qp.as_mut(), chunk(0, 1, 2), 4).status, Status::SUCCESS);
    let c = dev.chunk_state_counts();
    assert_eq!((c.free, c.open, c.closed), (total - 1, 1, 0));
    assert_eq!(write(qp.as_mut(), chunk(0, 1, 2).with_lbk(4), 28).status, Status::SUCCESS);
    let c = dev.chunk_state_counts();
    assert_eq!((c.free, c.open, c.closed), (total - 1, 0, 1));
    assert_eq!(reset(qp.as_mut(), vec![chunk(0, 1, 2)]).status, Status::SUCCESS);
    assert_eq!(dev.chunk_state_counts().free, total);
}

/// A geometry with more chunks than one batch of the chunk table (16 Ki records) is written in
/// several batches, each at its own place: the image reopens with every chunk free.
#[test]
fn a_chunk_table_written_in_batches_reopens_intact() {
    let g = EmuGeometry { num_grp: 2, num_pu: 4, num_chk: 2100, clba: 4, ws_min: 4, ws_opt: 4, ..geom() };
    let total = 2 * 4 * 2100u64;
    let (_d, path, dev) = create(EmuConfig { geometry: g, ..EmuConfig::default() });
    assert_eq!(dev.chunk_state_counts().free, total);
    drop(dev);
    let again = EmuDevice::open(&path).expect("reopen");
    let c = again.chunk_state_counts();
    assert_eq!((c.free, c.open, c.closed, c.offline), (total, 0, 0, 0));
}

/// An image named without a directory is created in the current directory (its free space is what
/// `create` checks).
#[test]
fn an_image_path_without_a_directory_is_created_in_the_current_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vblkd"))
        .current_dir(dir.path())
        .args(["media", "create", "--path", "media.img", "--groups", "1", "--pus", "1", "--chunks", "4"])
        .args(["--chunk-blocks", "32"])
        .output()
        .expect("run vblkd media create");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(EmuDevice::open(&dir.path().join("media.img")).is_ok());
}
