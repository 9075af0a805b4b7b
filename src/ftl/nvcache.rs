//! The non-volatile write cache (`nv-cache=BDEV`): a write-ahead log on a block bdev, so a write is
//! acknowledged only once it is in that bdev, and a restart after a crash replays it.
//!
//! ```text
//!  nv-cache bdev, in 4 KiB units:
//!  ┌────────┬────────┬──────────────────────── ring ─────────────────────────────┐
//!  │ super A│ super B│ [hdr|data..][hdr|data..] ...  (free)  ... [hdr|data..]    │
//!  └────────┴────────┴───────────────────────────────────────────────────────────┘
//!    generation-numbered copies       tail (reclaimed) ──► head (next record)
//! ```
//!
//! # Design
//! * **Records.** A user write of `n` blocks becomes one record: a header unit (magic, the cache's
//!   secret nonce, sequence number, LBA, `n`, CRC32C of the data, CRC32C of the header) followed by
//!   its `n` data units, written with one write from a private copy (made while the data is copied
//!   into the write buffer: a guest changing its buffer under an in-flight write cannot make the
//!   record's CRC lie). The write is acknowledged when that bdev write completes. Records never wrap: one that does not fit before
//!   the end of the ring starts at its beginning (the skipped units belong to it).
//! * **Durability promise.** "In the nv-cache bdev" means the bdev completed the write: that
//!   survives a crash of vblkd (`kill -9`: the data is in the bdev's page cache or device). It
//!   survives a power loss only if the bdev is durable on completion (no volatile cache, e.g. a
//!   file bdev with `direct=on` on a device without write cache, or persistent memory): vblkd does
//!   not flush the nv-cache per write (no FUA). A flush of the FTL flushes the nv-cache bdev too.
//! * **Reclaim.** A record's space is reclaimed once its data is durable on the media: its write
//!   buffer entries were written and a media flush followed. The core thread then persists the
//!   new `durable_seq` (every record below it is on the media) in the superblock, flushes the
//!   nv-cache, and only then lets new records reuse the space. It does this at every FTL flush,
//!   at shutdown, and whenever the ring is more than half full.
//! * **Replay.** After a crash the FTL is rebuilt from the media as usual, then the whole ring is
//!   scanned: every record with a valid header (magic, nonce, CRC) and `seq >= durable_seq` whose
//!   data CRC matches is rewritten through the FTL in sequence order (newest wins), then the FTL is
//!   flushed, `durable_seq` moves past them, and service starts. Concurrent writes can leave holes
//!   (a torn, never acknowledged record between two complete ones): the scan does not stop at
//!   them. Unmaps are not logged: as without an nv-cache, they survive a crash once flushed (the
//!   flush persists `durable_seq` before the FTL checkpoint, so no replay resurrects trimmed data).
//! * **Metadata.** Two superblock copies (units 0 and 1) with a generation number, version and
//!   CRC32C; the newest valid copy wins. An all-zero device is formatted; anything else that is not
//!   a valid superblock of this FTL is refused with the reason, before anything is written to it.
//!
//! # Limitations
//! Restore reads the whole ring (its time grows with the nv-cache size). Unmaps and write_zeroes
//! are not logged (see above).

use crate::bdev::{BdevIo, Channel, Descriptor, IoError, IoKind, IoVecs};

use super::layout::BLOCK_BYTES;
use super::FtlError;

const SUPER_MAGIC: &[u8; 8] = b"VBNVSB01";
const RECORD_MAGIC: &[u8; 8] = b"VBNVREC1";
const VERSION: u32 = 1;
/// Units before the ring (two superblock copies).
pub const RING_FIRST: u64 = 2;

/// The persisted superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvSuper {
    /// The FTL this cache belongs to.
    pub uuid: [u8; 16],
    /// Secret of this cache's records (guest data never holds a valid header by accident).
    pub nonce: [u8; 16],
    /// Bumped on every write; the newest valid copy wins.
    pub generation: u64,
    /// Every record with a lower sequence number is durable on the media.
    pub durable_seq: u64,
    /// Ring size in units (checked against the bdev).
    pub ring_units: u64,
}

fn crc(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8).and_then(|s| s.try_into().ok()).map_or(0, u64::from_le_bytes)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4).and_then(|s| s.try_into().ok()).map_or(0, u32::from_le_bytes)
}

fn arr16(b: &[u8], off: usize) -> [u8; 16] {
    b.get(off..off + 16).and_then(|s| s.try_into().ok()).unwrap_or([0; 16])
}

