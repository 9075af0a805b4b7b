//! Physical page addresses (PPA): packing and unpacking (SPEC §3).
//!
//! ```text
//!  63                                                              0
//!  | unused | grp (grp_len) | pu (pu_len) | chk (chk_len) | lbk (lbk_len) |
//! ```
//!
//! # Design
//! A [`Ppa`] is the unpacked address (one `u64` per field, so any width up to 64 bits fits);
//! a [`PpaFormat`] built from the geometry's LBA format packs it, least significant field
//! first. Every shift is guarded: a zero-width field never shifts, and a format whose widths
//! add up to more than 64 bits is refused at construction, so no shift can overflow.
//! Packing a field wider than its width is an error (never silently truncated); unpacking a
//! value with bits set above the format is an error.

use thiserror::Error;

use super::spec::LbaFormat;

/// An unpacked physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Ppa {
    /// Group.
    pub grp: u64,
    /// Parallel unit within the group.
    pub pu: u64,
    /// Chunk within the parallel unit.
    pub chk: u64,
    /// Logical block within the chunk.
    pub lbk: u64,
}

impl Ppa {
    /// Address of block `lbk` of chunk `chk` of PU `pu` of group `grp`.
    pub fn new(grp: u64, pu: u64, chk: u64, lbk: u64) -> Self {
        Ppa { grp, pu, chk, lbk }
    }

    /// The same chunk, block 0.
    pub fn chunk_start(self) -> Self {
        Ppa { lbk: 0, ..self }
    }

    /// The same chunk, block `lbk`.
    pub fn with_lbk(self, lbk: u64) -> Self {
        Ppa { lbk, ..self }
    }

    /// True when both addresses are in the same chunk.
    pub fn same_chunk(&self, other: &Ppa) -> bool {
        self.grp == other.grp && self.pu == other.pu && self.chk == other.chk
    }
}

impl std::fmt::Display for Ppa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "grp {} pu {} chk {} lbk {}", self.grp, self.pu, self.chk, self.lbk)
    }
}

/// Errors packing or unpacking addresses.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PpaError {
    /// The four widths add up to more than 64 bits.
    #[error("LBA format is {total_bits} bits wide; at most 64 fit a PPA")]
    TooWide {
        /// Sum of the widths.
        total_bits: u32,
    },
    /// A field's value does not fit its width.
    #[error("{field} {value} does not fit in {len_bits} bits")]
    FieldOverflow {
        /// Field name (`grp`, `pu`, `chk`, `lbk`).
        field: &'static str,
        /// The value.
        value: u64,
        /// Its width.
        len_bits: u8,
    },
    /// A packed value has bits set above the format's total width.
    #[error("packed PPA {raw:#x} has bits set above bit {total_bits}")]
    StrayBits {
        /// The packed value.
        raw: u64,
        /// The format width.
        total_bits: u32,
    },
}

/// A PPA packing format: bit offset and width of each field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PpaFormat {
    lbaf: LbaFormat,
    lbk_offset: u32,
    chk_offset: u32,
    pu_offset: u32,
    grp_offset: u32,
}

fn mask(len_bits: u8) -> u64 {
    if len_bits >= 64 {
        u64::MAX
    } else {
        (1u64 << len_bits) - 1
    }
}

fn field_in(field: &'static str, value: u64, len_bits: u8, offset: u32) -> Result<u64, PpaError> {
    if value & !mask(len_bits) != 0 {
        return Err(PpaError::FieldOverflow { field, value, len_bits });
    }
    if len_bits == 0 {
        // Value is 0 here; offset may be 64 for a trailing empty field.
        return Ok(0);
    }
    // offset + len_bits <= 64 and len_bits >= 1, so offset <= 63.
    Ok(value << offset)
}

fn field_out(raw: u64, len_bits: u8, offset: u32) -> u64 {
    if len_bits == 0 {
        0
    } else {
        (raw >> offset) & mask(len_bits)
    }
}

impl PpaFormat {
    /// A format from the geometry's LBA format; refused if wider than 64 bits.
    pub fn new(lbaf: LbaFormat) -> Result<Self, PpaError> {
        let total_bits = lbaf.total_bits();
        if total_bits > 64 {
            return Err(PpaError::TooWide { total_bits });
        }
        let lbk_offset = 0;
        let chk_offset = lbk_offset + u32::from(lbaf.lbk_len);
        let pu_offset = chk_offset + u32::from(lbaf.chk_len);
        let grp_offset = pu_offset + u32::from(lbaf.pu_len);
        Ok(PpaFormat { lbaf, lbk_offset, chk_offset, pu_offset, grp_offset })
    }

    /// The LBA format.
    pub fn lbaf(&self) -> LbaFormat {
        self.lbaf
    }

    /// Total width in bits.
    pub fn total_bits(&self) -> u32 {
        self.lbaf.total_bits()
    }

