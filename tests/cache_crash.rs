//! Write-back cache crash test: the real `vblkd` binary, a real frontend (libblkio), `kill -9`,
//! restart, and every block written before a completed flush must read back with the right data.
//!
//! Each cycle: start vblkd (cache bdev in wb mode over file core, file cache device, loaded from the
//! previous cycle), verify every block against the model, write batches (some flushed, some not, some
//! still in flight), then SIGKILL. Blocks written after the last completed flush may hold their old
//! or any newer value; flushed ones must be exact. The cache device is 8× smaller than the working
//! set, so eviction, pressure cleaning and metadata rounds all run while the process dies.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vblkd::client::BlkClient;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 2048; // 8 MiB core
const BATCH: usize = 16;

struct Model {
    /// Value (seed) durable for sure.
    committed: HashMap<u64, u64>,
    /// Values written since the last completed flush.
    pending: HashMap<u64, Vec<u64>>,
}

fn data(seed: u64, block: u64) -> Vec<u8> {
    let mut x = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block) | 1;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn args(dir: &Path, cleaner: &str) -> Vec<String> {
    let d = dir.display();
    vec![
        "--log-level".into(),
        "warn".into(),
        "--bdev".into(),
        format!("driver=file,name=cd,path={d}/cache.img,size=1200K"),
        "--bdev".into(),
        format!("driver=file,name=core,path={d}/core.img,size=8M"),
        "--bdev".into(),
        format!("driver=cache,name=c0,cache=cd,core=core,mode=wb,cleaner={cleaner},alru-wake-ms=30,alru-stale-ms=20"),
        "--export".into(),
        format!("bdev=c0,socket={d}/s.sock,queues=1"),
    ]
}

fn sync_ok(c: &mut BlkClient, f: impl FnOnce(&mut BlkClient, usize)) {
    assert_eq!(c.sync(0, f).expect("request"), 0);
}

fn verify(c: &mut BlkClient, m: &mut Model) {
    for b in 0..BLOCKS {
        sync_ok(c, |c, u| c.read(0, b * BLOCK as u64, 0, BLOCK, u));
        let got = c.mem()[..BLOCK].to_vec();
        let mut allowed: Vec<u64> = m.committed.get(&b).copied().into_iter().collect();
        allowed.extend(m.pending.get(&b).into_iter().flatten().copied());
        let zero = !m.committed.contains_key(&b) && got.iter().all(|&x| x == 0);
        let hit = allowed.iter().copied().find(|&s| data(s, b) == got);
        match (hit, zero) {
            (Some(s), _) => {
                m.committed.insert(b, s);
            }
            (None, true) => {}
            (None, false) => panic!(
                "block {b}: data lost or wrong (committed {:?}, unflushed {:?})",
                m.committed.get(&b),
                m.pending.get(&b)
            ),
        }
    }
    m.pending.clear();
}

#[test]
fn kill_9_in_write_back_keeps_every_flushed_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let mut m = Model { committed: HashMap::new(), pending: HashMap::new() };
    let mut rng: u64 = 0x1234_5678;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut seed = 1u64;
    for cycle in 0..12 {
        let cleaner = if cycle % 2 == 0 { "alru" } else { "acp" };
        // Killed on drop, so a failing assertion leaves no daemon behind.
        let mut d = common::Daemon::start(&args(dir.path(), cleaner), &sock);
        let mut c = BlkClient::connect(&sock, 1, 64, BATCH * BLOCK).expect("connect");
        verify(&mut c, &mut m);
        for round in 0..6 {
            // A batch of writes in flight together, to distinct blocks.
            let mut blocks: Vec<u64> = Vec::new();
            while blocks.len() < BATCH {
                let b = if next() % 4 == 0 { next() % 64 } else { next() % BLOCKS };
                if !blocks.contains(&b) {
                    blocks.push(b);
                }
            }
            for (i, &b) in blocks.iter().enumerate() {
                seed += 1;
                c.mem()[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&data(seed, b));
                c.write(0, b * BLOCK as u64, i * BLOCK, BLOCK, i);
                m.pending.entry(b).or_default().push(seed);
            }
            let last = round == 5;
            let mut out = Vec::with_capacity(BATCH);
            if last && cycle % 3 == 2 {
                // Leave this batch in flight at the kill.
                c.wait(0, 0, &mut out, Duration::from_millis(1)).expect("submit");
                break;
            }
            let mut n = 0;
            while n < BATCH {
                n += c.wait(0, BATCH - n, &mut out, Duration::from_secs(30)).expect("writes");
            }
            assert!(out.iter().all(|x| x.ret == 0), "write failed");
            if round % 2 == 1 {
                sync_ok(&mut c, |c, u| c.flush(0, u));
            }
            // Stronger than the promise (flushed writes survive): every *acknowledged* write-back
            // write survives `kill -9`, because its line record is written before the acknowledgement.
            for (b, v) in m.pending.drain() {
                m.committed.insert(b, *v.last().expect("value"));
            }
        }
        // kill -9, no goodbye.
        let mut child = d.child.take().expect("running");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        drop(c);
    }
    // Final: a clean start, verify, SIGTERM; then `cache info` reads the image without modifying it.
    let mut d = common::Daemon::start(&args(dir.path(), "alru"), &sock);
    let mut c = BlkClient::connect(&sock, 1, 64, BATCH * BLOCK).expect("connect");
    verify(&mut c, &mut m);
    drop(c);
    assert!(d.stop().success());
    let img = dir.path().join("cache.img");
    let before = std::fs::read(&img).expect("image");
    let out = Command::new(env!("CARGO_BIN_EXE_vblkd"))
        .args(["cache", "info", "--cache"])
        .arg(&img)
        .output()
        .expect("cache info");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["clean_shutdown"], true);
    assert_eq!(v["line_size"], 4096);
    let stats = &v["cores"][0]["stats"];
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
        assert!(stats.get(k).is_some(), "cache info lacks {k}: {v}");
    }
    assert!(stats["read_misses"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(std::fs::read(&img).expect("image"), before, "cache info must not modify the device");
    let bad = Command::new(env!("CARGO_BIN_EXE_vblkd"))
        .args(["cache", "info", "--cache"])
        .arg(dir.path().join("core.img"))
        .output()
        .expect("cache info");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--cache"), "error names the flag");
}
