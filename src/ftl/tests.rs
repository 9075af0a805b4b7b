//! FTL tests: a model test (random write/read/unmap/write_zeroes/flush with crashes and clean
//! restarts, checked block by block against an in-memory model), metadata corruption, injected
//! media faults, configuration rules.
//!
//! # Design
//! Every block written carries `(lba, version)` in its first 16 bytes and a filler derived from them,
//! so a wrong block is identified exactly. A crash is `FtlBdev::crash()` (the core thread stops
//! without persisting anything) followed by a restore on the same emulated device.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use super::core::Limit;
use super::*;
use crate::bdev::tests::{drive, run, Rng};
use crate::bdev::{BdevIo, Channel, Descriptor, IoError, IoKind, IoVecs, Registry};
use crate::ocssd::{EmuConfig, EmuDevice, EmuGeometry, Fault, Ppa, ReadErrorKind};

pub(crate) fn geometry(chunks: u32, clba: u32) -> EmuGeometry {
    EmuGeometry {
        num_grp: 2,
        num_pu: 2,
        num_chk: chunks,
        clba,
        ws_min: 4,
        ws_opt: 8,
        ..EmuGeometry::default()
    }
}

/// A 20-chunk media of 32-block chunks in `dir`, with [`nv_setup`]'s registry and config.
pub(crate) fn nv_ftl_setup(dir: &Path, name: &str) -> (Arc<dyn MediaDevice>, Registry, FtlConfig) {
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir, geometry(20, 32), vec![]));
    let (reg, cfg) = nv_setup(name);
    (media, reg, cfg)
}

pub(crate) fn make_media(dir: &Path, g: EmuGeometry, bad: Vec<Ppa>) -> EmuDevice {
    EmuDevice::create(&dir.join("media.img"), &EmuConfig { geometry: g, bad_chunks: bad, faults: vec![] })
        .expect("create media")
}

/// A small FTL for the shared conformance suite.
pub(crate) fn small_ftl(dir: &Path) -> Arc<FtlBdev> {
    let media = make_media(dir, geometry(32, 64), vec![]);
    Arc::new(FtlBdev::open(FtlConfig::new("ftl-conf"), Arc::new(media)).expect("open ftl"))
}

fn block(lba: u64, ver: u64) -> Vec<u8> {
    if ver == 0 {
        return vec![0u8; BLOCK_BYTES];
    }
    let mut b = vec![0u8; BLOCK_BYTES];
    b[0..8].copy_from_slice(&lba.to_le_bytes());
    b[8..16].copy_from_slice(&ver.to_le_bytes());
    for (i, x) in b.iter_mut().enumerate().skip(16) {
        *x = (lba as u8).wrapping_mul(13) ^ (ver as u8).wrapping_mul(7) ^ (i as u8);
    }
    b
}

fn decode(b: &[u8]) -> Option<(u64, u64)> {
    if b.iter().all(|x| *x == 0) {
        return Some((u64::MAX, 0));
    }
    let lba = u64::from_le_bytes(b[0..8].try_into().ok()?);
    let ver = u64::from_le_bytes(b[8..16].try_into().ok()?);
    (block(lba, ver) == b).then_some((lba, ver))
}

struct Harness {
    media: Arc<dyn MediaDevice>,
    cfg: FtlConfig,
    reg: Registry,
    bdev: Option<Arc<FtlBdev>>,
    desc: Option<Descriptor>,
    ch: Option<Channel>,
    relocated: u64,
}

impl Harness {
    fn new(media: Arc<dyn MediaDevice>, cfg: FtlConfig) -> Self {
        let mut h =
            Harness { media, cfg, reg: Registry::new(), bdev: None, desc: None, ch: None, relocated: 0 };
        h.start();
        h
    }

    fn start(&mut self) {
        let b = Arc::new(FtlBdev::open(self.cfg.clone(), Arc::clone(&self.media)).expect("open ftl"));
        self.reg.register(b.clone()).expect("register");
        let desc = self.reg.open(&self.cfg.name, true).expect("open desc");
        self.ch = Some(desc.channel().expect("channel"));
        self.desc = Some(desc);
        self.bdev = Some(b);
    }

    fn stop(&mut self, crash: bool) {
        self.relocated += self.stats()["relocated_blocks"].as_u64().unwrap_or(0);
        self.ch = None;
        self.desc = None;
        let b = self.reg.unregister(&self.cfg.name).expect("unregister");
        drop(b);
        let b = self.bdev.take().expect("running");
        if crash {
            b.crash();
        } else {
            b.shutdown().expect("clean shutdown");
        }
        drop(b);
    }

    fn num_lbas(&self) -> u64 {
        self.bdev.as_ref().expect("running").info().num_blocks
    }

    fn ch(&mut self) -> &mut Channel {
        self.ch.as_mut().expect("channel")
    }

    fn write(&mut self, lba: u64, vers: &[u64]) {
        let mut data = Vec::new();
        for (i, v) in vers.iter().enumerate() {
            data.extend_from_slice(&block(lba + i as u64, *v));
        }
        let r = run(self.ch(), vec![BdevIo::write(lba, vers.len() as u64, IoVecs::from_slice(&data), 0)]);
        assert_eq!(r[&0], Ok(()), "write {lba}+{}", vers.len());
    }

    fn read(&mut self, lba: u64, n: u64) -> Result<Vec<u8>, IoError> {
        let bufs = IoVecs::alloc(n as usize * BLOCK_BYTES);
        let view = bufs.slice(0, bufs.len_bytes()).expect("view");
        let r = run(self.ch(), vec![BdevIo::read(lba, n, view, 0)]);
        r[&0].map(|()| bufs.to_vec())
    }

    fn cmd(&mut self, kind: IoKind, lba: u64, n: u64) {
        let r = run(self.ch(), vec![BdevIo::no_data(kind, lba, n, 0)]);
        assert_eq!(r[&0], Ok(()), "{kind:?} {lba}+{n}");
    }

    fn stats(&self) -> serde_json::Value {
        self.bdev.as_ref().expect("running").module_stats().expect("stats")
    }
}

fn invariants(h: &Harness, ctx: &str) {
    let sh = h.bdev.as_ref().expect("running").shared();
    let c = lock(&sh.core);
    let mut counts = vec![0u64; sh.geo.num_bands as usize];
    for lba in 0..sh.num_lbas {
        match sh.l2p.get(lba) {
            Loc::Media(a) => {
                let (b, _, _) = sh.geo.split(a);
                assert!(core::test_bit(&c.valid, a), "{ctx}: lba {lba} at {a} without valid bit");
                let st = c.bands[b as usize].state;
                assert!(
                    !matches!(st, BandState::Free | BandState::Prep),
                    "{ctx}: lba {lba} in band {b} state {st:?}"
                );
                counts[b as usize] += 1;
            }
            Loc::Cache(n) => assert!(c.wbuf.get(n).is_some(), "{ctx}: lba {lba} cache {n} gone"),
            Loc::Unmapped => {}
        }
    }
    let mut pending = vec![0u64; sh.geo.num_bands as usize];
    for n in c.wbuf.head..c.wbuf.tail {
        if let Some(e) = c.wbuf.get(n) {
            if let (true, wbuf::Origin::Reloc(b)) = (e.live, e.origin) {
                pending[b as usize] += 1;
            }
        }
    }
    for (i, b) in c.bands.iter().enumerate() {
        assert_eq!(b.valid, counts[i], "{ctx}: band {i} valid count (state {:?})", b.state);
        assert_eq!(b.reloc_pending, pending[i], "{ctx}: band {i} relocated blocks still buffered");
    }
}

/// The model: current value per LBA, value at the last flush, values since.
struct Model {
    cur: Vec<u64>,
    durable: Vec<u64>,
    since: HashMap<u64, Vec<u64>>,
}

impl Model {
    fn set(&mut self, lba: u64, v: u64) {
        self.cur[lba as usize] = v;
        self.since.entry(lba).or_default().push(v);
    }
    fn flush(&mut self) {
        self.durable.clone_from(&self.cur);
        self.since.clear();
    }
}

fn check_all(h: &mut Harness, m: &mut Model, after_crash: bool) {
    let n = h.num_lbas();
    let mut lba = 0;
    while lba < n {
        let k = 32.min(n - lba);
        let data = h.read(lba, k).expect("read");
        for i in 0..k {
            let l = lba + i;
            let got = decode(&data[(i as usize) * BLOCK_BYTES..(i as usize + 1) * BLOCK_BYTES]);
            let Some((gl, gv)) = got else { panic!("lba {l}: block is not any block ever written") };
            assert!(gv == 0 || gl == l, "lba {l}: holds lba {gl}'s data");
            if after_crash {
                let ok = gv == m.durable[l as usize] || m.since.get(&l).is_some_and(|s| s.contains(&gv));
                assert!(
                    ok,
                    "lba {l}: version {gv} after crash; durable {} since {:?}",
                    m.durable[l as usize],
                    m.since.get(&l)
                );
                m.cur[l as usize] = gv;
            } else {
                assert_eq!(gv, m.cur[l as usize], "lba {l}");
            }
        }
        lba += k;
    }
    if after_crash {
        m.flush();
    }
}

fn model_run(seed: u64, ops: usize) {
    let dir = tempfile::tempdir().expect("tmp");
    let g = geometry(20, 32);
    // Bad chunks at creation: one in the metadata band, two in data bands.
    let bad = vec![Ppa::new(1, 1, 0, 0), Ppa::new(0, 1, 7, 0), Ppa::new(1, 0, 12, 0)];
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), g, bad));
    let mut cfg = FtlConfig::new("model");
    cfg.lba_rsvd = 35;
    cfg.wbuf_bytes = 128 << 10;
    let mut h = Harness::new(media, cfg);
    let n = h.num_lbas();
    let mut m = Model { cur: vec![0; n as usize], durable: vec![0; n as usize], since: HashMap::new() };
    let mut rng = Rng(seed | 1);
    let mut ver = 1u64;
    let mut written = 0u64;
    let debug = std::env::var("FTL_DEBUG").is_ok();
    for op in 0..ops {
        let r = rng.below(100);
        if debug {
            eprintln!("op {op}: {r}");
            invariants(&h, &format!("before op {op}"));
        }
        match r {
            0..=59 => {
                let len = 1 + rng.below(8);
                let lba = rng.below(n - len + 1);
                let vers: Vec<u64> = (0..len)
                    .map(|_| {
                        ver += 1;
                        ver
                    })
                    .collect();
                h.write(lba, &vers);
                for (i, v) in vers.iter().enumerate() {
                    m.set(lba + i as u64, *v);
                }
                written += len;
            }
            60..=79 => {
                let len = 1 + rng.below(16);
                let lba = rng.below(n - len + 1);
                let data = h.read(lba, len).expect("read");
                for i in 0..len {
                    let want = block(lba + i, m.cur[(lba + i) as usize]);
                    assert!(
                        data[(i as usize) * BLOCK_BYTES..(i as usize + 1) * BLOCK_BYTES] == want[..],
                        "seed {seed} op {op}: lba {} differs from the model (want version {}, got {:?})",
                        lba + i,
                        m.cur[(lba + i) as usize],
                        decode(&data[(i as usize) * BLOCK_BYTES..(i as usize + 1) * BLOCK_BYTES])
                    );
                }
            }
            80..=85 => {
                let len = 1 + rng.below(32);
                let lba = rng.below(n - len + 1);
                let kind = if rng.below(2) == 0 { IoKind::Unmap } else { IoKind::WriteZeroes };
                h.cmd(kind, lba, len);
                for i in 0..len {
                    m.set(lba + i, 0);
                }
            }
            86..=96 => {
                h.cmd(IoKind::Flush, 0, 0);
                m.flush();
            }
            97 => {
                if rng.below(6) == 0 {
                    if debug {
                        eprintln!("CRASH");
                    }
                    h.stop(true);
                    h.start();
                    check_all(&mut h, &mut m, true);
                }
            }
            _ => {
                if rng.below(10) == 0 {
                    if debug {
                        eprintln!("RESTART");
                    }
                    h.cmd(IoKind::Flush, 0, 0);
                    m.flush();
                    h.stop(false);
                    h.start();
                    check_all(&mut h, &mut m, false);
                }
            }
        }
    }
    check_all(&mut h, &mut m, false);
    assert!(written >= 5 * n, "seed {seed}: only {written} blocks written for {n} LBAs");
    h.stop(false);
    assert!(h.relocated > n, "seed {seed}: only {} blocks relocated", h.relocated);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn model_random_ops_with_crashes_and_bad_chunks(seed in any::<u64>()) {
        model_run(seed, 3000);
    }
}

#[test]
fn flushed_unmap_survives_a_crash() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut h = Harness::new(media, FtlConfig::new("trim"));
    h.write(10, &[5, 6, 7, 8]);
    h.cmd(IoKind::Flush, 0, 0);
    h.cmd(IoKind::Unmap, 11, 2);
    h.cmd(IoKind::Flush, 0, 0);
    h.stop(true);
    h.start();
    let d = h.read(10, 4).expect("read");
    assert_eq!(decode(&d[0..BLOCK_BYTES]), Some((10, 5)));
    assert!(d[BLOCK_BYTES..3 * BLOCK_BYTES].iter().all(|b| *b == 0), "unmapped blocks came back");
    assert_eq!(decode(&d[3 * BLOCK_BYTES..]), Some((13, 8)));
    h.stop(false);
}

#[test]
fn clean_restart_keeps_everything_and_stats_have_the_keys() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut h = Harness::new(media, FtlConfig::new("clean"));
    for i in 0..50 {
        h.write(i * 3, &[i + 1]);
    }
    let s = h.stats();
    for k in [
        "user_write_blocks",
        "media_write_blocks",
        "waf",
        "limit_hits",
        "bands_free",
        "bands_open",
        "bands_closed",
        "relocated_blocks",
    ] {
        assert!(s.get(k).is_some(), "missing {k} in {s}");
    }
    assert_eq!(s["user_write_blocks"], 50);
    h.stop(false);
    h.start();
    for i in 0..50 {
        assert_eq!(decode(&h.read(i * 3, 1).expect("read")), Some((i * 3, i + 1)));
    }
    h.stop(false);
}

#[test]
fn flush_completes_without_further_io_and_background_writes_progress() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut h = Harness::new(media, FtlConfig::new("bg"));
    h.write(1, &[9]);
    // A lone flush with a partial stripe completes (the core pads it) with no other I/O.
    h.ch().submit(BdevIo::no_data(IoKind::Flush, 0, 0, 7));
    let done = drive(h.ch());
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, Ok(()));
    h.stop(true);
    h.start();
    assert_eq!(decode(&h.read(1, 1).expect("read")), Some((1, 9)));
    h.stop(false);
}

