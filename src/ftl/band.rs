//! Bands: geometry of the parallel-unit range, the position → physical address mapping, and the
//! runtime state of each band.
//!
//! ```text
//!  band j = chunk j on every PU of the range;  positions stripe ws_opt blocks per good chunk:
//!   pos:  0..ws_opt → chunk g0 lbk 0..  | ws_opt..2ws_opt → chunk g1 lbk 0.. | ... | → g0 lbk ws_opt..
//!   [0] head md │ data positions ............................. │ tail md (last tail_len positions)
//!  states: Free → Prep (erased) → Opening (head queued) → Open → Full → Closing (tail queued) → Closed
//! ```
//!
//! # Design
//! A media address is `band * max_positions + pos` (a flat number that fits the L2P). The mapping
//! of positions to chunks uses the band's good chunks of its current incarnation (recorded in the
//! head metadata), so it is fixed while the band is written; a chunk retired after a write failure
//! leaves holes (its remaining positions are skipped). Writes are made in `ws_min` mini-units; the
//! core thread merges consecutive mini-units of one chunk into one command and never has two
//! commands in flight on one chunk.
//!
//! # Limitations
//! At most 64 PUs per range (the good/retired masks are `u64`).

use crate::ocssd::Ppa;

/// Maximum PUs in one FTL range.
pub const MAX_PUS: usize = 64;

/// Static geometry of one FTL instance.
#[derive(Debug, Clone)]
pub struct Geo {
    /// (grp, pu) of every PU of the range, in range order.
    pub pus: Vec<(u64, u64)>,
    /// Blocks per chunk.
    pub clba: u64,
    /// Minimum write (blocks).
    pub ws_min: u64,
    /// Optimal write per chunk (blocks).
    pub ws_opt: u64,
    /// Bands (chunks per PU).
    pub num_bands: u32,
    /// Bands per metadata area.
    pub md_bands: u32,
    /// `pus.len() * clba`: positions per band when every chunk is good.
    pub max_positions: u64,
}

impl Geo {
    /// The chunk of band `band` on range PU `i`.
    pub fn chunk(&self, band: u32, i: usize) -> Ppa {
        let (g, p) = self.pus.get(i).copied().unwrap_or((0, 0));
        Ppa::new(g, p, u64::from(band), 0)
    }

    /// Positions in a band with `good` good chunks.
    pub fn positions(&self, good: usize) -> u64 {
        good as u64 * self.clba
    }

    /// Tail md positions for a band with `good` chunks (rounded up to whole `ws_min` mini-units).
    pub fn tail_len(&self, good: usize) -> u64 {
        if good == 0 {
            return 0;
        }
        let blocks =
            super::layout::blocks_for(super::layout::tail_bytes(self.positions(good) as usize)) as u64;
        blocks.div_ceil(self.ws_min) * self.ws_min
    }

    /// First band usable for data.
    pub fn first_data_band(&self) -> u32 {
        2 * self.md_bands
    }

    /// Flat media address of block `lbk` of range chunk `i` of `band` (chunk-major, independent of
    /// the band's stripe mapping, so an address is meaningful without the band's head).
    pub fn addr(&self, band: u32, i: usize, lbk: u64) -> u64 {
        u64::from(band) * self.max_positions + i as u64 * self.clba + lbk
    }

    /// Band, range chunk index and block of a flat address.
    pub fn split(&self, addr: u64) -> (u32, usize, u64) {
        let band = u32::try_from(addr / self.max_positions).unwrap_or(u32::MAX);
        let off = addr % self.max_positions;
        (band, (off / self.clba) as usize, off % self.clba)
    }

    /// Physical address of a flat address.
    pub fn ppa_of(&self, addr: u64) -> Ppa {
        let (band, i, lbk) = self.split(addr);
        self.chunk(band, i).with_lbk(lbk)
    }

    /// Total flat addresses.
    pub fn addr_space(&self) -> u64 {
        u64::from(self.num_bands) * self.max_positions
    }
}

