//! The fuzz targets of `fuzz/` as ordinary tests: every input of the checked-in corpus
//! (`fuzz/corpus-ci/TARGET/`, seeds plus every crash ever found) is replayed, then a bounded random
//! run mutates the corpus for a few seconds. No fuzzing toolchain is needed here; the long
//! coverage-guided runs use cargo-fuzz (README, "Fuzzing").
//!
//! `cargo test --release --test fuzz_replay -- --ignored write_seed_corpus` rewrites the seeds
//! (the `seed-*` files) from the crate's own encoders.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vblkd::fuzzing;

/// Seconds of random mutation per target in the default test run.
const RANDOM_SECS: f64 = 2.0;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus-ci").join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("entry").path();
            (p.file_name().expect("name").to_string_lossy().into_owned(), std::fs::read(&p).expect("read"))
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no corpus for {target}");
    out
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seeds: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut v = seeds[rng.below(seeds.len())].1.clone();
    for _ in 0..=rng.below(8) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.remove(i);
            }
            4 if v.len() >= 2 => {
                // An interesting 16/32-bit value somewhere.
                let i = rng.below(v.len() - 1);
                let vals = [0u16, 1, 0x7fff, 0x8000, 0xffff, 16, 32, 64, 0x100];
                v[i..i + 2].copy_from_slice(&vals[rng.below(vals.len())].to_le_bytes());
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())].1;
                if !other.is_empty() && !v.is_empty() {
                    let i = rng.below(v.len());
                    let j = rng.below(other.len());
                    let n = rng.below((v.len() - i).min(other.len() - j)) + 1;
                    v[i..i + n].copy_from_slice(&other[j..j + n]);
                }
            }
        }
    }
    v
}