#[test]
fn read_error_is_an_io_error_and_write_failure_moves_data() {
    let dir = tempfile::tempdir().expect("tmp");
    let emu = make_media(dir.path(), geometry(20, 32), vec![]);
    let media: Arc<dyn MediaDevice> = Arc::new(emu.clone());
    let mut h = Harness::new(media, FtlConfig::new("faults"));
    h.write(0, &[1, 2, 3, 4, 5, 6, 7, 8]);
    h.cmd(IoKind::Flush, 0, 0);
    // Find where lba 3 lives and arm an ECC error there.
    let addr = match h.bdev.as_ref().expect("bdev").shared().l2p.get(3) {
        Loc::Media(a) => a,
        other => panic!("lba 3 not on media: {other:?}"),
    };
    let ppa = h.bdev.as_ref().expect("bdev").shared().geo.ppa_of(addr);
    emu.inject(Fault::ReadError { ppa, kind: ReadErrorKind::Unrecoverable }).expect("inject");
    assert!(matches!(h.read(3, 1), Err(IoError::Media(_))), "a read error must reach the user");
    assert!(matches!(h.read(0, 8), Err(IoError::Media(_))));
    assert_eq!(decode(&h.read(2, 1).expect("neighbour")), Some((2, 3)));
    // Arm a write failure on every PU of the next writes' band: data must still land correctly.
    let geo = h.bdev.as_ref().expect("bdev").shared().geo.clone();
    let open = lock(&h.bdev.as_ref().expect("bdev").shared().core).open.expect("open band");
    for i in 0..geo.pus.len() {
        for lbk in 8..16 {
            let _ = emu.inject(Fault::WriteFail(geo.chunk(open, i).with_lbk(lbk)));
        }
    }
    for r in 0..8u64 {
        h.write(100 + r * 8, &[10 + r, 11 + r, 12 + r, 13 + r, 14 + r, 15 + r, 16 + r, 17 + r]);
    }
    h.cmd(IoKind::Flush, 0, 0);
    let s = h.stats();
    assert!(s["write_failures"].as_u64().unwrap_or(0) > 0, "no write failure seen: {s}");
    assert!(s["retired_chunks"].as_u64().unwrap_or(0) > 0, "{s}");
    for r in 0..8u64 {
        let d = h.read(100 + r * 8, 8).expect("read");
        for k in 0..8u64 {
            assert_eq!(
                decode(&d[(k as usize) * BLOCK_BYTES..(k as usize + 1) * BLOCK_BYTES]),
                Some((100 + r * 8 + k, 10 + r + k))
            );
        }
    }
    h.stop(true);
    h.start();
    for r in 0..8u64 {
        assert_eq!(decode(&h.read(100 + r * 8, 1).expect("read")), Some((100 + r * 8, 10 + r)));
    }
    h.stop(false);
}

fn image_sum(p: &Path) -> u32 {
    crc32c::crc32c(&std::fs::read(p).expect("read image"))
}

/// Corrupts one block of an area region on the image (via the emulator layout: data offset of
/// the block, found by reading the area through the device).
fn corrupt_region(dir: &Path, area_band: u32, region: layout::RegionId) {
    let path = dir.join("media.img");
    let dev = EmuDevice::open(&path).expect("open");
    let media: Arc<dyn MediaDevice> = Arc::new(dev);
    let mut cfg = FtlConfig::new("x");
    cfg.pu_end = None;
    let geo = geo_for(media.as_ref(), &cfg).expect("geo");
    let mut qp = media.queue_pair(4).expect("qp");
    let k = md::load(media.as_ref(), qp.as_mut(), &geo).expect("load").md_bands;
    let first = if area_band == 0 { 0 } else { k };
    let ck = md::read_area(media.as_ref(), qp.as_mut(), &geo, first, k).expect("area");
    let block = u64::from(ck.sb.region_offsets[region as usize]);
    // Area blocks are chunk-major over online chunks.
    let chunks: Vec<usize> = md::online_chunks(media.as_ref(), &geo, first);
    let chunk = geo.chunk(first, chunks[(block / geo.clba) as usize]).with_lbk(block % geo.clba);
    let info = *media.info();
    drop(qp);
    drop(media);
    let summary = EmuDevice::inspect(&path).expect("inspect");
    let idx = info.chunk_index(&chunk).expect("index");
    let off = summary.layout.data_offset + (idx * u64::from(info.geometry.clba) + chunk.lbk) * 4096 + 40;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open image");
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off).expect("read");
    b[0] ^= 0x5a;
    std::os::unix::fs::FileExt::write_all_at(&f, &b, off).expect("write");
}

#[test]
fn metadata_primary_corruption_uses_mirror_and_repairs_both_corrupt_fails_untouched() {
    for region in layout::REGIONS {
        let dir = tempfile::tempdir().expect("tmp");
        let g = geometry(20, 32);
        {
            let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), g, vec![]));
            let mut h = Harness::new(media, FtlConfig::new("md"));
            h.write(5, &[42, 43]);
            h.cmd(IoKind::Flush, 0, 0);
            h.stop(false);
        }
        corrupt_region(dir.path(), 0, region);
        {
            let media: Arc<dyn MediaDevice> =
                Arc::new(EmuDevice::open(&dir.path().join("media.img")).expect("open"));
            let mut qp = media.queue_pair(4).expect("qp");
            let geo = geo_for(media.as_ref(), &FtlConfig::new("x")).expect("geo");
            let l = md::load(media.as_ref(), qp.as_mut(), &geo).expect("mirror");
            assert!(l.primary_bad.is_some(), "{region:?}: corrupt primary not detected");
            drop(qp);
            let mut h = Harness::new(media, FtlConfig::new("md"));
            assert_eq!(decode(&h.read(6, 1).expect("read")), Some((6, 43)), "{region:?}");
            h.stop(false);
        }
        {
            // Repaired: the primary loads on its own again.
            let media: Arc<dyn MediaDevice> =
                Arc::new(EmuDevice::open(&dir.path().join("media.img")).expect("open"));
            let mut qp = media.queue_pair(4).expect("qp");
            let geo = geo_for(media.as_ref(), &FtlConfig::new("x")).expect("geo");
            assert!(
                md::load(media.as_ref(), qp.as_mut(), &geo).expect("load").primary_bad.is_none(),
                "{region:?}: not repaired"
            );
        }
        // Both copies corrupt: a clear error and an untouched image.
        corrupt_region(dir.path(), 0, region);
        corrupt_region(dir.path(), 1, region);
        let path = dir.path().join("media.img");
        let before = image_sum(&path);
        let media: Arc<dyn MediaDevice> = Arc::new(EmuDevice::open(&path).expect("open"));
        let e = FtlBdev::open(FtlConfig::new("md"), media).err().expect("must fail");
        assert!(e.to_string().contains("both metadata copies"), "{region:?}: {e}");
        assert_eq!(image_sum(&path), before, "{region:?}: image modified");
    }
}

#[test]
fn config_rules_name_the_option() {
    type Tweak = Box<dyn Fn(&mut FtlConfig)>;
    let cases: Vec<(Tweak, &str)> = vec![
        (Box::new(|c| c.invalid_thld = 100), "invalid-thld"),
        (Box::new(|c| c.lba_rsvd = 0), "lba-rsvd"),
        (Box::new(|c| c.lba_rsvd = 100), "lba-rsvd"),
        (Box::new(|c| c.wbuf_bytes = 0), "wbuf"),
        (Box::new(|c| c.wbuf_bytes = 6000), "wbuf"),
        (Box::new(|c| c.limits[1] = Limit { thld: 10, pct: 101 }), "limits"),
        (Box::new(|c| c.interleave_units = 3), "interleave"),
        (Box::new(|c| c.pu_begin = 9), "punits"),
    ];
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    for (f, want) in cases {
        let mut c = FtlConfig::new("cfg");
        f(&mut c);
        let e = FtlBdev::open(c, Arc::clone(&media)).err().expect("refused");
        assert!(e.to_string().starts_with(want), "'{e}' does not name {want}");
    }
    // Overlapping ranges on one device; modes.
    let mut a = FtlConfig::new("a");
    a.pu_end = Some(1);
    let fa = FtlBdev::open(a.clone(), Arc::clone(&media)).expect("a");
    let mut b = FtlConfig::new("b");
    b.pu_begin = 1;
    let e = FtlBdev::open(b, Arc::clone(&media)).err().expect("overlap");
    assert!(e.to_string().contains("overlaps"), "{e}");
    drop(fa);
    let mut c = a.clone();
    c.mode = Mode::Create;
    let e = FtlBdev::open(c.clone(), Arc::clone(&media)).err().expect("create over existing");
    assert!(e.to_string().starts_with("mode"), "{e}");
    c.force = true;
    drop(FtlBdev::open(c, Arc::clone(&media)).expect("forced create"));
    let mut r = FtlConfig::new("r");
    r.pu_begin = 2;
    r.mode = Mode::Restore;
    let e = FtlBdev::open(r, Arc::clone(&media)).err().expect("restore of nothing");
    assert!(e.to_string().starts_with("mode"), "{e}");
    let mut u = a;
    u.uuid = Some([9; 16]);
    let e = FtlBdev::open(u, media).err().expect("uuid");
    assert!(e.to_string().starts_with("uuid"), "{e}");
}

#[test]
fn limits_scale_with_bands() {
    let base = FtlConfig::new("x").limits;
    let l = core::scale_limits(&base, 1024, 200);
    assert_eq!(l.iter().map(|x| x.thld).collect::<Vec<_>>(), vec![20, 40, 80, 160]);
    let l = core::scale_limits(&base, 18, 5);
    assert!(l.iter().all(|x| (1..=4).contains(&x.thld)), "{l:?}");
}

#[test]
#[ignore]
fn model_debug_seed() {
    let seed: u64 = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    model_run(seed, 3000);
}

#[test]
fn two_channels_on_two_threads_write_and_read_concurrently() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(24, 64), vec![]));
    let mut cfg = FtlConfig::new("mq");
    cfg.wbuf_bytes = 256 << 10;
    cfg.lba_rsvd = 30;
    let bdev = Arc::new(FtlBdev::open(cfg, media).expect("open"));
    let reg = Registry::new();
    reg.register(bdev.clone()).expect("register");
    let n = bdev.info().num_blocks;
    let half = n / 2;
    let handles: Vec<_> = (0..2u64)
        .map(|t| {
            let desc = reg.open("mq", true).expect("desc");
            std::thread::spawn(move || {
                let mut ch = desc.channel().expect("channel");
                let base = t * half;
                let mut rng = Rng(t + 7);
                let mut cur = vec![0u64; half as usize];
                // Several times this thread's half: relocation runs under both writers.
                for round in 1..=(4 * half) {
                    let lba = rng.below(half);
                    let ver = round * 2 + t;
                    let r = run(
                        &mut ch,
                        vec![BdevIo::write(base + lba, 1, IoVecs::from_slice(&block(base + lba, ver)), 1)],
                    );
                    assert_eq!(r[&1], Ok(()));
                    cur[lba as usize] = ver;
                    if round % 5 == 0 {
                        let probe = rng.below(half);
                        let bufs = IoVecs::alloc(BLOCK_BYTES);
                        let view = bufs.slice(0, BLOCK_BYTES as u64).expect("view");
                        let r = run(&mut ch, vec![BdevIo::read(base + probe, 1, view, 2)]);
                        assert_eq!(r[&2], Ok(()));
                        assert_eq!(
                            bufs.to_vec(),
                            block(base + probe, cur[probe as usize]),
                            "thread {t} lba {}",
                            base + probe
                        );
                    }
                }
                drop(ch);
                drop(desc);
                cur
            })
        })
        .collect();
    let wd = bdev.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(15));
        if std::env::var("FTL_DEBUG").is_ok() {
            let sh = wd.shared();
            let c = lock(&sh.core);
            eprintln!("WATCHDOG open {:?} next {:?} relocs {:?} wbuf head {} taken {} tail {} user {} limit {} level {:?} gate {} flushes {}",
                c.open, c.next, c.relocs, c.wbuf.head, c.wbuf.taken, c.wbuf.tail, c.wbuf.user, c.user_limit, c.level, c.gate, c.flushes.len());
            for b in &c.bands {
                eprintln!(
                    "  band {} {:?} valid {} written {} pending {} next_pos {} good {:?}",
                    b.id, b.state, b.valid, b.written, b.reloc_pending, b.next_pos, b.good
                );
            }
        }
    });
    let results: Vec<Vec<u64>> = handles.into_iter().map(|h| h.join().expect("thread")).collect();
    let desc = reg.open("mq", true).expect("desc");
    let mut ch = desc.channel().expect("channel");
    for (t, cur) in results.iter().enumerate() {
        for (i, v) in cur.iter().enumerate() {
            let lba = t as u64 * half + i as u64;
            let bufs = IoVecs::alloc(BLOCK_BYTES);
            let view = bufs.slice(0, BLOCK_BYTES as u64).expect("view");
            assert_eq!(run(&mut ch, vec![BdevIo::read(lba, 1, view, 3)])[&3], Ok(()));
            assert_eq!(bufs.to_vec(), block(lba, *v), "lba {lba}");
        }
    }
    let s = bdev.module_stats().expect("stats");
    assert!(s["relocated_blocks"].as_u64().unwrap_or(0) > 0, "{s}");
    drop(ch);
    drop(desc);
    let b = reg.unregister("mq").expect("unregister");
    b.shutdown().expect("shutdown");
}

#[test]
fn relocation_progresses_without_io() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut cfg = FtlConfig::new("idle");
    cfg.lba_rsvd = 40;
    cfg.wbuf_bytes = 64 << 10;
    let mut h = Harness::new(media, cfg);
    let n = h.num_lbas();
    let mut rng = Rng(99);
    // Overwrite until free bands are at or below the START threshold (relocation active).
    let mut i = 0u64;
    loop {
        let lba = rng.below(n);
        i += 1;
        h.write(lba, &[i]);
        if i % 64 == 0 && h.stats()["current_limit"].is_string() {
            break;
        }
        assert!(i < 50 * n, "free bands never reached the START limit: {}", h.stats());
    }
    let before = h.stats()["relocated_blocks"].as_u64().unwrap_or(0);
    // No I/O at all: the core thread keeps relocating until enough bands are free.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = h.stats();
        if s["relocated_blocks"].as_u64().unwrap_or(0) > before && s["current_limit"].is_null() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "relocation stalled without I/O: {s}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    h.stop(false);
}

#[test]
fn dirty_restore_reads_closed_bands_from_their_tail() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut h = Harness::new(media, FtlConfig::new("tail"));
    let n = h.num_lbas();
    // Several bands' worth (a band holds 123 data blocks here).
    for lba in 0..n.min(600) {
        h.write(lba, &[lba + 1]);
    }
    h.cmd(IoKind::Flush, 0, 0);
    h.stop(true);
    h.start();
    let s = h.stats();
    assert!(s["restore_tail_bands"].as_u64().unwrap_or(0) >= 3, "{s}");
    assert!(s["restore_oob_bands"].as_u64().unwrap_or(9) <= 1, "{s}");
    for lba in 0..n.min(600) {
        assert_eq!(decode(&h.read(lba, 1).expect("read")), Some((lba, lba + 1)));
    }
    h.stop(false);
}

#[test]
fn core_never_takes_an_entry_a_writer_is_still_copying() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let bdev = FtlBdev::open(FtlConfig::new("ready"), media).expect("open");
    let sh = Arc::clone(bdev.shared());
    // A writer has reserved a whole stripe and is still copying its data (not published).
    let first = {
        let mut c = lock(&sh.core);
        let f = c.wbuf.tail;
        for i in 0..16 {
            c.wbuf.reserve(i, wbuf::Origin::User);
        }
        f
    };
    sh.wake.notify_all();
    std::thread::sleep(std::time::Duration::from_millis(150));
    let taken_unpublished = lock(&sh.core).wbuf.taken;
    // Published (before any assertion: a test that failed with entries left unpublished would hang
    // in the FTL's stop instead of failing): the core writes them.
    {
        let slots = Arc::clone(lock(&sh.core).wbuf.data());
        for i in 0..16u64 {
            slots.at(first + i).copy_from_slice(&block(i, 1));
        }
        let mut c = lock(&sh.core);
        for i in 0..16u64 {
            c.wbuf.set_ready(first + i);
            sh.l2p.swap(i, Loc::Cache(first + i));
        }
    }
    sh.wake.notify_all();
    assert_eq!(taken_unpublished, first, "the core took entries whose data is not copied yet");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // (No more notifies: the last partial unit is padded after an idle period.)
        if lock(&sh.core).wbuf.taken == first + 16 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "published entries were never written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    bdev.shutdown().expect("shutdown");
}

