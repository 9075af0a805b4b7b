//! Vector command encoding: LBA lists, the 64-byte submission entry and the per-LBA
//! completion bitmap (SPEC §3).
//!
//! ```text
//! SQE   DW0  opcode | flags | cid     DW1 nsid
//!       DW4-5   metadata pointer       DW6-9 data pointer (PRP1, PRP2)
//!       DW10-11 LBA list pointer, or the LBA itself when the list has one entry
//!       DW12    bits 5:0 number of LBAs, 0-based (so at most 64)
//!       DW14-15 destination LBA list (vector copy only)
//! CQE   DW0-1   bit i set = LBA list entry i failed
//! ```
//!
//! # Design
//! Pure encoding with no I/O: the NVMe transport fills in DMA addresses; the emulator uses
//! [`LbaBitmap`] to report per-entry failures exactly as a device would.

use thiserror::Error;

use super::ppa::{Ppa, PpaError, PpaFormat};
use super::spec::MAX_VECTOR_LBAS;

/// Errors building vector commands.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VectorError {
    /// The LBA list is empty or longer than 64 entries.
    #[error("vector command with {0} LBAs; 1..=64 allowed")]
    BadLength(usize),
    /// An address does not fit the PPA format.
    #[error("LBA list entry {index}: {source}")]
    Ppa {
        /// Index in the list.
        index: usize,
        /// Why.
        source: PpaError,
    },
}

/// Packs a PPA list into the little-endian LBA list the device reads (8 bytes per entry).
pub fn encode_lba_list(fmt: &PpaFormat, ppas: &[Ppa]) -> Result<Vec<u8>, VectorError> {
    if ppas.is_empty() || ppas.len() > MAX_VECTOR_LBAS {
        return Err(VectorError::BadLength(ppas.len()));
    }
    let mut out = Vec::with_capacity(ppas.len() * 8);
    for (index, ppa) in ppas.iter().enumerate() {
        let raw = fmt.pack(*ppa).map_err(|source| VectorError::Ppa { index, source })?;
        out.extend_from_slice(&raw.to_le_bytes());
    }
    Ok(out)
}

/// Decodes a little-endian LBA list (length must be a multiple of 8, 1..=64 entries).
pub fn decode_lba_list(fmt: &PpaFormat, bytes: &[u8]) -> Result<Vec<Ppa>, VectorError> {
    let n = bytes.len() / 8;
    if bytes.len() % 8 != 0 || n == 0 || n > MAX_VECTOR_LBAS {
        return Err(VectorError::BadLength(n));
    }
    bytes
        .chunks_exact(8)
        .enumerate()
        .map(|(index, c)| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            fmt.unpack(u64::from_le_bytes(b)).map_err(|source| VectorError::Ppa { index, source })
        })
        .collect()
}

/// The fields of one vector submission queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VectorSqe {
    /// Opcode (`OPC_VECTOR_*`).
    pub opcode: u8,
    /// Command identifier.
    pub cid: u16,
    /// Namespace.
    pub nsid: u32,
    /// Metadata (OOB) buffer address.
    pub metadata_addr: u64,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2.
    pub prp2: u64,
    /// Address of the LBA list, or the packed LBA itself when `num_lbas == 1`.
    pub lba_list: u64,
    /// Number of LBAs (1..=64), stored 0-based.
    pub num_lbas: usize,
    /// Destination LBA list address (vector copy).
    pub dst_lba_list: u64,
}

impl VectorSqe {
    /// Encodes the 64-byte submission queue entry.
    pub fn encode(&self) -> Result<[u8; 64], VectorError> {
        if self.num_lbas == 0 || self.num_lbas > MAX_VECTOR_LBAS {
            return Err(VectorError::BadLength(self.num_lbas));
        }
        let mut b = [0u8; 64];
        b[0] = self.opcode;
        b[2..4].copy_from_slice(&self.cid.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[16..24].copy_from_slice(&self.metadata_addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.prp1.to_le_bytes());
        b[32..40].copy_from_slice(&self.prp2.to_le_bytes());
        b[40..48].copy_from_slice(&self.lba_list.to_le_bytes());
        // num_lbas is 1..=64 here, so the 0-based count fits in 6 bits.
        let nlb_0based = (self.num_lbas - 1) as u32;
        b[48..52].copy_from_slice(&nlb_0based.to_le_bytes());
        b[56..64].copy_from_slice(&self.dst_lba_list.to_le_bytes());
        Ok(b)
    }

    /// Decodes a 64-byte submission queue entry.
    pub fn decode(b: &[u8; 64]) -> Self {
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let cdw12 = u32::from_le_bytes([b[48], b[49], b[50], b[51]]);
        VectorSqe {
            opcode: b[0],
            cid: u16::from_le_bytes([b[2], b[3]]),
            nsid: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            metadata_addr: u64_at(16),
            prp1: u64_at(24),
            prp2: u64_at(32),
            lba_list: u64_at(40),
            num_lbas: (cdw12 & 0x3f) as usize + 1,
            dst_lba_list: u64_at(56),
        }
    }
}

/// Per-LBA completion bitmap (CQE DW0-1): bit `i` set means list entry `i` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct LbaBitmap(pub u64);

impl LbaBitmap {
    /// No failures.
    pub const NONE: LbaBitmap = LbaBitmap(0);

