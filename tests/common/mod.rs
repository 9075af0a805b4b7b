//! Shared helpers for tests that run the real `vblkd` binary.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `vblkd` process; SIGTERMed on drop if still running.
pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
}

pub fn vblkd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vblkd"))
}

/// Waits until something accepts on `socket`.
pub fn wait_for_socket(socket: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if UnixStream::connect(socket).is_ok() {
            // That probe connection is closed at once; the daemon goes back to listening.
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("vblkd exited early with {status}");
        }
        assert!(Instant::now() < deadline, "vblkd did not listen on {} within 30 s", socket.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Daemon {
    /// Starts `vblkd ARGS...` and waits for `socket`.
    pub fn start(args: &[String], socket: &Path) -> Self {
        let mut child =
            vblkd().args(args).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("spawn vblkd");
        wait_for_socket(socket, &mut child);
        Self { child: Some(child), socket: socket.to_path_buf() }
    }

    /// Sends SIGTERM and returns the exit status (must come within 30 s).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("vblkd did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The machine's one-node Ceph test cluster (started by `scripts/ceph-cluster.sh` unless it already
/// answers); returns its ceph.conf path.
pub fn ceph_conf() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ceph-cluster.sh");
    let out = Command::new("bash").args([script, "start"]).output().expect("run ceph-cluster.sh");
    assert!(out.status.success(), "ceph-cluster.sh start failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A `--bdev` value for a fresh rbd image of `size` in the test cluster, named after `tag` and this process.
pub fn rbd_bdev(name: &str, tag: &str, size: &str) -> String {
    format!(
        "driver=rbd,name={name},pool=rbd,image={tag}-{},conf={},create={size},timeout=10",
        std::process::id(),
        ceph_conf().display()
    )
}
pub mod crash;
pub mod vring;