/// An FTL with nothing to write opens no band: the core thread goes idle without taking (and
/// erasing) a free band, and opens one for the first buffered block.
#[test]
fn an_idle_ftl_opens_no_band_until_a_block_is_buffered() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut h = Harness::new(media, FtlConfig::new("idle-open"));
    let sh = Arc::clone(h.bdev.as_ref().expect("running").shared());
    let wait_idle = |what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !lock(&sh.core).core_idle {
            assert!(std::time::Instant::now() < deadline, "{what}: the core thread never went idle");
            std::thread::yield_now();
        }
    };
    wait_idle("fresh");
    let s = h.stats();
    assert_eq!(s["bands_open"], 0, "a band was opened with nothing to write: {s}");
    let free = s["bands_free"].as_u64().expect("bands_free");
    assert!(lock(&sh.core).open.is_none());
    h.write(5, &[1]);
    h.cmd(IoKind::Flush, 0, 0);
    let s = h.stats();
    assert_eq!((s["bands_open"].as_u64(), s["bands_free"].as_u64()), (Some(1), Some(free - 1)), "{s}");
    h.stop(false);
}

/// A completion the core thread posts while a channel is clearing its wakeup (after it took the
/// posted completions, before the clear) leaves the channel's wait fd readable: the poller is not
/// left asleep with a completion waiting.
#[test]
fn a_completion_posted_during_the_wakeup_clear_keeps_the_fd_readable() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let bdev = FtlBdev::open(FtlConfig::new("wake"), media).expect("open");
    let mut ch = bdev.create_channel().expect("channel");
    let mailbox = lock(&bdev.shared().mailboxes).last().and_then(std::sync::Weak::upgrade).expect("mailbox");
    let mut post = Some(move || mailbox.post(crate::bdev::Completion { tag: 42, result: Ok(()) }));
    let hook = move || {
        if let Some(p) = post.take() {
            p();
        }
    };
    BEFORE_CLEAR.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
    let mut done = Vec::new();
    assert_eq!(ch.poll(&mut done), 0, "posted after the channel took its completions");
    BEFORE_CLEAR.with(|h| *h.borrow_mut() = None);
    let fd = ch.wait_fd().expect("wait fd");
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd on the stack; timeout 0.
    let readable = unsafe { libc::poll(&mut p, 1, 0) } == 1;
    assert!(readable, "a completion is waiting but the wait fd is not readable");
    assert_eq!(ch.poll(&mut done), 1);
    assert_eq!(done[0].tag, 42);
    drop(ch);
    bdev.shutdown().expect("shutdown");
}

/// A poll that finds nothing clears the channel's wakeup: once its completions are taken, an idle
/// channel's wait fd is not readable (the poller sleeps instead of spinning).
#[test]
fn an_idle_channel_wait_fd_is_not_readable() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let bdev = FtlBdev::open(FtlConfig::new("idle-fd"), media).expect("open");
    bdev.crash(); // no core thread: the test posts the completion
    let mut ch = bdev.create_channel().expect("channel");
    let mailbox = lock(&bdev.shared().mailboxes).last().and_then(std::sync::Weak::upgrade).expect("mailbox");
    mailbox.post(crate::bdev::Completion { tag: 42, result: Ok(()) });
    let fd = ch.wait_fd().expect("wait fd");
    let readable = || {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd on the stack; timeout 0.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    };
    assert!(readable(), "a completion is waiting but the wait fd is not readable");
    let mut done = Vec::new();
    assert_eq!(ch.poll(&mut done), 1);
    assert_eq!(ch.poll(&mut done), 0);
    assert!(!readable(), "nothing is waiting but the wait fd is readable");
}

/// The user share of the write buffer at each limit: the limit's percentage of the buffer (at
/// least one batch unless the percentage is 0), and never more than the free space above the CRIT
/// reserve (plus the rest of the open band) can take.
#[test]
fn user_share_of_the_buffer_follows_the_limits_and_the_room_left() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut cfg = FtlConfig::new("limits");
    cfg.wbuf_bytes = 1000 * BLOCK_BYTES as u64;
    cfg.lba_rsvd = 50;
    // Scaled to 18 data bands: thresholds 2, 4, 6 and 8 free bands.
    cfg.limits = [
        Limit { thld: 30, pct: 0 },
        Limit { thld: 60, pct: 3 },
        Limit { thld: 90, pct: 40 },
        Limit { thld: 120, pct: 100 },
    ];
    let bdev = FtlBdev::open(cfg, media).expect("open");
    bdev.crash(); // no core thread: the band table is the test's
    let sh = Arc::clone(bdev.shared());
    assert_eq!(sh.limits.map(|l| l.thld), [2, 4, 6, 8]);
    assert_eq!((sh.max_batch, sh.band_data_avg), (64, 123));
    let mut c = lock(&sh.core);
    let first = sh.geo.first_data_band() as usize;
    let share = |c: &mut core::Core, free: usize, open: bool| {
        for (i, b) in c.bands.iter_mut().enumerate().skip(first) {
            b.state = if i - first < free { band::BandState::Free } else { band::BandState::Closed };
        }
        c.open = None;
        if open {
            let o = c.bands.len() - 1; // a closed one: not free
            c.bands[o].state = band::BandState::Open;
            c.bands[o].next_pos = 0;
            c.bands[o].good = (0..sh.geo.pus.len()).collect(); // every chunk usable
            c.open = Some(o as u32);
        }
        sh.update_limits(c);
        (c.level, c.user_limit)
    };
    assert_eq!(share(&mut c, 16, false), (None, 1000), "no limit: the whole buffer");
    assert_eq!(share(&mut c, 8, false), (Some(3), 6 * 123), "START 100 %: 6 bands of room above CRIT");
    assert_eq!(share(&mut c, 6, false), (Some(2), 400), "LOW: 40 % of 1000");
    assert_eq!(share(&mut c, 4, false), (Some(1), 64), "HIGH: 3 % is below one batch");
    assert_eq!(share(&mut c, 2, true), (Some(0), 0), "CRIT: 0 %, even with room left in the open band");
    // (That room: the open band's data positions, more than one batch.)
    assert!(c.open.is_some_and(|o| c.bands[o as usize].data_end(&sh.geo) > sh.max_batch));
}

/// The valid-bit helpers report the bit's previous state (the callers count band valid blocks by it).
#[test]
fn set_bit_and_clear_bit_report_the_previous_state() {
    let mut map = vec![0u64; 2];
    for i in [0u64, 5, 64, 127] {
        assert!(core::set_bit(&mut map, i), "bit {i} was clear");
        assert!(!core::set_bit(&mut map, i), "bit {i} was set");
    }
    assert_eq!(map, vec![1 | 1 << 5, 1 | 1 << 63]);
    assert!(!core::set_bit(&mut map, 128), "out of the map");
    for i in [5u64, 127] {
        assert!(core::clear_bit(&mut map, i), "bit {i} was set");
        assert!(!core::clear_bit(&mut map, i), "bit {i} was clear");
    }
    assert_eq!(map, vec![1, 1]);
}

/// Waking channels for buffer space forgets the mailboxes of channels that are gone.
#[test]
fn signal_space_forgets_closed_channels() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let bdev = FtlBdev::open(FtlConfig::new("boxes"), media).expect("open");
    bdev.crash(); // no core thread: only the test calls signal_space
    let sh = Arc::clone(bdev.shared());
    let kept = bdev.create_channel().expect("channel");
    for _ in 0..3 {
        drop(bdev.create_channel().expect("channel"));
    }
    assert_eq!(lock(&sh.mailboxes).len(), 4);
    sh.signal_space();
    assert_eq!(lock(&sh.mailboxes).len(), 1, "only the open channel's mailbox is kept");
    drop(kept);
}

/// A flush still waiting when the core thread stops (here: behind a block a writer never
/// published) is failed, not left waiting forever.
#[test]
fn a_flush_pending_when_the_core_stops_fails() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let bdev = FtlBdev::open(FtlConfig::new("stopflush"), media).expect("open");
    let sh = Arc::clone(bdev.shared());
    let mut ch = bdev.create_channel().expect("channel");
    lock(&sh.core).wbuf.reserve(3, wbuf::Origin::User); // never published: the flush cannot finish
    assert!(ch.submit(BdevIo::no_data(IoKind::Flush, 0, 0, 9)).is_ok());
    bdev.crash(); // the core thread has stopped when this returns
    let mut done = Vec::new();
    ch.poll(&mut done);
    assert_eq!(
        done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(),
        vec![(9, Err(IoError::Errno(libc::EIO)))]
    );
}

/// While a writer is still copying the entries after a partial unit, the core thread waits for
/// them instead of padding the unit (padding is for a quiet buffer, not for one being filled).
#[test]
fn core_does_not_pad_ahead_of_a_writer_still_copying() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let bdev = FtlBdev::open(FtlConfig::new("nopad"), media).expect("open");
    let sh = Arc::clone(bdev.shared());
    let slots = Arc::clone(lock(&sh.core).wbuf.data());
    // Two entries published (less than the first unit of a band takes), two still copying: ws_min
    // (4) waiting in all.
    let first = {
        let mut c = lock(&sh.core);
        let f = c.wbuf.tail;
        for i in 0..4 {
            c.wbuf.reserve(i, wbuf::Origin::User);
        }
        for i in 0..2u64 {
            slots.at(f + i).copy_from_slice(&block(i, 1));
            c.wbuf.set_ready(f + i);
            sh.l2p.swap(i, Loc::Cache(f + i));
        }
        f
    };
    sh.wake.notify_all();
    // Several of the core's idle periods (20 ms).
    std::thread::sleep(std::time::Duration::from_millis(150));
    let taken = lock(&sh.core).wbuf.taken;
    // Published before any assertion (a failed one would stop the FTL, which waits for them).
    {
        let mut c = lock(&sh.core);
        for i in 2..4u64 {
            slots.at(first + i).copy_from_slice(&block(i, 1));
            c.wbuf.set_ready(first + i);
            sh.l2p.swap(i, Loc::Cache(first + i));
        }
    }
    sh.wake.notify_all();
    assert_eq!(taken, first, "the core padded the two entries instead of waiting");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lock(&sh.core).wbuf.taken != first + 4 {
        assert!(std::time::Instant::now() < deadline, "published entries were never written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    bdev.shutdown().expect("shutdown");
}

/// A flush writes a checkpoint only when an unmap is pending (so no replay undoes the trim); a flush
/// of plain writes does not.
#[test]
fn a_flush_checkpoints_only_after_an_unmap() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut h = Harness::new(media, FtlConfig::new("ckpt"));
    let ckpts = |h: &Harness| h.stats()["checkpoints"].as_u64().expect("checkpoints");
    let start = ckpts(&h);
    h.write(1, &[1]);
    h.cmd(IoKind::Flush, 0, 0);
    assert_eq!(ckpts(&h), start, "a flush of writes checkpointed");
    h.cmd(IoKind::Unmap, 1, 1);
    h.cmd(IoKind::Flush, 0, 0);
    assert_eq!(ckpts(&h), start + 1, "the flush after an unmap checkpoints");
    h.stop(false);
}

/// The next band is erased ahead once the open band is `band_thld` % written, not before.
#[test]
fn the_next_band_is_erased_at_band_thld() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut cfg = FtlConfig::new("ahead");
    cfg.band_thld = 50;
    let mut h = Harness::new(media, cfg);
    let sh = Arc::clone(h.bdev.as_ref().expect("running").shared());
    // After a flush, once the core thread is idle: (written positions, band positions, next band).
    let state = |h: &mut Harness| {
        h.cmd(IoKind::Flush, 0, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let c = lock(&sh.core);
            if c.core_idle {
                let b = &c.bands[c.open.expect("an open band") as usize];
                return (b.next_pos, b.positions(&sh.geo), c.next);
            }
            drop(c);
            assert!(std::time::Instant::now() < deadline, "the core thread never went idle");
            std::thread::yield_now();
        }
    };
    h.write(0, &[1]);
    let mut lba = 1;
    let mut s = state(&mut h);
    assert!(s.2.is_none(), "erased ahead at {} of {} positions", s.0, s.1);
    while s.0 + 8 < s.1 / 2 {
        h.write(lba, &[1]);
        lba += 1;
        s = state(&mut h);
        assert!(s.2.is_none(), "erased ahead at {} of {} positions", s.0, s.1);
    }
    while s.0 < s.1 / 2 {
        h.write(lba, &[1]);
        lba += 1;
        s = state(&mut h);
    }
    assert!(s.2.is_some(), "not erased ahead at {} of {} positions", s.0, s.1);
    h.stop(false);
}

/// Preparing a band resets only chunks that need it: a free chunk is used as it is (no wear), an
/// offline one is skipped (not retried, not counted as a new failure); the band's erase count
/// goes up by one.
#[test]
fn preparing_a_band_resets_only_written_chunks() {
    let dir = tempfile::tempdir().expect("tmp");
    let emu = make_media(dir.path(), geometry(20, 32), vec![]);
    let media: Arc<dyn MediaDevice> = Arc::new(emu.clone());
    let mut h = Harness::new(media, FtlConfig::new("prep"));
    let sh = Arc::clone(h.bdev.as_ref().expect("running").shared());
    let first = sh.geo.first_data_band();
    let (free, offline) = (sh.geo.chunk(first, 0), sh.geo.chunk(first, 1));
    emu.inject(Fault::OfflineChunk(offline)).expect("in range");
    h.write(0, &[1]);
    h.cmd(IoKind::Flush, 0, 0);
    {
        let c = lock(&sh.core);
        assert_eq!(c.open, Some(first), "the first data band is the least worn");
        let b = &c.bands[first as usize];
        assert_eq!(b.erase_count, 1);
        assert!(b.good.contains(&0) && !b.good.contains(&1), "good chunks {:?}", b.good);
    }
    assert_eq!(emu.erase_count(free).expect("in range"), 0, "a free chunk was reset");
    assert_eq!(h.stats()["retired_chunks"], 0, "the offline chunk was retried");
    h.stop(false);
}

/// Preparing a band skips a chunk retired earlier (not even reset), and retires a chunk whose reset
/// fails (here: a partly written chunk on a device without early reset).
#[test]
fn preparing_a_band_skips_and_records_retired_chunks() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut g = geometry(20, 32);
    g.mccap = crate::ocssd::spec::MCCAP_VECTOR_COPY | crate::ocssd::spec::MCCAP_MULTIPLE_RESETS;
    let emu = make_media(dir.path(), g, vec![]);
    let media: Arc<dyn MediaDevice> = Arc::new(emu.clone());
    let mut h = Harness::new(media, FtlConfig::new("retire"));
    let sh = Arc::clone(h.bdev.as_ref().expect("running").shared());
    let first = sh.geo.first_data_band();
    lock(&sh.core).bands[first as usize].retired = 1 << 1; // as a restore loads it
                                                           // PU 2's chunk of that band is open (partly written): its reset fails without early reset.
    let open = sh.geo.chunk(first, 2);
    let mut qp = emu.queue_pair(4).expect("qp");
    let ppas = crate::ocssd::PpaList::contiguous(open, 4).expect("list");
    let op = crate::ocssd::Op::Write { ppas, data: vec![7u8; 4 * BLOCK_BYTES].into(), oob: None };
    qp.submit(crate::ocssd::Command { tag: 1, op }).expect("room");
    let mut done = Vec::new();
    assert_eq!(qp.poll(&mut done, 4), 1);
    assert!(done[0].status.is_success());
    h.write(0, &[1]);
    h.cmd(IoKind::Flush, 0, 0);
    {
        let c = lock(&sh.core);
        assert_eq!(c.open, Some(first));
        let b = &c.bands[first as usize];
        assert_eq!(b.good, vec![0, 3], "good chunks");
        assert_eq!(b.retired, 1 << 1 | 1 << 2, "retired chunks");
    }
    assert_eq!(emu.erase_count(sh.geo.chunk(first, 1)).expect("in range"), 0, "the retired chunk was reset");
    assert_eq!(h.stats()["retired_chunks"], 1);
    // (Not a clean stop: the checkpoint resets open metadata chunks, which needs early reset.)
    h.stop(true);
}