    /// All of the first `n` entries failed (`n` ≤ 64).
    pub fn first(n: usize) -> Self {
        if n >= 64 {
            LbaBitmap(u64::MAX)
        } else {
            LbaBitmap((1u64 << n) - 1)
        }
    }

    /// Marks entry `i` (< 64) as failed; larger indexes are ignored.
    pub fn set(&mut self, i: usize) {
        if i < 64 {
            self.0 |= 1u64 << i;
        }
    }

    /// True if entry `i` failed.
    pub fn is_set(&self, i: usize) -> bool {
        i < 64 && self.0 & (1u64 << i) != 0
    }

    /// Number of failed entries.
    pub fn count(&self) -> u32 {
        self.0.count_ones()
    }

    /// From the completion's DW0 (low half) and DW1 (high half).
    pub fn from_cqe(dw0: u32, dw1: u32) -> Self {
        LbaBitmap(u64::from(dw0) | (u64::from(dw1) << 32))
    }

    /// To the completion's (DW0, DW1).
    pub fn to_cqe(self) -> (u32, u32) {
        ((self.0 & 0xffff_ffff) as u32, (self.0 >> 32) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ocssd::spec::{LbaFormat, OPC_VECTOR_WRITE};

    fn fmt() -> PpaFormat {
        PpaFormat::new(LbaFormat { grp_len: 2, pu_len: 3, chk_len: 10, lbk_len: 12 }).expect("fits")
    }

    #[test]
    fn lba_list_round_trip_and_limits() {
        let f = fmt();
        let ppas: Vec<Ppa> = (0..64).map(|i| Ppa::new(1, 2, 3, i)).collect();
        let bytes = encode_lba_list(&f, &ppas).expect("64 entries are allowed");
        assert_eq!(bytes.len(), 512);
        assert_eq!(&bytes[8..16], &f.pack(ppas[1]).expect("fits").to_le_bytes());
        assert_eq!(decode_lba_list(&f, &bytes), Ok(ppas.clone()));
        let mut too_many = ppas.clone();
        too_many.push(Ppa::default());
        assert_eq!(encode_lba_list(&f, &too_many), Err(VectorError::BadLength(65)));
        assert_eq!(encode_lba_list(&f, &[]), Err(VectorError::BadLength(0)));
        assert!(matches!(
            encode_lba_list(&f, &[Ppa::new(4, 0, 0, 0)]),
            Err(VectorError::Ppa { index: 0, .. })
        ));
    }

    #[test]
    fn sqe_layout() {
        let sqe = VectorSqe {
            opcode: OPC_VECTOR_WRITE,
            cid: 7,
            nsid: 1,
            metadata_addr: 0x1000,
            prp1: 0x2000,
            prp2: 0x3000,
            lba_list: 0x4000,
            num_lbas: 64,
            dst_lba_list: 0,
        };
        let b = sqe.encode().expect("valid");
        assert_eq!(b[0], 0x91);
        assert_eq!(&b[40..48], &0x4000u64.to_le_bytes());
        assert_eq!(&b[48..52], &63u32.to_le_bytes());
        assert_eq!(VectorSqe::decode(&b), sqe);
        let bad = VectorSqe { num_lbas: 65, ..sqe };
        assert_eq!(bad.encode(), Err(VectorError::BadLength(65)));
    }

    #[test]
    fn bitmap() {
        let mut m = LbaBitmap::NONE;
        m.set(0);
        m.set(33);
        m.set(63);
        m.set(64);
        assert!(m.is_set(33) && !m.is_set(1) && !m.is_set(64));
        assert_eq!(m.count(), 3);
        let (dw0, dw1) = m.to_cqe();
        assert_eq!(dw0, 1);
        assert_eq!(dw1, (1 << 1) | (1 << 31));
        assert_eq!(LbaBitmap::from_cqe(dw0, dw1), m);
        assert_eq!(LbaBitmap::first(64), LbaBitmap(u64::MAX));
        assert_eq!(LbaBitmap::first(3), LbaBitmap(7));
    }
}
