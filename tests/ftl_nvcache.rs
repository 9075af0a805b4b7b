//! The FTL's nv-cache with the real binary: writes are acknowledged once they are in the nv-cache
//! bdev (a file), so `kill -9` at random points — without any flush — never loses an acknowledged
//! write; and the start-up refusals (missing, too small, claimed, corrupt) exit 2 naming the flag,
//! leaving a corrupt nv-cache untouched.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::crash::{block, verify, Model, Rng, BS};
use vblkd::client::BlkClient;

const MEM: usize = 1 << 20;

fn args(dir: &Path, sock: &Path, nv_size: &str) -> Vec<String> {
    vec![
        "--log-level".into(),
        "warn".into(),
        "--control".into(),
        "none".into(),
        "--bdev".into(),
        format!(
            "driver=ocssd-emu,name=o0,path={},create=on,groups=2,pus=2,chunks=24,chunk-blocks=64,ws-min=4,ws-opt=8",
            dir.join("media.img").display()
        ),
        "--bdev".into(),
        format!("driver=file,name=nv,path={},size={nv_size}", dir.join("nv.img").display()),
        "--bdev".into(),
        "driver=ftl,name=f0,base=o0,wbuf=256K,lba-rsvd=30,nv-cache=nv".into(),
        "--export".into(),
        format!("bdev=f0,socket={},queues=1", sock.display()),
    ]
}

/// The daemon, killed when dropped (also when an assertion fails, so cargo test never waits on
/// its inherited stderr).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &Path, sock: &Path) -> Guard {
    let mut child = common::vblkd()
        .args(args(dir, sock, "1M"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vblkd");
    common::wait_for_socket(sock, &mut child);
    Guard(child)
}

#[test]
fn kill_9_without_flushes_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("f.sock");
    let mut m = Model::default();
    let mut ver = 1u64;
    let cycles = 12;
    for cycle in 0..=cycles {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((cycle as u64 + 1) * 0x9e37_79b9));
        let mut child = spawn(dir.path(), &sock);
        let mut c = BlkClient::connect(&sock, 1, 128, MEM).expect("connect");
        let nblocks = c.get_u64("capacity").expect("capacity") / BS as u64;
        verify(&mut c, &mut m, nblocks, cycle);
        if cycle == cycles {
            drop(c);
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
            assert!(child.0.wait().expect("wait").success());
            break;
        }
        // Writes (1..8 blocks), no flush except rarely after a discard; more than the ring holds.
        for _ in 0..150 + rng.below(150) {
            let len = 1 + rng.below(8);
            let lba = rng.below(nblocks - len);
            let first = ver + 1;
            for i in 0..len {
                ver += 1;
                c.mem()[(i as usize) * BS..(i as usize + 1) * BS].copy_from_slice(&block(lba + i, ver));
            }
            let r = c.sync(0, |c, u| c.write(0, lba * BS as u64, 0, (len as usize) * BS, u)).expect("w");
            assert_eq!(r, 0);
            for i in 0..len {
                m.sure.insert(lba + i, first + i);
                m.maybe.remove(&(lba + i));
            }
            if rng.below(25) == 0 {
                let dl = rng.below(nblocks - 16);
                let dn = 1 + rng.below(16);
                let r = c.sync(0, |c, u| c.discard(0, dl * BS as u64, dn * BS as u64, u)).expect("d");
                assert_eq!(r, 0);
                for l in dl..dl + dn {
                    m.maybe.entry(l).or_default().push(0);
                }
                if rng.below(2) == 0 {
                    // A flushed unmap is durable: never undone by a replay.
                    assert_eq!(c.sync(0, |c, u| c.flush(0, u)).expect("flush"), 0);
                    for l in dl..dl + dn {
                        m.sure.remove(&l);
                        m.maybe.remove(&l);
                    }
                }
            }
        }
        // Writes in flight at the kill: old or new.
        for k in 0..4u64 {
            let lba = rng.below(nblocks - 1);
            ver += 1;
            c.mem()[(k as usize) * BS..(k as usize + 1) * BS].copy_from_slice(&block(lba, ver));
            let old = m.sure.get(&lba).copied().unwrap_or(0);
            let e = m.maybe.entry(lba).or_default();
            e.push(ver);
            e.push(old);
            c.write(0, lba * BS as u64, (k as usize) * BS, BS, k as usize);
        }
        let mut out = Vec::with_capacity(4);
        let _ = c.wait(0, 0, &mut out, Duration::from_millis(1));
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
        drop(child);
        drop(c);
    }
}

fn run_err(a: &[String]) -> (i32, String) {
    let out = common::vblkd().args(a).stdin(Stdio::null()).output().expect("run vblkd");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn sum(p: &Path) -> u32 {
    crc32c::crc32c(&std::fs::read(p).expect("read"))
}

#[test]
fn nv_cache_refusals_exit_2_and_leave_it_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("r.sock");
    let base = args(dir.path(), &sock, "1M");
    let with = |ftl: &str, nv: Option<&str>| {
        let mut a = base.clone();
        if let Some(nv) = nv {
            a[7] = nv.to_string();
        }
        a[9] = ftl.to_string();
        a
    };
    // Missing bdev.
    let (code, err) = run_err(&with("driver=ftl,name=f0,base=o0,wbuf=256K,lba-rsvd=30,nv-cache=nope", None));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nv-cache=nope"), "{err}");
    // Too small for twice the write buffer.
    let small = format!("driver=file,name=nv,path={},size=256K", dir.path().join("small.img").display());
    let (code, err) =
        run_err(&with("driver=ftl,name=f0,base=o0,wbuf=256K,lba-rsvd=30,nv-cache=nv", Some(&small)));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nv-cache") && err.contains("too small"), "{err}");
    // Claimed: a second FTL (other PUs of the same media) naming the same nv-cache.
    let mut a = with("driver=ftl,name=f0,base=o0,punits=0-1,wbuf=256K,lba-rsvd=30,nv-cache=nv", None);
    a.splice(
        10..10,
        [
            "--bdev".to_string(),
            "driver=ftl,name=f1,base=o0,punits=2-3,wbuf=256K,lba-rsvd=30,nv-cache=nv".into(),
        ],
    );
    let (code, err) = run_err(&a);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nv-cache=nv") && err.contains("claimed"), "{err}");
    // Format it with a clean run, then corrupt both superblock copies: refused, file unchanged.
    // (The claimed run formatted media and nv-cache for f0 on PUs 0-1: start from scratch.)
    let nv = dir.path().join("nv.img");
    let _ = std::fs::remove_file(dir.path().join("media.img"));
    let _ = std::fs::remove_file(&nv);
    let mut d = common::Daemon::start(&base, &sock);
    assert!(d.stop().success());
    let mut bytes = std::fs::read(&nv).expect("read nv");
    for b in bytes[..2 * BS].iter_mut() {
        *b ^= 0x5a;
    }
    std::fs::write(&nv, &bytes).expect("write nv");
    let before = sum(&nv);
    let (code, err) = run_err(&base);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nv-cache") && err.contains("both superblock copies are unusable"), "{err}");
    assert_eq!(sum(&nv), before, "the corrupt nv-cache was modified");
}
