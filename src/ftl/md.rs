//! Metadata areas: writing and reading the checkpoint (superblock, band md, L2P, valid map, trim
//! map) on the reserved bands, with a mirror.
//!
//! ```text
//!  bands [0, k)  primary area      persist: reset+write mirror, flush, then reset+write primary, flush
//!  bands [k, 2k) mirror area       load:    primary; on any bad region → whole mirror (repair primary)
//! ```
//!
//! # Design
//! Chunks are append-only, so an area is reset and rewritten as a whole; blocks are laid out
//! chunk-major over the area's online chunks. At every moment one area holds a complete
//! checkpoint: the mirror is rewritten first, the primary only once the mirror is durable. A load
//! never writes before both copies were checked, so a double failure leaves the image untouched.
//! The mirror is found through the primary superblock, or by probing band starts when the
//! primary superblock itself is unreadable.
//!
//! # Limitations
//! A chunk of an area going offline after creation shrinks the area; if the checkpoint no longer
//! fits, persisting fails (the FTL reports the error and stays on the previous checkpoint).

use crate::ocssd::{ChunkState, Command, IoBuf, MediaDevice, Op, Ppa, PpaList, QueuePair, SgList, Status};

use super::band::Geo;
use super::layout::{self, LayoutError, RegionId, Superblock, BLOCK_BYTES, LBA_MD};
use super::FtlError;

/// Largest probe distance for the mirror when the primary superblock is unreadable.
pub const MAX_MD_BANDS: u32 = 16;

/// A whole checkpoint in memory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The superblock (offsets filled in by `encode`).
    pub sb: Superblock,
    /// Band records.
    pub bands: Vec<layout::BandRecord>,
    /// L2P values (media addresses or UNMAPPED).
    pub l2p: Vec<u64>,
    /// Valid map words.
    pub valid: Vec<u64>,
    /// Trim map words.
    pub trim: Vec<u64>,
}

impl Checkpoint {
    /// Encodes the area image; the superblock records region offsets.
    pub fn encode(&self, mirror: bool) -> Vec<u8> {
        let bands = layout::encode_region(RegionId::BandMd, &layout::encode_bands(&self.bands));
        let l2p =
            layout::encode_region(RegionId::L2p, &layout::encode_l2p(&self.l2p, self.sb.l2p_entry_bytes));
        let valid = layout::encode_region(RegionId::ValidMap, &layout::encode_bitmap(&self.valid));
        let trim = layout::encode_region(RegionId::TrimMap, &layout::encode_bitmap(&self.trim));
        let mut sb = self.sb.clone();
        sb.mirror = mirror;
        let b = |v: &Vec<u8>| (v.len() / BLOCK_BYTES) as u32;
        let sb_blocks = 1u32;
        sb.region_offsets = [0, sb_blocks, sb_blocks + b(&bands), sb_blocks + b(&bands) + b(&l2p), 0];
        sb.region_offsets[4] = sb.region_offsets[3] + b(&valid);
        let mut out = sb.encode();
        for r in [bands, l2p, valid, trim] {
            out.extend_from_slice(&r);
        }
        out
    }

    /// Blocks of an encoded checkpoint (for sizing the areas).
    pub fn blocks_needed(num_bands: usize, num_lbas: u64, entry_bytes: u32, addr_space: u64) -> u64 {
        let r = |bytes: u64| layout::region_blocks(bytes as usize) as u64;
        1 + r(num_bands as u64 * 32)
            + r(num_lbas * u64::from(entry_bytes))
            + r(addr_space.div_ceil(64) * 8)
            + r(num_lbas.div_ceil(64) * 8)
    }
}

/// Submits one command and waits for its completion (the caller owns `qp`).
pub fn exec(qp: &mut dyn QueuePair, op: Op) -> crate::ocssd::Completion {
    let mut cmd = Command { tag: 0, op };
    loop {
        match qp.submit(cmd) {
            Ok(()) => break,
            Err(r) => {
                cmd = r.command;
                let mut sink = Vec::new();
                qp.poll(&mut sink, usize::MAX);
                std::thread::yield_now();
            }
        }
    }
    let mut done = Vec::with_capacity(1);
    loop {
        if qp.poll(&mut done, 1) > 0 {
            if let Some(c) = done.pop() {
                return c;
            }
        }
        std::thread::yield_now();
    }
}

/// Online chunks (range indices) of `band`.
pub fn online_chunks(media: &dyn MediaDevice, geo: &Geo, band: u32) -> Vec<usize> {
    (0..geo.pus.len())
        .filter(|&i| media.chunk_info(geo.chunk(band, i)).is_ok_and(|c| c.state != ChunkState::Offline))
        .collect()
}

