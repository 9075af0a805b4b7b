//! On-media format of a cache device (persistent metadata), separate from the runtime types.
//!
//! ```text
//!  byte 0        superblock copy A (4 KiB)   ┐ written alternately (sequence number decides);
//!  byte 4096     superblock copy B (4 KiB)   ┘ each: magic, version, seq, body length, CRC32C, JSON body
//!  byte 8192     line records: per cache line 2 × 64-byte slots (ping-pong), 32 lines per 4 KiB page
//!  data_offset   cache line data: line i at data_offset + i × line_size
//! ```
//!
//! # Design
//! * Every update leaves either the old or the new state readable after a crash: the superblock
//!   alternates between two copies, and a line record alternates between its two slots (slot
//!   `seq & 1`), so a torn write only ever damages the copy being written; the loader takes the valid
//!   copy with the highest sequence number.
//! * Each copy carries a CRC32C. A superblock with the magic but no valid copy, or a record whose two
//!   slots are both non-empty and both invalid, is *corrupt*: the cache refuses to load it.
//! * The superblock body is JSON (versioned by `VERSION`), because it is small, rarely written and
//!   read by `vblkd cache info`; line records are fixed-size binary.
//!
//! # Limitations
//! Up to 64 KiB lines with 512-byte blocks (128 sector bits per line, one `u128`).

use serde::{Deserialize, Serialize};

/// Magic at the start of each superblock copy.
pub const MAGIC: &[u8; 8] = b"VBLKCACH";
/// On-media format version.
pub const VERSION: u32 = 1;
/// Bytes per superblock copy.
pub const SB_BYTES: u64 = 4096;
/// Byte offset of the line records.
pub const MD_OFFSET: u64 = 2 * SB_BYTES;
/// Bytes per record slot.
pub const SLOT_BYTES: usize = 64;
/// Bytes per line (two slots).
pub const LINE_MD_BYTES: u64 = 2 * SLOT_BYTES as u64;
/// Metadata page (unit of record writes).
pub const PAGE_BYTES: u64 = 4096;
/// Lines per metadata page.
pub const LINES_PER_PAGE: u32 = (PAGE_BYTES / LINE_MD_BYTES) as u32;
const SB_HEADER: usize = 8 + 4 + 8 + 4 + 4;

/// Why metadata cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// No superblock magic in either copy.
    #[error("no cache metadata")]
    Absent,
    /// Metadata present but damaged.
    #[error("corrupt cache metadata: {0}")]
    Corrupt(String),
    /// Another format version.
    #[error("cache metadata version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
}

/// One core known to a cache instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CoreEntry {
    /// Core id used in line records.
    pub id: u16,
    /// Name of the cache bdev exposing this core.
    pub cache_bdev: String,
    /// Name of the core bdev.
    pub core_bdev: String,
    /// Core size in blocks.
    pub core_blocks: u64,
    /// Block size of the cache bdev (that of the core).
    pub block_size: u32,
    /// Statistics at the last clean shutdown.
    #[serde(default)]
    pub stats: serde_json::Value,
}

/// The superblock body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Superblock {
    /// Cache instance UUID (hex).
    pub uuid: String,
    /// Line size in bytes.
    pub line_size: u32,
    /// Cache mode at the last write (`wt`, `wb`, ...).
    pub mode: String,
    /// Cleaning policy.
    pub cleaner: String,
    /// Number of cache lines.
    pub num_lines: u32,
    /// Block size of the cache device.
    pub cache_block_size: u32,
    /// Byte offset of the line data.
    pub data_offset: u64,
    /// True when the metadata was written by a clean shutdown.
    pub clean_shutdown: bool,
    /// Cores of this instance.
    pub cores: Vec<CoreEntry>,
}

