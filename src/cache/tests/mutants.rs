//! Tests written against mutants that the other cache tests let through (issue 12): each one checks
//! a behaviour a mutant of the named function changes.
//!
//! ```text
//!  HoldBdev cache device / malloc core ─► CacheBdev ─► Channel ◄── test (+ crate::testlog for log records)
//! ```
//!
//! # Design
//! Child module of `cache::tests`: it uses that module's helpers (devices, configs, `read`/`write`).

use super::*;

/// A write whose cache-device write fails logs "write to a dirty line failed" only when its line
/// held dirty sectors there (dirty data is lost): not for a clean line (`CacheChannel::finalize`).
#[test]
fn a_failed_write_is_logged_as_lost_dirty_data_only_on_a_dirty_line() {
    let lost = |logs: &[String]| logs.iter().filter(|l| l.contains("write to a dirty line failed")).count();
    let fail_data_writes = |cctl: &Arc<std::sync::Mutex<HoldCtl>>, bdev: &CacheBdev| {
        let mut h = lock(cctl);
        h.range = Some(bdev.shared().data_offset / BS..cache_dev_bytes(64, 4096) / BS);
        h.allow = usize::MAX;
        h.fail_writes = true;
    };
    // Write-through: line 0 cached, clean.
    {
        let (reg, cctl) = held_cdev_setup();
        let mut c = cfg(Mode::Wt);
        c.seq_cutoff = SeqCutoff::Off;
        let (bdev, _desc, mut ch) = open_cache(&reg, &c);
        write(&mut ch, 0, &fill(1, 4096));
        fail_data_writes(&cctl, &bdev);
        let (r, logs) = crate::testlog::capture(|| {
            run(&mut ch, vec![BdevIo::write(0, 8, IoVecs::from_slice(&fill(2, 4096)), 1)])
        });
        assert_eq!(r[&1], Err(crate::bdev::IoError::Errno(libc::EIO)));
        assert_eq!(lost(&logs), 0, "a failed write to a clean line loses no dirty data: {logs:?}");
    }
    // Write-back: line 0 dirty (all of it, and a write over all of it).
    {
        let (reg, cctl) = held_cdev_setup();
        let c = wb_records_on_demand();
        let (bdev, _desc, mut ch) = open_cache(&reg, &c);
        write(&mut ch, 0, &fill(1, 4096));
        fail_data_writes(&cctl, &bdev);
        let (r, logs) = crate::testlog::capture(|| {
            run(&mut ch, vec![BdevIo::write(0, 8, IoVecs::from_slice(&fill(2, 4096)), 1)])
        });
        assert_eq!(r[&1], Err(crate::bdev::IoError::Errno(libc::EIO)));
        assert_eq!(lost(&logs), 1, "the lost dirty line is logged once: {logs:?}");
        assert!(logs
            .iter()
            .any(|l| l.starts_with("ERROR: cache: write to a dirty line failed: core id 0 line 0")));
    }
}

/// Every mode and cleaner policy has its flag spelling, parses back from it, and survives the
/// atomic's round trip; only 4–64 KiB powers of two are line sizes.
#[test]
fn mode_and_policy_spellings_and_line_sizes() {
    let spellings: Vec<&str> = Mode::ALL.iter().map(|m| m.as_str()).collect();
    assert_eq!(spellings, ["wt", "wb", "wa", "pt", "wi", "wo"]);
    for m in Mode::ALL {
        assert_eq!(Mode::parse(m.as_str()), Some(m));
        assert_eq!(Mode::from_u8(m.to_u8()), m);
    }
    assert_eq!(Mode::parse("xx"), None);
    assert_eq!(Mode::from_u8(200), Mode::Pt, "an unknown value is pass-through");
    let policies = [CleanerPolicy::Alru, CleanerPolicy::Acp, CleanerPolicy::Nop].map(|p| p.as_str());
    assert_eq!(policies, ["alru", "acp", "nop"]);
    for (b, ok) in [
        (4096, true),
        (8192, true),
        (65536, true),
        (2048, false),
        (131072, false),
        (12288, false),
        (0, false),
    ] {
        assert_eq!(valid_line_size(b), ok, "{b}");
    }
}

/// The superblock of cache device `cdev`, copy A (`false`) or B (`true`), with its sequence number
/// (`None`: that copy holds no valid superblock).
fn sb_copy(reg: &Registry, b: bool) -> Option<(layout::Superblock, u64)> {
    let cdev = reg.open("cdev", false).unwrap();
    let mut cch = cdev.channel().unwrap();
    let both = read(&mut cch, 0, layout::MD_OFFSET / BS);
    let mut one = vec![0u8; layout::MD_OFFSET as usize];
    let at = if b { layout::SB_BYTES as usize } else { 0 };
    one[at..at + layout::SB_BYTES as usize].copy_from_slice(&both[at..at + layout::SB_BYTES as usize]);
    layout::decode_superblock(&one).ok()
}

/// Superblock writes alternate between the two copies (a torn write only damages the one being
/// written), each with the next sequence number, and never touch the line records.
#[test]
fn superblock_writes_alternate_between_the_copies() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let (bdev, desc, mut ch) = open_cache(&reg, &cfg(Mode::Wb));
    write(&mut ch, 0, &fill(1, 4096));
    // Written so far: "in use" at the instance's start (seq 1), and with the core added (seq 2).
    assert_eq!(stats(&bdev)["shared_cache"]["superblock_seq"], 2);
    let (a, b) = (sb_copy(&reg, false).unwrap(), sb_copy(&reg, true).unwrap());
    assert_eq!((a.1, b.1), (2, 1));
    assert_eq!(a.0.cores.len(), 1);
    assert!(!a.0.clean_shutdown);
    drop(ch);
    drop(desc);
    let slot = wlock(&bdev.shared().map).lookup((0, 0)).unwrap();
    reg.unregister("c0").unwrap().shutdown().unwrap();
    let (a, b) = (sb_copy(&reg, false).unwrap(), sb_copy(&reg, true).unwrap());
    assert_eq!((a.1, b.1), (2, 3), "the clean shutdown's superblock goes to the other copy");
    assert!(b.0.clean_shutdown && !a.0.clean_shutdown);
    let r = device_record(&reg, slot).unwrap();
    assert_eq!((r.used, r.core_line, r.dirty), (true, 0, 0xff), "the line's record");
}

/// A cache bdev dropped without a shutdown still stops its instance: records saved, superblock
/// marked clean.
#[test]
fn a_cache_bdev_dropped_without_shutdown_saves_its_cache_clean() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let bdev = CacheBdev::create(&cfg(Mode::Wt), &reg).unwrap();
    drop(bdev);
    let newest = [false, true].into_iter().filter_map(|b| sb_copy(&reg, b)).max_by_key(|c| c.1).unwrap();
    assert!(newest.0.clean_shutdown, "superblock seq {} says unclean", newest.1);
}

/// A core whose blocks are too small for 128 per line: only its info matters (it is refused
/// before any I/O).
struct TinyBlocks(crate::bdev::BdevInfo);

impl crate::bdev::Bdev for TinyBlocks {
    fn info(&self) -> &crate::bdev::BdevInfo {
        &self.0
    }
    fn create_channel(&self) -> Result<Box<dyn crate::bdev::ModuleChannel>, BdevError> {
        Err(BdevError::Module("no I/O".into()))
    }
}

/// A line holds at most 128 core blocks (64 KiB of 512-byte blocks is fine, of 256-byte blocks
/// not); the cache device's blocks may not be larger than the core's.
#[test]
fn line_and_block_size_limits() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(4, 65536), 1 << 20);
    let mut c = cfg(Mode::Wt);
    c.line_size = 65536;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    assert_eq!(bdev.info().optimal_io_boundary_blocks, 128, "I/O is split at line boundaries");
    write(&mut ch, 0, &fill(1, 65536));
    same(&read(&mut ch, 0, 128), &fill(1, 65536), "a 64 KiB line");

    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(4, 65536), 1 << 20);
    reg.register(Arc::new(TinyBlocks(crate::bdev::BdevInfo::new("tiny", "test", 256, 4096)))).unwrap();
    c.core = "tiny".into();
    let e = CacheBdev::create(&c, &reg).err().unwrap().to_string();
    assert!(e.contains("holds more than 128 blocks of 256 B"), "{e}");

    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("cdev", cache_dev_bytes(64, 4096), 4096).unwrap())).unwrap();
    reg.register(Arc::new(MallocBdev::new("core0", 1 << 20, 512).unwrap())).unwrap();
    let e = CacheBdev::create(&cfg(Mode::Wt), &reg).err().unwrap().to_string();
    assert!(e.contains("has 4096 B blocks, larger than the core's 512 B"), "{e}");
}

/// A second cache bdev on a shared cache device must use the same cleaner.
#[test]
fn a_shared_cache_refuses_another_cleaner() {
    let mut a = cfg(Mode::Wb);
    a.cleaner = CleanerPolicy::Acp;
    let (reg, b, _ca, _cb) = shared_pair(&a);
    reg.register(Arc::new(MallocBdev::new("core2", 1 << 20, 512).unwrap())).unwrap();
    let mut bad = b.clone();
    bad.name = "c2".into();
    bad.core = "core2".into();
    bad.cleaner = CleanerPolicy::Nop;
    let e = CacheBdev::create(&bad, &reg).err().unwrap().to_string();
    assert!(e.contains("must agree: cleaner=nop (the shared cache uses acp)"), "{e}");
}

/// Leaving write-back cleans, but only for a mode that writes nothing dirty: write-back to
/// write-only keeps the dirty lines.
#[test]
fn switching_between_write_back_and_write_only_cleans_nothing() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    write(&mut ch, 0, &fill(1, 4096));
    let dirty = || stats(&bdev)["dirty_lines"].as_u64().unwrap();
    assert_eq!(dirty(), 1);
    bdev.set_mode(Mode::Wo).unwrap();
    assert_eq!(dirty(), 1, "wb → wo");
    bdev.set_mode(Mode::Wb).unwrap();
    assert_eq!(dirty(), 1, "wo → wb");
    bdev.set_mode(Mode::Wt).unwrap();
    assert_eq!(dirty(), 0, "wb → wt");
}

/// A new cache's uuid is 16 random bytes in hex.
#[test]
fn a_new_cache_has_a_hex_uuid() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let (bdev, _desc, _ch) = open_cache(&reg, &cfg(Mode::Wt));
    let uuid = stats(&bdev)["shared_cache"]["uuid"].as_str().unwrap().to_string();
    assert!(
        uuid.len() == 32 && uuid.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{uuid}"
    );
    assert_eq!(sb_copy(&reg, false).unwrap().0.uuid, uuid);
}

