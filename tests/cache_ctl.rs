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

#[test]
fn cache_info_takes_a_bdev_name_of_the_running_daemon_or_a_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut d, sock, control, _core) = start(dir.path(), &[]);
    let mut c = BlkClient::connect(&sock, 1, 64, 1 << 20).expect("connect");
    for i in 0..4u64 {
        assert_eq!(c.sync(0, |c, u| c.write(0, i * 4096, 0, 4096, u)).expect("write"), 0);
    }
    assert_eq!(c.sync(0, |c, u| c.read(0, 0, 0, 4096, u)).expect("read"), 0);
    let info = |args: &[&str]| {
        let out =
            vblkd().args(["cache", "info"]).args(args).arg("--control").arg(&control).output().expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = info(&["--cache", "d0"]);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["mode"], "wb", "{v}");
    assert_eq!(v["write_misses"], 4, "{v}");
    assert_eq!(v["read_hits"], 1, "{v}");
    assert_eq!(v["dirty_lines"], 4, "{v}");
    let sc = &v["shared_cache"];
    assert_eq!(sc["line_size"], 4096, "{v}");
    assert!(
        sc["num_lines"].as_u64().unwrap_or(0) > 1000 && sc["uuid"].as_str().is_some_and(|u| u.len() == 32),
        "{v}"
    );
    assert_eq!(sc["cores"], serde_json::json!(["d0"]), "{v}");
    // Unknown name, a bdev that is not a cache, no daemon: clear errors naming the flag.
    let (code, _, err) = info(&["--cache", "nosuch"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--cache nosuch") && err.contains("no bdev of that name"), "{err}");
    let (code, _, err) = info(&["--cache", "cd"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("is a malloc bdev, not cache"), "{err}");
    let out = vblkd()
        .args(["cache", "info", "--cache", "d0", "--control"])
        .arg(dir.path().join("none.ctl"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("--cache d0") && err.contains("no running daemon"), "{err}");
    drop(c);
    assert!(d.stop().success());
    // A path is read directly (a file cache device after a clean stop).
    let img = dir.path().join("cache.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).expect("image");
    let extra = ["--bdev".to_string(), format!("driver=file,name=cf,path={}", img.display())];
    let sock2 = dir.path().join("d1.sock");
    let control2 = dir.path().join("c2.ctl");
    let core2 = dir.path().join("core2.img");
    let args: Vec<String> = [
        "--control".to_string(),
        control2.display().to_string(),
        "--bdev".into(),
        format!("driver=file,name=core2,path={},size=16M", core2.display()),
    ]
    .into_iter()
    .chain(extra)
    .chain([
        "--bdev".into(),
        "driver=cache,name=d1,cache=cf,core=core2,mode=wt".into(),
        "--export".into(),
        format!("bdev=d1,socket={}", sock2.display()),
    ])
    .collect();
    let mut d2 = Daemon::start(&args, &sock2);
    assert!(d2.stop().success());
    let before = std::fs::read(&img).expect("image");
    let (code, out, err) = info(&["--cache", img.to_str().expect("utf8")]);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["clean_shutdown"], true, "{v}");
    assert_eq!(v["cores"][0]["cache_bdev"], "d1", "{v}");
    assert!(std::fs::read(&img).expect("image") == before, "cache info never modifies the device");
    let (code, _, err) = info(&["--cache", "./missing.img"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--cache ./missing.img"), "{err}");
}
