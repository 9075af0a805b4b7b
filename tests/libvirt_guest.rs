//! A libvirt guest on vblkd (issue 13): libvirt's default non-root QEMU user, the README's domain XML,
//! a write/read/compare loop in the guest, and two vblkd restarts in the middle of it.
//!
//! ```text
//!  qemu/libvirt-guest.sh (private mount namespace, all state in one temp dir)
//!    vblkd (file bdev, socket-group=libvirt-qemu, socket-mode=0660)
//!    virtlogd -d, libvirtd -d ─► virsh define + start (TCG, memfd, vhostuser disk, reconnect 1 s)
//!    guest: 30 × (4 MiB random write + fsync, O_DIRECT read back, compare)
//!    host: SIGTERM + restart vblkd after rounds 10 and 20 ─► guest must see no error
//! ```
//!
//! # Design
//! The orchestration is a shell script (libvirt daemons, namespaces and virsh are shell tools); this
//! test runs it and checks its verdict and its figures. Nothing is skipped: missing packages fail
//! the script (`qemu/deps.sh` installs them).

use std::process::Command;

#[test]
fn libvirt_guest_survives_vblkd_restarts() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/qemu/libvirt-guest.sh");
    let out = Command::new(script)
        .args(["--vblkd", env!("CARGO_BIN_EXE_vblkd"), "--rounds", "30", "--restarts", "2"])
        .output()
        .expect("run qemu/libvirt-guest.sh");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{log}");
    assert!(out.status.success(), "libvirt guest run failed ({})", out.status);
    assert!(log.contains("QEMU runs as libvirt-qemu"), "QEMU must run as libvirt's default user");
    assert!(log.contains("srw-rw---- root:libvirt-qemu"), "socket mode/group as configured");
    assert_eq!(log.matches("restart ").count(), 2, "two restarts in the middle of the loop");
    assert!(log.contains("VBLKD-GUEST-RESULT: PASS"));
    assert!(log.contains("30 write/read/compare rounds, no I/O error"));
}