/// Sizes of the regions for a device of `dev_bytes` with `line_size` lines.
pub fn geometry(dev_bytes: u64, line_size: u64) -> Option<(u32, u64)> {
    // n lines need MD_OFFSET + pages(n) + n*line_size bytes.
    let avail = dev_bytes.checked_sub(MD_OFFSET)?;
    let mut n = avail / (line_size + LINE_MD_BYTES);
    loop {
        let data_offset = data_offset(n);
        if data_offset + n * line_size <= dev_bytes {
            break;
        }
        n = n.checked_sub(1)?;
    }
    let n32 = u32::try_from(n).ok()?;
    if n32 == 0 {
        return None;
    }
    Some((n32, data_offset(n)))
}

fn data_offset(lines: u64) -> u64 {
    let pages = lines.div_ceil(u64::from(LINES_PER_PAGE));
    MD_OFFSET + pages * PAGE_BYTES
}

/// Byte offset of the metadata page holding `line`.
pub fn page_offset(page: u32) -> u64 {
    MD_OFFSET + u64::from(page) * PAGE_BYTES
}

/// Encodes one superblock copy (4 KiB).
pub fn encode_superblock(sb: &Superblock, seq: u64) -> Result<Vec<u8>, LayoutError> {
    let body = serde_json::to_vec(sb).map_err(|e| LayoutError::Corrupt(e.to_string()))?;
    if body.len() > SB_BYTES as usize - SB_HEADER {
        return Err(LayoutError::Corrupt(format!("superblock body of {} bytes is too large", body.len())));
    }
    let mut out = vec![0u8; SB_BYTES as usize];
    out[0..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&seq.to_le_bytes());
    out[20..24].copy_from_slice(&(body.len() as u32).to_le_bytes());
    out[SB_HEADER..SB_HEADER + body.len()].copy_from_slice(&body);
    let crc = crc32c::crc32c(&out[..20 + 4]);
    let crc = crc32c::crc32c_append(crc, &body);
    out[24..28].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

enum SbCopy {
    Absent,
    Bad(String),
    Good(u64, Superblock),
}

fn decode_copy(b: &[u8]) -> Result<SbCopy, LayoutError> {
    if b.len() < SB_BYTES as usize || &b[0..8] != MAGIC {
        return Ok(SbCopy::Absent);
    }
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let version = u32_at(8);
    let mut seq_b = [0u8; 8];
    seq_b.copy_from_slice(&b[12..20]);
    let seq = u64::from_le_bytes(seq_b);
    let len = u32_at(20) as usize;
    if len > SB_BYTES as usize - SB_HEADER {
        return Ok(SbCopy::Bad(format!("body length {len} out of range")));
    }
    let body = &b[SB_HEADER..SB_HEADER + len];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..24]), body);
    if crc != u32_at(24) {
        return Ok(SbCopy::Bad("superblock checksum mismatch".into()));
    }
    if version != VERSION {
        return Err(LayoutError::Version(version));
    }
    match serde_json::from_slice(body) {
        Ok(sb) => Ok(SbCopy::Good(seq, sb)),
        Err(e) => Ok(SbCopy::Bad(format!("superblock body: {e}"))),
    }
}

/// Decodes the superblock from the first 8 KiB of a cache device; returns it and its sequence number.
pub fn decode_superblock(first_8k: &[u8]) -> Result<(Superblock, u64), LayoutError> {
    if first_8k.len() < MD_OFFSET as usize {
        return Err(LayoutError::Absent);
    }
    let a = decode_copy(&first_8k[..SB_BYTES as usize])?;
    let b = decode_copy(&first_8k[SB_BYTES as usize..MD_OFFSET as usize])?;
    match (a, b) {
        (SbCopy::Good(sa, a), SbCopy::Good(sb_, b)) => Ok(if sa >= sb_ { (a, sa) } else { (b, sb_) }),
        (SbCopy::Good(s, sb), _) | (_, SbCopy::Good(s, sb)) => Ok((sb, s)),
        (SbCopy::Absent, SbCopy::Absent) => Err(LayoutError::Absent),
        (SbCopy::Bad(e), _) | (_, SbCopy::Bad(e)) => Err(LayoutError::Corrupt(e)),
    }
}

