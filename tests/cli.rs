//! The command line as a user meets it: bad flags, the default disk, SIGTERM and stale sockets.

mod common;

use std::os::unix::net::UnixListener;
use std::process::Stdio;

use common::{vblkd, Daemon};

fn run_err(args: &[&str]) -> (i32, String) {
    let out = vblkd().args(args).stdin(Stdio::null()).output().expect("run vblkd");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_flags_name_the_flag_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().expect("utf8");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--bdev".into(), "driver=nope,name=a,size=1M".into()], "unknown driver 'nope'"),
        (
            vec![
                "--bdev".into(),
                "driver=malloc,name=a,size=1M".into(),
                "--bdev".into(),
                "driver=malloc,name=a,size=1M".into(),
                "--export".into(),
                format!("bdev=a,socket={sock}"),
            ],
            "duplicate bdev name 'a'",
        ),
        (
            vec![
                "--bdev".into(),
                "driver=malloc,name=a,size=1M".into(),
                "--export".into(),
                format!("bdev=b,socket={sock}"),
            ],
            "no bdev named 'b'",
        ),
        (
            vec![
                "--bdev".into(),
                "driver=malloc,name=a,size=1000".into(),
                "--export".into(),
                format!("bdev=a,socket={sock}"),
            ],
            "not a multiple of the block size",
        ),
    ];
    for (args, want) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = run_err(&refs);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want) && err.contains("--"), "{args:?}: stderr '{err}' lacks '{want}'");
    }
    assert!(!std::path::Path::new(sock).exists(), "nothing may be served on a bad command line");
}

#[test]
fn socket_in_use_by_a_live_daemon_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("busy.sock");
    let _live = UnixListener::bind(&sock).expect("bind");
    let (code, err) = run_err(&[
        "--bdev",
        "driver=malloc,name=a,size=1M",
        "--export",
        &format!("bdev=a,socket={}", sock.display()),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("in use by a running daemon") && err.contains("--export"), "{err}");
}

#[test]
fn stale_socket_is_replaced_and_sigterm_exits_0_without_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("stale.sock");
    drop(UnixListener::bind(&sock).expect("bind")); // leaves a socket file nobody accepts on
    assert!(sock.exists());
    let args = vec![
        "--bdev".to_string(),
        "driver=malloc,name=m0,size=16M".to_string(),
        "--export".to_string(),
        format!("bdev=m0,socket={},queues=1", sock.display()),
    ];
    let mut d = Daemon::start(&args, &sock);
    let st = d.stop();
    assert!(st.success(), "exit status {st}");
    assert!(!sock.exists(), "socket must be removed on SIGTERM");
}