/// After a media failure (here: the checkpoint a flush after an unmap writes fails), the FTL fails
/// the flush and a shutdown right after still ends (with the failure), not spinning on it.
#[test]
fn shutdown_after_a_metadata_write_failure_ends() {
    let dir = tempfile::tempdir().expect("tmp");
    let emu = make_media(dir.path(), geometry(20, 32), vec![]);
    let media: Arc<dyn MediaDevice> = Arc::new(emu.clone());
    let mut h = Harness::new(media, FtlConfig::new("mdfail"));
    let sh = Arc::clone(h.bdev.as_ref().expect("running").shared());
    for band in 0..sh.geo.first_data_band() {
        for i in 0..sh.geo.pus.len() {
            let chunk = sh.geo.chunk(band, i);
            for lbk in 0..32 {
                emu.inject(Fault::WriteFail(chunk.with_lbk(lbk))).expect("in range");
            }
        }
    }
    h.write(1, &[1]);
    h.cmd(IoKind::Unmap, 1, 1);
    h.ch().submit(BdevIo::no_data(IoKind::Flush, 0, 0, 5));
    let done = drive(h.ch());
    assert_eq!(
        done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(),
        vec![(5, Err(IoError::Errno(libc::EIO)))]
    );
    assert!(lock(&sh.core).failed.is_some());
    h.ch = None;
    h.desc = None;
    drop(h.reg.unregister("mdfail").expect("unregister"));
    let b = h.bdev.take().expect("running");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(b.shutdown().is_err());
    });
    let failed = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the shutdown never ended");
    assert!(failed, "the shutdown reports the failure");
}

/// Reads every block of the area `[first, first + bands)` (chunk-major over its online chunks):
/// data and OOB.
/// Media of `chunks` chunks per PU holding an FTL "md" with block 5 written and flushed, then
/// stopped cleanly: its superblocks and checkpoint are on the media for a test to corrupt or load.
fn flushed_ftl_media(dir: &Path, chunks: u32) {
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir, geometry(chunks, 32), vec![]));
    let mut h = Harness::new(media, FtlConfig::new("md"));
    h.write(5, &[42]);
    h.cmd(IoKind::Flush, 0, 0);
    h.stop(false);
}

fn read_area_blocks(
    media: &dyn MediaDevice,
    qp: &mut dyn crate::ocssd::QueuePair,
    geo: &Geo,
    first: u32,
    bands: u32,
) -> (Vec<u8>, Vec<u8>) {
    use crate::ocssd::{IoBuf, Op, PpaList, SgList};
    let ob = media.info().oob_bytes_per_block as usize;
    let (mut data, mut oob) = (Vec::new(), Vec::new());
    for b in first..first + bands {
        for i in md::online_chunks(media, geo, b) {
            let n = geo.clba as usize;
            let ppas = PpaList::contiguous(geo.chunk(b, i), n).expect("ppas");
            let buf = SgList::from(vec![0u8; n * BLOCK_BYTES]);
            let done = md::exec(qp, Op::Read { ppas, data: buf, oob: Some(IoBuf::zeroed(n * ob)) });
            assert!(done.status.is_success(), "read band {b} chunk {i}: {}", done.status);
            data.extend_from_slice(&done.buffers.data.expect("data").to_vec());
            oob.extend_from_slice(done.buffers.oob.expect("oob").as_slice());
        }
    }
    (data, oob)
}

#[test]
fn a_metadata_area_takes_an_image_that_fills_it_exactly_and_refuses_a_larger_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let geo = geo_for(media.as_ref(), &FtlConfig::new("x")).expect("geo");
    let ob = media.info().oob_bytes_per_block as usize;
    assert!(ob >= 16);
    let mut qp = media.queue_pair(4).expect("qp");
    // Band 2 as a one-band area: 4 chunks of 32 blocks, 128 blocks. The bytes end 100 short of
    // a block: the last block is padded with zeroes.
    let cap = md::online_chunks(media.as_ref(), &geo, 2).len() as u64 * geo.clba;
    assert_eq!(cap, 128);
    let len = cap as usize * BLOCK_BYTES - 100;
    let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ (i / 4096) as u8).collect();
    let n = md::write_area(media.as_ref(), qp.as_mut(), &geo, 2, 1, &bytes, 7).expect("fits exactly");
    assert_eq!(n, cap);
    let (back, oob) = read_area_blocks(media.as_ref(), qp.as_mut(), &geo, 2, 1);
    assert_eq!(back.len(), cap as usize * BLOCK_BYTES);
    assert!(back[..len] == bytes[..], "the area holds the image, block for block");
    assert!(back[len..].iter().all(|&b| b == 0), "the last block is padded with zeroes");
    for (i, o) in oob.chunks_exact(ob).enumerate() {
        assert_eq!(layout::decode_oob(o), (layout::LBA_MD, 7), "OOB of block {i}");
    }
    // One block more than the area holds: refused before anything is reset or written.
    let big = vec![0xa5u8; cap as usize * BLOCK_BYTES + 1];
    let e = md::write_area(media.as_ref(), qp.as_mut(), &geo, 2, 1, &big, 8).expect_err("too large");
    assert!(e.to_string().contains("metadata needs 129 blocks but the area at band 2 holds 128"), "{e}");
    let (again, _) = read_area_blocks(media.as_ref(), qp.as_mut(), &geo, 2, 1);
    assert!(again[..len] == bytes[..], "area left as it was");
}

#[test]
fn a_primary_area_whose_block_0_holds_a_mirror_superblock_is_bad() {
    let dir = tempfile::tempdir().expect("tmp");
    flushed_ftl_media(dir.path(), 20);
    let media: Arc<dyn MediaDevice> = Arc::new(EmuDevice::open(&dir.path().join("media.img")).expect("open"));
    let geo = geo_for(media.as_ref(), &FtlConfig::new("x")).expect("geo");
    let mut qp = media.queue_pair(4).expect("qp");
    let k = md::load(media.as_ref(), qp.as_mut(), &geo).expect("load").md_bands;
    // The mirror's image, written over the primary area: a complete checkpoint, but a mirror one.
    let mirror = md::read_area(media.as_ref(), qp.as_mut(), &geo, k, k).expect("mirror");
    assert!(mirror.sb.mirror);
    md::write_area(media.as_ref(), qp.as_mut(), &geo, 0, k, &mirror.encode(true), mirror.sb.generation)
        .expect("write");
    let l = md::load(media.as_ref(), qp.as_mut(), &geo).expect("load");
    assert_eq!(l.primary_bad.as_deref(), Some("block 0 holds a mirror superblock"));
    assert_eq!(l.md_bands, k);
    assert!(l.ckpt.sb.mirror);
}

#[test]
fn with_both_superblocks_corrupt_the_mirror_probe_stays_within_half_the_bands() {
    // 12 bands: the mirror is probed at bands 1..=6 only (an area never takes more than half the
    // bands); probing up to 16 would read past the media at 12 and report that instead.
    let dir = tempfile::tempdir().expect("tmp");
    flushed_ftl_media(dir.path(), 12);
    corrupt_region(dir.path(), 0, layout::RegionId::Superblock);
    corrupt_region(dir.path(), 1, layout::RegionId::Superblock);
    let media: Arc<dyn MediaDevice> = Arc::new(EmuDevice::open(&dir.path().join("media.img")).expect("open"));
    let e = FtlBdev::open(FtlConfig::new("md"), media).err().expect("must fail");
    assert!(e.to_string().ends_with("; mirror: no mirror superblock found"), "{e}");
}

#[test]
fn an_ftl_opened_over_more_parallel_units_than_it_covers_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut a = FtlConfig::new("a");
    a.pu_end = Some(1);
    drop(FtlBdev::open(a.clone(), Arc::clone(&media)).expect("a on PUs 0-1"));
    // Same first PU and the same bands, one PU more: the superblock says 0-1.
    a.pu_end = Some(2);
    let e = FtlBdev::open(a, media).err().expect("refused");
    assert!(e.to_string().starts_with("punits"), "{e}");
    assert!(e.to_string().contains("covers parallel units 0-1"), "{e}");
}

#[test]
fn a_checkpoint_spanning_several_chunks_of_its_area_reads_back_whole() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
        let mut h = Harness::new(media, FtlConfig::new("md"));
        h.stop(false);
    }
    let media: Arc<dyn MediaDevice> = Arc::new(EmuDevice::open(&dir.path().join("media.img")).expect("open"));
    let geo = geo_for(media.as_ref(), &FtlConfig::new("x")).expect("geo");
    let mut qp = media.queue_pair(4).expect("qp");
    let mut ck = md::load(media.as_ref(), qp.as_mut(), &geo).expect("load").ckpt;
    // 40 000 L2P entries: an image of about 45 blocks, over two of the band's four 32-block chunks.
    ck.sb.num_lbas = 40_000;
    ck.l2p = (0..40_000u64).map(|i| if i % 3 == 0 { layout::UNMAPPED } else { i * 7 }).collect();
    ck.trim = vec![0x5555; 40_000usize.div_ceil(64)];
    let image = ck.encode(false);
    assert!(image.len() / BLOCK_BYTES > 40);
    md::write_area(media.as_ref(), qp.as_mut(), &geo, 4, 1, &image, 9).expect("write");
    let back = md::read_area(media.as_ref(), qp.as_mut(), &geo, 4, 1).expect("read back");
    assert!(back.l2p == ck.l2p);
    assert_eq!(back.trim, ck.trim);
    assert_eq!(back.valid, ck.valid);
}

#[test]
fn the_mirror_probe_takes_only_a_mirror_superblock_of_its_own_area_size() {
    let dir = tempfile::tempdir().expect("tmp");
    flushed_ftl_media(dir.path(), 20);
    corrupt_region(dir.path(), 0, layout::RegionId::Superblock);
    let media: Arc<dyn MediaDevice> = Arc::new(EmuDevice::open(&dir.path().join("media.img")).expect("open"));
    let geo = geo_for(media.as_ref(), &FtlConfig::new("x")).expect("geo");
    let mut qp = media.queue_pair(4).expect("qp");
    let l = md::load(media.as_ref(), qp.as_mut(), &geo).expect("the mirror");
    let k = l.md_bands;
    // The mirror area rewritten with a complete checkpoint that says "primary": not a mirror.
    md::write_area(media.as_ref(), qp.as_mut(), &geo, k, k, &l.ckpt.encode(false), 9).expect("write");
    let e = md::load(media.as_ref(), qp.as_mut(), &geo).err().expect("no usable copy");
    assert!(e.to_string().contains("both metadata copies are unusable"), "{e}");
    // The same with the mirror flag but another area size.
    let mut other = l.ckpt.clone();
    other.sb.md_bands = k + 1;
    md::write_area(media.as_ref(), qp.as_mut(), &geo, k, k, &other.encode(true), 9).expect("write");
    let e = md::load(media.as_ref(), qp.as_mut(), &geo).err().expect("no usable copy");
    assert!(e.to_string().contains("both metadata copies are unusable"), "{e}");
}

// ---- band.rs / layout.rs / mod.rs mutants (mutftl4) ----

/// With every chunk of band 0 bad, one band cannot hold the metadata: the areas take two bands each
/// (primary 0..2, mirror 2..4), and data starts at band 4. No data lands in band 1, part of the
/// primary area, and the data survives a clean restart (the checkpoint is rewritten over bands 0..2).
#[test]
fn two_band_metadata_areas_keep_data_out_of_both() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad: Vec<Ppa> = (0..2).flat_map(|g| (0..2).map(move |p| Ppa::new(g, p, 0, 0))).collect();
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), bad));
    let mut h = Harness::new(Arc::clone(&media), FtlConfig::new("md2"));
    let vers: Vec<u64> = (1..=64).collect();
    h.write(0, &vers);
    h.cmd(IoKind::Flush, 0, 0);
    {
        let sh = h.bdev.as_ref().expect("running").shared();
        assert_eq!((sh.geo.md_bands, sh.geo.first_data_band()), (2, 4));
        let c = lock(&sh.core);
        for b in &c.bands[..4] {
            assert_eq!(b.state, BandState::Metadata, "band {}", b.id);
        }
        for lba in 0..64 {
            if let Loc::Media(a) = sh.l2p.get(lba) {
                assert!(sh.geo.split(a).0 >= 4, "lba {lba} at {a}, in a metadata area");
            }
        }
    }
    invariants(&h, "two-band areas");
    h.stop(false);
    h.start();
    let data = h.read(0, 64).expect("read");
    for (i, b) in data.chunks(BLOCK_BYTES).enumerate() {
        assert_eq!(decode(b), Some((i as u64, i as u64 + 1)), "lba {i} after a clean restart");
    }
}

/// An image for `ftl info`: 300 blocks written (a band filled and closed, the next one open), 40 of
/// them unmapped again, flushed and shut down cleanly. With `bad0`, band 0's chunks are all bad and
/// the metadata areas take two bands each. Returns the image's directory and the checkpoint.
fn info_image(bad0: bool) -> (tempfile::TempDir, md::Loaded) {
    let dir = tempfile::tempdir().expect("tmp");
    let bad: Vec<Ppa> =
        if bad0 { (0..2).flat_map(|g| (0..2).map(move |p| Ppa::new(g, p, 0, 0))).collect() } else { vec![] };
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), bad));
    let mut h = Harness::new(Arc::clone(&media), FtlConfig::new("info"));
    for lba in (0..300).step_by(50) {
        let vers: Vec<u64> = (1..=50).collect();
        h.write(lba, &vers);
    }
    h.cmd(IoKind::Unmap, 100, 40);
    h.cmd(IoKind::Flush, 0, 0);
    h.stop(false);
    let geo = geo_for(media.as_ref(), &FtlConfig::new("x")).expect("geo");
    let mut qp = media.queue_pair(4).expect("qp");
    let l = md::load(media.as_ref(), qp.as_mut(), &geo).expect("load");
    (dir, l)
}

/// `ftl info` against what the checkpoint holds: each band's state (the metadata bands by
/// position), its valid blocks (counted from the L2P), the band and mapped-LBA totals.
fn check_info(dir: &Path, l: &md::Loaded) {
    let v = info::info_json(&dir.join("media.img"), 0, None).expect("info");
    let geo = {
        let media = EmuDevice::open(&dir.join("media.img")).expect("open");
        geo_for(&media, &FtlConfig::new("x")).expect("geo")
    };
    let k = l.md_bands as usize;
    let mut valid = vec![0u64; geo.num_bands as usize];
    for a in l.ckpt.l2p.iter().filter(|a| **a != layout::UNMAPPED) {
        valid[(a / geo.max_positions) as usize] += 1;
    }
    let names = ["free", "prep", "opening", "open", "full", "closing", "closed", "metadata"];
    let bands = v["bands"].as_array().expect("bands");
    assert_eq!(bands.len(), geo.num_bands as usize);
    let (mut free, mut open, mut closed) = (0, 0, 0);
    for (i, b) in bands.iter().enumerate() {
        let want = if i < 2 * k { "metadata" } else { names[l.ckpt.bands[i].state as usize] };
        match want {
            "free" | "prep" => free += 1,
            "closed" => closed += 1,
            "metadata" => {}
            _ => open += 1,
        }
        assert_eq!(b["state"], want, "band {i}: {b}");
        assert_eq!(b["valid_blocks"], valid[i], "band {i}: {b}");
        assert_eq!(b["band"], i);
    }
    assert!(free > 0 && open > 0 && closed > 0, "{v}");
    assert!(valid.iter().filter(|n| **n > 0).count() >= 2, "{valid:?}");
    let s = &v["statistics"];
    assert_eq!(
        (s["bands_free"].as_u64(), s["bands_open"].as_u64(), s["bands_closed"].as_u64()),
        (Some(free), Some(open), Some(closed))
    );
    assert_eq!(s["mapped_lbas"], 260);
    assert_eq!(s["num_lbas"], l.ckpt.sb.num_lbas);
    assert_eq!(v["metadata"]["bands_per_area"], k);
    assert_eq!(v["metadata"]["copy_used"], "primary");
}