/// A cache device whose instance stopped (its cache bdevs shut down and dropped) can be opened
/// again and shared again: the dead instance is forgotten, not found instead of the live one.
#[test]
fn a_reopened_cache_device_can_be_shared_again() {
    let a = cfg(Mode::Wt);
    let (reg, b, ca, cb) = shared_pair(&a);
    for (n, bdev) in [("c0", ca), ("c1", cb)] {
        reg.unregister(n).unwrap().shutdown().unwrap();
        drop(bdev);
    }
    let ca = CacheBdev::create(&a, &reg).unwrap();
    let cb = CacheBdev::create(&b, &reg).unwrap();
    assert!(Arc::ptr_eq(&ca.inst, &cb.inst), "one instance per cache device");
}

/// A record change nobody waits for (a line cleaned by a flush) is written by a lazy round within
/// `md_lazy_ms`, and not before: with a long `md_lazy_ms` the device keeps the old record.
#[test]
fn a_cleaned_lines_record_is_written_lazily() {
    for lazy_ms in [3_600_000, 20] {
        let reg = Registry::new();
        setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
        let mut c = wb_records_on_demand();
        c.md_lazy_ms = lazy_ms;
        let (bdev, _desc, mut ch) = open_cache(&reg, &c);
        write(&mut ch, 0, &fill(1, 4096));
        let slot = wlock(&bdev.shared().map).lookup((0, 0)).unwrap();
        let dirty = || device_record(&reg, slot).map_or(0, |r| r.dirty);
        assert_eq!(dirty(), 0xff);
        bdev.clean_all().unwrap();
        assert_eq!(stats(&bdev)["dirty_lines"], 0);
        if lazy_ms > 1000 {
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(dirty(), 0xff, "a lazy round long before md_lazy_ms");
        } else {
            wait_until_true("a lazy round", || dirty() == 0);
        }
    }
}

/// `clean_all` (a mode switch's cleaning) waits for the write-back and reports its failure.
#[test]
fn a_failed_clean_all_reports_its_error() {
    let (reg, ctl) = held_core_setup();
    let (bdev, _desc, mut ch) = open_cache(&reg, &wb_records_on_demand());
    write(&mut ch, 0, &fill(1, 4096));
    {
        let mut h = lock(&ctl);
        h.range = Some(0..2048);
        h.allow = usize::MAX;
        h.fail_writes = true;
    }
    assert!(bdev.clean_all().is_err(), "the core refused the write-back");
    assert_eq!(stats(&bdev)["dirty_lines"], 1);
    lock(&ctl).fail_writes = false;
    bdev.clean_all().unwrap();
    assert_eq!(stats(&bdev)["dirty_lines"], 0);
}

/// A removed core's cache bdev writes its dirty lines back (waiting for them) before it reports
/// what is at risk; its clean lines are freed; a core with nothing cached frees nothing. All of it
/// is logged on the remover's thread.
#[test]
fn core_removal_logs_the_write_back_and_the_freed_lines() {
    let mut a = cfg(Mode::Wb);
    a.cleaner = CleanerPolicy::Nop;
    a.seq_cutoff = SeqCutoff::Off;
    let (reg, _, ca, _cb) = shared_pair(&a);
    {
        let d = reg.open("c0", true).unwrap();
        let mut ch = d.channel().unwrap();
        write(&mut ch, 0, &fill(1, 4096));
        read(&mut ch, 64, 8);
    }
    let ((), logs) = crate::testlog::capture(|| drop(reg.unregister("core0").unwrap()));
    let has = |s: &str| logs.iter().any(|l| l.contains(s));
    assert!(has("INFO: cache bdev 'c0': dirty lines of core 'core0' written back in"), "{logs:#?}");
    assert!(!has("writing back to core"), "{logs:#?}");
    assert!(has("WARN: cache bdev 'c0': core 'core0' removed with no dirty data at risk"), "{logs:#?}");
    assert!(has("INFO: cache 'cdev': 2 clean lines of core 'core0' freed"), "{logs:#?}");
    assert_eq!(ca.dirty_at_risk(), 0);
    let ((), logs) = crate::testlog::capture(|| drop(reg.unregister("core1").unwrap()));
    assert!(!logs.iter().any(|l| l.contains("freed")), "nothing of core1 was cached: {logs:#?}");
}

/// A cache device removed under dirty lines reports them per core: the count and the core line
/// ranges; a clean one says so.
#[test]
fn cache_device_removal_logs_the_dirty_line_ranges() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.seq_cutoff = SeqCutoff::Off;
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    for line in [0, 1, 2, 5, 9] {
        write(&mut ch, line * 8, &fill(line, 4096));
    }
    let ((), logs) = crate::testlog::capture(|| drop(reg.unregister("cdev").unwrap()));
    let has = |s: &str| logs.iter().any(|l| l.contains(s));
    assert!(
        has("ERROR: cache 'cdev': cache device 'cdev' removed: 5 dirty lines of core id 0 are at risk \
             (line size 4096 B, core lines 0-2,5-5,9-9)"),
        "{logs:#?}"
    );
    assert!(has("ERROR: cache device 'cdev' removed with 5 dirty lines"), "{logs:#?}");
    let _ = drive(&mut ch);

    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let (_bdev, _desc, mut ch) = open_cache(&reg, &cfg(Mode::Wt));
    write(&mut ch, 0, &fill(1, 4096));
    let ((), logs) = crate::testlog::capture(|| drop(reg.unregister("cdev").unwrap()));
    assert!(
        logs.iter().any(|l| l.contains("WARN: cache device 'cdev' removed: the cache was clean")),
        "{logs:#?}"
    );
    let _ = drive(&mut ch);
}

/// Once the owner thread has stopped, a request for it is answered at once with `Removed`.
#[test]
fn a_request_after_the_instance_stopped_is_refused() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let (bdev, desc, ch) = open_cache(&reg, &cfg(Mode::Wt));
    let sh = bdev.shared().clone();
    drop(ch);
    drop(desc);
    reg.unregister("c0").unwrap().shutdown().unwrap();
    assert!(sh.stopped.load(Ordering::Acquire));
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Flush(None, mb.clone(), 7));
    sh.send(OwnerReq::Persist(mb.clone(), 8));
    let deadline = Some(Instant::now() + Duration::from_secs(20));
    assert_eq!(mb.wait_until(7, deadline), Some(Err(IoError::Removed)));
    assert_eq!(mb.wait_until(8, deadline), Some(Err(IoError::Removed)));
}

/// A request waiting for a line another channel holds is woken through its channel's wait fd when
/// the line is released (a poller asleep on that fd would otherwise never retry it).
#[test]
fn a_released_line_wakes_the_channel_waiting_for_it() {
    use crate::bdev::ModuleChannel;
    let (reg, ctl) = held_core_setup();
    let mut c = cfg(Mode::Wt);
    c.seq_cutoff = SeqCutoff::Off;
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..2048); // core writes held
    let mut a = engine::CacheChannel::new(&bdev).unwrap();
    let mut b = engine::CacheChannel::new(&bdev).unwrap();
    let data = fill(1, 4096);
    assert!(a.submit(BdevIo::write(0, 8, IoVecs::from_slice(&data), 1)).is_ok());
    let deadline = Instant::now() + Duration::from_secs(20);
    while lock(&ctl).caught == 0 {
        let _ = a.poll(&mut Vec::new());
        assert!(Instant::now() < deadline, "a's core write never came");
    }
    assert!(b.submit(BdevIo::write(0, 8, IoVecs::from_slice(&data), 2)).is_ok());
    let mut done = Vec::new();
    let _ = b.poll(&mut done);
    assert!(done.is_empty(), "b waits for a's line");
    let fd = b.wait_fd().unwrap();
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd on the stack; timeout 0.
    assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 0, "b's wait fd is quiet while it waits");
    lock(&ctl).allow = usize::MAX;
    let mut done_a = Vec::new();
    while done_a.is_empty() {
        let _ = a.poll(&mut done_a);
        assert!(Instant::now() < deadline, "a never completed");
    }
    // SAFETY: one valid pollfd on the stack; 20 s at most.
    assert_eq!(unsafe { libc::poll(&mut p, 1, 20_000) }, 1, "b was not woken when a released the line");
    while done.is_empty() {
        let _ = b.poll(&mut done);
        assert!(Instant::now() < deadline, "b never completed");
    }
    assert_eq!(done[0].result, Ok(()));
}

/// `load_map` rebuilds the map from the records as a load does: after a clean shutdown every valid
/// sector, after an unclean one only the dirty ones; free records keep their sequence numbers;
/// unknown cores and a core line named twice are corruption; the counts it returns are the lines
/// loaded and the dirty ones among them. A fast load logs no progress.
#[test]
fn load_map_rebuilds_what_the_records_say() {
    use layout::LineRecord;
    let rec = |core_id: u16, core_line: u64, used: bool, valid: u128, dirty: u128| LineRecord {
        seq: 3,
        used,
        core_id,
        core_line,
        valid,
        dirty,
    };
    let image = |recs: &[(u32, LineRecord)]| {
        let mut img = vec![0u8; 2 * layout::PAGE_BYTES as usize];
        for (line, r) in recs {
            let page = (line / layout::LINES_PER_PAGE) as usize * layout::PAGE_BYTES as usize;
            layout::put_record(
                &mut img[page..page + layout::PAGE_BYTES as usize],
                line % layout::LINES_PER_PAGE,
                r,
            );
        }
        img
    };
    let core = |id: u16| layout::CoreEntry {
        id,
        cache_bdev: format!("c{id}"),
        core_bdev: format!("core{id}"),
        core_blocks: 2048,
        block_size: 512,
        stats: serde_json::Value::Null,
    };
    let mut sb = layout::Superblock {
        uuid: "ab".into(),
        line_size: 4096,
        mode: "wb".into(),
        cleaner: "nop".into(),
        num_lines: 40,
        cache_block_size: 512,
        data_offset: 16384,
        clean_shutdown: true,
        cores: vec![core(0), core(1)],
    };
    let recs = [
        (0, rec(0, 5, true, 0xff, 0x0f)),
        (1, rec(1, 6, true, 0x03, 0)),
        (2, LineRecord { seq: 9, ..rec(0, 7, false, 0xff, 0) }),
        (3, rec(0, 8, true, 0, 0)),
        (33, rec(1, 9, true, 0x10, 0x10)),
    ];
    let ((mut map, loaded, dirty), logs) =
        crate::testlog::capture(|| load_map(&sb, &image(&recs), 40, "cdev").unwrap());
    assert_eq!((loaded, dirty), (3, 2));
    let counts = |c: &map::Counters| (c.occupancy_lines, c.dirty_lines);
    assert_eq!((counts(map.counters(0)), counts(map.counters(1))), ((1, 1), (2, 1)));
    let line = |k| map.lookup(k).map(|s| (s, map.lines[s as usize].valid(), map.lines[s as usize].dirty));
    assert_eq!(line((0, 5)), Some((0, 0xff, 0x0f)));
    assert_eq!(line((1, 6)), Some((1, 0x03, 0)));
    assert_eq!(line((0, 7)), None);
    assert_eq!(line((0, 8)), None);
    assert_eq!(line((1, 9)), Some((33, 0x10, 0x10)));
    assert_eq!(map.lines[2].seq, 9, "a free line's record keeps its sequence");
    assert!(!logs.iter().any(|l| l.contains("records read")), "{logs:?}");
    sb.clean_shutdown = false;
    let (map, loaded, dirty) = load_map(&sb, &image(&recs), 40, "cdev").unwrap();
    assert_eq!((loaded, dirty), (2, 2));
    assert_eq!(map.lookup((0, 5)).map(|s| map.lines[s as usize].valid()), Some(0x0f), "dirty sectors only");
    assert_eq!(map.lookup((1, 6)), None);
    for (what, bad) in [
        ("unknown core", rec(7, 1, true, 1, 1)),
        ("line twice", rec(0, 5, true, 1, 1)),
        ("a core line no core has", rec(0, map::MAX_CORE_LINES, true, 1, 1)),
    ] {
        let mut r = recs.to_vec();
        r.push((4, bad));
        assert!(
            matches!(load_map(&sb, &image(&r), 40, "cdev"), Err(layout::LayoutError::Corrupt(_))),
            "{what}"
        );
    }
    assert!(matches!(load_map(&sb, &image(&recs)[..4096], 40, "cdev"), Err(layout::LayoutError::Corrupt(_))));
    // Progress every time some time has passed: here after every line loaded.
    let (_, logs) = crate::testlog::capture(|| {
        super::super::load_map_logging(&sb, &image(&recs), 40, "cdev", Duration::ZERO).unwrap()
    });
    assert_eq!(
        logs,
        ["INFO: cache 'cdev': load: 0/40 records read", "INFO: cache 'cdev': load: 33/40 records read"]
    );
}

