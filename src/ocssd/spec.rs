//! OCSSD 2.0 on-wire types with exact byte layouts (SPEC §3).
//!
//! ```text
//! geometry page (admin 0xE2, 4096 B)      chunk information entry (log 0xCA, 32 B)
//!   0  mjr  1 mnr  2..8 rsvd                0 state  1 type  2 wli  3..8 rsvd
//!   8..16 LBA format (grp,pu,chk,lbk lens)  8 slba(u64) 16 cnlb(u64) 24 wp(u64)
//!  16 mccap(u32)  32 wit(u8)
//!  64 num_grp(u16) 66 num_pu(u16)         chunk notification entry (log 0xD0, 64 B)
//!  68 num_chk(u32) 72 clba(u32)             0 nc(u64)  8 lba(u64) 16 nsid(u32)
//! 128 ws_min 132 ws_opt 136 mw_cunits       20 state(u16) 22 mask(u8) 32 nlb(u16)
//! 140 maxoc 144 maxocpu
//! 192 trdt 196 trdm 200 twrt 204 twrm 208 tcrst 212 tcrsm   (all little endian)
//! ```
//!
//! # Design
//! Runtime structs (`Geometry`, `ChunkInfo`, ...) are plain Rust values; `encode`/`decode`
//! convert them to and from the exact wire bytes, field by field (no `repr(C)` transmutes),
//! so a short or malformed buffer is an error, never a panic. The layouts follow the
//! Open-Channel SSD 2.0 specification as implemented by Linux (`drivers/nvme/host/lightnvm.c`),
//! SPDK (`include/spdk/nvme_ocssd_spec.h`) and QEMU's OCSSD controller.
//!
//! The chunk information entry's write pointer is the block offset *within* the chunk
//! (as in QEMU's OCSSD controller and Linux pblk), not an absolute LBA.
//!
//! # Limitations
//! Vendor-specific bytes of the geometry page are neither produced nor kept.

use thiserror::Error;

/// Size of the geometry data structure returned by admin opcode 0xE2.
pub const GEOMETRY_PAGE_BYTES: usize = 4096;
/// Size of one chunk information log entry (log page 0xCA).
pub const CHUNK_INFO_ENTRY_BYTES: usize = 32;
/// Size of one chunk notification log entry (log page 0xD0).
pub const CHUNK_NOTIFICATION_ENTRY_BYTES: usize = 64;
/// Maximum number of LBAs in one vector command (0-based 6-bit count in CDW12).
pub const MAX_VECTOR_LBAS: usize = 64;

/// Admin opcode: get geometry.
pub const OPC_ADMIN_GEOMETRY: u8 = 0xE2;
/// I/O opcode: vector chunk reset.
pub const OPC_VECTOR_RESET: u8 = 0x90;
/// I/O opcode: vector chunk write.
pub const OPC_VECTOR_WRITE: u8 = 0x91;
/// I/O opcode: vector chunk read.
pub const OPC_VECTOR_READ: u8 = 0x92;
/// I/O opcode: vector chunk copy.
pub const OPC_VECTOR_COPY: u8 = 0x93;
/// Log page identifier: chunk information.
pub const LOG_CHUNK_INFO: u8 = 0xCA;
/// Log page identifier: chunk notification.
pub const LOG_CHUNK_NOTIFICATION: u8 = 0xD0;

/// Media and controller capabilities (`mccap`), bit: vector copy supported.
pub const MCCAP_VECTOR_COPY: u32 = 1 << 0;
/// `mccap` bit: a chunk may be reset again while it is free.
pub const MCCAP_MULTIPLE_RESETS: u32 = 1 << 1;
/// `mccap` bit: an open chunk may be reset (before it is full).
pub const MCCAP_EARLY_RESET: u32 = 1 << 2;

/// Errors decoding wire structures.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    /// The buffer is shorter than the structure.
    #[error("{what}: buffer holds {got_bytes} bytes, the structure needs {need_bytes}")]
    Short {
        /// Which structure.
        what: &'static str,
        /// Buffer length.
        got_bytes: usize,
        /// Structure length.
        need_bytes: usize,
    },
    /// A chunk state byte has not exactly one known state bit set.
    #[error("chunk state byte {0:#04x} is not exactly one of free/closed/open/offline")]
    BadChunkState(u8),
}

