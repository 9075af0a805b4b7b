//! The emulator's persistent image format: header, chunk table, OOB area, data area.
//!
//! ```text
//! offset 0            header (4096 B): magic "VBLKOCSD", format version, geometry,
//!                     region offsets, image length, crc32c of bytes 0..4092 at 4092
//! chunk_table_offset  one 64-byte record per chunk (log index order):
//!                       0..32 chunk information entry (spec layout), 32..40 erase count,
//!                       60..64 crc32c of bytes 0..60
//! oob_offset          oob_bytes per block, chunk-major: (chunk_index*clba + lbk)*oob_bytes
//! data_offset         block_size per block, chunk-major: (chunk_index*clba + lbk)*block_size
//! ```
//!
//! # Design
//! The persisted types are separate from the runtime ones and versioned
//! ([`IMAGE_VERSION`]). Decoding never trusts the file: every size is recomputed from the
//! geometry with checked arithmetic and compared, so a foreign, torn, truncated or corrupt
//! image is an error with a clear message, never a panic. Regions are 4 KiB aligned so data
//! I/O stays page aligned.
//!
//! # Limitations
//! A chunk record is rewritten after each data write; a crash between the two loses the
//! last write's write-pointer advance (the data stays unreachable, as on real media).

use super::super::driver::MediaError;
use super::super::ppa::PpaFormat;
use super::super::spec::{ChunkInfo, ChunkState, LbaFormat, CHUNK_INFO_ENTRY_BYTES, MAX_VECTOR_LBAS};

/// Header magic.
pub const MAGIC: [u8; 8] = *b"VBLKOCSD";
/// Image format version this build writes and reads.
pub const IMAGE_VERSION: u32 = 1;
/// Header size.
pub const HEADER_BYTES: usize = 4096;
/// Chunk record size.
pub const CHUNK_RECORD_BYTES: usize = 64;
/// Logical block size of the emulator.
pub const BLOCK_SIZE_BYTES: u32 = 4096;
/// Smallest OOB size per block.
pub const MIN_OOB_BYTES: u32 = 16;
/// Largest OOB size per block.
pub const MAX_OOB_BYTES: u32 = 1024;
const ALIGN_BYTES: u64 = 4096;
const CRC_OFFSET: usize = HEADER_BYTES - 4;

/// The emulated geometry (what `vblkd media create` configures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmuGeometry {
    /// Groups.
    pub num_grp: u32,
    /// Parallel units per group.
    pub num_pu: u32,
    /// Chunks per parallel unit.
    pub num_chk: u32,
    /// Blocks per chunk.
    pub clba: u32,
    /// Minimum write size (blocks).
    pub ws_min: u32,
    /// Optimal write size (blocks).
    pub ws_opt: u32,
    /// Cache minimum write size units (reported; the emulator has no write cache).
    pub mw_cunits: u32,
    /// OOB bytes per block.
    pub oob_bytes: u32,
    /// `MCCAP_*` bits.
    pub mccap: u32,
    /// Erase cycles after which a chunk wears out (goes offline).
    pub pe_cycles: u32,
}

impl Default for EmuGeometry {
    fn default() -> Self {
        EmuGeometry {
            num_grp: 2,
            num_pu: 4,
            num_chk: 64,
            clba: 1024,
            ws_min: 4,
            ws_opt: 16,
            mw_cunits: 0,
            oob_bytes: 16,
            mccap: super::super::spec::MCCAP_VECTOR_COPY
                | super::super::spec::MCCAP_MULTIPLE_RESETS
                | super::super::spec::MCCAP_EARLY_RESET,
            pe_cycles: 100_000,
        }
    }
}

fn bad(field: &'static str, reason: String) -> MediaError {
    MediaError::InvalidConfig { field, reason }
}

