//! Per-bdev QoS (SPEC §2): limits on IOPS and on bandwidth, enforced across every channel of the bdev
//! in 1 ms timeslices.
//!
//! ```text
//!  Channel::submit ─► Qos::try_admit(bytes) ─ yes ─► split / module
//!                           │ no (quota of this slice used up)
//!                           ▼
//!                     channel's parked queue (FIFO) ─► retried from Channel::poll at the next slice
//! ```
//!
//! # Design
//! * One [`Qos`] per registered bdev, shared by all its channels through an `Arc`; every counter is an
//!   atomic, so admission costs a few atomic operations and never takes a lock or crosses threads.
//! * Each slice has a budget of `limit / 1000` (IOPS) and `limit / 1000` bytes (bandwidth). An I/O is
//!   admitted while the remaining budget of every enabled limit is positive, and then charged in full,
//!   so the remainder may go negative (SPDK's overdraft). At a slice boundary the first channel that
//!   notices installs the new budget: unused quota is dropped, an overdraft carries over.
//! * What counts: every read, write, unmap and write_zeroes counts one I/O; reads and writes count their
//!   bytes toward the bandwidth limit. Flush and reset are never held back.
//! * Limits change at run time ([`Qos::set`]); minimums are 10,000 IOPS and 10 MiB/s, in multiples of
//!   those ([`QosLimits::validate`]); 0 means unlimited.
//!
//! # Limitations
//! Two channels may both pass the "remaining > 0" check in the same instant and both be charged: the
//! slice then ends in overdraft, which the next slice pays back, so the long-run rate holds.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Length of one QoS timeslice.
pub const TIMESLICE: Duration = Duration::from_millis(1);
/// Smallest IOPS limit, and the unit limits are set in.
pub const MIN_IOPS: u64 = 10_000;
/// Smallest bandwidth limit in bytes per second, and the unit limits are set in (10 MiB/s).
pub const MIN_BPS: u64 = 10 << 20;

/// The limits of one bdev (0 = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct QosLimits {
    /// I/O per second (read, write, unmap, write_zeroes together).
    pub iops: u64,
    /// Bytes per second (read and write together).
    pub bps: u64,
}

impl QosLimits {
    /// Checks the SPDK rules: each limit is 0 or a multiple of its minimum. The error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.iops % MIN_IOPS != 0 {
            return Err(format!("iops={} must be 0 (unlimited) or a multiple of {MIN_IOPS}", self.iops));
        }
        if self.bps % MIN_BPS != 0 {
            return Err(format!(
                "bps={} must be 0 (unlimited) or a multiple of {MIN_BPS} (10 MiB/s)",
                self.bps
            ));
        }
        Ok(())
    }

    /// True when neither limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.iops == 0 && self.bps == 0
    }
}

/// The shared token buckets of one bdev.
#[derive(Debug, Default)]
pub struct Qos {
    /// I/O budget per slice (0 = unlimited).
    ios_per_slice: AtomicI64,
    /// Byte budget per slice (0 = unlimited).
    bytes_per_slice: AtomicI64,
    remaining_ios: AtomicI64,
    remaining_bytes: AtomicI64,
    /// Index of the slice the remainders belong to.
    slice: AtomicU64,
    /// The configured limits (for reporting).
    iops: AtomicU64,
    bps: AtomicU64,
}