fn check_len(what: &'static str, buf: &[u8], need_bytes: usize) -> Result<(), SpecError> {
    if buf.len() < need_bytes {
        return Err(SpecError::Short { what, got_bytes: buf.len(), need_bytes });
    }
    Ok(())
}

fn get_u16(buf: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([buf[off], buf[off + 1]])
}
fn get_u32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_le_bytes(b)
}
fn get_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}
fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// The LBA format of the geometry page: width in bits of each PPA field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct LbaFormat {
    /// Bits of the group field (most significant).
    pub grp_len: u8,
    /// Bits of the parallel-unit field.
    pub pu_len: u8,
    /// Bits of the chunk field.
    pub chk_len: u8,
    /// Bits of the logical-block field (least significant).
    pub lbk_len: u8,
}

impl LbaFormat {
    /// Smallest format that addresses the given geometry.
    pub fn for_sizes(num_grp: u64, num_pu: u64, num_chk: u64, clba: u64) -> Self {
        LbaFormat {
            grp_len: bits_for(num_grp),
            pu_len: bits_for(num_pu),
            chk_len: bits_for(num_chk),
            lbk_len: bits_for(clba),
        }
    }

    /// Sum of the four widths.
    pub fn total_bits(&self) -> u32 {
        u32::from(self.grp_len) + u32::from(self.pu_len) + u32::from(self.chk_len) + u32::from(self.lbk_len)
    }
}

/// Number of bits needed to number `count` items (`0..count`); 0 for 0 or 1 item.
pub fn bits_for(count: u64) -> u8 {
    if count <= 1 {
        0
    } else {
        // `leading_zeros` is at most 63 here, so the result is in 1..=64.
        (64 - (count - 1).leading_zeros()) as u8
    }
}

/// The OCSSD 2.0 geometry (admin opcode 0xE2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Geometry {
    /// Major version (2 for OCSSD 2.0).
    pub mjr: u8,
    /// Minor version.
    pub mnr: u8,
    /// PPA field widths.
    pub lbaf: LbaFormat,
    /// Media and controller capabilities (`MCCAP_*` bits).
    pub mccap: u32,
    /// Wear-level index delta threshold.
    pub wit: u8,
    /// Number of groups.
    pub num_grp: u16,
    /// Parallel units per group.
    pub num_pu: u16,
    /// Chunks per parallel unit.
    pub num_chk: u32,
    /// Logical blocks per chunk.
    pub clba: u32,
    /// Minimum write size in logical blocks.
    pub ws_min: u32,
    /// Optimal write size in logical blocks.
    pub ws_opt: u32,
    /// Cache minimum write size units: blocks behind the write pointer that may not be
    /// readable yet.
    pub mw_cunits: u32,
    /// Maximum open chunks (0 = no limit).
    pub maxoc: u32,
    /// Maximum open chunks per parallel unit (0 = no limit).
    pub maxocpu: u32,
    /// Typical read time (ns).
    pub trdt: u32,
    /// Max read time (ns).
    pub trdm: u32,
    /// Typical write time (ns).
    pub twrt: u32,
    /// Max write time (ns).
    pub twrm: u32,
    /// Typical chunk reset time (ns).
    pub tcrst: u32,
    /// Max chunk reset time (ns).
    pub tcrsm: u32,
}

impl Geometry {
    /// Total number of chunks on the device.
    pub fn total_chunks(&self) -> u64 {
        u64::from(self.num_grp) * u64::from(self.num_pu) * u64::from(self.num_chk)
    }

    /// Total number of parallel units.
    pub fn total_pus(&self) -> u64 {
        u64::from(self.num_grp) * u64::from(self.num_pu)
    }

