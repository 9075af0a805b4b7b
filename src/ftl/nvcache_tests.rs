//! nv-cache tests in one process: acknowledged writes come back after a simulated crash (replay),
//! the conformance suite over an FTL with an nv-cache, and refusals (too small, corrupt, another
//! FTL's) that leave the nv-cache unmodified.

use std::sync::Arc;

use super::tests::{geometry, make_media};
use super::*;
use crate::bdev::malloc::MallocBdev;
use crate::bdev::tests::{conformance_with, run};
use crate::bdev::{BdevIo, IoVecs, Registry};

fn block(lba: u64, ver: u64) -> Vec<u8> {
    let mut b = vec![(lba as u8) ^ (ver as u8).wrapping_mul(31); BLOCK_BYTES];
    b[0..8].copy_from_slice(&lba.to_le_bytes());
    b[8..16].copy_from_slice(&ver.to_le_bytes());
    b
}

fn cfg(name: &str) -> FtlConfig {
    let mut c = FtlConfig::new(name);
    c.wbuf_bytes = 256 << 10;
    c.lba_rsvd = 30;
    c
}

fn nv_registry(size: u64) -> Registry {
    let reg = Registry::new();
    reg.register(Arc::new(MallocBdev::new("nv", size, 4096).expect("malloc"))).expect("register");
    reg
}

fn nv_bytes(reg: &Registry) -> Vec<u8> {
    let d = reg.open("nv", false).expect("open nv");
    let n = d.info().num_blocks;
    let mut ch = d.channel().expect("channel");
    let buf = IoVecs::alloc((n * 4096) as usize);
    let view = buf.slice(0, n * 4096).expect("view");
    assert_eq!(run(&mut ch, vec![BdevIo::read(0, n, buf, 1)])[&1], Ok(()));
    view.to_vec()
}

fn write(ch: &mut crate::bdev::Channel, lba: u64, ver: u64) {
    let r = run(ch, vec![BdevIo::write(lba, 1, IoVecs::from_slice(&block(lba, ver)), 1)]);
    assert_eq!(r[&1], Ok(()), "write {lba}");
}

fn read(ch: &mut crate::bdev::Channel, lba: u64) -> Vec<u8> {
    let bufs = IoVecs::alloc(BLOCK_BYTES);
    let view = bufs.slice(0, BLOCK_BYTES as u64).expect("view");
    assert_eq!(run(ch, vec![BdevIo::read(lba, 1, view, 2)])[&2], Ok(()));
    bufs.to_vec()
}

#[test]
fn acknowledged_writes_survive_a_crash_without_a_flush() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(24, 64), vec![]));
    let reg = nv_registry(2 << 20);
    let mut cur = std::collections::HashMap::new();
    let mut ver = 0u64;
    for round in 0..4u64 {
        let nv = reg.open("nv", true).expect("nv");
        let bdev = Arc::new(FtlBdev::open_with_nv(cfg("nvc"), media.clone(), Some(nv)).expect("open"));
        if round > 0 {
            let s = bdev.module_stats().expect("stats");
            assert!(
                s["nv_cache"]["replayed_blocks"].as_u64() > Some(0),
                "round {round}: nothing replayed: {s}"
            );
        }
        let r2 = Registry::new();
        r2.register(bdev.clone()).expect("register");
        let desc = r2.open("nvc", true).expect("desc");
        let mut ch = desc.channel().expect("channel");
        for (&lba, &v) in &cur {
            assert_eq!(read(&mut ch, lba), block(lba, v), "round {round}: lba {lba}");
        }
        // More than the ring holds between flushes: reclaim runs; no flush at all.
        for i in 0..700u64 {
            ver += 1;
            let lba = (i * 7 + round * 13) % 300;
            write(&mut ch, lba, ver);
            cur.insert(lba, ver);
        }
        drop(ch);
        drop(desc);
        bdev.crash();
        drop(r2.unregister("nvc").expect("unregister"));
        drop(bdev);
    }
}

#[test]
fn conformance_over_an_ftl_with_an_nv_cache() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(32, 64), vec![]));
    let reg = nv_registry(2 << 20);
    let nv = reg.open("nv", true).expect("nv");
    let bdev = FtlBdev::open_with_nv(cfg("ftl-nv-conf"), media, Some(nv)).expect("open");
    conformance_with(reg, Arc::new(bdev));
}