/// Replays the corpus (checking what named seeds must reach), then mutates it for a while.
fn run(target: &str, f: fn(&[u8]) -> u64, expect: &[(&str, u64)]) {
    let seeds = corpus(target);
    for (name, data) in &seeds {
        let r = std::panic::catch_unwind(|| f(data));
        let Ok(got) = r else { panic!("{target}: corpus input {name} fails") };
        if let Some((_, want)) = expect.iter().find(|(n, _)| *n == name) {
            assert_eq!(got, *want, "{target}: seed {name} gives {got}, expected {want}");
        }
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs_f64(RANDOM_SECS) {
        let input = mutate(&mut rng, &seeds);
        let r = std::panic::catch_unwind(|| f(&input));
        if r.is_err() {
            let path = std::env::temp_dir().join(format!("vblkd-fuzz-{target}-crash-{}", std::process::id()));
            let _ = std::fs::write(&path, &input);
            panic!(
                "{target}: a mutated input fails; saved to {} (add it to fuzz/corpus-ci/{target}/)",
                path.display()
            );
        }
        n += 1;
    }
    eprintln!("{target}: {} corpus inputs, {n} random inputs in {RANDOM_SECS} s", seeds.len());
}

#[test]
fn chain_parser() {
    run(
        "chain_parser",
        fuzzing::chain_parser,
        &[
            ("seed-write", 1),
            ("seed-read", 1),
            ("seed-flush", 1),
            ("seed-get-id", 1),
            ("seed-discard", 1),
            ("seed-write-zeroes", 1),
            ("seed-indirect", 1),
            ("seed-loop", 0),
            ("seed-across-hole", 0),
            ("seed-write-4k-ro", 0),
            ("seed-read-4k-ro", 1),
        ],
    );
}

#[test]
fn avail_ring() {
    run(
        "avail_ring",
        fuzzing::avail_ring,
        &[("seed-write", 1), ("seed-loop", 1), ("seed-index-far-ahead", 0), ("seed-head-out-of-range", 1)],
    );
}

#[test]
fn front_door() {
    run(
        "front_door",
        fuzzing::front_door,
        &[("seed-session", 15), ("seed-mem-slots", 5), ("seed-refusals", 1)],
    );
}

#[test]
fn wire() {
    run("wire", fuzzing::wire, &[("seed-session", 16), ("seed-mem-slots", 5), ("seed-refusals", 6)]);
}

#[test]
fn ocssd_image() {
    run("ocssd_image", fuzzing::ocssd_image, &[("seed-header-and-record", 3), ("seed-header", 1)]);
}

#[test]
fn cache_md() {
    run(
        "cache_md",
        fuzzing::cache_md,
        &[
            ("seed-device-clean", 15),
            ("seed-device-crashed", 15),
            ("seed-fields", 15),
            ("seed-fields-dup", 3),
        ],
    );
}

/// `cargo test --release --test fuzz_replay -- --ignored write_cache_md_seeds`: the `cache_md` seeds,
/// from real cache devices (a clean stop and a running wb cache, i.e. a crash) and from fields.
#[test]
#[ignore]
fn write_cache_md_seeds() {
    use std::sync::Arc;
    use vblkd::bdev::file::{Engine, FileBdev};
    use vblkd::bdev::{BdevIo, IoVecs, Registry};
    use vblkd::cache::layout::{self, LineRecord};
    use vblkd::cache::{CacheBdev, CacheConfig, Mode};
    let write = |name: &str, data: &[u8]| {
        let dir = corpus_dir("cache_md");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("seed-{name}")), data).expect("write");
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let lines = 64u64;
    let md = layout::PAGE_BYTES * lines.div_ceil(u64::from(layout::LINES_PER_PAGE));
    let dev = layout::MD_OFFSET + md + lines * 4096;
    let reg = Registry::new();
    let f = FileBdev::open("cd", dir.path().join("c.img"), Some(dev), false, Engine::Threads).expect("cache");
    reg.register(Arc::new(f)).expect("register");
    let f = FileBdev::open("core", dir.path().join("k.img"), Some(1 << 20), false, Engine::Threads)
        .expect("core");
    reg.register(Arc::new(f)).expect("register");
    let mut c = CacheConfig::new("c0", "cd", "core");
    c.mode = Mode::Wb;
    let b = CacheBdev::create(&c, &reg).expect("cache bdev");
    reg.register(b.clone()).expect("register");
    let desc = reg.open("c0", true).expect("open");
    let mut ch = desc.channel().expect("channel");
    for i in 0..12u64 {
        let data = vec![i as u8 + 1; 2048];
        ch.submit(BdevIo::write(i * 8 + i % 4, 4, IoVecs::from_slice(&data), i));
        let mut done = Vec::new();
        while ch.poll(&mut done) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(done[0].result, Ok(()));
    }
    let image = |p: &std::path::Path| {
        let all = std::fs::read(p).expect("read image");
        let mut v = vec![0u8];
        v.extend_from_slice(&all[..(layout::MD_OFFSET + md) as usize]);
        v
    };
    // While it runs, the device is what a crash leaves behind (unclean superblock, dirty records).
    write("device-crashed", &image(&dir.path().join("c.img")));
    drop(ch);
    drop(desc);
    reg.unregister("c0").expect("unregister").shutdown().expect("shutdown");
    write("device-clean", &image(&dir.path().join("c.img")));
    // From fields: 4 KiB lines, 64 lines, clean, cores 0 and 1, CRCs fixed up; then a duplicate line.
    let mut v = vec![1u8 | 16, 0, 63, 0, 2, 2, 0, 1, 0, 0, 1, 0, 5, 7, 1, 0, 2];
    let mut recs = vec![0u8; md as usize];
    for (i, core, line) in [(0u32, 0u16, 3u64), (1, 1, 3), (5, 0, 9), (40, 1, 100)] {
        let r = LineRecord { seq: 1, used: true, core_id: core, core_line: line, valid: 0xff, dirty: 0x0f };
        let at = i as usize * layout::LINE_MD_BYTES as usize + layout::SLOT_BYTES;
        layout::encode_record(&r, &mut recs[at..at + layout::SLOT_BYTES]);
    }
    let mut ok = v.clone();
    ok.extend_from_slice(&recs);
    write("fields", &ok);
    let r = LineRecord { seq: 3, used: true, core_id: 0, core_line: 9, valid: 1, dirty: 0 };
    let at = 7 * layout::LINE_MD_BYTES as usize + layout::SLOT_BYTES;
    layout::encode_record(&r, &mut recs[at..at + layout::SLOT_BYTES]);
    v.extend_from_slice(&recs);
    write("fields-dup", &v);
}

