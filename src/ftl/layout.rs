//! On-media formats of the FTL: metadata regions, band head/tail metadata and per-block OOB.
//! Pure encode/decode functions, separate from the runtime types; every format has a magic, a
//! version and a CRC32C, and decoding never panics on any input (a fuzz-friendly surface).
//!
//! ```text
//!  metadata area (bands 0..k = primary, k..2k = mirror), chunk-major block order:
//!   ┌──────────┬──────────┬──────────┬────────────┬────────────┐
//!   │superblock│ band md  │   L2P    │ valid map  │  trim map  │   each: RegionHeader + payload,
//!   └──────────┴──────────┴──────────┴────────────┴────────────┘   padded to whole 4 KiB blocks
//!  data band: pos 0 = head md │ data positions ... │ tail md (LBA of every position) at the end
//!  OOB of every written block: lba u64 LE | seq u64 LE   (lba = PAD/HEAD/TAIL for non-user blocks)
//! ```
//!
//! # Design
//! A region header carries `magic, region id, version, payload length, payload crc32c` and its own
//! crc32c, so a torn or corrupt region is detected on its own. The superblock lists every region's
//! offset (in blocks from the start of the area) and is itself region 0 at block 0. L2P entries are 4
//! bytes when the device has fewer than `u32::MAX` addresses (every address is then below `u32::MAX`,
//! which means unmapped), else 8.
//!
//! # Limitations
//! Little-endian only on media (explicit `to_le_bytes`), so images move between hosts freely; there
//! is no compression of the L2P.

use thiserror::Error;

/// Bytes of a block.
pub const BLOCK_BYTES: usize = 4096;
/// OOB bytes the FTL uses per block (lba + seq).
pub const OOB_BYTES_USED: usize = 16;
/// Format version of every region written by this build.
pub const VERSION: u32 = 1;
/// OOB lba of a pad block.
pub const LBA_PAD: u64 = u64::MAX;
/// OOB lba of a band head block.
pub const LBA_HEAD: u64 = u64::MAX - 1;
/// OOB lba of a band tail block.
pub const LBA_TAIL: u64 = u64::MAX - 2;
/// OOB lba of a metadata-area block.
pub const LBA_MD: u64 = u64::MAX - 3;
/// L2P value of an unmapped LBA (in memory and in 8-byte persisted entries).
pub const UNMAPPED: u64 = u64::MAX;

const REGION_MAGIC: u32 = 0x5247_4C46; // "FLGR"
const HEAD_MAGIC: u64 = 0x4441_4548_4C54_4656; // "VFTLHEAD"
const TAIL_MAGIC: u64 = 0x4C49_4154_4C54_4656; // "VFTLTAIL"
const SB_MAGIC: u64 = 0x4253_4C54_4644_4B42; // "BKDFTLSB"
const REGION_HEADER_BYTES: usize = 32;