/// A line touched again after exactly `num_lines / 8` other moves to the LRU head is no longer
/// among the most recent: it moves to the head, and the next eviction takes the real LRU line.
#[test]
fn a_touch_after_the_recent_window_moves_the_line() {
    let mut m = map::LineMap::new(16); // recent window: 2 moves
    let a = m.alloc((0, 1)).unwrap(); // clock 1
    let b = m.alloc((0, 2)).unwrap();
    let c = m.alloc((0, 3)).unwrap(); // clock 3: a moved 2 moves ago
    for i in [a, b, c] {
        m.set_bits(i, 1, 0, 0);
    }
    m.touch(a);
    for k in 4..17 {
        let i = m.alloc((0, k)).unwrap();
        m.set_bits(i, 1, 0, 0);
    }
    assert_eq!(m.free_lines(), 0);
    assert_eq!(m.alloc((0, 99)), Some(b), "b is the least recently used");
    assert_eq!(m.lookup((0, 1)), Some(a), "a was touched: kept");
}

/// Re-creating a cache bdev whose name a live shared instance knows, over another core, is refused:
/// its lines in the cache belong to the first core.
#[test]
fn a_known_cache_bdev_over_another_core_is_refused() {
    let a = cfg(Mode::Wt);
    let (reg, _b, ca, _cb) = shared_pair(&a);
    reg.unregister("c0").unwrap().shutdown().unwrap();
    drop(ca);
    reg.register(Arc::new(MallocBdev::new("core2", 1 << 20, 512).unwrap())).unwrap();
    let mut again = a.clone();
    again.core = "core2".into();
    let e = CacheBdev::create(&again, &reg).err().unwrap().to_string();
    assert!(e.contains("holds metadata of cache bdev 'c0' over core 'core0'"), "{e}");
    assert!(CacheBdev::create(&a, &reg).is_ok(), "over its own core it attaches again");
}

/// acp cleans from the start (every 10 ms, whatever alru's wake-up interval says); alru's first
/// round comes only after its wake-up interval.
#[test]
fn acp_cleans_at_once_and_alru_first_waits_its_interval() {
    for policy in [CleanerPolicy::Acp, CleanerPolicy::Alru] {
        let reg = Registry::new();
        setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
        let mut c = cfg(Mode::Wb);
        c.cleaner = policy;
        c.alru_wake_ms = 3_600_000;
        c.alru_stale_ms = 0;
        let (bdev, _desc, mut ch) = open_cache(&reg, &c);
        write(&mut ch, 0, &fill(1, 4096));
        let dirty = || stats(&bdev)["dirty_lines"].as_u64().unwrap();
        if policy == CleanerPolicy::Acp {
            let deadline = Instant::now() + Duration::from_secs(10);
            while dirty() != 0 {
                assert!(Instant::now() < deadline, "acp cleaned nothing in 10 s");
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(dirty(), 1, "alru cleaned before its first wake-up");
        }
    }
}

/// Formatting zeroes every record of the device, past the first MiB of records too (more than
/// 8192 lines), and nothing past them; the smallest caches format and load again.
#[test]
fn formatting_zeroes_the_whole_record_area() {
    let lines = 8300u64;
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(lines, 4096), 1 << 20);
    let (num_lines, data_offset) = layout::geometry(cache_dev_bytes(lines, 4096), 4096).unwrap();
    assert_eq!(u64::from(num_lines), lines);
    {
        // Old records everywhere (garbage), and data in the first lines.
        let cdev = reg.open("cdev", true).unwrap();
        let mut cch = cdev.channel().unwrap();
        write(
            &mut cch,
            layout::MD_OFFSET / BS,
            &vec![0xa5; (data_offset + 8192 - layout::MD_OFFSET) as usize],
        );
    }
    let mut c = cfg(Mode::Wt);
    c.load = LoadPolicy::Off;
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    let cdev = reg.open("cdev", false).unwrap();
    let mut cch = cdev.channel().unwrap();
    let area = read(&mut cch, layout::MD_OFFSET / BS, (data_offset - layout::MD_OFFSET) / BS);
    assert!(area.iter().all(|&b| b == 0), "a record left at byte {:?}", area.iter().position(|&b| b != 0));
    assert!(read(&mut cch, data_offset / BS, 16).iter().all(|&b| b == 0xa5), "the data area was written");
    drop(bdev);

    for lines in [1u64, 2] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(Mode::Wb);
        c.cleaner = CleanerPolicy::Nop;
        for load in [LoadPolicy::Auto, LoadPolicy::On] {
            let reg = Registry::new();
            file_setup(&reg, dir.path(), cache_dev_bytes(lines, 4096));
            c.load = load;
            let (bdev, desc, mut ch) = open_cache(&reg, &c);
            if load == LoadPolicy::Auto {
                write(&mut ch, 0, &fill(1, 4096));
            }
            same(&read(&mut ch, 0, 8), &fill(1, 4096), "line 0");
            assert_eq!(stats(&bdev)["dirty_lines"], 1, "{lines} lines, {load:?}");
            drop(ch);
            drop(desc);
            reg.unregister("c0").unwrap().shutdown().unwrap();
        }
    }
}

/// The control socket finds a registered cache bdev's own type through `as_any` (mode switch).
#[test]
fn a_registered_cache_bdev_is_found_as_itself() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let (bdev, _desc, _ch) = open_cache(&reg, &cfg(Mode::Wt));
    let b = reg.get("c0").unwrap();
    let found = b.as_any().and_then(|a| a.downcast_ref::<CacheBdev>()).expect("a cache bdev");
    assert!(std::ptr::eq(found, &*bdev));
}

/// The map's dirty-line queries: per core or all, only attached cores, never locked lines, at most
/// `max`, oldest first, and (`dirty_older_than`) only lines dirty since before the limit;
/// `dirty_keys` gives one core's dirty lines; `forget_clean` frees one core's clean, unlocked lines
/// whose records cannot say dirty, and counts them.
#[test]
fn the_maps_dirty_line_queries() {
    let mut m = map::LineMap::new(16);
    let line = |m: &mut map::LineMap, key: map::Key, dirty: u128, since: u64| {
        let i = m.alloc(key).unwrap();
        m.set_bits(i, 0xff, dirty, since);
        i
    };
    let a = line(&mut m, (0, 1), 1, 10);
    let b = line(&mut m, (1, 1), 1, 20);
    let c = line(&mut m, (0, 2), 1, 30);
    let d = line(&mut m, (0, 3), 0, 40); // clean
    let e = line(&mut m, (2, 1), 1, 5); // a core not attached
    let all = |_: u16| true;
    let attached = |c: u16| c != 2;
    assert_eq!(m.dirty_lines(None, &attached, 10), [a, b, c]);
    assert_eq!(m.dirty_lines(None, &all, 10), [e, a, b, c]);
    assert_eq!(m.dirty_lines(Some(0), &attached, 10), [a, c]);
    assert_eq!(m.dirty_lines(Some(1), &attached, 10), [b]);
    assert_eq!(m.dirty_lines(None, &attached, 2), [a, b]);
    assert_eq!(m.dirty_older_than(None, &attached, 10, 30), [a, b], "since < 30 only");
    assert_eq!(m.dirty_older_than(None, &attached, 10, 10), Vec::<u32>::new());
    assert!(m.try_lock(0, 1, 1, 77));
    assert_eq!(m.dirty_lines(None, &attached, 10), [b, c], "a is locked");
    let mut keys = m.dirty_keys(0);
    keys.sort_unstable();
    assert_eq!(keys, [(0, 1), (0, 2)]);
    assert_eq!(m.counters(0).dirty_lines, 2);
    assert_eq!(m.counters(0).occupancy_lines, 3);
    // forget_clean: core 0's clean, unlocked lines only.
    let f = line(&mut m, (0, 4), 0, 50); // clean, locked below
    assert!(m.try_lock(0, 4, 4, 78));
    let g = line(&mut m, (1, 2), 0, 60); // clean, another core
    assert_eq!(m.free_lines(), 16 - 7);
    assert_eq!(m.forget_clean(0), 1, "only d");
    assert_eq!(m.lookup((0, 3)), None);
    for (k, i) in [((0, 1), a), ((0, 2), c), ((0, 4), f), ((1, 2), g), ((1, 1), b)] {
        assert_eq!(m.lookup(k), Some(i), "{k:?} kept");
    }
    assert_eq!(m.free_lines(), 16 - 6);
    assert_eq!(m.counters(0).occupancy_lines, 3);
    let _ = d;
}

/// A line emptied while a read hit pinned it stays (the hit reads it) and is freed at the next
/// record round after the hit, once nothing dirty can be recorded for it.
#[test]
fn a_line_emptied_under_a_hit_is_freed_by_the_next_record_round() {
    let (reg, ctl) = held_cdev_setup();
    let mut c = wb_records_on_demand();
    c.mode = Mode::Wt;
    let (bdev, desc, mut ch) = open_cache(&reg, &c);
    let sh = bdev.shared().clone();
    write(&mut ch, 0, &fill(1, 4096)); // line 0: valid, clean
    let _release = ReleaseOnDrop(ctl.clone());
    {
        let mut h = lock(&ctl);
        h.reads = true;
        h.range = Some(sh.data_offset / BS..cache_dev_bytes(64, 4096) / BS);
    }
    let buf = IoVecs::alloc(4096);
    ch.submit(BdevIo::read(0, 8, buf, 1));
    let deadline = Instant::now() + Duration::from_secs(20);
    while lock(&ctl).caught == 0 {
        ch.poll(&mut Vec::new());
        assert!(Instant::now() < deadline, "the hit's read never came");
    }
    let mut ch2 = desc.channel().unwrap();
    assert_eq!(run(&mut ch2, vec![BdevIo::no_data(IoKind::Unmap, 0, 8, 2)])[&2], Ok(()));
    assert!(wlock(&sh.map).lookup((0, 0)).is_some(), "a pinned line stays");
    lock(&ctl).allow = usize::MAX;
    let mut done = Vec::new();
    while done.is_empty() {
        ch.poll(&mut done);
        assert!(Instant::now() < deadline, "the hit never completed");
    }
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Persist(mb.clone(), 1));
    assert_eq!(mb.wait_for(1), Ok(()));
    assert_eq!(wlock(&sh.map).lookup((0, 0)), None, "the emptied line is freed");
    assert_eq!(stats(&bdev)["occupancy_lines"], 0);
}

