//! FTL statistics: counters kept by the core and the channels, and the JSON shown under the FTL
//! bdev's entry (SIGUSR1) and by `vblkd ftl info`.
//!
//! # Design
//! Plain relaxed atomics, summed at read time; band counts are computed from the band table under
//! the core lock when the JSON is built. `waf` = media writes / user writes (metadata, pads, head,
//! tail and relocation included in media writes).

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use super::band::BandState;
use super::core::{Core, Limit, LIMIT_NAMES};

/// Counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Blocks written by users (acknowledged).
    pub user_write_blocks: AtomicU64,
    /// Blocks written to media (all kinds).
    pub media_write_blocks: AtomicU64,
    /// Blocks written to the metadata areas.
    pub md_write_blocks: AtomicU64,
    /// Blocks moved by relocation.
    pub relocated_blocks: AtomicU64,
    /// Bands chosen for relocation.
    pub relocated_bands: AtomicU64,
    /// User writes held back per limit (crit, high, low, start).
    pub limit_hits: [AtomicU64; 4],
    /// Failed media writes (commands).
    pub write_failures: AtomicU64,
    /// Failed media reads (blocks).
    pub read_errors: AtomicU64,
    /// Chunks retired after a failure.
    pub retired_chunks: AtomicU64,
    /// Bands the last (dirty) restore read from tail metadata.
    pub restore_tail_bands: AtomicU64,
    /// Bands the last (dirty) restore read block by block (OOB).
    pub restore_oob_bands: AtomicU64,
    /// Blocks replayed from the nv-cache at the last start.
    pub nv_replayed_blocks: AtomicU64,
    /// Records written to the nv-cache.
    pub nv_records: AtomicU64,
}

impl Stats {
    /// The statistics object.
    pub fn json(&self, core: &Core, limits: &[Limit; 4], checkpoints: u64) -> Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let user = g(&self.user_write_blocks);
        let media = g(&self.media_write_blocks);
        let waf = if user == 0 { 0.0 } else { media as f64 / user as f64 };
        let count = |f: &dyn Fn(BandState) -> bool| core.bands.iter().filter(|b| f(b.state)).count();
        let mut hits = serde_json::Map::new();
        for (i, n) in LIMIT_NAMES.iter().enumerate() {
            hits.insert((*n).to_string(), json!(g(&self.limit_hits[i])));
        }
        let mut thresholds = serde_json::Map::new();
        for (i, n) in LIMIT_NAMES.iter().enumerate() {
            thresholds
                .insert((*n).to_string(), json!({"free_bands": limits[i].thld, "user_pct": limits[i].pct}));
        }
        json!({
            "user_write_blocks": user,
            "media_write_blocks": media,
            "waf": waf,
            "limit_hits": hits,
            "bands_free": count(&|s| matches!(s, BandState::Free | BandState::Prep)),
            "bands_open": count(&|s| matches!(s, BandState::Opening | BandState::Open | BandState::Full | BandState::Closing)),
            "bands_closed": count(&|s| s == BandState::Closed),
            "relocated_blocks": g(&self.relocated_blocks),
            "relocated_bands": g(&self.relocated_bands),
            "metadata_write_blocks": g(&self.md_write_blocks),
            "checkpoints": checkpoints,
            "write_failures": g(&self.write_failures),
            "read_errors": g(&self.read_errors),
            "retired_chunks": g(&self.retired_chunks),
            "restore_tail_bands": g(&self.restore_tail_bands),
            "restore_oob_bands": g(&self.restore_oob_bands),
            "nv_cache": core.nv.as_ref().map(|r| json!({
                "records_written": g(&self.nv_records),
                "replayed_blocks": g(&self.nv_replayed_blocks),
                "ring_used_blocks": r.used(),
                "ring_blocks": r.ring_units,
                "pending_records": r.pending.len(),
            })),
            "current_limit": core.level.map(|i| LIMIT_NAMES[i]),
            "limits": thresholds,
            "buffered_blocks": core.wbuf.tail - core.wbuf.head,
        })
    }
}