/// The chunks of an area starting at `first_band`, in block order.
fn area_chunks(media: &dyn MediaDevice, geo: &Geo, first_band: u32, bands: u32) -> Vec<Ppa> {
    let mut v = Vec::new();
    for b in first_band..first_band.saturating_add(bands).min(geo.num_bands) {
        for i in online_chunks(media, geo, b) {
            v.push(geo.chunk(b, i));
        }
    }
    v
}

fn media_err(what: &str, s: Status) -> FtlError {
    FtlError::Media(format!("{what}: {s}"))
}

/// Resets every written chunk of `chunks`.
pub fn reset_chunks(media: &dyn MediaDevice, qp: &mut dyn QueuePair, chunks: &[Ppa]) -> Result<(), FtlError> {
    for c in chunks {
        let st = media.chunk_info(*c).map_err(|e| FtlError::Media(e.to_string()))?.state;
        if matches!(st, ChunkState::Open | ChunkState::Closed) {
            let list = PpaList::new(vec![*c]).map_err(|e| FtlError::Media(e.to_string()))?;
            let done = exec(qp, Op::Reset { chunks: list });
            if !done.status.is_success() {
                return Err(media_err(&format!("resetting chunk {c}"), done.status));
            }
        }
    }
    Ok(())
}

/// Writes an encoded area (reset first), then flushes the media. Returns blocks written.
pub fn write_area(
    media: &dyn MediaDevice,
    qp: &mut dyn QueuePair,
    geo: &Geo,
    first_band: u32,
    bands: u32,
    bytes: &[u8],
    seq: u64,
) -> Result<u64, FtlError> {
    let chunks = area_chunks(media, geo, first_band, bands);
    let need = bytes.len().div_ceil(BLOCK_BYTES) as u64;
    if need > chunks.len() as u64 * geo.clba {
        return Err(FtlError::Media(format!(
            "metadata needs {need} blocks but the area at band {first_band} holds {}",
            chunks.len() as u64 * geo.clba
        )));
    }
    reset_chunks(media, qp, &chunks)?;
    let oob_bytes = media.info().oob_bytes_per_block as usize;
    let per_cmd = geo.ws_opt.min(64);
    let mut written = 0u64;
    let mut block = 0u64;
    'outer: for c in &chunks {
        let mut lbk = 0u64;
        while lbk < geo.clba {
            if block >= need {
                break 'outer;
            }
            let n = per_cmd.min(geo.clba - lbk);
            let mut data = vec![0u8; n as usize * BLOCK_BYTES];
            let start = block as usize * BLOCK_BYTES;
            let end = (start + data.len()).min(bytes.len());
            if start < end {
                data[..end - start].copy_from_slice(&bytes[start..end]);
            }
            let mut oob = vec![0u8; n as usize * oob_bytes];
            for k in 0..n as usize {
                layout::encode_oob(LBA_MD, seq, &mut oob[k * oob_bytes..(k + 1) * oob_bytes]);
            }
            let ppas = PpaList::contiguous(c.with_lbk(lbk), n as usize)
                .map_err(|e| FtlError::Media(e.to_string()))?;
            let done =
                exec(qp, Op::Write { ppas, data: SgList::from(data), oob: Some(IoBuf::from_vec(oob)) });
            if !done.status.is_success() {
                return Err(media_err(&format!("writing metadata at {}", c.with_lbk(lbk)), done.status));
            }
            written += n;
            block += n;
            lbk += n;
        }
    }
    let done = exec(qp, Op::Flush);
    if !done.status.is_success() {
        return Err(media_err("flushing metadata", done.status));
    }
    Ok(written)
}

/// Reads `count` blocks from block `first` of an area.
fn read_blocks(
    qp: &mut dyn QueuePair,
    geo: &Geo,
    chunks: &[Ppa],
    first: u64,
    count: u64,
) -> Result<Vec<u8>, FtlError> {
    let area = chunks.len() as u64 * geo.clba;
    if !first.checked_add(count).is_some_and(|end| end <= area) {
        // A corrupt length or offset: refuse before allocating anything for it.
        return Err(FtlError::Corrupt("metadata runs past its area".into()));
    }
    let mut out = Vec::with_capacity(count as usize * BLOCK_BYTES);
    let mut b = first;
    while b < first + count {
        let ci = (b / geo.clba) as usize;
        let lbk = b % geo.clba;
        let c = chunks.get(ci).ok_or_else(|| FtlError::Corrupt("metadata runs past its area".into()))?;
        let n = (geo.clba - lbk).min(first + count - b).min(64);
        let ppas =
            PpaList::contiguous(c.with_lbk(lbk), n as usize).map_err(|e| FtlError::Media(e.to_string()))?;
        let done =
            exec(qp, Op::Read { ppas, data: SgList::from(vec![0u8; n as usize * BLOCK_BYTES]), oob: None });
        if !done.status.is_success() {
            return Err(media_err(&format!("reading metadata at {}", c.with_lbk(lbk)), done.status));
        }
        let data = done.buffers.data.map(|d| d.to_vec()).unwrap_or_default();
        out.extend_from_slice(&data);
        b += n;
    }
    Ok(out)
}