/// Why an on-media structure was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    /// Too short to hold the structure.
    #[error("{what}: truncated ({got} bytes, need {need})")]
    Truncated {
        /// Structure.
        what: &'static str,
        /// Bytes available.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Wrong magic number.
    #[error("{0}: bad magic")]
    BadMagic(&'static str),
    /// Unsupported version.
    #[error("{what}: version {found} not supported (this build reads {VERSION})")]
    Version {
        /// Structure.
        what: &'static str,
        /// Found.
        found: u32,
    },
    /// Checksum mismatch.
    #[error("{0}: checksum mismatch")]
    Checksum(&'static str),
    /// A field has an impossible value.
    #[error("{what}: {reason}")]
    Invalid {
        /// Structure.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// Metadata region identifiers (also their order in the area).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionId {
    /// Superblock.
    Superblock = 0,
    /// Per-band metadata.
    BandMd = 1,
    /// Logical-to-physical table.
    L2p = 2,
    /// Valid map (one bit per media position).
    ValidMap = 3,
    /// Trim map (one bit per LBA: unmapped).
    TrimMap = 4,
}

/// All regions in area order.
pub const REGIONS: [RegionId; 5] =
    [RegionId::Superblock, RegionId::BandMd, RegionId::L2p, RegionId::ValidMap, RegionId::TrimMap];

impl RegionId {
    /// Name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            RegionId::Superblock => "superblock",
            RegionId::BandMd => "band metadata",
            RegionId::L2p => "L2P",
            RegionId::ValidMap => "valid map",
            RegionId::TrimMap => "trim map",
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Blocks needed for `bytes`.
pub fn blocks_for(bytes: usize) -> usize {
    bytes.div_ceil(BLOCK_BYTES)
}

/// Encodes one region (header + payload), padded to whole blocks.
pub fn encode_region(id: RegionId, payload: &[u8]) -> Vec<u8> {
    let total = blocks_for(REGION_HEADER_BYTES + payload.len()) * BLOCK_BYTES;
    let mut out = vec![0u8; total];
    out[0..4].copy_from_slice(&REGION_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&(id as u32).to_le_bytes());
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    out[24..28].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let hcrc = crc32c::crc32c(&out[0..28]);
    out[28..32].copy_from_slice(&hcrc.to_le_bytes());
    out[REGION_HEADER_BYTES..REGION_HEADER_BYTES + payload.len()].copy_from_slice(payload);
    out
}

/// Payload length of a region from its first block (to know how much to read).
pub fn region_len(id: RegionId, first_block: &[u8]) -> Result<usize, LayoutError> {
    let what = id.name();
    if first_block.len() < REGION_HEADER_BYTES {
        return Err(LayoutError::Truncated { what, got: first_block.len(), need: REGION_HEADER_BYTES });
    }
    if u32_at(first_block, 0) != REGION_MAGIC {
        return Err(LayoutError::BadMagic(what));
    }
    if crc32c::crc32c(&first_block[0..28]) != u32_at(first_block, 28) {
        return Err(LayoutError::Checksum(what));
    }
    if u32_at(first_block, 4) != id as u32 {
        return Err(LayoutError::Invalid { what, reason: format!("region id {}", u32_at(first_block, 4)) });
    }
    let v = u32_at(first_block, 8);
    if v != VERSION {
        return Err(LayoutError::Version { what, found: v });
    }
    usize::try_from(u64_at(first_block, 16))
        .ok()
        .filter(|n| *n <= 1 << 40)
        .ok_or_else(|| LayoutError::Invalid { what, reason: "length too large".into() })
}

/// Decodes a region from its blocks; returns the payload.
pub fn decode_region(id: RegionId, bytes: &[u8]) -> Result<&[u8], LayoutError> {
    let len = region_len(id, bytes)?;
    let what = id.name();
    let need = REGION_HEADER_BYTES + len;
    let payload = bytes.get(REGION_HEADER_BYTES..need).ok_or(LayoutError::Truncated {
        what,
        got: bytes.len(),
        need,
    })?;
    if crc32c::crc32c(payload) != u32_at(bytes, 24) {
        return Err(LayoutError::Checksum(what));
    }
    Ok(payload)
}

/// Blocks a region with `payload_len` bytes takes.
pub fn region_blocks(payload_len: usize) -> usize {
    blocks_for(REGION_HEADER_BYTES + payload_len)
}

/// The superblock: identity, geometry summary, checkpoint and region directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Superblock {
    /// FTL identity.
    #[serde(serialize_with = "ser_uuid")]
    pub uuid: [u8; 16],
    /// First parallel unit of the range.
    pub pu_begin: u32,
    /// Last parallel unit of the range (inclusive).
    pub pu_end: u32,
    /// Exposed logical blocks.
    pub num_lbas: u64,
    /// Bands (chunks per PU).
    pub num_bands: u32,
    /// Bands per metadata area.
    pub md_bands: u32,
    /// True for the mirror copy.
    pub mirror: bool,
    /// True when written by a clean shutdown (no replay needed).
    pub clean: bool,
    /// Sequence number at the checkpoint: media blocks with a smaller sequence are reflected in it.
    pub ckpt_seq: u64,
    /// Persist counter.
    pub generation: u64,
    /// Bytes per persisted L2P entry (4 or 8).
    pub l2p_entry_bytes: u32,
    /// `lba-rsvd` used at creation.
    pub lba_rsvd: u32,
    /// Offset in blocks of each region within the area, indexed by [`RegionId`].
    pub region_offsets: [u32; 5],
}

fn ser_uuid<S: serde::Serializer>(u: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_uuid(u))
}

/// Formats a UUID as 8-4-4-4-12 hex.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Parses a UUID in 8-4-4-4-12 (or plain 32-digit) hex.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(u)
}

const SB_PAYLOAD_BYTES: usize = 120;

impl Superblock {
    /// Encodes as a region.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = vec![0u8; SB_PAYLOAD_BYTES];
        p[0..8].copy_from_slice(&SB_MAGIC.to_le_bytes());
        p[8..24].copy_from_slice(&self.uuid);
        p[24..28].copy_from_slice(&self.pu_begin.to_le_bytes());
        p[28..32].copy_from_slice(&self.pu_end.to_le_bytes());
        p[32..40].copy_from_slice(&self.num_lbas.to_le_bytes());
        p[40..44].copy_from_slice(&self.num_bands.to_le_bytes());
        p[44..48].copy_from_slice(&self.md_bands.to_le_bytes());
        p[48] = u8::from(self.mirror);
        p[49] = u8::from(self.clean);
        p[56..64].copy_from_slice(&self.ckpt_seq.to_le_bytes());
        p[64..72].copy_from_slice(&self.generation.to_le_bytes());
        p[72..76].copy_from_slice(&self.l2p_entry_bytes.to_le_bytes());
        p[76..80].copy_from_slice(&self.lba_rsvd.to_le_bytes());
        for (i, o) in self.region_offsets.iter().enumerate() {
            p[80 + 4 * i..84 + 4 * i].copy_from_slice(&o.to_le_bytes());
        }
        encode_region(RegionId::Superblock, &p)
    }

    /// Decodes from the area's first block(s).
    pub fn decode(bytes: &[u8]) -> Result<Self, LayoutError> {
        let p = decode_region(RegionId::Superblock, bytes)?;
        let what = "superblock";
        if p.len() < SB_PAYLOAD_BYTES {
            return Err(LayoutError::Truncated { what, got: p.len(), need: SB_PAYLOAD_BYTES });
        }
        if u64_at(p, 0) != SB_MAGIC {
            return Err(LayoutError::BadMagic(what));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&p[8..24]);
        let mut region_offsets = [0u32; 5];
        for (i, o) in region_offsets.iter_mut().enumerate() {
            *o = u32_at(p, 80 + 4 * i);
        }
        let sb = Superblock {
            uuid,
            pu_begin: u32_at(p, 24),
            pu_end: u32_at(p, 28),
            num_lbas: u64_at(p, 32),
            num_bands: u32_at(p, 40),
            md_bands: u32_at(p, 44),
            mirror: p[48] != 0,
            clean: p[49] != 0,
            ckpt_seq: u64_at(p, 56),
            generation: u64_at(p, 64),
            l2p_entry_bytes: u32_at(p, 72),
            lba_rsvd: u32_at(p, 76),
            region_offsets,
        };
        if sb.l2p_entry_bytes != 4 && sb.l2p_entry_bytes != 8 {
            return Err(LayoutError::Invalid {
                what,
                reason: format!("L2P entry size {}", sb.l2p_entry_bytes),
            });
        }
        if sb.pu_end < sb.pu_begin
            || sb.md_bands == 0
            || 2 * u64::from(sb.md_bands) >= u64::from(sb.num_bands)
        {
            return Err(LayoutError::Invalid { what, reason: "inconsistent geometry".into() });
        }
        Ok(sb)
    }
}

