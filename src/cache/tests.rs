//! Cache bdev tests: a model test per mode, conformance, shared caches, mode switch, persistence,
//! corrupt metadata, hot remove, background cleaning.
//!
//! ```text
//!  malloc/file cache device ─┐
//!  malloc/file core ─────────┴─► CacheBdev ──► Channel ◄── model (Vec<u8> reference), checked block by block
//! ```
//!
//! # Design
//! Every test builds its own registry and devices, so tests run in parallel. The model test keeps a
//! reference image of what the guest wrote; after every completed flush the *core itself* (read
//! through a read-only descriptor) must equal the reference, which is the write-back promise.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::bdev::file::{Engine, FileBdev};
use crate::bdev::malloc::MallocBdev;
use crate::bdev::tests::{conformance, drive, run, Rng};
use crate::bdev::{BdevIo, IoKind, IoVecs, Registry};

const BS: u64 = 512;

mod mutants;

/// Bytes of a cache device with `lines` lines of `line` bytes.
fn cache_dev_bytes(lines: u64, line: u64) -> u64 {
    let pages = lines.div_ceil(u64::from(layout::LINES_PER_PAGE));
    layout::MD_OFFSET + pages * layout::PAGE_BYTES + lines * line
}

fn setup(reg: &Registry, cache_bytes: u64, core_bytes: u64) {
    reg.register(Arc::new(MallocBdev::new("cdev", cache_bytes, 512).unwrap())).unwrap();
    reg.register(Arc::new(MallocBdev::new("core0", core_bytes, 512).unwrap())).unwrap();
}

fn cfg(mode: Mode) -> CacheConfig {
    let mut c = CacheConfig::new("c0", "cdev", "core0");
    c.mode = mode;
    c
}

/// A write-through cache with the sequential cut-off off (every read and write goes through the map).
fn wt_no_cutoff() -> CacheConfig {
    let mut c = cfg(Mode::Wt);
    c.seq_cutoff = SeqCutoff::Off;
    c
}

/// Creates cache bdev `c0` from `c`, registers it and opens a channel on it.
fn open_cache(
    reg: &Registry,
    c: &CacheConfig,
) -> (Arc<CacheBdev>, crate::bdev::Descriptor, crate::bdev::Channel) {
    let bdev = CacheBdev::create(c, reg).unwrap();
    reg.register(bdev.clone()).unwrap();
    let desc = reg.open("c0", true).unwrap();
    let ch = desc.channel().unwrap();
    (bdev, desc, ch)
}

/// A wt cache of 64 lines (4 KiB) over a 1 MiB core with sequential cut-off `cut` at 64 KiB.
fn stream_cache(cut: SeqCutoff) -> (Registry, Arc<CacheBdev>, crate::bdev::Descriptor, crate::bdev::Channel) {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wt);
    c.seq_cutoff = cut;
    c.seq_cutoff_bytes = 64 << 10;
    let (bdev, desc, ch) = open_cache(&reg, &c);
    (reg, bdev, desc, ch)
}

/// The record of cache line `slot` as the cache device `cdev` holds it now (`None`: a free line).
fn device_record(reg: &Registry, slot: u32) -> Option<layout::LineRecord> {
    let cdev = reg.open("cdev", false).unwrap();
    let mut cch = cdev.channel().unwrap();
    let page = slot / layout::LINES_PER_PAGE;
    let bytes = read(&mut cch, layout::page_offset(page) / BS, layout::PAGE_BYTES / BS);
    let i = (slot % layout::LINES_PER_PAGE) as usize * layout::LINE_MD_BYTES as usize;
    layout::decode_line(&bytes[i..i + layout::LINE_MD_BYTES as usize], slot).unwrap()
}

fn stats(b: &CacheBdev) -> serde_json::Value {
    b.module_stats().unwrap()
}

fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

fn read(ch: &mut crate::bdev::Channel, off: u64, n: u64) -> Vec<u8> {
    let buf = IoVecs::alloc((n * BS) as usize);
    let view = buf.slice(0, n * BS).unwrap();
    let r = run(ch, vec![BdevIo::read(off, n, buf, 0)]);
    assert_eq!(r[&0], Ok(()), "read {off}+{n}");
    view.to_vec()
}

fn write(ch: &mut crate::bdev::Channel, off: u64, data: &[u8]) {
    let r = run(ch, vec![BdevIo::write(off, data.len() as u64 / BS, IoVecs::from_slice(data), 0)]);
    assert_eq!(r[&0], Ok(()));
}

fn flush(ch: &mut crate::bdev::Channel) {
    assert_eq!(run(ch, vec![BdevIo::no_data(IoKind::Flush, 0, 0, 0)])[&0], Ok(()));
}

#[track_caller]
fn same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at block {} (byte {i})", i as u64 / BS);
    }
}

/// Random reads, writes, unmaps and flushes over a core 4× the cache, checked against a reference.
fn model(mode: Mode, line: u32, cleaner: CleanerPolicy, seed: u64) {
    let lines = 32u64;
    let core_bytes = 4 * lines * u64::from(line);
    let nb = core_bytes / BS;
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(lines, u64::from(line)), core_bytes);
    let mut c = cfg(mode);
    c.line_size = line;
    c.cleaner = cleaner;
    c.alru_wake_ms = 5;
    c.alru_stale_ms = 2;
    c.clean_batch = 4;
    c.seq_cutoff = SeqCutoff::Off;
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    reg.register(bdev.clone()).unwrap();
    let desc = reg.open("c0", true).unwrap();
    let core_ro = reg.open("core0", false).unwrap();
    let mut ch = desc.channel().unwrap();
    let mut core_ch = core_ro.channel().unwrap();
    let mut reference = vec![0u8; core_bytes as usize];
    let mut rng = Rng(seed);
    let max_len = 3 * u64::from(line) / BS;
    for step in 0..1500u64 {
        match rng.below(20) {
            0 => {
                flush(&mut ch);
                // The promise of a completed flush: the core itself holds every acknowledged write.
                same(
                    &read(&mut core_ch, 0, nb),
                    &reference,
                    &format!("{mode:?} core after flush at step {step}"),
                );
            }
            1 => {
                let n = 1 + rng.below(max_len);
                let off = rng.below(nb - n);
                let r = run(&mut ch, vec![BdevIo::no_data(IoKind::Unmap, off, n, 0)]);
                assert_eq!(r[&0], Ok(()));
                reference[(off * BS) as usize..((off + n) * BS) as usize].fill(0);
            }
            2..=10 => {
                // A batch of non-overlapping writes in flight together.
                let mut ios = Vec::new();
                let mut taken: Vec<(u64, u64)> = Vec::new();
                for k in 0..1 + rng.below(6) {
                    let n = 1 + rng.below(max_len);
                    let off = rng.below(nb - n);
                    if taken.iter().any(|&(o, m)| o < off + n && off < o + m) {
                        continue;
                    }
                    taken.push((off, n));
                    let data = fill(rng.next(), (n * BS) as usize);
                    reference[(off * BS) as usize..((off + n) * BS) as usize].copy_from_slice(&data);
                    ios.push(BdevIo::write(off, n, IoVecs::from_slice(&data), k));
                }
                assert!(run(&mut ch, ios).values().all(|r| r.is_ok()));
            }
            _ => {
                // Reads, some concentrated on a hot area so hits happen.
                let n = 1 + rng.below(max_len);
                let off = if rng.below(2) == 0 { rng.below(nb / 8) } else { rng.below(nb - n) };
                let got = read(&mut ch, off, n);
                same(
                    &got,
                    &reference[(off * BS) as usize..((off + n) * BS) as usize],
                    &format!("{mode:?} read step {step}"),
                );
            }
        }
    }
    same(&read(&mut ch, 0, nb), &reference, &format!("{mode:?} final read"));
    flush(&mut ch);
    same(&read(&mut core_ch, 0, nb), &reference, &format!("{mode:?} core at the end"));
    let s = stats(&bdev);
    if !matches!(mode, Mode::Pt) {
        assert!(s["read_hits"].as_u64().unwrap() + s["read_partial_hits"].as_u64().unwrap() > 0, "{s}");
    }
    if matches!(mode, Mode::Wt | Mode::Wb | Mode::Wi | Mode::Wa) {
        assert!(s["evictions"].as_u64().unwrap() > 0, "working set 4x the cache must evict: {s}");
    }
    if matches!(mode, Mode::Wb | Mode::Wo) {
        assert!(s["cleaner_writes"].as_u64().unwrap() > 0, "{s}");
    }
    assert_eq!(s["dirty_lines"], 0, "after the final flush: {s}");
    for k in [
        "read_hits",
        "read_misses",
        "read_partial_hits",
        "write_hits",
        "write_misses",
        "occupancy_lines",
        "dirty_lines",
        "evictions",
        "cleaner_writes",
        "mode",
    ] {
        assert!(s.get(k).is_some(), "key {k} missing in {s}");
    }
    assert_eq!(s["mode"], mode.as_str());
    drop(ch);
    drop(desc);
    reg.unregister("c0").unwrap().shutdown().unwrap();
}

#[test]
fn model_wt() {
    model(Mode::Wt, 4096, CleanerPolicy::Alru, 1);
}
#[test]
fn model_wb() {
    model(Mode::Wb, 4096, CleanerPolicy::Alru, 2);
    model(Mode::Wb, 16384, CleanerPolicy::Acp, 3);
}
#[test]
fn model_wb_nop_cleaner() {
    model(Mode::Wb, 8192, CleanerPolicy::Nop, 4);
}
#[test]
fn model_wa() {
    model(Mode::Wa, 8192, CleanerPolicy::Alru, 5);
}
#[test]
fn model_pt() {
    model(Mode::Pt, 4096, CleanerPolicy::Alru, 6);
}
#[test]
fn model_wi() {
    model(Mode::Wi, 4096, CleanerPolicy::Alru, 7);
}
#[test]
fn model_wo() {
    model(Mode::Wo, 4096, CleanerPolicy::Acp, 8);
}

#[test]
fn conformance_cache_modes() {
    for (i, mode) in [Mode::Wt, Mode::Wb, Mode::Pt, Mode::Wo].into_iter().enumerate() {
        let reg = Registry::new();
        setup(&reg, cache_dev_bytes(64, 4096), 2 << 20);
        let mut c = cfg(mode);
        c.name = format!("cache{i}");
        let b = CacheBdev::create(&c, &reg).unwrap();
        conformance(b);
    }
}

/// Cache bdevs `a` (c0 on core0) and a copy of it named c1 on core1, sharing one 64-line cache
/// device, all registered; returns the registry, c1's config and both cache bdevs.
fn shared_pair(a: &CacheConfig) -> (Registry, CacheConfig, Arc<CacheBdev>, Arc<CacheBdev>) {
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("cdev", cache_dev_bytes(64, 4096), 512).unwrap())).unwrap();
    for n in ["core0", "core1"] {
        reg.register(Arc::new(MallocBdev::new(n, 1 << 20, 512).unwrap())).unwrap();
    }
    let mut b = a.clone();
    b.name = "c1".into();
    b.core = "core1".into();
    let ca = CacheBdev::create(a, &reg).unwrap();
    let cb = CacheBdev::create(&b, &reg).unwrap();
    reg.register(ca.clone()).unwrap();
    reg.register(cb.clone()).unwrap();
    (reg, b, ca, cb)
}