impl NvSuper {
    /// Encodes one 4 KiB unit.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_BYTES];
        b[0..8].copy_from_slice(SUPER_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.uuid);
        b[32..48].copy_from_slice(&self.nonce);
        b[48..56].copy_from_slice(&self.generation.to_le_bytes());
        b[56..64].copy_from_slice(&self.durable_seq.to_le_bytes());
        b[64..72].copy_from_slice(&self.ring_units.to_le_bytes());
        let c = crc(&b[..BLOCK_BYTES - 4]);
        b[BLOCK_BYTES - 4..].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Decodes a unit: `Ok(None)` when it is all zeros (never written).
    pub fn decode(b: &[u8]) -> Result<Option<Self>, String> {
        if b.len() != BLOCK_BYTES {
            return Err(format!("superblock of {} bytes", b.len()));
        }
        if b.iter().all(|x| *x == 0) {
            return Ok(None);
        }
        if &b[0..8] != SUPER_MAGIC {
            return Err("bad magic (not a vblkd nv-cache)".into());
        }
        let stored = u32_at(b, BLOCK_BYTES - 4);
        let computed = crc(&b[..BLOCK_BYTES - 4]);
        if stored != computed {
            return Err(format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(format!("version {version} not supported (this build reads {VERSION})"));
        }
        let s = NvSuper {
            uuid: arr16(b, 16),
            nonce: arr16(b, 32),
            generation: u64_at(b, 48),
            durable_seq: u64_at(b, 56),
            ring_units: u64_at(b, 64),
        };
        if s.ring_units == 0 || s.durable_seq == 0 {
            return Err("ring size or sequence number is zero".into());
        }
        Ok(Some(s))
    }
}

/// A record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Sequence number (monotonic).
    pub seq: u64,
    /// First LBA.
    pub lba: u64,
    /// Data blocks that follow.
    pub num_blocks: u32,
    /// CRC32C of the data blocks.
    pub data_crc: u32,
}

impl RecordHeader {
    /// Encodes one 4 KiB unit.
    pub fn encode(&self, nonce: &[u8; 16]) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_BYTES];
        b[0..8].copy_from_slice(RECORD_MAGIC);
        b[8..24].copy_from_slice(nonce);
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.lba.to_le_bytes());
        b[40..44].copy_from_slice(&self.num_blocks.to_le_bytes());
        b[44..48].copy_from_slice(&self.data_crc.to_le_bytes());
        let c = crc(&b[..48]);
        b[48..52].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Decodes a unit; `None` unless it is a valid header of the cache with `nonce`.
    pub fn decode(b: &[u8], nonce: &[u8; 16]) -> Option<Self> {
        if b.len() < 52 || &b[0..8] != RECORD_MAGIC || b[8..24] != nonce[..] {
            return None;
        }
        if u32_at(b, 48) != crc(&b[..48]) {
            return None;
        }
        let h = RecordHeader {
            seq: u64_at(b, 24),
            lba: u64_at(b, 32),
            num_blocks: u32_at(b, 40),
            data_crc: u32_at(b, 44),
        };
        (h.num_blocks > 0).then_some(h)
    }
}

/// A record found by the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Its header.
    pub header: RecordHeader,
    /// Ring unit of the header.
    pub unit: u64,
}

/// One allocated record (in sequence order).
#[derive(Debug, Clone, Copy)]
pub struct NvRec {
    /// Sequence number.
    pub seq: u64,
    /// First ring unit (monotonic count, not wrapped) including skipped units.
    pub start_u: u64,
    /// Units, including any skipped before it.
    pub units: u64,
    /// Last write-buffer entry of the write.
    pub last_entry: u64,
    /// The nv-cache write completed.
    pub done: bool,
}

/// The ring's runtime state (under the core lock).
#[derive(Debug)]
pub struct NvRing {
    /// Ring size in units.
    pub ring_units: u64,
    /// Next sequence number.
    pub next_seq: u64,
    /// Units allocated since start (monotonic).
    pub head_u: u64,
    /// Units reusable below this (monotonic).
    pub tail_u: u64,
    /// Records not reclaimed yet, in sequence order.
    pub pending: std::collections::VecDeque<NvRec>,
}

impl NvRing {
    /// An empty ring whose next record has sequence `next_seq`.
    pub fn new(ring_units: u64, next_seq: u64) -> Self {
        NvRing { ring_units, next_seq, head_u: 0, tail_u: 0, pending: Default::default() }
    }

    /// Units in use.
    pub fn used(&self) -> u64 {
        self.head_u - self.tail_u
    }

