//! QoS admission and reset freeze in the generic channel, on the deterministic stub module.

use std::time::{Duration, Instant};

use super::qos::{Qos, QosLimits};
use super::tests::{accepts, drive, open_stub, StubBdev};
use super::{BdevIo, Completion, IoError, IoKind, IoVecs};

#[test]
fn qos_parks_in_submission_order_and_releases_per_slice() {
    let (bdev, ctl) = StubBdev::new(|_| {});
    let (reg, _desc, mut ch) = open_stub(bdev);
    // Slice boundaries are the same for every bdev: a bare `Qos` names the slice an instant is in.
    let slices = Qos::default();
    let ios: Vec<BdevIo> = (0..35u64).map(|i| BdevIo::write(i, 1, IoVecs::alloc(512), 100 + i)).collect();
    // Start at the beginning of a slice, so that the submissions most often fit in it.
    std::thread::sleep(slices.next_slice_start(Instant::now()).saturating_duration_since(Instant::now()));
    let t0 = Instant::now();
    reg.set_qos("stub", QosLimits { iops: 10_000, bps: 0 }).expect("qos");
    for io in ios {
        ch.submit(io);
    }
    // 10,000 IOPS = 10 I/O per 1 ms slice: the rest waits, and says until when.
    let admitted = accepts(&ctl).len();
    if slices.next_slice_start(t0) == slices.next_slice_start(Instant::now()) {
        assert_eq!(admitted, 10, "one slice admits exactly its budget");
    } else {
        // On a loaded machine the loop crossed into later slices: the first may have admitted
        // fewer than 10 (the rest of its quota is dropped), the last admitted its whole 10 and
        // parked the rest, and no slice admitted more than 10.
        let crossed = 1 + t0.elapsed().as_micros() as usize / 1000 + 1;
        assert!(
            (10..=10 * crossed.min(3)).contains(&admitted),
            "each slice admits at most its budget: {admitted} admitted in {crossed} slices"
        );
    }
    assert_eq!(ch.outstanding(), 35);
    let until = ch.parked_until().expect("parked I/O reports its wake-up");
    assert!(until <= Instant::now() + Duration::from_millis(1));
    let mut done = Vec::new();
    while done.len() < 35 {
        assert!(t0.elapsed() < Duration::from_secs(5), "parked I/O never released");
        done.extend(drive(&mut ch));
        std::thread::sleep(Duration::from_micros(200));
    }
    // Slices N..N+3 are needed; N may be nearly over when the limit is set.
    assert!(t0.elapsed() >= Duration::from_millis(2), "35 I/O at 10 per ms need four slices");
    let order: Vec<u64> = accepts(&ctl).iter().map(|a| a.1).collect();
    assert_eq!(order, (0..35).collect::<Vec<_>>(), "QoS must keep submission order");
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert!(ch.parked_until().is_none());
}

#[test]
fn qos_lifted_at_run_time_releases_parked_io() {
    let (bdev, _ctl) = StubBdev::new(|_| {});
    let (reg, _desc, mut ch) = open_stub(bdev);
    reg.set_qos("stub", QosLimits { iops: 10_000, bps: 0 }).expect("qos");
    for i in 0..50u64 {
        ch.submit(BdevIo::write(i, 1, IoVecs::alloc(512), i));
    }
    reg.set_qos("stub", QosLimits::default()).expect("lift");
    let mut done = Vec::new();
    ch.poll(&mut done);
    done.extend(drive(&mut ch));
    assert_eq!(done.len(), 50, "lifting the limit releases everything at the next poll");
    assert!(reg.set_qos("stub", QosLimits { iops: 12_345, bps: 0 }).is_err());
}

#[test]
fn flush_is_not_held_back_by_qos() {
    let (bdev, _ctl) = StubBdev::new(|_| {});
    let (reg, _desc, mut ch) = open_stub(bdev);
    reg.set_qos("stub", QosLimits { iops: 10_000, bps: 0 }).expect("qos");
    for i in 0..40u64 {
        ch.submit(BdevIo::write(i, 1, IoVecs::alloc(512), i));
    }
    ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 999));
    let mut done = Vec::new();
    ch.poll(&mut done);
    let mut tries = 0;
    while !done.iter().any(|c| c.tag == 999) {
        tries += 1;
        assert!(tries < 1000);
        ch.poll(&mut done);
    }
    assert!(done.len() < 41, "the flush overtook parked writes");
}

