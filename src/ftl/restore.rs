//! Start-up: format a new FTL, or restore one from its checkpoint (clean) plus a media scan (dirty).
//!
//! ```text
//!  clean:  checkpoint (L2P, valid map, bands) ─► done
//!  dirty:  checkpoint C ─► scan every written band: tail md (closed) or per-block OOB (open/torn)
//!          ─► keep checkpoint entries whose block still holds that LBA with seq < C
//!          ─► replay blocks with seq ≥ C in sequence order ─► rebuild valid map and band counts
//! ```
//!
//! # Design
//! Every media block carries `(lba, seq)` in its OOB, and a closed band's tail lists the LBA of every
//! block (its sequence is `base_seq + position`). The checkpoint is authoritative below its
//! sequence number; above it the newest block of an LBA wins. A checkpoint entry whose band was
//! erased and rewritten after the checkpoint no longer finds its LBA there and is dropped (its live
//! copy, if any, was relocated with a newer sequence number and is replayed). A restore that runs
//! over a second logs its progress every second.
//!
//! # Limitations
//! The OOB scan of a band without a valid tail reads whole blocks (the driver has no OOB-only read).

use std::time::{Duration, Instant};

use crate::ocssd::{ChunkState, IoBuf, MediaDevice, Op, PpaList, QueuePair, SgList};

use super::band::{mask_indices, Band, BandState, Geo};
use super::core::set_bit;
use super::layout::{self, BandHead, BLOCK_BYTES, LBA_HEAD, UNMAPPED};
use super::md::{self, Checkpoint};
use super::FtlError;

/// The runtime state rebuilt at start.
pub struct Rebuilt {
    /// L2P values.
    pub l2p: Vec<u64>,
    /// Bands.
    pub bands: Vec<Band>,
    /// Valid map.
    pub valid: Vec<u64>,
    /// Next sequence number.
    pub next_seq: u64,
    /// Checkpoint generation.
    pub generation: u64,
    /// Bands restored from tail metadata / by OOB scan (dirty restore).
    pub from_tail: u64,
    /// Bands restored by reading every block's OOB.
    pub from_oob: u64,
}

/// What a scan found in one band.
#[derive(Default)]
struct BandScan {
    head: Option<BandHead>,
    has_tail: bool,
    /// (addr, lba, seq) of data blocks.
    blocks: Vec<(u64, u64, u64)>,
    /// Highest sequence seen + 1.
    end_seq: u64,
    /// Any chunk written.
    written: bool,
    good: Vec<usize>,
}

fn read(
    qp: &mut dyn QueuePair,
    ppas: Vec<crate::ocssd::Ppa>,
    oob_bytes: usize,
) -> Result<(Vec<u8>, Vec<u8>, u64, bool), FtlError> {
    let n = ppas.len();
    let list = PpaList::new(ppas).map_err(|e| FtlError::Media(e.to_string()))?;
    let done = md::exec(
        qp,
        Op::Read {
            ppas: list,
            data: SgList::from(vec![0u8; n * BLOCK_BYTES]),
            oob: Some(IoBuf::zeroed(n * oob_bytes)),
        },
    );
    let ok = done.status.is_success();
    let data = done.buffers.data.map(|d| d.to_vec()).unwrap_or_default();
    let oob = done.buffers.oob.map(|o| o.as_slice().to_vec()).unwrap_or_default();
    Ok((data, oob, if ok { 0 } else { done.failed.0 | (u64::from(done.failed.0 == 0) * u64::MAX) }, ok))
}

