//! The rbd bdev with the real binary, a real frontend (libblkio) and a real one-node Ceph cluster:
//! data flushed before a `kill -9` survives; an unreachable cluster turns into I/O errors, never a hung
//! daemon, and I/O recovers when the cluster is back; flag errors name the option.

mod common;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{vblkd, Daemon};
use vblkd::client::BlkClient;

/// The tests here pause the shared cluster: one at a time.
static CLUSTER: Mutex<()> = Mutex::new(());

fn start(dir: &Path, bdev: &str) -> (Daemon, std::path::PathBuf) {
    let sock = dir.join("r.sock");
    let args: Vec<String> = vec![
        "--log-level".into(),
        "warn".into(),
        "--control".into(),
        dir.join("c.ctl").display().to_string(),
        "--bdev".into(),
        bdev.into(),
        "--export".into(),
        format!("bdev=d0,socket={},queues=1", sock.display()),
    ];
    let d = Daemon::start(&args, &sock);
    (d, sock)
}

fn block(seed: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37)) as u8).collect()
}

/// Rounds of: check every block written in earlier rounds, write 16 new blocks, flush, `kill -9`.
fn kill9_rounds(args: &[String], sock: &Path, rounds: u64) {
    for round in 0..rounds {
        let mut d = Daemon::start(args, sock);
        let mut c = BlkClient::connect(sock, 1, 64, 1 << 20).expect("connect");
        for r in 0..round {
            for i in 0..16u64 {
                let off = (r * 16 + i) * 4096;
                assert_eq!(c.sync(0, |c, u| c.read(0, off, 0, 4096, u)).expect("read"), 0);
                assert!(c.mem()[..4096] == block(r * 100 + i)[..], "round {r} block {i} lost after kill -9");
            }
        }
        for i in 0..16u64 {
            c.mem()[..4096].copy_from_slice(&block(round * 100 + i));
            let off = (round * 16 + i) * 4096;
            assert_eq!(c.sync(0, |c, u| c.write(0, off, 0, 4096, u)).expect("write"), 0);
        }
        assert_eq!(c.sync(0, |c, u| c.flush(0, u)).expect("flush"), 0);
        let mut child = d.child.take().expect("child");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        drop(c);
    }
}

#[test]
fn flushed_writes_survive_kill_9() {
    let _g = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    // librbd's write-back cache on from the first write (and slow to write back by itself), so only
    // vblkd's flush makes the data durable: a flush that did not reach librbd loses it below.
    let conf = dir.path().join("ceph.conf");
    let mut text = std::fs::read_to_string(common::ceph_conf()).expect("cluster conf");
    text.push_str("[client]\nrbd cache = true\nrbd cache writethrough until flush = false\nrbd cache policy = writeback\n");
    std::fs::write(&conf, text).expect("client conf");
    let bdev = format!(
        "driver=rbd,name=d0,pool=rbd,image=kill9-{},conf={},create=32M,timeout=10",
        std::process::id(),
        conf.display()
    );
    let sock = dir.path().join("r.sock");
    let args: Vec<String> = vec![
        "--log-level".into(),
        "warn".into(),
        "--control".into(),
        "none".into(),
        "--bdev".into(),
        bdev,
        "--export".into(),
        format!("bdev=d0,socket={},queues=1", sock.display()),
    ];
    kill9_rounds(&args, &sock, 3);
}