/// Persisted state of one band.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BandRecord {
    /// Band state code (see `band::BandState::code`).
    pub state: u8,
    /// Sequence number of the band's position 0 in its current incarnation.
    pub base_seq: u64,
    /// Bitmap of retired chunks (bit = PU index within the range, up to 64 PUs tracked).
    pub retired: u64,
    /// Erases of the band.
    pub erase_count: u64,
}

const BAND_RECORD_BYTES: usize = 32;

/// Encodes the band metadata region payload.
pub fn encode_bands(bands: &[BandRecord]) -> Vec<u8> {
    let mut p = Vec::with_capacity(bands.len() * BAND_RECORD_BYTES);
    for b in bands {
        p.push(b.state);
        p.extend_from_slice(&[0u8; 7]);
        p.extend_from_slice(&b.base_seq.to_le_bytes());
        p.extend_from_slice(&b.retired.to_le_bytes());
        p.extend_from_slice(&b.erase_count.to_le_bytes());
    }
    p
}

/// Decodes the band metadata region payload.
pub fn decode_bands(p: &[u8], num_bands: usize) -> Result<Vec<BandRecord>, LayoutError> {
    if p.len() != num_bands * BAND_RECORD_BYTES {
        return Err(LayoutError::Invalid {
            what: "band metadata",
            reason: format!("{} bytes for {num_bands} bands", p.len()),
        });
    }
    Ok(p.chunks_exact(BAND_RECORD_BYTES)
        .map(|r| BandRecord {
            state: r[0],
            base_seq: u64_at(r, 8),
            retired: u64_at(r, 16),
            erase_count: u64_at(r, 24),
        })
        .collect())
}