fn scan_band(
    media: &dyn MediaDevice,
    qp: &mut dyn QueuePair,
    geo: &Geo,
    id: u32,
    num_lbas: u64,
) -> Result<BandScan, FtlError> {
    let oob_bytes = media.info().oob_bytes_per_block as usize;
    let mut s = BandScan::default();
    let mut wps = Vec::new();
    for i in 0..geo.pus.len() {
        let info = media.chunk_info(geo.chunk(id, i)).map_err(|e| FtlError::Media(e.to_string()))?;
        let wp = if matches!(info.state, ChunkState::Open | ChunkState::Closed) {
            info.write_pointer_blocks
        } else {
            0
        };
        if wp > 0 {
            s.written = true;
        }
        wps.push(wp);
    }
    if !s.written {
        return Ok(s);
    }
    // Head: block 0 of the first written chunk.
    if let Some(i) = wps.iter().position(|w| *w > 0) {
        let (data, oob, failed, _) = read(qp, vec![geo.chunk(id, i)], oob_bytes)?;
        if failed == 0 && layout::decode_oob(&oob).0 == LBA_HEAD {
            s.head = BandHead::decode(&data).ok().filter(|h| h.band == id);
        }
    }
    // Tail, when the head says where it is.
    if let Some(h) = &s.head {
        let mut band = Band::new(id);
        band.good = mask_indices(h.good_mask, geo.pus.len());
        s.good = band.good.clone();
        let positions = band.positions(geo);
        let data_end = band.data_end(geo);
        let need = layout::blocks_for(layout::tail_bytes(geo.max_positions as usize)) as u64;
        let ppas: Vec<_> =
            (data_end..(data_end + need).min(positions)).filter_map(|p| band.ppa(geo, p)).collect();
        let readable = ppas.iter().all(|p| {
            geo.pus.iter().position(|(g, u)| *g == p.grp && *u == p.pu).is_some_and(|i| wps[i] > p.lbk)
        });
        if readable && !ppas.is_empty() && ppas.len() as u64 == need {
            let mut bytes = Vec::new();
            let mut ok = true;
            for chunk in ppas.chunks(64) {
                let (d, _, failed, _) = read(qp, chunk.to_vec(), oob_bytes)?;
                ok &= failed == 0;
                bytes.extend_from_slice(&d);
            }
            if let Ok(t) = layout::decode_tail(&bytes) {
                if ok && t.band == id && t.base_seq == h.base_seq && t.lbas.len() as u64 == geo.max_positions
                {
                    s.has_tail = true;
                    for (off, &lba) in t.lbas.iter().enumerate() {
                        let (i, lbk) = ((off as u64 / geo.clba) as usize, off as u64 % geo.clba);
                        if let Some(pos) = band.pos_of(geo, i, lbk) {
                            let seq = h.base_seq + pos;
                            s.end_seq = s.end_seq.max(seq + 1);
                            if lba < num_lbas {
                                s.blocks.push((geo.addr(id, i, lbk), lba, seq));
                            }
                        }
                    }
                    return Ok(s);
                }
            }
        }
    }
    // OOB scan of every written block.
    for (i, &wp) in wps.iter().enumerate() {
        let mut lbk = 0;
        while lbk < wp {
            let n = (wp - lbk).min(64);
            let ppas = (lbk..lbk + n).map(|k| geo.chunk(id, i).with_lbk(k)).collect();
            let (_, oob, failed, _) = read(qp, ppas, oob_bytes)?;
            for k in 0..n {
                if failed & (1 << k) != 0 {
                    log::warn!(
                        "ftl restore: unreadable block {} skipped",
                        geo.chunk(id, i).with_lbk(lbk + k)
                    );
                    continue;
                }
                let off = k as usize * oob_bytes;
                let (lba, seq) = layout::decode_oob(oob.get(off..off + oob_bytes).unwrap_or(&[]));
                if lba == LBA_HEAD || lba < num_lbas || lba >= layout::LBA_MD {
                    s.end_seq = s.end_seq.max(seq.saturating_add(1));
                }
                if lba < num_lbas {
                    s.blocks.push((geo.addr(id, i, lbk + k), lba, seq));
                }
            }
            lbk += n;
        }
    }
    Ok(s)
}