/// Checks a decoded superblock against the device it came from.
pub fn check_superblock(sb: &Superblock, dev_bytes: u64, dev_block: u32) -> Result<(), LayoutError> {
    let bad = |m: String| Err(LayoutError::Corrupt(m));
    if !crate::cache::valid_line_size(sb.line_size) {
        return bad(format!("line size {} is invalid", sb.line_size));
    }
    match geometry(dev_bytes, u64::from(sb.line_size)) {
        Some((n, off)) if n == sb.num_lines && off == sb.data_offset => {}
        _ => return bad(format!("{} lines at {} do not fit this device", sb.num_lines, sb.data_offset)),
    }
    if sb.cache_block_size != dev_block {
        return bad(format!(
            "cache block size {} differs from the device's {dev_block}",
            sb.cache_block_size
        ));
    }
    Ok(())
}

/// One persisted line record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LineRecord {
    /// Version of this record (slot = `seq & 1`).
    pub seq: u64,
    /// False: the line is free.
    pub used: bool,
    /// Core id.
    pub core_id: u16,
    /// Line number within the core.
    pub core_line: u64,
    /// Valid sectors.
    pub valid: u128,
    /// Dirty sectors.
    pub dirty: u128,
}

/// Encodes a record into one 64-byte slot.
pub fn encode_record(r: &LineRecord, out: &mut [u8]) {
    out[..SLOT_BYTES].fill(0);
    out[0..8].copy_from_slice(&r.seq.to_le_bytes());
    out[8..10].copy_from_slice(&r.core_id.to_le_bytes());
    out[10..12].copy_from_slice(&u16::from(r.used).to_le_bytes());
    out[16..24].copy_from_slice(&r.core_line.to_le_bytes());
    out[24..40].copy_from_slice(&r.valid.to_le_bytes());
    out[40..56].copy_from_slice(&r.dirty.to_le_bytes());
    let crc = crc32c::crc32c(&out[..60]);
    out[60..64].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes one slot: `None` for an empty (all-zero) or damaged slot; `Err` flags damage.
fn decode_slot(b: &[u8]) -> Result<Option<LineRecord>, ()> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let crc = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
    if crc32c::crc32c(&b[..60]) != crc {
        return Err(());
    }
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let u128_at = |o: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[o..o + 16]);
        u128::from_le_bytes(a)
    };
    let seq = u64_at(0);
    Ok(Some(LineRecord {
        seq,
        core_id: u16::from_le_bytes([b[8], b[9]]),
        used: u16::from_le_bytes([b[10], b[11]]) != 0,
        core_line: u64_at(16),
        valid: u128_at(24),
        dirty: u128_at(40),
    }))
}

/// Decodes the record of one line from its 128 bytes (both slots).
pub fn decode_line(b: &[u8], line: u32) -> Result<Option<LineRecord>, LayoutError> {
    let s0 = decode_slot(&b[..SLOT_BYTES]);
    let s1 = decode_slot(&b[SLOT_BYTES..2 * SLOT_BYTES]);
    let pick = match (s0, s1) {
        (Ok(Some(a)), Ok(Some(b))) => Some(if a.seq >= b.seq { a } else { b }),
        (Ok(Some(a)), _) | (_, Ok(Some(a))) => Some(a),
        (Ok(None), _) | (_, Ok(None)) => None,
        (Err(()), Err(())) => {
            return Err(LayoutError::Corrupt(format!("line {line}: both record copies fail their checksum")))
        }
    };
    Ok(pick)
}

