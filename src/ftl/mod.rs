//! The FTL bdev: a crash-safe flash translation layer exposing 4 KiB blocks over OCSSD media
//! (SPEC §4).
//!
//! ```text
//!  Channel (per export queue) ── write: copy into wbuf, ack ─┐
//!     │ read: L2P (atomics) → own media QueuePair            │ Mutex<Core> (memory work only)
//!     │ flush: FlushReq → mailbox/eventfd ◄──────────────────┤
//!     ▼                                                      ▼
//!  media (MediaDevice)  ◄──────────────────────────── core thread: stripes, bands, relocation,
//!                                                     erase-ahead, checkpoints, shutdown
//!  files: layout.rs (on-media formats)  band.rs (geometry, states)  l2p.rs  wbuf.rs
//!         core.rs (core thread)  md.rs (metadata areas + mirror)  restore.rs  stats.rs
//! ```
//!
//! # Design
//! * **Ownership.** The L2P is a flat array of atomics read by every channel without a lock. All
//!   other shared state sits in one `Mutex<Core>` that is held only for memory work, never across
//!   media I/O. The core thread is the only writer to media: it takes buffered blocks in order,
//!   stripes them `ws_min`-unit by unit, `ws_opt` blocks per chunk round-robin over the band's good
//!   chunks, one command per chunk in flight, and commits the L2P once they are written.
//! * **Channels.** A channel owns a media queue pair for reads (so no queue waits for another's
//!   media I/O), a local completion queue (writes are acknowledged once copied into the buffer;
//!   unmap and write_zeroes are L2P updates) and a mailbox whose eventfd is its `wait_fd`: the core
//!   posts flush completions there and wakes channels waiting for buffer space (their writes got
//!   NOMEM and are retried by the generic layer).
//! * **Background work** runs on the core thread, which sleeps on a condition variable with a
//!   20 ms timeout: a flush request, a full stripe, erase-ahead at `band-thld`, relocation below the
//!   START limit all progress without guest I/O.
//! * **Metadata** (superblock, band md, L2P, valid map, trim map; version + CRC32C each) lives in
//!   two reserved areas at the start of the range (bands `[0,k)` primary, `[k,2k)` mirror), reset
//!   and rewritten mirror-first (see `md.rs`). Bands carry head metadata (position 0) and tail
//!   metadata (the LBA of every block, at the end); every block's OOB carries `(lba, seq)`.
//! * **Crash safety.** A checkpoint is written at creation, at every start (marked dirty), when a
//!   flush follows unmaps (so trims survive a crash once flushed), and at clean shutdown (marked
//!   clean). Restore after a crash replays blocks newer than the checkpoint (see `restore.rs`).
//!   Before a band is erased the media is flushed, so relocated copies are durable first.
//! * **Limits** (CRIT/HIGH/LOW/START) are scaled to the band count (see [`core::scale_limits`]):
//!   `round(spdk × data_bands / 256)`, clamped to `1..=spare_bands-1`.
//!
//! * **Reads** go straight into the caller's (guest) memory: each media block of a read becomes a
//!   zero-copy segment of a vector read command on the channel's own queue pair (the emulator copies
//!   from its mapped image), no bounce buffer.
//! * **Writes from several queues.** The serialised part is only bookkeeping: a channel reserves
//!   write-buffer entries under the core lock, copies the guest data into their slots without it
//!   (each slot has its own small mutex), and re-locks to publish them (L2P, invalidation); the core
//!   thread copies taken entries into its media commands after releasing the lock. Chosen over
//!   per-channel write buffers (SPDK's per-io-channel wbuf entries), which would also shard the
//!   bookkeeping but make the L2P's buffer pointers, relocation and flush ordering per channel:
//!   measured, the memcpy was the long part of the critical section (BENCHMARKS.md, FTL).
//! * **nv-cache** (`nv-cache=BDEV`, see `nvcache.rs`): a write is also logged on that bdev and
//!   acknowledged when the log write completes; restore replays the log.
//!
//! # Limitations
//! A band open at shutdown or crash is closed as it is (its unwritten positions are reclaimed by
//! relocation). Unmaps are not logged in the nv-cache (durable at the next flush).

pub mod band;
pub mod cli;
pub mod core;
pub mod info;
pub mod l2p;
pub mod layout;
pub mod md;
pub mod nvcache;
#[cfg(test)]
mod nvcache_tests;
pub mod restore;
pub mod stats;
#[cfg(test)]
pub(crate) mod tests;
pub mod wbuf;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::bdev::{
    Bdev, BdevError, BdevInfo, BdevIo, Completion, IoError, IoKind, IoKinds, IoVecs, ModuleChannel, Rejected,
};
use crate::ocssd::{ChunkState, Command, IoBuf, MediaDevice, Op, PpaList, QueuePair, SgList};
use crate::tagmap::TagMap;

use self::band::{Band, BandState, Geo, MAX_PUS};
use self::core::{lock, Core, FlushReq, Limit, Mailbox, Shared};
use self::l2p::{L2p, Loc};
use self::layout::BLOCK_BYTES;
use self::wbuf::{Origin, WriteBuffer};

/// Errors of the FTL module.
#[derive(Debug, thiserror::Error)]
pub enum FtlError {
    /// A configuration value is refused; `option` is the `--bdev` key.
    #[error("{option}: {reason}")]
    Config {
        /// The option (`lba-rsvd`, `punits`, ...).
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// Media failure.
    #[error("media error: {0}")]
    Media(String),
    /// On-media metadata is corrupt.
    #[error("corrupt FTL metadata: {0}")]
    Corrupt(String),
}

impl From<FtlError> for BdevError {
    fn from(e: FtlError) -> Self {
        match e {
            FtlError::Config { .. } => BdevError::InvalidConfig(e.to_string()),
            _ => BdevError::Module(e.to_string()),
        }
    }
}

/// What to do at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Restore when the media holds an FTL for the range, else create.
    Auto,
    /// Always create (refused on media holding an FTL unless `force`).
    Create,
    /// Always restore (refused on media without an FTL).
    Restore,
}

