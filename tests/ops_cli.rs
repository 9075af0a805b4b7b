//! Operations through the binary: socket ownership flags and start-up exit statuses (issues 12, 13).
//!
//! # Design
//! Each test runs the real `vblkd` in a fresh temp dir. Socket ownership is checked on the socket file
//! the daemon created, on two consecutive starts (the settings must survive a restart, unlike a
//! one-off `chmod`), and while the daemon accepts (stat as soon as `connect` succeeds).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::process::Stdio;

use common::{vblkd, Daemon};

fn run_err(args: &[String]) -> (i32, String) {
    let out = vblkd().args(args).stdin(Stdio::null()).output().expect("run vblkd");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn export_args(sock: &std::path::Path, extra: &str) -> Vec<String> {
    vec![
        "--log-level".into(),
        "warn".into(),
        "--control".into(),
        "none".into(),
        "--bdev".into(),
        "driver=malloc,name=m0,size=4M".into(),
        "--export".into(),
        format!("bdev=m0,socket={},queues=1{extra}", sock.display()),
    ]
}

#[test]
fn socket_mode_and_group_apply_on_every_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("perm.sock");
    // A umask that would give 0755 as in the issue: the flag must win.
    let args = export_args(&sock, ",socket-mode=0660,socket-group=4321,socket-owner=1234");
    for start in 0..2 {
        let mut d = Daemon::start(&args, &sock);
        let meta = std::fs::metadata(&sock).expect("stat socket");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "start {start}: mode");
        assert_eq!(meta.gid(), 4321, "start {start}: group");
        assert_eq!(meta.uid(), 1234, "start {start}: owner");
        assert!(d.stop().success());
        assert!(!sock.exists());
    }
}

#[test]
fn socket_group_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("name.sock");
    // `root` exists everywhere; the default libvirt setup uses `kvm` (README), which may be absent here.
    let args = export_args(&sock, ",socket-mode=0600,socket-group=root,socket-owner=root");
    let mut d = Daemon::start(&args, &sock);
    let meta = std::fs::metadata(&sock).expect("stat socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    assert!(d.stop().success());
}

#[test]
fn bad_socket_options_name_the_flag_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("bad.sock");
    let cases = [
        (",socket-mode=0999", "socket-mode=0999 must be an octal mode"),
        (",socket-mode=rw-rw----", "socket-mode=rw-rw---- must be an octal mode"),
        (",socket-mode=01777", "socket-mode=01777 must be an octal mode"),
        (",socket-group=no-such-group-vblkd", "socket-group=no-such-group-vblkd: no such group"),
        (",socket-owner=no-such-user-vblkd", "socket-owner=no-such-user-vblkd: no such user"),
    ];
    for (extra, want) in cases {
        let (code, err) = run_err(&export_args(&sock, extra));
        assert_eq!(code, 2, "{extra}: {err}");
        assert!(err.contains("--export") && err.contains(want), "{extra}: stderr '{err}' lacks '{want}'");
        assert!(!sock.exists(), "{extra}: nothing may be served");
    }
}

/// Issue 12: every start-up error exits 2 (README), including the ones found only when the daemon
/// starts: a socket in use by a live daemon, a path that is not a socket, a file bdev that cannot be
/// opened, a socket whose directory does not exist.
#[test]
fn start_up_errors_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let busy = dir.path().join("busy.sock");
    let _live = UnixListener::bind(&busy).expect("bind");
    let not_sock = dir.path().join("plain-file");
    std::fs::write(&not_sock, b"x").expect("write");
    let no_dir = dir.path().join("no-such-dir/s.sock");
    let ok_sock = dir.path().join("ok.sock");
    let missing_img = dir.path().join("no-such-dir/disk.img");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (export_args(&busy, ""), "in use by a running daemon"),
        (export_args(&not_sock, ""), "is not a socket"),
        (export_args(&no_dir, ""), "bind"),
        (
            vec![
                "--control".into(),
                "none".into(),
                "--bdev".into(),
                format!("driver=file,name=f0,path={}", missing_img.display()),
                "--export".into(),
                format!("bdev=f0,socket={}", ok_sock.display()),
            ],
            "--bdev name=f0",
        ),
    ];
    for (args, want) in cases {
        let (code, err) = run_err(&args);
        assert_eq!(code, 2, "{args:?}: exit {code}, stderr: {err}");
        assert!(err.contains(want) && err.contains("--"), "{args:?}: stderr '{err}' lacks '{want}'");
    }
    assert!(!ok_sock.exists(), "a failed start must not leave a socket behind");
}