/// Encodes L2P values (media addresses or [`UNMAPPED`]) with `entry_bytes` per entry.
pub fn encode_l2p(values: &[u64], entry_bytes: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(values.len() * entry_bytes as usize);
    for &v in values {
        if entry_bytes == 4 {
            let e = if v == UNMAPPED { u32::MAX } else { u32::try_from(v).unwrap_or(u32::MAX) };
            p.extend_from_slice(&e.to_le_bytes());
        } else {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    p
}

/// Decodes L2P values.
pub fn decode_l2p(p: &[u8], num_lbas: usize, entry_bytes: u32) -> Result<Vec<u64>, LayoutError> {
    let eb = entry_bytes as usize;
    if eb != 4 && eb != 8 {
        return Err(LayoutError::Invalid { what: "L2P", reason: format!("entry size {eb}") });
    }
    if num_lbas.checked_mul(eb) != Some(p.len()) {
        return Err(LayoutError::Invalid {
            what: "L2P",
            reason: format!("{} bytes for {num_lbas} entries", p.len()),
        });
    }
    Ok(p.chunks_exact(eb)
        .map(|e| {
            if eb == 4 {
                let v = u32_at(e, 0);
                if v == u32::MAX {
                    UNMAPPED
                } else {
                    u64::from(v)
                }
            } else {
                u64_at(e, 0)
            }
        })
        .collect())
}

/// Per-block OOB: (lba, seq).
pub fn encode_oob(lba: u64, seq: u64, out: &mut [u8]) {
    if out.len() >= OOB_BYTES_USED {
        out[0..8].copy_from_slice(&lba.to_le_bytes());
        out[8..16].copy_from_slice(&seq.to_le_bytes());
    }
}

/// Decodes an OOB entry.
pub fn decode_oob(b: &[u8]) -> (u64, u64) {
    (u64_at(b, 0), u64_at(b, 8))
}

/// Band head metadata (position 0 of a band).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandHead {
    /// FTL identity.
    pub uuid: [u8; 16],
    /// Band index.
    pub band: u32,
    /// Sequence number of position 0.
    pub base_seq: u64,
    /// Chunks used by this incarnation (bit = PU index within the range).
    pub good_mask: u64,
}

impl BandHead {
    /// Encodes into one block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_BYTES];
        b[0..8].copy_from_slice(&HEAD_MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.band.to_le_bytes());
        b[16..32].copy_from_slice(&self.uuid);
        b[32..40].copy_from_slice(&self.base_seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.good_mask.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes one block.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let what = "band head";
        if b.len() < 52 {
            return Err(LayoutError::Truncated { what, got: b.len(), need: 52 });
        }
        if u64_at(b, 0) != HEAD_MAGIC {
            return Err(LayoutError::BadMagic(what));
        }
        if crc32c::crc32c(&b[0..48]) != u32_at(b, 48) {
            return Err(LayoutError::Checksum(what));
        }
        let v = u32_at(b, 8);
        if v != VERSION {
            return Err(LayoutError::Version { what, found: v });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        Ok(BandHead { uuid, band: u32_at(b, 12), base_seq: u64_at(b, 32), good_mask: u64_at(b, 40) })
    }
}

const TAIL_HEADER_BYTES: usize = 48;

/// Bytes of the tail metadata of a band with `positions` positions.
pub fn tail_bytes(positions: usize) -> usize {
    TAIL_HEADER_BYTES + 8 * positions
}

/// Decoded tail metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandTail {
    /// Band index.
    pub band: u32,
    /// Sequence number of position 0.
    pub base_seq: u64,
    /// Chunks of this incarnation.
    pub good_mask: u64,
    /// LBA (or marker) of every block, by address offset within the band.
    pub lbas: Vec<u64>,
}

/// Encodes the tail metadata: the LBA (or PAD/HEAD/TAIL marker) of every block of the band.
pub fn encode_tail(band: u32, base_seq: u64, good_mask: u64, lbas: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; blocks_for(tail_bytes(lbas.len())) * BLOCK_BYTES];
    b[0..8].copy_from_slice(&TAIL_MAGIC.to_le_bytes());
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&band.to_le_bytes());
    b[16..24].copy_from_slice(&base_seq.to_le_bytes());
    b[24..32].copy_from_slice(&(lbas.len() as u64).to_le_bytes());
    b[36..44].copy_from_slice(&good_mask.to_le_bytes());
    for (i, l) in lbas.iter().enumerate() {
        b[TAIL_HEADER_BYTES + 8 * i..TAIL_HEADER_BYTES + 8 * i + 8].copy_from_slice(&l.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b[TAIL_HEADER_BYTES..tail_bytes(lbas.len())]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&b[0..44]);
    b[44..48].copy_from_slice(&hcrc.to_le_bytes());
    b
}