#[test]
fn shared_cache_two_cores_concurrent() {
    let mut a = cfg(Mode::Wb);
    a.cleaner = CleanerPolicy::Acp;
    let (reg, b, ca, cb) = shared_pair(&a);
    // Disagreeing third one is refused with the reason; a core is claimed by one cache bdev.
    let mut bad = b.clone();
    bad.name = "c2".into();
    bad.core = "core0".into();
    let e = CacheBdev::create(&bad, &reg).err().unwrap().to_string();
    assert!(e.contains("claimed"), "{e}");
    reg.register(Arc::new(MallocBdev::new("core2", 1 << 20, 512).unwrap())).unwrap();
    bad.core = "core2".into();
    bad.mode = Mode::Wt;
    bad.line_size = 8192;
    let e = CacheBdev::create(&bad, &reg).err().unwrap().to_string();
    assert!(e.contains("must agree") && e.contains("mode=wt") && e.contains("line-size=8192"), "{e}");

    let threads: Vec<_> = ["c0", "c1"]
        .into_iter()
        .enumerate()
        .flat_map(|(k, name)| {
            let reg = &reg;
            (0..2u64).map(move |t| {
                let desc = reg.open(name, true).unwrap();
                std::thread::spawn(move || {
                    // Each thread owns a disjoint quarter of its core.
                    let mut ch = desc.channel().unwrap();
                    let base = t * 1024;
                    let mut reference = vec![0u8; 1024 * BS as usize];
                    let mut rng = Rng(99 + k as u64 * 7 + t);
                    for _ in 0..400 {
                        let n = 1 + rng.below(16);
                        let off = rng.below(1024 - n);
                        if rng.below(2) == 0 {
                            let d = fill(rng.next(), (n * BS) as usize);
                            write(&mut ch, base + off, &d);
                            reference[(off * BS) as usize..((off + n) * BS) as usize].copy_from_slice(&d);
                        } else {
                            let got = read(&mut ch, base + off, n);
                            same(&got, &reference[(off * BS) as usize..((off + n) * BS) as usize], "shared");
                        }
                    }
                    flush(&mut ch);
                    same(&read(&mut ch, base, 1024), &reference, "shared final");
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (sa, sb) = (stats(&ca), stats(&cb));
    let occ = sa["occupancy_lines"].as_u64().unwrap() + sb["occupancy_lines"].as_u64().unwrap();
    assert_eq!(sa["shared_cache"]["occupancy_lines"].as_u64().unwrap(), occ);
    assert!(occ > 0 && occ <= 64);
    // Every counter of the shared cache is the sum of its cache bdevs' counters.
    for key in [
        "read_hits",
        "read_misses",
        "read_partial_hits",
        "write_hits",
        "write_misses",
        "dirty_lines",
        "evictions",
        "cleaner_writes",
    ] {
        let sum = sa[key].as_u64().unwrap() + sb[key].as_u64().unwrap();
        assert_eq!(sa["shared_cache"][key].as_u64().unwrap(), sum, "shared {key}");
    }
    assert!(sa["read_hits"].as_u64().unwrap() > 0 && sa["write_misses"].as_u64().unwrap() > 0);
    assert_eq!(sa["shared_cache"]["cores"], serde_json::json!(["c0", "c1"]));
    // The SIGUSR1 JSON path carries the module keys next to the generic ones.
    let j = reg.stats_json();
    assert!(j["c0"]["read_hits"].is_u64() && j["c0"]["write_ops"].is_u64(), "{j}");
}

#[test]
fn mode_switch_wb_to_wt_under_load() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    reg.register(bdev.clone()).unwrap();
    let desc = reg.open("c0", true).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let worker = std::thread::spawn(move || {
        let mut ch = desc.channel().unwrap();
        let mut reference = vec![0u8; 2048 * BS as usize];
        let mut rng = Rng(5);
        let mut i = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) || i < 200 {
            let n = 1 + rng.below(8);
            let off = rng.below(2048 - n);
            let d = fill(rng.next(), (n * BS) as usize);
            write(&mut ch, off, &d);
            reference[(off * BS) as usize..((off + n) * BS) as usize].copy_from_slice(&d);
            i += 1;
        }
        same(&read(&mut ch, 0, 2048), &reference, "after the mode switch");
        reference
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(stats(&bdev)["dirty_lines"].as_u64().unwrap() > 0);
    bdev.set_mode(Mode::Wt).unwrap();
    assert_eq!(stats(&bdev)["dirty_lines"], 0, "leaving wb cleans every line");
    assert_eq!(stats(&bdev)["mode"], "wt");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reference = worker.join().unwrap();
    assert_eq!(stats(&bdev)["dirty_lines"], 0, "wt makes no dirty lines");
    let core = reg.open("core0", false).unwrap();
    let mut cch = core.channel().unwrap();
    same(&read(&mut cch, 0, 2048), &reference, "core after the switch");
}

#[test]
fn background_cleaning_without_io() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wb);
    c.alru_wake_ms = 20;
    c.alru_stale_ms = 50;
    c.clean_batch = 3;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let t_first_write = Instant::now();
    for i in 0..20 {
        write(&mut ch, i * 8, &fill(i, 4096));
    }
    // No I/O from here on: the cleaner must get everything clean by itself, and never clean a line
    // before it has been dirty for the staleness time (a line is dirty since its write, which came
    // after `t_first_write`, so the first clean seen here cannot come sooner than that).
    let mut first_clean = None;
    loop {
        let dirty = stats(&bdev)["dirty_lines"].as_u64().unwrap();
        if dirty < 20 && first_clean.is_none() {
            first_clean = Some(t_first_write.elapsed());
        }
        if dirty == 0 {
            break;
        }
        assert!(
            t_first_write.elapsed() < Duration::from_secs(10),
            "the cleaner made no progress: {}",
            stats(&bdev)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Dirty times are kept in whole milliseconds: allow that one millisecond.
    let first = first_clean.unwrap();
    assert!(
        first >= Duration::from_millis(49),
        "alru cleaned {first:?} after the write, before the staleness time"
    );
    assert_eq!(stats(&bdev)["cleaner_writes"], 20);
}

fn file_setup(reg: &Registry, dir: &std::path::Path, cache_bytes: u64) {
    let f = FileBdev::open("cdev", dir.join("cache.img"), Some(cache_bytes), false, Engine::Threads).unwrap();
    reg.register(Arc::new(f)).unwrap();
    let f = FileBdev::open("core0", dir.join("core.img"), Some(1 << 20), false, Engine::Threads).unwrap();
    reg.register(Arc::new(f)).unwrap();
}

#[test]
fn write_back_survives_restart_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let cache_bytes = cache_dev_bytes(64, 4096);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    let mut reference = vec![0u8; 1 << 20];
    {
        let reg = Registry::new();
        file_setup(&reg, dir.path(), cache_bytes);
        let bdev = CacheBdev::create(&c, &reg).unwrap();
        reg.register(bdev.clone()).unwrap();
        let desc = reg.open("c0", true).unwrap();
        let mut ch = desc.channel().unwrap();
        for i in 0..30u64 {
            let d = fill(i + 100, 3 * BS as usize);
            write(&mut ch, i * 13, &d);
            reference[(i * 13 * BS) as usize..((i * 13 + 3) * BS) as usize].copy_from_slice(&d);
        }
        assert!(stats(&bdev)["dirty_lines"].as_u64().unwrap() > 0);
        drop(ch);
        drop(desc);
        reg.unregister("c0").unwrap().shutdown().unwrap();
    }
    // The core alone does not have the data yet; the cache must be *loaded*, dirty lines and all.
    let core_img = std::fs::read(dir.path().join("core.img")).unwrap();
    assert_ne!(core_img, reference);
    let info = info_json(&dir.path().join("cache.img")).unwrap();
    assert_eq!(info["clean_shutdown"], true);
    assert!(info["dirty_lines"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(info["cores"][0]["cache_bdev"], "c0");
    let reg = Registry::new();
    file_setup(&reg, dir.path(), cache_bytes);
    c.load = LoadPolicy::On;
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    reg.register(bdev.clone()).unwrap();
    assert!(stats(&bdev)["dirty_lines"].as_u64().unwrap() > 0);
    assert!(stats(&bdev)["write_misses"].as_u64().unwrap() > 0, "saved statistics are loaded");
    let desc = reg.open("c0", true).unwrap();
    let mut ch = desc.channel().unwrap();
    same(&read(&mut ch, 0, 2048), &reference, "after the restart");
    flush(&mut ch);
    assert_eq!(std::fs::read(dir.path().join("core.img")).unwrap(), reference);
}

fn sha(p: &std::path::Path) -> u32 {
    crc32c::crc32c(&std::fs::read(p).unwrap())
}

#[test]
fn corrupt_or_foreign_metadata_is_refused_and_left_unmodified() {
    let dir = tempfile::tempdir().unwrap();
    let cache_bytes = cache_dev_bytes(64, 4096);
    let img = dir.path().join("cache.img");
    {
        let reg = Registry::new();
        file_setup(&reg, dir.path(), cache_bytes);
        let b = CacheBdev::create(&cfg(Mode::Wb), &reg).unwrap();
        let desc = {
            reg.register(b.clone()).unwrap();
            reg.open("c0", true).unwrap()
        };
        let mut ch = desc.channel().unwrap();
        write(&mut ch, 0, &fill(1, 4096));
        drop(ch);
        drop(desc);
        reg.unregister("c0").unwrap().shutdown().unwrap();
    }
    let try_open = |c: &CacheConfig| {
        let reg = Registry::new();
        file_setup(&reg, dir.path(), cache_bytes);
        CacheBdev::create(c, &reg).map(|_| ())
    };
    // Another cache's metadata (other line size): refused, naming the flag that forces it.
    let before = sha(&img);
    let mut other = cfg(Mode::Wb);
    other.line_size = 8192;
    let e = try_open(&other).unwrap_err().to_string();
    assert!(e.contains("another cache") && e.contains("load=off"), "{e}");
    assert_eq!(sha(&img), before, "refusal must not modify the device");
    // The same cache bdev name over another core: refused, device untouched.
    let before = sha(&img);
    let e = {
        let reg = Registry::new();
        file_setup(&reg, dir.path(), cache_bytes);
        reg.register(Arc::new(MallocBdev::new("other", 1 << 20, 512).unwrap())).unwrap();
        let mut c = cfg(Mode::Wb);
        c.core = "other".into();
        CacheBdev::create(&c, &reg).err().unwrap().to_string()
    };
    assert!(e.contains("over core 'core0'") && e.contains("load=off"), "{e}");
    assert_eq!(sha(&img), before, "refusal must not modify the device");
    // Corrupt both superblock copies.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[100] ^= 0xff;
    bytes[4096 + 100] ^= 0xff;
    std::fs::write(&img, &bytes).unwrap();
    let before = sha(&img);
    let e = try_open(&cfg(Mode::Wb)).unwrap_err().to_string();
    assert!(e.contains("corrupt") && e.contains("load=off"), "{e}");
    assert_eq!(sha(&img), before, "refusal must not modify the device");
    assert!(info_json(&img).is_err());
    // Repair the superblock, corrupt a line record (both slots).
    bytes[100] ^= 0xff;
    bytes[4096 + 100] ^= 0xff;
    bytes[layout::MD_OFFSET as usize + 5] ^= 0xff;
    bytes[layout::MD_OFFSET as usize + 64 + 5] ^= 0xff;
    std::fs::write(&img, &bytes).unwrap();
    let before = sha(&img);
    let e = try_open(&cfg(Mode::Wb)).unwrap_err().to_string();
    assert!(e.contains("corrupt") && e.contains("line 0"), "{e}");
    assert_eq!(sha(&img), before);
    // load=off re-creates.
    let mut force = cfg(Mode::Wb);
    force.load = LoadPolicy::Off;
    try_open(&force).unwrap();
    assert_ne!(sha(&img), before);
    // load=on on a device without metadata is refused.
    std::fs::write(&img, vec![0u8; cache_bytes as usize]).unwrap();
    let mut on = cfg(Mode::Wb);
    on.load = LoadPolicy::On;
    let e = try_open(&on).unwrap_err().to_string();
    assert!(e.contains("load=on") && e.contains("no cache metadata"), "{e}");
}

#[test]
fn hot_remove_of_the_cache_device() {
    // Dirty: reads of dirty sectors fail, others pass through to the core; never stale data.
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    write(&mut ch, 0, &fill(1, 4096));
    write(&mut ch, 64, &fill(2, 4096));
    drop(reg.unregister("cdev").unwrap());
    let r = run(&mut ch, vec![BdevIo::read(0, 8, IoVecs::alloc(4096), 0)]);
    assert_eq!(r[&0], Err(IoError::Errno(libc::EIO)), "dirty data of a removed cache is never served stale");
    let d = fill(3, 4096);
    write(&mut ch, 200, &d);
    same(&read(&mut ch, 200, 8), &d, "pass-through after removal");
    // A flush cannot make the stranded dirty data durable: it fails instead of pretending.
    let r = run(&mut ch, vec![BdevIo::no_data(IoKind::Flush, 0, 0, 0)]);
    assert_eq!(r[&0], Err(IoError::Errno(libc::EIO)));
    // Overwriting the dirty sectors makes them whole again on the core.
    let d = fill(5, 4096);
    write(&mut ch, 0, &d);
    same(&read(&mut ch, 0, 8), &d, "dirty sectors overwritten after removal");

    // Clean: carries on in pass-through with the data intact.
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let bdev = CacheBdev::create(&cfg(Mode::Wt), &reg).unwrap();
    reg.register(bdev.clone()).unwrap();
    let desc = reg.open("c0", true).unwrap();
    let mut ch = desc.channel().unwrap();
    let d = fill(4, 8192);
    write(&mut ch, 8, &d);
    same(&read(&mut ch, 8, 16), &d, "before removal");
    drop(reg.unregister("cdev").unwrap());
    same(&read(&mut ch, 8, 16), &d, "after removal of a clean cache");
    // Core removal fails further I/O.
    drop(reg.unregister("core0").unwrap());
    let r = run(&mut ch, vec![BdevIo::read(0, 1, IoVecs::alloc(512), 0)]);
    assert_eq!(r[&0], Err(IoError::Removed));
    let _ = drive(&mut ch);
}

#[test]
fn sequential_cutoff_bypasses_the_cache() {
    let (_reg, bdev, _desc, mut ch) = stream_cache(SeqCutoff::Always);
    // 256 KiB streamed in 16 KiB reads: only the first 64 KiB are inserted.
    for i in 0..16 {
        read(&mut ch, i * 32, 32);
    }
    let occ = stats(&bdev)["occupancy_lines"].as_u64().unwrap();
    assert!(occ <= 20, "a sequential stream past the cut-off must not fill the cache: {occ}");
}

/// A crash (the owner dies without its final records) right after a cleaned line was evicted and its
/// cache line refilled with another core line's data: the stale "dirty" record on the device must not
/// bring the other line's data back as this one's. Deterministic: lazy record writes are held back.
#[test]
fn crash_after_clean_and_reuse_loads_the_right_data() {
    let dir = tempfile::tempdir().unwrap();
    let lines = 4u64;
    let cache_bytes = cache_dev_bytes(lines, 4096);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.md_lazy_ms = 3_600_000;
    c.seq_cutoff = SeqCutoff::Off;
    let x = fill(7, 4096);
    {
        let reg = Registry::new();
        file_setup(&reg, dir.path(), cache_bytes);
        let bdev = CacheBdev::create(&c, &reg).unwrap();
        reg.register(bdev.clone()).unwrap();
        let desc = reg.open("c0", true).unwrap();
        let mut ch = desc.channel().unwrap();
        write(&mut ch, 0, &x); // line 0 dirty, its record written before the ack
        flush(&mut ch); // cleaned: clean at run time, still "dirty" on the device
        for l in 1..=2 * lines {
            read(&mut ch, l * 8, 8); // fills evict clean lines and reuse them
        }
        same(&read(&mut ch, 0, 8), &x, "before the crash");
        bdev.shared().simulate_crash.store(true, Ordering::Release);
        drop(ch);
        drop(desc);
        drop(reg.unregister("c0").unwrap());
        drop(bdev);
    }
    let reg = Registry::new();
    file_setup(&reg, dir.path(), cache_bytes);
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    same(&read(&mut ch, 0, 8), &x, "after the crash");
    for l in 1..=2 * lines {
        same(&read(&mut ch, l * 8, 8), &vec![0u8; 4096], "other lines after the crash");
    }
}

/// Hot-remove of a core under a shared cache: the cache bdev writes back that core's dirty lines,
/// frees its clean ones, unregisters itself (its users are told), and the other core is served on.
#[test]
fn core_removal_cleans_and_removes_the_cache_bdev() {
    let mut a = cfg(Mode::Wb);
    a.cleaner = CleanerPolicy::Nop;
    a.seq_cutoff = SeqCutoff::Off;
    let (reg, _, ca, cb) = shared_pair(&a);
    // An "export" on c0 that wants to hear about its removal.
    let told = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let t2 = told.clone();
    let desc0 = reg.open_with_remove("c0", true, move |n| t2.lock().unwrap().push(n.to_string())).unwrap();
    let desc1 = reg.open("c1", true).unwrap();
    let core0_ro = reg.open("core0", false).unwrap();
    let (mut ch0, mut ch1) = (desc0.channel().unwrap(), desc1.channel().unwrap());
    let (x, y, z) = (fill(11, 4 * 4096), fill(12, 4 * 4096), fill(13, 4096));
    write(&mut ch0, 0, &x); // dirty, only in the cache
    read(&mut ch0, 512, 8); // a clean line of core0
    write(&mut ch1, 64, &y);
    assert!(stats(&ca)["dirty_lines"].as_u64().unwrap() >= 4);
    let mut core_ch = core0_ro.channel().unwrap();
    assert_ne!(read(&mut core_ch, 0, 32), x, "write-back: the core does not have the data yet");

    drop(reg.unregister("core0").unwrap());
    assert_eq!(*told.lock().unwrap(), vec!["c0".to_string()], "the cache bdev's users see it go");
    assert!(reg.get("c0").is_none(), "the cache bdev unregisters itself");
    same(&read(&mut core_ch, 0, 32), &x, "dirty data written back to the removed core");
    assert_eq!(ca.dirty_at_risk(), 0);
    let r = run(&mut ch0, vec![BdevIo::read(0, 8, IoVecs::alloc(4096), 0)]);
    assert_eq!(r[&0], Err(IoError::Removed));
    // The shared instance serves core1 on; core0's lines are gone from it.
    let s = stats(&cb);
    assert_eq!(s["shared_cache"]["occupancy_lines"], s["occupancy_lines"], "core0's lines freed: {s}");
    same(&read(&mut ch1, 64, 32), &y, "other core after the removal");
    write(&mut ch1, 400, &z);
    flush(&mut ch1);
    same(&read(&mut ch1, 400, 8), &z, "other core keeps working");
    assert!(!cb.shared().stopped.load(Ordering::Acquire));
    let _ = drive(&mut ch0);
}

/// A core that fails the write-back when it goes away: the dirty lines are reported at risk (never
/// dropped silently) and the cache bdev still removes itself.
#[test]
fn core_removal_reports_dirty_lines_it_cannot_write_back() {
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("cdev", cache_dev_bytes(64, 4096), 512).unwrap())).unwrap();
    let (stub, ctl) = crate::bdev::tests::StubBdev::new(|_| {});
    reg.register(stub).unwrap();
    let mut c = CacheConfig::new("c0", "cdev", "stub");
    c.mode = Mode::Wb;
    c.cleaner = CleanerPolicy::Nop;
    c.seq_cutoff = SeqCutoff::Off;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    write(&mut ch, 0, &fill(1, 4096));
    write(&mut ch, 64, &fill(2, 4096));
    ctl.lock().unwrap().fail_at = Some(64);
    drop(reg.unregister("stub").unwrap());
    assert!(reg.get("c0").is_none(), "the cache bdev unregisters itself");
    assert!(bdev.dirty_at_risk() >= 1, "dirty lines that could not be written back are reported");
    let _ = drive(&mut ch);
}

/// A write-back write to a line whose "clean" record is being written (the device holds the old
/// dirty record or the new clean one) must wait for a record round of its own: its dirty bits are not
/// certainly on the device. The mid-round state is set up by hand (what `start_md` leaves behind).
#[test]
fn rewrite_during_a_clean_record_round_waits_for_its_own_record() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.md_lazy_ms = 3_600_000;
    c.seq_cutoff = SeqCutoff::Off;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let sh = bdev.shared().clone();
    let waiters = || sh.md_waiters.load(Ordering::Acquire);
    write(&mut ch, 0, &fill(1, 4096));
    assert_eq!(waiters(), 1, "a first write-back write waits for its record");
    write(&mut ch, 0, &fill(2, 4096));
    assert_eq!(waiters(), 1, "a rewrite of recorded dirty sectors does not");
    flush(&mut ch); // cleaned at run time; the device still says dirty
    {
        // A record round for the cleaned line is in flight: old record dirty, new one clean.
        let mut map = wlock(&sh.map);
        let slot = map.lookup((0, 0)).unwrap();
        let l = &mut map.lines[slot as usize];
        assert_eq!(l.dirty, 0);
        l.disk_sure &= l.dirty;
    }
    write(&mut ch, 0, &fill(3, 4096));
    assert_eq!(waiters(), 2, "the rewrite must wait: its dirty bits may not be on the device");
}

/// What a [`HoldBdev`] does: writes to blocks in `range` (while set; reads too with `reads`) are
/// caught, and the completions of all but the first `allow` caught I/Os are held back; `caught`
/// counts them. With `fail_reads`, reads in `range` complete with EIO; with `fail_writes`, writes in
/// `range` complete with EIO without writing. `submitted` lists every I/O that reached the device
/// (kind, first block).
#[derive(Default)]
struct HoldCtl {
    range: Option<std::ops::Range<u64>>,
    reads: bool,
    /// Hold flushes too (a flush's offset is 0: `range` must hold block 0).
    flushes: bool,
    /// Hold unmaps too.
    unmaps: bool,
    fail_reads: bool,
    fail_writes: bool,
    caught: usize,
    allow: usize,
    delivered: usize,
    submitted: Vec<(IoKind, u64)>,
}

/// A malloc bdev whose writes can be held (their data lands at once, as malloc does; only the
/// completion waits), so a test can act while the cache's record round or write-back is in flight.
struct HoldBdev {
    inner: MallocBdev,
    ctl: Arc<std::sync::Mutex<HoldCtl>>,
}

impl HoldBdev {
    fn new(name: &str, bytes: u64) -> (Arc<Self>, Arc<std::sync::Mutex<HoldCtl>>) {
        let ctl = Arc::new(std::sync::Mutex::new(HoldCtl::default()));
        (Arc::new(Self { inner: MallocBdev::new(name, bytes, 512).unwrap(), ctl: ctl.clone() }), ctl)
    }
}

struct HoldChannel {
    inner: Box<dyn crate::bdev::ModuleChannel>,
    ctl: Arc<std::sync::Mutex<HoldCtl>>,
    tags: std::collections::HashSet<u64>,
    failing: std::collections::HashSet<u64>,
    refused: Vec<crate::bdev::Completion>,
    held: std::collections::VecDeque<crate::bdev::Completion>,
}

impl crate::bdev::Bdev for HoldBdev {
    fn info(&self) -> &crate::bdev::BdevInfo {
        self.inner.info()
    }
    fn create_channel(&self) -> Result<Box<dyn crate::bdev::ModuleChannel>, BdevError> {
        Ok(Box::new(HoldChannel {
            inner: self.inner.create_channel()?,
            ctl: self.ctl.clone(),
            tags: Default::default(),
            failing: Default::default(),
            refused: Vec::new(),
            held: Default::default(),
        }))
    }
}

impl crate::bdev::ModuleChannel for HoldChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), crate::bdev::Rejected> {
        let mut ctl = lock(&self.ctl);
        ctl.submitted.push((io.kind, io.offset_blocks));
        let kind = io.kind == IoKind::Write
            || (ctl.reads && io.kind == IoKind::Read)
            || (ctl.flushes && io.kind == IoKind::Flush)
            || (ctl.unmaps && io.kind == IoKind::Unmap);
        let in_range = ctl.range.as_ref().is_some_and(|r| r.contains(&io.offset_blocks));
        if kind && in_range {
            ctl.caught += 1;
            self.tags.insert(io.tag);
        }
        if ctl.fail_reads && io.kind == IoKind::Read && in_range {
            self.failing.insert(io.tag);
        }
        if ctl.fail_writes && io.kind == IoKind::Write && in_range {
            let result = Err(crate::bdev::IoError::Errno(libc::EIO));
            self.refused.push(crate::bdev::Completion { tag: io.tag, result });
            return Ok(());
        }
        drop(ctl);
        self.inner.submit(io)
    }

    fn poll(&mut self, done: &mut Vec<crate::bdev::Completion>) -> usize {
        let start = done.len();
        let mut tmp = std::mem::take(&mut self.refused);
        self.inner.poll(&mut tmp);
        for mut c in tmp {
            if self.failing.remove(&c.tag) {
                c.result = Err(crate::bdev::IoError::Errno(libc::EIO));
            }
            if self.tags.remove(&c.tag) {
                self.held.push_back(c);
            } else {
                done.push(c);
            }
        }
        let mut ctl = lock(&self.ctl);
        while ctl.delivered < ctl.allow {
            let Some(c) = self.held.pop_front() else { break };
            ctl.delivered += 1;
            done.push(c);
        }
        done.len() - start
    }
}

/// Releases a [`HoldBdev`]'s writes when dropped.
struct ReleaseOnDrop(Arc<std::sync::Mutex<HoldCtl>>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        lock(&self.0).allow = usize::MAX;
    }
}

/// A 64-line malloc cache device `cdev` and a 1 MiB `HoldBdev` core `core0`, registered; the
/// core's hold control.
fn held_core_setup() -> (Registry, Arc<std::sync::Mutex<HoldCtl>>) {
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("cdev", cache_dev_bytes(64, 4096), 512).unwrap())).unwrap();
    let (core, ctl) = HoldBdev::new("core0", 1 << 20);
    reg.register(core).unwrap();
    (reg, ctl)
}