#[test]
fn ftl_info_shows_bands_valid_blocks_and_totals() {
    let (dir, l) = info_image(false);
    assert_eq!(l.md_bands, 1);
    check_info(dir.path(), &l);
}

/// With two-band areas, and a checkpoint whose records of bands 1 and 3 (in the areas) claim
/// "free": `ftl info` shows all four as metadata, by position.
#[test]
fn ftl_info_shows_the_metadata_bands_by_position() {
    let (dir, mut l) = info_image(true);
    assert_eq!(l.md_bands, 2);
    let media: Arc<dyn MediaDevice> = Arc::new(EmuDevice::open(&dir.path().join("media.img")).expect("open"));
    let geo = geo_for(media.as_ref(), &FtlConfig::new("x")).expect("geo");
    let mut qp = media.queue_pair(4).expect("qp");
    l.ckpt.bands[1].state = 0;
    l.ckpt.bands[3].state = 0;
    let g = l.ckpt.sb.generation;
    md::write_area(media.as_ref(), qp.as_mut(), &geo, 0, 2, &l.ckpt.encode(false), g).expect("primary");
    md::write_area(media.as_ref(), qp.as_mut(), &geo, 2, 2, &l.ckpt.encode(true), g).expect("mirror");
    drop(qp);
    drop(media);
    check_info(dir.path(), &l);
}

/// `waf` is media writes over user writes, and 0 before any user write (not a division by zero).
#[test]
fn stats_waf_is_media_over_user_writes() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut h = Harness::new(media, FtlConfig::new("waf"));
    let s = h.stats();
    assert_eq!(s["user_write_blocks"], 0);
    assert_eq!(s["waf"].as_f64(), Some(0.0), "{s}");
    let vers: Vec<u64> = (1..=50).collect();
    h.write(0, &vers);
    h.write(0, &vers);
    h.write(0, &vers[..7]);
    h.cmd(IoKind::Flush, 0, 0);
    let s = h.stats();
    let (user, media) =
        (s["user_write_blocks"].as_u64().expect("user"), s["media_write_blocks"].as_u64().expect("media"));
    assert_eq!(user, 107);
    assert!(media > 0, "{s}");
    assert_eq!(s["waf"].as_f64(), Some(media as f64 / user as f64), "{s}");
    h.stop(false);
}

/// `vblkd ftl info` through `cli::run_to`: the info JSON for a PU range, and the option named in
/// each refusal.
#[test]
fn ftl_info_command_prints_the_json_or_names_the_option() {
    let (dir, l) = info_image(false);
    let media = dir.path().join("media.img");
    let mut out = Vec::new();
    cli::run_to(cli::FtlCommand::Info { media: media.clone(), punits: Some("0-3".into()) }, &mut out)
        .expect("info");
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["statistics"]["num_lbas"], l.ckpt.sb.num_lbas);
    assert_eq!(v["statistics"]["mapped_lbas"], 260);
    let e = cli::run_to(
        cli::FtlCommand::Info { media: media.clone(), punits: Some("3-1".into()) },
        &mut Vec::new(),
    )
    .expect_err("reversed range");
    assert_eq!(e, "--punits=3-1: the range ends before it begins");
    let e = cli::run_to(
        cli::FtlCommand::Info { media: dir.path().join("nope.img"), punits: None },
        &mut Vec::new(),
    )
    .expect_err("no image");
    assert!(e.starts_with(&format!("--media {}: ", dir.path().join("nope.img").display())), "{e}");
}

/// Every `FtlConfig::validate` rule at its bounds: the last accepted value and the first refused
/// one, the refusal naming the option.
#[test]
fn config_validate_bounds() {
    type Tweak = Box<dyn Fn(&mut FtlConfig)>;
    let check = |f: Tweak, want: Option<&str>| {
        let mut c = FtlConfig::new("v");
        f(&mut c);
        match (c.validate(), want) {
            (Ok(()), None) => {}
            (Err(FtlError::Config { option, .. }), Some(w)) if option == w => {}
            (r, w) => panic!("{c:?}: {r:?}, wanted {w:?}"),
        }
    };
    check(Box::new(|_| {}), None);
    check(Box::new(|c| c.invalid_thld = 99), None);
    check(Box::new(|c| c.invalid_thld = 100), Some("invalid-thld"));
    check(Box::new(|c| c.lba_rsvd = 1), None);
    check(Box::new(|c| c.lba_rsvd = 99), None);
    check(Box::new(|c| c.lba_rsvd = 0), Some("lba-rsvd"));
    check(Box::new(|c| c.lba_rsvd = 100), Some("lba-rsvd"));
    check(Box::new(|c| c.wbuf_bytes = 16 * 4096), None);
    check(Box::new(|c| c.wbuf_bytes = 15 * 4096), Some("wbuf"));
    check(Box::new(|c| c.wbuf_bytes = 16 * 4096 + 1), Some("wbuf"));
    check(Box::new(|c| c.wbuf_bytes = 0), Some("wbuf"));
    check(Box::new(|c| c.band_thld = 1), None);
    check(Box::new(|c| c.band_thld = 100), None);
    check(Box::new(|c| c.band_thld = 0), Some("band-thld"));
    check(Box::new(|c| c.band_thld = 101), Some("band-thld"));
    check(Box::new(|c| c.reloc_qdepth = 1), None);
    check(Box::new(|c| c.reloc_qdepth = 1024), None);
    check(Box::new(|c| c.reloc_qdepth = 0), Some("reloc-qdepth"));
    check(Box::new(|c| c.reloc_qdepth = 1025), Some("reloc-qdepth"));
    check(Box::new(|c| c.reloc_bands = 1), None);
    check(Box::new(|c| c.reloc_bands = 0), Some("reloc-bands"));
    check(Box::new(|c| c.interleave_units = 0), Some("interleave"));
    check(Box::new(|c| c.limits[3].pct = 100), None);
    check(Box::new(|c| c.limits[3].pct = 101), Some("limits"));
    check(Box::new(|c| c.limits[0].pct = 101), Some("limits"));
    check(Box::new(|c| (c.pu_begin, c.pu_end) = (3, Some(3))), None);
    check(Box::new(|c| (c.pu_begin, c.pu_end) = (3, Some(2))), Some("punits"));
    check(Box::new(|c| c.size_bytes = Some(4096)), None);
    check(Box::new(|c| c.size_bytes = Some(0)), Some("size"));
    check(Box::new(|c| c.size_bytes = Some(4097)), Some("size"));
    let mut c = FtlConfig::new("v");
    c.limits[2].pct = 101;
    let e = c.validate().expect_err("limits").to_string();
    assert!(e.contains(&format!("{} limit 101%", core::LIMIT_NAMES[2])), "{e}");
}

/// FTLs on one media claim exactly their PU ranges: adjacent ranges coexist, overlapping ones are
/// refused, another media is independent, and a failed open releases its range.
#[test]
fn pu_ranges_claim_exactly_their_units() {
    let dir = tempfile::tempdir().expect("tmp");
    let other_dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let other: Arc<dyn MediaDevice> = Arc::new(make_media(other_dir.path(), geometry(20, 32), vec![]));
    let cfg = |name: &str, b: u32, e: u32| {
        let mut c = FtlConfig::new(name);
        (c.pu_begin, c.pu_end) = (b, Some(e));
        c
    };
    // A restore of nothing fails after the range was claimed: the range is free again.
    let mut r = cfg("r", 2, 3);
    r.mode = Mode::Restore;
    let e = FtlBdev::open(r, Arc::clone(&media)).err().expect("restore of nothing");
    assert!(e.to_string().starts_with("mode"), "{e}");
    let a = FtlBdev::open(cfg("a", 0, 1), Arc::clone(&media)).expect("0-1");
    let b = FtlBdev::open(cfg("b", 2, 3), Arc::clone(&media)).expect("2-3, next to 0-1");
    let o = FtlBdev::open(cfg("o", 1, 2), Arc::clone(&other)).expect("1-2 of another media");
    for (x, y) in [(1, 2), (0, 0), (1, 1), (3, 3), (2, 2)] {
        let e = FtlBdev::open(cfg("c", x, y), Arc::clone(&media)).err().expect("overlap");
        assert!(e.to_string().contains("overlaps"), "{x}-{y}: {e}");
    }
    drop(b);
    // 2-3 is closed but its FTL is still on the media: a format of 3 alone would destroy it.
    let e = FtlBdev::open(cfg("b2", 3, 3), Arc::clone(&media)).err().expect("3 holds part of 2-3");
    assert!(e.to_string().starts_with("punits") && e.to_string().contains("parallel units 2-3"), "{e}");
    let mut forced = cfg("b2", 3, 3);
    (forced.mode, forced.force) = (Mode::Create, true);
    drop(FtlBdev::open(forced, Arc::clone(&media)).expect("3 again, reformatted on purpose"));
    drop((a, o));
}

/// An FTL whose units inside another range hold nothing yet (a fresh one keeps its metadata on its
/// first units) is still found by its superblock: a new FTL overlapping it is refused in every mode
/// that would format, and the old one still opens with its data; a range beside it is fine.
#[test]
fn a_format_over_part_of_a_closed_ftl_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> =
        Arc::new(make_media(dir.path(), EmuGeometry { num_grp: 2, num_pu: 4, ..geometry(20, 32) }, vec![]));
    let cfg = |name: &str, b: u32, e: u32| {
        let mut c = FtlConfig::new(name);
        (c.pu_begin, c.pu_end) = (b, Some(e));
        c
    };
    // 2-4 starts on group 0, unit 1 (units alternate across the 2 groups).
    let mut a = Harness::new(Arc::clone(&media), cfg("a", 2, 4));
    a.write(5, &[1]);
    a.stop(false);
    for mode in [Mode::Auto, Mode::Create] {
        let mut c = cfg("b", 4, 6);
        c.mode = mode;
        let e = FtlBdev::open(c, Arc::clone(&media)).err().expect("4-6 overlaps 2-4");
        let m = e.to_string();
        assert!(m.starts_with("punits") && m.contains("parallel units 2-4") && m.contains("force=on"), "{m}");
    }
    drop(FtlBdev::open(cfg("c", 5, 7), Arc::clone(&media)).expect("5-7, after 2-4"));
    drop(FtlBdev::open(cfg("d", 0, 1), Arc::clone(&media)).expect("0-1, before 2-4"));
    a.start();
    assert_eq!(decode(&a.read(5, 1).expect("read")), Some((5, 1)), "the data of 2-4 survived");
    a.stop(false);
}

/// A dirty restore finds the tail of a band with a bad chunk where the band's head says (its good
/// chunks, from the head's mask), not where a band of every chunk would keep it.
#[test]
fn dirty_restore_reads_the_tail_of_bands_with_a_bad_chunk() {
    let dir = tempfile::tempdir().expect("tmp");
    // PU 1 of group 0 (range index 2) is bad in bands 2..12.
    let bad: Vec<Ppa> = (2..12).map(|b| Ppa::new(0, 1, b, 0)).collect();
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), bad));
    let mut h = Harness::new(media, FtlConfig::new("tailbad"));
    let n = h.num_lbas();
    for lba in 0..n.min(450) {
        h.write(lba, &[lba + 1]);
    }
    h.cmd(IoKind::Flush, 0, 0);
    {
        let sh = h.bdev.as_ref().expect("running").shared();
        let c = lock(&sh.core);
        let b = &c.bands[2];
        assert_eq!((b.state, b.good.clone()), (BandState::Closed, vec![0, 1, 3]), "band 2");
    }
    h.stop(true);
    h.start();
    let s = h.stats();
    assert!(s["restore_tail_bands"].as_u64().unwrap_or(0) >= 3, "{s}");
    assert!(s["restore_oob_bands"].as_u64().unwrap_or(9) <= 1, "{s}");
    for lba in 0..n.min(450) {
        assert_eq!(decode(&h.read(lba, 1).expect("read")), Some((lba, lba + 1)));
    }
    // The restored band keeps its head's chunks, after a crash and after a clean restart: its
    // positions (91 data blocks written, not 123) feed relocation's invalid count.
    for crash in [true, false] {
        {
            let sh = h.bdev.as_ref().expect("running").shared();
            let c = lock(&sh.core);
            let b = &c.bands[2];
            assert_eq!((b.good.clone(), b.written), (vec![0, 1, 3], 91), "band 2 (crash {crash})");
        }
        h.stop(false);
        h.start();
    }
    h.stop(false);
}

/// The exposed size of a new FTL: (data bands × data blocks per band) × (100 − lba-rsvd)%, or the
/// size asked for when it fits. geometry(20, 32): 128 positions a band, 1 head and a 4-block tail
/// (one block rounded up to ws_min): 123 data blocks; 91 with one chunk bad.
#[test]
fn a_new_ftl_exposes_its_data_bands_less_the_reserve() {
    let blocks = |g: EmuGeometry, bad: Vec<Ppa>, tweak: &dyn Fn(&mut FtlConfig)| {
        let dir = tempfile::tempdir().expect("tmp");
        let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), g, bad));
        let mut cfg = FtlConfig::new("size");
        tweak(&mut cfg);
        FtlBdev::open(cfg, media).map(|f| f.info().num_blocks).map_err(|e| e.to_string())
    };
    let band0: Vec<Ppa> = (0..2).flat_map(|g| (0..2).map(move |p| Ppa::new(g, p, 0, 0))).collect();
    assert_eq!(blocks(geometry(20, 32), vec![], &|_| {}), Ok(18 * 123 * 80 / 100));
    assert_eq!(blocks(geometry(20, 32), vec![], &|c| c.lba_rsvd = 50), Ok(18 * 123 / 2));
    // Band 0 all bad: two-band areas, 16 data bands.
    assert_eq!(blocks(geometry(20, 32), band0, &|_| {}), Ok(16 * 123 * 80 / 100));
    // One bad chunk in band 5: a data band of 91 blocks.
    assert_eq!(blocks(geometry(20, 32), vec![Ppa::new(1, 1, 5, 0)], &|_| {}), Ok((17 * 123 + 91) * 80 / 100));
    let max = 18 * 123 * 80 / 100;
    assert_eq!(blocks(geometry(20, 32), vec![], &|c| c.size_bytes = Some(max * 4096)), Ok(max));
    assert_eq!(blocks(geometry(20, 32), vec![], &|c| c.size_bytes = Some(1000 * 4096)), Ok(1000));
    let e =
        blocks(geometry(20, 32), vec![], &|c| c.size_bytes = Some((max + 1) * 4096)).expect_err("too big");
    assert!(e.starts_with("size"), "{e}");
    // 4 bands: room for the two areas and two data bands (then too few spare bands); 3: none.
    let e = blocks(geometry(4, 32), vec![], &|_| {}).expect_err("4 bands");
    assert!(e.starts_with("lba-rsvd"), "{e}");
    let e = blocks(geometry(3, 32), vec![], &|_| {}).expect_err("3 bands");
    assert!(e.contains("too small for an FTL"), "{e}");
    // With band 0 bad, two-band areas need 2 * 2 + 2 = 6 bands: 7 take them (3 data bands of
    // 123 blocks, 33% exposed to keep two spare), 5 do not.
    let band0: Vec<Ppa> = (0..2).flat_map(|g| (0..2).map(move |p| Ppa::new(g, p, 0, 0))).collect();
    assert_eq!(blocks(geometry(7, 32), band0.clone(), &|c| c.lba_rsvd = 67), Ok(3 * 123 * 33 / 100));
    let e = blocks(geometry(5, 32), band0, &|c| c.lba_rsvd = 67).expect_err("5 bands, band 0 bad");
    assert!(e.contains("too small for an FTL"), "{e}");
}

