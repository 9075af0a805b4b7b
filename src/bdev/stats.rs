//! Per-bdev I/O statistics (SPEC §2 "Statistics").
//!
//! ```text
//!  Channel (per thread) ──completion──► ChannelStats (plain, per channel)
//!                                  └──► BdevStats (atomics, per bdev, shared, outlives channels)
//!  Descriptor::stats() / Registry::stats_json() ──► BdevStatsSnapshot (serde)
//! ```
//!
//! # Design
//! Every parent I/O is counted once, at completion, by the generic channel: directly into the bdev's
//! atomics (relaxed; counters are independent) and into the channel's own plain counters. Because the
//! bdev's counters are updated directly, they survive channel teardown without a merge step.
//!
//! Besides the counters, the bdev keeps a read/write latency histogram (power-of-two buckets from
//! 1 µs) and submitted/completed counts whose difference is the queue depth, for the metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one bdev, shared by all its channels.
#[derive(Debug, Default)]
pub struct BdevStats {
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

impl BdevStatsSnapshot {
    pub(crate) fn record(&mut self, s: Sample) {
        use super::IoKind::*;
        if !s.ok {
            self.errors += 1;
            return;
        }
        match s.kind {
            Read => {
                self.read_ops += 1;
                self.read_bytes += s.bytes;
                self.read_latency_ns_sum += s.latency_ns;
                self.read_latency_ns_max = self.read_latency_ns_max.max(s.latency_ns);
            }
            Write => {
                self.write_ops += 1;
                self.write_bytes += s.bytes;
                self.write_latency_ns_sum += s.latency_ns;
                self.write_latency_ns_max = self.write_latency_ns_max.max(s.latency_ns);
            }
            Unmap => {
                self.unmap_ops += 1;
                self.unmap_bytes += s.bytes;
            }
            Flush => self.flush_ops += 1,
            WriteZeroes => {
                self.write_zeroes_ops += 1;
                self.write_zeroes_bytes += s.bytes;
            }
            Reset => {}
        }
    }
}

impl BdevStats {
    /// Adds one finished I/O.
    pub(crate) fn record(&self, s: Sample) {
        use super::IoKind::*;
        let add = |c: &AtomicU64, v: u64| {
            c.fetch_add(v, Ordering::Relaxed);
        };
        add(&self.completed, 1);
        if !s.ok {
            add(&self.errors, 1);
            return;
        }
        match s.kind {
            Read => {
                add(&self.latency_buckets[latency_bucket(s.latency_ns)], 1);
                add(&self.read_ops, 1);
                add(&self.read_bytes, s.bytes);
                add(&self.read_latency_ns_sum, s.latency_ns);
                self.read_latency_ns_max.fetch_max(s.latency_ns, Ordering::Relaxed);
            }
            Write => {
                add(&self.latency_buckets[latency_bucket(s.latency_ns)], 1);
                add(&self.write_ops, 1);
                add(&self.write_bytes, s.bytes);
                add(&self.write_latency_ns_sum, s.latency_ns);
                self.write_latency_ns_max.fetch_max(s.latency_ns, Ordering::Relaxed);
            }
            Unmap => {
                add(&self.unmap_ops, 1);
                add(&self.unmap_bytes, s.bytes);
            }
            Flush => add(&self.flush_ops, 1),
            WriteZeroes => {
                add(&self.write_zeroes_ops, 1);
                add(&self.write_zeroes_bytes, s.bytes);
            }
            Reset => {}
        }
    }

    /// Counts one submitted parent (for the queue depth).
    pub(crate) fn submitted(&self) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
    }

    /// I/O submitted and not yet completed, across all channels.
    pub fn queue_depth(&self) -> u64 {
        let completed = self.completed.load(Ordering::Relaxed);
        self.submitted.load(Ordering::Relaxed).saturating_sub(completed)
    }

    /// The read/write latency histogram (non-cumulative bucket counts, see [`latency_bucket_bound_seconds`]).
    pub fn latency_histogram(&self) -> [u64; LATENCY_BUCKETS] {
        std::array::from_fn(|i| self.latency_buckets[i].load(Ordering::Relaxed))
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> BdevStatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BdevStatsSnapshot {
            read_ops: g(&self.read_ops),
            read_bytes: g(&self.read_bytes),
            write_ops: g(&self.write_ops),
            write_bytes: g(&self.write_bytes),
            unmap_ops: g(&self.unmap_ops),
            unmap_bytes: g(&self.unmap_bytes),
            flush_ops: g(&self.flush_ops),
            write_zeroes_ops: g(&self.write_zeroes_ops),
            write_zeroes_bytes: g(&self.write_zeroes_bytes),
            read_latency_ns_sum: g(&self.read_latency_ns_sum),
            read_latency_ns_max: g(&self.read_latency_ns_max),
            write_latency_ns_sum: g(&self.write_latency_ns_sum),
            write_latency_ns_max: g(&self.write_latency_ns_max),
            errors: g(&self.errors),
        }
    }
}