/// Process-wide time origin for slice numbers.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The slice number of `now`.
fn slice_of(now: Instant) -> u64 {
    let nanos = now.saturating_duration_since(epoch()).as_nanos() / TIMESLICE.as_nanos();
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

impl Qos {
    /// Installs new limits (validated by the caller); they apply from the next I/O on.
    pub fn set(&self, limits: QosLimits) {
        let per_slice = |limit: u64| i64::try_from(limit / 1000).unwrap_or(i64::MAX);
        self.iops.store(limits.iops, Ordering::Relaxed);
        self.bps.store(limits.bps, Ordering::Relaxed);
        self.ios_per_slice.store(per_slice(limits.iops), Ordering::Relaxed);
        self.bytes_per_slice.store(per_slice(limits.bps), Ordering::Relaxed);
        self.remaining_ios.store(per_slice(limits.iops), Ordering::Relaxed);
        self.remaining_bytes.store(per_slice(limits.bps), Ordering::Relaxed);
        self.slice.store(slice_of(Instant::now()), Ordering::Release);
    }

    /// The configured limits.
    pub fn limits(&self) -> QosLimits {
        QosLimits { iops: self.iops.load(Ordering::Relaxed), bps: self.bps.load(Ordering::Relaxed) }
    }

    /// True when any limit is set (one relaxed load pair: the unlimited fast path).
    #[inline]
    pub fn enabled(&self) -> bool {
        self.ios_per_slice.load(Ordering::Relaxed) != 0 || self.bytes_per_slice.load(Ordering::Relaxed) != 0
    }

    /// Starts a new slice when `now` is past the current one: unused quota is dropped, overdraft kept.
    fn refill(&self, now: Instant) {
        let current = slice_of(now);
        let seen = self.slice.load(Ordering::Acquire);
        if current <= seen {
            return;
        }
        if self.slice.compare_exchange(seen, current, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return; // Another channel refilled this slice.
        }
        let refill_one = |remaining: &AtomicI64, per_slice: i64| {
            if per_slice == 0 {
                return;
            }
            let old = remaining.load(Ordering::Relaxed);
            // Drop unused quota, keep the overdraft, add this slice's budget.
            remaining.store(old.min(0).saturating_add(per_slice), Ordering::Relaxed);
        };
        refill_one(&self.remaining_ios, self.ios_per_slice.load(Ordering::Relaxed));
        refill_one(&self.remaining_bytes, self.bytes_per_slice.load(Ordering::Relaxed));
    }

    /// Admits an I/O of `bytes` (charging it) or refuses it until a later slice.
    pub fn try_admit(&self, bytes: u64, now: Instant) -> bool {
        self.refill(now);
        let ios_limited = self.ios_per_slice.load(Ordering::Relaxed) != 0;
        let bytes_limited = self.bytes_per_slice.load(Ordering::Relaxed) != 0;
        if ios_limited && self.remaining_ios.load(Ordering::Relaxed) <= 0 {
            return false;
        }
        if bytes_limited && self.remaining_bytes.load(Ordering::Relaxed) <= 0 {
            return false;
        }
        if ios_limited {
            self.remaining_ios.fetch_sub(1, Ordering::Relaxed);
        }
        if bytes_limited {
            self.remaining_bytes.fetch_sub(i64::try_from(bytes).unwrap_or(i64::MAX), Ordering::Relaxed);
        }
        true
    }

    /// When the next slice starts (for a channel with parked I/O to sleep until).
    pub fn next_slice_start(&self, now: Instant) -> Instant {
        let next = slice_of(now).saturating_add(1);
        let nanos = u128::from(next) * TIMESLICE.as_nanos();
        epoch() + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_minimums() {
        assert!(QosLimits { iops: 0, bps: 0 }.validate().is_ok());
        assert!(QosLimits { iops: 20_000, bps: 30 << 20 }.validate().is_ok());
        let e = QosLimits { iops: 15_000, bps: 0 }.validate().unwrap_err();
        assert!(e.contains("iops=15000"), "{e}");
        let e = QosLimits { iops: 0, bps: 5 << 20 }.validate().unwrap_err();
        assert!(e.contains("bps="), "{e}");
    }

    #[test]
    fn a_slice_admits_its_budget_then_refuses() {
        let q = Qos::default();
        q.set(QosLimits { iops: 10_000, bps: 0 });
        let now = Instant::now();
        let start = q.next_slice_start(now);
        // 10,000 IOPS = 10 per 1 ms slice.
        let admitted = (0..100).filter(|_| q.try_admit(4096, start)).count();
        assert_eq!(admitted, 10);
        // The next slice admits 10 more; unused quota does not accumulate over idle slices.
        let later = start + TIMESLICE * 5;
        let admitted = (0..100).filter(|_| q.try_admit(4096, later)).count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn bandwidth_overdraft_carries_over() {
        let q = Qos::default();
        q.set(QosLimits { iops: 0, bps: 10 << 20 }); // 10485 bytes per slice
        let start = q.next_slice_start(Instant::now());
        // One 64 KiB I/O is admitted (budget positive) and overdraws ~6 slices.
        assert!(q.try_admit(64 << 10, start));
        assert!(!q.try_admit(4096, start));
        let mut t = start;
        let mut waited = 0;
        while !q.try_admit(4096, t) {
            t += TIMESLICE;
            waited += 1;
            assert!(waited < 100);
        }
        assert!((5..=7).contains(&waited), "waited {waited} slices");
    }

    #[test]
    fn unlimited_admits_everything() {
        let q = Qos::default();
        assert!(!q.enabled());
        let now = Instant::now();
        assert!((0..10_000).all(|_| q.try_admit(1 << 20, now)));
        q.set(QosLimits { iops: 10_000, bps: 0 });
        assert!(q.enabled());
        q.set(QosLimits::default());
        assert!(!q.enabled());
    }
}