/// A write-back write that finds no clean line to take (every line dirty) goes to the core and
/// asks for cleaning: alru cleans a batch at once (long before its own schedule); nop never cleans.
#[test]
fn pressure_cleans_a_batch_now_except_with_nop() {
    for policy in [CleanerPolicy::Nop, CleanerPolicy::Alru] {
        let reg = Registry::new();
        setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
        let mut c = cfg(Mode::Wb);
        c.cleaner = policy;
        c.alru_wake_ms = 3_600_000;
        c.alru_stale_ms = 3_600_000;
        c.seq_cutoff = SeqCutoff::Off;
        let (bdev, _desc, mut ch) = open_cache(&reg, &c);
        for line in 0..64 {
            write(&mut ch, line * 8, &fill(line, 4096));
        }
        let dirty = || stats(&bdev)["dirty_lines"].as_u64().unwrap();
        assert_eq!(dirty(), 64);
        write(&mut ch, 100 * 8, &fill(100, 4096)); // no clean line: to the core
        if policy == CleanerPolicy::Nop {
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(dirty(), 64, "nop cleaned under pressure");
        } else {
            let deadline = Instant::now() + Duration::from_secs(20);
            while dirty() == 64 {
                assert!(Instant::now() < deadline, "alru did not clean under pressure");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// A 64 KiB line (128 sectors of 512 B) dirty up to its last sector is written back whole: the
/// run search stops at the line's end.
#[test]
fn a_line_dirty_to_its_last_sector_is_written_back_whole() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(4, 65536), 1 << 20);
    let mut c = wb_records_on_demand();
    c.line_size = 65536;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let (whole, last) = (fill(1, 65536), fill(2, 512));
    write(&mut ch, 0, &whole); // line 0: sectors 0..128 dirty
    write(&mut ch, 255, &last); // line 1: its last sector only
    assert_eq!(stats(&bdev)["dirty_lines"], 2);
    let mb = Mailbox::new().unwrap();
    bdev.shared().send(OwnerReq::Flush(None, mb.clone(), 1));
    let r = mb.wait_until(1, Some(Instant::now() + Duration::from_secs(10)));
    if r != Some(Ok(())) {
        // The owner thread is gone or stuck: leak the cache rather than hang in its shutdown.
        std::mem::forget((reg, bdev, _desc, ch));
        panic!("the flush: {r:?}");
    }
    let core = reg.open("core0", false).unwrap();
    let mut core_ch = core.channel().unwrap();
    same(&read(&mut core_ch, 0, 128), &whole, "line 0 on the core");
    same(&read(&mut core_ch, 255, 1), &last, "line 1's last sector on the core");
    assert_eq!(stats(&bdev)["dirty_lines"], 0);
}

/// Cleaning writes back exactly the dirty sectors of a line: a sector between two dirty ones that
/// the cache never held keeps the core's data (the cache device's copy of it is not data).
#[test]
fn only_dirty_sectors_are_written_back() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let old = fill(9, 8192);
    {
        let core = reg.open("core0", true).unwrap();
        let mut core_ch = core.channel().unwrap();
        write(&mut core_ch, 0, &old);
    }
    let (bdev, _desc, mut ch) = open_cache(&reg, &wb_records_on_demand());
    let (a, b, d) = (fill(1, 512), fill(2, 1024), fill(3, 512));
    write(&mut ch, 0, &a); // sector 0
    write(&mut ch, 2, &b); // sectors 2, 3
    write(&mut ch, 7, &d); // sector 7, the line's last
    bdev.clean_all().unwrap();
    let core = reg.open("core0", false).unwrap();
    let mut core_ch = core.channel().unwrap();
    let want = [&a[..], &old[512..1024], &b[..], &old[2048..3584], &d[..], &old[4096..]].concat();
    same(&read(&mut core_ch, 0, 16), &want, "the core after cleaning");
}

/// A flush is acknowledged only once every core's flush has completed (here core0's is held while
/// core1's completes), not when the flushes are sent or the first one completes.
#[test]
fn a_flush_is_acknowledged_after_every_core_flush() {
    let (reg, ctl, ca, _cb) = held_shared_pair();
    let desc = reg.open("c0", true).unwrap();
    let mut ch = desc.channel().unwrap();
    write(&mut ch, 80, &fill(1, 4096)); // line 10 of core0, dirty
    ca.clean_all().unwrap(); // nothing left to write back: the flush job goes straight to flushing
    let _release = ReleaseOnDrop(ctl.clone());
    {
        let mut h = lock(&ctl);
        h.flushes = true;
        h.range = Some(0..1); // core0's flushes
    }
    let mb = Mailbox::new().unwrap();
    ca.shared().send(OwnerReq::Flush(None, mb.clone(), 1));
    let r = mb.wait_until(1, Some(Instant::now() + Duration::from_secs(1)));
    assert_eq!(r, None, "acknowledged while core0's flush is held");
    assert!(lock(&ctl).caught >= 1, "core0 was flushed");
    lock(&ctl).allow = usize::MAX;
    assert_eq!(mb.wait_until(1, Some(Instant::now() + Duration::from_secs(20))), Some(Ok(())));
}

/// A flush of more than 1000 dirty lines says so on the owner thread, when it starts and when it
/// ends; one of 1000 lines says nothing.
#[test]
fn a_large_flush_is_logged() {
    for n in [1000u64, 1001] {
        let reg = Registry::new();
        reg.register(Arc::new(MallocBdev::new("cdevlog", cache_dev_bytes(1024, 4096), 512).unwrap()))
            .unwrap();
        reg.register(Arc::new(MallocBdev::new("core0", 8 << 20, 512).unwrap())).unwrap();
        let mut c = CacheConfig::new("c0", "cdevlog", "core0");
        c.mode = Mode::Wb;
        c.cleaner = CleanerPolicy::Nop;
        c.seq_cutoff = SeqCutoff::Off;
        let (bdev, _desc, mut ch) = open_cache(&reg, &c);
        let data = fill(1, 4096);
        for line in 0..n {
            write(&mut ch, line * 8, &data);
        }
        assert_eq!(stats(&bdev)["dirty_lines"], n);
        let (r, logs) = crate::testlog::capture_named(&["cache-cdevlog"], || bdev.clean_all());
        r.unwrap();
        let has = |s: &str| logs.iter().any(|l| l.contains(s));
        let (start, end) =
            (has(&format!("flush: cleaning {n} dirty lines")), has(&format!("flush: {n} lines cleaned in")));
        assert_eq!((start, end), (n > 1000, n > 1000), "{n} lines: {logs:#?}");
    }
}

/// Polls nothing, waits (60 s at most) until `cond` holds.
#[track_caller]
fn wait_until_true(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not after 60 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A flush's snapshot holds a dirty line that an unmap in flight (so the line is locked and no
/// round picks it) then invalidates: once the line is no longer dirty the flush is done with it and
/// completes (`check_jobs` keeps only the dirty lines of attached cores: a clean one would never be
/// written back and the flush would never end).
#[test]
fn a_flush_is_done_with_a_line_unmapped_before_its_write_back() {
    let (reg, ctl) = held_core_setup();
    let (bdev, _desc, mut ch) = open_cache(&reg, &wb_records_on_demand());
    let sh = bdev.shared().clone();
    write(&mut ch, 0, &fill(1, 4096)); // line 0: dirty
    let _release = ReleaseOnDrop(ctl.clone());
    {
        let mut h = lock(&ctl);
        h.range = Some(0..8);
        h.unmaps = true;
    }
    ch.submit(BdevIo::no_data(IoKind::Unmap, 0, 8, 1));
    let early = poll_until(&mut ch, "the unmap reaching the core", |_| lock(&ctl).caught == 1);
    assert!(early.is_empty());
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Flush(None, mb.clone(), 2));
    wait_until_true("the owner taking the flush", || lock(&sh.requests).is_empty());
    // The job is made right after its request is taken; line 0 is still dirty (and locked) then.
    assert_eq!(mb.wait_until(2, Some(Instant::now() + Duration::from_millis(300))), None);
    {
        let m = rlock(&sh.map);
        assert!(m.lookup((0, 0)).is_some_and(|s| m.lines[s as usize].dirty == 0xff));
    }
    lock(&ctl).allow = usize::MAX;
    let r = poll_until(&mut ch, "the unmap", |d| !d.is_empty());
    assert_eq!(r[0].result, Ok(()));
    let r = mb.wait_until(2, Some(Instant::now() + Duration::from_secs(20)));
    if r != Some(Ok(())) {
        // Shutdown would wait for the flush forever: leave this cache running, and fail.
        std::mem::forget((reg, bdev, _desc, ch));
        panic!("the flush never ended after its only line was unmapped: {r:?}");
    }
}

/// Shutdown flushes the cache device, marks the superblock clean and answers only after its final
/// record round is written (`try_finish` waits while a record round is in flight).
#[test]
fn shutdown_flushes_the_cache_device_after_its_final_records() {
    let (reg, ctl) = held_cdev_setup();
    let (bdev, _desc, mut ch) = open_cache(&reg, &wb_records_on_demand());
    let sh = bdev.shared().clone();
    write(&mut ch, 0, &fill(1, 4096));
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(layout::MD_OFFSET / BS..sh.data_offset / BS);
    let flushes = || lock(&ctl).submitted.iter().filter(|(k, _)| *k == IoKind::Flush).count();
    let before = flushes();
    let inst = bdev.inst.clone();
    let stop = std::thread::spawn(move || inst.stop());
    wait_until_true("the final record round", || lock(&ctl).caught >= 1);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        assert!(!stop.is_finished(), "shutdown ended while its final records were in flight");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(flushes(), before, "the cache device was flushed before its final records were written");
    lock(&ctl).allow = usize::MAX;
    stop.join().unwrap().unwrap();
    assert!(flushes() > before, "no final flush");
    let newest = [sb_copy(&reg, false), sb_copy(&reg, true)].into_iter().flatten().max_by_key(|c| c.1);
    assert!(newest.is_some_and(|(sb, _)| sb.clean_shutdown), "the superblock does not say clean");
}

/// A flush that arrives during shutdown (after the final records) is cleaned before the thread
/// exits; if its core goes away while its round's write-back is in flight, the flush is done (the
/// core's lines no longer count), but shutdown still waits for the round (`try_finish`).
#[test]
fn shutdown_waits_for_a_cleaning_round_in_flight() {
    let reg = Registry::new();
    let (cdev, cctl) = HoldBdev::new("cdev", cache_dev_bytes(64, 4096));
    reg.register(cdev).unwrap();
    let (core, ctl) = HoldBdev::new("core0", 1 << 20);
    reg.register(core).unwrap();
    let (bdev, _desc, mut ch) = open_cache(&reg, &wb_records_on_demand());
    let sh = bdev.shared().clone();
    write(&mut ch, 0, &fill(1, 4096)); // line 0: dirty
    let _release = (ReleaseOnDrop(cctl.clone()), ReleaseOnDrop(ctl.clone()));
    {
        let mut h = lock(&cctl);
        h.range = Some(0..1); // the cache device's flushes (and superblock copy 0, written later)
        h.flushes = true;
    }
    lock(&ctl).range = Some(0..8); // line 0's write-back to the core
    let inst = bdev.inst.clone();
    let stop = std::thread::spawn(move || inst.stop());
    wait_until_true("the final cache flush", || lock(&cctl).caught == 1);
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Flush(Some(bdev.core_id), mb.clone(), 1));
    wait_until_true("the write-back of line 0", || lock(&ctl).caught == 1);
    // The core goes away: line 0 no longer counts for the flush, which ends.
    lock(&sh.cores).get(&bdev.core_id).unwrap().removed.store(true, Ordering::Release);
    assert_eq!(mb.wait_until(1, Some(Instant::now() + Duration::from_secs(20))), Some(Ok(())));
    lock(&cctl).allow = usize::MAX; // the final flush completes
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        assert!(!stop.is_finished(), "shutdown ended while a cleaning round was in flight");
        std::thread::sleep(Duration::from_millis(10));
    }
    lock(&ctl).allow = usize::MAX;
    stop.join().unwrap().unwrap();
}

