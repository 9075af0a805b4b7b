//! The OCSSD 2.0 emulator: a file-backed [`MediaDevice`] enforcing the media rules of
//! SPEC §3, with fault injection.
//!
//! ```text
//!  QueuePair (thread A) ─┐                      ┌─ RwLock<ChunkSlot> chunk 0 ─┐
//!  QueuePair (thread B) ─┼─ Arc<Inner> ─────────┼─ RwLock<ChunkSlot> chunk 1 ─┼─ pread/pwrite ─► image file
//!  QueuePair (thread C) ─┘   (geometry, file)   └─ ...                        ┘   (see emu/image.rs)
//! ```
//!
//! # Design
//! * **Inline execution, polled completion.** `submit` executes the command on the calling
//!   thread with positioned I/O on the shared image file (`pread`/`pwrite` at computed
//!   offsets: no seek state, so threads never contend on the file) and queues the
//!   completion; `poll` hands it out. No command is ever completed from `submit`.
//! * **Per-chunk locking.** Each chunk has its own `RwLock` holding its state, write
//!   pointer, erase count and armed faults. Writes and resets take the chunk's write lock
//!   for the data I/O and the chunk-record update, which keeps the write-pointer rule exact
//!   under concurrency; reads take the read lock, so a reset cannot race a read. Commands
//!   lock one chunk at a time (never two), so there is no lock ordering to get wrong.
//! * **Vector semantics.** A PPA list is split into runs of consecutive blocks of one chunk;
//!   each run is checked and executed on its own, and failed entries are flagged in the
//!   per-LBA bitmap (the overall status is the first error met), as a device reports
//!   partial success. Buffer lengths that do not match the list fail the whole command with
//!   "invalid field".
//! * **Persistence.** Data and OOB go to the image before the chunk record (state, write
//!   pointer, erase count, crc32c) is rewritten. `Op::Flush` is `fdatasync`. The image is
//!   locked (`flock`) while open, so two daemons cannot share it.
//! * **Reads from a mapping.** The image is also mapped read-only (`MAP_SHARED`), and reads
//!   copy from the mapping straight into the command's buffers (for the FTL: guest memory), so
//!   a read costs one `memcpy` and no system call. Writes stay positioned `pwrite`s: a write
//!   into a hole of a sparse image on a full file system then fails with an error status
//!   (`ENOSPC`) instead of a `SIGBUS`, and every media rule (write pointer, states, faults,
//!   persistence order, flush = `fdatasync`) is checked exactly as before. Mapping and file
//!   share the page cache, so a read sees every completed write. When the mapping cannot be
//!   made, reads fall back to `pread`.
//!
//! Media rules (SPEC §3), checked per run in this order, as QEMU's OCSSD controller does:
//! offline chunk → 0xC0; closed chunk → write fault; beyond the chunk → write fault;
//! length not a multiple of `ws_min` → invalid field; not at the write pointer → 0xF2.
//! Reads of offline chunks → 0xC0; at or beyond the write pointer → "unwritten block"
//! (0x87). Resets of offline chunks → 0xC0; of free or open chunks without the
//! multiple/early-reset capability → 0xC1. A chunk closes when its write pointer
//! reaches `clba`; it goes offline when its erase count reaches `pe_cycles`.
//!
//! # Limitations
//! Truncating the image file under a running daemon (the image is `flock`ed against other
//! vblkd processes, not against other programs) makes a read of the lost range fault.
//! `maxoc`/`maxocpu` are reported as 0 (no open-chunk limit) and not enforced; there is no
//! write cache, so `mw_cunits` is reported but every block below the write pointer is
//! readable; the chunk notification log keeps the last 1024 entries in memory only.

pub mod faults;
pub mod image;

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::driver::{
    Buffers, Capabilities, Command, Completion, IoBuf, MediaDevice, MediaError, MediaInfo, MediaKind, Op,
    PpaList, QueuePair, RejectReason, Rejected, SgList,
};
use super::ppa::{Ppa, PpaFormat};
use super::spec::{
    ChunkInfo, ChunkNotification, ChunkState, Geometry, Status, CHUNK_TYPE_SEQUENTIAL, MAX_VECTOR_LBAS,
    MCCAP_EARLY_RESET, MCCAP_MULTIPLE_RESETS, NOTIFY_MASK_BLOCKS, NOTIFY_MASK_CHUNK, NOTIFY_STATE_HIGH_ECC,
    NOTIFY_STATE_UNRECOVERABLE, NOTIFY_STATE_WEAR_INDEX,
};
use super::vector::LbaBitmap;

pub use faults::{ChunkFaults, Fault, ReadErrorKind};
use image::{ChunkRecord, CHUNK_RECORD_BYTES, HEADER_BYTES};
pub use image::{EmuGeometry, Layout, BLOCK_SIZE_BYTES};

/// Entries kept in the chunk notification log.
const NOTIFICATION_LOG_ENTRIES: usize = 1024;
/// Namespace id reported in notifications.
const NSID: u32 = 1;

/// How to create an image.
#[derive(Debug, Clone, Default)]
pub struct EmuConfig {
    /// The geometry.
    pub geometry: EmuGeometry,
    /// Chunks that start offline (their `lbk` is ignored).
    pub bad_chunks: Vec<Ppa>,
    /// Faults armed right after creation.
    pub faults: Vec<Fault>,
}

/// Number of chunks in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChunkStateCounts {
    /// Free chunks.
    pub free: u64,
    /// Open chunks.
    pub open: u64,
    /// Closed chunks.
    pub closed: u64,
    /// Offline chunks.
    pub offline: u64,
}