/// A 64-line `HoldBdev` cache device `cdev` and a 1 MiB malloc core `core0`, registered; the cache
/// device's hold control.
fn held_cdev_setup() -> (Registry, Arc<std::sync::Mutex<HoldCtl>>) {
    let reg = Registry::new();
    let (cdev, ctl) = HoldBdev::new("cdev", cache_dev_bytes(64, 4096));
    reg.register(cdev).unwrap();
    reg.register(Arc::new(MallocBdev::new("core0", 1 << 20, 512).unwrap())).unwrap();
    (reg, ctl)
}

/// Write-back, no cleaner, no cut-off, and record rounds only when a request asks for one.
fn wb_records_on_demand() -> CacheConfig {
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.md_lazy_ms = 3_600_000;
    c.seq_cutoff = SeqCutoff::Off;
    c
}

/// Polls `ch` until `cond` holds (60 s deadline), given the completions seen so far; returns them.
#[track_caller]
fn poll_until(
    ch: &mut crate::bdev::Channel,
    what: &str,
    mut cond: impl FnMut(&[crate::bdev::Completion]) -> bool,
) -> Vec<crate::bdev::Completion> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = Vec::new();
    loop {
        ch.poll(&mut done);
        if cond(&done) {
            return done;
        }
        assert!(Instant::now() < deadline, "{what}: not after 60 s");
        std::thread::yield_now();
    }
}

