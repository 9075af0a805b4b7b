//! Tests written against mutants that the other cache tests let through (issue 12): each one checks
//! a behaviour a mutant of the named function changes.
//!
//! ```text
//!  HoldBdev cache device / malloc core ─► CacheBdev ─► Channel ◄── test (+ crate::testlog for log records)
//! ```
//!
//! # Design
//! Child module of `cache::tests`: it uses that module's helpers (devices, configs, `read`/`write`).

use super::*;

/// A write whose cache-device write fails logs "write to a dirty line failed" only when its line
/// held dirty sectors there (dirty data is lost): not for a clean line (`CacheChannel::finalize`).
#[test]
fn a_failed_write_is_logged_as_lost_dirty_data_only_on_a_dirty_line() {
    let lost = |logs: &[String]| logs.iter().filter(|l| l.contains("write to a dirty line failed")).count();
    let fail_data_writes = |cctl: &Arc<std::sync::Mutex<HoldCtl>>, bdev: &CacheBdev| {
        let mut h = lock(cctl);
        h.range = Some(bdev.shared().data_offset / BS..cache_dev_bytes(64, 4096) / BS);
        h.allow = usize::MAX;
        h.fail_writes = true;
    };
    // Write-through: line 0 cached, clean.
    {
        let (reg, cctl) = held_cdev_setup();
        let mut c = cfg(Mode::Wt);
        c.seq_cutoff = SeqCutoff::Off;
        let (bdev, _desc, mut ch) = open_cache(&reg, &c);
        write(&mut ch, 0, &fill(1, 4096));
        fail_data_writes(&cctl, &bdev);
        let (r, logs) = crate::testlog::capture(|| {
            run(&mut ch, vec![BdevIo::write(0, 8, IoVecs::from_slice(&fill(2, 4096)), 1)])
        });
        assert_eq!(r[&1], Err(crate::bdev::IoError::Errno(libc::EIO)));
        assert_eq!(lost(&logs), 0, "a failed write to a clean line loses no dirty data: {logs:?}");
    }
    // Write-back: line 0 dirty (all of it, and a write over all of it).
    {
        let (reg, cctl) = held_cdev_setup();
        let c = wb_records_on_demand();
        let (bdev, _desc, mut ch) = open_cache(&reg, &c);
        write(&mut ch, 0, &fill(1, 4096));
        fail_data_writes(&cctl, &bdev);
        let (r, logs) = crate::testlog::capture(|| {
            run(&mut ch, vec![BdevIo::write(0, 8, IoVecs::from_slice(&fill(2, 4096)), 1)])
        });
        assert_eq!(r[&1], Err(crate::bdev::IoError::Errno(libc::EIO)));
        assert_eq!(lost(&logs), 1, "the lost dirty line is logged once: {logs:?}");
        assert!(logs
            .iter()
            .any(|l| l.starts_with("ERROR: cache: write to a dirty line failed: core id 0 line 0")));
    }
}

/// Every mode and cleaner policy has its flag spelling, parses back from it, and survives the
/// atomic's round trip; only 4–64 KiB powers of two are line sizes.
#[test]
fn mode_and_policy_spellings_and_line_sizes() {
    let spellings: Vec<&str> = Mode::ALL.iter().map(|m| m.as_str()).collect();
    assert_eq!(spellings, ["wt", "wb", "wa", "pt", "wi", "wo"]);
    for m in Mode::ALL {
        assert_eq!(Mode::parse(m.as_str()), Some(m));
        assert_eq!(Mode::from_u8(m.to_u8()), m);
    }
    assert_eq!(Mode::parse("xx"), None);
    assert_eq!(Mode::from_u8(200), Mode::Pt, "an unknown value is pass-through");
    let policies = [CleanerPolicy::Alru, CleanerPolicy::Acp, CleanerPolicy::Nop].map(|p| p.as_str());
    assert_eq!(policies, ["alru", "acp", "nop"]);
    for (b, ok) in [
        (4096, true),
        (8192, true),
        (65536, true),
        (2048, false),
        (131072, false),
        (12288, false),
        (0, false),
    ] {
        assert_eq!(valid_line_size(b), ok, "{b}");
    }
}