/// FTL configuration (the `--bdev driver=ftl` keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FtlConfig {
    /// Bdev name.
    pub name: String,
    /// First PU of the range.
    pub pu_begin: u32,
    /// Last PU (inclusive); `None` = last of the device.
    pub pu_end: Option<u32>,
    /// Start mode.
    pub mode: Mode,
    /// Allow `mode=create` over an existing FTL.
    pub force: bool,
    /// Expected (restore) or new (create) UUID.
    pub uuid: Option<[u8; 16]>,
    /// Write buffer bytes.
    pub wbuf_bytes: u64,
    /// Overprovisioning, percent.
    pub lba_rsvd: u32,
    /// Erase the next band when the open one is this full, percent.
    pub band_thld: u32,
    /// Relocate bands with more invalid blocks than this, percent.
    pub invalid_thld: u32,
    /// Blocks relocated per step.
    pub reloc_qdepth: u32,
    /// Bands relocated at once.
    pub reloc_bands: u32,
    /// Interleave units (`ws_opt` must be a multiple).
    pub interleave_units: u32,
    /// Write limits (SPDK's, before scaling).
    pub limits: [Limit; 4],
    /// Exposed size cap in bytes.
    pub size_bytes: Option<u64>,
}

impl FtlConfig {
    /// Defaults (SPDK's).
    pub fn new(name: &str) -> Self {
        FtlConfig {
            name: name.to_string(),
            pu_begin: 0,
            pu_end: None,
            mode: Mode::Auto,
            force: false,
            uuid: None,
            wbuf_bytes: 6 << 20,
            lba_rsvd: 20,
            band_thld: 90,
            invalid_thld: 10,
            reloc_qdepth: 32,
            reloc_bands: 3,
            interleave_units: 1,
            limits: [
                Limit { thld: 5, pct: 0 },
                Limit { thld: 10, pct: 5 },
                Limit { thld: 20, pct: 40 },
                Limit { thld: 40, pct: 100 },
            ],
            size_bytes: None,
        }
    }

    /// Checks every rule that does not need the media (SPEC §4).
    pub fn validate(&self) -> Result<(), FtlError> {
        let bad = |option, reason: String| Err(FtlError::Config { option, reason });
        if self.invalid_thld >= 100 {
            return bad("invalid-thld", format!("{} must be below 100", self.invalid_thld));
        }
        if self.lba_rsvd == 0 || self.lba_rsvd >= 100 {
            return bad("lba-rsvd", format!("{} must be between 1 and 99", self.lba_rsvd));
        }
        if self.wbuf_bytes == 0 || self.wbuf_bytes % BLOCK_BYTES as u64 != 0 {
            return bad(
                "wbuf",
                format!("{} bytes must be a non-zero multiple of {BLOCK_BYTES}", self.wbuf_bytes),
            );
        }
        if self.wbuf_bytes / (BLOCK_BYTES as u64) < 16 {
            return bad("wbuf", format!("{} bytes is below the 64 KiB minimum", self.wbuf_bytes));
        }
        if self.band_thld == 0 || self.band_thld > 100 {
            return bad("band-thld", format!("{} must be between 1 and 100", self.band_thld));
        }
        if self.reloc_qdepth == 0 || self.reloc_qdepth > 1024 {
            return bad("reloc-qdepth", format!("{} must be between 1 and 1024", self.reloc_qdepth));
        }
        if self.reloc_bands == 0 {
            return bad("reloc-bands", "must be at least 1".into());
        }
        if self.interleave_units == 0 {
            return bad("interleave", "must be at least 1".into());
        }
        for (i, l) in self.limits.iter().enumerate() {
            if l.pct > 100 {
                return bad("limits", format!("{} limit {}% is above 100%", core::LIMIT_NAMES[i], l.pct));
            }
        }
        if let Some(end) = self.pu_end {
            if end < self.pu_begin {
                return bad("punits", format!("{}-{end} ends before it begins", self.pu_begin));
            }
        }
        if let Some(s) = self.size_bytes {
            if s == 0 || s % BLOCK_BYTES as u64 != 0 {
                return bad("size", format!("{s} must be a non-zero multiple of {BLOCK_BYTES}"));
            }
        }
        Ok(())
    }
}

/// PU ranges in use per media device (two FTLs may not overlap).
static RANGES: Mutex<Vec<(usize, u32, u32)>> = Mutex::new(Vec::new());

fn media_key(media: &Arc<dyn MediaDevice>) -> usize {
    Arc::as_ptr(media) as *const u8 as usize
}

/// The FTL bdev.
pub struct FtlBdev {
    info: BdevInfo,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    range_key: (usize, u32, u32),
}

fn geo_for(media: &dyn MediaDevice, cfg: &FtlConfig) -> Result<Geo, FtlError> {
    let info = media.info();
    let g = &info.geometry;
    let total = g.total_pus();
    let end = cfg.pu_end.map_or(total.saturating_sub(1), u64::from);
    if u64::from(cfg.pu_begin) >= total || end >= total {
        return Err(FtlError::Config {
            option: "punits",
            reason: format!("{}-{end} is outside the device's {total} parallel units", cfg.pu_begin),
        });
    }
    let n = end - u64::from(cfg.pu_begin) + 1;
    if n as usize > MAX_PUS {
        return Err(FtlError::Config {
            option: "punits",
            reason: format!("{n} PUs; at most {MAX_PUS} per FTL"),
        });
    }
    let ng = u64::from(g.num_grp);
    // Consecutive PUs alternate across groups.
    let pus = (u64::from(cfg.pu_begin)..=end).map(|i| (i % ng, i / ng)).collect();
    if info.block_size_bytes as usize != BLOCK_BYTES {
        return Err(FtlError::Config {
            option: "base",
            reason: format!("media block size {} is not {BLOCK_BYTES}", info.block_size_bytes),
        });
    }
    if (info.oob_bytes_per_block as usize) < layout::OOB_BYTES_USED {
        return Err(FtlError::Config {
            option: "base",
            reason: format!(
                "media has {} OOB bytes per block; the FTL needs {}",
                info.oob_bytes_per_block,
                layout::OOB_BYTES_USED
            ),
        });
    }
    if g.ws_opt % cfg.interleave_units != 0 {
        return Err(FtlError::Config {
            option: "interleave",
            reason: format!(
                "ws_opt {} is not divisible by {} interleave units",
                g.ws_opt, cfg.interleave_units
            ),
        });
    }
    if g.ws_min == 0
        || g.ws_opt % g.ws_min != 0
        || g.ws_opt > 64
        || u64::from(g.clba) % u64::from(g.ws_opt) != 0
    {
        return Err(FtlError::Config { option: "base", reason: "unsupported write-size geometry".into() });
    }
    Ok(Geo {
        pus,
        clba: u64::from(g.clba),
        ws_min: u64::from(g.ws_min),
        ws_opt: u64::from(g.ws_opt),
        num_bands: g.num_chk,
        md_bands: 1,
        max_positions: n * u64::from(g.clba),
    })
}