// ---- seeds ----------------------------------------------------------------------------------

fn put(mem: &mut Vec<u8>, at: usize, b: &[u8]) {
    if mem.len() < at + b.len() {
        mem.resize(at + b.len(), 0);
    }
    mem[at..at + b.len()].copy_from_slice(b);
}

fn desc(mem: &mut Vec<u8>, table: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    put(mem, table + 16 * usize::from(i), &d);
}

fn header(mem: &mut Vec<u8>, at: usize, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    put(mem, at, &h);
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// Guest memory images holding one request each at descriptor 0 of a table at 0x100.
fn chains() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, kind, data_flags, data_len) in [
        ("write", 1u32, 0u16, 4096u32),
        ("read", 0, WRITE, 4096),
        ("flush", 4, 0, 0),
        ("get-id", 8, WRITE, 20),
        ("discard", 11, 0, 16),
        ("write-zeroes", 13, 0, 16),
    ] {
        let mut m = vec![0u8; 0x3010];
        header(&mut m, 0x1000, kind, 8);
        put(&mut m, 0x2000, &[8, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]);
        if data_len > 0 {
            desc(&mut m, 0x100, 0, 0x1000, 16, NEXT, 1);
            desc(&mut m, 0x100, 1, 0x2000, data_len, data_flags | NEXT, 2);
            desc(&mut m, 0x100, 2, 0x3000, 1, WRITE, 0);
        } else {
            desc(&mut m, 0x100, 0, 0x1000, 16, NEXT, 1);
            desc(&mut m, 0x100, 1, 0x3000, 1, WRITE, 0);
        }
        out.push((name, m));
    }
    // Indirect: descriptor 0 points at a 3-entry table at 0x800.
    let mut m = vec![0u8; 0x3010];
    header(&mut m, 0x1000, 1, 16);
    desc(&mut m, 0x100, 0, 0x800, 48, INDIRECT, 0);
    desc(&mut m, 0x800, 0, 0x1000, 16, NEXT, 1);
    desc(&mut m, 0x800, 1, 0x2000, 512, NEXT, 2);
    desc(&mut m, 0x800, 2, 0x3000, 1, WRITE, 0);
    out.push(("indirect", m));
    // A loop, and a buffer across the hole between the two regions.
    let mut m = vec![0u8; 0x3010];
    header(&mut m, 0x1000, 1, 0);
    desc(&mut m, 0x100, 0, 0x1000, 16, NEXT, 1);
    desc(&mut m, 0x100, 1, 0x2000, 512, NEXT, 0);
    out.push(("loop", m));
    let mut m = vec![0u8; 0x3010];
    header(&mut m, 0x1000, 0, 0);
    desc(&mut m, 0x100, 0, 0x1000, 16, NEXT, 1);
    desc(&mut m, 0x100, 1, 0x3e00, 4096, WRITE | NEXT, 2);
    desc(&mut m, 0x100, 2, 0x3000, 1, WRITE, 0);
    out.push(("across-hole", m));
    out
}

fn msg(req: u32, flags: u32, body: &[u8], fd_sizes: &[u64]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&req.to_le_bytes());
    v.extend_from_slice(&(flags | 1).to_le_bytes());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.push(fd_sizes.len() as u8);
    for s in fd_sizes {
        v.extend_from_slice(&(s << 1).to_le_bytes());
    }
    v.extend_from_slice(body);
    v
}

fn vring_state(i: u32, n: u32) -> Vec<u8> {
    [i.to_le_bytes(), n.to_le_bytes()].concat()
}