impl ChunkStateCounts {
    fn add(&mut self, s: ChunkState) {
        match s {
            ChunkState::Free => self.free += 1,
            ChunkState::Open => self.open += 1,
            ChunkState::Closed => self.closed += 1,
            ChunkState::Offline => self.offline += 1,
        }
    }
}

/// A read-only look at an image (for `vblkd media info`), taken without locking it.
#[derive(Debug, Clone)]
pub struct ImageSummary {
    /// The emulated geometry.
    pub geometry: EmuGeometry,
    /// The device description.
    pub info: MediaInfo,
    /// Region layout.
    pub layout: Layout,
    /// Chunk states.
    pub counts: ChunkStateCounts,
    /// Sum of all chunks' erase counts.
    pub total_erases: u64,
}

/// Runtime state of one chunk.
#[derive(Debug, Clone)]
struct ChunkSlot {
    state: ChunkState,
    wp: u64,
    erase_count: u64,
    faults: ChunkFaults,
}

struct Notifications {
    next_nc: u64,
    log: VecDeque<ChunkNotification>,
}

/// A read-only shared mapping of the whole image.
struct ImageMap {
    ptr: NonNull<u8>,
    len_bytes: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is only read, through raw
// pointer copies (never Rust references), so moving or sharing the handle between threads is sound.
unsafe impl Send for ImageMap {}
// SAFETY: as above: concurrent raw reads of a shared mapping race with nothing Rust can observe.
unsafe impl Sync for ImageMap {}

impl ImageMap {
    /// Maps `len_bytes` of `file` read-only; `None` if the kernel refuses.
    fn new(file: &File, len_bytes: u64) -> Option<Self> {
        let len_bytes = usize::try_from(len_bytes).ok().filter(|l| *l > 0)?;
        // SAFETY: a fresh shared read-only mapping of an open fd; the kernel picks the address,
        // and the result is checked for MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(ImageMap { ptr: NonNull::new(p.cast())?, len_bytes })
    }