/// The same race as above, driven through the real owner thread: a flush cleans line 0 (its record
/// still says dirty), a record round writing "clean" for it starts and its page write is held; a
/// rewrite of line 0 during that round must not be acknowledged until a round of its own has
/// recorded it dirty (`start_md`'s `disk_sure &= dirty`).
#[test]
fn rewrite_while_the_clean_record_is_in_flight_is_acknowledged_after_its_own_record() {
    let (reg, ctl) = held_cdev_setup();
    let c = wb_records_on_demand();
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let sh = bdev.shared().clone();
    let waiters = || sh.md_waiters.load(Ordering::Acquire);
    write(&mut ch, 0, &fill(1, 4096));
    assert_eq!(waiters(), 1, "a first write-back write waits for its record");
    // From here on, record page writes complete only when released (at the latest when the test
    // ends, pass or fail, before the cache shuts down: its final records must not hang).
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(layout::MD_OFFSET / BS..sh.data_offset / BS);
    flush(&mut ch); // cleaned at run time; the device still says dirty
    assert_eq!(lock(&ctl).caught, 0, "a flush writes no record");
    // A record round for the cleaned line ("clean"), held in flight.
    let mb = Mailbox::new().unwrap();
    sh.send(OwnerReq::Persist(mb.clone(), 1));
    let deadline = Instant::now() + Duration::from_secs(60);
    while lock(&ctl).caught == 0 {
        assert!(Instant::now() < deadline, "the record round never started");
        std::thread::yield_now();
    }
    assert_eq!(waiters(), 2);
    let slot = wlock(&sh.map).lookup((0, 0)).unwrap();
    assert_eq!(wlock(&sh.map).lines[slot as usize].dirty, 0);
    // The rewrite: its data goes to the cache device (not held); once its dirty bits are in the map
    // it has either been acknowledged (in that same poll) or asked for a record round.
    let x = fill(3, 4096);
    ch.submit(BdevIo::write(0, 8, IoVecs::from_slice(&x), 7));
    let early = poll_until(&mut ch, "the rewrite's data write", |_| {
        let m = wlock(&sh.map);
        m.lookup((0, 0)).is_some_and(|s| m.lines[s as usize].dirty != 0)
    });
    assert!(
        early.is_empty(),
        "the rewrite was acknowledged while the only record round in flight writes \"clean\""
    );
    lock(&ctl).allow = usize::MAX;
    assert_eq!(mb.wait_for(1), Ok(()));
    let r = drive(&mut ch);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].result, Ok(()));
    assert_eq!(waiters(), 3, "the rewrite waited for a record round of its own");
    // The device records line 0 dirty, so a crash now would load the rewrite.
    let rec = device_record(&reg, slot).unwrap();
    assert_eq!((rec.used, rec.core_line, rec.dirty), (true, 0, 0xff), "record of line 0: {rec:?}");
}

/// A cleaning round holds its lines exclusively only while reading them from the cache device.
/// While its write-back to the core is in flight (held here): a write-back write to one of its lines
/// goes ahead, and that line stays dirty (the core got the older data), while an unmap (which
/// writes the core) waits for the round. A flush that arrived before the round is done after it
/// (the round read every write acknowledged before the flush); the newer data reaches the core
/// with the next flush.
#[test]
fn a_write_during_the_write_back_of_its_line_keeps_the_line_dirty() {
    let (reg, ctl) = held_core_setup();
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.seq_cutoff = SeqCutoff::Off;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let core_ro = reg.open("core0", false).unwrap();
    let mut core_ch = core_ro.channel().unwrap();
    let dirty = || stats(&bdev)["dirty_lines"].as_u64().unwrap();
    let (x1, y, x2) = (fill(1, 4096), fill(2, 4096), fill(3, 4096));
    write(&mut ch, 0, &x1); // line 0
    write(&mut ch, 8, &y); // line 1
    assert_eq!(dirty(), 2);
    // Writes to the core are held from here (the guest's writes go to the cache device).
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..(1 << 20) / BS);
    ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 100));
    let done = poll_until(&mut ch, "the write-back of lines 0 and 1", |_| lock(&ctl).caught == 2);
    assert!(done.is_empty());
    // A write-back write to line 0 does not wait for the round.
    ch.submit(BdevIo::write(0, 8, IoVecs::from_slice(&x2), 7));
    let done = poll_until(&mut ch, "the rewrite during the write-back", |d| !d.is_empty());
    assert_eq!(done.len(), 1, "only the rewrite completes");
    assert_eq!((done[0].tag, done[0].result), (7, Ok(())));
    // An unmap of line 1 would write the core under the round's write-back: it waits.
    ch.submit(BdevIo::no_data(IoKind::Unmap, 8, 8, 8));
    assert!(
        !lock(&ctl).submitted.contains(&(IoKind::Unmap, 8)),
        "the unmap reached the core while line 1 was being written back"
    );
    // Let the round's two writes complete: the flush ends without a second round (line 0 was
    // written back as it was when the flush arrived), the unmap goes ahead.
    lock(&ctl).allow = 2;
    let done = poll_until(&mut ch, "the flush and the unmap", |d| d.len() == 2 || lock(&ctl).caught > 2);
    assert_eq!(lock(&ctl).caught, 2, "the flush waited for a second write-back");
    let mut tags: Vec<_> = done.iter().map(|c| (c.tag, c.result)).collect();
    tags.sort_unstable_by_key(|t| t.0);
    assert_eq!(tags, vec![(8, Ok(())), (100, Ok(()))]);
    assert_eq!(dirty(), 1, "line 0, rewritten during its write-back, stays dirty");
    same(&read(&mut core_ch, 0, 8), &x1, "core line 0 after the first flush");
    same(&read(&mut core_ch, 8, 8), &[0u8; 4096], "core line 1 after the unmap");
    lock(&ctl).allow = usize::MAX;
    flush(&mut ch);
    assert_eq!(dirty(), 0);
    same(&read(&mut core_ch, 0, 8), &x2, "core line 0 after the next flush");
    same(&read(&mut ch, 0, 16), &[x2.as_slice(), &[0u8; 4096]].concat(), "through the cache");
}

/// wb with `acp` cleaning back to back while two threads write, unmap and flush disjoint halves of
/// the core (4× the cache): after each thread's flush the core itself holds everything that thread
/// had written before it, though the cleaner writes lines back while they are being rewritten (the
/// core is a `delay` bdev, 300 µs per write or flush, so write-backs are in flight for a while).
#[test]
fn acp_cleaning_under_concurrent_writes_keeps_the_flush_promise() {
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("cdev", cache_dev_bytes(64, 4096), 512).unwrap())).unwrap();
    reg.register(Arc::new(MallocBdev::new("base0", 1 << 20, 512).unwrap())).unwrap();
    let opts = crate::bdev::delay::DelayOptions {
        name: "core0".into(),
        base: "base0".into(),
        read: Duration::ZERO,
        write: Duration::from_micros(300),
        jitter: Duration::ZERO,
    };
    reg.register(Arc::new(crate::bdev::delay::DelayBdev::new(opts, &reg).unwrap())).unwrap();
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Acp;
    c.clean_batch = 8;
    c.seq_cutoff = SeqCutoff::Off;
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    reg.register(bdev.clone()).unwrap();
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let desc = reg.open("c0", true).unwrap();
            let core = reg.open("core0", false).unwrap();
            std::thread::spawn(move || {
                let mut ch = desc.channel().unwrap();
                let mut core_ch = core.channel().unwrap();
                let base = t * 1024;
                let mut reference = vec![0u8; 1024 * BS as usize];
                let mut rng = Rng(31 + t);
                for step in 0..600 {
                    let n = 1 + rng.below(16);
                    let off = rng.below(1024 - n);
                    let r = (off * BS) as usize..((off + n) * BS) as usize;
                    match rng.below(25) {
                        0 => {
                            flush(&mut ch);
                            same(&read(&mut core_ch, base, 1024), &reference, &format!("core, step {step}"));
                        }
                        1 => {
                            let u = run(&mut ch, vec![BdevIo::no_data(IoKind::Unmap, base + off, n, 0)]);
                            assert_eq!(u[&0], Ok(()));
                            reference[r].fill(0);
                        }
                        _ => {
                            let d = fill(rng.next(), (n * BS) as usize);
                            write(&mut ch, base + off, &d);
                            reference[r].copy_from_slice(&d);
                        }
                    }
                }
                flush(&mut ch);
                same(&read(&mut core_ch, base, 1024), &reference, "core at the end");
                same(&read(&mut ch, base, 1024), &reference, "through the cache at the end");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(stats(&bdev)["cleaner_writes"].as_u64().unwrap() > 0);
}

/// A sequential write that would be cut off (sent to the core, `seq-cutoff=always`) but lands on a
/// line whose write-back is in flight stays in the cache: on the core it would race the cleaner's
/// older copy of the same blocks.
#[test]
fn a_write_past_a_write_back_is_not_cut_off_to_the_core() {
    let (reg, ctl) = held_core_setup();
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.seq_cutoff = SeqCutoff::Always;
    c.seq_cutoff_bytes = 8192;
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    let (x1, z, x2) = (fill(1, 4096), fill(2, 4096), fill(3, 4096));
    write(&mut ch, 8, &x1); // line 1: 4 KiB, under the cut-off
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..(1 << 20) / BS);
    ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 100));
    poll_until(&mut ch, "the write-back of line 1", |_| lock(&ctl).caught == 1);
    ch.submit(BdevIo::write(0, 8, IoVecs::from_slice(&z), 6)); // line 0: a new stream of 4 KiB
    let done = poll_until(&mut ch, "the write to line 0", |d| !d.is_empty());
    assert_eq!((done[0].tag, done[0].result), (6, Ok(())));
    // Line 1 right after it: 8 KiB of stream, over the cut-off.
    ch.submit(BdevIo::write(8, 8, IoVecs::from_slice(&x2), 7));
    let writes_at_8 = lock(&ctl).submitted.iter().filter(|s| **s == (IoKind::Write, 8)).count();
    assert_eq!(writes_at_8, 1, "the cut-off write went to the core during the write-back of its line");
    let done = poll_until(&mut ch, "the write past the write-back", |d| d.iter().any(|c| c.tag == 7));
    assert!(done.iter().all(|c| c.tag == 7 && c.result.is_ok()), "only the write completes");
    lock(&ctl).allow = usize::MAX;
    poll_until(&mut ch, "the flush", |d| d.iter().any(|c| c.tag == 100));
    flush(&mut ch);
    same(&read(&mut ch, 0, 16), &[z.as_slice(), &x2].concat(), "through the cache");
    let core_ro = reg.open("core0", false).unwrap();
    let mut core_ch = core_ro.channel().unwrap();
    same(&read(&mut core_ch, 0, 16), &[z.as_slice(), &x2].concat(), "the core after the flush");
}

/// Range-lock owner ids: a channel's request ids (channel base | slot) never equal an id the cleaner
/// or the owner thread takes from NEXT_OWNER, and two channels never share a base.
#[test]
fn request_ids_never_meet_owner_ids() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let bdev = CacheBdev::create(&cfg(Mode::Wb), &reg).unwrap();
    let a = engine::CacheChannel::new(&bdev).unwrap();
    let b = engine::CacheChannel::new(&bdev).unwrap();
    let ((base_a, top), (base_b, _)) = (engine::id_spaces(&a), engine::id_spaces(&b));
    let owner_next = engine::NEXT_OWNER.load(Ordering::Relaxed);
    assert!(owner_next < top, "owner ids stay below {top:#x}");
    for base in [base_a, base_b] {
        assert!(base >= top, "request ids {base:#x}.. must lie above every owner id");
        assert_eq!(base & 0xffff_ffff, 0, "the low 32 bits are the slot");
    }
    assert_ne!(base_a, base_b);
}

/// Only reads and writes make up a sequential stream: an unmap that continues a stream neither counts
/// toward the cut-off nor moves where the stream must continue.
#[test]
fn only_reads_and_writes_count_toward_the_sequential_cutoff() {
    let (_reg, bdev, _desc, mut ch) = stream_cache(SeqCutoff::Always);
    let occ = |b: &CacheBdev| stats(b)["occupancy_lines"].as_u64().unwrap();
    // 48 KiB streamed: below the cut-off, all cached.
    for i in 0..3 {
        read(&mut ch, i * 32, 32);
    }
    assert_eq!(occ(&bdev), 12);
    // A 16 KiB unmap right after the stream, then a read right after the unmap.
    assert_eq!(run(&mut ch, vec![BdevIo::no_data(IoKind::Unmap, 96, 32, 0)])[&0], Ok(()));
    read(&mut ch, 128, 32);
    assert_eq!(occ(&bdev), 16, "the read after the unmap starts a new stream and is cached");
}