#[test]
fn no_arguments_serve_an_ftl_disk_in_the_data_dir_and_restore_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let sock = data.join("vblkd.sock");
    let args = vec!["--data-dir".to_string(), data.display().to_string()];
    let mut d = Daemon::start(&args, &sock);
    let img = data.join("media0.img");
    assert!(img.exists(), "default media image");
    let mut c = vblkd::client::BlkClient::connect(&sock, 1, 64, 1 << 20).expect("connect");
    assert_eq!(c.get_u64("capacity").expect("capacity"), 1 << 30, "1 GiB exposed");
    c.mem()[..8192].fill(0xa5);
    assert_eq!(c.sync(0, |c, u| c.write(0, 1 << 20, 0, 8192, u)).expect("write"), 0);
    drop(c);
    assert!(d.stop().success());
    assert!(!sock.exists());
    // Sparse: the data directory stays small.
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&img).expect("stat")) * 512;
    assert!(used < 64 << 20, "image uses {used} bytes on disk");
    // The next start restores the same disk.
    let mut d = Daemon::start(&args, &sock);
    let mut c = vblkd::client::BlkClient::connect(&sock, 1, 64, 1 << 20).expect("connect");
    assert_eq!(c.sync(0, |c, u| c.read(0, 1 << 20, 4096, 8192, u)).expect("read"), 0);
    assert!(c.mem()[4096..4096 + 8192].iter().all(|b| *b == 0xa5), "data lost across restart");
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn ftl_flags_are_validated_by_the_binary_and_ftl_info_reads_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("m.img");
    let media = format!(
        "driver=ocssd-emu,name=o0,path={},create=on,groups=2,pus=2,chunks=16,chunk-blocks=64",
        img.display()
    );
    let sock = dir.path().join("f.sock");
    let export = format!("bdev=f0,socket={}", sock.display());
    for (ftl, want) in [
        ("driver=ftl,name=f0,base=o0,lba-rsvd=0", "lba-rsvd"),
        ("driver=ftl,name=f0,base=o0,invalid-thld=100", "invalid-thld"),
        ("driver=ftl,name=f0,base=o0,wbuf=1000", "wbuf"),
        ("driver=ftl,name=f0,base=nope", "base=nope"),
        ("driver=ftl,name=f0,base=o0,punits=0-9", "punits"),
        ("driver=ftl,name=f0,base=o0,nv-cache=m", "nv-cache"),
        ("driver=ftl,name=f0,base=o0,mode=restore", "mode=restore"),
    ] {
        let (code, err) = run_err(&["--bdev", &media, "--bdev", ftl, "--export", &export]);
        assert_ne!(code, 0, "{ftl}");
        assert!(err.contains(want), "{ftl}: '{err}' lacks '{want}'");
    }
    // Create it, then refuse mode=create without force, and read it with `ftl info`.
    let args: Vec<String> = [
        "--log-level",
        "warn",
        "--bdev",
        &media,
        "--bdev",
        "driver=ftl,name=f0,base=o0",
        "--export",
        &export,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut d = Daemon::start(&args, &sock);
    assert!(d.stop().success());
    let (code, err) =
        run_err(&["--bdev", &media, "--bdev", "driver=ftl,name=f0,base=o0,mode=create", "--export", &export]);
    assert_ne!(code, 0);
    assert!(err.contains("force=on"), "{err}");
    // An existing image is never reformatted: geometry keys that disagree are refused.
    let other = format!(
        "driver=ocssd-emu,name=o0,path={},create=on,groups=2,pus=2,chunks=8,chunk-blocks=64",
        img.display()
    );
    let (code, err) =
        run_err(&["--bdev", &other, "--bdev", "driver=ftl,name=f0,base=o0", "--export", &export]);
    assert_ne!(code, 0);
    assert!(err.contains("chunks=8") && err.contains("never reformatted"), "{err}");
    let before = std::fs::read(&img).expect("image");
    let out = vblkd().args(["ftl", "info", "--media"]).arg(&img).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["superblock"]["clean"], true, "{v}");
    assert!(v["bands"].as_array().is_some_and(|b| b.len() == 16), "{v}");
    assert!(v["statistics"]["num_lbas"].as_u64().unwrap_or(0) > 0);
    assert!(std::fs::read(&img).expect("image") == before, "ftl info modified the image");
    let (code, err) = run_err(&["ftl", "info", "--media", img.to_str().expect("utf8"), "--punits", "0-1"]);
    assert_ne!(code, 0);
    assert!(err.contains("punits"), "{err}");
}

#[test]
fn media_create_and_info_through_the_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("m.img");
    let img = img.to_str().expect("utf8");
    let out = vblkd()
        .args([
            "media",
            "create",
            "--path",
            img,
            "--groups",
            "2",
            "--pus",
            "2",
            "--chunks",
            "4",
            "--chunk-blocks",
            "16",
        ])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = vblkd().args(["media", "info", "--path", img]).output().expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["geometry"]["num_grp"].as_u64().or(v["num_grp"].as_u64()), Some(2), "{v}");
    let (code, err) = run_err(&[
        "media",
        "create",
        "--path",
        img,
        "--groups",
        "0",
        "--pus",
        "1",
        "--chunks",
        "1",
        "--chunk-blocks",
        "8",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--groups"), "{err}");
}

#[test]
fn sigusr1_prints_statistics_as_json() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("st.sock");
    let mut child = vblkd()
        .args(["--log-level", "warn", "--bdev", "driver=malloc,name=m0,size=8M", "--export"])
        .arg(format!("bdev=m0,socket={},queues=1", sock.display()))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    common::wait_for_socket(&sock, &mut child);
    let mut c = vblkd::client::BlkClient::connect(&sock, 1, 64, 1 << 20).expect("connect");
    assert_eq!(c.sync(0, |c, u| c.write(0, 0, 0, 8192, u)).expect("write"), 0);
    drop(c);
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGUSR1);
    }
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let stats = loop {
        let line = lines.next().expect("a stats line").expect("read");
        if line.starts_with('{') {
            break line;
        }
    };
    let v: serde_json::Value = serde_json::from_str(&stats).expect("json");
    assert_eq!(v["m0"]["write_ops"].as_u64(), Some(1), "{v}");
    assert_eq!(v["m0"]["write_bytes"].as_u64(), Some(8192), "{v}");
    // SAFETY: as above.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert!(child.wait().expect("wait").success());
}
