//! The cache bdev through the real daemon: hot-remove of its core via the control socket
//! (`bdev-remove force=true`), with a real frontend attached to the cache bdev's export.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{vblkd, Daemon};
use serde_json::Value;
use vblkd::client::BlkClient;

fn ctl(control: &Path, args: &[&str]) -> Output {
    vblkd().arg("ctl").arg("--control").arg(control).args(args).output().expect("run vblkd ctl")
}

fn ok(control: &Path, args: &[&str]) -> Value {
    let out = ctl(control, args);
    assert!(out.status.success(), "vblkd ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON result")
}

/// A daemon with a wb cache `d0` (malloc cache device `cd`, file core `core`) exported on `d0.sock`.
fn start(dir: &Path, extra: &[String]) -> (Daemon, PathBuf, PathBuf, PathBuf) {
    let sock = dir.join("d0.sock");
    let control = dir.join("c.ctl");
    let core = dir.join("core.img");
    let mut args: Vec<String> = [
        "--log-level",
        "info",
        "--control",
        &control.display().to_string(),
        "--bdev",
        &format!("driver=file,name=core,path={},size=16M", core.display()),
        "--bdev",
        "driver=malloc,name=cd,size=8M",
        "--bdev",
        "driver=cache,name=d0,cache=cd,core=core,mode=wb,cleaner=nop",
        "--export",
        &format!("bdev=d0,socket={},queues=1", sock.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    let d = Daemon::start(&args, &sock);
    (d, sock, control, core)
}

#[test]
fn removing_the_core_writes_back_and_removes_the_exported_cache_bdev() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut d, sock, control, core) = start(dir.path(), &[]);
    let mut c = BlkClient::connect(&sock, 1, 64, 1 << 20).expect("connect");
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 13 + 5) as u8).collect();
    c.mem()[..data.len()].copy_from_slice(&data);
    assert_eq!(c.sync(0, |c, u| c.write(0, 1 << 20, 0, data.len(), u)).expect("write"), 0);
    let s = ok(&control, &["cache-stats", "d0"]);
    assert!(s["dirty_lines"].as_u64().unwrap_or(0) >= 16, "write-back keeps the data dirty: {s}");

    // Without force a claimed core is refused, with the way out named.
    let out = ctl(&control, &["bdev-remove", "core"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("claimed by 'cache'") && err.contains("force=true"), "{err}");
    let out = ctl(&control, &["bdev-remove", "core", "force=maybe"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("force=maybe must be true or false"));

    ok(&control, &["bdev-remove", "core", "force=true"]);
    let names: Vec<String> = ok(&control, &["bdev-list"])
        .as_array()
        .expect("list")
        .iter()
        .map(|b| b["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, vec!["cd".to_string()], "the cache bdev went away with its core");
    // Every acknowledged write reached the core file before the cache bdev went away.
    let mut on_disk = vec![0u8; data.len()];
    std::fs::File::open(&core).expect("core").read_exact_at(&mut on_disk, 1 << 20).expect("read core");
    assert!(on_disk == data, "dirty data was not written back to the removed core");
    // The export sees its bdev gone: I/O fails, the daemon keeps answering.
    c.read(0, 1 << 20, 0, 4096, 7);
    let mut done = Vec::with_capacity(1);
    let r = c.wait(0, 1, &mut done, std::time::Duration::from_secs(5));
    assert!(r.is_err() || done.first().is_some_and(|x| x.ret < 0), "I/O on a removed cache bdev must fail");
    drop(c);
    ok(&control, &["export-remove", "d0"]);
    ok(&control, &["bdev-remove", "cd"]);
    assert!(d.stop().success());
}