/// A request waiting for locked lines holds up only later requests on the same lines, in order: while
/// an unmap of line 1 waits for a write-back round, a write to line 1 queues behind it (so the unmap
/// cannot wipe the newer data), and a read of another line goes ahead.
#[test]
fn a_waiting_request_holds_up_only_its_own_lines_in_order() {
    let (reg, ctl) = held_core_setup();
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.seq_cutoff = SeqCutoff::Off;
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    let (y, z, w) = (fill(2, 4096), fill(4, 4096), fill(5, 4096));
    write(&mut ch, 8, &y); // line 1, dirty
    write(&mut ch, 40, &w); // line 5, dirty
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..(1 << 20) / BS);
    ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 100));
    let done = poll_until(&mut ch, "the write-back of lines 1 and 5", |_| lock(&ctl).caught == 2);
    assert!(done.is_empty());
    ch.submit(BdevIo::no_data(IoKind::Unmap, 8, 8, 8));
    ch.submit(BdevIo::write(8, 8, IoVecs::from_slice(&z), 9));
    let back = IoVecs::alloc(4096);
    ch.submit(BdevIo::read(40, 8, back.slice(0, 4096).unwrap(), 10));
    // Line 2, right after the waiting unmap's line: not held up either.
    ch.submit(BdevIo::read(16, 8, IoVecs::alloc(4096), 11));
    let done = poll_until(&mut ch, "the reads of lines 5 and 2", |d| d.len() >= 2);
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, vec![10, 11], "only the reads complete while the round is held: {done:?}");
    same(&back.to_vec(), &w, "line 5 read during the round");
    lock(&ctl).allow = usize::MAX;
    let done = poll_until(&mut ch, "the flush, the unmap and the write", |d| d.len() == 3);
    let order: Vec<u64> = done.iter().map(|c| c.tag).filter(|t| *t != 100).collect();
    assert_eq!(order, vec![8, 9], "the write to line 1 completes after the unmap before it");
    same(&read(&mut ch, 8, 8), &z, "line 1 holds the write that followed the unmap");
}

/// `seq-cutoff=full`: a stream past the threshold is still cached while the cache has free lines.
#[test]
fn full_cutoff_caches_a_stream_while_lines_are_free() {
    let (_reg, bdev, _desc, mut ch) = stream_cache(SeqCutoff::Full);
    // 128 KiB streamed in 16 KiB reads: twice the threshold, half the cache.
    for i in 0..8 {
        read(&mut ch, i * 32, 32);
    }
    assert_eq!(stats(&bdev)["occupancy_lines"].as_u64().unwrap(), 32);
}

/// A request that ends on a line boundary locks only its own lines: an unmap of line 0 goes to the
/// core while line 1, right after it, is being written back (an unmap does not pass a write-back).
#[test]
fn a_request_ending_on_a_line_boundary_does_not_wait_for_the_next_line() {
    let (reg, ctl) = held_core_setup();
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.seq_cutoff = SeqCutoff::Off;
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    write(&mut ch, 8, &fill(2, 4096)); // line 1, dirty
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..(1 << 20) / BS);
    ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 100));
    let done = poll_until(&mut ch, "the write-back of line 1", |_| lock(&ctl).caught == 1);
    assert!(done.is_empty());
    // Blocks 0..8: line 0 only. (The module's submit is synchronous: a started unmap has reached
    // the core by the time submit returns.)
    ch.submit(BdevIo::no_data(IoKind::Unmap, 0, 8, 8));
    assert!(
        lock(&ctl).submitted.contains(&(IoKind::Unmap, 0)),
        "the unmap of line 0 waits for the write-back of line 1"
    );
    let done = poll_until(&mut ch, "the unmap of line 0", |d| !d.is_empty());
    assert_eq!(done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(), vec![(8, Ok(()))]);
    lock(&ctl).allow = usize::MAX;
    poll_until(&mut ch, "the flush", |d| d.iter().any(|c| c.tag == 100));
}

/// A request without blocks never waits, not even behind a waiting request whose lines start right
/// after its offset. (The bdev layer completes zero-block reads itself, so this drives the cache's
/// module channel directly, as any caller of the module interface may.)
#[test]
fn a_zero_block_request_never_waits_behind_a_blocked_one() {
    use crate::bdev::ModuleChannel;
    let (reg, ctl) = held_core_setup();
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.seq_cutoff = SeqCutoff::Off;
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    let mut mch = engine::CacheChannel::new(&bdev).unwrap();
    let poll = |mch: &mut engine::CacheChannel, what: &str, want: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut done = Vec::new();
        while done.len() < want {
            mch.poll(&mut done);
            assert!(Instant::now() < deadline, "{what}: not after 60 s");
            std::thread::yield_now();
        }
        done
    };
    let data = fill(2, 4096);
    assert!(mch.submit(BdevIo::write(8, 8, IoVecs::from_slice(&data), 1)).is_ok()); // line 1, dirty
    assert_eq!(poll(&mut mch, "the write to line 1", 1)[0].result, Ok(()));
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..(1 << 20) / BS);
    assert!(mch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 100)).is_ok());
    let deadline = Instant::now() + Duration::from_secs(60);
    while lock(&ctl).caught == 0 {
        let mut done = Vec::new();
        mch.poll(&mut done);
        assert!(done.is_empty());
        assert!(Instant::now() < deadline, "the write-back of line 1 never started");
        std::thread::yield_now();
    }
    // Lines 1 and 2: waits for the write-back of line 1.
    assert!(mch.submit(BdevIo::no_data(IoKind::Unmap, 8, 16, 8)).is_ok());
    assert!(!lock(&ctl).submitted.contains(&(IoKind::Unmap, 8)), "the unmap did not wait");
    // No blocks at block 16 (line 2's first block): completes at once.
    assert!(mch.submit(BdevIo::read(16, 0, IoVecs::alloc(0), 9)).is_ok());
    let mut done = Vec::new();
    mch.poll(&mut done);
    assert_eq!(
        done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(),
        vec![(9, Ok(()))],
        "the zero-block read must complete while the unmap waits"
    );
    lock(&ctl).allow = usize::MAX;
    let mut tags: Vec<u64> = poll(&mut mch, "the flush and the unmap", 2).iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, vec![8, 100]);
}

/// Every read counts once, by where its sectors came from: a hit within one line and one across two
/// lines (the fast paths), a hit across five lines (too many to pin: the locked path), a miss, and a
/// partial hit.
#[test]
fn each_read_counts_once_as_hit_miss_or_partial() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let c = wt_no_cutoff();
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let counts = |b: &CacheBdev| {
        let s = stats(b);
        ["read_hits", "read_misses", "read_partial_hits"].map(|k| s[k].as_u64().unwrap())
    };
    write(&mut ch, 0, &fill(1, 4096)); // line 0
    write(&mut ch, 16, &fill(2, 8192)); // lines 2 and 3
    write(&mut ch, 64, &fill(3, 5 * 4096)); // lines 8 to 12
    assert_eq!(counts(&bdev), [0, 0, 0]);
    read(&mut ch, 0, 8);
    assert_eq!(counts(&bdev), [1, 0, 0], "a hit within one line");
    read(&mut ch, 16, 16);
    assert_eq!(counts(&bdev), [2, 0, 0], "a hit across two lines");
    read(&mut ch, 40, 8);
    assert_eq!(counts(&bdev), [2, 1, 0], "a miss");
    read(&mut ch, 0, 16);
    assert_eq!(counts(&bdev), [2, 1, 1], "line 0 cached, line 1 not");
    read(&mut ch, 64, 40);
    assert_eq!(counts(&bdev), [3, 1, 1], "a hit across five lines");
}

/// A read hit takes no range lock: a read of two cached lines completes while a write to one of
/// them is in flight (its core write held) and holds that line's lock.
#[test]
fn a_read_hit_across_lines_does_not_wait_for_their_lock() {
    let (reg, ctl) = held_core_setup();
    let c = wt_no_cutoff();
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    let old = fill(2, 8192);
    write(&mut ch, 16, &old); // lines 2 and 3, cached
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..(1 << 20) / BS);
    let new = fill(3, 4096);
    ch.submit(BdevIo::write(24, 8, IoVecs::from_slice(&new), 7)); // line 3, locked until the core answers
    assert_eq!(lock(&ctl).caught, 1);
    let back = IoVecs::alloc(8192);
    ch.submit(BdevIo::read(16, 16, back.slice(0, 8192).unwrap(), 8));
    let done = poll_until(&mut ch, "the read hit of lines 2 and 3", |d| !d.is_empty());
    assert_eq!(done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(), vec![(8, Ok(()))]);
    same(&back.to_vec()[..4096], &old[..4096], "line 2");
    lock(&ctl).allow = usize::MAX;
    poll_until(&mut ch, "the write", |d| d.iter().any(|c| c.tag == 7));
    same(&read(&mut ch, 16, 16), &[&old[..4096], new.as_slice()].concat(), "lines 2 and 3 after the write");
}

/// Request and hit generations are 31 bits (a child's tag keeps the hit bit clear): requests keep
/// completing while the channel's counter passes 2^31 and wraps at 2^32 (about 6 hours of one
/// queue at 100k requests/s).
#[test]
fn generations_wrap_without_losing_completions() {
    use crate::bdev::ModuleChannel;
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let c = wt_no_cutoff();
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    let mut mch = engine::CacheChannel::new(&bdev).unwrap();
    let one = |mch: &mut engine::CacheChannel, io: BdevIo| {
        let tag = io.tag;
        assert!(mch.submit(io).is_ok());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut done = Vec::new();
        while done.is_empty() {
            mch.poll(&mut done);
            assert!(Instant::now() < deadline, "request {tag} never completed");
            std::thread::yield_now();
        }
        assert_eq!(done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(), vec![(tag, Ok(()))]);
    };
    let mut tag = 0;
    for start in [(1u32 << 31) - 3, u32::MAX - 2] {
        engine::set_next_gen(&mut mch, start);
        for line in 0..3u64 {
            let data = fill(line + u64::from(start), 4096);
            tag += 1;
            one(&mut mch, BdevIo::write(line * 8, 8, IoVecs::from_slice(&data), tag)); // a request
            let back = IoVecs::alloc(4096);
            tag += 1;
            one(&mut mch, BdevIo::read(line * 8, 8, back.slice(0, 4096).unwrap(), tag)); // a hit
            same(&back.to_vec(), &data, &format!("line {line} from {start:#x}"));
        }
    }
}

/// A read hit across lines completes only when its reads of the cache device have: the hit's
/// record is not finished early (its lines stay pinned, the guest's buffer is filled before it is
/// told so).
#[test]
fn a_read_hit_across_lines_completes_after_its_cache_reads() {
    let (reg, ctl) = held_cdev_setup();
    let c = wt_no_cutoff();
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let data = fill(1, 8192);
    write(&mut ch, 0, &data); // lines 0 and 1, cached
    let _release = ReleaseOnDrop(ctl.clone());
    {
        let mut h = lock(&ctl);
        h.range = Some(bdev.shared().data_offset / BS..cache_dev_bytes(64, 4096) / BS);
        h.reads = true;
    }
    // Two lines: the hit path that issues one child per run of cache blocks.
    let back = IoVecs::alloc(8192);
    ch.submit(BdevIo::read(0, 16, back.slice(0, 8192).unwrap(), 5));
    assert!(lock(&ctl).caught > 0, "the hit's reads of the cache device");
    let mut done = Vec::new();
    for _ in 0..3 {
        ch.poll(&mut done);
    }
    assert!(done.is_empty(), "the hit completed while its cache read is in flight: {done:?}");
    lock(&ctl).allow = usize::MAX;
    let done = poll_until(&mut ch, "the hit", |d| !d.is_empty());
    assert_eq!(done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(), vec![(5, Ok(()))]);
    same(&back.to_vec(), &data, "lines 0 and 1");
}

/// Every write counts once: a hit when every line it touched was cached, a miss otherwise.
#[test]
fn each_write_counts_once_as_hit_or_miss() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let c = wt_no_cutoff();
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let counts = |b: &CacheBdev| {
        let s = stats(b);
        ["write_hits", "write_misses"].map(|k| s[k].as_u64().unwrap())
    };
    write(&mut ch, 0, &fill(1, 4096));
    assert_eq!(counts(&bdev), [0, 1], "line 0, not cached");
    write(&mut ch, 0, &fill(2, 4096));
    assert_eq!(counts(&bdev), [1, 1], "line 0 again");
    write(&mut ch, 0, &fill(3, 8192));
    assert_eq!(counts(&bdev), [1, 2], "lines 0 and 1, line 1 not cached");
    write(&mut ch, 0, &fill(4, 8192));
    assert_eq!(counts(&bdev), [2, 2], "lines 0 and 1 again");
}