    /// Packs an address.
    pub fn pack(&self, ppa: Ppa) -> Result<u64, PpaError> {
        let l = self.lbaf;
        Ok(field_in("lbk", ppa.lbk, l.lbk_len, self.lbk_offset)?
            | field_in("chk", ppa.chk, l.chk_len, self.chk_offset)?
            | field_in("pu", ppa.pu, l.pu_len, self.pu_offset)?
            | field_in("grp", ppa.grp, l.grp_len, self.grp_offset)?)
    }

    /// Unpacks an address; bits above the format's width are an error.
    pub fn unpack(&self, raw: u64) -> Result<Ppa, PpaError> {
        let total_bits = self.total_bits();
        if total_bits < 64 && raw >> total_bits != 0 {
            return Err(PpaError::StrayBits { raw, total_bits });
        }
        let l = self.lbaf;
        Ok(Ppa {
            grp: field_out(raw, l.grp_len, self.grp_offset),
            pu: field_out(raw, l.pu_len, self.pu_offset),
            chk: field_out(raw, l.chk_len, self.chk_offset),
            lbk: field_out(raw, l.lbk_len, self.lbk_offset),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fmt(g: u8, p: u8, c: u8, l: u8) -> PpaFormat {
        PpaFormat::new(LbaFormat { grp_len: g, pu_len: p, chk_len: c, lbk_len: l }).expect("valid format")
    }

    #[test]
    fn packs_least_significant_first() {
        let f = fmt(2, 3, 4, 5);
        let raw = f.pack(Ppa::new(1, 2, 3, 4)).expect("fits");
        assert_eq!(raw, 4 | (3 << 5) | (2 << 9) | (1 << 12));
    }

    #[test]
    fn full_width_fields_do_not_overflow() {
        let f = fmt(0, 0, 0, 64);
        assert_eq!(f.pack(Ppa::new(0, 0, 0, u64::MAX)), Ok(u64::MAX));
        assert_eq!(f.unpack(u64::MAX), Ok(Ppa::new(0, 0, 0, u64::MAX)));
        let f = fmt(64, 0, 0, 0);
        assert_eq!(f.pack(Ppa::new(u64::MAX, 0, 0, 0)), Ok(u64::MAX));
        assert_eq!(f.unpack(1 << 63), Ok(Ppa::new(1 << 63, 0, 0, 0)));
        let f = fmt(0, 0, 0, 0);
        assert_eq!(f.pack(Ppa::default()), Ok(0));
        assert_eq!(f.unpack(1), Err(PpaError::StrayBits { raw: 1, total_bits: 0 }));
    }

    #[test]
    fn refuses_too_wide_and_overflowing_fields() {
        assert_eq!(
            PpaFormat::new(LbaFormat { grp_len: 32, pu_len: 32, chk_len: 1, lbk_len: 0 }),
            Err(PpaError::TooWide { total_bits: 65 })
        );
        let f = fmt(1, 1, 1, 1);
        assert_eq!(
            f.pack(Ppa::new(0, 2, 0, 0)),
            Err(PpaError::FieldOverflow { field: "pu", value: 2, len_bits: 1 })
        );
        assert!(matches!(f.unpack(16), Err(PpaError::StrayBits { .. })));
    }

    fn widths() -> impl Strategy<Value = (u8, u8, u8, u8)> {
        (0u8..=64, 0u8..=64, 0u8..=64, 0u8..=64).prop_filter("total <= 64", |(a, b, c, d)| {
            u32::from(*a) + u32::from(*b) + u32::from(*c) + u32::from(*d) <= 64
        })
    }

    proptest! {
        #[test]
        fn pack_unpack_round_trips((g, p, c, l) in widths(), seed in any::<[u64; 4]>()) {
            let f = fmt(g, p, c, l);
            let ppa = Ppa::new(seed[0] & mask(g), seed[1] & mask(p), seed[2] & mask(c), seed[3] & mask(l));
            let raw = f.pack(ppa).expect("fits by construction");
            prop_assert_eq!(f.unpack(raw), Ok(ppa));
            // The packed value uses only the format's bits.
            let total = f.total_bits();
            if total < 64 {
                prop_assert_eq!(raw >> total, 0);
            }
        }

        #[test]
        fn unpack_pack_round_trips((g, p, c, l) in widths(), raw in any::<u64>()) {
            let f = fmt(g, p, c, l);
            let total = f.total_bits();
            let raw = if total >= 64 { raw } else { raw & ((1u64 << total) - 1) };
            let ppa = f.unpack(raw).expect("no stray bits");
            prop_assert_eq!(f.pack(ppa), Ok(raw));
        }

        #[test]
        fn oversize_field_is_refused((g, p, c, l) in widths(), which in 0usize..4) {
            let lens = [g, p, c, l];
            prop_assume!(lens[which] < 64);
            let f = fmt(g, p, c, l);
            let mut v = [0u64; 4];
            v[which] = 1u64 << lens[which];
            let overflowed = matches!(f.pack(Ppa::new(v[0], v[1], v[2], v[3])), Err(PpaError::FieldOverflow { .. }));
            prop_assert!(overflowed, "field {} of width {} accepted 2^width", which, lens[which]);
        }
    }
}