/// The 128 bytes of cache line `slot`'s two record slots as the cache device holds them now.
fn record_slots(reg: &Registry, slot: u32) -> Vec<u8> {
    let cdev = reg.open("cdev", false).unwrap();
    let mut cch = cdev.channel().unwrap();
    let page = slot / layout::LINES_PER_PAGE;
    let bytes = read(&mut cch, layout::page_offset(page) / BS, layout::PAGE_BYTES / BS);
    let i = (slot % layout::LINES_PER_PAGE) as usize * layout::LINE_MD_BYTES as usize;
    bytes[i..i + layout::LINE_MD_BYTES as usize].to_vec()
}

/// Each record write of a line goes to the other slot than the one before (its sequence number
/// picks it), so a torn record write leaves the previous record whole (`start_md` numbers them).
#[test]
fn record_writes_alternate_between_a_lines_two_slots() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let (bdev, _desc, mut ch) = open_cache(&reg, &wb_records_on_demand());
    let sh = bdev.shared().clone();
    write(&mut ch, 0, &fill(1, 4096)); // line 0: recorded dirty
    let slot = wlock(&sh.map).lookup((0, 0)).unwrap();
    bdev.clean_all().unwrap();
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Persist(mb.clone(), 1)); // line 0 recorded clean
    assert_eq!(mb.wait_until(1, Some(Instant::now() + Duration::from_secs(20))), Some(Ok(())));
    let raw = record_slots(&reg, slot);
    let one = |k: usize| {
        let mut b = vec![0u8; layout::LINE_MD_BYTES as usize];
        let r = k * layout::SLOT_BYTES..(k + 1) * layout::SLOT_BYTES;
        b[r.clone()].copy_from_slice(&raw[r]);
        layout::decode_line(&b, slot).unwrap()
    };
    let (Some(a), Some(b)) = (one(0), one(1)) else { panic!("a record slot of line 0 is empty") };
    let (old, new) = if a.seq < b.seq { (a, b) } else { (b, a) };
    assert_eq!(new.seq, old.seq + 1);
    assert_eq!((old.dirty, new.dirty), (0xff, 0), "old {old:?}, new {new:?}");
}

/// The race of `rewrite_while_the_clean_record_is_in_flight_is_acknowledged_after_its_own_record`
/// for an unmap: while a record round writing "clean" for a line the device records dirty is in
/// flight, the device may still say dirty (`start_md`'s `disk_dirty |= dirty`), so an unmap of that
/// line is acknowledged only after a round of its own has recorded the invalidation.
#[test]
fn an_unmap_during_a_clean_record_round_waits_for_its_own_record() {
    let (reg, ctl) = held_cdev_setup();
    let (bdev, _desc, mut ch) = open_cache(&reg, &wb_records_on_demand());
    let sh = bdev.shared().clone();
    let waiters = || sh.md_waiters.load(Ordering::Acquire);
    write(&mut ch, 0, &fill(1, 4096)); // line 0: recorded dirty
    flush(&mut ch); // cleaned; the device still says dirty
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(layout::MD_OFFSET / BS..sh.data_offset / BS);
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Persist(mb.clone(), 1));
    wait_until_true("the record round", || lock(&ctl).caught >= 1);
    let w = waiters();
    ch.submit(BdevIo::no_data(IoKind::Unmap, 0, 8, 7));
    let early = poll_until(&mut ch, "the unmap's invalidation", |_| {
        let m = wlock(&sh.map);
        m.lookup((0, 0)).map_or(true, |s| m.lines[s as usize].valid() == 0)
    });
    assert!(early.is_empty(), "the unmap was acknowledged while the device may still record line 0 dirty");
    lock(&ctl).allow = usize::MAX;
    assert_eq!(mb.wait_until(1, Some(Instant::now() + Duration::from_secs(20))), Some(Ok(())));
    let r = drive(&mut ch);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].result, Ok(()));
    assert_eq!(waiters(), w + 1, "the unmap waited for a record round of its own");
    let slot = wlock(&sh.map).lookup((0, 0));
    if let Some(s) = slot {
        assert_eq!(device_record(&reg, s).map_or(0, |r| r.dirty), 0);
    }
}

/// One record round asked for and answered: the owner thread has run a whole loop pass since.
fn owner_pass(sh: &Shared) {
    let mb = Mailbox::new().unwrap();
    for t in [1, 2] {
        sh.send(OwnerReq::Persist(mb.clone(), t));
        assert_eq!(mb.wait_until(t, Some(Instant::now() + Duration::from_secs(20))), Some(Ok(())));
    }
}

/// True when core line `line` is dirty in the cache.
fn line_dirty(sh: &Shared, line: u64) -> bool {
    let m = rlock(&sh.map);
    m.lookup((0, line)).is_some_and(|s| m.lines[s as usize].dirty != 0)
}

/// Waits (10 s at most) until core line `line` is clean; false if it never is.
fn cleaned_within(sh: &Shared, line: u64, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    while line_dirty(sh, line) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// `acp` with the clock stepped by hand (`Shared::frozen_ms`): after a batch that was not full it
/// waits 10 ms before the next one; a line dirtied meanwhile is cleaned once the clock gets there,
/// not before (`start_clean`: the `now >= next_clean_ms` guard and `now + 10`).
#[test]
fn acp_waits_10_ms_after_a_partial_batch() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Acp;
    c.seq_cutoff = SeqCutoff::Off;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let sh = bdev.shared().clone();
    let f = sh.now_ms() + 1000;
    sh.frozen_ms.store(f, Ordering::Release);
    // Two whole loop passes at f: one of them ran acp (nothing dirty: not a full batch), so the
    // next run is due at f + 10.
    owner_pass(&sh);
    write(&mut ch, 0, &fill(1, 4096));
    owner_pass(&sh);
    assert!(!cleaned_within(&sh, 0, Duration::from_secs(1)), "acp ran again before its 10 ms were up");
    sh.frozen_ms.store(f + 10, Ordering::Release);
    assert!(cleaned_within(&sh, 0, Duration::from_secs(10)), "acp did not run 10 ms after its last batch");
}

/// `alru` with the clock stepped by hand: it runs every `alru_wake_ms` (the first time after one
/// interval), and then cleans the lines dirty for `alru_stale_ms` or more (exactly that long too);
/// a line stale in between waits for the next run (`start_clean`'s alru arm).
#[test]
fn alru_cleans_lines_exactly_stale_at_each_wake_up_only() {
    const STALE: u64 = 100;
    const WAKE: u64 = 1_000_000;
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Alru;
    c.alru_stale_ms = STALE;
    c.alru_wake_ms = WAKE;
    c.seq_cutoff = SeqCutoff::Off;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let sh = bdev.shared().clone();
    assert!(sh.now_ms() < WAKE - STALE);
    sh.frozen_ms.store(WAKE - STALE, Ordering::Release);
    write(&mut ch, 0, &fill(1, 4096)); // dirty since WAKE - STALE
    owner_pass(&sh);
    assert!(line_dirty(&sh, 0), "alru ran before its first interval");
    // The first run: line 0 has been dirty for exactly the staleness time.
    sh.frozen_ms.store(WAKE, Ordering::Release);
    assert!(cleaned_within(&sh, 0, Duration::from_secs(10)), "alru left a line dirty for alru_stale_ms");
    write(&mut ch, 8, &fill(2, 4096)); // line 1, dirty since WAKE
    sh.frozen_ms.store(WAKE + STALE, Ordering::Release); // stale now, but the next run is at 2 * WAKE
    owner_pass(&sh);
    assert!(!cleaned_within(&sh, 1, Duration::from_secs(1)), "alru ran again before alru_wake_ms");
    sh.frozen_ms.store(2 * WAKE, Ordering::Release);
    assert!(
        cleaned_within(&sh, 1, Duration::from_secs(10)),
        "alru did not run alru_wake_ms after its last run"
    );
}

/// Shutdown cleans nothing by policy: a line left dirty when the cleaning round in flight ends
/// stays dirty (it is saved as such), even with `acp` (`start_clean` skips the policy then).
#[test]
fn shutdown_starts_no_policy_cleaning() {
    let (reg, ctl) = held_core_setup();
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Acp;
    c.clean_batch = 1;
    c.seq_cutoff = SeqCutoff::Off;
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..16); // the write-back of lines 0 and 1
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let sh = bdev.shared().clone();
    write(&mut ch, 0, &fill(1, 4096));
    write(&mut ch, 8, &fill(2, 4096));
    wait_until_true("the first write-back", || lock(&ctl).caught == 1);
    let inst = bdev.inst.clone();
    let stop = std::thread::spawn(move || inst.stop());
    wait_until_true("the owner taking the shutdown", || lock(&sh.requests).is_empty() && !stop.is_finished());
    lock(&ctl).allow = usize::MAX;
    stop.join().unwrap().unwrap();
    let writes = lock(&ctl).submitted.iter().filter(|(k, o)| *k == IoKind::Write && *o < 16).count();
    assert_eq!(writes, 1, "a line was written back during shutdown");
    assert_eq!(stats(&bdev)["dirty_lines"], 1);
}