/// Reads and checks a whole area. Errors say which region failed.
pub fn read_area(
    media: &dyn MediaDevice,
    qp: &mut dyn QueuePair,
    geo: &Geo,
    first_band: u32,
    bands: u32,
) -> Result<Checkpoint, FtlError> {
    let chunks = area_chunks(media, geo, first_band, bands);
    let mut read = |off: u64, n: u64| read_blocks(qp, geo, &chunks, off, n);
    let check = |sb: &Superblock| {
        if u64::from(sb.pu_end.saturating_sub(sb.pu_begin)) + 1 != geo.pus.len() as u64
            || sb.num_bands != geo.num_bands
        {
            return Err(FtlError::Config {
                option: "punits",
                reason: format!(
                    "the FTL on this media covers parallel units {}-{} ({} bands), not the {} PUs asked for",
                    sb.pu_begin,
                    sb.pu_end,
                    sb.num_bands,
                    geo.pus.len()
                ),
            });
        }
        Ok(())
    };
    decode_checkpoint(&mut read, &check, geo.addr_space())
}

/// Decodes a checkpoint from an area whose blocks `read(offset, count)` returns: the superblock
/// (checked by `check`), then every region it points at. Never panics on any bytes (fuzzed:
/// `fuzz/fuzz_targets/ftl_md.rs`).
pub fn decode_checkpoint(
    read: &mut dyn FnMut(u64, u64) -> Result<Vec<u8>, FtlError>,
    check: &dyn Fn(&Superblock) -> Result<(), FtlError>,
    addr_space: u64,
) -> Result<Checkpoint, FtlError> {
    let bad = |id: RegionId, e: LayoutError| FtlError::Corrupt(format!("{}: {e}", id.name()));
    let first = read(0, 1)?;
    let sb = Superblock::decode(&first).map_err(|e| bad(RegionId::Superblock, e))?;
    check(&sb)?;
    let nb = sb.num_bands as usize;
    let mut read_region = |id: RegionId| -> Result<Vec<u8>, FtlError> {
        let off = u64::from(sb.region_offsets[id as usize]);
        let head = read(off, 1)?;
        let len = layout::region_len(id, &head).map_err(|e| bad(id, e))?;
        let blocks = layout::region_blocks(len) as u64;
        let all = read(off, blocks)?;
        Ok(layout::decode_region(id, &all).map_err(|e| bad(id, e))?.to_vec())
    };
    let bands_p = read_region(RegionId::BandMd)?;
    let bands = layout::decode_bands(&bands_p, nb).map_err(|e| bad(RegionId::BandMd, e))?;
    let l2p_p = read_region(RegionId::L2p)?;
    let l2p = layout::decode_l2p(&l2p_p, sb.num_lbas as usize, sb.l2p_entry_bytes)
        .map_err(|e| bad(RegionId::L2p, e))?;
    let valid_p = read_region(RegionId::ValidMap)?;
    let valid = layout::decode_bitmap(&valid_p, addr_space as usize, "valid map")
        .map_err(|e| bad(RegionId::ValidMap, e))?;
    let trim_p = read_region(RegionId::TrimMap)?;
    let trim = layout::decode_bitmap(&trim_p, sb.num_lbas as usize, "trim map")
        .map_err(|e| bad(RegionId::TrimMap, e))?;
    Ok(Checkpoint { sb, bands, l2p, valid, trim })
}

/// Where the metadata areas are and what they hold.
pub struct Loaded {
    /// The checkpoint used.
    pub ckpt: Checkpoint,
    /// Bands per area.
    pub md_bands: u32,
    /// The primary was bad (and the mirror used): it needs rewriting.
    pub primary_bad: Option<String>,
}