    /// Allocates a record of `1 + num_blocks` units; returns (seq, ring unit of its header), or
    /// `None` when the ring is full.
    pub fn alloc(&mut self, num_blocks: u64, last_entry: u64) -> Option<(u64, u64)> {
        let need = 1 + num_blocks;
        let pos = self.head_u % self.ring_units;
        let skip = if pos + need > self.ring_units { self.ring_units - pos } else { 0 };
        if need > self.ring_units || self.used() + skip + need > self.ring_units {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let start_u = self.head_u;
        self.head_u += skip + need;
        self.pending.push_back(NvRec { seq, start_u, units: skip + need, last_entry, done: false });
        Some((seq, (start_u + skip) % self.ring_units))
    }

    /// Marks record `seq` written to the nv-cache.
    pub fn mark_done(&mut self, seq: u64) {
        if let Some(front) = self.pending.front().map(|r| r.seq) {
            if let Some(r) = seq.checked_sub(front).and_then(|i| self.pending.get_mut(i as usize)) {
                r.done = true;
            }
        }
    }

    /// Pops the records that are written and whose entries are all below `durable_entry`;
    /// returns (new durable_seq, new tail_u) when any was popped. The space is reusable only
    /// after the caller persisted the durable sequence and sets `tail_u`.
    pub fn take_durable(&mut self, durable_entry: u64) -> Option<(u64, u64)> {
        let mut out = None;
        while let Some(r) = self.pending.front().copied() {
            if !r.done || r.last_entry >= durable_entry {
                break;
            }
            self.pending.pop_front();
            out = Some((r.seq + 1, r.start_u + r.units));
        }
        out
    }
}

/// The nv-cache bdev as the FTL sees it.
pub struct NvCache {
    /// The claimed descriptor.
    pub desc: Descriptor,
    /// The bdev's name.
    pub name: String,
    /// Blocks of the bdev per 4 KiB unit.
    pub blocks_per_unit: u64,
    /// Current superblock (the core thread updates it).
    pub sb: std::sync::Mutex<NvSuper>,
}

impl NvCache {
    /// The ring's first block on the bdev for ring unit `u`.
    pub fn ring_block(&self, u: u64) -> u64 {
        (RING_FIRST + u) * self.blocks_per_unit
    }