    /// Encodes the 4096-byte geometry page.
    pub fn encode(&self) -> [u8; GEOMETRY_PAGE_BYTES] {
        let mut b = [0u8; GEOMETRY_PAGE_BYTES];
        b[0] = self.mjr;
        b[1] = self.mnr;
        b[8] = self.lbaf.grp_len;
        b[9] = self.lbaf.pu_len;
        b[10] = self.lbaf.chk_len;
        b[11] = self.lbaf.lbk_len;
        put(&mut b, 16, &self.mccap.to_le_bytes());
        b[32] = self.wit;
        put(&mut b, 64, &self.num_grp.to_le_bytes());
        put(&mut b, 66, &self.num_pu.to_le_bytes());
        put(&mut b, 68, &self.num_chk.to_le_bytes());
        put(&mut b, 72, &self.clba.to_le_bytes());
        let words = [
            (128, self.ws_min),
            (132, self.ws_opt),
            (136, self.mw_cunits),
            (140, self.maxoc),
            (144, self.maxocpu),
            (192, self.trdt),
            (196, self.trdm),
            (200, self.twrt),
            (204, self.twrm),
            (208, self.tcrst),
            (212, self.tcrsm),
        ];
        for (off, v) in words {
            put(&mut b, off, &v.to_le_bytes());
        }
        b
    }

    /// Decodes a geometry page (at least 4096 bytes; only the defined fields are read).
    pub fn decode(buf: &[u8]) -> Result<Self, SpecError> {
        check_len("geometry page", buf, GEOMETRY_PAGE_BYTES)?;
        Ok(Geometry {
            mjr: buf[0],
            mnr: buf[1],
            lbaf: LbaFormat { grp_len: buf[8], pu_len: buf[9], chk_len: buf[10], lbk_len: buf[11] },
            mccap: get_u32(buf, 16),
            wit: buf[32],
            num_grp: get_u16(buf, 64),
            num_pu: get_u16(buf, 66),
            num_chk: get_u32(buf, 68),
            clba: get_u32(buf, 72),
            ws_min: get_u32(buf, 128),
            ws_opt: get_u32(buf, 132),
            mw_cunits: get_u32(buf, 136),
            maxoc: get_u32(buf, 140),
            maxocpu: get_u32(buf, 144),
            trdt: get_u32(buf, 192),
            trdm: get_u32(buf, 196),
            twrt: get_u32(buf, 200),
            twrm: get_u32(buf, 204),
            tcrst: get_u32(buf, 208),
            tcrsm: get_u32(buf, 212),
        })
    }
}

/// Chunk state (exactly one bit of the entry's state byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkState {
    /// Erased, write pointer 0.
    Free,
    /// Fully written or closed early; readable below the write pointer.
    Closed,
    /// Partially written.
    Open,
    /// Bad: rejects all I/O.
    Offline,
}

impl ChunkState {
    /// The state byte bit.
    pub fn bits(self) -> u8 {
        match self {
            ChunkState::Free => 1 << 0,
            ChunkState::Closed => 1 << 1,
            ChunkState::Open => 1 << 2,
            ChunkState::Offline => 1 << 3,
        }
    }

    /// Parses a state byte; reserved bits or several states are an error.
    pub fn from_bits(b: u8) -> Result<Self, SpecError> {
        match b {
            0x01 => Ok(ChunkState::Free),
            0x02 => Ok(ChunkState::Closed),
            0x04 => Ok(ChunkState::Open),
            0x08 => Ok(ChunkState::Offline),
            other => Err(SpecError::BadChunkState(other)),
        }
    }
}

/// Chunk type bit: writes must be sequential.
pub const CHUNK_TYPE_SEQUENTIAL: u8 = 1 << 0;
/// Chunk type bit: random writes allowed.
pub const CHUNK_TYPE_RANDOM: u8 = 1 << 1;
/// Chunk type bit: the chunk is smaller than `clba` (`cnlb` holds its size).
pub const CHUNK_TYPE_SHRUNK: u8 = 1 << 4;

/// One chunk information log entry (log page 0xCA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ChunkInfo {
    /// Chunk state.
    pub state: ChunkState,
    /// `CHUNK_TYPE_*` bits.
    pub kind: u8,
    /// Wear-level index (0..=255).
    pub wear_index: u8,
    /// Start LBA: the packed PPA of the chunk's first block.
    pub slba: u64,
    /// Number of blocks in the chunk.
    pub cnlb: u64,
    /// Write pointer: offset in blocks of the next block to write, within the chunk.
    pub write_pointer_blocks: u64,
}

