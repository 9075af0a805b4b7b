//! Per-bdev I/O statistics (SPEC §2 "Statistics").
//!
//! ```text
//!  Channel (per thread) ──completion──► its own plain counters (BdevStatsSnapshot)
//!                                  └──► its shard of the bdev's counters (StatsShard, one writer)
//!  BdevStats (per bdev, outlives channels) = retired counts + Σ live shards
//!  Descriptor::stats() / Registry::stats_json() ──► BdevStatsSnapshot (serde)
//! ```
//!
//! # Design
//! Every parent I/O is counted once, at completion, by the generic channel: into its shard of the
//! bdev's counters and into the channel's own plain counters. A shard has one writer (the channel
//! that owns it), so a count is a relaxed load and store, never a locked read-modify-write: pollers
//! of one bdev on different CPUs do not pass its counters' cache lines back and forth (with shared
//! atomics every request cost about seven locked instructions per bdev layer, and a stacked module
//! pays for two layers). Readers add the live shards to the counts of channels already gone, which
//! a channel folds into the bdev's `retired` counters when it drops (under the same lock as readers,
//! so nothing is counted twice or missed).
//!
//! Besides the counters, the bdev keeps a read/write latency histogram (power-of-two buckets from
//! 1 µs) and submitted/completed counts whose difference is the queue depth, for the metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Counters of one bdev: the live channels' shards and what channels already gone counted.
#[derive(Debug, Default)]
pub struct BdevStats {
    /// Shards of the live channels.
    shards: Mutex<Vec<Arc<StatsShard>>>,
    /// Counts folded in from dropped channels.
    retired: StatsShard,
}

/// One channel's part of a bdev's counters: written by that channel only, read by anyone.
#[derive(Debug, Default)]
pub struct StatsShard {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    unmap_ops: AtomicU64,
    unmap_bytes: AtomicU64,
    flush_ops: AtomicU64,
    write_zeroes_ops: AtomicU64,
    write_zeroes_bytes: AtomicU64,
    read_latency_ns_sum: AtomicU64,
    read_latency_ns_max: AtomicU64,
    write_latency_ns_sum: AtomicU64,
    write_latency_ns_max: AtomicU64,
    errors: AtomicU64,
    /// Parents submitted (every kind), for the queue depth.
    submitted: AtomicU64,
    /// Parents completed (every kind, failed ones included).
    completed: AtomicU64,
    /// Read/write latency histogram: bucket `i` counts latencies below `2^i` µs (the last one: the rest).
    latency_buckets: [AtomicU64; LATENCY_BUCKETS],
}

/// Number of latency histogram buckets: `< 1 µs, < 2 µs, ... < 2^(N-2) µs`, then everything else.
pub const LATENCY_BUCKETS: usize = 24;

/// Upper bound in seconds of latency bucket `i` (`f64::INFINITY` for the last one).
pub fn latency_bucket_bound_seconds(i: usize) -> f64 {
    if i + 1 >= LATENCY_BUCKETS {
        f64::INFINITY
    } else {
        (1u64 << i) as f64 * 1e-6
    }
}

fn latency_bucket(latency_ns: u64) -> usize {
    let us = latency_ns / 1000;
    // Bucket i holds us < 2^i: i = number of significant bits of us.
    let i = (u64::BITS - us.leading_zeros()) as usize;
    i.min(LATENCY_BUCKETS - 1)
}

/// A point-in-time copy of the counters of a bdev (or of one channel).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BdevStatsSnapshot {
    /// Successful reads.
    pub read_ops: u64,
    /// Bytes read by successful reads.
    pub read_bytes: u64,
    /// Successful writes.
    pub write_ops: u64,
    /// Bytes written by successful writes.
    pub write_bytes: u64,
    /// Successful unmaps.
    pub unmap_ops: u64,
    /// Bytes covered by successful unmaps.
    pub unmap_bytes: u64,
    /// Successful flushes.
    pub flush_ops: u64,
    /// Successful write_zeroes (native or emulated).
    pub write_zeroes_ops: u64,
    /// Bytes covered by successful write_zeroes.
    pub write_zeroes_bytes: u64,
    /// Sum of read latencies (submission to completion) in nanoseconds.
    pub read_latency_ns_sum: u64,
    /// Largest read latency in nanoseconds.
    pub read_latency_ns_max: u64,
    /// Sum of write latencies in nanoseconds.
    pub write_latency_ns_sum: u64,
    /// Largest write latency in nanoseconds.
    pub write_latency_ns_max: u64,
    /// I/O completed with an error (validation failures included).
    pub errors: u64,
}