/// Indices (within the range) of the set bits of a mask.
pub fn mask_indices(mask: u64, n: usize) -> Vec<usize> {
    (0..n.min(MAX_PUS)).filter(|i| mask & (1u64 << i) != 0).collect()
}

/// Band states (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BandState {
    /// No live data; may need an erase before use.
    Free,
    /// Erased, ready to open.
    Prep,
    /// Head metadata queued.
    Opening,
    /// Taking data.
    Open,
    /// Every data position assigned; tail pending.
    Full,
    /// Tail metadata queued.
    Closing,
    /// Closed (with or without a tail).
    Closed,
    /// Reserved for metadata.
    Metadata,
}

impl BandState {
    /// Persisted code.
    pub fn code(self) -> u8 {
        match self {
            BandState::Free => 0,
            BandState::Prep => 1,
            BandState::Opening => 2,
            BandState::Open => 3,
            BandState::Full => 4,
            BandState::Closing => 5,
            BandState::Closed => 6,
            BandState::Metadata => 7,
        }
    }
}

/// Runtime state of a band.
#[derive(Debug, Clone)]
pub struct Band {
    /// Index.
    pub id: u32,
    /// State.
    pub state: BandState,
    /// Range indices of the chunks of the current incarnation.
    pub good: Vec<usize>,
    /// Chunks retired after a write failure (range index bits).
    pub retired: u64,
    /// Sequence number of position 0 of this incarnation.
    pub base_seq: u64,
    /// Next position to assign.
    pub next_pos: u64,
    /// Valid blocks.
    pub valid: u64,
    /// Data positions written (user or relocated data).
    pub written: u64,
    /// Relocated blocks from this band still in the write buffer (the band may not be erased).
    pub reloc_pending: u64,
    /// Chunks need a reset before the band is reused.
    pub dirty: bool,
    /// Erases.
    pub erase_count: u64,
    /// LBA (or marker) of every block, indexed by address offset within the band (chunk-major),
    /// kept while the band is being written (for the tail).
    pub lba_map: Vec<u64>,
    /// The band was closed with a valid tail.
    pub has_tail: bool,
    /// Chunks marked offline by the media (range index bits).
    pub offline: u64,
}

impl Band {
    /// A fresh band record.
    pub fn new(id: u32) -> Self {
        Band {
            id,
            state: BandState::Free,
            good: Vec::new(),
            retired: 0,
            base_seq: 0,
            next_pos: 0,
            valid: 0,
            written: 0,
            reloc_pending: 0,
            dirty: true,
            erase_count: 0,
            lba_map: Vec::new(),
            has_tail: false,
            offline: 0,
        }
    }

    /// Good-chunk mask of the current incarnation.
    pub fn good_mask(&self) -> u64 {
        self.good.iter().fold(0u64, |m, i| m | (1u64 << i))
    }

    /// Positions of the current incarnation.
    pub fn positions(&self, geo: &Geo) -> u64 {
        geo.positions(self.good.len())
    }

    /// First tail position.
    pub fn data_end(&self, geo: &Geo) -> u64 {
        self.positions(geo).saturating_sub(geo.tail_len(self.good.len()))
    }

    /// Range index of the chunk holding `pos` and its block within the chunk.
    pub fn locate(&self, geo: &Geo, pos: u64) -> Option<(usize, u64)> {
        let k = self.good.len() as u64;
        if k == 0 || pos >= self.positions(geo) {
            return None;
        }
        let stripe = geo.ws_opt * k;
        let s = pos / stripe;
        let r = pos % stripe;
        let c = (r / geo.ws_opt) as usize;
        Some((self.good[c], s * geo.ws_opt + r % geo.ws_opt))
    }

    /// Physical address of `pos`.
    pub fn ppa(&self, geo: &Geo, pos: u64) -> Option<Ppa> {
        self.locate(geo, pos).map(|(i, lbk)| geo.chunk(self.id, i).with_lbk(lbk))
    }