/// The parallel units of another FTL on this media that overlap `begin..=end`: a primary
/// superblock (an FTL's block 0: chunk 0, block 0 of the first unit of its range) on any unit of the
/// media that names a range overlapping this one and is not exactly this one. A format of this
/// range would destroy part of that FTL (its units inside this range may hold nothing yet, so the
/// chunk states of this range alone cannot tell). Reads one block per written chunk 0; never writes.
pub fn foreign_ftl(
    media: &dyn MediaDevice,
    qp: &mut dyn QueuePair,
    begin: u32,
    end: u32,
) -> Option<(u32, u32)> {
    let g = &media.info().geometry;
    let ng = u64::from(g.num_grp).max(1);
    for i in 0..g.total_pus() {
        let chunk = Ppa::new(i % ng, i / ng, 0, 0);
        if !media.chunk_info(chunk).is_ok_and(|c| matches!(c.state, ChunkState::Open | ChunkState::Closed)) {
            continue;
        }
        let Ok(ppas) = PpaList::contiguous(chunk, 1) else { continue };
        let done = exec(qp, Op::Read { ppas, data: SgList::from(vec![0u8; BLOCK_BYTES]), oob: None });
        if !done.status.is_success() {
            continue;
        }
        let Some(block) = done.buffers.data.map(|d| d.to_vec()) else { continue };
        let Ok(sb) = Superblock::decode(&block) else { continue };
        if sb.pu_begin <= end && begin <= sb.pu_end && (sb.pu_begin, sb.pu_end) != (begin, end) {
            return Some((sb.pu_begin, sb.pu_end));
        }
    }
    None
}

/// Loads the checkpoint: primary, else mirror. Never writes.
pub fn load(media: &dyn MediaDevice, qp: &mut dyn QueuePair, geo: &Geo) -> Result<Loaded, FtlError> {
    // The area size is not known before a superblock is read: read the primary with the
    // largest area and let the superblock's offsets lead.
    let primary = read_area(media, qp, geo, 0, MAX_MD_BANDS.min(geo.num_bands / 2));
    let primary_err = match primary {
        Ok(ckpt) if !ckpt.sb.mirror => {
            let k = ckpt.sb.md_bands;
            // Re-read within the real area bounds: the earlier read may have crossed into the mirror.
            let again = read_area(media, qp, geo, 0, k)?;
            return Ok(Loaded { ckpt: again, md_bands: k, primary_bad: None });
        }
        Ok(_) => "block 0 holds a mirror superblock".to_string(),
        Err(e @ FtlError::Config { .. }) => return Err(e),
        Err(e) => e.to_string(),
    };
    let mut mirror_err = String::from("no mirror superblock found");
    for k in 1..=MAX_MD_BANDS.min(geo.num_bands / 2) {
        match read_area(media, qp, geo, k, k) {
            Ok(ckpt) if ckpt.sb.mirror && ckpt.sb.md_bands == k => {
                return Ok(Loaded { ckpt, md_bands: k, primary_bad: Some(primary_err) });
            }
            Ok(_) => {}
            Err(e) => {
                if matches!(e, FtlError::Corrupt(ref m) if !m.starts_with("superblock")) {
                    mirror_err = e.to_string();
                }
            }
        }
    }
    Err(FtlError::Corrupt(format!(
        "both metadata copies are unusable: primary: {primary_err}; mirror: {mirror_err}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(num_bands: usize, num_lbas: usize, entry_bytes: u32, addr_space: usize) -> Checkpoint {
        let sb = Superblock {
            uuid: [3; 16],
            pu_begin: 0,
            pu_end: 3,
            num_lbas: num_lbas as u64,
            num_bands: num_bands as u32,
            md_bands: 2,
            mirror: false,
            clean: true,
            ckpt_seq: 1,
            generation: 1,
            l2p_entry_bytes: entry_bytes,
            lba_rsvd: 20,
            region_offsets: [0; 5],
        };
        Checkpoint {
            sb,
            bands: vec![layout::BandRecord::default(); num_bands],
            l2p: vec![layout::UNMAPPED; num_lbas],
            valid: vec![0; addr_space.div_ceil(64)],
            trim: vec![0; num_lbas.div_ceil(64)],
        }
    }

    /// The areas are sized with `blocks_needed`: it must be exactly what `encode` produces. The
    /// sizes make every region span several blocks, so each term of the sum shows.
    #[test]
    fn blocks_needed_is_the_encoded_size() {
        for (bands, lbas, entry, space) in [(300, 40_000, 4, 100_000), (130, 70_000, 8, 300_000)] {
            let ck = checkpoint(bands, lbas, entry, space);
            let encoded = ck.encode(false).len();
            assert_eq!(encoded % BLOCK_BYTES, 0);
            assert_eq!(
                Checkpoint::blocks_needed(bands, lbas as u64, entry, space as u64),
                (encoded / BLOCK_BYTES) as u64,
                "bands {bands}, lbas {lbas}, entry {entry}, address space {space}"
            );
        }
    }
}