/// A new FTL uses 4-byte L2P entries when every media address fits in 32 bits.
#[test]
fn a_small_ftl_persists_4_byte_l2p_entries() {
    let (_dir, l) = info_image(false);
    assert_eq!(l.ckpt.sb.l2p_entry_bytes, 4);
}

/// Data anywhere in the first 32 bands (the largest two areas) marks the range in use, so
/// `mode=create` refuses it without force; data past them does not.
#[test]
fn data_in_the_last_band_an_area_may_take_marks_the_range_in_use() {
    for (band, in_use) in [(31, true), (32, false)] {
        let dir = tempfile::tempdir().expect("tmp");
        let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(40, 32), vec![]));
        let geo = geo_for(media.as_ref(), &FtlConfig::new("x")).expect("geo");
        let mut qp = media.queue_pair(4).expect("qp");
        md::write_area(media.as_ref(), qp.as_mut(), &geo, band, 1, &[7u8; 4096], 1).expect("foreign data");
        drop(qp);
        let mut cfg = FtlConfig::new("inuse");
        cfg.mode = Mode::Create;
        let r = FtlBdev::open(cfg, media).map(drop).map_err(|e| e.to_string());
        if in_use {
            assert!(r.as_ref().is_err_and(|e| e.contains("already hold data")), "band {band}: {r:?}");
        } else {
            assert_eq!(r, Ok(()), "band {band}");
        }
    }
}

/// geo_for: the PU range (inside the device, at most 64 PUs, alternating across groups) and a
/// media with the FTL's minimum of 16 OOB bytes a block.
#[test]
fn geo_for_takes_ranges_of_up_to_64_pus_alternating_across_groups() {
    let dir = tempfile::tempdir().expect("tmp");
    let g = EmuGeometry {
        num_grp: 2,
        num_pu: 33,
        num_chk: 4,
        clba: 8,
        ws_min: 4,
        ws_opt: 8,
        oob_bytes: 16,
        ..EmuGeometry::default()
    };
    let media = make_media(dir.path(), g, vec![]);
    let geo = |b: u32, e: Option<u32>| {
        let mut c = FtlConfig::new("g");
        (c.pu_begin, c.pu_end) = (b, e);
        geo_for(&media, &c).map_err(|e| e.to_string())
    };
    let g = geo(1, Some(4)).expect("1-4");
    assert_eq!(g.pus, vec![(1, 0), (0, 1), (1, 1), (0, 2)]);
    assert_eq!((g.clba, g.ws_min, g.ws_opt, g.num_bands, g.max_positions), (8, 4, 8, 4, 32));
    assert_eq!(geo(0, Some(63)).expect("64 PUs").pus.len(), 64);
    assert_eq!(geo(2, None).expect("2-65").pus.len(), 64);
    assert_eq!(geo(65, None).expect("the last PU").pus, vec![(1, 32)]);
    for (b, e, want) in [
        (0, None, "66 PUs; at most 64"),
        (1, None, "65 PUs; at most 64"),
        (66, None, "outside the device's 66"),
        (0, Some(66), "outside the device's 66"),
    ] {
        let r = geo(b, e);
        assert!(r.as_ref().is_err_and(|m| m.starts_with("punits") && m.contains(want)), "{b}-{e:?}: {r:?}");
    }
}

/// An emulated media with test seams:
/// * `info` may report another geometry than the emulator underneath (which refuses such
///   geometries itself): for geo_for's own checks;
/// * with `all_free`, every chunk-info query is answered with the (free) first chunk: enough for
///   the sizing of a new FTL on a geometry far larger than the emulator's, which does no I/O;
/// * with a `gate`, its queue pairs hold back completions as the gate says (see [`HoldGate`]).
struct TestMedia {
    inner: EmuDevice,
    info: crate::ocssd::MediaInfo,
    all_free: bool,
    gate: Option<Arc<HoldGate>>,
}

impl TestMedia {
    /// `emu` as it is, its queue pairs held by `gate`.
    fn holding(emu: EmuDevice, gate: &Arc<HoldGate>) -> Self {
        let info = *emu.info();
        Self { inner: emu, info, all_free: false, gate: Some(Arc::clone(gate)) }
    }
}

impl MediaDevice for TestMedia {
    fn info(&self) -> &crate::ocssd::MediaInfo {
        &self.info
    }
    fn chunk_info(&self, chunk: Ppa) -> Result<crate::ocssd::ChunkInfo, crate::ocssd::MediaError> {
        self.inner.chunk_info(if self.all_free { Ppa::new(0, 0, 0, 0) } else { chunk })
    }
    fn report_chunks(
        &self,
        first_index: u64,
        max: usize,
        out: &mut Vec<crate::ocssd::ChunkInfo>,
    ) -> Result<usize, crate::ocssd::MediaError> {
        self.inner.report_chunks(first_index, max, out)
    }
    fn take_notifications(&self, out: &mut Vec<crate::ocssd::ChunkNotification>) -> usize {
        self.inner.take_notifications(out)
    }
    fn queue_pair(&self, depth: usize) -> Result<Box<dyn crate::ocssd::QueuePair>, crate::ocssd::MediaError> {
        let inner = self.inner.queue_pair(depth)?;
        let Some(gate) = &self.gate else { return Ok(inner) };
        Ok(Box::new(HoldQp {
            inner,
            gate: Arc::clone(gate),
            marked: std::collections::HashSet::new(),
            stash: Vec::new(),
            read_tags: std::collections::HashSet::new(),
            rstash: std::collections::VecDeque::new(),
        }))
    }
}

/// geo_for refuses write sizes the FTL cannot stripe (ws_min 0, ws_opt not a multiple of ws_min,
/// over 64, or not dividing the chunk) and media with fewer than 16 OOB bytes a block; it takes
/// ws_opt 64 and more OOB bytes.
#[test]
fn geo_for_checks_the_write_sizes_and_oob_bytes_it_is_given() {
    let dir = tempfile::tempdir().expect("tmp");
    let emu = make_media(dir.path(), geometry(20, 32), vec![]);
    let base = *emu.info();
    let mut m = TestMedia { inner: emu, info: base, all_free: false, gate: None };
    let mut check = |edit: &dyn Fn(&mut crate::ocssd::MediaInfo), want: Option<&str>| {
        m.info = base;
        edit(&mut m.info);
        let r = geo_for(&m, &FtlConfig::new("w")).map(drop).map_err(|e| e.to_string());
        match want {
            None => assert_eq!(r, Ok(()), "{:?}", m.info.geometry),
            Some(w) => assert!(r.as_ref().is_err_and(|e| e.contains(w)), "{:?}: {r:?}", m.info.geometry),
        }
    };
    let ws = "unsupported write-size geometry";
    check(&|_| {}, None);
    check(&|i| (i.geometry.ws_min, i.geometry.ws_opt, i.geometry.clba) = (8, 64, 128), None);
    check(&|i| i.oob_bytes_per_block = 64, None);
    check(&|i| i.oob_bytes_per_block = 15, "the FTL needs 16".into());
    check(&|i| i.block_size_bytes = 512, "is not 4096".into());
    check(&|i| i.geometry.ws_min = 0, ws.into());
    check(&|i| i.geometry.ws_min = 3, ws.into());
    check(&|i| (i.geometry.ws_min, i.geometry.ws_opt, i.geometry.clba) = (8, 128, 128), ws.into());
    check(&|i| i.geometry.clba = 36, ws.into());
}

/// Formatting logs its progress once a second at most: a quick format of 40 bands logs a few lines,
/// not one per band.
#[test]
fn format_progress_is_logged_once_a_second_at_most() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(40, 32), vec![]));
    let (f, logs) = crate::testlog::capture(|| FtlBdev::open(FtlConfig::new("fmt"), media));
    drop(f.expect("open"));
    let lines = logs.iter().filter(|l| l.contains("format: band")).count();
    assert!(logs.iter().any(|l| l.contains("formatting parallel units")), "{logs:?}");
    assert!(lines < 10, "{lines} progress lines: {logs:?}");
}

/// A superblock that records another PU range of the same size (md::load checks only the size
/// and the band count) is refused by open ("does not match").
#[test]
fn a_superblock_of_another_range_of_the_same_size_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut cfg = FtlConfig::new("rr");
    (cfg.pu_begin, cfg.pu_end) = (1, Some(2));
    drop(FtlBdev::open(cfg.clone(), Arc::clone(&media)).expect("1-2"));
    let geo = geo_for(media.as_ref(), &cfg).expect("geo");
    let mut qp = media.queue_pair(4).expect("qp");
    let mut l = md::load(media.as_ref(), qp.as_mut(), &geo).expect("load");
    let k = l.md_bands;
    (l.ckpt.sb.pu_begin, l.ckpt.sb.pu_end) = (0, 1);
    let g = l.ckpt.sb.generation;
    md::write_area(media.as_ref(), qp.as_mut(), &geo, 0, k, &l.ckpt.encode(false), g).expect("primary");
    md::write_area(media.as_ref(), qp.as_mut(), &geo, k, k, &l.ckpt.encode(true), g).expect("mirror");
    drop(qp);
    let r = FtlBdev::open(cfg, media).map(drop).map_err(|e| e.to_string());
    assert!(r.as_ref().is_err_and(|m| m.starts_with("punits") && m.contains("does not match")), "{r:?}");
}

/// A write is held back only when it would take the user blocks in the buffer past the limit:
/// up to exactly the limit is taken. (The core thread is stopped: nothing leaves the buffer.)
#[test]
fn a_write_up_to_the_user_limit_is_taken_one_more_block_is_not() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let bdev = FtlBdev::open(FtlConfig::new("lim"), media).expect("open");
    bdev.crash();
    let sh = Arc::clone(bdev.shared());
    lock(&sh.core).user_limit = 8;
    let mut ch = new_channel(&sh).expect("channel");
    let data = vec![5u8; 8 * BLOCK_BYTES];
    let w = |ch: &mut FtlChannel, lba: u64, n: u64| {
        ch.write(BdevIo::write(lba, n, IoVecs::from_slice(&data[..n as usize * BLOCK_BYTES]), lba)).is_ok()
    };
    assert!(w(&mut ch, 0, 5), "5 of 8");
    assert!(w(&mut ch, 5, 3), "8 of 8");
    assert!(!w(&mut ch, 8, 1), "9 of 8");
    assert_eq!(lock(&sh.core).wbuf.user, 8);
    // The same for the free slots: a write that fills the buffer exactly is taken.
    let free = {
        let mut c = lock(&sh.core);
        c.user_limit = usize::MAX;
        c.wbuf.free()
    };
    let mut lba = 8;
    for _ in 0..(free - 8) / 8 {
        assert!(w(&mut ch, lba, 8), "8 more, {} free", lock(&sh.core).wbuf.free());
        lba += 8;
    }
    let rest = lock(&sh.core).wbuf.free() as u64;
    assert!((1..=8).contains(&rest), "{rest}");
    assert!(w(&mut ch, lba, rest), "the last {rest} free slots");
    assert!(!w(&mut ch, lba + rest, 1), "a full buffer");
}

/// An nv-cache needs two superblock blocks and a ring of twice the write buffer: with 64 KiB of
/// write buffer (16 blocks), 34 blocks are enough and 33 are not.
#[test]
fn an_nv_cache_needs_a_ring_of_twice_the_write_buffer() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut cfg = FtlConfig::new("nvsize");
    cfg.wbuf_bytes = 64 << 10;
    for (blocks, ok) in [(33u64, false), (34, true)] {
        let reg = Registry::new();
        let nv = crate::bdev::malloc::MallocBdev::new("nv", blocks * 4096, 4096).expect("malloc");
        reg.register(Arc::new(nv)).expect("register");
        let r =
            FtlBdev::open_with_nv(cfg.clone(), Arc::clone(&media), Some(reg.open("nv", true).expect("nv")))
                .map(|f| f.info().max_io_blocks)
                .map_err(|e| e.to_string());
        if ok {
            // ... and a write buffer of 16 blocks takes I/Os of 8 blocks at most (half of it).
            assert_eq!(r, Ok(8), "{blocks} blocks");
        } else {
            assert!(r.as_ref().is_err_and(|e| e.contains("too small")), "{blocks} blocks: {r:?}");
        }
    }
}

/// After a start that replayed the nv-cache, the ring starts over past the last replayed record:
/// records of the old ring are not taken again at the next start, even where the new ring has
/// not overwritten them yet (here: LBA 9, written again after the replay, keeps its new data
/// through a second crash).
#[test]
fn records_replayed_once_are_not_replayed_after_the_next_crash() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(24, 64), vec![]));
    let reg = Registry::new();
    let nv = crate::bdev::malloc::MallocBdev::new("nv", 2 << 20, 4096).expect("malloc");
    reg.register(Arc::new(nv)).expect("register");
    let mut cfg = FtlConfig::new("nvr");
    (cfg.wbuf_bytes, cfg.lba_rsvd) = (256 << 10, 30);
    for (round, writes) in [(0u64, (0..10).collect::<Vec<u64>>()), (1, vec![9]), (2, vec![])] {
        let nv = reg.open("nv", true).expect("nv");
        let bdev = Arc::new(FtlBdev::open_with_nv(cfg.clone(), Arc::clone(&media), Some(nv)).expect("open"));
        let r2 = Registry::new();
        r2.register(bdev.clone()).expect("register");
        let desc = r2.open("nvr", true).expect("desc");
        let mut ch = desc.channel().expect("channel");
        for lba in 0..10u64 {
            let want = if lba == 9 && round == 2 { 2 } else { 1 };
            let bufs = IoVecs::alloc(BLOCK_BYTES);
            let view = bufs.slice(0, BLOCK_BYTES as u64).expect("view");
            if round > 0 {
                assert_eq!(run(&mut ch, vec![BdevIo::read(lba, 1, view, 2)])[&2], Ok(()));
                assert_eq!(decode(&bufs.to_vec()), Some((lba, want)), "round {round}: lba {lba}");
            }
        }
        for lba in writes {
            let r = run(&mut ch, vec![BdevIo::write(lba, 1, IoVecs::from_slice(&block(lba, round + 1)), 1)]);
            assert_eq!(r[&1], Ok(()), "write {lba}");
        }
        drop(ch);
        drop(desc);
        bdev.crash();
        drop(r2.unregister("nvr").expect("unregister"));
        drop(bdev);
    }
}