/// An unmap longer than four times the cache (the path that scans every cache line instead of
/// looking up each core line) invalidates exactly this core's cached lines inside its range.
#[test]
fn a_long_unmap_invalidates_exactly_its_cached_lines() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 4 << 20); // a 1024-line core
    let c = wt_no_cutoff();
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let occ = |b: &CacheBdev| stats(b)["occupancy_lines"].as_u64().unwrap();
    let (before, inside, after) = (fill(1, 4096), fill(2, 4096), fill(3, 4096));
    write(&mut ch, 0, &before); // line 0
    write(&mut ch, 100 * 8, &inside); // line 100
    write(&mut ch, 600 * 8, &after); // line 600
    assert_eq!(occ(&bdev), 3);
    // Lines 10 to 519: 510 lines, more than 4 × 64.
    assert_eq!(run(&mut ch, vec![BdevIo::no_data(IoKind::Unmap, 80, 510 * 8, 0)])[&0], Ok(()));
    assert_eq!(occ(&bdev), 2, "only line 100 leaves the cache");
    same(&read(&mut ch, 100 * 8, 8), &[0u8; 4096], "line 100 after the unmap");
    let hits = stats(&bdev)["read_hits"].as_u64().unwrap();
    same(&read(&mut ch, 0, 8), &before, "line 0");
    same(&read(&mut ch, 600 * 8, 8), &after, "line 600");
    assert_eq!(stats(&bdev)["read_hits"].as_u64().unwrap(), hits + 2, "lines 0 and 600 are still cached");
}

/// A write-through write completes only when both its children have: its cache-device write
/// completes at once here, its core write is held.
#[test]
fn a_write_through_write_waits_for_its_core_write() {
    let (reg, ctl) = held_core_setup();
    let c = wt_no_cutoff();
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..(1 << 20) / BS);
    let data = fill(1, 4096);
    ch.submit(BdevIo::write(0, 8, IoVecs::from_slice(&data), 7));
    assert_eq!(lock(&ctl).caught, 1, "the core write");
    let mut done = Vec::new();
    for _ in 0..3 {
        ch.poll(&mut done);
    }
    assert!(done.is_empty(), "completed while its core write is in flight: {done:?}");
    lock(&ctl).allow = usize::MAX;
    let done = poll_until(&mut ch, "the write", |d| !d.is_empty());
    assert_eq!(done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(), vec![(7, Ok(()))]);
}

/// A read miss whose core read fails fills nothing: no write of its (unread) buffer to the cache
/// device, and the next read of that line is a miss again.
#[test]
fn a_failed_read_miss_fills_nothing() {
    let reg = Registry::new();
    let (cdev, cctl) = HoldBdev::new("cdev", cache_dev_bytes(64, 4096));
    reg.register(cdev).unwrap();
    let (core, ctl) = HoldBdev::new("core0", 1 << 20);
    reg.register(core).unwrap();
    let c = wt_no_cutoff();
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    {
        let mut h = lock(&ctl);
        h.range = Some(0..(1 << 20) / BS);
        h.fail_reads = true;
    }
    let before = lock(&cctl).submitted.len();
    let r = run(&mut ch, vec![BdevIo::read(0, 8, IoVecs::alloc(4096), 1)]);
    assert_eq!(r[&1], Err(crate::bdev::IoError::Errno(libc::EIO)));
    let data_start = bdev.shared().data_offset / BS;
    let fills: Vec<_> = lock(&cctl).submitted[before..]
        .iter()
        .filter(|(k, off)| *k == IoKind::Write && *off >= data_start)
        .copied()
        .collect();
    assert!(fills.is_empty(), "the failed read filled the cache device: {fills:?}");
    lock(&ctl).fail_reads = false;
    read(&mut ch, 0, 8);
    assert_eq!(stats(&bdev)["read_misses"].as_u64(), Some(2), "line 0 was not cached by the failed read");
}

/// A write-through write to part of a dirty line (possible right after a switch from write-back,
/// before the cleaning round reaches the line: the mode is stored first) leaves the line's other
/// dirty sectors dirty, so the cleaning writes them back.
#[test]
fn a_write_through_write_keeps_the_other_dirty_sectors_of_its_line() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.seq_cutoff = SeqCutoff::Off;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let (old, new) = (fill(1, 4096), fill(2, 2048));
    write(&mut ch, 0, &old); // line 0, all 8 sectors dirty
                             // set_mode's first step (the new mode, before its cleaning round).
    bdev.shared().mode.store(Mode::Wt.to_u8(), Ordering::Release);
    write(&mut ch, 4, &new); // sectors 4..8, write-through
    let sh = bdev.shared();
    let slot = wlock(&sh.map).lookup((0, 0)).unwrap();
    assert_eq!(wlock(&sh.map).lines[slot as usize].dirty, 0x0f, "sectors 0..4 are still dirty");
    bdev.clean_all().unwrap();
    let core_ro = reg.open("core0", false).unwrap();
    let mut core_ch = core_ro.channel().unwrap();
    same(&read(&mut core_ch, 0, 8), &[&old[..2048], new.as_slice()].concat(), "the core after cleaning");
}

/// A write whose cache-device write fails leaves none of its sectors valid or dirty in the line:
/// the next read comes from the core (which has the new data), and cleaning writes nothing back.
#[test]
fn a_failed_cache_write_leaves_its_sectors_neither_valid_nor_dirty() {
    let (reg, cctl) = held_cdev_setup();
    let c = wt_no_cutoff();
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let (old, new) = (fill(1, 4096), fill(2, 2048));
    write(&mut ch, 0, &old); // line 0, cached and valid
    {
        let mut h = lock(&cctl);
        h.range = Some(bdev.shared().data_offset / BS..cache_dev_bytes(64, 4096) / BS);
        h.allow = usize::MAX;
        h.fail_writes = true;
    }
    let sh = bdev.shared();
    let waiters = sh.md_waiters.load(Ordering::Acquire);
    let r = run(&mut ch, vec![BdevIo::write(4, 4, IoVecs::from_slice(&new), 1)]);
    assert_eq!(r[&1], Err(crate::bdev::IoError::Errno(libc::EIO)));
    lock(&cctl).fail_writes = false;
    assert_eq!(
        sh.md_waiters.load(Ordering::Acquire),
        waiters,
        "a record round for a line not recorded dirty"
    );
    let slot = wlock(&sh.map).lookup((0, 0)).unwrap();
    let (valid, dirty) = {
        let m = wlock(&sh.map);
        (m.lines[slot as usize].valid(), m.lines[slot as usize].dirty)
    };
    assert_eq!((valid, dirty), (0x0f, 0), "sectors 4..8 are unknown in the cache");
    let want = [&old[..2048], new.as_slice()].concat();
    same(&read(&mut ch, 0, 8), &want, "line 0 after the failed cache write");
    bdev.clean_all().unwrap();
    let core_ro = reg.open("core0", false).unwrap();
    let mut core_ch = core_ro.channel().unwrap();
    same(&read(&mut core_ch, 0, 8), &want, "the core after cleaning");
}

/// A write-back write that fails on the cache device, to a line the device records dirty, is
/// acknowledged (with its error) only after the line's record no longer says those sectors are
/// dirty: after a crash the cache must not load sectors whose content is unknown.
#[test]
fn a_failed_write_to_a_recorded_dirty_line_persists_the_invalidation() {
    let (reg, cctl) = held_cdev_setup();
    let c = wb_records_on_demand();
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let sh = bdev.shared().clone();
    write(&mut ch, 0, &fill(1, 4096)); // line 0: dirty, and recorded dirty before the ack
    let slot = wlock(&sh.map).lookup((0, 0)).unwrap();
    let record = || device_record(&reg, slot);
    assert_eq!(record().map(|r| r.dirty), Some(0xff));
    {
        let mut h = lock(&cctl);
        h.range = Some(sh.data_offset / BS..cache_dev_bytes(64, 4096) / BS); // data only, not records
        h.allow = usize::MAX;
        h.fail_writes = true;
    }
    let r = run(&mut ch, vec![BdevIo::write(0, 8, IoVecs::from_slice(&fill(2, 4096)), 1)]);
    assert_eq!(r[&1], Err(crate::bdev::IoError::Errno(libc::EIO)));
    let dirty = record().map_or(0, |r| r.dirty);
    assert_eq!(dirty, 0, "the device still records the failed sectors dirty");
}

/// An unmap of a line the device records dirty is acknowledged only after the record no longer
/// says so: after a crash the cache must not load the unmapped sectors' old data.
#[test]
fn an_unmap_of_a_recorded_dirty_line_persists_the_invalidation() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let c = wb_records_on_demand();
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let sh = bdev.shared().clone();
    write(&mut ch, 0, &fill(1, 4096)); // line 0: dirty, and recorded dirty before the ack
    let slot = wlock(&sh.map).lookup((0, 0)).unwrap();
    let record = || device_record(&reg, slot);
    assert_eq!(record().map(|r| r.dirty), Some(0xff));
    assert_eq!(run(&mut ch, vec![BdevIo::no_data(IoKind::Unmap, 0, 4, 1)])[&1], Ok(()));
    assert_eq!(record().map_or(0, |r| r.dirty), 0xf0, "the device still records the unmapped sectors dirty");
    // A clean line (filled by a read): its unmap asks for no record write.
    read(&mut ch, 16, 8);
    let waiters = sh.md_waiters.load(Ordering::Acquire);
    assert_eq!(run(&mut ch, vec![BdevIo::no_data(IoKind::Unmap, 16, 8, 2)])[&2], Ok(()));
    assert_eq!(sh.md_waiters.load(Ordering::Acquire), waiters, "a record round for a clean line");
}

/// The cache channel has a wait fd (a poller sleeps on it) that becomes readable when a request
/// can be completed (here: a flush, answered by the owner thread through the channel's mailbox).
#[test]
fn the_channel_wait_fd_wakes_for_a_completion() {
    use crate::bdev::ModuleChannel;
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let c = wt_no_cutoff();
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    let mut mch = engine::CacheChannel::new(&bdev).unwrap();
    let fd = mch.wait_fd().expect("a wait fd");
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd on the stack; timeout 0.
    assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 0, "readable with nothing to complete");
    assert!(mch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 1)).is_ok());
    // SAFETY: one valid pollfd on the stack; 20 s at most.
    assert_eq!(unsafe { libc::poll(&mut p, 1, 20_000) }, 1, "the wait fd never became readable");
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.is_empty() {
        mch.poll(&mut done);
        assert!(Instant::now() < deadline, "the flush never completed");
    }
    assert_eq!((done[0].tag, done[0].result), (1, Ok(())));
}

/// The cache passes its owner's batch time on to its children: a read miss's core read counts its
/// latency from the batch time too.
#[test]
fn the_batch_time_reaches_the_core() {
    let (reg, _bdev, _desc, mut ch) = stream_cache(SeqCutoff::Off);
    let core_stats = reg.bdev_stats("core0").unwrap();
    let t0 = Instant::now();
    ch.set_batch_time(t0);
    std::thread::sleep(Duration::from_millis(50));
    read(&mut ch, 0, 8); // a miss: read from the core
    let max = core_stats.snapshot().read_latency_ns_max;
    assert!(max >= 50_000_000, "core read latency {max} ns: the batch time did not reach the core");
}

/// Read hits take only the map's read lock and defer their LRU touch: the touch must still land
/// before the next eviction, so a line just hit is not the one evicted.
#[test]
fn a_line_just_hit_is_not_the_next_one_evicted() {
    let (_reg, bdev, _desc, mut ch) = stream_cache(SeqCutoff::Off);
    // Fill all 64 lines; line 0 is the least recently used.
    for i in 0..64 {
        read(&mut ch, i * 8, 8);
    }
    assert_eq!(stats(&bdev)["occupancy_lines"].as_u64().unwrap(), 64);
    read(&mut ch, 0, 8); // a hit on the oldest line
    read(&mut ch, 64 * 8, 8); // a miss: evicts the least recently used line
    let hits = |b: &CacheBdev| stats(b)["read_hits"].as_u64().unwrap();
    let h = hits(&bdev);
    read(&mut ch, 0, 8);
    assert_eq!(hits(&bdev), h + 1, "the line just hit was evicted");
    read(&mut ch, 8, 8);
    assert_eq!(hits(&bdev), h + 1, "line 1 (now the least recently used) should have been evicted");
}