/// Decodes tail metadata.
pub fn decode_tail(b: &[u8]) -> Result<BandTail, LayoutError> {
    let what = "band tail";
    if b.len() < TAIL_HEADER_BYTES {
        return Err(LayoutError::Truncated { what, got: b.len(), need: TAIL_HEADER_BYTES });
    }
    if u64_at(b, 0) != TAIL_MAGIC {
        return Err(LayoutError::BadMagic(what));
    }
    if crc32c::crc32c(&b[0..44]) != u32_at(b, 44) {
        return Err(LayoutError::Checksum(what));
    }
    let v = u32_at(b, 8);
    if v != VERSION {
        return Err(LayoutError::Version { what, found: v });
    }
    let good_mask = u64_at(b, 36);
    let n = usize::try_from(u64_at(b, 24)).unwrap_or(usize::MAX);
    let need = n.checked_mul(8).and_then(|x| x.checked_add(TAIL_HEADER_BYTES)).unwrap_or(usize::MAX);
    let body = b.get(TAIL_HEADER_BYTES..need).ok_or(LayoutError::Truncated { what, got: b.len(), need })?;
    if crc32c::crc32c(body) != u32_at(b, 32) {
        return Err(LayoutError::Checksum(what));
    }
    Ok(BandTail {
        band: u32_at(b, 12),
        base_seq: u64_at(b, 16),
        good_mask,
        lbas: body.chunks_exact(8).map(|c| u64_at(c, 0)).collect(),
    })
}