/// A flush that arrives while a cleaning round is writing back an older copy of a line (the line
/// was rewritten after the round read it) is acknowledged only once the newer data reached the
/// core: rounds are numbered (`start_clean`'s `rounds += 1`), and only a round started after the
/// flush arrived counts for it as written.
#[test]
fn a_flush_after_a_round_read_an_older_copy_waits_for_the_newer_one() {
    let (reg, ctl) = held_core_setup();
    let (bdev, _desc, mut ch) = open_cache(&reg, &wb_records_on_demand());
    let sh = bdev.shared().clone();
    write(&mut ch, 0, &fill(1, 4096));
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..8);
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Flush(None, mb.clone(), 1));
    wait_until_true("the write-back of line 0", || lock(&ctl).caught == 1);
    let newer = fill(2, 4096);
    write(&mut ch, 0, &newer); // passes the round's soft lock
    sh.send(OwnerReq::Flush(None, mb.clone(), 2));
    wait_until_true("the owner taking the second flush", || lock(&sh.requests).is_empty());
    std::thread::sleep(Duration::from_millis(100));
    lock(&ctl).allow = usize::MAX;
    let deadline = Some(Instant::now() + Duration::from_secs(20));
    assert_eq!(mb.wait_until(1, deadline), Some(Ok(())));
    assert_eq!(mb.wait_until(2, deadline), Some(Ok(())));
    let core = reg.open("core0", false).unwrap();
    let mut cch = core.channel().unwrap();
    same(&read(&mut cch, 0, 8), &newer, "the core after the second flush");
}

/// Once a core is detached (its `removed` flag, set by `core_gone` after its last write-back), the
/// cleaner no longer touches it: a flush of every core leaves its dirty lines alone and completes
/// (`Owner::attached`).
#[test]
fn the_cleaner_leaves_a_detached_core_alone() {
    let (reg, ctl) = held_core_setup();
    let (bdev, _desc, mut ch) = open_cache(&reg, &wb_records_on_demand());
    let sh = bdev.shared().clone();
    write(&mut ch, 0, &fill(1, 4096)); // line 0: dirty
    lock(&sh.cores).get(&bdev.core_id).unwrap().removed.store(true, Ordering::Release);
    let before = lock(&ctl).submitted.len();
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Flush(None, mb.clone(), 1));
    assert_eq!(mb.wait_until(1, Some(Instant::now() + Duration::from_secs(20))), Some(Ok(())));
    let after: Vec<_> = lock(&ctl).submitted[before..].to_vec();
    assert!(after.iter().all(|(k, _)| *k != IoKind::Write), "written back to a detached core: {after:?}");
    assert!(line_dirty(&sh, 0));
}

/// While a cleaning round is in flight the owner thread polls its devices every 20 ms (a device
/// may have no wait fd, as here), not at the policy's idle interval (alru: up to 1 s): a round
/// whose core write completes is finished at once (`Owner::sleep`'s `busy`).
#[test]
fn the_owner_polls_often_while_a_round_is_in_flight() {
    const WAKE: u64 = 1_000_000;
    let (reg, ctl) = held_core_setup();
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Alru;
    c.alru_stale_ms = 0;
    c.alru_wake_ms = WAKE;
    c.seq_cutoff = SeqCutoff::Off;
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..1 << 11);
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let sh = bdev.shared().clone();
    let t = Instant::now();
    for i in 0..4u64 {
        sh.frozen_ms.store((i + 1) * WAKE - 1, Ordering::Release);
        write(&mut ch, i * 8, &fill(i, 4096));
        // Alru's next run is due now; the owner runs it on its next pass.
        sh.frozen_ms.store((i + 1) * WAKE, Ordering::Release);
        owner_pass(&sh);
        wait_until_true("the write-back", || lock(&ctl).caught == i as usize + 1);
        lock(&ctl).allow += 1; // the owner is asleep now: a poll 20 ms later finds it done
        assert!(cleaned_within(&sh, i, Duration::from_secs(20)));
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "4 rounds took {took:?}: the owner slept while they were in flight"
    );
}

/// A cache device shared by `c0` (over the `HoldBdev` core0) and `c1` (over malloc core1), write-back,
/// no background cleaning; `c0` is registered and `ch` is a channel on it.
fn held_shared_pair() -> (Registry, Arc<std::sync::Mutex<HoldCtl>>, Arc<CacheBdev>, Arc<CacheBdev>) {
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("cdev", cache_dev_bytes(64, 4096), 512).unwrap())).unwrap();
    let (core0, ctl) = HoldBdev::new("core0", 1 << 20);
    reg.register(core0).unwrap();
    reg.register(Arc::new(MallocBdev::new("core1", 1 << 20, 512).unwrap())).unwrap();
    let a = wb_records_on_demand();
    let mut b = a.clone();
    b.name = "c1".into();
    b.core = "core1".into();
    let ca = CacheBdev::create(&a, &reg).unwrap();
    let cb = CacheBdev::create(&b, &reg).unwrap();
    reg.register(ca.clone()).unwrap();
    (reg, ctl, ca, cb)
}

/// A core whose cache bdev is shut down (it leaves the shared instance) while a cleaning round
/// writes back one of its lines: the owner keeps that core's channel until the round is over, so
/// the round ends (`take_requests` forgets detached cores only with no round in flight).
#[test]
fn a_round_on_a_core_that_leaves_the_instance_still_ends() {
    use crate::bdev::Bdev;
    let (reg, ctl, ca, _cb) = held_shared_pair();
    let sh = ca.shared().clone();
    let desc = reg.open("c0", true).unwrap();
    let mut ch = desc.channel().unwrap();
    write(&mut ch, 0, &fill(1, 4096)); // line 0 of core0: dirty
    drop(ch);
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..8);
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Flush(None, mb.clone(), 1));
    wait_until_true("the write-back", || lock(&ctl).caught == 1);
    ca.shutdown().unwrap(); // core0 leaves the instance (c1 keeps it running)
    owner_pass(&sh);
    lock(&ctl).allow = usize::MAX;
    let key = (ca.core_id, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while wlock(&sh.map).is_locked(key) {
        if Instant::now() >= deadline {
            std::mem::forget((reg, ca, _cb, desc));
            panic!("the round on core0 never ended");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The same for a flush's core flush in flight: the core's channel is kept until it completes, and
/// the flush is answered (`take_requests` waits for jobs flushing).
#[test]
fn a_core_flush_of_a_core_that_leaves_the_instance_still_ends() {
    use crate::bdev::Bdev;
    let (reg, ctl, ca, _cb) = held_shared_pair();
    let sh = ca.shared().clone();
    let _release = ReleaseOnDrop(ctl.clone());
    {
        let mut h = lock(&ctl);
        h.flushes = true;
        h.range = Some(0..1);
    }
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Flush(Some(ca.core_id), mb.clone(), 1)); // nothing dirty: straight to the flush
    wait_until_true("core0's flush", || lock(&ctl).caught == 1);
    ca.shutdown().unwrap();
    owner_pass(&sh);
    lock(&ctl).allow = usize::MAX;
    let r = mb.wait_until(1, Some(Instant::now() + Duration::from_secs(20)));
    if r != Some(Ok(())) {
        std::mem::forget((reg, ca, _cb));
        panic!("the flush of core0 never ended: {r:?}");
    }
}

/// The flush of one core snapshots that core's dirty lines only: another core's dirty line in the
/// shared cache stays dirty (`new_job`'s filter).
#[test]
fn a_flush_of_one_core_leaves_the_other_cores_lines_dirty() {
    let (reg, _ctl, ca, cb) = held_shared_pair();
    reg.register(cb.clone()).unwrap();
    let sh = ca.shared().clone();
    let d1 = reg.open("c1", true).unwrap();
    let mut c1 = d1.channel().unwrap();
    write(&mut c1, 0, &fill(1, 4096)); // line 0 of core1: dirty
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Flush(Some(ca.core_id), mb.clone(), 1));
    assert_eq!(mb.wait_until(1, Some(Instant::now() + Duration::from_secs(20))), Some(Ok(())));
    let m = rlock(&sh.map);
    assert!(
        m.lookup((cb.core_id, 0)).is_some_and(|s| m.lines[s as usize].dirty == 0xff),
        "core1's line was cleaned"
    );
}

/// While a flush waits for its core flush the owner thread polls every 20 ms (a device may have no
/// wait fd, as here), not at the idle interval (1 s with `nop`) (`Owner::sleep`'s `busy`).
#[test]
fn the_owner_polls_often_while_a_flush_is_in_flight() {
    let (reg, ctl) = held_core_setup();
    let (bdev, _desc, _ch) = open_cache(&reg, &wb_records_on_demand());
    let sh = bdev.shared().clone();
    let _release = ReleaseOnDrop(ctl.clone());
    {
        let mut h = lock(&ctl);
        h.flushes = true;
        h.range = Some(0..1);
    }
    let mb = Mailbox::new().unwrap();
    let t = Instant::now();
    for i in 0..4u64 {
        sh.send(OwnerReq::Flush(None, mb.clone(), i)); // nothing dirty: straight to the core flush
        wait_until_true("the core flush", || lock(&ctl).caught == i as usize + 1);
        lock(&ctl).allow += 1; // the owner is asleep now: a poll 20 ms later finds it done
        assert_eq!(mb.wait_until(i, Some(Instant::now() + Duration::from_secs(20))), Some(Ok(())));
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "4 flushes took {took:?}: the owner slept while they were in flight"
    );
}

/// With records waiting to be written lazily the owner thread wakes every 100 ms to check whether
/// they are due (not at the idle interval: 1 s with `nop`), so a lazy record round follows soon
/// after `md_lazy_ms` (`Owner::sleep`).
#[test]
fn lazy_records_are_written_soon() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = wt_no_cutoff();
    c.cleaner = CleanerPolicy::Nop;
    c.md_lazy_ms = 150;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let sh = bdev.shared().clone();
    let rounds = || sh.md_rounds.load(Ordering::Acquire);
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Persist(mb.clone(), 100)); // a record round now: the next lazy one is 150 ms away
    assert_eq!(mb.wait_until(100, Some(Instant::now() + Duration::from_secs(20))), Some(Ok(())));
    let t = Instant::now();
    for i in 0..4u64 {
        let r = rounds();
        read(&mut ch, i * 8, 8); // a fill: its record is written lazily
                                 // Wake the owner (a flush with nothing dirty): it goes back to sleep with a record pending.
        sh.send(OwnerReq::Flush(None, mb.clone(), i));
        assert_eq!(mb.wait_until(i, Some(Instant::now() + Duration::from_secs(20))), Some(Ok(())));
        wait_until_true("the lazy record round", || rounds() > r);
    }
    let took = t.elapsed();
    assert!(took < Duration::from_millis(2500), "4 lazy rounds took {took:?}");
}