/// A second chance is given once per hit: when every line was hit, a miss still finds a victim (the
/// scan clears the bits it passes), and the new line is cached.
#[test]
fn a_miss_finds_a_victim_when_every_line_was_hit() {
    let (_reg, bdev, _desc, mut ch) = stream_cache(SeqCutoff::Off);
    // The first pass fills every line, the second hits every line.
    for _ in 0..2 {
        for i in 0..64 {
            read(&mut ch, i * 8, 8);
        }
    }
    let hits = |b: &CacheBdev| stats(b)["read_hits"].as_u64().unwrap();
    assert_eq!(hits(&bdev), 64);
    for i in 64..72 {
        read(&mut ch, i * 8, 8); // misses: each must evict a line
        read(&mut ch, i * 8, 8);
        assert_eq!(hits(&bdev), 64 + (i - 63), "core line {i} was not cached");
    }
}

/// Read hits keep the sequential stream detection going: a stream that runs over cached lines and on
/// into uncached ones is past the cut-off when it leaves the cache, so the uncached part is not
/// inserted. Through the one-line hit path (4 KiB reads) and the multi-line one (8 KiB reads).
#[test]
fn a_stream_through_cached_lines_stays_cut_off() {
    for blocks in [8u64, 16] {
        let (_reg, bdev, _desc, mut ch) = stream_cache(SeqCutoff::Always);
        // Cache lines 0..16 (64 KiB) without a stream: backwards, one line at a time.
        for line in (0..16u64).rev() {
            read(&mut ch, line * 8, 8);
        }
        let occ = |b: &CacheBdev| stats(b)["occupancy_lines"].as_u64().unwrap();
        assert_eq!(occ(&bdev), 16);
        // Stream over them (all hits: 64 KiB, the threshold), then on for 4 more lines.
        let mut off = 0;
        while off < 20 * 8 {
            read(&mut ch, off, blocks);
            off += blocks;
        }
        assert_eq!(occ(&bdev), 16, "{blocks}-block reads: the stream past the cut-off filled the cache");
    }
}

/// In write-back mode a sequential write stream past the cut-off goes to the core too (only a write
/// let past a cleaning batch's write-back is kept in the cache).
#[test]
fn a_write_back_stream_past_the_cutoff_goes_to_the_core() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.seq_cutoff = SeqCutoff::Always;
    c.seq_cutoff_bytes = 64 << 10;
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    // 256 KiB streamed in 16 KiB writes: only about the first 64 KiB are cached (dirty).
    for i in 0..16u64 {
        write(&mut ch, i * 32, &fill(i, 16 << 10));
    }
    let dirty = stats(&bdev)["dirty_lines"].as_u64().unwrap();
    assert!(dirty <= 20, "a write-back stream past the cut-off stayed in the cache: {dirty} dirty lines");
    for i in 0..16u64 {
        same(&read(&mut ch, i * 32, 32), &fill(i, 16 << 10), "streamed data");
    }
}

/// A cache channel dropped with a request in flight finishes it first: its line lock is released and
/// its core write delivered before the drop returns, so another channel can write the line.
#[test]
fn a_dropped_channel_finishes_its_requests() {
    let (reg, ctl) = held_core_setup();
    let c = wt_no_cutoff();
    let (_bdev, desc, mut a) = open_cache(&reg, &c);
    let mut b = desc.channel().unwrap();
    lock(&ctl).range = Some(0..8);
    a.submit(BdevIo::write(0, 8, IoVecs::from_slice(&fill(1, 4096)), 1));
    poll_until(&mut a, "the held core write", |_| lock(&ctl).caught == 1);
    let release = {
        let ctl = ctl.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            lock(&ctl).allow = usize::MAX;
        })
    };
    drop(a);
    assert_eq!(lock(&ctl).delivered, 1, "the channel was dropped before its write completed");
    release.join().unwrap();
    lock(&ctl).range = None;
    write(&mut b, 0, &fill(2, 4096));
    same(&read(&mut b, 0, 8), &fill(2, 4096), "line 0 after the dropped channel's write");
}

/// Read hits are counted per channel; dropping one channel keeps its hits and every other channel's.
#[test]
fn hits_of_a_dropped_channel_and_of_live_ones_all_count() {
    let (_reg, bdev, desc, mut a) = stream_cache(SeqCutoff::Off);
    let mut b = desc.channel().unwrap();
    read(&mut a, 0, 8); // a miss fills line 0
    for _ in 0..3 {
        read(&mut a, 0, 8);
    }
    for _ in 0..5 {
        read(&mut b, 0, 8);
    }
    let hits = |x: &CacheBdev| stats(x)["read_hits"].as_u64().unwrap();
    assert_eq!(hits(&bdev), 8);
    drop(a);
    assert_eq!(hits(&bdev), 8, "after dropping one channel");
    read(&mut b, 0, 8);
    assert_eq!(hits(&bdev), 9);
    drop(b);
    assert_eq!(hits(&bdev), 9, "after dropping both");
}

/// The same with a read hit in flight (its cache-device read held): the drop waits for it, so the
/// line's pin is released and the read's memory outlives it.
#[test]
fn a_dropped_channel_finishes_its_hits() {
    let (reg, ctl) = held_cdev_setup();
    let c = wt_no_cutoff();
    let (bdev, _desc, mut a) = open_cache(&reg, &c);
    read(&mut a, 0, 8); // a miss fills line 0
    {
        let mut g = lock(&ctl);
        g.reads = true;
        g.range = Some(0..u64::MAX);
    }
    a.submit(BdevIo::read(0, 8, IoVecs::alloc(4096), 1));
    poll_until(&mut a, "the held hit", |_| lock(&ctl).caught == 1);
    let release = {
        let ctl = ctl.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            lock(&ctl).allow = usize::MAX;
        })
    };
    drop(a);
    // (Held writes of the owner thread's record rounds may be delivered too, after the release.)
    assert!(lock(&ctl).delivered >= 1, "the channel was dropped before its hit completed");
    release.join().unwrap();
    assert_eq!(stats(&bdev)["read_hits"].as_u64().unwrap(), 1);
}

/// A read hit within one line reads through the cache device's lane; it is counted once in the cache
/// device's statistics (ops, bytes, latency), also when the lane gives it back (a QoS limit on the
/// cache device) and the hit goes through the device's channel instead.
#[test]
fn a_hit_is_counted_once_on_the_cache_device_whichever_way_it_goes() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let c = wt_no_cutoff();
    let (bdev, _desc, mut ch) = open_cache(&reg, &c);
    let cdev = reg.open("cdev", false).unwrap();
    let data = fill(7, 4096);
    write(&mut ch, 8, &data); // line 1
    let hits = |b: &CacheBdev| stats(b)["read_hits"].as_u64().unwrap();
    for limited in [false, true] {
        if limited {
            let limits = crate::bdev::qos::QosLimits { iops: 1_000_000, bps: 0 };
            reg.set_qos("cdev", limits).unwrap();
        }
        let (before, h0) = (cdev.stats(), hits(&bdev));
        for _ in 0..3 {
            same(&read(&mut ch, 9, 2), &data[512..1536], "hit");
        }
        let after = cdev.stats();
        assert_eq!(hits(&bdev) - h0, 3, "three hits (QoS on the cache device: {limited})");
        assert_eq!(
            (after.read_ops - before.read_ops, after.read_bytes - before.read_bytes),
            (3, 3 * 1024),
            "each hit counted once on the cache device (QoS: {limited})"
        );
        let lat = after.read_latency_ns_sum - before.read_latency_ns_sum;
        assert!(lat > 0 && lat < 10_000_000_000, "with a latency from its submission: {lat} ns");
    }
}

/// A read hit within one line takes the fast path (no range lock) also when another request of the
/// channel waits for its lines: it completes while a write to its own line holds that line's lock.
#[test]
fn a_read_hit_passes_a_waiting_request_and_a_locked_line() {
    let (reg, ctl) = held_core_setup();
    let c = wt_no_cutoff();
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    write(&mut ch, 16, &fill(2, 4096)); // line 2, cached
    write(&mut ch, 32, &fill(4, 4096)); // line 4, cached
    let _release = ReleaseOnDrop(ctl.clone());
    lock(&ctl).range = Some(0..(1 << 20) / BS);
    let new = fill(5, 4096);
    ch.submit(BdevIo::write(32, 8, IoVecs::from_slice(&new), 7)); // holds line 4
    ch.submit(BdevIo::write(32, 8, IoVecs::from_slice(&new), 8)); // waits for line 4
    ch.submit(BdevIo::write(16, 8, IoVecs::from_slice(&new), 9)); // holds line 2
    assert_eq!(lock(&ctl).caught, 2, "the first write to each line is at the core");
    let back = IoVecs::alloc(4096);
    ch.submit(BdevIo::read(16, 8, back, 10)); // a hit on line 2
    let done = poll_until(&mut ch, "the read hit of line 2", |d| !d.is_empty());
    assert_eq!(done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(), vec![(10, Ok(()))]);
    lock(&ctl).allow = usize::MAX;
    poll_until(&mut ch, "the writes", |d| [7, 8, 9].iter().all(|t| d.iter().any(|c| c.tag == *t)));
    same(&read(&mut ch, 16, 8), &new, "line 2 after the write");
    same(&read(&mut ch, 32, 8), &new, "line 4 after the writes");
}

/// The batch time reaches the cache device's lane too: a hit's read counts its latency from it.
#[test]
fn the_batch_time_reaches_the_cache_devices_lane() {
    let (reg, _bdev, _desc, mut ch) = stream_cache(SeqCutoff::Off);
    write(&mut ch, 0, &fill(1, 4096));
    let cdev_stats = reg.bdev_stats("cdev").unwrap();
    let before = cdev_stats.snapshot().read_ops;
    ch.set_batch_time(Instant::now());
    std::thread::sleep(Duration::from_millis(50));
    read(&mut ch, 0, 8); // a hit: read from the cache device
    let s = cdev_stats.snapshot();
    assert_eq!(s.read_ops, before + 1, "the hit's read");
    assert!(
        s.read_latency_ns_max >= 50_000_000,
        "hit read latency {} ns: no batch time",
        s.read_latency_ns_max
    );
}

/// What a channel answers at once (a reset, a request of no blocks, any request once its core is
/// gone) comes out of the next poll even when nothing else is in flight.
#[test]
fn an_idle_channel_gives_back_what_it_answers_at_once() {
    use crate::bdev::ModuleChannel;
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let bdev = CacheBdev::create(&cfg(Mode::Wt), &reg).unwrap();
    let mut mch = engine::CacheChannel::new(&bdev).unwrap();
    let mut answer = |io: BdevIo| {
        let tag = io.tag;
        assert!(mch.submit(io).is_ok());
        let mut done = Vec::new();
        for _ in 0..3 {
            mch.poll(&mut done);
        }
        assert_eq!(done.len(), 1, "request {tag}: one answer");
        (done[0].tag, done[0].result)
    };
    assert_eq!(answer(BdevIo::no_data(IoKind::Reset, 0, 0, 1)), (1, Ok(())));
    assert_eq!(answer(BdevIo::read(8, 0, IoVecs::empty(), 2)), (2, Ok(())));
    bdev.core_removed.store(true, Ordering::Release);
    assert_eq!(answer(BdevIo::read(8, 8, IoVecs::alloc(4096), 3)), (3, Err(IoError::Removed)));
}

/// A hit's read through the lane counts its latency from the batch it was submitted in, also when a
/// poll without completions came between the batch time and the submission (only completions move
/// the lane's batch time on, as a channel's).
#[test]
fn a_hit_counts_from_its_batch_time_across_an_empty_poll() {
    let (reg, ctl) = held_cdev_setup();
    let c = wt_no_cutoff();
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    write(&mut ch, 0, &fill(1, 8192)); // lines 0 and 1
    let cdev_stats = reg.bdev_stats("cdev").unwrap();
    let before = cdev_stats.snapshot();
    let _release = ReleaseOnDrop(ctl.clone());
    {
        let mut h = lock(&ctl);
        h.range = Some(0..u64::MAX);
        h.reads = true;
    }
    ch.set_batch_time(Instant::now());
    std::thread::sleep(Duration::from_millis(50));
    let mut done = Vec::new();
    ch.submit(BdevIo::read(0, 8, IoVecs::alloc(4096), 1)); // a hit, its read held
    ch.poll(&mut done); // nothing completes
    ch.submit(BdevIo::read(8, 8, IoVecs::alloc(4096), 2)); // a hit of the same batch
    assert!(done.is_empty());
    assert_eq!(lock(&ctl).caught, 2, "both hits' reads are held at the cache device");
    lock(&ctl).allow = usize::MAX;
    poll_until(&mut ch, "the two hits", |d| d.len() == 2);
    let s = cdev_stats.snapshot();
    assert_eq!(s.read_ops - before.read_ops, 2);
    let lat = s.read_latency_ns_sum - before.read_latency_ns_sum;
    assert!(lat >= 100_000_000, "both hits count from the batch time, 50 ms before: {lat} ns in all");
}

