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
fn no_arguments_serve_a_file_disk_in_the_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let sock = data.join("vblkd.sock");
    let args = vec!["--data-dir".to_string(), data.display().to_string()];
    let mut d = Daemon::start(&args, &sock);
    let img = std::fs::metadata(data.join("disk0.img")).expect("default image");
    assert_eq!(img.len(), 1 << 30);
    assert!(d.stop().success());
    assert!(!sock.exists());
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