/// Data positions of a band with `good` chunks.
fn band_data(geo: &Geo, good: usize) -> u64 {
    if good == 0 {
        return 0;
    }
    geo.positions(good).saturating_sub(1 + geo.tail_len(good))
}

/// True when the first bands of the range hold anything (an FTL, or foreign data).
fn media_in_use(media: &dyn MediaDevice, geo: &Geo) -> bool {
    let probe = (2 * md::MAX_MD_BANDS).min(geo.num_bands);
    (0..probe).any(|b| {
        (0..geo.pus.len()).any(|i| {
            media
                .chunk_info(geo.chunk(b, i))
                .is_ok_and(|c| matches!(c.state, ChunkState::Open | ChunkState::Closed))
        })
    })
}

/// Sizing of a new FTL: md bands, exposed LBAs, L2P entry width.
struct Sizing {
    num_lbas: u64,
    entry_bytes: u32,
}

fn size_new(media: &dyn MediaDevice, geo: &mut Geo, cfg: &FtlConfig) -> Result<Sizing, FtlError> {
    let good: Vec<usize> = (0..geo.num_bands).map(|b| md::online_chunks(media, geo, b).len()).collect();
    let entry_bytes = if geo.addr_space() < u64::from(u32::MAX) { 4 } else { 8 };
    for k in 1..=md::MAX_MD_BANDS {
        if 2 * k + 2 > geo.num_bands {
            break;
        }
        geo.md_bands = k;
        let data: u64 = (2 * k..geo.num_bands).map(|b| band_data(geo, good[b as usize])).sum();
        let mut num_lbas = data * u64::from(100 - cfg.lba_rsvd) / 100;
        if let Some(s) = cfg.size_bytes {
            let want = s / BLOCK_BYTES as u64;
            if want > num_lbas {
                return Err(FtlError::Config {
                    option: "size",
                    reason: format!(
                        "{s} bytes is more than the {} bytes this media offers with lba-rsvd={}",
                        num_lbas * BLOCK_BYTES as u64,
                        cfg.lba_rsvd
                    ),
                });
            }
            num_lbas = want;
        }
        let need =
            md::Checkpoint::blocks_needed(geo.num_bands as usize, num_lbas, entry_bytes, geo.addr_space());
        let area =
            |first: u32| -> u64 { (first..first + k).map(|b| good[b as usize] as u64 * geo.clba).sum() };
        if area(0) >= need && area(k) >= need {
            if num_lbas == 0 {
                break;
            }
            return Ok(Sizing { num_lbas, entry_bytes });
        }
    }
    Err(FtlError::Config {
        option: "base",
        reason: format!(
            "the media ({} bands of {} PUs) is too small for an FTL",
            geo.num_bands,
            geo.pus.len()
        ),
    })
}

impl FtlBdev {
    /// Creates or restores an FTL on `media` (see [`Mode`]).
    pub fn open(cfg: FtlConfig, media: Arc<dyn MediaDevice>) -> Result<Self, FtlError> {
        Self::open_with_nv(cfg, media, None)
    }

    /// Like [`FtlBdev::open`], with an nv-cache on the bdev behind `nv` (opened read-write; the FTL
    /// claims it): writes are acknowledged once logged there, and a start after a crash replays it.
    pub fn open_with_nv(
        cfg: FtlConfig,
        media: Arc<dyn MediaDevice>,
        nv: Option<crate::bdev::Descriptor>,
    ) -> Result<Self, FtlError> {
        cfg.validate()?;
        let mut geo = geo_for(media.as_ref(), &cfg)?;
        let pu_end = cfg.pu_begin + geo.pus.len() as u32 - 1;
        let key = (media_key(&media), cfg.pu_begin, pu_end);
        {
            let mut ranges = lock(&RANGES);
            if let Some(r) = ranges.iter().find(|r| r.0 == key.0 && r.1 <= key.2 && key.1 <= r.2) {
                return Err(FtlError::Config {
                    option: "punits",
                    reason: format!(
                        "{}-{} overlaps another FTL's PUs {}-{} on the same media",
                        key.1, key.2, r.1, r.2
                    ),
                });
            }
            ranges.push(key);
        }
        let r = Self::open_inner(cfg, media, &mut geo, key, nv);
        if r.is_err() {
            lock(&RANGES).retain(|x| *x != key);
        }
        r
    }