fn front_door_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let u64b = |v: u64| v.to_le_bytes().to_vec();
    let region = |gpa: u64, size: u64, off: u64| -> Vec<u8> {
        [gpa.to_le_bytes(), size.to_le_bytes(), (0x7000_0000_0000 + gpa).to_le_bytes(), off.to_le_bytes()]
            .concat()
    };
    let table = |regions: &[Vec<u8>]| -> Vec<u8> {
        let mut b = (regions.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        for r in regions {
            b.extend_from_slice(r);
        }
        b
    };
    let nr = 8u32;
    let mut session = Vec::new();
    session.extend(msg(3, 0, &[], &[]));
    session.extend(msg(1, 0, &[], &[]));
    session.extend(msg(2, 0, &u64b((1 << 32) | (1 << 30)), &[]));
    session.extend(msg(15, 0, &[], &[]));
    session.extend(msg(16, 0, &u64b((1 << 0) | (1 << 3) | (1 << 9) | (1 << 15) | (1 << 12)), &[]));
    session.extend(msg(5, nr, &table(&[region(0, 1 << 20, 0)]), &[1 << 20]));
    session.extend(msg(8, nr, &vring_state(0, 32), &[]));
    session.extend(msg(10, nr, &vring_state(0, 0), &[]));
    let addr = [0u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    let addr =
        [addr, u64b(0x7000_0000_0000), u64b(0x7000_0000_1000), u64b(0x7000_0000_0800), u64b(0)].concat();
    session.extend(msg(9, nr, &addr, &[]));
    session.extend(msg(12, nr, &u64b(0), &[0]));
    session.extend(msg(13, nr, &u64b(0), &[0]));
    session.extend(msg(18, nr, &vring_state(0, 1), &[]));
    let mut cfg = [0u32.to_le_bytes(), 60u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    cfg.extend_from_slice(&[0u8; 60]);
    session.extend(msg(24, 0, &cfg, &[]));
    let mut wce = [32u32.to_le_bytes(), 1u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    wce.push(1);
    session.extend(msg(25, nr, &wce, &[]));
    let inflight = [u64b(0), u64b(0), vec![2, 0, 32, 0, 0, 0, 0, 0]].concat();
    session.extend(msg(31, 0, &inflight, &[]));
    session.extend(msg(11, 0, &vring_state(0, 0), &[]));
    let mut slots = Vec::new();
    slots.extend(msg(16, 0, &u64b((1 << 3) | (1 << 15)), &[]));
    slots.extend(msg(36, 0, &[], &[]));
    let one = [vec![0u8; 8], region(0, 1 << 16, 0)].concat();
    slots.extend(msg(37, nr, &one, &[1 << 16]));
    let two = [vec![0u8; 8], region(1 << 16, 1 << 16, 4096)].concat();
    slots.extend(msg(37, nr, &two, &[1 << 20]));
    slots.extend(msg(38, nr, &one, &[]));
    let mut bad = Vec::new();
    bad.extend(msg(16, 0, &u64b(1 << 3), &[]));
    bad.extend(msg(
        5,
        nr,
        &table(&[region(0, 1 << 20, 0), region(1 << 19, 1 << 20, 0)]),
        &[1 << 21, 1 << 21],
    ));
    bad.extend(msg(5, nr, &table(&[region(0, 1 << 21, 0)]), &[1 << 20]));
    bad.extend(msg(8, nr, &vring_state(0, 33), &[]));
    bad.extend(msg(12, nr, &u64b(0), &[0]));
    bad.extend(msg(8, nr, &vring_state(7, 32), &[]));
    vec![("session", session), ("mem-slots", slots), ("refusals", bad)]
}

/// The wire format of a seed (the front-door seeds without the fd-size bytes).
fn wire_bytes(seed: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = seed;
    while rest.len() > 12 {
        let size = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]) as usize;
        let nfds = usize::from(rest[12] & 7);
        out.extend_from_slice(&rest[..12]);
        let body_at = 13 + 8 * nfds;
        let end = (body_at + size).min(rest.len());
        out.extend_from_slice(&rest[body_at.min(end)..end]);
        rest = &rest[end..];
    }
    out
}

#[test]
#[ignore = "rewrites the seed corpus"]
fn write_seed_corpus() {
    use vblkd::ocssd::emu::image::{encode_header, ChunkRecord};
    use vblkd::ocssd::emu::{EmuGeometry, Layout};
    use vblkd::ocssd::spec::{ChunkInfo, ChunkState};
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("seed-{name}")), data).expect("write");
    };
    for (name, m) in chains() {
        // [head lo, head hi, log2 table size, limits flags] + memory
        for (tag, flags) in [("", 0x32u8), ("-4k-ro", 0x37)] {
            let mut v = vec![0, 0, 4, flags];
            v.extend_from_slice(&m);
            write("chain_parser", &format!("{name}{tag}"), &v);
        }
        // [log2 size, next avail lo, hi, flags] + memory with the avail ring of a 16-entry ring
        // (table 0x100, avail 0x200, used 0x228): one head published.
        let mut r = m.clone();
        put(&mut r, 0x200, &[0, 0, 1, 0, 0, 0]);
        let mut v = vec![4, 0, 0, 0x32];
        v.extend_from_slice(&r);
        write("avail_ring", name, &v);
    }
    let mut far = vec![4, 0, 0, 0x30];
    let mut r = chains()[0].1.clone();
    put(&mut r, 0x200, &[0, 0, 40, 0, 0, 0]);
    far.extend_from_slice(&r);
    write("avail_ring", "index-far-ahead", &far);
    let mut oob = vec![4, 0, 0, 0x30];
    let mut r = chains()[0].1.clone();
    put(&mut r, 0x200, &[0, 0, 2, 0, 0, 0, 17, 0]);
    oob.extend_from_slice(&r);
    write("avail_ring", "head-out-of-range", &oob);
    for (name, s) in front_door_seeds() {
        write("front_door", name, &s);
        write("wire", name, &wire_bytes(&s));
    }
    let g = EmuGeometry { num_grp: 2, num_pu: 2, num_chk: 8, clba: 64, ..EmuGeometry::default() };
    let layout = Layout::compute(&g).expect("layout");
    let hdr = encode_header(&g, &layout);
    let rec = ChunkRecord {
        info: ChunkInfo {
            state: ChunkState::Open,
            kind: 1,
            wear_index: 3,
            slba: 0x40,
            cnlb: 64,
            write_pointer_blocks: 12,
        },
        erase_count: 7,
    }
    .encode();
    let mut v = vec![0b11u8];
    v.extend_from_slice(&hdr[8..]);
    v.extend_from_slice(&rec);
    write("ocssd_image", "header-and-record", &v);
    let mut v = vec![0b01u8];
    v.extend_from_slice(&hdr[8..]);
    write("ocssd_image", "header", &v);
}