    /// Copies `dst.len()` bytes from image offset `off`; false when the range is outside.
    fn read(&self, dst: &mut [u8], off: u64) -> bool {
        let Some(start) = usize::try_from(off).ok() else { return false };
        if !start.checked_add(dst.len()).is_some_and(|end| end <= self.len_bytes) {
            return false;
        }
        // SAFETY: `start..start+len` lies inside the mapping (checked above), which lives as
        // long as `self`; `dst` is an exclusive borrow of other memory, so they cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start), dst.as_mut_ptr(), dst.len()) };
        true
    }
}

impl Drop for ImageMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len_bytes` are exactly what mmap returned; nothing uses them afterwards.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len_bytes) };
    }
}

struct Inner {
    path: String,
    file: File,
    /// Read-only mapping of the image (reads copy from it); `None`: reads use `pread`.
    map: Option<ImageMap>,
    geometry: EmuGeometry,
    layout: Layout,
    info: MediaInfo,
    chunks: Vec<RwLock<ChunkSlot>>,
    notifications: Mutex<Notifications>,
    /// Successful `fdatasync`s behind `Op::Flush` (the seam tests use to see a flush reach the image).
    data_syncs: AtomicU64,
}

/// The emulated OCSSD. Cheap to clone; all clones share the device.
#[derive(Clone)]
pub struct EmuDevice {
    inner: Arc<Inner>,
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> MediaError {
    move |source| MediaError::Io { context, source }
}

fn media_info(g: &EmuGeometry) -> Result<MediaInfo, MediaError> {
    let lbaf = g.lbaf();
    let ppa_format = PpaFormat::new(lbaf)
        .map_err(|e| MediaError::InvalidConfig { field: "lbaf", reason: e.to_string() })?;
    let to_u16 = |field: &'static str, v: u32| {
        u16::try_from(v)
            .map_err(|_| MediaError::InvalidConfig { field, reason: format!("{v} exceeds 65535") })
    };
    Ok(MediaInfo {
        kind: MediaKind::OpenChannel,
        // mnr, wit, maxoc and maxocpu are 0 (minor version 0, no wear-index threshold, no open-chunk
        // limits): the defaults. (Not spelled out: cargo-mutants' "delete field" mutants ignore
        // exclude_re, and deleting a field equal to its default is an equivalent mutant.)
        geometry: Geometry {
            mjr: 2,
            lbaf,
            mccap: g.mccap,
            num_grp: to_u16("num_grp", g.num_grp)?,
            num_pu: to_u16("num_pu", g.num_pu)?,
            num_chk: g.num_chk,
            clba: g.clba,
            ws_min: g.ws_min,
            ws_opt: g.ws_opt,
            mw_cunits: g.mw_cunits,
            ..Geometry::default()
        },
        ppa_format,
        block_size_bytes: BLOCK_SIZE_BYTES,
        oob_bytes_per_block: g.oob_bytes,
        max_lbas_per_cmd: MAX_VECTOR_LBAS,
        capabilities: Capabilities {
            scattered_lists: true,
            copy: true,
            append: true,
            multiple_resets: g.mccap & MCCAP_MULTIPLE_RESETS != 0,
            early_reset: g.mccap & MCCAP_EARLY_RESET != 0,
        },
    })
}

fn wear_index(erase_count: u64, pe_cycles: u32) -> u8 {
    let wi = erase_count.saturating_mul(255) / u64::from(pe_cycles.max(1));
    u8::try_from(wi.min(255)).unwrap_or(u8::MAX)
}

/// Free bytes for an unprivileged user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64, MediaError> {
    let context = format!("statvfs {}", dir.display());
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| MediaError::Io {
        context: context.clone(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that lives across the call, and `st` points to
    // writable memory of the right type for the kernel to fill.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io_err(context)(std::io::Error::last_os_error()));
    }
    // SAFETY: `st` was zero-initialised (a valid statvfs) and statvfs succeeded.
    let st = unsafe { st.assume_init() };
    // The field types differ between targets (u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// Takes an exclusive advisory lock so two processes cannot drive one image.
fn lock_exclusive(file: &File, path: &str) -> Result<(), MediaError> {
    // SAFETY: flock only reads the fd number, which `file` keeps open during the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(io_err(format!("locking image {path} (is another vblkd using it?)"))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

struct Loaded {
    file: File,
    geometry: EmuGeometry,
    layout: Layout,
    info: MediaInfo,
    records: Vec<ChunkRecord>,
}

fn load(path: &Path, writable: bool) -> Result<Loaded, MediaError> {
    let p = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(io_err(format!("opening image {p}")))?;
    if writable {
        lock_exclusive(&file, &p)?;
    }
    let len = file.metadata().map_err(io_err(format!("stat {p}")))?.len();
    let head_len = usize::try_from(len.min(HEADER_BYTES as u64)).unwrap_or(HEADER_BYTES);
    let mut head = vec![0u8; head_len];
    file.read_exact_at(&mut head, 0).map_err(io_err(format!("reading header of {p}")))?;
    let (geometry, layout) = image::decode_header(&p, &head)?;
    if len < layout.image_bytes {
        return Err(MediaError::Truncated { path: p, expected_bytes: layout.image_bytes, found_bytes: len });
    }
    let info = media_info(&geometry)
        .map_err(|e| MediaError::CorruptHeader { path: p.clone(), reason: e.to_string() })?;
    let chunks = geometry.total_chunks();
    let table_bytes = usize::try_from(chunks)
        .ok()
        .and_then(|c| c.checked_mul(CHUNK_RECORD_BYTES))
        .ok_or_else(|| MediaError::CorruptHeader {
            path: p.clone(),
            reason: format!("{chunks} chunks do not fit in memory"),
        })?;
    let mut table = vec![0u8; table_bytes];
    file.read_exact_at(&mut table, layout.chunk_table_offset)
        .map_err(io_err(format!("reading chunk table of {p}")))?;
    let mut records = Vec::with_capacity(table_bytes / CHUNK_RECORD_BYTES);
    for (index, rec) in table.chunks_exact(CHUNK_RECORD_BYTES).enumerate() {
        let index = index as u64;
        let slba = info.chunk_at(index).and_then(|c| info.ppa_format.pack(c).ok()).unwrap_or(u64::MAX);
        let r = ChunkRecord::decode(rec, slba, u64::from(geometry.clba))
            .map_err(|reason| MediaError::CorruptChunkEntry { path: p.clone(), index, reason })?;
        records.push(r);
    }
    Ok(Loaded { file, geometry, layout, info, records })
}

impl EmuDevice {
    /// How many `Op::Flush` commands synced the image to disk (`fdatasync`) since it was opened.
    pub fn data_syncs(&self) -> u64 {
        self.inner.data_syncs.load(Ordering::Relaxed)
    }

    /// Creates a new image at `path` (refused if the file exists) and opens it.
    pub fn create(path: &Path, cfg: &EmuConfig) -> Result<Self, MediaError> {
        let g = cfg.geometry;
        g.validate()?;
        let layout = Layout::compute(&g)?;
        let info = media_info(&g)?;
        let mut offline = std::collections::BTreeSet::new();
        for bad in &cfg.bad_chunks {
            let idx = info.chunk_index(bad).ok_or_else(|| MediaError::InvalidConfig {
                field: "bad_chunks",
                reason: format!("chunk {bad} is outside the geometry"),
            })?;
            offline.insert(idx);
        }
        let p = path.display().to_string();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let available_bytes = free_bytes(dir)?;
        if layout.image_bytes > available_bytes {
            return Err(MediaError::NoSpace { path: p, needed_bytes: layout.image_bytes, available_bytes });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(format!("creating image {p}")))?;
        let written = (|| {
            file.set_len(layout.image_bytes).map_err(io_err(format!("sizing image {p}")))?;
            // The chunk table is written in batches so huge geometries need little memory.
            const BATCH_RECORDS: u64 = 16 * 1024;
            let total = g.total_chunks();
            let mut first = 0u64;
            while first < total {
                let n = BATCH_RECORDS.min(total - first);
                let mut table = Vec::with_capacity(n as usize * CHUNK_RECORD_BYTES);
                for index in first..first + n {
                    let chunk = info.chunk_at(index).unwrap_or_default();
                    let rec = ChunkRecord {
                        info: ChunkInfo {
                            state: if offline.contains(&index) {
                                ChunkState::Offline
                            } else {
                                ChunkState::Free
                            },
                            kind: CHUNK_TYPE_SEQUENTIAL,
                            wear_index: 0,
                            slba: info.ppa_format.pack(chunk).unwrap_or(u64::MAX),
                            cnlb: u64::from(g.clba),
                            write_pointer_blocks: 0,
                        },
                        erase_count: 0,
                    };
                    table.extend_from_slice(&rec.encode());
                }
                let off = layout.chunk_table_offset + first * CHUNK_RECORD_BYTES as u64;
                file.write_all_at(&table, off).map_err(io_err(format!("writing chunk table of {p}")))?;
                first += n;
            }
            // The header goes last: an interrupted create leaves no valid image.
            file.write_all_at(&image::encode_header(&g, &layout), 0)
                .map_err(io_err(format!("writing header of {p}")))?;
            file.sync_all().map_err(io_err(format!("syncing {p}")))
        })();
        drop(file);
        if let Err(e) = written {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        let dev = Self::open(path)?;
        for f in &cfg.faults {
            dev.inject(*f)?;
        }
        Ok(dev)
    }

    /// Opens an existing image (exclusively).
    pub fn open(path: &Path) -> Result<Self, MediaError> {
        let l = load(path, true)?;
        let chunks = l
            .records
            .iter()
            .map(|r| {
                RwLock::new(ChunkSlot {
                    state: r.info.state,
                    wp: r.info.write_pointer_blocks,
                    erase_count: r.erase_count,
                    faults: ChunkFaults::default(),
                })
            })
            .collect();
        let map = ImageMap::new(&l.file, l.layout.image_bytes);
        Ok(EmuDevice {
            inner: Arc::new(Inner {
                path: path.display().to_string(),
                map,
                file: l.file,
                geometry: l.geometry,
                layout: l.layout,
                info: l.info,
                chunks,
                notifications: Mutex::new(Notifications { next_nc: 1, log: VecDeque::new() }),
                data_syncs: AtomicU64::new(0),
            }),
        })
    }

    /// Reads an image's header and chunk table without opening it for I/O.
    pub fn inspect(path: &Path) -> Result<ImageSummary, MediaError> {
        let l = load(path, false)?;
        let mut counts = ChunkStateCounts::default();
        let mut total_erases = 0u64;
        for r in &l.records {
            counts.add(r.info.state);
            total_erases = total_erases.saturating_add(r.erase_count);
        }
        Ok(ImageSummary { geometry: l.geometry, info: l.info, layout: l.layout, counts, total_erases })
    }

    /// The emulated geometry.
    pub fn geometry(&self) -> &EmuGeometry {
        &self.inner.geometry
    }

    /// Image path.
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// Chunk-state counts right now.
    pub fn chunk_state_counts(&self) -> ChunkStateCounts {
        let mut c = ChunkStateCounts::default();
        for slot in &self.inner.chunks {
            c.add(read_slot(slot).state);
        }
        c
    }

    /// Erase count of a chunk.
    pub fn erase_count(&self, chunk: Ppa) -> Result<u64, MediaError> {
        let idx = self.inner.chunk_slot_index(&chunk)?;
        Ok(read_slot(&self.inner.chunks[idx]).erase_count)
    }

    /// Injects a fault at run time (see [`faults`]).
    pub fn inject(&self, fault: Fault) -> Result<(), MediaError> {
        self.inner.inject(fault)
    }
}

fn read_slot(l: &RwLock<ChunkSlot>) -> RwLockReadGuard<'_, ChunkSlot> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write_slot(l: &RwLock<ChunkSlot>) -> RwLockWriteGuard<'_, ChunkSlot> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Where a run's data comes from: blocks `first_block..` of a data list and OOB buffer.
struct WriteSource<'a> {
    data: &'a SgList,
    oob: Option<&'a IoBuf>,
    first_block: usize,
}

/// Outcome of a vector read.
struct ReadOutcome {
    status: Status,
    failed: LbaBitmap,
    /// Entries that failed only with high ECC (their data is valid).
    high_ecc: LbaBitmap,
}

/// Mask of run-relative offsets `[lo, hi)` (run length ≤ 64).
fn range_mask(lo: u64, hi: u64) -> u64 {
    let upto = |n: u64| {
        if n >= 64 {
            u64::MAX
        } else {
            (1u64 << n) - 1
        }
    };
    upto(hi) & !upto(lo)
}

fn note(status: &mut Status, s: Status) {
    if status.is_success() {
        *status = s;
    }
}

impl Inner {
    /// Reads image bytes at `off`: from the mapping when there is one, else `pread`.
    fn read_at(&self, dst: &mut [u8], off: u64) -> std::io::Result<()> {
        match &self.map {
            Some(m) if m.read(dst, off) => Ok(()),
            _ => self.file.read_exact_at(dst, off),
        }
    }

    /// `fdatasync` of the image, counted in `data_syncs` when it succeeds.
    fn sync_image(&self) -> std::io::Result<()> {
        self.file.sync_data()?;
        self.data_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn clba(&self) -> u64 {
        u64::from(self.geometry.clba)
    }

    fn bs(&self) -> usize {
        BLOCK_SIZE_BYTES as usize
    }

    fn oob_bytes(&self) -> usize {
        self.geometry.oob_bytes as usize
    }

    /// Slot index of a chunk, or `ChunkOutOfRange`.
    fn chunk_slot_index(&self, ppa: &Ppa) -> Result<usize, MediaError> {
        self.info
            .chunk_index(ppa)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|i| *i < self.chunks.len())
            .ok_or(MediaError::ChunkOutOfRange { ppa: *ppa })
    }

    /// Slot index of a block address (also checks `lbk`).
    fn block_slot_index(&self, ppa: &Ppa) -> Option<usize> {
        if ppa.lbk >= self.clba() {
            return None;
        }
        self.chunk_slot_index(ppa).ok()
    }

    fn pack(&self, ppa: Ppa) -> u64 {
        // In-range addresses always fit: the format is sized from the geometry.
        self.info.ppa_format.pack(ppa).unwrap_or(u64::MAX)
    }

    fn chunk_addr(&self, idx: usize) -> Ppa {
        self.info.chunk_at(idx as u64).unwrap_or_default()
    }

    fn block_number(&self, idx: usize, lbk: u64) -> u64 {
        idx as u64 * self.clba() + lbk
    }

    fn data_offset(&self, idx: usize, lbk: u64) -> u64 {
        self.layout.data_offset + self.block_number(idx, lbk) * u64::from(BLOCK_SIZE_BYTES)
    }

    fn oob_offset(&self, idx: usize, lbk: u64) -> u64 {
        self.layout.oob_offset + self.block_number(idx, lbk) * u64::from(self.geometry.oob_bytes)
    }

    fn chunk_info(&self, idx: usize, slot: &ChunkSlot) -> ChunkInfo {
        ChunkInfo {
            state: slot.state,
            kind: CHUNK_TYPE_SEQUENTIAL,
            wear_index: wear_index(slot.erase_count, self.geometry.pe_cycles),
            slba: self.pack(self.chunk_addr(idx)),
            cnlb: self.clba(),
            write_pointer_blocks: slot.wp,
        }
    }

    fn persist(&self, idx: usize, slot: &ChunkSlot) -> std::io::Result<()> {
        let rec = ChunkRecord { info: self.chunk_info(idx, slot), erase_count: slot.erase_count };
        let off = self.layout.chunk_table_offset + (idx * CHUNK_RECORD_BYTES) as u64;
        self.file.write_all_at(&rec.encode(), off)
    }

    fn notify(&self, lba: u64, state: u16, mask: u8, nlb: u16) {
        let mut n = self.notifications.lock().unwrap_or_else(|e| e.into_inner());
        let nc = n.next_nc;
        n.next_nc += 1;
        if n.log.len() >= NOTIFICATION_LOG_ENTRIES {
            n.log.pop_front();
        }
        n.log.push_back(ChunkNotification { nc, lba, nsid: NSID, state, mask, nlb });
    }

    fn inject(&self, fault: Fault) -> Result<(), MediaError> {
        let ppa = fault.ppa();
        let idx = self.chunk_slot_index(&ppa)?;
        if !matches!(fault, Fault::OfflineChunk(_)) && ppa.lbk >= self.clba() {
            return Err(MediaError::ChunkOutOfRange { ppa });
        }
        let mut slot = write_slot(&self.chunks[idx]);
        match fault {
            Fault::OfflineChunk(_) => {
                slot.state = ChunkState::Offline;
                self.persist(idx, &slot).map_err(io_err(format!("writing chunk table of {}", self.path)))?;
                self.notify(self.pack(ppa.chunk_start()), NOTIFY_STATE_UNRECOVERABLE, NOTIFY_MASK_CHUNK, 0);
            }
            Fault::WriteFail(_) => slot.faults.write_fail_at.push(ppa.lbk),
            Fault::CloseEarly(_) => slot.faults.close_early_at = Some(ppa.lbk),
            Fault::ReadError { kind, .. } => {
                slot.faults.read_errors.retain(|(at, _)| *at != ppa.lbk);
                slot.faults.read_errors.push((ppa.lbk, kind));
                let state = match kind {
                    ReadErrorKind::HighEcc => NOTIFY_STATE_HIGH_ECC,
                    ReadErrorKind::Unrecoverable => NOTIFY_STATE_UNRECOVERABLE,
                };
                self.notify(self.pack(ppa), state, NOTIFY_MASK_BLOCKS, 1);
            }
        }
        Ok(())
    }

    /// Writes blocks `[lbk, lbk+count)` of chunk `idx` from source block `src_block`.
    fn write_blocks(
        &self,
        idx: usize,
        lbk: u64,
        count: u64,
        src: &WriteSource<'_>,
        src_block: usize,
    ) -> std::io::Result<()> {
        if count == 0 {
            return Ok(());
        }
        let n = count as usize;
        let bs = self.bs();
        let mut off = self.data_offset(idx, lbk);
        let mut result = Ok(());
        let in_range = src.data.for_each_piece(src_block * bs, n * bs, |piece| {
            if result.is_ok() {
                result = self.file.write_all_at(piece, off);
                off += piece.len() as u64;
            }
        });
        if !in_range {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        result?;
        let ob = self.oob_bytes();
        let oob_off = self.oob_offset(idx, lbk);
        match src.oob.and_then(|o| o.as_slice().get(src_block * ob..(src_block + n) * ob)) {
            Some(bytes) => self.file.write_all_at(bytes, oob_off),
            None => self.file.write_all_at(&vec![0u8; n * ob], oob_off),
        }
    }

    /// Executes one write run of `n` blocks at `start` on a locked chunk. Returns the
    /// status and the failed run-relative offsets.
    fn write_run(
        &self,
        idx: usize,
        slot: &mut ChunkSlot,
        start: u64,
        n: u64,
        src: &WriteSource<'_>,
    ) -> (Status, u64) {
        let all = range_mask(0, n);
        let ws_min = u64::from(self.geometry.ws_min);
        match slot.state {
            ChunkState::Offline => return (Status::OFFLINE_CHUNK, all),
            ChunkState::Closed => return (Status::WRITE_FAULT, all),
            ChunkState::Free | ChunkState::Open => {}
        }
        let end = start + n;
        if end > self.clba() {
            return (Status::WRITE_FAULT, all);
        }
        if n % ws_min != 0 {
            return (Status::INVALID_FIELD, all);
        }
        if start != slot.wp {
            return (Status::OUT_OF_ORDER_WRITE, all);
        }
        let chunk = self.chunk_addr(idx);
        if !slot.faults.is_empty() {
            if let Some(at) = slot.faults.close_early_at.filter(|at| *at < end) {
                slot.faults.close_early_at = None;
                let at = at.max(start);
                if self.write_blocks(idx, start, at - start, src, src.first_block).is_err() {
                    return (Status::INTERNAL_ERROR, all);
                }
                slot.state = ChunkState::Closed;
                slot.wp = at;
                if self.persist(idx, slot).is_err() {
                    return (Status::INTERNAL_ERROR, all);
                }
                self.notify(self.pack(chunk), NOTIFY_STATE_UNRECOVERABLE, NOTIFY_MASK_CHUNK, 0);
                return (Status::CHUNK_CLOSED_EARLY, range_mask(at - start, n));
            }
            if let Some(at) = slot.faults.take_write_fail_in(start, end) {
                // `start` is a multiple of ws_min (the write pointer only moves by whole
                // units), so the unit holding `at` lies inside the run.
                let unit_lo = at - at % ws_min;
                let unit_hi = (unit_lo + ws_min).min(end);
                let first = src.first_block;
                let before = unit_lo - start;
                let after = end - unit_hi;
                let skip = (unit_hi - start) as usize;
                if self.write_blocks(idx, start, before, src, first).is_err()
                    || self.write_blocks(idx, unit_hi, after, src, first + skip).is_err()
                {
                    return (Status::INTERNAL_ERROR, all);
                }
                self.advance(slot, end);
                if self.persist(idx, slot).is_err() {
                    return (Status::INTERNAL_ERROR, all);
                }
                let nlb = u16::try_from(unit_hi - unit_lo).unwrap_or(u16::MAX);
                self.notify(
                    self.pack(chunk.with_lbk(unit_lo)),
                    NOTIFY_STATE_UNRECOVERABLE,
                    NOTIFY_MASK_BLOCKS,
                    nlb,
                );
                return (Status::WRITE_FAIL_NEXT_UNIT, range_mask(unit_lo - start, unit_hi - start));
            }
        }
        if self.write_blocks(idx, start, n, src, src.first_block).is_err() {
            return (Status::INTERNAL_ERROR, all);
        }
        self.advance(slot, end);
        if self.persist(idx, slot).is_err() {
            return (Status::INTERNAL_ERROR, all);
        }
        (Status::SUCCESS, 0)
    }

    fn advance(&self, slot: &mut ChunkSlot, end: u64) {
        slot.wp = end;
        slot.state = if end >= self.clba() { ChunkState::Closed } else { ChunkState::Open };
    }

    /// Splits a list into runs of consecutive in-range blocks of one chunk and calls `f`
    /// with (slot index, first list entry, run length); out-of-range entries are flagged.
    fn for_each_run(
        &self,
        list: &[Ppa],
        status: &mut Status,
        failed: &mut LbaBitmap,
        mut f: impl FnMut(usize, usize, usize) -> (Status, u64),
    ) {
        let mut i = 0;
        while i < list.len() {
            let p = list[i];
            let Some(idx) = self.block_slot_index(&p) else {
                failed.set(i);
                note(status, Status::LBA_OUT_OF_RANGE);
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < list.len()
                && list[j].same_chunk(&p)
                && list[j].lbk == p.lbk + (j - i) as u64
                && list[j].lbk < self.clba()
            {
                j += 1;
            }
            let (s, mask) = f(idx, i, j - i);
            if !s.is_success() {
                note(status, s);
            }
            failed.0 |= mask.checked_shl(i as u32).unwrap_or(0);
            i = j;
        }
    }

    fn exec_write(&self, ppas: &PpaList, data: &SgList, oob: Option<&IoBuf>) -> (Status, LbaBitmap) {
        let n = ppas.len();
        if data.len_bytes() != n * self.bs() || oob.is_some_and(|o| o.len() != n * self.oob_bytes()) {
            return (Status::INVALID_FIELD, LbaBitmap::first(n));
        }
        let list = ppas.as_slice();
        let mut status = Status::SUCCESS;
        let mut failed = LbaBitmap::NONE;
        self.for_each_run(list, &mut status, &mut failed, |idx, i, len| {
            let mut slot = write_slot(&self.chunks[idx]);
            let src = WriteSource { data, oob, first_block: i };
            self.write_run(idx, &mut slot, list[i].lbk, len as u64, &src)
        });
        (status, failed)
    }

    fn exec_append(
        &self,
        chunk: Ppa,
        data: &SgList,
        oob: Option<&IoBuf>,
    ) -> (Status, LbaBitmap, Option<Ppa>) {
        let bs = self.bs();
        let n = data.len_bytes() / bs;
        if data.len_bytes() % bs != 0
            || n == 0
            || n > MAX_VECTOR_LBAS
            || oob.is_some_and(|o| o.len() != n * self.oob_bytes())
        {
            return (Status::INVALID_FIELD, LbaBitmap::first(n), None);
        }
        let Ok(idx) = self.chunk_slot_index(&chunk) else {
            return (Status::LBA_OUT_OF_RANGE, LbaBitmap::first(n), None);
        };
        let mut slot = write_slot(&self.chunks[idx]);
        let start = slot.wp;
        let src = WriteSource { data, oob, first_block: 0 };
        let (status, mask) = self.write_run(idx, &mut slot, start, n as u64, &src);
        let wrote = slot.wp > start;
        (status, LbaBitmap(mask), wrote.then(|| chunk.with_lbk(start)))
    }

    fn exec_read(&self, ppas: &PpaList, data: &mut SgList, mut oob: Option<&mut IoBuf>) -> ReadOutcome {
        let n = ppas.len();
        let bs = self.bs();
        let ob = self.oob_bytes();
        if data.len_bytes() != n * bs || oob.as_ref().is_some_and(|o| o.len() != n * ob) {
            return ReadOutcome {
                status: Status::INVALID_FIELD,
                failed: LbaBitmap::first(n),
                high_ecc: LbaBitmap::NONE,
            };
        }
        let list = ppas.as_slice();
        let mut status = Status::SUCCESS;
        let mut failed = LbaBitmap::NONE;
        let mut high_ecc = LbaBitmap::NONE;
        self.for_each_run(list, &mut status, &mut failed, |idx, i, len| {
            let slot = read_slot(&self.chunks[idx]);
            let len = len as u64;
            let all = range_mask(0, len);
            if slot.state == ChunkState::Offline {
                return (Status::OFFLINE_CHUNK, all);
            }
            let start = list[i].lbk;
            let readable_end =
                if slot.state == ChunkState::Free { start } else { slot.wp.clamp(start, start + len) };
            let readable = readable_end - start;
            let mut run_status = Status::SUCCESS;
            let mut mask = range_mask(readable, len);
            if readable < len {
                run_status = Status::UNWRITTEN_BLOCK;
            }
            if readable > 0 {
                let k = readable as usize;
                let mut off = self.data_offset(idx, start);
                let r = data.try_for_each_piece_mut(i * bs, k * bs, |piece| {
                    self.read_at(piece, off)?;
                    off += piece.len() as u64;
                    Ok::<(), std::io::Error>(())
                });
                let oob_ok = match oob.as_deref_mut() {
                    Some(o) => match o.as_mut_slice().get_mut(i * ob..(i + k) * ob) {
                        Some(dst) => self.read_at(dst, self.oob_offset(idx, start)).is_ok(),
                        None => false,
                    },
                    None => true,
                };
                if !matches!(r, Some(Ok(()))) || !oob_ok {
                    return (Status::INTERNAL_ERROR, all);
                }
            }
            if !slot.faults.read_errors.is_empty() {
                for k in 0..readable {
                    match slot.faults.read_error_at(start + k) {
                        Some(ReadErrorKind::HighEcc) => {
                            mask |= 1 << k;
                            if let Some(sh) = 1u64.checked_shl((i as u64 + k) as u32) {
                                high_ecc.0 |= sh;
                            }
                            note(&mut run_status, Status::HIGH_ECC);
                        }
                        Some(ReadErrorKind::Unrecoverable) => {
                            mask |= 1 << k;
                            let at = (i + k as usize) * bs;
                            let _ = data.try_for_each_piece_mut(at, bs, |p| {
                                p.fill(0);
                                Ok::<(), ()>(())
                            });
                            note(&mut run_status, Status::UNRECOVERED_READ);
                        }
                        None => {}
                    }
                }
            }
            (run_status, mask)
        });
        ReadOutcome { status, failed, high_ecc }
    }

    fn exec_copy(&self, src: &PpaList, dst: &PpaList) -> (Status, LbaBitmap) {
        let n = src.len();
        if dst.len() != n {
            return (Status::INVALID_FIELD, LbaBitmap::first(n.max(dst.len())));
        }
        let mut data = SgList::from(vec![0u8; n * self.bs()]);
        let mut oob = IoBuf::zeroed(n * self.oob_bytes());
        let r = self.exec_read(src, &mut data, Some(&mut oob));
        let hard = LbaBitmap(r.failed.0 & !r.high_ecc.0);
        if hard.0 != 0 {
            return (r.status, hard);
        }
        let (status, failed) = self.exec_write(dst, &data, Some(&oob));
        if status.is_success() && !r.status.is_success() {
            return (r.status, r.failed);
        }
        (status, failed)
    }

    fn exec_reset(&self, chunks: &PpaList) -> (Status, LbaBitmap) {
        let mut status = Status::SUCCESS;
        let mut failed = LbaBitmap::NONE;
        let caps = self.info.capabilities;
        for (i, p) in chunks.as_slice().iter().enumerate() {
            let Ok(idx) = self.chunk_slot_index(p) else {
                failed.set(i);
                note(&mut status, Status::LBA_OUT_OF_RANGE);
                continue;
            };
            let mut slot = write_slot(&self.chunks[idx]);
            let refused = match slot.state {
                ChunkState::Offline => Some(Status::OFFLINE_CHUNK),
                ChunkState::Free if !caps.multiple_resets => Some(Status::INVALID_RESET),
                ChunkState::Open if !caps.early_reset => Some(Status::INVALID_RESET),
                ChunkState::Free | ChunkState::Open | ChunkState::Closed => None,
            };
            if let Some(s) = refused {
                failed.set(i);
                note(&mut status, s);
                continue;
            }
            slot.erase_count += 1;
            slot.faults.read_errors.clear();
            slot.wp = 0;
            let worn_out = slot.erase_count >= u64::from(self.geometry.pe_cycles);
            slot.state = if worn_out { ChunkState::Offline } else { ChunkState::Free };
            if self.persist(idx, &slot).is_err() {
                failed.set(i);
                note(&mut status, Status::INTERNAL_ERROR);
                continue;
            }
            if worn_out {
                self.notify(self.pack(p.chunk_start()), NOTIFY_STATE_WEAR_INDEX, NOTIFY_MASK_CHUNK, 0);
                failed.set(i);
                note(&mut status, Status::OFFLINE_CHUNK);
            }
        }
        (status, failed)
    }

    fn execute(&self, cmd: Command) -> Completion {
        let mut c = Completion {
            tag: cmd.tag,
            status: Status::SUCCESS,
            failed: LbaBitmap::NONE,
            appended_at: None,
            buffers: Buffers::default(),
        };
        match cmd.op {
            Op::Reset { chunks } => (c.status, c.failed) = self.exec_reset(&chunks),
            Op::Write { ppas, data, oob } => {
                (c.status, c.failed) = self.exec_write(&ppas, &data, oob.as_ref());
                c.buffers = Buffers { data: Some(data), oob };
            }
            Op::Read { ppas, mut data, mut oob } => {
                let r = self.exec_read(&ppas, &mut data, oob.as_mut());
                (c.status, c.failed) = (r.status, r.failed);
                c.buffers = Buffers { data: Some(data), oob };
            }
            Op::Copy { src, dst } => (c.status, c.failed) = self.exec_copy(&src, &dst),
            Op::Append { chunk, data, oob } => {
                (c.status, c.failed, c.appended_at) = self.exec_append(chunk, &data, oob.as_ref());
                c.buffers = Buffers { data: Some(data), oob };
            }
            Op::Flush => {
                if self.sync_image().is_err() {
                    c.status = Status::INTERNAL_ERROR;
                }
            }
        }
        c
    }
}

impl MediaDevice for EmuDevice {
    fn info(&self) -> &MediaInfo {
        &self.inner.info
    }

    fn chunk_info(&self, chunk: Ppa) -> Result<ChunkInfo, MediaError> {
        let idx = self.inner.chunk_slot_index(&chunk)?;
        let slot = read_slot(&self.inner.chunks[idx]);
        Ok(self.inner.chunk_info(idx, &slot))
    }

    fn report_chunks(
        &self,
        first_index: u64,
        max: usize,
        out: &mut Vec<ChunkInfo>,
    ) -> Result<usize, MediaError> {
        let first = usize::try_from(first_index).ok().filter(|i| *i < self.inner.chunks.len()).ok_or(
            MediaError::ChunkOutOfRange { ppa: self.inner.info.chunk_at(first_index).unwrap_or_default() },
        )?;
        let mut n = 0;
        for (idx, slot) in self.inner.chunks.iter().enumerate().skip(first).take(max) {
            out.push(self.inner.chunk_info(idx, &read_slot(slot)));
            n += 1;
        }
        Ok(n)
    }

    fn take_notifications(&self, out: &mut Vec<ChunkNotification>) -> usize {
        let mut n = self.inner.notifications.lock().unwrap_or_else(|e| e.into_inner());
        let count = n.log.len();
        out.extend(n.log.drain(..));
        count
    }

    fn queue_pair(&self, depth: usize) -> Result<Box<dyn QueuePair>, MediaError> {
        if depth == 0 {
            return Err(MediaError::InvalidConfig {
                field: "queue depth",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Box::new(EmuQueuePair {
            inner: Arc::clone(&self.inner),
            done: VecDeque::with_capacity(depth),
            depth,
            event: OnceLock::new(),
        }))
    }
}

/// One thread's queue pair on the emulator.
struct EmuQueuePair {
    inner: Arc<Inner>,
    done: VecDeque<Completion>,
    depth: usize,
    /// Created on the first `wait_fd` call; readable while completions are pending.
    event: OnceLock<Option<EventFd>>,
}

impl QueuePair for EmuQueuePair {
    fn submit(&mut self, cmd: Command) -> Result<(), Rejected> {
        if self.done.len() >= self.depth {
            return Err(Rejected { command: cmd, reason: RejectReason::QueueFull });
        }
        let c = self.inner.execute(cmd);
        self.done.push_back(c);
        if self.done.len() == 1 {
            if let Some(Some(ev)) = self.event.get() {
                // A full counter (cannot happen: we read it on every drain) only means
                // the fd is already readable.
                let _ = ev.write(1);
            }
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<Completion>, max: usize) -> usize {
        let n = max.min(self.done.len());
        done.extend(self.done.drain(..n));
        if self.done.is_empty() {
            if let Some(Some(ev)) = self.event.get() {
                // EAGAIN when nothing was signalled: nothing to clear.
                let _ = ev.read();
            }
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn wait_fd(&self) -> Option<RawFd> {
        let ev = self.event.get_or_init(|| {
            let ev = EventFd::new(EFD_NONBLOCK).ok()?;
            if !self.done.is_empty() {
                let _ = ev.write(1);
            }
            Some(ev)
        });
        ev.as_ref().map(|e| e.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_masks() {
        assert_eq!(range_mask(0, 0), 0);
        assert_eq!(range_mask(0, 3), 0b111);
        assert_eq!(range_mask(2, 4), 0b1100);
        assert_eq!(range_mask(0, 64), u64::MAX);
        assert_eq!(range_mask(63, 64), 1 << 63);
    }

    #[test]
    fn wear_index_scales_to_255() {
        assert_eq!(wear_index(0, 100), 0);
        assert_eq!(wear_index(50, 100), 127);
        assert_eq!(wear_index(100, 100), 255);
        assert_eq!(wear_index(u64::MAX, 1), 255);
    }
}