/// Rebuilds the runtime state from a checkpoint (and the media when it is not clean).
pub fn rebuild(
    media: &dyn MediaDevice,
    qp: &mut dyn QueuePair,
    geo: &Geo,
    ckpt: &Checkpoint,
    name: &str,
) -> Result<Rebuilt, FtlError> {
    let nb = geo.num_bands as usize;
    let num_lbas = ckpt.sb.num_lbas;
    let mut bands: Vec<Band> = (0..geo.num_bands).map(Band::new).collect();
    for (i, b) in bands.iter_mut().enumerate() {
        if let Some(r) = ckpt.bands.get(i) {
            b.retired = r.retired;
            b.erase_count = r.erase_count;
            b.base_seq = r.base_seq;
        }
        if (i as u32) < geo.first_data_band() {
            b.state = BandState::Metadata;
        }
    }
    let mut valid = vec![0u64; geo.addr_space().div_ceil(64) as usize];
    let mut l2p = ckpt.l2p.clone();
    let (mut from_tail, mut from_oob) = (0u64, 0u64);
    let mut next_seq = ckpt.sb.ckpt_seq.max(1);
    let start = Instant::now();
    let mut last_log = start;
    let mut scans: Vec<BandScan> = Vec::with_capacity(nb);
    for id in 0..geo.num_bands {
        if id < geo.first_data_band() {
            scans.push(BandScan::default());
            continue;
        }
        let s = if ckpt.sb.clean {
            // Clean: no scan; heads give each band's chunk set and sequence.
            let mut s = BandScan::default();
            let rec = ckpt.bands.get(id as usize).copied().unwrap_or_default();
            if rec.state != BandState::Free.code() && rec.state != BandState::Prep.code() {
                s.written = true;
                s.good = md::online_chunks(media, geo, id)
                    .into_iter()
                    .filter(|i| rec.retired & (1 << i) == 0)
                    .collect();
            }
            s
        } else {
            scan_band(media, qp, geo, id, num_lbas)?
        };
        next_seq = next_seq.max(s.end_seq);
        if let Some(h) = &s.head {
            next_seq = next_seq.max(h.base_seq + geo.max_positions);
        }
        scans.push(s);
        if last_log.elapsed() >= Duration::from_secs(1) {
            last_log = Instant::now();
            log::info!("ftl '{name}': restore: scanned band {} of {}", id + 1, geo.num_bands);
        }
    }
    if ckpt.sb.clean {
        valid.clone_from(&ckpt.valid);
    } else {
        // Index of what each block holds now.
        let mut holds: Vec<(u64, u64)> = vec![(UNMAPPED, 0); geo.addr_space() as usize];
        let mut replay: Vec<(u64, u64, u64)> = Vec::new();
        for s in &scans {
            for &(addr, lba, seq) in &s.blocks {
                if let Some(h) = holds.get_mut(addr as usize) {
                    *h = (lba, seq);
                }
                if seq >= ckpt.sb.ckpt_seq {
                    replay.push((seq, lba, addr));
                }
            }
        }
        let c = ckpt.sb.ckpt_seq;
        let mut dropped = 0u64;
        for (lba, v) in l2p.iter_mut().enumerate() {
            if *v != UNMAPPED && !matches!(holds.get(*v as usize), Some((l, s)) if *l == lba as u64 && *s < c)
            {
                *v = UNMAPPED;
                dropped += 1;
            }
        }
        if dropped > 0 {
            log::info!("ftl '{name}': restore: {dropped} checkpoint entries pointed to rewritten blocks");
        }
        replay.sort_unstable();
        let replayed = replay.len();
        for (_, lba, addr) in replay {
            if let Some(v) = l2p.get_mut(lba as usize) {
                *v = addr;
            }
        }
        for (lba, v) in l2p.iter().enumerate() {
            if *v != UNMAPPED {
                set_bit(&mut valid, *v);
            }
            let _ = lba;
        }
        let tails = scans.iter().filter(|s| s.has_tail).count();
        let oob = scans.iter().filter(|s| s.written && !s.has_tail).count();
        (from_tail, from_oob) = (tails as u64, oob as u64);
        log::info!(
            "ftl '{name}': dirty restore replayed {replayed} blocks ({tails} bands from tail metadata, {oob} by OOB scan) in {:?}",
            start.elapsed()
        );
    }
    // Band counts and states.
    for (id, s) in scans.iter().enumerate() {
        if (id as u32) < geo.first_data_band() {
            continue;
        }
        let b = &mut bands[id];
        b.good = s.good.clone();
        if let Some(h) = &s.head {
            b.base_seq = h.base_seq;
            b.good = mask_indices(h.good_mask, geo.pus.len());
        }
        b.has_tail = s.has_tail;
        let base = id as u64 * geo.max_positions;
        b.valid = (0..geo.max_positions).filter(|o| super::core::test_bit(&valid, base + o)).count() as u64;
        b.written = if ckpt.sb.clean {
            b.positions(geo).saturating_sub(1 + geo.tail_len(b.good.len()))
        } else {
            s.blocks.len() as u64
        };
        b.written = b.written.max(b.valid);
        if s.written {
            b.state = if b.valid == 0 { BandState::Free } else { BandState::Closed };
            b.dirty = true;
        } else {
            b.state = BandState::Free;
            b.dirty = false;
        }
    }
    Ok(Rebuilt { l2p, bands, valid, next_seq, generation: ckpt.sb.generation, from_tail, from_oob })
}

#[cfg(test)]
#[path = "restore_tests.rs"]
mod tests;
