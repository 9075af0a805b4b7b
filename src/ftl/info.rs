//! `vblkd ftl info`: the superblock, bands and statistics of an FTL on an image, as JSON.
//!
//! # Design
//! Opens the image, reads the metadata areas (primary, else mirror) through a queue pair and prints
//! what the checkpoint says. Nothing is written: no checkpoint, no repair, no reset.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::ocssd::{EmuDevice, MediaDevice};

use super::band::BandState;
use super::core::test_bit;
use super::{geo_for, md, FtlConfig, FtlError};

/// Builds the JSON for an image and PU range.
pub fn info_json(path: &Path, pu_begin: u32, pu_end: Option<u32>) -> Result<Value, FtlError> {
    let dev = EmuDevice::open(path).map_err(|e| FtlError::Media(e.to_string()))?;
    let media: Arc<dyn MediaDevice> = Arc::new(dev);
    let mut cfg = FtlConfig::new("info");
    cfg.pu_begin = pu_begin;
    cfg.pu_end = pu_end;
    let geo = geo_for(media.as_ref(), &cfg)?;
    let mut qp = media.queue_pair(16).map_err(|e| FtlError::Media(e.to_string()))?;
    let loaded = md::load(media.as_ref(), qp.as_mut(), &geo)?;
    let ck = &loaded.ckpt;
    let names = ["free", "prep", "opening", "open", "full", "closing", "closed", "metadata"];
    let mut bands = Vec::new();
    let (mut free, mut closed, mut open) = (0u64, 0u64, 0u64);
    for (i, r) in ck.bands.iter().enumerate() {
        let state = if (i as u32) < 2 * loaded.md_bands { BandState::Metadata.code() } else { r.state };
        let valid =
            (0..geo.max_positions).filter(|o| test_bit(&ck.valid, i as u64 * geo.max_positions + o)).count();
        match state {
            0 | 1 => free += 1,
            6 => closed += 1,
            2..=5 => open += 1,
            _ => {}
        }
        bands.push(json!({
            "band": i,
            "state": names.get(state as usize).copied().unwrap_or("unknown"),
            "base_seq": r.base_seq,
            "valid_blocks": valid,
            "erase_count": r.erase_count,
            "retired_chunks": r.retired.count_ones(),
        }));
    }
    let mapped = ck.l2p.iter().filter(|v| **v != super::layout::UNMAPPED).count();
    Ok(json!({
        "superblock": ck.sb,
        "metadata": {
            "bands_per_area": loaded.md_bands,
            "copy_used": if loaded.primary_bad.is_some() { "mirror" } else { "primary" },
            "primary_error": loaded.primary_bad,
        },
        "statistics": {
            "num_lbas": ck.sb.num_lbas,
            "mapped_lbas": mapped,
            "bands_free": free,
            "bands_open": open,
            "bands_closed": closed,
            "checkpoint_generation": ck.sb.generation,
            "clean": ck.sb.clean,
        },
        "bands": bands,
    }))
}