/// What one finished parent I/O contributes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub kind: super::IoKind,
    pub bytes: u64,
    pub latency_ns: u64,
    pub ok: bool,
}

/// Adds `v` to a counter that only the calling thread writes (no locked instruction).
pub(crate) fn bump(c: &AtomicU64, v: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

impl StatsShard {
    /// Adds one finished I/O (only the owning channel calls this).
    pub(crate) fn record(&self, s: Sample) {
        use super::IoKind::*;
        bump(&self.completed, 1);
        if !s.ok {
            bump(&self.errors, 1);
            return;
        }
        let max = |c: &AtomicU64, v: u64| {
            if v > c.load(Ordering::Relaxed) {
                c.store(v, Ordering::Relaxed);
            }
        };
        match s.kind {
            Read => {
                bump(&self.latency_buckets[latency_bucket(s.latency_ns)], 1);
                bump(&self.read_ops, 1);
                bump(&self.read_bytes, s.bytes);
                bump(&self.read_latency_ns_sum, s.latency_ns);
                max(&self.read_latency_ns_max, s.latency_ns);
            }
            Write => {
                bump(&self.latency_buckets[latency_bucket(s.latency_ns)], 1);
                bump(&self.write_ops, 1);
                bump(&self.write_bytes, s.bytes);
                bump(&self.write_latency_ns_sum, s.latency_ns);
                max(&self.write_latency_ns_max, s.latency_ns);
            }
            Unmap => {
                bump(&self.unmap_ops, 1);
                bump(&self.unmap_bytes, s.bytes);
            }
            Flush => bump(&self.flush_ops, 1),
            WriteZeroes => {
                bump(&self.write_zeroes_ops, 1);
                bump(&self.write_zeroes_bytes, s.bytes);
            }
            Reset => {}
        }
    }

    /// Counts one submitted parent (for the queue depth; only the owning channel calls this).
    pub(crate) fn submitted(&self) {
        bump(&self.submitted, 1);
    }

    /// Adds `o`'s counts to this shard (maxima combined with max); the caller is this shard's only
    /// writer.
    fn merge_from(&self, o: &StatsShard) {
        for (k, (d, c)) in self.counters().into_iter().zip(o.counters()).enumerate() {
            let (a, b) = (get(d), get(c));
            d.store(if MAX_FIELDS.contains(&k) { a.max(b) } else { a.wrapping_add(b) }, Ordering::Relaxed);
        }
        for (d, c) in self.latency_buckets.iter().zip(&o.latency_buckets) {
            bump(d, get(c));
        }
    }

    /// Every counter, in one fixed order (maxima included), for summing shards.
    fn counters(&self) -> [&AtomicU64; 16] {
        [
            &self.read_ops,
            &self.read_bytes,
            &self.write_ops,
            &self.write_bytes,
            &self.unmap_ops,
            &self.unmap_bytes,
            &self.flush_ops,
            &self.write_zeroes_ops,
            &self.write_zeroes_bytes,
            &self.read_latency_ns_sum,
            &self.read_latency_ns_max,
            &self.write_latency_ns_sum,
            &self.write_latency_ns_max,
            &self.errors,
            &self.submitted,
            &self.completed,
        ]
    }
}

/// Positions of the maxima in [`StatsShard::counters`] (combined with max, not added).
const MAX_FIELDS: [usize; 2] = [10, 12];

impl BdevStats {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<StatsShard>>> {
        self.shards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new shard for a channel; give it back with [`BdevStats::retire`] when the channel drops.
    pub(crate) fn shard(&self) -> Arc<StatsShard> {
        let s = Arc::new(StatsShard::default());
        self.lock().push(s.clone());
        s
    }

    /// Folds a dropped channel's shard into the retired counts.
    pub(crate) fn retire(&self, shard: &Arc<StatsShard>) {
        let mut shards = self.lock();
        let Some(i) = shards.iter().position(|s| Arc::ptr_eq(s, shard)) else { return };
        shards.swap_remove(i);
        // `retired` has one writer too: this, under the lock.
        self.retired.merge_from(shard);
    }

    /// Shards of live channels (tests: a dropped channel's is folded in and gone).
    #[cfg(test)]
    pub(crate) fn live_shards(&self) -> usize {
        self.lock().len()
    }

    /// Every counter over the retired counts and the live shards.
    fn totals(&self) -> StatsShard {
        let shards = self.lock();
        let t = StatsShard::default();
        t.merge_from(&self.retired);
        for sh in shards.iter() {
            t.merge_from(sh);
        }
        t
    }

    /// I/O submitted and not yet completed, across all channels.
    pub fn queue_depth(&self) -> u64 {
        let t = self.totals();
        get(&t.submitted).saturating_sub(get(&t.completed))
    }

    /// The read/write latency histogram (non-cumulative bucket counts, see [`latency_bucket_bound_seconds`]).
    pub fn latency_histogram(&self) -> [u64; LATENCY_BUCKETS] {
        let t = self.totals();
        std::array::from_fn(|i| get(&t.latency_buckets[i]))
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> BdevStatsSnapshot {
        self.totals().snapshot()
    }
}

impl StatsShard {
    /// A copy of this shard's counters (one channel's, or a sum of shards).
    pub(crate) fn snapshot(&self) -> BdevStatsSnapshot {
        let t = self;
        BdevStatsSnapshot {
            read_ops: get(&t.read_ops),
            read_bytes: get(&t.read_bytes),
            write_ops: get(&t.write_ops),
            write_bytes: get(&t.write_bytes),
            unmap_ops: get(&t.unmap_ops),
            unmap_bytes: get(&t.unmap_bytes),
            flush_ops: get(&t.flush_ops),
            write_zeroes_ops: get(&t.write_zeroes_ops),
            write_zeroes_bytes: get(&t.write_zeroes_bytes),
            read_latency_ns_sum: get(&t.read_latency_ns_sum),
            read_latency_ns_max: get(&t.read_latency_ns_max),
            write_latency_ns_sum: get(&t.write_latency_ns_sum),
            write_latency_ns_max: get(&t.write_latency_ns_max),
            errors: get(&t.errors),
        }
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::super::IoKind;
    use super::*;

    fn read(ns: u64) -> Sample {
        Sample { kind: IoKind::Read, bytes: 4096, latency_ns: ns, ok: true }
    }

    #[test]
    fn shards_sum_and_a_dropped_channels_counts_stay() {
        let stats = BdevStats::default();
        let a = stats.shard();
        let b = stats.shard();
        for s in [&a, &b, &a] {
            s.submitted();
        }
        a.record(read(3_000));
        a.record(Sample { kind: IoKind::Write, bytes: 512, latency_ns: 900_000, ok: true });
        b.record(read(70_000));
        b.record(Sample { kind: IoKind::Unmap, bytes: 1 << 20, latency_ns: 5, ok: false });
        let live = stats.snapshot();
        assert_eq!((live.read_ops, live.read_bytes, live.write_ops, live.errors), (2, 8192, 1, 1));
        assert_eq!(live.read_latency_ns_sum, 73_000);
        assert_eq!(live.read_latency_ns_max, 70_000);
        assert_eq!(live.write_latency_ns_max, 900_000);
        // 3 submitted, 4 completed (the failed unmap was never submitted here): saturates at 0.
        assert_eq!(stats.queue_depth(), 0);
        b.submitted();
        b.submitted();
        assert_eq!(stats.queue_depth(), 1);
        // Dropping a channel folds its shard in: nothing changes for a reader.
        stats.retire(&b);
        assert_eq!(stats.snapshot(), live);
        assert_eq!(stats.queue_depth(), 1);
        let h = stats.latency_histogram();
        assert_eq!(h.iter().sum::<u64>(), 3, "two reads and a write: {h:?}");
        assert_eq!(h[latency_bucket(70_000)], 1);
        // A retired shard is gone from the live list: retiring it again adds nothing.
        stats.retire(&b);
        assert_eq!(stats.snapshot(), live);
        // The next channel's counts add to what is retired; maxima combine, not add.
        let c = stats.shard();
        c.record(read(10_000));
        let s = stats.snapshot();
        assert_eq!((s.read_ops, s.read_latency_ns_sum, s.read_latency_ns_max), (3, 83_000, 70_000));
        stats.retire(&a);
        stats.retire(&c);
        assert_eq!(stats.snapshot(), s);
    }
}
