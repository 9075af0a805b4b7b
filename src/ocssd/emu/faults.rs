//! Fault injection for the emulator: what can be injected and the per-chunk armed state.
//!
//! | fault            | effect                                                          | lifetime            |
//! |------------------|-----------------------------------------------------------------|---------------------|
//! | `OfflineChunk`   | the chunk goes offline now (persisted), all I/O → 0xC0          | permanent           |
//! | `WriteFail`      | the next write covering the block fails its `ws_min` unit: 0xF0, the chunk stays open, the write pointer moves past the unit | one shot |
//! | `ReadError`      | reads of the block report 0xD0 (data returned) or 0x81 (data zeroed) | until chunk reset |
//! | `CloseEarly`     | the next write reaching the block closes the chunk there: blocks before it are written, the rest fail with 0xF1 | one shot |
//!
//! # Design
//! Armed faults live inside the chunk's slot, under the chunk's own lock, so the fault
//! check costs nothing on chunks without faults and needs no global lock. Every injection
//! and every triggered write fault adds a chunk notification log entry.
//!
//! # Limitations
//! Only `OfflineChunk` is persisted (through the chunk table); armed faults are runtime
//! state and are forgotten on reopen.

use super::super::ppa::Ppa;

/// What a read error injection reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadErrorKind {
    /// 0xD0 high ECC: the data is returned but should be moved.
    HighEcc,
    /// 0x81 unrecovered read error: no data (zeros) is returned.
    Unrecoverable,
}

/// One injectable fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The chunk goes offline.
    OfflineChunk(Ppa),
    /// The next write covering this block fails (0xF0).
    WriteFail(Ppa),
    /// Reads of this block fail.
    ReadError {
        /// The block.
        ppa: Ppa,
        /// How.
        kind: ReadErrorKind,
    },
    /// The next write reaching this block closes the chunk early (0xF1).
    CloseEarly(Ppa),
}

impl Fault {
    /// The address the fault concerns.
    pub fn ppa(&self) -> Ppa {
        match *self {
            Fault::OfflineChunk(p) | Fault::WriteFail(p) | Fault::CloseEarly(p) => p,
            Fault::ReadError { ppa, .. } => ppa,
        }
    }
}

/// Faults armed on one chunk (block offsets within the chunk).
#[derive(Debug, Default, Clone)]
pub struct ChunkFaults {
    /// One-shot write failures.
    pub write_fail_at: Vec<u64>,
    /// One-shot early close.
    pub close_early_at: Option<u64>,
    /// Sticky read errors.
    pub read_errors: Vec<(u64, ReadErrorKind)>,
}

impl ChunkFaults {
    /// True when nothing is armed (the fast path).
    pub fn is_empty(&self) -> bool {
        self.write_fail_at.is_empty() && self.close_early_at.is_none() && self.read_errors.is_empty()
    }

    /// The read error armed at `lbk`, if any.
    pub fn read_error_at(&self, lbk: u64) -> Option<ReadErrorKind> {
        self.read_errors.iter().find(|(at, _)| *at == lbk).map(|(_, k)| *k)
    }

    /// Removes and returns the first write failure armed in `[start, end)`.
    pub fn take_write_fail_in(&mut self, start: u64, end: u64) -> Option<u64> {
        let pos = self.write_fail_at.iter().position(|at| *at >= start && *at < end)?;
        Some(self.write_fail_at.swap_remove(pos))
    }
}