    /// Flat address of `pos`.
    pub fn addr(&self, geo: &Geo, pos: u64) -> Option<u64> {
        self.locate(geo, pos).map(|(i, lbk)| geo.addr(self.id, i, lbk))
    }

    /// Position of block `lbk` of range chunk `i` (inverse of [`Band::locate`]).
    pub fn pos_of(&self, geo: &Geo, i: usize, lbk: u64) -> Option<u64> {
        let c = self.good.iter().position(|g| *g == i)? as u64;
        let k = self.good.len() as u64;
        Some((lbk / geo.ws_opt) * geo.ws_opt * k + c * geo.ws_opt + lbk % geo.ws_opt)
    }

    /// True when `pos` falls on a retired chunk.
    pub fn is_hole(&self, geo: &Geo, pos: u64) -> bool {
        self.locate(geo, pos).is_some_and(|(i, _)| self.retired & (1u64 << i) != 0)
    }

    /// Invalid (stale) data positions.
    pub fn invalid(&self) -> u64 {
        self.written.saturating_sub(self.valid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geo {
        Geo {
            pus: vec![(0, 0), (1, 0), (0, 1)],
            clba: 32,
            ws_min: 4,
            ws_opt: 8,
            num_bands: 10,
            md_bands: 1,
            max_positions: 96,
        }
    }

    #[test]
    fn positions_stripe_over_good_chunks_and_invert() {
        let g = geo();
        let mut b = Band::new(4);
        b.good = vec![0, 2];
        assert_eq!(b.positions(&g), 64);
        assert_eq!(b.locate(&g, 0), Some((0, 0)));
        assert_eq!(b.locate(&g, 7), Some((0, 7)));
        assert_eq!(b.locate(&g, 8), Some((2, 0)));
        assert_eq!(b.locate(&g, 16), Some((0, 8)));
        assert_eq!(b.locate(&g, 64), None);
        for pos in 0..64 {
            let (i, lbk) = b.locate(&g, pos).expect("in band");
            assert_eq!(b.pos_of(&g, i, lbk), Some(pos));
        }
        assert_eq!(b.ppa(&g, 9), Some(Ppa::new(0, 1, 4, 1)));
        b.retired = 1 << 2;
        assert!(b.is_hole(&g, 9) && !b.is_hole(&g, 1));
        assert_eq!(g.split(g.addr(3, 2, 17)), (3, 2, 17));
        assert_eq!(g.ppa_of(g.addr(3, 1, 5)), Ppa::new(1, 0, 3, 5));
    }

    /// A band's data end (its tail starts there), flat addresses, holes and stale count: the
    /// values the FTL otherwise only shows by hanging or misplacing data.
    #[test]
    fn data_end_addresses_holes_and_invalid() {
        let g = geo();
        let mut b = Band::new(4);
        b.good = vec![0, 2];
        // 64 positions; the tail of 64 LBAs (48 + 512 bytes) is one block, rounded up to ws_min.
        assert_eq!((g.tail_len(2), b.data_end(&g)), (4, 60));
        assert_eq!(b.addr(&g, 9), Some(g.addr(4, 2, 1)));
        assert_eq!(b.addr(&g, 9), Some(4 * 96 + 2 * 32 + 1));
        assert_eq!(b.addr(&g, 64), None);
        assert_eq!(b.ppa(&g, 64), None);
        assert!(!b.is_hole(&g, 9) && !b.is_hole(&g, 64));
        b.retired = 1 << 0;
        assert!(b.is_hole(&g, 1) && !b.is_hole(&g, 9));
        (b.written, b.valid) = (50, 20);
        assert_eq!(b.invalid(), 30);
        (b.written, b.valid) = (5, 20);
        assert_eq!(b.invalid(), 0);
        assert_eq!(mask_indices(0b1010_0101, 6), vec![0, 2, 5]);
        assert_eq!(b.good_mask(), 0b101);
    }
}