#[test]
fn refusals_name_the_reason_and_leave_the_nv_cache_unmodified() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(24, 64), vec![]));
    // Too small: 2 superblock units + twice the 64-block write buffer are needed.
    let small = nv_registry(256 << 10);
    let e = FtlBdev::open_with_nv(cfg("s"), media.clone(), Some(small.open("nv", true).expect("nv")))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("too small"), "{e}");
    // Claimed by someone else: the write open the FTL needs is refused.
    let reg = nv_registry(2 << 20);
    let mut other = reg.open("nv", true).expect("nv");
    other.claim("cache").expect("claim");
    let e = reg.open("nv", true).err().expect("refused");
    assert!(e.to_string().contains("claimed"), "{e}");
    drop(other);
    // Corrupt superblocks: refused, nothing written to the nv-cache.
    let d = reg.open("nv", true).expect("nv");
    let mut ch = d.channel().expect("ch");
    let junk = vec![0x5au8; 2 * BLOCK_BYTES];
    assert_eq!(run(&mut ch, vec![BdevIo::write(0, 2, IoVecs::from_slice(&junk), 1)])[&1], Ok(()));
    drop(ch);
    drop(d);
    let before = nv_bytes(&reg);
    let e = FtlBdev::open_with_nv(cfg("k"), media.clone(), Some(reg.open("nv", true).expect("nv")))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("both superblock copies are unusable"), "{e}");
    assert!(nv_bytes(&reg) == before, "the corrupt nv-cache was modified");
    // Another FTL's nv-cache (formatted by an FTL on another media) is refused too.
    let reg2 = nv_registry(2 << 20);
    let dir2 = tempfile::tempdir().expect("tmp");
    let media2: Arc<dyn MediaDevice> = Arc::new(make_media(dir2.path(), geometry(24, 64), vec![]));
    let b = FtlBdev::open_with_nv(cfg("a"), media2, Some(reg2.open("nv", true).expect("nv"))).expect("open");
    drop(b);
    let before = nv_bytes(&reg2);
    let e = FtlBdev::open_with_nv(cfg("b"), media, Some(reg2.open("nv", true).expect("nv")))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("another FTL"), "{e}");
    assert!(nv_bytes(&reg2) == before, "another FTL's nv-cache was modified");
}

#[test]
fn a_flushed_unmap_is_not_undone_by_a_replay() {
    let dir = tempfile::tempdir().expect("tmp");
    let media: Arc<dyn MediaDevice> = Arc::new(make_media(dir.path(), geometry(24, 64), vec![]));
    let reg = nv_registry(2 << 20);
    let open = |media: &Arc<dyn MediaDevice>| {
        let nv = reg.open("nv", true).expect("nv");
        Arc::new(FtlBdev::open_with_nv(cfg("trim"), media.clone(), Some(nv)).expect("open"))
    };
    let bdev = open(&media);
    let r2 = Registry::new();
    r2.register(bdev.clone()).expect("register");
    let desc = r2.open("trim", true).expect("desc");
    let mut ch = desc.channel().expect("channel");
    write(&mut ch, 7, 1);
    write(&mut ch, 8, 1);
    let r = run(&mut ch, vec![BdevIo::no_data(crate::bdev::IoKind::Unmap, 7, 1, 3)]);
    assert_eq!(r[&3], Ok(()));
    let r = run(&mut ch, vec![BdevIo::no_data(crate::bdev::IoKind::Flush, 0, 0, 4)]);
    assert_eq!(r[&4], Ok(()));
    write(&mut ch, 9, 1);
    drop(ch);
    drop(desc);
    bdev.crash();
    drop(r2.unregister("trim").expect("unregister"));
    drop(bdev);
    let bdev = open(&media);
    let r2 = Registry::new();
    r2.register(bdev.clone()).expect("register");
    let desc = r2.open("trim", true).expect("desc");
    let mut ch = desc.channel().expect("channel");
    assert!(read(&mut ch, 7).iter().all(|b| *b == 0), "the flushed unmap of lba 7 was undone");
    assert_eq!(read(&mut ch, 8), block(8, 1));
    assert_eq!(read(&mut ch, 9), block(9, 1), "the acknowledged write after the flush was lost");
}