impl ChunkInfo {
    /// Encodes the 32-byte entry.
    pub fn encode(&self) -> [u8; CHUNK_INFO_ENTRY_BYTES] {
        let mut b = [0u8; CHUNK_INFO_ENTRY_BYTES];
        b[0] = self.state.bits();
        b[1] = self.kind;
        b[2] = self.wear_index;
        put(&mut b, 8, &self.slba.to_le_bytes());
        put(&mut b, 16, &self.cnlb.to_le_bytes());
        put(&mut b, 24, &self.write_pointer_blocks.to_le_bytes());
        b
    }

    /// Decodes a 32-byte entry.
    pub fn decode(buf: &[u8]) -> Result<Self, SpecError> {
        check_len("chunk information entry", buf, CHUNK_INFO_ENTRY_BYTES)?;
        Ok(ChunkInfo {
            state: ChunkState::from_bits(buf[0])?,
            kind: buf[1],
            wear_index: buf[2],
            slba: get_u64(buf, 8),
            cnlb: get_u64(buf, 16),
            write_pointer_blocks: get_u64(buf, 24),
        })
    }
}

/// Notification state bit: low ECC.
pub const NOTIFY_STATE_LOW_ECC: u16 = 1 << 0;
/// Notification state bit: medium ECC.
pub const NOTIFY_STATE_MID_ECC: u16 = 1 << 1;
/// Notification state bit: high ECC (the data should be moved).
pub const NOTIFY_STATE_HIGH_ECC: u16 = 1 << 2;
/// Notification state bit: unrecoverable error.
pub const NOTIFY_STATE_UNRECOVERABLE: u16 = 1 << 3;
/// Notification state bit: the chunk was refreshed by the device.
pub const NOTIFY_STATE_REFRESHED: u16 = 1 << 4;
/// Notification state bit: the wear-level index moved outside the threshold.
pub const NOTIFY_STATE_WEAR_INDEX: u16 = 1 << 8;
/// Notification mask bit: the entry concerns logical blocks (`lba`, `nlb`).
pub const NOTIFY_MASK_BLOCKS: u8 = 1 << 0;
/// Notification mask bit: the entry concerns the whole chunk at `lba`.
pub const NOTIFY_MASK_CHUNK: u8 = 1 << 1;
/// Notification mask bit: the entry concerns the whole parallel unit at `lba`.
pub const NOTIFY_MASK_PU: u8 = 1 << 2;

/// One chunk notification log entry (log page 0xD0): an asynchronous media event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ChunkNotification {
    /// Notification count: increases by one per new entry.
    pub nc: u64,
    /// Packed PPA the event concerns.
    pub lba: u64,
    /// Namespace.
    pub nsid: u32,
    /// `NOTIFY_STATE_*` bits.
    pub state: u16,
    /// `NOTIFY_MASK_*` bits.
    pub mask: u8,
    /// Number of logical blocks concerned (when the mask says blocks).
    pub nlb: u16,
}

impl ChunkNotification {
    /// Encodes the 64-byte entry.
    pub fn encode(&self) -> [u8; CHUNK_NOTIFICATION_ENTRY_BYTES] {
        let mut b = [0u8; CHUNK_NOTIFICATION_ENTRY_BYTES];
        put(&mut b, 0, &self.nc.to_le_bytes());
        put(&mut b, 8, &self.lba.to_le_bytes());
        put(&mut b, 16, &self.nsid.to_le_bytes());
        put(&mut b, 20, &self.state.to_le_bytes());
        b[22] = self.mask;
        put(&mut b, 32, &self.nlb.to_le_bytes());
        b
    }

    /// Decodes a 64-byte entry.
    pub fn decode(buf: &[u8]) -> Result<Self, SpecError> {
        check_len("chunk notification entry", buf, CHUNK_NOTIFICATION_ENTRY_BYTES)?;
        Ok(ChunkNotification {
            nc: get_u64(buf, 0),
            lba: get_u64(buf, 8),
            nsid: get_u32(buf, 16),
            state: get_u16(buf, 20),
            mask: buf[22],
            nlb: get_u16(buf, 32),
        })
    }
}

/// Status code type: generic command status.
pub const SCT_GENERIC: u8 = 0x0;
/// Status code type: media and data integrity errors (where the OCSSD codes live).
pub const SCT_MEDIA: u8 = 0x2;