    /// The nonce of the records.
    pub fn nonce(&self) -> [u8; 16] {
        super::core::lock(&self.sb).nonce
    }
}

fn nv_err(name: &str, m: impl std::fmt::Display) -> FtlError {
    FtlError::Config { option: "nv-cache", reason: format!("{name}: {m}") }
}

/// Submits one I/O and waits for it (start-up, scan and the core thread's metadata writes).
pub fn sync_io(ch: &mut Channel, io: BdevIo) -> Result<(), IoError> {
    ch.submit_and_wait(io)
}

/// Reads `units` units from unit `first` of the bdev.
pub fn read_units(ch: &mut Channel, bpu: u64, first: u64, units: u64) -> Result<Vec<u8>, IoError> {
    let len = (units as usize) * BLOCK_BYTES;
    let buf = IoVecs::alloc(len);
    let view = buf.slice(0, len as u64).ok_or(IoError::InvalidRange)?;
    sync_io(ch, BdevIo::read(first * bpu, units * bpu, buf, 0))?;
    Ok(view.to_vec())
}

/// Writes whole units at unit `first`.
pub fn write_units(ch: &mut Channel, bpu: u64, first: u64, data: &[u8]) -> Result<(), IoError> {
    let units = (data.len() / BLOCK_BYTES) as u64;
    sync_io(ch, BdevIo::write(first * bpu, units * bpu, IoVecs::from_slice(data), 0))
}

/// What `open` found on the nv-cache.
pub enum Opened {
    /// Blank (or reformatted): nothing to replay.
    Fresh(NvCache),
    /// This FTL's cache: replay records from `durable_seq`.
    Existing(NvCache),
}

/// Checks the nv-cache bdev and reads its superblock; writes nothing. `uuid` is the FTL's;
/// `reformat` (a new FTL created with force) accepts another FTL's cache, `create` a new FTL.
pub fn open(
    mut desc: Descriptor,
    uuid: [u8; 16],
    min_ring_units: u64,
    create: bool,
    reformat: bool,
) -> Result<Opened, FtlError> {
    let info = desc.info().clone();
    let name = info.name.clone();
    let bs = u64::from(info.block_size);
    if bs == 0 || BLOCK_BYTES as u64 % bs != 0 {
        return Err(nv_err(&name, format!("block size {bs} does not divide {BLOCK_BYTES}")));
    }
    if !desc.writable() {
        return Err(nv_err(&name, "not writable"));
    }
    let bpu = BLOCK_BYTES as u64 / bs;
    let units = info.num_blocks / bpu;
    let need = RING_FIRST + min_ring_units;
    if units < need {
        return Err(nv_err(
            &name,
            format!(
                "{} bytes is too small: at least {} bytes are needed (two superblock blocks and a ring of twice the write buffer)",
                info.num_blocks * bs,
                need * BLOCK_BYTES as u64
            ),
        ));
    }
    desc.claim("ftl").map_err(|e| nv_err(&name, e))?;
    let mut ch = desc.channel().map_err(|e| nv_err(&name, e))?;
    let head = read_units(&mut ch, bpu, 0, RING_FIRST)
        .map_err(|e| nv_err(&name, format!("reading the superblock: {e}")))?;
    let a = NvSuper::decode(&head[..BLOCK_BYTES]);
    let b = NvSuper::decode(&head[BLOCK_BYTES..]);
    drop(ch);
    let ring_units = units - RING_FIRST;
    let fresh = |desc| {
        let sb =
            NvSuper { uuid, nonce: crate::bdev::random_uuid(), generation: 0, durable_seq: 1, ring_units };
        Ok(Opened::Fresh(NvCache {
            desc,
            name: name.clone(),
            blocks_per_unit: bpu,
            sb: std::sync::Mutex::new(sb),
        }))
    };
    let best = match (a, b) {
        (Ok(None), Ok(None)) => return fresh(desc),
        (Ok(x), Ok(y)) => [x, y].into_iter().flatten().max_by_key(|s| s.generation),
        (Ok(x), Err(_)) | (Err(_), Ok(x)) => x,
        (Err(ea), Err(eb)) => {
            if reformat {
                return fresh(desc);
            }
            return Err(FtlError::Corrupt(format!(
                "nv-cache {name}: both superblock copies are unusable (A: {ea}; B: {eb}); the device was not modified"
            )));
        }
    };
    let Some(sb) = best else { return fresh(desc) };
    if sb.uuid != uuid || create {
        if reformat {
            return fresh(desc);
        }
        return Err(nv_err(
            &name,
            format!(
                "holds the nv-cache of another FTL ({}); add force=on to mode=create to reformat it",
                super::layout::format_uuid(&sb.uuid)
            ),
        ));
    }
    if sb.ring_units != ring_units {
        return Err(FtlError::Corrupt(format!(
            "nv-cache {name}: superblock says {} ring blocks, the device has {ring_units}; the device was not modified",
            sb.ring_units
        )));
    }
    Ok(Opened::Existing(NvCache { desc, name, blocks_per_unit: bpu, sb: std::sync::Mutex::new(sb) }))
}

/// Writes the superblock (the older copy's slot, or both when formatting) with `durable_seq`,
/// then flushes the bdev.
pub fn persist_super(nv: &NvCache, ch: &mut Channel, durable_seq: u64, both: bool) -> Result<(), FtlError> {
    let mut sb = *super::core::lock(&nv.sb);
    sb.durable_seq = durable_seq;
    for _ in 0..if both { 2 } else { 1 } {
        sb.generation += 1;
        let slot = sb.generation % 2;
        write_units(ch, nv.blocks_per_unit, slot, &sb.encode())
            .map_err(|e| FtlError::Media(format!("nv-cache {}: writing the superblock: {e}", nv.name)))?;
    }
    sync_io(ch, BdevIo::no_data(IoKind::Flush, 0, 0, 0))
        .map_err(|e| FtlError::Media(format!("nv-cache {}: flush: {e}", nv.name)))?;
    *super::core::lock(&nv.sb) = sb;
    Ok(())
}

/// Scans the whole ring for valid records with `seq >= durable_seq`; returns them by sequence.
pub fn scan(nv: &NvCache, ch: &mut Channel) -> Result<Vec<Found>, FtlError> {
    let sb = *super::core::lock(&nv.sb);
    let bpu = nv.blocks_per_unit;
    let ring = sb.ring_units;
    const CHUNK: u64 = 256;
    let mut found = Vec::new();
    let mut u = 0u64;
    let mut chunk: Vec<u8> = Vec::new();
    let mut chunk_base = u64::MAX;
    let t = std::time::Instant::now();
    let mut last = t;
    let err = |e: IoError| FtlError::Media(format!("nv-cache {}: scan: {e}", nv.name));
    while u < ring {
        if u < chunk_base || u >= chunk_base + CHUNK {
            chunk_base = u;
            let n = CHUNK.min(ring - u);
            chunk = read_units(ch, bpu, RING_FIRST + u, n).map_err(err)?;
            if last.elapsed().as_secs() >= 1 {
                last = std::time::Instant::now();
                log::info!("nv-cache {}: scanning: block {u} of {ring}", nv.name);
            }
        }
        let off = ((u - chunk_base) as usize) * BLOCK_BYTES;
        let Some(h) = chunk.get(off..off + BLOCK_BYTES).and_then(|b| RecordHeader::decode(b, &sb.nonce))
        else {
            u += 1;
            continue;
        };
        let n = u64::from(h.num_blocks);
        if h.seq < sb.durable_seq || u + 1 + n > ring {
            u += 1;
            continue;
        }
        let data = read_units(ch, bpu, RING_FIRST + u + 1, n).map_err(err)?;
        if crc(&data) != h.data_crc {
            // Torn (never acknowledged): skip the header only; a later record may follow.
            u += 1;
            continue;
        }
        found.push(Found { header: h, unit: u });
        u += 1 + n;
    }
    found.sort_by_key(|f| f.header.seq);
    if !found.is_empty() {
        log::info!("nv-cache {}: {} records to replay (scan took {:?})", nv.name, found.len(), t.elapsed());
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_refusals() {
        let s = NvSuper { uuid: [1; 16], nonce: [2; 16], generation: 3, durable_seq: 4, ring_units: 5 };
        let b = s.encode();
        assert_eq!(NvSuper::decode(&b), Ok(Some(s)));
        assert_eq!(NvSuper::decode(&vec![0u8; BLOCK_BYTES]), Ok(None));
        let mut bad = b.clone();
        bad[60] ^= 1;
        assert!(NvSuper::decode(&bad).unwrap_err().contains("checksum"));
        let mut bad = b;
        bad[0] = b'X';
        assert!(NvSuper::decode(&bad).unwrap_err().contains("magic"));
    }

    /// `s` encoded, then changed by `f` and sealed with a fresh checksum.
    fn sealed(s: &NvSuper, f: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let mut b = s.encode();
        f(&mut b);
        let c = crc(&b[..BLOCK_BYTES - 4]);
        b[BLOCK_BYTES - 4..].copy_from_slice(&c.to_le_bytes());
        b
    }

    #[test]
    fn a_superblock_with_a_zero_ring_or_sequence_or_another_version_or_size_is_refused() {
        let s = NvSuper { uuid: [1; 16], nonce: [2; 16], generation: 3, durable_seq: 4, ring_units: 5 };
        for z in [NvSuper { ring_units: 0, ..s }, NvSuper { durable_seq: 0, ..s }] {
            assert_eq!(
                NvSuper::decode(&z.encode()),
                Err("ring size or sequence number is zero".into()),
                "{z:?}"
            );
        }
        let v2 = sealed(&s, |b| b[8..12].copy_from_slice(&2u32.to_le_bytes()));
        assert_eq!(NvSuper::decode(&v2), Err("version 2 not supported (this build reads 1)".into()));
        let b = s.encode();
        assert_eq!(
            NvSuper::decode(&b[..BLOCK_BYTES - 1]),
            Err(format!("superblock of {} bytes", BLOCK_BYTES - 1))
        );
    }

    #[test]
    fn record_header_needs_the_nonce_and_crc() {
        let h = RecordHeader { seq: 9, lba: 77, num_blocks: 2, data_crc: 0xabcd };
        let b = h.encode(&[7; 16]);
        assert_eq!(RecordHeader::decode(&b, &[7; 16]), Some(h));
        assert_eq!(RecordHeader::decode(&b, &[8; 16]), None);
        let mut bad = b;
        bad[33] ^= 1;
        assert_eq!(RecordHeader::decode(&bad, &[7; 16]), None);
    }

    #[test]
    fn ring_allocates_without_wrapping_and_reclaims_in_order() {
        let mut r = NvRing::new(10, 5);
        assert_eq!(r.alloc(3, 100), Some((5, 0))); // units 0..4
        assert_eq!(r.alloc(3, 101), Some((6, 4))); // units 4..8
                                                   // 2 units left before the end: a 3-unit record skips them and starts at 0, but 0..4 is used.
        assert_eq!(r.alloc(2, 102), None);
        r.mark_done(6);
        assert_eq!(r.take_durable(1000), None, "seq 5 not written yet: nothing reclaimable");
        r.mark_done(5);
        assert_eq!(r.take_durable(101), Some((6, 4)), "seq 6's entries are not durable yet");
        r.tail_u = 4;
        assert_eq!(r.alloc(2, 102), Some((7, 0)), "skips the 2 units at the end");
        assert_eq!(r.used(), 4 + 2 + 3);
        assert_eq!(r.take_durable(1000), Some((7, 8)));
    }

    #[test]
    fn a_record_header_is_52_bytes_and_covers_at_least_one_block() {
        let h = RecordHeader { seq: 9, lba: 77, num_blocks: 1, data_crc: 0xabcd };
        let b = h.encode(&[7; 16]);
        assert_eq!(RecordHeader::decode(&b[..52], &[7; 16]), Some(h), "the header's 52 bytes are enough");
        assert_eq!(RecordHeader::decode(&b[..51], &[7; 16]), None);
        let empty = RecordHeader { num_blocks: 0, ..h }.encode(&[7; 16]);
        assert_eq!(RecordHeader::decode(&empty, &[7; 16]), None, "a record of no block");
        let mut magic = b;
        magic[0] = b'X';
        let c = crc(&magic[..48]);
        magic[48..52].copy_from_slice(&c.to_le_bytes());
        assert_eq!(RecordHeader::decode(&magic, &[7; 16]), None, "another magic");
    }

    #[test]
    fn a_record_that_ends_exactly_at_the_ring_end_or_fills_the_ring_fits() {
        let mut r = NvRing::new(10, 1);
        assert_eq!(r.alloc(5, 1), Some((1, 0))); // units 0..6
        assert_eq!(r.alloc(3, 2), Some((2, 6)), "units 6..10: ends at the ring's end, no skip");
        assert_eq!(r.used(), 10);
        assert_eq!(r.alloc(0, 3), None, "full");
        r.mark_done(1);
        r.mark_done(2);
        assert_eq!(r.take_durable(3), Some((3, 10)));
        r.tail_u = 10;
        assert_eq!(r.alloc(9, 4), Some((3, 0)), "a record of the ring's size fits an empty ring");
        assert_eq!(r.used(), 10);
        r.mark_done(3);
        assert_eq!(r.take_durable(5), Some((4, 20)));
        r.tail_u = 20;
        assert_eq!(r.alloc(10, 5), None, "larger than the ring");
        assert_eq!(r.used(), 0);
        assert_eq!(r.next_seq, 4, "a refused record takes no sequence number");
    }

    #[test]
    fn only_written_records_whose_entries_are_below_the_durable_entry_are_reclaimed() {
        let mut r = NvRing::new(100, 10);
        assert_eq!(r.alloc(1, 5), Some((10, 0)));
        assert_eq!(r.alloc(1, 7), Some((11, 2)));
        assert_eq!(r.alloc(1, 9), Some((12, 4)));
        r.mark_done(9); // before the first pending record: ignored
        r.mark_done(13); // past the last: ignored
        assert_eq!(r.take_durable(100), None, "nothing written yet");
        r.mark_done(11);
        r.mark_done(10);
        assert_eq!(r.take_durable(5), None, "entry 5 is not below 5");
        assert_eq!(r.take_durable(6), Some((11, 2)));
        assert_eq!(r.take_durable(100), Some((12, 4)), "seq 12 is not written: it stops there");
        assert_eq!(r.pending.len(), 1);
        r.mark_done(12);
        assert!(r.pending[0].done);
        assert_eq!(r.take_durable(10), Some((13, 6)));
    }

    /// A fresh nv-cache on a RAM bdev of `units` 4 KiB units (its registry keeps the bdev).
    fn fresh(units: u64) -> (crate::bdev::Registry, NvCache) {
        let reg = crate::bdev::Registry::new();
        let ram =
            crate::bdev::malloc::MallocBdev::new("nv", units * BLOCK_BYTES as u64, 4096).expect("malloc");
        reg.register(std::sync::Arc::new(ram)).expect("register");
        let desc = reg.open("nv", true).expect("open");
        match open(desc, [1; 16], 1, true, false).expect("open nv") {
            Opened::Fresh(nv) => (reg, nv),
            Opened::Existing(_) => panic!("a blank device is fresh"),
        }
    }

    /// Writes a record (header and data) at ring unit `u`; returns its header.
    fn put_record(nv: &NvCache, ch: &mut Channel, u: u64, seq: u64, lba: u64, n: u32) -> RecordHeader {
        let data: Vec<u8> = (0..n as usize * BLOCK_BYTES).map(|i| (i as u64 ^ seq) as u8).collect();
        put_data(nv, ch, u, seq, lba, &data)
    }

    /// Writes a record of `data` (whole units) at ring unit `u`; returns its header.
    fn put_data(nv: &NvCache, ch: &mut Channel, u: u64, seq: u64, lba: u64, data: &[u8]) -> RecordHeader {
        let n = (data.len() / BLOCK_BYTES) as u32;
        let h = RecordHeader { seq, lba, num_blocks: n, data_crc: crc(data) };
        let mut unit = h.encode(&nv.nonce());
        unit.extend_from_slice(data);
        write_units(ch, nv.blocks_per_unit, RING_FIRST + u, &unit).expect("write");
        h
    }

    #[test]
    fn the_scan_finds_every_whole_record_from_the_durable_sequence_across_read_chunks() {
        // 900 ring units: the scan reads them 256 at a time.
        let (_reg, nv) = fresh(2 + 900);
        let mut ch = nv.desc.channel().expect("channel");
        persist_super(&nv, &mut ch, 10, true).expect("durable_seq 10");
        let a = put_record(&nv, &mut ch, 0, 12, 100, 2);
        // Below durable_seq: skipped.
        let _old = put_record(&nv, &mut ch, 10, 9, 101, 1);
        // At durable_seq: replayed.
        let f = put_record(&nv, &mut ch, 100, 10, 109, 1);
        // Header last of the first read, data in the next one.
        let b = put_record(&nv, &mut ch, 255, 11, 102, 3);
        // Header first of the next read.
        let c = put_record(&nv, &mut ch, 259, 15, 103, 1);
        // A torn record (its data does not match its CRC) whose claimed data hides a whole one.
        let mut torn = put_record(&nv, &mut ch, 300, 13, 104, 4);
        torn.data_crc ^= 1;
        write_units(&mut ch, nv.blocks_per_unit, RING_FIRST + 300, &torn.encode(&nv.nonce())).expect("tear");
        let d = put_record(&nv, &mut ch, 302, 14, 105, 1);
        // A record whose data block is itself a valid header of this cache (of a record of one
        // zero block, the next unit): it is data, not a record.
        let inner = RecordHeader { seq: 20, lba: 110, num_blocks: 1, data_crc: crc(&[0u8; BLOCK_BYTES]) };
        let g = put_data(&nv, &mut ch, 400, 17, 111, &inner.encode(&nv.nonce()));
        // A record longer than a read, and one right after it.
        let big = put_record(&nv, &mut ch, 410, 19, 112, 256);
        let h = put_record(&nv, &mut ch, 667, 21, 113, 1);
        // A header whose data would run one unit past the ring's end (its data is never read).
        let over = RecordHeader { seq: 18, lba: 108, num_blocks: 20, data_crc: 0 };
        write_units(&mut ch, nv.blocks_per_unit, RING_FIRST + 880, &over.encode(&nv.nonce())).expect("write");
        // Ends exactly at the ring's end.
        let e = put_record(&nv, &mut ch, 896, 16, 106, 3);
        let t = std::time::Instant::now();
        let (found, logs) = crate::testlog::capture(|| scan(&nv, &mut ch).expect("scan"));
        let took = t.elapsed();
        let want = [(f, 100), (b, 255), (a, 0), (d, 302), (c, 259), (e, 896), (g, 400), (big, 410), (h, 667)];
        let want: Vec<Found> = want.iter().map(|&(header, unit)| Found { header, unit }).collect();
        assert_eq!(found, want, "by sequence");
        assert_eq!(
            logs.iter().filter(|l| l.contains("nv-cache nv: 9 records to replay")).count(),
            1,
            "{logs:?}"
        );
        // Progress lines come once a second at most (not one per read of 256 units).
        let progress = logs.iter().filter(|l| l.contains("scanning: block")).count() as u64;
        assert!(progress <= took.as_secs(), "{progress} progress lines in {took:?}: {logs:?}");
        // Nothing to replay: nothing logged.
        persist_super(&nv, &mut ch, 22, false).expect("durable_seq 22");
        let (found, logs) = crate::testlog::capture(|| scan(&nv, &mut ch).expect("scan"));
        assert!(found.is_empty());
        assert!(logs.iter().all(|l| !l.contains("records to replay")), "{logs:?}");
    }

    /// A RAM bdev of `bytes` bytes in `bs`-byte blocks, registered as "nv".
    fn ram(bytes: u64, bs: u32) -> crate::bdev::Registry {
        let reg = crate::bdev::Registry::new();
        let ram = crate::bdev::malloc::MallocBdev::new("nv", bytes, bs).expect("malloc");
        reg.register(std::sync::Arc::new(ram)).expect("register");
        reg
    }

    #[test]
    fn a_512_byte_block_bdev_is_used_in_4k_units_from_two_superblocks_plus_the_smallest_ring() {
        // 2 superblock units + a ring of at least 10 units: 12 units (96 blocks of 512 bytes).
        let reg = ram(12 * 4096, 512);
        let Opened::Fresh(nv) =
            open(reg.open("nv", true).expect("open"), [1; 16], 10, true, false).expect("fits")
        else {
            panic!("blank: fresh");
        };
        assert_eq!(nv.blocks_per_unit, 8);
        assert_eq!(nv.ring_block(3), (2 + 3) * 8);
        let sb = *crate::ftl::core::lock(&nv.sb);
        assert_eq!((sb.ring_units, sb.durable_seq, sb.generation, sb.uuid), (10, 1, 0, [1; 16]));
        // Both copies written: generations 1 (unit 1) and 2 (unit 0); then one more, in unit 1.
        let mut ch = nv.desc.channel().expect("channel");
        persist_super(&nv, &mut ch, 7, true).expect("format");
        persist_super(&nv, &mut ch, 9, false).expect("persist");
        let units = read_units(&mut ch, 8, 0, 2).expect("read");
        let copy = |i: usize| NvSuper::decode(&units[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES]).expect("valid");
        assert_eq!(copy(0).map(|s| (s.generation, s.durable_seq)), Some((2, 7)));
        assert_eq!(copy(1).map(|s| (s.generation, s.durable_seq)), Some((3, 9)));
        assert_eq!(*crate::ftl::core::lock(&nv.sb), NvSuper { generation: 3, durable_seq: 9, ..sb });
        drop(ch);
        drop(nv);
        // Reopened: this FTL's cache, the newest copy.
        let Opened::Existing(nv) =
            open(reg.open("nv", true).expect("open"), [1; 16], 10, false, false).expect("ok")
        else {
            panic!("formatted: existing");
        };
        assert_eq!(*crate::ftl::core::lock(&nv.sb), NvSuper { generation: 3, durable_seq: 9, ..sb });
        // Records are found at their units (8 blocks each).
        let mut ch = nv.desc.channel().expect("channel");
        let h = put_record(&nv, &mut ch, 3, 9, 40, 2);
        assert_eq!(scan(&nv, &mut ch).expect("scan"), vec![Found { header: h, unit: 3 }]);
        drop(ch);
        drop(nv);
        // Another FTL (not being created) does not take it.
        let e = open(reg.open("nv", true).expect("open"), [2; 16], 10, false, false).err().expect("refused");
        assert!(e.to_string().contains("holds the nv-cache of another FTL"), "{e}");
        // One ring unit short.
        let small = ram(11 * 4096, 512);
        let e =
            open(small.open("nv", true).expect("open"), [1; 16], 10, true, false).err().expect("too small");
        assert!(e.to_string().contains("45056 bytes is too small: at least 49152 bytes are needed"), "{e}");
    }

    /// A bdev with 8 KiB blocks (only its info is used: it is refused before any I/O).
    struct BigBlocks(crate::bdev::BdevInfo);

    impl crate::bdev::Bdev for BigBlocks {
        fn info(&self) -> &crate::bdev::BdevInfo {
            &self.0
        }
        fn create_channel(&self) -> Result<Box<dyn crate::bdev::ModuleChannel>, crate::bdev::BdevError> {
            Err(crate::bdev::BdevError::Module("no I/O".into()))
        }
    }

    #[test]
    fn a_bdev_whose_block_size_does_not_divide_4k_is_refused() {
        let reg = crate::bdev::Registry::new();
        let info = crate::bdev::BdevInfo::new("big", "test", 8192, 1024);
        reg.register(std::sync::Arc::new(BigBlocks(info))).expect("register");
        let e = open(reg.open("big", true).expect("open"), [1; 16], 10, true, false).err().expect("refused");
        assert!(e.to_string().contains("block size 8192 does not divide 4096"), "{e}");
    }

    #[test]
    fn a_ring_of_two_whole_reads_is_scanned_to_its_end_and_no_further() {
        let (_reg, nv) = fresh(2 + 512);
        let mut ch = nv.desc.channel().expect("channel");
        let a = put_record(&nv, &mut ch, 256, 5, 1, 1);
        let b = put_record(&nv, &mut ch, 510, 6, 2, 1);
        let found = scan(&nv, &mut ch).expect("scan");
        assert_eq!(found, vec![Found { header: a, unit: 256 }, Found { header: b, unit: 510 }]);
    }
}