#[test]
fn an_unreachable_cluster_gives_io_errors_not_a_hang_and_io_recovers() {
    let _g = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = common::ceph_conf();
    let bdev = format!(
        "driver=rbd,name=d0,pool=rbd,image=pause-{},conf={},create=16M,timeout=3",
        std::process::id(),
        conf.display()
    );
    let (mut d, sock) = start(dir.path(), &bdev);
    let mut c = BlkClient::connect(&sock, 1, 64, 1 << 20).expect("connect");
    c.mem()[..4096].copy_from_slice(&block(1));
    assert_eq!(c.sync(0, |c, u| c.write(0, 0, 0, 4096, u)).expect("write"), 0);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ceph-cluster.sh");
    let run = |what: &str| {
        let st = std::process::Command::new("bash").args([script, what]).status().expect("run script");
        assert!(st.success(), "ceph-cluster.sh {what}");
    };
    run("pause");
    struct Resume<'a>(&'a dyn Fn(&str));
    impl Drop for Resume<'_> {
        fn drop(&mut self) {
            (self.0)("resume");
        }
    }
    let resume = Resume(&run);
    let t = Instant::now();
    c.mem()[..4096].copy_from_slice(&block(2));
    c.write(0, 4096, 0, 4096, 7);
    // While the request waits on the cluster, the daemon itself keeps answering.
    let out = vblkd()
        .args(["ctl", "--control"])
        .arg(dir.path().join("c.ctl"))
        .arg("bdev-list")
        .output()
        .expect("ctl");
    assert!(out.status.success(), "the control socket must answer while the cluster is away");
    let mut done = Vec::with_capacity(1);
    let n = c.wait(0, 1, &mut done, Duration::from_secs(60)).expect("do_io");
    assert_eq!(n, 1, "the request hung for 60 s with the cluster away");
    assert!(done[0].ret < 0, "a write to an unreachable cluster must fail, got {}", done[0].ret);
    assert!(t.elapsed() < Duration::from_secs(45), "failing took {:?}", t.elapsed());
    drop(resume);

    // Back: I/O works again (allow the client session a few seconds to reconnect).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        c.mem()[..4096].copy_from_slice(&block(3));
        if c.sync(0, |c, u| c.write(0, 8192, 0, 4096, u)).expect("write") == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "I/O did not recover after the cluster came back");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(c.sync(0, |c, u| c.read(0, 0, 0, 4096, u)).expect("read"), 0);
    assert!(c.mem()[..4096] == block(1)[..], "data written before the outage");
    drop(c);
    assert!(d.stop().success(), "graceful stop after an outage");
}

#[test]
fn bad_rbd_flags_name_the_option() {
    let _g = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = common::ceph_conf();
    let sock = dir.path().join("x.sock");
    let cases = [
        (
            format!(
                "driver=rbd,name=d0,pool=rbd,image=missing-{},conf={}",
                std::process::id(),
                conf.display()
            ),
            "does not exist (create=SIZE makes it)",
        ),
        (
            format!("driver=rbd,name=d0,pool=nopool,image=x,conf={}", conf.display()),
            "pool 'nopool' does not exist",
        ),
        ("driver=rbd,name=d0,image=x".to_string(), "missing required key 'pool'"),
        ("driver=rbd,name=d0,pool=rbd,image=a/b".to_string(), "image='a/b'"),
        ("driver=rbd,name=d0,pool=rbd,image=x,timeout=0".to_string(), "timeout=0"),
        ("driver=rbd,name=d0,pool=rbd,image=x,create=1000".to_string(), "not a multiple of the block size"),
    ];
    for (bdev, want) in cases {
        let out = vblkd()
            .args(["--control", "none", "--bdev", &bdev, "--export"])
            .arg(format!("bdev=d0,socket={}", sock.display()))
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bdev} must be refused");
        assert!(err.contains(want) && err.contains("--bdev"), "{bdev}: '{err}' lacks '{want}'");
    }
}

/// The cache in front of the network image: write-back on a local file, core on rbd. Data flushed
/// before a `kill -9` reads back after the restart (loaded from the cache device or cleaned to rbd).
#[test]
fn cache_wb_over_rbd_keeps_flushed_data_across_kill_9() {
    let _g = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("r.sock");
    let args: Vec<String> = vec![
        "--log-level".into(),
        "warn".into(),
        "--control".into(),
        "none".into(),
        "--bdev".into(),
        common::rbd_bdev("core", "cache-core", "32M"),
        "--bdev".into(),
        format!("driver=file,name=cd,path={},size=16M", dir.path().join("cache.img").display()),
        "--bdev".into(),
        "driver=cache,name=d0,cache=cd,core=core,mode=wb".into(),
        "--export".into(),
        format!("bdev=d0,socket={},queues=1", sock.display()),
    ];
    kill9_rounds(&args, &sock, 2);
}