    fn open_inner(
        cfg: FtlConfig,
        media: Arc<dyn MediaDevice>,
        geo: &mut Geo,
        key: (usize, u32, u32),
        nv: Option<crate::bdev::Descriptor>,
    ) -> Result<Self, FtlError> {
        let mut qp = media.queue_pair(64).map_err(|e| FtlError::Media(e.to_string()))?;
        let in_use = media_in_use(media.as_ref(), geo);
        let range = format!("{}-{}", key.1, key.2);
        let create = match cfg.mode {
            Mode::Auto => !in_use,
            Mode::Restore => {
                if !in_use {
                    return Err(FtlError::Config {
                        option: "mode",
                        reason: format!("mode=restore: no FTL on parallel units {range} of this media"),
                    });
                }
                false
            }
            Mode::Create => {
                if in_use && !cfg.force {
                    return Err(FtlError::Config {
                        option: "mode",
                        reason: format!(
                            "mode=create: parallel units {range} already hold data (an FTL?); add force=on to reformat"
                        ),
                    });
                }
                true
            }
        };
        if create && !cfg.force {
            // Another FTL's units inside this range may hold nothing yet: its superblock says so.
            if let Some((b, e)) = md::foreign_ftl(media.as_ref(), qp.as_mut(), key.1, key.2) {
                return Err(FtlError::Config {
                    option: "punits",
                    reason: format!(
                        "{range} overlaps the FTL on parallel units {b}-{e} of this media: a format would \
                         destroy its data (choose a range outside it, or mode=create,force=on to reformat)"
                    ),
                });
            }
        }
        let (uuid, num_lbas, entry_bytes, rebuilt, primary_bad) = if create {
            let s = size_new(media.as_ref(), geo, &cfg)?;
            log::info!("ftl '{}': formatting parallel units {range} ({} bands)", cfg.name, geo.num_bands);
            // Format: every written chunk of the range is reset, so no old block can be replayed.
            let mut last = std::time::Instant::now();
            for b in 0..geo.num_bands {
                let chunks: Vec<_> = (0..geo.pus.len()).map(|i| geo.chunk(b, i)).collect();
                md::reset_chunks(media.as_ref(), qp.as_mut(), &chunks)?;
                if last.elapsed().as_secs() >= 1 {
                    last = std::time::Instant::now();
                    log::info!("ftl '{}': format: band {} of {}", cfg.name, b + 1, geo.num_bands);
                }
            }
            let mut bands: Vec<Band> = (0..geo.num_bands).map(Band::new).collect();
            for b in bands.iter_mut() {
                b.dirty = false;
                if b.id < geo.first_data_band() {
                    b.state = BandState::Metadata;
                }
            }
            let rebuilt = restore::Rebuilt {
                l2p: vec![layout::UNMAPPED; s.num_lbas as usize],
                bands,
                valid: vec![0u64; geo.addr_space().div_ceil(64) as usize],
                next_seq: 1,
                generation: 0,
                from_tail: 0,
                from_oob: 0,
            };
            (cfg.uuid.unwrap_or_else(crate::bdev::random_uuid), s.num_lbas, s.entry_bytes, rebuilt, None)
        } else {
            let t = std::time::Instant::now();
            let loaded = md::load(media.as_ref(), qp.as_mut(), geo)?;
            let sb = &loaded.ckpt.sb;
            if let Some(u) = cfg.uuid {
                if u != sb.uuid {
                    return Err(FtlError::Config {
                        option: "uuid",
                        reason: format!(
                            "{} does not match the FTL on the media ({})",
                            layout::format_uuid(&u),
                            layout::format_uuid(&sb.uuid)
                        ),
                    });
                }
            }
            if sb.pu_begin != key.1 || sb.pu_end != key.2 || sb.num_bands != geo.num_bands {
                return Err(FtlError::Config {
                    option: "punits",
                    reason: format!(
                        "{range} does not match the FTL on the media (parallel units {}-{}, {} bands)",
                        sb.pu_begin, sb.pu_end, sb.num_bands
                    ),
                });
            }
            geo.md_bands = loaded.md_bands;
            let rebuilt = restore::rebuild(media.as_ref(), qp.as_mut(), geo, &loaded.ckpt, &cfg.name)?;
            log::info!(
                "ftl '{}': restored ({}) in {:?}",
                cfg.name,
                if sb.clean { "clean" } else { "after a crash" },
                t.elapsed()
            );
            (sb.uuid, sb.num_lbas, sb.l2p_entry_bytes, rebuilt, loaded.primary_bad)
        };
        // The nv-cache is checked (read only) before anything is written to the media.
        let slots = (cfg.wbuf_bytes / BLOCK_BYTES as u64) as usize;
        let nv = match nv {
            Some(d) => Some(nvcache::open(d, uuid, 2 * slots as u64, create, create && cfg.force)?),
            None => None,
        };
        let rebuilt_counts = (rebuilt.from_tail, rebuilt.from_oob);
        let data_bands = u64::from(geo.num_bands - geo.first_data_band());
        let total_data: u64 = rebuilt
            .bands
            .iter()
            .skip(geo.first_data_band() as usize)
            .map(|b| {
                let good = if b.good.is_empty() {
                    md::online_chunks(media.as_ref(), geo, b.id).len()
                } else {
                    b.good.len()
                };
                band_data(geo, good)
            })
            .sum();
        let avg = total_data / data_bands.max(1);
        let spare = data_bands.saturating_sub(num_lbas.div_ceil(avg.max(1)));
        if spare < 2 {
            return Err(FtlError::Config {
                option: "lba-rsvd",
                reason: format!(
                    "{}% leaves {spare} spare bands of {data_bands}; at least 2 are needed",
                    cfg.lba_rsvd
                ),
            });
        }
        let limits = core::scale_limits(&cfg.limits, data_bands, spare);
        let max_batch = 64u64.min(slots as u64 / 2);
        let mut info = BdevInfo::new(&cfg.name, "ftl", BLOCK_BYTES as u32, num_lbas);
        info.uuid = uuid;
        info.max_io_blocks = max_batch as u32;
        info.volatile_write_cache = true;
        info.unmap_reads_zeroes = true;
        info.optimal_io_boundary_blocks = geo.ws_opt as u32;
        info.supports = IoKinds { flush: true, unmap: true, write_zeroes: true, reset: false };
        let shared = Arc::new(Shared {
            geo: geo.clone(),
            cfg: FtlConfig { pu_end: Some(key.2), ..cfg.clone() },
            uuid,
            num_lbas,
            l2p_entry_bytes: entry_bytes,
            media: Arc::clone(&media),
            l2p: L2p::from_values(&rebuilt.l2p),
            core: Mutex::new(Core {
                wbuf: WriteBuffer::new(slots),
                bands: rebuilt.bands,
                valid: rebuilt.valid,
                next_seq: rebuilt.next_seq,
                open: None,
                next: None,
                flushes: VecDeque::new(),
                gate: false,
                trims_pending: false,
                user_limit: slots,
                level: None,
                relocs: Vec::new(),
                generation: rebuilt.generation,
                ckpt_seq: 0,
                unflushed: false,
                failed: None,
                core_idle: false,
                nv: None,
                nv_requeue_mark: 0,
            }),
            wake: Condvar::new(),
            stats: stats::Stats::default(),
            mailboxes: Mutex::new(Vec::new()),
            stop: AtomicU8::new(0),
            limits,
            max_batch,
            band_data_avg: avg,
            ckpt_count: AtomicU64::new(0),
            nv: std::sync::OnceLock::new(),
        });
        // A dirty-marked checkpoint before serving: a crash from now on restores from here
        // (this also repairs a corrupt primary copy).
        let ckpt = core::snapshot(&shared, false)?;
        core::persist(&shared, qp.as_mut(), &ckpt)?;
        if let Some(why) = primary_bad {
            log::warn!(
                "ftl '{}': primary metadata was unusable ({why}); restored from the mirror and repaired",
                cfg.name
            );
        }
        {
            let mut c = lock(&shared.core);
            c.ckpt_seq = ckpt.sb.ckpt_seq;
            c.generation = ckpt.sb.generation;
            shared.update_limits(&mut c);
        }
        shared.stats.restore_tail_bands.store(rebuilt_counts.0, Ordering::Relaxed);
        shared.stats.restore_oob_bands.store(rebuilt_counts.1, Ordering::Relaxed);
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("ftl-{}", cfg.name))
            .spawn(move || core::run(sh))
            .map_err(|e| FtlError::Media(format!("spawning the core thread: {e}")))?;
        let bdev = FtlBdev { info, shared, thread: Mutex::new(Some(thread)), range_key: key };
        if let Some(opened) = nv {
            bdev.attach_nv(opened)?;
        }
        log::info!(
            "ftl '{}': {} blocks of {BLOCK_BYTES} bytes on parallel units {range}, uuid {}",
            cfg.name,
            num_lbas,
            layout::format_uuid(&uuid)
        );
        Ok(bdev)
    }

    /// Replays an existing nv-cache through the FTL (then flushes), persists its superblock and
    /// attaches it: channels created from now on log their writes there.
    fn attach_nv(&self, opened: nvcache::Opened) -> Result<(), FtlError> {
        let sh = &self.shared;
        let (cache, existing) = match opened {
            nvcache::Opened::Fresh(c) => (c, false),
            nvcache::Opened::Existing(c) => (c, true),
        };
        let cache = Arc::new(cache);
        let name = cache.name.clone();
        let mut ch = cache.desc.channel().map_err(|e| FtlError::Media(format!("nv-cache {name}: {e}")))?;
        let sb = *lock(&cache.sb);
        let mut next_seq = sb.durable_seq;
        if existing {
            let found = nvcache::scan(&cache, &mut ch)?;
            let replayed = self.replay(&cache, &mut ch, &found)?;
            sh.stats.nv_replayed_blocks.store(replayed, Ordering::Relaxed);
            if let Some(last) = found.last() {
                next_seq = next_seq.max(last.header.seq + 1);
            }
        }
        // Everything replayed is durable on the media now: an empty ring from here.
        nvcache::persist_super(&cache, &mut ch, next_seq, !existing)?;
        lock(&sh.core).nv = Some(nvcache::NvRing::new(sb.ring_units, next_seq));
        if sh.nv.set(cache).is_err() {
            return Err(FtlError::Media("nv-cache attached twice".into()));
        }
        log::info!("ftl '{}': nv-cache {name} attached ({} blocks of ring)", self.info.name, sb.ring_units);
        Ok(())
    }

    /// Rewrites the records found in the nv-cache (in sequence order) through an internal
    /// channel, then flushes; returns the blocks replayed.
    fn replay(
        &self,
        cache: &nvcache::NvCache,
        ch: &mut crate::bdev::Channel,
        found: &[nvcache::Found],
    ) -> Result<u64, FtlError> {
        let mut fch = new_channel(&self.shared).map_err(|e| FtlError::Media(e.to_string()))?;
        let mut done = Vec::new();
        let mut blocks = 0u64;
        let err = |m: String| FtlError::Media(format!("nv-cache {}: replay: {m}", cache.name));
        let submit =
            |fch: &mut FtlChannel, mut io: BdevIo, done: &mut Vec<Completion>| -> Result<(), FtlError> {
                loop {
                    let r = if io.kind == IoKind::Flush { fch.flush(io) } else { fch.write(io) };
                    match r {
                        Ok(()) => return Ok(()),
                        Err(Rejected::NoMem(back)) => {
                            io = back;
                            fch.poll(done);
                            std::thread::sleep(std::time::Duration::from_micros(200));
                        }
                        Err(Rejected::Failed(_, e)) => return Err(err(e.to_string())),
                    }
                }
            };
        for f in found {
            let h = f.header;
            let n = u64::from(h.num_blocks);
            if !h.lba.checked_add(n).is_some_and(|end| end <= self.shared.num_lbas) {
                log::warn!("ftl '{}': nv-cache record {} beyond the device: skipped", self.info.name, h.seq);
                continue;
            }
            let data = nvcache::read_units(ch, cache.blocks_per_unit, nvcache::RING_FIRST + f.unit + 1, n)
                .map_err(|e| err(e.to_string()))?;
            submit(&mut fch, BdevIo::write(h.lba, n, IoVecs::from_slice(&data), 0), &mut done)?;
            fch.poll(&mut done);
            blocks += n;
        }
        submit(&mut fch, BdevIo::no_data(IoKind::Flush, 0, 0, 1), &mut done)?;
        loop {
            fch.poll(&mut done);
            if let Some(c) = done.iter().find(|c| c.tag == 1) {
                c.result.map_err(|e| err(format!("flush: {e}")))?;
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        if let Some(c) = done.iter().find(|c| c.result.is_err()) {
            return Err(err(format!("write: {:?}", c.result)));
        }
        if blocks > 0 {
            log::info!("ftl '{}': replayed {blocks} blocks from nv-cache {}", self.info.name, cache.name);
        }
        Ok(blocks)
    }

    /// Stops the core thread without persisting anything, as a crash would (tests).
    pub fn crash(&self) {
        self.shared.stop.store(2, Ordering::SeqCst);
        self.shared.wake.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }

    /// The shared state (tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn stop_clean(&self) -> Result<(), BdevError> {
        let Some(t) = lock(&self.thread).take() else { return Ok(()) };
        let t0 = std::time::Instant::now();
        log::info!("ftl '{}': clean shutdown: writing buffered data and metadata", self.info.name);
        self.shared.stop.store(1, Ordering::SeqCst);
        self.shared.wake.notify_all();
        if t.join().is_err() {
            return Err(BdevError::Module(format!("ftl '{}': core thread panicked", self.info.name)));
        }
        if let Some(e) = lock(&self.shared.core).failed.clone() {
            return Err(BdevError::Module(format!("ftl '{}': {e}", self.info.name)));
        }
        log::info!("ftl '{}': clean shutdown done in {:?}", self.info.name, t0.elapsed());
        Ok(())
    }
}

