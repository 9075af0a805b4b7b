//! Crash tests with the real binary: vblkd serves an FTL to libblkio; writes and flushes; `kill -9`
//! at random points (mid-write, during relocation, during a clean shutdown); restart; every block
//! written before a completed flush must be there, every other block must read old-or-new, and no
//! block may ever hold another block's data.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::crash::{block, verify, Model, Rng, BS};
use vblkd::client::BlkClient;

const MEM: usize = 1 << 20;

fn spawn(dir: &Path, sock: &Path) -> Child {
    let media = format!(
        "driver=ocssd-emu,name=o0,path={},create=on,groups=2,pus=2,chunks=24,chunk-blocks=64,ws-min=4,ws-opt=8",
        dir.join("media.img").display()
    );
    let mut child = common::vblkd()
        .args([
            "--log-level",
            "warn",
            "--bdev",
            &media,
            "--bdev",
            "driver=ftl,name=f0,base=o0,wbuf=256K,lba-rsvd=30",
        ])
        .arg("--export")
        .arg(format!("bdev=f0,socket={},queues=1", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vblkd");
    common::wait_for_socket(sock, &mut child);
    child
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn kill_9_at_random_points_never_loses_flushed_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("f.sock");
    let mut m = Model::default();
    let mut ver = 1u64;
    let cycles = 24;
    for cycle in 0..cycles {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((cycle as u64 + 1) * 0x1234_5678_9abc));
        let mut child = spawn(dir.path(), &sock);
        let mut c = BlkClient::connect(&sock, 1, 128, MEM).expect("connect");
        let nblocks = c.get_u64("capacity").expect("capacity") / BS as u64;
        verify(&mut c, &mut m, nblocks, cycle);
        // Writes (1..8 blocks) with flushes; about half the capacity per cycle so relocation runs.
        let ops = 150 + rng.below(150);
        let mut since_flush: Vec<(u64, u64)> = Vec::new();
        for _ in 0..ops {
            let len = 1 + rng.below(8);
            let lba = rng.below(nblocks - len);
            for i in 0..len {
                ver += 1;
                c.mem()[(i as usize) * BS..(i as usize + 1) * BS].copy_from_slice(&block(lba + i, ver));
                m.maybe.entry(lba + i).or_default().push(ver);
                since_flush.push((lba + i, ver));
            }
            assert_eq!(
                c.sync(0, |c, u| c.write(0, lba * BS as u64, 0, (len as usize) * BS, u)).expect("w"),
                0
            );
            if rng.below(10) == 0 {
                if rng.below(3) == 0 {
                    let dl = rng.below(nblocks - 16);
                    let dn = 1 + rng.below(16);
                    assert_eq!(
                        c.sync(0, |c, u| c.discard(0, dl * BS as u64, dn * BS as u64, u)).expect("d"),
                        0
                    );
                    for l in dl..dl + dn {
                        m.maybe.entry(l).or_default().push(0);
                    }
                }
                assert_eq!(c.sync(0, |c, u| c.flush(0, u)).expect("flush"), 0);
                // Everything acknowledged so far is durable now: the last value of each LBA.
                let mut last: HashMap<u64, u64> = HashMap::new();
                for (l, vs) in m.maybe.drain() {
                    if let Some(v) = vs.last() {
                        last.insert(l, *v);
                    }
                }
                for (l, v) in last {
                    if v == 0 {
                        m.sure.remove(&l);
                    } else {
                        m.sure.insert(l, v);
                    }
                }
                since_flush.clear();
            }
        }
        // Leave some writes in flight, then kill: mid-write, or during a clean shutdown.
        for k in 0..4u64 {
            let lba = rng.below(nblocks - 1);
            ver += 1;
            c.mem()[(k as usize) * BS..(k as usize + 1) * BS].copy_from_slice(&block(lba, ver));
            m.maybe.entry(lba).or_default().push(ver);
            c.write(0, lba * BS as u64, (k as usize) * BS, BS, k as usize);
        }
        let mut out = Vec::with_capacity(4);
        let _ = c.wait(0, 0, &mut out, Duration::from_millis(1));
        if cycle % 3 == 2 {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            std::thread::sleep(Duration::from_micros(rng.below(3000)));
        } else {
            std::thread::sleep(Duration::from_micros(rng.below(2000)));
        }
        kill9(&mut child);
        drop(c);
    }
    // Final start: everything verified once more, then a clean stop.
    let mut child = spawn(dir.path(), &sock);
    let mut c = BlkClient::connect(&sock, 1, 128, MEM).expect("connect");
    let nblocks = c.get_u64("capacity").expect("capacity") / BS as u64;
    verify(&mut c, &mut m, nblocks, cycles);
    drop(c);
    // SAFETY: as above.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert!(child.wait().expect("wait").success());
    // Bands were reused (relocation ran): the persisted erase counts say so.
    let out = common::vblkd()
        .args(["ftl", "info", "--media"])
        .arg(dir.path().join("media.img"))
        .output()
        .expect("info");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let erases: u64 =
        v["bands"].as_array().expect("bands").iter().filter_map(|b| b["erase_count"].as_u64()).sum();
    let bands = v["bands"].as_array().map_or(0, |b| b.len() as u64);
    assert!(erases > 2 * bands, "only {erases} band erases over {bands} bands: relocation did not cycle");
}
