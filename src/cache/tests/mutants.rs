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