#[test]
fn reset_aborts_queued_io_on_every_channel() {
    // A module that refuses everything (NOMEM) and has no reset of its own.
    let (bdev, ctl) = StubBdev::new(|i| i.supports.reset = false);
    ctl.lock().expect("ctl").cap = Some(0);
    let (_reg, desc, mut a) = open_stub(bdev);
    for i in 0..3u64 {
        a.submit(BdevIo::write(i, 1, IoVecs::alloc(512), 10 + i));
    }
    let mut done = Vec::new();
    a.poll(&mut done);
    assert!(done.is_empty(), "NOMEM-queued I/O waits");
    let mut b = desc.channel().expect("second channel");
    b.submit(BdevIo::no_data(IoKind::Reset, 0, 0, 77));
    assert_eq!(drive(&mut b), vec![Completion { tag: 77, result: Ok(()) }]);
    a.poll(&mut done);
    done.sort_by_key(|c| c.tag);
    let want: Vec<Completion> =
        (10..13).map(|tag| Completion { tag, result: Err(IoError::Aborted) }).collect();
    assert_eq!(done, want, "queued I/O of the other channel must be aborted by the reset");
}

#[test]
fn io_fails_while_a_reset_is_in_the_module_and_flows_after() {
    let (bdev, ctl) = StubBdev::new(|i| i.supports.reset = true);
    let (_reg, desc, mut a) = open_stub(bdev);
    let mut b = desc.channel().expect("second channel");
    ctl.lock().expect("ctl").hold_all = true;
    b.submit(BdevIo::no_data(IoKind::Reset, 0, 0, 1));
    let mut done = Vec::new();
    b.poll(&mut done);
    assert!(done.is_empty(), "the reset is held in the module");
    a.poll(&mut done); // `a` catches up with the reset (nothing of its own to abort)
    assert!(
        a.submit_direct(BdevIo::write(0, 1, IoVecs::alloc(512), 9)).is_err(),
        "no direct I/O while a reset is in progress"
    );
    a.submit(BdevIo::write(0, 1, IoVecs::alloc(512), 2));
    assert_eq!(drive(&mut a), vec![Completion { tag: 2, result: Err(IoError::Aborted) }]);
    ctl.lock().expect("ctl").hold_all = false;
    assert_eq!(drive(&mut b), vec![Completion { tag: 1, result: Ok(()) }]);
    a.submit(BdevIo::write(0, 1, IoVecs::alloc(512), 3));
    assert_eq!(drive(&mut a), vec![Completion { tag: 3, result: Ok(()) }]);
}

/// A byte limit charges each read or write its length in bytes (blocks × block size): at 10 MiB/s
/// (10,485 bytes per 1 ms slice) a 1 MiB read overdraws about 100 slices, so the next one waits.
#[test]
fn qos_byte_limit_charges_the_request_length() {
    let (bdev, ctl) = StubBdev::new(|_| {});
    let (reg, _desc, mut ch) = open_stub(bdev);
    reg.set_qos("stub", QosLimits { iops: 0, bps: 10 << 20 }).expect("qos");
    let blocks = (1u64 << 20) / 512;
    ch.submit(BdevIo::read(0, blocks, IoVecs::alloc(1 << 20), 1));
    assert_eq!(accepts(&ctl).len(), 1, "a full slice admits the first read");
    ch.submit(BdevIo::read(blocks, blocks, IoVecs::alloc(1 << 20), 2));
    assert_eq!(accepts(&ctl).len(), 1, "the first read's 1 MiB overdraws the byte budget");
    assert!(ch.parked_until().is_some(), "the second read is parked");
    reg.set_qos("stub", QosLimits::default()).expect("lift");
    let mut done = Vec::new();
    ch.poll(&mut done);
    done.extend(drive(&mut ch));
    assert_eq!(done.len(), 2);
}