/// An NVMe completion status (status code type + status code).
///
/// A struct, not an enum, so codes from a real device that this crate does not name
/// still round-trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    /// Status code type (`SCT_*`).
    pub sct: u8,
    /// Status code.
    pub sc: u8,
}

impl Status {
    /// Success.
    pub const SUCCESS: Status = Status { sct: 0, sc: 0x00 };
    /// Invalid field in command (e.g. a write that is not a multiple of `ws_min`,
    /// an empty or oversize LBA list, buffers of the wrong length).
    pub const INVALID_FIELD: Status = Status { sct: 0, sc: 0x02 };
    /// Internal error (the emulator's image I/O failed).
    pub const INTERNAL_ERROR: Status = Status { sct: 0, sc: 0x06 };
    /// LBA out of range: a PPA field beyond the geometry.
    pub const LBA_OUT_OF_RANGE: Status = Status { sct: 0, sc: 0x80 };
    /// Write fault: write to a closed chunk or beyond the chunk's end.
    pub const WRITE_FAULT: Status = Status { sct: 2, sc: 0x80 };
    /// Unrecovered read error.
    pub const UNRECOVERED_READ: Status = Status { sct: 2, sc: 0x81 };
    /// Deallocated or unwritten logical block: read at or beyond the write pointer.
    pub const UNWRITTEN_BLOCK: Status = Status { sct: 2, sc: 0x87 };
    /// OCSSD: offline chunk.
    pub const OFFLINE_CHUNK: Status = Status { sct: 2, sc: 0xC0 };
    /// OCSSD: invalid reset (reset of a free chunk without multiple-reset support, or of
    /// an open chunk without early-reset support).
    pub const INVALID_RESET: Status = Status { sct: 2, sc: 0xC1 };
    /// OCSSD: high ECC on read (data returned, but it should be moved).
    pub const HIGH_ECC: Status = Status { sct: 2, sc: 0xD0 };
    /// OCSSD: write failed, the chunk stays open, write the next unit.
    pub const WRITE_FAIL_NEXT_UNIT: Status = Status { sct: 2, sc: 0xF0 };
    /// OCSSD: write failed, the chunk was closed early.
    pub const CHUNK_CLOSED_EARLY: Status = Status { sct: 2, sc: 0xF1 };
    /// OCSSD: out-of-order write (not at the write pointer).
    pub const OUT_OF_ORDER_WRITE: Status = Status { sct: 2, sc: 0xF2 };

    /// True for success.
    pub fn is_success(self) -> bool {
        self == Status::SUCCESS
    }