impl Drop for FtlBdev {
    fn drop(&mut self) {
        if let Err(e) = self.stop_clean() {
            log::error!("{e}");
        }
        lock(&RANGES).retain(|x| *x != self.range_key);
    }
}

impl Bdev for FtlBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError> {
        Ok(Box::new(new_channel(&self.shared)?))
    }

    fn shutdown(&self) -> Result<(), BdevError> {
        self.stop_clean()
    }

    fn module_stats(&self) -> Option<serde_json::Value> {
        let c = lock(&self.shared.core);
        Some(self.shared.stats.json(&c, &self.shared.limits, self.shared.ckpt_count.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
thread_local! {
    /// For tests: run by `FtlChannel::poll` on this thread just before it clears its wakeup, where
    /// a completion the core thread posts races the clear.
    pub(crate) static BEFORE_CLEAR: std::cell::RefCell<Option<Box<dyn FnMut()>>> =
        const { std::cell::RefCell::new(None) };
}

/// A channel on the FTL (with its nv-cache channel once the nv-cache is attached).
fn new_channel(sh: &Arc<Shared>) -> Result<FtlChannel, BdevError> {
    let qp = sh.media.queue_pair(256).map_err(|e| BdevError::Module(e.to_string()))?;
    let mailbox = Arc::new(Mailbox::new()?);
    lock(&sh.mailboxes).push(Arc::downgrade(&mailbox));
    let nv = match sh.nv.get() {
        Some(cache) => Some(NvChannel {
            ch: cache.desc.channel()?,
            nonce: cache.nonce(),
            cache: Arc::clone(cache),
            pending: TagMap::default(),
            scratch: Vec::new(),
        }),
        None => None,
    };
    Ok(FtlChannel {
        sh: Arc::clone(sh),
        qp,
        mailbox,
        local: VecDeque::new(),
        reads: TagMap::default(),
        cmds: TagMap::default(),
        next_id: 1,
        scratch: Vec::new(),
        nv,
    })
}

/// A read in progress.
struct ReadIo {
    tag: u64,
    bufs: IoVecs,
    offset_blocks: u64,
    cmds_left: usize,
    retry: Vec<u64>,
    error: Option<IoError>,
}

/// One media read command of a read.
struct ReadCmd {
    read_id: u64,
    /// (block index within the I/O, lba, addr).
    blocks: Vec<(u64, u64, u64)>,
}

/// A channel of the FTL.
pub struct FtlChannel {
    sh: Arc<Shared>,
    qp: Box<dyn QueuePair>,
    mailbox: Arc<Mailbox>,
    local: VecDeque<Completion>,
    reads: TagMap<ReadIo>,
    cmds: TagMap<ReadCmd>,
    next_id: u64,
    scratch: Vec<crate::ocssd::Completion>,
    /// This channel's side of the nv-cache.
    nv: Option<NvChannel>,
}

/// A channel's nv-cache state: its own channel on the nv-cache bdev and the records in flight.
struct NvChannel {
    cache: Arc<nvcache::NvCache>,
    ch: crate::bdev::Channel,
    nonce: [u8; 16],
    /// Internal id → (user tag, record sequence).
    pending: TagMap<(u64, u64)>,
    scratch: Vec<Completion>,
}

impl FtlChannel {
    fn done(&mut self, tag: u64, result: Result<(), IoError>) {
        if self.local.is_empty() {
            self.mailbox.wake();
        }
        self.local.push_back(Completion { tag, result });
    }

    fn write(&mut self, io: BdevIo) -> Result<(), Rejected> {
        let sh = Arc::clone(&self.sh);
        let n = io.num_blocks as usize;
        let mut c = lock(&sh.core);
        if c.failed.is_some() {
            drop(c);
            return Err(Rejected::Failed(io, IoError::Errno(libc::EIO)));
        }
        let limited = c.wbuf.user + n > c.user_limit;
        if c.gate || c.wbuf.free() < n || limited {
            if limited {
                if let Some(l) = c.level {
                    sh.stats.limit_hits[l].fetch_add(1, Ordering::Relaxed);
                }
            }
            self.mailbox.want_space.store(true, Ordering::SeqCst);
            drop(c);
            sh.wake.notify_one();
            return Err(Rejected::NoMem(io));
        }
        // Reserve the entries under the lock, copy the data without it, publish under it again.
        let first = c.wbuf.tail;
        // With an nv-cache (and its channel), a record in its ring too.
        let nv_rec = match (self.nv.is_some(), c.nv.as_mut()) {
            (true, Some(ring)) => match ring.alloc(n as u64, first + n as u64 - 1) {
                Some(r) => Some(r),
                None => {
                    // Ring full: the core reclaims records once their data is on the media.
                    self.mailbox.want_space.store(true, Ordering::SeqCst);
                    drop(c);
                    sh.wake.notify_one();
                    return Err(Rejected::NoMem(io));
                }
            },
            _ => None,
        };
        for i in 0..n as u64 {
            c.wbuf.reserve(io.offset_blocks + i, Origin::User);
        }
        let slots = Arc::clone(c.wbuf.data());
        drop(c);
        // The nv-cache record is written from its own copy (header + data): the guest may change
        // its buffer under an in-flight write, and the record's CRC must match what it holds.
        let record = nv_rec.map(|_| IoVecs::alloc((n + 1) * BLOCK_BYTES));
        let mut data_crc = 0u32;
        for i in 0..n as u64 {
            let mut slot = slots.at(first + i);
            io.bufs.copy_to_slice(i * BLOCK_BYTES as u64, &mut slot);
            if let Some(rec) = &record {
                data_crc = crc32c::crc32c_append(data_crc, &slot);
                rec.copy_from_slice((i + 1) * BLOCK_BYTES as u64, &slot);
            }
        }
        let mut c = lock(&sh.core);
        for i in 0..n as u64 {
            c.wbuf.set_ready(first + i);
            let old = sh.l2p.swap(io.offset_blocks + i, Loc::Cache(first + i));
            sh.invalidate(&mut c, old);
        }
        let wake = (c.wbuf.waiting() >= sh.geo.ws_opt || !c.flushes.is_empty()) && c.core_idle;
        drop(c);
        sh.stats.user_write_blocks.fetch_add(n as u64, Ordering::Relaxed);
        if wake {
            sh.wake.notify_one();
        }
        match (nv_rec, record, self.nv.as_mut()) {
            (Some((seq, unit)), Some(bufs), Some(nv)) => {
                // Acknowledged once the record (header + data) is in the nv-cache.
                let hdr =
                    nvcache::RecordHeader { seq, lba: io.offset_blocks, num_blocks: n as u32, data_crc };
                bufs.copy_from_slice(0, &hdr.encode(&nv.nonce));
                let id = self.next_id;
                self.next_id += 1;
                nv.pending.insert(id, (io.tag, seq));
                let bpu = nv.cache.blocks_per_unit;
                nv.ch.submit(BdevIo::write(nv.cache.ring_block(unit), (1 + n as u64) * bpu, bufs, id));
                sh.stats.nv_records.fetch_add(1, Ordering::Relaxed);
                self.mailbox.wake();
            }
            _ => self.done(io.tag, Ok(())),
        }
        Ok(())
    }

    /// Collects finished nv-cache writes: marks their records written and acknowledges them.
    fn poll_nv(&mut self) {
        let Some(nv) = self.nv.as_mut() else { return };
        if nv.pending.is_empty() {
            return;
        }
        nv.scratch.clear();
        if nv.ch.poll(&mut nv.scratch) == 0 {
            return;
        }
        let mut acks = Vec::with_capacity(nv.scratch.len());
        {
            let mut c = lock(&self.sh.core);
            for d in nv.scratch.drain(..) {
                let Some((tag, seq)) = nv.pending.remove(&d.tag) else { continue };
                // A failed record is reclaimable too (its write failed; the data still goes to the
                // media as any buffered write): the ring must not stall behind it.
                if let Some(r) = c.nv.as_mut() {
                    r.mark_done(seq);
                }
                if let Err(e) = d.result {
                    log::error!("ftl '{}': nv-cache write of record {seq} failed: {e}", self.sh.cfg.name);
                }
                acks.push(Completion { tag, result: d.result });
            }
        }
        for a in acks {
            self.done(a.tag, a.result);
        }
    }

    fn unmap(&mut self, io: BdevIo) -> Result<(), Rejected> {
        let sh = Arc::clone(&self.sh);
        let mut c = lock(&sh.core);
        if c.gate {
            self.mailbox.want_space.store(true, Ordering::SeqCst);
            return Err(Rejected::NoMem(io));
        }
        for lba in io.offset_blocks..io.offset_blocks + io.num_blocks {
            let old = sh.l2p.swap(lba, Loc::Unmapped);
            sh.invalidate(&mut c, old);
        }
        c.trims_pending = true;
        drop(c);
        self.done(io.tag, Ok(()));
        Ok(())
    }

    fn flush(&mut self, io: BdevIo) -> Result<(), Rejected> {
        let mut c = lock(&self.sh.core);
        if c.failed.is_some() {
            drop(c);
            return Err(Rejected::Failed(io, IoError::Errno(libc::EIO)));
        }
        let upto = c.wbuf.tail;
        c.flushes.push_back(FlushReq::new(Arc::clone(&self.mailbox), io.tag, upto));
        drop(c);
        self.sh.wake.notify_one();
        Ok(())
    }

    /// Starts the media part of a read for `blocks` (indexes within the I/O): unmapped blocks
    /// read zeros and buffered blocks are copied now; media blocks are read by commands of up to 64
    /// blocks straight into the caller's memory (no bounce buffer).
    fn start_read(&mut self, id: u64, blocks: impl Iterator<Item = u64>) {
        let Some(r) = self.reads.get_mut(&id) else { return };
        let mut cmd: Option<PendingRead> = None;
        let mut submitted = 0usize;
        for i in blocks {
            let lba = r.offset_blocks + i;
            let at = i * BLOCK_BYTES as u64;
            let Some(addr) = resolve_block(&self.sh, &r.bufs, lba, at) else { continue };
            let c = cmd.get_or_insert_with(PendingRead::new);
            c.ppas.push(self.sh.geo.ppa_of(addr));
            guest_pieces(&r.bufs, at, BLOCK_BYTES as u64, &mut c.data);
            c.blocks.push((i, lba, addr));
            if c.blocks.len() == 64 {
                if let Some(c) = cmd.take() {
                    submitted +=
                        submit_read(self.qp.as_mut(), &mut self.cmds, &mut self.next_id, id, c, &mut r.retry);
                }
            }
        }
        if let Some(c) = cmd.take() {
            submitted +=
                submit_read(self.qp.as_mut(), &mut self.cmds, &mut self.next_id, id, c, &mut r.retry);
        }
        r.cmds_left += submitted;
        if submitted > 0 {
            self.mailbox.wake();
        }
    }

    fn read(&mut self, io: BdevIo) -> Result<(), Rejected> {
        if self.qp.in_flight() + (io.num_blocks as usize).div_ceil(64) > self.qp.depth() {
            return Err(Rejected::NoMem(io));
        }
        let id = self.next_id;
        self.next_id += 1;
        let n = io.num_blocks;
        self.reads.insert(
            id,
            ReadIo {
                tag: io.tag,
                bufs: io.bufs,
                offset_blocks: io.offset_blocks,
                cmds_left: 0,
                retry: Vec::new(),
                error: None,
            },
        );
        self.start_read(id, 0..n);
        self.finish_read_if_done(id);
        Ok(())
    }

    fn finish_read_if_done(&mut self, id: u64) {
        let Some(r) = self.reads.get_mut(&id) else { return };
        if r.cmds_left > 0 {
            return;
        }
        if r.error.is_none() && !r.retry.is_empty() {
            let blocks = std::mem::take(&mut r.retry);
            self.start_read(id, blocks.into_iter());
            let Some(r) = self.reads.get(&id) else { return };
            if r.cmds_left > 0 || !r.retry.is_empty() {
                return;
            }
        }
        if let Some(r) = self.reads.remove(&id) {
            self.done(r.tag, r.error.map_or(Ok(()), Err));
        }
    }

    fn read_done(&mut self, c: crate::ocssd::Completion) {
        let Some(cmd) = self.cmds.remove(&c.tag) else { return };
        let ok = c.status.is_success();
        let Some(r) = self.reads.get_mut(&cmd.read_id) else { return };
        r.cmds_left = r.cmds_left.saturating_sub(1);
        for (k, &(i, lba, addr)) in cmd.blocks.iter().enumerate() {
            if self.sh.l2p.get(lba) != Loc::Media(addr) {
                // Moved or rewritten while we read (the memory may hold the old copy): read it again.
                r.retry.push(i);
                continue;
            }
            if !ok && (k >= 64 || c.failed.0 & (1 << k) != 0 || c.failed.0 == 0) {
                self.sh.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                log::debug!(
                    "ftl '{}': read of lba {lba} at {} failed: {}",
                    self.sh.cfg.name,
                    self.sh.geo.ppa_of(addr),
                    c.status
                );
                r.error = Some(IoError::Media(c.status.to_status_field(false)));
            }
        }
        let id = cmd.read_id;
        self.finish_read_if_done(id);
    }
}

/// Submits one read command; returns 1 if submitted (a full queue puts its blocks on `retry`).
fn submit_read(
    qp: &mut dyn QueuePair,
    cmds: &mut TagMap<ReadCmd>,
    next_id: &mut u64,
    read_id: u64,
    c: PendingRead,
    retry: &mut Vec<u64>,
) -> usize {
    let Ok(ppas) = PpaList::new(c.ppas) else { return 0 };
    let tag = *next_id;
    *next_id += 1;
    let cmd = Command { tag, op: Op::Read { ppas, data: c.data, oob: None } };
    match qp.submit(cmd) {
        Ok(()) => {
            cmds.insert(tag, ReadCmd { read_id, blocks: c.blocks });
            1
        }
        Err(_) => {
            // The queue is sized above the channel's depth; treat a full queue as a retry.
            retry.extend(c.blocks.iter().map(|b| b.0));
            0
        }
    }
}

/// A read command being built.
struct PendingRead {
    ppas: Vec<crate::ocssd::Ppa>,
    data: SgList,
    blocks: Vec<(u64, u64, u64)>,
}

impl PendingRead {
    fn new() -> Self {
        PendingRead { ppas: Vec::with_capacity(4), data: SgList::new(), blocks: Vec::with_capacity(4) }
    }
}

/// Resolves one block of a read through the L2P: zeros and buffered data are copied into `bufs`
/// at byte `at` now (`None`); a media address is returned for the caller to read.
fn resolve_block(sh: &Shared, bufs: &IoVecs, lba: u64, at: u64) -> Option<u64> {
    loop {
        match sh.l2p.get(lba) {
            Loc::Unmapped => {
                bufs.copy_from_slice(at, &ZERO_BLOCK);
                return None;
            }
            Loc::Media(a) => return Some(a),
            Loc::Cache(n) => {
                let c = lock(&sh.core);
                if sh.l2p.get(lba) != Loc::Cache(n) {
                    continue;
                }
                if c.wbuf.get(n).is_some() {
                    bufs.copy_from_slice(at, &c.wbuf.data().at(n));
                    return None;
                }
            }
        }
    }
}

static ZERO_BLOCK: [u8; BLOCK_BYTES] = [0u8; BLOCK_BYTES];

/// Appends the caller memory `[off, off+len)` of `bufs` to `sg` as zero-copy segments.
fn guest_pieces(bufs: &IoVecs, off: u64, len: u64, sg: &mut SgList) {
    let end = off + len;
    let mut pos = 0u64;
    for v in bufs.as_iovecs() {
        let seg_end = pos + v.iov_len as u64;
        let lo = pos.max(off);
        let hi = seg_end.min(end);
        if lo < hi {
            let base = (v.iov_base as *mut u8).wrapping_add((lo - pos) as usize);
            if let Some(ptr) = std::ptr::NonNull::new(base) {
                // SAFETY: `base..base+(hi-lo)` lies inside one iovec of `bufs`, which stays mapped
                // while its keeper (cloned into the IoBuf) lives or, without a keeper, while the
                // read holding `bufs` is in `reads`, which outlives the command (the channel's queue
                // pair, and with it every command, is dropped before `reads`). Only this command
                // touches this block's range of the I/O memory until it completes (other blocks of
                // the read are disjoint; a retry starts after completion); the guest may write it
                // concurrently, as it may under any device DMA.
                sg.push(unsafe { IoBuf::from_raw(ptr, (hi - lo) as usize, bufs.keeper()) });
            }
        }
        if seg_end >= end {
            break;
        }
        pos = seg_end;
    }
}

impl FlushReq {
    fn new(mailbox: Arc<Mailbox>, tag: u64, upto: u64) -> Self {
        core::new_flush(mailbox, tag, upto)
    }
}

impl ModuleChannel for FtlChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        match io.kind {
            IoKind::Read => self.read(io),
            IoKind::Write => self.write(io),
            IoKind::Unmap | IoKind::WriteZeroes => self.unmap(io),
            IoKind::Flush => self.flush(io),
            IoKind::Reset => Err(Rejected::Failed(io, IoError::Unsupported)),
        }
    }

    fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        let before = done.len();
        self.poll_nv();
        let mut scratch = std::mem::take(&mut self.scratch);
        self.qp.poll(&mut scratch, usize::MAX);
        for c in scratch.drain(..) {
            self.read_done(c);
        }
        self.scratch = scratch;
        self.mailbox.take(done);
        done.extend(self.local.drain(..));
        // The wakeup stays armed while anything happens (no eventfd syscalls while busy); a poll
        // that finds nothing in flight and nothing done clears it, then a completion posted
        // meanwhile re-arms it.
        let nv_busy = self.nv.as_ref().is_some_and(|nv| !nv.pending.is_empty());
        if self.cmds.is_empty() && !nv_busy && done.len() == before {
            #[cfg(test)]
            BEFORE_CLEAR.with(|h| {
                if let Some(f) = h.borrow_mut().as_mut() {
                    f();
                }
            });
            self.mailbox.clear();
            if self.mailbox.has_posts() {
                self.mailbox.wake();
            }
        }
        done.len() - before
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.mailbox.event.as_raw_fd())
    }
}