/// A bitmap stored as little-endian u64 words.
pub fn encode_bitmap(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Decodes a bitmap of `bits` bits.
pub fn decode_bitmap(p: &[u8], bits: usize, what: &'static str) -> Result<Vec<u64>, LayoutError> {
    let words = bits.div_ceil(64);
    if p.len() != words * 8 {
        return Err(LayoutError::Invalid { what, reason: format!("{} bytes for {bits} bits", p.len()) });
    }
    Ok(p.chunks_exact(8).map(|c| u64_at(c, 0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_round_trip_and_detect_corruption() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut r = encode_region(RegionId::L2p, &payload);
        assert_eq!(r.len() % BLOCK_BYTES, 0);
        assert_eq!(decode_region(RegionId::L2p, &r).expect("ok"), &payload[..]);
        assert!(decode_region(RegionId::TrimMap, &r).is_err());
        r[5000] ^= 1;
        assert_eq!(decode_region(RegionId::L2p, &r), Err(LayoutError::Checksum("L2P")));
        assert!(decode_region(RegionId::L2p, &r[..100]).is_err());
        assert!(decode_region(RegionId::L2p, &[]).is_err());
    }

    #[test]
    fn superblock_round_trip() {
        let sb = Superblock {
            uuid: [7; 16],
            pu_begin: 1,
            pu_end: 6,
            num_lbas: 1234,
            num_bands: 20,
            md_bands: 1,
            mirror: true,
            clean: false,
            ckpt_seq: 99,
            generation: 3,
            l2p_entry_bytes: 4,
            lba_rsvd: 20,
            region_offsets: [0, 1, 2, 3, 4],
        };
        assert_eq!(Superblock::decode(&sb.encode()).expect("ok"), sb);
    }

    #[test]
    fn l2p_entries_4_and_8_bytes() {
        let v = vec![0, 5, UNMAPPED, 1 << 20];
        assert_eq!(decode_l2p(&encode_l2p(&v, 4), 4, 4).expect("4"), v);
        let w = vec![0, 1 << 40, UNMAPPED];
        assert_eq!(decode_l2p(&encode_l2p(&w, 8), 3, 8).expect("8"), w);
    }

    #[test]
    fn head_tail_round_trip() {
        let h = BandHead { uuid: [1; 16], band: 3, base_seq: 77, good_mask: 0b1011 };
        assert_eq!(BandHead::decode(&h.encode()).expect("head"), h);
        let lbas: Vec<u64> = (0..1000).chain([LBA_PAD, LBA_HEAD]).collect();
        let mut t = encode_tail(3, 77, 5, &lbas);
        assert_eq!(decode_tail(&t).expect("tail"), BandTail { band: 3, base_seq: 77, good_mask: 5, lbas });
        t[100] ^= 0xff;
        assert!(decode_tail(&t).is_err());
        assert!(decode_tail(&[0u8; 3]).is_err());
    }

    #[test]
    fn uuid_text() {
        let u = [0xab; 16];
        assert_eq!(parse_uuid(&format_uuid(&u)), Some(u));
        assert_eq!(parse_uuid("xyz"), None);
    }

    /// A region header with `len` as its payload length and the rest as `encode_region` writes it,
    /// after `edit` (the header's own checksum recomputed).
    fn header(id: RegionId, len: u64, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let mut h = encode_region(id, &[])[..REGION_HEADER_BYTES].to_vec();
        h[16..24].copy_from_slice(&len.to_le_bytes());
        edit(&mut h);
        let c = crc32c::crc32c(&h[0..28]);
        h[28..32].copy_from_slice(&c.to_le_bytes());
        h
    }

    #[test]
    fn block_counts() {
        assert_eq!([0, 1, 4096, 4097, 8192].map(blocks_for), [0, 1, 1, 2, 2]);
        assert_eq!([0, 4064, 4065].map(region_blocks), [1, 1, 2]);
        assert_eq!(encode_region(RegionId::BandMd, &[0u8; 4064]).len(), BLOCK_BYTES);
        assert_eq!(encode_region(RegionId::BandMd, &[0u8; 4065]).len(), 2 * BLOCK_BYTES);
        assert_eq!((tail_bytes(0), tail_bytes(3)), (48, 72));
    }

    /// Each refusal of a region header, by kind; a bare header (empty payload) is a whole region.
    #[test]
    fn region_headers_are_checked_field_by_field() {
        let names = REGIONS.map(RegionId::name);
        assert_eq!(names, ["superblock", "band metadata", "L2P", "valid map", "trim map"]);
        let r = encode_region(RegionId::ValidMap, b"abc");
        assert_eq!(&r[0..4], b"FLGR");
        assert_eq!((u32_at(&r, 4), u32_at(&r, 8), u64_at(&r, 16)), (3, VERSION, 3));
        assert_eq!(&r[32..35], b"abc");
        assert!(r[35..].iter().all(|b| *b == 0));
        let bare = header(RegionId::TrimMap, 0, |_| {});
        assert_eq!(decode_region(RegionId::TrimMap, &bare), Ok(&[][..]));
        assert_eq!(
            region_len(RegionId::TrimMap, &bare[..31]),
            Err(LayoutError::Truncated { what: "trim map", got: 31, need: 32 })
        );
        assert_eq!(
            region_len(RegionId::L2p, &header(RegionId::L2p, 5, |h| h[0] ^= 1)),
            Err(LayoutError::BadMagic("L2P"))
        );
        let mut torn = bare.clone();
        torn[20] ^= 1;
        assert_eq!(region_len(RegionId::TrimMap, &torn), Err(LayoutError::Checksum("trim map")));
        assert_eq!(
            region_len(RegionId::TrimMap, &header(RegionId::BandMd, 0, |_| {})),
            Err(LayoutError::Invalid { what: "trim map", reason: "region id 1".into() })
        );
        assert_eq!(
            region_len(RegionId::L2p, &header(RegionId::L2p, 0, |h| h[8] = 2)),
            Err(LayoutError::Version { what: "L2P", found: 2 })
        );
        // Lengths up to 2^40 bytes are taken (the caller then reads that much), not one more.
        assert_eq!(region_len(RegionId::L2p, &header(RegionId::L2p, 1 << 40, |_| {})), Ok(1 << 40));
        assert_eq!(
            region_len(RegionId::L2p, &header(RegionId::L2p, (1 << 40) + 1, |_| {})),
            Err(LayoutError::Invalid { what: "L2P", reason: "length too large".into() })
        );
        // A payload cut short by one byte.
        let r = encode_region(RegionId::L2p, &[9u8; 100]);
        assert_eq!(decode_region(RegionId::L2p, &r[..132]), Ok(&[9u8; 100][..]));
        assert_eq!(
            decode_region(RegionId::L2p, &r[..131]),
            Err(LayoutError::Truncated { what: "L2P", got: 131, need: 132 })
        );
    }

    fn sb() -> Superblock {
        Superblock {
            uuid: core::array::from_fn(|i| i as u8 * 17),
            pu_begin: 3,
            pu_end: 3,
            num_lbas: 0x0102_0304_0506,
            num_bands: 5,
            md_bands: 2,
            mirror: false,
            clean: true,
            ckpt_seq: 0x0a0b_0c0d_0e0f,
            generation: 0x1112_1314,
            l2p_entry_bytes: 8,
            lba_rsvd: 21,
            region_offsets: [0, 9, 18, 27, 36],
        }
    }

    /// A single-PU range and the largest area (2 * md_bands = num_bands - 1) are taken; one band
    /// fewer, a reversed range, no area or an odd L2P entry size are refused.
    #[test]
    fn superblock_geometry_limits() {
        let s = sb();
        assert_eq!(Superblock::decode(&s.encode()), Ok(s.clone()));
        let inconsistent =
            Err(LayoutError::Invalid { what: "superblock", reason: "inconsistent geometry".into() });
        let with = |f: &dyn Fn(&mut Superblock)| {
            let mut x = sb();
            f(&mut x);
            Superblock::decode(&x.encode())
        };
        assert_eq!(with(&|x| x.num_bands = 4), inconsistent);
        assert_eq!(with(&|x| x.pu_begin = 4), inconsistent);
        assert_eq!(with(&|x| x.md_bands = 0), inconsistent);
        assert!(with(&|x| (x.md_bands, x.num_bands) = (1, 3)).is_ok());
        assert!(with(&|x| x.l2p_entry_bytes = 4).is_ok());
        assert_eq!(
            with(&|x| x.l2p_entry_bytes = 5),
            Err(LayoutError::Invalid { what: "superblock", reason: "L2P entry size 5".into() })
        );
        // A superblock region whose payload is one byte short, or does not start with the magic.
        let p = &s.encode()[REGION_HEADER_BYTES..REGION_HEADER_BYTES + SB_PAYLOAD_BYTES];
        assert_eq!(
            Superblock::decode(&encode_region(RegionId::Superblock, &p[..119])),
            Err(LayoutError::Truncated { what: "superblock", got: 119, need: 120 })
        );
        let mut q = p.to_vec();
        q[0] ^= 1;
        assert_eq!(
            Superblock::decode(&encode_region(RegionId::Superblock, &q)),
            Err(LayoutError::BadMagic("superblock"))
        );
        assert_eq!(format_uuid(&s.uuid), "00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn uuid_text_parses_exactly_32_hex_digits() {
        let u: [u8; 16] = core::array::from_fn(|i| (i as u8) << 4 | (15 - i as u8));
        let t = format_uuid(&u);
        assert_eq!(t, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
        assert_eq!(parse_uuid(&t), Some(u));
        assert_eq!(parse_uuid(&t.replace('-', "")), Some(u));
        assert_eq!(parse_uuid(&t.to_uppercase()), Some(u));
        assert_eq!(parse_uuid(&t[1..]), None);
        assert_eq!(parse_uuid(&format!("{t}0")), None);
        // from_str_radix alone would take "+f" as 15.
        assert_eq!(parse_uuid(&format!("+f{}", &t[2..])), None);
        assert_eq!(parse_uuid(&format!("g{}", &t[1..])), None);
    }

    #[test]
    fn band_records_l2p_oob_and_bitmaps() {
        let recs = [
            BandRecord { state: 6, base_seq: 0x0102_0304, retired: 0b101, erase_count: 9 },
            BandRecord { state: 7, base_seq: u64::MAX, retired: 1 << 63, erase_count: 0 },
        ];
        let p = encode_bands(&recs);
        assert_eq!(p.len(), 64);
        assert_eq!(
            (p[0], &p[1..8], u64_at(&p, 8), u64_at(&p, 16), u64_at(&p, 24)),
            (6, &[0u8; 7][..], 0x0102_0304, 5, 9)
        );
        assert_eq!(decode_bands(&p, 2), Ok(recs.to_vec()));
        assert!(decode_bands(&p, 3).is_err() && decode_bands(&p[..63], 2).is_err());
        // 4-byte L2P entries: an address that does not fit reads back unmapped; 8-byte ones keep it.
        let v = [7, u64::from(u32::MAX) - 1, u64::from(u32::MAX), 1 << 33, UNMAPPED];
        let p4 = encode_l2p(&v, 4);
        assert_eq!(p4.len(), 20);
        assert_eq!(decode_l2p(&p4, 5, 4), Ok(vec![7, u64::from(u32::MAX) - 1, UNMAPPED, UNMAPPED, UNMAPPED]));
        assert_eq!(decode_l2p(&encode_l2p(&v, 8), 5, 8), Ok(v.to_vec()));
        assert!(
            decode_l2p(&p4, 5, 5).is_err()
                && decode_l2p(&p4, 4, 4).is_err()
                && decode_l2p(&p4, 5, 8).is_err()
        );
        assert!(decode_l2p(&p4, usize::MAX, 4).is_err());
        assert_eq!(decode_l2p(&[], 0, 8), Ok(vec![]));
        // OOB: lba then seq, written only into a buffer that holds both.
        let mut oob = [0xeeu8; 24];
        encode_oob(LBA_TAIL, 42, &mut oob[..16]);
        assert_eq!(decode_oob(&oob), (LBA_TAIL, 42));
        assert_eq!(oob[16..], [0xee; 8]);
        let mut short = [0xeeu8; 15];
        encode_oob(1, 2, &mut short);
        assert_eq!(short, [0xee; 15]);
        assert_eq!(decode_oob(&short[..4]), (0, 0));
        let markers = [LBA_PAD, LBA_HEAD, LBA_TAIL, LBA_MD];
        assert_eq!(markers, [u64::MAX, u64::MAX - 1, u64::MAX - 2, u64::MAX - 3]);
        // Bitmaps: whole words, little-endian.
        let p = encode_bitmap(&[1, 1 << 63]);
        assert_eq!(p[0..8], [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode_bitmap(&p, 65, "m"), Ok(vec![1, 1 << 63]));
        assert_eq!(decode_bitmap(&p, 128, "m"), Ok(vec![1, 1 << 63]));
        assert_eq!(
            decode_bitmap(&p, 64, "m"),
            Err(LayoutError::Invalid { what: "m", reason: "16 bytes for 64 bits".into() })
        );
        assert!(decode_bitmap(&p, 129, "m").is_err());
    }

    /// Head and tail blocks: exact sizes are taken, one byte short is refused, and each check
    /// (magic, checksums, version, length) has its own error.
    #[test]
    fn head_and_tail_refusals() {
        let h = BandHead { uuid: [3; 16], band: 9, base_seq: 1 << 40, good_mask: 1 << 63 | 1 };
        let b = h.encode();
        assert_eq!(BandHead::decode(&b[..52]), Ok(h.clone()));
        assert_eq!(
            BandHead::decode(&b[..51]),
            Err(LayoutError::Truncated { what: "band head", got: 51, need: 52 })
        );
        let mut x = b.clone();
        x[1] ^= 1;
        assert_eq!(BandHead::decode(&x), Err(LayoutError::BadMagic("band head")));
        let mut x = b.clone();
        x[40] ^= 1;
        assert_eq!(BandHead::decode(&x), Err(LayoutError::Checksum("band head")));
        let mut x = b.clone();
        x[8] = 2;
        let c = crc32c::crc32c(&x[0..48]);
        x[48..52].copy_from_slice(&c.to_le_bytes());
        assert_eq!(BandHead::decode(&x), Err(LayoutError::Version { what: "band head", found: 2 }));

        let lbas = [5, LBA_PAD, 1 << 50];
        let t = encode_tail(2, 3, 4, &lbas);
        assert_eq!(t.len(), BLOCK_BYTES);
        let want = BandTail { band: 2, base_seq: 3, good_mask: 4, lbas: lbas.to_vec() };
        assert_eq!(decode_tail(&t[..72]), Ok(want));
        assert_eq!(
            decode_tail(&t[..71]),
            Err(LayoutError::Truncated { what: "band tail", got: 71, need: 72 })
        );
        assert_eq!(
            decode_tail(&t[..47]),
            Err(LayoutError::Truncated { what: "band tail", got: 47, need: 48 })
        );
        assert_eq!(
            decode_tail(&t[..48]),
            Err(LayoutError::Truncated { what: "band tail", got: 48, need: 72 })
        );
        let mut x = t.clone();
        x[0] ^= 1;
        assert_eq!(decode_tail(&x), Err(LayoutError::BadMagic("band tail")));
        let mut x = t.clone();
        x[13] ^= 1;
        assert_eq!(decode_tail(&x), Err(LayoutError::Checksum("band tail")));
        let mut x = t.clone();
        x[60] ^= 1;
        assert_eq!(decode_tail(&x), Err(LayoutError::Checksum("band tail")));
        let mut x = t.clone();
        x[8] = 2;
        let c = crc32c::crc32c(&x[0..44]);
        x[44..48].copy_from_slice(&c.to_le_bytes());
        assert_eq!(decode_tail(&x), Err(LayoutError::Version { what: "band tail", found: 2 }));
        // A count whose byte size overflows is refused, not a panic.
        let mut x = t.clone();
        x[24..32].copy_from_slice(&(u64::MAX / 4).to_le_bytes());
        let c = crc32c::crc32c(&x[0..44]);
        x[44..48].copy_from_slice(&c.to_le_bytes());
        assert!(matches!(decode_tail(&x), Err(LayoutError::Truncated { need: usize::MAX, .. })));
        // A tail over more than one block.
        let many: Vec<u64> = (0..600).collect();
        let t = encode_tail(1, 0, 1, &many);
        assert_eq!(t.len(), 2 * BLOCK_BYTES);
        assert_eq!(decode_tail(&t).map(|d| d.lbas), Ok(many));
    }
}