    /// Human name of known codes.
    pub fn name(self) -> &'static str {
        match (self.sct, self.sc) {
            (0, 0x00) => "success",
            (0, 0x02) => "invalid field",
            (0, 0x06) => "internal error",
            (0, 0x80) => "LBA out of range",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (2, 0x87) => "deallocated or unwritten block",
            (2, 0xC0) => "offline chunk",
            (2, 0xC1) => "invalid reset",
            (2, 0xD0) => "high ECC",
            (2, 0xF0) => "write fail, write next unit",
            (2, 0xF1) => "chunk closed early",
            (2, 0xF2) => "out-of-order write",
            _ => "unknown status",
        }
    }

    /// Parses the 15-bit status field of a completion (CQE DW3 bits 31:17, i.e.
    /// `dw3 >> 17`): SC in bits 7:0, SCT in bits 10:8.
    pub fn from_status_field(sf: u16) -> Self {
        Status { sc: (sf & 0xff) as u8, sct: ((sf >> 8) & 0x7) as u8 }
    }

    /// The status field (without the phase bit), with the do-not-retry bit as given.
    pub fn to_status_field(self, dnr: bool) -> u16 {
        u16::from(self.sc) | (u16::from(self.sct & 0x7) << 8) | (u16::from(dnr) << 14)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (sct {:#x}, sc {:#04x})", self.name(), self.sct, self.sc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_page_layout_offsets() {
        let g = Geometry {
            mjr: 2,
            mnr: 0,
            lbaf: LbaFormat { grp_len: 1, pu_len: 2, chk_len: 3, lbk_len: 4 },
            mccap: 0x0102_0304,
            wit: 10,
            num_grp: 0x1122,
            num_pu: 0x3344,
            num_chk: 0x5566_7788,
            clba: 0x99aa_bbcc,
            ws_min: 4,
            ws_opt: 8,
            mw_cunits: 12,
            maxoc: 5,
            maxocpu: 6,
            trdt: 7,
            trdm: 8,
            twrt: 9,
            twrm: 10,
            tcrst: 11,
            tcrsm: 12,
        };
        let b = g.encode();
        assert_eq!(&b[8..12], &[1, 2, 3, 4]);
        assert_eq!(&b[16..20], &0x0102_0304u32.to_le_bytes());
        assert_eq!(b[32], 10);
        assert_eq!(&b[64..66], &0x1122u16.to_le_bytes());
        assert_eq!(&b[66..68], &0x3344u16.to_le_bytes());
        assert_eq!(&b[68..72], &0x5566_7788u32.to_le_bytes());
        assert_eq!(&b[72..76], &0x99aa_bbccu32.to_le_bytes());
        assert_eq!(&b[128..132], &4u32.to_le_bytes());
        assert_eq!(&b[132..136], &8u32.to_le_bytes());
        assert_eq!(&b[136..140], &12u32.to_le_bytes());
        assert_eq!(&b[212..216], &12u32.to_le_bytes());
        assert_eq!(Geometry::decode(&b), Ok(g));
        assert!(matches!(Geometry::decode(&b[..100]), Err(SpecError::Short { .. })));
    }

    #[test]
    fn chunk_info_layout() {
        let c = ChunkInfo {
            state: ChunkState::Open,
            kind: CHUNK_TYPE_SEQUENTIAL,
            wear_index: 3,
            slba: 0x0102_0304_0506_0708,
            cnlb: 4096,
            write_pointer_blocks: 17,
        };
        let b = c.encode();
        assert_eq!(b[0], 0x04);
        assert_eq!(b[1], 0x01);
        assert_eq!(b[2], 3);
        assert_eq!(&b[3..8], &[0; 5]);
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[16..24], &4096u64.to_le_bytes());
        assert_eq!(&b[24..32], &17u64.to_le_bytes());
        assert_eq!(ChunkInfo::decode(&b), Ok(c));
        let mut bad = b;
        bad[0] = 0x05;
        assert_eq!(ChunkInfo::decode(&bad), Err(SpecError::BadChunkState(0x05)));
    }

    #[test]
    fn notification_layout() {
        let n = ChunkNotification {
            nc: 9,
            lba: 0xabcdef,
            nsid: 1,
            state: NOTIFY_STATE_WEAR_INDEX | NOTIFY_STATE_HIGH_ECC,
            mask: NOTIFY_MASK_CHUNK,
            nlb: 300,
        };
        let b = n.encode();
        assert_eq!(&b[0..8], &9u64.to_le_bytes());
        assert_eq!(&b[8..16], &0xabcdefu64.to_le_bytes());
        assert_eq!(&b[16..20], &1u32.to_le_bytes());
        assert_eq!(&b[20..22], &0x0104u16.to_le_bytes());
        assert_eq!(b[22], 0x02);
        assert_eq!(&b[32..34], &300u16.to_le_bytes());
        assert_eq!(ChunkNotification::decode(&b), Ok(n));
    }

    #[test]
    fn status_field_round_trip() {
        for s in [
            Status::OFFLINE_CHUNK,
            Status::INVALID_RESET,
            Status::WRITE_FAIL_NEXT_UNIT,
            Status::CHUNK_CLOSED_EARLY,
            Status::OUT_OF_ORDER_WRITE,
            Status::HIGH_ECC,
        ] {
            assert_eq!(s.sct, SCT_MEDIA);
            let sf = s.to_status_field(true);
            assert_eq!(sf & (1 << 14), 1 << 14);
            assert_eq!(Status::from_status_field(sf), s);
        }
        assert_eq!(Status::OUT_OF_ORDER_WRITE.to_status_field(false), 0x2F2);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(bits_for(0), 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4096), 12);
        assert_eq!(bits_for(4097), 13);
        assert_eq!(bits_for(u64::MAX), 64);
    }
}