/// `simulate_crash` (for the crash tests) really skips the clean shutdown: the superblock still
/// says "in use" afterwards.
#[test]
fn a_simulated_crash_leaves_the_superblock_in_use() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let (bdev, desc, ch) = open_cache(&reg, &cfg(Mode::Wb));
    bdev.shared().simulate_crash.store(true, Ordering::Release);
    drop(ch);
    drop(desc);
    drop(reg.unregister("c0").unwrap());
    drop(bdev);
    let newest = [sb_copy(&reg, false), sb_copy(&reg, true)].into_iter().flatten().max_by_key(|c| c.1);
    assert!(newest.is_some_and(|(sb, _)| !sb.clean_shutdown), "the superblock says clean after a crash");
}

/// A read that starts in the last sector of a line and ends in the next one is not a one-line hit
/// even when its first line holds that sector: it is served line by line, from wherever each line
/// is cached (with 64 KiB lines the first line's sector mask alone would say "hit", and the read
/// would run on into the next cache line) (`hit_in_line`'s one-line check).
#[test]
fn a_read_across_two_lines_is_not_a_one_line_hit() {
    const LB: u64 = 128; // 64 KiB lines of 512-byte blocks
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(16, 65536), 1 << 20);
    let mut c = wt_no_cutoff();
    c.line_size = 65536;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let sh = bdev.shared().clone();
    let data: Vec<Vec<u8>> = (0..3).map(|i| fill(2 * i + 1, 65536)).collect();
    for k in [1u64, 0, 2] {
        write(&mut ch, k * LB, &data[k as usize]); // cached in this order: not in consecutive cache lines
    }
    let slot = |k: u64| wlock(&sh.map).lookup((0, k)).unwrap();
    let k = (0..2u64).find(|&k| slot(k + 1) != slot(k) + 1).unwrap();
    let got = read(&mut ch, k * LB + LB - 1, 2);
    let k = k as usize;
    let mut want = data[k][65536 - 512..].to_vec();
    want.extend_from_slice(&data[k + 1][..512]);
    same(&got, &want, "a read across two lines");
}

/// A mode switch from write-back to write-through sets the mode, then cleans every dirty line (a
/// flush job). A write-through write to a dirty line already in flight when the job starts holds
/// the line (the job waits), then leaves it clean: the job skips it, though it is still listed,
/// and completes (`start_clean` skips a picked line with nothing dirty).
#[test]
fn a_flush_skips_a_line_a_write_through_write_cleaned() {
    let (reg, ctl) = held_core_setup();
    let (bdev, desc, mut ch) = open_cache(&reg, &wb_records_on_demand());
    let sh = bdev.shared().clone();
    write(&mut ch, 0, &fill(1, 4096)); // line 0: dirty
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..8);
    sh.mode.store(Mode::Wt.to_u8(), Ordering::Release); // what `set_mode` does first
    ch.submit(BdevIo::write(0, 8, IoVecs::from_slice(&fill(3, 4096)), 1)); // its core write is held
    let early = poll_until(&mut ch, "the write-through write", |_| lock(&ctl).caught == 1);
    assert!(early.is_empty());
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Flush(None, mb.clone(), 2)); // what `set_mode` does next
    wait_until_true("the owner taking the flush", || lock(&sh.requests).is_empty());
    owner_pass(&sh);
    lock(&ctl).allow = usize::MAX;
    let r = poll_until(&mut ch, "the write-through write", |d| !d.is_empty());
    assert_eq!(r[0].result, Ok(()));
    assert!(!line_dirty(&sh, 0));
    let r = mb.wait_until(2, Some(Instant::now() + Duration::from_secs(20)));
    if r != Some(Ok(())) {
        std::mem::forget((reg, bdev, desc, ch));
        panic!("the flush never ended: {r:?}");
    }
}

/// A hit read through the cache device's lane counts its latency from its own submission (no batch
/// time set): at most the time the read took, not the time since the clock's origin (`new_hit`
/// stamps the hits that go through the lane).
#[test]
fn a_lane_hit_counts_its_latency_from_its_submission() {
    let (reg, _bdev, _desc, mut ch) = stream_cache(SeqCutoff::Off);
    write(&mut ch, 0, &fill(1, 4096));
    let _ = crate::bdev::channel::nanos(Instant::now()); // the latency clock's origin is set by now
    std::thread::sleep(Duration::from_secs(1));
    let cdev_stats = reg.bdev_stats("cdev").unwrap();
    let before = cdev_stats.snapshot();
    let t = Instant::now();
    read(&mut ch, 0, 8); // a hit within one line: read through the lane
    let took = t.elapsed().as_nanos() as u64;
    let s = cdev_stats.snapshot();
    assert_eq!(s.read_ops, before.read_ops + 1, "the hit's read");
    let lat = s.read_latency_ns_sum - before.read_latency_ns_sum;
    assert!(lat <= took, "the hit's read took {took} ns, counted {lat} ns");
}

/// A read hit across two lines cached apart is read in two pieces; it completes only when both
/// have been read (`hit_done` waits for the hit's last child).
#[test]
fn a_hit_in_two_pieces_completes_after_both() {
    let (reg, ctl) = held_cdev_setup();
    let (bdev, _desc, mut ch) = open_cache(&reg, &wt_no_cutoff());
    let sh = bdev.shared().clone();
    let (a, b) = (fill(1, 4096), fill(3, 4096));
    write(&mut ch, 8, &b); // line 1 first: the two lines are not cached side by side
    write(&mut ch, 0, &a);
    let s1 = wlock(&sh.map).lookup((0, 1)).unwrap();
    assert_ne!(wlock(&sh.map).lookup((0, 0)).unwrap() + 1, s1);
    let _release = ReleaseOnDrop(ctl.clone());
    {
        let mut h = lock(&ctl);
        let first = (sh.data_offset + u64::from(s1) * 4096) / BS;
        h.range = Some(first..first + 8); // line 1's read
        h.reads = true;
    }
    let buf = IoVecs::alloc(8192);
    let view = buf.slice(0, 8192).unwrap();
    ch.submit(BdevIo::read(0, 16, buf, 1));
    let mut done = Vec::new();
    for _ in 0..50 {
        ch.poll(&mut done);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(lock(&ctl).caught, 1, "line 1's read is held");
    assert!(done.is_empty(), "the hit completed with one of its two reads held");
    lock(&ctl).allow = usize::MAX;
    let r = poll_until(&mut ch, "the hit", |d| !d.is_empty());
    assert_eq!(r[0].result, Ok(()));
    let got = view.to_vec();
    same(&got[..4096], &a, "line 0");
    same(&got[4096..], &b, "line 1");
}

/// A read hit within one line submitted while another request of its channel waits still takes the
/// fast path (pins, no line lock): a write to that line from another channel goes ahead during the
/// hit's read (`submit` tries the fast path for a request that did not try it yet).
#[test]
fn a_hit_behind_a_waiting_request_does_not_lock_its_line() {
    let (reg, ctl) = held_cdev_setup();
    let (bdev, desc, mut ch) = open_cache(&reg, &wt_no_cutoff());
    let sh = bdev.shared().clone();
    let mut ch2 = desc.channel().unwrap();
    write(&mut ch, 16, &fill(1, 4096)); // line 2, cached
    write(&mut ch, 32, &fill(3, 4096)); // line 4, cached
    let off = |line: u64| (sh.data_offset + u64::from(wlock(&sh.map).lookup((0, line)).unwrap()) * 4096) / BS;
    let (o2, o4) = (off(2), off(4));
    let _release = ReleaseOnDrop(ctl.clone());
    {
        let mut h = lock(&ctl);
        h.range = Some(o2.min(o4)..o2.max(o4) + 8);
        h.reads = true;
    }
    ch.submit(BdevIo::write(32, 8, IoVecs::from_slice(&fill(5, 4096)), 1)); // holds line 4
    ch.submit(BdevIo::write(32, 8, IoVecs::from_slice(&fill(7, 4096)), 2)); // waits for line 4
    ch.submit(BdevIo::read(16, 8, IoVecs::alloc(4096), 3)); // a hit on line 2, its read held
    let n = lock(&ctl).submitted.len();
    ch2.submit(BdevIo::write(16, 8, IoVecs::from_slice(&fill(9, 4096)), 4));
    let after: Vec<_> = lock(&ctl).submitted[n..].to_vec();
    assert!(after.contains(&(IoKind::Write, o2)), "the write to line 2 waited for the hit: {after:?}");
    lock(&ctl).allow = usize::MAX;
    poll_until(&mut ch, "the first channel", |d| d.len() == 3);
    poll_until(&mut ch2, "the write", |d| d.len() == 1);
}

// ---- session 8 (branch mutcache4) ----

/// What a test sees of the channels an [`AskingBdev`] created: `ask` makes the next
/// `before_sleep` of one of them report work (once); `polled` counts the polls of a channel that
/// reported work, after its report.
#[derive(Default)]
struct Asking {
    ask: std::sync::atomic::AtomicBool,
    polled: std::sync::atomic::AtomicUsize,
}

/// A malloc bdev whose channels report work from `before_sleep` when the test asks them to, with
/// nothing in flight: a module "that asks for polling right after being polled" (the
/// `ModuleChannel::before_sleep` contract allows it).
struct AskingBdev(MallocBdev, Arc<Asking>);

struct AskingChannel {
    inner: Box<dyn crate::bdev::ModuleChannel>,
    st: Arc<Asking>,
    armed: bool,
}

impl crate::bdev::Bdev for AskingBdev {
    fn info(&self) -> &crate::bdev::BdevInfo {
        self.0.info()
    }
    fn create_channel(&self) -> Result<Box<dyn crate::bdev::ModuleChannel>, BdevError> {
        Ok(Box::new(AskingChannel { inner: self.0.create_channel()?, st: self.1.clone(), armed: false }))
    }
}

impl crate::bdev::ModuleChannel for AskingChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), crate::bdev::Rejected> {
        self.inner.submit(io)
    }
    fn poll(&mut self, done: &mut Vec<crate::bdev::Completion>) -> usize {
        if std::mem::take(&mut self.armed) {
            self.st.polled.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.poll(done)
    }
    fn before_sleep(&mut self) -> bool {
        // Only the cache channel's own channels below are ever asked (the owner thread never calls
        // before_sleep), so the one that takes the request is the test's.
        let ask = self.st.ask.swap(false, Ordering::SeqCst);
        self.armed |= ask;
        ask
    }
}