#[test]
fn ftl_md() {
    run("ftl_md", fuzzing::ftl_md, &[("seed-checkpoint", 1), ("seed-tail", 2), ("seed-nv-super", 4)]);
}

/// `cargo test --release --test fuzz_replay -- --ignored write_ftl_md_seeds` rewrites the `ftl_md`
/// seeds from the FTL's own encoders.
#[test]
#[ignore]
fn write_ftl_md_seeds() {
    use vblkd::ftl::layout::{encode_tail, BandRecord, Superblock};
    use vblkd::ftl::md::Checkpoint;
    use vblkd::ftl::nvcache::NvSuper;
    let dir = corpus_dir("ftl_md");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let write = |name: &str, flags: u8, body: &[u8]| {
        let mut v = vec![flags];
        v.extend_from_slice(body);
        std::fs::write(dir.join(format!("seed-{name}")), v).expect("write");
    };
    let sb = Superblock {
        uuid: [7; 16],
        pu_begin: 0,
        pu_end: 3,
        num_lbas: 100,
        num_bands: 4,
        md_bands: 1,
        mirror: false,
        clean: true,
        ckpt_seq: 9,
        generation: 2,
        l2p_entry_bytes: 4,
        lba_rsvd: 20,
        region_offsets: [0; 5],
    };
    let ckpt = Checkpoint {
        sb,
        bands: vec![BandRecord { state: 1, base_seq: 3, retired: 0, erase_count: 1 }; 4],
        l2p: (0..100).map(|i| if i % 3 == 0 { u64::MAX } else { i * 5 }).collect(),
        valid: vec![0x5555; 16],
        trim: vec![0x9; 2],
    };
    // Valid map of 1000 bits: flags bits 2..=7 = 1.
    write("checkpoint", 1 << 2, &ckpt.encode(false));
    write("tail", 0, &encode_tail(5, 77, 0xf, &[1, 2, 3, u64::MAX, 9]));
    let nv = NvSuper { uuid: [7; 16], nonce: [3; 16], generation: 4, durable_seq: 10, ring_units: 256 };
    write("nv-super", 0, &nv.encode());
}