/// Writes `r` into the slot `r.seq & 1` of line `line` inside a page image.
pub fn put_record(page: &mut [u8], line_in_page: u32, r: &LineRecord) {
    let off = line_in_page as usize * LINE_MD_BYTES as usize + (r.seq & 1) as usize * SLOT_BYTES;
    encode_record(r, &mut page[off..off + SLOT_BYTES]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            uuid: "u".into(),
            line_size: 4096,
            mode: "wb".into(),
            cleaner: "alru".into(),
            num_lines: 10,
            cache_block_size: 512,
            data_offset: 12288,
            clean_shutdown: true,
            cores: vec![],
        }
    }

    #[test]
    fn superblock_picks_newest_valid_copy() {
        let mut dev = vec![0u8; 8192];
        assert_eq!(decode_superblock(&dev), Err(LayoutError::Absent));
        let mut a = sb();
        dev[..4096].copy_from_slice(&encode_superblock(&a, 1).unwrap());
        a.mode = "wt".into();
        dev[4096..].copy_from_slice(&encode_superblock(&a, 2).unwrap());
        assert_eq!(decode_superblock(&dev).unwrap().0.mode, "wt");
        // Damage that still parses ("wt" → "wu"): only the checksum catches it; the old copy is used.
        let at = 4096 + dev[4096..].windows(4).position(|w| w == b"\"wt\"").unwrap() + 2;
        dev[at] = b'u';
        assert_eq!(decode_superblock(&dev).unwrap().0.mode, "wb");
        dev[40] ^= 1; // both bad: corrupt
        assert!(matches!(decode_superblock(&dev), Err(LayoutError::Corrupt(_))));
    }

    #[test]
    fn records_ping_pong() {
        let mut page = vec![0u8; PAGE_BYTES as usize];
        assert_eq!(decode_line(&page[..128], 0), Ok(None));
        let r1 = LineRecord { seq: 1, used: true, core_id: 3, core_line: 77, valid: 0xff, dirty: 0x0f };
        put_record(&mut page, 0, &r1);
        let r2 = LineRecord { seq: 2, dirty: 0, ..r1 };
        put_record(&mut page, 0, &r2);
        assert_eq!(decode_line(&page[..128], 0), Ok(Some(r2)));
        page[0] ^= 0x55; // slot 0 (seq 2) torn: seq 1 survives
        assert_eq!(decode_line(&page[..128], 0), Ok(Some(r1)));
        page[64] ^= 0x55;
        assert!(decode_line(&page[..128], 0).is_err());
    }

    /// The superblock copy's byte layout is fixed (a device written by one build is read by the
    /// next): magic, version, seq, body length, CRC32C over the header and body, the JSON body at
    /// byte 28; bodies up to 4096 − 28 bytes fit, longer ones are refused.
    #[test]
    fn superblock_copy_layout_and_largest_body() {
        let mut a = sb();
        let out = encode_superblock(&a, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(out.len(), 4096);
        let body = serde_json::to_vec(&a).unwrap();
        assert_eq!(&out[0..8], MAGIC);
        assert_eq!(out[8..12], VERSION.to_le_bytes());
        assert_eq!(out[12..20], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(out[20..24], (body.len() as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..24]), &body);
        assert_eq!(out[24..28], crc.to_le_bytes());
        assert_eq!(&out[28..28 + body.len()], body.as_slice());
        assert!(out[28 + body.len()..].iter().all(|&b| b == 0));
        // The largest body that fits, and one byte more.
        let room = 4096 - 28;
        a.uuid = "u".repeat(1 + room - body.len());
        assert_eq!(serde_json::to_vec(&a).unwrap().len(), room);
        let mut dev = vec![0u8; 8192];
        dev[..4096].copy_from_slice(&encode_superblock(&a, 3).unwrap());
        assert_eq!(decode_superblock(&dev), Ok((a.clone(), 3)));
        a.uuid.push('u');
        assert!(matches!(encode_superblock(&a, 3), Err(LayoutError::Corrupt(_))));
        // A copy claiming a body past the end is damaged, not read out of bounds.
        dev[20..24].copy_from_slice(&(room as u32 + 1).to_le_bytes());
        assert!(matches!(decode_superblock(&dev), Err(LayoutError::Corrupt(_))));
        // Less than both copies: no metadata (never a read past the buffer).
        assert_eq!(decode_superblock(&dev[..8191]), Err(LayoutError::Absent));
        assert_eq!(decode_superblock(&[]), Err(LayoutError::Absent));
    }

    /// geometry gives the most lines whose records (whole 4 KiB pages) and data fit the device.
    #[test]
    fn geometry_is_the_most_lines_that_fit() {
        let needs = |n: u64, line: u64| MD_OFFSET + n.div_ceil(32) * PAGE_BYTES + n * line;
        for line in [4096u64, 65536] {
            let mut dev = MD_OFFSET;
            while dev < needs(100, line) {
                match geometry(dev, line) {
                    None => assert!(needs(1, line) > dev, "{dev} B holds a {line} B line"),
                    Some((n, off)) => {
                        let n = u64::from(n);
                        assert_eq!(off, needs(n, 0), "data offset of {n} lines");
                        assert!(needs(n, line) <= dev, "{n} lines of {line} B do not fit {dev} B");
                        assert!(needs(n + 1, line) > dev, "{} lines of {line} B fit {dev} B", n + 1);
                    }
                }
                dev += 512;
            }
        }
    }

    /// A superblock must name a valid line size, the geometry of the device it is on (lines and
    /// data offset both) and the device's block size.
    #[test]
    fn check_superblock_refuses_what_does_not_describe_the_device() {
        let dev = 8192 + 2 * 4096 + 40 * 4096;
        let (num_lines, data_offset) = geometry(dev, 4096).unwrap();
        let good = Superblock { num_lines, data_offset, ..sb() };
        assert_eq!(check_superblock(&good, dev, 512), Ok(()));
        let refused = |s: Superblock, block: u32| {
            matches!(check_superblock(&s, dev, block), Err(LayoutError::Corrupt(_)))
        };
        assert!(refused(Superblock { line_size: 4095, ..good.clone() }, 512), "line size");
        assert!(refused(Superblock { line_size: 8192, ..good.clone() }, 512), "another line size's geometry");
        assert!(
            refused(Superblock { num_lines: num_lines - 1, ..good.clone() }, 512),
            "lines (same data offset)"
        );
        assert!(refused(Superblock { data_offset: data_offset + 4096, ..good.clone() }, 512), "data offset");
        assert!(refused(good.clone(), 4096), "block size");
    }

    #[test]
    fn geometry_fits() {
        let (n, off) = geometry(64 << 20, 4096).unwrap();
        assert!(off + u64::from(n) * 4096 <= 64 << 20);
        assert!(geometry(8192, 4096).is_none());
    }
}

#[cfg(test)]
mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a cache device holds, decoding never panics (it loads, or says absent/corrupt).
        #[test]
        fn decoders_never_panic(body in proptest::collection::vec(any::<u8>(), 0..600), seq in any::<u64>(),
                                flip in 0usize..8192, rec in proptest::collection::vec(any::<u8>(), 128)) {
            let mut dev = vec![0u8; MD_OFFSET as usize];
            for copy in [0usize, SB_BYTES as usize] {
                dev[copy..copy + 8].copy_from_slice(MAGIC);
                dev[copy + 8..copy + 12].copy_from_slice(&VERSION.to_le_bytes());
                dev[copy + 12..copy + 20].copy_from_slice(&seq.to_le_bytes());
                dev[copy + 20..copy + 24].copy_from_slice(&(body.len() as u32).to_le_bytes());
                dev[copy + SB_HEADER..copy + SB_HEADER + body.len()].copy_from_slice(&body);
            }
            dev[flip] ^= 0xa5;
            let _ = decode_superblock(&dev);
            let _ = decode_line(&rec, 0);
        }
    }
}