/// An nv-cache reformatted for a new FTL (mode=create, force=on) gets both superblock copies
/// rewritten: the copy of the FTL it held before (a higher generation) cannot win at the next start.
#[test]
fn a_reformatted_nv_cache_keeps_no_superblock_of_its_former_ftl() {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let ma: Arc<dyn MediaDevice> = Arc::new(make_media(da.path(), geometry(20, 32), vec![]));
    let mb: Arc<dyn MediaDevice> = Arc::new(make_media(db.path(), geometry(20, 32), vec![]));
    let reg = Registry::new();
    let nv = crate::bdev::malloc::MallocBdev::new("nv", 1 << 20, 4096).expect("malloc");
    reg.register(Arc::new(nv)).expect("register");
    let mut cfg = FtlConfig::new("nvf");
    cfg.wbuf_bytes = 64 << 10;
    let open = |cfg: &FtlConfig, m: &Arc<dyn MediaDevice>| {
        FtlBdev::open_with_nv(cfg.clone(), Arc::clone(m), Some(reg.open("nv", true).expect("nv")))
            .map(drop)
            .map_err(|e| e.to_string())
    };
    for _ in 0..3 {
        assert_eq!(open(&cfg, &ma), Ok(()), "FTL A");
    }
    let mut create = cfg.clone();
    (create.mode, create.force) = (Mode::Create, true);
    assert_eq!(open(&create, &mb), Ok(()), "FTL B, reformatting the nv-cache");
    assert_eq!(open(&cfg, &mb), Ok(()), "FTL B again");
    let e = open(&cfg, &ma).expect_err("the nv-cache is B's now");
    assert!(e.contains("another FTL"), "{e}");
}

/// A start that replays nv-cache records says how many blocks it replayed; one with nothing to
/// replay says nothing.
#[test]
fn a_replay_logs_the_blocks_it_replayed_and_only_then() {
    let dir = tempfile::tempdir().expect("tmp");
    let (media, reg, cfg) = nv_ftl_setup(dir.path(), "nvlog");
    let open = || {
        crate::testlog::capture(|| {
            FtlBdev::open_with_nv(cfg.clone(), Arc::clone(&media), Some(reg.open("nv", true).expect("nv")))
                .expect("open")
        })
    };
    let (bdev, _) = open();
    let mut ch = new_channel(bdev.shared()).expect("channel");
    let mut done = Vec::new();
    for lba in 0..3u64 {
        let io = BdevIo::write(lba, 1, IoVecs::from_slice(&block(lba, 1)), lba);
        assert!(ch.write(io).is_ok(), "write {lba}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while done.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "writes not acknowledged: {done:?}");
        ch.poll(&mut done);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    drop(ch);
    bdev.crash();
    drop(bdev);
    let (bdev, logs) = open();
    assert!(logs.iter().any(|l| l.contains("replayed 3 blocks from nv-cache")), "{logs:?}");
    drop(bdev);
    let (bdev, logs) = open();
    assert!(!logs.iter().any(|l| l.contains("replayed")), "{logs:?}");
    drop(bdev);
}

// ---- mod.rs channel-path mutants (mutftl5) ----

/// A refused configuration stays a configuration error as a bdev error (the daemon names it so);
/// the other FTL errors are module errors.
#[test]
fn ftl_config_errors_are_bdev_config_errors() {
    let e = BdevError::from(FtlError::Config { option: "size", reason: "too big".into() });
    assert!(matches!(&e, BdevError::InvalidConfig(m) if m == "size: too big"), "{e:?}");
    let e = BdevError::from(FtlError::Media("gone".into()));
    assert!(matches!(&e, BdevError::Module(m) if m == "media error: gone"), "{e:?}");
}

/// A malloc nv-cache "nv" of 1 MiB in a new registry, and an FTL config that fits it.
fn nv_setup(name: &str) -> (Registry, FtlConfig) {
    let reg = Registry::new();
    let nv = crate::bdev::malloc::MallocBdev::new("nv", 1 << 20, 4096).expect("malloc");
    reg.register(Arc::new(nv)).expect("register");
    let mut cfg = FtlConfig::new(name);
    cfg.wbuf_bytes = 64 << 10;
    (reg, cfg)
}

/// A flush reclaims the nv-cache record of the last write before it (its last buffer entry is
/// below the flushed tail): a trim flushed after it is not undone by a replay of that record at
/// the next start.
#[test]
fn a_flushed_write_leaves_no_record_to_replay_over_a_later_trim() {
    let dir = tempfile::tempdir().expect("tmp");
    let (media, reg, cfg) = nv_ftl_setup(dir.path(), "nvtrim");
    let open = || {
        let nv = reg.open("nv", true).expect("nv");
        let bdev = Arc::new(FtlBdev::open_with_nv(cfg.clone(), Arc::clone(&media), Some(nv)).expect("open"));
        let r = Registry::new();
        r.register(bdev.clone()).expect("register");
        let desc = r.open("nvtrim", true).expect("desc");
        (bdev, r, desc)
    };
    let (bdev, r, desc) = open();
    let mut ch = desc.channel().expect("channel");
    let data: Vec<u8> = (3..5u64).flat_map(|lba| block(lba, 1)).collect();
    assert_eq!(run(&mut ch, vec![BdevIo::write(3, 2, IoVecs::from_slice(&data), 1)])[&1], Ok(()));
    assert_eq!(run(&mut ch, vec![BdevIo::no_data(IoKind::Flush, 0, 0, 2)])[&2], Ok(()));
    let ring = lock(&bdev.shared().core).nv.as_ref().map(|r| (r.pending.len(), r.used()));
    assert_eq!(ring, Some((0, 0)), "the flushed record is reclaimed");
    assert_eq!(run(&mut ch, vec![BdevIo::no_data(IoKind::Unmap, 3, 2, 3)])[&3], Ok(()));
    assert_eq!(run(&mut ch, vec![BdevIo::no_data(IoKind::Flush, 0, 0, 4)])[&4], Ok(()));
    drop(ch);
    drop(desc);
    bdev.crash();
    drop(r.unregister("nvtrim").expect("unregister"));
    drop(bdev);
    let (bdev, r, desc) = open();
    assert_eq!(bdev.shared().stats.nv_replayed_blocks.load(Ordering::Relaxed), 0, "nothing to replay");
    let mut ch = desc.channel().expect("channel");
    let bufs = IoVecs::alloc(2 * BLOCK_BYTES);
    let view = bufs.slice(0, bufs.len_bytes()).expect("view");
    assert_eq!(run(&mut ch, vec![BdevIo::read(3, 2, view, 5)])[&5], Ok(()));
    assert!(bufs.to_vec().iter().all(|b| *b == 0), "the trimmed blocks came back");
    drop(ch);
    drop(desc);
    drop(r.unregister("nvtrim").expect("unregister"));
    drop(bdev);
}

/// The version a held [`TestMedia`] looks for in the blocks a write carries.
const HELD_VERSION: u64 = 77;

/// What a held [`TestMedia`] shares with its test. Its queue pairs hold back, while the gate says
/// so, the completions of the writes that carry a block written as `block(lba, HELD_VERSION)`: those
/// writes are on the media only once the gate opens (other commands, metadata among them, pass).
/// Read completions are held while `hold_reads` is set, and let out `release` at a time.
#[derive(Default)]
struct HoldGate {
    /// Hold the completions of writes carrying a block of version [`HELD_VERSION`].
    hold: std::sync::atomic::AtomicBool,
    /// Such completions held so far.
    held: std::sync::atomic::AtomicUsize,
    /// Hold the completions of reads too, letting out only `release` of them (oldest first).
    hold_reads: std::sync::atomic::AtomicBool,
    release: std::sync::atomic::AtomicUsize,
    /// The blocks of every read command submitted, in order.
    reads: std::sync::Mutex<Vec<usize>>,
}

struct HoldQp {
    inner: Box<dyn crate::ocssd::QueuePair>,
    gate: Arc<HoldGate>,
    /// Tags of the writes carrying a held-version block.
    marked: std::collections::HashSet<u64>,
    /// Their completions, held.
    stash: Vec<crate::ocssd::Completion>,
    /// Tags of the reads in flight, and the read completions held.
    read_tags: std::collections::HashSet<u64>,
    rstash: std::collections::VecDeque<crate::ocssd::Completion>,
}

impl crate::ocssd::QueuePair for HoldQp {
    fn submit(&mut self, cmd: crate::ocssd::Command) -> Result<(), crate::ocssd::Rejected> {
        let mut mark = false;
        let read = match &cmd.op {
            crate::ocssd::Op::Read { ppas, .. } => Some(ppas.len()),
            _ => None,
        };
        if let crate::ocssd::Op::Write { ppas, data, .. } = &cmd.op {
            for i in 0..ppas.len() {
                let mut ver = Vec::new();
                data.for_each_piece(i * BLOCK_BYTES + 8, 8, |p| ver.extend_from_slice(p));
                mark |= ver == HELD_VERSION.to_le_bytes();
            }
        }
        let tag = cmd.tag;
        self.inner.submit(cmd)?;
        if mark {
            self.marked.insert(tag);
        }
        if let Some(n) = read {
            self.read_tags.insert(tag);
            lock(&self.gate.reads).push(n);
        }
        Ok(())
    }
    fn poll(&mut self, done: &mut Vec<crate::ocssd::Completion>, max: usize) -> usize {
        let hold = self.gate.hold.load(Ordering::SeqCst);
        let before = done.len();
        if !hold {
            done.append(&mut self.stash);
        }
        let mut got = Vec::new();
        self.inner.poll(&mut got, max);
        for c in got {
            if self.read_tags.remove(&c.tag) {
                self.rstash.push_back(c);
            } else if hold && self.marked.remove(&c.tag) {
                self.gate.held.fetch_add(1, Ordering::SeqCst);
                self.stash.push(c);
            } else {
                self.marked.remove(&c.tag);
                done.push(c);
            }
        }
        while !self.rstash.is_empty() {
            if self.gate.hold_reads.load(Ordering::SeqCst)
                && self
                    .gate
                    .release
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_err()
            {
                break;
            }
            done.extend(self.rstash.pop_front());
        }
        done.len() - before
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.stash.len() + self.rstash.len()
    }
    fn depth(&self) -> usize {
        self.inner.depth()
    }
}

/// A start that replays nv-cache records reports the FTL ready only once the replayed data is on
/// the media (its flush completed): until then the ring still holds the only durable copy.
/// (The replayed write's completion is held; open must still be waiting 2 s later.)
#[test]
fn a_replay_waits_for_its_flush_before_the_ftl_is_ready() {
    let dir = tempfile::tempdir().expect("tmp");
    let gate = Arc::new(HoldGate::default());
    let media: Arc<dyn MediaDevice> =
        Arc::new(TestMedia::holding(make_media(dir.path(), geometry(20, 32), vec![]), &gate));
    let (reg, cfg) = nv_setup("nvhold");
    let reg = Arc::new(reg);
    let open = {
        let (reg, media, cfg) = (Arc::clone(&reg), Arc::clone(&media), cfg.clone());
        move || {
            FtlBdev::open_with_nv(cfg.clone(), Arc::clone(&media), Some(reg.open("nv", true).expect("nv")))
                .map_err(|e| e.to_string())
        }
    };
    // Four blocks acknowledged from the nv-cache, then a crash.
    let bdev = open().expect("open");
    let mut ch = new_channel(bdev.shared()).expect("channel");
    let data: Vec<u8> = (0..4u64).flat_map(|lba| block(lba, HELD_VERSION)).collect();
    assert!(ch.write(BdevIo::write(0, 4, IoVecs::from_slice(&data), 9)).is_ok(), "write");
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while done.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the write was not acknowledged");
        ch.poll(&mut done);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(done[0].result, Ok(()));
    drop(ch);
    bdev.crash();
    drop(bdev);
    // The next start replays them; their write to the media does not complete yet.
    gate.hold.store(true, Ordering::SeqCst);
    let (tx, rx) = std::sync::mpsc::channel();
    let opener = std::thread::spawn(move || tx.send(open()).is_ok());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while gate.held.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "the replayed blocks were never written");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let early = rx.recv_timeout(std::time::Duration::from_secs(2)).ok();
    gate.hold.store(false, Ordering::SeqCst);
    let ready = early.is_some();
    let bdev = early
        .or_else(|| rx.recv_timeout(std::time::Duration::from_secs(60)).ok())
        .expect("open never returned")
        .expect("open");
    assert!(opener.join().expect("opener"), "sent");
    assert!(!ready, "the FTL was ready while its replay's flush waited for the media");
    assert_eq!(bdev.shared().stats.nv_replayed_blocks.load(Ordering::Relaxed), 4);
    drop(bdev);
}

/// An nv-cache bdev of 512-byte blocks (8 per 4 KiB unit): a record (header + data) is written
/// whole, so what was acknowledged is replayed at the next start.
#[test]
fn an_nv_cache_of_512_byte_blocks_replays_what_it_acknowledged() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let reg = Registry::new();
    let nv = crate::bdev::malloc::MallocBdev::new("nv", 1 << 20, 512).expect("malloc");
    reg.register(Arc::new(nv)).expect("register");
    let mut cfg = FtlConfig::new("nv512");
    cfg.wbuf_bytes = 64 << 10;
    let open = || {
        let nv = reg.open("nv", true).expect("nv");
        let bdev = Arc::new(FtlBdev::open_with_nv(cfg.clone(), Arc::clone(&media), Some(nv)).expect("open"));
        let r = Registry::new();
        r.register(bdev.clone()).expect("register");
        let desc = r.open("nv512", true).expect("desc");
        (bdev, r, desc)
    };
    let (bdev, r, desc) = open();
    let mut ch = desc.channel().expect("channel");
    let data: Vec<u8> = (2..5u64).flat_map(|lba| block(lba, 1)).collect();
    assert_eq!(run(&mut ch, vec![BdevIo::write(2, 3, IoVecs::from_slice(&data), 1)])[&1], Ok(()));
    drop(ch);
    drop(desc);
    bdev.crash();
    drop(r.unregister("nv512").expect("unregister"));
    drop(bdev);
    let (bdev, r, desc) = open();
    assert_eq!(bdev.shared().stats.nv_replayed_blocks.load(Ordering::Relaxed), 3);
    let mut ch = desc.channel().expect("channel");
    let bufs = IoVecs::alloc(3 * BLOCK_BYTES);
    let view = bufs.slice(0, bufs.len_bytes()).expect("view");
    assert_eq!(run(&mut ch, vec![BdevIo::read(2, 3, view, 2)])[&2], Ok(()));
    assert_eq!(bufs.to_vec(), data);
    drop(ch);
    drop(desc);
    drop(r.unregister("nv512").expect("unregister"));
    drop(bdev);
}