impl EmuGeometry {
    /// Checks every rule; errors name the spec field.
    pub fn validate(&self) -> Result<(), MediaError> {
        for (field, v) in [
            ("num_grp", self.num_grp),
            ("num_pu", self.num_pu),
            ("num_chk", self.num_chk),
            ("clba", self.clba),
            ("ws_min", self.ws_min),
            ("ws_opt", self.ws_opt),
            ("pe_cycles", self.pe_cycles),
        ] {
            if v == 0 {
                return Err(bad(field, "must be at least 1".into()));
            }
        }
        if self.num_grp > u32::from(u16::MAX) {
            return Err(bad("num_grp", format!("{} exceeds 65535", self.num_grp)));
        }
        if self.num_pu > u32::from(u16::MAX) {
            return Err(bad("num_pu", format!("{} exceeds 65535", self.num_pu)));
        }
        if self.ws_min as usize > MAX_VECTOR_LBAS {
            return Err(bad("ws_min", format!("{} exceeds the 64-LBA vector limit", self.ws_min)));
        }
        if self.ws_opt % self.ws_min != 0 {
            return Err(bad(
                "ws_opt",
                format!("{} is not a multiple of ws_min {}", self.ws_opt, self.ws_min),
            ));
        }
        if self.ws_opt as usize > MAX_VECTOR_LBAS {
            return Err(bad("ws_opt", format!("{} exceeds the 64-LBA vector limit", self.ws_opt)));
        }
        if self.clba % self.ws_opt != 0 {
            return Err(bad("clba", format!("{} is not a multiple of ws_opt {}", self.clba, self.ws_opt)));
        }
        if self.oob_bytes < MIN_OOB_BYTES || self.oob_bytes > MAX_OOB_BYTES {
            return Err(bad(
                "oob_bytes",
                format!("{} is outside {MIN_OOB_BYTES}..={MAX_OOB_BYTES}", self.oob_bytes),
            ));
        }
        PpaFormat::new(self.lbaf()).map_err(|e| bad("lbaf", e.to_string()))?;
        Layout::compute(self)?;
        Ok(())
    }

    /// The smallest LBA format for this geometry.
    pub fn lbaf(&self) -> LbaFormat {
        LbaFormat::for_sizes(
            u64::from(self.num_grp),
            u64::from(self.num_pu),
            u64::from(self.num_chk),
            u64::from(self.clba),
        )
    }

    /// Number of chunks.
    pub fn total_chunks(&self) -> u64 {
        u64::from(self.num_grp) * u64::from(self.num_pu) * u64::from(self.num_chk)
    }
}

/// Region offsets of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Start of the chunk table.
    pub chunk_table_offset: u64,
    /// Start of the OOB area.
    pub oob_offset: u64,
    /// Start of the data area.
    pub data_offset: u64,
    /// Total file length.
    pub image_bytes: u64,
}

fn align_up(v: u64) -> Option<u64> {
    v.checked_add(ALIGN_BYTES - 1).map(|x| x / ALIGN_BYTES * ALIGN_BYTES)
}