/// When an idle channel below the cache (nothing of the cache's in flight there) still reports work
/// from its `before_sleep`, the cache channel says "more" and polls that channel at its next poll
/// ("poll it with the rest"): `before_sleep`'s `cache_out += 1` and `core_out += 1` (`*=` leaves
/// the count at 0 and the next poll skips the channel; `-=` underflows).
#[test]
fn an_idle_channel_below_that_reports_work_is_polled_next() {
    use crate::bdev::ModuleChannel;
    let (cst, kst) = (Arc::new(Asking::default()), Arc::new(Asking::default()));
    let reg = Registry::new();
    let cdev = MallocBdev::new("cdev", cache_dev_bytes(64, 4096), 512).unwrap();
    reg.register(Arc::new(AskingBdev(cdev, cst.clone()))).unwrap();
    let core = MallocBdev::new("core0", 1 << 20, 512).unwrap();
    reg.register(Arc::new(AskingBdev(core, kst.clone()))).unwrap();
    let bdev = CacheBdev::create(&wt_no_cutoff(), &reg).unwrap();
    let mut mch = engine::CacheChannel::new(&bdev).unwrap();
    let mut done = Vec::new();
    let mut one = |mch: &mut engine::CacheChannel, io: BdevIo| {
        assert!(mch.submit(io).is_ok());
        let deadline = Instant::now() + Duration::from_secs(20);
        done.clear();
        while done.is_empty() {
            mch.poll(&mut done);
            assert!(Instant::now() < deadline, "never completed");
        }
        assert_eq!(done[0].result, Ok(()));
    };
    one(&mut mch, BdevIo::write(0, 8, IoVecs::from_slice(&fill(9, 4096)), 1)); // cache device and core
    one(&mut mch, BdevIo::read(0, 8, IoVecs::alloc(4096), 2)); // a hit
    let mut sink = Vec::new();
    assert_settles(&mut mch, &mut sink);
    for (st, what) in [(&cst, "the cache device's channel"), (&kst, "the core's channel")] {
        st.ask.store(true, Ordering::SeqCst);
        assert!(mch.before_sleep(), "{what} reported work: the owner must poll again");
        assert!(!st.ask.load(Ordering::SeqCst), "{what} was asked");
        assert_eq!(st.polled.load(Ordering::SeqCst), 0);
        mch.poll(&mut sink);
        assert_eq!(st.polled.load(Ordering::SeqCst), 1, "{what} was polled at the next poll");
    }
    assert!(sink.is_empty(), "nothing to answer: {sink:?}");
}

/// A flush of more than 1000 dirty lines (1001 here) whose write-back is held logs its progress on
/// the owner thread once more than a second has passed since the flush started or since the last
/// progress line (the test clock, `Shared::frozen_ms`, stands still otherwise): not before, not at
/// exactly one second, once after it, then not again until another second has passed. One of 1000
/// lines never does (`check_jobs`'s `j.total > 1000 && ... > 1 s`).
#[test]
fn a_long_flush_logs_its_progress_once_a_second() {
    for n in [1001u64, 1000] {
        let reg = Registry::new();
        reg.register(Arc::new(MallocBdev::new("cdevprog", cache_dev_bytes(1024, 4096), 512).unwrap()))
            .unwrap();
        let (core, ctl) = HoldBdev::new("core0", 8 << 20);
        reg.register(core).unwrap();
        let mut c = CacheConfig::new("c0", "cdevprog", "core0");
        c.mode = Mode::Wb;
        c.cleaner = CleanerPolicy::Nop;
        c.seq_cutoff = SeqCutoff::Off;
        let (bdev, _desc, mut ch) = open_cache(&reg, &c);
        let sh = bdev.shared().clone();
        let data = fill(1, 4096);
        for line in 0..n {
            write(&mut ch, line * 8, &data);
        }
        let _release = ReleaseOnDrop(ctl.clone());
        lock(&ctl).range = Some(0..(8 << 20) / BS); // every write-back to the core
        let t0 = sh.now_ms() + 1000;
        sh.frozen_ms.store(t0, Ordering::Release);
        // The flush job starts at t0 (its line list is taken at once) and cannot end.
        ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 1));
        wait_until_true("a write-back held", || lock(&ctl).caught > 0);
        let progress = |logs: &[String]| -> Vec<String> {
            logs.iter().filter(|l| l.contains("dirty lines cleaned (")).cloned().collect()
        };
        let at = |ms: u64| {
            let ((), logs) = crate::testlog::capture_named(&["cache-cdevprog"], || {
                sh.frozen_ms.store(t0 + ms, Ordering::Release);
                owner_pass(&sh);
                owner_pass(&sh);
            });
            progress(&logs)
        };
        assert_eq!(at(0), Vec::<String>::new(), "{n} lines: at the start");
        assert_eq!(at(1000), Vec::<String>::new(), "{n} lines: at exactly one second");
        let line = at(1001);
        if n > 1000 {
            assert_eq!(line.len(), 1, "one progress line after a second: {line:?}");
            assert!(
                line[0].starts_with("INFO: cache 'cdevprog': flush: 0/1001 dirty lines cleaned (1 s)"),
                "{line:?}"
            );
        } else {
            assert_eq!(line, Vec::<String>::new(), "a flush of 1000 lines logs no progress");
        }
        assert_eq!(at(2001), Vec::<String>::new(), "{n} lines: one second after the last line");
        let line = at(2002);
        assert_eq!(line.len(), usize::from(n > 1000), "{n} lines: the next line: {line:?}");
        lock(&ctl).allow = usize::MAX;
        let r = poll_until(&mut ch, "the flush", |d| !d.is_empty());
        assert_eq!(r[0].result, Ok(()));
    }
}

/// A cache line's write generation never comes back to a value it had, even when the line is
/// dropped (evicted, emptied) and taken again for the same core line: a cleaning round compares the
/// generation it read with the line's at its end (`LineMap::drop_line`'s `+= 1`; with `-= 1` a drop
/// and the next `alloc` give the old value back, and a line loaded at start-up, generation 0,
/// underflows when it is evicted).
#[test]
fn a_lines_write_generation_never_repeats() {
    let mut m = map::LineMap::new(1);
    let mut seen = std::collections::HashSet::new();
    let mut fresh =
        |m: &map::LineMap, what: &str| assert!(seen.insert(m.wgen(0)), "{what}: a generation seen before");
    assert!(m.load(0, (0, 1), 0xff, 0, 1));
    fresh(&m, "loaded");
    assert_eq!(m.alloc((0, 2)), Some(0), "the loaded clean line is evicted");
    fresh(&m, "evicted and taken");
    m.set_bits(0, 0, 0, 0);
    assert_eq!(m.lookup((0, 2)), None, "emptied: dropped");
    fresh(&m, "dropped");
    assert_eq!(m.alloc((0, 2)), Some(0));
    fresh(&m, "taken again for the same core line");
}

/// `LineMap::set_bits` queues a line's record when its valid or its dirty sectors change, and
/// only then (`changed`); a dirty line made dirty again keeps its place (and its time) in the dirty
/// order, so the cleaner still finds it, oldest first; a clean one leaves it.
#[test]
fn set_bits_queues_changed_records_and_keeps_the_dirty_order() {
    let mut m = map::LineMap::new(4);
    let a = m.alloc((0, 1)).unwrap();
    let b = m.alloc((0, 2)).unwrap();
    let written = |m: &mut map::LineMap| {
        // What a record round does once the records are on the device.
        for i in std::mem::take(&mut m.md_pending) {
            m.lines[i as usize].md_dirty = false;
        }
    };
    written(&mut m);
    m.set_bits(a, 0xff, 0, 0);
    assert_eq!(m.md_pending, [a], "valid sectors changed");
    written(&mut m);
    m.set_bits(a, 0xff, 0, 0);
    assert!(m.md_pending.is_empty(), "nothing changed");
    m.set_bits(a, 0x0f, 0, 0);
    assert_eq!(m.md_pending, [a], "fewer valid sectors, still clean");
    written(&mut m);
    m.set_bits(a, 0xff, 0x01, 5);
    assert_eq!(m.md_pending, [a], "dirty now");
    written(&mut m);
    m.set_bits(b, 0xff, 0x01, 7);
    m.set_bits(a, 0xff, 0x03, 9); // dirty again: dirty since 5
    let all = |_: u16| true;
    assert_eq!(m.dirty_lines(None, &all, 10), [a, b], "oldest first");
    assert_eq!(m.dirty_older_than(None, &all, 10, 6), [a], "a is dirty since 5");
    m.set_bits(a, 0xff, 0, 10);
    assert_eq!(m.dirty_lines(None, &all, 10), [b], "a is clean");
}

/// `LineMap::load` (start-up) takes its line off the free list and leaves the others there, and
/// puts a dirty line, only a dirty one, in the dirty order the cleaner walks.
#[test]
fn load_takes_its_line_off_the_free_list_and_orders_dirty_lines() {
    let mut m = map::LineMap::new(4);
    assert_eq!(m.free_lines(), 4);
    assert!(m.load(1, (0, 7), 0xff, 0x0f, 3));
    assert_eq!(m.free_lines(), 3);
    assert!(m.load(2, (0, 8), 0xff, 0, 3));
    assert_eq!(m.free_lines(), 2);
    let mut got = vec![m.alloc((0, 9)).unwrap(), m.alloc((0, 10)).unwrap()];
    got.sort_unstable();
    assert_eq!(got, [0, 3], "new lines come from the free ones, not from the loaded ones");
    assert_eq!((m.lookup((0, 7)), m.lookup((0, 8))), (Some(1), Some(2)));
    assert_eq!(m.dirty_lines(None, &|_| true, 10), [1], "the loaded dirty line, not the clean one");
}

/// A cache channel hands its lane's clock reading up (`completion_stamp`) after a poll that took a
/// lane read's completion, so the owner's channel reads no clock again for it; after a poll without
/// one (a miss, read from the core; an idle poll), it hands up nothing.
#[test]
fn a_cache_poll_hands_up_the_lanes_clock_reading_only_after_a_lane_completion() {
    use crate::bdev::{Bdev, ModuleChannel};
    let (_reg, bdev, _desc, mut ch) = stream_cache(SeqCutoff::Off);
    write(&mut ch, 0, &fill(1, 4096)); // line 0 is cached
    let mut m = bdev.create_channel().unwrap();
    let settle = |m: &mut Box<dyn ModuleChannel>, tag: u64| {
        let mut done = Vec::new();
        let mut stamps = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done.iter().any(|c: &crate::bdev::Completion| c.tag == tag) {
            m.poll(&mut done);
            stamps.push(m.completion_stamp());
            assert!(Instant::now() < deadline, "never completed");
        }
        stamps
    };
    let t0 = crate::bdev::channel::nanos(Instant::now());
    m.submit(BdevIo::read(0, 8, IoVecs::alloc(4096), 1)).unwrap(); // a hit: through the lane
    let stamps = settle(&mut m, 1);
    let t1 = crate::bdev::channel::nanos(Instant::now());
    let last = stamps.last().copied().flatten().expect("the poll that took the hit hands up a reading");
    assert!(t0 <= last && last <= t1, "read while the hit was polled: {t0} <= {last} <= {t1}");
    m.poll(&mut Vec::new());
    assert_eq!(m.completion_stamp(), None, "an idle poll has no reading");
    m.submit(BdevIo::read(40, 8, IoVecs::alloc(4096), 2)).unwrap(); // a miss: from the core
    let stamps = settle(&mut m, 2);
    assert!(stamps.iter().all(Option::is_none), "no lane read, no reading: {stamps:?}");
}
