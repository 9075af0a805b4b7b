//! The systemd unit in `contrib/` (issue 13): `systemd-analyze verify` accepts it without a warning,
//! and the example `/etc/vblkd/NAME.conf` holds flags vblkd accepts.
//!
//! # Design
//! `systemd-analyze verify` needs the `ExecStart=` binary to exist, so the unit is copied into a temp
//! dir with `/usr/bin/vblkd` replaced by the binary under test. It exits 0 even on an unknown
//! directive or a bad value (it only warns), so the test also requires it to print nothing.
//! The `systemd` package provides the tool (`qemu/deps.sh` installs it); a missing tool fails.

use std::path::PathBuf;
use std::process::Command;

use clap::Parser;

fn contrib(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("contrib").join(name)
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(contrib("vblkd@.service")).expect("read contrib/vblkd@.service");
    assert!(
        unit.contains("ExecStart=/usr/bin/vblkd $VBLKD_ARGS"),
        "unit must run /usr/bin/vblkd $VBLKD_ARGS"
    );
    assert!(unit.contains("EnvironmentFile=/etc/vblkd/%i.conf"));
    assert!(unit.contains("KillSignal=SIGTERM"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vblkd@.service");
    std::fs::write(&path, unit.replace("/usr/bin/vblkd", env!("CARGO_BIN_EXE_vblkd"))).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze (package systemd; run qemu/deps.sh)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "systemd-analyze verify failed: {text}");
    assert!(text.trim().is_empty(), "systemd-analyze verify warned: {text}");
}

#[test]
fn example_conf_holds_valid_flags() {
    let conf = std::fs::read_to_string(contrib("example.conf")).expect("read contrib/example.conf");
    let line = conf.lines().find_map(|l| l.strip_prefix("VBLKD_ARGS=")).expect("a VBLKD_ARGS= line");
    let args: Vec<&str> = line.trim_matches('"').split_whitespace().collect();
    let parsed = vblkd::cli::Args::try_parse_from(std::iter::once("vblkd").chain(args.iter().copied()))
        .expect("clap accepts example.conf");
    let config = vblkd::cli::build_config(&parsed).expect("example.conf flags must be valid");
    let ex = &config.exports[0];
    assert_eq!(ex.socket_perms.mode, Some(0o660));
    assert!(ex.socket_perms.group.is_some());
    assert!(ex.socket.starts_with("/run/vblkd/"), "socket in the unit's RuntimeDirectory");
}