/// Polls `ch` until `f` holds for the completions so far (30 s at most).
fn poll_until(
    ch: &mut FtlChannel,
    done: &mut Vec<Completion>,
    what: &str,
    f: impl Fn(&[Completion]) -> bool,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !f(done) {
        assert!(std::time::Instant::now() < deadline, "{what}: {done:?}");
        ch.poll(done);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// An FTL on a a held [`TestMedia`] media with LBAs `0..n` written (`block(lba, 1)`) and flushed to the
/// media, and a channel of the test's own.
fn ftl_with_media_blocks(dir: &Path, name: &str, n: u64) -> (FtlBdev, Arc<HoldGate>, FtlChannel) {
    ftl_with_media_blocks_on(make_media(dir, geometry(20, 32), vec![]), name, n)
}

/// [`ftl_with_media_blocks`] on a given emulated device (to inject faults).
fn ftl_with_media_blocks_on(emu: EmuDevice, name: &str, n: u64) -> (FtlBdev, Arc<HoldGate>, FtlChannel) {
    let gate = Arc::new(HoldGate::default());
    let media: Arc<dyn MediaDevice> = Arc::new(TestMedia::holding(emu, &gate));
    let bdev = FtlBdev::open(FtlConfig::new(name), media).expect("open");
    let mut ch = new_channel(bdev.shared()).expect("channel");
    let mut done = Vec::new();
    for lba in 0..n {
        let io = BdevIo::write(lba, 1, IoVecs::from_slice(&block(lba, 1)), lba);
        assert!(ch.write(io).is_ok(), "write {lba}");
        ch.poll(&mut done);
    }
    assert!(ch.flush(BdevIo::no_data(IoKind::Flush, 0, 0, u64::MAX)).is_ok(), "flush");
    poll_until(&mut ch, &mut done, "flush", |d| d.iter().any(|c| c.tag == u64::MAX));
    assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
    let sh = bdev.shared();
    assert!((0..n).all(|lba| matches!(sh.l2p.get(lba), Loc::Media(_))), "not all on the media");
    assert_eq!(ch.poll(&mut done), 0);
    (bdev, gate, ch)
}

/// Whether the channel's wait fd is readable now.
fn fd_readable(ch: &FtlChannel) -> bool {
    let fd = ch.wait_fd().expect("wait fd");
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd on the stack; timeout 0.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// A read of 130 media blocks goes to the media as commands of 64, 64 and 2 blocks, wakes the
/// channel once they are submitted, and completes only with the last of them (each let out by
/// the media in turn), with every block read.
#[test]
fn a_read_takes_commands_of_64_blocks_and_completes_with_the_last() {
    let dir = tempfile::tempdir().expect("tmp");
    let (bdev, gate, mut ch) = ftl_with_media_blocks(dir.path(), "rd64", 130);
    assert!(!fd_readable(&ch), "idle");
    gate.hold_reads.store(true, Ordering::SeqCst);
    lock(&gate.reads).clear();
    let bufs = IoVecs::alloc(130 * BLOCK_BYTES);
    let view = bufs.slice(0, bufs.len_bytes()).expect("view");
    assert!(ch.read(BdevIo::read(0, 130, view, 7)).is_ok(), "read");
    assert_eq!(*lock(&gate.reads), vec![64, 64, 2]);
    assert!(fd_readable(&ch), "commands in flight but the wait fd is not readable");
    let mut done = Vec::new();
    for k in 0..3 {
        assert!(done.is_empty(), "completed after {k} of 3 commands: {done:?}");
        gate.release.store(1, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while gate.release.load(Ordering::SeqCst) > 0 {
            assert!(std::time::Instant::now() < deadline, "command {k} never completed");
            ch.poll(&mut done);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!((done[0].tag, done[0].result), (7, Ok(())));
    let want: Vec<u8> = (0..130u64).flat_map(|lba| block(lba, 1)).collect();
    assert!(bufs.to_vec() == want, "the blocks read differ");
    drop(ch);
    drop(bdev);
}

/// A read is taken while its commands fit in the channel's queue pair (256 deep): with 255
/// commands in flight one more read is taken, with 256 it is handed back (NoMem), as it could not
/// be submitted.
#[test]
fn a_read_is_taken_while_its_commands_fit_in_the_queue() {
    let dir = tempfile::tempdir().expect("tmp");
    let (bdev, gate, mut ch) = ftl_with_media_blocks(dir.path(), "rdq", 1);
    gate.hold_reads.store(true, Ordering::SeqCst);
    let depth = ch.qp.depth();
    assert_eq!(depth, 256);
    let mut bufs = Vec::new();
    let mut read = |ch: &mut FtlChannel, tag: u64| {
        let b = IoVecs::alloc(BLOCK_BYTES);
        let view = b.slice(0, BLOCK_BYTES as u64).expect("view");
        bufs.push(b);
        ch.read(BdevIo::read(0, 1, view, tag)).is_ok()
    };
    for tag in 0..depth as u64 {
        assert!(read(&mut ch, tag), "read {tag} with {} in flight", ch.qp.in_flight());
    }
    assert_eq!(ch.qp.in_flight(), depth);
    assert!(!read(&mut ch, 999), "a read with the queue full is taken");
    gate.hold_reads.store(false, Ordering::SeqCst);
    let mut done = Vec::new();
    poll_until(&mut ch, &mut done, "reads", |d| d.len() >= depth);
    assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
    assert!(bufs[..depth].iter().all(|b| b.to_vec() == block(0, 1)));
    drop(ch);
    drop(bdev);
}

/// Lets out one held read completion and polls the channel until it is taken (30 s at most).
fn release_one_read(ch: &mut FtlChannel, gate: &HoldGate, done: &mut Vec<Completion>) {
    gate.release.store(1, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while gate.release.load(Ordering::SeqCst) > 0 {
        assert!(std::time::Instant::now() < deadline, "no read command completed");
        ch.poll(done);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A block rewritten (and flushed to another place on the media) while a read of it is in flight
/// is read again from its new place: the read completes only with that second command, with the
/// new data.
#[test]
fn a_block_moved_while_read_is_read_again_from_its_new_place() {
    let dir = tempfile::tempdir().expect("tmp");
    let (bdev, gate, mut ch) = ftl_with_media_blocks(dir.path(), "rdmove", 1);
    let sh = Arc::clone(bdev.shared());
    let old = sh.l2p.get(0);
    gate.hold_reads.store(true, Ordering::SeqCst);
    lock(&gate.reads).clear();
    let bufs = IoVecs::alloc(BLOCK_BYTES);
    let view = bufs.slice(0, BLOCK_BYTES as u64).expect("view");
    assert!(ch.read(BdevIo::read(0, 1, view, 7)).is_ok(), "read");
    let mut done = Vec::new();
    assert!(ch.write(BdevIo::write(0, 1, IoVecs::from_slice(&block(0, 2)), 8)).is_ok(), "write");
    assert!(ch.flush(BdevIo::no_data(IoKind::Flush, 0, 0, 9)).is_ok(), "flush");
    poll_until(&mut ch, &mut done, "write and flush", |d| d.iter().filter(|c| c.tag != 7).count() == 2);
    assert!(matches!(sh.l2p.get(0), Loc::Media(_)) && sh.l2p.get(0) != old, "{:?}", sh.l2p.get(0));
    done.clear();
    release_one_read(&mut ch, &gate, &mut done);
    assert!(done.is_empty(), "completed without reading the block again: {done:?}");
    assert_eq!(lock(&gate.reads).len(), 2, "read again");
    release_one_read(&mut ch, &gate, &mut done);
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!((done[0].tag, done[0].result), (7, Ok(())));
    assert_eq!(decode(&bufs.to_vec()), Some((0, 2)));
    // Rewritten again, this time still in the write buffer when the read comes back: the block
    // is copied from there and the read completes at once.
    assert!(ch.read(BdevIo::read(0, 1, bufs.slice(0, BLOCK_BYTES as u64).expect("view"), 10)).is_ok());
    assert!(ch.write(BdevIo::write(0, 1, IoVecs::from_slice(&block(0, 3)), 11)).is_ok(), "write");
    assert!(matches!(sh.l2p.get(0), Loc::Cache(_)), "{:?}", sh.l2p.get(0));
    done.clear();
    release_one_read(&mut ch, &gate, &mut done);
    let read: Vec<_> = done.iter().filter(|c| c.tag == 10).map(|c| c.result).collect();
    assert_eq!(read, vec![Ok(())], "{done:?}");
    assert_eq!(decode(&bufs.to_vec()), Some((0, 3)));
    assert_eq!(lock(&gate.reads).len(), 3, "no media read for a buffered block");
    gate.hold_reads.store(false, Ordering::SeqCst);
    drop(ch);
    drop(bdev);
}

/// A media read that fails for one block of its command fails the read, and only that block
/// counts as a read error (the emulator reports which list entry failed).
#[test]
fn a_failed_block_of_a_read_command_is_the_only_read_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let emu = make_media(dir.path(), geometry(20, 32), vec![]);
    let (bdev, _gate, mut ch) = ftl_with_media_blocks_on(emu.clone(), "rderr", 4);
    let sh = Arc::clone(bdev.shared());
    let Loc::Media(addr) = sh.l2p.get(2) else { panic!("lba 2 not on the media") };
    emu.inject(Fault::ReadError { ppa: sh.geo.ppa_of(addr), kind: ReadErrorKind::Unrecoverable })
        .expect("inject");
    let bufs = IoVecs::alloc(4 * BLOCK_BYTES);
    assert!(ch.read(BdevIo::read(0, 4, bufs.slice(0, bufs.len_bytes()).expect("view"), 7)).is_ok());
    let mut done = Vec::new();
    poll_until(&mut ch, &mut done, "read", |d| !d.is_empty());
    assert!(matches!(done[0].result, Err(IoError::Media(_))), "{done:?}");
    assert_eq!(sh.stats.read_errors.load(Ordering::Relaxed), 1);
    drop(ch);
    drop(bdev);
}

/// A new FTL's L2P entries take 4 bytes while the media has fewer than u32::MAX addresses and 8
/// from u32::MAX addresses on: 257 bands of 15 PUs of 1 114 129 blocks are exactly u32::MAX
/// (2^32 − 1) addresses, 17 blocks a chunk fewer are not. (Sizing only: no I/O, no image.)
#[test]
fn l2p_entries_take_8_bytes_from_u32_max_addresses_on() {
    let dir = tempfile::tempdir().expect("tmp");
    let emu = make_media(dir.path(), geometry(20, 32), vec![]);
    let base = *emu.info();
    let mut m = TestMedia { inner: emu, info: base, all_free: true, gate: None };
    let cfg = FtlConfig::new("huge");
    for (clba, addrs, want) in [(1_114_129u32, u64::from(u32::MAX), 8), (1_114_112, 4_294_901_760, 4)] {
        let g = &mut m.info.geometry;
        (g.num_grp, g.num_pu, g.num_chk, g.clba, g.ws_min, g.ws_opt) = (3, 5, 257, clba, 1, 17);
        let mut geo = geo_for(&m, &cfg).expect("geometry");
        assert_eq!(geo.addr_space(), addrs);
        let s = size_new(&m, &mut geo, &cfg).expect("sizing");
        assert_eq!(s.entry_bytes, want, "{addrs} addresses");
    }
}

/// A poll that finds nothing done keeps the channel's wakeup while a media read is in flight (its
/// completion wakes nobody else); once the read is done and taken, an idle poll clears it.
#[test]
fn a_channel_keeps_its_wakeup_while_a_read_is_in_flight() {
    let dir = tempfile::tempdir().expect("tmp");
    let (bdev, gate, mut ch) = ftl_with_media_blocks(dir.path(), "rdwake", 1);
    gate.hold_reads.store(true, Ordering::SeqCst);
    let bufs = IoVecs::alloc(BLOCK_BYTES);
    assert!(ch.read(BdevIo::read(0, 1, bufs.slice(0, BLOCK_BYTES as u64).expect("view"), 7)).is_ok());
    let mut done = Vec::new();
    assert_eq!(ch.poll(&mut done), 0);
    assert!(fd_readable(&ch), "a read is in flight but the wait fd was cleared");
    gate.hold_reads.store(false, Ordering::SeqCst);
    poll_until(&mut ch, &mut done, "read", |d| !d.is_empty());
    assert_eq!((done[0].tag, done[0].result), (7, Ok(())));
    assert_eq!(ch.poll(&mut done), 0);
    assert!(!fd_readable(&ch), "idle, but the wait fd is readable");
    drop(ch);
    drop(bdev);
}

/// With an nv-cache, a channel whose records are all acknowledged is idle: a poll that finds
/// nothing clears its wakeup.
#[test]
fn an_nv_cache_channel_with_no_record_in_flight_clears_its_wakeup() {
    let dir = tempfile::tempdir().expect("tmp");
    let (media, reg, cfg) = nv_ftl_setup(dir.path(), "nvidle");
    let nv = reg.open("nv", true).expect("nv");
    let bdev = FtlBdev::open_with_nv(cfg, media, Some(nv)).expect("open");
    let mut ch = new_channel(bdev.shared()).expect("channel");
    assert!(ch.write(BdevIo::write(0, 1, IoVecs::from_slice(&block(0, 1)), 7)).is_ok(), "write");
    let mut done = Vec::new();
    poll_until(&mut ch, &mut done, "write", |d| !d.is_empty());
    assert_eq!((done[0].tag, done[0].result), (7, Ok(())));
    assert_eq!(ch.poll(&mut done), 0);
    assert!(!fd_readable(&ch), "nothing in flight, but the wait fd is readable");
    drop(ch);
    drop(bdev);
}

// ---- md.rs write_area and load (mutftl6) ----

/// write_area ends each chunk's last command at the chunk's end when ws_opt does not divide the
/// chunk (geo_for refuses such a geometry; write_area does not rely on that): a 20-block image over
/// chunks of 12 blocks (ws_opt 8) puts 8 + 4 blocks in the first chunk and 8 in the second, not 8 +
/// 8 past the first chunk's end.
#[test]
fn write_area_ends_a_chunk_at_its_last_block_when_ws_opt_does_not_divide_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let mut geo = geo_for(media.as_ref(), &FtlConfig::new("x")).expect("geo");
    assert_eq!(geo.ws_opt, 8);
    // The first 12 blocks of each 32-block chunk, as a geometry of 12-block chunks would have them.
    geo.clba = 12;
    geo.max_positions = geo.pus.len() as u64 * geo.clba;
    let mut qp = media.queue_pair(4).expect("qp");
    let bytes = vec![0x5au8; 20 * BLOCK_BYTES];
    let n = md::write_area(media.as_ref(), qp.as_mut(), &geo, 2, 1, &bytes, 7).expect("write");
    assert_eq!(n, 20, "blocks written");
    let wp = |i: usize| media.chunk_info(geo.chunk(2, i)).expect("chunk info").write_pointer_blocks;
    assert_eq!((wp(0), wp(1), wp(2)), (12, 8, 0), "write pointers of the area's chunks");
}

/// load reads the primary over the largest area it may have (half the bands, 16 at most) until
/// its superblock gives the real size: a region whose header claims a length past that is bad for
/// that reason, and the primary's error that load reports (`ftl info` shows it as primary_error)
/// says so; the mirror is used.
#[test]
fn a_primary_region_longer_than_half_the_bands_runs_past_its_area() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(20, 32), vec![]));
    let cfg = FtlConfig::new("long-region");
    drop(FtlBdev::open(cfg.clone(), Arc::clone(&media)).expect("format"));
    let geo = geo_for(media.as_ref(), &cfg).expect("geo");
    let mut qp = media.queue_pair(4).expect("qp");
    let l = md::load(media.as_ref(), qp.as_mut(), &geo).expect("load");
    assert!(l.primary_bad.is_none());
    // 20 bands of 4 × 32 blocks: the primary is read over 10 bands (1 280 blocks) first. The band
    // metadata region's header now claims a payload that ends at block 1 500: past those 10 bands,
    // within 16.
    let at = l.ckpt.sb.region_offsets[layout::RegionId::BandMd as usize] as usize;
    let mut image = l.ckpt.encode(false);
    let hdr = &mut image[at * BLOCK_BYTES..(at + 1) * BLOCK_BYTES];
    let len = (1500 - at) * BLOCK_BYTES - 32; // 32: the region header
    hdr[16..24].copy_from_slice(&(len as u64).to_le_bytes());
    let hcrc = crc32c::crc32c(&hdr[0..28]);
    hdr[28..32].copy_from_slice(&hcrc.to_le_bytes());
    assert_eq!(layout::region_len(layout::RegionId::BandMd, hdr).ok(), Some(len), "a well-formed header");
    let g = l.ckpt.sb.generation;
    md::write_area(media.as_ref(), qp.as_mut(), &geo, 0, l.md_bands, &image, g).expect("primary");
    let l = md::load(media.as_ref(), qp.as_mut(), &geo).expect("load from the mirror");
    assert!(l.ckpt.sb.mirror, "the mirror is used");
    let why = l.primary_bad.expect("the primary is bad");
    assert!(why.contains("metadata runs past its area"), "{why}");
}
