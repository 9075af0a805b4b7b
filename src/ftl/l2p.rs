//! The logical-to-physical table: one atomic word per LBA, readable by every channel without a lock.
//!
//! ```text
//!  value:  UNMAPPED (all ones) │ 1<<63 | write-buffer entry number │ flat media address
//! ```
//!
//! # Design
//! Readers load an entry, read the media (or copy from the write buffer under its lock) and load the
//! entry again: if it changed, the block may have moved (relocation) or been rewritten, and the read
//! of that block is retried. Only the core and the channels' write paths store entries, always under
//! the core lock, so read-modify-write sequences (invalidate the old location) are consistent. The
//! persisted form (4 or 8 bytes per entry) is in `layout.rs`.
//!
//! # Limitations
//! 8 bytes per LBA in memory whatever the persisted width.

use std::sync::atomic::{AtomicU64, Ordering};

pub use super::layout::UNMAPPED;

/// Marks a write-buffer entry number.
pub const CACHE_BIT: u64 = 1 << 63;

/// What an L2P entry points to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// Never written or unmapped: reads zeros.
    Unmapped,
    /// In the write buffer: entry number.
    Cache(u64),
    /// On media: flat address.
    Media(u64),
}

impl Loc {
    /// Decodes a raw entry.
    pub fn from_raw(v: u64) -> Self {
        if v == UNMAPPED {
            Loc::Unmapped
        } else if v & CACHE_BIT != 0 {
            Loc::Cache(v & !CACHE_BIT)
        } else {
            Loc::Media(v)
        }
    }

    /// Encodes.
    pub fn raw(self) -> u64 {
        match self {
            Loc::Unmapped => UNMAPPED,
            Loc::Cache(n) => n | CACHE_BIT,
            Loc::Media(a) => a,
        }
    }
}

/// The table.
pub struct L2p {
    entries: Vec<AtomicU64>,
}

impl L2p {
    /// All unmapped.
    pub fn new(num_lbas: u64) -> Self {
        L2p { entries: (0..num_lbas).map(|_| AtomicU64::new(UNMAPPED)).collect() }
    }

    /// From persisted values.
    pub fn from_values(v: &[u64]) -> Self {
        L2p { entries: v.iter().map(|x| AtomicU64::new(*x)).collect() }
    }

    /// Current location of `lba` (unmapped when out of range).
    pub fn get(&self, lba: u64) -> Loc {
        usize::try_from(lba)
            .ok()
            .and_then(|i| self.entries.get(i))
            .map_or(Loc::Unmapped, |e| Loc::from_raw(e.load(Ordering::SeqCst)))
    }

    /// Sets `lba`, returning the previous location.
    pub fn swap(&self, lba: u64, loc: Loc) -> Loc {
        usize::try_from(lba)
            .ok()
            .and_then(|i| self.entries.get(i))
            .map_or(Loc::Unmapped, |e| Loc::from_raw(e.swap(loc.raw(), Ordering::SeqCst)))
    }

    /// Snapshot of every entry.
    pub fn values(&self) -> Vec<u64> {
        self.entries.iter().map(|e| e.load(Ordering::SeqCst)).collect()
    }
}