impl Layout {
    /// Lays out the regions; an overflowing geometry is an error.
    pub fn compute(g: &EmuGeometry) -> Result<Self, MediaError> {
        let overflow = || bad("geometry", "the image size overflows 64 bits".into());
        let chunks = g.total_chunks();
        let blocks = chunks.checked_mul(u64::from(g.clba)).ok_or_else(overflow)?;
        let table = chunks.checked_mul(CHUNK_RECORD_BYTES as u64).ok_or_else(overflow)?;
        let oob = blocks.checked_mul(u64::from(g.oob_bytes)).ok_or_else(overflow)?;
        let data = blocks.checked_mul(u64::from(BLOCK_SIZE_BYTES)).ok_or_else(overflow)?;
        let chunk_table_offset = HEADER_BYTES as u64;
        let oob_offset = align_up(chunk_table_offset + table).ok_or_else(overflow)?;
        let data_offset = oob_offset.checked_add(oob).and_then(align_up).ok_or_else(overflow)?;
        let image_bytes = data_offset.checked_add(data).ok_or_else(overflow)?;
        if image_bytes > i64::MAX as u64 {
            return Err(overflow());
        }
        Ok(Layout { chunk_table_offset, oob_offset, data_offset, image_bytes })
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(x)
}

/// Encodes the header.
pub fn encode_header(g: &EmuGeometry, l: &Layout) -> [u8; HEADER_BYTES] {
    let mut b = [0u8; HEADER_BYTES];
    b[0..8].copy_from_slice(&MAGIC);
    let words: [(usize, u32); 13] = [
        (8, IMAGE_VERSION),
        (12, HEADER_BYTES as u32),
        (16, g.num_grp),
        (20, g.num_pu),
        (24, g.num_chk),
        (28, g.clba),
        (32, g.ws_min),
        (36, g.ws_opt),
        (40, g.mw_cunits),
        (44, BLOCK_SIZE_BYTES),
        (48, g.oob_bytes),
        (52, g.mccap),
        (56, g.pe_cycles),
    ];
    for (off, v) in words {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    for (off, v) in [(64, l.chunk_table_offset), (72, l.oob_offset), (80, l.data_offset), (88, l.image_bytes)]
    {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
    b[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes and checks a header; `path` is for messages only. `buf` may be short (a
/// truncated file), which is reported as such.
pub fn decode_header(path: &str, buf: &[u8]) -> Result<(EmuGeometry, Layout), MediaError> {
    if buf.len() < MAGIC.len() || buf[..MAGIC.len()] != MAGIC {
        return Err(MediaError::NotAnImage { path: path.into() });
    }
    if buf.len() < HEADER_BYTES {
        return Err(MediaError::Truncated {
            path: path.into(),
            expected_bytes: HEADER_BYTES as u64,
            found_bytes: buf.len() as u64,
        });
    }
    let stored = u32_at(buf, CRC_OFFSET);
    let computed = crc32c::crc32c(&buf[..CRC_OFFSET]);
    if stored != computed {
        return Err(MediaError::HeaderChecksum { path: path.into(), stored, computed });
    }
    let version = u32_at(buf, 8);
    if version != IMAGE_VERSION {
        return Err(MediaError::UnsupportedVersion {
            path: path.into(),
            found: version,
            supported: IMAGE_VERSION,
        });
    }
    let corrupt = |reason: String| MediaError::CorruptHeader { path: path.into(), reason };
    if u32_at(buf, 12) as usize != HEADER_BYTES {
        return Err(corrupt(format!("header size {}", u32_at(buf, 12))));
    }
    if u32_at(buf, 44) != BLOCK_SIZE_BYTES {
        return Err(corrupt(format!("block size {}", u32_at(buf, 44))));
    }
    let g = EmuGeometry {
        num_grp: u32_at(buf, 16),
        num_pu: u32_at(buf, 20),
        num_chk: u32_at(buf, 24),
        clba: u32_at(buf, 28),
        ws_min: u32_at(buf, 32),
        ws_opt: u32_at(buf, 36),
        mw_cunits: u32_at(buf, 40),
        oob_bytes: u32_at(buf, 48),
        mccap: u32_at(buf, 52),
        pe_cycles: u32_at(buf, 56),
    };
    g.validate().map_err(|e| corrupt(e.to_string()))?;
    let layout = Layout::compute(&g).map_err(|e| corrupt(e.to_string()))?;
    let stored_layout = Layout {
        chunk_table_offset: u64_at(buf, 64),
        oob_offset: u64_at(buf, 72),
        data_offset: u64_at(buf, 80),
        image_bytes: u64_at(buf, 88),
    };
    if stored_layout != layout {
        return Err(corrupt(format!(
            "region offsets {stored_layout:?} do not match the geometry ({layout:?})"
        )));
    }
    Ok((g, layout))
}

/// The persisted state of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRecord {
    /// The chunk information entry.
    pub info: ChunkInfo,
    /// Number of resets so far.
    pub erase_count: u64,
}

impl ChunkRecord {
    /// Encodes the 64-byte record.
    pub fn encode(&self) -> [u8; CHUNK_RECORD_BYTES] {
        let mut b = [0u8; CHUNK_RECORD_BYTES];
        b[..CHUNK_INFO_ENTRY_BYTES].copy_from_slice(&self.info.encode());
        b[32..40].copy_from_slice(&self.erase_count.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a record of chunk `expected_slba` with `clba` blocks.
    pub fn decode(b: &[u8], expected_slba: u64, clba: u64) -> Result<Self, String> {
        if b.len() < CHUNK_RECORD_BYTES {
            return Err(format!("record of {} bytes", b.len()));
        }
        let stored = u32_at(b, 60);
        let computed = crc32c::crc32c(&b[..60]);
        if stored != computed {
            return Err(format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"));
        }
        let info = ChunkInfo::decode(&b[..CHUNK_INFO_ENTRY_BYTES]).map_err(|e| e.to_string())?;
        if info.slba != expected_slba {
            return Err(format!("slba {:#x}, expected {expected_slba:#x}", info.slba));
        }
        if info.cnlb != clba {
            return Err(format!("cnlb {}, expected {clba}", info.cnlb));
        }
        let wp = info.write_pointer_blocks;
        let ok = match info.state {
            ChunkState::Free => wp == 0,
            ChunkState::Open => wp > 0 && wp < clba,
            ChunkState::Closed => wp <= clba,
            ChunkState::Offline => true,
        };
        if !ok {
            return Err(format!("state {:?} with write pointer {wp} of {clba}", info.state));
        }
        Ok(ChunkRecord { info, erase_count: u64_at(b, 32) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_torn_header() {
        let g = EmuGeometry::default();
        let l = Layout::compute(&g).expect("fits");
        assert_eq!(l.data_offset % 4096, 0);
        let h = encode_header(&g, &l);
        assert_eq!(decode_header("x", &h).expect("valid"), (g, l));
        let mut torn = h;
        torn[2048..].fill(0);
        assert!(matches!(decode_header("x", &torn), Err(MediaError::HeaderChecksum { .. })));
        assert!(matches!(decode_header("x", &h[..100]), Err(MediaError::Truncated { .. })));
        assert!(matches!(decode_header("x", b"ELF\x7f...."), Err(MediaError::NotAnImage { .. })));
    }

    #[test]
    fn newer_version_is_refused() {
        let g = EmuGeometry::default();
        let l = Layout::compute(&g).expect("fits");
        let mut h = encode_header(&g, &l);
        h[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&h[..CRC_OFFSET]);
        h[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode_header("x", &h), Err(MediaError::UnsupportedVersion { found: 2, .. })));
    }

    #[test]
    fn geometry_rules_name_the_field() {
        let field_of = |g: EmuGeometry| match g.validate() {
            Err(MediaError::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        };
        let d = EmuGeometry::default();
        assert_eq!(field_of(EmuGeometry { num_grp: 0, ..d }), "num_grp");
        assert_eq!(field_of(EmuGeometry { clba: 0, ..d }), "clba");
        assert_eq!(field_of(EmuGeometry { ws_min: 4, ws_opt: 6, ..d }), "ws_opt");
        assert_eq!(field_of(EmuGeometry { oob_bytes: 8, ..d }), "oob_bytes");
        assert_eq!(
            field_of(EmuGeometry {
                num_chk: u32::MAX,
                clba: u32::MAX - 15,
                num_grp: 65535,
                num_pu: 65535,
                ..d
            }),
            "lbaf"
        );
    }

    #[test]
    fn chunk_record_checks() {
        let r = ChunkRecord {
            info: ChunkInfo {
                state: ChunkState::Open,
                kind: 1,
                wear_index: 0,
                slba: 0x400,
                cnlb: 1024,
                write_pointer_blocks: 8,
            },
            erase_count: 3,
        };
        let b = r.encode();
        assert_eq!(ChunkRecord::decode(&b, 0x400, 1024), Ok(r));
        assert!(ChunkRecord::decode(&b, 0x800, 1024).is_err());
        let mut flipped = b;
        flipped[24] ^= 1;
        assert!(ChunkRecord::decode(&flipped, 0x400, 1024).is_err());
        let free_with_wp = ChunkRecord { info: ChunkInfo { state: ChunkState::Free, ..r.info }, ..r };
        assert!(ChunkRecord::decode(&free_with_wp.encode(), 0x400, 1024).is_err());
    }
}