/// In a poller's pass (a batch time set, no poll yet) reads within one line wait for the pass's poll,
/// which starts them all, in order; a request that cannot wait starts after them; outside a pass
/// (after the poll, or with no batch time) a read starts at once.
#[test]
fn a_pass_serves_its_reads_within_one_line_at_its_poll_in_order() {
    let (reg, ctl) = held_cdev_setup();
    let c = wt_no_cutoff();
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    write(&mut ch, 0, &fill(1, 4 * 4096)); // lines 0..3: hits
    let _release = ReleaseOnDrop(ctl.clone());
    let reads_at_cdev = || lock(&ctl).submitted.iter().filter(|(k, _)| *k == IoKind::Read).count();
    {
        let mut h = lock(&ctl);
        h.range = Some(0..u64::MAX);
        h.reads = true;
        h.submitted.clear();
    }
    let mut done = Vec::new();
    // Outside a pass: at once.
    ch.submit(BdevIo::read(0, 8, IoVecs::alloc(4096), 1));
    assert_eq!(reads_at_cdev(), 1, "no batch time: the hit's read starts at submission");
    // A pass: three hits wait for the poll.
    ch.set_batch_time(Instant::now());
    for (tag, line) in [(2, 3u64), (3, 1), (4, 2)] {
        ch.submit(BdevIo::read(line * 8, 8, IoVecs::alloc(4096), tag));
    }
    assert_eq!(reads_at_cdev(), 1, "the pass's hits wait for its poll");
    ch.poll(&mut done);
    assert_eq!(reads_at_cdev(), 4, "the poll started them");
    let cdev_offsets: Vec<u64> =
        lock(&ctl).submitted.iter().filter(|(k, _)| *k == IoKind::Read).map(|&(_, o)| o).collect();
    // Cache lines are taken in order from line 0: core line n is in cache line n here.
    let order: Vec<u64> = cdev_offsets.iter().map(|o| o - cdev_offsets[0]).collect();
    assert_eq!(order, [0, 24, 8, 16], "in submission order");
    // After the poll (the pass is over) a read starts at once again.
    ch.submit(BdevIo::read(8, 8, IoVecs::alloc(4096), 5));
    assert_eq!(reads_at_cdev(), 5);
    // A pass with a write after a waiting read: the read is started first.
    ch.set_batch_time(Instant::now());
    lock(&ctl).submitted.clear();
    ch.submit(BdevIo::read(16, 8, IoVecs::alloc(4096), 6));
    ch.submit(BdevIo::write(40, 8, IoVecs::from_slice(&fill(2, 4096)), 7));
    let kinds: Vec<IoKind> = lock(&ctl).submitted.iter().map(|&(k, _)| k).collect();
    assert_eq!(kinds.first(), Some(&IoKind::Read), "the waiting read goes before the write: {kinds:?}");
    assert!(kinds.contains(&IoKind::Write), "the write went at its submission: {kinds:?}");
    lock(&ctl).allow = usize::MAX;
    poll_until(&mut ch, "every request", |d| d.len() == 7 - done.len());
}

/// Reads waiting for a pass's poll are work: `before_sleep` says so (a caller that would sleep
/// without polling polls instead), and a zero-length read in a pass is answered like any other.
#[test]
fn reads_waiting_for_the_poll_keep_the_poller_awake() {
    use crate::bdev::ModuleChannel;
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("cdev", cache_dev_bytes(64, 4096), 512).unwrap())).unwrap();
    reg.register(Arc::new(MallocBdev::new("core0", 1 << 20, 512).unwrap())).unwrap();
    let c = wt_no_cutoff();
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    let mut mch = engine::CacheChannel::new(&bdev).unwrap();
    let mut done = Vec::new();
    mch.set_batch_stamp(1);
    assert!(mch.submit(BdevIo::read(8, 8, IoVecs::alloc(4096), 2)).is_ok(), "a miss within one line");
    assert!(mch.before_sleep(), "a read waits for the poll: not idle");
    assert!(mch.submit(BdevIo::read(0, 0, IoVecs::empty(), 1)).is_ok(), "a zero-length read");
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < 2 {
        mch.poll(&mut done);
        assert!(Instant::now() < deadline, "never completed: {done:?}");
    }
    done.sort_by_key(|c| c.tag);
    assert_eq!(done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(), [(1, Ok(())), (2, Ok(()))]);
    assert_settles(&mut mch, &mut done);
}

/// A channel whose cache device completes through a wait fd (a file): a hit's completion wakes a
/// poller sleeping on the channel's wait fd.
#[test]
fn a_hit_wakes_a_poller_sleeping_on_the_channel() {
    use crate::bdev::ModuleChannel;
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::new();
    file_setup(&reg, dir.path(), cache_dev_bytes(64, 4096));
    let c = wt_no_cutoff();
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    let mut mch = engine::CacheChannel::new(&bdev).unwrap();
    let data = fill(3, 4096);
    let mut done = Vec::new();
    assert!(mch.submit(BdevIo::write(0, 8, IoVecs::from_slice(&data), 1)).is_ok());
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.is_empty() {
        mch.poll(&mut done);
        assert!(Instant::now() < deadline, "the write never completed");
    }
    done.clear();
    let fd = mch.wait_fd().unwrap();
    let wait = |ms: i32| {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd on the stack.
        unsafe { libc::poll(&mut p, 1, ms) }
    };
    // Quiet first: whatever else the write set going (record writes, replies) is over, and what its
    // completions left signalled is cleared before sleeping.
    for _ in 0..50 {
        mch.before_sleep();
        if wait(300) == 0 {
            break;
        }
        mch.poll(&mut done);
    }
    assert_eq!(wait(300), 0, "an idle channel's wait fd is quiet after before_sleep");
    let back = IoVecs::alloc(4096);
    assert!(mch.submit(BdevIo::read(0, 8, back.slice(0, 4096).unwrap(), 2)).is_ok()); // a hit
    while done.is_empty() {
        assert_eq!(wait(5_000), 1, "the hit's completion must wake the channel's wait fd");
        mch.poll(&mut done);
    }
    assert_eq!((done[0].tag, done[0].result), (2, Ok(())));
    same(&back.to_vec(), &data, "the hit");
}

/// A malloc bdev whose channel signals its eventfd on every submission and once more *after* each
/// poll that delivered completions: the late signal of a completion already taken (as a file
/// engine's worker can signal after the poller collected its completion). Only a poll drains it.
struct LateSignalBdev(MallocBdev);

struct LateSignalChannel {
    inner: Box<dyn crate::bdev::ModuleChannel>,
    efd: vmm_sys_util::eventfd::EventFd,
}

impl crate::bdev::Bdev for LateSignalBdev {
    fn info(&self) -> &crate::bdev::BdevInfo {
        self.0.info()
    }
    fn create_channel(&self) -> Result<Box<dyn crate::bdev::ModuleChannel>, BdevError> {
        let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Ok(Box::new(LateSignalChannel { inner: self.0.create_channel()?, efd }))
    }
}

impl crate::bdev::ModuleChannel for LateSignalChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), crate::bdev::Rejected> {
        let r = self.inner.submit(io);
        self.efd.write(1).unwrap();
        r
    }
    fn poll(&mut self, done: &mut Vec<crate::bdev::Completion>) -> usize {
        let _ = self.efd.read();
        let n = self.inner.poll(done);
        if n > 0 {
            self.efd.write(1).unwrap();
        }
        n
    }
    fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.efd.as_raw_fd())
    }
}

/// After a write (the cache device's and the core's channels) and a hit (the cache device's lane),
/// completions whose signal came late leave the cache channel's wait fd readable until
/// `before_sleep` clears it: a poller could never sleep on an idle cache otherwise.
#[test]
fn before_sleep_clears_late_signals_of_every_channel_below() {
    use crate::bdev::ModuleChannel;
    let reg = Registry::new();
    let cdev = MallocBdev::new("cdev", cache_dev_bytes(64, 4096), 512).unwrap();
    reg.register(Arc::new(LateSignalBdev(cdev))).unwrap();
    reg.register(Arc::new(LateSignalBdev(MallocBdev::new("core0", 1 << 20, 512).unwrap()))).unwrap();
    let c = wt_no_cutoff();
    let bdev = CacheBdev::create(&c, &reg).unwrap();
    let mut mch = engine::CacheChannel::new(&bdev).unwrap();
    let fd = mch.wait_fd().unwrap();
    let readable = || {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd on the stack.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    };
    let mut one = |io: BdevIo| {
        assert!(mch.submit(io).is_ok());
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while done.is_empty() {
            mch.poll(&mut done);
            assert!(Instant::now() < deadline, "never completed");
        }
        assert_eq!(done[0].result, Ok(()));
    };
    one(BdevIo::write(0, 8, IoVecs::from_slice(&fill(9, 4096)), 1)); // cache device and core
    one(BdevIo::read(0, 8, IoVecs::alloc(4096), 2)); // a hit: the lane
    let mut idle = Vec::new();
    assert_eq!(mch.poll(&mut idle), 0);
    assert!(readable(), "the late signals are there");
    mch.before_sleep();
    assert!(!readable(), "before_sleep cleared every late signal");
}

/// In a pass, the hits are looked up together; a hit on a line an earlier read of the same pass
/// waits for (locked by another channel's write) waits behind it, as outside a pass, and its pin is
/// given back: the line is not left pinned.
#[test]
fn a_pass_hit_behind_a_waiting_read_of_its_line_waits_and_leaves_no_pin() {
    let (reg, ctl) = held_cdev_setup();
    let (bdev, desc, mut ch) = open_cache(&reg, &wt_no_cutoff());
    let sh = bdev.shared().clone();
    let mut ch2 = desc.channel().unwrap();
    write(&mut ch, 16, &fill(1, 2048)); // line 2, sectors 0..4 valid
    let line = wlock(&sh.map).lookup((0, 2)).unwrap();
    let o2 = (sh.data_offset + u64::from(line) * 4096) / BS;
    let _release = ReleaseOnDrop(ctl.clone());
    {
        let mut h = lock(&ctl);
        h.range = Some(o2..o2 + 8);
        h.reads = true;
        h.submitted.clear();
    }
    ch2.submit(BdevIo::write(22, 1, IoVecs::from_slice(&fill(2, 512)), 9)); // locks line 2
    assert!(lock(&ctl).submitted.iter().any(|&(k, _)| k == IoKind::Write), "the write is held");
    ch.set_batch_time(Instant::now());
    ch.submit(BdevIo::read(20, 4, IoVecs::alloc(2048), 1)); // sectors 4..8: a miss, waits for the line
    ch.submit(BdevIo::read(16, 4, IoVecs::alloc(2048), 2)); // sectors 0..4: a hit
    let mut done = Vec::new();
    ch.poll(&mut done);
    assert!(done.is_empty(), "{done:?}");
    let reads = lock(&ctl).submitted.iter().filter(|&&(k, _)| k == IoKind::Read).count();
    assert_eq!(reads, 0, "the hit went ahead of the read it must wait behind");
    assert!(!wlock(&sh.map).pinned(line), "the waiting hit kept its pin");
    lock(&ctl).allow = usize::MAX;
    poll_until(&mut ch2, "the write", |d| d.len() == 1);
    let done = poll_until(&mut ch, "both reads", |d| d.len() == 2);
    assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
    assert!(!wlock(&sh.map).pinned(line), "a completed hit left its pin");
}

/// After the cache device is gone, a poller's pass serves no hit from it either (its reads are
/// looked up together at the poll): a dirty line's read fails, a clean one passes through.
#[test]
fn a_pass_after_the_cache_device_is_removed_serves_no_hit_from_it() {
    let reg = Registry::new();
    setup(&reg, cache_dev_bytes(64, 4096), 1 << 20);
    let mut c = cfg(Mode::Wb);
    c.cleaner = CleanerPolicy::Nop;
    c.seq_cutoff = SeqCutoff::Off;
    let (_bdev, _desc, mut ch) = open_cache(&reg, &c);
    write(&mut ch, 0, &fill(1, 4096));
    drop(reg.unregister("cdev").unwrap());
    ch.set_batch_time(Instant::now());
    ch.submit(BdevIo::read(0, 8, IoVecs::alloc(4096), 7));
    let done = drive(&mut ch);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, Err(IoError::Errno(libc::EIO)), "a removed cache's dirty data was served");
}

/// A cache channel with everything answered goes idle: `before_sleep` stops reporting work within
/// 100 polls (what those polls return is appended to `done`).
#[track_caller]
fn assert_settles(mch: &mut engine::CacheChannel, done: &mut Vec<crate::bdev::Completion>) {
    use crate::bdev::ModuleChannel;
    for _ in 0..100 {
        if !mch.before_sleep() {
            return;
        }
        mch.poll(done);
    }
    panic!("idle once everything is answered");
}
